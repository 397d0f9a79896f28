"""The spool: claiming untrusted drops, safe reads, write-ahead state, recovery, the lock."""

from __future__ import annotations

import contextlib
import errno
import json
import mailbox
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from mailwatchd.errors import RefusedSpoolEntry, SpoolFull, SpoolLocked
from mailwatchd.message import envelope
from mailwatchd.spool.durable import install_durably, write_durably
from mailwatchd.spool.messagestate import Attempt, MessageState, State
from mailwatchd.spool.queueid import is_queue_id, new_queue_id
from mailwatchd.spool.recovery import recover
from mailwatchd.spool.store import (
    STALE_TMP_SECONDS,
    Claimed,
    Location,
    Pending,
    Refused,
    Requeue,
    Spool,
    describe_non_regular,
)
from mailwatchd.submission.submit import enqueue

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 1024
MESSAGE = b"From: app@example.com\nTo: ann@example.org\nSubject: hi\n\nbody\n"


@pytest.fixture
def spool(spool_dir: Path) -> Spool:
    spool = Spool(spool_dir, max_message_size=LIMIT)
    spool.create_layout()
    return spool


def drop(spool: Spool, name: str, data: bytes = MESSAGE) -> Path:
    path = spool.new / name
    path.write_bytes(data)
    return path


def listing(spool: Spool) -> dict[str, list[str]]:
    """Every spool directory's entries, dot files included."""
    return {name: sorted(os.listdir(spool.root / name))
            for name in ("tmp", "new", "queue", "deferred", "failed", "meta")}


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# -- layout ---------------------------------------------------------------------------------------


def test_create_layout(spool_dir: Path) -> None:
    root = spool_dir / "deep" / "spool"
    Spool(root).create_layout()
    for name in ("tmp", "new", "queue", "deferred", "failed", "meta"):
        assert stat.S_IMODE(os.stat(root / name).st_mode) == 0o700
    Spool(root).create_layout()  # idempotent


def test_drops_and_names_skip_dot_files_and_sort(spool: Spool) -> None:
    for name in ("b", "a", ".hidden", "c"):
        drop(spool, name)
    (spool.dir(Location.QUEUE) / ".tmp-x").write_bytes(b"")
    (spool.dir(Location.QUEUE) / "Z").write_bytes(b"")
    assert spool.drops() == ["a", "b", "c"]
    assert spool.names(Location.QUEUE) == ["Z"]
    assert spool.exists("Z") and not spool.exists("a")


def test_missing_directories_read_as_empty(spool_dir: Path) -> None:
    spool = Spool(spool_dir / "nothing")
    assert spool.drops() == [] and spool.names(Location.FAILED) == []
    assert spool.running_pid() is None


# -- claim ----------------------------------------------------------------------------------------


def test_claim_keeps_a_queue_id_name(spool: Spool) -> None:
    name = new_queue_id()
    path = drop(spool, name)
    mtime = path.stat().st_mtime
    claimed = spool.claim(name)
    assert claimed == Claimed(name, name, mtime, len(MESSAGE))
    assert listing(spool) == {"tmp": [], "new": [], "queue": [name], "deferred": [], "failed": [], "meta": []}
    assert spool.read(name, Location.QUEUE) == MESSAGE


@pytest.mark.parametrize("name", ["1700000000.M1P2.host:2,", "1700000000.M123456P789Q1.host", "message.eml",
                                  "0123456789abcdef0123", "0123456789ABCDEF0123\n"])
def test_claim_gives_other_names_a_queue_id(spool: Spool, name: str) -> None:
    drop(spool, name)
    claimed = spool.claim(name)
    assert isinstance(claimed, Claimed)
    assert is_queue_id(claimed.queue_id) and claimed.queue_id != name
    assert claimed.source == name
    assert spool.names(Location.QUEUE) == [claimed.queue_id]
    assert spool.drops() == []


def test_claim_does_not_reuse_a_taken_id(spool: Spool) -> None:
    name = new_queue_id()
    (spool.dir(Location.FAILED) / name).write_bytes(b"older message")
    drop(spool, name)
    claimed = spool.claim(name)
    assert isinstance(claimed, Claimed) and claimed.queue_id != name
    assert (spool.dir(Location.FAILED) / name).read_bytes() == b"older message"


def test_claim_of_a_vanished_drop(spool: Spool) -> None:
    assert spool.claim("gone") is None
    assert listing(spool)["meta"] == []


def assert_refused(spool: Spool, result: Claimed | Refused | Pending | None, name: str, reason: str) -> str:
    assert isinstance(result, Refused), result
    assert result.source == name and is_queue_id(result.queue_id)
    assert result.reason == reason
    state = spool.load_state(result.queue_id)
    assert state is not None
    assert (state.state, state.source, state.reason) == (State.FAILED, name, result.reason)
    assert spool.drops() == []
    assert spool.names(Location.FAILED) == [result.queue_id]
    assert spool.names(Location.QUEUE) == []
    return result.queue_id


