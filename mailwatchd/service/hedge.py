"""Hedged failover: a worker opens the sessions of consecutive relay endpoints as RFC 8305 opens
the addresses of one host, so a black-holed endpoint costs a fraction of a second, not a
connect timeout.

A message goes to the first endpoint, in failover order, whose session becomes usable. The
next endpoint's opening starts HEDGE_DELAY_S after the previous one's while that one has not
had its greeting yet, or at once when it failed; an opening that has been greeted is waited
for (its remaining steps run under their own deadlines). Only openings are raced: a message is
handed to one session at a time, so hedging never sends it twice.

Openings belong to the worker and outlive the message they were started for: a loser that
comes up keeps its connection for later messages, and each opening's failure is reported to
the router exactly once, by the opening itself, whoever waits for it. An opening found still
connecting after the delay is reported as slow, so the router lists that endpoint after the
others until the connect ends (then its outcome opens the breaker, or the endpoint is used).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mailwatchd.relays.routing import Router
from mailwatchd.service.logs import get_logger
from mailwatchd.settings.relays import Endpoint, RelayConfig
from mailwatchd.transports.outcome import DeliveryResult
from mailwatchd.transports.transport import RelaySession

log = get_logger()
# RFC 8305 §5's recommended "Connection Attempt Delay", as smtpclient staggers one host's
# addresses: a healthy relay greets within a round trip or two, well inside it.
HEDGE_DELAY_S = 0.25

Candidate = tuple[RelayConfig, Endpoint]


@dataclass(eq=False)
class Opening:
    """A session of one endpoint, open or being opened (then `task` runs `session.open()`)."""

    relay: RelayConfig
    endpoint: Endpoint
    session: RelaySession
    router: Router  # the router current when the opening started: its outcome goes there
    task: asyncio.Task[DeliveryResult | None] | None  # None: the session was open already
    started: float  # monotonic
    slow: bool = False  # reported to the router as still connecting past the hedge delay

    @property
    def done(self) -> bool:
        return self.task is None or self.task.done()

    @property
    def failure(self) -> DeliveryResult | None:
        """Once done: None when the session is ready for MAIL FROM, else why it could not be opened."""
        return None if self.task is None else self.task.result()


def start_opening(relay: RelayConfig, endpoint: Endpoint, session: RelaySession, router: Router,
                  ended: Callable[[Opening], None]) -> Opening:
    """Open `session` in a task of its own (or take it as it is when open); `ended` is called when
    the task is over, after a failure was reported to `router`."""
    if session.connected:
        return Opening(relay, endpoint, session, router, None, time.monotonic())
    task = asyncio.create_task(session.open(), name=f"open {relay.name} {endpoint}")
    opening = Opening(relay, endpoint, session, router, task, time.monotonic())
    task.add_done_callback(lambda _: _opening_ended(opening, ended))
    return opening


def _opening_ended(opening: Opening, ended: Callable[[Opening], None]) -> None:
    task = opening.task
    assert task is not None
    if opening.slow:
        opening.router.connect_ended(opening.relay, opening.endpoint)
    try:
        if not task.cancelled():
            error = task.exception()
            if error is not None:  # open() promises never to raise: a bug, but not a stuck worker
                log.error("session_open_crashed", relay=opening.relay.name, endpoint=str(opening.endpoint),
                          exc_info=error)
            elif (failure := task.result()) is not None:
                opening.router.report(opening.relay, opening.endpoint, failure)
    finally:
        ended(opening)


class Race:
    """One message's way through the candidates: their sessions' openings, hedged."""

    def __init__(self, candidates: list[Candidate], opening: Callable[[RelayConfig, Endpoint], Opening],
                 delay: float = HEDGE_DELAY_S) -> None:
        self._waiting = deque(candidates)
        self._opening = opening  # the worker's opening of a candidate: under way, open, or a new one
        self._delay = delay
        self._racing: list[Opening] = []  # started, not yet handed out; in failover order

    def upcoming(self) -> Candidate | None:
        """The candidate the race goes on with after a failure: the first racing or not yet started."""
        if self._racing:
            return self._racing[0].relay, self._racing[0].endpoint
        return self._waiting[0] if self._waiting else None

    async def next(self) -> Opening | None:
        """The next opening that is done (usable, or failed: see `Opening.failure`), the first in
        failover order among those done; None when every candidate was handed out."""
        racing = self._racing
        while True:
            if not racing:
                if not self._waiting:
                    return None
                self._start()
            for opening in racing:
                if opening.done:
                    racing.remove(opening)
                    return opening
            hedge_at = self._hedge_at()
            wait = None if hedge_at is None else hedge_at - time.monotonic()
            if wait is not None and wait <= 0:
                self._hedge()
                continue
            await asyncio.wait([opening.task for opening in racing if opening.task is not None], timeout=wait,
                               return_when=asyncio.FIRST_COMPLETED)

    def _start(self) -> None:
        self._racing.append(self._opening(*self._waiting.popleft()))

    def _hedge_at(self) -> float | None:
        """When to start the next candidate: once every opening racing went the delay without a greeting."""
        if not self._waiting or any(opening.session.greeted for opening in self._racing):
            return None
        return max(opening.started for opening in self._racing) + self._delay

    def _hedge(self) -> None:
        next_relay, next_endpoint = self._waiting[0]
        for opening in self._racing:
            if not opening.slow:
                opening.slow = True
                opening.router.connect_slow(opening.relay, opening.endpoint)
                log.info("relay_hedged", relay=opening.relay.name, endpoint=str(opening.endpoint),
                         waited_ms=round((time.monotonic() - opening.started) * 1000),
                         next_relay=next_relay.name, next_endpoint=str(next_endpoint))
        self._start()
