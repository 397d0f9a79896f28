"""The SMTP client's wire against a real loopback server: replies as they arrive in pieces, and each
reply's own deadline (one timer per connection, armed again only when it fires early)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from mailwatchd.transports.smtpwire import MalformedReply, Reply, Wire


@asynccontextmanager
async def wire_to(serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]) -> AsyncIterator[Wire]:
    """A Wire connected to a loopback server running `serve` for the connection."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)  # type: ignore[arg-type]
    port = server.sockets[0].getsockname()[1]
    _, wire = await asyncio.get_running_loop().create_connection(Wire, "127.0.0.1", port)
    try:
        yield wire
    finally:
        wire.abort()
        server.close()
        await server.wait_closed()


def test_replies_in_pieces_and_together_come_out_in_order() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pieces = (b"220 ready\r\n250-first", b" line\r\n250-sec", b"ond\r\n250 last\r\n", b"354 go ahead\r\n251 ok\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        await reader.read()

    async def run() -> list[Reply]:
        async with wire_to(serve) as wire:
            return [await wire.read(5.0) for _ in range(4)]

    assert asyncio.run(run()) == [Reply(220, "ready"), Reply(250, "first line\nsecond\nlast"), Reply(354, "go ahead"),
                                  Reply(251, "ok")]


def test_a_line_that_is_no_reply_fails_the_read() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n")
        await reader.read()

    async def run() -> None:
        async with wire_to(serve) as wire:
            await wire.read(5.0)

    with pytest.raises(MalformedReply):
        asyncio.run(run())


def test_each_read_times_out_at_its_own_deadline() -> None:
    """A long read arms the connection's timer far ahead; a later short one must still end on time, and a
    short one before a long one must not cut the long one short."""
    async def run() -> tuple[float, float, Reply]:
        go = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 ready\r\n")
            await go.wait()
            await asyncio.sleep(0.5)  # after the short read's deadline, well before the long one's
            writer.write(b"250 late\r\n")
            await reader.read()

        async with wire_to(serve) as wire:
            assert await wire.read(60.0) == Reply(220, "ready")  # the timer now stands 60 s ahead
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await wire.read(0.2)
            short = time.monotonic() - started
            go.set()
            started = time.monotonic()
            reply = await wire.read(30.0)  # the timer armed for 0.2 s has fired: this read is not cut short
            return short, time.monotonic() - started, reply

    short, long, reply = asyncio.run(run())
    assert 0.15 <= short < 2.0
    assert reply == Reply(250, "late") and 0.3 <= long < 10.0
