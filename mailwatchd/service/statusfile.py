"""The status file `SPOOL/status.json`: its schema, written by the daemon (atomic replace),
read by `mailwatchd status`, and the one-line summary both show (systemd's STATUS=)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TypedDict

STATUS_FILE = "status.json"


class EndpointStatus(TypedDict):
    endpoint: str
    up: bool | None  # None: neither tried nor probed yet
    cause: str | None
    detail: str | None
    last_probe: float | None
    timings_ms: dict[str, float]
    cert_days_left: int | None


class RelayStatus(TypedDict):
    name: str
    health: str  # routing.Health
    paused: bool
    pause_cause: str | None
    last_delivery: float | None
    endpoints: list[EndpointStatus]


class QueueStatus(TypedDict):
    ready: int
    deferred: int
    failed: int
    in_flight: int


class Totals(TypedDict):
    delivered: int
    deferred: int
    failed: int


class ProcessStatus(TypedDict, total=False):
    rss_bytes: int
    open_fds: int
    spool_free_bytes: int


class Status(TypedDict):
    pid: int
    started_at: float
    updated_at: float
    healthy: bool
    problem: str | None
    mode: str  # "relay" or "outbox"
    outbox: str | None
    relays: list[RelayStatus]
    queue: QueueStatus
    oldest_age_s: float | None
    last_delivery: float | None
    totals: Totals
    process: ProcessStatus


def status_path(spool_root: Path) -> Path:
    return spool_root / STATUS_FILE


def write_status(spool_root: Path, status: Status) -> None:
    """Replace the status file atomically (a reader never sees half of it); OSError if it cannot."""
    path = status_path(spool_root)
    temporary = path.with_name(f".{STATUS_FILE}.tmp")
    temporary.write_text(json.dumps(status))
    os.replace(temporary, path)


def read_status(spool_root: Path) -> Status | None:
    """The last status the daemon wrote, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(status_path(spool_root).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None  # type: ignore[return-value]


def status_line(status: Status) -> str:
    """The one-line STATUS= text shown by `systemctl status`."""
    queue = status["queue"]
    parts = [f"queue: {queue['ready'] + queue['in_flight']} ready, {queue['deferred']} deferred, "
             f"{queue['failed']} failed"]
    if status["mode"] == "outbox":
        parts.insert(0, f"NO RELAY CONFIGURED: delivering to local outbox {status['outbox']}")
    else:
        relays = []
        for relay in status["relays"]:
            causes = sorted({ep["cause"] for ep in relay["endpoints"] if ep["up"] is False and ep["cause"]})
            relays.append(f"{relay['name']} {relay['health']}" + (f" ({', '.join(causes)})" if causes else ""))
        parts.append("relays: " + ", ".join(relays))
    if status["last_delivery"]:
        parts.append(f"last delivery {time.time() - status['last_delivery']:.0f}s ago")
    if status["problem"]:
        parts.insert(0, f"UNHEALTHY: {status['problem']}")
    return "; ".join(parts)
