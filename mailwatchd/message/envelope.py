"""A spool file's envelope, read from its headers as `sendmail -t` does, and the bytes to send.

On-disk form: an RFC 5322 message. An explicit envelope, when one was given, is carried in
leading `X-Mailwatchd-Envelope-From:` and `X-Mailwatchd-Envelope-To:` fields (one address
each); they override the From/Sender/To/Cc/Bcc fields and are removed, with Bcc (RFC 5322
§3.6.3), before the message is sent.

Parsing only: a bare local name (`root`) is read as it stands; the daemon completes it
(addressing.py) before the message goes out.
"""

from __future__ import annotations

from mailwatchd.errors import MalformedMessage
from mailwatchd.records import NamedTuple  # typing.NamedTuple without importing typing (`sendmail` runs this)

TYPE_CHECKING = False  # mypy takes it as true
if TYPE_CHECKING:
    from collections.abc import Sequence

ENVELOPE_FROM = "X-Mailwatchd-Envelope-From"
ENVELOPE_TO = "X-Mailwatchd-Envelope-To"

# The four rules below are checked with str and bytes methods, not re: `sendmail` runs them once
# per message, and compiling the patterns (with importing re) would cost each run more than the
# checks themselves. tests/test_submit.py holds them to these patterns:
#   header end       rb"\r?\n\r?\n" (searched)
#   field name       rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:"
#   address          r"^[^\s<>()\x00-\x1f\x7f@]+@[^\s<>()\x00-\x1f\x7f@]+$"
#   local name       r'^[^\s<>()\[\]\\,;:"\x00-\x1f\x7f@]+$'
# (Unlike those patterns, whose "$" also matched before a final newline, no line break passes: an
# address ending in "\n" would end the header when written as an envelope field.)
# An address we are willing to put in MAIL FROM / RCPT TO: no white space, controls or
# angle brackets (they would let a header inject SMTP commands), one @ with both sides set.
_NOT_IN_ADDRESS = frozenset("<>()@ \x7f" + "".join(map(chr, range(0x20))))
# A local user name as cron and other local senders write it (`root`, `www-data`): the same
# rule with no @, and none of the characters that separate or quote addresses either.
_NOT_IN_LOCAL_NAME = _NOT_IN_ADDRESS | frozenset('[]\\,;:"')
_FIELD_NAME_BYTES = bytes(range(0x21, 0x7F)).replace(b":", b"")  # printable US-ASCII but ":"
_DROPPED_FIELDS_FROM = ENVELOPE_FROM.lower().encode()
_DROPPED_FIELDS_TO = ENVELOPE_TO.lower().encode()
_DROPPED_FIELDS = frozenset({b"bcc", _DROPPED_FIELDS_FROM, _DROPPED_FIELDS_TO})
_ENVELOPE_SOURCES = frozenset({b"from", b"sender", b"to", b"cc", b"bcc", _DROPPED_FIELDS_FROM, _DROPPED_FIELDS_TO})
_NEEDS_FULL_PARSER = frozenset('"(\\;:')  # quoted names, comments, groups in an address list


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


def _header_length(raw: bytes) -> int:
    """Where the header ends: just after the line break that an empty line follows, else len(raw)."""
    lf = raw.find(b"\n\n")
    # A CRLF blank line counts only before the first LF one (it cannot start at lf or lf - 1): not through the body.
    crlf = raw.find(b"\n\r\n", 0, len(raw) if lf == -1 else lf + 2)
    if crlf != -1:
        return crlf + 1
    return lf + 1 if lf != -1 else len(raw)


def _field_name(line: bytes) -> bytes | None:
    """The name of the field `line` starts (ftext, optional spaces or tabs, ":"), or None."""
    colon = line.find(b":")
    name = line[:colon].rstrip(b" \t")
    if colon == -1 or not name or name.translate(None, _FIELD_NAME_BYTES):
        return None
    return name


def _is_word(text: str, excluded: frozenset[str]) -> bool:
    """`text` is not empty and holds none of `excluded` and no white space (str.isspace, as re's \\s)."""
    return bool(text) and excluded.isdisjoint(text) and (text.isascii() or not any(ch.isspace() for ch in text))


def _is_address(text: str) -> bool:
    local, at, domain = text.partition("@")
    return bool(at) and _is_word(local, _NOT_IN_ADDRESS) and _is_word(domain, _NOT_IN_ADDRESS)


def _is_local_name(text: str) -> bool:
    return _is_word(text, _NOT_IN_LOCAL_NAME)


def split_header(raw: bytes) -> tuple[list[HeaderField], bytes]:
    """Split a message into its header fields and the rest (blank line and body)."""
    fields, rest = _split(raw)
    return [HeaderField(name, field) for name, field in fields], rest