def test_claim_refuses_a_symlink_without_touching_its_target(spool: Spool, tmp_path: Path) -> None:
    target = tmp_path / "secret.txt"
    target.write_bytes(b"root:secret\n")
    control = tmp_path / "control.txt"
    control.write_bytes(b"x")
    past = time.time() - 3 * 86400
    for path in (target, control):
        os.utime(path, (past, past + 86400))  # atime before mtime: any read updates atime (relatime)
    control.read_bytes()
    atime_is_tracked = control.stat().st_atime != past
    before = target.stat()
    os.symlink(target, spool.new / "link")
    queue_id = assert_refused(spool, spool.claim("link"), "link", "refused: the spool entry is a symbolic link")
    moved = spool.dir(Location.FAILED) / queue_id
    assert moved.is_symlink() and os.readlink(moved) == str(target)
    after = target.stat()
    assert target.read_bytes() == b"root:secret\n"
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    if atime_is_tracked:
        assert after.st_atime_ns == before.st_atime_ns, "the symlink's target was read"
    assert read_refusal(spool, queue_id, Location.FAILED) == "refused: the spool entry is a symbolic link"


@pytest.mark.timeout(10)
def test_claim_refuses_a_symlink_to_a_fifo_without_opening_it(spool: Spool, tmp_path: Path) -> None:
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    os.symlink(fifo, spool.new / "link")
    assert_refused(spool, spool.claim("link"), "link", "refused: the spool entry is a symbolic link")


def test_claim_refuses_a_dangling_symlink(spool: Spool, tmp_path: Path) -> None:
    os.symlink(tmp_path / "nowhere", spool.new / "dangling")
    assert_refused(spool, spool.claim("dangling"), "dangling", "refused: the spool entry is a symbolic link")


@pytest.mark.timeout(10)
def test_claim_refuses_a_fifo_without_blocking(spool: Spool) -> None:
    os.mkfifo(spool.new / "pipe")
    queue_id = assert_refused(spool, spool.claim("pipe"), "pipe", "refused: the spool entry is a FIFO")
    assert stat.S_ISFIFO(os.lstat(spool.dir(Location.FAILED) / queue_id).st_mode)
    assert read_refusal(spool, queue_id, Location.FAILED) == "refused: the spool entry is a FIFO"


def test_claim_refuses_a_directory(spool: Spool) -> None:
    (spool.new / "dir").mkdir()
    (spool.new / "dir" / "inner").write_bytes(MESSAGE)
    queue_id = assert_refused(spool, spool.claim("dir"), "dir", "refused: the spool entry is a directory")
    assert (spool.dir(Location.FAILED) / queue_id / "inner").read_bytes() == MESSAGE
    assert spool.delete(queue_id)
    assert listing(spool)["failed"] == [] and listing(spool)["meta"] == []


