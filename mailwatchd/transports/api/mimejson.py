"""A stored RFC 5322 message read into the fields JSON mail APIs take (SendGrid, Postmark), or `Unexpressible`.

The fields must reproduce what the recipients would have seen from the message as written: the same From, To,
Cc and Reply-To, the same subject, the same text and HTML bodies, the same attachments and inline parts (bytes,
content type, filename, Content-ID) and the same other header fields. What they cannot reproduce raises
`Unexpressible` naming what (header names and MIME types only, never content), so the message goes to the
next relay rather than out altered:

- a From with more than one address, group syntax in an address field, an address field given twice;
- To or Cc naming an address that is not an envelope recipient: a JSON API delivers to every address it
  shows, so "shown but not sent to" (an explicit envelope, an alias) has no form. Envelope recipients that
  To and Cc do not show are the Bcc;
- multipart/signed, multipart/encrypted, S/MIME (application/pkcs7-mime) and DKIM or ARC signatures: a
  signature cannot survive the provider's re-assembly of the message;
- several text bodies that are not alternatives, an alternative other than text/plain and text/html, HTML
  offered before text in a multipart/alternative (the API sends text first, so clients would show the
  other one), a multipart subtype other than mixed, alternative and related;
- a body part with no field to carry it: an attached message (message/rfc822, whose bytes the parser
  re-serialises), an inline part without Content-ID, a multipart/related resource without Content-ID,
  part headers other than the Content-* ones that fields express (Content-Description, Content-Location),
  a text body with format=flowed or other parameters beyond charset, an undecodable text body;
- no text or HTML body, or an empty one: both APIs need a body of at least one character;
- raw 8-bit header text (RFC 6532): the APIs take header values encoded.

Decisions, and why:
- Trace fields (Received, Return-Path, Delivered-To, X-Original-To, Received-SPF, Authentication-Results,
  X-Received) are dropped. They describe how the message travelled, not what its author wrote: the
  provider writes its own Received on the next hop and the final MTA writes Return-Path from the envelope
  (RFC 5321 §4.4), so a copy in the submitted message is either replaced or wrong. SendGrid refuses
  Received outright.
- MIME-Version, Content-Type and Content-Transfer-Encoding of the message are its structure, which the
  fields express; the provider writes its own. The multipart preamble and epilogue, which MIME clients do not
  show (RFC 2046 §5.1.1), are dropped.
- Message-ID and Date stay custom headers, which keeps threading and the author's date: SendGrid's refused
  list (x-sg-id, x-sg-eid, received, dkim-signature, Content-Type, Content-Transfer-Encoding, To, From,
  Subject, Reply-To, CC, BCC) does not hold them, its own library documents "Date" as a header example, and
  a Message-ID given this way is reported to reach recipients (anymail#108). Postmark publishes no refused
  list; whether it keeps a given Message-ID is not documented.
- No filename is invented: a name is what a recipient sees and saves, so a part without one where the API
  needs one is the provider module's Unexpressible.
- A multipart/related resource is an inline part whatever its Content-Disposition says (RFC 2387: the root
  presents it by reference); informational Content-Disposition parameters (size, creation-date,
  modification-date, read-date, RFC 2183 §2.4-2.7) are not carried.
- Text bodies are decoded strictly from their declared charset (US-ASCII when none) and passed as text
  with "\\n" line ends; the provider encodes them again. Attachments keep their decoded bytes exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email import policy
from email.errors import MessageError
from email.headerregistry import AddressHeader
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import collapse_rfc2231_value

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.transports.api.provider import Unexpressible

# Fields the APIs carry as fields, and the message's structure: never custom headers.
ADDRESS_FIELDS = ("from", "to", "cc", "reply-to")
STRUCTURE_FIELDS = frozenset({"subject", "bcc", "mime-version", "content-type", "content-transfer-encoding",
                              "content-disposition", *ADDRESS_FIELDS})
# How the message travelled, not what its author wrote (see the module docstring).
TRACE_FIELDS = frozenset({"received", "return-path", "delivered-to", "x-original-to", "received-spf",
                          "authentication-results", "arc-authentication-results", "x-received"})
# Signatures over the message as written, which the provider's re-assembly breaks.
SIGNATURE_FIELDS = frozenset({"dkim-signature", "arc-seal", "arc-message-signature"})
SIGNED_TYPES = frozenset({"multipart/signed", "multipart/encrypted", "application/pkcs7-mime",
                          "application/x-pkcs7-mime"})
# Headers a body part may carry: the ones its fields express.
PART_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition", "content-id",
                         "mime-version"})
INFORMATIONAL_DISPOSITION = frozenset({"filename", "size", "creation-date", "modification-date", "read-date"})
MAX_DEPTH = 4  # mixed > alternative > related > alternative is the deepest structure the fields can express
_FOLD = re.compile(r"\r?\n(?=[ \t])")  # RFC 5322 §2.2.3 unfolding
_UNREADABLE = (MessageError, ValueError, LookupError, TypeError, AttributeError, RecursionError)


@dataclass(frozen=True)
class Mailbox:
    """One address with its display name ("" when none), both decoded."""

    address: str
    name: str = ""


@dataclass(frozen=True)
class Attachment:
    """An attached file or an inline part (referenced by Content-ID from the HTML)."""

    filename: str | None
    content_type: str  # type/subtype, lower case
    content: bytes
    content_id: str | None = None  # without the angle brackets
    inline: bool = False
    params: tuple[tuple[str, str], ...] = ()  # Content-Type parameters besides name (a lossless charset dropped)


@dataclass(frozen=True)
class MessageFields:
    """A message as API fields. `bcc`: the envelope recipients To and Cc do not show."""

    sender: Mailbox
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    reply_to: tuple[Mailbox, ...]
    subject: str | None
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    headers: tuple[tuple[str, str], ...]  # (name, value as written, unfolded) in message order

    @property
    def recipients(self) -> tuple[Mailbox, ...]:
        return self.to + self.cc + self.bcc


@dataclass
class _Body:
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)


def read_fields(message: OutgoingMessage) -> MessageFields:
    """The message as API fields; Unexpressible says what the fields cannot carry."""
    try:
        return _read_fields(message)
    except _UNREADABLE as exc:  # the email package on a message it cannot take apart; its text may quote content
        raise Unexpressible(f"the message cannot be taken apart into API fields ({type(exc).__name__})") from None


def _read_fields(message: OutgoingMessage) -> MessageFields:
    parsed = BytesParser(policy=policy.default).parsebytes(message.data)
    assert isinstance(parsed, EmailMessage)
    headers = _custom_headers(parsed)
    senders = _mailboxes(parsed, "from")
    if len(senders) != 1:
        raise Unexpressible("From holds no address" if not senders else
                            "From holds more than one address: the API takes one sender")
    to, cc = _mailboxes(parsed, "to"), _mailboxes(parsed, "cc")
    shown = {box.address.lower() for box in to + cc}
    envelope = {address.lower() for address in message.recipients}
    if not shown <= envelope:
        raise Unexpressible("To or Cc shows an address that is not an envelope recipient: the API would deliver "
                            "to every address it shows")
    bcc = tuple(Mailbox(address) for address in message.recipients if address.lower() not in shown)
    body = _Body()
    _read_message(parsed, body)
    if not body.text and not body.html:
        raise Unexpressible("the message has no text or HTML body (or an empty one): the API needs one")
    return MessageFields(senders[0], to, cc, bcc, _mailboxes(parsed, "reply-to"), _subject(parsed),
                         body.text, body.html, tuple(body.attachments), headers)


# -- header fields ------------------------------------------------------------------------------------------


def _single(message: Message, name: str) -> object | None:
    values = message.get_all(name) or []
    if len(values) > 1:
        raise Unexpressible(f"{name.title()} occurs {len(values)} times: the API has one field for it")
    return values[0] if values else None


def _mailboxes(message: Message, name: str) -> tuple[Mailbox, ...]:
    try:
        header = _single(message, name)
        if header is None:
            return ()
        assert isinstance(header, AddressHeader)
        groups = header.groups
    except _UNREADABLE:
        raise Unexpressible(f"{name.title()} cannot be parsed") from None
    boxes: list[Mailbox] = []
    for group in groups:
        if group.display_name is not None:
            raise Unexpressible(f"{name.title()} uses group syntax, which the API has no form for")
        for address in group.addresses:
            if not address.username or not address.domain:
                raise Unexpressible(f"{name.title()} holds something that is not an address")
            boxes.append(Mailbox(_text(address.addr_spec, name), _text(address.display_name, name)))
    return tuple(boxes)


def _subject(message: Message) -> str | None:
    try:
        subject = _single(message, "subject")
    except _UNREADABLE:
        raise Unexpressible("Subject cannot be parsed") from None
    return None if subject is None else _text(str(subject), "subject")


def _text(value: str, name: str) -> str:
    """A decoded header value as text: raw 8-bit bytes (kept as surrogates by the parser) read as UTF-8."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        raise Unexpressible(f"{name.title()} holds bytes that are not UTF-8") from None


