"""What is due: messages ready now (oldest queue id first), and deferred ones on a heap ordered by
next-attempt time.

Nothing here touches the disk. The daemon feeds it from intake and recovery, and workers
take from it; a worker waits on one event (new work, a due retry, a stop), never a tick.

A message costs one int on one heap (about 50 bytes): a queue id is 20 hex digits (queueid.py), held
as the 80-bit number it spells, with its directory in two more bits (the fourth value: in queue/ and
known to have no state yet, so its attempt does not look for one) and, on the due heap, the due time
in milliseconds above them. Ids sort by creation time, so the ready heap hands out the oldest
message first and its top is the oldest ready message.

There is no index by id (it would triple the memory), so an id can be listed twice: after an
operator's `requeue` of a deferred message, or a second add of the same id. That is made safe where
it is taken: an id is in one worker's hands at most once (a taken id is not listed again, and a
listing of a taken id is dropped when it comes up), and two listings of one id that are ready
together are handed out once. A stale listing that comes up later costs one attempt, which finds the
message gone (delivered) or tries it early.

Deferred messages found at start-up may be counted before their due times are known (a lazy load,
recovery.DeferredLoad): `expect_deferred` counts them, `load_deferred` and `skip_deferred` account
for each as the load reads it, `end_deferred_load` closes the load. Meanwhile they count as deferred
and the oldest of them as the oldest message; a message the daemon defers itself during the load
(one requeued, claimed and deferred again) is not listed a second time by the load, and after a
flush the load hands out the rest as ready now.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailwatchd.spool.queueid import QUEUE_ID_DIGITS, QUEUE_ID_LENGTH, is_queue_id
from mailwatchd.spool.store import Location

# A listing's directory, by its code; the last: queue/, no state (sorting after a listing of the same id with one).
_LOCATIONS = (Location.QUEUE, Location.DEFERRED, Location.FAILED, Location.QUEUE)
_CODE = {location: code for code, location in enumerate(_LOCATIONS[:3])}
_STATELESS = 3
_QUEUE_CODE, _DEFERRED_CODE = _CODE[Location.QUEUE], _CODE[Location.DEFERRED]
_WHERE_BITS = 2
_DUE_SHIFT = 80 + _WHERE_BITS  # a due heap entry: due ms << _DUE_SHIFT | id << _WHERE_BITS | directory
_LISTING_MASK = (1 << _DUE_SHIFT) - 1


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A message to attempt now, and the directory it is in."""

    queue_id: str
    location: Location
    stateless: bool = False  # in queue/ under an id made for it, so it has no state (meta/) to read yet


def _key(queue_id: str) -> int:
    if not is_queue_id(queue_id):
        raise ValueError(f"not a queue id: {queue_id!r}")
    return int(queue_id, 16)


def _listing(queue_id: str, location: Location, stateless: bool = False) -> int:
    code = _STATELESS if stateless and location is Location.QUEUE else _CODE[location]
    return _key(queue_id) << _WHERE_BITS | code


def _item(listing: int) -> WorkItem:
    code = listing & 3
    return WorkItem(f"{listing >> _WHERE_BITS:020X}", _LOCATIONS[code], code == _STATELESS)


