"""The drain's hot path after issue 10's second pass: the transaction deadline kept by the wire (no
timeout scope per message), caught_up woken by the reaper's thread (no polling), TLS contexts made
only for endpoints that use TLS, and the header rewrite's quick check."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from mailwatchd.message import addressing
from mailwatchd.message.addressing import Addressing
from mailwatchd.message.envelope import parse_with_fields
from mailwatchd.service.live import Live
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.spool.reaper import BATCH, Reaper
from mailwatchd.transports.delivery import SmtpSession
from mailwatchd.transports.outcome import Cause, Outcome, Phase
from tests.conftest import LOOPBACK
from tests.rawservers import ThreadedServer
from tests.test_delivery import make_relay, make_settings, message


class SlowTransactionServer(ThreadedServer):
    """Greets and answers EHLO at once (no PIPELINING); every reply after that comes `delay` seconds late."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.lines: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test\r\n")
        while line := await reader.readline():
            self.lines.append(line.rstrip(b"\r\n"))
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250 slow.test\r\n")
            else:
                await asyncio.sleep(self.delay)
                writer.write(b"250 ok\r\n")
            await writer.drain()


def test_the_transaction_deadline_cuts_a_transaction_whose_replies_each_come_in_time(tmp_path: Path) -> None:
    # Each reply comes well within EMAIL_TIMEOUT (1 s), but MAIL and RCPT together outlive the transaction's 1 s.
    with SlowTransactionServer(delay=0.7) as server:
        settings = make_settings(tmp_path, command_timeout=1.0, transaction_timeout=1.0)
        relay = make_relay(server.port)
        session = SmtpSession(relay, relay.primary, settings)

        async def run() -> tuple[float, bool]:
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await session.deliver(message())
            assert (result.outcome, result.cause, result.phase) == (Outcome.TEMPORARY, Cause.TIMEOUT, Phase.RCPT)
            assert result.detail == "the transaction took longer than its deadline of 1s"
            return loop.time() - started, session.connected

        elapsed, connected = asyncio.run(run())
        assert 0.9 < elapsed < 1.4  # cut at the deadline, not at the reply's own timeout (0.7 + 1.0 s)
        assert not connected  # a transaction cut off mid-way leaves no connection to reuse
        assert server.lines[-1].startswith(b"RCPT TO:")


def test_a_reply_still_has_its_own_timeout_within_the_transaction(tmp_path: Path) -> None:
    with SlowTransactionServer(delay=2.0) as server:
        settings = make_settings(tmp_path, command_timeout=0.5, transaction_timeout=10.0)
        relay = make_relay(server.port)
        result = asyncio.run(SmtpSession(relay, relay.primary, settings).deliver(message()))
        assert (result.outcome, result.cause, result.phase) == (Outcome.TEMPORARY, Cause.TIMEOUT, Phase.MAIL)
        assert "within 0.5s" in result.detail and "deadline" not in result.detail


def _files(directory: Path, count: int) -> list[str]:
    directory.mkdir()
    paths = [str(directory / f"f{index}") for index in range(count)]
    for path in paths:
        with open(path, "wb"):
            pass
    return paths


def test_caught_up_returns_once_the_thread_has_unlinked_down_to_the_limit(tmp_path: Path) -> None:
    reaper = Reaper()
    reaper.start()
    try:
        paths = _files(tmp_path / "sent", 40 * BATCH)

        async def run() -> None:
            for path in paths:
                reaper.remove(path)
            await asyncio.wait_for(reaper.caught_up(limit=0), 10.0)
            assert reaper.pending == 0
            await asyncio.wait_for(reaper.caught_up(limit=0), 1.0)  # nothing pending: at once

        asyncio.run(run())
        assert os.listdir(tmp_path / "sent") == []
    finally:
        assert reaper.close(10.0)


def test_a_waiter_is_woken_when_the_reaper_is_closed_from_another_thread(tmp_path: Path) -> None:
    # A limit below zero is never reached by unlinking: only the end of the thread wakes this waiter.
    reaper = Reaper()
    reaper.start()
    paths = _files(tmp_path / "sent", 4 * BATCH)

    async def run() -> None:
        for path in paths:
            reaper.remove(path)
        waiting = asyncio.create_task(reaper.caught_up(limit=-1))
        await asyncio.sleep(0)
        assert not waiting.done()
        assert await asyncio.to_thread(reaper.close, 10.0)  # as the daemon's shutdown does
        await asyncio.wait_for(waiting, 5.0)

    asyncio.run(run())
    assert reaper.pending == 0 and os.listdir(tmp_path / "sent") == []


def test_caught_up_without_a_thread_returns_at_once(tmp_path: Path) -> None:
    reaper = Reaper()  # not started: remove() unlinks at once
    [path] = _files(tmp_path / "sent", 1)
    reaper.remove(path)
    asyncio.run(asyncio.wait_for(reaper.caught_up(limit=0), 1.0))
    assert not os.path.exists(path)


def test_a_tls_context_is_made_only_for_endpoints_that_use_tls(tmp_path: Path) -> None:
    plain = RelayConfig(name="plain", endpoints=(Endpoint(LOOPBACK, 2525, TlsMode.NONE),))
    mixed = RelayConfig(name="mixed", endpoints=(Endpoint(LOOPBACK, 2526, TlsMode.NONE),
                                                 Endpoint(LOOPBACK, 2527, TlsMode.STARTTLS)))
    live = Live(Settings(spool=tmp_path / "spool", outbox=tmp_path / "outbox", relays=(plain, mixed)))
    sessions = [live.make_session(plain, plain.primary), live.make_session(mixed, mixed.endpoints[0]),
                live.make_session(mixed, mixed.endpoints[1]), live.make_session(mixed, mixed.endpoints[1])]
    assert all(isinstance(session, SmtpSession) for session in sessions)
    contexts = [session._tls_context for session in sessions if isinstance(session, SmtpSession)]
    assert contexts[0] is None and contexts[1] is None
    assert contexts[2] is not None and contexts[3] is contexts[2]  # one per relay and configuration


@pytest.mark.parametrize("value", [
    b" Bench <bench@example.com>", b" a@example.com, b@example.com", b" root", b" Cron <root>",
    b' "Smith, J" <j@example.com>', b" a@example.com (root)", b" list: root, a@b;", b" <root> a@example.com",
    b" x@y <root>", b" root, a@example.com", b" <a@b", b"", b" ,",
])
def test_the_quick_check_never_misses_a_bare_name(value: bytes) -> None:
    raw = b"To:" + value + b"\n"
    found = addressing._bare_name_ends(value)
    assert not found or addressing._may_have_bare_name(raw)


def test_the_quick_check_agrees_with_the_scan_on_random_values() -> None:
    rng = random.Random(10)
    alphabet = b'ab@<>,;:"()\\ \tx.-'
    for _ in range(20_000):
        value = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        if not addressing._may_have_bare_name(b"To:" + value):
            assert addressing._bare_name_ends(value) == [], value


def test_complete_with_the_parsed_fields_gives_what_complete_alone_gives() -> None:
    addressing_ = Addressing(domain="example.net")
    for raw in (b"From: root\nTo: a@example.com, ops\nBcc: b@example.com\n\nbody\n",
                b"From: Bench <bench@example.com>\nTo: rcpt@example.com\nSubject: hi\n\nbody\n",
                b"From a@b Mon Jan  1 00:00:00 2026\nFrom: Cron <root>\nTo: x@example.com\n\nbody\n"):
        message_, fields = parse_with_fields("Q", raw)
        assert addressing_.complete(message_, fields) == addressing_.complete(message_)