def _custom_headers(message: Message) -> tuple[tuple[str, str], ...]:
    found: list[tuple[str, str]] = []
    for name, raw in message.raw_items():
        key = name.lower()
        if key in SIGNATURE_FIELDS:
            raise Unexpressible(f"the message is signed ({name}): the signature cannot survive the API's "
                                "re-assembly of the message")
        if key in STRUCTURE_FIELDS or key in TRACE_FIELDS:
            continue
        value = _FOLD.sub("", str(raw))
        if not value.isascii():
            raise Unexpressible(f"header {name} holds raw 8-bit text (RFC 6532): the API takes encoded values")
        found.append((name, value.strip()))
    return tuple(found)


# -- the body -----------------------------------------------------------------------------------------------


def _read_message(message: Message, body: _Body) -> None:
    _check_structure(message)
    if message.get_content_type() == "multipart/mixed":
        parts = _parts(message)
        if not parts:
            raise Unexpressible("multipart/mixed holds no part")
        first, rest = parts[0], parts[1:]
        if _is_attachment(first):
            rest = parts
        else:
            _read_content(first, body, depth=1, top=False)
        for part in rest:
            if not part.is_multipart() and not _is_attachment(part):
                raise Unexpressible("the message has several text or HTML bodies that are not alternatives")
            _read_attachment(part, body, related=False)
        return
    _read_content(message, body, depth=0, top=True)


