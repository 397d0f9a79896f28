"""Deferred messages' due times are read after READY=1 (recovery.DeferredLoad): before it only deferred/'s
names are listed, so the counts are right at once; the load then reads each file as the full recovery scan
would, a chunk per turn of the daemon's event loop, while the daemon goes on. Recovery itself, the full scan,
and its crash cases are in test_recovery.py, test_spool.py and test_crash.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from mailwatchd.service.daemon import Daemon
from mailwatchd.service.scheduler import WorkItem
from mailwatchd.service.statusfile import Status, read_status
from mailwatchd.settings.config import load_settings
from mailwatchd.spool import recovery as recovery_module
from mailwatchd.spool.messagestate import MessageState, State
from mailwatchd.spool.queueid import new_queue_id, queue_id_time
from mailwatchd.spool.queueview import list_entries
from mailwatchd.spool.recovery import recover
from mailwatchd.spool.store import Location, Requeue, Spool, settled_time
from tests.conftest import SmtpServer, wait_until
from tests.daemonproc import DaemonProcess, relay_env

MESSAGE = b"From: app@example.com\nTo: ann@example.org\nSubject: later\n\nbody\n"
HOUR_S = 3600.0
NOW = 100.0  # recovery's "now" in the in-process recoveries


def fill_deferred(root: Path, dues: list[float]) -> list[str]:
    """Messages in deferred/ with their state, settled at their due times as the daemon leaves them; written
    without fsync (a test's spool need not survive a power cut). Ids oldest first, in the order of `dues`."""
    spool = Spool(root)
    spool.create_layout()
    start_ns = time.time_ns() - 10**12  # made a quarter of an hour ago, a microsecond apart
    ids = []
    for index, due in enumerate(dues):
        queue_id = new_queue_id(start_ns + index * 1000)
        state = MessageState(queue_id, queue_id_time(queue_id), State.DEFERRED, attempts=1, next_attempt_at=due)
        spool.meta_path(queue_id).write_bytes(state.to_json())
        (spool.dir(Location.DEFERRED) / queue_id).write_bytes(MESSAGE)
        spool.settled(queue_id, Location.DEFERRED, due)
        ids.append(queue_id)
    return ids


# -- the pieces: recover(lazy_deferred=True) and DeferredLoad --------------------------------------------


def mixed_spool(root: Path) -> dict[str, str]:
    """Every kind of file recovery meets in deferred/ (and one of each elsewhere), by what it is."""
    spool = Spool(root)
    spool.create_layout()
    ids: dict[str, str] = {}

    def put(kind: str, location: Location) -> str:
        queue_id = ids[kind] = new_queue_id()
        (spool.dir(location) / queue_id).write_bytes(MESSAGE)
        return queue_id

    for kind, due in (("later", 9000.0), ("past", 50.0)):
        assert spool.defer(MessageState(put(kind, Location.QUEUE), 1.0, next_attempt_at=due), Location.QUEUE)
    # An older mailwatchd's deferred file: its state says when, its mtime does not.
    spool.write_state(MessageState(put("unsettled", Location.DEFERRED), 1.0, State.DEFERRED, next_attempt_at=7000.0))
    spool.write_state(MessageState(put("no_due_time", Location.DEFERRED), 1.0, State.DEFERRED))
    # fail() and requeue() write the state, then move: a crash between leaves these.
    for kind, state in (("failing", State.FAILED), ("requeued", State.QUEUED)):
        queue_id = put(kind, Location.QUEUE)
        assert spool.defer(MessageState(queue_id, 1.0, next_attempt_at=8000.0), Location.QUEUE)
        spool.write_state(MessageState(queue_id, 1.0, state, reason="550 no" if state is State.FAILED else None))
    put("stateless", Location.DEFERRED)
    put("ready", Location.QUEUE)
    put("ready_too", Location.QUEUE)
    spool.write_state(MessageState(put("attempted", Location.QUEUE), 1.0))  # has a state, stays ready
    # defer() interrupted: the state says deferred/, the file is still in queue/.
    spool.write_state(MessageState(put("deferring", Location.QUEUE), 1.0, State.DEFERRED, next_attempt_at=4242.0))
    (spool.dir(Location.QUEUE) / "queue-stray").write_bytes(MESSAGE)
    (spool.dir(Location.QUEUE) / ".tmp-4567").write_bytes(b"half")
    assert spool.fail(MessageState(put("failed", Location.QUEUE), 1.0, reason="550 no"), Location.QUEUE)
    (spool.dir(Location.DEFERRED) / "not-an-id").write_bytes(MESSAGE)
    (spool.dir(Location.DEFERRED) / ".tmp-0123").write_bytes(b"half")
    return ids


def layout(root: Path) -> dict[str, list[tuple[str, float | None]]]:
    """Every directory's names, and what each file's mtime says (its due time when settled)."""
    return {directory: sorted((name, settled_time(os.lstat(root / directory / name).st_mtime_ns))
                              for name in os.listdir(root / directory))
            for directory in ("new", "queue", "deferred", "failed", "meta")}


@pytest.mark.parametrize(("limit", "batch"), [(20_000, 4096), (20_000, 3), (1, 3)])  # meta/ listed in memory or not
def test_a_lazy_recovery_and_its_load_end_where_the_full_scan_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, batch: int) -> None:
    monkeypatch.setattr(recovery_module, "META_NAMES_LIMIT", limit)
    monkeypatch.setattr(recovery_module, "NAME_BATCH", batch)
    ids = mixed_spool(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "lazy", symlinks=True)  # mtimes (the marks) kept to the ns
    full = recover(Spool(tmp_path / "full"), now=NOW)

    lazy = recover(Spool(tmp_path / "lazy"), now=NOW, lazy_deferred=True)
    load = lazy.deferred_load
    assert load is not None
    loaded: list[tuple[float, str]] = []
    gone: list[str] = []
    load.run(lambda due, queue_id: loaded.append((due, queue_id)), gone.append)

    assert sorted(lazy.deferred + loaded) == full.deferred
    assert lazy.ready == full.ready == sorted([ids["ready"], ids["ready_too"], ids["attempted"]])
    assert sorted(lazy.strays) == sorted(full.strays) == ["not-an-id", "queue-stray"]
    assert sorted(gone) == sorted([ids["failing"], ids["requeued"]])  # their moves finished by the load
    assert lazy.completed_moves + load.completed_moves == full.completed_moves == 3
    assert lazy.failed + load.failed == full.failed == 2
    assert lazy.deferred_count - len(gone) == full.deferred_count == len(full.deferred) == 6
    assert (load.loaded, load.gone, load.error_count) == (len(loaded), len(gone), 0)
    assert layout(tmp_path / "lazy") == layout(tmp_path / "full")
    assert {(9000.0, ids["later"]), (4242.0, ids["deferring"]), (NOW, ids["no_due_time"])} <= set(full.deferred)


