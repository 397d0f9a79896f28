"""OAuth2 access tokens for XOAUTH2 / OAUTHBEARER: obtained, cached and refreshed, one provider per relay.

Three sources (`TokenGrant`): the client_credentials grant (app-only, Microsoft identity platform) with a
client secret sent in the body (`client_secret_post`, which Microsoft and Google both take) or with a
certificate (an RS256 client assertion, RFC 7523 §2.2, with Entra ID's `x5t` / `x5t#S256` thumbprint
headers); the refresh_token grant (a user's stored consent; Google, Microsoft delegated); or a command
that prints a token (msmtp's passwordeval). The HTTP grants go through Authlib's httpx client, imported
on the first fetch only, so a process with password relays never loads it.

The token endpoint's certificate is always verified (`OAuthConfig.cafile`, else the system's store),
only https:// is spoken, and the whole fetch runs under the provider's `timeout`. A failure is a
`TokenFailed` whose cause tells "the endpoint (or command) said no" (TOKEN_FAILED: a wrong secret, a
revoked refresh token) from "no usable answer" (TOKEN_UNREACHABLE: DNS, connect, TLS, timeout, 5xx, a
reply that is not JSON). This module logs nothing; no exception text, repr or detail holds a client
secret, refresh token or access token (texts from outside are scrubbed of every secret the provider
knows, and no library exception text is passed on).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mailwatchd.settings.credentials import Secret
from mailwatchd.settings.relays import OAuthConfig, TokenGrant
from mailwatchd.transports.outcome import Cause, certificate_cause

COMMAND_TOKEN_LIFETIME_S = 300.0  # a token command's plain output, or JSON without expires_in
DEFAULT_LIFETIME_S = COMMAND_TOKEN_LIFETIME_S  # an endpoint's reply without expires_in (RFC 6749 §5.1: optional)
MIN_REFRESH_MARGIN_S = 60.0
REFRESH_MARGIN_FRACTION = 0.1
ASSERTION_LIFETIME_S = 600  # a signed client assertion's exp, from now
KILL_GRACE_S = 2.0  # after SIGKILL to a token command's process group, how long to wait for it to be reaped
DETAIL_LIMIT = 200
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# RFC 6750 §2.1 b64token, widened to every visible ASCII character: never a space, CR, LF or the 0x01
# that separates SASL fields, which would let a token rewrite the AUTH exchange.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_FIRST_SENTENCE = re.compile(r"^(.*?\.)(?:\s|$)")
# Errors that say "try again later", not "your credentials are wrong" (RFC 6749 §4.1.2.1 names both).
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


def refresh_margin(lifetime: float) -> float:
    """How long before its expiry a token is replaced: max(60 s, 10 % of its lifetime), but never more than
    half its lifetime, so a short-lived token is still used (a 2 s token serves for 1 s, then is replaced;
    Microsoft's 3599 s token serves for 54 minutes; a command's 300 s token for 4 minutes)."""
    return min(max(MIN_REFRESH_MARGIN_S, REFRESH_MARGIN_FRACTION * lifetime), lifetime / 2)


class TokenFailed(Exception):
    """No access token. `cause` is Cause.TOKEN_FAILED (the endpoint or command said no) or
    Cause.TOKEN_UNREACHABLE (no usable answer); `detail` is one line without secrets; `error` is the
    endpoint's OAuth2 error code (invalid_client, invalid_grant, ...) when it sent one."""

    def __init__(self, cause: Cause, detail: str, error: str | None = None) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail
        self.error = error

    def __repr__(self) -> str:
        return f"TokenFailed({self.cause.value}, {self.detail!r}, error={self.error!r})"


@dataclass(frozen=True)
class AccessToken:
    """A bearer token. `expires_at` is on the provider's clock; `fetched` is True for the call that fetched
    it (False when served from the cache or from a fetch another caller started)."""

    value: Secret
    expires_at: float
    fetched: bool
    detail: str  # "from 127.0.0.1:4443, expires in 3599 s", "cached, expires in 1203 s": never the token


