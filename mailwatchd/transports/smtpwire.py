"""The SMTP client's wire: commands out, replies in, the message body under flow control; and
the one-line texts that say what went wrong.

A `Wire` is the asyncio protocol of one connection from the TCP connect to the close. It keeps
every reply that arrives, in order, so several commands can be written at once and their
replies read afterwards (RFC 2920 PIPELINING), and it upgrades itself to TLS in place
(RFC 3207 STARTTLS). Reply parsing exists only here.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections import deque
from typing import NamedTuple

MAX_REPLY_BYTES = 64 * 1024  # a reply (all its lines) larger than this is not SMTP
TIMER_SLACK_S = 0.001  # a reply's timer that fires this close to its deadline counts as on time
RECEIVE_BUFFER = 16 * 1024  # one recv(2) at most; replies are read into it, not into a new 256 KiB bytes each
MAX_DETAIL = 300
BODY_CHUNK = 64 * 1024
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


class Reply(NamedTuple):
    """One SMTP reply: the code and the text of all its lines joined by newlines."""

    code: int
    text: str

    def __str__(self) -> str:
        return one_line(f"{self.code} {self.text}")


class MalformedReply(ValueError):
    """The server sent something that is not an SMTP reply (RFC 5321 §4.2)."""


class Disconnected(ConnectionError):
    """The connection closed, from either side, before the reply came."""


class UploadStalled(TimeoutError):
    """The server stopped reading the message body."""


def wire_body(data: bytes) -> bytes:
    """The DATA payload: CRLF line endings, dot-stuffed (RFC 5321 §4.5.2), ending in CRLF.CRLF."""
    if b"\r" not in data:
        data = data.replace(b"\n", b"\r\n")
    elif not data.count(b"\r\n") == data.count(b"\r") == data.count(b"\n"):
        data = _LINE_ENDING.sub(b"\r\n", data)  # a bare CR or LF somewhere
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


def one_line(text: str, limit: int = MAX_DETAIL) -> str:
    """`text` on one line, white space collapsed, cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """`text` on one line with every secret form replaced by ***."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return one_line(text)


def describe(exc: BaseException, *, host: str = "", port: int = 0, timeout: float | None = None,
             step: str = "") -> str:
    """One line saying what went wrong without a reply, in the words an operator searches for."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message} (OpenSSL verify code {exc.verify_code})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}" if step == "tls" else f"TLS error: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}: {exc.strerror or exc}"
    if isinstance(exc, UploadStalled):
        return str(exc)
    if isinstance(exc, TimeoutError):
        within = f" within {timeout:g}s" if timeout is not None else ""
        match step:
            case "connect":
                return f"no answer from {host}:{port}{within} (connect timed out)"
            case "dns":
                return f"resolving {host} took too long{within}"
            case "banner":
                return f"connected, but no complete greeting{within}"
            case "tls":
                return f"no TLS handshake{within}"
        return f"no reply{within}"
    if isinstance(exc, ConnectionRefusedError):
        return f"{host}:{port} refused the connection (nothing listens there, or a firewall rejects)"
    if isinstance(exc, Disconnected | EOFError | ConnectionError):
        return f"the server closed the connection ({exc})" if str(exc) else "the server closed the connection"
    if isinstance(exc, MalformedReply):
        return f"malformed reply: {exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Wire(asyncio.BufferedProtocol):
    """Writes commands to one connection and hands out the server's replies in the order they came.

    A buffered protocol: asyncio receives into one buffer kept for the connection (a plain Protocol gets a
    bytes object of 256 KiB allocated, mapped and cut down for every recv). A reply's deadline is kept by
    one timer per connection that is armed again only when it fires early, not by a timer per reply.

    `until` (loop time, None: none) is a deadline over every wait of the connection, the reply reads and
    the body's flow control alike: a message transaction sets it once instead of wrapping each step in
    a timeout scope of its own. A wait it cuts short raises TimeoutError like a reply's own deadline;
    `past_until` tells them apart."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._inbox = memoryview(bytearray(RECEIVE_BUFFER))
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._code = b""
        self._replies: deque[Reply] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: float | None = None  # loop time the reply being waited for is due by
        self._timer: asyncio.TimerHandle | None = None  # fires at or before the deadline
        self._writable = asyncio.Event()
        self._writable.set()
        self.until: float | None = None  # loop time every wait ends by (a transaction's deadline)

    @property
    def closed(self) -> bool:
        """True once the connection is closed or closing, from either side."""
        return self._transport is None or self._transport.is_closing() or self._error is not None

    @property
    def pending(self) -> bool:
        """True when replies arrived that no command asked for (a 421 sent while idle, say)."""
        return bool(self._replies) or bool(self._buffer) or bool(self._lines)

    @property
    def tls(self) -> ssl.SSLObject | None:
        """The TLS session once the connection is encrypted."""
        if self._transport is None:
            return None
        tls = self._transport.get_extra_info("ssl_object")
        return tls if isinstance(tls, ssl.SSLObject) else None

    def loop_time(self) -> float:
        """The event loop's clock, the one `until` is on."""
        return self._loop.time()

    @property
    def past_until(self) -> bool:
        """True when `until` is set and has come (within the timer's slack)."""
        until = self.until
        return until is not None and until - self._loop.time() <= TIMER_SLACK_S

    def write(self, data: bytes) -> None:
        """Send bytes as they are; Disconnected if the connection is gone."""
        if self._transport is None or self._transport.is_closing():
            raise Disconnected("the connection is closed")
        self._transport.write(data)

    async def command(self, line: bytes, timeout: float) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        self.write(line + b"\r\n")
        return await self.read(timeout)

    async def read(self, timeout: float) -> Reply:
        """The next complete reply within `timeout` seconds and by `until` (TimeoutError), Disconnected at EOF."""
        replies = self._replies
        if not replies:
            loop = self._loop
            # One deadline for the whole reply: a drip of bytes does not extend it.
            deadline = loop.time() + timeout
            until = self.until
            if until is not None and until < deadline:
                deadline = until
            self._deadline = deadline
            timer = self._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._expire)
            try:
                while not replies:
                    if self._error is not None:
                        raise self._error
                    waiter = self._waiter = loop.create_future()
                    await waiter
            finally:
                self._waiter = None
                self._deadline = None
        return replies.popleft()

    async def send_body(self, data: bytes, stall_timeout: float) -> None:
        """Write `data` as the server reads it; UploadStalled after `stall_timeout` seconds without progress."""
        if len(data) <= BODY_CHUNK:
            await self._drained(stall_timeout)
            self.write(data)
        else:
            view = memoryview(data)
            for start in range(0, len(view), BODY_CHUNK):
                await self._drained(stall_timeout)
                self.write(bytes(view[start : start + BODY_CHUNK]))
        await self._drained(stall_timeout)

    async def _drained(self, stall_timeout: float) -> None:
        if self._writable.is_set():
            return
        stalled_at = self._loop.time() + stall_timeout
        until = self.until
        try:
            async with asyncio.timeout_at(stalled_at if until is None else min(stalled_at, until)):
                await self._writable.wait()
        except TimeoutError:
            if until is not None and until < stalled_at:
                raise  # the transaction's deadline came first
            raise UploadStalled(f"the server read nothing of the message for {stall_timeout:g}s") from None
        if self._error is not None:
            raise self._error

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str, timeout: float) -> None:
        """Upgrade this connection to TLS in place (after the server's 220 to STARTTLS)."""
        if self.pending:
            # RFC 3207 §6: anything received before the handshake was not protected; an
            # injected reply would be read as the server's answer after it.
            raise MalformedReply("the server sent data before the TLS handshake (a possible injection)")
        assert self._transport is not None
        transport = await self._loop.start_tls(self._transport, self, context, server_hostname=server_hostname,
                                               ssl_handshake_timeout=timeout)
        if transport is None:
            raise Disconnected("the connection closed during the TLS handshake")
        self._transport = transport

    def close(self) -> None:
        """Close after what was written is sent."""
        self._stop_timer()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent data included (nothing waits on a stalled peer)."""
        self._stop_timer()
        if self._transport is not None:
            self._transport.abort()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # asyncio.BufferedProtocol callbacks.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._inbox

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._inbox[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        """Bytes from the server (what buffer_updated received): complete replies are queued, in order."""
        buffer = self._buffer
        if buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        *lines, rest = data.split(b"\n")  # complete lines, then what follows the last line feed
        for raw_line in lines:
            line = raw_line.rstrip(b"\r")
            code, separator = line[:3], line[3:4]
            if (len(code) != 3 or not code.isdigit() or separator not in (b"", b" ", b"-")
                    or (self._lines and code != self._code)):
                shown = line[:80].decode("ascii", "replace")
                self._fail(MalformedReply(f"{shown!r} is not an SMTP reply line"))
                return
            self._code = code
            self._lines.append(line[4:].decode("utf-8", "replace"))
            if separator != b"-":
                self._replies.append(Reply(int(code), "\n".join(self._lines)))
                self._lines = []
        if rest:
            buffer += rest
            if len(buffer) + sum(map(len, self._lines)) > MAX_REPLY_BYTES:
                self._fail(MalformedReply("a reply of more than 64 KiB"))
                return
        elif self._lines and sum(map(len, self._lines)) > MAX_REPLY_BYTES:
            self._fail(MalformedReply("a reply of more than 64 KiB"))
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(Disconnected("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        error = Disconnected("connection lost")
        error.__cause__ = exc
        self._fail(error)
        self._transport = None
        self._stop_timer()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if isinstance(error, MalformedReply) and self._transport is not None:
            self._transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:  # no reply is waited for
            return
        if deadline - self._loop.time() > TIMER_SLACK_S:  # armed for an earlier reply's deadline
            self._timer = self._loop.call_at(deadline, self._expire)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError("no reply in time"))
