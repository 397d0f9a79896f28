"""Messages the SMTP listener's process is still making durable, handed to a worker early (cut-through).

The listener's process says `storing` once a message's bytes are in queue/'s temporary file and
before its fsyncs; the daemon lists the id at once. A worker may then read the temporary file and
send the relay all of the transaction but the end of DATA while the fsyncs run. The final "."
goes only once the listener says the message is durable in queue/ (`queued`); when the store
failed instead (`dropped`), the worker drops the relay connection, and the relay discards what it
got (RFC 5321 §4.1.1.4: no end of data, no message). The spool itself changes only after
`queued`, as for any other message.

Every `storing` is settled once: by `queued`, by `dropped`, or by the listener's exit (not stored:
recovery removes the temporary file at the next start). A worker that waited longer than it may
gives up on it; the `queued` that comes later lists the message afresh.
"""

from __future__ import annotations

import asyncio


class PendingStore:
    """One message being stored by the listener's process: settled once, stored or not."""

    __slots__ = ("queue_id", "given_up", "_outcome")

    def __init__(self, queue_id: str) -> None:
        self.queue_id = queue_id
        self.given_up = False  # a worker stopped waiting: the daemon lists the message itself once stored
        self._outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

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
                return False
        return self._outcome.result()


class PendingStores:
    """The daemon's stores in progress in the listener's process, by queue id."""

    def __init__(self) -> None:
        self._by_id: dict[str, PendingStore] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def begin(self, queue_id: str) -> PendingStore:
        pending = self._by_id[queue_id] = PendingStore(queue_id)
        return pending

    def get(self, queue_id: str) -> PendingStore | None:
        return self._by_id.get(queue_id)

    def settle(self, queue_id: str, stored: bool) -> bool:
        """Settle a store in progress; True when a worker has or will take the message through it, False
        when the caller must list a stored message itself (no `storing` came for it, or its worker gave up)."""
        pending = self._by_id.pop(queue_id, None)
        if pending is None:
            return False
        pending.settle(stored)
        return not pending.given_up

    def drop_all(self) -> None:
        """The listener's process ended: nothing it was still storing is stored."""
        for pending in self._by_id.values():
            pending.settle(False)
        self._by_id.clear()