def test_claim_refuses_a_socket(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(spool.new)  # a short path: AF_UNIX names are limited to 108 bytes
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("sock")
        assert_refused(spool, spool.claim("sock"), "sock", "refused: the spool entry is a socket")


def test_claim_refuses_a_hard_link(spool: Spool, tmp_path: Path) -> None:
    outside = tmp_path / "shadow"
    outside.write_bytes(b"not for mailing\n")
    os.link(outside, spool.new / "linked")
    queue_id = assert_refused(spool, spool.claim("linked"), "linked", "refused: the spool entry has 2 hard links")
    assert outside.read_bytes() == b"not for mailing\n"
    assert os.stat(outside).st_nlink == 2  # moved, not copied or unlinked
    assert read_refusal(spool, queue_id, Location.FAILED) == "refused: the spool entry has 2 hard links"


def test_claim_waits_for_a_link_then_unlink_delivery(spool: Spool) -> None:
    (spool.tmp / "1700000000.M1P2.host").write_bytes(MESSAGE)
    os.link(spool.tmp / "1700000000.M1P2.host", spool.new / "1700000000.M1P2.host")
    assert spool.claim("1700000000.M1P2.host") == Pending("1700000000.M1P2.host")
    assert spool.drops() == ["1700000000.M1P2.host"]
    assert listing(spool)["meta"] == [] and listing(spool)["queue"] == [] and listing(spool)["failed"] == []
    (spool.tmp / "1700000000.M1P2.host").unlink()  # the writer finishes
    claimed = spool.claim("1700000000.M1P2.host")
    assert isinstance(claimed, Claimed) and spool.read(claimed.queue_id, Location.QUEUE) == MESSAGE


def test_a_writer_finishing_between_the_two_looks_is_still_a_delivery_in_progress(spool: Spool) -> None:
    """The race a Maildir writer's unlink can win: claim saw new/X with two links, then tmp/X is gone
    before its twin is looked at. That is the writer finishing, not a hard link: wait, do not refuse."""
    (spool.tmp / "1700000000.M1P3.host").write_bytes(MESSAGE)
    os.link(spool.tmp / "1700000000.M1P3.host", spool.new / "1700000000.M1P3.host")
    seen = os.lstat(spool.new / "1700000000.M1P3.host")
    (spool.tmp / "1700000000.M1P3.host").unlink()  # the writer finishes in between
    assert spool._tmp_twin("1700000000.M1P3.host", seen)
    claimed = spool.claim("1700000000.M1P3.host")
    assert isinstance(claimed, Claimed) and listing(spool)["failed"] == []


def test_claim_refuses_a_tmp_twin_with_a_third_link(spool: Spool, tmp_path: Path) -> None:
    outside = tmp_path / "shadow"
    outside.write_bytes(b"not for mailing\n")
    os.link(outside, spool.tmp / "x")
    os.link(outside, spool.new / "x")
    assert_refused(spool, spool.claim("x"), "x", "refused: the spool entry has 3 hard links")


def test_claim_refuses_a_hard_link_beside_an_unrelated_tmp_file(spool: Spool, tmp_path: Path) -> None:
    outside = tmp_path / "shadow"
    outside.write_bytes(b"not for mailing\n")
    (spool.tmp / "x").write_bytes(b"another file")
    os.link(outside, spool.new / "x")
    assert_refused(spool, spool.claim("x"), "x", "refused: the spool entry has 2 hard links")


def test_claim_refuses_an_oversize_file(spool: Spool) -> None:
    drop(spool, "big", b"x" * (LIMIT + 1))
    assert_refused(spool, spool.claim("big"), "big",
                   f"refused: the spool entry is too large ({LIMIT + 1} bytes; the limit is {LIMIT})")


def test_claim_takes_a_file_of_exactly_the_limit(spool: Spool) -> None:
    drop(spool, "edge", b"x" * LIMIT)
    claimed = spool.claim("edge")
    assert isinstance(claimed, Claimed) and claimed.size == LIMIT
    assert spool.read(claimed.queue_id, Location.QUEUE) == b"x" * LIMIT


def test_mailbox_maildir_drop_is_claimed(spool: Spool) -> None:
    message = EmailMessage()
    message["From"] = "app@example.com"
    message["To"] = "ann@example.org"
    message["Subject"] = "from mailbox"
    message.set_content("hello\n")
    key = mailbox.Maildir(str(spool.root)).add(message)
    assert spool.drops() == [key]
    claimed = spool.claim(key)
    assert isinstance(claimed, Claimed) and claimed.source == key
    data = spool.read(claimed.queue_id, Location.QUEUE)
    parsed = envelope.parse(claimed.queue_id, data)
    assert (parsed.sender, parsed.recipients) == ("app@example.com", ("ann@example.org",))
    assert b"hello" in data
    assert os.listdir(spool.tmp) == []


# -- read -----------------------------------------------------------------------------------------


def read_refusal(spool: Spool, queue_id: str, location: Location) -> str:
    """The reason `spool.read` refuses the entry with."""
    with pytest.raises(RefusedSpoolEntry) as info:
        spool.read(queue_id, location)
    return str(info.value)


def claimed_id(spool: Spool, data: bytes = MESSAGE) -> str:
    name = new_queue_id()
    drop(spool, name, data)
    result = spool.claim(name)
    assert isinstance(result, Claimed)
    return result.queue_id


def test_read_refuses_a_symlink_swapped_in_after_claim(spool: Spool, tmp_path: Path) -> None:
    queue_id = claimed_id(spool)
    target = tmp_path / "secret"
    target.write_bytes(b"secret")
    path = spool.dir(Location.QUEUE) / queue_id
    path.unlink()
    os.symlink(target, path)
    assert read_refusal(spool, queue_id, Location.QUEUE) == "refused: the spool entry is a symbolic link"


@pytest.mark.timeout(10)
def test_read_refuses_a_fifo_without_blocking(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    path = spool.dir(Location.QUEUE) / queue_id
    path.unlink()
    os.mkfifo(path)
    assert read_refusal(spool, queue_id, Location.QUEUE) == "refused: the spool entry is a FIFO"


def test_read_refuses_a_hard_link_made_after_claim(spool: Spool, tmp_path: Path) -> None:
    queue_id = claimed_id(spool)
    os.link(spool.dir(Location.QUEUE) / queue_id, tmp_path / "other")
    assert read_refusal(spool, queue_id, Location.QUEUE) == "refused: the spool entry has 2 hard links"


def test_read_refuses_a_directory_and_a_file_grown_too_large(spool: Spool) -> None:
    (spool.dir(Location.DEFERRED) / "D").mkdir()
    assert read_refusal(spool, "D", Location.DEFERRED) == "refused: the spool entry is a directory"
    queue_id = claimed_id(spool)
    with open(spool.dir(Location.QUEUE) / queue_id, "ab") as handle:
        handle.write(b"x" * LIMIT)
    size = len(MESSAGE) + LIMIT
    assert read_refusal(spool, queue_id, Location.QUEUE) == (
        f"refused: the spool entry is too large ({size} bytes; the limit is {LIMIT})")


def test_read_of_a_missing_message(spool: Spool) -> None:
    with pytest.raises(FileNotFoundError):
        spool.read(new_queue_id(), Location.QUEUE)


def test_read_large_message_in_chunks(spool_dir: Path) -> None:
    spool = Spool(spool_dir, max_message_size=5 * 2**20)
    spool.create_layout()
    data = os.urandom(3 * 2**20 + 17)
    queue_id = claimed_id(spool, data)
    assert spool.read(queue_id, Location.QUEUE) == data


# -- state: write-ahead moves -----------------------------------------------------------------------


def state_for(queue_id: str, **kwargs: object) -> MessageState:
    return MessageState(queue_id, 1000.0, **kwargs)  # type: ignore[arg-type]


def test_write_and_load_state(spool: Spool) -> None:
    state = state_for("0123456789ABCDEF0123", attempts=3, history=[Attempt(1.0, "temporary", "timeout", "t")])
    spool.write_state(state)
    assert spool.load_state(state.queue_id) == state
    assert os.listdir(spool.meta) == [f"{state.queue_id}.json"]  # no temporary left
    state.attempts = 4
    spool.write_state(state)
    assert spool.load_state(state.queue_id) == state


def test_load_state_of_missing_or_garbage_meta(spool: Spool) -> None:
    assert spool.load_state("0123456789ABCDEF0123") is None
    spool.meta_path("0123456789ABCDEF0123").write_bytes(b"{not json")
    assert spool.load_state("0123456789ABCDEF0123") is None
    spool.meta_path("0123456789ABCDEF0124").write_bytes(b'{"queue_id": "x", "received_at": 1, "odd": 2}')
    assert spool.load_state("0123456789ABCDEF0124") is None


def test_load_state_does_not_follow_a_symlink(spool: Spool, tmp_path: Path) -> None:
    elsewhere = tmp_path / "state.json"
    elsewhere.write_bytes(state_for("0123456789ABCDEF0123").to_json())
    os.symlink(elsewhere, spool.meta_path("0123456789ABCDEF0123"))
    assert spool.load_state("0123456789ABCDEF0123") is None


def test_defer_records_then_moves(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    state = state_for(queue_id, next_attempt_at=5000.0)
    assert spool.defer(state, Location.QUEUE)
    assert spool.names(Location.DEFERRED) == [queue_id] and spool.names(Location.QUEUE) == []
    stored = spool.load_state(queue_id)
    assert stored is not None and stored.state is State.DEFERRED and stored.next_attempt_at == 5000.0
    # Deferred again from deferred/: the state changes, the file stays.
    state.next_attempt_at = 9000.0
    assert spool.defer(state, Location.DEFERRED)
    stored = spool.load_state(queue_id)
    assert stored is not None and stored.next_attempt_at == 9000.0
    assert spool.names(Location.DEFERRED) == [queue_id]


def test_fail_records_then_moves(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    assert spool.defer(state_for(queue_id), Location.QUEUE)
    state = state_for(queue_id, reason="550 no such user")
    assert spool.fail(state, Location.DEFERRED)
    assert spool.names(Location.FAILED) == [queue_id] and spool.names(Location.DEFERRED) == []
    stored = spool.load_state(queue_id)
    assert stored is not None and (stored.state, stored.reason) == (State.FAILED, "550 no such user")
    assert spool.fail(state, Location.FAILED)


def test_defer_and_fail_of_a_vanished_message(spool: Spool) -> None:
    queue_id = new_queue_id()
    assert spool.defer(state_for(queue_id), Location.QUEUE) is False
    assert spool.defer(state_for(queue_id), Location.DEFERRED) is False
    assert spool.fail(state_for(queue_id), Location.QUEUE) is False
    assert not spool.meta_path(queue_id).exists()  # no state is left describing a message that is gone


def test_move_never_replaces_an_entry(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    (spool.dir(Location.DEFERRED) / queue_id).write_bytes(b"another")
    with pytest.raises(FileExistsError):
        spool.defer(state_for(queue_id), Location.QUEUE)
    assert (spool.dir(Location.DEFERRED) / queue_id).read_bytes() == b"another"
    assert spool.read(queue_id, Location.QUEUE) == MESSAGE


def test_crash_between_defer_record_and_move_is_completed_by_recover(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    spool.write_state(state_for(queue_id, state=State.DEFERRED, next_attempt_at=7777.0))  # then "crash"
    recovery = recover(spool, now=100.0)
    assert recovery.deferred == [(7777.0, queue_id)]
    assert recovery.ready == [] and recovery.completed_moves == 1
    assert spool.names(Location.DEFERRED) == [queue_id] and spool.names(Location.QUEUE) == []


def test_crash_between_fail_record_and_move_is_completed_by_recover(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    spool.write_state(state_for(queue_id, state=State.FAILED, reason="550"))
    recovery = recover(spool, now=100.0)
    assert (recovery.ready, recovery.deferred, recovery.completed_moves) == ([], [], 1)
    assert spool.names(Location.FAILED) == [queue_id] and spool.names(Location.QUEUE) == []
    stored = spool.load_state(queue_id)
    assert stored is not None and stored.reason == "550"


def test_delivered_removes_file_and_state(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    spool.defer(state_for(queue_id), Location.QUEUE)
    spool.delivered(queue_id, Location.DEFERRED)
    assert all(entries == [] for entries in listing(spool).values())
    spool.delivered(queue_id, Location.DEFERRED)  # twice is harmless


def test_with_the_reaper_running_a_delivered_message_is_renamed_at_once_and_unlinked_in_its_thread(
        spool: Spool) -> None:
    queue_id = claimed_id(spool)
    spool.defer(state_for(queue_id), Location.QUEUE)
    plain = claimed_id(spool)
    spool.start_reaper()
    try:
        spool.delivered(queue_id, Location.DEFERRED)
        spool.delivered(plain, Location.QUEUE, has_state=False)
        # No longer a message the moment delivered() returns: a listing or a restart cannot send it again.
        assert spool.names(Location.DEFERRED) == spool.names(Location.QUEUE) == []
        assert spool.exists(queue_id) is False and spool.locate(plain) is None
        assert spool.reaper.pending == 3  # two files and a state, handed over in batches
    finally:
        assert spool.stop_reaper(10.0)  # flushes
    assert spool.reaper.pending == 0 and spool.reaper.failures == 0
    assert all(entries == [] for entries in listing(spool).values())


def test_with_the_reaper_running_a_message_requeued_during_its_attempt_is_not_sent_again(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    spool.defer(state_for(queue_id), Location.QUEUE)
    spool.start_reaper()
    try:
        assert spool.requeue(queue_id) is Requeue.REQUEUED  # while its attempt was in flight
        spool.delivered(queue_id, Location.DEFERRED)
    finally:
        assert spool.stop_reaper(10.0)
    assert all(entries == [] for entries in listing(spool).values())


def test_the_reaper_batches_and_flushes(spool: Spool) -> None:
    from mailwatchd.spool.reaper import BATCH

    ids = [claimed_id(spool) for _ in range(BATCH + 3)]
    spool.start_reaper()
    try:
        for queue_id in ids:
            spool.delivered(queue_id, Location.QUEUE, has_state=False)
        # A full batch went to the thread at once; the rest waits for flush().
        deadline = time.monotonic() + 10
        while spool.reaper.pending > 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert spool.reaper.pending == 3
        assert len(os.listdir(spool.dir(Location.QUEUE))) == 3
        spool.reaper.flush()
        while spool.reaper.pending and time.monotonic() < deadline:
            time.sleep(0.005)
        assert spool.reaper.pending == 0 and os.listdir(spool.dir(Location.QUEUE)) == []
    finally:
        assert spool.stop_reaper(10.0)


def test_a_failed_unlink_is_counted_and_left_for_the_next_start(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    spool.start_reaper()
    try:
        sent = spool.dir(Location.QUEUE) / f".sent-{queue_id}"
        spool.delivered(queue_id, Location.QUEUE, has_state=False)
        sent.unlink()
        sent.mkdir()  # unlink(2) of a directory fails (EISDIR)
    finally:
        assert spool.stop_reaper(10.0)
    assert spool.reaper.failures == 1
    sent.rmdir()


@pytest.mark.parametrize(("location", "state"), [(Location.QUEUE, State.QUEUED),
                                                 (Location.DEFERRED, State.DEFERRED),
                                                 (Location.FAILED, State.FAILED)])
def test_add_stores_state_then_file(spool: Spool, location: Location, state: State) -> None:
    queue_id = spool.new_id()
    spool.add(b"part", state_for(queue_id), location)
    assert spool.names(location) == [queue_id]
    assert spool.read(queue_id, location) == b"part"
    stored = spool.load_state(queue_id)
    assert stored is not None and stored.state is state
    assert not any(name.startswith(".") for entries in listing(spool).values() for name in entries)


# -- recover ----------------------------------------------------------------------------------------


def test_recover_removes_stale_temporaries_only_in_daemon_directories(spool: Spool) -> None:
    for directory in (spool.meta, spool.dir(Location.QUEUE), spool.dir(Location.DEFERRED), spool.dir(Location.FAILED)):
        (directory / ".tmp-0123456789ABCDEF0123").write_bytes(b"half")
    (spool.tmp / "being-written").write_bytes(b"half")
    recovery = recover(spool, now=100.0)
    assert listing(spool) == {"tmp": ["being-written"], "new": [], "queue": [], "deferred": [], "failed": [],
                              "meta": []}
    assert (recovery.ready, recovery.deferred, recovery.completed_moves, recovery.orphans_removed) == ([], [], 0, 0)


def test_recover_removes_orphan_meta_and_keeps_the_rest(spool: Spool) -> None:
    ids = {name: new_queue_id(1_700_000_000_000_000_000 + n * 1000) for n, name in
           enumerate(["queued", "deferred", "failed", "requeued", "orphan1", "orphan2"])}
    spool.write_state(state_for(ids["queued"]))
    (spool.dir(Location.QUEUE) / ids["queued"]).write_bytes(MESSAGE)
    spool.write_state(state_for(ids["deferred"], state=State.DEFERRED, next_attempt_at=500.0))
    (spool.dir(Location.DEFERRED) / ids["deferred"]).write_bytes(MESSAGE)
    spool.write_state(state_for(ids["failed"], state=State.FAILED))
    (spool.dir(Location.FAILED) / ids["failed"]).write_bytes(MESSAGE)
    spool.write_state(state_for(ids["requeued"]))
    (spool.new / ids["requeued"]).write_bytes(MESSAGE)
    spool.write_state(state_for(ids["orphan1"]))
    spool.write_state(state_for(ids["orphan2"], state=State.FAILED))
    (spool.meta / "unrelated.txt").write_bytes(b"x")
    recovery = recover(spool, now=100.0)
    assert recovery.orphans_removed == 2
    kept = {ids[name] + ".json" for name in ("queued", "deferred", "failed", "requeued")}
    assert set(os.listdir(spool.meta)) == kept | {"unrelated.txt"}
    assert recovery.ready == [ids["queued"]]
    assert recovery.deferred == [(500.0, ids["deferred"])]


def test_recover_lists_ready_and_deferred_with_due_times_from_meta(spool: Spool) -> None:
    ready = sorted(new_queue_id() for _ in range(3))
    for queue_id in ready:
        (spool.dir(Location.QUEUE) / queue_id).write_bytes(MESSAGE)
    later, sooner, unknown, no_time = (new_queue_id() for _ in range(4))
    for queue_id, due in ((later, 9000.0), (sooner, 3000.0)):
        spool.write_state(state_for(queue_id, state=State.DEFERRED, next_attempt_at=due))
    spool.write_state(state_for(no_time, state=State.DEFERRED))
    for queue_id in (later, sooner, unknown, no_time):
        (spool.dir(Location.DEFERRED) / queue_id).write_bytes(MESSAGE)
    recovery = recover(spool, now=100.0)
    assert recovery.ready == ready
    assert recovery.deferred == sorted([(3000.0, sooner), (9000.0, later), (100.0, unknown), (100.0, no_time)])
    assert recovery.completed_moves == 0


def test_recover_keeps_going_after_finishing_a_move(spool: Spool) -> None:
    # Sorted order: the FAILED and DEFERRED entries come before plain claimed messages.
    base = 1_700_000_000_000_000_000
    to_fail, to_defer, plain1, plain2 = (new_queue_id(base + n * 1000) for n in range(4))
    for queue_id in (to_fail, to_defer, plain1, plain2):
        (spool.dir(Location.QUEUE) / queue_id).write_bytes(MESSAGE)
    spool.write_state(state_for(to_fail, state=State.FAILED))
    spool.write_state(state_for(to_defer, state=State.DEFERRED, next_attempt_at=4242.0))
    recovery = recover(spool, now=100.0)
    assert recovery.ready == [plain1, plain2]
    assert recovery.deferred == [(4242.0, to_defer)]  # once
    assert recovery.completed_moves == 2
    assert spool.names(Location.QUEUE) == [plain1, plain2]
    assert spool.names(Location.DEFERRED) == [to_defer]
    assert spool.names(Location.FAILED) == [to_fail]


def test_recover_finishes_an_interrupted_requeue(spool: Spool) -> None:
    queue_id = claimed_id(spool)
    history = [Attempt(float(n), "permanent", "recipient_rejected", f"550 try {n}") for n in range(3)]
    state = state_for(queue_id, attempts=3, history=list(history), reason="550")
    assert spool.fail(state, Location.QUEUE)
    # requeue() writes the state first; a crash before its rename leaves this:
    state.state, state.attempts, state.reason = State.QUEUED, 0, None
    spool.write_state(state)
    recovery = recover(spool, now=100.0)
    assert recovery.completed_moves == 1
    assert (recovery.ready, recovery.deferred) == ([], [])
    assert spool.drops() == [queue_id] and spool.names(Location.FAILED) == []
    stored = spool.load_state(queue_id)
    assert stored is not None and stored.history == history and stored.state is State.QUEUED
    # The intake then claims it under the same id, history intact.
    mtime = (spool.new / queue_id).stat().st_mtime
    assert spool.claim(queue_id) == Claimed(queue_id, queue_id, mtime, len(MESSAGE))
    again = spool.load_state(queue_id)
    assert again is not None and again.history == history


def test_recover_is_idempotent(spool: Spool) -> None:
    a, b, c = (claimed_id(spool) for _ in range(3))
    spool.write_state(state_for(b, state=State.DEFERRED, next_attempt_at=5.0))
    spool.write_state(state_for(c, state=State.FAILED))
    first = recover(spool, now=1.0)
    second = recover(spool, now=1.0)
    assert (first.ready, first.deferred) == (second.ready, second.deferred) == ([a], [(5.0, b)])
    assert (second.completed_moves, second.orphans_removed) == (0, 0)


def test_recover_with_unreadable_meta_leaves_the_message_where_it_is(spool: Spool) -> None:
    queue_id = new_queue_id()
    (spool.dir(Location.DEFERRED) / queue_id).write_bytes(MESSAGE)
    spool.meta_path(queue_id).write_bytes(b"garbage")
    recovery = recover(spool, now=42.0)
    assert recovery.deferred == [(42.0, queue_id)]
    assert spool.names(Location.DEFERRED) == [queue_id]


# -- operator commands ------------------------------------------------------------------------------


@pytest.mark.parametrize("location", [Location.FAILED, Location.DEFERRED])
def test_requeue_keeps_history(spool: Spool, location: Location) -> None:
    queue_id = claimed_id(spool)
    history = [Attempt(1.0, "permanent", "recipient_rejected", "550 no")]
    state = state_for(queue_id, attempts=4, history=list(history), reason="550", next_attempt_at=99.0)
    if location is Location.FAILED:
        spool.fail(state, Location.QUEUE)
    else:
        spool.defer(state, Location.QUEUE)
    assert spool.requeue(queue_id) is Requeue.REQUEUED
    assert spool.drops() == [queue_id] and spool.names(location) == []
    stored = spool.load_state(queue_id)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.next_attempt_at, stored.reason) == (State.QUEUED, 0, None, None)
    assert stored.history == history and stored.received_at == 1000.0


def test_requeue_without_state_and_of_unknown_ids(spool: Spool) -> None:
    queue_id = new_queue_id()
    (spool.dir(Location.FAILED) / queue_id).write_bytes(MESSAGE)
    assert spool.requeue(queue_id) is Requeue.REQUEUED
    stored = spool.load_state(queue_id)
    assert stored is not None and stored.state is State.QUEUED
    assert spool.requeue(new_queue_id()) is None
    assert spool.load_state(queue_id) is not None  # a requeued message keeps its state in new/
    assert spool.requeue(queue_id) is Requeue.ALREADY_WAITING  # already back in new/
    queued = claimed_id(spool)
    assert spool.requeue(queued) is Requeue.ALREADY_WAITING  # a message in queue/ waits already
    assert spool.names(Location.QUEUE) == [queued]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write as root into a spool owned by another user")
def test_commands_run_as_root_leave_files_the_daemons_user_can_read(spool: Spool) -> None:
    """`sudo mailwatchd requeue` or `ack`: the state and the acknowledgements belong to the spool's owner."""
    for directory in (spool.meta, spool.dir(Location.FAILED)):
        os.chown(directory, 65534, 65534)
    queue_id = claimed_id(spool)
    spool.fail(state_for(queue_id), Location.QUEUE)
    spool.acknowledge()
    for path in (spool.meta_path(queue_id), spool.dir(Location.FAILED) / ".acknowledged"):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600), path


def test_delete(spool: Spool, tmp_path: Path) -> None:
    ids = [claimed_id(spool) for _ in range(3)]
    spool.defer(state_for(ids[1]), Location.QUEUE)
    spool.fail(state_for(ids[2]), Location.QUEUE)
    for queue_id, where in zip(ids, ("queue", "deferred", "failed"), strict=True):
        assert spool.delete(queue_id) == where
        assert not spool.exists(queue_id)
        assert not spool.meta_path(queue_id).exists()
    assert spool.delete(ids[0]) is None
    target = tmp_path / "keep"
    target.write_bytes(b"keep")
    os.symlink(target, spool.new / "link")
    refused = spool.claim("link")
    assert isinstance(refused, Refused)
    assert spool.delete(refused.queue_id)
    assert target.read_bytes() == b"keep"
    assert all(entries == [] for entries in listing(spool).values())


# -- clean_tmp --------------------------------------------------------------------------------------


def test_clean_tmp_removes_only_old_regular_files(spool: Spool, tmp_path: Path) -> None:
    now = time.time()
    old = now - STALE_TMP_SECONDS - 60
    fresh = now - STALE_TMP_SECONDS + 60
    (spool.tmp / "old").write_bytes(b"x")
    (spool.tmp / "fresh").write_bytes(b"x")
    (spool.tmp / "olddir").mkdir()
    os.mkfifo(spool.tmp / "oldfifo")
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    os.utime(target, (old, old))
    os.symlink(target, spool.tmp / "oldlink")
    for name, when in (("old", old), ("fresh", fresh), ("olddir", old), ("oldfifo", old), ("oldlink", old)):
        os.utime(spool.tmp / name, (when, when), follow_symlinks=False)
    assert spool.clean_tmp(now=now) == 1
    assert sorted(os.listdir(spool.tmp)) == ["fresh", "olddir", "oldfifo", "oldlink"]
    assert target.read_bytes() == b"keep"
    assert spool.clean_tmp(now=now + 120) == 1
    assert sorted(os.listdir(spool.tmp)) == ["olddir", "oldfifo", "oldlink"]


def test_clean_tmp_without_tmp(spool_dir: Path) -> None:
    assert Spool(spool_dir / "none").clean_tmp() == 0


# -- the lock ---------------------------------------------------------------------------------------


def test_lock_conflicts_between_spool_objects_in_one_process(spool: Spool) -> None:
    spool.acquire_lock()
    try:
        assert spool.lock_path.read_text() == f"{os.getpid()}\n"
        other = Spool(spool.root)
        with pytest.raises(SpoolLocked, match=f"pid {os.getpid()}"):
            other.acquire_lock()
        assert other.running_pid() == os.getpid()
        assert spool.running_pid() == os.getpid()
    finally:
        spool.release_lock()
    assert Spool(spool.root).running_pid() is None
    other = Spool(spool.root)
    other.acquire_lock()  # free again
    other.release_lock()
    spool.release_lock()  # harmless twice


def test_running_pid_with_a_stale_lock_file(spool: Spool) -> None:
    spool.lock_path.write_text("999999\n")
    assert spool.running_pid() is None
    spool.acquire_lock()
    try:
        assert spool.lock_path.read_text() == f"{os.getpid()}\n"  # the stale pid is replaced, not appended
    finally:
        spool.release_lock()


HOLDER = """
import sys
from pathlib import Path
from mailwatchd.spool.store import Spool
spool = Spool(Path(sys.argv[1]))
spool.acquire_lock()
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(30)
def test_lock_held_by_another_process(spool: Spool) -> None:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(spool.root)], env=child_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"locked\n"
        assert spool.running_pid() == child.pid
        with pytest.raises(SpoolLocked, match=f"pid {child.pid}"):
            spool.acquire_lock()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(20)
    assert child.returncode == 0, child.stderr.read() if child.stderr else ""
    assert spool.running_pid() is None  # the lock died with its holder
    spool.acquire_lock()
    spool.release_lock()


# -- enqueue (the submitter's side) -----------------------------------------------------------------


def test_enqueue_writes_a_complete_file_by_rename(spool: Spool) -> None:
    watcher = INotify()
    watcher.add_watch(str(spool.new), flags.CREATE | flags.MODIFY | flags.CLOSE_WRITE | flags.MOVED_TO)
    try:
        data = MESSAGE * 100
        queue_id = enqueue(spool.root, data)
        events = [(event.name, flags.from_mask(event.mask)) for event in watcher.read(timeout=0)]
    finally:
        watcher.close()
    assert is_queue_id(queue_id)
    assert events == [(queue_id, [flags.MOVED_TO])]  # never created or written in new/
    assert (spool.new / queue_id).read_bytes() == data
    assert stat.S_IMODE(os.stat(spool.new / queue_id).st_mode) == 0o640
    assert os.listdir(spool.tmp) == []
    claimed = spool.claim(queue_id)
    assert isinstance(claimed, Claimed) and claimed.queue_id == queue_id


def test_enqueue_creates_missing_directories(spool_dir: Path) -> None:
    root = spool_dir / "fresh"
    queue_id = enqueue(root, MESSAGE)
    assert os.listdir(root / "new") == [queue_id] and os.listdir(root / "tmp") == []


def test_enqueue_ids_are_distinct(spool: Spool) -> None:
    ids = [enqueue(spool.root, MESSAGE) for _ in range(50)]
    assert len(set(ids)) == 50 and sorted(spool.drops()) == sorted(ids)


# -- write_durably and a full disk ------------------------------------------------------------------


def test_write_durably_never_replaces_or_follows(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_durably(path, b"one")
    with pytest.raises(FileExistsError):
        write_durably(path, b"two")
    assert path.read_bytes() == b"one"
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(FileExistsError):
        write_durably(tmp_path / "link", b"evil")
    assert target.read_bytes() == b"keep"
    write_durably(tmp_path / "mode", b"", mode=0o640)
    assert stat.S_IMODE(os.stat(tmp_path / "mode").st_mode) == 0o640


def test_install_durably_replaces_the_final_name_and_leaves_no_temporary(tmp_path: Path) -> None:
    final = tmp_path / "final"
    final.write_bytes(b"old")
    install_durably(tmp_path / ".tmp-final", final, b"new", mode=0o640)
    assert final.read_bytes() == b"new" and stat.S_IMODE(final.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["final"]
    with pytest.raises(FileNotFoundError):
        install_durably(tmp_path / ".tmp-x", tmp_path / "missing" / "x", b"data")
    assert os.listdir(tmp_path) == ["final"]  # the temporary of the failed rename is gone


FSIZE_CHILD = """
import json, os, resource, signal, sys
from pathlib import Path
from mailwatchd.spool.durable import write_durably
from mailwatchd.submission.submit import enqueue
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
result = {}
path = Path(sys.argv[1]) / "file"
try:
    write_durably(path, b"x" * 100_000)
except OSError as exc:
    result["write_durably"] = exc.errno
result["left"] = os.path.lexists(path)
root = Path(sys.argv[1]) / "spool"
try:
    enqueue(root, b"x" * 100_000)
except OSError as exc:
    result["enqueue"] = exc.errno
result["tmp"] = os.listdir(root / "tmp")
result["new"] = os.listdir(root / "new")
print(json.dumps(result))
"""


@pytest.mark.timeout(30)
def test_write_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    output = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path)], env=child_env(),
                            capture_output=True, timeout=25, check=True).stdout
    result = json.loads(output)
    assert result == {"write_durably": errno.EFBIG, "left": False, "enqueue": errno.EFBIG, "tmp": [], "new": []}


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "mailwatchd-test", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_enqueue_on_a_full_disk_raises_spool_full(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=1m,mode=0700") as root:
        (root / "tmp").mkdir()
        (root / "new").mkdir()
        with pytest.raises(SpoolFull) as info:
            enqueue(root, os.urandom(2 * 2**20))
        assert str(info.value) == f"the filesystem is full ({os.strerror(errno.ENOSPC)})"
        assert os.listdir(root / "tmp") == [] and os.listdir(root / "new") == []
        queue_id = enqueue(root, MESSAGE)  # the space came back
        assert os.listdir(root / "new") == [queue_id]


def test_a_listener_store_too_big_for_the_disk_fails_before_it_says_written(tmp_path: Path) -> None:
    """Cut-through relays a message once its bytes are written (spool/pending.py): a write the disk has no
    room for must fail first, so that the relay never has a message its client was refused for space."""
    with tmpfs(tmp_path / "small", "size=1m,mode=0700") as root:
        spool = Spool(root)
        spool.create_layout()
        written: list[str] = []
        with pytest.raises(SpoolFull):
            spool.accept(os.urandom(2 * 2**20), written.append)
        assert written == [] and spool.names(Location.QUEUE) == []
        assert os.listdir(spool.dir(Location.QUEUE)) == []
        queue_id = spool.accept(MESSAGE, written.append)  # the space came back
        assert written == [queue_id] and spool.names(Location.QUEUE) == [queue_id]


def test_enqueue_without_free_inodes_raises_spool_full(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=1m,nr_inodes=3,mode=0700") as root:
        (root / "tmp").mkdir()
        (root / "new").mkdir()  # the root, tmp/ and new/ take all three inodes
        with pytest.raises(SpoolFull):
            enqueue(root, MESSAGE)
        assert os.listdir(root / "tmp") == [] and os.listdir(root / "new") == []


def test_full_spool_state_writes_and_probe(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=64k,mode=0700") as root:
        spool = Spool(root)
        spool.create_layout()
        assert spool.probe_writable() is None
        filler = root / "filler"
        with pytest.raises(OSError) as info, open(filler, "wb") as handle:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        assert info.value.errno == errno.ENOSPC
        state = MessageState("0123456789ABCDEF0123", 0.0, history=[Attempt(0.0, "t", "c", "d" * 8192)])
        with pytest.raises(SpoolFull):
            spool.write_state(state)
        assert os.listdir(spool.meta) == []
        assert spool.probe_writable() == f"the filesystem is full ({os.strerror(errno.ENOSPC)})"
        filler.unlink()
        assert spool.probe_writable() is None


def test_describe_non_regular() -> None:
    assert describe_non_regular(os.stat("/dev/null").st_mode) == "is a character device"
    assert describe_non_regular(stat.S_IFREG | 0o644) is None
    assert describe_non_regular(stat.S_IFBLK) == "is a block device"
    assert describe_non_regular(0) == "is not a regular file"
