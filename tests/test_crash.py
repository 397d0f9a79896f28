"""kill -9 at random moments while draining: every message arrives at least once, none is
left queued, and duplicates are counted (at-least-once: only messages in flight at a kill
may be sent twice)."""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import smtplib
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import LOOPBACK, SmtpServer, wait_until
from tests.daemonproc import DaemonProcess, message, relay_env, spool_names
from tests.test_failover import free_port

MESSAGES = 300
KILLS = 15
MESSAGE_ID = re.compile(rb"Message-ID: <(msg-\d+)@")


def received_ids(server: SmtpServer) -> list[str]:
    with server.handler.lock:
        return [match.group(1).decode() for m in server.handler.messages
                if (match := MESSAGE_ID.search(m.data))]


def test_sigkill_at_random_moments_loses_nothing(smtp_server: SmtpServer, spool_dir: Path,
                                                clean_env: dict[str, str], capsys: Any) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    env = relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port,
                    MAILWATCHD_CONCURRENCY="2")
    for path in ("tmp", "new"):
        (spool_dir / path).mkdir()
    for index in range(MESSAGES):
        (spool_dir / "tmp" / f"m{index:04d}").write_bytes(message(index))
        (spool_dir / "tmp" / f"m{index:04d}").rename(spool_dir / "new" / f"m{index:04d}")

    kills = 0
    for kill in range(KILLS):
        daemon = DaemonProcess(env).start()
        before = len(received_ids(smtp_server))
        if kill % 4 == 0:
            # Kill during start-up or recovery, before or just after it is ready.
            wait_until(lambda: (spool_dir / "mailwatchd.lock").exists(), message="the daemon started")
        else:
            target = before + rng.randint(1, 25)
            def reached(target: int = target, daemon: DaemonProcess = daemon) -> bool:
                return len(received_ids(smtp_server)) >= min(target, MESSAGES) or daemon.proc.poll() is not None  # type: ignore[union-attr]
            wait_until(reached, timeout=30, message=f"{target} messages received (seed {seed})")
        daemon.kill()
        kills += 1
        if len(set(received_ids(smtp_server))) >= MESSAGES:
            break

    final = DaemonProcess(env).start().wait_ready()
    try:
        wait_until(lambda: len(set(received_ids(smtp_server))) >= MESSAGES, timeout=60,
                   message=f"all {MESSAGES} messages received (seed {seed})")
        wait_until(lambda: not any(spool_names(spool_dir, "new", "queue", "deferred").values()), timeout=20,
                   message="an empty queue")
    finally:
        assert final.stop() == 0

    ids = received_ids(smtp_server)
    counts = Counter(ids)
    duplicates = sum(count - 1 for count in counts.values())
    assert set(counts) == {f"msg-{i}" for i in range(MESSAGES)}
    assert spool_names(spool_dir, "failed")["failed"] == []
    # Each kill can catch at most one transaction per worker between the relay's 250 and the unlink.
    assert duplicates <= kills * 2, f"{duplicates} duplicates after {kills} kills (seed {seed})"
    with capsys.disabled():
        print(f"\ncrash test: {MESSAGES} messages, {kills} SIGKILLs, {len(ids)} received, "
              f"{duplicates} duplicates (seed {seed})")


LISTENER_KILLS = 8


class Sender(threading.Thread):
    """An app sending through the listener on one connection until it fails (the daemon killed); `accepted`:
    the Message-IDs that got their 250."""

    def __init__(self, port: int, numbers: Iterator[int], accepted: list[str]) -> None:
        super().__init__(daemon=True)
        self.port, self.numbers, self.accepted = port, numbers, accepted

    def run(self) -> None:
        try:
            with smtplib.SMTP(LOOPBACK, self.port, timeout=10) as client:
                while True:
                    number = next(self.numbers)
                    client.sendmail("app@example.com", ["rcpt@example.org"], message(number))
                    self.accepted.append(f"msg-{number}")
        except (OSError, smtplib.SMTPException):
            return


def test_sigkill_of_daemon_and_listener_as_mail_comes_in_loses_no_accepted_message(
        smtp_server: SmtpServer, spool_dir: Path, clean_env: dict[str, str], capsys: Any) -> None:
    """Both processes killed at random moments while a client sends through the listener and the daemon
    relays it (cut-through on its open relay connection): every message that got its 250 arrives."""
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    port = free_port()
    env = relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port, MAILWATCHD_LISTEN=f"{LOOPBACK}:{port}",
                    MAILWATCHD_DEFAULT_DOMAIN="example.com")
    numbers = itertools.count()
    accepted: list[str] = []
    for _ in range(LISTENER_KILLS):
        daemon = DaemonProcess(env).start().wait_ready()
        sender = Sender(port, numbers, accepted)
        sender.start()
        target = len(accepted) + rng.randint(1, 20)

        def reached(target: int = target, sender: Sender = sender) -> bool:
            return len(accepted) >= target or not sender.is_alive()

        wait_until(reached, timeout=30, message=f"{target} messages accepted (seed {seed})")
        os.killpg(daemon.pid, signal.SIGKILL)  # the daemon and its listener's process: one process group
        daemon.kill()
        sender.join(15)
        assert not sender.is_alive()

    final = DaemonProcess(env).start().wait_ready()
    try:
        wait_until(lambda: set(accepted) <= set(received_ids(smtp_server)), timeout=60,
                   message=f"every accepted message received (seed {seed})\n{final.tail()}")
        wait_until(lambda: not any(spool_names(spool_dir, "new", "queue", "deferred").values()), timeout=20,
                   message="an empty queue")
    finally:
        assert final.stop() == 0
    assert spool_names(spool_dir, "failed")["failed"] == []
    assert [name for name in os.listdir(spool_dir / "queue") if name.startswith(".tmp-")] == []
    ids = received_ids(smtp_server)
    with capsys.disabled():
        print(f"\nlistener crash test: {len(accepted)} accepted, {LISTENER_KILLS} SIGKILLs of both processes, "
              f"{len(ids)} received, {len(ids) - len(set(ids))} duplicates (seed {seed})")
