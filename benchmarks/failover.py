#!/usr/bin/env python3
"""Failover benchmark: mailwatchd draining a spool with its primary relay black-holed.

The primary is a loopback listener whose accept queue is full (a connect gets no SYN-ACK and
waits out MAILWATCHD_CONNECT_TIMEOUT); the fallback relay is Postfix's smtp-sink (or the
aiosmtpd sink of throughput.py). For each --messages count the daemon drains the same spool
twice: "direct" (the sink is the only relay) and "failover" (black hole first, the sink as
the second relay in MAILWATCHD_RELAYS). See benchmarks/README.md.

    python benchmarks/failover.py [--messages 2000 8000] [--size 4096] [--concurrency 2]
                                  [--connect-timeout 5s] [--sink auto|smtp-sink|aiosmtpd] [--json]

Exit status: 0 when every run delivered each message exactly once, 1 when one did not, 2 when
the sink or the black hole could not be set up.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from throughput import (
    DEFAULT_CACHE,
    HOST,
    REPO_ROOT,
    BenchError,
    NotifyListener,
    Postfix,
    Sink,
    daemon_environment,
    failures,
    fetch_postfix,
    filesystem_of,
    has_exited,
    kill_group,
    note,
    open_sink,
    prefill,
    reap,
    stop,
    tail,
    watch_daemon,
    work_directory,
)

sys.path.insert(0, str(REPO_ROOT))
from tests.rawservers import BlackHole  # noqa: E402 (the repository root is on the path only now)


class FirstArrival:
    """A thread that notes when the sink's count first passes `before` (the first message in), then
    samples the count every `every` seconds (`timeline`: seconds from `started`, messages so far)."""

    def __init__(self, sink: Sink, before: int, started: float, every: float = 0.5) -> None:
        self.at: float | None = None
        self.timeline: list[tuple[float, int]] = []
        self._sink = sink
        self._before = before
        self._started = started
        self._every = every
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="first-arrival", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            if self._sink.count() > self._before:
                self.at = time.perf_counter()
                break
            time.sleep(0.001)
        while not self._stopping.wait(self._every):
            self.timeline.append((round(time.perf_counter() - self._started, 2), self._sink.count() - self._before))

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2)


def log_events(path: Path) -> dict[str, int]:
    """How many times each JSON log event occurs in the daemon's output."""
    counts: dict[str, int] = {}
    for line in path.read_bytes().splitlines():
        try:
            event = json.loads(line).get("event")
        except (ValueError, AttributeError):
            continue
        if isinstance(event, str):
            counts[event] = counts.get(event, 0) + 1
    return counts


def run_daemon(sink: Sink, workdir: Path, args: argparse.Namespace, messages: int,
               hole_port: int | None) -> dict[str, Any]:
    """One drain of `messages`; with `hole_port` the black hole is the primary, the sink the fallback."""
    label = "failover" if hole_port is not None else "direct"
    spool = workdir / f"spool-{label}-{messages}"
    prefill(spool, messages, args.size)
    command = shlex.split(args.daemon_cmd) if args.daemon_cmd else [sys.executable, "-m", "mailwatchd", "run"]
    log_path = workdir / f"mailwatchd-{label}-{messages}.log"
    run_args = argparse.Namespace(**{**vars(args), "messages": messages, "timeout": 60.0 + messages / 50})
    notify = NotifyListener()
    env = daemon_environment(spool, sink, run_args, notify.address)
    env["MAILWATCHD_CONNECT_TIMEOUT"] = args.connect_timeout
    if hole_port is not None:
        env["EMAIL_PORT"] = str(hole_port)
        env["MAILWATCHD_RELAYS"] = f"smtp://{HOST}:{sink.port}?name=fallback"
    result: dict[str, Any] = {"ok": False, "messages": messages}
    proc: subprocess.Popen[bytes] | None = None
    before = sink.count()
    started = time.perf_counter()
    first = FirstArrival(sink, before, started)
    try:
        with open(log_path, "wb") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        outcome = watch_daemon(proc, spool, sink, before, started, notify, log_path, run_args)
        outcome.pop("_cpu_at_ready", None)
        result.update(outcome)
        result["timeline"] = list(first.timeline)
        if first.at is not None:
            result["first_message_s"] = round(first.at - started, 3)
            if notify.ready_at is not None:
                result["first_message_after_ready_s"] = round(first.at - notify.ready_at, 3)
        if has_exited(proc):
            status, _ = reap(proc, 1.0)
            result["error"] = f"mailwatchd exited early with status {status}: {tail(log_path, 5)}"
            return result
        kill_group(proc, signal.SIGTERM)
        status, usage = reap(proc, args.shutdown_timeout)
        result["exit_status"] = status
        if usage is not None:
            result["cpu_ms_per_msg"] = round((usage.ru_utime + usage.ru_stime) * 1000 / messages, 3)
        delivered = sink.count() - before  # after the daemon is gone: duplicates show here
        failed, reasons = failures(spool)
        events = log_events(log_path)
        result.update(delivered=delivered, failed=failed,
                      relay_down=events.get("relay_down", 0), relay_failover=events.get("relay_failover", 0))
        problems = [outcome["timed_out"]] if outcome.get("timed_out") else []
        if failed:
            problems.append(f"{failed} message(s) in failed/: " + "; ".join(reasons))
        if delivered != messages:
            problems.append(f"{'duplicates: ' if delivered > messages else ''}the sink counted {delivered} of "
                            f"{messages} messages")
        result["ok"] = not problems
        if problems:
            result["error"] = "; ".join(problems)
        return result
    finally:
        first.close()
        stop(proc, grace=args.shutdown_timeout)
        notify.close()


