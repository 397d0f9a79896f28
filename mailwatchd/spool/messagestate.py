"""The per-message state kept in the spool's meta/ directory (queue ids: queueid.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum

HISTORY_LIMIT = 10


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
    requeued_at: float | None = None  # the operator's last `requeue` (a fresh start: attempts and lifetime)

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
