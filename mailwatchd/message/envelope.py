"""A spool file's envelope, read from its headers as `sendmail -t` does, and the bytes to send.

On-disk form: an RFC 5322 message. An explicit envelope, when one was given, is carried in
leading `X-Mailwatchd-Envelope-From:` and `X-Mailwatchd-Envelope-To:` fields (one address
each); they override the From/Sender/To/Cc/Bcc fields and are removed, with Bcc (RFC 5322
§3.6.3), before the message is sent.

Parsing only: a bare local name (`root`) is read as it stands; the daemon completes it
(addressing.py) before the message goes out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from mailwatchd.errors import MalformedMessage

ENVELOPE_FROM = "X-Mailwatchd-Envelope-From"
ENVELOPE_TO = "X-Mailwatchd-Envelope-To"

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# An address we are willing to put in MAIL FROM / RCPT TO: no white space, controls or
# angle brackets (they would let a header inject SMTP commands), one @ with both sides set.
_ADDRESS = re.compile(r"^[^\s<>()\x00-\x1f\x7f@]+@[^\s<>()\x00-\x1f\x7f@]+$")
# A local user name as cron and other local senders write it (`root`, `www-data`): the same
# rule with no @, and none of the characters that separate or quote addresses either.
_LOCAL_NAME = re.compile(r'^[^\s<>()\[\]\\,;:"\x00-\x1f\x7f@]+$')
_DROPPED_FIELDS_FROM = ENVELOPE_FROM.lower().encode()
_DROPPED_FIELDS_TO = ENVELOPE_TO.lower().encode()
_DROPPED_FIELDS = frozenset({b"bcc", _DROPPED_FIELDS_FROM, _DROPPED_FIELDS_TO})
_ENVELOPE_SOURCES = frozenset({b"from", b"sender", b"to", b"cc", b"bcc", _DROPPED_FIELDS_FROM, _DROPPED_FIELDS_TO})


class OutgoingMessage(NamedTuple):
    """A message ready for one SMTP transaction."""

    queue_id: str
    sender: str  # "" is the null reverse-path <>
    recipients: tuple[str, ...]
    data: bytes  # what follows DATA: envelope fields and Bcc removed
    size: int


class HeaderField(NamedTuple):
    name: bytes  # lower-cased
    raw: bytes  # the whole field, folded lines and line endings included


def split_header(raw: bytes) -> tuple[list[HeaderField], bytes]:
    """Split a message into its header fields and the rest (blank line and body)."""
    match = _HEADER_END.search(raw)
    if match:
        head_end = match.start() + (2 if raw[match.start() : match.start() + 1] == b"\r" else 1)
        head, rest = raw[:head_end], raw[head_end:]
    else:
        head, rest = raw, b""
    if head.startswith(b"From ") and b"\n" in head and not _FIELD_NAME.match(head):
        head = head[head.index(b"\n") + 1 :]  # an mbox "From " separator line is not a field
    fields: list[HeaderField] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = HeaderField(last.name, last.raw + line)
            continue
        name = _FIELD_NAME.match(line)
        if name is None:
            if not line.strip():
                continue
            raise MalformedMessage("not an RFC 5322 message: a header line has no field name")
        fields.append(HeaderField(name.group(1).lower(), line))
    if not fields:
        raise MalformedMessage("not an RFC 5322 message: no header fields")
    return fields, rest


def _value(field: HeaderField) -> str:
    # surrogateescape keeps invalid bytes distinct (U+DC80..U+DCFF) so check_address can refuse
    # them; "replace" would turn them into U+FFFD, an address that is not in the message.
    text = field.raw.decode("utf-8", errors="surrogateescape")
    value = text.split(":", 1)[1]
    return " ".join(value.split())  # unfold (RFC 5322 §2.2.3)


def _addresses(values: Sequence[str]) -> list[str]:
    """Addresses in address-list header values (RFC 5322 §3.4)."""
    found: list[str] = []
    for value in values:
        if any(ch in value for ch in '"(\\;:'):
            # Quoted names, comments, groups: the full parser, imported only for them (email.utils
            # would cost each `sendmail` run more than all the rest of its imports).
            from email.utils import getaddresses

            found.extend(address for _, address in getaddresses([value]) if address)
            continue
        for part in value.split(","):
            start = part.rfind("<")
            if start == -1:
                address = part.strip()
            else:
                end = part.find(">", start)
                address = (part[start + 1 : end] if end != -1 else part[start + 1 :]).strip()
            if address:
                found.append(address)
    return found


def is_local_name(address: str) -> bool:
    """True for a bare local user name (`root`): an address the daemon still has to complete."""
    return bool(_LOCAL_NAME.match(address))


def check_address(address: str, role: str, *, local: bool = False) -> str:
    """`address` if it can go into MAIL FROM / RCPT TO as it is, else MalformedMessage.

    With `local`, a bare local user name passes too (the spool holds it; the daemon completes it).
    """
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        # RFC 6532 §3.2: non-ASCII header text is UTF-8. Shown as the bytes it came from.
        try:
            raw = address.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:  # a surrogate no bytes were decoded to: only a caller's str has one
            raw = address.encode("utf-8", errors="surrogatepass")
        raise MalformedMessage(f"{role} address {repr(raw)[1:]} is not valid UTF-8") from None
    if _ADDRESS.match(address) or (local and _LOCAL_NAME.match(address)):
        return address
    form = "a user@domain form or a local user name" if local else "a user@domain form"
    raise MalformedMessage(f"{role} address {address!r} is not usable (it needs {form})")


def _collect(fields: list[HeaderField]) -> dict[bytes, list[str]]:
    by_name: dict[bytes, list[str]] = {}
    for field in fields:
        if field.name in _ENVELOPE_SOURCES:
            by_name.setdefault(field.name, []).append(_value(field))
    return by_name


def _sender(by_name: dict[bytes, list[str]]) -> str:
    explicit = by_name.get(_DROPPED_FIELDS_FROM)
    if explicit is not None:
        sender = explicit[0].strip().strip("<>").strip()
        return check_address(sender, "sender", local=True) if sender else ""
    candidates = _addresses(by_name.get(b"sender", [])) or _addresses(by_name.get(b"from", []))
    if not candidates:
        raise MalformedMessage("no sender: the message has no From or Sender address")
    return check_address(candidates[0], "sender", local=True)


def sender_of(raw: bytes) -> str:
    """The envelope sender a message's own headers give."""
    fields, _ = split_header(raw)
    return _sender(_collect(fields))