@dataclass(frozen=True)
class _Cached:
    value: Secret
    expires_at: float
    refresh_at: float


@dataclass(frozen=True)
class _Reply:
    """What a token source handed over, checked."""

    access_token: str
    lifetime: float
    refresh_token: str | None = None


class TokenProvider:
    """One relay's token source: caches the token and fetches a new one when there is none or it expires
    within `refresh_margin` of its lifetime. Concurrent callers share one fetch (and its failure).

    A refresh token the endpoint rotates (a new `refresh_token` in its reply) is used from then on, in
    memory only: after a restart the configured one is used again (Microsoft keeps replaced refresh tokens
    valid; a provider that revokes them would need the new one written back, which mailwatchd does not do).
    """

    def __init__(self, config: OAuthConfig, *, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.timeout = timeout
        self._clock = clock
        self._cached: _Cached | None = None
        self._refresh_tokens: list[Secret] = [config.refresh_token] if config.refresh_token is not None else []
        self._inflight: asyncio.Task[AccessToken] | None = None
        self._tls: ssl.SSLContext | None = None

    @property
    def endpoint(self) -> str:
        """'host:port' of the token endpoint, or 'command NAME' (the program, never its arguments)."""
        if self.config.grant is TokenGrant.COMMAND:
            return f"command {self.config.command[0] if self.config.command else '(none)'}"
        parts = urlsplit(self.config.token_url or "")
        host = parts.hostname or "(no token_url)"
        with contextlib.suppress(ValueError):
            port = parts.port or 443
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return host

    def secrets(self) -> tuple[str, ...]:
        """Every secret string to scrub from texts: the client secret, each refresh token (rotated ones too)
        and the cached access token."""
        held = [self.config.client_secret, *self._refresh_tokens, self._cached.value if self._cached else None]
        return tuple(secret.reveal() for secret in held if secret is not None and secret.reveal())

    def invalidate(self, token: AccessToken) -> None:
        """The server refused `token`: the next token() fetches anew, if `token` is still the cached one."""
        if self._cached is not None and self._cached.value == token.value:
            self._cached = None

    async def token(self) -> AccessToken:
        now = self._clock()
        cached = self._cached
        if cached is not None and now < cached.refresh_at:
            return AccessToken(cached.value, cached.expires_at, False,
                               f"cached, expires in {cached.expires_at - now:.0f} s")
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is not None and not task.done() and task.get_loop() is loop:
            return replace(await asyncio.shield(task), fetched=False)
        task = loop.create_task(self._fetch(), name=f"oauth2 token from {self.endpoint}")
        task.add_done_callback(_retrieve)
        self._inflight = task
        # Shielded: a caller that gives up (its own deadline) leaves the fetch to the others, under ours.
        return await asyncio.shield(task)

    async def _fetch(self) -> AccessToken:
        started = self._clock()
        try:
            if self.config.grant is TokenGrant.COMMAND:
                reply: _Reply | TokenFailed = await self._run_command()
            else:
                reply = await self._request()
        except TokenFailed as exc:
            reply = exc
        if isinstance(reply, TokenFailed):
            # A new exception, raised out here: texts from outside (stderr, an error_description) may quote a
            # secret, and neither the first one nor the frames it went through (their locals) may ride along.
            failure = TokenFailed(reply.cause, self._scrub(reply.detail), reply.error and self._scrub(reply.error))
            del reply
            raise failure
        if reply.refresh_token is not None and Secret(reply.refresh_token) not in self._refresh_tokens:
            self._refresh_tokens.append(Secret(reply.refresh_token))
        value = Secret(reply.access_token)
        expires_at = started + reply.lifetime
        self._cached = _Cached(value, expires_at, expires_at - refresh_margin(reply.lifetime))
        source = self.endpoint if self.config.grant is not TokenGrant.COMMAND else f"the {self.endpoint}"
        return AccessToken(value, expires_at, True, f"from {source}, expires in {reply.lifetime:.0f} s")

    def _scrub(self, text: str) -> str:
        for secret in sorted(self.secrets(), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    # -- the token endpoint ----------------------------------------------------------------------------

    async def _request(self) -> _Reply:
        config, where = self.config, f"token endpoint {self.endpoint}"
        url = config.token_url
        if not url or urlsplit(url).scheme.lower() != "https" or not urlsplit(url).hostname:
            raise TokenFailed(Cause.TOKEN_FAILED, f"{where}: the token URL must be https://HOST/...; "
                                                  "credentials are never sent without TLS")
        if not config.client_id:
            raise TokenFailed(Cause.TOKEN_FAILED, f"{where}: no client_id is configured")
        authlib = _authlib()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._grant(authlib, url)
        except TimeoutError:
            failure = TokenFailed(Cause.TOKEN_UNREACHABLE, f"{where}: no reply within {self.timeout:g}s")
        except authlib.http.HTTPError as exc:
            failure = _transport_failure(where, exc, self.timeout, authlib.http)
        except authlib.error as exc:  # our reply check runs first: this is what it did not foresee
            failure = TokenFailed(Cause.TOKEN_FAILED, f"{where}: the reply was not understood "
                                                      f"({type(exc).__name__})")
        raise failure  # outside the except blocks: no library exception (and its request) rides along

    async def _grant(self, authlib: _Authlib, url: str) -> _Reply:
        config, where, http = self.config, self.endpoint, authlib.http
        checked: list[_Reply] = []

        def check(response: Any) -> Any:  # Authlib's compliance hook: sees the response before Authlib does
            checked.append(_check_reply(where, response))
            return response

        options: dict[str, Any] = {"verify": self._tls_context(), "timeout": http.Timeout(self.timeout),
                                   "follow_redirects": False}
        if config.grant is TokenGrant.CLIENT_CREDENTIALS and config.certificate is not None:
            key, headers = _signing_key(config.certificate)
            now = int(time.time())
            claims = {"iat": now, "nbf": now, "exp": now + ASSERTION_LIFETIME_S, "jti": str(uuid.uuid4())}
            client = authlib.client(client_id=config.client_id, client_secret=key, scope=config.scope,
                                    token_endpoint_auth_method="private_key_jwt", **options)
            client.register_client_auth_method(authlib.private_key_jwt(url, claims=claims, headers=headers))
        else:
            secret = config.client_secret.reveal() if config.client_secret is not None else None
            client = authlib.client(client_id=config.client_id, client_secret=secret, scope=config.scope,
                                    token_endpoint_auth_method="client_secret_post" if secret else "none", **options)
        async with client:
            client.register_compliance_hook("access_token_response", check)
            client.register_compliance_hook("refresh_token_response", check)
            if config.grant is TokenGrant.REFRESH_TOKEN:
                if not self._refresh_tokens:
                    raise TokenFailed(Cause.TOKEN_FAILED, f"token endpoint {where}: no refresh token is configured")
                await client.refresh_token(url, refresh_token=self._refresh_tokens[-1].reveal())
            elif config.certificate is not None:  # Entra ID wants client_id beside the assertion
                await client.fetch_token(url, grant_type="client_credentials", client_id=config.client_id)
            else:
                await client.fetch_token(url, grant_type="client_credentials")
        if not checked:
            raise TokenFailed(Cause.TOKEN_UNREACHABLE, f"token endpoint {where}: no reply")
        return checked[-1]

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            cafile = self.config.cafile
            try:
                self._tls = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
            except (OSError, ssl.SSLError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM CA bundle"
                raise TokenFailed(Cause.TOKEN_FAILED,
                                  f"token endpoint {self.endpoint}: cannot use cafile {cafile}: {reason}") from None
        return self._tls

    # -- the token command -----------------------------------------------------------------------------

    async def _run_command(self) -> _Reply:
        argv, where = self.config.command, f"token {self.endpoint}"
        if not argv:
            raise TokenFailed(Cause.TOKEN_FAILED, "no token command is configured")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise TokenFailed(Cause.TOKEN_FAILED, f"{where} not found") from None
        except PermissionError:
            raise TokenFailed(Cause.TOKEN_FAILED, f"{where} is not executable (permission denied)") from None
        except OSError as exc:
            raise TokenFailed(Cause.TOKEN_FAILED, f"{where} cannot be run: {exc.strerror or type(exc).__name__}") \
                from None
        try:
            async with asyncio.timeout(self.timeout):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            raise TokenFailed(Cause.TOKEN_UNREACHABLE, f"{where} printed no token within {self.timeout:g}s: killed "
                                                       f"its process group ({process.pid})") from None
        finally:
            if process.returncode is None:  # the deadline, or our caller gave up: nothing of it may outlive us
                _kill_group(process.pid)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KILL_GRACE_S):
                        await process.wait()
        return _command_reply(where, process.returncode, stdout, stderr)


class Tokens:
    """The process's token providers, one per relay; a relay whose OAuth settings changed gets a new one
    (its cached token and any rotated refresh token go with the old settings)."""

    def __init__(self) -> None:
        self._providers: dict[str, TokenProvider] = {}

    def for_relay(self, name: str, config: OAuthConfig, *, timeout: float) -> TokenProvider:
        provider = self._providers.get(name)
        if provider is None or provider.config != config:
            provider = self._providers[name] = TokenProvider(config, timeout=timeout)
        provider.timeout = timeout
        return provider


# -- helpers ---------------------------------------------------------------------------------------------


def _retrieve(task: asyncio.Task[AccessToken]) -> None:
    """A fetch whose callers all gave up still ends in a result or a TokenFailed: nobody needs telling."""
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True)
class _Authlib:
    http: Any  # the httpx module Authlib's client is built on (its exceptions)
    client: Any  # AsyncOAuth2Client
    private_key_jwt: Any  # PrivateKeyJWT (RFC 7523 §2.2 client assertion)
    error: type[Exception]  # AuthlibBaseError


def load_http_client(config: OAuthConfig) -> None:
    """Import what fetching for `config` needs (Authlib and httpx: about 250 ms once), so that a timed
    token step measures the endpoint, not the import."""
    if config.grant is not TokenGrant.COMMAND:
        _authlib()


@functools.cache
def _authlib() -> _Authlib:
    """Authlib's httpx client and what goes with it, imported on the first fetch only."""
    import warnings

    import authlib.deprecate  # type: ignore[import-untyped]  # noqa: F401 (installs its filter first)

    with warnings.catch_warnings():
        # Authlib 1.9 prefers the httpx2 package and warns on every import that it falls back to httpx,
        # which this project pins; the filter goes in after Authlib's own "always" one so it wins.
        warnings.filterwarnings("ignore", message="The httpx module is deprecated", category=DeprecationWarning)
        from authlib.common.errors import AuthlibBaseError  # type: ignore[import-untyped]
        from authlib.integrations.httpx_client import oauth2_client  # type: ignore[import-untyped]
        from authlib.oauth2.rfc7523 import PrivateKeyJWT  # type: ignore[import-untyped]
    return _Authlib(oauth2_client.httpx2, oauth2_client.AsyncOAuth2Client, PrivateKeyJWT, AuthlibBaseError)


def _check_reply(where: str, response: Any) -> _Reply:
    """The token endpoint's answer (RFC 6749 §5.1, §5.2) as a reply, or why there is none."""
    status = int(response.status_code)
    if status >= 500 or status == 429:
        raise TokenFailed(Cause.TOKEN_UNREACHABLE, f"token endpoint {where}: HTTP {status} "
                                                   f"{_clean(str(response.reason_phrase), 60)}".rstrip())
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = _clean(str(response.headers.get("content-type", "no content type")).split(";")[0], 60)
        raise TokenFailed(Cause.TOKEN_UNREACHABLE, f"token endpoint {where}: HTTP {status} without a JSON "
                                                   f"object ({kind})")
    error = body.get("error")
    if error is not None or status != 200:
        code = _clean(str(error), 64) if error is not None else None
        text = f"{where} refused the token request (HTTP {status})"
        if code:
            text += f": {code}"
            if description := first_sentence(body.get("error_description")):
                text += f": {description}"
        cause = Cause.TOKEN_UNREACHABLE if code in _TRANSIENT_ERRORS else Cause.TOKEN_FAILED
        raise TokenFailed(cause, text, code)
    token, token_type = body.get("access_token"), body.get("token_type", "Bearer")
    if not isinstance(token, str) or not token:
        raise TokenFailed(Cause.TOKEN_FAILED, f"token endpoint {where}: HTTP 200 without an access_token")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenFailed(Cause.TOKEN_FAILED, f"token endpoint {where}: the token is of type "
                                              f"{_clean(str(token_type), 40)!r}, not Bearer")
    if not _TOKEN_CHARS.fullmatch(token):
        raise TokenFailed(Cause.TOKEN_FAILED, f"token endpoint {where}: the access_token holds spaces or "
                                              "control characters")
    lifetime = _lifetime(body.get("expires_in"), DEFAULT_LIFETIME_S)
    if lifetime is None:
        raise TokenFailed(Cause.TOKEN_FAILED, f"token endpoint {where}: expires_in is not a positive number")
    refresh = body.get("refresh_token")
    return _Reply(token, lifetime, refresh if isinstance(refresh, str) and refresh else None)


def first_sentence(description: object) -> str:
    """An endpoint's error_description up to its first sentence, on one line, capped: Microsoft's go on with
    advice, then a trace id, a correlation id and a timestamp on lines of their own."""
    if not isinstance(description, str):
        return ""
    line = next((part.strip() for part in description.splitlines() if part.strip()), "")
    line = re.split(r"\s(?:Trace ID|Correlation ID|Timestamp):", line, maxsplit=1)[0]
    if match := _FIRST_SENTENCE.match(line):
        line = match[1]
    return _clean(line, DETAIL_LIMIT)


def _clean(text: str, limit: int) -> str:
    text = _UNPRINTABLE.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _lifetime(value: object, default: float) -> float | None:
    if value is None:
        return default
    if isinstance(value, bool):
        return None
    try:
        lifetime = float(value) if isinstance(value, int | float | str) else -1.0
    except ValueError:
        return None
    return lifetime if 0 < lifetime < float("inf") else None


def _transport_failure(where: str, exc: BaseException, timeout: float, http: Any) -> TokenFailed:
    """An httpx error as one line: what failed on the way, from the exceptions it was raised from."""
    unreachable = Cause.TOKEN_UNREACHABLE
    if isinstance(exc, http.ConnectTimeout):
        return TokenFailed(unreachable, f"{where}: connect timed out after {timeout:g}s")
    if isinstance(exc, http.TimeoutException):
        return TokenFailed(unreachable, f"{where}: no reply within {timeout:g}s")
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            kind = certificate_cause(cause)
            reason = _clean(str(cause.verify_message or cause.reason or "verification failed"), 120)
            what = {Cause.TLS_EXPIRED: "TLS certificate expired", Cause.TLS_HOSTNAME_MISMATCH:
                    "TLS certificate does not match the host"}.get(kind, "TLS certificate not trusted")
            return TokenFailed(unreachable, f"{where}: {what}: {reason}")
    for cause in causes:
        if isinstance(cause, ssl.SSLError):
            reason = _clean(str(cause.reason or type(cause).__name__), 120)
            return TokenFailed(unreachable, f"{where}: TLS handshake failed: {reason}")
        if isinstance(cause, socket.gaierror):
            return TokenFailed(unreachable, f"{where}: DNS lookup failed: {_clean(str(cause.strerror), 120)}")
        if isinstance(cause, OSError) and cause.errno:  # asyncio words it "Connect call failed (addr)"
            return TokenFailed(unreachable, f"{where}: cannot connect: {os.strerror(cause.errno)}")
    if isinstance(exc, http.ConnectError):
        return TokenFailed(unreachable, f"{where}: cannot connect")
    return TokenFailed(unreachable, f"{where}: the connection failed ({type(exc).__name__})")


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from, through exception groups (anyio's "all attempts failed")."""
    found: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        pending.extend(nested for nested in (current.__cause__, current.__context__) if nested is not None)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
    return found


def _signing_key(certificate: Path) -> tuple[Any, dict[str, str]]:
    """The RSA key (as joserfc's key) and the x5t / x5t#S256 headers for the certificate in `certificate`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from joserfc.jwk import RSAKey

    where = f"certificate {certificate}"
    try:
        pem = certificate.read_bytes()
    except OSError as exc:
        raise TokenFailed(Cause.TOKEN_FAILED, f"{where}: cannot read it: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise TokenFailed(Cause.TOKEN_FAILED, f"{where}: holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise TokenFailed(Cause.TOKEN_FAILED, f"{where}: its private key is encrypted; store it "
                                              "unencrypted (mode 0600)") from None
    except ValueError:
        raise TokenFailed(Cause.TOKEN_FAILED, f"{where}: holds no PEM private key beside the certificate") \
            from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TokenFailed(Cause.TOKEN_FAILED, f"{where}: the key is not RSA (Entra ID signs with RS256)")
    public = cert.public_key()
    if not isinstance(public, rsa.RSAPublicKey) or public.public_numbers() != key.public_key().public_numbers():
        raise TokenFailed(Cause.TOKEN_FAILED, f"{where}: the private key does not belong to the certificate")
    der = cert.public_bytes(serialization.Encoding.DER)
    headers = {"x5t": _b64url(hashlib.sha1(der).digest()), "x5t#S256": _b64url(hashlib.sha256(der).digest())}
    return RSAKey.import_key(key), headers


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # start_new_session: the group's id is the child's pid


def _command_reply(where: str, returncode: int | None, stdout: bytes, stderr: bytes) -> _Reply:
    """A token command's outcome: a JSON object with access_token (and expires_in), or the token alone on
    its first non-empty line."""
    output = stdout.decode("utf-8", errors="replace")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    complaint = _stderr_line(stderr, lines)
    if returncode is None or returncode != 0:
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else "?"
            status = f"was killed by signal {-returncode} ({name})"
        else:
            status = f"exited {returncode}"
        raise TokenFailed(Cause.TOKEN_FAILED, f"{where} {status}" + (f": {complaint}" if complaint else ""))
    if not lines:
        raise TokenFailed(Cause.TOKEN_FAILED, f"{where} printed nothing" + (f": {complaint}" if complaint else ""))
    lifetime = COMMAND_TOKEN_LIFETIME_S
    if output.lstrip().startswith("{"):
        try:
            body = json.loads(output)
        except ValueError:
            raise TokenFailed(Cause.TOKEN_FAILED, f"{where} printed something that is not JSON, starting "
                                                  "with '{'") from None
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise TokenFailed(Cause.TOKEN_FAILED, f"{where} printed JSON without an access_token")
        given = _lifetime(body.get("expires_in"), COMMAND_TOKEN_LIFETIME_S)
        if given is None:
            raise TokenFailed(Cause.TOKEN_FAILED, f"{where} printed an expires_in that is not a positive number")
        lifetime = given
    else:
        token = lines[0]
    if not _TOKEN_CHARS.fullmatch(token):
        raise TokenFailed(Cause.TOKEN_FAILED, f"{where} printed a token with spaces or control characters")
    return _Reply(token, lifetime)


def _stderr_line(stderr: bytes, printed: list[str]) -> str:
    """The first non-empty line of a command's stderr, without anything it also printed on stdout."""
    text = stderr.decode("utf-8", errors="replace")
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    for secret in sorted((item for item in printed if len(item) >= 8), key=len, reverse=True):
        line = line.replace(secret, "***")
    return _clean(line, DETAIL_LIMIT)
