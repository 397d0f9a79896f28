"""The scheduler: ready queue plus due heap, each id held once, event-driven waits."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailwatchd.service.scheduler import Scheduler, WorkItem
from mailwatchd.spool.store import Location


class Clock:
    """An injected epoch clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def qid(name: str) -> str:
    """A queue id for a short name; ids sort as the names do."""
    assert len(name) <= 7
    number = int.from_bytes(name.encode().ljust(7, b"\0"), "big")
    return f"{number:014X}000000"


def q(name: str) -> WorkItem:
    return WorkItem(qid(name), Location.QUEUE)


def d(name: str) -> WorkItem:
    return WorkItem(qid(name), Location.DEFERRED)


def drain(scheduler: Scheduler) -> list[WorkItem]:
    items = []
    while (item := scheduler.take_nowait()) is not None:
        items.append(item)
    return items


def test_ready_oldest_id_first() -> None:
    scheduler = Scheduler(Clock())
    for name in ("c", "a", "b"):
        scheduler.add_ready(q(name))
    assert (len(scheduler), scheduler.ready_count, scheduler.deferred_count) == (3, 3, 0)
    assert drain(scheduler) == [q("a"), q("b"), q("c")]
    assert scheduler.take_nowait() is None
    assert len(scheduler) == 0


def test_a_released_message_is_first_in_line_again() -> None:
    scheduler = Scheduler(Clock())
    scheduler.add_ready(q("b"))
    scheduler.add_ready(q("a"), front=True)
    first = scheduler.take_nowait()
    assert first == q("a")
    scheduler.release(first)  # no relay could take it: first in line again
    assert drain(scheduler) == [q("a"), q("b")]


def test_only_queue_ids_are_held() -> None:
    scheduler = Scheduler(Clock())
    with pytest.raises(ValueError, match="not a queue id"):
        scheduler.add_ready(WorkItem("../etc/passwd", Location.QUEUE))
    with pytest.raises(ValueError, match="not a queue id"):
        scheduler.add_deferred(1.0, "0123456789abcdef0123")  # lower case: not an id the spool makes
    assert len(scheduler) == 0 and not scheduler.knows("a")


def test_an_id_is_in_one_workers_hands_at_a_time() -> None:
    clock = Clock()
    scheduler = Scheduler(clock)
    scheduler.add_ready(q("a"))
    scheduler.add_ready(q("a"))
    scheduler.add_ready(d("a"), front=True)
    assert scheduler.knows(qid("a"))
    assert drain(scheduler) == [q("a")]  # listed three times, handed out once
    # Taken: neither a rescan nor a deferral lists it again while the worker has it.
    scheduler.add_ready(q("a"))
    scheduler.add_deferred(0.0, qid("a"))
    assert scheduler.knows(qid("a")) and len(scheduler) == 0
    assert scheduler.take_nowait() is None
    scheduler.done(qid("a"))
    assert not scheduler.knows(qid("a"))
    scheduler.add_deferred(clock.now, qid("a"))
    assert scheduler.knows(qid("a")) and scheduler.deferred_count == 1
    assert drain(scheduler) == [d("a")]
    scheduler.done(qid("a"))
    scheduler.done(qid("a"))  # harmless twice
    assert not scheduler.knows(qid("a"))


def test_deferred_promotion_by_the_injected_clock() -> None:
    clock = Clock(100.0)
    scheduler = Scheduler(clock)
    scheduler.add_deferred(110.0, qid("late"))
    scheduler.add_deferred(105.0, qid("soon"))
    scheduler.add_ready(q("now"))
    assert (scheduler.ready_count, scheduler.deferred_count, len(scheduler)) == (1, 2, 3)
    assert drain(scheduler) == [q("now")]
    clock.now = 104.999
    assert scheduler.take_nowait() is None
    clock.now = 105.0
    assert drain(scheduler) == [d("soon")]
    clock.now = 1e9
    assert drain(scheduler) == [d("late")]
    assert scheduler.deferred_count == 0


def test_due_ties_come_out_by_id() -> None:
    clock = Clock(0.0)
    scheduler = Scheduler(clock)
    for name in ("c", "a", "b"):
        scheduler.add_deferred(5.0, qid(name))
    clock.now = 5.0
    assert drain(scheduler) == [d("a"), d("b"), d("c")]


def test_a_stale_due_listing_of_a_taken_message_is_dropped() -> None:
    """A deferred message an operator requeued is claimed again while its due listing stays on the heap."""
    clock = Clock(0.0)
    scheduler = Scheduler(clock)
    scheduler.add_deferred(50.0, qid("a"))
    scheduler.add_ready(q("a"))
    assert (scheduler.ready_count, scheduler.deferred_count) == (1, 1)
    assert drain(scheduler) == [q("a")]
    clock.now = 100.0
    assert scheduler.take_nowait() is None  # due while a worker has it: dropped
    assert len(scheduler) == 0
    scheduler.done(qid("a"))
    assert scheduler.take_nowait() is None


