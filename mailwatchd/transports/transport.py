"""What a worker needs of a transport: the SMTP session or the local outbox."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

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


@runtime_checkable
class RelaySession(Session, Protocol):
    """A session to one relay endpoint whose connection can be opened before a message is handed
    to it, so that a worker can race the openings of several endpoints (hedged failover)."""

    @property
    def connected(self) -> bool:
        """True while a connection is open (as far as this side knows)."""
        ...

    @property
    def greeted(self) -> bool:
        """True once the server of the connection being opened (or open) sent its greeting."""
        ...

    async def open(self) -> DeliveryResult | None:
        """Open the connection unless one is open: None when it is ready for MAIL FROM, else the
        failure (a relay fault: it happened before MAIL FROM). Never raises but CancelledError."""
        ...
