"""What `mailwatchd queue` shows: every message in the spool with its state and reasons."""

from __future__ import annotations

import time
from typing import Any

from mailwatchd.errors import MailwatchdError
from mailwatchd.message import envelope
from mailwatchd.spool.queueid import is_queue_id, queue_id_time
from mailwatchd.spool.store import Location, Spool

HEADER_PEEK = 64 * 1024  # enough to read the envelope of any sane message


def _peek(spool: Spool, queue_id: str, location: Location) -> tuple[str | None, list[str], int | None]:
    try:
        raw = spool.read(queue_id, location)
    except (OSError, MailwatchdError):
        return None, [], None
    try:
        message = envelope.parse(queue_id, raw[:HEADER_PEEK] if len(raw) > HEADER_PEEK else raw)
        return message.sender, list(message.recipients), len(raw)
    except MailwatchdError:
        return None, [], len(raw)


def list_entries(spool: Spool) -> list[dict[str, Any]]:
    """Messages in new/, queue/, deferred/ and failed/, oldest first within each."""
    entries: list[dict[str, Any]] = []
    for name in spool.drops():
        entries.append({"queue_id": None, "source": name, "state": "new", "sender": None, "recipients": [],
                        "size": None, "received_at": None, "attempts": 0, "next_attempt_at": None,
                        "reason": None, "last_error": None})
    for location, label in ((Location.QUEUE, "queued"), (Location.DEFERRED, "deferred"),
                            (Location.FAILED, "failed")):
        for queue_id in spool.names(location):
            state = spool.load_state(queue_id)
            sender, recipients, size = _peek(spool, queue_id, location)
            received = state.received_at if state else (queue_id_time(queue_id) if is_queue_id(queue_id) else None)
            entries.append({
                "queue_id": queue_id, "source": state.source if state else None, "state": label,
                "sender": sender, "recipients": recipients, "size": size, "received_at": received,
                "attempts": state.attempts if state else 0,
                "next_attempt_at": state.next_attempt_at if state and location is Location.DEFERRED else None,
                "reason": state.reason if state else None,
                "last_error": state.last_error if state else None,
            })
    return entries


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    seconds = now - when
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def render_table(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "the spool is empty"
    now = time.time()
    lines = [f"{'QUEUE ID':<20}  {'STATE':<8}  {'AGE':>5}  {'SIZE':>8}  {'TRIES':>5}  SENDER -> RECIPIENTS"]
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["state"]] = counts.get(entry["state"], 0) + 1
        rcpts = ", ".join(entry["recipients"][:3]) + (" …" if len(entry["recipients"]) > 3 else "")
        size = "-" if entry["size"] is None else str(entry["size"])
        lines.append(f"{entry['queue_id'] or entry['source']:<20}  {entry['state']:<8}  "
                     f"{_ago(entry['received_at'], now):>5}  {size:>8}  {entry['attempts']:>5}  "
                     f"{entry['sender'] or '?'} -> {rcpts or '?'}")
        if entry["next_attempt_at"]:
            lines.append(f"{'':<22}next attempt in {_ago(now, entry['next_attempt_at']).lstrip('-')}: "
                         f"last error: {entry['last_error'] or '-'}")
        if entry["reason"]:
            lines.append(f"{'':<22}reason: {entry['reason']}")
    lines.append("; ".join(f"{count} {state}" for state, count in counts.items()))
    return "\n".join(lines)
