"""A fake OAuth2 token endpoint over HTTPS on 127.0.0.1 that checks what the real ones check.

Two shapes on one server: Microsoft identity platform (`POST /{tenant}/oauth2/v2.0/token`, errors with
AADSTS codes, trace ids and timestamps) and Google (`POST /token`, short errors, no client_credentials).
Grants: client_credentials (client secret in the body or HTTP Basic, or an RS256 client assertion checked
as Entra ID checks it: signature, x5t / x5t#S256 thumbprint, aud, iss, sub, exp) and refresh_token (with
optional rotation that keeps the old token valid, as Microsoft does). Access tokens are JWT-shaped and
about 1,900 characters, like Entra's, so SMTP line limits get exercised; `is_valid` is what a fake relay
asks to validate a bearer token.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import re
import secrets
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote

import trustme
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FORM = "application/x-www-form-urlencoded"
_MICROSOFT_PATH = re.compile(r"^/(?P<tenant>[^/]+)/oauth2/v2\.0/token$")
_GOOGLE_PATH = "/token"
_MAX_BODY = 65536
_CLOCK_SKEW_S = 300  # Entra ID's allowance for a client assertion's nbf/exp


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_certificate(directory: Path, name: str = "client") -> Path:
    """A fresh RSA key and a self-signed certificate for it, in one PEM file (certificate, then key): what
    an Entra app registration holds the certificate half of, and what `OAuthConfig.certificate` points at."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mailwatchd test {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}-{secrets.token_hex(4)}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


@dataclass(frozen=True)
class TokenRequest:
    """One request as the endpoint received it (secrets included, for assertions) and what it answered."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    form: dict[str, str]
    status: int
    reply: dict[str, Any]  # the JSON answered ({} for an HTML page)


@dataclass
class _Client:
    client_id: str
    secret: str | None = None
    certificates: list[x509.Certificate] = field(default_factory=list)


@dataclass
class _Issued:
    client_id: str
    expires_at: float
    revoked: bool = False


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    reply: dict[str, Any] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()


class _Refused(Exception):
    """A request the endpoint refuses: carries the answer."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


