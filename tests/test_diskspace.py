"""A full spool is visible and survivable: on a real small filesystem (a tmpfs mounted for the test), the
daemon starts degraded on a spool with no room left (READY, a DEGRADED status, watchdog pings go on),
delivers what was queued, leaves new drops waiting in new/, and claims them by itself once room returns."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailwatchd.service.diskspace import MIN_FREE_INODES, SpoolSpace, measure, shown_size
from mailwatchd.spool.queueid import new_queue_id
from mailwatchd.spool.store import Spool
from tests.conftest import SmtpServer, wait_until
from tests.daemonproc import DaemonProcess, drop, message, relay_env, spool_names

MIN_FREE = 1024 * 1024
FS_SIZE = "4m"


def mount_tmpfs(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem for the spool needs root")
    path.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted at teardown (lazily, should a process still hold it)."""
    path = tmp_path / "spool"
    mount_tmpfs(path, f"size={FS_SIZE},mode=0700")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path, *, leave: int = 0) -> Path:
    """A filler file taking all free space but `leave` bytes (0: until the filesystem says ENOSPC)."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb") as stream:
        try:
            while measure(directory).free_bytes > leave:
                stream.write(chunk[:max(min(len(chunk), measure(directory).free_bytes - leave), 1)])
                stream.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC and leave == 0, exc
    assert measure(directory).free_bytes <= leave
    return filler


# -- the decision, in this process -----------------------------------------------------------------------

def test_shown_size_reads_as_an_operator_writes_it() -> None:
    assert [shown_size(n) for n in (512, 3 * 1024 * 1024 + 100 * 1024, 50 * 1024 * 1024, 5 * 2**30)] == [
        "512 B", "3.1 MiB", "50 MiB", "5 GiB"]


def test_degraded_below_the_threshold_and_back_when_room_returns(small_fs: Path) -> None:
    spool = Spool(small_fs)
    spool.create_layout()
    changes: list[str | None] = []
    space = SpoolSpace(spool, min_free=lambda: MIN_FREE, on_change=changes.append)
    assert space.check() is None and changes == []

    filler = fill(small_fs, leave=256 * 1024)
    reason = space.check()
    assert reason is not None and reason.startswith("spool full: ")
    assert f"free on {small_fs}, below MAILWATCHD_SPOOL_MIN_FREE (1 MiB); new mail waits in new/, deliveries " \
           "continue" in reason
    space.check()
    assert changes == [reason]  # one transition, however often it is checked

    filler.unlink()
    assert space.check() is None
    assert changes == [reason, None]


def test_a_full_write_degrades_at_once_and_a_passing_test_write_ends_it(small_fs: Path) -> None:
    spool = Spool(small_fs)
    spool.create_layout()
    changes: list[str | None] = []
    space = SpoolSpace(spool, min_free=lambda: 1024, on_change=changes.append)
    filler = fill(small_fs)  # nothing left: a test write fails with ENOSPC
    assert space.probe() is None  # no room is not a fault of the daemon's...
    assert space.degraded is not None and "spool full" in space.degraded  # ...it is degraded
    assert changes == [space.degraded]
    filler.unlink()
    assert space.check() is None
    assert changes[-1] is None

    # A write that reported ENOSPC a moment ago, though there is room now: the test write decides.
    space.saw_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert space.degraded is None and len(changes) == 2


def test_few_free_inodes_count_as_full(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    mount_tmpfs(root, f"size={FS_SIZE},nr_inodes={MIN_FREE_INODES + 40}")
    try:
        spool = Spool(root)
        spool.create_layout()
        space = SpoolSpace(spool, min_free=lambda: 1024, on_change=lambda _: None)
        assert space.check() is None
        for index in range(60):
            (root / f"empty-{index}").touch()
        reason = space.check()
        assert reason is not None and "free inodes" in reason
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


def test_a_read_only_spool_is_a_fault_not_a_full_disk(small_fs: Path) -> None:
    spool = Spool(small_fs)
    spool.create_layout()
    space = SpoolSpace(spool, min_free=lambda: 1024, on_change=lambda _: None)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    problem = space.probe()
    assert problem is not None and "Read-only file system" in problem
    assert space.degraded is None


# -- the daemon ------------------------------------------------------------------------------------------

class NotifyReader:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket; keeps every datagram."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self._lock:
                self.received.append(data.decode())

    def lines(self) -> list[str]:
        with self._lock:
            return [line for datagram in self.received for line in datagram.splitlines()]

    def statuses(self) -> list[str]:
        return [line.removeprefix("STATUS=") for line in self.lines() if line.startswith("STATUS=")]

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def notify_reader(tmp_path: Path) -> Iterator[NotifyReader]:
    reader = NotifyReader(tmp_path / "notify.sock")
    yield reader
    reader.close()


def test_a_full_spool_starts_degraded_delivers_the_queue_and_resumes_when_room_returns(
        small_fs: Path, tmp_path: Path, smtp_server: SmtpServer, clean_env: dict[str, str],
        notify_reader: NotifyReader, daemons: Any) -> None:
    spool, status_file = small_fs, tmp_path / "status.json"
    env = relay_env(clean_env, spool, smtp_server.host, smtp_server.port, MAILWATCHD_SPOOL_MIN_FREE="1M",
                    MAILWATCHD_STATUS_FILE=str(status_file), NOTIFY_SOCKET=str(notify_reader.path),
                    WATCHDOG_USEC="1000000")  # a main-loop tick (and a ping) every 0.5 s
    first = daemons(env)  # an earlier run: the spool's layout and lock file exist, as on any restart
    assert first.stop() == 0

    queued_id = new_queue_id()
    (spool / "queue" / queued_id).write_bytes(message(1))  # claimed by the earlier run, not yet delivered
    drop(spool, message(2), "waiting-drop")
    filler = fill(spool)  # not a byte left: every write into the spool fails with ENOSPC
    pings_before = notify_reader.lines().count("WATCHDOG=1")

    daemon = DaemonProcess(env).start()
    try:
        daemon.wait_ready()
        [full] = daemon.wait_event("spool_full")
        assert full["free_bytes"] == 0 and full["min_free_bytes"] == MIN_FREE and full["waiting_in_new"] == 1
        assert notify_reader.lines().count("READY=1") == 2  # the earlier run's, and this one's
        wait_until(lambda: any(s.startswith("DEGRADED: spool full: 0 B free on") for s in notify_reader.statuses()),
                   message="STATUS=DEGRADED: spool full ...")

        # What was queued goes out; what waits in new/ stays there.
        daemon.wait_event("message_delivered", lambda e: e["queue_id"] == queued_id)
        assert [m.data.count(b"Subject: test 1") for m in smtp_server.handler.messages] == [1]
        wait_until(lambda: notify_reader.lines().count("WATCHDOG=1") >= pings_before + 4,
                   message="watchdog pings while degraded")
        assert spool_names(spool, "new", "queue") == {"new": ["waiting-drop"], "queue": []}
        status = json.loads(status_file.read_text())
        assert status["healthy"] is True and status["problem"] is None
        assert status["degraded"].startswith("spool full: ") and "deliveries continue" in status["degraded"]
        assert daemon.named("daemon_unhealthy") == [] and daemon.named("message_queued") == []

        filler.unlink()
        daemon.wait_event("spool_space_recovered", timeout=5)
        received = smtp_server.handler.wait_for(2)
        assert b"Subject: test 2" in received[1].data
        wait_until(lambda: json.loads(status_file.read_text())["degraded"] is None, message="degraded cleared")
        wait_until(lambda: not notify_reader.statuses()[-1].startswith("DEGRADED"), message="STATUS without DEGRADED")
        assert daemon.proc is not None and daemon.proc.poll() is None  # the same process: no restart
        assert len(daemon.named("spool_full")) == 1
        wait_until(lambda: not any(spool_names(spool, "new", "queue", "deferred", "failed").values()),
                   message="the spool drained, nothing failed")
    finally:
        assert daemon.stop() == 0


def test_a_first_start_on_a_spool_with_no_free_block_still_starts_degraded(
        small_fs: Path, smtp_server: SmtpServer, clean_env: dict[str, str], daemons: Any) -> None:
    spool = small_fs
    Spool(spool).create_layout()  # as tmpfiles leaves it: no daemon ever ran, so there is no lock file yet
    assert not (spool / "mailwatchd.lock").exists()
    filler = fill(spool)
    env = relay_env(clean_env, spool, smtp_server.host, smtp_server.port, MAILWATCHD_SPOOL_MIN_FREE="1M",
                    MAILWATCHD_STATUS_FILE=str(spool.parent / "status.json"))
    daemon = daemons(env)  # READY, not exit 73: the lock holds even where its pid could not be written
    [full] = daemon.wait_event("spool_full")
    assert full["free_bytes"] == 0
    filler.unlink()
    daemon.wait_event("spool_space_recovered", timeout=10)
    drop(spool, message(1), "after-room")
    smtp_server.handler.wait_for(1)
