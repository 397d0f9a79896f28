"""The status file (`SPOOL/status.json`, the service's `/run/mailwatchd/status/status.json`): its
schema, written by the daemon (atomic replace, mode 0644: it names no address and no secret),
read by `mailwatchd status`, and the one-line summary both show (systemd's STATUS=)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TypedDict


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


class Thresholds(TypedDict):
    queue_age_warning: float
    queue_age_critical: float


class Status(TypedDict):
    pid: int
    system: bool  # the service's spool: no relay configured there means mail is not leaving the host
    started_at: float
    updated_at: float
    healthy: bool
    problem: str | None
    degraded: str | None  # why new work waits (the spool's filesystem is full), None when it does not
    reload_error: str | None  # the last reload's failure, until a reload succeeds
    mode: str  # "relay" or "outbox"
    outbox: str | None
    relays: list[RelayStatus]
    queue: QueueStatus
    failed_unacknowledged: int  # failed messages neither requeued, deleted nor acknowledged (`mailwatchd ack`)
    thresholds: Thresholds
    oldest_age_s: float | None
    last_delivery: float | None
    totals: Totals
    process: ProcessStatus


def write_status(path: Path, status: Status) -> None:
    """Replace the status file atomically (a reader never sees half of it); OSError if it cannot."""
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(descriptor, "w") as stream:
        os.fchmod(descriptor, 0o644)  # readable by a monitoring user whatever the daemon's umask
        stream.write(json.dumps(status))
    os.replace(temporary, path)


def read_status(path: Path) -> Status | None:
    """The last status the daemon wrote, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(path.read_text())
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
    if status.get("reload_error"):
        parts.insert(0, f"RELOAD FAILED, running settings kept: {status['reload_error']}")
    if status.get("degraded"):
        parts.insert(0, f"DEGRADED: {status['degraded']}")
    if status["problem"]:
        parts.insert(0, f"UNHEALTHY: {status['problem']}")
    return "; ".join(parts)
