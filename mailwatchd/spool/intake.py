"""Intake: notice new files in new/ at once (inotify), claim them into queue/, and hand
them to the scheduler. A periodic rescan is the safety net (inotify overflow, files that
arrived while the daemon was down); it also clears abandoned tmp/ files.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes

import inotify_simple
from inotify_simple import INotify, flags

from mailwatchd.errors import SpoolFull
from mailwatchd.service.counters import Counters, FailedMail, HotLogger
from mailwatchd.service.diskspace import SpoolSpace, is_full_error
from mailwatchd.service.live import Live
from mailwatchd.service.logs import get_logger
from mailwatchd.service.scheduler import Scheduler, WorkItem
from mailwatchd.spool.store import Location, Pending, Refused, Spool
from mailwatchd.transports.outcome import Cause

log = get_logger()
hot_log = HotLogger()  # for the line logged per claimed message
# IN_MOVED_TO: a Maildir writer's rename(2) from tmp/; IN_CREATE: a writer's link(2) from
# tmp/ (taken once tmp/ lets go of it). Creating a file directly in new/ breaks the Maildir
# protocol: it may be taken before it is complete.
WATCH_MASK = flags.MOVED_TO | flags.CREATE
PENDING_RETRY_S = 0.02
# inotify_simple finds libc with ctypes.util.find_library("c"), which runs `ldconfig -p` (a process, ~10 ms,
# at every start); the process's own symbols (dlopen(NULL)) already include glibc's inotify calls.
if getattr(inotify_simple, "_libc", None) is None:
    inotify_simple._libc = ctypes.CDLL(None, use_errno=True)
PENDING_TRIES = 250  # then the periodic rescan takes over
CLAIM_BATCH = 256  # drops claimed between two turns of the event loop while a backlog in new/ is taken


class Intake:
    """Claims drops from new/ into the scheduler.

    Names starting with a dot are left alone (the Maildir convention for files being written).
    While the spool is full (`space.degraded`) nothing is claimed: drops wait in new/ until the
    daemon rescans when room returns.
    """

    def __init__(self, *, spool: Spool, scheduler: Scheduler, counters: Counters, live: Live,
                 stop: asyncio.Event, space: SpoolSpace | None = None) -> None:
        self.spool = spool
        self.scheduler = scheduler
        self.counters = counters
        self.live = live
        self.stop_requested = stop
        self.space = space
        self._inotify: INotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rescan_task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._inotify = INotify()
        self._inotify.add_watch(str(self.spool.new), WATCH_MASK)
        loop.add_reader(self._inotify.fileno(), self._on_events)
        # The first scan runs after the watch is set, so nothing falls between the two; in batches, so a large
        # new/ neither stalls the event loop nor is held in memory as a list.
        self._rescan_task = asyncio.create_task(self._rescan_forever(), name="rescan")

    def stop(self) -> None:
        if self._inotify is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
        if self._rescan_task is not None:
            self._rescan_task.cancel()

    def _on_events(self) -> None:
        if self._inotify is None:
            return
        overflow = False
        for event in self._inotify.read(timeout=0):
            if event.mask & flags.Q_OVERFLOW:
                overflow = True
            elif event.name and not event.name.startswith("."):
                self.claim(event.name)
        if overflow:
            log.warning("inotify_overflow", action="rescanning new/")
            self.rescan()

    async def _rescan_forever(self) -> None:
        await self.claim_waiting()
        while True:
            await asyncio.sleep(self.live.settings.rescan_interval)
            await self.claim_waiting()
            removed = self.spool.clean_tmp()
            if removed:
                log.info("tmp_cleaned", removed=removed)

    @property
    def paused(self) -> bool:
        return self.space is not None and self.space.degraded is not None

    def rescan(self) -> int:
        """Claim everything waiting in new/; returns how many were claimed."""
        if self.paused:
            return 0
        return sum(1 for name in self.spool.drops() if self.claim(name))

    async def claim_waiting(self) -> int:
        """Claim everything waiting in new/ as one directory scan lists it, CLAIM_BATCH per turn of the event
        loop; returns how many were claimed."""
        claimed = 0
        for seen, name in enumerate(self.spool.waiting(), 1):
            if self.paused or self.stop_requested.is_set():
                break
            claimed += self.claim(name)
            if seen % CLAIM_BATCH == 0:
                await asyncio.sleep(0)
        return claimed

    def claim(self, name: str, tries: int = 0) -> bool:
        if self.stop_requested.is_set() or self.paused:
            return False
        try:
            claimed = self.spool.claim(name)
        except (SpoolFull, OSError) as exc:
            if self.space is not None and is_full_error(exc):
                self.space.saw_full(exc)  # degraded now: the drop waits in new/
                return False
            log.error("claim_failed", source=name, detail=str(exc))
            return False
        if claimed is None:
            return False
        if isinstance(claimed, Pending):
            if tries < PENDING_TRIES and self._loop is not None:
                self._loop.call_later(PENDING_RETRY_S, self.claim, name, tries + 1)
            return False
        if isinstance(claimed, Refused):
            log.warning("message_failed", queue_id=claimed.queue_id, source=name, reason=claimed.reason)
            self.counters.failed(FailedMail(claimed.queue_id, claimed.reason, Cause.MALFORMED.value))
            return False
        # A drop whose name was not kept got a new id: no state is filed under it (a requeued message keeps its id).
        fresh_id = claimed.queue_id != claimed.source
        self.scheduler.add_ready(WorkItem(claimed.queue_id, Location.QUEUE, stateless=fresh_id))
        hot_log.get().info("message_queued", queue_id=claimed.queue_id, source=claimed.source, size=claimed.size)
        self.counters.queued()
        return True
