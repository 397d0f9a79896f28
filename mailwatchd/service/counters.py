"""What the daemon has done, counted in one place: totals since start, the current drain pass,
and the attempts in flight. Intake and the workers report here; health and the status file read.

A drain pass starts when work arrives on an idle daemon and ends when nothing is ready or in
flight any more; each end is one `drain_started` / `drain_finished` log line (nullmailer's
"starting delivery" / "delivery complete").
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from structlog.typing import FilteringBoundLogger

from mailwatchd.service.logs import get_logger

log = get_logger()


class HotLogger:
    """The process's logger for lines logged per message: bound once per logging configuration.

    The module-level logger (get_logger) assembles a new bound logger at every call, about 7 µs; this
    one is assembled again only when structlog is configured anew (its processors list, wrapper class,
    logger factory or context class changed: capture_logs changes the list's contents, which the
    bound logger sees)."""

    def __init__(self) -> None:
        self._config: dict[str, Any] = {}
        self._logger: FilteringBoundLogger | None = None

    def get(self) -> FilteringBoundLogger:
        config = structlog.get_config()
        then = self._config
        logger = self._logger
        if (logger is None or config["processors"] is not then["processors"]
                or config["wrapper_class"] is not then["wrapper_class"]
                or config["logger_factory"] is not then["logger_factory"]
                or config["context_class"] is not then["context_class"]):
            logger = self._logger = get_logger().bind()
            self._config = config
        return logger


@dataclass(frozen=True)
class FailedMail:
    """A message (or a split-off part, or a refused drop) that went to failed/."""

    queue_id: str
    reason: str
    cause: str = "unknown"
    relay: str | None = None
    sender: str | None = None  # None: the message could not be read or parsed
    recipients: tuple[str, ...] = ()
    is_notice: bool = False  # mailwatchd's own failure notice: never the subject of another


class Observer(Protocol):
    """Told of every settled attempt (metrics, failure notices)."""

    def on_delivered(self, relay: str, latency_s: float) -> None: ...

    def on_failed(self, failed: FailedMail) -> None: ...


@dataclass
class Tally:
    delivered: int = 0
    deferred: int = 0
    failed: int = 0


@dataclass
class Counters:
    """Totals, the current pass and work in flight. `backlog()` gives (ready, deferred) for the pass lines."""

    backlog: Callable[[], tuple[int, int]]
    totals: Tally = field(default_factory=Tally)
    failed_in_store: int = 0  # messages in failed/, including those found there at start
    last_delivery: float | None = None  # epoch seconds
    in_flight: int = 0
    # (relay, outcome, cause) -> messages settled so; relay "outbox" for the local outbox, "-" when none was reached
    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    observers: list[Observer] = field(default_factory=list)
    _pass: Tally | None = None
    _pass_started: float = 0.0

    def queued(self) -> None:
        """A message became ready: a pass starts if none is running."""
        if self._pass is None:
            self._pass = Tally()
            self._pass_started = time.monotonic()
            ready, deferred = self.backlog()
            log.info("drain_started", ready=ready, deferred=deferred)

    def attempt_started(self) -> None:
        self.in_flight += 1
        self.queued()

    def attempt_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight or self._pass is None:
            return
        ready, deferred = self.backlog()
        if ready == 0:
            done, self._pass = self._pass, None
            log.info("drain_finished", duration_s=round(time.monotonic() - self._pass_started, 3),
                     delivered=done.delivered, deferred=done.deferred, failed=done.failed, waiting=deferred)

    def delivered(self, relay: str | None, latency_s: float) -> None:
        """Delivered `latency_s` after it was received."""
        self.last_delivery = time.time()
        relay = relay or "-"
        self.outcomes[(relay, "delivered", "ok")] += 1
        self.totals.delivered += 1  # _count("delivered"), written out: once per message
        if self._pass is not None:
            self._pass.delivered += 1
        for observer in self.observers:
            observer.on_delivered(relay, latency_s)

    def deferred(self, relay: str | None, cause: str) -> None:
        self.outcomes[(relay or "-", "temporary", cause)] += 1
        self._count("deferred")

    def failed(self, failed: FailedMail) -> None:
        """A message (or a split-off part, or a refused drop) went to failed/."""
        self.failed_in_store += 1
        self.outcomes[(failed.relay or "-", "permanent", failed.cause)] += 1
        self._count("failed")
        for observer in self.observers:
            observer.on_failed(failed)

    def _count(self, what: str) -> None:
        for tally in (self.totals, self._pass):
            if tally is not None:
                setattr(tally, what, getattr(tally, what) + 1)
