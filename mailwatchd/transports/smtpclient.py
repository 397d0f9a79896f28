"""Session set-up, the one implementation: DNS (none for an IP address), connect, TLS, greeting,
EHLO, STARTTLS, the OAuth2 token (relays with auth=xoauth2 or oauthbearer), AUTH.

Delivery, the reachability probe and `check --send-test` all open their connections here, so
they cannot disagree about a relay. Each step runs under its own deadline and is reported
through `on_step` (name, phase, elapsed, detail) as it ends. Every failure raises
`SetupFailed` with the classifier's verdict, the phase, the reply code if any and a one-line
detail already scrubbed of the relay's secrets.

Connecting follows RFC 8305 ("happy eyeballs") for the addresses of one host: each address
gets a full connect deadline of its own, and the next one is started after
CONNECT_STAGGER_S while the previous one is still trying, so one black-holed address (a
broken IPv6 route, say) costs a fraction of a second, not a connect timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.transports.outcome import Cause, Outcome, Phase, Verdict, classify_exception, classify_reply
from mailwatchd.transports.smtpauth import (
    AuthRefused,
    AuthUnavailable,
    authenticate,
    authenticate_bearer,
    bearer_secret_forms,
    offered_mechanisms,
    token_rejected,
)
from mailwatchd.transports.smtpwire import Reply, Wire, describe, scrub
from mailwatchd.transports.tokens import AccessToken, TokenFailed, TokenProvider, Tokens, load_http_client

Resolver = Callable[[str, int], Awaitable[Sequence[tuple[Any, ...]]]]

CONNECT_STAGGER_S = 0.25  # RFC 8305 §5: the recommended connection attempt delay
QUIT_TIMEOUT_S = 2.0
_T = TypeVar("_T")


@dataclass(frozen=True)
class Step:
    """One timed step of a session set-up (or the probe's QUIT and test message)."""

    name: str
    phase: Phase
    ok: bool
    ms: float
    detail: str = ""


StepSink = Callable[[Step], None]


class SetupFailed(Exception):
    """A step failed: the verdict, where, the reply code (if a reply came) and what happened."""

    def __init__(self, verdict: Verdict, phase: Phase, detail: str, code: int | None = None) -> None:
        super().__init__(detail)
        self.verdict = verdict
        self.phase = phase
        self.detail = detail
        self.code = code


@dataclass
class Connection:
    """An SMTP session ready for MAIL FROM: the wire and what the server said about itself."""

    wire: Wire
    address: str
    extensions: dict[str, str] = field(default_factory=dict)  # EHLO keyword (upper case) → its parameters
    ehlo_lines: list[str] = field(default_factory=list)
    tls_version: str | None = None
    cert_not_after: float | None = None  # epoch seconds; None without TLS or with verification off

    def offers(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def cert_days_left(self) -> int | None:
        if self.cert_not_after is None:
            return None
        return int((self.cert_not_after - time.time()) // 86400)


def secret_forms(relay: RelayConfig) -> tuple[str, ...]:
    """Every form in which the relay's secrets could show up in a reply: the password, plain and as AUTH
    sends it; the OAuth2 client secret and refresh token (access tokens are added as they are fetched)."""
    forms: tuple[str, ...] = ()
    if relay.password is not None:
        password = relay.password.reveal()
        user = relay.username or ""
        forms = (password, base64.b64encode(password.encode()).decode(),
                 base64.b64encode(f"\0{user}\0{password}".encode()).decode())
    if relay.oauth is not None:
        forms += tuple(secret.reveal() for secret in (relay.oauth.client_secret, relay.oauth.refresh_token)
                       if secret is not None)
    return tuple(form for form in forms if form)


def token_provider(relay: RelayConfig, tokens: Tokens | None, timeouts: Timeouts) -> TokenProvider | None:
    """The relay's token provider from the process's `tokens` (a private one without), None without OAuth2."""
    if relay.oauth is None:
        return None
    return (tokens or Tokens()).for_relay(relay.name, relay.oauth, timeout=timeouts.connect + timeouts.command)


@dataclass(frozen=True)
class Timeouts:
    """The deadlines of session set-up: per connect attempt, per command, for the whole set-up."""

    connect: float
    command: float
    total: float


class _Setup:
    def __init__(self, relay: RelayConfig, endpoint: Endpoint, timeouts: Timeouts, helo_name: str,
                 tls_context: ssl.SSLContext | None, resolve: Resolver | None, on_step: StepSink | None,
                 secrets: tuple[str, ...], tokens: TokenProvider | None) -> None:
        self.relay = relay
        self.tokens = tokens
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.helo_name = helo_name
        self.tls_context = tls_context
        self.resolve = resolve
        self.on_step = on_step
        self.secrets = secrets
        self.phase = Phase.DNS
        self.sock: socket.socket | None = None
        self.wire: Wire | None = None
        self.address_errors: list[str] = []
        self.extensions: dict[str, str] = {}
        self.ehlo_lines: list[str] = []
        self.tls_version: str | None = None
        self.cert_not_after: float | None = None

    async def step(self, name: str, phase: Phase, timeout: float, action: Callable[[], Awaitable[_T]],
                   describe_ok: Callable[[_T], str], *, said_timeout: float | None = None) -> _T:
        """Run one step under its deadline, report it, and turn any failure into SetupFailed."""
        self.phase = phase
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                value = await action()
        except SetupFailed as failed:
            self.report(name, phase, False, start, failed.detail)
            raise
        except (AuthUnavailable, AuthRefused) as exc:
            refusal = self.auth_failure(exc)
            self.report(name, phase, False, start, refusal.detail)
            raise refusal from None
        except TokenFailed as exc:
            detail = scrub(exc.detail, self.secrets)
            self.report(name, phase, False, start, detail)
            raise SetupFailed(Verdict(Outcome.RELAY_FAULT, exc.cause), Phase.TOKEN, detail) from None
        except (OSError, EOFError, ValueError) as exc:  # OSError: also TimeoutError and ssl.SSLError
            endpoint = self.endpoint
            detail = describe(exc, host=endpoint.host, port=endpoint.port, timeout=said_timeout or timeout, step=name)
            if name == "connect" and self.address_errors and isinstance(exc, TimeoutError):
                detail += f"; before that {'; '.join(self.address_errors)}"
            detail = scrub(detail, self.secrets)
            self.report(name, phase, False, start, detail)
            raise SetupFailed(classify_exception(phase, exc), phase, detail) from None
        self.report(name, phase, True, start, describe_ok(value))
        return value

    def report(self, name: str, phase: Phase, ok: bool, start: float, detail: str) -> None:
        if self.on_step is not None:
            ms = round((time.perf_counter() - start) * 1000, 1)
            self.on_step(Step(name, phase, ok, ms, scrub(detail, self.secrets)))

    def refused(self, phase: Phase, reply: Reply) -> SetupFailed:
        return SetupFailed(classify_reply(phase, reply.code, reply.text), phase, scrub(str(reply), self.secrets),
                           reply.code)

    def auth_failure(self, exc: AuthUnavailable | AuthRefused) -> SetupFailed:
        if isinstance(exc, AuthRefused):
            return self.refused(Phase.AUTH, exc.reply)
        return SetupFailed(Verdict(Outcome.RELAY_FAULT, Cause.AUTH_UNAVAILABLE), Phase.AUTH, str(exc))

    async def expect(self, phase: Phase, line: bytes | None, codes: tuple[int, ...]) -> Reply:
        """Send `line` (None: just read, for the greeting) and require one of `codes`."""
        assert self.wire is not None
        reply = await (self.wire.read(self.timeouts.command) if line is None
                       else self.wire.command(line, self.timeouts.command))
        if reply.code not in codes:
            raise self.refused(phase, reply)
        return reply

    # The steps.

    async def addresses(self) -> list[tuple[int, str]]:
        resolve = self.resolve or asyncio.get_running_loop().getaddrinfo
        infos = await resolve(self.endpoint.host, self.endpoint.port)
        found: list[tuple[int, str]] = []
        for family, *_, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0]) not in found:
                found.append((family, str(sockaddr[0])))
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, "no IPv4 or IPv6 address")
        return found

    async def connect(self, addresses: list[tuple[int, str]]) -> str:
        """Connect to the first address that answers; attempts are staggered, each with its own deadline."""
        attempts: dict[asyncio.Task[socket.socket], str] = {}
        errors: list[OSError] = []
        pending = list(addresses)
        try:
            while pending or attempts:
                if pending:
                    family, address = pending.pop(0)
                    attempts[asyncio.create_task(self._connect_one(family, address))] = address
                done, _ = await asyncio.wait(attempts, timeout=CONNECT_STAGGER_S if pending else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    address = attempts.pop(task)
                    exc = task.exception()
                    if exc is None:
                        self.sock = task.result()
                        return address
                    assert isinstance(exc, OSError)
                    errors.append(exc)
                    shown = describe(exc, host=address, port=self.endpoint.port, timeout=self.timeouts.connect,
                                     step="connect")
                    self.address_errors.append(f"{address}: {shown}")
        finally:
            for task in attempts:
                task.cancel()
            for task in attempts:
                with contextlib.suppress(BaseException):
                    (await task).close()
        refused = [exc for exc in errors if isinstance(exc, ConnectionRefusedError)]
        raise refused[0] if refused and len(refused) == len(errors) else errors[-1]

    async def _connect_one(self, family: int, address: str) -> socket.socket:
        # IPPROTO_TCP named: asyncio turns Nagle's algorithm off only for such a socket. With it on, a short
        # write waits for the ACK of the one before, which the server may delay by 40 ms.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(self.timeouts.connect):
                await asyncio.get_running_loop().sock_connect(sock, (address, self.endpoint.port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def attach(self, context: ssl.SSLContext | None) -> Wire:
        """Put the connected socket under a Wire: plain, or with the implicit TLS handshake (RFC 8314)."""
        assert self.sock is not None
        sock, self.sock = self.sock, None
        kwargs: dict[str, Any] = {}
        if context is not None:
            kwargs = {"ssl": context, "server_hostname": self.endpoint.host,
                      "ssl_handshake_timeout": self.timeouts.command}
        try:
            _, self.wire = await asyncio.get_running_loop().create_connection(Wire, sock=sock, **kwargs)
        except BaseException:
            sock.close()
            raise
        return self.wire

    async def handshake(self) -> str:
        """Implicit TLS on the fresh connection, or STARTTLS's upgrade; the session's TLS details."""
        assert self.tls_context is not None
        if self.wire is None:
            await self.attach(self.tls_context)
        else:
            await self.wire.start_tls(self.tls_context, self.endpoint.host, self.timeouts.command)
        assert self.wire is not None
        tls = self.wire.tls
        assert tls is not None
        self.tls_version = tls.version()
        cipher = tls.cipher()
        detail = f"{self.tls_version}, {cipher[0] if cipher else 'unknown cipher'}"
        not_after = (tls.getpeercert() or {}).get("notAfter")  # empty when verification is off
        if isinstance(not_after, str):
            self.cert_not_after = ssl.cert_time_to_seconds(not_after)
            days = int((self.cert_not_after - time.time()) // 86400)
            day = datetime.fromtimestamp(self.cert_not_after, UTC).date().isoformat()
            detail += f", certificate valid until {day} ({days} days left)"
        elif not self.relay.verify:
            detail += ", certificate NOT verified (verification is turned off)"
        return detail

    async def ehlo(self) -> str:
        reply = await self.expect(Phase.EHLO, b"EHLO " + self.helo_name.encode(), (250,))
        self.ehlo_lines = [line.strip() for line in reply.text.split("\n")[1:] if line.strip()]
        self.extensions = {}
        for line in self.ehlo_lines:
            keyword, _, params = line.partition(" ")
            if "=" in keyword:  # the pre-standard "AUTH=LOGIN PLAIN" form
                keyword, _, first = keyword.partition("=")
                params = f"{first} {params}"
            self.extensions.setdefault(keyword.upper(), params.strip())
        return "offers " + (", ".join(self.ehlo_lines) or "no extensions")

    async def starttls(self) -> str:
        if "STARTTLS" not in self.extensions:
            # RFC 3207 §4: STARTTLS is required here; nothing more is sent in plain text.
            offered = ", ".join(self.ehlo_lines) or "no extensions"
            raise SetupFailed(Verdict(Outcome.RELAY_FAULT, Cause.STARTTLS_UNAVAILABLE), Phase.STARTTLS,
                              f"the server does not offer STARTTLS (offers: {offered})")
        return str(await self.expect(Phase.STARTTLS, b"STARTTLS", (220,)))

    async def login(self) -> str:
        assert self.wire is not None and self.relay.username is not None and self.relay.password is not None
        wire, timeout = self.wire, self.timeouts.command
        mechanism, reply = await authenticate(lambda line: wire.command(line, timeout),
                                              offered_mechanisms(self.extensions), self.relay.username,
                                              self.relay.password.reveal(), encrypted=wire.tls is not None)
        return f"{mechanism} accepted: {reply}"

    async def fetch_token(self) -> AccessToken:
        assert self.tokens is not None
        token = await self.tokens.token()
        self.secrets += self.tokens.secrets()
        return token

    async def login_bearer(self, token: AccessToken) -> str:
        """XOAUTH2 or OAUTHBEARER; a cached token the server calls bad is replaced once, on this connection."""
        assert self.wire is not None and self.relay.username is not None and self.tokens is not None
        try:
            mechanism, reply = await self.bearer(token)
        except AuthRefused as exc:
            if token.fetched or not token_rejected(exc):
                raise
            self.tokens.invalidate(token)
            mechanism, reply = await self.bearer(await self.fetch_token())
            return f"{mechanism} accepted with a new token (the server refused the cached one: {exc.reply.code})"
        return f"{mechanism} accepted: {reply}"

    async def bearer(self, token: AccessToken) -> tuple[str, Reply]:
        assert self.wire is not None and self.relay.username is not None
        wire, timeout, endpoint = self.wire, self.timeouts.command, self.endpoint
        value = token.value.reveal()
        self.secrets += bearer_secret_forms(self.relay.auth, self.relay.username, value, host=endpoint.host,
                                            port=endpoint.port)
        return await authenticate_bearer(lambda line: wire.command(line, timeout), offered_mechanisms(self.extensions),
                                         self.relay.auth, self.relay.username, value, host=endpoint.host,
                                         port=endpoint.port)

    async def reach(self) -> str:
        """DNS, connect and, for implicit TLS and HTTPS, the TLS handshake; the address connected to."""
        endpoint, timeouts = self.endpoint, self.timeouts
        literal = literal_address(endpoint.host)
        # An IP address needs no lookup: no "dns" step (getaddrinfo would cost a thread hand-off).
        found = [literal] if literal is not None else await self.step(
            "dns", Phase.DNS, timeouts.connect, self.addresses,
            lambda addresses: ", ".join(address for _, address in addresses))
        # Each address has its own connect deadline; the step's also covers the staggered starts.
        connect_deadline = timeouts.connect + CONNECT_STAGGER_S * (len(found) - 1) + 0.05
        address = await self.step("connect", Phase.CONNECT, connect_deadline, lambda: self.connect(found),
                                  lambda ip: f"connected to {ip}:{endpoint.port}", said_timeout=timeouts.connect)
        if endpoint.tls in (TlsMode.IMPLICIT, TlsMode.HTTPS):
            await self.step("tls", Phase.TLS, timeouts.command, self.handshake, str)
        else:
            await self.attach(None)
        return address

    async def run(self) -> Connection:
        endpoint, timeouts = self.endpoint, self.timeouts
        address = await self.reach()
        await self.step("banner", Phase.GREETING, timeouts.command,
                        lambda: self.expect(Phase.GREETING, None, (220,)), str)
        await self.step("ehlo", Phase.EHLO, timeouts.command, self.ehlo, str)
        if endpoint.tls is TlsMode.STARTTLS:
            await self.step("starttls", Phase.STARTTLS, timeouts.command, self.starttls, str)
            await self.step("tls", Phase.TLS, timeouts.command, self.handshake, str)
            await self.step("ehlo_tls", Phase.EHLO, timeouts.command, self.ehlo, str)  # RFC 3207 §4.2
        if self.tokens is not None:
            load_http_client(self.tokens.config)
            # The provider keeps its own deadline (connect + command) and says what timed out; this one is a backstop.
            token = await self.step("token", Phase.TOKEN, timeouts.connect + timeouts.command + 1.0, self.fetch_token,
                                    lambda token: token.detail)
            # A refused cached token costs a second fetch and exchange: the deadline allows both.
            await self.step("auth", Phase.AUTH, 2 * (timeouts.connect + 2 * timeouts.command),
                            lambda: self.login_bearer(token), str)
        elif self.relay.username is not None and self.relay.password is not None:
            # LOGIN takes three round trips: the step's deadline allows each its own.
            await self.step("auth", Phase.AUTH, 3 * timeouts.command, self.login, str)
        assert self.wire is not None
        return Connection(self.wire, address, self.extensions, self.ehlo_lines, self.tls_version,
                          self.cert_not_after)


def literal_address(host: str) -> tuple[int, str] | None:
    """(address family, address) when `host` is an IPv4 or IPv6 address rather than a name, else None."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (socket.AF_INET6 if address.version == 6 else socket.AF_INET), host


async def open_session(relay: RelayConfig, endpoint: Endpoint, *, timeouts: Timeouts, helo_name: str,
                       tls_context: ssl.SSLContext | None, resolve: Resolver | None = None,
                       on_step: StepSink | None = None, secrets: tuple[str, ...] = (),
                       tokens: Tokens | None = None) -> Connection:
    """Open an SMTP session to `endpoint`, ready for MAIL FROM; SetupFailed says where and why not.

    `tokens`: the process's OAuth2 token providers, so sessions share cached tokens (a relay with
    auth=xoauth2 or oauthbearer gets a private provider without)."""
    if endpoint.tls is not TlsMode.NONE and tls_context is None:
        raise ValueError("a TLS endpoint needs a TLS context")
    setup = _Setup(relay, endpoint, timeouts, helo_name, tls_context, resolve, on_step, secrets,
                   token_provider(relay, tokens, timeouts))
    try:
        async with asyncio.timeout(timeouts.total):
            return await setup.run()
    except BaseException as exc:
        if setup.sock is not None:
            setup.sock.close()
        if setup.wire is not None:
            setup.wire.abort()
        if isinstance(exc, TimeoutError):  # the whole set-up outlived its deadline (slow steps added up)
            raise SetupFailed(classify_exception(setup.phase, exc), setup.phase,
                              f"the session set-up took longer than {timeouts.total:g}s") from None
        raise


async def reach_tls(relay: RelayConfig, endpoint: Endpoint, *, timeouts: Timeouts, tls_context: ssl.SSLContext,
                    resolve: Resolver | None = None, on_step: StepSink | None = None) -> Connection:
    """DNS, connect and TLS to an HTTPS endpoint, timed as a session's set-up; then the connection is dropped
    (the probe of an HTTPS API relay: its API call goes through the relay's own HTTP client)."""
    setup = _Setup(relay, endpoint, timeouts, "", tls_context, resolve, on_step, (), None)
    try:
        async with asyncio.timeout(timeouts.total):
            address = await setup.reach()
    except TimeoutError:
        raise SetupFailed(classify_exception(setup.phase, TimeoutError()), setup.phase,
                          f"reaching {endpoint} took longer than {timeouts.total:g}s") from None
    finally:
        if setup.sock is not None:
            setup.sock.close()
        if setup.wire is not None:
            setup.wire.abort()
    assert setup.wire is not None
    return Connection(setup.wire, address, tls_version=setup.tls_version, cert_not_after=setup.cert_not_after)


async def quit_session(wire: Wire, timeout: float = QUIT_TIMEOUT_S) -> Reply | None:
    """QUIT under a short deadline, then drop the connection; the reply, or None. Never raises.

    After the 221 the server closes too (RFC 5321 §4.1.1.10): there is nothing to wait for, not
    even a TLS close_notify round trip that a broken server could stall.
    """
    try:
        if wire.closed:
            return None
        return await wire.command(b"QUIT", timeout)
    except Exception:  # noqa: BLE001 - the connection is going away either way
        return None
    finally:
        wire.abort()
