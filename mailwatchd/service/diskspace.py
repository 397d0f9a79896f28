"""Room on the spool's filesystem: is the daemon degraded (the spool is full) or not.

Degraded while the filesystem has less free space than MAILWATCHD_SPOOL_MIN_FREE (or almost no free
inodes), or after a write failed with ENOSPC/EDQUOT until a test write succeeds again (a quota or a
threshold below what a write needs shows no shortage in statvfs). While degraded, new work waits in
new/ and deliveries continue (each one frees space); nothing in the process is at fault, so it is not
a health problem. Checked on every main-loop tick and at once when a write reports the disk full.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailwatchd.errors import SpoolFull
from mailwatchd.service.logs import get_logger
from mailwatchd.spool.durable import write_durably
from mailwatchd.spool.store import TMP_PREFIX, Spool

log = get_logger()
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# A deferral's state file, a drop, a split-off part: each takes an inode. Fewer free than this is full.
MIN_FREE_INODES = 64
_WAITS = "new mail waits in new/, deliveries continue"


@dataclass(frozen=True)
class Room:
    """Free space as an unprivileged writer (the daemon's user) sees it."""

    free_bytes: int
    free_inodes: int | None  # None: the filesystem does not count inodes (btrfs reports 0 of 0)


def measure(path: os.PathLike[str] | str) -> Room:
    """statvfs(2): f_bavail and f_favail, what is left once the blocks reserved for root are set aside."""
    st = os.statvfs(path)
    return Room(st.f_bavail * st.f_frsize, st.f_favail if st.f_files else None)


def is_full_error(exc: BaseException) -> bool:
    """True when `exc` says the filesystem has no room (SpoolFull, ENOSPC, EDQUOT)."""
    return isinstance(exc, SpoolFull) or (isinstance(exc, OSError) and exc.errno in FULL_ERRNOS)


def shown_size(size: int) -> str:
    """Bytes as an operator reads them: '512 B', '3.1 MiB', '50 MiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            text = f"{value:.1f}".removesuffix(".0") if unit != "B" else f"{size}"
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class SpoolSpace:
    """Decides "degraded or not" for one spool; `on_change(reason or None)` is called on every transition."""

    def __init__(self, spool: Spool, *, min_free: Callable[[], int],
                 on_change: Callable[[str | None], None]) -> None:
        self.spool = spool
        self.min_free = min_free  # read at every check: a reload may change it
        self.on_change = on_change
        self.degraded: str | None = None
        self._write_failed: str | None = None  # the ENOSPC/EDQUOT a write reported, until a test write succeeds
        self._since = 0.0

    def check(self) -> str | None:
        """Measure now; returns why new work waits, or None when it does not."""
        path = self.spool.root
        min_free = self.min_free()
        try:
            room = measure(path)
        except OSError as exc:  # the spool vanished or cannot be stat'ed: not a question of space
            log.debug("spool_statvfs_failed", detail=str(exc))
            return self.degraded
        reason: str | None = None
        if room.free_bytes < min_free:
            reason = (f"spool full: {shown_size(room.free_bytes)} free on {path}, below MAILWATCHD_SPOOL_MIN_FREE "
                      f"({shown_size(min_free)}); {_WAITS}")
        elif room.free_inodes is not None and room.free_inodes < MIN_FREE_INODES:
            reason = f"spool full: {room.free_inodes} free inodes on {path}; {_WAITS}"
        elif self._write_failed is not None:
            failure = self._test_write()
            if failure is not None and is_full_error(failure):
                reason = (f"spool full: a write failed ({self._write_failed}) with {shown_size(room.free_bytes)} "
                          f"free on {path}; {_WAITS}")
            else:
                self._write_failed = None  # room again, or a failure that is not about room (health reports it)
        self._set(reason, room)
        return self.degraded

    def saw_full(self, error: SpoolFull | OSError) -> None:
        """A write reported the disk full: degraded from now until a check finds room and a test write succeeds."""
        self._write_failed = _detail(error)
        if self.degraded is None:
            self.check()

    def probe(self) -> str | None:
        """A durable test write: None when the spool takes it, or only lacks room (then it is degraded);
        else why it cannot be written (permissions, a read-only filesystem)."""
        failure = self._test_write()
        if failure is None:
            return None
        if is_full_error(failure):
            self.saw_full(failure)
            return None
        return str(failure)

    def _test_write(self) -> SpoolFull | OSError | None:
        path = self.spool.meta / f"{TMP_PREFIX}space-probe-{os.getpid()}"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            write_durably(path, b"ok")
            os.unlink(path)
        except (SpoolFull, OSError) as exc:
            return exc
        return None

    def _set(self, reason: str | None, room: Room) -> None:
        if (reason is None) == (self.degraded is None):
            self.degraded = reason  # same state; the figures in the sentence may have changed
            return
        now = time.monotonic()
        if reason is not None:
            log.warning("spool_full", spool=str(self.spool.root), free_bytes=room.free_bytes,
                        free_inodes=room.free_inodes, min_free_bytes=self.min_free(), write_error=self._write_failed,
                        waiting_in_new=len(self.spool.drops()), action="new mail waits in new/; deliveries continue")
            self._since = now
        else:
            log.info("spool_space_recovered", spool=str(self.spool.root), free_bytes=room.free_bytes,
                     degraded_s=round(now - self._since, 1), action="claiming what waits in new/")
        self.degraded = reason
        self.on_change(reason)


def _detail(exc: SpoolFull | OSError) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    cause = exc.__cause__
    return cause.strerror or str(cause) if isinstance(cause, OSError) else str(exc)