def _check_structure(message: Message) -> None:
    """No signed, encrypted or attached message, and no part header that no field expresses."""
    for part in message.walk():
        kind = part.get_content_type()
        if kind in SIGNED_TYPES:
            raise Unexpressible(f"the message holds {kind}: a signature or encryption cannot survive the API's "
                                "re-assembly of the message")
        if kind.startswith("message/"):
            raise Unexpressible(f"the message attaches a {kind} part, which the API cannot carry byte for byte")
        if part is not message:
            for name in part:
                if name.lower() not in PART_FIELDS:
                    raise Unexpressible(f"a body part carries {name}, which the API has no field for")


def _parts(message: Message) -> list[Message]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, Message)]


def _is_attachment(part: Message) -> bool:
    """Not a body: an attachment by disposition, a named part, or anything but text/plain and text/html."""
    if part.is_multipart():
        return False
    return (part.get_content_disposition() == "attachment" or part.get_filename() is not None
            or part.get_content_type() not in ("text/plain", "text/html"))


def _read_content(part: Message, body: _Body, *, depth: int, top: bool) -> None:
    """The message's content: a text or HTML body, a multipart/alternative, a multipart/related."""
    _check_depth(depth)
    kind = part.get_content_type()
    if kind == "multipart/alternative":
        _read_alternative(part, body, depth=depth)
    elif kind == "multipart/related":
        _read_related(part, body, depth=depth)
    elif part.is_multipart():
        raise Unexpressible(f"the message holds {kind} where its body is, which the API has no field for")
    elif _is_attachment(part):
        if top:
            raise Unexpressible(f"the message is a single {kind} part with no text or HTML body: the API needs one")
        _read_attachment(part, body, related=False)
    else:
        _set_body(part, body)


def _check_depth(depth: int) -> None:
    if depth > MAX_DEPTH:
        raise Unexpressible("the MIME structure is nested deeper than the API's fields can express")


def _read_alternative(part: Message, body: _Body, *, depth: int) -> None:
    _check_depth(depth)
    offered: list[str] = []
    for alternative in _parts(part):
        kind = alternative.get_content_type()
        if kind == "multipart/related":
            _read_related(alternative, body, depth=depth + 1)
            offered.append("text/html")
        elif kind in ("text/plain", "text/html") and not _is_attachment(alternative):
            _set_body(alternative, body)
            offered.append(kind)
        else:
            raise Unexpressible(f"multipart/alternative offers {kind}; the API sends only text/plain and text/html")
    if offered == ["text/html", "text/plain"]:
        raise Unexpressible("multipart/alternative offers HTML before text: the API sends text first, so clients "
                            "would show the HTML instead of the text")


