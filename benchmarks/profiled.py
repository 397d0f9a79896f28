#!/usr/bin/env python3
"""`mailwatchd run` under cProfile, from READY=1 until the daemon begins to stop (for `--daemon-cmd`).

    python benchmarks/throughput.py --messages 20000 --no-smtp-source \
        --daemon-cmd "python benchmarks/profiled.py /tmp/drain.prof"
    python -c "import pstats; pstats.Stats('/tmp/drain.prof').sort_stats('tottime').print_stats(25)"

The profiler is switched on when the daemon sends READY=1 and off when it sends STOPPING=1, so the
statistics cover the drain only (start-up, recovery and shutdown left out); they are written when
the process exits. `--cpu` measures CPU time of the process (clock_gettime per call: slower, and
blocking system calls then count for what they cost the CPU, not for the time they block) instead
of wall time. Everything else is `python -m mailwatchd run`.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time

from mailwatchd.service import notify


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", help="where the pstats file goes")
    parser.add_argument("--cpu", action="store_true", help="profile process CPU time instead of wall time")
    args = parser.parse_args()
    profiler = cProfile.Profile(time.process_time) if args.cpu else cProfile.Profile()
    ready, stopping = notify.Notifier.ready, notify.Notifier.stopping
    started = False

    def ready_then_profile(self: notify.Notifier) -> None:
        nonlocal started
        ready(self)
        if not started:
            started = True
            profiler.enable()

    def stop_profiling(self: notify.Notifier) -> None:
        profiler.disable()
        stopping(self)

    notify.Notifier.ready = ready_then_profile  # type: ignore[method-assign]
    notify.Notifier.stopping = stop_profiling  # type: ignore[method-assign]
    from mailwatchd.cli import main as cli_main

    sys.argv = ["mailwatchd", "run"]
    try:
        return cli_main()
    finally:
        profiler.disable()
        profiler.dump_stats(args.output)


if __name__ == "__main__":
    raise SystemExit(main())
