"""Messages the SMTP listener's process is still making durable, handed to a worker early (cut-through).

The listener's process says `storing` once a message's bytes are in queue/'s temporary file and
before its fsyncs; the daemon lists the id at once. A worker whose relay connection is open reads the
temporary file and relays the whole message while the fsyncs run, so the relay may have it a moment
before it is durable here. The client's 250 still waits for the store alone, and the spool changes
only once the listener says how the store ended: `queued` (durable in queue/: the relay's outcome is
recorded as for any message) or `dropped` (the store failed: there is no message to record).

A relay that took a message whose store then failed, or that the listener's process took with it when
it ended, has a message whose client was told to try again or got no reply: that client may send it
twice (the duplicate of RFC 1047, at-least-once). It takes a failed write after the bytes were in
the file (an fsync's I/O error) or a crash within a store's few milliseconds, and after either this
daemon relays no message early for PAUSE_S: each message then waits for its store, as every message
does on any but the first endpoint's open session.

Every `storing` is settled once: by `queued`, by `dropped`, or by the listener's exit (not stored:
recovery removes the temporary file at the next start). A worker that waited longer than it may
gives up on it; the `queued` that comes later lists the message afresh, and where the relay already
took it (`relayed`) the worker records that delivery instead of sending the message again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mailwatchd.service.logs import get_logger
from mailwatchd.transports.outcome import DeliveryResult, Outcome

log = get_logger()

PAUSE_S = 600.0  # no early relaying for this long after a store that did not end durable


class PendingStore:
    """One message being stored by the listener's process: settled once, stored or not."""

    __slots__ = ("queue_id", "given_up", "_outcome", "_stores")

    def __init__(self, queue_id: str, stores: PendingStores) -> None:
        self.queue_id = queue_id
        self.given_up = False  # a worker stopped waiting: the daemon lists the message itself once stored
        self._outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._stores = stores

    @property
    def settled(self) -> bool:
        return self._outcome.done()

    def settle(self, stored: bool) -> None:
        if not self._outcome.done():
            self._outcome.set_result(stored)

    async def stored(self, within: float) -> bool:
        """True once the message is durable in queue/. False when it was not stored, or was not settled within
        `within` seconds (then given up: the message is no longer the waiting worker's to handle)."""
        if self.given_up:
            return False
        if not self._outcome.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._outcome), max(within, 0.0))
            except TimeoutError:
                self.given_up = True
                self._stores.pause("a store took longer than a command may")
                return False
        return self._outcome.result()


class PendingStores:
    """The daemon's stores in progress in the listener's process, by queue id; and whether a worker may relay
    one before it is durable (not within PAUSE_S of a store that did not end durable)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_id: dict[str, PendingStore] = {}
        self._relayed: dict[str, DeliveryResult] = {}  # given up after the relay took it: the delivery to record
        self._clock = clock
        self._paused_until = float("-inf")

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def relay_early(self) -> bool:
        return self._clock() >= self._paused_until

    def pause(self, reason: str) -> None:
        """No early relaying for PAUSE_S: the listener's stores are failing or slow."""
        if self.relay_early:
            log.warning("cut_through_paused", reason=reason, seconds=PAUSE_S)
        self._paused_until = self._clock() + PAUSE_S

    def begin(self, queue_id: str) -> PendingStore:
        pending = self._by_id[queue_id] = PendingStore(queue_id, self)
        return pending

    def get(self, queue_id: str) -> PendingStore | None:
        return self._by_id.get(queue_id)

    def settle(self, queue_id: str, stored: bool) -> bool:
        """Settle a store in progress; True when a worker has or will take the message through it, False
        when the caller must list a stored message itself (no `storing` came for it, or its worker gave up)."""
        pending = self._by_id.pop(queue_id, None)
        if not stored:
            relayed = self._relayed.pop(queue_id, None)
            if relayed is not None:
                _relayed_unstored(queue_id, relayed)
            if pending is not None:
                self.pause("a message's store failed after its bytes were written")
        if pending is None:
            return False
        pending.settle(stored)
        return not pending.given_up

    def unstored(self, pending: PendingStore, result: DeliveryResult) -> None:
        """A worker relayed `pending` and its store did not end durable, or not while the worker waited."""
        if result.outcome is not Outcome.DELIVERED:
            return  # the relay kept nothing: the client, or the listing once stored, tries again
        if pending.given_up:  # recorded as delivered once stored and listed again (take_relayed)
            self._relayed[pending.queue_id] = result
        else:
            _relayed_unstored(pending.queue_id, result)

    def take_relayed(self, queue_id: str) -> DeliveryResult | None:
        return self._relayed.pop(queue_id, None)

    def drop_all(self) -> None:
        """The listener's process ended: nothing it was still storing is stored."""
        if self._by_id:
            self.pause("the listener's process ended during a store")
        for queue_id in list(self._by_id):
            self.settle(queue_id, False)


def _relayed_unstored(queue_id: str, result: DeliveryResult) -> None:
    log.warning("message_relayed_unstored", queue_id=queue_id, relay=result.relay,
                detail="the relay took this message, but its store failed: the client was told to try again "
                       "(or got no reply) and may send it twice")