def test_a_retry_of_a_message_that_never_moved_is_taken_from_where_it_is() -> None:
    """A worker that could not write the spool retries the message in queue/, not in deferred/."""
    scheduler = Scheduler(clock=lambda: 100.0)
    scheduler.add_deferred(50.0, qid("A"), Location.QUEUE)
    scheduler.add_deferred(60.0, qid("B"))
    assert scheduler.take_nowait() == q("A")
    assert scheduler.take_nowait() == d("B")
    scheduler.done(qid("A"))
    scheduler.add_deferred(70.0, qid("A"))  # later it did move to deferred/
    assert scheduler.take_nowait() == d("A")


def test_flush_makes_every_deferred_message_due() -> None:
    clock = Clock(0.0)
    scheduler = Scheduler(clock)
    scheduler.add_deferred(2000.0, qid("b"))
    scheduler.add_deferred(1000.0, qid("a"))
    assert scheduler.take_nowait() is None
    assert scheduler.flush() == 2
    assert (scheduler.ready_count, scheduler.deferred_count) == (2, 0)
    assert drain(scheduler) == [d("a"), d("b")]
    clock.now = 5000.0
    assert scheduler.take_nowait() is None  # not due twice
    assert scheduler.flush() == 0


def test_a_second_listing_costs_at_most_one_more_attempt() -> None:
    clock = Clock(0.0)
    scheduler = Scheduler(clock)
    scheduler.add_deferred(10.0, qid("a"))
    scheduler.add_deferred(50.0, qid("a"))  # listed again, later
    clock.now = 10.0
    assert drain(scheduler) == [d("a")]
    clock.now = 60.0
    assert scheduler.take_nowait() is None  # the later listing came due while a worker had it
    scheduler.done(qid("a"))
    scheduler.add_deferred(70.0, qid("a"))
    scheduler.add_deferred(70.0, qid("a"))  # the same time twice
    clock.now = 100.0
    assert drain(scheduler) == [d("a")]
    assert len(scheduler) == 0


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 20)), max_size=40))
def test_each_deferred_id_comes_out_once_at_its_earliest_due_time(deferrals: list[tuple[str, int]]) -> None:
    """While no worker lets go of a message (no done()), a message listed several times comes out once."""
    clock = Clock(-1.0)
    scheduler = Scheduler(clock)
    first: dict[str, float] = {}
    for name, due in deferrals:
        scheduler.add_deferred(float(due), qid(name))
        first[name] = min(first.get(name, float(due)), float(due))
    assert scheduler.deferred_count == len(deferrals)
    out: list[tuple[float, str]] = []
    for now in range(-1, 22):
        clock.now = float(now)
        for item in drain(scheduler):
            assert item.location is Location.DEFERRED
            out.append((float(now), item.queue_id))
    assert out == sorted((due, qid(name)) for name, due in first.items())
    assert len(scheduler) == 0


def test_oldest_id_among_ready_deferred_and_taken() -> None:
    clock = Clock(0.0)
    scheduler = Scheduler(clock)
    assert scheduler.oldest_id() is None
    scheduler.add_ready(q("m"))
    assert scheduler.oldest_id() == qid("m")
    scheduler.add_deferred(10.0, qid("d"))
    scheduler.add_deferred(20.0, qid("b"))
    scheduler.add_deferred(30.0, qid("c"))
    assert scheduler.oldest_id() == qid("b")
    clock.now = 20.0
    assert drain(scheduler) == [d("b"), d("d"), q("m")]  # taken: still the oldest known
    assert scheduler.oldest_id() == qid("b")
    scheduler.done(qid("b"))  # delivered
    assert scheduler.oldest_id() == qid("c")  # c is still deferred: found on the heap again
    scheduler.add_ready(q("a"))
    assert scheduler.oldest_id() == qid("a")
    scheduler.flush()
    for name in ("a", "c", "d", "m"):
        scheduler.done(qid(name))
    assert drain(scheduler) == [q("a"), d("c")]
    for name in ("a", "c"):
        scheduler.done(qid(name))
    assert scheduler.oldest_id() is None


# -- take(): waiting without a tick ---------------------------------------------------------------


def test_take_returns_none_at_the_deadline() -> None:
    async def scenario() -> tuple[WorkItem | None, float]:
        scheduler = Scheduler(Clock())
        scheduler.add_deferred(1e12, qid("far"))
        started = time.monotonic()
        item = await scheduler.take(timeout=0.2)
        return item, time.monotonic() - started

    item, elapsed = asyncio.run(scenario())
    assert item is None
    assert 0.19 <= elapsed < 2.0