def parse(queue_id: str, raw: bytes) -> OutgoingMessage:
    """Envelope and sendable bytes of a spool file; MalformedMessage says why it cannot be sent.

    Bare local names stay as they are: `addressing.Addressing.complete` qualifies them.
    """
    fields, rest = split_header(raw)
    by_name = _collect(fields)

    sender = _sender(by_name)
    explicit_to = by_name.get(_DROPPED_FIELDS_TO)
    if explicit_to is not None:
        wanted = [value.strip().strip("<>").strip() for value in explicit_to]
    else:
        wanted = _addresses(by_name.get(b"to", []) + by_name.get(b"cc", []) + by_name.get(b"bcc", []))
    recipients: list[str] = []
    seen: set[str] = set()
    for address in wanted:
        address = check_address(address, "recipient", local=True)
        if address.lower() not in seen:
            seen.add(address.lower())
            recipients.append(address)
    if not recipients:
        raise MalformedMessage("no recipient: the message has no To, Cc or Bcc address")

    if raw.startswith(b"From ") or any(field.name in _DROPPED_FIELDS for field in fields):
        data = b"".join(field.raw for field in fields if field.name not in _DROPPED_FIELDS) + rest
    else:
        data = raw
    return OutgoingMessage(queue_id, sender, tuple(recipients), data, len(raw))


def with_envelope(raw: bytes, sender: str, recipients: Sequence[str]) -> bytes:
    """The message with an explicit envelope in front (any earlier one replaced)."""
    check = [check_address(address, "recipient", local=True) for address in recipients]
    if sender:
        check_address(sender, "sender", local=True)
    if not check:
        raise MalformedMessage("no recipient given")
    fields, rest = split_header(raw)
    newline = b"\r\n" if raw.find(b"\r\n") != -1 and raw.find(b"\r\n") <= raw.find(b"\n") else b"\n"
    lines = [f"{ENVELOPE_FROM}: <{sender}>".encode() + newline]
    lines += [f"{ENVELOPE_TO}: <{address}>".encode() + newline for address in check]
    kept = [field.raw for field in fields
            if field.name not in (_DROPPED_FIELDS_FROM, _DROPPED_FIELDS_TO)]
    return b"".join(lines + kept) + rest
