"""Idle costs nothing: the status file, STATUS= and the metrics come from the daemon's own counters,
are written only when something changed (or the heartbeat is due), never by listing the spool; the
watchdog is pinged only when systemd asked for it. A real daemon object in this process, started up
on a real spool with a real notify socket; its health tick is driven by hand (the main loop's job)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailwatchd.service import health as health_module
from mailwatchd.service.daemon import Daemon
from mailwatchd.service.scheduler import WorkItem
from mailwatchd.service.statusfile import Status, read_status
from mailwatchd.settings.config import Settings
from mailwatchd.spool.messagestate import MessageState
from mailwatchd.spool.queueid import new_queue_id
from mailwatchd.spool.store import Location, Spool
from tests.conftest import wait_until

MESSAGE = b"From: app@example.test\nTo: ops@example.test\nSubject: waiting\n\nbody\n"
HOUR_S = 3600.0


def defer_messages(root: Path, count: int, *, made_at: float) -> list[str]:
    """`count` messages in deferred/, not due for an hour, with ids made `made_at` (epoch seconds) onwards."""
    spool = Spool(root)
    spool.create_layout()
    ids = []
    for index in range(count):
        queue_id = new_queue_id(int((made_at + index) * 1e9))
        state = MessageState(queue_id, made_at + index, attempts=1, next_attempt_at=time.time() + HOUR_S)
        spool.add(MESSAGE, state, Location.DEFERRED)
        ids.append(queue_id)
    return ids


@pytest.fixture
def no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def started(tmp_path: Path, no_systemd: None) -> Iterator[Callable[[], Daemon]]:
    """`start()`: a daemon (outbox mode, no relay) past its start-up on tmp_path/spool, lock held."""
    daemons: list[Daemon] = []

    def start() -> Daemon:
        daemon = Daemon(Settings(spool=tmp_path / "spool", outbox=tmp_path / "outbox", concurrency=1))
        daemon.startup()
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.spool.release_lock()


def status_of(daemon: Daemon) -> tuple[int, Status]:
    """(inode, content) of the status file: a rewrite replaces the inode."""
    path = daemon.settings.status_path
    inode = os.stat(path).st_ino
    status = read_status(path)
    assert status is not None
    return inode, status


def test_an_idle_daemon_leaves_the_status_file_alone(tmp_path: Path, started: Callable[[], Daemon]) -> None:
    defer_messages(tmp_path / "spool", 20, made_at=time.time() - 600)
    daemon = started()
    daemon.health.tick()
    first = status_of(daemon)
    assert first[1]["queue"]["deferred"] == 20

    for _ in range(20):
        daemon.health.tick()

    assert status_of(daemon) == first, "rewritten although nothing changed"


def test_a_change_is_written_at_the_next_tick(tmp_path: Path, started: Callable[[], Daemon]) -> None:
    defer_messages(tmp_path / "spool", 3, made_at=time.time() - 600)
    daemon = started()
    daemon.health.tick()
    inode, _ = status_of(daemon)

    daemon.counters.delivered("outbox", 1.5)
    daemon.scheduler.add_ready(WorkItem(daemon.spool.new_id(), Location.QUEUE))
    daemon.health.tick()

    new_inode, status = status_of(daemon)
    assert new_inode != inode
    assert status["totals"]["delivered"] == 1
    assert status["queue"] == {"ready": 1, "deferred": 3, "failed": 0, "in_flight": 0}


def test_a_failure_an_operator_acknowledges_is_seen_without_a_change_in_the_daemon(
        tmp_path: Path, started: Callable[[], Daemon]) -> None:
    daemon = started()
    failed_id = daemon.spool.new_id()
    daemon.spool.add(MESSAGE, MessageState(failed_id, time.time(), reason="refused"), Location.FAILED)
    daemon.health.tick()
    assert status_of(daemon)[1]["failed_unacknowledged"] == 1

    Spool(tmp_path / "spool").acknowledge([failed_id])  # `mailwatchd ack`, another process's Spool

    def acknowledged() -> bool:
        daemon.health.tick()
        return status_of(daemon)[1]["failed_unacknowledged"] == 0

    wait_until(acknowledged, timeout=5, message="the acknowledgement in the status file")


def test_the_heartbeat_rewrites_an_unchanged_status(
        tmp_path: Path, started: Callable[[], Daemon], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health_module, "HEARTBEAT_S", 0.2)
    daemon = started()
    daemon.health.tick()
    _, first = status_of(daemon)

    def rewritten() -> bool:
        daemon.health.tick()
        return status_of(daemon)[1]["updated_at"] > first["updated_at"]

    wait_until(rewritten, timeout=5, message="a heartbeat rewrite")
    _, later = status_of(daemon)
    assert later["process"]["rss_bytes"] > 0 and later["process"]["open_fds"] > 0
    assert later["updated_at"] - first["updated_at"] < health_module.HEARTBEAT_S + 2


def test_the_heartbeat_comes_well_before_a_reader_calls_the_file_stale() -> None:
    from mailwatchd.service.daemon import MAIN_LOOP_PERIOD_S
    from mailwatchd.service.verdict import STALE_AFTER_S

    assert 2 * (health_module.HEARTBEAT_S + MAIN_LOOP_PERIOD_S) <= STALE_AFTER_S


def test_the_status_never_lists_the_spool(
        tmp_path: Path, started: Callable[[], Daemon], monkeypatch: pytest.MonkeyPatch) -> None:
    defer_messages(tmp_path / "spool", 5, made_at=time.time() - 600)
    daemon = started()
    settled = time.time() - 60  # failed/ is listed again only after it changed (Spool.failed_counts)
    os.utime(tmp_path / "spool" / "failed", (settled, settled))
    daemon.health.tick()  # the first status counts failed/ once
    listed: list[str] = []
    real_listdir, real_scandir = os.listdir, os.scandir

    def listdir(path: Any = ".") -> list[str]:
        listed.append(str(path))
        return real_listdir(path)

    def scandir(path: Any = ".") -> Any:
        listed.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "scandir", scandir)
    daemon.health.refresh()
    daemon.health.tick()
    daemon.counters.delivered("outbox", 1.0)
    daemon.health.tick()

    assert [path for path in listed if path.startswith(str(tmp_path / "spool"))] == []
    assert status_of(daemon)[1]["queue"]["deferred"] == 5


def test_the_oldest_age_is_the_oldest_message_the_scheduler_holds(
        tmp_path: Path, started: Callable[[], Daemon]) -> None:
    made_at = time.time() - 2 * HOUR_S
    defer_messages(tmp_path / "spool", 4, made_at=made_at)
    daemon = started()
    daemon.health.tick()

    _, status = status_of(daemon)
    assert status["oldest_age_s"] is not None
    assert 2 * HOUR_S - 5 <= status["oldest_age_s"] <= 2 * HOUR_S + 5


def test_no_oldest_age_when_nothing_waits(started: Callable[[], Daemon]) -> None:
    daemon = started()
    daemon.health.tick()
    assert status_of(daemon)[1]["oldest_age_s"] is None


def receive_all(sock: socket.socket) -> list[str]:
    received = []
    while True:
        try:
            received.append(sock.recv(65536).decode())
        except BlockingIOError:
            return received


@pytest.mark.parametrize("watchdog_usec", [None, "10000000"])
def test_the_watchdog_is_pinged_only_when_systemd_asks_for_it(
        tmp_path: Path, started: Callable[[], Daemon], monkeypatch: pytest.MonkeyPatch,
        watchdog_usec: str | None) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        if watchdog_usec is not None:
            monkeypatch.setenv("WATCHDOG_USEC", watchdog_usec)
        daemon = started()
        for _ in range(3):
            daemon.health.tick()

        received = receive_all(sock)

    assert any(text.startswith("STATUS=") for text in received), received
    pings = [text for text in received if text == "WATCHDOG=1"]
    assert len(pings) == (0 if watchdog_usec is None else 3), received
