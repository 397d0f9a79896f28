"""sd_notify(3) for the daemon: readiness, status, reload and stop, the watchdog.

Everything here is a no-op when $NOTIFY_SOCKET is unset (not started by systemd with Type=notify).
Sending never blocks and never raises. The socket is non-blocking: a notification the reader's full
queue cannot take now stays pending (the newest one per kind: STATUS=, READY=1, WATCHDOG=1, …) and is
retried, in order, on the next send, on `flush()`, and from a short backing-off timer on the running
event loop. Any other failure is logged once (`sd_notify_failed`) and the notification dropped, so a
broken notify socket cannot take the mail loop down with it.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import time
from collections.abc import Mapping

import sdnotify

from mailwatchd.service.logs import get_logger

log = get_logger()

# The reader's queue is full (or the kernel is short of buffers): worth retrying on the same socket.
_QUEUE_FULL = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
_RETRY_FIRST_S = 0.02
_RETRY_MAX_S = 1.0


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


def _kind(state: str) -> str:
    return state.split("=", 1)[0]


class _Outcome(enum.Enum):
    SENT = enum.auto()
    QUEUE_FULL = enum.auto()
    FAILED = enum.auto()


class Notifier:
    """The daemon's side of the notify socket."""

    def __init__(self) -> None:
        # sdnotify reads $NOTIFY_SOCKET itself when it connects; this copy only decides no-op or not.
        self.socket_path = os.environ.get("NOTIFY_SOCKET") or None
        self._interval = watchdog_interval()
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._failed = False
        # Unsent states, oldest first, at most one per kind (the newest, moved to the end): replaying them
        # in order leaves systemd in the state the sends would have left it in, and the list stays bounded.
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._retry_delay = _RETRY_FIRST_S

    def ready(self) -> None:
        """READY=1: start-up (or a reload) is complete."""
        self.send("READY=1")

    def status(self, text: str) -> None:
        """STATUS=text, on one line; a pending STATUS= is replaced by a newer one."""
        self.send(f"STATUS={_one_line(text)}")

    def stopping(self) -> None:
        """STOPPING=1: shutdown has begun."""
        self.send("STOPPING=1")

    def reloading(self) -> None:
        """RELOADING=1; READY=1 ends the reload. MONOTONIC_USEC is what systemd ≥ 253 asks for with it."""
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the start/stop/reload timeout fires (EXTEND_TIMEOUT_USEC)."""
        self.send(f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1_000_000), 0)}")

    def watchdog_ping(self) -> None:
        """WATCHDOG=1: the service is alive."""
        self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of $WATCHDOG_USEC at start-up), or None when it is off."""
        return self._interval

    @property
    def pending(self) -> tuple[str, ...]:
        """Notifications kept for a retry because the reader's queue was full, oldest first."""
        return tuple(self._pending)

    def send(self, state: str) -> bool:
        """Send one notification (newline-separated assignments) after any pending ones; True when it went out now."""
        if self.socket_path is None:
            return False
        kind = _kind(state)
        self._pending = [older for older in self._pending if _kind(older) != kind]
        self._pending.append(state)
        return self._send_pending() is _Outcome.SENT

    def flush(self) -> bool:
        """Retry pending notifications now, without blocking; True when none is left pending."""
        if self._pending:
            self._send_pending()
        return not self._pending

    def _send_pending(self) -> _Outcome | None:
        """Send pending states in order until the queue is full; the outcome of the last one tried."""
        outcome = None
        while self._pending:
            outcome = self._send_now(self._pending[0])
            if outcome is _Outcome.QUEUE_FULL:
                self._schedule_retry()
                return outcome
            del self._pending[0]
        self._cancel_retry()
        self._retry_delay = _RETRY_FIRST_S
        return outcome

    def _send_now(self, state: str) -> _Outcome:
        # sdnotify encodes latin-1; systemd reads UTF-8: hand it the UTF-8 bytes spelled as latin-1.
        payload = state.encode("utf-8").decode("latin-1")
        for attempt in range(2):  # a second try on a fresh socket: the manager may have re-executed
            try:
                if self._notifier is None:
                    self._notifier = sdnotify.SystemdNotifier(debug=True)  # debug: raise, do not swallow
                    self._notifier.socket.setblocking(False)
                self._notifier.notify(payload)
                return _Outcome.SENT
            except Exception as exc:  # sdnotify raises whatever socket raised, or TypeError
                if isinstance(exc, OSError) and exc.errno in _QUEUE_FULL:
                    return _Outcome.QUEUE_FULL
                self._disconnect()
                if attempt == 1 and not self._failed:
                    self._failed = True
                    log.warning("sd_notify_failed", socket=self.socket_path, error=f"{type(exc).__name__}: {exc}",
                                state=_kind(state))
        return _Outcome.FAILED

    def _disconnect(self) -> None:
        if self._notifier is not None and self._notifier.socket is not None:
            self._notifier.socket.close()
        self._notifier = None

    def _schedule_retry(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop in this thread: the next send() or flush() retries
        if self._timer is not None and self._timer_loop is loop:
            return
        self._timer = loop.call_later(self._retry_delay, self._on_retry_timer)
        self._timer_loop = loop
        self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX_S)

    def _on_retry_timer(self) -> None:
        self._timer = None
        self._send_pending()

    def _cancel_retry(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
