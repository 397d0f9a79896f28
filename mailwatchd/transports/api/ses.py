"""Amazon SES API v2, raw content: the message goes as written, base64 in `Content.Raw.Data`, with the envelope
recipients in `Destination`; the request is signed with SigV4 (service `ses`, the relay's region).

Send: `POST /v2/email/outbound-emails`; probe: `GET /v2/email/account` (IAM ses:GetAccount). Shapes and error
names from botocore's sesv2 service model (2019-09-27) and AWS's API reference:

- No FromEmailAddress: SES takes the From: field (setting it would replace that field). The envelope sender
  cannot be passed on: SES sends from its own bounce address (or the identity's custom MAIL FROM domain) and
  forwards bounces by email to the message's Return-Path or From address. The null sender `<>` is no different.
- Destination holds the envelope only; it does not rewrite the header fields of raw content. Every recipient goes
  in BccAddresses, so that nothing the API might show lists them. The Bcc field is removed from the content.
- Raw rules (API_RawMessage): a header and a body separated by a blank line, lines of at most 1,000 octets with
  their CRLF, 7-bit header fields (SES has no SMTPUTF8: non-ASCII belongs in RFC 2047 encoded words), ASCII
  addresses. An 8-bit body is allowed ("Amazon SES allows you to specify 8-bit Content-Transfer-Encoding",
  SendRawEmail) though not kept intact when SES rewrites the body for open or click tracking. Limits: 50
  recipients, 40 MB after base64 (SES quotas). A message breaking a rule is Unexpressible, never re-encoded.
- Errors: the name in the `x-amzn-ErrorType` header (`Name:...`), else the body's `code` or `__type`; the text in
  the body's `message` (botocore's rest-json parser reads them so).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from mailwatchd.errors import MalformedMessage
from mailwatchd.message.envelope import OutgoingMessage, split_header
from mailwatchd.settings.apirelays import ApiConfig
from mailwatchd.transports.api.mailgun import one_line, without_bcc
from mailwatchd.transports.api.provider import ApiOutcome, ApiReply, ApiRequest, Unexpressible
from mailwatchd.transports.api.sigv4 import sign
from mailwatchd.transports.outcome import HttpProblem

NAME = "ses"
SIGNING_SERVICE = "ses"  # the signing name; the host's prefix is "email"
SEND_PATH = "/v2/email/outbound-emails"
ACCOUNT_PATH = "/v2/email/account"
MAX_RECIPIENTS = 50
MAX_ENCODED_BYTES = 40_000_000  # "40 MB per message (after base64 encoding)", read as 10^6 bytes: the safe side
MAX_LINE_OCTETS = 998  # RFC 5321 §4.5.3.1.6: 1,000 with the CRLF

_AUTH = frozenset({"UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch",
                   "InvalidSignatureException", "IncompleteSignature", "IncompleteSignatureException",
                   "MissingAuthenticationToken", "MissingAuthenticationTokenException", "AccessDeniedException",
                   "AccessDenied", "NotAuthorized", "OptInRequired", "ExpiredTokenException", "RequestExpired"})
_ACCOUNT = frozenset({"AccountSuspendedException", "SendingPausedException"})
_QUOTA = frozenset({"TooManyRequestsException", "ThrottlingException", "Throttling", "LimitExceededException"})
_MISCONFIGURED = frozenset({"NotFoundException", "UnknownOperationException", "InvalidAction"})
_UNAVAILABLE = frozenset({"InternalFailure", "InternalServerError", "InternalServerException", "ServiceUnavailable",
                          "ServiceUnavailableException"})
_CLOCK = ("signature expired", "signature not yet current", "request has expired")


class Ses:
    """One SES account and region through the API v2 (a Provider)."""

    def __init__(self, config: ApiConfig, clock: Callable[[], float]) -> None:
        if not config.key_id or not config.region:
            raise ValueError("an SES relay needs its access key id and region")
        self._base_url = config.base_url
        self._key_id = config.key_id
        self._secret = config.key
        self._region = config.region
        self._clock = clock

    @property
    def name(self) -> str:
        return NAME

    def __repr__(self) -> str:
        return f"Ses({self._base_url!r}, region={self._region!r}, key_id={self._key_id!r})"

    # -- requests ------------------------------------------------------------------------------------------

    def send_request(self, message: OutgoingMessage) -> ApiRequest:
        recipients = list(message.recipients)
        if len(recipients) > MAX_RECIPIENTS:
            raise Unexpressible(f"it has {len(recipients)} recipients and SES takes at most {MAX_RECIPIENTS} a message")
        if not all(address.isascii() for address in recipients):
            raise Unexpressible("a recipient address is not ASCII and SES has no SMTPUTF8")
        data = without_bcc(message.data)
        encoded_size = 4 * ((len(data) + 2) // 3)
        if encoded_size > MAX_ENCODED_BYTES:
            raise Unexpressible(f"it is {encoded_size} bytes in base64 and SES takes up to 40 MB")
        problem = raw_rule_broken(data)
        if problem:
            raise Unexpressible(problem)
        encoded = base64.b64encode(data)
        # Built around the base64 text rather than through json.dumps: it needs no escaping, and is large.
        destination = json.dumps({"BccAddresses": recipients}, separators=(",", ":")).encode()
        body = b'{"Content":{"Raw":{"Data":"' + encoded + b'"}},"Destination":' + destination + b"}"
        return self._signed("POST", SEND_PATH, {"Content-Type": "application/json"}, body)

    def probe_request(self) -> ApiRequest:
        return self._signed("GET", ACCOUNT_PATH, {"Accept": "application/json"}, b"")

    def _signed(self, method: str, path: str, headers: dict[str, str], body: bytes) -> ApiRequest:
        url = self._base_url + path
        signed = sign(method, url, headers, body, key_id=self._key_id, secret=self._secret, region=self._region,
                      service=SIGNING_SERVICE, now=self._clock())
        return ApiRequest(method, url, signed, body)

    # -- replies -------------------------------------------------------------------------------------------

    def interpret(self, reply: ApiReply, *, probing: bool = False) -> ApiOutcome:
        data, text = _read(reply.body)
        code = error_code(reply, data)
        detail = one_line(f"{code}: {text}" if code and text else code or text, (self._secret.reveal(),))
        status = reply.status
        if 200 <= status < 300:
            return self._account_state(data, detail) if probing else _accepted(data, detail)
        retry_after = _retry_after(reply)
        if code in _AUTH or status in (401, 403):
            if code == "RequestExpired" or text.lower().startswith(_CLOCK):
                detail += " (is this host's clock right?)"
            elif probing and code in ("AccessDeniedException", "AccessDenied"):
                detail += " (the probe needs ses:GetAccount)"
            return ApiOutcome(HttpProblem.AUTH, detail)
        if code in _ACCOUNT:
            return ApiOutcome(HttpProblem.ACCOUNT, detail)
        if code in _QUOTA or status == 429:
            return ApiOutcome(HttpProblem.QUOTA, detail, retry_after=retry_after)
        if code in _UNAVAILABLE or status >= 500:
            return ApiOutcome(HttpProblem.UNAVAILABLE, detail, retry_after=retry_after)
        if code in _MISCONFIGURED or status == 404 or status < 200 or 300 <= status < 400 or probing:
            return ApiOutcome(HttpProblem.MISCONFIGURED, detail or f"nothing at {self._base_url}{SEND_PATH}")
        lowered = text.lower()
        if code == "MailFromDomainNotVerifiedException" or "not verified" in lowered:
            # "Email address is not verified. The following identities failed the check in region ...": the
            # sender's identity (in the sandbox a recipient's too, which the text names).
            return ApiOutcome(HttpProblem.SENDER, detail)
        if code in ("MessageRejected", "BadRequestException") and "address" in lowered:
            return ApiOutcome(HttpProblem.RECIPIENT, detail)  # "Illegal address", "Missing final '@domain'"
        return ApiOutcome(HttpProblem.MESSAGE, detail)  # MessageRejected (content), BadRequestException, 413

    def _account_state(self, data: Any, detail: str) -> ApiOutcome:
        if not isinstance(data, dict) or "SendingEnabled" not in data:
            return ApiOutcome(HttpProblem.UNAVAILABLE, f"no account in the reply: {detail}" if detail else
                              "no account in the reply")
        where = f"SES account in {self._region}"
        enforcement = str(data.get("EnforcementStatus") or "")
        if not data.get("SendingEnabled"):
            return ApiOutcome(HttpProblem.ACCOUNT, f"{where}: sending paused"
                              + (f" (enforcement status {enforcement})" if enforcement else ""))
        if enforcement == "SHUTDOWN":
            return ApiOutcome(HttpProblem.ACCOUNT, f"{where}: shut down (enforcement status SHUTDOWN)")
        quota = data.get("SendQuota")
        quota = quota if isinstance(quota, dict) else {}
        most, sent, rate = (_number(quota.get(name)) for name in ("Max24HourSend", "SentLast24Hours", "MaxSendRate"))
        usage = f"; {sent:g} of {most:g} sent in 24 h" if most is not None and most >= 0 and sent is not None else ""
        usage += f", {rate:g}/s" if rate is not None else ""
        if most is not None and most >= 0 and sent is not None and sent >= most:
            return ApiOutcome(HttpProblem.QUOTA, f"{where}: daily quota used{usage}")
        access = "production access" if data.get("ProductionAccessEnabled") else "sandbox: verified recipients only"
        probation = "; on probation" if enforcement == "PROBATION" else ""
        return ApiOutcome(HttpProblem.NONE, f"{where}: {access}{probation}{usage}")


def make(config: ApiConfig, clock: Callable[[], float]) -> Ses:
    return Ses(config, clock)


def raw_rule_broken(data: bytes) -> str | None:
    """Which of SES's raw-content rules `data` breaks (header names only, no content), or None."""
    try:
        fields, rest = split_header(data)
    except MalformedMessage as exc:
        return f"its header cannot be read ({exc})"
    if not rest.lstrip(b"\r").startswith(b"\n"):
        return "it has no blank line between header and body, which SES requires"
    for field in fields:
        if not field.raw.isascii():
            name = field.name.decode("ascii", errors="replace")
            return f"its {name} field holds 8-bit bytes: SES needs RFC 2047 encoded words (it has no SMTPUTF8)"
    lines = data.split(b"\n")
    if max(map(len, lines)) > MAX_LINE_OCTETS:  # a quick bound: a CR before the LF does not count
        longest = max(len(line) - line.endswith(b"\r") for line in lines)
        if longest > MAX_LINE_OCTETS:
            return f"a line is {longest} octets long and SES takes at most 1,000 with the CRLF"
    return None