def header_fields(raw: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """split_header's fields as (lower-cased name, whole field) pairs, and where the rest starts."""
    return _fields(raw)


def _split(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """split_header's (lower-cased name, whole field) pairs as plain tuples."""
    fields, head_end = _fields(raw)
    return fields, raw[head_end:]


def _fields(raw: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """(lower-cased name, whole field) pairs, and where the rest (blank line and body) starts: what the daemon
    parses per message, so _field_name's rule is written out here (no call per line)."""
    head_end = _header_length(raw)
    head = raw[:head_end]
    if head.startswith(b"From ") and b"\n" in head and _field_name(head) is None:
        head = head[head.index(b"\n") + 1 :]  # an mbox "From " separator line is not a field
    fields: list[tuple[bytes, bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            folded_name, field = fields[-1]
            fields[-1] = (folded_name, field + line)
            continue
        colon = line.find(b":")
        name = line[:colon].rstrip(b" \t")
        if colon == -1 or not name or name.translate(None, _FIELD_NAME_BYTES):  # _field_name(line) is None
            if not line.strip():
                continue
            raise MalformedMessage("not an RFC 5322 message: a header line has no field name")
        fields.append((name.lower(), line))
    if not fields:
        raise MalformedMessage("not an RFC 5322 message: no header fields")
    return fields, head_end


def _value(field: bytes) -> str:
    # surrogateescape keeps invalid bytes distinct (U+DC80..U+DCFF) so check_address can refuse
    # them; "replace" would turn them into U+FFFD, an address that is not in the message.
    text = field.decode("utf-8", errors="surrogateescape")
    value = text.split(":", 1)[1]
    return " ".join(value.split())  # unfold (RFC 5322 §2.2.3)


def _addresses(values: Sequence[str]) -> list[str]:
    """Addresses in address-list header values (RFC 5322 §3.4)."""
    found: list[str] = []
    for value in values:
        if not _NEEDS_FULL_PARSER.isdisjoint(value):
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
    return _is_local_name(address)


def check_address(address: str, role: str, *, local: bool = False) -> str:
    """`address` if it can go into MAIL FROM / RCPT TO as it is, else MalformedMessage.

    With `local`, a bare local user name passes too (the spool holds it; the daemon completes it).
    """
    if address.isascii():  # the common case: nothing that UTF-8 cannot encode
        if _is_address(address) or (local and _is_local_name(address)):
            return address
        form = "a user@domain form or a local user name" if local else "a user@domain form"
        raise MalformedMessage(f"{role} address {address!r} is not usable (it needs {form})")
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        # RFC 6532 §3.2: non-ASCII header text is UTF-8. Shown as the bytes it came from.
        try:
            raw = address.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:  # a surrogate no bytes were decoded to: only a caller's str has one
            raw = address.encode("utf-8", errors="surrogatepass")
        raise MalformedMessage(f"{role} address {repr(raw)[1:]} is not valid UTF-8") from None
    if _is_address(address) or (local and _is_local_name(address)):
        return address
    form = "a user@domain form or a local user name" if local else "a user@domain form"
    raise MalformedMessage(f"{role} address {address!r} is not usable (it needs {form})")


def _collect(fields: list[tuple[bytes, bytes]]) -> dict[bytes, list[str]]:
    """The values of the fields an envelope comes from, by name (every dropped field is one of them)."""
    by_name: dict[bytes, list[str]] = {}
    for name, field in fields:
        if name in _ENVELOPE_SOURCES:
            value = field.decode("utf-8", errors="surrogateescape").split(":", 1)[1]  # _value(field), unrolled
            found = by_name.get(name)
            if found is None:
                by_name[name] = [" ".join(value.split())]
            else:
                found.append(" ".join(value.split()))
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
    fields, _ = _split(raw)
    return _sender(_collect(fields))


def parse(queue_id: str, raw: bytes) -> OutgoingMessage:
    """Envelope and sendable bytes of a spool file; MalformedMessage says why it cannot be sent.

    Bare local names stay as they are: `addressing.Addressing.complete` qualifies them.
    """
    return parse_with_fields(queue_id, raw)[0]


def parse_with_fields(queue_id: str, raw: bytes) -> tuple[OutgoingMessage, list[tuple[bytes, bytes]]]:
    """parse(), and the header fields of `raw` as header_fields gives them (for Addressing.complete: the
    message's data has the same fields but for Bcc and the envelope's)."""
    fields, head_end = _fields(raw)
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
        folded = address.lower()
        if folded not in seen:
            seen.add(folded)
            recipients.append(address)
    if not recipients:
        raise MalformedMessage("no recipient: the message has no To, Cc or Bcc address")

    if raw.startswith(b"From ") or not _DROPPED_FIELDS.isdisjoint(by_name):
        data = b"".join(field for name, field in fields if name not in _DROPPED_FIELDS) + raw[head_end:]
    else:
        data = raw
    return OutgoingMessage(queue_id, sender, tuple(recipients), data, len(raw)), fields


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
