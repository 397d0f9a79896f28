"""The submitter's side: sendmail command lines, reading stdin, completing the message."""

from __future__ import annotations

import getpass
import io
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mailwatchd.errors import MalformedMessage
from mailwatchd.message import envelope
from mailwatchd.message.envelope import ENVELOPE_FROM, ENVELOPE_TO
from mailwatchd.submission.submit import (
    Submission,
    date_value,
    message_id,
    message_id_domain,
    parse_sendmail_args,
    prepare,
    read_message,
)

# -- parse_sendmail_args ----------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [
    # cron (cronie): mails the job's output to MAILTO
    (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
     Submission(full_name="CronDaemon", recipients=("root",), dot_ends_input=False)),
    # PHP's default sendmail_path
    (["-t", "-i"], Submission(from_headers=True, dot_ends_input=False)),
    # Django-style / generic scripts
    (["-t", "-oi"], Submission(from_headers=True, dot_ends_input=False)),
    # mutt
    (["-oem", "-oi", "--", "ann@example.org"], Submission(recipients=("ann@example.org",), dot_ends_input=False)),
    # git send-email
    (["-i", "ann@example.org", "bob@example.org"],
     Submission(recipients=("ann@example.org", "bob@example.org"), dot_ends_input=False)),
    # classic: the dot rule stays on without -i
    (["ann@example.org"], Submission(recipients=("ann@example.org",))),
    (["-f", "app@example.com", "-t"], Submission(sender="app@example.com", from_headers=True)),
    (["-fapp@example.com", "-t"], Submission(sender="app@example.com", from_headers=True)),
    (["-f<app@example.com>", "x@example.org"], Submission(sender="app@example.com", recipients=("x@example.org",))),
    (["-f", "<>", "x@example.org"], Submission(sender="", recipients=("x@example.org",))),
    (["-r", "bounce@example.com", "x@example.org"],
     Submission(sender="bounce@example.com", recipients=("x@example.org",))),
    (["-rbounce@example.com", "x@example.org"],
     Submission(sender="bounce@example.com", recipients=("x@example.org",))),
    (["-F", "Cron Daemon", "-t"], Submission(full_name="Cron Daemon", from_headers=True)),
    (["--", "-odd@example.org", "-t"], Submission(recipients=("-odd@example.org", "-t"))),
    (["-bm", "-v", "-odi", "-N", "never", "-R", "hdrs", "-V", "envid", "-X", "/tmp/log", "-L", "tag", "-h", "17",
      "-p", "smtp", "-O", "DeliveryMode=b", "-em", "x@example.org"], Submission(recipients=("x@example.org",))),
    ([], Submission()),
])
def test_sendmail_command_lines(argv: list[str], expected: Submission) -> None:
    assert parse_sendmail_args(argv) == expected


@pytest.mark.parametrize("mode", ["-bp", "-bs", "-bd", "-bi", "-bv"])
def test_unsupported_modes_are_refused_with_a_hint(mode: str) -> None:
    with pytest.raises(ValueError, match=f"mode {mode} is not supported") as info:
        parse_sendmail_args([mode])
    assert "mailwatchd queue" in str(info.value) and "mailwatchd flush" in str(info.value)


@pytest.mark.parametrize("option", ["-f", "-r", "-F", "-O", "-N"])
def test_options_that_need_a_value(option: str) -> None:
    with pytest.raises(ValueError, match=f"option {option} needs a value"):
        parse_sendmail_args(["x@example.org", option])


# -- read_message -----------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_read_message_stops_at_a_lone_dot(newline: bytes) -> None:
    lines = [b"Subject: x", b"", b"line", b". not alone", b"..", b".", b"after the dot", b""]
    stream = io.BytesIO(newline.join(lines))
    assert read_message(stream, True) == newline.join(lines[:5]) + newline


def test_read_message_without_the_dot_rule_reads_everything() -> None:
    data = b"Subject: x\n\nline\n.\nafter the dot\n"
    assert read_message(io.BytesIO(data), False) == data


