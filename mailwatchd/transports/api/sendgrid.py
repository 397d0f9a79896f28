"""SendGrid v3 Mail Send: `POST /v3/mail/send` with the message as JSON fields (SendGrid takes no raw MIME),
`Authorization: Bearer <key>`; 202 with the id in `X-Message-Id`. Probe: `GET /v3/scopes`, which lists the
key's scopes and must hold `mail.send`.

What SendGrid cannot carry besides what mimejson.py refuses (twilio/sendgrid-oai tsg_mail_v3.json, "Mail Send
limitations"): a From with non-ASCII text ("Unicode encoding is not supported for the from field"); a
display name in To, Cc or Bcc holding ";" or ","; an address twice in one request; no To or no Subject
(the fields are required, minLength 1); an attachment with no filename (required) or no bytes (content
minLength 1); a Content-Type parameter on an attachment ("The attachment type cannot contain ';'"); a
header field given twice (`headers` is an object) or one SendGrid refuses (x-sg-id, x-sg-eid); more than
1,000 recipients; a request of 30 MB or more.

Tracking is turned off per message (clicks, opens, subscription footer, Google Analytics, footer): each
rewrites the message its author wrote.

Replies (errors are `{"errors":[{"message","field","help"}]}`; SendGrid has no error codes, so the status and
`field` decide): 401 and 403 are the key's (a 401 "Maximum credits exceeded" is the account's quota), except
a 403 on field "from", which is this message's sender (not a verified Sender Identity); 429 is a quota with
`X-RateLimit-Reset` (epoch seconds); 413 is this message's size; 400 names the field: a recipient's address
(personalizations.N.to.M.email) is the recipient, from.* the sender, anything else the message; 404 and other
unexpected answers mean the URL is not SendGrid's Mail Send; 5xx is SendGrid's.
"""

from __future__ import annotations

import base64
import email.utils
import json
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import Any

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.settings.apirelays import ApiConfig
from mailwatchd.transports.api.mimejson import Attachment, Mailbox, MessageFields, read_fields, unique
from mailwatchd.transports.api.provider import ApiOutcome, ApiReply, ApiRequest, Provider, Unexpressible
from mailwatchd.transports.outcome import HttpProblem
from mailwatchd.transports.smtpwire import scrub

SEND_PATH = "/v3/mail/send"
PROBE_PATH = "/v3/scopes"
SEND_SCOPE = "mail.send"
MAX_REQUEST_BYTES = 30_000_000  # "less than 30MB", counted on the JSON request (base64 included)
MAX_RECIPIENTS = 1000  # to + cc + bcc, all personalizations
REFUSED_HEADERS = frozenset({"x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type",
                             "content-transfer-encoding", "to", "from", "subject", "reply-to", "cc", "bcc"})
NAME_FORBIDDEN = frozenset(";,")  # in to/cc/bcc names ("Mail Send limitations")
MAX_DETAIL = 300
TRACKING_OFF: dict[str, Any] = {
    "click_tracking": {"enable": False, "enable_text": False},
    "open_tracking": {"enable": False},
    "subscription_tracking": {"enable": False},
    "ganalytics": {"enable": False},
}
MAIL_SETTINGS: dict[str, Any] = {"footer": {"enable": False}}


