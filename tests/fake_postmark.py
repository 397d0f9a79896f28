"""A fake Postmark API over HTTPS on 127.0.0.1: `POST /email` and `GET /server`, checking what Postmark checks
(postmarkapp.com developer API and support articles) and answering with its `{"ErrorCode", "Message"}` shape.

Checked: `X-Postmark-Server-Token` (401, ErrorCode 10), `Content-Type: application/json` (ErrorCode 409), JSON
(402), From and To present and parseable, at most 50 recipients in To, Cc and Bcc together (300), a TextBody or
HtmlBody that is not empty (300), attachments with Name, base64 Content and a bare MIME ContentType, and an ASCII
ContentID without spaces (300), Headers as a list of Name/Value strings, the request's size (413 over 10 MB,
lowered by tests).

Controls: `revoke_token()`, `sender_signatures(...)` (ErrorCode 400 for other senders), `unconfirmed(...)`
(401), `refuse_recipient(...)` (300 "Invalid 'To' address"), `inactive(...)` (406 when every recipient is),
`account(code)` (405, 412, 413), `rate_limit(retry_after)` (429), `server_error()`, `sandbox`, `max_bytes`.
Accepted messages are kept in `accepted` (the parsed JSON and the MessageID returned).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import uuid
from dataclasses import dataclass
from email.headerregistry import AddressHeader, HeaderRegistry
from typing import Any

import trustme

from tests.https_fake import FakeApi, Request, Response

TOKEN = "f1e2d3c4-0000-4bad-9eed-postmarktoken"
MAX_BYTES = 10_000_000
MAX_RECIPIENTS = 50
MIME_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
ACCOUNT_MESSAGES = {
    405: "Your account has run out of credits, please purchase more to continue sending.",
    412: "Your account is pending approval. You can only send to your own domain until then.",
    413: "This account may not send. Please contact support.",
}
_HEADERS = HeaderRegistry()


@dataclass(frozen=True)
class Accepted:
    """One message Postmark accepted: its JSON and the MessageID answered."""

    payload: dict[str, Any]
    message_id: str

    def attachment_bytes(self, index: int) -> bytes:
        return base64.b64decode(self.payload["Attachments"][index]["Content"], validate=True)

    def addresses(self, field: str) -> list[str]:
        return parse_addresses(field, self.payload.get(field, ""))


def parse_addresses(field: str, value: str) -> list[str]:
    header = _HEADERS(field, value)
    assert isinstance(header, AddressHeader)
    return [address.addr_spec for address in header.addresses]


def error(status: int, code: int, message: str) -> Response:
    return Response.of_json(status, {"ErrorCode": code, "Message": message})


class FakePostmark(FakeApi):
    """Postmark's Email and Server endpoints for one server token."""

    def __init__(self, ca: trustme.CA, token: str = TOKEN) -> None:
        super().__init__(ca)
        self.token = token
        self.sandbox = False
        self.max_bytes = MAX_BYTES
        self.accepted: list[Accepted] = []
        self._revoked = False
        self._signatures: set[str] | None = None  # None: every sender has a confirmed signature
        self._unconfirmed: set[str] = set()
        self._refused: set[str] = set()
        self._inactive: set[str] = set()
        self._account: int | None = None
        self._state = threading.Lock()

    # -- controls ------------------------------------------------------------------------------------------

    def revoke_token(self) -> None:
        with self._state:
            self._revoked = True

    def sender_signatures(self, *addresses: str) -> None:
        with self._state:
            self._signatures = {address.lower() for address in addresses}

    def unconfirmed(self, address: str) -> None:
        with self._state:
            self._unconfirmed.add(address.lower())

    def refuse_recipient(self, address: str) -> None:
        with self._state:
            self._refused.add(address.lower())

    def inactive(self, *addresses: str) -> None:
        with self._state:
            self._inactive.update(address.lower() for address in addresses)

    def account(self, code: int | None) -> None:
        """405 (out of credits), 412 (pending approval), 413 (may not send), None (fine)."""
        with self._state:
            self._account = code

    def rate_limit(self, retry_after: float | None = None, times: int | None = None) -> None:
        headers = [("Retry-After", f"{retry_after:g}")] if retry_after is not None else []
        self.fail_with(Response.of_json(429, {"ErrorCode": 429, "Message": "Rate limit exceeded."}, headers), times)

    def server_error(self, times: int | None = None) -> None:
        self.fail_with(Response.of_json(500, {"ErrorCode": 100, "Message": "Maintenance"}), times)

    # -- the API -------------------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        if request.path == "/email" and request.method == "POST":
            return self._authorized(request) or self._email(request)
        if request.path == "/server" and request.method == "GET":
            return self._authorized(request) or Response.of_json(200, self._server_reply())
        return Response(404, b"<html><body>Not Found</body></html>", content_type="text/html")

    def _server_reply(self) -> dict[str, Any]:
        # The real reply lists the server's tokens too: a reading of it must not echo them.
        return {"ID": 1, "Name": "mailwatchd", "ApiTokens": [self.token], "Color": "blue",
                "SmtpApiActivated": True, "DeliveryType": "Sandbox" if self.sandbox else "Live",
                "ServerLink": "https://account.postmarkapp.com/servers/1/streams"}

    def _authorized(self, request: Request) -> Response | None:
        with self._state:
            revoked = self._revoked
        if request.headers.get("x-postmark-server-token") != self.token or revoked:
            return error(401, 10, "Request does not contain a valid Server token.")
        return None

    def _email(self, request: Request) -> Response:
        if len(request.body) > self.max_bytes:
            return error(413, 300, "Request size exceeds the maximum allowed of 10 MB.")
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return error(422, 409, "The 'Content-Type' header must be 'application/json'.")
        try:
            payload = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            return error(422, 402, "Received invalid JSON input.")
        if not isinstance(payload, dict):
            return error(422, 403, "Your JSON was valid, but had incompatible property types.")
        problem = _validate(payload)
        if problem is not None:
            return error(422, 300, problem)
        with self._state:
            signatures, unconfirmed, refused, inactive, account = (
                self._signatures, set(self._unconfirmed), set(self._refused), set(self._inactive), self._account)
        if account is not None:
            return error(422, account, ACCOUNT_MESSAGES[account])
        sender = parse_addresses("From", payload["From"])[0].lower()
        if signatures is not None and sender not in signatures:
            return error(422, 400, f"The 'From' address you supplied ({sender}) is not a Sender Signature on your "
                                   "account. Please add and confirm this address in order to be able to use it in "
                                   "the 'From' field of your messages.")
        if sender in unconfirmed:
            return error(422, 401, "Sender signature not confirmed.")
        recipients = [(field, address) for field in ("To", "Cc", "Bcc")
                      for address in parse_addresses(field, payload.get(field, ""))]
        for field, address in recipients:
            if address.lower() in refused:
                return error(422, 300, f"Invalid '{field}' address: '{address}'.")
        if recipients and all(address.lower() in inactive for _, address in recipients):
            return error(422, 406, "You tried to send to recipient(s) that have been marked as inactive. Found "
                                   "inactive addresses: " + ", ".join(a for _, a in recipients) + ".")
        message_id = str(uuid.uuid4())
        with self._state:
            self.accepted.append(Accepted(payload, message_id))
        return Response.of_json(200, {"To": payload["To"], "SubmittedAt": "2026-12-01T12:00:00.0000000Z",
                                      "MessageID": message_id, "ErrorCode": 0, "Message": "OK"})