def test_read_message_until_eof_without_a_dot() -> None:
    data = b"Subject: x\n\nno dot\nlast line without newline"
    assert read_message(io.BytesIO(data), True) == data


def test_read_message_binary_stays_binary() -> None:
    data = b"Subject: x\n\n\xff\xfe\x00 bytes\n"
    assert read_message(io.BytesIO(data), True) == data
    assert read_message(io.BytesIO(data), False) == data


# -- prepare ----------------------------------------------------------------------------------------


def header(raw: bytes, name: bytes) -> list[bytes]:
    fields, _ = envelope.split_header(raw)
    return [field.raw.split(b":", 1)[1].strip() for field in fields if field.name == name.lower()]


def test_prepare_adds_from_date_and_message_id() -> None:
    raw = b"To: ann@example.org\nSubject: report\n\nbody\n"
    out = prepare(raw, Submission(from_headers=True))
    assert out.endswith(raw)
    # The local user's bare name: the daemon qualifies it with its own settings.
    assert header(out, b"From") == [getpass.getuser().encode()]
    (date,) = header(out, b"Date")
    assert parsedate_to_datetime(date.decode()).tzinfo is not None
    (message_id,) = header(out, b"Message-ID")
    assert message_id.startswith(b"<") and message_id.endswith(f"@{message_id_domain()}>".encode())
    assert ENVELOPE_FROM.encode() not in out  # nothing explicit asked: the headers are the envelope
    parsed = envelope.parse("Q", out)
    assert (parsed.sender, parsed.recipients) == (getpass.getuser(), ("ann@example.org",))


def test_prepare_asks_no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object) -> str:
        raise AssertionError("the submitter must not resolve names")

    for name in ("getfqdn", "gethostbyaddr", "gethostbyname", "getaddrinfo"):
        monkeypatch.setattr(socket, name, no_dns)
    out = prepare(b"Subject: x\n\nbody\n", Submission(recipients=("root",)))
    assert envelope.parse("Q", out).recipients == ("root",)


def test_message_id_domain_from_mailname_else_host_name(tmp_path: Path) -> None:
    mailname = tmp_path / "mailname"
    mailname.write_text("mail.example.com\nignored\n")
    assert message_id_domain(mailname) == "mail.example.com"
    assert message_id_domain(tmp_path / "missing") == socket.gethostname()


@pytest.fixture
def local_time_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Set TZ with monkeypatch.setenv; the process's zone is restored afterwards."""
    yield monkeypatch
    monkeypatch.undo()
    time.tzset()


# POSIX zone rules (no tz database needed): UTC, a half-hour east, a half-hour west with DST, plain west with DST.
@pytest.mark.parametrize("zone", ["UTC0", "IST-5:30", "NST3:30NDT,M3.2.0,M11.1.0", "EST5EDT,M3.2.0,M11.1.0"])
def test_the_date_is_the_one_email_utils_writes(local_time_zone: pytest.MonkeyPatch, zone: str) -> None:
    local_time_zone.setenv("TZ", zone)
    time.tzset()
    for now in (0.0, 951_782_400.0, 1_700_000_000.75, 1_719_000_000.0, 4_102_444_799.0, time.time()):
        assert date_value(now) == formatdate(now, localtime=True)


def test_message_ids_have_make_msgids_form_and_differ() -> None:
    first, second = message_id("mail.example.com"), message_id("mail.example.com")
    assert re.fullmatch(r"<\d+\.\d+\.\d+@mail\.example\.com>", first)
    assert first != second


