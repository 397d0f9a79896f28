"""notify: sd_notify messages on a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from mailwatchd import notify
from mailwatchd.notify import Notifier, WatchdogGate


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

    assert notifier.enabled is False
    assert notifier.send("READY=1") is False
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


class TestWatchdogGate:
    """interval 10 s: pings at most every 5 s, only after an iteration completed within the last 10 s."""

    def test_pings_on_beats_at_most_every_half_interval(self, systemd: NotifySocket) -> None:
        gate = WatchdogGate(Notifier(), interval=10.0)

        sent = [gate.beat(now) for now in (100.0, 101.0, 104.9, 105.0, 107.0, 110.5)]

        assert sent == [True, False, False, True, False, True]
        assert systemd.pending() == ["WATCHDOG=1"] * 3

    def test_no_ping_before_the_first_iteration_or_after_the_loop_stalls(self, systemd: NotifySocket) -> None:
        gate = WatchdogGate(Notifier(), interval=10.0)
        assert gate.maybe_ping(100.0) is False

        gate.note_iteration(100.0)
        assert gate.maybe_ping(100.0) is True
        assert gate.maybe_ping(110.5) is False  # the last iteration is 10.5 s old: the loop is stuck
        assert gate.reason is not None and "iteration" in gate.reason
        assert systemd.pending() == ["WATCHDOG=1"]

    def test_a_stuck_reason_withholds_pings_until_it_clears(self, systemd: NotifySocket) -> None:
        stuck: list[str | None] = ["worker 0 has been in one delivery for 400s"]
        gate = WatchdogGate(Notifier(), interval=10.0)
        gate.set_stuck_check(lambda: stuck[0])

        assert gate.beat(100.0) is False
        assert gate.reason == "worker 0 has been in one delivery for 400s"
        stuck[0] = None
        assert gate.beat(101.0) is True
        assert gate.reason is None
        assert systemd.pending() == ["WATCHDOG=1"]

    def test_takes_the_interval_from_the_environment(self, systemd: NotifySocket,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        clock = iter([50.0, 50.5, 51.0])
        gate = WatchdogGate(Notifier(), clock=lambda: next(clock))

        assert gate.interval == 2.0
        assert [gate.beat(), gate.beat(), gate.beat()] == [True, False, True]

    def test_without_a_watchdog_it_never_pings(self, systemd: NotifySocket) -> None:
        gate = WatchdogGate(Notifier())

        assert gate.interval is None
        assert gate.beat(1.0) is False
        assert systemd.pending() == []
