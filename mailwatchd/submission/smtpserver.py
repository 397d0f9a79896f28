"""The SMTP server session for local apps: ESMTP submission into the spool's new/ directory.

One implementation for every way in: the TCP listener, a Unix socket and `sendmail -bs`.
A message is answered 250 only after `submit.enqueue` stored it durably, the same rule as the
`sendmail` command. Never an open relay: a peer that is not local (loopback or a Unix socket)
must AUTH before MAIL, and AUTH is offered only over TLS or to the networks named for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import pwd
import queue
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any, AnyStr, Generic, TypeVar

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from mailwatchd.errors import MalformedMessage, SpoolFull
from mailwatchd.message import envelope
from mailwatchd.service.logs import get_logger
from mailwatchd.settings.listen import ListenSettings
from mailwatchd.submission.submit import enqueue

log = get_logger()

IDENT = "ESMTP mailwatchd"
NULL_PATH = "<>"  # what aiosmtpd gives for MAIL FROM:<>, the null reverse-path (RFC 5321 §4.5.5)
MAX_AUTH_ATTEMPTS = 3  # per connection; then 421 and the connection is closed
STORE_THREADS = 4  # sessions' spool writes (each blocks on fsync) that may run at once
SPARE_DELAY_S = 0.05  # after a connection: when the session for the next one is made, off its critical path
_NO_CALL_LIMIT = 2**31  # every other command: no limit of aiosmtpd's (the RCPT cap is ours)
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.:\[\]_-]")  # the client's text goes into a header field
_HELO_MAX = 255
# MAIL FROM/RCPT TO's usual `<dot-atom@dot-atom> params` (RFC 5321 §4.1.2), answered without the
# full RFC 5322 parser that aiosmtpd uses; anything else (quotes, comments, literals) still goes there.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_PLAIN_PATH = re.compile(rf"[ \t]*<({_DOT_ATOM}@{_DOT_ATOM})>(?![ \t]*[(])[ \t]*(.*)", re.DOTALL)
_DATA_END = b".\r\n"
DATA_LINE_LIMIT = 1001  # RFC 5321 §4.5.3.1.6: 1000 octets with the CRLF, and a dot added for transparency
READ_LIMIT = 64 * 1024
_CRLF = b"\r\n"

TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TIMED_OUT = "421 4.4.2 Timeout exceeded, closing the connection"
CLIENT_CLOSED = "421 4.4.2 Connection closed by the client before the end of a command"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_BIG = "552 5.3.4 Message too big"
NO_STORAGE = "452 4.3.1 Insufficient system storage"
# aiosmtpd's own texts for what RFC 5321/3463 name more precisely.
_REWORDED = {
    "552 Error: Too much mail data": TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG,
}


@dataclass(frozen=True)
class Peer:
    """Who is connected: a TCP peer's address, or a local user (Unix socket, sendmail -bs)."""

    address: str | None = None
    uid: int | None = None
    via: str | None = None  # how a local user came in, e.g. "sendmail -bs"


@dataclass(frozen=True)
class Queued:
    """A message this server stored, for the caller's log."""

    queue_id: str
    size: int
    peer: str
    sender: str
    recipients: int


class NotAMessage(MalformedMessage):
    """DATA did not carry an RFC 5322 message (the address checks are MalformedMessage itself)."""


class TooBig(Exception):
    """The stored form (Received and envelope fields added) would exceed the spool's size limit."""


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's ::ffff:127.0.0.1 is 127.0.0.1
    return ip


def is_local(peer: Peer) -> bool:
    """A local user, or a loopback address: may submit without AUTH."""
    if peer.uid is not None:
        return True
    ip = _ip(peer.address) if peer.address is not None else None
    return ip is not None and ip.is_loopback


def may_auth_in_clear(peer: Peer, listen: ListenSettings) -> bool:
    """AUTH without TLS only from the networks named in MAILWATCHD_LISTEN_ALLOW."""
    ip = _ip(peer.address) if peer.address is not None else None
    return ip is not None and any(ip in network for network in listen.plain_auth_networks)


def peer_of(transport: asyncio.BaseTransport, via: str | None) -> Peer:
    """The peer of a new connection; a Unix socket's by SO_PEERCRED (pid, uid, gid)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return Peer(via=via)  # no uid: not local, so AUTH is needed
        _, uid, _ = struct.unpack("3i", creds)
        return Peer(uid=uid, via=via)
    peername = transport.get_extra_info("peername")
    return Peer(address=str(peername[0])) if isinstance(peername, tuple) and peername else Peer()


def peer_label(peer: Peer) -> str:
    """The peer for a log line: `192.0.2.1` or `local user 1000`."""
    if peer.uid is not None:
        return f"local user {peer.uid}" + (f" via {peer.via}" if peer.via else "")
    return peer.address or "unknown"


def local_user(uid: int, via: str | None) -> str:
    """`local user 1000 (alice)`, `... via sendmail -bs`; asks NSS for the name, so not on the event loop."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "unknown"
    return f"local user {uid} ({name})" + (f" via {via}" if via else "")


