"""Queue ids and the per-message state kept in the spool's meta/ directory."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum

# 14 hex digits of microseconds since the epoch (good until the year 4253) then 24 random
# bits: ids sort by creation time, never contain a path separator, and have a fixed length.
QUEUE_ID_PATTERN = re.compile(r"\A[0-9A-F]{20}\Z")  # \Z: "$" would accept a trailing newline
HISTORY_LIMIT = 10


def new_queue_id(now_ns: int | None = None) -> str:
    """A fresh queue id; `now_ns` (time.time_ns()) is for tests."""
    microseconds = (time.time_ns() if now_ns is None else now_ns) // 1000
    # os.urandom, not secrets: the secrets module pulls in hmac and OpenSSL, a cost every `sendmail` would pay.
    return f"{microseconds:014X}{int.from_bytes(os.urandom(3), 'big'):06X}"


def is_queue_id(name: str) -> bool:
    return bool(QUEUE_ID_PATTERN.match(name))


def queue_id_time(queue_id: str) -> float:
    """The creation time (epoch seconds) a queue id carries."""
    return int(queue_id[:14], 16) / 1_000_000


class State(StrEnum):
    """Where a message is heading; meta/ records it before the file moves (write-ahead)."""

    QUEUED = "queued"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass
class Attempt:
    """One delivery attempt, as kept in the history."""

    at: float
    outcome: str
    cause: str
    detail: str
    relay: str | None = None


@dataclass
class MessageState:
    """What the spool knows of a message beyond its bytes."""

    queue_id: str
    received_at: float
    state: State = State.QUEUED
    attempts: int = 0  # counted attempts: relay faults do not count
    next_attempt_at: float | None = None
    reason: str | None = None
    source: str | None = None  # the file name the submitter used in new/
    history: list[Attempt] = field(default_factory=list)
    first_failure_at: float | None = None  # the message's own first failure: its lifetime runs from here

    def record(self, attempt: Attempt, *, counted: bool) -> None:
        self.history.append(attempt)
        del self.history[:-HISTORY_LIMIT]
        if counted:
            self.attempts += 1
            if self.first_failure_at is None:
                self.first_failure_at = attempt.at

    @property
    def last_error(self) -> str | None:
        return self.history[-1].detail if self.history else None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> MessageState:
        raw = json.loads(data)
        history = [Attempt(**item) for item in raw.pop("history", [])]
        return cls(**{**raw, "state": State(raw.get("state", "queued")), "history": history})