def _read_related(part: Message, body: _Body, *, depth: int) -> None:
    _check_depth(depth)
    parts = _parts(part)
    if not parts:
        raise Unexpressible("multipart/related holds no part")
    start = part.get_param("start")
    root = parts[0]
    if isinstance(start, str):
        matching = [candidate for candidate in parts if candidate.get("content-id") == start.strip()]
        if len(matching) != 1:
            raise Unexpressible("multipart/related names a start part it does not hold")
        root = matching[0]
    kind = root.get_content_type()
    if kind == "multipart/alternative":
        _read_alternative(root, body, depth=depth + 1)
    elif kind == "text/html" and not _is_attachment(root):
        _set_body(root, body)
    else:
        raise Unexpressible(f"multipart/related starts with {kind}; the API relates parts only to an HTML body")
    for resource in parts:
        if resource is not root:
            _read_attachment(resource, body, related=True)


def _set_body(part: Message, body: _Body) -> None:
    kind = part.get_content_type()
    for name, value in _content_params(part):
        if name == "charset" or (name, value.lower()) == ("format", "fixed"):
            continue
        raise Unexpressible(f"a {kind} body has the Content-Type parameter {name}, which the API cannot carry")
    text = _decode(part)
    if not text:
        raise Unexpressible(f"a {kind} body is empty: the API takes no empty body")
    if kind == "text/html":
        if body.html is not None:
            raise Unexpressible("the message has several HTML bodies that are not alternatives")
        body.html = text
    else:
        if body.text is not None:
            raise Unexpressible("the message has several text bodies that are not alternatives")
        body.text = text


def _decode(part: Message) -> str:
    charset = part.get_content_charset("us-ascii") or "us-ascii"
    try:
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        text = payload.decode(charset)
    except LookupError:
        raise Unexpressible(f"a {part.get_content_type()} body declares an unknown charset") from None
    except UnicodeError:
        raise Unexpressible(f"a {part.get_content_type()} body is not valid {charset} (an 8-bit body with no "
                            "charset is read as US-ASCII)") from None
    return text.replace("\r\n", "\n")


def _read_attachment(part: Message, body: _Body, *, related: bool) -> None:
    kind = part.get_content_type()
    if part.is_multipart():
        raise Unexpressible(f"the message holds {kind} among its attachments, which the API has no field for")
    disposition = part.get_content_disposition()
    for name, _value in part.get_params([], header="content-disposition")[1:]:
        if name.lower() not in INFORMATIONAL_DISPOSITION:
            raise Unexpressible(f"an attachment has the Content-Disposition parameter {name.lower()}, which the "
                                "API cannot carry")
    raw_id = part.get("content-id")
    content_id = str(raw_id).strip().removeprefix("<").removesuffix(">").strip() if raw_id is not None else None
    inline = related or disposition == "inline"
    if inline and not content_id:
        raise Unexpressible("an inline part has no Content-ID; the API shows inline only what the HTML references"
                            if not related else "a multipart/related part has no Content-ID to be referenced by")
    content = part.get_payload(decode=True)
    assert isinstance(content, bytes)
    try:
        filename = part.get_filename()
    except _UNREADABLE:
        raise Unexpressible("an attachment's filename cannot be parsed") from None
    body.attachments.append(Attachment(None if filename is None else _text(filename, "filename"), kind, content,
                                       content_id or None, inline, _params(part, content)))


def _params(part: Message, content: bytes) -> tuple[tuple[str, str], ...]:
    """Content-Type parameters besides name; a charset is dropped when the bytes read the same without it."""
    return tuple((name, value) for name, value in _content_params(part)
                 if name != "name" and not (name == "charset" and _reads_as_ascii(content, value)))


def _content_params(part: Message) -> list[tuple[str, str]]:
    """Content-Type parameters (names in lower case, RFC 2231 values decoded), the type itself left out."""
    return [(name.lower(), str(collapse_rfc2231_value(value)))
            for name, value in part.get_params([], header="content-type")[1:]]


def _reads_as_ascii(content: bytes, charset: str) -> bool:
    try:
        return content.decode(charset) == content.decode("ascii")
    except (LookupError, UnicodeError):
        return False


def unique(boxes: Iterable[Mailbox]) -> bool:
    """No address twice (compared case-insensitively)."""
    seen: set[str] = set()
    for box in boxes:
        if box.address.lower() in seen:
            return False
        seen.add(box.address.lower())
    return True
