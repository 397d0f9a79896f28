#!/usr/bin/env python3
"""Front-door benchmark: how fast a message gets into mailwatchd and out to its relay.

Side by side in one run (see benchmarks/README.md):

1. drop -> relay latency of an idle daemon, one message at a time, through `mailwatchd sendmail -t`
   and through the SMTP listener (a connection per message, and one connection kept open), timed
   from the start of the submission until Postfix's `smtp-sink` has the message (its `-c` count
   changes); beside them a running, idle Postfix null client relaying to the same sink, through
   its `sendmail -t` and through its smtpd (a connection per message);
2. the listener's acceptance rate: Postfix's `smtp-source` sends N messages over ONE connection
   (the daemon relays them to Postfix's `smtp-sink`), with the same load straight into smtp-sink as
   the upper bound, into a running Postfix's smtpd (relaying to the same smtp-sink) as the
   reference, and a pipelining Python client timing the final "." -> 250 of each message.

The running Postfix is the INSTALLED one as a private instance (benchmarks/postfix_running.py);
where Postfix is not installed (or not as root, or with --no-postfix) its rows are skipped.

    python benchmarks/frontdoor.py [--runs 50] [--messages 2000] [--size 4096] [--no-postfix] [--json]

Exit status: 0; 1 when a message was lost (the relay or sink received fewer than were accepted)
or a submission failed; 2 when a tool (relay, daemon, smtp-sink, smtp-source, an installed Postfix)
could not be started.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import secrets
import shlex
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import postfix_running
from postfix_running import PostfixError, RunningPostfix
from throughput import (
    _FOREIGN_ENV,
    DEFAULT_CACHE,
    HOST,
    POLL,
    REPO_ROOT,
    BenchError,
    NotifyListener,
    Postfix,
    Sink,
    cpu_seconds,
    failures,
    fetch_postfix,
    filesystem_of,
    free_port,
    has_exited,
    kill_group,
    note,
    reap,
    spool_backlog,
    start_smtp_sink,
    stop,
    tail,
    work_directory,
)

DEFAULT_LAUNCHER = REPO_ROOT / ".venv" / "bin" / "mailwatchd"
WARMUP_ROUNDS = 2  # not counted: they open the daemon's relay session and fill the caches
ARRIVAL_TIMEOUT_S = 10.0  # an idle daemon relays in milliseconds; this long means lost
READY_TIMEOUT_S = 30.0
SHUTDOWN_S = 15.0
SENDER, RECIPIENT = "bench@example.com", "rcpt@example.com"
GOALS_MS = {"sendmail": 35.0, "listener_per_message": 5.0, "listener_kept_open": 5.0}  # none for Postfix
# The pipelining client's load: its figure is the "." -> 250 time, which needs no 2,000 samples.
PIPELINED_MESSAGES = 200
PIPELINED_TIME_S = 20.0


class ToolError(BenchError):
    """A tool could not be started (exit status 2)."""


def message(subject: str, size: int) -> bytes:
    """From, To, Subject and a body up to `size` bytes, LF line ends (sendmail adds Date, Message-ID)."""
    head = f"From: Benchmark <{SENDER}>\nTo: Recipient <{RECIPIENT}>\nSubject: {subject}\n\n".encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\n"
    length = max(size - len(head), 2)
    body = (line * (length // len(line) + 1))[: length - 1] + b"\n"
    return head + body


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def summary(seconds: list[float]) -> dict[str, Any]:
    """n, median, 90th percentile (nearest rank) and minimum, in milliseconds."""
    ms = sorted(value * 1000 for value in seconds)
    if not ms:
        return {"n": 0, "median_ms": None, "p90_ms": None, "min_ms": None}
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 2),
            "p90_ms": round(ms[math.ceil(0.9 * len(ms)) - 1], 2), "min_ms": round(ms[0], 2)}


# -- the observed relay ------------------------------------------------------------------------


class Arrivals:
    """When Postfix's smtp-sink took each message: it writes its running count (`-c`) once a
    message's final "." is in, and a thread here timestamps each write as inotify reports it.

    The measuring thread meanwhile blocks in `wait`, so it does not hold the GIL the watcher needs.
    """

    def __init__(self, sink: Sink) -> None:
        from inotify_simple import INotify, flags

        self.sink = sink
        self.times: list[float] = []  # times[n - 1]: when the sink's count reached n
        self._changed = threading.Condition()
        self._inotify = INotify()
        self._inotify.add_watch(sink.counter_path, flags.MODIFY)
        self._closing = False
        self._thread = threading.Thread(target=self._watch, name="arrivals", daemon=True)
        self._thread.start()

    @property
    def received(self) -> int:
        with self._changed:
            return len(self.times)

    def _watch(self) -> None:
        while not self._closing:
            if not self._inotify.read(timeout=200):
                continue
            now = time.perf_counter()
            counted = self.sink.count()
            with self._changed:
                self.times.extend([now] * (counted - len(self.times)))
                self._changed.notify_all()

    def wait(self, count: int, timeout: float) -> float | None:
        """When the sink's count reached `count` (perf_counter), waiting up to `timeout` seconds; None if it
        did not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.times) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return self.times[count - 1]

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=5.0)
        self._inotify.close()


# -- the daemon ----------------------------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    notify: NotifyListener
    log_path: Path
    spool: Path
    listen_port: int
    ready_s: float


