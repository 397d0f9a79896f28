#!/usr/bin/env python3
"""Submission benchmark: the wall time of one `mailwatchd sendmail -t`, process start to exit.

Side by side, in one run and interleaved round by round (so a busy moment hits every row alike):
`python -c pass` of the interpreter that runs mailwatchd (the floor no Python program goes
below), `mailwatchd sendmail -t` through the venv's launcher into a throwaway spool (and, when that
launcher is pip's older one that imports re, through the launcher pip 25 and later write for the
same entry point), and, when they are installed, Postfix's and nullmailer's `sendmail -t` as
reference rows. Postfix's goes through a private instance of the installed Postfix
(benchmarks/postfix_running.py: MAIL_CONFIG names its own main.cf and queue; master is not
started, as no mailwatchd daemon runs either), since Debian's "No configuration" leaves none.
See benchmarks/README.md.

    python benchmarks/submit.py [--runs 50] [--size 1024] [--mailwatchd .venv/bin/mailwatchd]

Exit status: 0, or 1 when a mailwatchd run failed or its messages are not all in the spool.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import postfix_running

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAUNCHER = REPO_ROOT / ".venv" / "bin" / "mailwatchd"
WARMUP_RUNS = 2  # not counted: they fill the bytecode cache and the page cache
POSTFIX_LABEL = "postfix sendmail -t"
# Other reference MTAs: (row label, the program that proves the package is there, its sendmail).
REFERENCES = (
    ("nullmailer sendmail -t", Path("/usr/sbin/nullmailer-queue"), Path("/usr/sbin/sendmail")),
)
# The environment the operator's shell may carry and the children must not see.
_FOREIGN_ENV = ("EMAIL_", "MAILWATCHD_", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTHONPATH")


@dataclass
class Row:
    label: str
    argv: list[str] | None  # None: not installed (or cannot run here: `note` says why)
    env: dict[str, str] | None = None  # None: the rows' common environment
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    failures: int = 0
    note: str = ""


def message(size: int) -> bytes:
    """A message as `sendmail -t` gets one from PHP's mail(): no Date, no Message-ID."""
    head = (b"From: Benchmark <bench@example.com>\nTo: nobody@example.invalid\n"
            b"Subject: mailwatchd submission benchmark\n\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.\n"
    return head + (line * (max(size - len(head), 0) // len(line) + 1))[: max(size - len(head), 1)]


def interpreter_of(launcher: Path) -> str:
    """The interpreter in a console-script launcher's #! line."""
    with launcher.open("rb") as file:
        first = file.readline().decode().strip()
    if not first.startswith("#!"):
        raise SystemExit(f"{launcher} has no #! line: pass --mailwatchd the venv's bin/mailwatchd")
    return shlex.split(first[2:])[0]


def launcher_without_re(launcher: Path, directory: Path) -> Path | None:
    """The launcher pip 25 and later write for `launcher`'s entry point (no `import re`), in `directory`
    under the same name; None when `launcher` does not import re (it is such a launcher already)."""
    lines = launcher.read_text().splitlines()
    entry = [line for line in lines if line.startswith("from ") and " import " in line]
    if "import re" not in lines or len(entry) != 1:
        return None
    function = entry[0].rsplit(" import ", 1)[1].strip()
    path = directory / launcher.name
    path.write_text(f"{lines[0]}\nimport sys\n{entry[0]}\nif __name__ == '__main__':\n    sys.exit({function}())\n")
    path.chmod(0o755)
    return path


def postfix_row(workdir: Path, env: dict[str, str], cleanup: contextlib.ExitStack) -> Row:
    """Postfix's sendmail -t through a private instance (its maildrop; master not started)."""
    reason = postfix_running.unavailable_reason()
    if reason is not None:
        return Row(POSTFIX_LABEL, None, note=reason)
    try:
        # the relay port is never used: master does not run, the messages stay in its maildrop
        instance = cleanup.enter_context(postfix_running.RunningPostfix(workdir / "postfix", relay_port=9,
                                                                        use_cgroup=False))
    except (postfix_running.PostfixError, OSError, subprocess.SubprocessError) as exc:
        return Row(POSTFIX_LABEL, None, note=f"the private Postfix could not be set up: {exc}")
    return Row(POSTFIX_LABEL, instance.sendmail_argv(["-t"]), env={**env, "MAIL_CONFIG": str(instance.config_dir)})


def reference_rows() -> list[Row]:
    rows = []
    for label, proof, program in REFERENCES:
        installed = proof.exists() and program.exists() and "mailwatchd" not in str(program.resolve())
        rows.append(Row(label, [str(program), "-t"] if installed else None))
    return rows


def run_once(row: Row, data: bytes, env: dict[str, str]) -> None:
    assert row.argv is not None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(row.argv, input=data, env=row.env or env, capture_output=True, check=False)
    row.wall.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row.cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        row.failures += 1
        row.note = f"exit {done.returncode}: {done.stderr.decode(errors='replace').strip()[:200]}"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def filesystem_of(path: Path) -> str:
    try:
        out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="measured runs per row (default 50)")
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes (default 1024)")
    parser.add_argument("--mailwatchd", type=Path, default=DEFAULT_LAUNCHER,
                        help=f"the console-script launcher (default {DEFAULT_LAUNCHER.relative_to(REPO_ROOT)})")
    parser.add_argument("--no-references", action="store_true", help="skip Postfix's and nullmailer's sendmail")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    launcher = args.mailwatchd
    if not launcher.is_file():
        parser.error(f"{launcher} does not exist: create the venv (pip install -e .) or pass --mailwatchd")
    python = interpreter_of(launcher)
    data = message(args.size)

    with tempfile.TemporaryDirectory(prefix="mailwatchd-submit-bench-") as workdir, \
            contextlib.ExitStack() as cleanup:
        spool = Path(workdir) / "spool"
        env = {key: value for key, value in os.environ.items() if not key.startswith(_FOREIGN_ENV)}
        # Installed packages come with their bytecode compiled; a checkout may not (and with
        # PYTHONDONTWRITEBYTECODE it never would be): compile into a throwaway cache, as pip would.
        env["PYTHONPYCACHEPREFIX"] = str(Path(workdir) / "pycache")
        env["MAILWATCHD_SPOOL"] = str(spool)
        ours = [Row("mailwatchd sendmail -t", [str(launcher), "sendmail", "-t"])]
        (Path(workdir) / "bin").mkdir()
        if (newer := launcher_without_re(launcher, Path(workdir) / "bin")) is not None:
            ours.append(Row("  launcher without import re", [str(newer), "sendmail", "-t"]))
        rows = [Row("python -c pass (the floor)", [python, "-c", "pass"]), *ours]
        if not args.no_references:
            rows += [postfix_row(Path(workdir), env, cleanup), *reference_rows()]
        measured = [row for row in rows if row.argv is not None]
        for _ in range(WARMUP_RUNS):
            for row in measured:
                run_once(row, data, env)
        for row in measured:
            row.wall.clear()
            row.cpu.clear()
        load_before = os.getloadavg()
        for _ in range(args.runs):
            for row in measured:
                run_once(row, data, env)
        load_after = os.getloadavg()
        queued = len(os.listdir(spool / "new")) if (spool / "new").is_dir() else 0
        fs = filesystem_of(Path(workdir))

    print(f"command line: {shlex.join([sys.executable, *sys.argv])}")
    print(f"host: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"interpreter: {python}; launcher: {launcher}")
    print(f"spool: a throwaway directory on {fs}; {args.runs} runs per row, interleaved, after {WARMUP_RUNS} "
          f"warm-up rounds; message {len(data)} bytes; bytecode cached (PYTHONPYCACHEPREFIX)")
    print()
    print(f"{'':<30} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'CPU ms':>8}  runs")
    floor = statistics.median(rows[0].wall)
    for row in rows:
        if row.argv is None:
            print(f"{row.label:<30} {'not installed':>10}" if not row.note else f"{row.label:<30} skipped: {row.note}")
            continue
        print(f"{row.label:<30} {statistics.median(row.wall) * 1e3:>10.1f} {percentile(row.wall, 0.9) * 1e3:>8.1f} "
              f"{min(row.wall) * 1e3:>8.1f} {statistics.median(row.cpu) * 1e3:>8.1f}  {len(row.wall)}"
              + (f"  ({row.failures} failed: {row.note})" if row.failures else ""))
    for row, label in zip(ours, ("  mailwatchd over the floor", "  without import re, over the floor"), strict=False):
        print(f"{label:<30} {(statistics.median(row.wall) - floor) * 1e3:>10.1f}")
    failures, expected = sum(row.failures for row in ours), (args.runs + WARMUP_RUNS) * len(ours)
    if failures or queued != expected:
        print(f"\nFAILED: {failures} mailwatchd run(s) failed; {queued} of {expected} messages in new/",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
