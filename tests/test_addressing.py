"""The daemon completes addresses: the local domain, aliases(5), the admin address, and the
headers a recipient sees; cron's own mail from `sendmail -FCronDaemon -i -B8BITMIME -oem root`."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mailwatchd.errors import MalformedMessage
from mailwatchd.message import envelope
from mailwatchd.message.addressing import Addressing, load_aliases, parse_aliases
from mailwatchd.message.maildomain import local_domain, read_mailname
from mailwatchd.settings.config import Settings
from mailwatchd.submission.submit import parse_sendmail_args, prepare

DOMAIN = "example.com"
ADMIN = "ops@example.net"
NO_DOMAIN = "set MAILWATCHD_DEFAULT_DOMAIN or /etc/mailname"


def no_fqdn() -> str:
    return "localhost"


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(spool=tmp_path / "spool", outbox=tmp_path / "outbox", helo_name="test.invalid",
                    **values)  # type: ignore[arg-type]


# -- the local domain -------------------------------------------------------------------------------


def test_domain_from_the_setting_wins(tmp_path: Path) -> None:
    mailname = tmp_path / "mailname"
    mailname.write_text("mail.example.org\n")
    assert local_domain("example.com", mailname=mailname, fqdn=no_fqdn) == "example.com"
    addressing = Addressing.from_settings(settings(tmp_path, default_domain="example.com"), mailname=mailname,
                                          fqdn=no_fqdn)
    assert addressing.domain == "example.com"


@pytest.mark.parametrize(("content", "domain"), [
    ("mail.example.org\n", "mail.example.org"),
    ("  mail.example.org  \r\nsecond line\n", "mail.example.org"),
    ("mail.example.org", "mail.example.org"),
])
def test_domain_from_the_first_line_of_mailname(tmp_path: Path, content: str, domain: str) -> None:
    mailname = tmp_path / "mailname"
    mailname.write_text(content)
    assert read_mailname(mailname) == domain
    assert Addressing.from_settings(settings(tmp_path), mailname=mailname, fqdn=no_fqdn).domain == domain


@pytest.mark.parametrize("content", ["myhost\n", "\n", "localhost.localdomain\n", "a b.example\n", "x@y.example\n"])
def test_a_mailname_that_is_no_mail_domain_falls_back_to_the_fqdn(tmp_path: Path, content: str) -> None:
    mailname = tmp_path / "mailname"
    mailname.write_text(content)
    assert local_domain(None, mailname=mailname, fqdn=lambda: "host.example.net") == "host.example.net"


@pytest.mark.parametrize("fqdn", ["localhost", "myhost", "localhost.localdomain", ""])
def test_no_domain_without_setting_mailname_or_dotted_fqdn(tmp_path: Path, fqdn: str) -> None:
    assert local_domain(None, mailname=tmp_path / "missing", fqdn=lambda: fqdn) is None
    addressing = Addressing.from_settings(settings(tmp_path), mailname=tmp_path / "missing", fqdn=lambda: fqdn)
    assert addressing.domain is None


def test_the_fqdn_is_not_asked_when_mailname_answers(tmp_path: Path) -> None:
    mailname = tmp_path / "mailname"
    mailname.write_text("mail.example.org\n")

    def fqdn() -> str:
        raise AssertionError("getfqdn may ask DNS: not needed here")

    assert local_domain(None, mailname=mailname, fqdn=fqdn) == "mail.example.org"


def test_an_unreadable_mailname_is_no_mailname(tmp_path: Path) -> None:
    assert read_mailname(tmp_path) is None  # a directory: reading fails
    (tmp_path / "bad").write_bytes(b"\xff.example\n")
    assert read_mailname(tmp_path / "bad") is None


# -- sender -----------------------------------------------------------------------------------------


def test_sender_qualifies_bare_names_only() -> None:
    addressing = Addressing(domain=DOMAIN)
    assert addressing.sender("root") == "root@example.com"
    assert addressing.sender("www-data") == "www-data@example.com"
    assert addressing.sender("app@example.org") == "app@example.org"
    assert addressing.sender("") == ""  # the null reverse-path stays null


def test_sender_without_a_domain_names_the_settings() -> None:
    with pytest.raises(MalformedMessage) as info:
        Addressing(domain=None, admin_address=ADMIN).sender("root")
    assert str(info.value) == f"sender address 'root' is a bare local name and no mail domain is known for this " \
                              f"host: {NO_DOMAIN}"
    assert Addressing(domain=None).sender("app@example.org") == "app@example.org"


# -- aliases(5) ---------------------------------------------------------------------------------------

ALIASES = """\
# /etc/aliases
mailer-daemon: postmaster
postmaster: root
root: ann@example.org,
  bob@example.org
\t, Carol <carol@example.org>

