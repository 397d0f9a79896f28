"""Which relay endpoint to use now: ordered failover with a circuit breaker per endpoint and
per-relay sending budgets.

Relays are tried in configured order, and each relay's endpoints in order (587 → 465 →
2525...). An endpoint that failed (a relay fault) is skipped until its breaker half-opens, so
later messages do not pay its timeout again; a success or a good probe closes it. A quota
reply, or a budget used up, skips the whole relay for a while: mail spills to the next one.

A worker races the openings of consecutive endpoints (hedged failover, service/hedge.py); when
one worker found an endpoint still connecting after the hedge delay, it says so here, and until
that connect ends the endpoint comes after the others, so the other workers do not each wait
the delay for it before its connect timeout opens the breaker.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from mailwatchd.service.logs import get_logger
from mailwatchd.settings.relays import Endpoint, RelayConfig
from mailwatchd.transports.outcome import Cause, DeliveryResult, Outcome

log = get_logger()
BREAKER_MIN_S = 5.0
BREAKER_MAX_S = 300.0
QUOTA_PAUSE_S = 900.0  # a provider's quota reply: leave that relay alone for 15 minutes
DAY_S = 86400.0


class Health(StrEnum):
    UP = "up"
    DEGRADED = "degraded"  # some endpoints of the relay are down, another one works
    DOWN = "down"
    UNKNOWN = "unknown"


@dataclass
class EndpointHealth:
    """The breaker and last-known state of one endpoint."""

    endpoint: Endpoint
    up: bool | None = None  # None: never tried nor probed
    cause: str = ""
    detail: str = ""
    failures: int = 0
    open_until: float = 0.0  # breaker open (skip) until this monotonic time
    slow_connects: int = 0  # connects to it still under way past the hedge delay: tried after the others
    last_change: float = 0.0
    last_probe: float | None = None  # epoch seconds
    probe_timings_ms: dict[str, float] = field(default_factory=dict)
    cert_days_left: int | None = None


@dataclass
class RelayState:
    """One relay's endpoints, pause and budget counters."""

    config: RelayConfig
    endpoints: list[EndpointHealth]
    paused_until: float = 0.0
    pause_cause: str = ""
    sent_minute: deque[float] = field(default_factory=deque)
    sent_day: deque[float] = field(default_factory=deque)
    last_delivery: float | None = None

    @property
    def health(self) -> Health:
        states = [ep.up for ep in self.endpoints]
        if all(state is None for state in states):
            return Health.UNKNOWN
        if self.endpoints[0].up is not False and any(states):
            return Health.UP
        return Health.DEGRADED if any(states) else Health.DOWN


@dataclass(frozen=True)
class Transition:
    """An endpoint went up or down (for one log line per change, not per probe)."""

    relay: str
    endpoint: Endpoint
    up: bool
    cause: str
    detail: str