def test_prepare_keeps_present_headers_untouched() -> None:
    raw = (b"From: App <app@example.com>\r\nTo: ann@example.org\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           b"Message-ID: <1@example.com>\r\n\r\nbody\r\n")
    assert prepare(raw, Submission(from_headers=True)) == raw


def test_prepare_matches_the_message_line_endings() -> None:
    raw = b"To: ann@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    out = prepare(raw, Submission(from_headers=True))
    assert b"\n" not in out.replace(b"\r\n", b"")


def test_prepare_from_uses_f_and_full_name() -> None:
    out = prepare(b"To: ann@example.org\n\nbody\n",
                  Submission(sender="cron@example.com", full_name="Cron Daemon", from_headers=True))
    assert header(out, b"From") == [b"Cron Daemon <cron@example.com>"]
    parsed = envelope.parse("Q", out)
    assert (parsed.sender, parsed.recipients) == ("cron@example.com", ("ann@example.org",))
    assert out.startswith(f"{ENVELOPE_FROM}: <cron@example.com>\n{ENVELOPE_TO}: <ann@example.org>\n".encode())


@pytest.mark.parametrize(("full_name", "field"), [
    ("Jörg", "=?utf-8?b?SsO2cmc=?= <jörg@bücher.example>"),
    (None, "jörg@bücher.example"),
])
def test_prepare_from_with_a_utf8_sender(full_name: str | None, field: str) -> None:
    out = prepare(b"To: ann@example.org\n\nbody\n",
                  Submission(sender="jörg@bücher.example", full_name=full_name, from_headers=True))
    assert header(out, b"From") == [field.encode()]
    parsed = envelope.parse("Q", out)
    assert (parsed.sender, parsed.recipients) == ("jörg@bücher.example", ("ann@example.org",))
    assert envelope.sender_of(parsed.data) == "jörg@bücher.example"


def test_prepare_explicit_sender_overrides_the_from_header() -> None:
    raw = b"From: app@example.com\nTo: ann@example.org\nDate: x\nMessage-ID: <1@x>\n\nbody\n"
    out = prepare(raw, Submission(sender="bounce@example.com", from_headers=True))
    assert out == f"{ENVELOPE_FROM}: <bounce@example.com>\n{ENVELOPE_TO}: <ann@example.org>\n".encode() + raw
    parsed = envelope.parse("Q", out)
    assert (parsed.sender, parsed.data) == ("bounce@example.com", raw)


def test_prepare_null_sender() -> None:
    raw = b"From: app@example.com\nTo: ann@example.org\nDate: x\nMessage-ID: <1@x>\n\nbody\n"
    parsed = envelope.parse("Q", prepare(raw, Submission(sender="", recipients=("ann@example.org",))))
    assert parsed.sender == ""


def test_prepare_recipients_without_t_replace_the_headers() -> None:
    raw = b"From: app@example.com\nTo: ann@example.org\nBcc: hidden@example.org\nDate: x\nMessage-ID: <1@x>\n\nb\n"
    out = prepare(raw, Submission(recipients=("ops@example.net", "root")))
    parsed = envelope.parse("Q", out)
    assert parsed.sender == "app@example.com"  # from the headers
    assert parsed.recipients == ("ops@example.net", "root")  # the daemon completes root
    assert b"hidden" not in parsed.data


def test_prepare_t_plus_arguments_merges() -> None:
    raw = b"From: app@example.com\nTo: ann@example.org\nCc: bob@example.org\nDate: x\nMessage-ID: <1@x>\n\nb\n"
    out = prepare(raw, Submission(recipients=("bob@example.org", "carol@example.org"), from_headers=True))
    parsed = envelope.parse("Q", out)
    assert parsed.recipients == ("ann@example.org", "bob@example.org", "carol@example.org")


def test_prepare_cron_style() -> None:
    submission = parse_sendmail_args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
    raw = b"Subject: Cron <root@host> run-parts /etc/cron.hourly\nContent-Type: text/plain\n\noutput\n"
    out = prepare(raw, submission)
    parsed = envelope.parse("Q", out)
    assert parsed.recipients == ("root",)
    assert parsed.sender == getpass.getuser()
    assert header(out, b"From") == [f"CronDaemon <{getpass.getuser()}>".encode()]
    assert parsed.data.endswith(b"\n\noutput\n")


@pytest.mark.parametrize(("raw", "submission", "sender", "recipients"), [
    (b"From: root (Cron Daemon)\nTo: root\n\nbody\n", Submission(from_headers=True), "root", ("root",)),
    (b"From: a@example.com\nTo: www-data, nobody\n\nbody\n", Submission(from_headers=True), "a@example.com",
     ("www-data", "nobody")),
    (b"Subject: x\n\nbody\n", Submission(sender="cron", recipients=("root",)), "cron", ("root",)),
])
def test_prepare_keeps_bare_local_names(raw: bytes, submission: Submission, sender: str,
                                        recipients: tuple[str, ...]) -> None:
    parsed = envelope.parse("Q", prepare(raw, submission))
    assert (parsed.sender, parsed.recipients) == (sender, recipients)
    assert b"@" not in b"".join(header(parsed.data, b"To"))  # the headers are not qualified either


def test_prepare_a_body_without_any_header() -> None:
    body = b"The backup finished.\nNo errors.\n"
    out = prepare(body, Submission(recipients=("ann@example.org",)))
    parsed = envelope.parse("Q", out)
    assert parsed.recipients == ("ann@example.org",)
    fields, rest = envelope.split_header(parsed.data)
    assert {field.name for field in fields} == {b"from", b"date", b"message-id"}
    assert rest == b"\n" + body


def test_prepare_a_body_starting_with_a_blank_line() -> None:
    out = prepare(b"\nbody\n", Submission(recipients=("ann@example.org",)))
    _, rest = envelope.split_header(envelope.parse("Q", out).data)
    assert rest == b"\nbody\n"


@pytest.mark.parametrize(("raw", "submission", "words"), [
    (b"", Submission(from_headers=True), "empty"),
    (b"  \n\n", Submission(recipients=("a@example.org",)), "empty"),
    (b"Subject: x\n\nbody\n", Submission(from_headers=True), "no recipient"),
    (b"From: a@example.com\nTo: Ann Smith\n\nbody\n", Submission(from_headers=True), "'Ann Smith'"),
    (b"Subject: x\n\nbody\n", Submission(recipients=("root,",)), "'root,'"),
    (b"Subject: x\n\nbody\n", Submission(recipients=("a@b.c>\r\nRCPT TO:<x@y.z",)), "not usable"),
    (b"Subject: x\n\nbody\n", Submission(sender="bad sender", recipients=("a@example.org",)), "not usable"),
    (b"From: a@example.com\nTo: \xff\xfe@example.org\n\nbody\n", Submission(from_headers=True),
     r"recipient address '\\xff\\xfe@example.org' is not valid UTF-8"),
    # An argument with invalid bytes, as Python decodes sys.argv (surrogate escapes).
    (b"Subject: x\n\nbody\n", Submission(recipients=(b"\xff@example.org".decode(errors="surrogateescape"),)),
     r"recipient address '\\xff@example.org' is not valid UTF-8"),
    (b"Subject: x\n\nbody\n", Submission(sender=b"b\xf6se@example.com".decode(errors="surrogateescape"),
                                          recipients=("a@example.org",)),
     r"sender address 'b\\xf6se@example.com' is not valid UTF-8"),
])
def test_prepare_refuses_what_cannot_be_sent(raw: bytes, submission: Submission, words: str) -> None:
    with pytest.raises(MalformedMessage, match=words):
        prepare(raw, submission)


def test_bundled_flags_are_expanded_as_sendmail_does() -> None:
    bundled = parse_sendmail_args(["-ti", "extra@example.org"])
    assert bundled.from_headers and not bundled.dot_ends_input
    assert bundled.recipients == ("extra@example.org",)
    assert parse_sendmail_args(["-it"]) == parse_sendmail_args(["-t", "-i"])


def test_enqueued_file_is_group_readable_whatever_the_umask(tmp_path: Path) -> None:
    """The daemon reads drops through its group: a caller's umask 077 must not make them 0600."""
    from mailwatchd.submission.submit import enqueue

    old = os.umask(0o077)
    try:
        queue_id = enqueue(tmp_path, b"From: a@example.com\nTo: b@example.org\n\nhi\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new" / queue_id).st_mode) == 0o640


