"""The daemon's life: start-up (layout, lock, recovery) → main loop → shutdown.

Signal handlers only record the signal and wake the main loop, which acts: SIGTERM/SIGINT
ask for a warm stop (attempts in flight finish, within the shutdown grace), a second one
stops at once; SIGHUP reloads settings; SIGUSR1 retries everything now. Messages are never
at risk on either stop: a file leaves the spool only after the relay's reply to DATA.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from mailwatchd import exitcodes, notify
from mailwatchd.config import Settings, load_settings
from mailwatchd.delivery import SmtpSession
from mailwatchd.errors import ConfigError, SpoolLocked
from mailwatchd.health import HealthReporter
from mailwatchd.intake import Intake
from mailwatchd.logs import get_logger
from mailwatchd.outbox import OutboxSession
from mailwatchd.recovery import recover
from mailwatchd.relays import Endpoint, RelayConfig
from mailwatchd.routing import Router
from mailwatchd.scheduler import Scheduler, WorkItem
from mailwatchd.spool import Location, Spool
from mailwatchd.tlsconfig import client_context
from mailwatchd.worker import Session, Worker

log = get_logger()
# A delivery call is bounded by session setup plus one transaction, each under
# transaction_timeout; past this margin beyond that it is stuck, and the watchdog stops.
STUCK_MARGIN_S = 10.0
MAIN_LOOP_PERIOD_S = 5.0
RECOVERY_EXTEND_ABOVE = 10_000
RECOVERY_S_PER_MESSAGE = 0.001  # 40x margin: recover() took 0.024 ms a message (20k queued + 20k deferred, ext4)


@dataclass
class Stats:
    """Counters for status lines and drain-pass summaries."""

    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    failed_total: int = 0
    last_delivery: float | None = None
    pass_started: float | None = None
    pass_counts: dict[str, int] = field(default_factory=lambda: {"delivered": 0, "deferred": 0, "failed": 0})


class Daemon:
    """mailwatchd run: one spool, one process."""

    def __init__(self, settings: Settings, *, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        self.spool = Spool(settings.spool, max_message_size=settings.max_message_size)
        self.scheduler = Scheduler()
        self.router = Router(settings.relays)
        self.stats = Stats()
        self.notifier = notify.Notifier()
        self.generation = 0  # bumped by a reload; workers drop sessions of older generations
        self.workers: list[Worker] = []
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._signals: list[int] = []
        self._attention = asyncio.Event()
        self._stop_requested = 0
        self.stopping = False
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        self._file_values_at_start = _file_values(settings.config_path)
        self.intake = Intake(self)
        self.health = HealthReporter(self)

    # -- signals: record and wake, nothing else ---------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals.append(signum)
        self._attention.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.add_signal_handler(signum, self._on_signal, signum)

    # -- start-up ---------------------------------------------------------------------------------

    def startup(self) -> None:
        """Create the layout, take the lock, recover what a previous run left."""
        self.spool.create_layout()
        self.spool.acquire_lock()
        problem = self.spool.probe_writable()
        if problem is not None:
            raise PermissionError(problem)
        backlog = sum(len(self.spool.names(location)) for location in Location)
        if backlog > RECOVERY_EXTEND_ABOVE:
            # Recovery reads one state file per message: ask systemd for the time it needs.
            self.notifier.extend_timeout(30.0 + backlog * RECOVERY_S_PER_MESSAGE)
            log.info("spool_recovery_started", messages=backlog)
        recovery = recover(self.spool)
        for queue_id in recovery.ready:
            self.scheduler.add_ready(WorkItem(queue_id, Location.QUEUE))
        for due, queue_id in recovery.deferred:
            self.scheduler.add_deferred(due, queue_id)
        self.stats.failed_total = len(self.spool.names(Location.FAILED))
        if recovery.ready or recovery.deferred or recovery.completed_moves or recovery.orphans_removed:
            log.info("spool_recovered", ready=len(recovery.ready), deferred=len(recovery.deferred),
                     completed_moves=recovery.completed_moves, orphans_removed=recovery.orphans_removed)
        if self.settings.uses_outbox:
            log.warning("no_relay_configured", outbox=str(self.settings.outbox),
                        hint="set EMAIL_HOST (or MAILWATCHD_RELAYS) to deliver through a relay; "
                             "until then messages go to the local outbox Maildir")

    async def run(self) -> int:
        """Run until stopped; returns the process exit status."""
        loop = asyncio.get_running_loop()
        try:
            self.startup()
        except SpoolLocked as exc:
            log.error("spool_locked", detail=str(exc))
            return exitcodes.TEMPFAIL
        except OSError as exc:
            log.error("spool_unusable", spool=str(self.settings.spool), detail=str(exc),
                      hint="the spool must be writable by the daemon's user")
            return exitcodes.CANTCREAT
        except Exception:
            log.exception("startup_failed")
            return exitcodes.SOFTWARE
        self._install_signals(loop)
        try:
            self.intake.start(loop)
            self._start_workers()
            self.health.start()
            relays = ",".join(relay.name for relay in self.settings.relays) or "outbox"
            log.info("daemon_ready", spool=str(self.settings.spool), relays=relays,
                     concurrency=self.settings.concurrency, queued=len(self.scheduler))
            self.notifier.ready()
            await self._main_loop()
        finally:
            await self._shutdown()
        return exitcodes.OK

    def _start_workers(self) -> None:
        for index in range(self.settings.concurrency):
            worker = Worker(self, index)
            self.workers.append(worker)
            self._worker_tasks.append(asyncio.create_task(worker.run(), name=f"worker-{index}"))

    # -- main loop: notices signals, checks health, pings the watchdog -------------------------------

    async def _main_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        period = min(MAIN_LOOP_PERIOD_S, interval) if interval else MAIN_LOOP_PERIOD_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._attention.wait(), period)
            self._attention.clear()
            while self._signals:
                signum = self._signals.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._stop_requested += 1
                elif signum == signal.SIGHUP:
                    self.reload()
                elif signum == signal.SIGUSR1:
                    flushed = self.scheduler.flush()
                    self.router.reset()
                    log.info("flush_requested", deferred=flushed)
            if self._stop_requested:
                return
            self._replace_crashed_workers()
            self.health.tick()

    def _replace_crashed_workers(self) -> None:
        """A worker that died of a bug is logged and replaced: one failure must not stall the queue."""
        for index, task in enumerate(self._worker_tasks):
            if task.done() and not self.stopping:
                error = None if task.cancelled() else task.exception()
                log.error("worker_crashed", worker=index, exc_info=error)
                self.workers[index] = Worker(self, index)
                self._worker_tasks[index] = asyncio.create_task(self.workers[index].run(), name=f"worker-{index}")

    def stuck_reason(self) -> str | None:
        """Why the work is not healthy now, for the watchdog; None when it is."""
        limit = 2 * self.settings.transaction_timeout + self.settings.connect_timeout + STUCK_MARGIN_S
        # An idle worker goes round at least every idle_timeout (waiting for work) or 5 s (for a relay).
        idle_limit = max(self.settings.idle_timeout, 5.0) + STUCK_MARGIN_S
        now = time.monotonic()
        for worker in self.workers:
            if worker.busy_since is not None and now - worker.busy_since > limit:
                return f"worker {worker.index} has been in one delivery for {now - worker.busy_since:.0f}s"
            if worker.busy_since is None and now - worker.last_iteration > idle_limit:
                return f"worker {worker.index} has not gone round its loop for {now - worker.last_iteration:.0f}s"
        if any(task.done() for task in self._worker_tasks):
            return "a worker task has ended"
        return None

    def make_session(self, relay: RelayConfig | None, endpoint: Endpoint | None) -> Session:
        """A transport session: SMTP to one relay endpoint, or the local outbox."""
        if relay is None or endpoint is None:
            return OutboxSession(self.settings)
        context = self._tls_contexts.get(relay.name)
        if context is None:
            context = self._tls_contexts[relay.name] = client_context(relay)
        return SmtpSession(relay, endpoint, self.settings, context)

    def request_attention(self) -> None:
        self._attention.set()

    # -- reload ------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read settings; a bad new configuration is reported and the old one kept."""
        self.notifier.reloading()
        try:
            new = load_settings(self.settings.config_path, self.environ_for_reload())
        except ConfigError as exc:
            log.error("config_reload_failed", key=exc.key, problem=exc.problem, fix=exc.fix)
            self.notifier.ready()
            return
        if new.spool != self.settings.spool:
            log.warning("config_reload_spool_ignored", spool=str(new.spool), kept=str(self.settings.spool),
                        hint="restart the daemon to change MAILWATCHD_SPOOL")
            new = _replace(new, spool=self.settings.spool, outbox=self.settings.outbox)
        self.settings = new
        self.spool.max_message_size = new.max_message_size
        self.router = Router(new.relays)
        self._tls_contexts.clear()
        self.generation += 1
        self.scheduler.wake()
        relays = ",".join(relay.name for relay in new.relays) or "outbox"
        log.info("config_reloaded", relays=relays, concurrency=new.concurrency)
        if len(self.workers) < new.concurrency:
            for index in range(len(self.workers), new.concurrency):
                worker = Worker(self, index)
                self.workers.append(worker)
                self._worker_tasks.append(asyncio.create_task(worker.run(), name=f"worker-{index}"))
        self.notifier.ready()

    def environ_for_reload(self) -> dict[str, str]:
        """The start-up environment minus what it got from the env file itself.

        Under systemd, EnvironmentFile= puts the file's keys into our environment at start;
        they must not mask the file's new values on a reload. A key whose value equals the
        file's value at start is taken to have come from the file.
        """
        return {key: value for key, value in self.environ.items()
                if self._file_values_at_start.get(key) != value}

    # -- shutdown ----------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.stopping = True
        self.notifier.stopping()
        in_flight = sum(1 for worker in self.workers if worker.busy_since is not None)
        log.info("daemon_stopping", in_flight=in_flight, grace_s=self.settings.shutdown_grace)
        self.intake.stop()
        self.scheduler.close()
        pending = [task for task in self._worker_tasks if not task.done()]
        if pending and self._stop_requested < 2:
            waiter = asyncio.ensure_future(asyncio.wait(pending, timeout=self.settings.shutdown_grace))
            while not waiter.done():
                # A second SIGTERM/SIGINT during the grace period stops at once.
                await asyncio.wait([waiter, asyncio.ensure_future(self._attention.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)
                self._attention.clear()
                if any(s in (signal.SIGTERM, signal.SIGINT) for s in self._signals):
                    self._signals.clear()
                    log.warning("daemon_stopping_now", reason="second signal")
                    break
            waiter.cancel()
        for task in self._worker_tasks:
            task.cancel()
        await asyncio.gather(*self._worker_tasks, return_exceptions=True)
        for worker in self.workers:
            await worker.close_sessions()
        await self.health.stop()
        self.spool.release_lock()
        log.info("daemon_stopped", delivered=self.stats.delivered, deferred=self.stats.deferred,
                 failed=self.stats.failed)


def _file_values(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        return {key: value or "" for key, value in dotenv_values(path, interpolate=False).items()}
    except (OSError, UnicodeDecodeError):
        return {}


def _replace(settings: Settings, **changes: Any) -> Settings:
    import dataclasses

    return dataclasses.replace(settings, **changes)


def run_daemon(settings: Settings) -> int:
    """Entry point for `mailwatchd run` once settings are valid."""
    return asyncio.run(Daemon(settings).run())


def load_or_exit(config_path: Path | None) -> Settings:
    return load_settings(config_path)
