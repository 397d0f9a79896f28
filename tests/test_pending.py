"""PendingStores: early relaying stops for PAUSE_S after a store that did not end durable."""

from __future__ import annotations

import asyncio

import structlog

from mailwatchd.spool.pending import PAUSE_S, PendingStores
from mailwatchd.transports.outcome import Cause, DeliveryResult, Outcome, Phase

QUEUE_ID = "0661A0B0C0D0E0F01234"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def delivered() -> DeliveryResult:
    return DeliveryResult(Outcome.DELIVERED, Cause.OK, Phase.BODY, 250, "queued", "relay", None)


def test_a_failed_store_pauses_early_relaying_for_pause_s_and_a_stored_one_does_not() -> None:
    clock = Clock()

    async def run() -> list[bool]:
        stores = PendingStores(clock)
        seen = [stores.relay_early]
        stores.begin(QUEUE_ID)
        assert stores.settle(QUEUE_ID, True)
        seen.append(stores.relay_early)
        stores.begin(QUEUE_ID)
        stores.settle(QUEUE_ID, False)
        seen.append(stores.relay_early)
        clock.now += PAUSE_S - 1
        seen.append(stores.relay_early)
        clock.now += 1
        seen.append(stores.relay_early)
        return seen

    with structlog.testing.capture_logs() as logs:
        assert asyncio.run(run()) == [True, True, False, False, True]
    assert [entry["event"] for entry in logs] == ["cut_through_paused"]


def test_the_listener_ending_mid_store_pauses_and_tells_of_a_relayed_message() -> None:
    clock = Clock()

    async def run() -> PendingStores:
        stores = PendingStores(clock)
        stores.drop_all()  # nothing in progress: nothing to pause for
        assert stores.relay_early
        pending = stores.begin(QUEUE_ID)
        assert not await pending.stored(0)  # a worker that gave up after the relay took it
        stores.unstored(pending, delivered())
        stores.drop_all()
        return stores

    with structlog.testing.capture_logs() as logs:
        stores = asyncio.run(run())
    assert not stores.relay_early and stores.take_relayed(QUEUE_ID) is None
    assert [entry["event"] for entry in logs] == ["cut_through_paused", "message_relayed_unstored"]
    assert logs[1]["queue_id"] == QUEUE_ID


def test_a_given_up_store_that_ends_durable_keeps_the_relays_answer_for_its_listing() -> None:
    async def run() -> PendingStores:
        stores = PendingStores(Clock())
        pending = stores.begin(QUEUE_ID)
        assert not await pending.stored(0)
        stores.unstored(pending, delivered())
        assert not stores.settle(QUEUE_ID, True)  # the caller lists it again
        return stores

    stores = asyncio.run(run())
    result = stores.take_relayed(QUEUE_ID)
    assert result is not None and result.outcome is Outcome.DELIVERED
    assert stores.take_relayed(QUEUE_ID) is None
