#!/usr/bin/env python3
"""`mailwatchd run` under cProfile, from READY=1 until the daemon begins to stop (for `--daemon-cmd`).

    python benchmarks/throughput.py --messages 20000 --no-smtp-source \
        --daemon-cmd "python benchmarks/profiled.py /tmp/drain.prof"
    python -c "import pstats; pstats.Stats('/tmp/drain.prof').sort_stats('tottime').print_stats(25)"

The profiler is switched on when the daemon sends READY=1 and off when it sends STOPPING=1, so the
statistics cover the drain only (start-up, recovery and shutdown left out); they are written when
the process exits. `--cpu` measures CPU time of the process (clock_gettime per call: slower, and
blocking system calls then count for what they cost the CPU, not for the time they block) instead
of wall time. `--threads FILE` also writes each thread's user and system CPU seconds over the same
span (from /proc/self/task, as JSON: {"<name>:<tid>": [user, system]}), and `--no-profile` leaves
cProfile off, so the threads' figures are those of an unprofiled drain. Everything else is
`python -m mailwatchd run`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import sys
import time

from mailwatchd.service import notify


def thread_cpu() -> dict[str, tuple[float, float]]:
    """Each thread's (user, system) CPU seconds so far, by "<comm>:<tid>"."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[str, tuple[float, float]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat, open(f"/proc/self/task/{tid}/comm") as comm:
                fields, name = stat.read().rpartition(")")[2].split(), comm.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        found[f"{name}:{tid}"] = (int(fields[11]) / tick, int(fields[12]) / tick)  # utime, stime: proc(5)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", help="where the pstats file goes")
    parser.add_argument("--cpu", action="store_true", help="profile process CPU time instead of wall time")
    parser.add_argument("--threads", metavar="FILE", help="write each thread's CPU from READY to STOPPING here")
    parser.add_argument("--no-profile", action="store_true", help="leave cProfile off (with --threads)")
    args = parser.parse_args()
    profiler = cProfile.Profile(time.process_time) if args.cpu else cProfile.Profile()
    ready, stopping = notify.Notifier.ready, notify.Notifier.stopping
    started = False
    marks: dict[str, dict[str, tuple[float, float]]] = {}

    def ready_then_profile(self: notify.Notifier) -> None:
        nonlocal started
        ready(self)
        if not started:
            started = True
            marks["ready"] = thread_cpu()
            if not args.no_profile:
                profiler.enable()

    def stop_profiling(self: notify.Notifier) -> None:
        profiler.disable()
        marks.setdefault("stopping", thread_cpu())
        stopping(self)

    notify.Notifier.ready = ready_then_profile  # type: ignore[method-assign]
    notify.Notifier.stopping = stop_profiling  # type: ignore[method-assign]
    from mailwatchd.cli import main as cli_main

    sys.argv = ["mailwatchd", "run"]
    try:
        return cli_main()
    finally:
        profiler.disable()
        if not args.no_profile:
            profiler.dump_stats(args.output)
        if args.threads and "ready" in marks:
            before, after = marks["ready"], marks.get("stopping", thread_cpu())
            spent = {key: (round(user - before.get(key, (0.0, 0.0))[0], 3),
                           round(system - before.get(key, (0.0, 0.0))[1], 3)) for key, (user, system) in after.items()}
            with open(args.threads, "w") as out:
                json.dump(spent, out)


if __name__ == "__main__":
    raise SystemExit(main())
