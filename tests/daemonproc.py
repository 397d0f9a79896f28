"""Run `mailwatchd run` as a real child process and follow its JSON log events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.conftest import wait_until

MAILWATCHD = [sys.executable, "-m", "mailwatchd"]


class DaemonProcess:
    """A mailwatchd daemon child; `events` fills as it logs (MAILWATCHD_LOG_FORMAT=json)."""

    def __init__(self, env: Mapping[str, str], cwd: Path | None = None) -> None:
        self.env = dict(env)
        self.env.setdefault("MAILWATCHD_LOG_FORMAT", "json")
        self.env.setdefault("MAILWATCHD_LOG_LEVEL", "debug")
        self.cwd = cwd
        self.events: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self._lock = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self, *args: str) -> DaemonProcess:
        self.proc = subprocess.Popen([*MAILWATCHD, "run", *args], env=self.env, cwd=self.cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self.raw_lines.append(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    self.events.append(event)
                self._lock.notify_all()

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [event for event in self.events if event.get("event") == name]

    def wait_event(self, name: str, where: Callable[[dict[str, Any]], bool] = lambda e: True,
                   count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Block until `count` events named `name` (matching `where`) were logged."""
        def found() -> list[dict[str, Any]] | None:
            matches = [event for event in self.named(name) if where(event)]
            return matches if len(matches) >= count else None
        return wait_until(found, timeout, message=f"{count}× {name} in the daemon's log\n" + self.tail())  # type: ignore[no-any-return]

    def tail(self, lines: int = 30) -> str:
        with self._lock:
            return "\n".join(self.raw_lines[-lines:])

    def wait_ready(self, timeout: float = 15.0) -> DaemonProcess:
        self.wait_event("daemon_ready", timeout=timeout)
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; kill if it does not stop in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def relay_env(base: Mapping[str, str], spool: Path, host: str, port: int, **extra: str) -> dict[str, str]:
    """Environment for a daemon delivering to a test relay (plain SMTP unless told)."""
    env = dict(base)
    env.update({"MAILWATCHD_SPOOL": str(spool), "EMAIL_HOST": host, "EMAIL_PORT": str(port),
                "MAILWATCHD_HELO_NAME": "mailwatchd.test", "MAILWATCHD_RETRY_MIN": "200ms",
                "MAILWATCHD_RETRY_MAX": "1s", "MAILWATCHD_CONNECT_TIMEOUT": "2s", "EMAIL_TIMEOUT": "5s",
                "MAILWATCHD_TRANSACTION_TIMEOUT": "10s", "MAILWATCHD_SHUTDOWN_GRACE": "10s"})
    env.update(extra)
    return env


def run_cli(env: Mapping[str, str], *args: str, stdin: bytes | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    """`mailwatchd ARGS...` as a real child process."""
    return subprocess.run([*MAILWATCHD, *args], env=dict(env), input=stdin, capture_output=True,
                          timeout=timeout, check=False)


def spool_names(spool: Path, *dirs: str) -> dict[str, list[str]]:
    return {d: sorted(n for n in os.listdir(spool / d) if not n.startswith(".")) if (spool / d).is_dir() else []
            for d in dirs}


def message(index: int, *, to: str = "rcpt@example.org", sender: str = "app@example.com",
            extra_headers: str = "", body: str = "") -> bytes:
    return (f"From: App <{sender}>\r\nTo: {to}\r\nSubject: test {index}\r\n"
            f"Message-ID: <msg-{index}@mailwatchd.test>\r\n{extra_headers}\r\n"
            f"{body or f'body of message {index}'}\r\n").encode()



def drop(spool: Path, data: bytes, name: str) -> None:
    """A Maildir writer: write in tmp/, rename into new/."""
    for sub in ("tmp", "new"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
    (spool / "tmp" / name).write_bytes(data)
    os.rename(spool / "tmp" / name, spool / "new" / name)