def error_code(reply: ApiReply, data: Any) -> str:
    """The error's name: the x-amzn-ErrorType header's first part, else the body's code or __type."""
    code = reply.headers.get("x-amzn-errortype", "")
    if not code and isinstance(data, dict):
        found = data.get("code") or data.get("Code") or data.get("__type") or ""
        code = found if isinstance(found, str) else ""
    return code.split(":", 1)[0].rsplit("#", 1)[-1].strip()


def _accepted(data: Any, detail: str) -> ApiOutcome:
    message_id = data.get("MessageId") if isinstance(data, dict) else None
    if isinstance(message_id, str) and message_id:
        return ApiOutcome(HttpProblem.NONE, "queued", message_id=message_id)
    return ApiOutcome(HttpProblem.UNAVAILABLE, f"no MessageId in the reply: {detail}" if detail else
                      "no MessageId in the reply")


def _read(body: bytes) -> tuple[Any, str]:
    """(parsed JSON or None, the service's words): the JSON's message or Message, else the body as text."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, body.decode("utf-8", errors="replace")
    if isinstance(data, dict):
        message = data.get("message", data.get("Message"))
        return data, message if isinstance(message, str) else ""
    return data, body.decode("utf-8", errors="replace")


def _retry_after(reply: ApiReply) -> float | None:
    """Retry-After in seconds, if SES sent one (it documents none: throttled callers wait up to 10 minutes)."""
    value = reply.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
