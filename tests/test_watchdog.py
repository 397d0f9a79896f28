"""The watchdog tells the truth: the main loop keeps ticking, but while a delivery is stuck past its
own deadline no WATCHDOG=1 goes out. A real daemon object runs in this process with a real notify
socket; the only stand-in is the transport, a session that never returns (the fault under test)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.service import daemon as daemon_module
from mailwatchd.service.daemon import Daemon
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig
from mailwatchd.transports.outcome import DeliveryResult
from mailwatchd.transports.transport import Session

WATCHDOG_USEC = 400_000  # pings every 0.2 s, main loop every 0.2 s
BOUND_S = 0.2
MARGIN_S = 0.3

MESSAGE = b"From: app@example.test\nTo: ops@example.test\nSubject: stuck\n\nbody\n"


class StuckSession:
    """A transport whose delivery never returns, although it promised to take at most BOUND_S."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self._created = time.monotonic()

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult:
        self.started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None

    def bound(self, message: OutgoingMessage) -> float:
        return BOUND_S

    @property
    def idle_for(self) -> float:
        return time.monotonic() - self._created


async def collect(sock: socket.socket, until: float) -> list[tuple[float, str]]:
    """Every datagram that arrives before the monotonic time `until`, with its arrival time."""
    loop = asyncio.get_running_loop()
    received: list[tuple[float, str]] = []
    while (remaining := until - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(remaining):
                data = await loop.sock_recv(sock, 65536)
        except TimeoutError:
            break
        received.append((time.monotonic(), data.decode()))
    return received


def test_pings_stop_while_a_delivery_is_stuck_though_the_main_loop_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setattr(daemon_module, "STUCK_MARGIN_S", MARGIN_S)
    settings = Settings(spool=tmp_path / "spool", outbox=tmp_path / "outbox", concurrency=1, shutdown_grace=0.2)
    sessions: list[StuckSession] = []

    def factory(_: Settings, relay: RelayConfig | None, endpoint: Endpoint | None) -> Session:
        sessions.append(StuckSession())
        return sessions[-1]

    async def scenario() -> tuple[list[tuple[float, str]], list[tuple[float, str]], float, int]:
        daemon = Daemon(settings, session_factory=factory)
        task = asyncio.create_task(daemon.run())
        before = await collect(sock, time.monotonic() + 1.0)  # healthy and idle: pings flow
        (settings.spool / "tmp" / "m1").write_bytes(MESSAGE)
        (settings.spool / "tmp" / "m1").rename(settings.spool / "new" / "m1")
        async with asyncio.timeout(5):
            while not sessions:
                await asyncio.sleep(0.01)
            await sessions[0].started.wait()
        stuck_at = time.monotonic() + BOUND_S + MARGIN_S
        during = await collect(sock, stuck_at + 2.0)
        signal.raise_signal(signal.SIGTERM)
        code = await asyncio.wait_for(task, 5)
        return before, during, stuck_at, code

    before, during, stuck_at, code = asyncio.run(scenario())
    sock.close()
    assert code == 0
    assert any("READY=1" in text for _, text in before)
    assert sum("WATCHDOG=1" in text for _, text in before) >= 3
    # A main-loop tick may already be under way when the deadline passes: allow one period of slack.
    late_pings = [at for at, text in during if "WATCHDOG=1" in text and at > stuck_at + 0.25]
    assert late_pings == [], f"{len(late_pings)} pings while the delivery was stuck"
    unhealthy = [text for at, text in during if "STATUS=UNHEALTHY: worker 0 is in a delivery" in text]
    assert len(unhealthy) >= 1
    # The main loop went on: the status line kept being refreshed ("1s past", "2s past") while the
    # pings were withheld.
    statuses = {text for at, text in during if at > stuck_at + 0.25 and text.startswith("STATUS=UNHEALTHY")}
    assert len(statuses) >= 2, statuses