def client_environment(spool: Path) -> dict[str, str]:
    """What `sendmail -t` gets: the operator's environment without mailwatchd's, plus the spool."""
    # PYTHONDONTWRITEBYTECODE would have every sendmail recompile the checkout's modules
    env = {key: value for key, value in os.environ.items()
           if not key.startswith((*_FOREIGN_ENV, "PYTHONDONTWRITEBYTECODE"))}
    env.update({"MAILWATCHD_SPOOL": str(spool), "MAILWATCHD_DEFAULT_DOMAIN": "example.com"})
    return env


def start_daemon(launcher: Path, spool: Path, relay_port: int, log_path: Path) -> Daemon:
    """`mailwatchd run` with a listener on a free port, once it sent READY=1 on its NOTIFY_SOCKET."""
    for attempt in range(3):  # the port can be taken between choosing and binding it
        listen_port = free_port()
        notify = NotifyListener()
        env = client_environment(spool)
        env.update({"EMAIL_HOST": HOST, "EMAIL_PORT": str(relay_port), "EMAIL_USE_TLS": "false",
                    "MAILWATCHD_LISTEN": f"{HOST}:{listen_port}", "MAILWATCHD_LOG_LEVEL": "warning",
                    "NOTIFY_SOCKET": notify.address})
        with open(log_path, "ab") as log:
            started = time.perf_counter()
            proc = subprocess.Popen([str(launcher), "run"], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while notify.ready_at is None:
            if has_exited(proc) or time.monotonic() > deadline:
                stop(proc)
                notify.close()
                if "listen_failed" in tail(log_path, 3) and attempt < 2:
                    break
                raise ToolError(f"`{launcher} run` did not send READY=1 (exit status {proc.returncode}): "
                                f"{tail(log_path, 3) or 'no output'}")
            time.sleep(POLL)
        else:
            return Daemon(proc, notify, log_path, spool, listen_port, notify.ready_at - started)
    raise ToolError(f"mailwatchd could not listen: {tail(log_path, 3)}")


def stop_daemon(daemon: Daemon) -> int:
    """SIGTERM, reap (SIGKILL after SHUTDOWN_S): the exit status."""
    kill_group(daemon.proc, signal.SIGTERM)
    status, _ = reap(daemon.proc, SHUTDOWN_S)
    kill_group(daemon.proc, signal.SIGKILL)
    daemon.notify.close()
    return status


# -- 1. drop -> relay, one message at a time ---------------------------------------------------------


class SubmitFailed(Exception):
    """The way in refused the message or broke down."""


# A way in: submits one message, returns (started, accepted) perf_counter times.
Submit = Callable[[str, bytes], tuple[float, float]]


def via_sendmail(launcher: Path, env: dict[str, str]) -> Submit:
    """The venv's launcher as `sendmail -t`, message on stdin; accepted = the process has exited 0."""
    def submit(subject: str, data: bytes) -> tuple[float, float]:
        started = time.perf_counter()
        done = subprocess.run([str(launcher), "sendmail", "-t"], input=data, env=env, capture_output=True,
                              timeout=60, check=False)
        exited = time.perf_counter()
        if done.returncode != 0:
            raise SubmitFailed(f"sendmail -t exited {done.returncode}: {done.stderr.decode(errors='replace').strip()}")
        return started, exited
    return submit


def via_postfix_sendmail(postfix: RunningPostfix) -> Submit:
    """The running Postfix's `sendmail -t` (MAIL_CONFIG = its configuration); accepted = exit 0."""
    argv, env = postfix.sendmail_argv(["-t"]), postfix.env

    def submit(subject: str, data: bytes) -> tuple[float, float]:
        started = time.perf_counter()
        done = subprocess.run(argv, input=data, env=env, capture_output=True, timeout=60, check=False)
        exited = time.perf_counter()
        if done.returncode != 0:
            raise SubmitFailed(f"postfix sendmail -t exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace').strip()}")
        return started, exited
    return submit


def start_postfix(args: argparse.Namespace, base: Path, relay_port: int) -> tuple[RunningPostfix | None, str]:
    """The private Postfix relaying to `relay_port`, started; or None and why it is skipped."""
    if args.no_postfix:
        return None, "--no-postfix"
    reason = postfix_running.unavailable_reason()
    if reason is not None:
        return None, reason
    postfix = RunningPostfix(base, relay_port)
    try:
        postfix.setup()
        postfix.start()
    except BaseException:
        postfix.close()
        raise
    return postfix, ""


class PerMessage:
    """A new smtplib connection per message: connect, EHLO, MAIL, RCPT, DATA; accepted = its 250, then QUIT."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ehlo: list[float] = []  # EHLO -> its (multi-line) reply: the part of the set-up in our hands

    def __call__(self, subject: str, data: bytes) -> tuple[float, float]:
        started = time.perf_counter()
        try:
            # local_hostname: smtplib would otherwise look up this host's FQDN for every connection
            with smtplib.SMTP(HOST, self.port, local_hostname="localhost", timeout=10) as client:
                before_ehlo = time.perf_counter()
                client.ehlo()
                self.ehlo.append(time.perf_counter() - before_ehlo)
                client.sendmail(SENDER, [RECIPIENT], crlf(data))
                accepted = time.perf_counter()
        except (OSError, smtplib.SMTPException) as exc:
            raise SubmitFailed(f"listener: {type(exc).__name__}: {exc}") from None
        return started, accepted


class KeptOpen:
    """One smtplib connection for every round (MAIL, RCPT, DATA per message); reopened if it drops."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client: smtplib.SMTP | None = None

    def __call__(self, subject: str, data: bytes) -> tuple[float, float]:
        try:
            if self.client is None:
                self.client = smtplib.SMTP(HOST, self.port, local_hostname="localhost", timeout=10)
                self.client.ehlo()
            started = time.perf_counter()
            self.client.sendmail(SENDER, [RECIPIENT], crlf(data))
            return started, time.perf_counter()
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise SubmitFailed(f"listener (kept open): {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.quit()
            except (OSError, smtplib.SMTPException):
                self.client.close()
            self.client = None


def interpreter_of(launcher: Path) -> list[str]:
    """The interpreter in a console-script launcher's #! line, with the options given there (the package's -IS)."""
    first = launcher.read_bytes().split(b"\n", 1)[0].decode(errors="replace")
    if not first.startswith("#!"):
        raise ToolError(f"{launcher} has no #! line: pass --mailwatchd the venv's bin/mailwatchd")
    return shlex.split(first[2:])


@dataclass
class Way:
    label: str
    submit: Submit
    accepted: list[float] = field(default_factory=list)  # start -> exit 0 / 250
    relayed: list[float] = field(default_factory=list)  # start -> the relay had it
    failed: int = 0
    late: int = 0  # not at the relay within ARRIVAL_TIMEOUT_S
    error: str = ""

    def report(self) -> dict[str, Any]:
        after = [relayed - accepted for accepted, relayed in zip(self.accepted, self.relayed, strict=True)]
        result = {"relayed": summary(self.relayed), "accepted": summary(self.accepted),
                  "accepted_to_relayed": summary(after), "goal_ms": GOALS_MS.get(self.label),
                  "failed": self.failed, "late": self.late}
        return result | ({"error": self.error} if self.error else {})


def run_latency(args: argparse.Namespace, workdir: Path, tools: Postfix) -> dict[str, Any]:
    """Rounds of one message per way in, interleaved (a busy moment hits every row alike); each
    message is waited for at smtp-sink before the next one goes."""
    try:
        sink = start_smtp_sink(tools, workdir)
    except BenchError as exc:
        raise ToolError(f"smtp-sink would not start: {exc}") from None
    relay = Arrivals(sink)
    daemon: Daemon | None = None
    kept: KeptOpen | None = None
    postfix: RunningPostfix | None = None
    try:
        spool = workdir / "spool-latency"
        daemon = start_daemon(args.mailwatchd, spool, sink.port, workdir / "mailwatchd-latency.log")
        kept = KeptOpen(daemon.listen_port)
        per_message = PerMessage(daemon.listen_port)
        interpreter = interpreter_of(args.mailwatchd)
        ways = [Way("sendmail", via_sendmail(args.mailwatchd, client_environment(spool))),
                Way("listener_per_message", per_message),
                Way("listener_kept_open", kept)]
        postfix_info: dict[str, Any]
        try:
            postfix, skipped = start_postfix(args, workdir / "postfix-latency", sink.port)
            postfix_info = {"skipped": skipped}
        except (PostfixError, OSError, subprocess.SubprocessError) as exc:
            postfix, postfix_info = None, {"error": f"the private Postfix would not start: {exc}"}
        if postfix is not None:
            postfix_info = {"version": postfix_running.postfix_version(), "relayhost": f"[{HOST}]:{sink.port}"}
            ways += [Way("postfix_sendmail", via_postfix_sendmail(postfix)),
                     Way("postfix_smtpd_per_message", PerMessage(postfix.smtpd_port))]
        floor: list[float] = []
        token = secrets.token_hex(4)
        accepted = 0
        deadline = time.monotonic() + 60.0 + args.runs * 2.0
        rounds = 0
        while rounds < WARMUP_ROUNDS + args.runs and time.monotonic() < deadline:
            counted = rounds >= WARMUP_ROUNDS
            shift = rounds % len(ways)
            for way in ways[shift:] + ways[:shift]:
                subject = f"frontdoor-{token}-{way.label}-{rounds}"
                try:
                    started, done = way.submit(subject, message(subject, args.size))
                except SubmitFailed as exc:
                    way.failed += 1
                    way.error = way.error or str(exc)
                    continue
                accepted += 1
                arrived = relay.wait(accepted, ARRIVAL_TIMEOUT_S)
                if arrived is None:
                    # a late message would be taken for the next one's arrival: the run is not ok
                    way.late += 1
                    way.error = way.error or f"{subject} was not at the relay after {ARRIVAL_TIMEOUT_S:g}s"
                elif counted:
                    way.accepted.append(done - started)
                    way.relayed.append(arrived - started)
            started = time.perf_counter()
            subprocess.run([*interpreter, "-c", "pass"], check=False, timeout=60)
            if counted:
                floor.append(time.perf_counter() - started)
            rounds += 1
        kept.close()
        relay.wait(accepted, 5.0)  # a late one may still come
        ready_s = daemon.ready_s
        status = stop_daemon(daemon)
        daemon = None
        if postfix is not None:
            postfix.close()
            postfix = None
        received = relay.received
        lost = max(accepted - received, 0)
        result: dict[str, Any] = {
            "rounds": max(rounds - WARMUP_ROUNDS, 0), "warmup_rounds": WARMUP_ROUNDS,
            "relay": f"{sink.note} (Postfix {tools.version}); arrival: its -c count changed (inotify)",
            "daemon_ready_s": round(ready_s, 3), "daemon_exit_status": status,
            "accepted": accepted, "relay_received": received, "lost": lost,
            "duplicates": max(received - accepted, 0),
            **{way.label: way.report() for way in ways},
            "listener_ehlo_reply": summary(per_message.ehlo[WARMUP_ROUNDS:]),
            "floor": {"accepted": summary(floor), "command": f"{shlex.join(interpreter)} -c pass"},
            "postfix": postfix_info,
        }
        result["ok"] = (not lost and not result["duplicates"]
                        and not any(way.failed or way.late for way in ways))
        return result
    finally:
        if kept is not None:
            kept.close()
        if daemon is not None:
            stop_daemon(daemon)
        if postfix is not None:
            postfix.close()
        relay.close()
        sink.close()


# -- 2. the listener's acceptance rate ---------------------------------------------------------------


@dataclass
class SourceRun:
    command: list[str]
    status: int
    started: float
    wall: float
    completions: list[float]  # perf_counter when each `N\r` of -c arrived: one per completed DATA
    cpu_s: float | None
    stderr: str


def run_smtp_source(postfix: Postfix, port: int, args: argparse.Namespace, stderr_path: Path) -> SourceRun:
    """`smtp-source -d -s 1`: every message over one session (no pipelining: smtp-source has none)."""
    command = [postfix.tool("smtp-source"), "-c", "-d", "-s", "1", "-l", str(args.size), "-m", str(args.messages),
               "-f", SENDER, "-t", RECIPIENT, f"{HOST}:{port}"]
    completions: list[float] = []
    with open(stderr_path, "wb") as err:
        started = time.perf_counter()
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    env=postfix.env, start_new_session=True)
        except OSError as exc:
            raise ToolError(f"smtp-source would not start: {exc}") from None

    def read_counter(fd: int) -> None:
        while chunk := os.read(fd, 4096):
            now = time.perf_counter()
            completions.extend([now] * chunk.count(b"\r"))

    assert proc.stdout is not None
    reader = threading.Thread(target=read_counter, args=(proc.stdout.fileno(),), name="smtp-source", daemon=True)
    reader.start()
    try:
        status, usage = reap(proc, 30.0 + args.messages / 50)
        wall = time.perf_counter() - started
        reader.join(timeout=5.0)
    finally:
        stop(proc)
        proc.stdout.close()
    cpu = usage.ru_utime + usage.ru_stime if usage is not None else None
    return SourceRun(command, status, started, wall, completions, cpu, tail(stderr_path, 3))


def source_report(run: SourceRun, received: int) -> dict[str, Any]:
    """msg/s over smtp-source's wall time; per message: the gaps between its counter updates."""
    accepted = len(run.completions)
    gaps = [later - earlier for earlier, later in zip(run.completions, run.completions[1:], strict=False)]
    result: dict[str, Any] = {
        "command": shlex.join([Path(run.command[0]).name, *run.command[1:]]),
        "exit_status": run.status, "accepted": accepted, "received": received,
        "wall_s": round(run.wall, 3), "msg_per_s": round(accepted / run.wall, 1) if run.wall > 0 else None,
        "per_message": summary(gaps),
        "smtp_source_cpu_ms_per_msg": round(run.cpu_s * 1000 / accepted, 3) if run.cpu_s and accepted else None,
    }
    if run.status != 0:
        result["error"] = f"smtp-source exited {run.status}: {run.stderr or 'no message'}"
    return result


def reply(replies: Any) -> tuple[int, bytes]:
    """One (multi-line) SMTP reply: its code and last line."""
    while True:
        line: bytes = replies.readline(2048)
        if len(line) < 4 or not line[:3].isdigit():
            raise SubmitFailed(f"the listener closed the connection or sent {line!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line.rstrip()


def expect(replies: Any, code: int) -> None:
    got, line = reply(replies)
    if got != code:
        raise SubmitFailed(f"expected {code}, got {line.decode(errors='replace')}")


def pipelined_client(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """One connection, MAIL+RCPT+DATA sent together (PIPELINING), timing the final "." -> 250 of each."""
    count = min(args.messages, PIPELINED_MESSAGES)
    bodies = [crlf(message(f"frontdoor-pipelined-{index}", args.size)) + b".\r\n" for index in range(count)]
    envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
    latencies: list[float] = []
    deadline = time.monotonic() + PIPELINED_TIME_S
    error = stopped = ""
    started = time.perf_counter()
    try:
        with socket.create_connection((HOST, port), timeout=10) as sock, sock.makefile("rb") as replies:
            expect(replies, 220)
            sock.sendall(b"EHLO frontdoor.bench\r\n")
            expect(replies, 250)
            started = time.perf_counter()
            for body in bodies:
                if time.monotonic() > deadline:
                    stopped = f"stopped after {len(latencies)} of {count} messages: {PIPELINED_TIME_S:g} s passed"
                    break
                sock.sendall(envelope)
                for code in (250, 250, 354):
                    expect(replies, code)
                sock.sendall(body)
                sent = time.perf_counter()
                expect(replies, 250)
                latencies.append(time.perf_counter() - sent)
            wall = time.perf_counter() - started
            sock.sendall(b"QUIT\r\n")
    except (OSError, SubmitFailed) as exc:
        wall = time.perf_counter() - started
        error = f"after {len(latencies)} messages: {type(exc).__name__}: {exc}"
    result: dict[str, Any] = {"accepted": len(latencies), "wall_s": round(wall, 3),
                              "msg_per_s": round(len(latencies) / wall, 1) if wall > 0 else None,
                              "dot_to_250": summary(latencies)}
    if stopped:
        result["note"] = stopped
    return result | ({"error": error} if error else {})


def wait_relayed(sink: Sink, before: int, expected: int, spool: Path, timeout: float) -> tuple[int, float | None]:
    """Until the sink counted `expected` more and new/, queue/, deferred/ are empty: (counted, when)."""
    deadline = time.monotonic() + timeout
    while True:
        counted = sink.count() - before
        if counted >= expected and not any(spool_backlog(spool).values()):
            return counted, time.perf_counter()
        if time.monotonic() > deadline:
            return counted, None
        time.sleep(POLL)


def postfix_smtpd_acceptance(args: argparse.Namespace, workdir: Path, tools: Postfix, sink: Sink,
                             round_: int) -> dict[str, Any]:
    """The same smtp-source load into a running Postfix's smtpd, relaying to the same smtp-sink."""
    drain_timeout = 30.0 + args.messages / 50
    try:
        postfix, skipped = start_postfix(args, workdir / f"postfix-acceptance-{round_}", sink.port)
    except (PostfixError, OSError, subprocess.SubprocessError) as exc:
        return {"error": f"the private Postfix would not start: {exc}"}
    if postfix is None:
        return {"skipped": skipped}
    try:
        before, cpu_before = sink.count(), postfix.cpu_seconds()
        run = run_smtp_source(tools, postfix.smtpd_port, args, workdir / f"smtp-source-postfix-{round_}.stderr")
        deadline = time.monotonic() + drain_timeout
        while (counted := sink.count() - before) < len(run.completions) or postfix.queued():
            if time.monotonic() > deadline:
                drained_at = None
                break
            time.sleep(POLL)
        else:
            drained_at = time.perf_counter()
        cpu_after = postfix.cpu_seconds()
        row = source_report(run, counted)
        row["version"] = postfix_running.postfix_version()
        row["cpu_method"] = postfix.cpu_method
        if drained_at is not None and run.completions:
            row["all_relayed_s"] = round(drained_at - run.started, 3)
            row["relayed_msg_per_s"] = round(len(run.completions) / (drained_at - run.started), 1)
        elif run.completions:
            row["error"] = (f"not all relayed after {drain_timeout:g} s: the sink counted {counted}, its queue "
                            f"holds {postfix.queued()}; maillog: {postfix.log_tail(3)}")
        if cpu_before is not None and cpu_after is not None and run.completions:
            row["postfix_cpu_ms_per_msg"] = round((cpu_after - cpu_before) * 1000 / len(run.completions), 3)
        return row
    except (PostfixError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        postfix.close()


def floor_acceptance(args: argparse.Namespace, workdir: Path, tools: Postfix, where: str,
                     round_: int) -> dict[str, Any]:
    """The same smtp-source load into benchmarks/durable_floor.py: a bare asyncio responder that stores each
    message with mailwatchd's install_durably (on a thread of its own, or on its event loop) and relays nothing."""
    directory = workdir / f"floor-{where}-{round_}"
    command = [sys.executable, str(Path(__file__).with_name("durable_floor.py")), str(directory), where]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().decode().strip()
        if not port.isdigit():
            return {"error": f"durable_floor.py did not start: {port or proc.communicate(timeout=10)[1].decode()}"}
        run = run_smtp_source(tools, int(port), args, workdir / f"smtp-source-floor-{where}-{round_}.stderr")
        kill_group(proc, signal.SIGTERM)
        out, err = (stream.decode() for stream in proc.communicate(timeout=30))
        stored = int(out.rsplit(" ", 1)[-1]) if out.startswith("stored ") else 0
        row = source_report(run, stored)
        if not out.startswith("stored "):
            row["error"] = f"durable_floor.py ended without its count: {err.strip()[-300:]}"
        return row
    finally:
        stop(proc)


ROUND_ROWS = ("listener", "floor_thread", "floor_loop", "postfix_smtpd")


def listener_acceptance(args: argparse.Namespace, workdir: Path, tools: Postfix, sink: Sink, round_: int,
                        result: dict[str, Any]) -> dict[str, Any]:
    """smtp-source into a freshly started daemon's listener; in the first round also the pipelining client."""
    spool = workdir / f"spool-acceptance-{round_}"
    drain_timeout = 30.0 + args.messages / 50
    daemon = start_daemon(args.mailwatchd, spool, sink.port, workdir / f"mailwatchd-acceptance-{round_}.log")
    stopped = False
    try:
        result.setdefault("daemon_ready_s", round(daemon.ready_s, 3))
        before, cpu_before = sink.count(), cpu_seconds(daemon.proc.pid)
        run = run_smtp_source(tools, daemon.listen_port, args, workdir / f"smtp-source-listener-{round_}.stderr")
        counted, drained_at = wait_relayed(sink, before, len(run.completions), spool, drain_timeout)
        cpu_after = cpu_seconds(daemon.proc.pid)
        row = source_report(run, counted)
        if drained_at is not None and run.completions:
            # from smtp-source's start until the sink had every message and the spool was empty
            row["all_relayed_s"] = round(drained_at - run.started, 3)
            row["relayed_msg_per_s"] = round(len(run.completions) / (drained_at - run.started), 1)
        if cpu_before is not None and cpu_after is not None and run.completions:
            row["daemon_cpu_ms_per_msg"] = round((cpu_after - cpu_before) * 1000 / len(run.completions), 3)
        if round_ == 0:
            before = sink.count()
            client = pipelined_client(daemon.listen_port, args)
            client["received"], _ = wait_relayed(sink, before, client["accepted"], spool, drain_timeout)
            result["pipelined_client"] = client
        result.setdefault("daemon_exit_status", []).append(stop_daemon(daemon))
        stopped = True
        failed, reasons = failures(spool)
        result["failed_in_spool"] = result.get("failed_in_spool", 0) + failed
        if reasons:
            result.setdefault("failed_reasons", []).extend(reasons)
        return row
    finally:
        if not stopped:
            stop_daemon(daemon)


def over_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for several rounds: the first round's row (so its relay time and CPU figures are that round's)
    with msg/s, the per-message median and p90 replaced by their medians over the rounds, each round's msg/s,
    and accepted/received summed."""
    measured = [row for row in rows if row.get("msg_per_s") and "per_message" in row]
    if not measured:
        return rows[0]
    merged = dict(measured[0])
    merged["rounds_msg_per_s"] = [row["msg_per_s"] for row in measured]
    merged["msg_per_s"] = round(statistics.median(merged["rounds_msg_per_s"]), 1)
    merged["per_message"] = dict(measured[0]["per_message"])
    for key in ("median_ms", "p90_ms"):
        values = [row["per_message"][key] for row in measured if row["per_message"].get(key) is not None]
        merged["per_message"][key] = round(statistics.median(values), 3) if values else None
    for key in ("accepted", "received"):
        merged[key] = sum(row.get(key, 0) for row in rows)
    errors = [row["error"] for row in rows if row.get("error")]
    if errors:
        merged["error"] = "; ".join(errors)
    return merged


def run_acceptance(args: argparse.Namespace, workdir: Path, postfix: Postfix) -> dict[str, Any]:
    """smtp-source into smtp-sink (the bound); then, in each of --rounds rounds, into the listener, the two
    floors and Postfix's smtpd, the order reversed every other round so that a machine growing slower or faster
    during a round favours neither; each row is its median over the rounds."""
    try:
        sink = start_smtp_sink(postfix, workdir)
    except BenchError as exc:
        raise ToolError(f"smtp-sink would not start: {exc}") from None
    try:
        result: dict[str, Any] = {"sink": shlex.join([Path(sink.note.split()[0]).name, *sink.note.split()[1:]]),
                                  "rounds": args.rounds}
        before = sink.count()
        direct = run_smtp_source(postfix, sink.port, args, workdir / "smtp-source-sink.stderr")
        result["smtp_sink_direct"] = source_report(direct, sink.wait_count(before + len(direct.completions), 10.0)
                                                   - before)
        loads: dict[str, Callable[[int], dict[str, Any]]] = {
            "listener": lambda round_: listener_acceptance(args, workdir, postfix, sink, round_, result),
            "floor_thread": lambda round_: floor_acceptance(args, workdir, postfix, "thread", round_),
            "floor_loop": lambda round_: floor_acceptance(args, workdir, postfix, "loop", round_),
            "postfix_smtpd": lambda round_: postfix_smtpd_acceptance(args, workdir, postfix, sink, round_),
        }
        by_row: dict[str, list[dict[str, Any]]] = {key: [] for key in ROUND_ROWS}
        for round_ in range(args.rounds):
            for key in ROUND_ROWS if round_ % 2 == 0 else reversed(ROUND_ROWS):
                by_row[key].append(loads[key](round_))
        for key in ROUND_ROWS:
            result[key] = over_rounds(by_row[key])
        pairs = [listener["msg_per_s"] / reference["msg_per_s"]
                 for listener, reference in zip(by_row["listener"], by_row["postfix_smtpd"], strict=True)
                 if listener.get("msg_per_s") and reference.get("msg_per_s") and not reference.get("error")]
        if pairs:
            result["listener_over_postfix_smtpd_rounds"] = [round(pair, 2) for pair in pairs]
            result["listener_over_postfix_smtpd"] = round(statistics.median(pairs), 2)
        parts = [result["smtp_sink_direct"], result.get("pipelined_client", {"accepted": 0, "received": 0})]
        parts += [result[key] for key in ROUND_ROWS if "accepted" in result[key]]
        result["lost"] = sum(max(part["accepted"] - part["received"], 0) for part in parts)
        result.setdefault("failed_in_spool", 0)
        result["ok"] = not result["lost"] and not result["failed_in_spool"] and not any(
            part.get("error") for part in parts)
        return result
    finally:
        sink.close()


# -- report --------------------------------------------------------------------------------------


def ms(figures: dict[str, Any], key: str) -> str:
    return ms_of(figures.get(key))


def ms_of(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


LATENCY_ROWS = (("sendmail", "sendmail -t (venv launcher)", "exit"),
                ("listener_per_message", "listener, connection per message", "250"),
                ("listener_kept_open", "listener, one connection kept open", "250"),
                ("postfix_sendmail", "Postfix sendmail -t (running, idle)", "exit"),
                ("postfix_smtpd_per_message", "Postfix smtpd, conn. per message", "250"))


def print_latency(part: dict[str, Any], size: int, out: TextIO) -> None:
    print(f"1. drop -> relay, idle daemon: {part['rounds']} rounds (+{part['warmup_rounds']} warm-up) of one "
          f"{size}-byte message per way in, interleaved", file=out)
    print(f"   relay: {part['relay']}; daemon ready after {part['daemon_ready_s']} s", file=out)
    print(f"{'':36} {'start -> at the relay, ms':^26} {'goal':>6}  {'medians, ms: start ->':>21} {'accepted':>9}",
          file=out)
    print(f"{'':36} {'median':>8} {'p90':>8} {'min':>8} {'median':>6}  {'accepted':>21} {'-> relay':>9}",
          file=out)
    for key, label, accepted in LATENCY_ROWS:
        row = part.get(key)
        if row is None:
            continue
        relayed = row["relayed"]
        goal = "" if row["goal_ms"] is None else "<=" + format(row["goal_ms"], "g")
        print(f"{label:36} {ms(relayed, 'median_ms'):>8} {ms(relayed, 'p90_ms'):>8} {ms(relayed, 'min_ms'):>8} "
              f"{goal:>6}  {accepted + ' ' + ms(row['accepted'], 'median_ms'):>21} "
              f"{ms(row['accepted_to_relayed'], 'median_ms'):>9}", file=out)
        if row.get("error"):
            print(f"{'':36} ERROR ({row['failed']} failed, {row['late']} late): {row['error']}", file=out)
    floor = part["floor"]["accepted"]
    print(f"{'floor: ' + part['floor']['command'].rsplit('/', 1)[-1]:36} {'':>8} {'':>8} {'':>8} {'':>6}  "
          f"{'exit ' + ms(floor, 'median_ms'):>21}", file=out)
    print(f"   EHLO reply on a new connection: {ms(part['listener_ehlo_reply'], 'median_ms')} ms median.", file=out)
    postfix = part.get("postfix", {})
    if postfix.get("skipped") or postfix.get("error"):
        print(f"   Postfix rows skipped: {postfix.get('skipped') or 'ERROR: ' + postfix['error']}", file=out)
    elif "postfix_sendmail" in part:
        print(f"   Postfix {postfix['version']}: a private null client (benchmarks/postfix_running.py), running and "
              f"idle, relayhost {postfix['relayhost']} (the same relay)", file=out)
        ours, theirs = part["sendmail"]["relayed"]["median_ms"], part["postfix_sendmail"]["relayed"]["median_ms"]
        listener = part["listener_per_message"]["relayed"]["median_ms"]
        if ours and theirs and listener:
            print(f"   median start -> relay over Postfix sendmail -t's: sendmail -t {ours / theirs:.2f}, "
                  f"listener (connection per message) {listener / theirs:.2f}", file=out)
    print(f"   messages: {part['accepted']} accepted (warm-up included), the relay received "
          f"{part['relay_received']}, lost {part['lost']}, duplicates {part['duplicates']}", file=out)


def print_acceptance(part: dict[str, Any], messages: int, size: int, out: TextIO) -> None:
    print(f"2. listener acceptance: {messages} messages, {size}-byte body, over ONE connection; "
          f"the daemon relays to smtp-sink; {part.get('rounds', 1)} rounds, each row its median", file=out)
    print(f"{'':50} {'msg/s':>8} {'per message, ms: median':>25} {'p90':>7}", file=out)
    rows = (("smtp-source -> mailwatchd listener", part.get("listener"), "per_message", "MAIL..250"),
            ("pipelining Python client -> listener", part.get("pipelined_client"), "dot_to_250", '"." -> 250'),
            ("floor: asyncio + install_durably, thread", part.get("floor_thread"), "per_message", "MAIL..250"),
            ("floor: asyncio + install_durably, on the loop", part.get("floor_loop"), "per_message", "MAIL..250"),
            ("smtp-source -> Postfix smtpd (running)", part.get("postfix_smtpd"), "per_message", "MAIL..250"),
            ("smtp-source -> smtp-sink (bound, stores nothing)", part.get("smtp_sink_direct"), "per_message",
             "MAIL..250"))
    for label, row, key, what in rows:
        if row is None:
            continue
        if row.get("skipped") or key not in row:
            print(f"{label:50} {'skipped' if row.get('skipped') else 'FAILED':>8}   "
                  f"({row.get('skipped') or row.get('error')})", file=out)
            continue
        rate = "—" if row.get("msg_per_s") is None else f"{row['msg_per_s']:.0f}"
        print(f"{label:50} {rate:>8} {what + ' ' + ms(row[key], 'median_ms'):>25} {ms(row[key], 'p90_ms'):>7}",
              file=out)
        if key == "dot_to_250":
            print(f"{'':50} ({row['accepted']} messages{': ' + row['note'] if row.get('note') else ''})", file=out)
        if row.get("error"):
            print(f"{'':50} ERROR: {row['error']}", file=out)
    listener = part.get("listener") or {}
    if listener.get("all_relayed_s") is not None:
        print(f"   all relayed on to smtp-sink {listener['all_relayed_s']} s after smtp-source started "
              f"({listener['relayed_msg_per_s']:.0f} msg/s); daemon CPU "
              f"{listener.get('daemon_cpu_ms_per_msg', '—')} ms/msg (accept + relay)", file=out)
    reference = part.get("postfix_smtpd") or {}
    if reference.get("all_relayed_s") is not None:
        print(f"   Postfix relayed all on to smtp-sink {reference['all_relayed_s']} s after smtp-source started "
              f"({reference['relayed_msg_per_s']:.0f} msg/s); Postfix CPU "
              f"{reference.get('postfix_cpu_ms_per_msg', '—')} ms/msg, all its processes "
              f"({reference.get('cpu_method')})", file=out)
    for label, row, _, _ in rows:
        if row is not None and row.get("rounds_msg_per_s"):
            print(f"   msg/s a round: {' / '.join(f'{rate:.0f}' for rate in row['rounds_msg_per_s'])}"
                  f"    ({label.split(' (')[0]})", file=out)
    ratio = part.get("listener_over_postfix_smtpd")
    if ratio is not None:
        verdict = "met" if ratio >= 1.0 else "NOT met"
        listener_median = (listener.get("per_message") or {}).get("median_ms")
        postfix_median = (reference.get("per_message") or {}).get("median_ms")
        each = ", ".join(f"{pair:.2f}" for pair in part.get("listener_over_postfix_smtpd_rounds", []))
        print(f"   at least as fast as Postfix's smtpd: {verdict} (listener msg/s / Postfix smtpd msg/s, the median "
              f"of the rounds' = {ratio:.2f} [{each}]; MAIL..250 median {ms_of(listener_median)} against "
              f"{ms_of(postfix_median)} ms)", file=out)
    else:
        print("   at least as fast as Postfix's smtpd: not checked (no Postfix smtpd figure in this run)", file=out)
    for label, row, _, _ in rows:
        if row is not None and row.get("command"):
            print(f"   {row['command']}    ({label.split(' (')[0]})", file=out)
    print(f"   {part['sink']}    (the sink)", file=out)
    print(f"   messages: lost {part['lost']}, in failed/ {part['failed_in_spool']}; daemon ready after "
          f"{part['daemon_ready_s']} s", file=out)


def print_report(report: dict[str, Any], out: TextIO) -> None:
    machine = report["machine"]
    print(f"command   {report['command']}", file=out)
    print(f"machine   {machine['cpus']} CPUs, {machine['system']}, load average "
          f"{' '.join(map(str, machine['load_before']))} before, {' '.join(map(str, machine['load_after']))} after",
          file=out)
    print(f"spool     {report['spool_filesystem']} ({report['workdir']})", file=out)
    print(f"versions  {', '.join(f'{name} {version}' for name, version in report['versions'].items())}", file=out)
    print(file=out)
    latency, acceptance = report.get("latency", {}), report.get("acceptance", {})
    if "rounds" in latency:
        print_latency(latency, report["size"], out)
    else:
        print(f"1. drop -> relay: NOT RUN: {latency.get('error') or latency.get('skipped')}", file=out)
    print(file=out)
    if "lost" in acceptance:
        print_acceptance(acceptance, report["messages"], report["size"], out)
    else:
        print(f"2. listener acceptance: NOT RUN: {acceptance.get('error') or acceptance.get('skipped')}", file=out)


# -- main ----------------------------------------------------------------------------------------


def version_of(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="measured rounds of part 1, per way in (default 50)")
    parser.add_argument("--messages", type=int, default=2000, help="messages per load in part 2 (default 2000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of part 2's loads, the order reversed every other round (default 3)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (default 4096)")
    parser.add_argument("--part", choices=("both", "latency", "acceptance"), default="both",
                        help="run part 1 (latency), part 2 (acceptance) or both (default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-postfix", action="store_true",
                        help="skip the running Postfix's rows (the installed one as a private null client)")
    parser.add_argument("--mailwatchd", type=Path, default=DEFAULT_LAUNCHER,
                        help=f"the launcher run as `run` and `sendmail -t` (default {DEFAULT_LAUNCHER})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the spools go (default: a new temporary directory; its filesystem matters)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (spools, daemon logs)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where the postfix package is kept (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 1000 or not 1 <= args.messages <= 100_000 or not 256 <= args.size <= 10_000_000:
        parser.error("--runs must be 1-1000, --messages 1-100000, --size 256-10000000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet = args.json
    shown = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, os.path.relpath(__file__), *shown]),
        "runs": args.runs, "messages": args.messages, "size": args.size,
        "machine": {"cpus": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
                    "load_before": [round(load, 2) for load in os.getloadavg()]},
        "versions": {"python": platform.python_version(), "mailwatchd": version_of("mailwatchd"),
                     "aiosmtpd": version_of("aiosmtpd")},
    }
    tool_errors: list[str] = []
    with work_directory(args) as workdir:
        report["workdir"] = str(workdir)
        report["spool_filesystem"] = filesystem_of(workdir)
        postfix: Postfix | None = None
        try:
            postfix = fetch_postfix(args.cache_dir, quiet=quiet)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            report["latency"] = report["acceptance"] = {"error": f"Postfix's smtp-sink and smtp-source: {exc}"}
            tool_errors.append(str(exc))
        if postfix is not None:
            report["versions"]["postfix"] = f"{postfix.version} (smtp-source, smtp-sink from the .deb)"
            if not args.no_postfix and postfix_running.unavailable_reason() is None:
                report["versions"]["postfix running"] = f"{postfix_running.postfix_version()} (installed)"
            report["latency"] = report["acceptance"] = {"skipped": f"--part {args.part}"}
            if args.part in ("both", "latency"):
                note(f"1. drop -> relay: {args.runs} rounds (+{WARMUP_ROUNDS} warm-up)", quiet=quiet)
                try:
                    report["latency"] = run_latency(args, workdir, postfix)
                except ToolError as exc:
                    report["latency"] = {"error": str(exc)}
                    tool_errors.append(str(exc))
            if args.part in ("both", "acceptance"):
                note(f"2. listener acceptance: {args.messages} x {args.size} bytes", quiet=quiet)
                try:
                    report["acceptance"] = run_acceptance(args, workdir, postfix)
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    report["acceptance"] = {"error": str(exc)}
                    tool_errors.append(str(exc))
    for failed_to_start in (report["latency"].get("postfix", {}), report["acceptance"].get("postfix_smtpd", {})):
        if failed_to_start.get("error") and "accepted" not in failed_to_start:
            tool_errors.append(failed_to_start["error"])
    report["machine"]["load_after"] = [round(load, 2) for load in os.getloadavg()]
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, sys.stdout)
    parts = [part for part in (report["latency"], report["acceptance"])
             if "skipped" not in part and ("error" not in part or "ok" in part)]
    if any(part.get("lost") or not part.get("ok") for part in parts):
        return 1
    return 2 if tool_errors else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
