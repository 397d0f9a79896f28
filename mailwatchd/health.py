"""Health: what the daemon tells the operator and systemd.

- one log line when a drain pass starts and one when it ends;
- one log line when a relay endpoint goes down or comes back (not per probe);
- the sd_notify STATUS= line and the status file `SPOOL/status.json` (atomic replace) that
  `mailwatchd status` reads;
- the watchdog ping, sent from the main loop only while workers are not stuck past their
  deadlines and the spool takes a durable write;
- the reachability probes of every relay endpoint, on a timer (faster while one is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from mailwatchd.logs import get_logger
from mailwatchd.messagestate import queue_id_time
from mailwatchd.routing import Transition
from mailwatchd.spool import Location

if TYPE_CHECKING:
    from mailwatchd.daemon import Daemon

log = get_logger()
STATUS_FILE = "status.json"
CERT_WARNING_DAYS = 14
WRITABLE_CHECK_S = 30.0


class HealthReporter:
    """Drain passes, status line and file, watchdog, probes."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.started_at = time.time()
        self._pass_started: float | None = None
        self._pass_counts = {"delivered": 0, "deferred": 0, "failed": 0}
        self._busy = 0
        self._status_line = ""
        self._problem: str | None = None
        self._writable_checked = 0.0
        self._writable_problem: str | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._cert_warned: dict[str, float] = {}
        self._process = psutil.Process()

    def start(self) -> None:
        if self.daemon.settings.relays:
            self._probe_task = asyncio.create_task(self._probe_forever(), name="probe")
        self.tick()

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(BaseException):
                await self._probe_task

    # -- drain passes -------------------------------------------------------------------------

    def _begin_pass(self) -> None:
        if self._pass_started is None:
            self._pass_started = time.monotonic()
            self._pass_counts = {"delivered": 0, "deferred": 0, "failed": 0}
            log.info("drain_started", ready=self.daemon.scheduler.ready_count,
                     deferred=self.daemon.scheduler.deferred_count)

    def work_queued(self) -> None:
        self._begin_pass()

    def work_started(self) -> None:
        self._busy += 1
        self._begin_pass()

    def count(self, what: str) -> None:
        self._pass_counts[what] = self._pass_counts.get(what, 0) + 1

    def work_finished(self) -> None:
        self._busy -= 1
        if self._busy == 0 and self.daemon.scheduler.ready_count == 0 and self._pass_started is not None:
            duration = time.monotonic() - self._pass_started
            self._pass_started = None
            log.info("drain_finished", duration_s=round(duration, 3), **self._pass_counts,
                     waiting=self.daemon.scheduler.deferred_count)

    # -- relay transitions and probes ---------------------------------------------------------------

    def note_transition(self, transition: Transition | None) -> None:
        if transition is None:
            return
        if transition.up:
            log.info("relay_up", relay=transition.relay, endpoint=str(transition.endpoint))
        else:
            log.warning("relay_down", relay=transition.relay, endpoint=str(transition.endpoint),
                        cause=transition.cause, detail=transition.detail)
        self.daemon.request_attention()

    async def _probe_forever(self) -> None:
        from mailwatchd.probe import probe_endpoint

        while True:
            settings = self.daemon.settings
            router = self.daemon.router
            targets = [(relay, endpoint) for relay in settings.relays for endpoint in relay.endpoints]
            reports = await asyncio.gather(*(probe_endpoint(relay, endpoint, settings)
                                             for relay, endpoint in targets), return_exceptions=True)
            for (relay, endpoint), report in zip(targets, reports, strict=True):
                if isinstance(report, BaseException):
                    log.error("probe_crashed", relay=relay.name, endpoint=str(endpoint), exc_info=report)
                    continue
                if router is not self.daemon.router:
                    break  # reloaded meanwhile: these results describe the old relays
                self.note_transition(router.report_probe(
                    relay.name, endpoint, report.ok, report.cause.value, report.detail,
                    report.timings_ms, report.cert_days_left))
                self._warn_certificate(relay.name, str(endpoint), report.cert_days_left)
            any_down = any(ep.up is False for relay in self.daemon.router.relays for ep in relay.endpoints)
            await asyncio.sleep(settings.probe_interval_down if any_down else settings.probe_interval)

    def _warn_certificate(self, relay: str, endpoint: str, days_left: int | None) -> None:
        if days_left is None or days_left > CERT_WARNING_DAYS:
            return
        now = time.monotonic()
        if now - self._cert_warned.get(endpoint, -1e18) >= 86400.0:
            self._cert_warned[endpoint] = now
            log.warning("certificate_expiring", relay=relay, endpoint=endpoint, days_left=days_left)

    # -- periodic: watchdog, status ------------------------------------------------------------

    def problem(self) -> str | None:
        """Why the daemon is not healthy now (None when it is)."""
        now = time.monotonic()
        if now - self._writable_checked >= WRITABLE_CHECK_S:
            self._writable_checked = now
            self._writable_problem = self.daemon.spool.probe_writable()
        return self.daemon.stuck_reason() or (
            f"spool not writable: {self._writable_problem}" if self._writable_problem else None)

    def tick(self) -> None:
        """One main-loop iteration completed: ping if healthy, refresh status."""
        problem = self.problem()
        if problem != self._problem:
            if problem:
                log.error("daemon_unhealthy", problem=problem, action="watchdog pings withheld")
            elif self._problem:
                log.info("daemon_healthy")
            self._problem = problem
        if problem is None:
            self.daemon.notifier.watchdog_ping()
        status = self.snapshot()
        line = status_line(status)
        if line != self._status_line:
            self._status_line = line
            self.daemon.notifier.status(line)
        self._write_status(status)

    def snapshot(self) -> dict[str, Any]:
        daemon = self.daemon
        spool = daemon.spool
        oldest = [names[0] for names in (spool.names(Location.QUEUE), spool.names(Location.DEFERRED)) if names]
        relays = []
        for relay in daemon.router.relays:
            relays.append({
                "name": relay.config.name, "health": relay.health.value,
                "paused": relay.paused_until > time.monotonic(), "pause_cause": relay.pause_cause or None,
                "last_delivery": relay.last_delivery,
                "endpoints": [{"endpoint": str(ep.endpoint), "up": ep.up, "cause": ep.cause or None,
                               "detail": ep.detail or None, "last_probe": ep.last_probe,
                               "timings_ms": ep.probe_timings_ms, "cert_days_left": ep.cert_days_left}
                              for ep in relay.endpoints],
            })
        process: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            process["rss_bytes"] = self._process.memory_info().rss
            process["open_fds"] = self._process.num_fds()
            process["spool_free_bytes"] = psutil.disk_usage(str(spool.root)).free
        return {
            "pid": os.getpid(), "started_at": self.started_at, "updated_at": time.time(),
            "healthy": self._problem is None, "problem": self._problem,
            "mode": "outbox" if daemon.settings.uses_outbox else "relay",
            "outbox": str(daemon.settings.outbox) if daemon.settings.uses_outbox else None,
            "relays": relays,
            "queue": {"ready": daemon.scheduler.ready_count, "deferred": daemon.scheduler.deferred_count,
                      "failed": daemon.stats.failed_total, "in_flight": self._busy},
            "oldest_age_s": round(time.time() - min(queue_id_time(q) for q in oldest), 1) if oldest else None,
            "last_delivery": daemon.stats.last_delivery,
            "totals": {"delivered": daemon.stats.delivered, "deferred": daemon.stats.deferred,
                       "failed": daemon.stats.failed},
            "process": process,
        }

    def _write_status(self, status: dict[str, Any]) -> None:
        path = self.daemon.spool.root / STATUS_FILE
        temporary = path.with_name(f".{STATUS_FILE}.tmp")
        try:
            temporary.write_text(json.dumps(status, default=str))
            os.replace(temporary, path)
        except OSError as exc:
            log.debug("status_write_failed", detail=str(exc))


def status_line(status: dict[str, Any]) -> str:
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
