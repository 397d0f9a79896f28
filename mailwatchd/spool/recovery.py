"""Start-up recovery: finish the moves a crash interrupted, and list what is ready and due.

Every state change writes meta/<id>.json before the file moves (see store.py), so the meta
file says where an interrupted message was going; recovery completes that move.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

from mailwatchd.spool.messagestate import State
from mailwatchd.spool.store import LOCATION_OF, TMP_PREFIX, Location, Spool, scandir


@dataclass
class Recovery:
    """What start-up found: messages ready now, deferred ones with their due time."""

    ready: list[str] = field(default_factory=list)
    deferred: list[tuple[float, str]] = field(default_factory=list)
    completed_moves: int = 0
    orphans_removed: int = 0


def recover(spool: Spool, now: float | None = None) -> Recovery:
    """Finish moves a crash interrupted and list what is ready and what is deferred."""
    now = time.time() if now is None else now
    recovery = Recovery()
    for directory in (spool.meta, *(spool.dir(loc) for loc in Location)):
        for entry in scandir(directory):
            if entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    present: set[str] = set(spool.drops())  # a requeued message keeps its history in new/
    # Listed before any move, so a message moved to a later directory is not seen twice.
    listed = {location: spool.names(location) for location in Location}
    for location, names in listed.items():
        for name in names:
            present.add(name)
            state = spool.load_state(name)
            wanted = LOCATION_OF[state.state] if state else location
            if state is not None and state.state is State.QUEUED and location is not Location.QUEUE:
                # An interrupted `requeue`: it was on its way back to new/.
                with contextlib.suppress(FileExistsError):  # new/<id> taken: leave it be
                    if spool.move(spool.dir(location) / name, spool.new / name):
                        recovery.completed_moves += 1
                continue
            where = location
            if wanted is not location and not os.path.lexists(spool.dir(wanted) / name):
                spool.move(spool.dir(location) / name, spool.dir(wanted) / name)
                recovery.completed_moves += 1
                where = wanted
            if where is Location.QUEUE:
                recovery.ready.append(name)
            elif where is Location.DEFERRED:
                due = state.next_attempt_at if state and state.next_attempt_at is not None else now
                recovery.deferred.append((due, name))
    for entry in scandir(spool.meta):
        queue_id = entry.name.removesuffix(".json")
        if entry.name.endswith(".json") and queue_id not in present:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                recovery.orphans_removed += 1
    recovery.ready.sort()
    recovery.deferred.sort()
    return recovery
