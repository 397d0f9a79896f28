#!/usr/bin/env python3
"""Backlog benchmark: how long `mailwatchd run` takes to READY=1 with a large spool, how much
memory it holds per queued message, and what it costs while the backlog waits.

    python benchmarks/backlog.py [--messages 100000 1000000] [--cases new queue deferred]
                                 [--size 512] [--due 10] [--idle-window 30] [--json]

For each count and case a fresh spool is filled (see benchmarks/README.md), the daemon is started
with a real NOTIFY_SOCKET this script keeps reading, and the relay is a loopback port nobody
listens on (connection refused), so every message stays queued while it is measured. In the
deferred case `--due` of the messages are due already and the relay is an SMTP sink (aiosmtpd, in
its own process): how long they take to arrive is how long the daemon takes to find them.

Exit status: 0 when every run reached READY=1 and exited cleanly on SIGTERM, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from throughput import (
    HOST,
    POLL,
    REPO_ROOT,
    NotifyListener,
    Sink,
    cpu_seconds,
    filesystem_of,
    free_port,
    has_exited,
    kill_group,
    note,
    reap,
    start_aiosmtpd_sink,
    stop,
    tail,
    vm_hwm_kib,
    work_directory,
)

sys.path.insert(0, str(REPO_ROOT))
from mailwatchd.spool.messagestate import Attempt, MessageState, State  # noqa: E402
from mailwatchd.spool.queueid import new_queue_id  # noqa: E402
from mailwatchd.spool.store import Location, Spool  # noqa: E402

CASES = ("new", "queue", "deferred")
DEFER_FOR_S = 24 * 3600.0  # the deferred messages' next attempts: well after the benchmark ends
QUIET_CPU_S = 0.02  # the daemon is quiet (the start-up work after READY=1 is done) when it used less CPU than this
QUIET_PERIOD_S = 0.5  # over this long
_FOREIGN_ENV = ("EMAIL_", "MAILWATCHD_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "JOURNAL_STREAM",
                "CREDENTIALS_DIRECTORY", "INVOCATION_ID")


# -- filling a spool ------------------------------------------------------------------------------


def message_bytes(index: int, size: int) -> bytes:
    head = (f"From: bench@example.com\nTo: rcpt{index % 100}@example.com\nSubject: backlog {index}\n"
            f"Message-ID: <backlog-{index}@example.com>\n\n").encode()
    return head + b"x" * max(0, size - len(head) - 1) + b"\n"


def _write(path: str, data: bytes) -> None:
    # Written without fsync (one os.sync() at the end): a million fsyncs would take an hour.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def fill(spool_root: Path, case: str, total: int, size: int, due: int = 0) -> None:
    """A fresh spool holding `total` messages: drops in new/, claimed ones in queue/ (no state), or
    deferred ones in deferred/ with their state in meta/ and a due time tomorrow, as the daemon leaves them;
    `due` of those, spread over the ids, were due a minute ago."""
    spool = Spool(spool_root)
    spool.create_layout()
    now = time.time()
    data = message_bytes(0, size)
    if case == "new":
        stamp, pid = int(now), os.getpid()
        for index in range(total):
            name = f"{stamp}.M{index:07d}P{pid}.bench"
            _write(f"{spool.tmp}/{name}", data)
            os.rename(f"{spool.tmp}/{name}", f"{spool.new}/{name}")
    elif case == "queue":
        directory = spool.dir(Location.QUEUE)
        for index in range(total):
            _write(f"{directory}/{new_queue_id(int((now - total + index) * 1e9))}", data)
    else:
        directory = spool.dir(Location.DEFERRED)
        settle = getattr(spool, "settled", None)  # the due time where a directory scan sees it (if the code has it)
        every = max(1, total // due) if due else 0
        for index in range(total):
            queue_id = new_queue_id(int((now - total + index) * 1e9))
            is_due = every > 0 and index % every == every // 2 and index // every < due
            due_at = now - 60 if is_due else now + DEFER_FOR_S + index % 3600
            state = MessageState(queue_id, now - 60, State.DEFERRED, attempts=1, next_attempt_at=due_at,
                                 first_failure_at=now - 60)
            state.record(Attempt(now - 60, "temporary", "relay_refused", "451 4.3.0 try again later", "relay"),
                         counted=False)
            _write(str(spool.meta_path(queue_id)), state.to_json())
            _write(f"{directory}/{queue_id}", data)
            if settle is not None:
                settle(queue_id, Location.DEFERRED, due_at)
    os.sync()  # the fill's dirty pages must not be written back during the timed run


# -- one run --------------------------------------------------------------------------------------


def new_is_empty(spool_root: Path) -> bool:
    with os.scandir(spool_root / "new") as entries:
        return not any(not entry.name.startswith(".") for entry in entries)


def environment(spool_root: Path, notify_socket: str, relay_port: int, log_level: str = "warning") -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_FOREIGN_ENV)}
    pythonpath = os.environ.get("PYTHONPATH")
    env.update({
        "PYTHONPATH": f"{REPO_ROOT}:{pythonpath}" if pythonpath else str(REPO_ROOT),
        "MAILWATCHD_SPOOL": str(spool_root),
        "EMAIL_HOST": HOST,
        "EMAIL_PORT": str(relay_port),  # nobody listens (connection refused, every message stays queued), or a sink
        "EMAIL_USE_TLS": "false",
        "EMAIL_USE_SSL": "false",
        "MAILWATCHD_LISTEN": "",
        "MAILWATCHD_LOG_LEVEL": log_level,
        "MAILWATCHD_LOG_FORMAT": "json",
        "NOTIFY_SOCKET": notify_socket,
    })
    return env


def logged(log_path: Path, event: str) -> dict[str, Any] | None:
    """The last JSON log line of the daemon's that is `event`, if any."""
    found = None
    with open(log_path, "rb") as log:
        for line in log:
            if event.encode() in line:
                try:
                    found = json.loads(line)
                except ValueError:
                    continue
    return found if isinstance(found, dict) else None


