"""Routing: failover order, per-endpoint circuit breakers, quota pauses and sending budgets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailwatchd.relays.routing import BREAKER_MAX_S, BREAKER_MIN_S, DAY_S, QUOTA_PAUSE_S, Health, Router, Transition
from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.transports.outcome import Cause, DeliveryResult, Outcome, Phase

A587 = Endpoint("a.example.net", 587, TlsMode.STARTTLS)
A465 = Endpoint("a.example.net", 465, TlsMode.IMPLICIT)
B587 = Endpoint("b.example.net", 587, TlsMode.STARTTLS)
B2525 = Endpoint("b.example.net", 2525, TlsMode.STARTTLS)

REFUSED = DeliveryResult(Outcome.RELAY_FAULT, Cause.CONNECTION_REFUSED, Phase.CONNECT, detail="connection refused")
DELIVERED = DeliveryResult(Outcome.DELIVERED, Cause.OK, Phase.BODY, 250, "2.0.0 OK")
TEMPORARY = DeliveryResult(Outcome.TEMPORARY, Cause.TEMPORARY_FAILURE, Phase.RCPT, 451, "4.3.0 try later")
PERMANENT = DeliveryResult(Outcome.PERMANENT, Cause.RECIPIENT_REJECTED, Phase.RCPT, 550, "5.1.1 no such user")
QUOTA = DeliveryResult(Outcome.RELAY_FAULT, Cause.QUOTA_EXCEEDED, Phase.MAIL, 550, "5.4.5 Daily sending quota exceeded")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def relay(name: str, *endpoints: Endpoint, per_minute: int | None = None, per_day: int | None = None) -> RelayConfig:
    return RelayConfig(name=name, endpoints=endpoints, max_per_minute=per_minute, max_per_day=per_day)


RELAY_A = relay("a", A587, A465)
RELAY_B = relay("b", B587, B2525)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def router(clock: Clock) -> Router:
    return Router((RELAY_A, RELAY_B), clock=clock)


def names(router: Router) -> list[tuple[str, int]]:
    return [(config.name, endpoint.port) for config, endpoint in router.candidates()]


ALL = [("a", 587), ("a", 465), ("b", 587), ("b", 2525)]


def test_failover_order(router: Router) -> None:
    assert names(router) == ALL
    assert router.candidates()[0] == (RELAY_A, A587)
    assert router.next_chance() is None
    assert [state.health for state in router.relays] == [Health.UNKNOWN, Health.UNKNOWN]


def test_relay_fault_opens_the_breaker_and_it_half_opens(router: Router, clock: Clock) -> None:
    transition = router.report(RELAY_A, A587, REFUSED)
    assert transition == Transition("a", A587, False, "connection_refused", "connect: connection refused")
    assert names(router) == ALL[1:]
    clock.now += BREAKER_MIN_S - 0.001
    assert names(router) == ALL[1:]
    clock.now += 0.001
    assert names(router) == ALL  # half-open: tried again


def test_failures_across_endpoints_and_relays(router: Router) -> None:
    router.report(RELAY_A, A587, REFUSED)
    router.report(RELAY_A, A465, REFUSED)
    assert names(router) == [("b", 587), ("b", 2525)]
    assert router.relays[0].health is Health.DOWN
    router.report(RELAY_B, B587, REFUSED)
    router.report(RELAY_B, B2525, REFUSED)
    assert names(router) == []
    assert router.next_chance() is not None


def test_breaker_doubles_up_to_the_maximum(router: Router, clock: Clock) -> None:
    expected = BREAKER_MIN_S
    for attempt in range(12):
        transition = router.report(RELAY_A, A587, REFUSED)
        assert (transition is not None) == (attempt == 0)  # one transition per change, not per failure
        health = router.relays[0].endpoints[0]
        assert health.open_until - clock.now == pytest.approx(expected)
        assert health.failures == attempt + 1
        clock.now = health.open_until  # half-open: the next try fails again
        expected = min(BREAKER_MAX_S, expected * 2)
    assert expected == BREAKER_MAX_S


def test_breaker_survives_a_very_long_outage(router: Router, clock: Clock) -> None:
    # A relay down for days, probed every 30 s, collects thousands of failures.
    for _ in range(3000):
        router.report_probe("a", A587, False, "connection_refused", "refused", {}, None)
        clock.now += 30.0
    health = router.relays[0].endpoints[0]
    assert health.failures == 3000
    assert health.open_until - (clock.now - 30.0) == BREAKER_MAX_S


def test_success_closes_the_breaker_with_one_transition(router: Router, clock: Clock) -> None:
    router.report(RELAY_A, A587, REFUSED)
    router.report(RELAY_A, A587, REFUSED)
    router.changed.clear()
    transition = router.report(RELAY_A, A587, DELIVERED)
    assert transition == Transition("a", A587, True, "ok", "")
    assert router.changed.is_set()
    assert names(router) == ALL
    assert router.report(RELAY_A, A587, DELIVERED) is None
    health = router.relays[0].endpoints[0]
    assert (health.up, health.failures, health.open_until) == (True, 0, 0.0)
    # The count starts again: the next failure opens for the minimum.
    router.report(RELAY_A, A587, REFUSED)
    assert health.open_until - clock.now == pytest.approx(BREAKER_MIN_S)


@pytest.mark.parametrize("result", [TEMPORARY, PERMANENT])
def test_message_outcomes_mean_the_endpoint_works(router: Router, result: DeliveryResult) -> None:
    router.report(RELAY_A, A587, REFUSED)
    assert router.report(RELAY_A, A587, result) == Transition("a", A587, True, "ok", "")
    assert names(router) == ALL
    assert router.relays[0].last_delivery is None
    assert not router.relays[0].sent_minute


def test_first_success_is_a_transition_from_unknown(router: Router) -> None:
    assert router.report(RELAY_B, B587, DELIVERED) == Transition("b", B587, True, "ok", "")
    assert router.relays[1].health is Health.UP
    assert router.relays[1].last_delivery is not None


def test_quota_pauses_the_whole_relay_without_marking_the_endpoint_down(router: Router, clock: Clock) -> None:
    router.report(RELAY_A, A587, DELIVERED)
    assert router.report(RELAY_A, A587, QUOTA) is None
    assert names(router) == [("b", 587), ("b", 2525)]
    assert router.candidates()[0] == (RELAY_B, B587)
    state = router.relays[0]
    assert state.pause_cause == "mail: 550 5.4.5 Daily sending quota exceeded"
    assert [(ep.up, ep.failures, ep.open_until) for ep in state.endpoints] == [(True, 0, 0.0), (None, 0, 0.0)]
    assert state.health is Health.UP
    clock.now += QUOTA_PAUSE_S - 1
    assert names(router)[0] == ("b", 587)
    clock.now += 1
    assert names(router) == ALL


def test_per_minute_budget_spills_to_the_next_relay(clock: Clock) -> None:
    limited = relay("a", A587, per_minute=2)
    router = Router((limited, RELAY_B), clock=clock)
    start = clock.now
    router.report(limited, A587, DELIVERED)
    clock.now = start + 10
    router.report(limited, A587, DELIVERED)
    assert names(router) == [("b", 587), ("b", 2525)]
    assert router.next_chance() is None  # b can take mail now
    clock.now = start + 59.999
    assert names(router)[0] == ("b", 587)
    clock.now = start + 60
    assert names(router)[0] == ("a", 587)  # the first send left the window
    router.report(limited, A587, DELIVERED)
    assert names(router)[0] == ("b", 587)
    clock.now = start + 70
    assert names(router)[0] == ("a", 587)


def test_per_day_budget(clock: Clock) -> None:
    limited = relay("a", A587, per_day=1)
    router = Router((limited,), clock=clock)
    router.report(limited, A587, DELIVERED)
    assert router.candidates() == []
    assert router.next_chance() == pytest.approx(DAY_S)
    clock.now += DAY_S - 1
    assert router.next_chance() == pytest.approx(1.0)
    clock.now += 1
    assert router.candidates() == [(limited, A587)]


def test_only_deliveries_use_the_budget(clock: Clock) -> None:
    limited = relay("a", A587, per_minute=1)
    router = Router((limited,), clock=clock)
    for result in (TEMPORARY, PERMANENT, REFUSED, QUOTA):
        router.reset()
        router.report(limited, A587, result)
    router.reset()
    assert router.candidates() == [(limited, A587)]


def test_next_chance(router: Router, clock: Clock) -> None:
    assert router.next_chance() is None
    for config, endpoint in ((RELAY_A, A587), (RELAY_A, A465), (RELAY_B, B587)):
        router.report(config, endpoint, REFUSED)
        clock.now += 1.0
    assert router.next_chance() is None  # b:2525 is still usable
    router.report(RELAY_B, B2525, REFUSED)
    # a:587 failed first (3 s ago): its breaker half-opens soonest.
    assert router.next_chance() == pytest.approx(BREAKER_MIN_S - 3.0)
    clock.now += BREAKER_MIN_S - 3.0
    assert router.next_chance() is None


def test_next_chance_waits_for_a_quota_pause_over_a_closed_breaker(clock: Clock) -> None:
    single = relay("a", A587)
    router = Router((single,), clock=clock)
    router.report(single, A587, QUOTA)
    assert router.next_chance() == pytest.approx(QUOTA_PAUSE_S)
    router.report(single, A587, REFUSED)
    assert router.next_chance() == pytest.approx(QUOTA_PAUSE_S)  # the pause is the longer wait


def test_next_chance_without_relays() -> None:
    router = Router(())
    assert router.candidates() == [] and router.next_chance() is None


def test_reset_closes_breakers_and_pauses(router: Router) -> None:
    router.report(RELAY_A, A587, QUOTA)
    router.report(RELAY_B, B587, REFUSED)
    router.report(RELAY_B, B2525, REFUSED)
    assert names(router) == []
    router.changed.clear()
    router.reset()
    assert router.changed.is_set()
    assert names(router) == ALL
    assert router.next_chance() is None


def test_probe_reports(router: Router) -> None:
    transition = router.report_probe("b", B2525, False, "tls_untrusted", "certificate verify failed",
                                     {"connect": 3.0}, None)
    assert transition == Transition("b", B2525, False, "tls_untrusted", "certificate verify failed")
    health = router.relays[1].endpoints[1]
    assert health.last_probe is not None and health.probe_timings_ms == {"connect": 3.0}
    assert ("b", 2525) not in names(router)
    assert router.report_probe("b", B2525, False, "tls_untrusted", "again", {}, None) is None
    transition = router.report_probe("b", B2525, True, "ok", "", {"connect": 1.0, "ehlo": 2.0}, 42)
    assert transition is not None and transition.up
    assert ("b", 2525) in names(router)
    assert (health.cert_days_left, health.probe_timings_ms) == (42, {"connect": 1.0, "ehlo": 2.0})


def test_reports_about_unknown_relays_or_endpoints_are_ignored(router: Router) -> None:
    assert router.report(relay("zzz", A587), A587, REFUSED) is None
    assert router.report(RELAY_A, B587, REFUSED) is None
    assert router.report_probe("zzz", A587, False, "x", "y", {}, None) is None
    assert names(router) == ALL


def test_transition_names_the_relay_that_changed_when_relays_share_an_endpoint(clock: Clock) -> None:
    # Two accounts at the same provider: the same host and port, different credentials.
    first = relay("account-1", A587)
    second = relay("account-2", A587)
    router = Router((first, second), clock=clock)
    assert router.report(first, A587, REFUSED) == Transition("account-1", A587, False, "connection_refused",
                                                             "connect: connection refused")
    assert router.report(second, A587, REFUSED) == Transition("account-2", A587, False, "connection_refused",
                                                              "connect: connection refused")
    assert router.report(second, A587, DELIVERED) == Transition("account-2", A587, True, "ok", "")
    assert [name for name, _ in names(router)] == ["account-2"]


def test_relay_health(router: Router) -> None:
    def health() -> Health:
        return router.relays[0].health

    assert health() is Health.UNKNOWN
    router.report(RELAY_A, A465, DELIVERED)
    assert health() is Health.UP  # primary untried, another works
    router.report(RELAY_A, A587, REFUSED)
    assert health() is Health.DEGRADED
    router.report(RELAY_A, A465, REFUSED)
    assert health() is Health.DOWN
    router.report(RELAY_A, A587, DELIVERED)
    assert health() is Health.UP


@given(st.lists(st.sampled_from(["fail", "ok", "wait"]), max_size=60))
def test_breaker_properties(steps: list[str]) -> None:
    clock = Clock(0.0)
    single = relay("a", A587)
    router = Router((single,), clock=clock)
    health = router.relays[0].endpoints[0]
    transitions = 0
    last_up: bool | None = None
    for step in steps:
        if step == "wait":
            clock.now += 7.0
            continue
        up = step == "ok"
        result = router.report(single, A587, DELIVERED if up else REFUSED)
        changed = up is not last_up
        assert (result is not None) == changed
        transitions += changed
        last_up = up
        if up:
            assert health.open_until == 0.0 and router.candidates() == [(single, A587)]
        else:
            wait = health.open_until - clock.now
            assert BREAKER_MIN_S <= wait <= BREAKER_MAX_S
            assert router.candidates() == []
            assert router.next_chance() == pytest.approx(wait)


def test_reset_forgets_failures_so_the_next_breaker_is_short_again(router: Router, clock: Clock) -> None:
    for _ in range(4):
        router.report(RELAY_A, A587, REFUSED)
        clock.now += BREAKER_MAX_S
    router.reset()
    router.report(RELAY_A, A587, REFUSED)
    assert router.relays[0].endpoints[0].open_until == clock.now + BREAKER_MIN_S


def test_an_endpoint_still_connecting_past_the_hedge_delay_comes_after_the_others(router: Router) -> None:
    router.connect_slow(RELAY_A, A587)
    assert names(router) == [("a", 465), ("b", 587), ("b", 2525), ("a", 587)]
    router.connect_slow(RELAY_A, A587)  # a second worker's connect to it hangs too
    router.connect_ended(RELAY_A, A587)
    assert names(router)[-1] == ("a", 587), "one slow connect is still under way"
    router.connect_ended(RELAY_A, A587)
    assert names(router) == ALL
    router.connect_ended(RELAY_A, A587)  # an unmatched end changes nothing
    assert names(router) == ALL
    assert router.relays[0].endpoints[0].up is None, "slowness alone is no verdict on the endpoint"


def test_a_slow_endpoint_whose_connect_failed_stays_out_until_its_breaker_half_opens(
        router: Router, clock: Clock) -> None:
    router.connect_slow(RELAY_A, A587)
    timeout = DeliveryResult(Outcome.RELAY_FAULT, Cause.CONNECT_TIMEOUT, Phase.CONNECT, detail="no answer")
    assert router.report(RELAY_A, A587, timeout) is not None
    router.connect_ended(RELAY_A, A587)
    assert names(router) == ALL[1:]
    assert router.report(RELAY_A, A587, timeout) is None, "already down: one transition, one relay_down"
    clock.now += 2 * BREAKER_MIN_S
    assert names(router) == ALL
    router.connect_slow(RELAY_B, B587)
    router.connect_slow(RELAY_A, A587)
    assert names(router) == [("a", 465), ("b", 2525), ("a", 587), ("b", 587)], "slow ones keep their own order"
