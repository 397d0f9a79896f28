"""notify: sd_notify messages on a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from mailwatchd.service import notify
from mailwatchd.service.notify import Notifier

PROMPT_S = 0.5  # a notification that takes longer has blocked on the full queue
RESCUE_AFTER_S = 2.0
FILLER = "filler"


class NotifySocket:
    """A bound datagram socket; `NOTIFY_SOCKET` points at it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive(self) -> str:
        return self.sock.recv(65536).decode("utf-8")

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        received = []
        self.sock.settimeout(0)
        try:
            while True:
                received.append(self.sock.recv(65536).decode("utf-8"))
        except BlockingIOError:
            return received
        finally:
            self.sock.settimeout(5)


def bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def fill(address: str) -> int:
    """Queue datagrams at `address` until the kernel refuses more; how many it took."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.connect(address)
        sender.setblocking(False)
        count = 0
        while True:
            try:
                sender.send(FILLER.encode())
            except BlockingIOError:
                return count
            count += 1


class StuckReader:
    """The reader has stopped reading and its queue is full, as when PID 1 falls behind.

    A sender that blocks on the full queue (the bug) would hang the test: after RESCUE_AFTER_S a thread
    starts draining, so that sender returns late and fails the test's PROMPT_S bound instead.
    """

    def __init__(self, reader: NotifySocket) -> None:
        self.reader = reader
        self.filled = fill(reader.sock.getsockname())
        assert self.filled > 0
        self._released = threading.Event()
        self._rescuer = threading.Thread(target=self._rescue, daemon=True)
        self._rescuer.start()

    def _rescue(self) -> None:
        if self._released.wait(RESCUE_AFTER_S):
            return
        while not self._released.is_set():
            if select.select([self.reader.sock], [], [], 0.05)[0]:
                with contextlib.suppress(BlockingIOError):
                    self.reader.sock.recv(65536, socket.MSG_DONTWAIT)

    def stop_rescuer(self) -> None:
        self._released.set()
        self._rescuer.join(5)

    def catch_up(self) -> None:
        """The reader reads its queue again: only the filler was in it."""
        self.stop_rescuer()
        assert self.reader.pending() == [FILLER] * self.filled


def returns_promptly(call: Callable[[], object]) -> None:
    started = time.monotonic()
    call()
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT_S, f"the call blocked for {elapsed:.2f}s"


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `predicate` on the running event loop until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s"
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def no_inherited_notify_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    with bind(str(path)) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield NotifySocket(sock)


@pytest.fixture
def full_queue(systemd: NotifySocket) -> Iterator[StuckReader]:
    stuck = StuckReader(systemd)
    yield stuck
    stuck.stop_rescuer()


def test_each_notification_is_one_datagram(systemd: NotifySocket) -> None:
    notifier = Notifier()
    notifier.ready()
    notifier.status("3 queued, relay smtp.example.com up")
    notifier.watchdog_ping()
    notifier.extend_timeout(12.5)
    notifier.stopping()

    assert [systemd.receive() for _ in range(5)] == [
        "READY=1", "STATUS=3 queued, relay smtp.example.com up", "WATCHDOG=1", "EXTEND_TIMEOUT_USEC=12500000",
        "STOPPING=1"]


def test_reloading_carries_the_monotonic_time(systemd: NotifySocket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    first, second = systemd.receive().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_is_one_line_of_utf8(systemd: NotifySocket) -> None:
    Notifier().status("relay down:\nconnection refused – retrying")

    assert systemd.receive() == "STATUS=relay down: connection refused – retrying"


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mailwatchd-test-{uuid.uuid4().hex}"
    with bind("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        Notifier().ready()

        assert sock.recv(100) == b"READY=1"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier()
    with structlog.testing.capture_logs() as logs:
        notifier.ready()
        notifier.status("x")
        notifier.watchdog_ping()

    assert notifier.send("READY=1") is False
    assert notifier.flush() is True
    assert notifier.pending == ()
    assert logs == []


def test_a_failing_socket_is_logged_once_and_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    notifier = Notifier()
    with structlog.testing.capture_logs() as logs:
        notifier.ready()
        notifier.status("secret-free status")
        notifier.watchdog_ping()

    assert [entry["event"] for entry in logs] == ["sd_notify_failed"]
    assert logs[0]["socket"] == str(tmp_path / "nobody-listens")
    assert logs[0]["state"] == "READY"


def test_a_replaced_socket_is_reconnected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier()
    with bind(str(path)) as first:
        notifier.ready()
        assert first.recv(100) == b"READY=1"
    path.unlink()  # the manager re-executed and bound its socket anew
    with bind(str(path)) as second:
        notifier.watchdog_ping()
        assert second.recv(100) == b"WATCHDOG=1"


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1234"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "99"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert notify.watchdog_interval(env, pid=1234) == expected


def test_watchdog_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval() == 1.0


def test_a_full_queue_neither_blocks_nor_raises(systemd: NotifySocket, full_queue: StuckReader) -> None:
    notifier = Notifier()
    with structlog.testing.capture_logs() as logs:
        returns_promptly(lambda: notifier.status("1 queued"))
        returns_promptly(notifier.ready)
        returns_promptly(notifier.watchdog_ping)

    assert notifier.pending == ("STATUS=1 queued", "READY=1", "WATCHDOG=1")
    assert logs == []


def test_flush_sends_what_is_pending_once_the_reader_catches_up(systemd: NotifySocket,
                                                               full_queue: StuckReader) -> None:
    notifier = Notifier()
    notifier.status("1 queued")
    assert notifier.send("READY=1") is False
    notifier.status("2 queued")
    assert notifier.flush() is False  # still full

    full_queue.catch_up()

    assert notifier.flush() is True
    assert notifier.pending == ()
    assert systemd.pending() == ["READY=1", "STATUS=2 queued"]
    assert notifier.send("STATUS=3 queued") is True
    assert systemd.receive() == "STATUS=3 queued"


def test_the_retry_timer_sends_what_is_pending_once_the_reader_catches_up(systemd: NotifySocket,
                                                                         full_queue: StuckReader) -> None:
    async def scenario() -> list[str]:
        notifier = Notifier()
        returns_promptly(lambda: notifier.status("1 queued"))
        returns_promptly(notifier.ready)
        notifier.status("2 queued")
        notifier.watchdog_ping()
        await asyncio.sleep(0.1)  # the reader stays behind for a few retries
        assert notifier.pending == ("READY=1", "STATUS=2 queued", "WATCHDOG=1")

        full_queue.catch_up()
        await until(lambda: not notifier.pending)
        return systemd.pending()

    assert asyncio.run(scenario()) == ["READY=1", "STATUS=2 queued", "WATCHDOG=1"]


def test_the_event_loop_keeps_running_while_the_queue_is_full(systemd: NotifySocket,
                                                              full_queue: StuckReader) -> None:
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.001)

    notifier = Notifier()

    async def scenario() -> None:
        task = asyncio.create_task(ticker())
        await until(lambda: ticks)
        notifier.ready()
        for queued in range(20):
            notifier.status(f"{queued} queued")
            notifier.watchdog_ping()
            await asyncio.sleep(0.01)
        ticks.append(time.monotonic())
        task.cancel()

    asyncio.run(scenario())
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:], strict=False)]
    assert max(gaps) < PROMPT_S, f"the event loop stood still for {max(gaps):.2f}s"
    assert len(ticks) > 20
    assert notifier.pending == ("READY=1", "STATUS=19 queued", "WATCHDOG=1")


def test_pending_notifications_keep_their_order_and_the_newest_of_each_kind(systemd: NotifySocket,
                                                                            full_queue: StuckReader) -> None:
    notifier = Notifier()
    notifier.watchdog_ping()
    notifier.reloading()
    notifier.extend_timeout(5)
    notifier.watchdog_ping()
    notifier.ready()
    notifier.ready()
    notifier.stopping()
    expected = ["RELOADING=1", "EXTEND_TIMEOUT_USEC=5000000", "WATCHDOG=1", "READY=1", "STOPPING=1"]
    assert [state.split("\n")[0] for state in notifier.pending] == expected

    full_queue.catch_up()

    assert notifier.flush() is True
    received = systemd.pending()
    assert [datagram.split("\n")[0] for datagram in received] == expected
    assert received[0].split("\n")[1].startswith("MONOTONIC_USEC=")


def test_pending_notifications_are_dropped_when_the_socket_goes_away(systemd: NotifySocket,
                                                                    full_queue: StuckReader) -> None:
    notifier = Notifier()
    returns_promptly(notifier.ready)
    notifier.status("1 queued")
    assert notifier.pending == ("READY=1", "STATUS=1 queued")
    full_queue.stop_rescuer()
    path = systemd.sock.getsockname()
    systemd.sock.close()  # the manager went away with its queue
    os.unlink(path)

    with structlog.testing.capture_logs() as logs:
        assert notifier.flush() is True

    assert not notifier.pending
    assert [(entry["event"], entry["state"]) for entry in logs] == [("sd_notify_failed", "READY")]
    with bind(path) as second:
        notifier.status("2 queued")
        assert second.recv(100) == b"STATUS=2 queued"


def test_the_retry_timer_backs_off_instead_of_spinning(systemd: NotifySocket, full_queue: StuckReader) -> None:
    async def scenario() -> tuple[float, float]:
        notifier = Notifier()
        notifier.ready()
        wall, cpu = time.monotonic(), time.process_time()
        await asyncio.sleep(0.5)  # the reader stays behind while the timer retries
        assert notifier.pending == ("READY=1",)
        return time.monotonic() - wall, time.process_time() - cpu

    wall, cpu = asyncio.run(scenario())
    assert cpu < wall / 2, f"{cpu:.2f}s of CPU in {wall:.2f}s"