def wait_quiet(proc: subprocess.Popen[bytes], deadline: float) -> float | None:
    """Until the daemon used less than QUIET_CPU_S over QUIET_PERIOD_S (its work after READY=1 done); when."""
    before = cpu_seconds(proc.pid)
    while before is not None and time.perf_counter() < deadline and not has_exited(proc):
        time.sleep(QUIET_PERIOD_S)
        after = cpu_seconds(proc.pid)
        if after is None:
            return None
        if after - before < QUIET_CPU_S:
            return time.perf_counter()
        before = after
    return None


def run_case(workdir: Path, case: str, total: int, args: argparse.Namespace) -> dict[str, Any]:
    spool_root = workdir / f"spool-{case}-{total}"
    due = min(args.due, total) if case == "deferred" else 0
    started_fill = time.perf_counter()
    fill(spool_root, case, total, args.size, due)
    result: dict[str, Any] = {"case": case, "messages": total, "fill_s": round(time.perf_counter() - started_fill, 1),
                              "ok": False}
    note(f"{case} x {total}: filled in {result['fill_s']} s; starting the daemon", quiet=args.json)
    command = shlex.split(args.daemon_cmd) if args.daemon_cmd else [sys.executable, "-m", "mailwatchd", "run"]
    log_path = workdir / f"mailwatchd-{case}-{total}.log"
    notify = NotifyListener()
    proc: subprocess.Popen[bytes] | None = None
    sink: Sink | None = None
    try:
        if due:
            sink = start_aiosmtpd_sink(workdir, "the deferred case's due messages")
            result["due"] = due
        env = environment(spool_root, notify.address, sink.port if sink else free_port(),
                          "info" if case == "deferred" else "warning")
        with open(log_path, "wb") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + args.timeout
        while notify.ready_at is None and not has_exited(proc) and time.perf_counter() < deadline:
            time.sleep(POLL)
        if notify.ready_at is None:
            result["error"] = ("exited before READY=1" if has_exited(proc) else f"no READY=1 in {args.timeout:g}s") + \
                f"; its last lines:\n{tail(log_path)}"
            return result
        ready_at = notify.ready_at
        result["ready_s"] = round(ready_at - started, 3)
        result["cpu_s_at_ready"] = cpu_seconds(proc.pid)
        if case == "new":  # claimed after READY=1: how long until new/ is empty
            while not new_is_empty(spool_root) and not has_exited(proc) and time.perf_counter() < deadline:
                time.sleep(0.02)
            result["all_claimed_s"] = round(time.perf_counter() - started, 3)
        # The due ones found (after READY=1 or before it) and delivered.
        if sink is not None and sink.wait_count(due, max(0.0, deadline - time.perf_counter())) >= due:
            result["due_delivered_s"] = round(time.perf_counter() - started, 3)
        if case == "deferred":  # the idle window starts once the start-up work after READY=1 is done
            quiet = wait_quiet(proc, deadline)
            result["quiet_s"] = round(quiet - started, 3) if quiet is not None else None
            time.sleep(args.settle)
        else:
            time.sleep(max(0.0, ready_at + args.settle - time.perf_counter()))
        if case == "deferred" and args.idle_window > 0:
            before = cpu_seconds(proc.pid)
            time.sleep(args.idle_window)
            after = cpu_seconds(proc.pid)
            if before is not None and after is not None:
                result["idle_cpu_s"] = round(after - before, 3)
                result["idle_window_s"] = args.idle_window
        cpu = cpu_seconds(proc.pid)
        result["cpu_s_before_sigterm"] = round(cpu, 3) if cpu is not None else None
        peak = vm_hwm_kib(proc.pid)
        result["peak_rss_mib"] = round(peak / 1024, 1) if peak is not None else None
        if has_exited(proc):
            result["error"] = f"exited early; its last lines:\n{tail(log_path)}"
            return result
        stopping = time.perf_counter()
        kill_group(proc, signal.SIGTERM)
        status, _ = reap(proc, args.shutdown_timeout)
        result["stop_s"] = round(time.perf_counter() - stopping, 3)
        result["exit_status"] = status
        result["ok"] = status == 0 and (not due or result.get("due_delivered_s") is not None)
        if status != 0:
            result["error"] = f"exit status {status} after SIGTERM; its last lines:\n{tail(log_path)}"
        elif not result["ok"]:
            result["error"] = f"the {due} due messages did not all arrive; its last lines:\n{tail(log_path)}"
        loaded = logged(log_path, "deferred_loaded")  # the lazy load (code that has it), as the daemon timed it
        if loaded is not None:
            result["load_s"] = loaded.get("duration_s")
        return result
    finally:
        stop(proc, grace=args.shutdown_timeout)
        if sink is not None:
            sink.close()
        notify.close()
        if not args.keep:
            subprocess.run(["rm", "-rf", "--one-file-system", str(spool_root)], check=False)


