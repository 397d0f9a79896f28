"""Misbehaving TCP servers on 127.0.0.1 for timeout and fault tests, each a context manager with
`.host` and `.port`:

- SilentServer: accepts connections and never sends a byte (no banner).
- DripServer: sends `payload` one byte every `interval` seconds (a banner that never ends).
- BlackHole: a listening socket whose accept queue is full, so a new connect gets no SYN-ACK.
- ScriptedServer: sends the given reply lines, one per command received, then goes silent or closes.
- SlowReaderServer: reads the message body slowly, or stops reading it, with a small receive buffer.

Silent, drip and scripted servers run an asyncio loop in a daemon thread (for a custom one,
subclass ThreadedServer and write `serve`); `.connections` counts accepted connections,
`.connected` is set at the first one and `.disconnected` when a connection has ended (the
server has read everything the client sent before closing).
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, Self

LOOPBACK = "127.0.0.1"


class ThreadedServer:
    """An asyncio TCP server on 127.0.0.1:0 in its own thread; subclasses implement `serve`."""

    host = LOOPBACK

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._stop: asyncio.Event | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        self.connected.set()
        try:
            await self.serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.disconnected.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._client, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


class SilentServer(ThreadedServer):
    """Accepts connections and never sends anything (a banner that never comes)."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass


class DripServer(ThreadedServer):
    """Sends `payload` one byte every `interval` seconds, ignoring what the client sends."""

    def __init__(self, payload: bytes = b"220 " + b"x" * 1000 + b"\r\n", interval: float = 0.5) -> None:
        super().__init__()
        self.payload = payload
        self.interval = interval
        self.sent = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for index in range(len(self.payload)):
            writer.write(self.payload[index : index + 1])
            self.sent += 1
            await writer.drain()
            await asyncio.sleep(self.interval)
        await reader.read()


class ScriptedServer(ThreadedServer):
    """Sends `replies[0]` as the banner, then one reply per command line received.

    After a reply starting with 354 the message body is read up to the final dot before the
    next reply. When the script runs out the server goes silent (`then="silent"`) or closes
    (`then="close"`). Every line received is kept in `.received` (bytes, without CRLF), a
    body so far in `.partial`, each whole body (its final dot included) in `.bodies`.
    A reply may hold several lines ("250-a\\r\\n250 b").
    """

    def __init__(self, replies: Sequence[str], then: Literal["silent", "close"] = "silent") -> None:
        super().__init__()
        self.replies = list(replies)
        self.then = then
        self.received: list[bytes] = []
        self.bodies: list[bytes] = []
        self.partial = b""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        replies = iter(self.replies)
        for reply in replies:
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()
            if reply.startswith("354"):
                body = bytearray()
                while not body.endswith(b"\r\n.\r\n"):
                    line = await reader.readline()
                    if not line:
                        return
                    body += line
                    self.partial = bytes(body)
                self.bodies.append(bytes(body))
                self.partial = b""
            else:
                line = await reader.readline()
                if not line:
                    return
                self.received.append(line.rstrip(b"\r\n"))
        if self.then == "silent":
            while line := await reader.readline():
                self.received.append(line.rstrip(b"\r\n"))


class BlackHole:
    """A listening socket (backlog 0) whose accept queue is filled, so a further connect times out.

    On Linux a SYN that finds the accept queue full is dropped: the client retransmits it and
    waits. Entering checks that a probe connect really gets no answer within `probe_timeout`.
    """

    def __init__(self, probe_timeout: float = 0.3, max_fill: int = 64, host: str = LOOPBACK, port: int = 0) -> None:
        self.host = host
        self.port = port
        self.probe_timeout = probe_timeout
        self.max_fill = max_fill
        self._listener: socket.socket | None = None
        self._fillers: list[socket.socket] = []

    def __enter__(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self.host, self.port))
        listener.listen(0)
        self._listener = listener
        self.port = listener.getsockname()[1]
        for _ in range(self.max_fill):
            if not self._connect_completes():
                return self
        self.__exit__(None, None, None)
        raise RuntimeError(f"could not fill the accept queue of a backlog-0 socket with {self.max_fill} connects")

    def _connect_completes(self) -> bool:
        """Start one more connect and keep it; False when it got no answer (the queue is full)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        self._fillers.append(sock)
        code = sock.connect_ex((self.host, self.port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, f"connect to the black hole failed: {errno.errorcode.get(code, code)}")
        _, writable, _ = select.select([], [sock], [], self.probe_timeout)
        return bool(writable)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sock in self._fillers:
            sock.close()
        self._fillers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class SlowReaderServer:
    """A minimal SMTP server in a thread that reads the message body at `rate` bytes a second
    (0: it stops reading after the 354), with a small receive buffer, then answers 250.

    `.body_bytes` counts what it read of the body; `.replied` is set once it answered the final dot.
    """

    host = LOOPBACK

    def __init__(self, rate: float, rcvbuf: int = 32 * 1024) -> None:
        self.rate = rate
        self.rcvbuf = rcvbuf
        self.port = 0
        self.body_bytes = 0
        self.replied = threading.Event()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, name="SlowReaderServer", daemon=True)

    def __enter__(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)  # inherited by accepted sockets
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(0.2)
            reader = conn.makefile("rb")
            conn.sendall(b"220 slow ESMTP\r\n")
            while not self._stop.is_set():
                try:
                    line = reader.readline()
                except TimeoutError:
                    continue
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-slow\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    if not self._read_body(reader):
                        return
                    conn.sendall(b"250 2.0.0 queued\r\n")
                    self.replied.set()
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def _read_body(self, reader: Any) -> bool:
        """Read up to the final dot at the configured rate; False when stopped first."""
        tail = b""
        chunk = max(int(self.rate / 20), 1)  # 20 reads a second
        while not self._stop.is_set():
            if self.rate <= 0:
                self._stop.wait(0.05)
                continue
            started = time.monotonic()
            try:
                data = reader.read1(chunk)
            except TimeoutError:
                continue
            if not data:
                return False
            self.body_bytes += len(data)
            tail = (tail + data)[-5:]
            if tail == b"\r\n.\r\n":
                return True
            self._stop.wait(max(0.0, 0.05 - (time.monotonic() - started)))
        return False

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        self._thread.join(10)
