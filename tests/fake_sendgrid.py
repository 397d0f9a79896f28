"""A fake SendGrid v3 API over HTTPS on 127.0.0.1: `POST /v3/mail/send` and `GET /v3/scopes`, checking what
SendGrid checks (twilio/sendgrid-oai tsg_mail_v3.json and tsg_scopes_v3.json, the "Mail Send limitations" page,
the attachment type rule reported by SendGrid's libraries) and answering with SendGrid's error shape
`{"errors":[{"message","field","help"}]}`.

Checked: `Authorization: Bearer <key>` (401), the key's mail.send scope (403), `Content-Type: application/json`,
the body's size (413 at 30 MB, lowered by tests), JSON, personalizations (1..1,000, each with a `to`), addresses,
each address once per request, names without ";" or ",", at most 1,000 recipients, from.email (ASCII),
subject (at least one character), content (values of at least one character, text/plain first, then text/html),
reply_to or reply_to_list (not both), attachments (base64 content of at least one byte, a filename, a type
without ";" or CRLF, inline with a content_id), reserved headers, string header values.

Controls: `revoke_key()`, `verify_senders(...)` (403 field "from" for others), `refuse_recipient(...)` (400 on
its address field), `rate_limit(reset_in)` (429 with X-RateLimit-* headers), `server_error()`, `scopes`,
`max_bytes`. Accepted messages are kept in `accepted` (the parsed JSON and the X-Message-Id returned).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import trustme

from tests.https_fake import FakeApi, Request, Response

KEY = "SG.fake-key-id.fake-key-secret-0123456789"
MAX_BYTES = 30_000_000
MAX_RECIPIENTS = 1000
RESERVED_HEADERS = frozenset({"x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type",
                              "content-transfer-encoding", "to", "from", "subject", "reply-to", "cc", "bcc"})
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
BAD_KEY = "The provided authorization grant is invalid, expired, or revoked"
UNVERIFIED = ("The from address does not match a verified Sender Identity. Mail cannot be sent until this error is "
              "resolved. Visit https://sendgrid.com/docs/for-developers/sending-email/sender-identity/ to see the "
              "Sender Identity requirements")


@dataclass(frozen=True)
class Accepted:
    """One message SendGrid accepted: its JSON and the X-Message-Id answered."""

    payload: dict[str, Any]
    message_id: str

    def attachment_bytes(self, index: int) -> bytes:
        return base64.b64decode(self.payload["attachments"][index]["content"], validate=True)


def error_body(message: str, field: str | None = None, help_text: str | None = None) -> dict[str, Any]:
    return {"errors": [{"message": message, "field": field, "help": help_text}]}


class FakeSendGrid(FakeApi):
    """SendGrid's Mail Send and Scopes endpoints for one API key."""

    def __init__(self, ca: trustme.CA, key: str = KEY) -> None:
        super().__init__(ca)
        self.key = key
        self.scopes: list[str] = ["mail.send", "alerts.read"]
        self.max_bytes = MAX_BYTES
        self.accepted: list[Accepted] = []
        self._revoked = False
        self._verified: set[str] | None = None  # None: every sender is verified
        self._refused: set[str] = set()
        self._ids = itertools.count(1)
        self._state = threading.Lock()

    # -- controls ------------------------------------------------------------------------------------------

    def revoke_key(self) -> None:
        with self._state:
            self._revoked = True

    def verify_senders(self, *addresses: str) -> None:
        """Only these From addresses are verified Sender Identities from now on."""
        with self._state:
            self._verified = {address.lower() for address in addresses}

    def refuse_recipient(self, address: str) -> None:
        with self._state:
            self._refused.add(address.lower())

    def rate_limit(self, reset_in: float, times: int | None = None) -> None:
        """429 with SendGrid's rate-limit headers: the limit resets `reset_in` seconds from now."""
        headers = [("X-RateLimit-Limit", "600"), ("X-RateLimit-Remaining", "0"),
                   ("X-RateLimit-Reset", str(int(time.time() + reset_in)))]
        self.fail_with(Response.of_json(429, error_body("too many requests"), headers), times)

    def server_error(self, times: int | None = None) -> None:
        self.fail_with(Response.of_json(500, {"errors": [{"message": "internal server error"}]}), times)

    # -- the API -------------------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        if request.path == "/v3/mail/send" and request.method == "POST":
            return self._authorized(request) or self._mail_send(request)
        if request.path == "/v3/scopes" and request.method == "GET":
            return self._authorized(request) or Response.of_json(200, {"scopes": list(self.scopes)})
        if request.path in ("/v3/mail/send", "/v3/scopes"):
            return Response.of_json(405, error_body("method not allowed"))
        return Response.of_json(404, error_body("not found"))

    def _authorized(self, request: Request) -> Response | None:
        header = request.headers.get("authorization")
        if header is None:
            return Response.of_json(401, error_body("authorization required"))
        scheme, _, token = header.partition(" ")
        with self._state:
            revoked = self._revoked
        if scheme.lower() != "bearer" or token != self.key or revoked:
            return Response.of_json(401, error_body(BAD_KEY))
        return None

    def _mail_send(self, request: Request) -> Response:
        if "mail.send" not in self.scopes:
            return Response.of_json(403, error_body("access forbidden"))
        if len(request.body) >= self.max_bytes:
            return Response.of_json(413, error_body("content too large"))
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return Response.of_json(400, error_body("Content-Type should be application/json."))
        try:
            payload = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            return Response.of_json(400, error_body("Bad Request", None))
        if not isinstance(payload, dict):
            return Response.of_json(400, error_body("Bad Request", None))
        errors = _validate(payload)
        if errors:
            return Response.of_json(400, {"errors": errors})
        with self._state:
            verified, refused = self._verified, set(self._refused)
        sender = str(payload["from"]["email"]).lower()
        if verified is not None and sender not in verified:
            return Response.of_json(403, error_body(UNVERIFIED, "from"))
        for field, address in _addresses(payload):
            if address.lower() in refused:
                return Response.of_json(400, error_body("Does not contain a valid address.", field))
        message_id = f"fakeSG{next(self._ids):06d}.filter0001"
        with self._state:
            self.accepted.append(Accepted(payload, message_id))
        return Response(202, b"", (("X-Message-Id", message_id),))


