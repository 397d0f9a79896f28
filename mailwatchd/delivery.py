"""One SMTP connection to one relay endpoint, opened on demand and reused for consecutive messages.

Every failure becomes a DeliveryResult through outcome.py's classifier; `deliver` never raises
(except CancelledError). The session setup and each message transaction each run under one
total deadline, so a server that never answers, or drips a byte a second, cannot stall it.
aiosmtplib opens the session; smtpwire.Wire then carries the transactions, pipelined (RFC 2920)
when the server offers PIPELINING.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
import time

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException, SMTPServerDisconnected

from mailwatchd.config import Settings
from mailwatchd.envelope import OutgoingMessage
from mailwatchd.outcome import (
    Cause,
    DeliveryResult,
    Outcome,
    Phase,
    RefusedRecipient,
    Verdict,
    classify_exception,
    classify_reply,
    is_quota_reply,
)
from mailwatchd.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.smtpwire import Reply, Wire, describe, one_line, root_cause, wire_body
from mailwatchd.tlsconfig import client_context

QUIT_TIMEOUT = 2.0
_DELIVERED = Verdict(Outcome.DELIVERED, Cause.OK)
# What may not appear in an address put into MAIL FROM / RCPT TO (command injection, RFC 5321 §4.1.2).
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20<>\x7f]")


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
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.relay = relay
        self.endpoint = endpoint
        self._settings = settings
        self._timeout = settings.command_timeout
        self._endpoint_text = str(endpoint)
        self._tls_context = tls_context
        self._wire: Wire | None = None
        self._extensions: frozenset[str] = frozenset()
        self._phase = Phase.CONNECT
        self._last_used = time.monotonic()
        self._secrets = self._secret_forms(relay)

    @property
    def connected(self) -> bool:
        """True while a connection is open (as far as this side knows)."""
        return self._wire is not None and not self._wire.closed

    @property
    def idle_for(self) -> float:
        """Seconds since the session was last used (monotonic)."""
        return time.monotonic() - self._last_used

    @property
    def pipelining(self) -> bool:
        """True when the open connection's server offers RFC 2920 PIPELINING."""
        return "pipelining" in self._extensions

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult:
        """Send one message; every failure is a DeliveryResult, never an exception."""
        try:
            wire = self._wire
            if wire is not None and (wire.closed or wire.pending):
                self._abort()  # closed while idle, or a reply nobody asked for: start afresh
            reused = self._wire is not None
            if not reused:
                await self._open()
            try:
                return await self._transaction(message, reused)
            except _Retry:
                # The server dropped the idle connection before answering MAIL: once, afresh.
                self._abort()
                await self._open()
                return await self._transaction(message, False)
        except _Fail as fail:
            return fail.result
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception as exc:  # a last guard: the promise is "never raises"
            self._abort()
            return self._from_exception(self._phase, exc)
        finally:
            self._last_used = time.monotonic()

    async def close(self) -> None:
        """QUIT under a short deadline, then close the transport; never raises."""
        wire, self._wire = self._wire, None
        if wire is None:
            return
        try:
            if not wire.closed:
                wire.write(b"QUIT\r\n")
                await wire.read(min(QUIT_TIMEOUT, self._timeout))
        except Exception:  # noqa: S110 - the connection is going away either way
            pass
        finally:
            wire.close()

    def _abort(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.abort()

    # Session setup: DNS, TCP, greeting, EHLO, STARTTLS, EHLO, AUTH (aiosmtplib).

    async def _open(self) -> None:
        settings = self._settings
        mode = self.endpoint.tls
        smtp: aiosmtplib.SMTP | None = None
        try:
            async with asyncio.timeout(settings.transaction_timeout):
                context = self._context() if mode is not TlsMode.NONE else None
                sock = await self._connect_socket()
                smtp = aiosmtplib.SMTP(hostname=self.endpoint.host, sock=sock, local_hostname=settings.helo_name,
                                       timeout=self._timeout, use_tls=mode is TlsMode.IMPLICIT,
                                       start_tls=False, tls_context=context)
                self._phase = Phase.TLS if mode is TlsMode.IMPLICIT else Phase.GREETING
                try:
                    await smtp.connect()
                except (aiosmtplib.SMTPConnectTimeoutError, aiosmtplib.SMTPConnectResponseError):
                    self._phase = Phase.GREETING  # the TCP (and TLS) part had succeeded
                    raise
                except aiosmtplib.SMTPConnectError as exc:
                    if isinstance(exc.__cause__, SMTPServerDisconnected):
                        self._phase = Phase.GREETING
                    raise
                self._phase = Phase.EHLO
                await smtp.ehlo()
                if mode is TlsMode.STARTTLS:
                    await self._starttls(smtp)
                if self.relay.username is not None:
                    self._phase = Phase.AUTH
                    await self._login(smtp)
                transport = smtp.transport
                if transport is None or transport.is_closing():
                    raise SMTPServerDisconnected("connection lost")
                self._extensions = frozenset(smtp.esmtp_extensions)
                self._wire = Wire(transport)
        except BaseException as exc:
            if smtp is not None:
                smtp.close()
            if isinstance(exc, _Fail | asyncio.CancelledError) or not isinstance(exc, Exception):
                raise
            raise _Fail(self._from_exception(self._phase, exc)) from None

    def _context(self) -> ssl.SSLContext:
        if self._tls_context is None:
            self._phase = Phase.TLS
            try:
                self._tls_context = client_context(self.relay)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise _Fail(self._result(Verdict(Outcome.RELAY_FAULT, Cause.LOCAL_ERROR),
                                         detail=f"cannot load the TLS files: {describe(exc)}")) from None
        return self._tls_context

    async def _connect_socket(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        host, port = self.endpoint.host, self.endpoint.port
        timeout = self._settings.connect_timeout
        self._phase = Phase.DNS
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        self._phase = Phase.CONNECT
        error: Exception = OSError(f"no address for {host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(sock, address)
            except Exception as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise error

    async def _starttls(self, smtp: aiosmtplib.SMTP) -> None:
        self._phase = Phase.STARTTLS
        if not smtp.supports_extension("starttls"):
            # RFC 3207 §4: STARTTLS is required here; nothing more is sent in plain text.
            raise _Fail(self._result(Verdict(Outcome.RELAY_FAULT, Cause.STARTTLS_UNAVAILABLE),
                                     detail="the server does not offer STARTTLS"))
        try:
            await smtp.starttls()
        except (ssl.SSLError, aiosmtplib.SMTPTimeoutError, SMTPServerDisconnected) as exc:
            if isinstance(exc, ssl.SSLError) or "upgrading transport" in str(exc):
                self._phase = Phase.TLS  # the 220 came; the handshake failed
            raise
        self._phase = Phase.EHLO
        await smtp.ehlo()  # RFC 3207 §4.2: forget what was learnt before TLS

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        if not smtp.supports_extension("auth") or not smtp.supported_auth_methods:
            raise _Fail(self._result(Verdict(Outcome.RELAY_FAULT, Cause.AUTH_UNAVAILABLE),
                                     detail="the server offers no AUTH method we can use"))
        assert self.relay.username is not None
        password = self.relay.password.reveal() if self.relay.password is not None else ""
        try:
            await smtp.login(self.relay.username, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _Fail(self._result(classify_reply(Phase.AUTH, exc.code, exc.message), code=exc.code,
                                     detail=exc.message)) from None

    # One message: MAIL FROM .. the reply after the final dot.

    async def _transaction(self, message: OutgoingMessage, reused: bool) -> DeliveryResult:
        wire = self._wire
        assert wire is not None
        self._phase = Phase.MAIL
        try:
            async with asyncio.timeout(self._settings.transaction_timeout):
                return await self._send(wire, message, reused)
        except (_Retry, _Fail):
            raise
        except SMTPResponseException as exc:  # a malformed or oversized reply
            self._abort()
            return self._result(classify_reply(self._phase, exc.code, exc.message), detail=exc.message)
        except Exception as exc:
            self._abort()
            return self._from_exception(self._phase, exc)

    async def _send(self, wire: Wire, message: OutgoingMessage, reused: bool) -> DeliveryResult:
        mail, encoding = self._mail_command(message)
        rcpts = [b"RCPT TO:<" + address.encode(encoding) + b">\r\n" for address in message.recipients]
        pipelined = self.pipelining
        timeout = self._timeout
        # RFC 2920 §3.1: DATA may close a pipelined group; its 354 (or refusal) comes last.
        wire.write(b"".join((mail, *rcpts, b"DATA\r\n")) if pipelined else mail)
        try:
            reply = await wire.read(timeout)
        except SMTPServerDisconnected:
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
            except (SMTPException, TimeoutError, ConnectionError):
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
            if reply.code in (250, 251):
                accepted.append(recipient)
            elif reply.code == 421 or is_quota_reply(reply.text):
                # The server is closing, or the account is over quota: nothing goes on this connection.
                return await self._refused(Phase.RCPT, reply, in_data=in_data)
            else:
                refused.append(RefusedRecipient(recipient, reply.code, one_line(reply.text)))
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
        wire.write(wire_body(message.data))
        reply = await wire.read(timeout)
        if reply.code != 250:
            return await self._refused(Phase.BODY, reply, tuple(refused))
        return self._result(_DELIVERED, code=reply.code, detail=reply.text, refused=tuple(refused))

    def _mail_command(self, message: OutgoingMessage) -> tuple[bytes, str]:
        """MAIL FROM with SIZE / BODY / SMTPUTF8 as needed, and the encoding for the addresses."""
        extensions = self._extensions
        addresses = (message.sender, *message.recipients)
        if any(_UNSAFE_ADDRESS.search(address) for address in addresses):
            raise _Fail(self._result(Verdict(Outcome.PERMANENT, Cause.MESSAGE_REJECTED),
                                     detail="an address holds white space, a control character or <>"))
        encoding = "ascii"
        if not all(address.isascii() for address in addresses):
            if "smtputf8" not in extensions:
                raise _Fail(self._result(Verdict(Outcome.PERMANENT, Cause.MESSAGE_REJECTED),
                                         detail="an address is not ASCII and the server does not offer SMTPUTF8"))
            encoding = "utf-8"
        command = b"MAIL FROM:<" + message.sender.encode(encoding) + b">"
        if "size" in extensions:
            command += b" SIZE=%d" % len(message.data)  # RFC 1870
        if "8bitmime" in extensions and not message.data.isascii():
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
            wire.write(b"RSET\r\n")
            reply = await wire.read(self._timeout)
        except (SMTPException, TimeoutError, ConnectionError):
            self._abort()
            return
        if reply.code != 250:
            self._abort()

    # Results.

    @staticmethod
    def _secret_forms(relay: RelayConfig) -> tuple[str, ...]:
        if relay.password is None:
            return ()
        password = relay.password.reveal()
        user = relay.username or ""
        forms = [password, base64.b64encode(password.encode()).decode(),
                 base64.b64encode(f"\0{user}\0{password}".encode()).decode()]
        return tuple(form for form in forms if form)

    def _result(self, verdict: Verdict, *, code: int | None = None, detail: str = "",
                refused: tuple[RefusedRecipient, ...] = ()) -> DeliveryResult:
        detail = one_line(detail)
        for secret in self._secrets:
            if secret in detail:
                detail = detail.replace(secret, "***")
        return DeliveryResult(verdict.outcome, verdict.cause, self._phase, code if code and code > 0 else None,
                              detail, self.relay.name, self._endpoint_text, refused)

    def _from_exception(self, phase: Phase, exc: BaseException) -> DeliveryResult:
        self._phase = phase
        if isinstance(exc, SMTPResponseException):
            return self._result(classify_reply(phase, exc.code, exc.message), code=exc.code, detail=exc.message)
        cause = root_cause(exc)
        return self._result(classify_exception(phase, cause), detail=describe(cause))