class SendGrid:
    """SendGrid's v3 Mail Send for one API key."""

    def __init__(self, config: ApiConfig, clock: Callable[[], float]) -> None:
        self._base = config.base_url.rstrip("/")
        self._key = config.key
        self._clock = clock

    @property
    def name(self) -> str:
        return "sendgrid"

    def send_request(self, message: OutgoingMessage) -> ApiRequest:
        content = json.dumps(mail_send_body(read_fields(message)), ensure_ascii=False,
                             separators=(",", ":")).encode("utf-8")
        if len(content) >= MAX_REQUEST_BYTES:
            raise Unexpressible(f"the request would be {len(content):,} bytes; SendGrid takes less than 30 MB")
        return ApiRequest("POST", self._base + SEND_PATH, self._headers(json_body=True), content)

    def probe_request(self) -> ApiRequest:
        return ApiRequest("GET", self._base + PROBE_PATH, self._headers(json_body=False))

    def _headers(self, *, json_body: bool) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._key.reveal()}", "Accept": "application/json"}
        if json_body:
            headers["Content-Type"] = "application/json"
        return headers

    def interpret(self, reply: ApiReply, *, probing: bool = False) -> ApiOutcome:
        errors = _errors(reply.body)
        detail = self._detail(errors, reply)
        status = reply.status
        if probing and status == 200:
            return self._scopes(reply.body)
        if status == 202 and not probing:
            return ApiOutcome(HttpProblem.NONE, "accepted", message_id=reply.headers.get("x-message-id") or None)
        if status == 429:
            return ApiOutcome(HttpProblem.QUOTA, detail, retry_after=_retry_after(reply.headers, self._clock))
        if status >= 500:
            return ApiOutcome(HttpProblem.UNAVAILABLE, detail)
        if status == 401 and any("credits" in error.get("message", "").lower() for error in errors):
            return ApiOutcome(HttpProblem.QUOTA, detail)  # "Maximum credits exceeded": the key is fine
        if status == 403 and any(error.get("field") == "from" for error in errors):
            return ApiOutcome(HttpProblem.SENDER, detail)
        if status in (401, 403):
            return ApiOutcome(HttpProblem.AUTH, detail)
        if status == 413:
            return ApiOutcome(HttpProblem.MESSAGE, detail)
        if status == 400 and errors:
            fields = [str(error.get("field") or "") for error in errors]
            if all(_is_address_field(name) for name in fields):
                return ApiOutcome(HttpProblem.RECIPIENT, detail)
            if all(name == "from" or name.startswith("from.") for name in fields):
                return ApiOutcome(HttpProblem.SENDER, detail)
            return ApiOutcome(HttpProblem.MESSAGE, detail)
        if status == 400:
            return ApiOutcome(HttpProblem.UNAVAILABLE, detail)  # no SendGrid error body: not SendGrid speaking
        return ApiOutcome(HttpProblem.MISCONFIGURED, f"{detail} (not SendGrid's {PROBE_PATH if probing else SEND_PATH}"
                                                     f" at {self._base})")

    def _scopes(self, body: bytes) -> ApiOutcome:
        try:
            scopes = json.loads(body)["scopes"]
            assert isinstance(scopes, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            return ApiOutcome(HttpProblem.MISCONFIGURED, f"no scope list in the reply: not SendGrid's API at "
                                                         f"{self._base}")
        if SEND_SCOPE not in scopes:
            return ApiOutcome(HttpProblem.AUTH, f"the key is valid but lacks the {SEND_SCOPE} scope "
                                                f"({len(scopes)} scopes)")
        return ApiOutcome(HttpProblem.NONE, f"key valid with {SEND_SCOPE}")

    def _detail(self, errors: list[dict[str, Any]], reply: ApiReply) -> str:
        if errors:
            text = "; ".join(_describe(error) for error in errors)
        else:
            text = reply.body[:MAX_DETAIL].decode("utf-8", "replace") if reply.body else f"HTTP {reply.status}"
        return scrub(text, (self._key.reveal(),))[:MAX_DETAIL]


def make(config: ApiConfig, clock: Callable[[], float]) -> Provider:
    """The ProviderFactory for `sendgrid://` relays."""
    return SendGrid(config, clock)


# -- the request ----------------------------------------------------------------------------------------------


def mail_send_body(fields: MessageFields) -> dict[str, Any]:
    """The Mail Send JSON for a message; Unexpressible where SendGrid cannot carry it as written."""
    if not fields.to:
        raise Unexpressible("the message has no To address: SendGrid needs one in every personalization")
    if not fields.subject:
        raise Unexpressible("the message has no Subject (or an empty one): SendGrid requires one")
    sender = fields.sender
    if not (sender.address.isascii() and sender.name.isascii()):
        raise Unexpressible("From holds non-ASCII text: SendGrid does not support Unicode in from")
    recipients = fields.recipients
    if len(recipients) > MAX_RECIPIENTS:
        raise Unexpressible(f"the message has {len(recipients)} recipients; SendGrid takes at most {MAX_RECIPIENTS}")
    if not unique(recipients):
        raise Unexpressible("an address appears twice among To, Cc and Bcc: SendGrid takes each address once")
    if any(NAME_FORBIDDEN & set(box.name) for box in recipients):
        raise Unexpressible("a To or Cc display name holds ';' or ',': SendGrid does not allow them")
    if not unique(fields.reply_to):
        raise Unexpressible("Reply-To names an address twice: SendGrid takes each once")
    personalization: dict[str, Any] = {"to": _boxes(fields.to)}
    if fields.cc:
        personalization["cc"] = _boxes(fields.cc)
    if fields.bcc:
        personalization["bcc"] = _boxes(fields.bcc)
    body: dict[str, Any] = {"personalizations": [personalization], "from": _box(sender), "subject": fields.subject}
    if len(fields.reply_to) == 1:
        body["reply_to"] = _box(fields.reply_to[0])
    elif fields.reply_to:
        body["reply_to_list"] = _boxes(fields.reply_to)
    # text/plain first, then text/html (SendGrid's required order)
    body["content"] = [{"type": kind, "value": value}
                       for kind, value in (("text/plain", fields.text), ("text/html", fields.html)) if value]
    if fields.attachments:
        body["attachments"] = [_attachment(part) for part in fields.attachments]
    headers = _headers(fields.headers)
    if headers:
        body["headers"] = headers
    body["tracking_settings"] = TRACKING_OFF
    body["mail_settings"] = MAIL_SETTINGS
    return body


def _box(box: Mailbox) -> dict[str, str]:
    return {"email": box.address, "name": box.name} if box.name else {"email": box.address}


def _boxes(boxes: tuple[Mailbox, ...]) -> list[dict[str, str]]:
    return [_box(box) for box in boxes]


def _attachment(part: Attachment) -> dict[str, str]:
    if not part.filename:
        raise Unexpressible(f"a {part.content_type} part has no filename: SendGrid requires one, and an invented "
                            "name would be shown to the recipients")
    if not part.content:
        raise Unexpressible(f"a {part.content_type} part is empty: SendGrid takes no empty attachment")
    if part.params:
        raise Unexpressible(f"a {part.content_type} part has the Content-Type parameter {part.params[0][0]}: "
                            "SendGrid's attachment type takes none")
    item = {"content": base64.b64encode(part.content).decode("ascii"), "type": part.content_type,
            "filename": part.filename, "disposition": "inline" if part.inline else "attachment"}
    if part.content_id:
        item["content_id"] = part.content_id
    return item


def _headers(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in pairs:
        key = name.lower()
        if key in REFUSED_HEADERS:
            raise Unexpressible(f"the message carries {name}, which SendGrid refuses as a header")
        if key in seen:
            raise Unexpressible(f"{name} occurs twice: SendGrid's headers hold each name once")
        seen.add(key)
        headers[name] = value
    return headers


# -- the reply ------------------------------------------------------------------------------------------------


def _errors(body: bytes) -> list[dict[str, Any]]:
    try:
        errors = json.loads(body)["errors"]
    except (ValueError, KeyError, TypeError):
        return []
    return [error for error in errors if isinstance(error, dict)] if isinstance(errors, list) else []


def _describe(error: Mapping[str, Any]) -> str:
    message = str(error.get("message") or "error")
    return f"{message} (field {error['field']})" if error.get("field") else message


def _is_address_field(name: str) -> bool:
    """personalizations.0.to.1.email and the like: a recipient's address."""
    parts = name.split(".")
    return len(parts) == 5 and parts[0] == "personalizations" and parts[2] in ("to", "cc", "bcc") \
        and parts[4] == "email"


def _retry_after(headers: Mapping[str, str], clock: Callable[[], float]) -> float | None:
    """Seconds to wait: Retry-After (seconds or an HTTP date), else X-RateLimit-Reset (epoch seconds)."""
    retry_after = headers.get("retry-after", "").strip()
    if retry_after:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(retry_after)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.replace(tzinfo=when.tzinfo or UTC).timestamp() - clock())
    reset = headers.get("x-ratelimit-reset", "").strip()
    try:
        return max(0.0, float(reset) - clock()) if reset else None
    except ValueError:
        return None