class Router:
    """Failover order and breakers. All times are monotonic seconds unless named epoch."""

    def __init__(self, relays: tuple[RelayConfig, ...], clock: Callable[[], float] = time.monotonic,
                 on_transition: Callable[[Transition], None] | None = None) -> None:
        self._clock = clock
        self._on_transition = on_transition
        self.relays = [RelayState(relay, [EndpointHealth(ep) for ep in relay.endpoints]) for relay in relays]
        self.changed = asyncio.Event()  # set when something may have become usable

    def _budget_free_at(self, relay: RelayState, now: float) -> float:
        """When the relay's budgets let one more message through (now if they do)."""
        limits = relay.config
        if limits.max_per_minute is None and limits.max_per_day is None:
            return now  # no budget (and no deliveries kept for one)
        while relay.sent_minute and relay.sent_minute[0] <= now - 60.0:
            relay.sent_minute.popleft()
        while relay.sent_day and relay.sent_day[0] <= now - DAY_S:
            relay.sent_day.popleft()
        free_at = now
        if limits.max_per_minute is not None and len(relay.sent_minute) >= limits.max_per_minute:
            free_at = max(free_at, relay.sent_minute[0] + 60.0)
        if limits.max_per_day is not None and len(relay.sent_day) >= limits.max_per_day:
            free_at = max(free_at, relay.sent_day[0] + DAY_S)
        return free_at

    def candidates(self) -> list[tuple[RelayConfig, Endpoint]]:
        """Endpoints to try now, in failover order; those with a slow connect under way come last."""
        now = self._clock()
        result: list[tuple[RelayConfig, Endpoint]] = []
        slow: list[tuple[RelayConfig, Endpoint]] = []
        for relay in self.relays:
            if relay.paused_until > now or self._budget_free_at(relay, now) > now:
                continue
            for ep in relay.endpoints:
                if ep.open_until > now:
                    continue
                if ep.slow_connects:
                    slow.append((relay.config, ep.endpoint))
                else:
                    result.append((relay.config, ep.endpoint))
        return result + slow if slow else result

    def next_chance(self) -> float | None:
        """Seconds until some endpoint may be usable again (None: one is usable now)."""
        now = self._clock()
        # candidates() is not empty: written out without building its lists (a worker asks before every message).
        for relay in self.relays:
            if relay.paused_until <= now and self._budget_free_at(relay, now) <= now:
                for ep in relay.endpoints:
                    if ep.open_until <= now:
                        return None
        waits: list[float] = []
        for relay in self.relays:
            relay_free = max(relay.paused_until, self._budget_free_at(relay, now))
            waits.extend(max(relay_free, ep.open_until) - now for ep in relay.endpoints)
        return max(0.0, min(waits)) if waits else None

    def _find(self, relay_name: str, endpoint: Endpoint) -> tuple[RelayState, EndpointHealth] | None:
        for relay in self.relays:
            if relay.config.name == relay_name:
                for health in relay.endpoints:
                    if health.endpoint == endpoint:
                        return relay, health
        return None

    def report(self, relay: RelayConfig, endpoint: Endpoint, result: DeliveryResult) -> Transition | None:
        """Learn from a delivery attempt; returns a transition when the endpoint changed state."""
        found = self._find(relay.name, endpoint)
        if found is None:
            return None
        state, health = found
        now = self._clock()
        if result.outcome is Outcome.RELAY_FAULT:
            if result.cause is Cause.QUOTA_EXCEEDED:
                pause = QUOTA_PAUSE_S if result.retry_after is None else min(result.retry_after, DAY_S)
                state.paused_until = now + pause
                state.pause_cause = result.summary
                return None  # the endpoint itself works
            if result.cause is Cause.UNEXPRESSIBLE:
                return None  # the relay works; it cannot carry this one message
            return self._mark(health, False, result.cause.value, result.summary, now)
        if result.outcome is Outcome.DELIVERED:
            # Kept only for a budget that reads them: a day's deliveries would otherwise grow with the backlog.
            limits = state.config
            if limits.max_per_minute is not None:
                state.sent_minute.append(now)
            if limits.max_per_day is not None:
                state.sent_day.append(now)
            state.last_delivery = time.time()
        if (health.up is True and health.failures == 0 and health.open_until == 0.0 and not health.detail
                and health.cause == Cause.OK.value):
            return None  # _mark would change nothing: the endpoint works and was known to
        return self._mark(health, True, Cause.OK.value, "", now)

    def connect_slow(self, relay: RelayConfig, endpoint: Endpoint) -> None:
        """A connect to the endpoint is still under way past the hedge delay: list it after the others
        until `connect_ended`."""
        found = self._find(relay.name, endpoint)
        if found is not None:
            found[1].slow_connects += 1

    def connect_ended(self, relay: RelayConfig, endpoint: Endpoint) -> None:
        """A connect `connect_slow` reported has ended (either way; its outcome is reported apart)."""
        found = self._find(relay.name, endpoint)
        if found is not None and found[1].slow_connects > 0:
            found[1].slow_connects -= 1

    def report_probe(self, relay_name: str, endpoint: Endpoint, ok: bool, cause: str, detail: str,
                     timings_ms: dict[str, float], cert_days_left: int | None) -> Transition | None:
        """Learn from a probe: a good probe closes the breaker at once."""
        found = self._find(relay_name, endpoint)
        if found is None:
            return None
        _, health = found
        health.last_probe = time.time()
        health.probe_timings_ms = dict(timings_ms)
        health.cert_days_left = cert_days_left
        return self._mark(health, ok, cause, detail, self._clock())

    def _mark(self, health: EndpointHealth, up: bool, cause: str, detail: str, now: float) -> Transition | None:
        was = health.up
        health.cause, health.detail = cause, detail
        if up:
            health.failures = 0
            health.open_until = 0.0
        else:
            health.failures += 1
            # The exponent is capped: 2 ** n for thousands of failures does not fit in a float.
            health.open_until = now + min(BREAKER_MAX_S, BREAKER_MIN_S * 2 ** min(health.failures - 1, 30))
        health.up = up
        if was is up:
            return None
        health.last_change = now
        if up:
            self.changed.set()
        # By identity: two relays may share an endpoint, and equal-valued health records.
        relay_name = next(r.config.name for r in self.relays if any(ep is health for ep in r.endpoints))
        transition = Transition(relay_name, health.endpoint, up, cause, detail)
        _log_transition(transition)
        if self._on_transition is not None:
            self._on_transition(transition)
        return transition

    def reset(self) -> None:
        """Close every breaker and pause (an operator's flush)."""
        for relay in self.relays:
            relay.paused_until = 0.0
            for health in relay.endpoints:
                health.open_until = 0.0
                health.failures = 0
        self.changed.set()



def _log_transition(transition: Transition) -> None:
    """One log line when an endpoint goes down or comes back (not one per attempt or probe)."""
    if transition.up:
        log.info("relay_up", relay=transition.relay, endpoint=str(transition.endpoint))
    else:
        log.warning("relay_down", relay=transition.relay, endpoint=str(transition.endpoint),
                    cause=transition.cause, detail=transition.detail)
