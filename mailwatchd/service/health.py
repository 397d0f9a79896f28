"""Health: what the daemon tells the operator and systemd.

- the sd_notify STATUS= line and the status file (statusfile.py) that `mailwatchd status` reads;
- the watchdog ping, sent from the main loop only while $WATCHDOG_USEC asks for one, no worker is
  stuck past its deadline and the spool takes a durable write or lacks only room, when it runs
  degraded (the one watchdog gate);
- the reachability probes of every relay endpoint, on a timer (faster while one is down).

Idle costs nothing: the status, the STATUS= line and the metrics come from counters the daemon
keeps anyway (the scheduler's, the counters', one stat(2) of failed/), never from listing the
spool, and are written only when one of them changed, or every HEARTBEAT_S so that a reader can
tell a live daemon from a hung one (verdict.STALE_AFTER_S). Process figures (RSS, descriptors,
free space) are sampled at the heartbeat only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable

import psutil

from mailwatchd.relays.probe import probe_endpoint
from mailwatchd.service.counters import Counters
from mailwatchd.service.live import Live
from mailwatchd.service.logs import get_logger
from mailwatchd.service.metrics import Metrics
from mailwatchd.service.notify import Notifier
from mailwatchd.service.scheduler import Scheduler
from mailwatchd.service.statusfile import ProcessStatus, RelayStatus, Status, status_line, write_status
from mailwatchd.settings.environment import SERVICE_SPOOL
from mailwatchd.spool.queueid import queue_id_time
from mailwatchd.spool.store import Spool

log = get_logger()
CERT_WARNING_DAYS = 14
WRITABLE_CHECK_S = 30.0
# The status file is rewritten at least this often: well inside verdict.STALE_AFTER_S (60 s) even
# when a main-loop tick (at most 5 s apart) comes late.
HEARTBEAT_S = 20.0


class HealthReporter:
    """Status line and file, the watchdog gate, probes."""

    def __init__(self, *, spool: Spool, scheduler: Scheduler, live: Live, counters: Counters, notifier: Notifier,
                 stuck: Callable[[], str | None], metrics: Metrics | None = None,
                 write_probe: Callable[[], str | None] | None = None) -> None:
        self.spool = spool
        self.scheduler = scheduler
        self.live = live
        self.counters = counters
        self.notifier = notifier
        self.stuck = stuck
        self.metrics = metrics
        self.started_at = time.time()
        self._status_line = ""
        self._problem: str | None = None
        self._writable_checked = 0.0
        self._writable_problem: str | None = None
        # A test write that reports only a lack of room is no problem: the daemon runs degraded (diskspace.py).
        self._write_probe = write_probe or spool.probe_writable
        self._probe_task: asyncio.Task[None] | None = None
        self._cert_warned: dict[str, float] = {}
        self._process = psutil.Process()
        self._process_figures: ProcessStatus = {}
        self._last_state: object = None  # what the last written status was made of, bar time and process figures
        self._last_written = -HEARTBEAT_S  # monotonic
        self.degraded: str | None = None  # set by the daemon: why new work waits (spool full)
        self.reload_error: str | None = None  # set by the daemon: the last reload's failure, until one succeeds

    def start(self) -> None:
        self._probe_task = asyncio.create_task(self._probe_forever(), name="probe")
        self.tick()

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(BaseException):
                await self._probe_task

    # -- probes -------------------------------------------------------------------------------

    async def _probe_forever(self) -> None:
        while True:
            settings, router = self.live.settings, self.live.router
            targets = [(relay, endpoint) for relay in settings.relays for endpoint in relay.endpoints]
            reports = await asyncio.gather(*(probe_endpoint(relay, endpoint, settings, tokens=self.live.tokens)
                                             for relay, endpoint in targets), return_exceptions=True)
            for (relay, endpoint), report in zip(targets, reports, strict=True):
                if isinstance(report, BaseException):
                    log.error("probe_crashed", relay=relay.name, endpoint=str(endpoint), exc_info=report)
                    continue
                if router is not self.live.router:
                    break  # reloaded meanwhile: these results describe the old relays
                router.report_probe(relay.name, endpoint, report.ok, report.cause.value, report.detail,
                                    report.timings_ms, report.cert_days_left)
                self._warn_certificate(relay.name, str(endpoint), report.cert_days_left)
            any_down = any(ep.up is False for relay in self.live.router.relays for ep in relay.endpoints)
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
            self._writable_problem = self._write_probe()
        return self.stuck() or (f"spool not writable: {self._writable_problem}" if self._writable_problem else None)

    def tick(self) -> None:
        """One main-loop iteration completed: ping if healthy; refresh the status when something changed,
        or the heartbeat is due."""
        problem = self.problem()
        if problem != self._problem:
            if problem:
                log.error("daemon_unhealthy", problem=problem, action="watchdog pings withheld")
            elif self._problem:
                log.info("daemon_healthy")
            self._problem = problem
        if problem is None and self.notifier.watchdog_interval() is not None:
            self.notifier.watchdog_ping()
        now = time.monotonic()
        heartbeat = now - self._last_written >= HEARTBEAT_S
        state = self._state()
        if state == self._last_state and not heartbeat:
            return
        self._last_state, self._last_written = state, now
        if heartbeat or not self._process_figures:
            self._process_figures = self._sample_process()
        self._publish(self.snapshot())

    def refresh(self) -> None:
        """Have the next tick write the status, the STATUS= line and the metrics whatever changed, with
        fresh process figures (an operator's flush: `mailwatchd status` right after it shows now)."""
        self._last_written = time.monotonic() - HEARTBEAT_S

    def _publish(self, status: Status) -> None:
        if self.metrics is not None:
            self.metrics.update(status, self.counters)
        line = status_line(status)
        if line != self._status_line:
            self._status_line = line
            self.notifier.status(line)
        path = self.live.settings.status_path
        try:
            try:
                write_status(path, status)
            except FileNotFoundError:
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                write_status(path, status)
        except OSError as exc:
            log.debug("status_write_failed", detail=str(exc))

    def _state(self) -> tuple[object, ...]:
        """Everything a status is made of but the time and the process figures: equal means nothing to write."""
        counters, scheduler = self.counters, self.scheduler
        totals = counters.totals
        return (self._problem, self.degraded, self.reload_error, self.live.settings, self._relays(),
                scheduler.ready_count, scheduler.deferred_count, counters.in_flight, self.spool.failed_counts(),
                self.scheduler.oldest_id(), counters.last_delivery, totals.delivered, totals.deferred, totals.failed)

    def _sample_process(self) -> ProcessStatus:
        process: ProcessStatus = {}
        with contextlib.suppress(Exception):
            process["rss_bytes"] = self._process.memory_info().rss
            process["open_fds"] = self._process.num_fds()
            process["spool_free_bytes"] = psutil.disk_usage(str(self.spool.root)).free
        return process

    def _relays(self) -> list[RelayStatus]:
        relays: list[RelayStatus] = []
        paused_before = time.monotonic()
        for relay in self.live.router.relays:
            relays.append({
                "name": relay.config.name, "health": relay.health.value,
                "paused": relay.paused_until > paused_before, "pause_cause": relay.pause_cause or None,
                "last_delivery": relay.last_delivery,
                "endpoints": [{"endpoint": str(ep.endpoint), "up": ep.up, "cause": ep.cause or None,
                               "detail": ep.detail or None, "last_probe": ep.last_probe,
                               "timings_ms": dict(ep.probe_timings_ms), "cert_days_left": ep.cert_days_left}
                              for ep in relay.endpoints],
            })
        return relays

    def snapshot(self) -> Status:
        """The status now, from the daemon's own counters (the process figures: the last sample)."""
        spool, settings, counters = self.spool, self.live.settings, self.counters
        totals = counters.totals
        failed, unacknowledged = spool.failed_counts()  # requeue, delete and ack change them from outside
        oldest = self.scheduler.oldest_id()
        return {
            "pid": os.getpid(), "system": spool.root == SERVICE_SPOOL,
            "started_at": self.started_at, "updated_at": time.time(),
            "healthy": self._problem is None, "problem": self._problem,
            "degraded": self.degraded, "reload_error": self.reload_error,
            "mode": "outbox" if settings.uses_outbox else "relay",
            "outbox": str(settings.outbox) if settings.uses_outbox else None,
            "relays": self._relays(),
            "queue": {"ready": self.scheduler.ready_count, "deferred": self.scheduler.deferred_count,
                      "failed": failed, "in_flight": counters.in_flight},
            "failed_unacknowledged": unacknowledged,
            "thresholds": {"queue_age_warning": settings.queue_age_warning,
                           "queue_age_critical": settings.queue_age_critical},
            "oldest_age_s": round(time.time() - queue_id_time(oldest), 1) if oldest is not None else None,
            "last_delivery": counters.last_delivery,
            "totals": {"delivered": totals.delivered, "deferred": totals.deferred, "failed": totals.failed},
            "process": self._process_figures.copy(),
        }
