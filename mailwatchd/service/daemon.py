"""The daemon's life: start-up (layout, lock, recovery) → main loop → shutdown.

The daemon builds the parts and hands each what it uses: the spool, the scheduler, the live
configuration (settings and router, swapped by a reload), the counters and the stop event.
Signal handlers only record the signal and wake the main loop, which acts: SIGTERM/SIGINT ask
for a warm stop (attempts in flight finish, within the shutdown grace), a second one stops at
once; SIGHUP reloads settings; SIGUSR1 retries everything now. Messages are never at risk on
either stop: a file leaves the spool only after the relay's reply to DATA.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from dotenv import dotenv_values

from mailwatchd import exitcodes
from mailwatchd.errors import ConfigError, SpoolLocked
from mailwatchd.service import notify
from mailwatchd.service.counters import Counters
from mailwatchd.service.diskspace import SpoolSpace, is_full_error
from mailwatchd.service.handoff import ListenerHandoff
from mailwatchd.service.health import HealthReporter
from mailwatchd.service.live import Live, SessionFactory
from mailwatchd.service.logs import get_logger
from mailwatchd.service.metrics import Metrics
from mailwatchd.service.notices import STATE_FILE as NOTICE_STATE_FILE
from mailwatchd.service.notices import FailureNotices, spool_submitter
from mailwatchd.service.scheduler import Scheduler, WorkItem
from mailwatchd.service.worker import Worker
from mailwatchd.settings.config import Settings, load_settings
from mailwatchd.spool.intake import Intake
from mailwatchd.spool.pending import PendingStores
from mailwatchd.spool.recovery import DeferredLoad, OrphanSweep, recover
from mailwatchd.spool.store import Location, Spool

if TYPE_CHECKING:
    from mailwatchd.submission.process import ListenerProcess

log = get_logger()
# A worker past the bound of its delivery call, or an idle worker that has not gone round its
# loop, by more than this margin is stuck: the watchdog pings stop and systemd restarts us.
STUCK_MARGIN_S = 10.0
MAIN_LOOP_PERIOD_S = 5.0
RECOVERY_EXTEND_ABOVE = 10_000  # = recovery.PROGRESS_EVERY: from the first progress report on
RECOVERY_EXTEND_S = 30.0  # asked for at each report (10,000 entries): state reads took 0.1 ms each (ext4)
# What systemd sets when it passes sockets (listener.LISTEN_ENVIRONMENT): without them and without
# MAILWATCHD_LISTEN no listener process is started (and the daemon never imports aiosmtpd: its child does).
SOCKET_ACTIVATION_ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
LISTEN_COMMAND_TIMEOUT_S = 300.0  # RFC 5321 §4.5.3.2.7: a server should wait 5 minutes for the next command
LISTEN_STOP_GRACE_S = 5.0  # at most this long a stop waits for a client in the middle of DATA
REAPER_FLUSH_S = 30.0  # at shutdown, for the unlinks of delivered messages still waiting (reaper.py)


class Daemon:
    """mailwatchd run: one spool, one process."""

    def __init__(self, settings: Settings, *, environ: Mapping[str, str] | None = None,
                 session_factory: SessionFactory | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.spool = Spool(settings.spool, max_message_size=settings.max_message_size)
        self.scheduler = Scheduler()
        self.pending = PendingStores()  # messages the listener's process is still making durable
        # An endpoint going down or up changes what status says: the main loop refreshes it at once.
        self.live = Live(settings, session_factory, on_transition=lambda _: self._attention.set())
        self.counters = Counters(lambda: (self.scheduler.ready_count, self.scheduler.deferred_count))
        # Failure-notice digests to MAILWATCHD_NOTICE_ADDRESS (idle while it is unset): notices.py.
        self.notices = FailureNotices(live=self.live, submit=spool_submitter(self.spool, self.scheduler, self.counters),
                                      state_path=settings.spool / NOTICE_STATE_FILE)
        self.counters.observers.append(self.notices)
        self.notifier = notify.Notifier()
        self.stop = asyncio.Event()
        self.workers: list[Worker] = []
        self._tasks: dict[Worker, asyncio.Task[None]] = {}
        self._signals: list[int] = []
        self._attention = asyncio.Event()
        self._stop_requested = 0
        self._file_values_at_start = _file_values(settings.config_path)
        self._sweep: OrphanSweep | None = None  # recovery's orphan sweep, run after READY=1
        self._deferred_load: DeferredLoad | None = None  # recovery's deferred messages' due times, read after READY=1
        self._after_ready_task: asyncio.Task[None] | None = None  # runs both, in that order
        self.listener: ListenerProcess | None = None
        self._exit_status = exitcodes.OK
        # Room on the spool's filesystem: while it is short, new work waits in new/ and deliveries go on.
        self.space = SpoolSpace(self.spool, min_free=lambda: self.live.settings.min_free_bytes,
                                on_change=self._space_changed)
        self.intake = Intake(spool=self.spool, scheduler=self.scheduler, counters=self.counters, live=self.live,
                             stop=self.stop, space=self.space)
        self.metrics: Metrics | None = None
        if settings.metrics_file is not None or settings.metrics_listen is not None:
            self.metrics = Metrics(textfile=settings.metrics_file, listen=settings.metrics_listen)
            self.counters.observers.append(self.metrics)
        self.health = HealthReporter(spool=self.spool, scheduler=self.scheduler, live=self.live,
                                     counters=self.counters, notifier=self.notifier, stuck=self.stuck_reason,
                                     metrics=self.metrics, write_probe=self.space.probe)

    @property
    def settings(self) -> Settings:
        return self.live.settings

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
        # A full disk is no reason not to start: the daemon starts degraded (diskspace.py). Anything else is.
        problem = self.space.probe()
        if problem is not None:
            raise PermissionError(problem)
        self.space.check()
        # Straight into the scheduler, one directory scan each; drops in new/ are claimed, deferred messages'
        # due times read, and states whose message is gone removed, after READY=1.
        scheduler = self.scheduler
        def ready(queue_id: str) -> None:
            scheduler.add_ready(WorkItem(queue_id, Location.QUEUE))

        recovery = recover(self.spool, ready=ready, ready_batch=scheduler.add_queued, deferred=scheduler.add_deferred,
                           progress=self._recovery_progress, sweep=False, lazy_deferred=True)
        self.spool.reaper.flush()  # what a kill left of delivered messages (run() started the reaper)
        self._sweep = recovery.sweep
        self._deferred_load = recovery.deferred_load
        if self._deferred_load is not None:  # counted (status, metrics, oldest age) from now on
            scheduler.expect_deferred(self._deferred_load.count, self._deferred_load.oldest)
        self.counters.failed_in_store = recovery.failed
        if recovery.ready_count or recovery.deferred_count or recovery.completed_moves:
            log.info("spool_recovered", ready=recovery.ready_count, deferred=recovery.deferred_count,
                     completed_moves=recovery.completed_moves)
        if recovery.strays:
            log.warning("spool_strays_left", names=recovery.strays[:10], count=len(recovery.strays),
                        hint="files in queue/ or deferred/ whose names are no queue id: mailwatchd did not put "
                             "them there and leaves them alone")
        if self.settings.uses_outbox:
            log.warning("no_relay_configured", outbox=str(self.settings.outbox),
                        hint="set EMAIL_HOST (or MAILWATCHD_RELAYS) to deliver through a relay; "
                             "until then messages go to the local outbox Maildir")

    def _recovery_progress(self, seen: int) -> None:
        """A large spool: ask systemd for time as recovery goes (most entries cost only their name in a directory
        listing; interrupted moves, and claimed messages when meta/ holds many states, a state read)."""
        if seen == RECOVERY_EXTEND_ABOVE:
            log.info("spool_recovery_started", hint="a large spool: recovery takes a moment")
        self.notifier.extend_timeout(RECOVERY_EXTEND_S)

    async def run(self) -> int:
        """Run until stopped; returns the process exit status."""
        loop = asyncio.get_running_loop()
        # Delivered messages are unlinked in its thread (reaper.py), and what a kill left of them at start-up.
        self.spool.start_reaper()
        started = False
        try:
            self.startup()
            started = True
        except SpoolLocked as exc:
            log.error("spool_locked", detail=str(exc))
            return exitcodes.TEMPFAIL
        except ConfigError as exc:  # a socket systemd passed is not one we can serve
            log.error("config_invalid", key=exc.key, problem=exc.problem, fix=exc.fix)
            return exitcodes.CONFIG
        except OSError as exc:
            log.error("spool_unusable", spool=str(self.settings.spool), detail=str(exc),
                      hint="free space on the spool's filesystem" if is_full_error(exc)
                      else _permission_hint(self.settings.spool))
            return exitcodes.CANTCREAT
        except Exception:
            log.exception("startup_failed")
            return exitcodes.SOFTWARE
        finally:
            if not started:
                self.spool.stop_reaper(REAPER_FLUSH_S)
        self._install_signals(loop)
        try:
            self._resize_workers(self.settings.concurrency)
            if not await self._start_listener():
                return exitcodes.TEMPFAIL
            if self.metrics is not None:
                self.metrics.start()
            self.health.start()
            relays = ",".join(relay.name for relay in self.settings.relays) or "outbox"
            listening = " ".join(_shown(address) for address in self.listener.addresses) if self.listener else ""
            log.info("daemon_ready", spool=str(self.settings.spool), relays=relays,
                     concurrency=self.settings.concurrency, queued=len(self.scheduler), listen=listening or None)
            self.notifier.ready()
            self.intake.start(loop)  # after READY=1: a backlog in new/ is claimed while the daemon runs
            if self._deferred_load is not None or self._sweep is not None:
                self._after_ready_task = asyncio.create_task(self._after_ready(), name="after-ready")
            await self._main_loop()
        finally:
            await self._shutdown()
        return self._exit_status

    async def _after_ready(self) -> None:
        """Recovery's rest: the deferred messages' due times first (they may be due), then the orphan sweep."""
        load, self._deferred_load = self._deferred_load, None
        if load is not None:
            await self._load_deferred(load)
        sweep, self._sweep = self._sweep, None
        if sweep is not None:
            await self._sweep_orphans(sweep)

    async def _load_deferred(self, load: DeferredLoad) -> None:
        """The due times recovery left unread, a chunk per turn of the event loop (recovery.DeferredLoad), so
        deliveries and claims go on meanwhile; the scheduler counts the messages not loaded yet."""
        started = time.monotonic()
        scheduler = self.scheduler
        try:
            for _ in load.steps(scheduler.load_deferred, scheduler.skip_deferred):
                await asyncio.sleep(0)
        except Exception:  # a stop (cancellation) goes through: the load is not over, the daemon is
            log.exception("deferred_load_failed", hint="the deferred messages not loaded yet wait for the next start")
        scheduler.end_deferred_load()
        self.counters.failed_in_store += load.failed
        if load.error_count:
            log.warning("deferred_load_moves_failed", count=load.error_count, examples=load.errors,
                        hint="these messages stay where they are until the next start")
        log.info("deferred_loaded", count=load.loaded, gone=load.gone, completed_moves=load.completed_moves,
                 duration_s=round(time.monotonic() - started, 3))

    async def _sweep_orphans(self, sweep: OrphanSweep) -> None:
        """Recovery's orphan sweep, a chunk per turn of the event loop (see recovery.py)."""
        started = time.monotonic()
        for _ in sweep.steps():
            await asyncio.sleep(0)
        if sweep.removed:
            log.info("spool_orphans_removed", count=sweep.removed, duration_s=round(time.monotonic() - started, 3))

    async def _start_listener(self) -> bool:
        """Serve SMTP on systemd's sockets, else on MAILWATCHD_LISTEN (none when it is empty), in a process
        of its own (submission/process.py)."""
        listen = self.settings.listen
        if not listen.addresses and not any(key in os.environ for key in SOCKET_ACTIVATION_ENVIRONMENT):
            return True
        from mailwatchd.submission.listener import bind_all, inherited_sockets
        from mailwatchd.submission.process import ChildConfig, ListenerProcess

        sockets = inherited_sockets()
        if not sockets and not listen.addresses:
            return True
        shown = " ".join(f"{host}:{port}" for host, port in listen.addresses)
        if not sockets:
            try:
                sockets = bind_all(listen.addresses)
            except OSError as exc:
                log.error("listen_failed", listen=shown, detail=exc.strerror or str(exc),
                          hint="another program holds the address: set MAILWATCHD_LISTEN to a free one, or empty it")
                return False
        settings = self.settings
        config = ChildConfig(spool=settings.spool, listen=listen, hostname=settings.ehlo_name,
                             max_message_size=settings.max_message_size, command_timeout=LISTEN_COMMAND_TIMEOUT_S,
                             stop_grace=min(settings.shutdown_grace, LISTEN_STOP_GRACE_S),
                             log_format=settings.log_format, log_level=settings.log_level)
        listener = ListenerProcess(config, sockets, stores=ListenerHandoff(self.scheduler, self.pending, self.counters),
                                   on_exit=self._listener_exited)
        try:
            listener.start()
        except OSError as exc:
            log.error("listen_failed", listen=shown, detail=f"the listener's process: {exc.strerror or exc}",
                      hint="empty MAILWATCHD_LISTEN to run without it")
            return False
        self.listener = listener
        return True

    def _listener_exited(self, status: int | None) -> None:
        """The listener process ended on its own: a bug or a kill. The daemon stops with EX_SOFTWARE, so
        that systemd (Restart=) starts both again; the messages it stored are in queue/."""
        log.error("listener_exited", status=status,
                  hint="the SMTP listener's process ended; the daemon stops so that it is started again")
        self.pending.drop_all()  # what it was storing is not stored: recovery removes the temporary files
        self._exit_status = exitcodes.SOFTWARE
        self._stop_requested += 1
        self._attention.set()

    def _start_worker(self, index: int) -> Worker:
        worker = Worker(index, spool=self.spool, scheduler=self.scheduler, live=self.live, counters=self.counters,
                        stop=self.stop, pending=self.pending)
        self._tasks[worker] = asyncio.create_task(worker.run(), name=f"worker-{index}")
        return worker

    def _resize_workers(self, concurrency: int) -> None:
        """Start workers up to `concurrency`; retire the ones above it (each finishes its message first)."""
        while len(self.workers) < concurrency:
            self.workers.append(self._start_worker(len(self.workers)))
        while len(self.workers) > concurrency:
            self.workers.pop().retired = True
        self.scheduler.wake()  # a retired worker waiting for work notices at once
        self.live.wakeup().set()

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
                    self.live.router.reset()
                    self.health.refresh()
                    log.info("flush_requested", deferred=flushed)
            if self._stop_requested:
                return
            self._replace_crashed_workers()
            self.notices.tick()
            self.space.check()
            self.health.tick()
            self.notifier.flush()

    def _space_changed(self, degraded: str | None) -> None:
        """The spool ran short of room, or has room again: status at once; claims resume with a rescan."""
        self.health.degraded = degraded
        if degraded is None:
            self.intake.rescan()
        self._attention.set()

    def _replace_crashed_workers(self) -> None:
        """A worker that died of a bug is logged and replaced: one failure must not stall the queue."""
        for index, worker in enumerate(self.workers):
            task = self._tasks[worker]
            if task.done():
                error = None if task.cancelled() else task.exception()
                log.error("worker_crashed", worker=index, exc_info=error)
                del self._tasks[worker]
                self.workers[index] = self._start_worker(index)
        for worker, task in list(self._tasks.items()):
            if worker.retired and task.done():
                del self._tasks[worker]

    def stuck_reason(self) -> str | None:
        """Why the work is not healthy now, for the watchdog; None when it is."""
        now = time.monotonic()
        for worker in self._tasks:
            reason = worker.stuck(now, STUCK_MARGIN_S)
            if reason is not None:
                return reason
        if any(self._tasks[worker].done() for worker in self.workers):
            return "a worker task has ended"
        return None

    # -- reload ------------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read settings; a bad new configuration is reported and the old one kept."""
        self.notifier.reloading()
        try:
            new = load_settings(self.settings.config_path, self.environ_for_reload())
        except ConfigError as exc:
            log.error("config_reload_failed", key=exc.key, problem=exc.problem, fix=exc.fix)
            self.health.reload_error = f"{exc.key}: {exc.problem}; fix: {exc.fix}"
            self._attention.set()  # the STATUS= line and the status file say so at once
            self.notifier.ready()
            return
        self.health.reload_error = None
        old = self.settings
        if new.listen != old.listen:
            log.warning("config_reload_listen_ignored", hint="restart the daemon to change MAILWATCHD_LISTEN*")
            new = dataclasses.replace(new, listen=old.listen)
        if (new.metrics_file, new.metrics_listen) != (old.metrics_file, old.metrics_listen):
            log.warning("config_reload_metrics_ignored", hint="restart the daemon to change MAILWATCHD_METRICS_*")
            new = dataclasses.replace(new, metrics_file=old.metrics_file, metrics_listen=old.metrics_listen)
        if new.spool != old.spool:
            log.warning("config_reload_spool_ignored", spool=str(new.spool), kept=str(old.spool),
                        hint="restart the daemon to change MAILWATCHD_SPOOL")
            new = dataclasses.replace(new, spool=old.spool, outbox=old.outbox)
        self.spool.max_message_size = new.max_message_size
        self.live.replace(new)
        workers_before = len(self.workers)
        self._resize_workers(new.concurrency)
        self.scheduler.wake()
        relays = ",".join(relay.name for relay in new.relays) or "outbox"
        log.info("config_reloaded", relays=relays, workers=f"{workers_before} -> {len(self.workers)}",
                 sessions="reopened with the new settings")
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
        self.stop.set()  # every waiter notices at once: workers waiting for work or for a relay
        self.notifier.stopping()
        in_flight = sum(1 for worker in self._tasks if worker.busy_until is not None)
        log.info("daemon_stopping", in_flight=in_flight, grace_s=self.settings.shutdown_grace)
        if self.listener is not None:
            # No new messages: a client in the middle of DATA gets its answer, the others a 421.
            await self.listener.stop(min(self.settings.shutdown_grace, LISTEN_STOP_GRACE_S))
            self.pending.drop_all()  # it has settled each store it began; none is left but by a kill
        self.intake.stop()
        if self._after_ready_task is not None:
            self._after_ready_task.cancel()  # the next start loads and sweeps again
        self.scheduler.close()
        tasks = list(self._tasks.values())
        pending = [task for task in tasks if not task.done()]
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
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not await asyncio.to_thread(self.spool.stop_reaper, REAPER_FLUSH_S):
            log.warning("reaper_unfinished", pending=self.spool.reaper.pending,
                        hint="delivered messages left as .sent-* files: the next start removes them")
        await self.health.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        self.spool.release_lock()
        totals = self.counters.totals
        log.info("daemon_stopped", delivered=totals.delivered, deferred=totals.deferred, failed=totals.failed)


def _shown(address: tuple[str, int] | str) -> str:
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _file_values(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        return {key: value or "" for key, value in dotenv_values(path, interpolate=False).items()}
    except (OSError, UnicodeDecodeError):
        return {}


def _permission_hint(spool: Path) -> str:
    """What to run when the spool is not the daemon's to write: typically files left by a run as root."""
    import grp
    import pwd

    from mailwatchd.settings.environment import SERVICE_SPOOL

    try:
        user, group = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
    except KeyError:  # an id without a name
        user, group = str(os.geteuid()), str(os.getegid())
    chown = f"chown -R {user}:{group} {spool}"
    if spool != SERVICE_SPOOL:
        return f"the spool must be writable by the daemon's user {user}: run `{chown}`"
    return (f"the spool must be writable by the daemon's user {user} (files left by `mailwatchd run` as root?): "
            f"run `{chown} && systemd-tmpfiles --create mailwatchd.conf`, then "
            "`systemctl reset-failed mailwatchd; systemctl start mailwatchd`")


def run_daemon(settings: Settings) -> int:
    """Entry point for `mailwatchd run` once settings are valid."""
    return asyncio.run(Daemon(settings).run())