def print_table(report: dict[str, Any], out: TextIO) -> None:
    sink = report["sink"]
    print(f"sink      {sink['kind']} ({sink['version']}) on {HOST}:{sink['port']}; black hole {HOST}:"
          f"{report['black_hole_port']}", file=out)
    print(f"load      {report['size']} bytes, concurrency {report['concurrency']}, connect timeout "
          f"{report['connect_timeout']}, spool on {report['spool_filesystem']}, {report['cpus']} CPUs, "
          f"load average {report['load_before']} before, {report['load_after']} after", file=out)
    print(file=out)
    print(f"{'messages':>8} {'run':9} {'msg/s':>8} {'wall s':>7} {'ready s':>8} {'first msg s':>11} "
          f"{'after ready':>11} {'CPU ms/msg':>10} {'relay_down':>10} {'failover/direct':>15}", file=out)
    for row in report["runs"]:
        for label in ("direct", "failover"):
            run = row[label]
            ratio = f"{row['ratio']:.2f}" if label == "failover" and row.get("ratio") is not None else ""
            shown = f"{run['msg_per_s']:8.1f}" if run.get("msg_per_s") else f"{'FAILED':>8}"
            print(f"{row['messages']:>8} {label:9} {shown} {run.get('wall_s', 0):7.2f} "
                  f"{run.get('ready_s') or 0:8.3f} {run.get('first_message_s') or 0:11.3f} "
                  f"{run.get('first_message_after_ready_s') or 0:11.3f} {run.get('cpu_ms_per_msg') or 0:10.3f} "
                  f"{run.get('relay_down', 0):>10} {ratio:>15}", file=out)
    for row in report["runs"]:
        for label in ("direct", "failover"):
            if row[label].get("error"):
                print(f"\n{row['messages']} {label}: ERROR: {row[label]['error']}", file=out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, nargs="+", default=[2000, 8000],
                        help="message counts, one direct and one failover run each (default 2000 8000)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (default 4096)")
    parser.add_argument("--concurrency", type=int, default=2, help="MAILWATCHD_CONCURRENCY (default 2)")
    parser.add_argument("--connect-timeout", default="5s", help="MAILWATCHD_CONNECT_TIMEOUT (default 5s)")
    parser.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto",
                        help="auto: smtp-sink, or aiosmtpd if the postfix package cannot be had")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--stall", type=float, default=15.0,
                        help="give up on a run after this many seconds without progress (default 15)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds mailwatchd gets to exit after SIGTERM before SIGKILL (default 30)")
    parser.add_argument("--daemon-cmd", default=None,
                        help="command that starts the daemon (default: this Python -m mailwatchd run)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the spools go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (spools, logs)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where the postfix package is kept (default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    if min(args.messages) < 1 or args.size < 256 or args.concurrency < 1:
        parser.error("--messages must be >= 1, --size >= 256, --concurrency >= 1")
    return args


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet = args.json
    report: dict[str, Any] = {"size": args.size, "concurrency": args.concurrency,
                              "connect_timeout": args.connect_timeout, "cpus": os.cpu_count(),
                              "python": sys.version.split()[0], "load_before": load_average(), "runs": []}
    postfix: Postfix | None = None
    postfix_error = ""
    if args.sink != "aiosmtpd":
        try:
            postfix = fetch_postfix(args.cache_dir, quiet=quiet)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            postfix_error = f"the postfix package is not available: {exc}"
    with work_directory(args) as workdir:
        report["spool_filesystem"] = filesystem_of(workdir)
        try:
            sink = open_sink(args.sink, postfix, postfix_error, workdir, quiet=quiet)
        except BenchError as exc:
            print(f"[bench] ERROR: no sink: {exc}", file=sys.stderr)
            return 2
        try:
            report["sink"] = {"kind": sink.kind, "version": sink.version, "port": sink.port}
            try:
                hole = BlackHole().__enter__()
            except (RuntimeError, OSError) as exc:
                print(f"[bench] ERROR: no black hole: {exc}", file=sys.stderr)
                return 2
            try:
                report["black_hole_port"] = hole.port
                for messages in args.messages:
                    row: dict[str, Any] = {"messages": messages}
                    for label, port in (("direct", None), ("failover", hole.port)):
                        note(f"{label}: {messages} messages, concurrency {args.concurrency}", quiet=quiet)
                        row[label] = run_daemon(sink, workdir, args, messages, port)
                    direct, failover = row["direct"], row["failover"]
                    if direct.get("ok") and failover.get("ok"):
                        row["ratio"] = round(failover["msg_per_s"] / direct["msg_per_s"], 2)
                    report["runs"].append(row)
            finally:
                hole.__exit__(None, None, None)
        finally:
            sink.close()
    report["load_after"] = load_average()
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report, sys.stdout)
    runs = [row[label] for row in report["runs"] for label in ("direct", "failover")]
    return 0 if all(run.get("ok") for run in runs) else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