def test_before_the_load_deferred_is_only_listed(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    dues = [NOW + HOUR_S + index for index in range(30)]
    ids = fill_deferred(spool_dir, dues)
    failing = ids[7]
    spool.write_state(MessageState(failing, 1.0, State.FAILED, reason="550 no"))  # fail() interrupted
    for queue_id in ids:
        spool.meta_path(queue_id).chmod(0)  # a state read would fail: none is made before the load

    recovery = recover(spool, now=NOW, lazy_deferred=True)
    load = recovery.deferred_load
    assert load is not None
    assert (recovery.deferred, recovery.deferred_count, recovery.completed_moves) == ([], 30, 0)
    assert (load.count, load.oldest) == (30, min(ids))
    assert failing in spool.names(Location.DEFERRED)  # its move is the load's to finish

    for queue_id in ids:
        spool.meta_path(queue_id).chmod(0o600)
    loaded: dict[str, float] = {}
    steps = sum(1 for _ in load.steps(lambda due, queue_id: loaded.__setitem__(queue_id, due), lambda _: None,
                                      chunk=4))
    assert steps == 7  # gave way after every 4 of 30
    assert loaded == {queue_id: due for queue_id, due in zip(ids, dues, strict=True) if queue_id != failing}
    assert (load.completed_moves, load.failed) == (1, 1)
    assert spool.names(Location.FAILED) == [failing]


def test_files_a_command_moved_since_the_listing_are_gone_for_the_load(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    ids = fill_deferred(spool_dir, [NOW + HOUR_S] * 4)
    recovery = recover(spool, now=NOW, lazy_deferred=True)
    assert recovery.deferred_load is not None
    assert spool.requeue(ids[0]) is Requeue.REQUEUED  # an operator's requeue: back to new/
    assert spool.delete(ids[1]) == Location.DEFERRED.value
    loaded: list[str] = []
    gone: list[str] = []
    recovery.deferred_load.run(lambda _, queue_id: loaded.append(queue_id), gone.append)
    assert (sorted(loaded), sorted(gone)) == (ids[2:], ids[:2])
    assert os.listdir(spool.new) == [ids[0]]  # left to the claim that follows


def test_a_spool_with_nothing_deferred_has_no_load(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    spool.create_layout()
    (spool.dir(Location.DEFERRED) / new_queue_id()).write_bytes(MESSAGE)  # no state: due now, before READY=1
    recovery = recover(spool, now=NOW, lazy_deferred=True)
    assert (recovery.deferred_load, recovery.deferred_count, len(recovery.deferred)) == (None, 1, 1)


# -- the daemon, in this process: a real Daemon on a real spool, its outbox as the relay -----------------


@pytest.fixture
def outbox_env(tmp_path: Path, spool_dir: Path, clean_env: dict[str, str],
               monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(recovery_module, "LOAD_CHUNK", 5)  # a load of a few hundred takes many turns
    return {**clean_env, "MAILWATCHD_SPOOL": str(spool_dir), "MAILWATCHD_OUTBOX": str(tmp_path / "outbox"),
            "MAILWATCHD_CONCURRENCY": "2", "MAILWATCHD_SHUTDOWN_GRACE": "5s"}


def outboxed(env: dict[str, str]) -> int:
    """Messages delivered to the outbox Maildir."""
    new = Path(env["MAILWATCHD_OUTBOX"]) / "new"
    return len(os.listdir(new)) if new.is_dir() else 0


async def eventually(predicate: Callable[[], object], message: str, timeout: float = 10.0) -> None:
    """Poll on the event loop, a turn or 10 ms at a time, until `predicate` holds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {message}") from None


async def mid_load(daemon: Daemon, total: int) -> None:
    """Until the load has begun and not ended: one turn at a time (it loads one chunk a turn)."""
    async with asyncio.timeout(10):
        while not (daemon.scheduler.loading and daemon.scheduler.pending_deferred < total):
            await asyncio.sleep(0)


def run_daemon(env: dict[str, str], during: Callable[[Daemon], Awaitable[None]]) -> tuple[Daemon, int]:
    """Run a Daemon in this process; `during(daemon)` runs beside it, then SIGTERM; (daemon, exit status)."""
    daemon = Daemon(load_settings(None, env), environ=env)

    async def scenario() -> int:
        task = asyncio.create_task(daemon.run())
        try:
            await asyncio.sleep(0)  # run() is past start-up and READY=1 at its first wait
            await during(daemon)
        finally:
            if not task.done():
                signal.raise_signal(signal.SIGTERM)
        return await asyncio.wait_for(task, 15)

    return daemon, asyncio.run(scenario())


def test_due_messages_are_delivered_after_the_load_and_the_others_wait(
        spool_dir: Path, outbox_env: dict[str, str]) -> None:
    now = time.time()
    dues = [now + HOUR_S + index for index in range(200)]
    dues[150] = dues[40] = now - 60  # due a minute ago
    ids = fill_deferred(spool_dir, dues)
    at_ready: list[tuple[int, Status | None, Status]] = []
    after: list[tuple[int, int, WorkItem | None, Status]] = []

    async def during(daemon: Daemon) -> None:
        scheduler = daemon.scheduler
        # Nothing loaded yet; the status file was written at READY=1.
        at_ready.append((scheduler.pending_deferred, read_status(daemon.settings.status_path),
                         daemon.health.snapshot()))
        await eventually(lambda: not scheduler.loading and outboxed(outbox_env) == 2, "the due two delivered")
        await eventually(lambda: daemon.counters.in_flight == 0, "the attempts settled")
        # take_nowait() promotes whatever is due now: nothing else is.
        after.append((scheduler.ready_count, scheduler.deferred_count, scheduler.take_nowait(),
                      daemon.health.snapshot()))

    _, code = run_daemon(outbox_env, during)
    assert code == 0
    oldest_age = time.time() - queue_id_time(ids[0])
    pending, written, snapshot = at_ready[0]
    assert pending == 200
    for status in (written, snapshot):
        assert status is not None
        assert (status["queue"]["deferred"], status["queue"]["ready"]) == (200, 0)
        assert status["oldest_age_s"] == pytest.approx(oldest_age, abs=30)
    ready, deferred, due_now, snapshot = after[0]
    assert (ready, deferred, due_now) == (0, 198, None)
    assert snapshot["oldest_age_s"] == pytest.approx(oldest_age, abs=30)
    assert outboxed(outbox_env) == 2
    assert Spool(spool_dir).names(Location.DEFERRED) == sorted(set(ids) - {ids[40], ids[150]})


def test_a_stop_during_the_load_exits_cleanly_and_the_next_start_loads_all(
        spool_dir: Path, outbox_env: dict[str, str]) -> None:
    dues = [time.time() + HOUR_S + index for index in range(300)]
    ids = fill_deferred(spool_dir, dues)
    seen: dict[str, int] = {}

    async def during(daemon: Daemon) -> None:
        await mid_load(daemon, 300)
        seen["pending"] = daemon.scheduler.pending_deferred
        listed = list_entries(Spool(spool_dir))  # `mailwatchd queue` (mailq) reads the spool, not the daemon
        seen["listed"] = sum(entry["state"] == "deferred" and entry["next_attempt_at"] is not None
                             for entry in listed)

    daemon, code = run_daemon(outbox_env, during)
    assert code == 0
    assert 0 < seen["pending"] < 300
    assert seen["listed"] == 300
    assert daemon.scheduler.loading  # cut short, not finished
    spool = Spool(spool_dir)
    assert spool.running_pid() is None  # the lock went with the daemon
    assert spool.names(Location.DEFERRED) == ids
    for queue_id, due in zip(ids, dues, strict=True):  # untouched: nothing was attempted
        assert settled_time(os.lstat(spool.dir(Location.DEFERRED) / queue_id).st_mtime_ns) == \
            pytest.approx(due, abs=0.001)

    again = Daemon(load_settings(None, outbox_env), environ=outbox_env)
    again.startup()
    try:
        assert again.scheduler.deferred_count == 300
    finally:
        again.spool.release_lock()


def test_a_requeue_during_the_load_sends_the_message_once(spool_dir: Path, outbox_env: dict[str, str]) -> None:
    ids = fill_deferred(spool_dir, [time.time() + HOUR_S] * 300)
    requeued: list[str] = []

    async def during(daemon: Daemon) -> None:
        scheduler, spool = daemon.scheduler, daemon.spool
        await mid_load(daemon, 300)
        # One the load has not come to yet (the scheduler does not know it): as `mailwatchd requeue` does it.
        waiting = next(queue_id for queue_id in reversed(ids) if not scheduler.knows(queue_id))
        assert spool.requeue(waiting) is Requeue.REQUEUED
        requeued.append(waiting)
        await eventually(lambda: outboxed(outbox_env) == 1 and not scheduler.loading, "the requeued one sent")
        await eventually(lambda: daemon.counters.in_flight == 0, "the attempt settled")

    daemon, code = run_daemon(outbox_env, during)
    assert code == 0
    assert (daemon.scheduler.deferred_count, daemon.scheduler.ready_count) == (299, 0)
    assert not daemon.scheduler.knows(requeued[0])
    assert Spool(spool_dir).locate(requeued[0]) is None
    assert outboxed(outbox_env) == 1


def test_a_flush_during_the_load_sends_every_deferred_message(spool_dir: Path, outbox_env: dict[str, str]) -> None:
    fill_deferred(spool_dir, [time.time() + HOUR_S] * 100)

    async def during(daemon: Daemon) -> None:
        await mid_load(daemon, 100)
        signal.raise_signal(signal.SIGUSR1)  # what `mailwatchd flush` (sendmail -q) sends
        await eventually(lambda: outboxed(outbox_env) == 100, "all 100 sent", timeout=30)

    daemon, code = run_daemon(outbox_env, during)
    assert code == 0
    assert Spool(spool_dir).names(Location.DEFERRED) == []
    assert daemon.scheduler.deferred_count == 0


def test_a_reload_during_the_load_loses_nothing(spool_dir: Path, outbox_env: dict[str, str]) -> None:
    now = time.time()
    dues = [now + HOUR_S] * 200
    dues[-1] = now - 60
    fill_deferred(spool_dir, dues)

    async def during(daemon: Daemon) -> None:
        await mid_load(daemon, 200)
        signal.raise_signal(signal.SIGHUP)
        await eventually(lambda: not daemon.scheduler.loading and outboxed(outbox_env) == 1, "the due one sent")
        await eventually(lambda: daemon.counters.in_flight == 0, "the attempt settled")

    daemon, code = run_daemon(outbox_env, during)
    assert code == 0
    assert (daemon.scheduler.deferred_count, daemon.scheduler.ready_count) == (199, 0)


# -- a real daemon process ---------------------------------------------------------------------------------


def test_a_daemon_process_sends_what_is_due_after_ready_and_keeps_the_rest(
        smtp_server: SmtpServer, spool_dir: Path, clean_env: dict[str, str]) -> None:
    now = time.time()
    dues = [now + HOUR_S + index for index in range(1500)]
    dues[1234] = now - 60
    ids = fill_deferred(spool_dir, dues)
    daemon = DaemonProcess(relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port)).start()
    try:
        ready = daemon.wait_ready(timeout=30).named("daemon_ready")[0]
        assert ready["queued"] == 1500  # counted before READY=1, loaded after
        loaded = daemon.wait_event("deferred_loaded")[0]
        assert (loaded["count"], loaded["gone"]) == (1500, 0)
        order = [event.get("event") for event in daemon.events]
        assert order.index("daemon_ready") < order.index("deferred_loaded")
        try:
            smtp_server.handler.wait_for(1, timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the daemon's log:\n{daemon.tail(80)}") from None
        daemon.wait_event("drain_finished", lambda event: event["delivered"] == 1 and event["waiting"] == 1499)
    finally:
        assert daemon.stop() == 0
    assert len(smtp_server.handler.messages) == 1
    assert b"Subject: later" in smtp_server.handler.messages[0].data
    spool = Spool(spool_dir)
    assert spool.names(Location.DEFERRED) == sorted(set(ids) - {ids[1234]})
    wait_until(lambda: not spool.meta_path(ids[1234]).exists(), message="its state removed")
