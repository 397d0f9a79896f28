"""The listener process's messages into the scheduler, each listed as soon as its bytes are written
(spool/pending.py): a worker may relay it while the listener's fsyncs run."""

from __future__ import annotations

from mailwatchd.service.counters import Counters
from mailwatchd.service.logs import get_logger
from mailwatchd.service.scheduler import Scheduler, WorkItem
from mailwatchd.spool.pending import PendingStores
from mailwatchd.spool.store import Location

log = get_logger()


class ListenerHandoff:
    """submission.process.Stores for the daemon: its calls come on the event loop, in the child's order."""

    def __init__(self, scheduler: Scheduler, pending: PendingStores, counters: Counters) -> None:
        self.scheduler = scheduler
        self.pending = pending
        self.counters = counters

    def storing(self, queue_id: str, size: int) -> None:
        self.scheduler.add_ready(WorkItem(queue_id, Location.QUEUE, stateless=True))  # a new id: no state
        self.pending.begin(queue_id)  # after add_ready, which refuses what is not a queue id

    def queued(self, queue_id: str, size: int) -> None:
        if not self.pending.settle(queue_id, True):  # no worker has it through its pending store
            self.scheduler.add_ready(WorkItem(queue_id, Location.QUEUE, stateless=True))
        log.info("message_queued", queue_id=queue_id, source="smtp", size=size)
        self.counters.queued()

    def dropped(self, queue_id: str) -> None:
        self.pending.settle(queue_id, False)