def test_take_with_zero_timeout() -> None:
    async def scenario() -> tuple[WorkItem | None, WorkItem | None]:
        scheduler = Scheduler(Clock())
        empty = await scheduler.take(timeout=0)
        scheduler.add_ready(q("a"))
        return empty, await scheduler.take(timeout=0)

    assert asyncio.run(scenario()) == (None, q("a"))


def test_take_wakes_at_once_on_add_ready_from_another_task() -> None:
    async def scenario() -> tuple[WorkItem | None, float]:
        scheduler = Scheduler(Clock())
        scheduler.add_deferred(1e12, qid("far"))  # a due time far away must not delay the wake-up
        taker = asyncio.create_task(scheduler.take(timeout=30))
        await asyncio.sleep(0)  # let the taker start waiting
        assert not taker.done()
        started = time.monotonic()

        async def producer() -> None:
            scheduler.add_ready(q("new"))

        await asyncio.create_task(producer())
        item = await taker
        return item, time.monotonic() - started

    item, elapsed = asyncio.run(scenario())
    assert item == q("new")
    assert elapsed < 1.0


def test_take_waits_for_a_due_time_on_the_clock() -> None:
    async def scenario() -> tuple[WorkItem | None, float]:
        scheduler = Scheduler()  # the real clock
        started = time.monotonic()
        scheduler.add_deferred(time.time() + 0.15, qid("retry"))
        item = await scheduler.take(timeout=10)
        return item, time.monotonic() - started

    item, elapsed = asyncio.run(scenario())
    assert item == d("retry")
    assert 0.1 <= elapsed < 5.0


def test_take_wakes_for_an_earlier_deferral_added_while_waiting() -> None:
    async def scenario() -> tuple[WorkItem | None, float]:
        scheduler = Scheduler()
        scheduler.add_deferred(time.time() + 3600, qid("later"))
        taker = asyncio.create_task(scheduler.take(timeout=10))
        await asyncio.sleep(0)
        started = time.monotonic()
        scheduler.add_deferred(time.time() + 0.05, qid("sooner"))
        item = await taker
        return item, time.monotonic() - started

    item, elapsed = asyncio.run(scenario())
    assert item == d("sooner")
    assert elapsed < 5.0


def test_several_takers_each_get_one_item() -> None:
    async def scenario() -> list[WorkItem | None]:
        scheduler = Scheduler(Clock())
        takers = [asyncio.create_task(scheduler.take(timeout=10)) for _ in range(3)]
        await asyncio.sleep(0)
        for name in ("a", "b", "c"):
            scheduler.add_ready(q(name))
        return list(await asyncio.gather(*takers))

    results = asyncio.run(scenario())
    assert sorted(item.queue_id for item in results if item is not None) == [qid("a"), qid("b"), qid("c")]


def test_wake_lets_a_taker_look_again_without_inventing_work() -> None:
    async def scenario() -> tuple[WorkItem | None, float]:
        scheduler = Scheduler(Clock())
        taker = asyncio.create_task(scheduler.take(timeout=0.2))
        await asyncio.sleep(0)
        started = time.monotonic()
        scheduler.wake()
        item = await taker
        return item, time.monotonic() - started

    item, elapsed = asyncio.run(scenario())
    assert item is None
    assert 0.1 <= elapsed < 2.0


def test_a_stateless_listing_comes_back_as_it_went_in() -> None:
    scheduler = Scheduler(Clock())
    fresh = WorkItem(qid("a"), Location.QUEUE, stateless=True)
    scheduler.add_ready(fresh)
    scheduler.add_ready(q("b"))
    assert drain(scheduler) == [fresh, q("b")]
    scheduler.done(qid("a"))
    scheduler.release(fresh)  # given back (no relay now): still known to have no state
    assert drain(scheduler) == [fresh]


def test_of_two_listings_of_one_id_the_one_that_may_have_a_state_is_handed_out() -> None:
    scheduler = Scheduler(Clock())
    scheduler.add_ready(WorkItem(qid("a"), Location.QUEUE, stateless=True))
    scheduler.add_ready(q("a"))  # e.g. an operator's requeue, which wrote a state
    assert drain(scheduler) == [q("a")]


def test_only_a_message_in_queue_is_listed_as_stateless() -> None:
    scheduler = Scheduler(Clock())
    scheduler.add_ready(WorkItem(qid("a"), Location.DEFERRED, stateless=True))
    assert drain(scheduler) == [d("a")]


def test_add_deferred_refuses_what_is_no_queue_id() -> None:
    scheduler = Scheduler(Clock())
    for bad in ("", "not-an-id", "0123456789abcdef0123", qid("a") + "0", " " + qid("a")[1:], "0x" + qid("a")[2:]):
        with pytest.raises(ValueError, match="not a queue id"):
            scheduler.add_deferred(1.0, bad)
    assert len(scheduler) == 0