# -- envelope's checks without re: the patterns they stand for ------------------------------------------------
# envelope.py checks these with str and bytes methods (`sendmail` would pay for re and the compiling);
# here they are held to the patterns, with "\Z" for the patterns' "$": no line break may end an address.

HEADER_END = re.compile(rb"\r?\n\r?\n")
FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
ADDRESS = re.compile(r"^[^\s<>()\x00-\x1f\x7f@]+@[^\s<>()\x00-\x1f\x7f@]+\Z")
LOCAL_NAME = re.compile(r'^[^\s<>()\[\]\\,;:"\x00-\x1f\x7f@]+\Z')
# The characters the rules turn on, a few of each kind, and room for anything else.
_TRICKY_TEXT = "aZ09.-_+@<>()[]\\,;:\"' \t\n\r\x0b\x0c\x00\x1c\x1f\x7f\x85\xa0\u1680\u2000\u2028\u3000\ufeffé\udc80"
_TRICKY_BYTES = b"aZ09-:; \t\r\n\x00\x1f\x20\x21\x39\x3a\x3b\x7e\x7f\x80\xff"
tricky_text = st.text(alphabet=st.one_of(st.sampled_from(_TRICKY_TEXT), st.characters()), max_size=12)
tricky_bytes = st.lists(st.sampled_from([bytes([b]) for b in _TRICKY_BYTES]) | st.binary(max_size=2),
                        max_size=14).map(b"".join)


