"""The embedded delivery when no relay is configured: each message lands in a local Maildir."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from pathlib import Path

from mailwatchd.errors import SpoolFull
from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.settings.config import Settings
from mailwatchd.spool.durable import install_durably
from mailwatchd.transports.outcome import Cause, DeliveryResult, Outcome, Phase, classify_exception

RELAY_NAME = "outbox"
_counter = itertools.count()


def _unique_name() -> str:
    # Maildir naming (cr.yp.to/proto/maildir.html): time, a per-delivery unique part, host;
    # "/" and ":" are not allowed in the host part.
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
    now = time.time_ns()
    return f"{now // 10**9}.M{now // 1000 % 10**6}P{os.getpid()}Q{next(_counter)}.{host}"


def envelope_header(message: OutgoingMessage) -> bytes:
    """`Return-Path:` and `X-Original-To:` lines, in the message's own line-ending style."""
    first = message.data.find(b"\n")
    newline = b"\r\n" if first > 0 and message.data[first - 1 : first] == b"\r" else b"\n"
    return (b"Return-Path: <" + message.sender.encode() + b">" + newline
            + b"X-Original-To: " + ", ".join(message.recipients).encode() + newline)


class OutboxSession:
    """Writes messages into the Maildir `settings.outbox`; same interface as SmtpSession."""

    def __init__(self, settings: Settings) -> None:
        self._root = Path(settings.outbox)
        self._endpoint = str(self._root)
        self._last_used = time.monotonic()
        self._dirs_made = False
        self._bound = settings.transaction_timeout

    @property
    def connected(self) -> bool:
        """Always False: there is no connection to keep or close."""
        return False

    @property
    def idle_for(self) -> float:
        """Seconds since the last delivery (monotonic)."""
        return time.monotonic() - self._last_used

    def bound(self, message: OutgoingMessage) -> float:
        """A local write gets the same deadline as a relay transaction; past it the disk is stuck."""
        return self._bound

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult:
        """Store the message durably in new/; an OSError or a full disk becomes a TEMPORARY local_error."""
        try:
            name = await asyncio.to_thread(self._store, message)
        except (OSError, SpoolFull) as exc:
            self._dirs_made = False  # someone may have removed the Maildir: make it again next time
            verdict = classify_exception(Phase.LOCAL, exc)
            problem = exc.strerror if isinstance(exc, OSError) else None
            detail = f"cannot write to the outbox {self._root}: {problem or exc}"
            return DeliveryResult(verdict.outcome, verdict.cause, Phase.LOCAL, None, " ".join(detail.split()),
                                  RELAY_NAME, self._endpoint)
        finally:
            self._last_used = time.monotonic()
        return DeliveryResult(Outcome.DELIVERED, Cause.OK, Phase.LOCAL, None, f"stored as new/{name}",
                              RELAY_NAME, self._endpoint)

    async def close(self) -> None:
        """Nothing to release."""

    def _store(self, message: OutgoingMessage) -> str:
        if not self._dirs_made:
            for sub in ("tmp", "new", "cur"):
                (self._root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            self._dirs_made = True
        name = _unique_name()
        # Invariant: a file in new/ is always complete and on disk (write, fsync, rename, fsync dir).
        install_durably(self._root / "tmp" / name, self._root / "new" / name, envelope_header(message) + message.data)
        return name
