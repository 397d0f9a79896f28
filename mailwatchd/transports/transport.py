"""What a worker needs of a transport: the SMTP session or the local outbox."""

from __future__ import annotations

from typing import Protocol

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.transports.outcome import DeliveryResult


class Session(Protocol):
    """One transport session, reused for consecutive messages."""

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult:
        """Attempt one message; every failure is a DeliveryResult, never an exception."""
        ...

    async def close(self) -> None: ...

    def bound(self, message: OutgoingMessage) -> float:
        """The longest `deliver(message)` can take, in seconds (the watchdog's limit)."""
        ...

    @property
    def idle_for(self) -> float: ...
