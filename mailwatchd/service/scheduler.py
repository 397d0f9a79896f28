"""What is due: messages ready now, and deferred ones on a heap ordered by next-attempt time.

Nothing here touches the disk. The daemon feeds it from intake and recovery, and workers
take from it; a worker waits on one event (new work, a due retry, a stop), never a tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mailwatchd.spool.store import Location


@dataclass(frozen=True)
class WorkItem:
    """A message to attempt now, and the directory it is in."""

    queue_id: str
    location: Location


class Scheduler:
    """Ready queue plus due heap. Each queue id is held at most once (ready, due or taken)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._ready: deque[WorkItem] = deque()
        self._due: list[tuple[float, str]] = []
        self._due_at: dict[str, float] = {}  # queue id → its live heap entry (lazy deletion)
        self._not_deferred: dict[str, Location] = {}  # a retry of a message that never left that directory
        self._held: set[str] = set()  # ids ready or taken
        self._wake = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return len(self._ready) + len(self._due_at)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def deferred_count(self) -> int:
        return len(self._due_at)

    def knows(self, queue_id: str) -> bool:
        return queue_id in self._held or queue_id in self._due_at

    def add_ready(self, item: WorkItem, *, front: bool = False) -> None:
        """Make a message ready now (a due entry for it is dropped)."""
        if item.queue_id in self._held:
            return
        self._due_at.pop(item.queue_id, None)
        self._held.add(item.queue_id)
        if front:
            self._ready.appendleft(item)
        else:
            self._ready.append(item)
        self._wake.set()

    def add_deferred(self, due: float, queue_id: str, location: Location = Location.DEFERRED) -> None:
        """Schedule a message for `due` (epoch seconds); it is in deferred/ unless `location` says otherwise."""
        if queue_id in self._held:
            return
        if location is Location.DEFERRED:
            self._not_deferred.pop(queue_id, None)
        else:
            self._not_deferred[queue_id] = location
        self._due_at[queue_id] = due
        heapq.heappush(self._due, (due, queue_id))
        self._wake.set()

    def done(self, queue_id: str) -> None:
        """A taken message left the worker's hands (delivered, deferred, failed or returned)."""
        self._held.discard(queue_id)

    def release(self, item: WorkItem) -> None:
        """Give a taken message back, first in line (no relay could take it now)."""
        self._held.discard(item.queue_id)
        self.add_ready(item, front=True)

    def flush(self) -> int:
        """Make every deferred message due now; returns how many."""
        count = 0
        for queue_id in list(self._due_at):
            self._due_at[queue_id] = 0.0
            heapq.heappush(self._due, (0.0, queue_id))
            count += 1
        self._wake.set()
        return count

    def _promote_due(self) -> float | None:
        """Move due messages to the ready queue; return the next due time, if any."""
        now = self._clock()
        while self._due:
            due, queue_id = self._due[0]
            if self._due_at.get(queue_id) != due:
                heapq.heappop(self._due)  # stale entry
                continue
            if due > now:
                return due
            heapq.heappop(self._due)
            del self._due_at[queue_id]
            self._held.add(queue_id)
            self._ready.append(WorkItem(queue_id, self._not_deferred.pop(queue_id, Location.DEFERRED)))
        return None

    def take_nowait(self) -> WorkItem | None:
        self._promote_due()
        return self._ready.popleft() if self._ready else None

    async def take(self, timeout: float | None = None) -> WorkItem | None:
        """The next ready message, waiting up to `timeout` seconds (None if none came)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            next_due = self._promote_due()
            if self._ready:
                return self._ready.popleft()
            wait = None if next_due is None else max(0.0, next_due - self._clock())
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                wait = remaining if wait is None else min(wait, remaining)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
        return None

    def close(self) -> None:
        """Stop handing out work: takers waiting now, and later ones, get None."""
        self.closed = True
        self._wake.set()

    def wake(self) -> None:
        """Wake waiting takers (e.g. to let them notice a stop)."""
        self._wake.set()