class Scheduler:
    """Ready heap (oldest id first) plus due heap (earliest due first), and the ids in workers' hands."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._ready: list[int] = []  # heap of listings: id << 2 | directory
        self._due: list[int] = []  # heap of due ms << _DUE_SHIFT | listing
        self._taken: set[int] = set()  # ids in a worker's hands
        self._oldest_due: int | None = None  # the smallest id on the due heap; None: work it out when asked
        self._wake = asyncio.Event()
        self.closed = False
        # A lazy load of deferred messages (see the module's notes): how many it has still to account for, the
        # smallest id among all it was to load, the ids deferred by add_deferred since it began, and a flush since.
        self._loading = False
        self._pending = 0
        self._pending_oldest: int | None = None
        self._deferred_during_load: set[int] = set()
        self._flushed_during_load = False

    def __len__(self) -> int:
        return len(self._ready) + len(self._due) + self._pending

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def deferred_count(self) -> int:
        return len(self._due) + self._pending

    @property
    def loading(self) -> bool:
        """Whether a lazy load of deferred messages is under way (expect_deferred, not yet end_deferred_load)."""
        return self._loading

    @property
    def pending_deferred(self) -> int:
        """Deferred messages counted by expect_deferred that the load has not accounted for yet."""
        return self._pending

    def knows(self, queue_id: str) -> bool:
        """Whether the id is ready, deferred or taken. A scan (O(n)): for tests and diagnostics."""
        if not is_queue_id(queue_id):
            return False
        key = int(queue_id, 16)
        return (key in self._taken or any(listing >> _WHERE_BITS == key for listing in self._ready)
                or any((entry & _LISTING_MASK) >> _WHERE_BITS == key for entry in self._due))

    def oldest_id(self) -> str | None:
        """The smallest (oldest) queue id ready, deferred or taken; None when there is none.

        O(1) but after the oldest deferred message came due, when the due heap is scanned once."""
        candidates = [min(self._taken)] if self._taken else []
        if self._pending_oldest is not None:
            candidates.append(self._pending_oldest)
        if self._ready:
            candidates.append(self._ready[0] >> _WHERE_BITS)
        if self._due:
            if self._oldest_due is None:
                self._oldest_due = min(entry & _LISTING_MASK for entry in self._due) >> _WHERE_BITS
            candidates.append(self._oldest_due)
        return f"{min(candidates):020X}" if candidates else None

    def add_ready(self, item: WorkItem, *, front: bool = False) -> None:
        """Make a message ready now (ignored while a worker has it: its attempt settles it).

        `front` is kept for callers: the oldest message goes first, so a message given back is first
        in line again unless an older one came meanwhile."""
        listing = _listing(item.queue_id, item.location, item.stateless)
        if listing >> _WHERE_BITS in self._taken:
            return
        heapq.heappush(self._ready, listing)
        self._wake.set()

    def add_deferred(self, due: float, queue_id: str, location: Location = Location.DEFERRED) -> None:
        """Schedule a message for `due` (epoch seconds); it is in deferred/ unless `location` says otherwise.

        Called at every deferral (a worker's, or recovery's for a message it moved), so _listing is written out
        here. During a load (expect_deferred) the id is noted: the load does not list it again."""
        if len(queue_id) != QUEUE_ID_LENGTH or not QUEUE_ID_DIGITS.issuperset(queue_id):  # is_queue_id
            raise ValueError(f"not a queue id: {queue_id!r}")
        key = int(queue_id, 16)
        if self._loading:
            self._deferred_during_load.add(key)
        if key in self._taken:
            return
        self._push_due(due, key, _CODE[location])

    def _push_due(self, due: float, key: int, code: int) -> None:
        heapq.heappush(self._due, math.ceil(due * 1000) << _DUE_SHIFT | key << _WHERE_BITS | code)
        oldest = self._oldest_due
        if oldest is not None and key < oldest or len(self._due) == 1:
            self._oldest_due = key
        self._wake.set()

    def add_queued(self, queue_ids: list[str]) -> None:
        """Make messages in queue/ ready now: add_ready(WorkItem(queue_id, Location.QUEUE)) for each, written
        out, as recovery hands over every claimed message before READY=1."""
        if not set(map(len, queue_ids)) <= {QUEUE_ID_LENGTH} or not QUEUE_ID_DIGITS.issuperset("".join(queue_ids)):
            for queue_id in queue_ids:
                _key(queue_id)  # raises ValueError for the first that is no queue id
        ready, taken, push = self._ready, self._taken, heapq.heappush
        for key in map(int, queue_ids, itertools.repeat(16)):
            if key not in taken:
                push(ready, key << _WHERE_BITS | _QUEUE_CODE)
        self._wake.set()

    # -- a lazy load of deferred messages (see the module's notes) ----------------------------------------

    def expect_deferred(self, count: int, oldest: str | None) -> None:
        """Count `count` deferred messages whose due times a load is still to read, the oldest of them `oldest`."""
        self._loading = True
        self._pending = count
        self._pending_oldest = _key(oldest) if oldest is not None and count else None
        self._deferred_during_load.clear()
        self._flushed_during_load = False

    def load_deferred(self, due: float, queue_id: str) -> None:
        """One message of the load, in deferred/ and due at `due`: scheduled, unless the daemon deferred it
        itself since the load began (then it is listed already); ready now if a flush came meanwhile."""
        if len(queue_id) != QUEUE_ID_LENGTH or not QUEUE_ID_DIGITS.issuperset(queue_id):  # is_queue_id
            raise ValueError(f"not a queue id: {queue_id!r}")
        if self._pending:
            self._pending -= 1
        key = int(queue_id, 16)
        if key in self._deferred_during_load or key in self._taken:
            return
        if self._flushed_during_load:
            heapq.heappush(self._ready, key << _WHERE_BITS | _DEFERRED_CODE)
        else:  # _push_due, written out: once per deferred message after start-up
            heapq.heappush(self._due, math.ceil(due * 1000) << _DUE_SHIFT | key << _WHERE_BITS | _DEFERRED_CODE)
            oldest = self._oldest_due
            if oldest is not None and key < oldest or len(self._due) == 1:
                self._oldest_due = key
        self._wake.set()

    def skip_deferred(self, queue_id: str) -> None:
        """One message of the load that is not (or no longer) deferred: moved by a command, or by the load."""
        if self._pending:
            self._pending -= 1

    def end_deferred_load(self) -> None:
        """The load is over (or given up): what it did not account for no longer counts."""
        self._loading = False
        self._pending = 0
        self._pending_oldest = None
        self._deferred_during_load = set()
        self._flushed_during_load = False

    def done(self, queue_id: str) -> None:
        """A taken message left the worker's hands (delivered, deferred, failed or returned)."""
        self._taken.discard(_key(queue_id))

    def release(self, item: WorkItem) -> None:
        """Give a taken message back (no relay could take it now)."""
        self._taken.discard(_key(item.queue_id))
        self.add_ready(item, front=True)

    def flush(self) -> int:
        """Make every deferred message ready now (during a load, also those it loads later); returns how many
        listings moved, or will."""
        due, self._due, self._oldest_due = self._due, [], None
        if self._loading:
            self._flushed_during_load = True
        for entry in due:
            listing = entry & _LISTING_MASK
            if listing >> _WHERE_BITS not in self._taken:
                self._ready.append(listing)
        heapq.heapify(self._ready)
        self._wake.set()
        return len(due) + self._pending

    def _promote_due(self) -> float | None:
        """Move due messages to the ready heap; return the next due time, if any."""
        due = self._due
        if not due:
            return None
        now_ms = self._clock() * 1000
        while due:
            entry = due[0]
            at = entry >> _DUE_SHIFT
            if at > now_ms:
                return at / 1000
            heapq.heappop(due)
            listing = entry & _LISTING_MASK
            key = listing >> _WHERE_BITS
            if key == self._oldest_due:
                self._oldest_due = None
            if key not in self._taken:
                heapq.heappush(self._ready, listing)
        return None

    def _pop_ready(self) -> WorkItem | None:
        ready, taken = self._ready, self._taken
        while ready:
            listing = heapq.heappop(ready)
            key = listing >> _WHERE_BITS
            while ready and ready[0] >> _WHERE_BITS == key:
                heapq.heappop(ready)  # listed twice: handed out once
            if key in taken:
                continue
            taken.add(key)
            return _item(listing)
        return None

    def take_nowait(self) -> WorkItem | None:
        self._promote_due()
        return self._pop_ready()

    async def take(self, timeout: float | None = None) -> WorkItem | None:
        """The next ready message, waiting up to `timeout` seconds (None if none came)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            next_due = self._promote_due()
            item = self._pop_ready()
            if item is not None:
                return item
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
