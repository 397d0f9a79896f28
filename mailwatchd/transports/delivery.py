"""One SMTP connection to one relay endpoint, opened on demand and reused for consecutive messages.

Every failure becomes a DeliveryResult through outcome.py's classifier; `deliver` never raises
(except CancelledError). smtpclient opens the session (each step under its own deadline, the
whole set-up under MAILWATCHD_TRANSACTION_TIMEOUT); then each message transaction runs under
one total deadline that grows with the message's size, pipelined (RFC 2920) when the server
offers PIPELINING.

The body is written as the server reads it: an upload is cut off when the server reads nothing
for EMAIL_TIMEOUT, or when the whole transaction outlives its deadline, never because a large
message takes longer than one command timeout. The reply after the final dot may take the
10 minutes RFC 5321 §4.5.3.2.6 allows, within that deadline.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mailwatchd.errors import MalformedMessage
from mailwatchd.message.envelope import OutgoingMessage, check_address
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.transports.outcome import (
    Cause,
    DeliveryResult,
    Outcome,
    Phase,
    RefusedRecipient,
    Verdict,
    classify_exception,
    classify_reply,
)
from mailwatchd.transports.smtpclient import (
    QUIT_TIMEOUT_S,
    Connection,
    Resolver,
    SetupFailed,
    Step,
    StepSink,
    Timeouts,
    open_session,
    quit_session,
    secret_forms,
)
from mailwatchd.transports.smtpwire import Disconnected, MalformedReply, Reply, Wire, describe, scrub, wire_body
from mailwatchd.transports.tlsconfig import client_context
from mailwatchd.transports.tokens import Tokens

_T = TypeVar("_T")

UPLOAD_FLOOR_BYTES_PER_S = 16 * 1024  # a transaction may take as long as the body needs at this rate
FINAL_REPLY_TIMEOUT_S = 600.0  # RFC 5321 §4.5.3.2.6: "DATA Termination: 10 minutes"
_DELIVERED = Verdict(Outcome.DELIVERED, Cause.OK)


def transaction_deadline(settings: Settings, size: int) -> float:
    """Seconds one message transaction may take: MAILWATCHD_TRANSACTION_TIMEOUT, more for a large body."""
    return max(settings.transaction_timeout, size / UPLOAD_FLOOR_BYTES_PER_S)


def attempt_bound(settings: Settings, size: int) -> float:
    """The longest one `deliver` call can take: a dead reused connection, a fresh set-up, one transaction."""
    return settings.command_timeout + settings.transaction_timeout + transaction_deadline(settings, size)


def session_timeouts(settings: Settings) -> Timeouts:
    return Timeouts(connect=settings.connect_timeout, command=settings.command_timeout,
                    total=settings.transaction_timeout)


class _Retry(Exception):
    """A reused connection turned out dead at MAIL FROM, before any reply."""


class _Fail(Exception):
    """A finished failure inside the session code: carries the result to return."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.cause.value)
        self.result = result


