"""Reachability probe of one relay endpoint, step by step over raw asyncio streams.

Each step (DNS, TCP connect, banner, EHLO, STARTTLS or implicit TLS, AUTH, QUIT, and the
optional test message) runs under its own deadline and is timed, so a report says exactly
where a session stops and how long each part took. Failures are named by outcome.py's
classifier. Nothing is sent unless a test recipient is given; the password never appears in
a report: AUTH replies are scrubbed of it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate, make_msgid
from typing import Any, TypeVar

from mailwatchd.config import Settings
from mailwatchd.diagnosis import hint_for
from mailwatchd.outcome import Cause, Phase, classify_exception, classify_reply
from mailwatchd.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.tlsconfig import client_context

Resolver = Callable[[str, int], Awaitable[Sequence[tuple[Any, ...]]]]

MAX_DETAIL = 300
MAX_REPLY_LINES = 100
QUIT_TIMEOUT = 2.0
_REPLY_LINE = re.compile(r"^(\d{3})([ -]|$)(.*)$")
_T = TypeVar("_T")


@dataclass(frozen=True)
class StepResult:
    """One timed step of a probe."""

    name: str
    ok: bool
    ms: float
    detail: str = ""


@dataclass
class ProbeReport:
    """What a probe of one endpoint found. `alternatives` is filled in by `mailwatchd check`."""

    relay: str
    host: str
    port: int
    tls: TlsMode
    ok: bool
    cause: Cause
    detail: str
    hint: str
    timings_ms: dict[str, float]
    steps: list[StepResult]
    extensions: list[str]
    cert_days_left: int | None
    tls_version: str | None
    checked_at: datetime
    alternatives: list[ProbeReport] = field(default_factory=list)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port, self.tls)

    @property
    def answered_ms(self) -> float:
        """Time from the start of the TCP connect to the server's greeting."""
        return round(sum(self.timings_ms.get(step, 0.0) for step in ("connect", "tls", "banner")), 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "relay": self.relay, "host": self.host, "port": self.port, "tls": self.tls.value,
            "ok": self.ok, "cause": self.cause.value, "detail": self.detail, "hint": self.hint,
            "timings_ms": dict(self.timings_ms),
            "steps": [{"name": s.name, "ok": s.ok, "ms": s.ms, "detail": s.detail} for s in self.steps],
            "extensions": list(self.extensions), "cert_days_left": self.cert_days_left,
            "tls_version": self.tls_version, "checked_at": self.checked_at.isoformat(),
            "alternatives": [alt.to_json() for alt in self.alternatives],
        }


