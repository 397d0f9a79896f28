"""The envelope from a spool file's headers (as `sendmail -t` does), and the bytes to send."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mailwatchd.errors import MalformedMessage
from mailwatchd.message import envelope
from mailwatchd.message.envelope import (
    ENVELOPE_FROM,
    ENVELOPE_TO,
    OutgoingMessage,
    check_address,
    is_local_name,
    parse,
    sender_of,
    split_header,
    with_envelope,
)

# What may go into MAIL FROM:<...> / RCPT TO:<...> without changing the SMTP command: a full
# address, or a bare local name the daemon completes before it goes out.
SAFE_ADDRESS = re.compile(r"^[^\s<>\x00-\x1f\x7f@]+@[^\s<>\x00-\x1f\x7f@]+$|^[^\s<>()\x00-\x1f\x7f@]+$")


def crlf(text: bytes) -> bytes:
    return text.replace(b"\n", b"\r\n")


def malformed(raw: bytes) -> str:
    with pytest.raises(MalformedMessage) as info:
        parse("Q", raw)
    return str(info.value)


# -- sender and recipients from the headers -----------------------------------------------------


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_sender_and_recipients_from_headers(newline: bytes) -> None:
    raw = newline.join([b"From: App <app@example.com>", b"To: Ann <ann@example.org>, bob@example.org",
                        b"Cc: carol@example.net", b"Subject: hi", b"", b"body", b""])
    message = parse("QID", raw)
    assert message == OutgoingMessage("QID", "app@example.com",
                                      ("ann@example.org", "bob@example.org", "carol@example.net"), raw, len(raw))


def test_sender_header_wins_over_from() -> None:
    raw = b"From: a@example.com, b@example.com\nSender: Secretary <sec@example.com>\nTo: x@example.org\n\nbody\n"
    assert parse("Q", raw).sender == "sec@example.com"
    assert sender_of(raw) == "sec@example.com"


def test_first_from_address_without_sender() -> None:
    raw = b"From: a@example.com, b@example.com\nTo: x@example.org\n\nbody\n"
    assert parse("Q", raw).sender == "a@example.com"
    assert sender_of(raw) == "a@example.com"


def test_recipients_from_to_cc_bcc_deduplicated_in_order() -> None:
    raw = (b"From: s@example.com\nTo: a@example.org, B@example.org\nCc: b@example.org, c@example.org\n"
           b"To: d@example.org\nBcc: a@example.org, e@example.org\n\nbody\n")
    # To fields first, then Cc, then Bcc; the first spelling of an address is kept.
    assert parse("Q", raw).recipients == ("a@example.org", "B@example.org", "d@example.org", "c@example.org",
                                          "e@example.org")


def test_groups_and_display_names() -> None:
    raw = b'From: "Doe, John" <john@example.com>\nTo: friends: a@example.org, "B \\"x\\"" <b@example.org>;\n\nx\n'
    message = parse("Q", raw)
    assert message.sender == "john@example.com"
    assert message.recipients == ("a@example.org", "b@example.org")


def test_field_names_are_case_insensitive() -> None:
    raw = b"FROM: s@example.com\nto: a@example.org\nBCC : b@example.org\nsubject: x\n\nbody\n"
    message = parse("Q", raw)
    assert (message.sender, message.recipients) == ("s@example.com", ("a@example.org", "b@example.org"))
    assert message.data == b"FROM: s@example.com\nto: a@example.org\nsubject: x\n\nbody\n"


def test_message_without_bcc_is_sent_byte_for_byte() -> None:
    raw = crlf(b"From: s@example.com\nTo: a@example.org\nX-Long: one\n\ttwo\n\nbody\n\nBcc: not-a-header@x.y\n")
    message = parse("Q", raw)
    assert message.data == raw
    assert message.recipients == ("a@example.org",)


# -- Bcc removal ------------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_bcc_removed_with_its_continuation_lines(newline: bytes) -> None:
    lines = [b"From: s@example.com", b"To: a@example.org", b"Bcc: hidden@example.org,", b"  other@example.org,",
             b"\tthird@example.org", b"Subject: x", b"Bcc: fourth@example.org", b"", b"body",
             b"Bcc: in the body stays", b""]
    raw = newline.join(lines)
    message = parse("Q", raw)
    assert message.recipients == ("a@example.org", "hidden@example.org", "other@example.org",
                                  "third@example.org", "fourth@example.org")
    assert message.data == newline.join([b"From: s@example.com", b"To: a@example.org", b"Subject: x", b"",
                                         b"body", b"Bcc: in the body stays", b""])
    assert b"hidden" not in message.data and b"other@" not in message.data and b"fourth" not in message.data
    assert message.size == len(raw)


def test_bcc_as_last_header_without_body() -> None:
    raw = b"From: s@example.com\nBcc: only@example.org,\n  more@example.org"
    message = parse("Q", raw)
    assert message.recipients == ("only@example.org", "more@example.org")
    assert message.data == b"From: s@example.com\n"


# -- explicit envelope ------------------------------------------------------------------------------


def test_explicit_envelope_overrides_and_is_removed() -> None:
    raw = (f"{ENVELOPE_FROM}: <bounce@example.com>\n{ENVELOPE_TO}: <x@example.org>\n"
           f"{ENVELOPE_TO}: y@example.org\nFrom: s@example.com\nSender: t@example.com\nTo: a@example.org\n"
           "Bcc: b@example.org\n\nbody\n").encode()
    message = parse("Q", raw)
    assert message.sender == "bounce@example.com"
    assert message.recipients == ("x@example.org", "y@example.org")
    assert message.data == b"From: s@example.com\nSender: t@example.com\nTo: a@example.org\n\nbody\n"
    assert sender_of(raw) == "bounce@example.com"


def test_explicit_null_sender() -> None:
    raw = f"{ENVELOPE_FROM}: <>\nFrom: s@example.com\nTo: a@example.org\n\nbody\n".encode()
    assert parse("Q", raw).sender == ""
    assert sender_of(raw) == ""


def test_explicit_envelope_from_alone_keeps_header_recipients() -> None:
    raw = f"{ENVELOPE_FROM}: <b@example.com>\nFrom: s@example.com\nTo: a@example.org\n\nbody\n".encode()
    message = parse("Q", raw)
    assert (message.sender, message.recipients) == ("b@example.com", ("a@example.org",))
    assert message.data == b"From: s@example.com\nTo: a@example.org\n\nbody\n"


def test_explicit_envelope_field_names_any_case() -> None:
    raw = b"x-mailwatchd-envelope-from: <b@example.com>\nX-MAILWATCHD-ENVELOPE-TO: <r@example.org>\nSubject: s\n\nb"
    message = parse("Q", raw)
    assert (message.sender, message.recipients, message.data) == ("b@example.com", ("r@example.org",),
                                                                  b"Subject: s\n\nb")


@pytest.mark.parametrize("value", ["<a@b.c> <d@e.f>", "<a@b.c>\n RCPT TO:<x@y.z>", "<>", "<a@b.c>, d@e.f",
                                   "<a@b.c>\r\nRCPT TO:<x@y.z>"])
def test_explicit_recipient_must_be_one_plain_address(value: str) -> None:
    raw = f"{ENVELOPE_TO}: {value}\nFrom: s@example.com\nTo: a@example.org\n\nbody\n".encode()
    with pytest.raises(MalformedMessage):
        parse("Q", raw)


# -- mbox "From " line ------------------------------------------------------------------------------


def test_mbox_from_line_is_not_a_header_and_not_sent() -> None:
    raw = b"From someone@example.com Mon Jan  1 00:00:00 2024\nFrom: s@example.com\nTo: a@example.org\n\nbody\n"
    message = parse("Q", raw)
    assert (message.sender, message.recipients) == ("s@example.com", ("a@example.org",))
    assert message.data == b"From: s@example.com\nTo: a@example.org\n\nbody\n"


def test_obsolete_from_field_with_space_before_colon_is_a_field() -> None:
    # RFC 5322 §4.5 allows white space before the colon; this is not an mbox separator.
    raw = b"From : s@example.com\nTo: a@example.org\n\nbody\n"
    message = parse("Q", raw)
    assert (message.sender, message.recipients, message.data) == ("s@example.com", ("a@example.org",), raw)


# -- malformed input ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"\n\nbody\n", b"just a body line\n\nmore\n", b"no header at all"])
def test_no_header(raw: bytes) -> None:
    assert "not an RFC 5322 message" in malformed(raw)


def test_header_line_without_a_field_name() -> None:
    assert "no field name" in malformed(b"From: s@example.com\nnot a field\nTo: a@example.org\n\nbody\n")


@pytest.mark.parametrize("raw", [b"To: a@example.org\n\nbody\n", b"From: \nTo: a@example.org\n\nx",
                                 b"Sender: \nFrom: Group:;\nTo: a@example.org\n\nx"])
def test_no_sender(raw: bytes) -> None:
    assert "no sender" in malformed(raw)
    with pytest.raises(MalformedMessage):
        sender_of(raw)


@pytest.mark.parametrize("raw", [b"From: s@example.com\nSubject: x\n\nbody\n",
                                 b"From: s@example.com\nTo: undisclosed-recipients:;\n\nbody\n"])
def test_no_recipient(raw: bytes) -> None:
    assert "no recipient" in malformed(raw)


@pytest.mark.parametrize(("header", "address"), [
    (b"To: a b@example.org", "a b@example.org"),
    (b"To: Ann Smith", "Ann Smith"),
    (b"To: @example.org", None),
    (b"To: user@", None),
])
def test_unusable_recipient(header: bytes, address: str | None) -> None:
    text = malformed(b"From: s@example.com\n" + header + b"\n\nbody\n")
    assert "not usable" in text or "no recipient" in text
    if address is not None:
        assert repr(address) in text


def test_unusable_sender() -> None:
    assert "sender address 'cron daemon'" in malformed(b"From: cron daemon\nTo: a@example.org\n\nbody\n")


@pytest.mark.parametrize("raw", [
    b"From: s@x.y\r\nTo: a@b.c>\r\nRCPT TO:<x@y.z>\r\n\r\nbody",
    b"From: s@x.y\r\nTo: <a@b.c>\r\n RCPT TO:<x@y.z>\r\n\r\nbody",
    b"From: s@x.y\r\nTo: a@b.c>, RCPT TO:<x@y.z>\r\n\r\nbody",
    b"From: s@x.y\r\nTo: \"a@b.c>\\r\\nRCPT TO:<x@y.z\" <q@r.s>\r\n\r\nbody",
    b"From: <s@x.y>\r\n DATA\r\nTo: q@r.s\r\n\r\nbody",
    b"From: s@x.y>\rRCPT TO:<x@y.z>\r\nTo: q@r.s\r\n\r\nbody",
    b"From: s@x.y\r\nTo: q@r.s\rRCPT TO:<x@y.z>\r\n\r\nbody",
])
def test_header_injection_never_yields_an_unsafe_address(raw: bytes) -> None:
    try:
        message = parse("Q", raw)
    except MalformedMessage:
        return
    for address in (message.sender, *message.recipients):
        assert SAFE_ADDRESS.match(address), address
        assert not set(address) & set("\r\n<> ")


header_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60)


@given(header_text, header_text)
@example("a@b.c>\r\nRCPT TO:<x@y.z", "s@x.y")
@example("\"x\r\n\"@y.z", "<a@b.c>\rDATA")
def test_no_header_value_yields_an_unsafe_address(to: str, sender: str) -> None:
    raw = f"From: {sender}\r\nTo: {to}\r\nSubject: x\r\n\r\nbody".encode()
    try:
        message = parse("Q", raw)
    except MalformedMessage:
        return
    for address in (message.sender, *message.recipients):
        assert SAFE_ADDRESS.match(address), address


# -- UTF-8 (RFC 6531, RFC 6532) ----------------------------------------------------------------------


def test_utf8_addresses_are_used_as_they_are() -> None:
    raw = ("From: Jörg <jörg@bücher.example>\nTo: 用户@例子.广告, \"Zoë\" <zoë@example.org>\n"
           "Subject: grüße\n\nbody\n").encode()
    message = parse("Q", raw)
    assert (message.sender, message.recipients) == ("jörg@bücher.example", ("用户@例子.广告", "zoë@example.org"))
    assert message.data == raw
    assert sender_of(raw) == "jörg@bücher.example"
    stored = with_envelope(raw, message.sender, message.recipients)
    assert parse("Q", stored).recipients == message.recipients


@pytest.mark.parametrize(("raw", "reason"), [
    (b"From: s@x.test\nTo: \xff\xfe@y.test\n\nbody\n", r"recipient address '\xff\xfe@y.test' is not valid UTF-8"),
    (b"From: s@x.test\nTo: a@y.test\nCc: Ann <ann@\xc3.test>\n\nbody\n",
     r"recipient address 'ann@\xc3.test' is not valid UTF-8"),
    (b'From: s@x.test\nTo: "Doe, J" <j\xc3\xb6rg\xff@y.test>\n\nbody\n',
     r"recipient address 'j\xc3\xb6rg\xff@y.test' is not valid UTF-8"),
    (f"{ENVELOPE_TO}: <\xff@y.test>\nFrom: s@x.test\n\nbody\n".encode("latin-1"),
     r"recipient address '\xff@y.test' is not valid UTF-8"),
    (b"From: App <app@\xe9xample.com>\nTo: a@y.test\n\nbody\n",
     r"sender address 'app@\xe9xample.com' is not valid UTF-8"),
    (f"{ENVELOPE_FROM}: <b\xf6se@x.test>\nFrom: s@x.test\nTo: a@y.test\n\nbody\n".encode("latin-1"),
     r"sender address 'b\xf6se@x.test' is not valid UTF-8"),
])
def test_an_address_that_is_not_utf8_is_refused(raw: bytes, reason: str) -> None:
    assert malformed(raw) == reason


def test_a_sender_that_is_not_utf8_is_refused_by_sender_of() -> None:
    with pytest.raises(MalformedMessage, match="not valid UTF-8"):
        sender_of(b"From: \xff@x.test\nTo: a@y.test\n\nbody\n")


def test_a_display_name_that_is_not_utf8_leaves_the_address_usable() -> None:
    raw = b'From: s@x.test\nTo: "\xff" <a@y.test>, \xfe <b@y.test>\n\nbody\n'
    message = parse("Q", raw)
    assert (message.recipients, message.data) == (("a@y.test", "b@y.test"), raw)


def test_with_envelope_refuses_an_address_that_is_not_utf8() -> None:
    # A command-line argument with invalid bytes reaches Python as surrogate escapes.
    recipient = b"\xff@y.test".decode("utf-8", errors="surrogateescape")
    with pytest.raises(MalformedMessage, match=r"recipient address '\\xff@y.test' is not valid UTF-8"):
        with_envelope(b"From: s@x.test\n\nbody\n", "s@x.test", [recipient])
    with pytest.raises(MalformedMessage, match=r"sender address '\\xed\\xa0\\x80@x.test' is not valid UTF-8"):
        check_address("\ud800@x.test", "sender")


@given(st.binary(max_size=40))
@example(b"\xff\xfe@y.test")
@example(b"\"x\" <\xc3@y.test>")
def test_every_address_sent_is_valid_utf8_from_the_message(value: bytes) -> None:
    raw = b"From: s@x.test\r\nTo: " + value + b"\r\nSubject: x\r\n\r\nbody"
    try:
        message = parse("Q", raw)
    except MalformedMessage:
        return
    for address in message.recipients:
        address.encode("utf-8")  # UnicodeEncodeError for an invalid byte kept as a surrogate escape
        assert "\ufffd" not in address or "\ufffd".encode() in value


# -- bare local names -------------------------------------------------------------------------------


def test_bare_local_names_are_parsed_as_they_stand() -> None:
    # cron's headers: the daemon completes the names (addressing.py); parsing leaves them alone.
    raw = b"From: root (Cron Daemon)\nTo: root, admin@example.org\nCc: www-data\n\nbody\n"
    message = parse("Q", raw)
    assert message.sender == "root"
    assert message.recipients == ("root", "admin@example.org", "www-data")
    assert message.data == raw
    assert sender_of(raw) == "root"


def test_bare_local_names_in_the_explicit_envelope() -> None:
    raw = f"{ENVELOPE_FROM}: <cron>\n{ENVELOPE_TO}: <root>\nSubject: x\n\nbody\n".encode()
    message = parse("Q", raw)
    assert (message.sender, message.recipients) == ("cron", ("root",))


def test_bare_duplicates_collapse_case_insensitively() -> None:
    raw = b"From: cron\nTo: root, ROOT, nobody\n\nbody\n"
    assert parse("Q", raw).recipients == ("root", "nobody")


@pytest.mark.parametrize("address", ["root", "www-data", "nobody", "user.name", "jörg"])
def test_local_names_pass_only_where_allowed(address: str) -> None:
    assert is_local_name(address)
    assert check_address(address, "recipient", local=True) == address
    with pytest.raises(MalformedMessage, match="it needs a user@domain form\\)"):
        check_address(address, "recipient")  # the wire's rule: only full addresses


@pytest.mark.parametrize("address", ["", "two words", "a\tb", "<root>", "root(x)", "a,b", "a;b", "a:b", '"root"',
                                     "a\\b", "[root]", "root\r\nRCPT TO:<x@y.z>", "x\x00", "root@"])
def test_what_is_not_a_local_name(address: str) -> None:
    assert not is_local_name(address)
    with pytest.raises(MalformedMessage, match="user@domain form or a local user name"):
        check_address(address, "recipient", local=True)


# -- with_envelope ----------------------------------------------------------------------------------


def test_with_envelope_shape() -> None:
    raw = b"From: s@example.com\r\nTo: a@example.org\r\n\r\nbody\r\n"
    out = with_envelope(raw, "b@example.com", ["x@example.org", "y@example.org"])
    assert out == (f"{ENVELOPE_FROM}: <b@example.com>\r\n{ENVELOPE_TO}: <x@example.org>\r\n"
                   f"{ENVELOPE_TO}: <y@example.org>\r\n").encode() + raw


def test_with_envelope_keeps_bare_local_names() -> None:
    raw = b"Subject: x\n\nbody\n"
    out = with_envelope(raw, "cron", ["root", "ops@example.org"])
    assert out == f"{ENVELOPE_FROM}: <cron>\n{ENVELOPE_TO}: <root>\n{ENVELOPE_TO}: <ops@example.org>\n".encode() + raw
    assert (parse("Q", out).sender, parse("Q", out).recipients) == ("cron", ("root", "ops@example.org"))


def test_with_envelope_replaces_an_earlier_one() -> None:
    raw = b"From: s@example.com\nTo: a@example.org\n\nbody\n"
    first = with_envelope(raw, "one@example.com", ["r1@example.org"])
    second = with_envelope(first, "", ["r2@example.org", "r3@example.org"])
    assert second.count(ENVELOPE_FROM.encode()) == 1
    message = parse("Q", second)
    assert (message.sender, message.recipients, message.data) == ("", ("r2@example.org", "r3@example.org"), raw)


def test_with_envelope_drops_mbox_line() -> None:
    raw = b"From x@y Mon Jan  1 00:00:00 2024\nFrom: s@example.com\n\nbody\n"
    out = with_envelope(raw, "s@example.com", ["r@example.org"])
    assert out.endswith(b"\nFrom: s@example.com\n\nbody\n")
    assert b"From x@y" not in out


@pytest.mark.parametrize(("sender", "recipients"), [
    ("s@example.com", []),
    ("s@example.com", ["a b@example.org"]),
    ("s@example.com", ["a@b.c>\r\nRCPT TO:<x@y.z"]),
    ("s@example.com", ["Ann Smith"]),
    ("s@b.c>\r\nRCPT TO:<x@y.z", ["r@example.org"]),
    ("not an address", ["r@example.org"]),
])
def test_with_envelope_refuses_unusable_addresses(sender: str, recipients: list[str]) -> None:
    with pytest.raises(MalformedMessage):
        with_envelope(b"Subject: x\n\nbody\n", sender, recipients)


_ATOM = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~.,;:\"[]\\"
address_part = st.text(st.sampled_from(_ATOM) | st.characters(categories=("L", "N")), min_size=1, max_size=12)
addresses = st.builds(lambda local, domain: f"{local}@{domain}", address_part, address_part)
header_value = st.text(st.characters(codec="ascii", categories=("L", "N", "P", "S", "Zs")), max_size=30)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(message, the same message with every Bcc field removed)."""
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    fields: list[tuple[bool, bytes]] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["Subject", "From", "To", "Bcc", "X-Folded", "Cc"]))
        value = draw(header_value).encode()
        line = kind.encode() + b": " + value + newline
        if kind in ("Bcc", "X-Folded") and draw(st.booleans()):
            line += b"\t" + draw(header_value).encode() + b"x" + newline
        fields.append((kind == "Bcc", line))
    body = draw(st.binary(max_size=80)).replace(b"\r", b"").replace(b"\n", newline)
    has_body = draw(st.booleans())
    tail = newline + body if has_body else b""
    raw = b"".join(line for _, line in fields) + tail
    without_bcc = b"".join(line for is_bcc, line in fields if not is_bcc) + tail
    return raw, without_bcc