@given(tricky_text)
@example("a@b\n")
@example("root\n")
@example("a@b\n\n")
@example("\n")
def test_address_checks_are_the_patterns(text: str) -> None:
    assert envelope._is_address(text) is bool(ADDRESS.match(text))
    assert envelope._is_local_name(text) is bool(LOCAL_NAME.match(text))
    assert envelope.is_local_name(text) is bool(LOCAL_NAME.match(text))


def test_an_address_ending_in_a_line_break_is_refused_it_would_end_the_envelope_header() -> None:
    for address in ("a@b\n", "root\n", "a@b\r\n"):
        with pytest.raises(MalformedMessage):
            envelope.check_address(address, "recipient", local=True)
    with pytest.raises(MalformedMessage):
        envelope.with_envelope(b"Subject: x\n\nbody\n", "app@example.com", ["a@b\nInjected: yes"])


def test_address_checks_take_each_kind_of_character_as_the_patterns_do() -> None:
    """Every ASCII character, every one re or str takes for white space, and a sample of the rest."""
    everything = "".join(map(chr, range(0x110000)))
    spaces = set(re.findall(r"\s", everything)) | {char for char in everything if char.isspace()}
    for char in sorted(set(map(chr, range(0x80))) | spaces | set(everything[::251])):
        code = ord(char)
        assert envelope._is_local_name(char) is bool(LOCAL_NAME.match(char)), hex(code)
        assert envelope._is_address(f"a{char}@b") is bool(ADDRESS.match(f"a{char}@b")), hex(code)


@given(tricky_bytes)
@example(b"From: a\n")
@example(b"Subject \t: x")
@example(b"From foo\nTo: x")
@example(b": x")
def test_the_field_name_is_the_pattern(line: bytes) -> None:
    match = FIELD_NAME.match(line)
    assert envelope._field_name(line) == (match.group(1) if match else None)


@given(tricky_bytes)
@example(b"a: b\r\n\r\nbody")
@example(b"a: b\r\n\nbody")
@example(b"a: b\n\r\nbody")
@example(b"\n\n")
@example(b"a: b\r\n")
def test_the_header_ends_where_the_pattern_says(raw: bytes) -> None:
    match = HEADER_END.search(raw)
    expected = match.start() + (2 if raw[match.start():match.start() + 1] == b"\r" else 1) if match else len(raw)
    assert envelope._header_length(raw) == expected