class OAuthEndpoint:
    """The fake token endpoint. Use as a context manager; every control is thread-safe."""

    def __init__(self, ca: trustme.CA, directory: Path, *, lifetime: int = 3599, rotate_refresh_tokens: bool = False,
                 tenant: str = "contoso.onmicrosoft.com", clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.tenant = tenant
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self._clock = clock
        self._lock = threading.Lock()
        self._lifetime = lifetime
        self._delay = 0.0
        self._fail_status: int | None = None
        self._clients: dict[str, _Client] = {}
        self._access: dict[str, _Issued] = {}
        self._refresh: dict[str, _Issued] = {}
        self._requests: list[TokenRequest] = []
        self._issued: list[str] = []
        self._handler_errors: list[BaseException] = []
        self._stopping = threading.Event()
        self.ca_file = directory / "token-endpoint-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(LOOPBACK).configure_cert(self._context)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> OAuthEndpoint:
        server = _Server((LOOPBACK, 0), _Handler)
        server.endpoint = self
        # No handshake in accept(): a client that never speaks TLS must not stall the accept loop.
        server.socket = self._context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="oauth-endpoint", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases handlers waiting out `delay`
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> OAuthEndpoint:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------------------

    def microsoft_url(self, tenant: str | None = None) -> str:
        return f"https://{LOOPBACK}:{self.port}/{tenant or self.tenant}/oauth2/v2.0/token"

    @property
    def google_url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}{_GOOGLE_PATH}"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    # -- registration ------------------------------------------------------------------------------------

    def register_client(self, client_id: str, secret: str | None = None) -> None:
        """A client with a secret (confidential) or without (public: refresh tokens only)."""
        with self._lock:
            self._clients[client_id] = _Client(client_id, secret)

    def register_certificate(self, client_id: str, pem: Path) -> None:
        """Add the certificate in `pem` to the client's credentials (the client is created if new)."""
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
        with self._lock:
            self._clients.setdefault(client_id, _Client(client_id)).certificates.append(cert)

    def register_certificate_client(self, client_id: str) -> Path:
        """A client authenticated by a certificate; returns the PEM (certificate + key) the client signs with."""
        pem = make_certificate(self.directory, client_id)
        self.register_certificate(client_id, pem)
        return pem

    def mint_refresh_token(self, client_id: str) -> str:
        """A refresh token for the client, as a user's consent would have produced."""
        with self._lock:
            return self._new_refresh_token(client_id)

    # -- test controls -----------------------------------------------------------------------------------

    def is_valid(self, token: str) -> bool:
        """Issued here, not expired by this endpoint's clock, not revoked."""
        with self._lock:
            issued = self._access.get(token)
            return issued is not None and not issued.revoked and self._clock() < issued.expires_at

    def expire_all(self) -> None:
        """Every access token issued so far expires now."""
        with self._lock:
            now = self._clock()
            for issued in self._access.values():
                issued.expires_at = min(issued.expires_at, now)

    def revoke_refresh_token(self, token: str) -> None:
        with self._lock:
            self._refresh[token].revoked = True

    def refresh_token_valid(self, token: str) -> bool:
        with self._lock:
            issued = self._refresh.get(token)
            return issued is not None and not issued.revoked

    def fail_with_status(self, status: int | None) -> None:
        """Answer every request with this status and an HTML page (a 503 from a gateway); None: work again."""
        with self._lock:
            self._fail_status = status

    @property
    def delay(self) -> float:
        with self._lock:
            return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        with self._lock:
            self._delay = seconds

    @property
    def lifetime(self) -> int:
        with self._lock:
            return self._lifetime

    @lifetime.setter
    def lifetime(self, seconds: int) -> None:
        with self._lock:
            self._lifetime = seconds

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def handler_errors(self) -> list[BaseException]:
        """Exceptions the request handler raised: a bug in this fake (a test should assert there are none)."""
        with self._lock:
            return list(self._handler_errors)

    def record_handler_error(self, error: BaseException) -> None:
        with self._lock:
            self._handler_errors.append(error)

    @property
    def issued(self) -> list[str]:
        """Access tokens issued, oldest first."""
        with self._lock:
            return list(self._issued)

    # -- answering (handler threads) -------------------------------------------------------------------

    def _wait_delay(self) -> None:
        delay = self.delay
        if delay > 0:
            self._stopping.wait(delay)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        form = _lenient_form(body)  # what was sent, for the tests' assertions, even when it is refused
        try:
            answer = self._answer(method, path, headers, body, form)
        except _Refused as refused:
            answer = refused.answer
        with self._lock:
            self._requests.append(TokenRequest(method, path, headers, form, answer.status, answer.reply))
        return answer

    def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes,
                form: dict[str, str]) -> _Answer:
        with self._lock:
            failing = self._fail_status
        if failing is not None:
            return _html(failing)
        microsoft = _MICROSOFT_PATH.match(path)
        if microsoft is None and path != _GOOGLE_PATH:
            return _html(404)
        shape: _Shape = _Microsoft(microsoft["tenant"]) if microsoft else _Google()
        if microsoft and microsoft["tenant"] not in (self.tenant, "common", "organizations", "consumers"):
            raise shape.refuse(400, "invalid_request", 90002, f"Tenant '{microsoft['tenant']}' not found. Check to "
                               "make sure you have the correct tenant ID and are signing into the correct cloud.")
        if method != "POST":
            raise shape.refuse(405, "invalid_request", 900561,
                               f"The endpoint only accepts POST, OPTIONS requests. Received a {method} request.",
                               headers=(("Allow", "POST, OPTIONS"),))
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != FORM:
            raise shape.refuse(400, "invalid_request", 900144,
                               "The request body must contain the following parameter: 'grant_type'.")
        form.clear()
        form.update(_parse_form(shape, body))
        grant = form.get("grant_type")
        if not grant:
            raise shape.refuse(400, "invalid_request", 900144,
                               "The request body must contain the following parameter: 'grant_type'.")
        if grant == "client_credentials" and isinstance(shape, _Google):
            raise shape.refuse(400, "unsupported_grant_type", 0, "Invalid grant_type: client_credentials")
        if grant not in ("client_credentials", "refresh_token"):
            raise shape.refuse(400, "unsupported_grant_type", 70003,
                               "The app requested an unsupported grant type 'grant_type'.")
        url = f"https://{LOOPBACK}:{self.port}{path}"
        with self._lock:
            client = self._authenticate(shape, url, headers, form, grant)
            if grant == "client_credentials":
                scope = form.get("scope", "")
                if not scope:
                    raise shape.refuse(400, "invalid_scope", 70011,
                                       "The provided request must include a 'scope' input parameter.")
                if not all(item.endswith("/.default") for item in scope.split()):
                    raise shape.refuse(400, "invalid_scope", 70011,
                                       f"The provided value for the input parameter 'scope' is not valid. The scope "
                                       f"{scope} is not valid. The scope format is invalid. Scope must be in a valid "
                                       "URI form <https://example/scope> or a valid Guid <guid>.")
                return self._issue(shape, client, scope, refresh_token=None)
            refresh = self._refresh.get(form.get("refresh_token", ""))
            if refresh is None or refresh.revoked or refresh.client_id != client.client_id:
                raise shape.refuse(400, "invalid_grant", 70008, shape.revoked_text)
            new_refresh = self._new_refresh_token(client.client_id) if self.rotate_refresh_tokens else None
            return self._issue(shape, client, form.get("scope", "https://mail.google.com/"), refresh_token=new_refresh)

    def _authenticate(self, shape: _Shape, url: str, headers: dict[str, str], form: dict[str, str],
                      grant: str) -> _Client:
        basic = _basic_credentials(shape, headers.get("authorization"))
        secret: str | None
        methods = [name for name, used in (("client_secret", "client_secret" in form), ("basic", basic is not None),
                                           ("client_assertion", "client_assertion" in form)) if used]
        if len(methods) > 1:  # RFC 6749 §2.3: MUST NOT use more than one authentication method
            raise shape.refuse(400, "invalid_request", 90023,
                               f"The request used more than one client authentication method: {', '.join(methods)}.")
        if basic is not None:
            client_id, secret = basic
            if form.get("client_id", client_id) != client_id:
                raise shape.refuse(400, "invalid_request", 90023, "client_id does not match the Authorization header.")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret")
        if "client_assertion" in form:
            return self._assertion_client(shape, url, form)
        client = self._clients.get(client_id)
        if client is None:
            raise shape.unknown_client(client_id)
        if secret is None:
            if client.secret is None and not client.certificates and grant == "refresh_token":
                return client  # a public client (no secret) may refresh with its client_id alone
            raise shape.refuse(401, "invalid_client", 7000218, "The request body must contain the following "
                               "parameter: 'client_assertion' or 'client_secret'.")
        if client.secret is None or not secrets.compare_digest(secret.encode(), client.secret.encode()):
            raise shape.bad_secret(client_id)
        return client

    def _assertion_client(self, shape: _Shape, url: str, form: dict[str, str]) -> _Client:
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise shape.refuse(400, "invalid_request", 50027,
                               "Invalid client_assertion_type: the only supported value is "
                               f"'{ASSERTION_TYPE}'.")
        try:
            encoded_header, encoded_claims, encoded_signature = form["client_assertion"].split(".")
            header = json.loads(b64url_decode(encoded_header))
            claims = json.loads(b64url_decode(encoded_claims))
            signature = b64url_decode(encoded_signature)
        except (ValueError, binascii.Error):
            raise shape.refuse(400, "invalid_request", 50027, "JWT token is invalid or malformed.") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise shape.refuse(400, "invalid_request", 50027, "JWT token is invalid or malformed.")
        client_id = claims.get("sub")
        client = self._clients.get(client_id) if isinstance(client_id, str) else None
        if client is None:
            raise shape.unknown_client(str(client_id))
        if claims.get("iss") != client_id or form.get("client_id", client_id) != client_id:
            raise shape.refuse(401, "invalid_client", 700021, "Client assertion application identifier doesn't "
                               "match 'client_id' parameter.")
        if header.get("alg") != "RS256":
            raise shape.refuse(401, "invalid_client", 5002738, f"Invalid JWT token. '{header.get('alg')}' is not a "
                               "supported signature algorithm.")
        cert = self._certificate_for(client, header)
        if cert is None:
            shown = header.get("x5t#S256") or header.get("x5t") or "none"
            raise shape.refuse(401, "invalid_client", 700027, "The certificate with identifier used to sign the "
                               "client assertion is not registered on application. [Reason - The key was not found., "
                               f"Thumbprint of key used by client: '{shown}', Please visit the Azure Portal, Graph "
                               f"Explorer or directly use MS Graph to see configured keys for app Id '{client_id}'.]")
        public_key = cert.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        try:
            public_key.verify(signature, f"{encoded_header}.{encoded_claims}".encode("ascii"), padding.PKCS1v15(),
                              hashes.SHA256())
        except InvalidSignature:
            raise shape.refuse(401, "invalid_client", 700027,
                               "Client assertion contains an invalid signature.") from None
        if claims.get("aud") != url:
            raise shape.refuse(401, "invalid_client", 50012,
                               "Client assertion audience claim does not match Realm issuer.")
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat", now))
        if (not isinstance(exp, int | float) or not isinstance(nbf, int | float) or exp <= now - _CLOCK_SKEW_S
                or nbf > now + _CLOCK_SKEW_S or not claims.get("jti")):
            raise shape.refuse(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")
        return client

    @staticmethod
    def _certificate_for(client: _Client, header: dict[str, Any]) -> x509.Certificate | None:
        """The registered certificate the header names by thumbprint (x5t#S256 first, as Entra prefers)."""
        for cert in client.certificates:
            if header.get("x5t#S256") == b64url(cert.fingerprint(hashes.SHA256())):
                return cert
        if "x5t#S256" in header:
            return None
        for cert in client.certificates:
            if header.get("x5t") == b64url(cert.fingerprint(hashes.SHA1())):
                return cert
        return None

    def _issue(self, shape: _Shape, client: _Client, scope: str, *, refresh_token: str | None) -> _Answer:
        token = _access_token(client.client_id, self.tenant, self._lifetime)
        self._access[token] = _Issued(client.client_id, self._clock() + self._lifetime)
        self._issued.append(token)
        reply = shape.success(token, self._lifetime, scope)
        if refresh_token is not None:
            reply["refresh_token"] = refresh_token
        return _Answer(200, json.dumps(reply).encode(), reply=reply,
                       headers=(("Cache-Control", "no-store"), ("Pragma", "no-cache")))

    def _new_refresh_token(self, client_id: str) -> str:
        token = "1//0" + secrets.token_urlsafe(80)
        self._refresh[token] = _Issued(client_id, float("inf"))
        return token


class _Shape:
    """How one provider words its replies."""

    revoked_text = "Token has been expired or revoked."

    def refuse(self, status: int, error: str, code: int, description: str,
               headers: tuple[tuple[str, str], ...] = ()) -> _Refused:
        reply = {"error": error, "error_description": description}
        return _Refused(_Answer(status, json.dumps(reply).encode(), reply=reply, headers=headers))

    def unknown_client(self, client_id: str) -> _Refused:
        return self.refuse(401, "invalid_client", 0, "The OAuth client was not found.")

    def bad_secret(self, client_id: str) -> _Refused:
        return self.refuse(401, "invalid_client", 0, "Unauthorized")

    def success(self, token: str, lifetime: int, scope: str) -> dict[str, Any]:
        return {"access_token": token, "expires_in": lifetime, "scope": scope, "token_type": "Bearer"}


class _Google(_Shape):
    pass


class _Microsoft(_Shape):
    revoked_text = ("The provided authorization code or refresh token has expired due to inactivity. Send a new "
                    "interactive authorization request for this user and resource.")

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    def refuse(self, status: int, error: str, code: int, description: str,
               headers: tuple[tuple[str, str], ...] = ()) -> _Refused:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        reply = {"error": error,
                 "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\n"
                                      f"Correlation ID: {correlation}\r\nTimestamp: {stamp}",
                 "error_codes": [code], "timestamp": stamp, "trace_id": trace, "correlation_id": correlation,
                 "error_uri": f"https://login.microsoftonline.com/error?code={code}"}
        return _Refused(_Answer(status, json.dumps(reply).encode(), reply=reply, headers=headers))

    def unknown_client(self, client_id: str) -> _Refused:
        return self.refuse(400, "unauthorized_client", 700016, f"Application with identifier '{client_id}' was not "
                           f"found in the directory '{self.tenant}'. This can happen if the application has not been "
                           "installed by the administrator of the tenant or consented to by any user in the tenant.")

    def bad_secret(self, client_id: str) -> _Refused:
        return self.refuse(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being "
                           "sent in the request is the client secret value, not the client secret ID, for a secret "
                           f"added to app '{client_id}'.")

    def success(self, token: str, lifetime: int, scope: str) -> dict[str, Any]:
        return {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}


def _parse_form(shape: _Shape, body: bytes) -> dict[str, str]:
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise shape.refuse(400, "invalid_request", 900144,
                           "The request body must contain the following parameter: 'grant_type'.") from None
    repeated = sorted(name for name, values in fields.items() if len(values) > 1)
    if repeated:  # RFC 6749 §3.2: request parameters MUST NOT be included more than once
        raise shape.refuse(400, "invalid_request", 90015, f"Duplicate query parameter '{repeated[0]}' in request.")
    return {name: values[0] for name, values in fields.items()}


def _lenient_form(body: bytes) -> dict[str, str]:
    try:
        return {name: values[-1] for name, values in parse_qs(body.decode("utf-8", "replace"),
                                                               keep_blank_values=True).items()}
    except ValueError:
        return {}


def _basic_credentials(shape: _Shape, header: str | None) -> tuple[str, str] | None:
    """RFC 6749 §2.3.1: Basic with the form-urlencoded client_id and secret."""
    if header is None or not header.lower().startswith("basic "):
        return None
    try:
        client_id, _, secret = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise shape.refuse(401, "invalid_client", 7000215, "Invalid client secret provided.") from None
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))


