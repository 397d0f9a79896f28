"""A fake Mailgun HTTP API on 127.0.0.1: `POST /v3/{domain}/messages.mime` and `GET /v4/domains/{domain}`.

It checks what Mailgun documents (github mailgun/documentation source/api-sending.rst "Error codes",
api-domains.rst, api-intro.rst) and answers with Mailgun's texts: HTTP Basic `api:<key>` (else 401 "Forbidden"),
the domain (404 "Domain not found: x"), multipart/form-data only (urlencoded: 400 "Invalid request content
type..."), `message` as a file part, `to` present and valid, at most 1,000 recipients, the domain's state
(sandbox, unverified, disabled: 400 "Domain x is not allowed to send: ..."), a rate limit (429 "... try again
after <date>") and the request size (413). The multipart body is parsed here by hand, byte for byte, not with
the code under test. Accepted messages are kept as the envelope recipients and the exact MIME bytes.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import unquote

import trustme

from tests.https_fake import FakeApi, Request, Response

API_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
MAX_RECIPIENTS = 1000
MAX_REQUEST_BYTES = 52_428_800  # "request size exceeds 52.4MiB limit"
_SEND = re.compile(r"^/v3/([^/?]+)/messages\.mime$")
_DOMAIN = re.compile(r"^/v4/domains/([^/?]+)$")
_ADDRESS = re.compile(r"^[^@\s<>,\"]+@[^@\s<>,\"]+\.[A-Za-z0-9-]+$")
_NOT_ALLOWED = {
    "sandbox": "Sandbox subdomains are for test purposes only. Please add your own domain or add the address to "
               "authorized recipients in Account Settings.",
    "unverified": "The domain is unverified and requires DNS configuration. Log in to your control panel to view "
                  "required DNS records.",
    "disabled": "Please activate your Mailgun account. Check your inbox or log in to your control panel to resend "
                "the activation email.",
}


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None
    content: bytes


@dataclass(frozen=True)
class MailgunMessage:
    """One accepted message: what an end-to-end test asserts."""

    recipients: tuple[str, ...]
    mime: bytes
    message_id: str
    options: tuple[tuple[str, str], ...] = ()  # every other field (o:, h:, v:) as sent


@dataclass
class MailgunDomain:
    name: str
    state: str = "active"  # active, unverified, disabled
    type: str = "custom"  # custom, sandbox
    authorized_recipients: set[str] = field(default_factory=set)  # a sandbox domain sends only to these


class FakeMailgun(FakeApi):
    def __init__(self, ca: trustme.CA, *, key: str = API_KEY, domains: tuple[str, ...] = ("mg.example.com",),
                 sending_keys: dict[str, str] | None = None, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        super().__init__(ca)
        self.key = key
        self.sending_keys = dict(sending_keys or {})  # domain sending key → its domain: good for sending only
        self.domains = {name: MailgunDomain(name) for name in domains}
        self.max_request_bytes = max_request_bytes
        self.refused_recipients: set[str] = set()  # answered as invalid addresses
        self.accepted: list[MailgunMessage] = []
        self._revoked = False
        self._limited_until: float | None = None
        self._limit_reason = "request"
        self._count = 0
        self._state = threading.Lock()

    # -- controls ------------------------------------------------------------------------------------------

    def revoke_key(self) -> None:
        with self._state:
            self._revoked = True

    def rate_limit(self, until: float | None, reason: str = "request") -> None:
        """Answer sends with 429 until `until` (epoch seconds; None: lift). `reason`: request, recipient, bytes."""
        with self._state:
            self._limited_until, self._limit_reason = until, reason

    @property
    def messages(self) -> list[MailgunMessage]:
        with self._state:
            return list(self.accepted)

    # -- the API -------------------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        send, probe = _SEND.match(path), _DOMAIN.match(path)
        if request.method == "GET" and path == "/":
            return Response(200, b"Mailgun Magnificent API", content_type="text/plain")
        if not (send and request.method == "POST") and not (probe and request.method == "GET"):
            return Response(404, b"404 page not found", content_type="text/plain; charset=utf-8")
        domain_name = unquote((send or probe).group(1))  # type: ignore[union-attr]
        if not self._authorized(request, domain_name, sending=bool(send)):
            return Response(401, b"Forbidden", content_type="text/plain; charset=utf-8")
        domain = self.domains.get(domain_name)
        if domain is None:
            return Response.of_json(404, {"message": f"Domain not found: {domain_name}"})
        if probe:
            return Response.of_json(200, _domain_reply(domain))
        return self._send(request, domain)

    def _authorized(self, request: Request, domain: str, *, sending: bool) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, key = base64.b64decode(token, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        with self._state:
            revoked = self._revoked
        if user != "api" or revoked:
            return False
        return key == self.key or (sending and self.sending_keys.get(key) == domain)

    def _send(self, request: Request, domain: MailgunDomain) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            got = content_type.split(";", 1)[0].strip()
            return _error(400, f"Invalid request content type. Expecting 'multipart/form-data' but got '{got}'")
        if len(request.body) > self.max_request_bytes:
            return _error(413, "request size exceeds 52.4MiB limit")
        parts = parse_form(content_type, request.body)
        if parts is None:
            return _error(400, "malformed multipart/form-data request")
        messages = [part for part in parts if part.name == "message"]
        if not messages:
            return _error(400, "message parameter is missing")
        if messages[0].filename is None:
            return _error(400, "'message' parameter is not a file")
        recipients = [address.strip() for part in parts if part.name == "to"
                      for address in part.content.decode("utf-8").split(",") if address.strip()]
        if not recipients:
            return _error(400, "to parameter is missing")
        if len(recipients) > MAX_RECIPIENTS:
            return _error(400, f"Too many recipients, max is {MAX_RECIPIENTS}")
        if any(not _ADDRESS.match(address) or address in self.refused_recipients for address in recipients):
            return _error(400, "to parameter is not a valid address. please check documentation")
        with self._state:
            limited_until, reason = self._limited_until, self._limit_reason
        if limited_until is not None and time.time() < limited_until:
            when = formatdate(limited_until, usegmt=True).replace("GMT", "UTC")
            return _error(429, f"Domain {domain.name} is not allowed to send: {reason} limit exceeded, try again "
                               f"after {when}")
        refusal = _refusal(domain, recipients)
        if refusal:
            return _error(400, f"Domain {domain.name} is not allowed to send: {refusal}")
        with self._state:
            self._count += 1
            message_id = f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime())}.{self._count}.fake@{domain.name}>"
            options = tuple((part.name, part.content.decode("utf-8")) for part in parts
                            if part.name not in ("to", "message"))
            self.accepted.append(MailgunMessage(tuple(recipients), messages[0].content, message_id, options))
        return Response.of_json(200, {"id": message_id, "message": "Queued. Thank you."})


def _refusal(domain: MailgunDomain, recipients: list[str]) -> str | None:
    if domain.state != "active":
        return _NOT_ALLOWED.get(domain.state, _NOT_ALLOWED["disabled"])
    if domain.type == "sandbox" and not set(recipients) <= domain.authorized_recipients:
        return _NOT_ALLOWED["sandbox"]
    return None


def _domain_reply(domain: MailgunDomain) -> dict[str, object]:
    return {
        "domain": {"created_at": "Tue, 14 Jul 2015 19:13:04 GMT", "id": "55a55f40803267158aa113e8",
                   "is_disabled": domain.state == "disabled", "name": domain.name, "require_tls": False,
                   "skip_verification": False, "smtp_login": f"postmaster@{domain.name}", "spam_action": "disabled",
                   "state": domain.state, "type": domain.type, "web_prefix": "email", "web_scheme": "https",
                   "wildcard": False},
        "receiving_dns_records": [], "sending_dns_records": [],
    }


def _error(status: int, message: str) -> Response:
    return Response.of_json(status, {"message": message})


def parse_form(content_type: str, body: bytes) -> list[FormPart] | None:
    """The parts of a multipart/form-data body (RFC 7578), content byte for byte; None when malformed."""
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    if not found:
        return None
    delimiter = b"--" + found.group(1).encode("ascii")
    segments = body.split(delimiter)
    if len(segments) < 3 or segments[0] or not segments[-1].startswith(b"--"):
        return None
    parts = []
    for segment in segments[1:-1]:
        if not segment.startswith(b"\r\n") or not segment.endswith(b"\r\n"):
            return None
        head, separator, content = segment[2:-2].partition(b"\r\n\r\n")
        if not separator:
            return None
        disposition = next((line for line in head.decode("utf-8").split("\r\n")
                            if line.lower().startswith("content-disposition:")), "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if not disposition.lower().split(":", 1)[1].strip().startswith("form-data") or not name:
            return None
        parts.append(FormPart(name.group(1), filename.group(1) if filename else None, content))
    return parts
