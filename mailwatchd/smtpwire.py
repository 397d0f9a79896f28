"""The SMTP client's hot path on an established connection: commands out, replies in; and
one-line texts for what went wrong.

aiosmtplib sets the connection up (greeting, EHLO, STARTTLS, AUTH); then a `Wire` takes over
its transport (`BaseTransport.set_protocol`) for the message transactions. Unlike aiosmtplib's
protocol it keeps every reply that arrives, in order, so several commands can be written at
once and their replies read afterwards: RFC 2920 PIPELINING.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections import deque
from typing import NamedTuple

from aiosmtplib import SMTPException, SMTPResponseException, SMTPServerDisconnected

MAX_REPLY_BYTES = 64 * 1024  # a reply (all its lines) larger than this is not SMTP
MAX_DETAIL = 300
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


class Reply(NamedTuple):
    """One SMTP reply: the code and the text of all its lines joined by newlines."""

    code: int
    text: str


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


def describe(exc: BaseException) -> str:
    """A one-line description of a failure without a reply; never a traceback."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror}"
    if isinstance(exc, TimeoutError) and not isinstance(exc, SMTPException):
        return "timed out"
    if isinstance(exc, SMTPException):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def root_cause(exc: BaseException) -> BaseException:
    """The socket, TLS or timeout error an aiosmtplib exception wraps, if any."""
    for _ in range(8):
        if not isinstance(exc, SMTPException) or isinstance(exc, SMTPResponseException) or exc.__cause__ is None:
            break
        exc = exc.__cause__
    return exc


class Wire(asyncio.Protocol):
    """Writes commands to a transport and hands out the server's replies in the order they came."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.WriteTransport | None = transport  # type: ignore[assignment]
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._replies: deque[Reply] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        transport.set_protocol(self)

    @property
    def closed(self) -> bool:
        """True once the connection is closed or closing, from either side."""
        return self._transport is None or self._transport.is_closing() or self._error is not None

    @property
    def pending(self) -> bool:
        """True when replies arrived that no command asked for (a 421 sent while idle, say)."""
        return bool(self._replies) or bool(self._buffer)

    def write(self, data: bytes) -> None:
        """Send bytes as they are; raise SMTPServerDisconnected if the connection is gone."""
        if self._transport is None or self._transport.is_closing():
            raise SMTPServerDisconnected("the connection is closed")
        self._transport.write(data)

    async def read(self, timeout: float) -> Reply:
        """The next reply; TimeoutError after `timeout` seconds, SMTPServerDisconnected at EOF."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            waiter = self._waiter = self._loop.create_future()
            expiry = self._loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                expiry.cancel()
                self._waiter = None
        return self._replies.popleft()

    def close(self) -> None:
        """Close after what was written is sent."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent data included (nothing waits on a stalled peer)."""
        if self._transport is not None:
            self._transport.abort()

    # asyncio.Protocol callbacks.

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end]).rstrip(b"\r")
            start = end + 1
            code, separator = line[:3], line[3:4]
            if len(code) != 3 or not code.isdigit() or separator not in (b"", b" ", b"-"):
                shown = line[:80].decode("ascii", "replace")
                self._fail(SMTPResponseException(-1, f"malformed reply line: {shown!r}"))
                return
            self._lines.append(line[4:].decode("utf-8", "replace"))
            if separator != b"-":
                self._replies.append(Reply(int(code), "\n".join(self._lines)))
                self._lines = []
        del buffer[:start]
        if len(buffer) + sum(map(len, self._lines)) > MAX_REPLY_BYTES:
            self._fail(SMTPResponseException(-1, "reply too long"))
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        error = SMTPServerDisconnected("connection lost")
        error.__cause__ = exc
        self._fail(error)
        self._transport = None

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if isinstance(error, SMTPResponseException) and self._transport is not None:
            self._transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no reply in time"))