# -- report ---------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def print_table(report: dict[str, Any], out: TextIO) -> None:
    print(f"command   {report['command']}", file=out)
    print(f"machine   {report['cpus']} CPUs, load {report['load_before']} before / {report['load_after']} after, "
          f"spool on {report['spool_filesystem']}, Python {report['python']}", file=out)
    print(f"messages  {report['size']} bytes each; relay 127.0.0.1:<closed port> (deferred: an aiosmtpd sink for the "
          f"{report['due']} due ones); idle window {report['idle_window_s']:g} s, {report['settle_s']:g} s after "
          "READY (deferred: after the daemon is quiet)", file=out)
    print(file=out)
    print(f"{'case':9} {'messages':>9} {'READY s':>8} {'claimed s':>9} {'due s':>6} {'load s':>6} {'quiet s':>7} "
          f"{'CPU@READY s':>11} {'peak RSS MiB':>12} {'idle CPU s':>10} {'stop s':>7} {'fill s':>7}", file=out)
    for row in report["runs"]:
        print(f"{row['case']:9} {row['messages']:>9} {fmt(row.get('ready_s')):>8} {fmt(row.get('all_claimed_s')):>9} "
              f"{fmt(row.get('due_delivered_s')):>6} {fmt(row.get('load_s')):>6} {fmt(row.get('quiet_s')):>7} "
              f"{fmt(row.get('cpu_s_at_ready')):>11} {fmt(row.get('peak_rss_mib'), '.1f'):>12} "
              f"{fmt(row.get('idle_cpu_s'), '.3f'):>10} {fmt(row.get('stop_s')):>7} {fmt(row.get('fill_s'), '.1f'):>7}",
              file=out)
    for row in report["runs"]:
        if row.get("error"):
            print(f"\n{row['case']} x {row['messages']}: ERROR: {row['error']}", file=out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="message counts to run (default 100000 1000000)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="where the messages wait: new/, queue/ (claimed, no state), deferred/ (default all)")
    parser.add_argument("--size", type=int, default=512, help="bytes per message (default 512)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after READY=1 (deferred: after the daemon is quiet) before the idle window "
                             "starts (default 2)")
    parser.add_argument("--due", type=int, default=10,
                        help="deferred messages that are due already, spread over the ids (default 10; 0: none)")
    parser.add_argument("--idle-window", type=float, default=30.0,
                        help="seconds of idle CPU measured in the deferred case (default 30; 0 skips)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for READY=1 (default 600)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds the daemon gets to exit after SIGTERM (default 30)")
    parser.add_argument("--daemon-cmd", default=None,
                        help="command that starts the daemon (default: this Python -m mailwatchd run)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the spools go (default: a new temporary directory; its filesystem matters)")
    parser.add_argument("--keep", action="store_true", help="keep the spools and logs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if min(args.messages) < 1 or args.size < 128:
        parser.error("--messages must be >= 1 and --size >= 128")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.split(args.daemon_cmd) if args.daemon_cmd else [sys.executable, "-m", "mailwatchd", "run"]
    report: dict[str, Any] = {
        "command": " ".join(command), "cpus": os.cpu_count(), "python": platform.python_version(),
        "size": args.size, "idle_window_s": args.idle_window, "settle_s": args.settle, "due": args.due,
        "load_before": " ".join(f"{load:.2f}" for load in os.getloadavg()), "runs": [],
    }
    with work_directory(args) as workdir:
        report["spool_filesystem"] = filesystem_of(workdir)
        for total in args.messages:
            for case in args.cases:
                report["runs"].append(run_case(workdir, case, total, args))
    report["load_after"] = " ".join(f"{load:.2f}" for load in os.getloadavg())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, sys.stdout)
    return 0 if all(row["ok"] for row in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