def _validate(payload: dict[str, Any]) -> str | None:
    """Postmark's ErrorCode 300 texts for what it checks, or None."""
    sender = payload.get("From")
    if not isinstance(sender, str) or not sender:
        return "Invalid 'From' address: ''."
    try:
        if len(parse_addresses("From", sender)) != 1:
            return f"Invalid 'From' address: '{sender}'."
    except (ValueError, TypeError, AssertionError):
        return f"Error parsing 'From': Illegal email address '{sender}'."
    count = 0
    for field in ("To", "Cc", "Bcc"):
        value = payload.get(field)
        if value is None:
            if field == "To":
                return "Zero recipients specified"
            continue
        if not isinstance(value, str):
            return f"Invalid '{field}' address: '{value}'."
        try:
            addresses = parse_addresses(field, value)
        except (ValueError, TypeError, AssertionError):
            return f"Error parsing '{field}': Illegal email address '{value}'."
        for address in addresses:
            if not address.isascii() or "@" not in address:
                return f"Error parsing '{field}': Illegal email address '{address}'."
        count += len(addresses)
    if count == 0:
        return "Zero recipients specified"
    if count > MAX_RECIPIENTS:
        return "Maximum of 50 recipients allowed per email message"
    if not payload.get("TextBody") and not payload.get("HtmlBody"):
        return "Provide either email TextBody or HtmlBody or both."
    headers = payload.get("Headers") or []
    if not isinstance(headers, list) or not all(
            isinstance(item, dict) and isinstance(item.get("Name"), str) and isinstance(item.get("Value"), str)
            for item in headers):
        return "Headers must be a list of Name/Value pairs."
    for index, attachment in enumerate(payload.get("Attachments") or []):
        problem = _attachment_problem(index, attachment)
        if problem is not None:
            return problem
    return None


def _attachment_problem(index: int, attachment: Any) -> str | None:
    if not isinstance(attachment, dict) or not isinstance(attachment.get("Name"), str) or not attachment["Name"]:
        return f"Attachment {index} has no Name."
    try:
        base64.b64decode(str(attachment.get("Content")), validate=True)
    except (binascii.Error, ValueError):
        return f"Attachment {index} Content is not base64."
    kind = attachment.get("ContentType")
    if not isinstance(kind, str) or not MIME_TYPE.match(kind):
        return f"Attachment {index} has an invalid ContentType."
    content_id = attachment.get("ContentID")
    if content_id is not None and (not isinstance(content_id, str) or not content_id.isascii() or " " in content_id
                                   or not content_id.isprintable()):
        return f"Attachment {index} has an invalid ContentID."
    return None
