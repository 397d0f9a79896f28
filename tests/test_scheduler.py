"""The scheduler: ready queue plus due heap, each id held once, event-driven waits."""

from __future__ import annotations

import asyncio
import time

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


def q(queue_id: str) -> WorkItem:
    return WorkItem(queue_id, Location.QUEUE)


def d(queue_id: str) -> WorkItem:
    return WorkItem(queue_id, Location.DEFERRED)


def drain(scheduler: Scheduler) -> list[WorkItem]:
    items = []
    while (item := scheduler.take_nowait()) is not None:
        items.append(item)
    return items


def test_ready_in_arrival_order() -> None:
    scheduler = Scheduler(Clock())
    for name in ("a", "b", "c"):
        scheduler.add_ready(q(name))
    assert (len(scheduler), scheduler.ready_count, scheduler.deferred_count) == (3, 3, 0)
    assert drain(scheduler) == [q("a"), q("b"), q("c")]
    assert scheduler.take_nowait() is None
    assert len(scheduler) == 0


def test_front_insertion_and_release() -> None:
    scheduler = Scheduler(Clock())
    scheduler.add_ready(q("a"))
    scheduler.add_ready(q("b"))
    scheduler.add_ready(q("urgent"), front=True)
    first = scheduler.take_nowait()
    assert first == q("urgent")
    scheduler.release(first)  # no relay could take it: first in line again
    assert drain(scheduler) == [q("urgent"), q("a"), q("b")]


def test_an_id_is_held_once() -> None:
    clock = Clock()
    scheduler = Scheduler(clock)
    scheduler.add_ready(q("a"))
    scheduler.add_ready(q("a"))
    scheduler.add_ready(d("a"), front=True)
    assert scheduler.ready_count == 1 and scheduler.knows("a")
    item = scheduler.take_nowait()
    assert item == q("a")
    # Taken: still held, so neither a rescan nor a deferral can queue it twice.
    scheduler.add_ready(q("a"))
    scheduler.add_deferred(0.0, "a")
    assert scheduler.knows("a") and len(scheduler) == 0
    assert scheduler.take_nowait() is None
    scheduler.done("a")
    assert not scheduler.knows("a")
    scheduler.add_deferred(clock.now, "a")
    assert scheduler.knows("a") and scheduler.deferred_count == 1
    assert drain(scheduler) == [d("a")]
    scheduler.done("a")
    scheduler.done("a")  # harmless twice
    assert not scheduler.knows("a")


def test_deferred_promotion_by_the_injected_clock() -> None:
    clock = Clock(100.0)
    scheduler = Scheduler(clock)
    scheduler.add_deferred(110.0, "late")
    scheduler.add_deferred(105.0, "soon")
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
        scheduler.add_deferred(5.0, name)
    clock.now = 5.0
    assert drain(scheduler) == [d("a"), d("b"), d("c")]


def test_add_ready_takes_a_message_off_the_heap() -> None:
    clock = Clock(0.0)
    scheduler = Scheduler(clock)
    scheduler.add_deferred(50.0, "a")
    scheduler.add_ready(q("a"))
    assert (scheduler.ready_count, scheduler.deferred_count) == (1, 0)
    assert drain(scheduler) == [q("a")]
    clock.now = 100.0
    assert scheduler.take_nowait() is None  # the heap entry went stale
    scheduler.done("a")
    assert scheduler.take_nowait() is None


def test_a_retry_of_a_message_that_never_moved_is_taken_from_where_it_is() -> None:
    """A worker that could not write the spool retries the message in queue/, not in deferred/."""
    scheduler = Scheduler(clock=lambda: 100.0)
    scheduler.add_deferred(50.0, "A", Location.QUEUE)
    scheduler.add_deferred(60.0, "B")
    assert scheduler.take_nowait() == WorkItem("A", Location.QUEUE)
    assert scheduler.take_nowait() == WorkItem("B", Location.DEFERRED)
    scheduler.done("A")
    scheduler.add_deferred(70.0, "A")  # later it did move to deferred/
    assert scheduler.take_nowait() == WorkItem("A", Location.DEFERRED)


def test_flush_makes_every_deferred_message_due() -> None:
    clock = Clock(0.0)
    scheduler = Scheduler(clock)
    scheduler.add_deferred(2000.0, "b")
    scheduler.add_deferred(1000.0, "a")
    assert scheduler.take_nowait() is None
    assert scheduler.flush() == 2
    assert drain(scheduler) == [d("a"), d("b")]
    clock.now = 5000.0
    assert scheduler.take_nowait() is None  # the old entries are stale, not due twice
    assert scheduler.flush() == 0


def test_stale_entries_after_re_deferral() -> None:
    clock = Clock(0.0)
    scheduler = Scheduler(clock)
    scheduler.add_deferred(10.0, "a")
    scheduler.add_deferred(50.0, "a")  # later
    scheduler.add_deferred(30.0, "b")
    scheduler.add_deferred(5.0, "b")  # earlier
    assert scheduler.deferred_count == 2
    clock.now = 5.0
    assert drain(scheduler) == [d("b")]
    clock.now = 20.0
    assert scheduler.take_nowait() is None  # a's 10.0 entry is stale
    clock.now = 40.0
    assert scheduler.take_nowait() is None  # b's 30.0 entry is stale (b is taken)
    scheduler.done("b")
    clock.now = 50.0
    assert drain(scheduler) == [d("a")]
    scheduler.done("a")
    scheduler.add_deferred(60.0, "a")
    scheduler.add_deferred(60.0, "a")  # the same time twice
    clock.now = 100.0
    assert drain(scheduler) == [d("a")]


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 20)), max_size=40))
def test_each_deferred_id_comes_out_once_at_its_last_due_time(deferrals: list[tuple[str, int]]) -> None:
    clock = Clock(-1.0)
    scheduler = Scheduler(clock)
    last: dict[str, float] = {}
    for name, due in deferrals:
        scheduler.add_deferred(float(due), name)
        last[name] = float(due)
    assert scheduler.deferred_count == len(last)
    out: list[tuple[float, str]] = []
    for now in range(-1, 22):
        clock.now = float(now)
        for item in drain(scheduler):
            assert item.location is Location.DEFERRED
            assert last[item.queue_id] <= now
            out.append((float(now), item.queue_id))
    assert out == sorted((due, name) for name, due in last.items())
    assert len(scheduler) == 0


# -- take(): waiting without a tick ---------------------------------------------------------------


def test_take_returns_none_at_the_deadline() -> None:
    async def scenario() -> tuple[WorkItem | None, float]:
        scheduler = Scheduler(Clock())
        scheduler.add_deferred(1e12, "far")
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
        scheduler.add_deferred(1e12, "far")  # a due time far away must not delay the wake-up
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
        scheduler.add_deferred(time.time() + 0.15, "retry")
        item = await scheduler.take(timeout=10)
        return item, time.monotonic() - started

    item, elapsed = asyncio.run(scenario())
    assert item == d("retry")
    assert 0.1 <= elapsed < 5.0


def test_take_wakes_for_an_earlier_deferral_added_while_waiting() -> None:
    async def scenario() -> tuple[WorkItem | None, float]:
        scheduler = Scheduler()
        scheduler.add_deferred(time.time() + 3600, "later")
        taker = asyncio.create_task(scheduler.take(timeout=10))
        await asyncio.sleep(0)
        started = time.monotonic()
        scheduler.add_deferred(time.time() + 0.05, "sooner")
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
    assert sorted(item.queue_id for item in results if item is not None) == ["a", "b", "c"]


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