www-data: root
nobody: /dev/null
backup: "|/usr/local/bin/store-mail", ops-backup@example.org
lists: :include:/etc/mail/lists
logs: /var/log/mail.copy, \\logs
Root: someone-else@example.org
bad line without a colon
not valid: x@example.org
broken: two words, fine@example.org
"""


def test_aliases_file_parsing() -> None:
    entries, warnings = parse_aliases(ALIASES, "/etc/aliases")
    assert entries["root"] == ("ann@example.org", "bob@example.org", "carol@example.org")
    assert entries["backup"] == ("ops-backup@example.org",)
    assert entries["logs"] == ("\\logs",)
    assert entries["broken"] == ("fine@example.org",)
    assert "nobody" not in entries and "lists" not in entries  # nothing usable left: not aliased
    assert set(entries) == {"mailer-daemon", "postmaster", "root", "www-data", "backup", "logs", "broken"}
    assert warnings == [
        "/etc/aliases:9: nobody: a file (/dev/null) is not supported (mailwatchd delivers no mail locally); skipped",
        '/etc/aliases:10: backup: a command ("|/usr/local/bin/store-mail") is not supported (mailwatchd delivers '
        "no mail locally); skipped",
        "/etc/aliases:11: lists: an :include: list (:include:/etc/mail/lists) is not supported (mailwatchd "
        "delivers no mail locally); skipped",
        "/etc/aliases:12: logs: a file (/var/log/mail.copy) is not supported (mailwatchd delivers no mail "
        "locally); skipped",
        "/etc/aliases:13: root is defined again; the first definition is kept",
        "/etc/aliases:14: not a `name: address, ...` line; skipped",
        "/etc/aliases:15: not a `name: address, ...` line; skipped",
        "/etc/aliases:16: broken: alias address 'two words' is not usable (it needs a user@domain form or a "
        "local user name); skipped",
    ]


def test_a_continuation_line_before_any_entry_is_skipped() -> None:
    entries, warnings = parse_aliases("  stray@example.org\nroot: a@example.org\n", "aliases")
    assert entries == {"root": ("a@example.org",)}
    assert warnings == ["aliases:1: a continuation line with no entry before it; skipped"]


def test_aliases_from_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text("root: admin@example.org\nnobody: |/bin/true\n")
    addressing = Addressing.from_settings(settings(tmp_path, aliases=path, admin_address=ADMIN,
                                                   default_domain=DOMAIN))
    assert (addressing.domain, addressing.admin_address) == (DOMAIN, ADMIN)
    assert addressing.aliases == {"root": ("admin@example.org",)}
    assert addressing.warnings == (f"{path}:2: nobody: a command (|/bin/true) is not supported (mailwatchd "
                                   "delivers no mail locally); skipped",)


def test_an_unreadable_aliases_file_gives_no_aliases_and_says_so(tmp_path: Path) -> None:
    entries, warnings = load_aliases(tmp_path / "gone")
    assert entries == {}
    assert warnings == [f"cannot read {tmp_path / 'gone'}: No such file or directory; no aliases apply"]


def test_an_alias_with_invalid_utf8_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_bytes(b"root: \xff@example.org, ok@example.org\n")
    entries, warnings = load_aliases(path)
    assert entries == {"root": ("ok@example.org",)}
    assert len(warnings) == 1 and "is not valid UTF-8" in warnings[0]


# -- recipients ---------------------------------------------------------------------------------------


def aliased(admin: str | None = ADMIN, domain: str | None = DOMAIN) -> Addressing:
    entries, _ = parse_aliases(ALIASES, "aliases")
    return Addressing(domain=domain, admin_address=admin, aliases=entries)


def test_full_addresses_are_left_alone() -> None:
    assert aliased().recipients(["ann@example.org", "root@example.com"]) == ("ann@example.org", "root@example.com")


def test_aliases_are_followed_recursively() -> None:
    expected = ("ann@example.org", "bob@example.org", "carol@example.org")
    assert aliased().recipients(["mailer-daemon"]) == expected  # mailer-daemon → postmaster → root
    assert aliased().recipients(["Root"]) == expected  # names are case-insensitive
    assert aliased().recipients(["backup"]) == ("ops-backup@example.org",)


def test_a_local_user_without_an_alias_goes_to_the_admin_address() -> None:
    assert aliased().recipients(["alice", "bob"]) == (ADMIN,)
    assert aliased().recipients(["nobody"]) == (ADMIN,)  # its only target was a file: skipped
    assert aliased().recipients(["logs"]) == (ADMIN,)  # \logs: not looked up again


def test_without_an_admin_address_local_users_are_qualified() -> None:
    assert aliased(admin=None).recipients(["alice", "logs", "www-data"]) == (
        "alice@example.com", "logs@example.com", "ann@example.org", "bob@example.org", "carol@example.org")


def test_alias_loops_end() -> None:
    entries, _ = parse_aliases("a: b\nb: c, x@example.org\nc: a\nself: self, y@example.org\n", "aliases")
    addressing = Addressing(domain=DOMAIN, aliases=entries)
    # a → b → c → a again: delivered as it stands (qualified), as sendmail breaks a loop.
    assert addressing.recipients(["a"]) == ("a@example.com", "x@example.org")
    assert addressing.recipients(["self"]) == ("self@example.com", "y@example.org")


def test_an_alias_reached_twice_is_expanded_once() -> None:
    entries, _ = parse_aliases("team: ann, bob\nann: shared\nbob: shared\nshared: s@example.org, t\n", "aliases")
    addressing = Addressing(domain=DOMAIN, aliases=entries)
    assert addressing.recipients(["team", "shared"]) == ("s@example.org", "t@example.com")


def test_a_very_deep_alias_chain_stops() -> None:
    entries = {f"n{index}": (f"n{index + 1}",) for index in range(100)}
    assert Addressing(domain=DOMAIN, aliases=entries).recipients(["n0"]) == ("n10@example.com",)


def test_duplicates_removed_case_insensitively_in_order() -> None:
    addressing = aliased()
    assert addressing.recipients(["x@example.org", "root", "ANN@example.org", "X@EXAMPLE.ORG", "alice", "bob"]) == (
        "x@example.org", "ann@example.org", "bob@example.org", "carol@example.org", ADMIN)


def test_a_local_recipient_that_cannot_be_completed_names_the_settings() -> None:
    with pytest.raises(MalformedMessage) as info:
        Addressing(domain=None).recipients(["ann@example.org", "root"])
    assert str(info.value) == ("recipient address 'root' is a local user and neither an admin address nor a mail "
                               "domain is known for this host: set MAILWATCHD_ADMIN_ADDRESS, "
                               "MAILWATCHD_DEFAULT_DOMAIN or /etc/mailname")
    # An admin address is enough for recipients; an alias to a full address too.
    assert Addressing(domain=None, admin_address=ADMIN).recipients(["root"]) == (ADMIN,)
    assert Addressing(domain=None, aliases={"root": ("a@example.org",)}).recipients(["root"]) == ("a@example.org",)


# -- headers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "rewritten"), [
    (b"From: root (Cron Daemon)", b"From: root@example.com (Cron Daemon)"),
    (b"To: root", b"To: root@example.com"),
    (b"Cc: Cron Daemon <root>, ann@example.org, www-data", b"Cc: Cron Daemon <root@example.com>, ann@example.org, "
                                                           b"www-data@example.com"),
    (b'Reply-To: "Doe, John" < john >', b'Reply-To: "Doe, John" < john@example.com >'),
    (b"Sender: (the (nested) comment) nobody", b"Sender: (the (nested) comment) nobody@example.com"),
    (b"To: team: ann, bob@example.org;, carol", b"To: team: ann@example.com, bob@example.org;, carol@example.com"),
    (b"To: undisclosed-recipients:;", b"To: undisclosed-recipients:;"),
    (b"FROM:root", b"FROM:root@example.com"),
    # Not a bare name as one plain word: left alone.
    (b'To: "root"', b'To: "root"'),
    (b"To: Ann Smith", b"To: Ann Smith"),
    (b"To: <>", b"To: <>"),
    (b"To: Broken <root", b"To: Broken <root"),
    (b"To: root>", b"To: root>"),
    (b"To: =?utf-8?q?J=C3=B6rg?= <joerg>", b"To: =?utf-8?q?J=C3=B6rg?= <joerg@example.com>"),
    (b"To: j\xc3\xb6rg", b"To: j\xc3\xb6rg@example.com"),
    (b"To: \xff", b"To: \xff"),
])
def test_address_fields_are_qualified(field: bytes, rewritten: bytes) -> None:
    addressing = Addressing(domain=DOMAIN)
    for newline in (b"\n", b"\r\n"):
        data = b"Subject: s" + newline + field + newline + newline + b"body" + newline
        assert addressing.rewrite_headers(data) == data.replace(field, rewritten)


def test_only_address_tokens_change_byte_for_byte() -> None:
    data = (b"X-To: root\r\nTo: root,\r\n\tadmin ,\r\n ann@example.org\r\nSubject: To: root\r\n"
            b"Comments: From: root\r\nResent-To: root\r\n\r\nTo: root\r\nFrom: root\r\n")
    assert Addressing(domain=DOMAIN).rewrite_headers(data) == (
        b"X-To: root\r\nTo: root@example.com,\r\n\tadmin@example.com ,\r\n ann@example.org\r\nSubject: To: root\r\n"
        b"Comments: From: root\r\nResent-To: root\r\n\r\nTo: root\r\nFrom: root\r\n")


def test_an_mbox_line_and_a_headless_message_stay() -> None:
    addressing = Addressing(domain=DOMAIN)
    assert addressing.rewrite_headers(b"From root Mon Jan  1 00:00:00 2024\nTo: root\n\nbody\n") == (
        b"From root Mon Jan  1 00:00:00 2024\nTo: root@example.com\n\nbody\n")
    assert addressing.rewrite_headers(b"just a body\n\nTo: root\n") == b"just a body\n\nTo: root\n"


def test_without_a_domain_the_headers_stay() -> None:
    data = b"From: root (Cron Daemon)\nTo: root\n\nbody\n"
    assert Addressing(domain=None, admin_address=ADMIN).rewrite_headers(data) is data


header_text = st.text(st.sampled_from(string.ascii_letters + string.digits + ' \t"(),:;<>\\.-_'), max_size=40)


@given(st.lists(st.tuples(st.sampled_from(["From", "To", "Cc", "Reply-To", "Sender", "Subject", "X-Other"]),
                          header_text, st.booleans()), min_size=1, max_size=5),
       st.sampled_from([b"\n", b"\r\n"]), st.binary(max_size=40))
@example([("To", "root (x), <y>, z: a;", True)], b"\r\n", b"To: root\r\n")
def test_rewriting_only_inserts_the_domain(fields: list[tuple[str, str, bool]], newline: bytes, body: bytes) -> None:
    """Removing every inserted @domain gives the message back; only address fields change; the body never."""
    head = b"".join(f"{name}: {value}".encode() + (newline + b" folded" if fold else b"") + newline
                    for name, value, fold in fields)
    data = head + newline + body
    out = Addressing(domain="q.invalid").rewrite_headers(data)
    assert out.replace(b"@q.invalid", b"") == data
    assert out.endswith(newline + body)
    for name, value, _ in fields:
        if name in ("Subject", "X-Other"):
            assert f"{name}: {value}".encode() in out


# -- cron, end to end ---------------------------------------------------------------------------------

CRON_ARGS = ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]
CRON_BODY = b"/etc/cron.daily/logrotate:\nerror: skipping \"/var/log/x.log\"\n\n\xc3\xa9t\xc3\xa9 8bit \xff\n"
CRON_MESSAGE = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> test -x /usr/sbin/anacron\n"
                b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
                b"X-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <LOGNAME=root>\n\n" + CRON_BODY)


def test_cron_mail_is_completed_as_a_null_client_would() -> None:
    stored = prepare(CRON_MESSAGE, parse_sendmail_args(CRON_ARGS))
    assert b"@example.com" not in stored  # the submitter completes nothing
    message = Addressing(domain=DOMAIN, admin_address=ADMIN).complete(envelope.parse("Q", stored))

    assert message.sender == "root@example.com"
    assert message.recipients == (ADMIN,)
    fields, rest = envelope.split_header(message.data)
    values = {field.name: field.raw for field in fields}
    assert values[b"from"] == b"From: root@example.com (Cron Daemon)\n"
    assert values[b"to"] == b"To: root@example.com\n"
    assert values[b"subject"] == b"Subject: Cron <root@host> test -x /usr/sbin/anacron\n"
    assert {b"date", b"message-id"} <= set(values)  # added on submission
    assert rest == b"\n" + CRON_BODY  # the body byte for byte
    assert message.size == len(stored)


def test_cron_mail_to_mailto_through_the_aliases() -> None:
    stored = prepare(CRON_MESSAGE, parse_sendmail_args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "www-data"]))
    message = aliased().complete(envelope.parse("Q", stored))
    assert message.recipients == ("ann@example.org", "bob@example.org", "carol@example.org")


def test_bcc_is_still_a_recipient_and_still_removed() -> None:
    raw = b"From: root (Cron Daemon)\nTo: ann@example.org\nBcc: root,\n  audit@example.org\nSubject: x\n\nbody\n"
    stored = prepare(raw, parse_sendmail_args(["-t", "-i"]))
    message = Addressing(domain=DOMAIN, admin_address=ADMIN).complete(envelope.parse("Q", stored))
    assert message.recipients == ("ann@example.org", ADMIN, "audit@example.org")
    assert b"Bcc" not in message.data and b"audit" not in message.data
    assert b"From: root@example.com (Cron Daemon)\n" in message.data


def test_completion_is_idempotent_for_a_split_part() -> None:
    """A part the worker stores again (with_envelope from a completed message) completes to the same."""
    addressing = aliased()
    stored = prepare(CRON_MESSAGE, parse_sendmail_args(CRON_ARGS))
    first = addressing.complete(envelope.parse("Q", stored))
    part = envelope.with_envelope(stored, first.sender, list(first.recipients))
    again = addressing.complete(envelope.parse("Q", part))
    assert (again.sender, again.recipients, again.data) == (first.sender, first.recipients, first.data)
