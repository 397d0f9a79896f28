"""Postmark: `POST /email` with the message as JSON fields (Postmark's API takes no raw MIME),
`X-Postmark-Server-Token: <token>`, `Accept: application/json`; 200 `{"MessageID", "ErrorCode": 0}`. Probe:
`GET /server`, which answers for a valid server token and says whether the server is Live or a Sandbox.

What Postmark cannot carry besides what mimejson.py refuses (postmarkapp.com developer API, support articles
"What does Error Code 300 mean", "Subject line and From address character limits", the 2024 attachment
validation notice): no To (required); more than 50 recipients in To, Cc and Bcc together; a From longer
than 255 characters or a Subject longer than 2,000 (UTF-16 units); an address outside US-ASCII (Postmark's
mailbox and domain patterns are ASCII); an attachment without a name or with a Content-Type parameter
(ContentType must be a bare MIME type); a Content-ID that is not printable ASCII without spaces (RFC 2392);
an attachment that is not inline but has a Content-ID (Postmark makes every part with a ContentID inline);
a body over 5 MB or a request over 10 MB.

Tracking is turned off per message (TrackOpens false, TrackLinks None): it rewrites what the author wrote.
A server whose default turns open tracking on still adds its pixel (Postmark lets a message turn it on,
not off): the probe cannot see that setting.

Replies carry an ErrorCode, which decides: 10 is the token; 400/401 this message's sender (no confirmed
sender signature); 405 (credits), 412 (account pending) and 413 (account may not send) the account; 406
inactive recipients and 300 about an address a recipient; 300 otherwise, 402/403/409 the message; 411 a
forbidden attachment type, which another relay may carry; 429 and HTTP 429 a quota; 100 and 5xx Postmark's
(maintenance). A 403 with no ErrorCode is Postmark's network filter, not the token. The probe reads the
server's DeliveryType: a Sandbox server accepts mail and delivers none, so it counts as an account problem.
"""

from __future__ import annotations

import base64
import email.utils
import json
from collections.abc import Callable, Mapping
from datetime import UTC
from email.headerregistry import Address
from typing import Any

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.settings.apirelays import ApiConfig
from mailwatchd.transports.api.mimejson import Attachment, Mailbox, MessageFields, read_fields
from mailwatchd.transports.api.provider import ApiOutcome, ApiReply, ApiRequest, Provider, Unexpressible
from mailwatchd.transports.outcome import HttpProblem
from mailwatchd.transports.smtpwire import scrub

SEND_PATH = "/email"
PROBE_PATH = "/server"
DEFAULT_STREAM = "outbound"
MAX_REQUEST_BYTES = 10_000_000  # "10 MB" with attachments base64-encoded
MAX_BODY_BYTES = 5_000_000  # each of TextBody and HtmlBody
MAX_RECIPIENTS = 50  # To, Cc and Bcc together ("Maximum of 50 recipients allowed per email message")
MAX_FROM_CHARS = 255
MAX_SUBJECT_UNITS = 2000  # UTF-16 code units
MAX_DETAIL = 300
# ErrorCode -> what it means (https://postmarkapp.com/developer/api/overview#error-codes)
ERROR_PROBLEMS = {
    10: HttpProblem.AUTH,  # bad or missing server token
    100: HttpProblem.UNAVAILABLE,  # maintenance
    300: HttpProblem.MESSAGE,  # invalid email request (RECIPIENT when it names an address field)
    400: HttpProblem.SENDER,  # sender signature not found
    401: HttpProblem.SENDER,  # sender signature not confirmed
    402: HttpProblem.MESSAGE,  # invalid JSON
    403: HttpProblem.MESSAGE,  # incompatible JSON
    405: HttpProblem.ACCOUNT,  # not allowed to send: out of credits
    406: HttpProblem.RECIPIENT,  # all recipients inactive (bounced, complained, suppressed)
    409: HttpProblem.MESSAGE,  # JSON required
    411: HttpProblem.UNEXPRESSIBLE,  # forbidden attachment type: another relay may carry it
    412: HttpProblem.ACCOUNT,  # account pending approval
    413: HttpProblem.ACCOUNT,  # account may not send
    429: HttpProblem.QUOTA,  # rate limit exceeded
}
ADDRESS_FIELDS = ("'to'", "'cc'", "'bcc'")  # ErrorCode 300 about a recipient: "Invalid 'To' address: 'x'."


