"""The spool: where messages live, and the only code that moves them.

Layout under the spool root:
  tmp/, new/   the Maildir drop: a submitter writes in tmp/ and renames into new/
  queue/       claimed by the daemon, ready for an attempt (file name = queue id)
  deferred/    waiting for the next attempt
  failed/      given up; meta/ says why
  meta/        <id>.json, the state of a message that has had an attempt
  mailwatchd.lock   flock(2)ed by the running daemon, holding its pid

Invariants:
- A message changes state only by rename(2) inside the spool (one filesystem).
- meta/<id>.json is written (tmp, fsync, rename, fsync dir) before the message file moves:
  it names where the message is going, so recovery can finish an interrupted move.
- A message file is unlinked only after the relay accepted it (the reply after DATA).
- Entries in new/ are untrusted: never followed through a symlink, never opened blocking.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from mailwatchd.errors import RefusedSpoolEntry, SpoolFull, SpoolLocked
from mailwatchd.spool.durable import drop_dirs, fsync_dir, install_durably, write_durably
from mailwatchd.spool.messagestate import MessageState, State
from mailwatchd.spool.queueid import is_queue_id, new_queue_id

STALE_TMP_SECONDS = 36 * 3600  # the Maildir convention for abandoned tmp/ files
TMP_PREFIX = ".tmp-"
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
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

    def _fresh_id(self, preferred: str | None = None) -> str:
        # A submitter's name is kept only if it is id-shaped and free: a drop must never be
        # able to replace a queued message by reusing its id.
        if preferred is not None and is_queue_id(preferred) and not self.exists(preferred):
            return preferred
        while True:
            queue_id = new_queue_id()
            if not self.exists(queue_id):
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
        try:
            fd = os.open(f"{self._dirs[location]}/{queue_id}", _READ_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
                raise RefusedSpoolEntry(refusal(_SYMLINK)) from None
            raise
        try:
            reason = self._refusal(os.fstat(fd))
            if reason is not None:
                raise RefusedSpoolEntry(reason)
            chunks = []
            remaining = self.max_message_size + 1
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
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
        """Replace meta/<id>.json atomically and durably."""
        final = self.meta_path(state.queue_id)
        temporary = self.meta / f"{TMP_PREFIX}{state.queue_id}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        install_durably(temporary, final, state.to_json())

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

    def delivered(self, queue_id: str, location: Location, *, has_state: bool = True) -> None:
        """Forget a message the relay accepted (`has_state=False`: it never had a meta file)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._dirs[location]}/{queue_id}")
        if has_state:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._meta}/{queue_id}.json")

    def defer(self, state: MessageState, location: Location) -> bool:
        """Record the next attempt, then move the message to deferred/ (False if it vanished)."""
        state.state = State.DEFERRED
        self.write_state(state)
        if location is Location.DEFERRED:
            return os.path.lexists(self.dir(location) / state.queue_id)
        return self.move(self.dir(location) / state.queue_id, self.dir(Location.DEFERRED) / state.queue_id)

    def fail(self, state: MessageState, location: Location) -> bool:
        """Record the reason, then move the message to failed/ (False if it vanished)."""
        state.state = State.FAILED
        self.write_state(state)
        if location is Location.FAILED:
            return True
        return self.move(self.dir(location) / state.queue_id, self.dir(Location.FAILED) / state.queue_id)

    def add(self, data: bytes, state: MessageState, location: Location) -> None:
        """Store a new message (a split-off part) directly in `location`, state first."""
        state.state = _STATE_IN[location]
        self.write_state(state)
        directory = self.dir(location)
        install_durably(directory / f"{TMP_PREFIX}{state.queue_id}", directory / state.queue_id, data)

    def new_id(self) -> str:
        return self._fresh_id()

    def names(self, location: Location) -> list[str]:
        try:
            return sorted(name for name in os.listdir(self.dir(location)) if not name.startswith("."))
        except FileNotFoundError:
            return []

    # -- operator commands (the daemon may be running) -----------------------------------------

    def requeue(self, queue_id: str) -> bool:
        """Give a failed or deferred message a fresh start: back into new/, history kept."""
        for location in (Location.FAILED, Location.DEFERRED):
            path = self.dir(location) / queue_id
            if os.path.lexists(path):
                state = self.load_state(queue_id) or MessageState(queue_id, time.time())
                state.state, state.attempts, state.next_attempt_at, state.reason = State.QUEUED, 0, None, None
                self.write_state(state)
                return self.move(path, self.new / queue_id)
        return False

    def delete(self, queue_id: str) -> bool:
        """Remove a message wherever it is; True if something was removed."""
        removed = False
        for location in Location:
            path = self.dir(location) / queue_id
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed = True
            except FileNotFoundError:
                continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.meta_path(queue_id))
        return removed

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


def scandir(path: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            yield from entries
    except FileNotFoundError:
        return
