"""The spool: where messages live, and the only code that moves them.

Layout under the spool root:
  tmp/, new/   the Maildir drop: a submitter writes in tmp/ and renames into new/
  queue/       claimed by the daemon, ready for an attempt (file name = queue id)
  deferred/    waiting for the next attempt
  failed/      given up; meta/ says why. failed/.acknowledged lists the ids an operator has
               seen (`mailwatchd ack`): they stay for inspection but no longer count
  meta/        <id>.json, the state of a message that has had an attempt
  mailwatchd.lock   flock(2)ed by the running daemon, holding its pid

Invariants:
- A message changes state only by rename(2) inside the spool (one filesystem).
- meta/<id>.json is written (tmp, fsync, rename, fsync dir) before the message file moves:
  it names where the message is going, so recovery can finish an interrupted move.
- A message file is unlinked only after the relay accepted it (the reply after DATA). While the
  daemon runs, it is first renamed to a dot name in its directory (SENT_PREFIX): no longer a
  message, never sent again; reaper.py's thread unlinks it, then its state, off the event loop.
- Entries in new/ are untrusted: never followed through a symlink, never opened blocking.
- A file in deferred/ or failed/ may be "settled" (see SETTLED_NS): its mtime, set after its state
  was written and it reached that directory, carries a mark (and in deferred/ its next attempt's
  time), so start-up knows it without reading meta/. write_state unsettles the message's file
  first: a crash before the file is settled again leaves a file whose state recovery reads.
- Operator commands (requeue, delete, ack) may run while the daemon runs. A message moves
  forward only (new → queue → deferred → failed) except by `requeue` (back to new/, its state
  written first as "queued"), so a command looking in that order finds a message the daemon
  moves meanwhile. A requeue that overtakes an attempt in flight is settled by that attempt:
  delivered, the requeued copy is removed (never sent twice); deferred or failed, the message
  goes there with that attempt's record (never stranded). A message deleted during its
  attempt is not retried; if the relay accepted it, it was sent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import math
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from mailwatchd.errors import RefusedSpoolEntry, SpoolFull, SpoolLocked
from mailwatchd.spool.durable import drop_dirs, fsync_dir, install_durably, write_durably
from mailwatchd.spool.messagestate import MessageState, State
from mailwatchd.spool.queueid import is_queue_id, new_queue_id
from mailwatchd.spool.reaper import SENT_PREFIX, Reaper

STALE_TMP_SECONDS = 36 * 3600  # the Maildir convention for abandoned tmp/ files
TMP_PREFIX = ".tmp-"
ACKNOWLEDGED = ".acknowledged"  # in failed/: a dot name, so never taken for a message
NEW = "new"  # what a message in the drop is called where a Location is named
# A settled file's mtime ends in these nanoseconds (modulo one millisecond); in deferred/ the rest is the next
# attempt's time, to the millisecond, rounded down. A file system without sub-millisecond times keeps no mark, and
# then recovery reads every state, as it would for a file the daemon has not settled.
SETTLED_NS = 271_828
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_SYMLINK = "is a symbolic link"


class Location(StrEnum):
    """The directories a claimed message can be in."""

    QUEUE = "queue"
    DEFERRED = "deferred"
    FAILED = "failed"


# Where a message in each state belongs; meta/ names the state before the file moves there.
LOCATION_OF = {State.QUEUED: Location.QUEUE, State.DEFERRED: Location.DEFERRED, State.FAILED: Location.FAILED}
_STATE_IN = {location: state for state, location in LOCATION_OF.items()}


@dataclass(frozen=True)
class Claimed:
    """A message taken from new/ into queue/."""

    queue_id: str
    source: str
    received_at: float
    size: int


@dataclass(frozen=True)
class Refused:
    """A drop that cannot be a message, moved to failed/ with the reason."""

    queue_id: str
    source: str
    reason: str


@dataclass(frozen=True)
class Pending:
    """A drop still being delivered: a Maildir writer that link(2)s tmp/X to new/X and has
    not yet unlinked tmp/X (Python's mailbox.Maildir does this). Try again shortly."""

    source: str


def describe_non_regular(mode: int) -> str | None:
    """Why an inode of this mode cannot be a message ("is a FIFO"), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISLNK, _SYMLINK), (stat.S_ISDIR, "is a directory"),
                       (stat.S_ISFIFO, "is a FIFO"), (stat.S_ISSOCK, "is a socket"),
                       (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device")):
        if test(mode):
            return kind
    return "is not a regular file"


def refusal(problem: str) -> str:
    """The recorded reason for an entry that cannot be a message: `problem` completes the sentence."""
    return f"refused: the spool entry {problem}"


class Requeue(StrEnum):
    """What `Spool.requeue` did (None: no such message)."""

    REQUEUED = "requeued"
    ALREADY_WAITING = "already waiting"  # in new/ or queue/: nothing to do


def settled_time(mtime_ns: int) -> float | None:
    """The time a settled file's mtime carries (in deferred/: its next attempt), or None if it is not settled."""
    if mtime_ns % 1_000_000 != SETTLED_NS:
        return None
    return (mtime_ns - SETTLED_NS) // 1_000_000 / 1000


def is_entry_name(name: str) -> bool:
    """A name that can only mean a file directly in a spool directory (no path, no dot file)."""
    return bool(name) and "/" not in name and "\0" not in name and not name.startswith(".")


class Spool:
    """File operations on one spool directory. Not thread-safe; one daemon per spool."""

    def __init__(self, root: Path, *, max_message_size: int = 25 * 1024 * 1024) -> None:
        self.root = root
        self.max_message_size = max_message_size
        self.tmp, self.new = drop_dirs(root)
        self.meta = root / "meta"
        self.lock_path = root / "mailwatchd.lock"
        self._lock_fd: int | None = None
        # Plain strings for the per-message paths: pathlib costs more than the syscalls here.
        self._dirs = {location: os.path.join(root, location.value) for location in Location}
        self._new = str(self.new)
        self._meta = str(self.meta)
        self._acknowledged_path = os.path.join(self._dirs[Location.FAILED], ACKNOWLEDGED)
        self._unacknowledged: tuple[tuple[int, int, int], tuple[int, int]] | None = None  # (stat key, counts)
        self._owner: tuple[int, int] | None = None  # root's writes get the spool's owner (see _install_as_owner)
        # Removes delivered messages: at once until the daemon starts its thread (start_reaper).
        self.reaper = Reaper()

    def dir(self, location: Location) -> Path:
        return self.root / location.value

    def create_layout(self) -> None:
        """Create missing directories (0700: a service's modes come from tmpfiles.d)."""
        for path in (self.root, self.tmp, self.new, self.meta, *(self.dir(loc) for loc in Location)):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- the daemon's lock ------------------------------------------------------------------

    def acquire_lock(self) -> None:
        """Hold the spool's lock for this process's life; SpoolLocked if a daemon has it."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SpoolLocked(f"another mailwatchd (pid {pid or '?'}) is running on {self.root}") from None
        own_pid = f"{os.getpid()}\n".encode()
        try:
            # Written over the old pid, then cut to length: on a full filesystem the old file's block is
            # reused. A new lock file on a filesystem with no free block stays empty: the lock still holds.
            os.pwrite(fd, own_pid, 0)
            os.ftruncate(fd, len(own_pid))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                os.close(fd)
                raise
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def running_pid(self) -> int | None:
        """The pid of the daemon holding this spool, or None when none runs."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else None
            return None
        finally:
            os.close(fd)

    # -- intake -----------------------------------------------------------------------------

    def drops(self) -> list[str]:
        """Names waiting in new/, oldest first by name (Maildir names start with a time)."""
        try:
            return sorted(name for name in os.listdir(self.new) if not name.startswith("."))
        except FileNotFoundError:
            return []

    def waiting(self) -> Iterator[str]:
        """Names in new/ as one directory scan meets them (no order, no list held)."""
        for entry in scandir(self.new):
            if not entry.name.startswith("."):
                yield entry.name

    def _fresh_id(self, preferred: str | None = None) -> str:
        # A submitter's name is kept only if it is id-shaped and free: a drop must never be
        # able to replace a queued message by reusing its id.
        if preferred is not None and is_queue_id(preferred) and not self.exists(preferred):
            return preferred
        directories = self._dirs.values()
        while True:
            queue_id = new_queue_id()
            # self.exists(queue_id) written out (one message's worth of lstat(2) calls, no generator):
            for directory in directories:
                try:
                    os.lstat(f"{directory}/{queue_id}")
                except (OSError, ValueError):  # as os.path.lexists: absent (or not reachable) there
                    continue
                break
            else:
                return queue_id

    def exists(self, queue_id: str) -> bool:
        return any(os.path.lexists(f"{directory}/{queue_id}") for directory in self._dirs.values())

    def claim(self, name: str) -> Claimed | Refused | Pending | None:
        """Move new/<name> into queue/, or what cannot be a message into failed/.

        Returns None when the entry vanished before it could be taken.
        """
        source = f"{self._new}/{name}"
        try:
            st = os.lstat(source)
        except FileNotFoundError:
            return None
        if stat.S_ISREG(st.st_mode) and self._tmp_twin(name, st):
            return Pending(name)
        reason = self._refusal(st)
        queue_id = self._fresh_id(name)
        if reason is not None:
            self.write_state(MessageState(queue_id, st.st_mtime, State.FAILED, source=name, reason=reason))
            if not self.move(Path(source), self.dir(Location.FAILED) / queue_id):
                return None
            return Refused(queue_id, name, reason)
        try:
            os.rename(source, f"{self._dirs[Location.QUEUE]}/{queue_id}")
        except FileNotFoundError:
            return None
        return Claimed(queue_id, name, st.st_mtime, st.st_size)

    def _tmp_twin(self, name: str, st: os.stat_result) -> bool:
        """True when tmp/<name> is, or was a moment ago, the same inode: a link-then-unlink delivery."""
        if st.st_nlink != 2:
            return False
        try:
            twin = os.lstat(os.path.join(self.tmp, name))
        except OSError:
            # The writer may have unlinked tmp/<name> since `st` was taken: then new/<name> is the
            # same inode with one link left, and the next try claims it.
            try:
                now = os.lstat(os.path.join(self._new, name))
            except OSError:
                return False
            return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and now.st_nlink == 1
        return (twin.st_dev, twin.st_ino) == (st.st_dev, st.st_ino)

    def _refusal(self, st: os.stat_result) -> str | None:
        """Why an entry with this status cannot be a message, or None when it can be one."""
        problem = describe_non_regular(st.st_mode)
        if problem is None and st.st_nlink > 1:
            problem = f"has {st.st_nlink} hard links"
        if problem is None and st.st_size > self.max_message_size:
            problem = f"is too large ({st.st_size} bytes; the limit is {self.max_message_size})"
        return None if problem is None else refusal(problem)

    def clean_tmp(self, now: float | None = None) -> int:
        """Remove regular files abandoned in tmp/ for more than 36 hours."""
        limit = (time.time() if now is None else now) - STALE_TMP_SECONDS
        removed = 0
        for entry in scandir(self.tmp):
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mtime < limit:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    # -- reading ----------------------------------------------------------------------------

    def read(self, queue_id: str, location: Location) -> bytes:
        """The message's bytes; RefusedSpoolEntry if it is not a safe regular file."""
        return self._read_entry(f"{self._dirs[location]}/{queue_id}")

    def read_drop(self, name: str) -> bytes:
        """A drop's bytes (new/<name>), read as warily as a claimed message; RefusedSpoolEntry likewise."""
        if not is_entry_name(name):
            raise FileNotFoundError(errno.ENOENT, "not a name in new/", name)
        return self._read_entry(f"{self._new}/{name}")

    def _read_entry(self, path: str) -> bytes:
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
                raise RefusedSpoolEntry(refusal(_SYMLINK)) from None
            raise
        try:
            st = os.fstat(fd)
            reason = self._refusal(st)
            if reason is not None:
                raise RefusedSpoolEntry(reason)
            chunks = []
            remaining = self.max_message_size + 1
            size = st.st_size + 1
            while remaining > 0:
                # One byte more than fstat saw: a first read that returns exactly st_size is the end of the
                # file, with no second read(2) to confirm it (a file that grew meanwhile is read on, in MiBs).
                # Python allocates the whole request before the read: no more than the file needs.
                chunk = os.read(fd, min(remaining, size))
                size = 1 << 20
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
                if len(chunks) == 1 and len(chunk) == st.st_size:
                    break
            if remaining <= 0:
                raise RefusedSpoolEntry(refusal("grew past the size limit"))
            return b"".join(chunks)
        finally:
            os.close(fd)

    # -- state ------------------------------------------------------------------------------

    def meta_path(self, queue_id: str) -> Path:
        return self.meta / f"{queue_id}.json"

    def load_state(self, queue_id: str) -> MessageState | None:
        """The message's state, or None when it has none (or it is unreadable)."""
        try:
            fd = os.open(f"{self._meta}/{queue_id}.json", _READ_FLAGS)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as handle:
                return MessageState.from_json(handle.read(1 << 20))
        except (ValueError, TypeError, KeyError, OSError):
            return None

    def write_state(self, state: MessageState) -> None:
        """Replace meta/<id>.json atomically and durably; a settled file of the message is unsettled first."""
        for location in (Location.DEFERRED, Location.FAILED):
            self._unsettle(f"{self._dirs[location]}/{state.queue_id}")
        final = self.meta_path(state.queue_id)
        temporary = self.meta / f"{TMP_PREFIX}{state.queue_id}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if os.geteuid() == 0:
            self._install_as_owner(temporary, final, state.to_json())
        else:
            install_durably(temporary, final, state.to_json())

    def _install_as_owner(self, temporary: Path, final: Path, data: bytes) -> None:
        """install_durably, the file owned by the spool's owner before it appears: a command run as
        root writes state the daemon (the mailwatchd user) must still read."""
        write_durably(temporary, data)
        try:
            if self._owner is None:
                st = os.stat(self.meta)
                self._owner = (st.st_uid, st.st_gid)
            if self._owner != (0, 0):
                os.chown(temporary, *self._owner)
            os.rename(temporary, final)
            fsync_dir(final.parent)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def settled(self, queue_id: str, location: Location, when: float) -> None:
        """Mark a message file whose state is written and which is where that state says as settled, at
        `when` (deferred/: its next attempt). Only a regular file with one link; one that cannot be marked
        (not the owner, gone) stays unsettled: recovery then reads its state."""
        path = f"{self._dirs[location]}/{queue_id}"
        ns = math.floor(when * 1000) * 1_000_000 + SETTLED_NS
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def _unsettle(self, path: str) -> None:
        """Take the settled mark off a file before its state changes (its mtime becomes now, unmarked)."""
        try:
            if settled_time(os.lstat(path).st_mtime_ns) is None:
                return
            now = time.time_ns() // 1_000_000 * 1_000_000
            os.utime(path, ns=(now, now), follow_symlinks=False)
        except FileNotFoundError:
            return

    def move(self, source: Path, target: Path) -> bool:
        """rename(2) then fsync both directories; False when the source vanished."""
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "refusing to replace a spool entry", str(target))
        try:
            os.rename(source, target)
        except FileNotFoundError:
            return False
        fsync_dir(target.parent)
        if source.parent != target.parent:
            fsync_dir(source.parent)
        return True

    def start_reaper(self) -> None:
        """Unlink delivered messages in a thread from now on (the daemon; see reaper.py)."""
        self.reaper.start()

    def stop_reaper(self, timeout: float | None = None) -> bool:
        """Finish the unlinks handed over and end the thread; False if that took longer than `timeout`."""
        return self.reaper.close(timeout)

    def delivered(self, queue_id: str, location: Location, *, has_state: bool = True) -> None:
        """Forget a message the relay accepted (`has_state=False`: it never had a meta file)."""
        directory = self._dirs[location]
        reaper = self.reaper
        try:
            if reaper.running:
                sent = f"{directory}/{SENT_PREFIX}{queue_id}"
                os.rename(f"{directory}/{queue_id}", sent)  # no longer a message: the reaper unlinks it
                reaper.remove(sent)
            else:
                os.unlink(f"{directory}/{queue_id}")
        except FileNotFoundError:
            # Requeued during this attempt (its state says so): the requeued copy must not go out again.
            # Deleted during it: nothing is left, and its state was removed with it.
            state = self.load_state(queue_id) if has_state else None
            if state is not None and state.state is State.QUEUED:
                for path in (f"{self._new}/{queue_id}", f"{self._dirs[Location.QUEUE]}/{queue_id}"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        if has_state:
            reaper.remove(f"{self._meta}/{queue_id}.json")

    def _whereabouts(self, queue_id: str, location: Location) -> str | None:
        """The message file an attempt from `location` settles: there, or where a requeue during the
        attempt put it (new/, or queue/ once claimed again); None when it is gone (deleted)."""
        for path in (f"{self._dirs[location]}/{queue_id}", f"{self._new}/{queue_id}",
                     f"{self._dirs[Location.QUEUE]}/{queue_id}"):
            if os.path.lexists(path):
                return path
        return None

    def _settle(self, state: MessageState, location: Location, target: Location) -> bool:
        """Write the state, then move the message into `target`; False when it vanished (deleted).

        Looked for again if it moves meanwhile (an operator's requeue): the attempt's outcome stands."""
        queue_id = state.queue_id
        destination = f"{self._dirs[target]}/{queue_id}"
        when = state.next_attempt_at if target is Location.DEFERRED and state.next_attempt_at is not None \
            else time.time()
        for _ in range(3):
            source = self._whereabouts(queue_id, location)
            if source is None:
                break
            self.write_state(state)
            if source == destination:
                if os.path.lexists(destination):
                    self.settled(queue_id, target, when)
                    return True
                continue
            if self.move(Path(source), Path(destination)):
                self.settled(queue_id, target, when)
                return True
        if not self.exists(queue_id) and not os.path.lexists(f"{self._new}/{queue_id}"):
            with contextlib.suppress(FileNotFoundError):  # no message left for this state to describe
                os.unlink(self.meta_path(queue_id))
        return False

    def defer(self, state: MessageState, location: Location) -> bool:
        """Record the next attempt, then move the message to deferred/ (False if it vanished)."""
        state.state = State.DEFERRED
        return self._settle(state, location, Location.DEFERRED)

    def fail(self, state: MessageState, location: Location) -> bool:
        """Record the reason, then move the message to failed/ (False if it vanished)."""
        state.state = State.FAILED
        return self._settle(state, location, Location.FAILED)

    def add(self, data: bytes, state: MessageState, location: Location) -> None:
        """Store a new message (a split-off part) directly in `location`, state first."""
        state.state = _STATE_IN[location]
        self.write_state(state)
        directory = self.dir(location)
        install_durably(directory / f"{TMP_PREFIX}{state.queue_id}", directory / state.queue_id, data)
        if location is not Location.QUEUE:
            due = state.next_attempt_at if location is Location.DEFERRED else None
            self.settled(state.queue_id, location, time.time() if due is None else due)

    def accept(self, data: bytes, written: Callable[[str], None] | None = None) -> str:
        """Store a message the daemon received itself (its SMTP listener) durably in queue/; its id.

        Claimed from the start: the daemon wrote it, so there is no drop to check and no rename
        from new/ to wait for. Crash-safe as a claimed drop is (a queue/ file with no state yet).
        `written(queue_id)` is called once the bytes are in the temporary file (read_storing), before
        the fsyncs (pending.py)."""
        queue_id = self._fresh_id()
        directory = self.dir(Location.QUEUE)
        install_durably(directory / f"{TMP_PREFIX}{queue_id}", directory / queue_id, data,
                        written=None if written is None else functools.partial(written, queue_id))
        return queue_id

    def read_storing(self, queue_id: str) -> bytes | None:
        """A message accept() is still making durable (its temporary file in queue/), or None when that file
        cannot be read: renamed into place, or removed because the store failed (read() then tells)."""
        try:
            return self._read_entry(f"{self._dirs[Location.QUEUE]}/{TMP_PREFIX}{queue_id}")
        except (OSError, RefusedSpoolEntry):
            return None

    def new_id(self) -> str:
        return self._fresh_id()

    def names(self, location: Location) -> list[str]:
        try:
            return sorted(name for name in os.listdir(self.dir(location)) if not name.startswith("."))
        except FileNotFoundError:
            return []

    # -- operator commands (the daemon may be running) -----------------------------------------

    def locate(self, name: str) -> str | None:
        """Where a message is: "new" (a drop, by its name in new/), a Location's value, or None."""
        if not is_entry_name(name):
            return None
        if os.path.lexists(f"{self._new}/{name}"):
            return NEW
        if is_queue_id(name):
            for location in Location:
                if os.path.lexists(f"{self._dirs[location]}/{name}"):
                    return location.value
        return None

    def requeue(self, queue_id: str) -> Requeue | None:
        """Give a failed or deferred message a fresh start: back into new/ with its attempts, lifetime
        and reason cleared, its history kept. A message in new/ or queue/ is already waiting; None: no
        such message. (See the module's notes for a requeue during an attempt.)"""
        for _ in range(3):  # the daemon may move it meanwhile (deferred → failed): look again
            where = self.locate(queue_id)
            if where is None:
                break
            if where in (NEW, Location.QUEUE.value):
                return Requeue.ALREADY_WAITING
            if where == Location.FAILED.value:
                self._forget_acknowledged(queue_id)  # failing again counts again
            state = self.load_state(queue_id) or MessageState(queue_id, time.time())
            state.state, state.attempts, state.next_attempt_at, state.reason = State.QUEUED, 0, None, None
            state.first_failure_at, state.requeued_at = None, time.time()
            self.write_state(state)  # first: recovery finishes the move to new/ if this stops here
            with contextlib.suppress(FileExistsError):  # new/<id> taken meanwhile: look again
                if self.move(self.root / where / queue_id, self.new / queue_id):
                    return Requeue.REQUEUED
        if is_queue_id(queue_id) and self.locate(queue_id) is None:
            with contextlib.suppress(FileNotFoundError):  # delivered or deleted meanwhile
                os.unlink(self.meta_path(queue_id))
        return None

    def delete(self, name: str) -> str | None:
        """Remove a message wherever it is (a drop in new/ by its name), with its state and any
        acknowledgement; returns where it was ("new" or a Location's value), None if nowhere.

        Looked for in the order messages move, twice, so one the daemon moves meanwhile is found."""
        if not is_entry_name(name):
            return None
        places = [(NEW, self._new)]
        if is_queue_id(name):
            places += [(location.value, self._dirs[location]) for location in Location]
        for _ in range(2):
            for where, directory in places:
                if _remove_entry(f"{directory}/{name}"):
                    if is_queue_id(name):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.meta_path(name))
                    if where == Location.FAILED.value:
                        self._forget_acknowledged(name)
                    return where
        return None

    # -- acknowledged failures ------------------------------------------------------------------

    def acknowledged(self) -> set[str]:
        """The ids in failed/ an operator has acknowledged (`mailwatchd ack`); stale ids included.
        OSError when the list cannot be read."""
        try:
            fd = os.open(self._acknowledged_path, _READ_FLAGS)
        except FileNotFoundError:
            return set()
        with os.fdopen(fd, "rb") as handle:
            return {word for word in handle.read(1 << 24).decode(errors="replace").split() if is_queue_id(word)}

    def acknowledge(self, queue_ids: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
        """Mark failed messages as seen: they stay in failed/ but unacknowledged_failed() no longer counts
        them. None: every message in failed/ now. Returns (acknowledged, not in failed/)."""
        with self._acknowledgements() as (failed, current):
            wanted = sorted(failed) if queue_ids is None else list(dict.fromkeys(queue_ids))
            done = [queue_id for queue_id in wanted if queue_id in failed]
            self._write_acknowledged(current & failed | set(done), current)
        return done, [queue_id for queue_id in wanted if queue_id not in failed]

    def unacknowledged_failed(self) -> int:
        """How many messages in failed/ are not acknowledged: what status and check warn about."""
        return self.failed_counts()[1]

    def failed_counts(self) -> tuple[int, int]:
        """(messages in failed/, of which not acknowledged).

        Cheap to call every few seconds: while failed/ is unchanged it costs one stat(2). Every
        change that matters (a failure moved in, a requeue or delete, an acknowledgement: the
        list is replaced by rename in failed/) changes failed/'s mtime; otherwise it lists failed/
        and reads the list. A count taken within a second of the last change is not kept, so two
        changes within one tick of the file system's clock are both seen."""
        try:
            st = os.stat(self._dirs[Location.FAILED])
        except FileNotFoundError:
            return 0, 0
        key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if self._unacknowledged is not None and self._unacknowledged[0] == key:
            return self._unacknowledged[1]
        try:
            acknowledged = self.acknowledged()
        except OSError:  # an unreadable list acknowledges nothing: warn rather than hide
            acknowledged = set()
        failed = set(self.names(Location.FAILED))
        counts = len(failed), len(failed - acknowledged)
        settled = time.time_ns() - st.st_mtime_ns > 1_000_000_000
        self._unacknowledged = (key, counts) if settled else None
        return counts

    @contextlib.contextmanager
    def _acknowledgements(self) -> Iterator[tuple[set[str], set[str]]]:
        """(ids in failed/, ids acknowledged) under an exclusive flock(2) of failed/ itself: the
        commands that rewrite the list take turns; the daemon only reads it."""
        try:
            fd = os.open(self._dirs[Location.FAILED], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield set(), set()
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield set(self.names(Location.FAILED)), self.acknowledged()
        finally:
            os.close(fd)

    def _forget_acknowledged(self, queue_id: str) -> None:
        with self._acknowledgements() as (failed, current):
            if queue_id in current:
                self._write_acknowledged((current - {queue_id}) & failed, current)

    def _write_acknowledged(self, ids: set[str], current: set[str]) -> None:
        if ids == current:
            return
        final = Path(self._acknowledged_path)
        if not ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final)
            fsync_dir(final.parent)
            return
        temporary = final.with_name(f"{TMP_PREFIX}{ACKNOWLEDGED.lstrip('.')}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        data = "".join(f"{queue_id}\n" for queue_id in sorted(ids)).encode()
        if os.geteuid() == 0:
            self._install_as_owner(temporary, final, data)
        else:
            install_durably(temporary, final, data)

    def probe_writable(self) -> str | None:
        """None if the spool takes a durable write now, else why not."""
        path = self.meta / f"{TMP_PREFIX}probe-{os.getpid()}"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            write_durably(path, b"ok")
            os.unlink(path)
        except (OSError, SpoolFull) as exc:
            return str(exc)
        return None


def _remove_entry(path: str) -> bool:
    """Unlink a spool entry (a real directory: remove its tree, never following a link); False if absent."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def scandir(path: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            yield from entries
    except FileNotFoundError:
        return
