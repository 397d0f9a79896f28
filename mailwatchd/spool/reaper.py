"""Removing delivered messages' files off the event loop.

unlink(2) of a message file frees its inode and blocks: on ext4 it took 0.2-0.8 ms of wall time
each (most of it waiting, not CPU) while the event loop stood still for every worker. So a
delivered message is first renamed to a dot name in its own directory (SENT_PREFIX, about 20 µs:
from then on it is no message, and a kill -9 cannot send it again), and this thread unlinks the
renamed file, and then its state, in the order they were handed over. What a kill leaves is a
dot file that recovery hands to the reaper again at the next start.

The thread only unlinks names it is given; it reads nothing and moves nothing, so it needs no
lock with the rest of the spool. `pending` is how many names wait: the workers slow down when
it passes BACKLOG_LIMIT, so the list, and the shutdown's flush, stay short. A worker that waits
(caught_up) is woken by the thread through its event loop (call_soon_threadsafe) after the
batch that brings `pending` down: no polling, and no timeout, since the thread unlinks every
batch it was handed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable

SENT_PREFIX = ".sent-"  # a delivered message's file, waiting to be unlinked
BATCH = 32  # paths handed to the thread at once (one wake-up of it), or fewer at flush()
BACKLOG_LIMIT = 256  # paths waiting before the workers wait for the reaper (caught_up)


class Reaper:
    """One thread that unlinks the paths it is given, in order; synchronous until started.

    Paths are handed over BATCH at a time; `flush()` hands over the rest (a worker does when it runs
    out of work, the daemon at shutdown). A path not yet handed over when the process is killed is a
    dot file recovery removes."""

    def __init__(self) -> None:
        self._batches: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        self._batch: list[str] = []
        self._thread: threading.Thread | None = None
        self._handed = 0  # written by the caller's thread only
        self._removed = 0  # written by the reaper's thread only
        self.failures = 0  # unlinks that failed other than for a missing file (the reaper's thread writes)
        # caught_up's waiters, (limit, future), and how to wake their loop: written by the loop's thread only.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: Callable[[], object] | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def pending(self) -> int:
        """Paths given to remove() and not yet unlinked."""
        return self._handed + len(self._batch) - self._removed

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mailwatchd-reaper", daemon=True)
            self._thread.start()

    def remove(self, path: str) -> None:
        """Unlink `path` (in the thread once started; a missing file is no error)."""
        if self._thread is None:
            _unlink(path)
            return
        batch = self._batch
        batch.append(path)
        if len(batch) >= BATCH:
            self.flush()

    def flush(self) -> None:
        """Hand the paths gathered so far to the thread."""
        batch = self._batch
        if batch and self._thread is not None:
            self._batch = []
            self._handed += len(batch)
            self._batches.put(batch)

    async def caught_up(self, limit: int = BACKLOG_LIMIT) -> None:
        """Return once at most `limit` paths wait (at once, but for a disk slower than the deliveries)."""
        self.flush()
        if self._thread is None or self.pending <= limit:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (limit, waiter)
        self._waiters.append(entry)
        self._wake = functools.partial(loop.call_soon_threadsafe, self._wake_waiters)  # this caller's loop
        # The thread reads `_waiters` after it counts a batch as removed: looked at again now that the waiter is
        # listed, a batch counted in between is seen here, or the thread sees the waiter.
        self._wake_waiters()
        try:
            await waiter
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _wake_waiters(self) -> None:
        """(In the loop's thread.) Wake the waiters whose limit `pending` is down to, or all if the thread ended."""
        pending, ended = self.pending, self._thread is None
        for limit, waiter in list(self._waiters):
            if (ended or pending <= limit) and not waiter.done():
                self._waiters.remove((limit, waiter))
                waiter.set_result(None)

    def close(self, timeout: float | None = None) -> bool:
        """Unlink everything given to remove(), then end the thread; False if it did not finish within `timeout`."""
        self.flush()
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._batches.put(None)
        thread.join(timeout)
        self._notify()  # (close may run in another thread) no thread is left to wait for
        return not thread.is_alive()

    def _notify(self) -> None:
        """(Any thread.) Have the waiters' loop look at them again."""
        wake = self._wake
        if self._waiters and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                wake()

    def _run(self) -> None:
        batches = self._batches
        while (batch := batches.get()) is not None:
            for path in batch:
                if not _unlink(path):
                    self.failures += 1
            self._removed += len(batch)
            self._notify()


def _unlink(path: str) -> bool:
    """False when the file is there and could not be removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