def address_literal(address: str | None) -> str:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3)."""
    ip = _ip(address) if address is not None else None
    if ip is None:
        return "unknown"
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def received_field(*, helo: str, peer: Peer, hostname: str, protocol: str, date: str | None = None) -> bytes:
    """The trace field this hop adds (RFC 5321 §4.4; the `with` keywords are RFC 3848's)."""
    if peer.uid is not None:
        origin = local_user(peer.uid, peer.via)
    else:
        origin = f"{_HELO_UNSAFE.sub('?', helo)[:_HELO_MAX] or 'unknown'} ({address_literal(peer.address)})"
    when = date or formatdate(localtime=True)
    return f"Received: from {origin}\r\n\tby {hostname} (mailwatchd) with {protocol}; {when}\r\n".encode()


def store(deposit: Callable[[bytes], str], message: bytes, *, sender: str, recipients: Sequence[str],
          received: bytes, max_size: int) -> str:
    """Put `message` with its trace and envelope fields durably into the spool with `deposit`; the queue id.

    Blocks on fsync: run it in a thread. NotAMessage, MalformedMessage (an address),
    TooBig, SpoolFull or OSError when it cannot be stored.
    """
    data = received + message
    try:
        envelope.split_header(data)
    except MalformedMessage as exc:
        raise NotAMessage(str(exc)) from None
    data = envelope.with_envelope(data, sender, recipients)
    if len(data) > max_size:
        raise TooBig(f"{len(data)} bytes with the added fields; the limit is {max_size}")
    return deposit(data)


def _one_line(text: str) -> str:
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode()[:400]


def reply_for(error: Exception) -> str | None:
    """The reply to the end of DATA when storing failed; None for an error that is not ours."""
    if isinstance(error, SpoolFull):
        return NO_STORAGE
    if isinstance(error, TooBig):
        return TOO_BIG
    if isinstance(error, NotAMessage):
        return f"554 5.6.0 {_one_line(str(error))}"
    if isinstance(error, MalformedMessage):
        return f"550 5.1.3 {_one_line(str(error))}"
    if isinstance(error, OSError):
        return f"451 4.3.0 Cannot write to the spool: {_one_line(error.strerror or type(error).__name__)}"
    return None


def server_tls_context(listen: ListenSettings) -> ssl.SSLContext | None:
    """The STARTTLS context from MAILWATCHD_LISTEN_TLS_CERT/KEY, or None without them."""
    if listen.tls_cert is None or listen.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(listen.tls_cert), str(listen.tls_key))
    return context


def _say(transport: asyncio.BaseTransport | None, line: str) -> None:
    """Write one reply and close: the 421s that end a session (RFC 5321 §3.8)."""
    if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
        transport.write(line.encode() + b"\r\n")
    if transport is not None:
        transport.close()


_T = TypeVar("_T")
_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[Any], None]]


class StoreThreads(Generic[_T]):
    """Threads for the sessions' spool writes, so that no session's replies wait on another's fsync.

    A job's `then` runs on the event loop once the job succeeded, whether or not the session
    still waits for it: a message stored for a client that went away is still handed on. A
    queue and one call_soon_threadsafe a job: asyncio.to_thread's executor costs about three
    times as much a round trip.
    """

    def __init__(self, count: int = STORE_THREADS) -> None:
        self.count = count
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def run(self, job: Callable[[], _T], then: Callable[[_T], None]) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        if not self._threads:
            self._threads = [threading.Thread(target=self._serve, name=f"smtp-store-{n}", daemon=True)
                             for n in range(self.count)]
            for thread in self._threads:
                thread.start()
        future: asyncio.Future[_T] = loop.create_future()
        self._jobs.put((job, loop, future, then))
        return future

    def close(self) -> None:
        """End the threads once the jobs queued before are done (a later run starts new ones)."""
        for _ in self._threads:
            self._jobs.put(None)
        self._threads = []

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, loop, future, then = item
            try:
                outcome: tuple[bool, Any] = (True, job())
            except BaseException as exc:  # handed to the session, which answers for it
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # a closed loop: the process is ending, recovery takes over
                loop.call_soon_threadsafe(_settle, future, then, outcome)