def _addresses(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, address) for every recipient of every personalization."""
    found = []
    for number, personalization in enumerate(payload.get("personalizations") or []):
        for kind in ("to", "cc", "bcc"):
            for index, box in enumerate(personalization.get(kind) or []):
                found.append((f"personalizations.{number}.{kind}.{index}.email", str(box.get("email"))))
    return found


def _validate(payload: dict[str, Any]) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []

    def fail(message: str, field: str | None) -> None:
        errors.append({"message": message, "field": field, "help": None})

    personalizations = payload.get("personalizations")
    if not isinstance(personalizations, list) or not 1 <= len(personalizations) <= 1000:
        fail("The personalizations field is required and must have at least one personalization.",
             "personalizations")
        return errors
    seen: set[str] = set()
    count = 0
    for number, personalization in enumerate(personalizations):
        if not isinstance(personalization, dict) or not personalization.get("to"):
            fail("The to array is required for all personalization objects, and must have at least one email "
                 "object with a valid email address.", f"personalizations.{number}.to")
            continue
        for kind in ("to", "cc", "bcc"):
            boxes = personalization.get(kind)
            if boxes is None:
                continue
            if not isinstance(boxes, list) or not boxes:
                fail(f"The {kind} array must have at least one email object.", f"personalizations.{number}.{kind}")
                continue
            for index, box in enumerate(boxes):
                field = f"personalizations.{number}.{kind}.{index}"
                address = box.get("email") if isinstance(box, dict) else None
                if not isinstance(address, str) or not EMAIL.match(address):
                    fail("Does not contain a valid address.", f"{field}.email")
                    continue
                if address.lower() in seen:
                    fail("Each email address in the personalization block should be unique between to, cc, and bcc. "
                         f"We found the first duplicate instance of [{address}] in the {field}.email field.",
                         f"{field}.email")
                seen.add(address.lower())
                name = box.get("name")
                if name is not None and (not isinstance(name, str) or set(name) & set(";,")):
                    fail("The to.name, cc.name, and bcc.name personalizations cannot include either the ; or , "
                         "characters.", f"{field}.name")
                count += 1
    if count > MAX_RECIPIENTS:
        fail("The total number of recipients must be no more than 1000.", "personalizations")
    sender = payload.get("from")
    address = sender.get("email") if isinstance(sender, dict) else None
    if not isinstance(address, str) or not EMAIL.match(address):
        fail("The from object must be provided for every email send. It is an object that requires the email "
             "parameter, but may also contain a name parameter.", "from.email")
    elif isinstance(sender, dict) and not (address.isascii() and str(sender.get("name", "")).isascii()):
        fail("Unicode encoding is not supported for the from field.", "from")
    subject = payload.get("subject")
    if not (isinstance(subject, str) and subject) and not all(
            isinstance(p, dict) and p.get("subject") for p in personalizations):
        fail("The subject is required. You can get around this requirement if you use a template with a subject "
             "defined or if every personalization has a subject defined.", "subject")
    _validate_content(payload.get("content"), fail)
    if "reply_to" in payload and "reply_to_list" in payload:
        fail("reply_to and reply_to_list cannot be used together.", "reply_to_list")
    for index, attachment in enumerate(payload.get("attachments") or []):
        _validate_attachment(index, attachment, fail)
    headers = payload.get("headers")
    if headers is not None:
        if not isinstance(headers, dict):
            fail("Invalid type. Expected: object, given: " + type(headers).__name__ + ".", "headers")
        else:
            for name, value in headers.items():
                if name.lower() in RESERVED_HEADERS:
                    fail(f"The header {name} is reserved and cannot be set.", f"headers.{name}")
                elif not isinstance(value, str):
                    fail("Invalid type. Expected: string.", f"headers.{name}")
    return errors


def _validate_content(content: Any, fail: Any) -> None:
    if not isinstance(content, list) or not content:
        fail("Unless a valid template_id is provided, the content parameter is required. There must be at least "
             "one defined content block. We typically suggest both text/plain and text/html blocks are included, "
             "but only one block is required.", "content")
        return
    types = []
    for index, block in enumerate(content):
        if not isinstance(block, dict) or not block.get("type") or not isinstance(block.get("value"), str) \
                or not block["value"]:
            fail("The content value must be a string at least one character in length.", f"content.{index}.value")
            continue
        types.append(block["type"])
    if "text/plain" in types and types.index("text/plain") != 0:
        fail("If present, text/plain must be first, followed by text/html, followed by any other content.",
             "content")
    if "text/html" in types and types.index("text/html") != (1 if "text/plain" in types else 0):
        fail("If present, text/plain must be first, followed by text/html, followed by any other content.",
             "content")


def _validate_attachment(index: int, attachment: Any, fail: Any) -> None:
    field = f"attachments.{index}"
    if not isinstance(attachment, dict):
        fail("Invalid type. Expected: object.", field)
        return
    content = attachment.get("content")
    try:
        decoded = base64.b64decode(content, validate=True) if isinstance(content, str) else b""
    except (binascii.Error, ValueError):
        decoded = b""
        fail("The attachment content must be base64 encoded.", f"{field}.content")
    if not decoded:
        fail("The attachment content is required.", f"{field}.content")
    if not isinstance(attachment.get("filename"), str) or not attachment["filename"]:
        fail("The attachment filename parameter is required.", f"{field}.filename")
    kind = attachment.get("type")
    if kind is not None and (not isinstance(kind, str) or not kind or set(kind) & set(";\r\n")):
        fail("The attachment type cannot contain ';', or CRLF characters.", f"{field}.type")
    disposition = attachment.get("disposition", "attachment")
    if disposition not in ("inline", "attachment"):
        fail("The disposition of your attachment can be either \"inline\" or \"attachment\".",
             f"{field}.disposition")
    if disposition == "inline" and not attachment.get("content_id"):
        # UNCONFIRMED that SendGrid requires it; the module always sends one for an inline part.
        fail("The content_id parameter is required if your attachment is inline.", f"{field}.content_id")
