"""What `mailwatchd queue` shows: every message in the spool, its state, and why it waits.

Why a message waits comes from its state file (last attempt, next attempt, a requeue) and from
the running daemon's status file (relay health, a full spool): a message the daemon would send
now but for a down or paused relay names the relay and the cause.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailwatchd.errors import MailwatchdError
from mailwatchd.message import envelope
from mailwatchd.service.statusfile import read_status
from mailwatchd.spool.messagestate import MessageState
from mailwatchd.spool.queueid import is_queue_id, queue_id_time
from mailwatchd.spool.store import Location, Spool

if TYPE_CHECKING:
    from mailwatchd.service.statusfile import RelayStatus, Status

HEADER_PEEK = 64 * 1024  # enough to read the envelope of any sane message


@dataclass(frozen=True)
class DaemonView:
    """What the listing knows of the daemon: its pid if one holds the spool, and its last status."""

    pid: int | None
    status: Status | None = None  # None: no daemon, or no status file written by this one

    @property
    def running(self) -> bool:
        return self.pid is not None


def daemon_view(spool: Spool, status_path: Path) -> DaemonView:
    """The daemon running on `spool` (if any) and its status file, when that file is its own."""
    pid = spool.running_pid()
    status = read_status(status_path) if pid is not None else None
    return DaemonView(pid, status if status is not None and status.get("pid") == pid else None)


def _peek(raw: bytes, queue_id: str) -> tuple[str | None, list[str]]:
    try:
        message = envelope.parse(queue_id, raw[:HEADER_PEEK] if len(raw) > HEADER_PEEK else raw)
    except MailwatchdError:
        return None, []
    return message.sender, list(message.recipients)


def _read(spool: Spool, name: str, location: Location | None) -> bytes | None:
    try:
        return spool.read_drop(name) if location is None else spool.read(name, location)
    except (OSError, MailwatchdError):
        return None


def relays_blocking(status: Status | None) -> str | None:
    """Why no relay can take mail now, from the daemon's status; None when one may (or mail goes
    to the local outbox, or there is no status to tell)."""
    if status is None or status.get("mode") != "relay" or not status.get("relays"):
        return None
    reasons = []
    for relay in status["relays"]:
        if relay.get("paused"):
            reasons.append(f"relay {relay['name']} paused ({relay.get('pause_cause') or 'no cause given'})")
        elif relay.get("health") == "down":
            reasons.append(f"relay {relay['name']} down ({_down_causes(relay)})")
        else:
            return None  # up, degraded (one endpoint works) or not tried yet: it may take mail
    return "; ".join(reasons)


def _down_causes(relay: RelayStatus) -> str:
    down = [endpoint for endpoint in relay["endpoints"] if endpoint.get("up") is False]
    if len(down) == 1:
        return f"{down[0]['cause']}: {down[0]['detail']}"
    return "; ".join(f"{endpoint['endpoint']} {endpoint['cause']}: {endpoint['detail']}" for endpoint in down)


def _when(epoch: float, now: float) -> str:
    clock = datetime.fromtimestamp(epoch).strftime("%H:%M:%S")
    return f"in {_ago(now, epoch)} ({clock})" if epoch > now else f"due since {_ago(epoch, now)} ({clock})"


def why_waiting(label: str, state: MessageState | None, daemon: DaemonView, now: float) -> str | None:
    """One line on why a message in new/, queue/ or deferred/ is not sent yet; None for a failed one."""
    blocking = relays_blocking(daemon.status)
    requeued = f"requeued {_ago(state.requeued_at, now)} ago; " if state and state.requeued_at else ""
    match label:
        case "new" if not daemon.running:
            return f"{requeued}waiting to be claimed (the daemon is not running)"
        case "new":
            degraded = daemon.status.get("degraded") if daemon.status else None
            return f"{requeued}waiting to be claimed" + (f": {degraded}" if degraded else " by the daemon")
        case "queued" if not daemon.running:
            return f"{requeued}waiting: the daemon is not running"
        case "queued":
            return f"waiting: {blocking}" if blocking else f"{requeued}ready: being sent or next in line"
        case "deferred":
            due = state.next_attempt_at if state else None
            next_attempt = f"next attempt {_when(due, now)}" if due is not None else "next attempt not recorded"
            if not daemon.running:
                return f"waiting: the daemon is not running ({next_attempt})"
            return f"waiting: {blocking} ({next_attempt})" if blocking else f"waiting: {next_attempt}"
    return None


def list_entries(spool: Spool, daemon: DaemonView | None = None) -> list[dict[str, Any]]:
    """Messages in new/, queue/, deferred/ and failed/, oldest first within each, with why each waits.

    `daemon`: what runs on the spool (daemon_view); by default only whether one holds the lock.
    """
    daemon = daemon if daemon is not None else DaemonView(spool.running_pid())
    now = time.time()
    acknowledged = spool.acknowledged()
    entries: list[dict[str, Any]] = []
    places: list[tuple[Location | None, str, list[str]]] = [(None, "new", spool.drops())]
    places += [(location, label, spool.names(location)) for location, label in
               ((Location.QUEUE, "queued"), (Location.DEFERRED, "deferred"), (Location.FAILED, "failed"))]
    for location, label, names in places:
        for name in names:
            queue_id = name if is_queue_id(name) else None
            state = spool.load_state(queue_id) if queue_id else None
            raw = _read(spool, name, location)
            sender, recipients = _peek(raw, name) if raw is not None else (None, [])
            last = state.history[-1] if state and state.history else None
            entries.append({
                "queue_id": name if location is not None else queue_id,  # None: a drop under its writer's name
                "source": state.source if state and state.source else (name if location is None else None),
                "state": label, "sender": sender, "recipients": recipients,
                "size": len(raw) if raw is not None else None,
                "received_at": _received(spool, name, state),
                "attempts": state.attempts if state else 0,
                "next_attempt_at": state.next_attempt_at if state and location is Location.DEFERRED else None,
                "reason": state.reason if state else None,
                "last_error": state.last_error if state else None,
                "last_attempt": asdict(last) if last else None,
                "requeued_at": state.requeued_at if state else None,
                "acknowledged": location is Location.FAILED and name in acknowledged,
                "waiting": why_waiting(label, state, daemon, now),
            })
    return entries


def _received(spool: Spool, name: str, state: MessageState | None) -> float | None:
    if state is not None:
        return state.received_at
    if is_queue_id(name):
        return queue_id_time(name)
    try:  # a drop under a name of its writer's: when it was written
        return os.lstat(spool.new / name).st_mtime
    except OSError:
        return None


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
    pad = " " * 22
    lines = [f"{'QUEUE ID':<20}  {'STATE':<8}  {'AGE':>5}  {'SIZE':>8}  {'TRIES':>5}  SENDER -> RECIPIENTS"]
    counts: dict[str, int] = {}
    acknowledged = 0
    for entry in entries:
        counts[entry["state"]] = counts.get(entry["state"], 0) + 1
        acknowledged += bool(entry.get("acknowledged"))
        rcpts = ", ".join(entry["recipients"][:3]) + (" …" if len(entry["recipients"]) > 3 else "")
        size = "-" if entry["size"] is None else str(entry["size"])
        lines.append(f"{entry['queue_id'] or entry['source']:<20}  {entry['state']:<8}  "
                     f"{_ago(entry['received_at'], now):>5}  {size:>8}  {entry['attempts']:>5}  "
                     f"{entry['sender'] or '?'} -> {rcpts or '?'}")
        if entry.get("waiting"):
            lines.append(f"{pad}{entry['waiting']}")
        last = entry.get("last_attempt")
        if last and entry["state"] != "failed":
            via = f" via {last['relay']}" if last.get("relay") else ""
            lines.append(f"{pad}last attempt {_ago(last['at'], now)} ago{via}: {last['cause']}: {last['detail']}")
        if entry["reason"]:
            seen = " (acknowledged)" if entry.get("acknowledged") else ""
            lines.append(f"{pad}reason{seen}: {entry['reason']}")
    summary = "; ".join(f"{count} {state}" for state, count in counts.items())
    if acknowledged:
        summary += f" ({acknowledged} acknowledged)"
    lines.append(summary)
    return "\n".join(lines)
