"""sd_notify(3) for the daemon: readiness, status, reload and stop, the watchdog.

Everything here is a no-op when $NOTIFY_SOCKET is unset (not started by systemd with Type=notify).
Sending never raises: the first failure is logged (`sd_notify_failed`), later ones are silent, so a
broken notify socket cannot take the mail loop down with it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import sdnotify
import structlog

log = structlog.get_logger()


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings: half of $WATCHDOG_USEC (sd_watchdog_enabled(3)), or None.

    None when the watchdog is off, or when $WATCHDOG_PID names another process (the variables were
    inherited, not meant for us).
    """
    env = os.environ if environ is None else environ
    raw_usec, raw_pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
        if raw_pid and int(raw_pid) != (os.getpid() if pid is None else pid):
            return None
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


def _one_line(text: str) -> str:
    # A newline would end the assignment and start a new one in the datagram.
    return " ".join(text.splitlines())


class Notifier:
    """The daemon's side of the notify socket."""

    def __init__(self) -> None:
        # sdnotify reads $NOTIFY_SOCKET itself when it connects; this copy only decides no-op or not.
        self.socket_path = os.environ.get("NOTIFY_SOCKET") or None
        self._interval = watchdog_interval()
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={_one_line(text)}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def reloading(self) -> None:
        """RELOADING=1; READY=1 ends the reload. MONOTONIC_USEC is what systemd ≥ 253 asks for with it."""
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the start/stop/reload timeout fires (EXTEND_TIMEOUT_USEC)."""
        self.send(f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1_000_000), 0)}")

    def watchdog_ping(self) -> None:
        self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of $WATCHDOG_USEC at start-up), or None when it is off."""
        return self._interval

    def send(self, state: str) -> bool:
        """Send one notification (newline-separated assignments); False when it could not be sent."""
        if self.socket_path is None:
            return False
        # sdnotify encodes latin-1; systemd reads UTF-8: hand it the UTF-8 bytes spelled as latin-1.
        payload = state.encode("utf-8").decode("latin-1")
        for attempt in range(2):  # a second try on a fresh socket: the manager may have re-executed
            try:
                if self._notifier is None:
                    self._notifier = sdnotify.SystemdNotifier(debug=True)
                self._notifier.notify(payload)
                return True
            except Exception as exc:  # sdnotify raises whatever socket raised, or TypeError
                self._notifier = None
                if attempt == 1 and not self._failed:
                    self._failed = True
                    log.warning("sd_notify_failed", socket=self.socket_path, error=f"{type(exc).__name__}: {exc}",
                                state=state.split("=", 1)[0])
        return False


class WatchdogGate:
    """Pings the watchdog only while the work is healthy (STYLE rule 6: the watchdog tells the truth).

    The work loop calls `beat()` after each completed iteration. A ping goes out when the last iteration
    completed within `interval`, the stuck check (if any) finds nothing, and the previous ping is at least
    `interval / 2` old. A loop that stops iterating, or reports itself stuck, stops the pings and systemd
    kills and restarts the service after WatchdogSec.
    """

    def __init__(self, notifier: Notifier, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self.interval = interval if interval is not None else notifier.watchdog_interval()
        self._clock = clock
        self._last_iteration: float | None = None
        self._last_ping: float | None = None
        self._stuck_check: Callable[[], str | None] | None = None
        self.reason: str | None = None  # why the last maybe_ping() withheld the ping, when it did

    def set_stuck_check(self, check: Callable[[], str | None]) -> None:
        """`check()` returns why the work is stuck, or None when it is healthy."""
        self._stuck_check = check

    def note_iteration(self, now: float | None = None) -> None:
        self._last_iteration = self._clock() if now is None else now

    def maybe_ping(self, now: float | None = None) -> bool:
        """Ping if healthy and due; True when a ping was sent."""
        if self.interval is None:
            return False
        now = self._clock() if now is None else now
        if self._last_iteration is None or now - self._last_iteration > self.interval:
            self.reason = "no work-loop iteration completed within the watchdog interval"
            return False
        self.reason = self._stuck_check() if self._stuck_check is not None else None
        if self.reason is not None:
            return False
        if self._last_ping is not None and now - self._last_ping < self.interval / 2:
            return False
        self.notifier.watchdog_ping()
        self._last_ping = now
        return True

    def beat(self, now: float | None = None) -> bool:
        """One work-loop iteration completed: note it and ping if due."""
        now = self._clock() if now is None else now
        self.note_iteration(now)
        return self.maybe_ping(now)