def _access_token(client_id: str, tenant: str, lifetime: int) -> str:
    """A JWT-shaped opaque token of Entra's size (~1,900 characters); only this endpoint knows it is valid."""
    now = int(time.time())
    header = {"typ": "JWT", "nonce": secrets.token_urlsafe(32), "alg": "RS256", "x5t": secrets.token_urlsafe(20),
              "kid": secrets.token_urlsafe(20)}
    claims = {"aud": "https://outlook.office365.com", "iss": f"https://sts.windows.net/{tenant}/", "iat": now,
              "nbf": now, "exp": now + lifetime, "aio": secrets.token_urlsafe(90), "app_displayname": "mailwatchd",
              "appid": client_id, "appidacr": "2", "idp": f"https://sts.windows.net/{tenant}/", "idtyp": "app",
              "oid": str(uuid.uuid4()), "rh": secrets.token_urlsafe(40), "roles": ["SMTP.SendAsApp"],
              "sid": str(uuid.uuid4()), "sub": str(uuid.uuid4()), "tid": str(uuid.uuid4()),
              "uti": secrets.token_urlsafe(16), "ver": "1.0", "wids": ["0997a1d0-0d1d-4acb-b408-d5ca73121e90"],
              "xms_ftd": secrets.token_urlsafe(60), "xms_idrel": "7 28", "jti": secrets.token_hex(16)}
    return ".".join((b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()),
                     b64url(secrets.token_bytes(256))))