def test_add_queued_is_add_ready_of_messages_in_queue() -> None:
    scheduler = Scheduler(Clock())
    scheduler.add_queued([qid("c"), qid("a")])
    scheduler.add_ready(q("b"))
    assert drain(scheduler) == [q("a"), q("b"), q("c")]
    scheduler.add_queued([qid("a"), qid("d")])  # a: still in a worker's hands, its attempt settles it
    assert drain(scheduler) == [q("d")]
    for bad in ("", "not-an-id", "0123456789abcdef0123", "0x" + qid("a")[2:], " " + qid("a")[1:]):
        with pytest.raises(ValueError, match="not a queue id"):
            scheduler.add_queued([qid("e"), bad])
    assert len(scheduler) == 0  # all or nothing


# -- a lazy load of deferred messages -----------------------------------------------------------------


def test_messages_a_load_expects_count_as_deferred_until_it_accounts_for_them() -> None:
    clock = Clock()
    scheduler = Scheduler(clock)
    scheduler.add_ready(q("m"))
    scheduler.expect_deferred(3, qid("b"))
    assert (scheduler.loading, scheduler.pending_deferred) == (True, 3)
    assert (len(scheduler), scheduler.ready_count, scheduler.deferred_count) == (4, 1, 3)
    assert scheduler.oldest_id() == qid("b")  # older than anything listed: from the load's listing
    scheduler.load_deferred(2000.0, qid("c"))
    scheduler.skip_deferred(qid("b"))  # moved by a command before the load looked
    assert (scheduler.pending_deferred, scheduler.deferred_count, len(scheduler)) == (1, 2, 3)
    scheduler.load_deferred(500.0, qid("d"))  # due already
    assert drain(scheduler) == [d("d"), q("m")]
    scheduler.end_deferred_load()
    assert (scheduler.loading, scheduler.pending_deferred, scheduler.deferred_count) == (False, 0, 1)
    assert scheduler.oldest_id() == qid("c")
    clock.now = 2000.0
    assert drain(scheduler) == [d("c")]


def test_end_of_a_load_forgets_what_it_did_not_account_for() -> None:
    scheduler = Scheduler(Clock())
    scheduler.expect_deferred(5, qid("a"))
    scheduler.load_deferred(9000.0, qid("b"))
    scheduler.end_deferred_load()  # given up (an error): the rest waits for the next start
    assert (scheduler.deferred_count, len(scheduler), scheduler.oldest_id()) == (1, 1, qid("b"))


def test_a_message_deferred_during_the_load_is_not_listed_again_by_it() -> None:
    clock = Clock()
    scheduler = Scheduler(clock)
    scheduler.expect_deferred(2, qid("a"))
    # Requeued by an operator, claimed and attempted, deferred again by a worker before the load came to it.
    scheduler.add_deferred(1500.0, qid("a"))
    scheduler.load_deferred(1500.0, qid("a"))
    scheduler.load_deferred(1500.0, qid("b"))
    assert (scheduler.pending_deferred, scheduler.deferred_count) == (0, 2)
    clock.now = 1500.0
    assert drain(scheduler) == [d("a"), d("b")]
    scheduler.end_deferred_load()
    scheduler.done(qid("a"))
    scheduler.add_deferred(1600.0, qid("a"))  # after the load: an ordinary deferral
    assert scheduler.deferred_count == 1


def test_a_flush_during_the_load_makes_what_it_loads_later_ready_too() -> None:
    scheduler = Scheduler(Clock())
    scheduler.expect_deferred(3, qid("a"))
    scheduler.load_deferred(9000.0, qid("c"))
    assert scheduler.flush() == 3  # the one loaded, and the two still to load
    scheduler.load_deferred(9000.0, qid("a"))
    scheduler.skip_deferred(qid("b"))
    assert (scheduler.ready_count, scheduler.deferred_count) == (2, 0)
    assert drain(scheduler) == [d("a"), d("c")]
    scheduler.end_deferred_load()
    scheduler.add_deferred(9000.0, qid("d"))
    assert scheduler.take_nowait() is None  # the flush was for then, not for later deferrals


def test_a_load_wakes_a_waiting_taker_for_a_due_message() -> None:
    clock = Clock()
    scheduler = Scheduler(clock)
    scheduler.expect_deferred(1, qid("a"))

    async def scenario() -> WorkItem | None:
        taker = asyncio.create_task(scheduler.take(timeout=5))
        await asyncio.sleep(0)
        scheduler.load_deferred(clock.now - 1, qid("a"))
        return await taker

    assert asyncio.run(scenario()) == d("a")