class SmtpSession:
    """One SMTP connection to one endpoint of one relay; deliver() reuses it between messages."""

    def __init__(self, relay: RelayConfig, endpoint: Endpoint, settings: Settings,
                 tls_context: ssl.SSLContext | None = None, *, resolve: Resolver | None = None,
                 on_step: StepSink | None = None, tokens: Tokens | None = None) -> None:
        self.relay = relay
        self._tokens = tokens
        self.endpoint = endpoint
        self._settings = settings
        self._timeout = settings.command_timeout
        self._endpoint_text = str(endpoint)
        self._tls_context = tls_context
        self._resolve = resolve
        self._on_step = on_step
        self._wire: Wire | None = None
        self._greeted = False
        self._extensions: dict[str, str] = {}
        self._phase = Phase.CONNECT
        self._last_used = time.monotonic()
        self._secrets = secret_forms(relay)

    @property
    def connected(self) -> bool:
        """True while a connection is open (as far as this side knows)."""
        return self._wire is not None and not self._wire.closed

    @property
    def idle_for(self) -> float:
        """Seconds since the session was last used (monotonic)."""
        return time.monotonic() - self._last_used

    @property
    def greeted(self) -> bool:
        """True once the server of the connection being opened (or open) sent its greeting."""
        return self._greeted

    @property
    def pipelining(self) -> bool:
        """True when the open connection's server offers RFC 2920 PIPELINING."""
        return "PIPELINING" in self._extensions

    def bound(self, message: OutgoingMessage) -> float:
        """The longest `deliver(message)` can take."""
        return attempt_bound(self._settings, message.size)

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult:
        """Send one message; every failure is a DeliveryResult, never an exception."""
        async def send() -> DeliveryResult:
            wire = self._wire
            reused = wire is not None and not wire.closed and not wire.pending
            if not reused:
                await self._ensure_open()
            try:
                return await self._transaction(message, reused)
            except _Retry:
                # The server dropped the idle connection before answering MAIL: once, afresh.
                self._abort()
                await self._open()
                return await self._transaction(message, False)
        return await self._guarded(send)

    async def open(self) -> DeliveryResult | None:
        """Open the connection unless one is open, before a message is handed to it (a worker races
        the openings of several endpoints): None when ready for MAIL FROM, else the failure."""
        async def ready() -> None:
            await self._ensure_open()
        return await self._guarded(ready)

    async def _ensure_open(self) -> bool:
        """Open the connection unless a usable one is; True when it was already open (reused)."""
        wire = self._wire
        if wire is not None and (wire.closed or wire.pending):
            self._abort()  # closed while idle, or a reply nobody asked for: start afresh
        reused = self._wire is not None
        if not reused:
            await self._open()
        return reused

    async def _guarded(self, work: Callable[[], Awaitable[_T]]) -> _T | DeliveryResult:
        """Run `work`; a failure becomes its DeliveryResult (the promise is "never raises")."""
        try:
            return await work()
        except _Fail as fail:
            return fail.result
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception as exc:  # a last guard
            self._abort()
            return self._from_exception(self._phase, exc)
        finally:
            self._last_used = time.monotonic()

    async def close(self) -> None:
        """QUIT under a short deadline, then drop the connection; never raises."""
        wire, self._wire = self._wire, None
        if wire is not None:
            await quit_session(wire, min(QUIT_TIMEOUT_S, self._timeout))

    def _abort(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.abort()

    def _stepped(self, step: Step) -> None:
        if step.name == "banner" and step.ok:
            self._greeted = True
        if self._on_step is not None:
            self._on_step(step)

    async def _open(self) -> None:
        self._phase = Phase.CONNECT
        self._greeted = False
        if self._tls_context is None and self.endpoint.tls is not TlsMode.NONE:
            try:
                self._tls_context = client_context(self.relay)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self._phase = Phase.TLS
                raise _Fail(self._result(Verdict(Outcome.RELAY_FAULT, Cause.LOCAL_ERROR),
                                         detail=f"cannot load the TLS files: {describe(exc)}")) from None
        try:
            connection = await open_session(self.relay, self.endpoint, timeouts=session_timeouts(self._settings),
                                            helo_name=self._settings.ehlo_name, tls_context=self._tls_context,
                                            resolve=self._resolve, on_step=self._stepped, secrets=self._secrets,
                                            tokens=self._tokens)
        except SetupFailed as failed:
            self._phase = failed.phase
            raise _Fail(self._result(failed.verdict, code=failed.code, detail=failed.detail)) from None
        self._wire = connection.wire
        self._extensions = connection.extensions

    async def send_on(self, connection: Connection, message: OutgoingMessage) -> DeliveryResult:
        """Send one message on a session open_session just opened (`check --send-test`)."""
        self._wire, self._extensions = connection.wire, connection.extensions
        try:
            return await self._transaction(message, False)
        except _Fail as fail:
            return fail.result
        finally:
            self._last_used = time.monotonic()

    # One message: MAIL FROM .. the reply after the final dot.

    async def _transaction(self, message: OutgoingMessage, reused: bool) -> DeliveryResult:
        wire = self._wire
        assert wire is not None
        self._phase = Phase.MAIL
        deadline = transaction_deadline(self._settings, message.size)
        # The wire keeps the deadline over every wait of the transaction (no timeout scope per message):
        # between those waits nothing blocks.
        wire.until = wire.loop_time() + deadline
        try:
            return await self._send(wire, message, reused)
        except (_Retry, _Fail):
            raise
        except Exception as exc:
            self._abort()
            if isinstance(exc, TimeoutError) and wire.past_until:
                return self._result(classify_exception(self._phase, exc),
                                    detail=f"the transaction took longer than its deadline of {deadline:g}s")
            return self._from_exception(self._phase, exc)
        finally:
            wire.until = None

    async def _send(self, wire: Wire, message: OutgoingMessage, reused: bool) -> DeliveryResult:
        mail, encoding = self._mail_command(message)
        rcpts = [b"RCPT TO:<" + address.encode(encoding) + b">\r\n" for address in message.recipients]
        pipelined = self.pipelining
        timeout = self._timeout
        # RFC 2920 §3.1: DATA may close a pipelined group; its 354 (or refusal) comes last.
        wire.write(b"".join((mail, *rcpts, b"DATA\r\n")) if pipelined else mail)
        try:
            reply = await wire.read(timeout)
        except Disconnected:
            if reused:
                raise _Retry() from None
            raise
        if reply.code == 421 and reused:
            raise _Retry()  # most likely the server's idle timeout, announced as it closed
        rcpt_replies: list[Reply] = []
        data_reply: Reply | None = None
        if pipelined:
            try:
                self._phase = Phase.RCPT
                rcpt_replies = [await wire.read(timeout) for _ in rcpts]
                self._phase = Phase.DATA
                data_reply = await wire.read(timeout)
            except (MalformedReply, TimeoutError, ConnectionError):
                if reply.code == 250:
                    raise
                self._abort()  # the refusal of MAIL stands; the server went away after it
        # A pipelining server that answered DATA with 354 waits for a message we may not send now.
        in_data = data_reply is not None and data_reply.code == 354
        if reply.code != 250:
            return await self._refused(Phase.MAIL, reply, in_data=in_data)

        self._phase = Phase.RCPT
        accepted: list[str] = []
        refused: list[RefusedRecipient] = []
        for index, recipient in enumerate(message.recipients):
            if pipelined:
                reply = rcpt_replies[index]
            else:
                wire.write(rcpts[index])
                reply = await wire.read(timeout)
            if 200 <= reply.code < 400:  # what classify_reply says of any phase's 2xx and 3xx
                accepted.append(recipient)
                continue
            verdict = classify_reply(Phase.RCPT, reply.code, reply.text)
            if verdict.outcome is Outcome.DELIVERED:
                accepted.append(recipient)
            elif verdict.outcome is Outcome.RELAY_FAULT or verdict.cause is Cause.SERVER_BUSY:
                # Over quota, or the server is closing: nothing more goes on this connection.
                return await self._refused(Phase.RCPT, reply, in_data=in_data)
            else:
                refused.append(RefusedRecipient(recipient, reply.code, scrub(reply.text, ()), verdict.outcome))
        if not accepted:
            worst = min(refused, key=lambda item: item.outcome is not Outcome.TEMPORARY)
            return await self._refused(Phase.RCPT, Reply(worst.code, worst.reply), tuple(refused), in_data=in_data)

        self._phase = Phase.DATA
        if not pipelined:
            wire.write(b"DATA\r\n")
            data_reply = await wire.read(timeout)
        assert data_reply is not None
        if data_reply.code != 354:
            return await self._refused(Phase.DATA, data_reply, tuple(refused))
        self._phase = Phase.BODY
        await wire.send_body(wire_body(message.data), stall_timeout=timeout)
        # Bytes the socket took may still sit in kernel buffers: the server's own allowance applies,
        # capped by this transaction's deadline.
        reply = await wire.read(FINAL_REPLY_TIMEOUT_S)
        if reply.code != 250:
            return await self._refused(Phase.BODY, reply, tuple(refused))
        return self._result(_DELIVERED, code=reply.code, detail=reply.text, refused=tuple(refused))

    def _mail_command(self, message: OutgoingMessage) -> tuple[bytes, str]:
        """MAIL FROM with SIZE / BODY / SMTPUTF8 as needed, and the encoding for the addresses."""
        extensions = self._extensions
        addresses = (message.sender, *message.recipients)
        ascii_only = True
        try:
            # The spool's own rule once more, at the wire: nothing that could inject a command (RFC 5321 §4.1.2).
            for address in addresses:
                if address:
                    check_address(address, "an")
                    ascii_only = ascii_only and address.isascii()
        except MalformedMessage as exc:
            raise _Fail(self._result(Verdict(Outcome.PERMANENT, Cause.MESSAGE_REJECTED), detail=str(exc))) from None
        encoding = "ascii"
        if not ascii_only:
            if "SMTPUTF8" not in extensions:
                raise _Fail(self._result(Verdict(Outcome.PERMANENT, Cause.MESSAGE_REJECTED),
                                         detail="an address is not ASCII and the server does not offer SMTPUTF8"))
            encoding = "utf-8"
        command = b"MAIL FROM:<" + message.sender.encode(encoding) + b">"
        if "SIZE" in extensions:
            command += b" SIZE=%d" % len(message.data)  # RFC 1870
        if "8BITMIME" in extensions and not message.data.isascii():
            command += b" BODY=8BITMIME"  # RFC 6152
        if encoding != "ascii":
            command += b" SMTPUTF8"  # RFC 6531
        return command + b"\r\n", encoding

    async def _refused(self, phase: Phase, reply: Reply, refused: tuple[RefusedRecipient, ...] = (),
                       *, in_data: bool = False) -> DeliveryResult:
        """A reply that ends the attempt: keep the connection after a clean PERMANENT, else drop it."""
        self._phase = phase
        if in_data:
            self._abort()  # the server takes whatever comes next as message text: no clean way back
        verdict = classify_reply(phase, reply.code, reply.text)
        if verdict.outcome is Outcome.PERMANENT and phase is not Phase.BODY:
            await self._rset()
        elif verdict.outcome is not Outcome.PERMANENT:
            self._abort()
        return self._result(verdict, code=reply.code, detail=reply.text, refused=refused)

    async def _rset(self) -> None:
        wire = self._wire
        if wire is None:
            return
        try:
            reply = await wire.command(b"RSET", self._timeout)
        except (MalformedReply, TimeoutError, ConnectionError):
            self._abort()
            return
        if reply.code != 250:
            self._abort()

    # Results.

    def _result(self, verdict: Verdict, *, code: int | None = None, detail: str = "",
                refused: tuple[RefusedRecipient, ...] = ()) -> DeliveryResult:
        return DeliveryResult(verdict.outcome, verdict.cause, self._phase, code if code and code > 0 else None,
                              scrub(detail, self._secrets), self.relay.name, self._endpoint_text, refused)

    def _from_exception(self, phase: Phase, exc: BaseException) -> DeliveryResult:
        self._phase = phase
        timeout = FINAL_REPLY_TIMEOUT_S if phase is Phase.BODY else self._timeout
        detail = describe(exc, host=self.endpoint.host, port=self.endpoint.port, timeout=timeout)
        return self._result(classify_exception(phase, exc), detail=detail)