class Postmark:
    """Postmark's Email API for one server token."""

    def __init__(self, config: ApiConfig, clock: Callable[[], float]) -> None:
        self._base = config.base_url.rstrip("/")
        self._token = config.key
        self._stream = config.message_stream or DEFAULT_STREAM
        self._clock = clock

    @property
    def name(self) -> str:
        return "postmark"

    def send_request(self, message: OutgoingMessage) -> ApiRequest:
        body = email_body(read_fields(message), self._stream)
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(content) > MAX_REQUEST_BYTES:
            raise Unexpressible(f"the request would be {len(content):,} bytes; Postmark takes at most 10 MB")
        return ApiRequest("POST", self._base + SEND_PATH, self._headers(json_body=True), content)

    def probe_request(self) -> ApiRequest:
        return ApiRequest("GET", self._base + PROBE_PATH, self._headers(json_body=False))

    def _headers(self, *, json_body: bool) -> dict[str, str]:
        headers = {"X-Postmark-Server-Token": self._token.reveal(), "Accept": "application/json"}
        if json_body:
            headers["Content-Type"] = "application/json"
        return headers

    def interpret(self, reply: ApiReply, *, probing: bool = False) -> ApiOutcome:
        reading = _json(reply.body)
        code = reading.get("ErrorCode")
        detail = self._detail(reading, reply)
        status = reply.status
        if status == 200 and probing and "ErrorCode" not in reading:
            return self._server(reading)
        if status == 200 and code == 0 and not probing:
            message_id = reading.get("MessageID")
            return ApiOutcome(HttpProblem.NONE, detail, message_id=str(message_id) if message_id else None)
        if isinstance(code, int) and not isinstance(code, bool) and code in ERROR_PROBLEMS:
            problem = ERROR_PROBLEMS[code]
            if code == 300 and any(word in detail.lower() for word in ADDRESS_FIELDS):
                problem = HttpProblem.RECIPIENT
            return ApiOutcome(problem, detail, retry_after=self._wait(reply) if problem is HttpProblem.QUOTA else None)
        if status == 429:
            return ApiOutcome(HttpProblem.QUOTA, detail, retry_after=self._wait(reply))
        if status >= 500:
            return ApiOutcome(HttpProblem.UNAVAILABLE, detail)
        if status == 401:
            return ApiOutcome(HttpProblem.AUTH, detail)
        if status == 403 and code is None:
            return ApiOutcome(HttpProblem.UNAVAILABLE, f"{detail} (Postmark's network filter refused the request)")
        if status == 413:
            return ApiOutcome(HttpProblem.MESSAGE, detail)
        if status == 422:
            return ApiOutcome(HttpProblem.MESSAGE, detail)
        return ApiOutcome(HttpProblem.MISCONFIGURED, f"{detail} (not Postmark's {PROBE_PATH if probing else SEND_PATH}"
                                                     f" at {self._base})")

    def _server(self, reading: Mapping[str, Any]) -> ApiOutcome:
        delivery, name = reading.get("DeliveryType"), reading.get("Name")
        if not isinstance(delivery, str):
            return ApiOutcome(HttpProblem.MISCONFIGURED, f"no server in the reply: not Postmark's API at {self._base}")
        server = f"server {name!r}" if isinstance(name, str) else "the server"
        if delivery.lower() == "sandbox":
            return ApiOutcome(HttpProblem.ACCOUNT, f"{server} is a Sandbox: Postmark accepts its mail and delivers "
                                                   "none")
        return ApiOutcome(HttpProblem.NONE, f"token valid; {server} delivers ({delivery})")

    def _detail(self, reading: Mapping[str, Any], reply: ApiReply) -> str:
        message = reading.get("Message")
        if isinstance(message, str) and message:
            code = reading.get("ErrorCode")
            text = f"{message} (ErrorCode {code})" if code else message
        else:
            text = reply.body[:MAX_DETAIL].decode("utf-8", "replace") if reply.body else f"HTTP {reply.status}"
        return scrub(text, (self._token.reveal(),))[:MAX_DETAIL]

    def _wait(self, reply: ApiReply) -> float | None:
        return _retry_after(reply.headers, self._clock)


