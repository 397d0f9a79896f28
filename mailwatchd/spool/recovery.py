"""Start-up recovery: finish the moves a crash interrupted, and list what is ready and due.

Every state change writes meta/<id>.json before the file moves (see store.py), so the meta
file says where an interrupted message was going; recovery completes that move.

Each directory is scanned once and no state is read twice. A settled file in deferred/ or failed/
(store.py) is where its state says, and a deferred one's mtime is its next attempt, so its state is not
read; a file in queue/ has its state read only when it has one (a claimed message has none before its
first attempt); every other file has its state read as always, and is settled once it is where its
state says. The directories are scanned against the direction messages move (failed/, deferred/,
then queue/), so a message recovery moves is not met again.

Removing the states whose message is gone (orphans) is not needed to know what is due: the daemon runs
that sweep after READY=1 (`recover(..., sweep=False)`, then `Recovery.sweep`), a chunk at a time on its
event loop, where no move of its own can fall between the look for a message and the unlink of its
state. Temporaries in meta/ found then are removed only if they are older than the recovery (by a second):
a command (requeue) may be writing one.

The due times of deferred messages are not needed for READY=1 either: with `lazy_deferred=True` recovery
only lists deferred/ (so their number is known) and keeps their ids, 10 bytes each, in `Recovery.deferred_load`;
the daemon reads each file after READY=1, a chunk per turn of its event loop, exactly as the scan here would
have (a settled file's mtime is its due time; any other has its state read and its interrupted move finished).
A file gone by then was moved by a command (requeue, delete); one the daemon itself has deferred since is
listed by the scheduler already (scheduler.py). Ids in deferred/ with no state (when meta/ is listed in
memory) and names that are no queue id are still recovered here, before READY=1.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mailwatchd.spool.messagestate import State
from mailwatchd.spool.queueid import QUEUE_ID_DIGITS, QUEUE_ID_LENGTH, is_queue_id
from mailwatchd.spool.reaper import SENT_PREFIX
from mailwatchd.spool.store import (
    LOCATION_OF,
    SETTLED_NS,
    TMP_PREFIX,
    Location,
    Spool,
    is_entry_name,
    scandir,
)

Ready = Callable[[str], None]
ReadyBatch = Callable[[list[str]], None]
Deferred = Callable[[float, str], None]
Gone = Callable[[str], None]
PROGRESS_EVERY = 10_000  # entries between two calls of recover()'s `progress`
_SCAN_ORDER = (Location.FAILED, Location.DEFERRED, Location.QUEUE)
_PLACES = (Location.DEFERRED, Location.FAILED, Location.QUEUE)  # where a meta file's message is looked for
# Up to this many meta files are listed into memory first (a few MiB at most): then a file with no state costs no
# system call, nor does a meta file whose message recovery met. Beyond it, each is looked up on disk.
META_NAMES_LIMIT = 20_000
SWEEP_CHUNK = 1_000  # meta files the orphan sweep looks at between two turns of the daemon's event loop
LOAD_CHUNK = 1_000  # deferred files a DeferredLoad looks at between two turns of the daemon's event loop
NAME_BATCH = 4_096  # names taken from a directory scan at once where a name alone says what to do
_ID_BYTES = 10  # a queue id (20 hex digits) packed
# A later sweep removes a temporary in meta/ only if it was last written this long before recovery began (file
# times come from a coarser clock): one written since may be a command's write in progress.
TEMPORARY_MARGIN_NS = 1_000_000_000


@dataclass
class Recovery:
    """What start-up found: messages ready now, deferred ones with their due time (both sorted by id
    and time, unless recover() handed them out as it went), and what else it did and saw."""

    ready: list[str] = field(default_factory=list)
    deferred: list[tuple[float, str]] = field(default_factory=list)
    completed_moves: int = 0
    orphans_removed: int = 0
    ready_count: int = 0
    deferred_count: int = 0
    failed: int = 0  # entries in failed/ afterwards
    strays: list[str] = field(default_factory=list)  # names in queue/ or deferred/ that are no queue id: left alone
    sweep: OrphanSweep | None = None  # recover(sweep=False): the orphan sweep, still to run
    deferred_load: DeferredLoad | None = None  # recover(lazy_deferred=True): due times still to read, if any


class OrphanSweep:
    """Removes meta files whose message is nowhere (and temporaries left in meta/), in steps.

    `unmet`: the ids with a meta file whose message recovery did not meet (they may be in new/), or None to
    look at every meta file. Each step handles up to `chunk` of them without giving way, so in the daemon,
    whose own moves run on the same event loop, a message cannot move between the look and the unlink."""

    def __init__(self, spool: Spool, unmet: set[str] | None, *, temporaries_before_ns: int | None = None) -> None:
        self.spool = spool
        self.unmet = unmet
        self.removed = 0
        # None: every temporary in meta/ goes; else only those last written before this time (recovery's start).
        self.temporaries_before_ns = temporaries_before_ns
        self._places = [str(spool.dir(location)) for location in _PLACES] + [str(spool.new)]

    def run(self) -> int:
        """The whole sweep at once; returns how many states it removed."""
        for _ in self.steps(chunk=0):
            pass
        return self.removed

    def steps(self, chunk: int = SWEEP_CHUNK) -> Iterator[None]:
        """Sweep, yielding after every `chunk` meta files (0: never)."""
        seen = 0
        if self.unmet is not None:
            unmet, self.unmet = self.unmet, None
            for queue_id in unmet:
                self._check(queue_id)
                seen += 1
                if seen == chunk:
                    seen = 0
                    yield
            return
        meta = str(self.spool.meta)
        for entry in scandir(self.spool.meta):
            name = entry.name
            if name.startswith(TMP_PREFIX):
                self._remove_temporary(entry)
            elif name.endswith(".json"):
                self._check(name.removesuffix(".json"), f"{meta}/{name}")
            seen += 1
            if seen == chunk:
                seen = 0
                yield

    def _check(self, queue_id: str, path: str | None = None) -> None:
        if is_entry_name(queue_id) and any(os.path.lexists(f"{place}/{queue_id}") for place in self._places):
            return
        with contextlib.suppress(OSError):
            os.unlink(path or f"{self.spool.meta}/{queue_id}.json")
            self.removed += 1

    def _remove_temporary(self, entry: os.DirEntry[str]) -> None:
        with contextlib.suppress(OSError):
            if self.temporaries_before_ns is None or \
                    entry.stat(follow_symlinks=False).st_mtime_ns < self.temporaries_before_ns:
                os.unlink(entry.path)


def recover(spool: Spool, now: float | None = None, *, ready: Ready | None = None,
            ready_batch: ReadyBatch | None = None, deferred: Deferred | None = None,
            progress: Callable[[int], None] | None = None, sweep: bool = True,
            lazy_deferred: bool = False) -> Recovery:
    """Finish moves a crash interrupted and list what is ready and what is deferred.

    With `ready` and `deferred`, each message is handed to them as it is found (the daemon feeds its
    scheduler so, holding no list of a large spool) and the lists stay empty; with `ready` and
    `ready_batch`, the messages in queue/ with no state go to `ready_batch` a batch at a time (when meta/
    is listed in memory: see META_NAMES_LIMIT). `progress` is called with
    the number of entries seen so far every PROGRESS_EVERY entries. With `sweep=False` the orphan sweep
    is left in `Recovery.sweep` for the caller to run (and `orphans_removed` stays 0). With
    `lazy_deferred=True` the messages in deferred/ with a state are only counted (in `deferred_count`):
    `Recovery.deferred_load` reads them later, or is None when there are none."""
    started_ns = time.time_ns()
    now = time.time() if now is None else now
    recovery = Recovery()
    collect = ready is None and deferred is None
    on_ready = recovery.ready.append if ready is None else ready
    on_deferred: Deferred = (lambda due, name: recovery.deferred.append((due, name))) if deferred is None \
        else deferred

    def found_ready(name: str) -> None:
        if is_queue_id(name):
            recovery.ready_count += 1
            on_ready(name)
        else:
            recovery.strays.append(name)

    def found_deferred(due: float, name: str) -> None:
        if is_queue_id(name):
            recovery.deferred_count += 1
            on_deferred(due, name)
        else:
            recovery.strays.append(name)

    def ready_one_by_one(names: list[str]) -> None:
        for name in names:
            on_ready(name)

    metas = _meta_names(spool)
    seen = 0
    for location in _SCAN_ORDER:
        if location is Location.QUEUE and metas is not None:
            batch = ready_batch if ready_batch is not None and ready is not None else ready_one_by_one
            seen = _scan_queue(spool, metas, now, recovery, batch, found_ready, found_deferred, progress, seen)
            continue
        if location is Location.DEFERRED and lazy_deferred:
            seen = _list_deferred(spool, metas, now, recovery, found_ready, found_deferred, progress, seen)
            continue
        for entry in scandir(spool.dir(location)):
            seen += 1
            if progress is not None and seen % PROGRESS_EVERY == 0:
                progress(seen)
            name = entry.name
            if name.startswith("."):
                _dot_entry(spool, name, entry.path)
                continue
            if metas is not None:
                if name not in metas:
                    _recover_stateless(location, name, now, recovery, found_ready, found_deferred)
                    continue
                metas.discard(name)
            if location is not Location.QUEUE:
                # settled_time(), written out: this runs once per deferred message before READY=1.
                try:
                    mtime_ns = entry.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    mtime_ns = 0
                if mtime_ns % 1_000_000 == SETTLED_NS:  # where its state says: nothing to read
                    if location is not Location.DEFERRED:
                        recovery.failed += 1
                    elif len(name) == QUEUE_ID_LENGTH and QUEUE_ID_DIGITS.issuperset(name):  # is_queue_id
                        recovery.deferred_count += 1
                        on_deferred((mtime_ns - SETTLED_NS) // 1_000_000 / 1000, name)
                    else:
                        recovery.strays.append(name)
                    continue
            _recover_one(spool, location, name, now, recovery, found_ready, found_deferred)
    stale_before = None if sweep else started_ns - TEMPORARY_MARGIN_NS
    recovery.sweep = OrphanSweep(spool, metas, temporaries_before_ns=stale_before)
    if sweep:
        recovery.orphans_removed = recovery.sweep.run()
        recovery.sweep = None
    if collect:
        recovery.ready.sort()
        recovery.deferred.sort()
    return recovery


class DeferredLoad:
    """The messages recovery listed in deferred/ but did not read (`recover(..., lazy_deferred=True)`): each
    file is looked at as recover() would have, a chunk at a time (see the module's notes).

    `count` ids, the smallest `oldest`. Each step hands every message of its chunk to exactly one of
    `deferred(due, id)` (it is in deferred/, due then) or `gone(id)` (it is not: moved since the listing by a
    command, or by the load finishing an interrupted move to new/ or failed/; or that move failed: counted in
    `error_count`, the file left where it is for the next start)."""

    def __init__(self, spool: Spool, ids: bytearray, oldest: str | None, now: float) -> None:
        self.spool = spool
        self._ids = ids
        self.count = len(ids) // _ID_BYTES
        self.oldest = oldest
        self.now = now
        self.loaded = 0  # handed to `deferred`
        self.gone = 0  # handed to `gone`
        self.completed_moves = 0
        self.failed = 0  # moved to failed/ (their state said so)
        self.errors: list[tuple[str, str]] = []  # (id, why) of the first few moves that failed
        self.error_count = 0

    def run(self, deferred: Deferred, gone: Gone) -> None:
        """The whole load at once."""
        for _ in self.steps(deferred, gone, chunk=0):
            pass

    def steps(self, deferred: Deferred, gone: Gone, chunk: int | None = None) -> Iterator[None]:
        """Load, yielding after every `chunk` messages (None: LOAD_CHUNK; 0: never). Runs once: the ids are
        dropped as it starts."""
        chunk = LOAD_CHUNK if chunk is None else chunk
        ids, self._ids = self._ids, bytearray()
        spool, now = self.spool, self.now
        tally = Recovery()
        met = False

        def found_deferred(due: float, name: str) -> None:
            nonlocal met
            met = True
            deferred(due, name)

        def found_ready(name: str) -> None:
            """Never called: only a "queued" state sends a message out of deferred/, and to new/."""

        try:
            directory = os.open(spool.dir(Location.DEFERRED), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            directory = None  # deferred/ is gone: so is every message listed in it
        stat = os.stat
        seen = 0
        try:
            while ids:  # from the end, giving the memory back as the scheduler's heap grows
                if seen == chunk:
                    seen = 0
                    yield
                seen += 1
                name = ids[-_ID_BYTES:].hex().upper()
                del ids[-_ID_BYTES:]
                try:
                    if directory is None:
                        raise FileNotFoundError
                    mtime_ns = stat(name, dir_fd=directory, follow_symlinks=False).st_mtime_ns
                except FileNotFoundError:
                    self.gone += 1
                    gone(name)
                    continue
                except OSError:
                    mtime_ns = 0
                if mtime_ns % 1_000_000 == SETTLED_NS:  # settled_time(), written out
                    self.loaded += 1
                    deferred((mtime_ns - SETTLED_NS) // 1_000_000 / 1000, name)
                    continue
                met = False
                try:
                    _recover_one(spool, Location.DEFERRED, name, now, tally, found_ready, found_deferred)
                except OSError as exc:  # a move that failed: left where it is, for the next start
                    self.error_count += 1
                    if len(self.errors) < 10:
                        self.errors.append((name, str(exc)))
                self.completed_moves, self.failed = tally.completed_moves, tally.failed
                if met:
                    self.loaded += 1
                else:
                    self.gone += 1
                    gone(name)
        finally:
            if directory is not None:
                os.close(directory)


def _name_batches(path: Path) -> Iterator[list[str]]:
    """A directory's names, NAME_BATCH at a time (all of a large directory at once would be the peak of memory)."""
    try:
        entries = os.scandir(path)
    except FileNotFoundError:
        return
    with entries:
        while batch := [entry.name for entry in itertools.islice(entries, NAME_BATCH)]:
            yield batch


def _all_queue_ids(names: list[str]) -> bool:
    """Whether every name is a queue id (is_queue_id), in a few calls for the whole list."""
    return set(map(len, names)) <= {QUEUE_ID_LENGTH} and QUEUE_ID_DIGITS.issuperset("".join(names))


def _progressed(progress: Callable[[int], None] | None, seen: int, more: int) -> int:
    """`seen` + `more`, calling `progress` at every multiple of PROGRESS_EVERY passed."""
    if progress is not None:
        for passed in range((seen // PROGRESS_EVERY + 1) * PROGRESS_EVERY, seen + more + 1, PROGRESS_EVERY):
            progress(passed)
    return seen + more


def _scan_queue(spool: Spool, metas: set[str], now: float, recovery: Recovery, ready_batch: ReadyBatch,
                found_ready: Ready, found_deferred: Deferred, progress: Callable[[int], None] | None,
                seen: int) -> int:
    """queue/ when meta/ is listed in memory: a claimed message with no state (before its first attempt, most of a
    backlog) is known by its name alone and handed out in a batch; every other entry as recover()'s loop does.
    Returns the entries seen so far."""
    directory = spool.dir(Location.QUEUE)
    for names in _name_batches(directory):
        seen = _progressed(progress, seen, len(names))
        if _all_queue_ids(names) and metas.isdisjoint(names):
            ready = names
        else:
            ready = [name for name in names  # is_queue_id, written out
                     if name not in metas and len(name) == QUEUE_ID_LENGTH and QUEUE_ID_DIGITS.issuperset(name)]
        if ready:
            recovery.ready_count += len(ready)
            ready_batch(ready)
        if len(ready) == len(names):
            continue
        handed = set(ready)
        for name in names:
            if name in handed:
                continue
            if name.startswith("."):
                _dot_entry(spool, name, f"{directory}/{name}")
            elif name in metas:
                metas.discard(name)
                _recover_one(spool, Location.QUEUE, name, now, recovery, found_ready, found_deferred)
            else:  # no queue id: a stray
                _recover_stateless(Location.QUEUE, name, now, recovery, found_ready, found_deferred)
    return seen


def _list_deferred(spool: Spool, metas: set[str] | None, now: float, recovery: Recovery, found_ready: Ready,
                   found_deferred: Deferred, progress: Callable[[int], None] | None, seen: int) -> int:
    """deferred/ for a lazy recovery: the ids with a state (or all, when meta/ is not listed in memory) go into
    `recovery.deferred_load` unread, packed; every other entry is recovered as recover()'s loop does. Returns the
    entries seen so far."""
    ids = bytearray()
    oldest: str | None = None
    directory = spool.dir(Location.DEFERRED)
    for names in _name_batches(directory):
        seen = _progressed(progress, seen, len(names))
        if metas is None:
            listed = names if _all_queue_ids(names) else \
                [name for name in names if len(name) == QUEUE_ID_LENGTH and QUEUE_ID_DIGITS.issuperset(name)]
        else:
            listed = [name for name in names
                      if name in metas and len(name) == QUEUE_ID_LENGTH and QUEUE_ID_DIGITS.issuperset(name)]
            metas.difference_update(listed)
        if listed:
            ids += bytes.fromhex("".join(listed))
            first = min(listed)  # fixed-length upper-case hex: names compare as their numbers
            if oldest is None or first < oldest:
                oldest = first
        if len(listed) == len(names):
            continue
        handed = set(listed)
        for name in names:
            if name in handed:
                continue
            path = f"{directory}/{name}"
            if name.startswith("."):
                _dot_entry(spool, name, path)
                continue
            if metas is not None:
                if name not in metas:
                    _recover_stateless(Location.DEFERRED, name, now, recovery, found_ready, found_deferred)
                    continue
                metas.discard(name)
            # No queue id: as recover()'s loop, a stray when settled, else its interrupted move finished.
            try:
                settled = os.lstat(path).st_mtime_ns % 1_000_000 == SETTLED_NS
            except OSError:
                settled = False
            if settled:
                recovery.strays.append(name)
            else:
                _recover_one(spool, Location.DEFERRED, name, now, recovery, found_ready, found_deferred)
    if ids:
        load = DeferredLoad(spool, ids, oldest, now)
        recovery.deferred_count += load.count
        recovery.deferred_load = load
    return seen


def _dot_entry(spool: Spool, name: str, path: str) -> None:
    """A dot name in queue/, deferred/ or failed/: a temporary is removed, a delivered message's file reaped."""
    if name.startswith(TMP_PREFIX):
        with contextlib.suppress(OSError):
            os.unlink(path)
    elif name.startswith(SENT_PREFIX):  # delivered; a kill came before the reaper unlinked it
        spool.reaper.remove(path)


def _meta_names(spool: Spool) -> set[str] | None:
    """The ids meta/ holds a state for, removing temporaries; None when there are more than META_NAMES_LIMIT."""
    names: set[str] = set()
    for entry in scandir(spool.meta):
        name = entry.name
        if name.startswith(TMP_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        elif name.endswith(".json"):
            names.add(name.removesuffix(".json"))
            if len(names) > META_NAMES_LIMIT:
                return None
    return names


def _recover_stateless(location: Location, name: str, now: float, recovery: Recovery, found_ready: Ready,
                       found_deferred: Deferred) -> None:
    """A message with no state is where it is: ready in queue/, due now in deferred/."""
    if location is Location.QUEUE:
        found_ready(name)
    elif location is Location.DEFERRED:
        found_deferred(now, name)
    else:
        recovery.failed += 1


def _recover_one(spool: Spool, location: Location, name: str, now: float, recovery: Recovery,
                 found_ready: Ready, found_deferred: Deferred) -> None:
    """Read one message's state and finish the move it names, if one was interrupted."""
    state = spool.load_state(name)
    wanted = LOCATION_OF[state.state] if state else location
    if state is not None and state.state is State.QUEUED and location is not Location.QUEUE:
        # An interrupted `requeue`: it was on its way back to new/.
        with contextlib.suppress(FileExistsError):  # new/<id> taken: leave it be
            if spool.move(spool.dir(location) / name, spool.new / name):
                recovery.completed_moves += 1
                return
        recovery.failed += location is Location.FAILED
        return
    where = location
    if wanted is not location and not os.path.lexists(spool.dir(wanted) / name):
        spool.move(spool.dir(location) / name, spool.dir(wanted) / name)
        recovery.completed_moves += 1
        where = wanted
    if where is Location.QUEUE:
        found_ready(name)
    elif where is Location.DEFERRED:
        due = state.next_attempt_at if state and state.next_attempt_at is not None else now
        found_deferred(due, name)
        if state is not None and state.state is State.DEFERRED:
            spool.settled(name, where, due)  # the next start reads no state for it
    else:
        recovery.failed += 1
        if state is not None and state.state is State.FAILED:
            spool.settled(name, where, now)