class _Failed(Exception):
    """A step ended the probe: its cause code and a one-line description."""

    def __init__(self, cause: Cause, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


def one_line(text: str, limit: int = MAX_DETAIL) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _said(reply: tuple[int, str]) -> str:
    return f"{reply[0]} {reply[1]}"


def is_plain_address(address: str) -> bool:
    """An address safe to put in MAIL FROM / RCPT TO as it is: no spaces, brackets or controls."""
    return "@" in address and not any(ch.isspace() or ch in "<>" or ord(ch) < 32 for ch in address)


class _Probe:
    def __init__(self, relay: RelayConfig, endpoint: Endpoint, settings: Settings, resolve: Resolver | None) -> None:
        self.relay = relay
        self.endpoint = endpoint
        self.settings = settings
        self.resolve = resolve
        self.steps: list[StepResult] = []
        self.extensions: list[str] = []
        self.cert_days_left: int | None = None
        self.tls_version: str | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.tls_context: ssl.SSLContext | None = None
        self.address_errors: list[str] = []  # addresses that failed before the last one was tried
        self._secrets: list[str] = []
        if relay.password is not None:
            password = relay.password.reveal()
            self._secrets = [password, base64.b64encode(password.encode()).decode()]
            if relay.username is not None:
                plain = f"\0{relay.username}\0{password}".encode()
                self._secrets.append(base64.b64encode(plain).decode())

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return one_line(text)

    async def step(self, name: str, phase: Phase, timeout: float, action: Callable[[], Awaitable[_T]],
                   describe: Callable[[_T], str] = lambda _: "") -> _T:
        """Run one step under its deadline; record it; turn any failure into _Failed."""
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                value = await action()
        except _Failed as failed:
            self._record(name, False, start, failed.detail)
            raise
        except (OSError, EOFError, ValueError) as exc:  # OSError: also TimeoutError and ssl.SSLError
            detail = _describe(phase, exc, timeout, self.endpoint)
            if phase is Phase.CONNECT and self.address_errors and isinstance(exc, TimeoutError):
                detail += f"; before that {'; '.join(self.address_errors)}"
            detail = self.scrub(detail)
            self._record(name, False, start, detail)
            raise _Failed(classify_exception(phase, exc).cause, detail) from None
        self._record(name, True, start, describe(value))
        return value

    def _record(self, name: str, ok: bool, start: float, detail: str) -> None:
        ms = round((time.perf_counter() - start) * 1000, 1)
        self.steps.append(StepResult(name, ok, ms, self.scrub(detail)))

    # -- the wire ---------------------------------------------------------------------------------

    async def send(self, line: str) -> None:
        assert self.writer is not None
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()

    async def reply(self) -> tuple[int, str]:
        """One reply, possibly multi-line (RFC 5321 §4.2.1); its lines joined by newlines.

        Anything else raises ValueError, which the classifier calls a protocol error."""
        assert self.reader is not None
        lines: list[str] = []
        code = 0
        while True:
            raw = await self.reader.readline()
            if not raw.endswith(b"\n"):
                raise EOFError("the server closed the connection")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            match = _REPLY_LINE.match(line)
            if match is None or (lines and int(match.group(1)) != code):
                raise ValueError(f"{line[:80]!r} is not an SMTP reply line")
            code = int(match.group(1))
            lines.append(match.group(3))
            if match.group(2) != "-":
                return code, "\n".join(lines)
            if len(lines) >= MAX_REPLY_LINES:
                raise ValueError(f"a reply of more than {MAX_REPLY_LINES} lines")

    async def command(self, phase: Phase, line: str | None, expect: Sequence[int]) -> tuple[int, str]:
        """Send `line` (None: just read, for the greeting) and require a reply code in `expect`."""
        if line is not None:
            await self.send(line)
        code, text = await self.reply()
        if code not in expect:
            raise _Failed(classify_reply(phase, code, text).cause, self.scrub(f"{code} {text}"))
        return code, text

    # -- the steps --------------------------------------------------------------------------------

    async def resolve_addresses(self) -> list[tuple[int, str]]:
        resolve = self.resolve or asyncio.get_running_loop().getaddrinfo
        infos = await resolve(self.endpoint.host, self.endpoint.port)
        addresses: list[tuple[int, str]] = []
        for family, *_, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0]) not in addresses:
                addresses.append((family, str(sockaddr[0])))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "no IPv4 or IPv6 address")
        return addresses

    async def connect(self, addresses: list[tuple[int, str]]) -> str:
        """Try each address in turn; the connect deadline covers all of them together."""
        errors: list[OSError] = []
        for family, address in addresses:
            try:
                self.reader, self.writer = await asyncio.open_connection(address, self.endpoint.port, family=family)
            except OSError as exc:
                errors.append(exc)
                self.address_errors.append(f"{address}: {exc.strerror or exc}")
                continue
            return address
        refused = [exc for exc in errors if isinstance(exc, ConnectionRefusedError)]
        raise refused[0] if len(refused) == len(errors) else errors[-1]

    async def handshake(self) -> str:
        assert self.writer is not None
        assert self.tls_context is not None
        await self.writer.start_tls(self.tls_context, server_hostname=self.endpoint.host,
                                    ssl_handshake_timeout=self.settings.command_timeout)
        tls = self.writer.get_extra_info("ssl_object")
        assert isinstance(tls, ssl.SSLObject)
        self.tls_version = tls.version()
        cipher = tls.cipher()
        detail = f"{self.tls_version}, {cipher[0] if cipher else 'unknown cipher'}"
        not_after = (tls.getpeercert() or {}).get("notAfter")  # empty when verification is off
        if isinstance(not_after, str):
            expires = ssl.cert_time_to_seconds(not_after)
            self.cert_days_left = int((expires - time.time()) // 86400)
            day = datetime.fromtimestamp(expires, UTC).date().isoformat()
            detail += f", certificate valid until {day} ({self.cert_days_left} days left)"
        elif not self.relay.verify:
            detail += ", certificate NOT verified (verification is turned off)"
        return detail

    async def ehlo(self) -> str:
        _, text = await self.command(Phase.EHLO, f"EHLO {self.settings.helo_name}", (250,))
        self.extensions = [line.strip() for line in text.split("\n")[1:] if line.strip()]
        return "offers " + (", ".join(self.extensions) or "no extensions")

    def offers(self, keyword: str) -> list[str] | None:
        """The parameters of an EHLO keyword, or None when it is not offered."""
        for extension in self.extensions:
            name, *params = extension.replace("=", " ").split()
            if name.upper() == keyword:
                return [param.upper() for param in params]
        return None

    async def starttls(self) -> str:
        if self.offers("STARTTLS") is None:
            raise _Failed(Cause.STARTTLS_UNAVAILABLE, "the server does not offer STARTTLS (offers: "
                          + (", ".join(self.extensions) or "no extensions") + ")")
        code, text = await self.command(Phase.STARTTLS, "STARTTLS", (220,))
        return f"{code} {text}"

    async def auth(self) -> str:
        assert self.relay.username is not None and self.relay.password is not None
        mechanisms = self.offers("AUTH")
        if mechanisms is None:
            raise _Failed(Cause.AUTH_UNAVAILABLE, "the server does not offer AUTH on this connection")
        user, password = self.relay.username, self.relay.password.reveal()
        if "PLAIN" in mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            code, text = await self.command(Phase.AUTH, f"AUTH PLAIN {token}", (235,))
            return f"PLAIN accepted: {code} {text}"
        if "LOGIN" in mechanisms:
            await self.command(Phase.AUTH, "AUTH LOGIN", (334,))
            await self.command(Phase.AUTH, base64.b64encode(user.encode()).decode(), (334,))
            code, text = await self.command(Phase.AUTH, base64.b64encode(password.encode()).decode(), (235,))
            return f"LOGIN accepted: {code} {text}"
        offered = " ".join(mechanisms) or "none"
        raise _Failed(Cause.AUTH_UNAVAILABLE, f"no AUTH mechanism mailwatchd supports (offered: {offered})")

    def sender(self) -> str:
        user = self.relay.username
        return user if user is not None and is_plain_address(user) else f"mailwatchd@{self.settings.helo_name}"

    async def data(self, sender: str, recipient: str) -> str:
        await self.command(Phase.DATA, "DATA", (354,))
        body = (
            f"From: {sender}\r\nTo: {recipient}\r\nSubject: mailwatchd test\r\n"
            f"Date: {formatdate(usegmt=True)}\r\nMessage-ID: {make_msgid(domain=self.settings.helo_name)}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"This is a test message from `mailwatchd check --send-test`, sent through relay "
            f"{' '.join(self.relay.name.split())} ({self.endpoint}).\r\n.\r\n"
        )
        assert self.writer is not None
        self.writer.write(body.encode("utf-8"))
        await self.writer.drain()
        code, text = await self.reply()
        if code != 250:
            raise _Failed(classify_reply(Phase.BODY, code, text).cause, self.scrub(f"{code} {text}"))
        return f"accepted: {code} {text}"

    async def close(self, polite: bool) -> None:
        """QUIT when the session went well, then drop the connection.

        After the 221 reply the server closes too (RFC 5321 §4.1.1.10), so there is nothing to
        wait for: no TLS close_notify round trip, which a broken server could stall.
        """
        if self.writer is None:
            return
        if polite:
            with contextlib.suppress(_Failed):  # the session already did what was asked of it
                await self.step("quit", Phase.LOCAL, QUIT_TIMEOUT,
                                lambda: self.command(Phase.LOCAL, "QUIT", (221,)), _said)
        self.writer.transport.abort()
        self.writer = None

    # -- the whole session --------------------------------------------------------------------------

    async def run(self, send_test_to: str | None) -> tuple[Cause, str]:
        settings, endpoint = self.settings, self.endpoint
        command_timeout = settings.command_timeout
        if endpoint.tls is not TlsMode.NONE:
            try:
                self.tls_context = client_context(self.relay)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise _Failed(Cause.LOCAL_ERROR, f"cannot load the TLS files: {exc}") from None
        addresses = await self.step("dns", Phase.DNS, settings.connect_timeout, self.resolve_addresses,
                                    lambda found: ", ".join(address for _, address in found))
        await self.step("connect", Phase.CONNECT, settings.connect_timeout,
                        lambda: self.connect(addresses), lambda ip: f"connected to {ip}:{endpoint.port}")
        if endpoint.tls is TlsMode.IMPLICIT:
            await self.step("tls", Phase.TLS, command_timeout, self.handshake, str)
        await self.step("banner", Phase.GREETING, command_timeout, lambda: self.command(Phase.GREETING, None, (220,)),
                        _said)
        await self.step("ehlo", Phase.EHLO, command_timeout, self.ehlo, str)
        if endpoint.tls is TlsMode.STARTTLS:
            await self.step("starttls", Phase.STARTTLS, command_timeout, self.starttls, str)
            await self.step("tls", Phase.TLS, command_timeout, self.handshake, str)
            await self.step("ehlo_tls", Phase.EHLO, command_timeout, self.ehlo, str)
        if self.relay.username is not None and self.relay.password is not None:
            await self.step("auth", Phase.AUTH, command_timeout, self.auth, str)
        result = f"{endpoint} works"
        if send_test_to is not None:
            sender = self.sender()
            await self.step("mail", Phase.MAIL, command_timeout,
                            lambda: self.command(Phase.MAIL, f"MAIL FROM:<{sender}>", (250,)), _said)
            await self.step("rcpt", Phase.RCPT, command_timeout,
                            lambda: self.command(Phase.RCPT, f"RCPT TO:<{send_test_to}>", (250, 251)), _said)
            result = await self.step("data", Phase.DATA, settings.transaction_timeout,
                                     lambda: self.data(sender, send_test_to), str)
            result = f"test message from {sender} to {send_test_to} {result}"
        return Cause.OK, self.scrub(result)


def _describe(phase: Phase, exc: BaseException, timeout: float, endpoint: Endpoint) -> str:
    """One line saying what went wrong, in the words an operator searches for."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message} (OpenSSL verify code {exc.verify_code})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {endpoint.host}: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        if phase is Phase.CONNECT:
            return f"no answer from {endpoint.host}:{endpoint.port} within {timeout:g}s (connect timed out)"
        if phase is Phase.DNS:
            return f"resolving {endpoint.host} took longer than {timeout:g}s"
        if phase is Phase.GREETING:
            return f"connected, but no complete greeting within {timeout:g}s"
        return f"no reply within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return f"{endpoint.host}:{endpoint.port} refused the connection (nothing listens there, or a firewall rejects)"
    if isinstance(exc, EOFError | ConnectionError):
        return f"the server closed the connection ({exc})" if str(exc) else "the server closed the connection"
    if isinstance(exc, ValueError):
        return f"malformed reply: {exc}"
    return f"{type(exc).__name__}: {exc}"


async def probe_endpoint(relay: RelayConfig, endpoint: Endpoint, settings: Settings, *,
                         resolve: Resolver | None = None, send_test_to: str | None = None) -> ProbeReport:
    """Probe one endpoint of `relay`; never raises for a network or protocol failure.

    `resolve(host, port)` defaults to the loop's getaddrinfo. With `send_test_to`, a small test
    message is sent after a successful session setup and the relay's reply reported.
    """
    if send_test_to is not None and not is_plain_address(send_test_to):
        raise ValueError(f"{send_test_to!r} is not an e-mail address")
    checked_at = datetime.now(UTC)
    probe = _Probe(relay, endpoint, settings, resolve)
    cause, detail = Cause.PROTOCOL_ERROR, "the probe was interrupted"
    try:
        cause, detail = await probe.run(send_test_to)
    except _Failed as failed:
        cause, detail = failed.cause, failed.detail
    finally:
        await probe.close(polite=cause is Cause.OK)
    return ProbeReport(
        relay=relay.name, host=endpoint.host, port=endpoint.port, tls=endpoint.tls, ok=cause is Cause.OK,
        cause=cause, detail=detail, hint=hint_for(cause, endpoint, detail, relay=relay),
        timings_ms={step.name: step.ms for step in probe.steps}, steps=probe.steps, extensions=probe.extensions,
        cert_days_left=probe.cert_days_left, tls_version=probe.tls_version, checked_at=checked_at)