def make(config: ApiConfig, clock: Callable[[], float]) -> Provider:
    """The ProviderFactory for `postmark://` relays."""
    return Postmark(config, clock)


# -- the request ----------------------------------------------------------------------------------------------


def email_body(fields: MessageFields, stream: str) -> dict[str, Any]:
    """The /email JSON for a message; Unexpressible where Postmark cannot carry it as written."""
    if not fields.to:
        raise Unexpressible("the message has no To address: Postmark requires one")
    every = (fields.sender, *fields.recipients, *fields.reply_to)
    if not all(box.address.isascii() for box in every):
        raise Unexpressible("an address holds non-ASCII characters: Postmark takes ASCII mailboxes only")
    if len(fields.recipients) > MAX_RECIPIENTS:
        raise Unexpressible(f"the message has {len(fields.recipients)} recipients; Postmark takes at most "
                            f"{MAX_RECIPIENTS} in To, Cc and Bcc together")
    sender = _address(fields.sender)
    if len(sender) > MAX_FROM_CHARS:
        raise Unexpressible(f"From is {len(sender)} characters long; Postmark takes at most {MAX_FROM_CHARS}")
    body: dict[str, Any] = {"From": sender, "To": _addresses(fields.to)}
    if fields.cc:
        body["Cc"] = _addresses(fields.cc)
    if fields.bcc:
        body["Bcc"] = _addresses(fields.bcc)
    if fields.subject is not None:
        if len(fields.subject.encode("utf-16-le")) // 2 > MAX_SUBJECT_UNITS:
            raise Unexpressible(f"the Subject is longer than {MAX_SUBJECT_UNITS} characters, Postmark's limit")
        body["Subject"] = fields.subject
    for key, text in (("TextBody", fields.text), ("HtmlBody", fields.html)):
        if text is not None:
            if len(text.encode("utf-8")) > MAX_BODY_BYTES:
                raise Unexpressible(f"the {key} would be over 5 MB, Postmark's limit for one body")
            body[key] = text
    if fields.reply_to:
        body["ReplyTo"] = _addresses(fields.reply_to)
    if fields.headers:
        body["Headers"] = [{"Name": name, "Value": value} for name, value in fields.headers]
    if fields.attachments:
        body["Attachments"] = [_attachment(part) for part in fields.attachments]
    body.update({"MessageStream": stream, "TrackOpens": False, "TrackLinks": "None"})
    return body


def _address(box: Mailbox) -> str:
    """`Name <a@b>`, the name quoted where RFC 5322 needs it (Postmark's advice for punctuation)."""
    if not box.name:
        return box.address
    try:
        return str(Address(display_name=box.name, addr_spec=box.address))
    except (ValueError, TypeError):
        raise Unexpressible("a display name cannot be written as Postmark's Name <address>") from None


def _addresses(boxes: tuple[Mailbox, ...]) -> str:
    return ", ".join(_address(box) for box in boxes)


def _attachment(part: Attachment) -> dict[str, str]:
    if not part.filename:
        raise Unexpressible(f"a {part.content_type} part has no filename: Postmark's attachments need a Name, and an "
                            "invented name would be shown to the recipients")
    if part.params:
        raise Unexpressible(f"a {part.content_type} part has the Content-Type parameter {part.params[0][0]}: "
                            "Postmark's ContentType takes a bare MIME type")
    item = {"Name": part.filename, "Content": base64.b64encode(part.content).decode("ascii"),
            "ContentType": part.content_type}
    if part.content_id is not None:
        if not part.inline:
            raise Unexpressible("an attachment that is not inline has a Content-ID: Postmark would show it inline")
        if not (part.content_id.isascii() and part.content_id.isprintable()) or " " in part.content_id:
            raise Unexpressible("a Content-ID holds spaces or non-ASCII characters, which Postmark refuses")
        item["ContentID"] = f"cid:{part.content_id}"
    return item


# -- the reply ------------------------------------------------------------------------------------------------


def _json(body: bytes) -> dict[str, Any]:
    try:
        reading = json.loads(body)
    except ValueError:
        return {}
    return reading if isinstance(reading, dict) else {}


def _retry_after(headers: Mapping[str, str], clock: Callable[[], float]) -> float | None:
    """Seconds from Retry-After (seconds or an HTTP date); Postmark's use of it is not documented."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - clock())
