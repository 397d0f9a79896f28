"""A fake Amazon SES API v2 on 127.0.0.1: `POST /v2/email/outbound-emails` (raw content) and `GET /v2/email/account`.

Every request's AWS Signature Version 4 is verified here by a second, separate implementation (`check_signature`,
written from AWS's "Create a signed AWS API request", not importing mailwatchd's signer; tests hold it to AWS's
published test vectors too): the access key id, the scope (date, region, service `ses`), X-Amz-Date within 15
minutes of the fake's clock, the signed headers (host among them) and the signature over method, path, query,
headers and body hash. Errors come as SES sends them: the name in `x-amzn-ErrorType`, `{"message": ...}` in
the body, statuses from botocore's sesv2 model and AWS's common errors. Accepted messages are kept as the
envelope (Destination) and the decoded MIME bytes.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import email
import email.policy
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any
from urllib.parse import quote, unquote

import trustme

from tests.https_fake import FakeApi, Request, Response

ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
SERVICE = "ses"
MAX_SKEW = 15 * 60  # RequestExpired: "more than 15 minutes after the date stamp ... or ... in the future"
MAX_RECIPIENTS = 50
MAX_MESSAGE_BYTES = 40 * 1024 * 1024  # after base64
_AUTHORIZATION = re.compile(r"AWS4-HMAC-SHA256 Credential=(?P<key_id>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/,\s]+)/"
                            r"(?P<service>[^/,\s]+)/aws4_request,\s*SignedHeaders=(?P<signed>[a-z0-9;_.-]+),\s*"
                            r"Signature=(?P<signature>[0-9a-f]{64})")
_ADDRESS = re.compile(r"^[\x21-\x7e]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_CORAL = "http://internal.amazon.com/coral/com.amazon.coral.service/"
_SESV2 = "http://internal.amazon.com/coral/com.amazonaws.services.sesv2/"
SIGNATURE_MISMATCH = ("The request signature we calculated does not match the signature you provided. Check your AWS "
                      "Secret Access Key and signing method. Consult the service documentation for details.")


@dataclass(frozen=True)
class SesMessage:
    """One accepted message: what an end-to-end test asserts."""

    recipients: tuple[str, ...]  # Destination's To, Cc and Bcc addresses, in that order
    mime: bytes
    message_id: str
    request: dict[str, Any] = field(default_factory=dict)  # the JSON as sent, Content.Raw.Data left out


@dataclass
class Account:
    production_access: bool = True
    sending_enabled: bool = True
    enforcement_status: str = "HEALTHY"  # HEALTHY, PROBATION, SHUTDOWN
    suspended: bool = False
    max_24_hour_send: float = 50000.0
    max_send_rate: float = 14.0
    sent_last_24_hours: float = 0.0


def error(status: int, code: str, message: str, namespace: str = _SESV2) -> Response:
    return Response.of_json(status, {"message": message}, [("x-amzn-ErrorType", f"{code}:{namespace}"),
                                                           ("x-amzn-RequestId", str(uuid.uuid4()))])


def _stamp(epoch: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch))


def check_signature(request: Request, *, key_id: str, secret: str, region: str, service: str, now: float
                    ) -> Response | None:
    """None if `request` carries a valid SigV4 signature at `now`, else the error AWS answers."""
    authorization = request.headers.get("authorization")
    if not authorization:
        return error(403, "MissingAuthenticationTokenException", "Missing Authentication Token", _CORAL)
    found = _AUTHORIZATION.fullmatch(authorization.strip())
    if not found:
        return error(400, "IncompleteSignatureException", f"Authorization header requires 'Credential', "
                     f"'Signature' and 'SignedHeaders' parameters. Authorization={authorization[:20]}", _CORAL)
    if found["key_id"] != key_id:
        return error(403, "UnrecognizedClientException", "The security token included in the request is invalid.",
                     _CORAL)
    stamp = request.headers.get("x-amz-date", "")
    try:
        when = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return error(400, "IncompleteSignatureException", "Authorization header requires existence of either a "
                     "'X-Amz-Date' or a 'Date' header.", _CORAL)
    if found["date"] != stamp[:8]:
        return error(403, "SignatureDoesNotMatch", "Date in Credential scope does not match YYYYMMDD from ISO-8601 "
                     f"version of date from HTTP: '{found['date']}' != '{stamp[:8]}', from '{stamp}'.", _CORAL)
    if found["region"] != region:
        return error(403, "SignatureDoesNotMatch", f"Credential should be scoped to a valid region, not "
                     f"'{found['region']}'. ", _CORAL)
    if found["service"] != service:
        return error(403, "SignatureDoesNotMatch", f"Credential should be scoped to correct service: '{service}'. ",
                     _CORAL)
    if when < now - MAX_SKEW:
        return error(400, "RequestExpired", f"Signature expired: {stamp} is now earlier than "
                     f"{_stamp(now - MAX_SKEW)} ({_stamp(now)} - 15 min.)", _CORAL)
    if when > now + MAX_SKEW:
        return error(400, "RequestExpired", f"Signature not yet current: {stamp} is still later than "
                     f"{_stamp(now + MAX_SKEW)} ({_stamp(now)} + 15 min.)", _CORAL)
    names = found["signed"].split(";")
    if "host" not in names or names != sorted(set(names)) or any(name not in request.headers for name in names):
        return error(403, "SignatureDoesNotMatch", SIGNATURE_MISMATCH, _CORAL)
    path, _, query = request.path.partition("?")
    pairs = sorted((quote(unquote(k), safe="-_.~"), quote(unquote(v), safe="-_.~"))
                   for k, _, v in (item.partition("=") for item in query.split("&") if item))
    canonical = "\n".join([
        request.method,
        "/".join(quote(segment, safe="-_.~") for segment in path.split("/")),
        "&".join(f"{k}={v}" for k, v in pairs),
        "".join(f"{name}:{' '.join(request.headers[name].split())}\n" for name in names),
        found["signed"],
        hashlib.sha256(request.body).hexdigest(),
    ])
    scope = f"{found['date']}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = b"AWS4" + secret.encode()
    for step in (found["date"], region, service, "aws4_request"):
        key = hmac.digest(key, step.encode(), "sha256")
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, found["signature"]):
        return error(403, "SignatureDoesNotMatch", SIGNATURE_MISMATCH, _CORAL)
    return None


class FakeSes(FakeApi):
    def __init__(self, ca: trustme.CA, *, key_id: str = ACCESS_KEY_ID, secret: str = SECRET_ACCESS_KEY,
                 region: str = REGION, clock: Callable[[], float] = time.time,
                 verified: tuple[str, ...] = ("example.com",), max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        super().__init__(ca)
        self.key_id, self.secret, self.region, self.clock = key_id, secret, region, clock
        self.verified = set(verified)  # identities: addresses and domains
        self.account = Account()
        self.max_message_bytes = max_message_bytes
        self.accepted: list[SesMessage] = []
        self._revoked = False
        self._throttle: str | None = None
        self._state = threading.Lock()

    # -- controls ------------------------------------------------------------------------------------------

    def revoke_key(self) -> None:
        with self._state:
            self._revoked = True

    def throttle(self, kind: str | None) -> None:
        """"rate": 429 "Maximum sending rate exceeded."; "daily": "Daily message quota exceeded."; None: lift."""
        with self._state:
            self._throttle = kind

    @property
    def messages(self) -> list[SesMessage]:
        with self._state:
            return list(self.accepted)

    # -- the API -------------------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        with self._state:
            revoked, throttled = self._revoked, self._throttle
        refused = check_signature(request, key_id="" if revoked else self.key_id, secret=self.secret,
                                  region=self.region, service=SERVICE, now=self.clock())
        if refused is not None:
            return refused
        path = request.path.split("?", 1)[0]
        if (request.method, path) == ("GET", "/v2/email/account"):
            return Response.of_json(200, self._account())
        if (request.method, path) != ("POST", "/v2/email/outbound-emails"):
            return error(404, "UnknownOperationException", "", _CORAL)
        if self.account.suspended:
            return error(400, "AccountSuspendedException", "Your account has been suspended.")
        if not self.account.sending_enabled:
            return error(400, "SendingPausedException", "Sending is paused for this account.")
        if throttled == "rate":
            return error(429, "TooManyRequestsException", "Maximum sending rate exceeded.")
        if throttled == "daily":
            return error(400, "ThrottlingException", "Daily message quota exceeded.")
        return self._send(request)

    def _account(self) -> dict[str, Any]:
        account = self.account
        return {"DedicatedIpAutoWarmupEnabled": False, "EnforcementStatus": account.enforcement_status,
                "ProductionAccessEnabled": account.production_access, "SendingEnabled": account.sending_enabled,
                "SendQuota": {"Max24HourSend": account.max_24_hour_send, "MaxSendRate": account.max_send_rate,
                              "SentLast24Hours": account.sent_last_24_hours},
                "SuppressionAttributes": {"SuppressedReasons": ["BOUNCE", "COMPLAINT"]}}

    def _send(self, request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("application/json"):
            return error(400, "BadRequestException", "Expected a JSON body (Content-Type: application/json)")
        try:
            document = json.loads(request.body)
            mime = base64.b64decode(document["Content"]["Raw"]["Data"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            return error(400, "BadRequestException", "1 validation error detected: Value at 'content.raw.data' "
                         "failed to satisfy constraint: Member must not be null or valid base64")
        if len(document["Content"]["Raw"]["Data"]) > self.max_message_bytes:
            return error(400, "MessageRejected", f"Message length is more than {self.max_message_bytes} bytes long.")
        parsed = email.message_from_bytes(mime, policy=email.policy.compat32)
        destination = document.get("Destination") or {}
        recipients = [address for kind in ("ToAddresses", "CcAddresses", "BccAddresses")
                      for address in destination.get(kind, [])]
        if not destination:  # SES reads the recipients from the header
            recipients = [address for _, address in getaddresses(parsed.get_all("To", []) + parsed.get_all("Cc", [])
                                                                 + parsed.get_all("Bcc", [])) if address]
        problem = self._refusal(mime, parsed, recipients)
        if problem is not None:
            return problem
        message_id = f"010001{uuid.uuid4().hex[:10]}-{uuid.uuid4()}-000000"
        with self._state:
            self.account.sent_last_24_hours += len(recipients)
            kept = {name: value for name, value in document.items() if name != "Content"}
            self.accepted.append(SesMessage(tuple(recipients), mime, message_id, kept))
        return Response.of_json(200, {"MessageId": message_id})

    def _refusal(self, mime: bytes, parsed: email.message.Message, recipients: list[str]) -> Response | None:
        if not recipients:
            return error(400, "MessageRejected", "Missing required header 'To'.")
        if len(recipients) > MAX_RECIPIENTS:
            return error(400, "MessageRejected", f"Recipient count exceeds {MAX_RECIPIENTS}.")
        if any(not _ADDRESS.match(address) for address in recipients):
            return error(400, "MessageRejected", "Illegal address")
        if b"\n\n" not in mime and b"\n\r\n" not in mime:
            return error(400, "MessageRejected", "Message must contain a header and a body separated by a blank line.")
        if any(len(line.rstrip(b"\r")) > 998 for line in mime.split(b"\n")):
            return error(400, "MessageRejected", "Line length exceeds 1000 characters.")
        senders = [address for _, address in getaddresses(parsed.get_all("From", [])) if address]
        if not senders:
            return error(400, "MessageRejected", "Missing required header 'From'.")
        with self._state:
            if self.account.sent_last_24_hours + len(recipients) > self.account.max_24_hour_send:
                return error(400, "ThrottlingException", "Daily message quota exceeded.")
        unverified = [address for address in senders + (recipients if not self.account.production_access else [])
                      if address not in self.verified and address.rpartition("@")[2] not in self.verified]
        if unverified:
            return error(400, "MessageRejected", "Email address is not verified. The following identities failed "
                         f"the check in region {self.region.upper()}: {', '.join(unverified)}")
        return None
