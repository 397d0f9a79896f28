"""Queue ids: the spool's file names, sortable by creation time."""

from __future__ import annotations

import string
import time
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mailwatchd.spool.queueid import QUEUE_ID_PATTERN, is_queue_id, new_queue_id, queue_id_time

# From 1970 to the year 4253 (14 hex digits of microseconds).
now_ns = st.integers(min_value=0, max_value=16**14 * 1000 - 1)


@given(now_ns)
def test_queue_id_shape(ns: int) -> None:
    queue_id = new_queue_id(ns)
    assert QUEUE_ID_PATTERN.match(queue_id)
    assert is_queue_id(queue_id)
    assert len(queue_id) == 20
    assert not set(queue_id) & set("/.:\0 \n")
    assert set(queue_id) <= set("0123456789ABCDEF")


@given(st.integers(min_value=0, max_value=2**33 * 10**9 - 1))  # a float epoch holds microseconds until 2242
def test_queue_id_time_round_trips_to_the_microsecond(ns: int) -> None:
    seconds = queue_id_time(new_queue_id(ns))
    assert (Decimal(seconds) * 1_000_000).to_integral_value(ROUND_HALF_EVEN) == ns // 1000


@given(now_ns, now_ns)
def test_queue_ids_sort_by_creation_time(first: int, second: int) -> None:
    assume(first // 1000 != second // 1000)
    earlier, later = sorted((first, second))
    assert new_queue_id(earlier) < new_queue_id(later)


def test_queue_ids_from_the_clock_are_unique_and_current() -> None:
    before = time.time()
    ids = [new_queue_id() for _ in range(2000)]
    after = time.time()
    assert len(set(ids)) == len(ids)
    assert all(before - 1e-6 <= queue_id_time(queue_id) <= after + 1e-6 for queue_id in ids)


@pytest.mark.parametrize("name", [
    "", "..", ".", "../0123456789ABCDEF0123", "0123456789ABCDEF0123/..", "/0123456789ABCDEF0123",
    "0123456789abcdef0123",  # lower case: not what new_queue_id makes
    "0123456789ABCDEF012", "0123456789ABCDEF01234",
    "0123456789ABCDEF0123\n", "\n0123456789ABCDEF0123", "0123456789ABCDEF0123 ",
    "0123456789ABCDEF0123.json", ".tmp-0123456789ABCDEF0123",
    "1700000000.M1P2.host:2,", "1700000000.M123456P789Q1.host", "1700000000.M1P2.host:2,S",
    "0123456789ABCDEFG123", "0123456789ABCDEF012\u0660",  # a non-ASCII digit
])
def test_is_queue_id_rejects(name: str) -> None:
    assert not is_queue_id(name)


@given(st.text(string.printable + "\u0660\uff10", max_size=24))
def test_is_queue_id_accepts_only_20_upper_hex_digits(name: str) -> None:
    assert is_queue_id(name) == (len(name) == 20 and set(name) <= set("0123456789ABCDEF"))