def _settle(future: asyncio.Future[Any], then: Callable[[Any], None], outcome: tuple[bool, Any]) -> None:
    succeeded, value = outcome
    if future.done():  # the session ended while its message was being written
        if not succeeded:
            reply = reply_for(value) if isinstance(value, Exception) else None
            if reply is None:
                log.error("smtp_store_failed", error=type(value).__name__, exc_info=value)
            else:
                log.warning("smtp_message_refused", peer="gone", reply=reply)
    elif succeeded:
        future.set_result(value)
    else:
        future.set_exception(value)
    if succeeded:
        then(value)


class ServerFactory:
    """Makes one SmtpSession per connection (an asyncio protocol factory); caps and tracks them."""

    def __init__(self, *, spool_root: Path, listen: ListenSettings, hostname: str, max_message_size: int,
                 command_timeout: float, on_queued: Callable[[Queued], None] | None = None,
                 via: str | None = None, deposit: Callable[[bytes], str] | None = None,
                 inline_stores: bool = False) -> None:
        self.spool_root = spool_root
        # How a message is stored: into new/ like any submission, unless the daemon takes it straight
        # into its queue (Spool.accept). It blocks on fsync: called on a store thread (see inline_stores).
        self.deposit = deposit if deposit is not None else functools.partial(enqueue, spool_root)
        # A process whose event loop serves nothing but these sessions (the listener's own) stores on the
        # loop while one session is open: nobody else waits (its Received field's user lookup included),
        # and the two thread hops cost about a tenth of a message's time. With more sessions, one client's
        # fsync must not hold up another's replies.
        self.inline_stores = inline_stores
        self.listen = listen
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.command_timeout = command_timeout
        self.on_queued = on_queued
        self.via = via
        self.tls_context = server_tls_context(listen)
        self.store_threads: StoreThreads[Queued] = StoreThreads()
        self.sessions: set[SmtpSession] = set()
        # The next connection's session, made while the loop is idle: aiosmtpd's set-up of a session is
        # most of what a new connection waits for before its 220 (0.4 ms of 1.3 on an idle daemon).
        self._spare: SmtpSession | None = None
        self._spare_due = False
        self._emptied: asyncio.Future[None] | None = None
        # aiosmtpd's log lines are not events (and warn on each AUTH); ours are.
        logging.getLogger("mail.log").setLevel(logging.ERROR)

    def __call__(self) -> SmtpSession:
        session, self._spare = self._spare or SmtpSession(self), None
        if not self._spare_due:
            self._spare_due = True
            asyncio.get_running_loop().call_later(SPARE_DELAY_S, self._make_spare)
        return session

    def _make_spare(self) -> None:
        self._spare_due = False
        if self._spare is None:
            self._spare = SmtpSession(self)

    def admit(self, session: SmtpSession) -> bool:
        if len(self.sessions) >= self.listen.max_connections:
            return False
        self.sessions.add(session)
        return True

    def release(self, session: SmtpSession) -> None:
        self.sessions.discard(session)
        if not self.sessions and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    def announce(self, queued: Queued) -> None:
        """Tell `on_queued` of a stored message; a failing logger does not change what the spool holds."""
        if self.on_queued is None:
            return
        try:
            self.on_queued(queued)
        except Exception:
            log.exception("smtp_on_queued_failed", queue_id=queued.queue_id)

    async def close_all(self, grace: float) -> None:
        """End every session: idle ones now, one in DATA after its reply or at `grace` seconds."""
        try:
            await self._end_sessions(grace)
        finally:
            self.store_threads.close()

    async def _end_sessions(self, grace: float) -> None:
        if not self.sessions:
            return
        self._emptied = asyncio.get_running_loop().create_future()
        for session in list(self.sessions):
            session.shut_down()
        try:
            await asyncio.wait_for(asyncio.shield(self._emptied), grace)
        except TimeoutError:
            for session in list(self.sessions):
                session.abort()
        finally:
            self._emptied = None

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        """aiosmtpd's authenticator: PLAIN and LOGIN against MAILWATCHD_LISTEN_USERS_FILE."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        matched: str | None = None
        for user, secret in self.listen.users:  # every entry compared: the time does not tell which failed
            login_ok = hmac.compare_digest(auth_data.login, user.encode())
            password_ok = hmac.compare_digest(auth_data.password, secret.reveal().encode())
            if login_ok and password_ok:
                matched = user
        if matched is None:
            peer = server.peer if isinstance(server, SmtpSession) else Peer()
            log.warning("smtp_auth_failed", peer=peer_label(peer), mechanism=mechanism)
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=matched)


class _ListsWhatAiosmtpdLooksFor:
    """aiosmtpd's SMTP.__init__ finds commands, AUTH mechanisms and hooks with dir() and inspect.getmembers,
    which reads every attribute, on each connection (0.43 ms of a session's set-up); dir() of these objects
    lists just the names it looks for."""

    _AIOSMTPD_PREFIXES: tuple[str, ...] = ("smtp_", "auth_", "handle_")

    def __dir__(self) -> list[str]:
        cls = type(self)
        names: list[str] | None = cls.__dict__.get("_aiosmtpd_names")
        if names is None:
            names = [name for name in super().__dir__() if name.startswith(self._AIOSMTPD_PREFIXES)]
            cls._aiosmtpd_names = names  # type: ignore[attr-defined]
        return list(names)


class SmtpSession(_ListsWhatAiosmtpdLooksFor, SMTP):
    """One client connection: aiosmtpd's SMTP with mailwatchd's policy, limits and spool."""

    # Read by SMTP.__init__ as its stream reader's limit, which pauses reading at twice that: at 1001, each
    # message of a few KiB cost a pause, a resume and a LimitOverrunError. The RFC 5321 limits still hold:
    # command lines by command_size_limits, text lines in DATA by DATA_LINE_LIMIT.
    line_length_limit = READ_LIMIT

    def __init__(self, factory: ServerFactory) -> None:
        self.factory = factory
        self.peer = Peer()
        self.refused = False
        self.in_data = False
        self.closing = False
        self._continued: list[bytes] = []  # the lines of a multi-line reply so far
        self._deadline = 0.0  # loop.time() when a silent client is disconnected
        listen = factory.listen
        super().__init__(
            _Hooks(self), data_size_limit=factory.max_message_size, enable_SMTPUTF8=True, decode_data=False,
            hostname=factory.hostname, ident=IDENT, tls_context=factory.tls_context,
            timeout=factory.command_timeout, authenticator=factory.authenticate,
            auth_exclude_mechanism=() if listen.users else ("PLAIN", "LOGIN"),
            command_call_limit={"AUTH": MAX_AUTH_ATTEMPTS, "*": _NO_CALL_LIMIT})

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # not the second call that STARTTLS makes (RFC 3207 §4.2)
            if not self.factory.admit(self):
                self.refused = True
                log.warning("smtp_connection_refused", reason="too_many_connections",
                            limit=self.factory.listen.max_connections)
                _say(transport, TOO_MANY_CONNECTIONS)
                return
            self.peer = peer_of(transport, self.factory.via)
            self._auth_required = not is_local(self.peer)
            self._auth_require_tls = not may_auth_in_clear(self.peer, self.factory.listen)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return
        try:
            super().connection_lost(error)
        finally:
            self.factory.release(self)

    def eof_received(self) -> bool | None:
        if self.refused:
            return False
        if self.session is None or self.session.ssl is not None:
            return super().eof_received()
        # Half-closed: what the client sent before its EOF is still answered (a pipelined QUIT, a
        # message being stored), where aiosmtpd would drop it. Reading past it ends the session.
        return asyncio.StreamReaderProtocol.eof_received(self)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.IncompleteReadError):  # EOF inside a command or DATA: nothing stored
            _say(self.transport, CLIENT_CLOSED)
            return CLIENT_CLOSED  # aiosmtpd writes it to the closed transport, which drops it
        log.error("smtp_session_error", peer=peer_label(self.peer), error=type(error).__name__, exc_info=error)
        return "451 4.3.0 Internal error, try again later"

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's per-command timeout (RFC 5321 §4.5.3.2), one timer a connection: a command moves the
        deadline, and the timer, when it fires early, waits on for what is left (aiosmtpd cancels and makes
        a timer a command)."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        timer = self._timeout_handle
        if timer is None or timer.cancelled() or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)

    def _check_timeout(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        _say(self.transport, TIMED_OUT)

    async def push(self, status: AnyStr) -> None:
        """aiosmtpd's push, but the lines of a multi-line reply (RFC 5321 §4.2.1) leave in one write."""
        if isinstance(status, str):
            line = _REWORDED.get(status, status).encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        else:
            line = status
        if line[3:4] == b"-":
            self._continued.append(line)
            return
        if self._continued:
            line = _CRLF.join([*self._continued, line])
            self._continued.clear()
        self._writer.write(line + _CRLF)
        await self._writer.drain()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        plain = _PLAIN_PATH.fullmatch(arg)
        if plain is None or (self.local_part_limit and plain[1].index("@") > self.local_part_limit):
            return super()._getaddr(arg)
        return plain[1], plain[2]

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the message in blocks rather than a line per await (RFC 5321 §4.1.1.4)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        self.in_data = True  # until the reply: a stop waits for it (shut_down)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            content, reply = await self._read_data()
            if reply is None:
                self.envelope.content = self.envelope.original_content = content
                reply = await self._call_handler_hook("DATA")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(reply)
        finally:
            self.in_data = False
        if self.closing:
            _say(self.transport, SHUTTING_DOWN)

    async def _read_data(self) -> tuple[bytes, str | None]:
        """The message up to the line holding only ".", dots unstuffed (RFC 5321 §4.5.2); or the error reply.

        Nothing beyond the end line is read, so pipelined commands stay for the command loop. Past
        the size limit the data is read to its end and dropped.
        """
        reader, limit = self._reader, self.data_size_limit
        data = bytearray()
        dropped: str | None = None  # the reply, once the data is past the limit
        while True:
            try:
                block = await reader.readuntil(_DATA_END)
            except asyncio.LimitOverrunError as overrun:  # more than a line's worth without ".\r\n"
                block = await reader.readexactly(overrun.consumed)
            data += block
            ends = data.endswith(_DATA_END) and (len(data) == len(_DATA_END) or data[-5:-3] == _CRLF)
            if limit and len(data) - len(_DATA_END) > limit:
                dropped = dropped or self._line_error(data[:limit]) or TOO_BIG
                del data[:-4]  # keep what may begin the end line
            if ends:
                break
        if dropped is not None:
            return b"", dropped
        content = bytes(data[:-3])
        error = self._line_error(content)
        if error is not None:
            return b"", error
        if content.startswith(b".") or b"\r\n." in content:
            content = _CRLF.join(line[1:] if line.startswith(b".") else line for line in content.split(_CRLF))
        return content, None

    def _line_error(self, data: bytes | bytearray) -> str | None:
        """RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF (aiosmtpd's limit)."""
        longest = max(map(len, data.split(_CRLF)))
        return "500 Line too long (see RFC5321 4.5.3.1.6)" if longest + 2 > DATA_LINE_LIMIT else None

    def shut_down(self) -> None:
        """Say 421 and close; a session in DATA first gets its reply."""
        self.closing = True
        if not self.in_data:
            _say(self.transport, SHUTTING_DOWN)

    def abort(self) -> None:
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()


class _Hooks(_ListsWhatAiosmtpdLooksFor):
    """aiosmtpd's handler for one connection: the EHLO keywords, the recipient cap, the spool write."""

    def __init__(self, connection: SmtpSession) -> None:
        self.connection = connection

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        offers_auth = bool(self.connection.factory.listen.users)
        kept = [line for line in responses if offers_auth or not line.startswith("250-AUTH")]
        return [kept[0], "250-PIPELINING", *kept[1:]]  # aiosmtpd reads pipelined commands in order

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address == NULL_PATH:
            return "553 5.1.3 The null path <> is not a recipient"
        if len(envelope.rcpt_tos) >= self.connection.factory.listen.max_recipients:
            return TOO_MANY_RECIPIENTS  # RFC 5321 §4.5.3.1.10: the client sends the rest later
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        factory, peer = self.connection.factory, self.connection.peer
        sender = "" if envelope.mail_from in (None, NULL_PATH) else str(envelope.mail_from)
        recipients = list(envelope.rcpt_tos)
        protocol = ("ESMTP" if session.extended_smtp else "SMTP") + ("S" if session.ssl is not None else "") + (
            "A" if session.authenticated else "")
        message = envelope.original_content or b""

        def write() -> Queued:
            received = received_field(helo=session.host_name or "", peer=peer, hostname=factory.hostname,
                                      protocol=protocol)
            queue_id = store(factory.deposit, message, sender=sender, recipients=recipients,
                             received=received, max_size=factory.max_message_size)
            who = local_user(peer.uid, peer.via) if peer.uid is not None else peer_label(peer)
            return Queued(queue_id, len(message), who, sender, len(recipients))

        try:
            if factory.inline_stores and len(factory.sessions) <= 1:
                queued = write()
                factory.announce(queued)
            else:
                queued = await factory.store_threads.run(write, factory.announce)
        except Exception as exc:
            reply = reply_for(exc)
            if reply is None:
                raise
            log.warning("smtp_message_refused", peer=peer_label(peer), reply=reply)
            return reply
        return f"250 2.0.0 Ok: queued as {queued.queue_id}"
