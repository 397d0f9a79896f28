"""Recovery's fast paths: settled files need no state read, a file with no state needs no look-up, and a
large new/ is claimed after READY=1. The crash cases themselves are in test_spool.py and test_crash.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailwatchd.spool import recovery as recovery_module
from mailwatchd.spool.messagestate import MessageState, State
from mailwatchd.spool.queueid import new_queue_id
from mailwatchd.spool.recovery import recover
from mailwatchd.spool.store import SETTLED_NS, Location, Spool, settled_time
from tests.conftest import SmtpServer, wait_until
from tests.daemonproc import DaemonProcess, drop, message, relay_env

MESSAGE = b"From: app@example.com\nTo: ann@example.org\nSubject: hi\n\nbody\n"


@pytest.fixture
def spool(spool_dir: Path) -> Spool:
    spool = Spool(spool_dir)
    spool.create_layout()
    return spool


def claimed(spool: Spool) -> str:
    queue_id = new_queue_id()
    (spool.dir(Location.QUEUE) / queue_id).write_bytes(MESSAGE)
    return queue_id


def mtime_ns(spool: Spool, location: Location, queue_id: str) -> int:
    return os.lstat(spool.dir(location) / queue_id).st_mtime_ns


def test_defer_and_fail_settle_the_file_with_its_due_time(spool: Spool) -> None:
    deferred, failed = claimed(spool), claimed(spool)
    assert spool.defer(MessageState(deferred, 1.0, next_attempt_at=4_000_000_000.1234), Location.QUEUE)
    assert settled_time(mtime_ns(spool, Location.DEFERRED, deferred)) == 4_000_000_000.123
    assert spool.fail(MessageState(failed, 1.0, reason="550"), Location.QUEUE)
    assert settled_time(mtime_ns(spool, Location.FAILED, failed)) is not None
    assert settled_time(mtime_ns(spool, Location.QUEUE, claimed(spool))) is None  # a plain file: no mark
    assert settled_time(SETTLED_NS + 10**9) == 1.0


def test_a_settled_deferred_file_is_scheduled_without_reading_its_state(spool: Spool) -> None:
    queue_id = claimed(spool)
    assert spool.defer(MessageState(queue_id, 1.0, next_attempt_at=9000.0), Location.QUEUE)
    # Made unreadable behind recovery's back: a state read would say "due now" (100.0).
    spool.meta_path(queue_id).write_bytes(b"not json")
    recovery = recover(spool, now=100.0)
    assert recovery.deferred == [(9000.0, queue_id)]
    assert spool.meta_path(queue_id).exists()  # its message is there: no orphan


def test_a_state_write_unsettles_first_so_an_interrupted_move_is_finished(spool: Spool) -> None:
    queue_id = claimed(spool)
    assert spool.defer(MessageState(queue_id, 1.0, next_attempt_at=9000.0), Location.QUEUE)
    # fail() writes the state, then moves: a crash between leaves this.
    spool.write_state(MessageState(queue_id, 1.0, State.FAILED, reason="550"))
    assert settled_time(mtime_ns(spool, Location.DEFERRED, queue_id)) is None
    recovery = recover(spool, now=100.0)
    assert (recovery.deferred, recovery.completed_moves, recovery.failed) == ([], 1, 1)
    assert spool.names(Location.FAILED) == [queue_id]


def test_an_older_spool_is_settled_by_its_first_recovery(spool: Spool) -> None:
    queue_id = new_queue_id()
    (spool.dir(Location.DEFERRED) / queue_id).write_bytes(MESSAGE)  # as an older mailwatchd left it
    spool.write_state(MessageState(queue_id, 1.0, State.DEFERRED, next_attempt_at=7000.0))
    assert recover(spool, now=100.0).deferred == [(7000.0, queue_id)]
    spool.meta_path(queue_id).write_bytes(b"not json")
    assert recover(spool, now=100.0).deferred == [(7000.0, queue_id)]  # from the mark alone


def test_with_more_meta_files_than_are_listed_in_memory_each_is_looked_up(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery_module, "META_NAMES_LIMIT", 1)
    plain = claimed(spool)
    deferred = claimed(spool)
    spool.write_state(MessageState(deferred, 1.0, State.DEFERRED, next_attempt_at=5000.0))  # then a crash
    failed = claimed(spool)
    assert spool.fail(MessageState(failed, 1.0, reason="550"), Location.QUEUE)
    orphan = new_queue_id()
    spool.write_state(MessageState(orphan, 1.0))
    recovery = recover(spool, now=100.0)
    assert (recovery.ready, recovery.deferred) == ([plain], [(5000.0, deferred)])
    assert (recovery.completed_moves, recovery.orphans_removed, recovery.failed) == (1, 1, 1)
    assert sorted(os.listdir(spool.meta)) == sorted(f"{queue_id}.json" for queue_id in (deferred, failed))


def test_handed_out_as_found_with_counts_and_strays(spool: Spool) -> None:
    ready = sorted(claimed(spool) for _ in range(3))
    (spool.dir(Location.QUEUE) / "not-an-id").write_bytes(MESSAGE)
    found: list[str] = []
    due: list[tuple[float, str]] = []
    recovery = recover(spool, now=100.0, ready=found.append, deferred=lambda at, queue_id: due.append((at, queue_id)))
    assert sorted(found) == ready and due == [] and recovery.ready == []
    assert (recovery.ready_count, recovery.deferred_count, recovery.strays) == (3, 0, ["not-an-id"])
    assert (spool.dir(Location.QUEUE) / "not-an-id").exists()  # left alone


def test_a_backlog_in_new_is_claimed_after_ready(smtp_server: SmtpServer, spool_dir: Path,
                                                 clean_env: dict[str, str]) -> None:
    count = 600
    for index in range(count):
        drop(spool_dir, message(index), f"drop{index:04d}")
    daemon = DaemonProcess(relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port)).start()
    try:
        ready = daemon.wait_ready(timeout=30).named("daemon_ready")[0]
        assert ready["queued"] == 0  # READY=1 did not wait for the claims
        wait_until(lambda: len(smtp_server.handler.messages) >= count, timeout=60,
                   message=f"all {count} messages delivered")
    finally:
        daemon.stop()
    assert sorted(os.listdir(spool_dir / "new")) == []


def test_delivered_files_a_kill_left_are_removed(spool: Spool) -> None:
    queue_id = claimed(spool)
    sent = spool.dir(Location.QUEUE) / f".sent-{queue_id}"
    os.rename(spool.dir(Location.QUEUE) / queue_id, sent)  # delivered, then killed before the reaper's unlink
    recovery = recover(spool, now=100.0)
    assert (recovery.ready, recovery.strays) == ([], [])
    assert not sent.exists()


@pytest.mark.parametrize("limit", [20_000, 1])  # meta/ listed in memory, or each meta file looked up
def test_the_orphan_sweep_can_run_later_in_steps(spool: Spool, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    monkeypatch.setattr(recovery_module, "META_NAMES_LIMIT", limit)
    kept = claimed(spool)
    spool.write_state(MessageState(kept, 1.0))
    orphans = sorted(new_queue_id() for _ in range(5))
    for orphan in orphans:
        spool.write_state(MessageState(orphan, 1.0))
    old_temporary = spool.meta / ".tmp-0123456789ABCDEF0123"
    old_temporary.write_bytes(b"half")
    os.utime(old_temporary, (1.0, 1.0))
    recovery = recover(spool, now=100.0, sweep=False)
    assert recovery.orphans_removed == 0 and recovery.sweep is not None
    states = sorted(name for name in os.listdir(spool.meta) if name.endswith(".json"))
    assert states == sorted(f"{queue_id}.json" for queue_id in [kept, *orphans])  # nothing swept yet
    young_temporary = spool.meta / ".tmp-tmp-being-written"  # a command's write begun after recovery started
    young_temporary.write_bytes(b"half")
    steps = sum(1 for _ in recovery.sweep.steps(chunk=2))
    assert steps >= 2  # it gave way between chunks
    assert recovery.sweep.removed == 5
    assert sorted(os.listdir(spool.meta)) == sorted([f"{kept}.json", young_temporary.name])


def test_a_sweep_meets_a_message_that_moved_since_recovery(spool: Spool) -> None:
    queue_id = claimed(spool)
    spool.write_state(MessageState(queue_id, 1.0))
    recovery = recover(spool, now=100.0, sweep=False)
    assert recovery.sweep is not None
    assert spool.defer(MessageState(queue_id, 1.0, next_attempt_at=5000.0), Location.QUEUE)  # the daemon went on
    assert recovery.sweep.run() == 0
    assert spool.load_state(queue_id) is not None


def test_states_whose_message_is_gone_are_removed_after_ready(smtp_server: SmtpServer, spool_dir: Path,
                                                             clean_env: dict[str, str]) -> None:
    spool = Spool(spool_dir)
    spool.create_layout()
    orphans = [new_queue_id() for _ in range(3)]
    for orphan in orphans:
        spool.write_state(MessageState(orphan, 1.0))
    daemon = DaemonProcess(relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port)).start()
    try:
        daemon.wait_ready(timeout=30)
        swept = daemon.wait_event("spool_orphans_removed")[0]
        assert swept["count"] == 3
        assert os.listdir(spool.meta) == []
        order = [event.get("event") for event in daemon.events]
        assert order.index("daemon_ready") < order.index("spool_orphans_removed")  # READY=1 did not wait for it
    finally:
        assert daemon.stop() == 0
