#!/usr/bin/env python3
"""The floor under the listener's acceptance rate: the least an asyncio SMTP server can do and still store
each message as mailwatchd must before its 250 (RFC 5321 §4.1.1.4; the issue's rule: fsync of file and
directory), with mailwatchd's own `install_durably` (tmp/, fsync, rename, fsync of the directory).

No aiosmtpd, no parsing, no envelope, no relay: it answers 250 to every command but DATA and QUIT, takes
the data up to "<CRLF>.<CRLF>" as it comes (no unstuffing), and stores it. `thread` writes on a thread of
its own, as the daemon must (its event loop never waits on the disk); `loop` writes on the event loop,
which a daemon that also delivers cannot afford, and shows what the thread costs.

    python benchmarks/durable_floor.py QUEUE_DIR {thread,loop}

Prints the port it listens on (127.0.0.1) and serves until SIGTERM; then prints how many it stored.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from mailwatchd.spool.durable import install_durably

_END = b"\r\n.\r\n"


class Store:
    """Writes each message durably into one directory, on the loop or on a thread of its own."""

    def __init__(self, directory: Path, on_thread: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.directory = directory
        self.loop = loop
        self.names = itertools.count(1)
        self.stored = 0
        self.jobs: queue.SimpleQueue[tuple[bytes, Callable[[], None]] | None] | None = None
        if on_thread:
            self.jobs = queue.SimpleQueue()
            threading.Thread(target=self._serve, name="floor-store", daemon=True).start()

    def write(self, data: bytes) -> None:
        name = str(next(self.names))
        install_durably(self.directory / f".tmp-{name}", self.directory / name, data)
        self.stored += 1

    def store(self, data: bytes, then: Callable[[], None]) -> bool:
        """Store `data`: True when it is stored now (on the loop); else `then` runs on the loop once it is."""
        if self.jobs is None:
            self.write(data)
            return True
        self.jobs.put((data, then))
        return False

    def _serve(self) -> None:
        assert self.jobs is not None
        while (job := self.jobs.get()) is not None:
            data, then = job
            self.write(data)
            self.loop.call_soon_threadsafe(then)


class Responder(asyncio.Protocol):
    def __init__(self, store: Store) -> None:
        self.store = store
        self.buffer = b""
        self.in_data = False
        self.waiting = False  # for the store: what else arrives waits
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 floor ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._work()

    def _stored(self) -> None:
        self.waiting = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"250 2.0.0 stored\r\n")
            self._work()

    def _work(self) -> None:
        transport = self.transport
        assert transport is not None
        while not self.waiting:
            if self.in_data:
                end = self.buffer.find(_END)
                if end < 0:
                    return
                message, self.buffer = self.buffer[:end + 2], self.buffer[end + len(_END):]
                self.in_data = False
                if self.store.store(message, self._stored):
                    transport.write(b"250 2.0.0 stored\r\n")
                else:
                    self.waiting = True
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            verb = line[:4].upper()
            if verb == b"DATA":
                self.in_data = True
                transport.write(b"354 go on\r\n")
            elif verb == b"QUIT":
                transport.write(b"221 2.0.0 bye\r\n")
                transport.close()
                return
            elif verb == b"EHLO":
                transport.write(b"250-floor\r\n250 PIPELINING\r\n")
            else:
                transport.write(b"250 2.0.0 ok\r\n")


async def serve(directory: Path, on_thread: bool) -> int:
    loop = asyncio.get_running_loop()
    store = Store(directory, on_thread, loop)
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    server = await loop.create_server(lambda: Responder(store), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await stopping.wait()
    server.close()
    return store.stored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("where", choices=("thread", "loop"))
    args = parser.parse_args()
    os.makedirs(args.directory, exist_ok=True)
    stored = asyncio.run(serve(args.directory, args.where == "thread"))
    print(f"stored {stored}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
