"""Mailgun's raw-MIME API: the message goes as written, the envelope recipients beside it.

Send: `POST /v3/{domain}/messages.mime`, multipart/form-data only, with the message as the file part `message`
and one `to` field per envelope recipient (To, Cc and Bcc: Mailgun delivers to these, never reading the header
for recipients). The Bcc field is removed from the upload (RFC 5322 §3.6.3): it would be shown otherwise.
HTTP Basic `api:<key>`. Probe: `GET /v4/domains/{domain}`, which needs the account's key (a domain sending key
works only for sending, so with one the probe reports an auth failure).

Mailgun sets the envelope sender itself (its bounce address on the domain): the message's envelope sender is
not passed on. Errors are `{"message": "..."}` without a code, so a 400 or 403 is read by its documented text:
https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/messages (github mailgun/documentation
source/api-sending.rst, "Error codes").
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

from mailwatchd.errors import MalformedMessage
from mailwatchd.message.envelope import OutgoingMessage, split_header
from mailwatchd.settings.apirelays import ApiConfig
from mailwatchd.transports.api.provider import ApiOutcome, ApiReply, ApiRequest, Unexpressible
from mailwatchd.transports.outcome import HttpProblem

NAME = "mailgun"
MAX_RECIPIENTS = 1000  # "Too many recipients, max is 1000"
MAX_MESSAGE_BYTES = 25_000_000  # "Mailgun supports maximum messages size of 25MB" (read as 10^6 bytes: the safe side)
DETAIL_CHARS = 300
_TRY_AGAIN = re.compile(r"try again after (.+?)\s*$", re.IGNORECASE)
_MAGNIFICENT = "Mailgun Magnificent API"  # what the API's root answers: the base URL lacks the API paths


class Mailgun:
    """One Mailgun sending domain through the HTTP API (a Provider)."""

    def __init__(self, config: ApiConfig, clock: Callable[[], float]) -> None:
        if not config.domain:
            raise ValueError("a Mailgun relay needs its sending domain")
        self._base_url = config.base_url
        self._domain = config.domain
        self._clock = clock
        token = base64.b64encode(f"api:{config.key.reveal()}".encode()).decode("ascii")
        self._authorization = f"Basic {token}"
        self._secrets = tuple(secret for secret in (config.key.reveal(), token) if secret)

    @property
    def name(self) -> str:
        return NAME

    def __repr__(self) -> str:
        return f"Mailgun({self._base_url!r}, domain={self._domain!r})"

    def _url(self, prefix: str, tail: str = "") -> str:
        return f"{self._base_url}/{prefix}/{quote(self._domain, safe='')}{tail}"

    # -- requests ------------------------------------------------------------------------------------------

    def send_request(self, message: OutgoingMessage) -> ApiRequest:
        recipients = message.recipients
        if len(recipients) > MAX_RECIPIENTS:
            raise Unexpressible(f"it has {len(recipients)} recipients and Mailgun takes at most {MAX_RECIPIENTS} "
                                "a request")
        if any("," in address for address in recipients):
            raise Unexpressible("a recipient address holds a comma, which Mailgun's `to` field reads as a separator")
        data = without_bcc(message.data)
        if len(data) > MAX_MESSAGE_BYTES:
            raise Unexpressible(f"it is {len(data)} bytes and Mailgun takes messages up to 25 MB")
        boundary, body = form_data([("to", address) for address in recipients], "message", "message.mime", data)
        headers = {"Authorization": self._authorization, "Accept": "application/json",
                   "Content-Type": f"multipart/form-data; boundary={boundary}"}
        return ApiRequest("POST", self._url("v3", "/messages.mime"), headers, body)

    def probe_request(self) -> ApiRequest:
        headers = {"Authorization": self._authorization, "Accept": "application/json"}
        return ApiRequest("GET", self._url("v4/domains"), headers)

    # -- replies -------------------------------------------------------------------------------------------

    def interpret(self, reply: ApiReply, *, probing: bool = False) -> ApiOutcome:
        data, text = _read(reply.body)
        detail = self._detail(text)
        status = reply.status
        if 200 <= status < 300:
            return self._domain_state(data, detail) if probing else _accepted(data, detail)
        if status in (401, 403):
            if status == 403 and _refuses_sending(text):  # "not allowed to send large batches", "Rejected: IP"
                return ApiOutcome(HttpProblem.ACCOUNT, detail)
            hint = "; if this is a domain sending key: probes need the account's API key" if probing else ""
            return ApiOutcome(HttpProblem.AUTH, (detail or "the API key was refused") + hint)
        if status == 429:
            return ApiOutcome(HttpProblem.QUOTA, detail, retry_after=self._retry_after(reply, text, data))
        if status >= 500:
            return ApiOutcome(HttpProblem.UNAVAILABLE, detail, retry_after=self._retry_after(reply, text, data))
        if status == 404 or status < 200 or 300 <= status < 400 or probing:
            # 404 "Domain not found: x" (a wrong domain, or the other region's host), a redirect: the URL is wrong.
            return ApiOutcome(HttpProblem.MISCONFIGURED, detail or f"nothing at {self._url('v3')} for this domain")
        if status == 402 or _refuses_sending(text):  # "Domain x is not allowed to send: <why>" (sandbox, unverified)
            return ApiOutcome(HttpProblem.ACCOUNT, detail)
        lowered = text.lower()
        if "from parameter is not a valid address" in lowered:
            return ApiOutcome(HttpProblem.SENDER, detail)
        if "parameter is not a valid address" in lowered:  # to, cc, bcc
            return ApiOutcome(HttpProblem.RECIPIENT, detail)
        return ApiOutcome(HttpProblem.MESSAGE, detail)  # 400 about the request, 413 too large

    def _domain_state(self, data: Any, detail: str) -> ApiOutcome:
        domain = data.get("domain") if isinstance(data, dict) else None
        if not isinstance(domain, dict):
            problem = HttpProblem.MISCONFIGURED if _MAGNIFICENT in detail else HttpProblem.UNAVAILABLE
            return ApiOutcome(problem, f"no domain in the reply: {detail}" if detail else "no domain in the reply")
        name = str(domain.get("name") or self._domain)
        state = str(domain.get("state") or "unknown")
        if domain.get("is_disabled") or state == "disabled":
            return ApiOutcome(HttpProblem.ACCOUNT, f"domain {name} disabled")
        if state == "unverified":
            return ApiOutcome(HttpProblem.ACCOUNT, f"domain {name} unverified: its DNS records are not verified yet")
        if state != "active":
            return ApiOutcome(HttpProblem.ACCOUNT, f"domain {name} {state}")
        sandbox = "; sandbox: authorized recipients only" if domain.get("type") == "sandbox" else ""
        return ApiOutcome(HttpProblem.NONE, f"domain {name} active{sandbox}")

    def _retry_after(self, reply: ApiReply, text: str, data: Any) -> float | None:
        """Seconds from Retry-After, the text's "try again after <date>" or the JSON's "retry-seconds"."""
        header = reply.headers.get("retry-after", "").strip()
        if header:
            if header.isdigit():
                return float(header)
            return self._until(header)
        found = _TRY_AGAIN.search(text)
        if found:
            return self._until(found.group(1))
        seconds = data.get("retry-seconds") if isinstance(data, dict) else None
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            return float(seconds)
        return None

    def _until(self, date: str) -> float | None:
        try:
            when = parsedate_to_datetime(date)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - self._clock())

    def _detail(self, text: str) -> str:
        return one_line(text, self._secrets)


def make(config: ApiConfig, clock: Callable[[], float]) -> Mailgun:
    return Mailgun(config, clock)


def _accepted(data: Any, detail: str) -> ApiOutcome:
    message_id = data.get("id") if isinstance(data, dict) else None
    if isinstance(message_id, str) and message_id:
        return ApiOutcome(HttpProblem.NONE, detail, message_id=message_id.strip())
    if _MAGNIFICENT in detail:  # a 200 from the API's root: the base URL carries a path it should not
        return ApiOutcome(HttpProblem.MISCONFIGURED, f"not the messages endpoint: {detail}")
    return ApiOutcome(HttpProblem.UNAVAILABLE, f"no message id in the reply: {detail}" if detail else
                      "no message id in the reply")


def _refuses_sending(text: str) -> bool:
    lowered = text.lower()
    return "not allowed to send" in lowered or lowered.startswith("rejected")


def _read(body: bytes) -> tuple[Any, str]:
    """(parsed JSON or None, the provider's words): the JSON's "message", else the body as text."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, body.decode("utf-8", errors="replace")
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data, data["message"]
    return data, body.decode("utf-8", errors="replace")


def one_line(text: str, hidden: Sequence[str]) -> str:
    """`text` on one line, each of `hidden` (secrets) replaced, cut to DETAIL_CHARS."""
    line = " ".join(text.split())
    for secret in hidden:
        line = line.replace(secret, "***")
    return line if len(line) <= DETAIL_CHARS else line[: DETAIL_CHARS - 1] + "…"


def without_bcc(data: bytes) -> bytes:
    """The message without its Bcc fields, folded lines included (RFC 5322 §3.6.3); unchanged when it has none."""
    try:
        fields, rest = split_header(data)
    except MalformedMessage as exc:
        raise Unexpressible(f"its header cannot be read ({exc})") from None
    if not any(field.name == b"bcc" for field in fields):
        return data
    return b"".join(field.raw for field in fields if field.name != b"bcc") + rest


def form_data(fields: Sequence[tuple[str, str]], file_field: str, file_name: str, content: bytes) -> tuple[str, bytes]:
    """(boundary, body) of a multipart/form-data request (RFC 7578): `fields`, then `content` as a file."""
    boundary = "mailwatchd-" + secrets.token_hex(16)
    while boundary.encode("ascii") in content:  # RFC 2046 §5.1.1: the boundary may not occur in the content
        boundary = "mailwatchd-" + secrets.token_hex(16)
    delimiter = f"--{boundary}\r\n".encode("ascii")
    parts = [delimiter + f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
             for name, value in fields]
    parts.append(delimiter + f'Content-Disposition: form-data; name="{file_field}"; filename="{file_name}"\r\n'
                             "Content-Type: message/rfc822\r\n\r\n".encode("ascii") + content + b"\r\n")
    return boundary, b"".join(parts) + f"--{boundary}--\r\n".encode("ascii")
