"""Reachability probe of one relay endpoint: open a session as delivery does, then QUIT.

The session is opened by smtpclient, the same code delivery uses, so a probe and a delivery
cannot disagree about a relay; every step is timed. With a test recipient, the probe sends a
small message through delivery's own transaction code (`mailwatchd check --send-test`).
The report says what happened (cause, detail, timings); what to do about it is diagnosis.py's.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from mailwatchd.errors import MalformedMessage
from mailwatchd.message.envelope import OutgoingMessage, check_address
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.transports.delivery import SmtpSession, session_timeouts
from mailwatchd.transports.outcome import Cause, DeliveryResult, Phase, classify_http
from mailwatchd.transports.smtpclient import (
    Resolver,
    SetupFailed,
    Step,
    open_session,
    quit_session,
    reach_tls,
    secret_forms,
)
from mailwatchd.transports.smtpwire import describe
from mailwatchd.transports.tlsconfig import client_context
from mailwatchd.transports.tokens import Tokens

# One TLS context serves every probe of a check that uses the same TLS files: building one loads
# the system CA store (about 30 ms of CPU, before any connect of the batch could start).
TlsKey = tuple[Path | None, Path | None, Path | None, bool]
TlsContexts = dict[TlsKey, ssl.SSLContext]


@dataclass
class ProbeReport:
    """What a probe of one endpoint found."""

    relay: str
    host: str
    port: int
    tls: TlsMode
    ok: bool
    cause: Cause
    detail: str
    steps: list[Step]
    extensions: list[str]
    cert_days_left: int | None
    tls_version: str | None
    checked_at: datetime

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port, self.tls)

    @property
    def timings_ms(self) -> dict[str, float]:
        return {step.name: step.ms for step in self.steps}

    @property
    def answered_ms(self) -> float:
        """Time from the start of the TCP connect to the server's greeting."""
        timings = self.timings_ms
        return round(sum(timings.get(step, 0.0) for step in ("connect", "tls", "banner")), 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "relay": self.relay, "host": self.host, "port": self.port, "tls": self.tls.value,
            "ok": self.ok, "cause": self.cause.value, "detail": self.detail,
            "timings_ms": self.timings_ms,
            "steps": [{"name": s.name, "ok": s.ok, "ms": s.ms, "detail": s.detail} for s in self.steps],
            "extensions": list(self.extensions), "cert_days_left": self.cert_days_left,
            "tls_version": self.tls_version, "checked_at": self.checked_at.isoformat(),
        }


@dataclass(frozen=True)
class SendTest:
    """What `check --send-test` sends: from whom, to whom."""

    sender: str
    recipient: str

    def __post_init__(self) -> None:
        for role, address in (("sender", self.sender), ("recipient", self.recipient)):
            try:
                check_address(address, role)
            except MalformedMessage:
                raise ValueError(f"{address!r} is not an e-mail address") from None

    def render(self, relay: RelayConfig, endpoint: Endpoint, helo_name: str) -> OutgoingMessage:
        data = (
            f"From: {self.sender}\r\nTo: {self.recipient}\r\nSubject: mailwatchd test\r\n"
            f"Date: {formatdate(usegmt=True)}\r\nMessage-ID: {make_msgid(domain=helo_name)}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"This is a test message from `mailwatchd check --send-test`, sent through relay "
            f"{' '.join(relay.name.split())} ({endpoint}).\r\n"
        ).encode()
        return OutgoingMessage("send-test", self.sender, (self.recipient,), data, len(data))


def tls_context(relay: RelayConfig, contexts: TlsContexts | None = None) -> ssl.SSLContext:
    """The client context for `relay`, shared through `contexts` with relays that use the same TLS files."""
    if contexts is None:
        return client_context(relay)
    key = (relay.cafile, relay.certfile, relay.keyfile, relay.verify)
    context = contexts.get(key)
    if context is None:
        context = contexts[key] = client_context(relay)
    return context


