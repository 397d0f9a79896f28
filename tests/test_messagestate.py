"""The per-message state kept in meta/."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailwatchd.spool.messagestate import HISTORY_LIMIT, Attempt, MessageState, State
from mailwatchd.spool.queueid import new_queue_id

now_ns = st.integers(min_value=0, max_value=16**14 * 1000 - 1)  # as in test_queueid.py
finite = st.floats(min_value=0, max_value=1e11, allow_nan=False, allow_infinity=False)
text = st.text(max_size=40)
attempts = st.builds(Attempt, at=finite, outcome=st.sampled_from(["temporary", "permanent", "relay_fault"]),
                     cause=text, detail=text, relay=st.none() | text)
states = st.builds(
    MessageState,
    queue_id=st.builds(new_queue_id, now_ns),
    received_at=finite,
    state=st.sampled_from(State),
    attempts=st.integers(0, 10**6),
    next_attempt_at=st.none() | finite,
    reason=st.none() | text,
    source=st.none() | text,
    history=st.lists(attempts, max_size=HISTORY_LIMIT),
)


@given(states)
def test_json_round_trip(state: MessageState) -> None:
    data = state.to_json()
    assert isinstance(data, bytes)
    again = MessageState.from_json(data)
    assert again == state
    assert type(again.state) is State
    assert all(type(item) is Attempt for item in again.history)


def test_json_is_compact_and_readable() -> None:
    state = MessageState("0123456789ABCDEF0123", 1.5, State.DEFERRED, attempts=2, next_attempt_at=9.0,
                         history=[Attempt(1.0, "temporary", "timeout", "data: timed out", "gmail")])
    raw = json.loads(state.to_json())
    assert raw == {"queue_id": "0123456789ABCDEF0123", "received_at": 1.5, "state": "deferred", "attempts": 2,
                   "next_attempt_at": 9.0, "reason": None, "source": None,
                   "history": [{"at": 1.0, "outcome": "temporary", "cause": "timeout", "detail": "data: timed out",
                                "relay": "gmail"}],
                   "first_failure_at": None, "requeued_at": None}
    assert b" " not in state.to_json().replace(b"data: timed out", b"")


def test_from_json_defaults() -> None:
    state = MessageState.from_json(b'{"queue_id": "0123456789ABCDEF0123", "received_at": 3}')
    assert state == MessageState("0123456789ABCDEF0123", 3)
    assert state.state is State.QUEUED and state.history == [] and state.attempts == 0


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"queue_id": "x"}', b'{"queue_id": "x", "received_at": 1, '
                                  b'"state": "lost"}', b'{"queue_id": "x", "received_at": 1, "bogus": 1}'])
def test_from_json_rejects_garbage(data: bytes) -> None:
    with pytest.raises((ValueError, TypeError, KeyError, AttributeError)):
        MessageState.from_json(data)


def test_history_is_capped_and_keeps_the_latest() -> None:
    state = MessageState("0123456789ABCDEF0123", 0.0)
    for number in range(HISTORY_LIMIT + 7):
        state.record(Attempt(float(number), "temporary", "timeout", f"try {number}"), counted=True)
    assert len(state.history) == HISTORY_LIMIT
    assert [item.at for item in state.history] == [float(n) for n in range(7, HISTORY_LIMIT + 7)]
    assert state.attempts == HISTORY_LIMIT + 7
    assert state.last_error == f"try {HISTORY_LIMIT + 6}"


@given(st.lists(st.booleans(), max_size=40))
def test_relay_faults_are_recorded_but_not_counted(counted_flags: list[bool]) -> None:
    state = MessageState("0123456789ABCDEF0123", 0.0)
    for index, counted in enumerate(counted_flags):
        outcome = "temporary" if counted else "relay_fault"
        state.record(Attempt(float(index), outcome, "c", str(index)), counted=counted)
    assert state.attempts == sum(counted_flags)
    assert len(state.history) == min(len(counted_flags), HISTORY_LIMIT)
    assert [item.detail for item in state.history] == [str(i) for i in range(len(counted_flags))][-HISTORY_LIMIT:]


def test_last_error_without_history() -> None:
    assert MessageState("0123456789ABCDEF0123", 0.0).last_error is None


def test_first_counted_failure_starts_the_lifetime_clock() -> None:
    state = MessageState("0123456789ABCDEF0123", 1.0)
    state.record(Attempt(5.0, "relay_fault", "connect_timeout", "connect: timed out", "gmail"), counted=False)
    assert state.first_failure_at is None
    state.record(Attempt(7.0, "temporary", "temporary_failure", "rcpt: 451", "gmail"), counted=True)
    state.record(Attempt(9.0, "temporary", "temporary_failure", "rcpt: 451", "gmail"), counted=True)
    assert state.first_failure_at == 7.0
    assert MessageState.from_json(state.to_json()).first_failure_at == 7.0