_REASONS = {404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout", 429: "Too Many Requests"}


def _html(status: int) -> _Answer:
    reason = _REASONS.get(status, "Error")
    page = (f"<!DOCTYPE html>\n<html><head><title>{status} {reason}</title></head><body><h1>{status} {reason}</h1>"
            "<p>The service is unavailable. Please try again later.</p></body></html>\n")
    return _Answer(status, page.encode(), content_type="text/html; charset=utf-8")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    endpoint: OAuthEndpoint

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gives up (or refuses our certificate) mid-handshake is no error of the test's;
        anything else is a bug in this fake, kept for the test to see."""
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, ssl.SSLError | ConnectionError | TimeoutError):
            self.endpoint.record_handler_error(error)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # the connection's socket timeout: a stuck client cannot pin a thread for long
    server: _Server

    def do_POST(self) -> None:
        self._serve()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= _MAX_BODY:
            self.send_error(413)
            return
        body = self.rfile.read(length)
        headers = {name.lower(): value for name, value in self.headers.items()}
        endpoint = self.server.endpoint
        answer = endpoint.answer(self.command, self.path, headers, body)
        endpoint._wait_delay()
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Connection", "close")
        for name, value in answer.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(answer.body)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


def sha1_thumbprint(pem: Path) -> str:
    """base64url SHA-1 of the DER certificate in `pem`: the x5t Entra matches."""
    return b64url(hashlib.sha1(x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(
        serialization.Encoding.DER)).digest())