async def probe_endpoint(relay: RelayConfig, endpoint: Endpoint, settings: Settings, *,
                         resolve: Resolver | None = None, send_test: SendTest | None = None,
                         contexts: TlsContexts | None = None, tokens: Tokens | None = None) -> ProbeReport:
    """Probe one endpoint of `relay`; never raises for a network or protocol failure.

    `resolve(host, port)` defaults to the loop's getaddrinfo. `contexts`: TLS contexts to share
    between the probes of one check (see tls_context). `tokens`: the OAuth2 token providers to share
    with delivery (the daemon's) or between the probes of one check.
    """
    checked_at = datetime.now(UTC)
    steps: list[Step] = []
    secrets = secret_forms(relay)
    cause, detail = Cause.OK, f"{endpoint} works"
    extensions: list[str] = []
    cert_days_left: int | None = None
    tls_version: str | None = None
    try:
        context = tls_context(relay, contexts) if endpoint.tls is not TlsMode.NONE else None
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        cause, detail = Cause.LOCAL_ERROR, f"cannot load the TLS files: {describe(exc)}"
    else:
        if relay.api is not None:
            assert context is not None
            cause, detail, cert_days_left, tls_version = await _probe_api(relay, endpoint, settings, context, resolve,
                                                                          steps, send_test)
            return ProbeReport(relay=relay.name, host=endpoint.host, port=endpoint.port, tls=endpoint.tls,
                               ok=cause is Cause.OK, cause=cause, detail=detail, steps=steps, extensions=[],
                               cert_days_left=cert_days_left, tls_version=tls_version, checked_at=checked_at)
        try:
            connection = await open_session(relay, endpoint, timeouts=session_timeouts(settings),
                                            helo_name=settings.ehlo_name, tls_context=context, resolve=resolve,
                                            on_step=steps.append, secrets=secrets, tokens=tokens)
        except SetupFailed as failed:
            cause, detail = failed.verdict.cause, failed.detail
        else:
            extensions, cert_days_left, tls_version = (connection.ehlo_lines, connection.cert_days_left,
                                                       connection.tls_version)
            if send_test is not None:
                started = time.perf_counter()
                session = SmtpSession(relay, endpoint, settings, context)
                result = await session.send_on(connection, send_test.render(relay, endpoint, settings.ehlo_name))
                ok = result.cause is Cause.OK
                steps.append(Step("send", result.phase, ok, round((time.perf_counter() - started) * 1000, 1),
                                  result.summary))
                cause = result.cause
                said = f"{result.code} {result.detail}" if result.code is not None else result.detail
                detail = f"test message from {send_test.sender} to {send_test.recipient} accepted: {said}" if ok \
                    else said
            if cause is Cause.OK:
                started = time.perf_counter()
                reply = await quit_session(connection.wire)
                steps.append(Step("quit", Phase.LOCAL, reply is not None, round((time.perf_counter() - started)
                                                                                 * 1000, 1), str(reply or "")))
            else:
                connection.wire.abort()
    return ProbeReport(relay=relay.name, host=endpoint.host, port=endpoint.port, tls=endpoint.tls, ok=cause is Cause.OK,
                       cause=cause, detail=detail, steps=steps, extensions=extensions, cert_days_left=cert_days_left,
                       tls_version=tls_version, checked_at=checked_at)


async def _probe_api(relay: RelayConfig, endpoint: Endpoint, settings: Settings, context: ssl.SSLContext,
                     resolve: Resolver | None, steps: list[Step],
                     send_test: SendTest | None) -> tuple[Cause, str, int | None, str | None]:
    """An HTTPS API relay: DNS, connect and TLS as any session's set-up, then the provider's read-only
    authenticated call (no mail), or the test message with `send_test`."""
    from mailwatchd.transports.api.session import ApiSession

    try:
        reached = await reach_tls(relay, endpoint, timeouts=session_timeouts(settings), tls_context=context,
                                  resolve=resolve, on_step=steps.append)
    except SetupFailed as failed:
        return failed.verdict.cause, failed.detail, None, None
    session = ApiSession(relay, endpoint, settings, context)
    started = time.perf_counter()
    try:
        if send_test is not None:
            result = await session.deliver(send_test.render(relay, endpoint, settings.ehlo_name))
            ok = result.cause is Cause.OK
            steps.append(Step("send", result.phase, ok, _ms(started), result.summary))
            detail = (f"test message from {send_test.sender} to {send_test.recipient} accepted: {result.detail}"
                      if ok else result.summary)
            return result.cause, detail, reached.cert_days_left, reached.tls_version
        reply, reading = await session.probe()
    finally:
        await session.close()
    if isinstance(reply, DeliveryResult):
        steps.append(Step("api", reply.phase, False, _ms(started), reply.summary))
        return reply.cause, reply.summary, reached.cert_days_left, reached.tls_version
    assert reading is not None
    verdict = classify_http(reading.problem)
    ok = verdict.cause is Cause.OK
    said = f"HTTP {reply.status}: {reading.detail}" if reading.detail else f"HTTP {reply.status}"
    steps.append(Step("api", Phase.HTTP, ok, _ms(started), said))
    detail = f"{endpoint} works: {session.provider.name} {reading.detail}".rstrip() if ok else said
    return verdict.cause, detail, reached.cert_days_left, reached.tls_version


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