@given(messages(), st.one_of(st.just(""), addresses),
       st.lists(addresses, min_size=1, max_size=5, unique_by=lambda a: a.lower()))
def test_with_envelope_round_trip(message: tuple[bytes, bytes], sender: str, recipients: list[str]) -> None:
    raw, without_bcc = message
    stored = with_envelope(raw, sender, recipients)
    parsed = parse("Q", stored)
    assert parsed.sender == sender
    assert parsed.recipients == tuple(recipients)
    assert parsed.data == without_bcc
    assert sender_of(stored) == sender
    # Idempotent: a second envelope replaces the first.
    again = parse("Q", with_envelope(stored, sender, recipients[::-1]))
    assert (again.recipients, again.data) == (tuple(recipients[::-1]), without_bcc)


# -- split_header and OutgoingMessage -------------------------------------------------------------


def test_split_header_keeps_folded_fields_whole() -> None:
    fields, rest = split_header(b"A: 1\r\nB: 2\r\n  3\r\nC:4\r\n\r\nbody")
    assert [(f.name, f.raw) for f in fields] == [(b"a", b"A: 1\r\n"), (b"b", b"B: 2\r\n  3\r\n"), (b"c", b"C:4\r\n")]
    assert rest == b"\r\nbody"


def _header_length_as_written_before(raw: bytes) -> int:
    """The header's end as the first version computed it: the earliest of both blank-line forms."""
    breaks = [at for at in (raw.find(b"\n\n"), raw.find(b"\n\r\n")) if at != -1]
    return min(breaks) + 1 if breaks else len(raw)


@given(st.lists(st.sampled_from([b"a", b":", b"\n", b"\r", b"\r\n", b" "]), max_size=40).map(b"".join))
def test_the_header_ends_at_the_first_blank_line_of_either_form(raw: bytes) -> None:
    assert envelope._header_length(raw) == _header_length_as_written_before(raw)


@pytest.mark.parametrize("raw", [b"A: b\r\n\r\nbody\n\nmore", b"A: b\n\nbody\r\n\r\n", b"A: b\r\n\n\nx",
                                 b"A: b\n\r\n\nx", b"A: b", b"A: b\n", b"\n\n", b"\n\r\n"])
def test_the_header_end_of_mixed_line_endings(raw: bytes) -> None:
    assert envelope._header_length(raw) == _header_length_as_written_before(raw)
