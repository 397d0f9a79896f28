#!/usr/bin/env python3
"""Throughput benchmark: mailwatchd against a naive smtplib loop, Postfix's smtp-source and a running Postfix.

All of them send to the same local sink, Postfix's `smtp-sink` (taken from Debian's postfix
package with `apt-get download` + `dpkg -x`, nothing installed), or an aiosmtpd sink in a
separate process when that package cannot be had. The running Postfix is the INSTALLED one as a
private null client (benchmarks/postfix_running.py), skipped where Postfix is not installed.
See benchmarks/README.md.

    python benchmarks/throughput.py [--messages 2000] [--size 4096] [--concurrency 2]
                                    [--sink auto|smtp-sink|aiosmtpd] [--no-postfix] [--json]

Exit status: 0 when every phase delivered all messages, 1 when one did not (mailwatchd
included), 2 when the sink could not be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import email.utils
import errno
import importlib.metadata
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import postfix_running

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
HOST = "127.0.0.1"
POLL = 0.005  # seconds between completion checks: the wall-clock resolution of a run
_COUNTER = re.compile(rb"mesg=(\d+)\r")
GOALS = {"ratio_mailwatchd_postfix": 1.5, "ratio_mailwatchd_naive": 1.0}  # issue 10, in the same run
SUBMITTERS = 4  # parallel `sendmail` processes filling the running Postfix's maildrop (not timed)
# The environment a daemon might pick up from the operator's shell and must not see here.
_FOREIGN_ENV = ("EMAIL_", "MAILWATCHD_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "JOURNAL_STREAM",
                "CREDENTIALS_DIRECTORY", "INVOCATION_ID")


class BenchError(Exception):
    """A phase could not run; the text says why and, where there is one, what to do."""


def note(message: str, *, quiet: bool) -> None:
    if not quiet:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group of a child started with start_new_session=True."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """True once the child has exited, without reaping it (its rusage stays for wait4)."""
    if proc.returncode is not None:
        return True
    try:
        result = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return result is not None and result.si_pid == proc.pid


def reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, resource.struct_rusage | None]:
    """wait4(2) the child (SIGKILL to its group after `timeout`): exit code and exact rusage."""
    if proc.returncode is not None:
        return proc.returncode, None
    timer = threading.Timer(timeout, kill_group, (proc, signal.SIGKILL))
    timer.daemon = True
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # somebody else reaped it
        proc.returncode = proc.returncode if proc.returncode is not None else -1
        return proc.returncode, None
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def stop(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """SIGTERM the child's group, SIGKILL it after `grace`, reap it. Safe to call twice."""
    if proc is None or proc.returncode is not None:
        return
    kill_group(proc, signal.SIGTERM)
    reap(proc, grace)
    kill_group(proc, signal.SIGKILL)  # leftovers in the group, if any


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def filesystem_of(path: Path) -> str:
    """The type of the filesystem `path` is on (the longest matching mount point)."""
    best, kind = "", "?"
    target = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1].replace("\\040", " ")
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, parts[2]
    return kind


# -- Postfix's smtp-sink and smtp-source, from the Debian package ---------------------------


@dataclass
class Postfix:
    root: Path  # the unpacked package
    version: str

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = str(self.root / "usr/lib/postfix")
        env["LD_LIBRARY_PATH"] = f"{libdir}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libdir
        return env

    def tool(self, name: str) -> str:
        return str(self.root / "usr/sbin" / name)


def fetch_postfix(cache: Path, *, quiet: bool) -> Postfix:
    """Debian's postfix package, downloaded and unpacked once into `cache` (never installed)."""
    root = cache / "postfix"
    version_file = root / "VERSION"
    if (root / "usr/sbin/smtp-sink").is_file() and version_file.is_file():
        return Postfix(root, version_file.read_text(encoding="utf-8").strip())
    for tool in ("apt-get", "dpkg", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not available (this needs a Debian-like system)")
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# downloaded and unpacked packages: never committed\n*\n", encoding="utf-8")
    note(f"downloading Debian's postfix package into {debs} (apt-get download; nothing is installed)", quiet=quiet)
    done = subprocess.run(["apt-get", "download", "postfix"], cwd=debs, capture_output=True, text=True,
                          timeout=300, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"apt-get download postfix failed: {last} (no Debian mirror reachable? "
                         "`apt-get update` may be needed once)")
    packages = sorted(debs.glob("postfix_*.deb"), key=lambda path: path.stat().st_mtime)
    if not packages:
        raise BenchError(f"apt-get download postfix left no postfix_*.deb in {debs}")
    package = packages[-1]
    version = subprocess.run(["dpkg-deb", "-f", str(package), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    staging = Path(tempfile.mkdtemp(prefix="postfix.", dir=cache))
    try:
        subprocess.run(["dpkg", "-x", str(package), str(staging)], check=True, capture_output=True)
        (staging / "VERSION").write_text(version + "\n", encoding="utf-8")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Postfix(root, version)


# -- the sink ------------------------------------------------------------------------------------


@dataclass
class Sink:
    """A running SMTP sink; `count()` is how many messages it has taken so far ("." received)."""

    kind: str
    version: str
    port: int
    proc: subprocess.Popen[bytes]
    counter_path: Path
    stderr_path: Path
    extensions: list[str] = field(default_factory=list)
    note: str = ""
    _fd: int = -1

    def count(self) -> int:
        """The last `mesg=N` the sink wrote: both sinks print `... mesg=N\\r` per message."""
        if self._fd < 0:
            self._fd = os.open(self.counter_path, os.O_RDONLY | os.O_CLOEXEC)
        size = os.fstat(self._fd).st_size
        chunk = os.pread(self._fd, 256, max(0, size - 256))
        found = _COUNTER.findall(chunk)
        return int(found[-1]) if found else 0

    def wait_count(self, target: int, timeout: float) -> int:
        """Poll until the sink has counted `target` messages or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while (seen := self.count()) < target and time.monotonic() < deadline:
            time.sleep(POLL)
        return seen

    def close(self) -> None:
        stop(self.proc)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def ehlo_extensions(port: int, proc: subprocess.Popen[bytes], stderr_path: Path, timeout: float = 10.0) -> list[str]:
    """Connect and EHLO until the sink answers; its advertised extensions."""
    deadline = time.monotonic() + timeout
    while True:
        if has_exited(proc):
            raise BenchError(f"the sink exited at start-up: {tail(stderr_path) or 'no message'}")
        try:
            with smtplib.SMTP(HOST, port, timeout=2) as client:
                code, _ = client.ehlo()
                if code != 250:
                    raise BenchError(f"the sink answered EHLO with {code}")
                return [f"{name.upper()} {args.strip()}".strip() for name, args in client.esmtp_features.items()]
        except (ConnectionRefusedError, smtplib.SMTPServerDisconnected, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise BenchError(f"the sink did not answer on {HOST}:{port}: {exc}") from None
            time.sleep(POLL)


def start_smtp_sink(postfix: Postfix, workdir: Path) -> Sink:
    """smtp-sink: ESMTP, PIPELINING, accepts everything, `-c` keeps a running message count."""
    last_error: BenchError | None = None
    for attempt in range(3):  # the port can be taken between choosing and binding it
        port = free_port()
        counter_path = workdir / f"smtp-sink.{attempt}.count"
        stderr_path = workdir / f"smtp-sink.{attempt}.stderr"
        privileges = ["-u", "nobody"] if os.geteuid() == 0 else []  # required as root, refused otherwise
        command = [postfix.tool("smtp-sink"), *privileges, "-c", "-4", f"{HOST}:{port}", "1000"]
        with open(counter_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=postfix.env,
                                    start_new_session=True)
        try:
            extensions = ehlo_extensions(port, proc, stderr_path)
        except BenchError as exc:
            stop(proc)
            last_error = exc
            if "address already in use" in tail(stderr_path).lower():
                continue
            raise
        return Sink("smtp-sink", f"postfix {postfix.version}", port, proc, counter_path, stderr_path, extensions,
                    note=" ".join(shlex.quote(part) for part in command))
    assert last_error is not None
    raise last_error


def start_aiosmtpd_sink(workdir: Path, reason: str) -> Sink:
    """The fallback: an aiosmtpd server in its own process, counting like smtp-sink -c."""
    try:
        aiosmtpd_version = importlib.metadata.version("aiosmtpd")
    except importlib.metadata.PackageNotFoundError:
        raise BenchError("aiosmtpd is not installed for this Python (pip install aiosmtpd)") from None
    port = free_port()
    counter_path = workdir / "aiosmtpd.count"
    stderr_path = workdir / "aiosmtpd.stderr"
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-aiosmtpd", str(port)]
    with open(counter_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    try:
        extensions = ehlo_extensions(port, proc, stderr_path)
    except BenchError:
        stop(proc)
        raise
    return Sink("aiosmtpd", f"aiosmtpd {aiosmtpd_version}", port, proc, counter_path, stderr_path, extensions,
                note=reason)


def serve_aiosmtpd(port: int) -> int:
    """Run the fallback sink (the --serve-aiosmtpd child): accept everything, count on stdout."""
    import asyncio

    from aiosmtpd.smtp import SMTP

    class Counter:
        def __init__(self) -> None:
            self.messages = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
            self.messages += 1
            os.write(1, f"mesg={self.messages}\r".encode())
            return "250 2.0.0 Ok: queued"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Counter()
        server = await loop.create_server(lambda: SMTP(handler, hostname="aiosmtpd-sink"), HOST, port)
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        server.close()

    asyncio.run(main())
    return 0


def open_sink(choice: str, postfix: Postfix | None, postfix_error: str, workdir: Path, *, quiet: bool) -> Sink:
    if choice == "aiosmtpd":
        return start_aiosmtpd_sink(workdir, "chosen with --sink aiosmtpd")
    if postfix is not None:
        try:
            return start_smtp_sink(postfix, workdir)
        except BenchError as exc:
            if choice == "smtp-sink":
                raise
            postfix_error = f"smtp-sink would not start: {exc}"
    elif choice == "smtp-sink":
        raise BenchError(postfix_error)
    note(f"FALLBACK to an aiosmtpd sink: {postfix_error}", quiet=False)
    return start_aiosmtpd_sink(workdir, f"fallback: {postfix_error}")


# -- the messages --------------------------------------------------------------------------------


def make_message(index: int, total: int, size: int, date: str, token: str) -> bytes:
    """An RFC 5322 message of `size` bytes (LF line ends, as spool files have); Bcc on every 10th."""
    number = index + 1
    fields = [
        "From: Benchmark Sender <sender@bench.example>",
        f"To: Recipient {number} <rcpt{number}@bench.example>",
        *([f"Bcc: Hidden {number} <bcc{number}@bench.example>"] if number % 10 == 0 else []),
        f"Subject: mailwatchd throughput {number} of {total}",
        f"Date: {date}",
        f"Message-ID: <{number}.{token}@bench.example>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
    ]
    head = ("\n".join(fields) + "\n\n").encode("ascii")
    remaining = max(size - len(head), 2)
    filler = f"message {number:06d} line {{:04d}} " + "abcdefghijklmnopqrstuvwxyz0123456789" * 2
    lines = []
    line_number = 0
    while remaining > 0:
        line_number += 1
        width = min(72, remaining - 1)
        lines.append(filler.format(line_number)[:width].encode("ascii") + b"\n")
        remaining -= width + 1
    return head + b"".join(lines)


def prefill(spool: Path, total: int, size: int) -> Path:
    """A fresh spool with `total` messages in new/, each written in tmp/ and renamed (Maildir)."""
    tmp, new = spool / "tmp", spool / "new"
    for path in (spool, tmp, new):
        path.mkdir(mode=0o700, parents=True, exist_ok=False)
    date = email.utils.formatdate()
    token = secrets.token_hex(6)
    stamp = int(time.time())
    for index in range(total):
        name = f"{stamp}.M{index:06d}P{os.getpid()}.bench"
        with open(tmp / name, "xb") as handle:
            handle.write(make_message(index, total, size, date, token))
        os.rename(tmp / name, new / name)
    os.sync()  # the prefill's dirty pages must not be written back during the timed run
    return new


# -- the phases ----------------------------------------------------------------------------------


def rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def run_naive(sink: Sink, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One smtplib connection; per file: read, parse the header (email.parser), CRLF, sendmail, unlink."""
    new = prefill(workdir / "spool-naive", args.messages, args.size)
    names = sorted(os.listdir(new))
    parser = email.parser.BytesHeaderParser()
    before = sink.count()
    started, cpu_started = time.perf_counter(), time.process_time()
    with smtplib.SMTP(HOST, sink.port, timeout=30) as client:
        for name in names:
            path = new / name
            raw = path.read_bytes()
            headers = parser.parsebytes(raw)
            sender = email.utils.parseaddr(headers.get("From", ""))[1]
            fields = [*headers.get_all("To", []), *headers.get_all("Cc", []), *headers.get_all("Bcc", [])]
            recipients = [address for _, address in email.utils.getaddresses(fields) if address]
            # smtplib converts line ends only in str messages; bytes go out as they are, and
            # SMTP needs CRLF (smtp-sink takes bare LF, aiosmtpd does not).
            client.sendmail(sender, recipients, raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            path.unlink()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    delivered = sink.wait_count(before + args.messages, 10.0) - before
    result: dict[str, Any] = {
        "ok": delivered == args.messages,
        "delivered": delivered,
        "wall_s": round(wall, 3),
        "msg_per_s": rate(args.messages, wall),
        "cpu_ms_per_msg": round(cpu * 1000 / args.messages, 3),
    }
    if not result["ok"]:
        result["error"] = f"the sink counted {delivered} of {args.messages} messages"
    return result


def run_smtp_source(sink: Sink, postfix: Postfix, workdir: Path, args: argparse.Namespace,
                    *, reuse: bool) -> dict[str, Any]:
    """Postfix's smtp-source: the C client's rate against the same sink (no pipelining)."""
    command = [postfix.tool("smtp-source"), "-c", "-l", str(args.size), "-m", str(args.messages),
               "-s", str(args.concurrency), *(["-d"] if reuse else []), f"{HOST}:{sink.port}"]
    stderr_path = workdir / f"smtp-source{'-d' if reuse else ''}.stderr"
    before = sink.count()
    with open(stderr_path, "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=postfix.env, start_new_session=True)
    try:
        status, usage = reap(proc, args.timeout)
        wall = time.perf_counter() - started
    finally:
        stop(proc)
    delivered = sink.wait_count(before + args.messages, 10.0) - before
    shown = [Path(command[0]).name, *command[1:]]
    result: dict[str, Any] = {
        "ok": status == 0 and delivered == args.messages,
        "command": " ".join(shown),
        "delivered": delivered,
        "wall_s": round(wall, 3),
        "msg_per_s": rate(args.messages, wall),
        "cpu_ms_per_msg": round((usage.ru_utime + usage.ru_stime) * 1000 / args.messages, 3) if usage else None,
    }
    if not result["ok"]:
        result["error"] = f"exit status {status}, sink counted {delivered}: {tail(stderr_path, 3)}"
    return result


def submit_to_postfix(postfix: postfix_running.RunningPostfix, args: argparse.Namespace) -> float:
    """The same N messages as the other phases, through its `sendmail -t -i` into its maildrop (master
    stopped, so nothing is picked up yet): the seconds it took (not part of any figure)."""
    date = email.utils.formatdate()
    token = secrets.token_hex(6)
    options = ["-t", "-i", "-f", "sender@bench.example"]  # the envelope mailwatchd takes from From:

    def submit(index: int) -> None:
        postfix.sendmail(options, make_message(index, args.messages, args.size, date, token))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=SUBMITTERS) as pool:
        for _ in pool.map(submit, range(args.messages)):
            pass
    took = time.perf_counter() - started
    os.sync()  # as after prefill(): no write-back of the submission during the timed run
    return took


def run_postfix_running(sink: Sink, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The installed Postfix as a private null client relaying to the sink: N messages in its maildrop,
    timed from `postfix start` until the sink counted N and its queue is empty."""
    reason = postfix_running.unavailable_reason()
    if reason is not None:
        return {"skipped": reason}
    result: dict[str, Any] = {"ok": False}
    try:
        with postfix_running.RunningPostfix(workdir / "postfix-running", sink.port) as postfix:
            result["cpu_method"] = postfix.cpu_method
            result["submit_s"] = round(submit_to_postfix(postfix, args), 3)
            waiting = postfix.queued()
            if waiting != args.messages:
                result["error"] = f"{waiting} of {args.messages} messages in its maildrop after sendmail"
                return result
            before = sink.count()
            cpu_before = postfix.cpu_seconds() or 0.0  # nothing of it runs yet
            started = time.perf_counter()
            start_s = postfix.start()
            cpu_at_started = postfix.cpu_seconds()
            deadline = started + args.timeout
            progress = (time.perf_counter(), -1, -1)
            while True:
                delivered, queued = sink.count() - before, postfix.queued()
                now = time.perf_counter()
                if delivered >= args.messages and queued == 0:
                    break
                if (delivered, queued) != progress[1:]:
                    progress = (now, delivered, queued)
                elif now - progress[0] > args.stall:
                    result["error"] = (f"no progress for {args.stall:g}s: the sink counted {delivered}, "
                                       f"its queue holds {queued}; maillog: {postfix.log_tail(3)}")
                    break
                if now >= deadline:
                    result["error"] = (f"not done after {args.timeout:g}s: the sink counted {delivered}, "
                                       f"its queue holds {queued}; maillog: {postfix.log_tail(3)}")
                    break
                time.sleep(POLL)
            wall = time.perf_counter() - started
            cpu_end = postfix.cpu_seconds()
        delivered = sink.count() - before  # after stop: duplicates show here
    except (postfix_running.PostfixError, OSError, subprocess.SubprocessError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result.update({
        "delivered": delivered,
        "wall_s": round(wall, 3),
        "msg_per_s": rate(args.messages, wall),
        "postfix_start_s": round(start_s, 3),
        "msg_per_s_after_start": rate(args.messages, wall - start_s),
    })
    if cpu_end is not None:
        result["cpu_s_total"] = round(cpu_end - cpu_before, 3)
        result["cpu_ms_per_msg"] = round((cpu_end - cpu_before) * 1000 / args.messages, 3)
        if cpu_at_started is not None:
            result["cpu_s_postfix_start"] = round(cpu_at_started - cpu_before, 3)
            result["cpu_ms_per_msg_after_start"] = round((cpu_end - cpu_at_started) * 1000 / args.messages, 3)
    if "error" not in result and delivered != args.messages:
        word = "duplicates: " if delivered > args.messages else ""
        result["error"] = f"{word}the sink counted {delivered} of {args.messages} messages"
    result["ok"] = "error" not in result
    return result


class NotifyListener:
    """An sd_notify(3) socket (abstract namespace): notes when the daemon sends READY=1.

    A thread drains it, so a daemon sending STATUS= often never blocks on a full queue.
    """

    def __init__(self) -> None:
        self.address = f"@mailwatchd-bench-{os.getpid()}-{secrets.token_hex(4)}"
        self.ready_at: float | None = None
        self.datagrams = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:])
        self._sock.settimeout(0.1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="notify", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stopping.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.datagrams += 1
            if self.ready_at is None and b"READY=1" in data.split(b"\n"):
                self.ready_at = time.perf_counter()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2)
        self._sock.close()


def spool_backlog(spool: Path) -> dict[str, int]:
    """Entries (any name) still in new/, queue/ and deferred/ — all must be gone at the end."""
    backlog = {}
    for name in ("new", "queue", "deferred"):
        try:
            backlog[name] = len(os.listdir(spool / name))
        except FileNotFoundError:
            backlog[name] = 0
    return backlog


def failures(spool: Path, limit: int = 5) -> tuple[int, list[str]]:
    """How many messages are in failed/, with the recorded reason of the first few."""
    try:
        names = sorted(name for name in os.listdir(spool / "failed") if not name.startswith("."))
    except FileNotFoundError:
        return 0, []
    reasons = []
    for name in names[:limit]:
        try:
            state = json.loads((spool / "meta" / f"{name}.json").read_text(encoding="utf-8"))
            reasons.append(f"{name}: {state.get('reason', '?')}")
        except (OSError, ValueError, AttributeError):
            reasons.append(f"{name}: (no readable meta/{name}.json)")
    return len(names), reasons


def daemon_environment(spool: Path, sink: Sink, args: argparse.Namespace, notify_socket: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_FOREIGN_ENV)}
    pythonpath = os.environ.get("PYTHONPATH")
    env.update({
        "PYTHONPATH": f"{REPO_ROOT}:{pythonpath}" if pythonpath else str(REPO_ROOT),
        "MAILWATCHD_SPOOL": str(spool),
        "EMAIL_HOST": HOST,
        "EMAIL_PORT": str(sink.port),
        "EMAIL_USE_TLS": "false",
        "EMAIL_USE_SSL": "false",
        "MAILWATCHD_CONCURRENCY": str(args.concurrency),
        "MAILWATCHD_LISTEN": "",  # no SMTP listener: this measures the spool drain
        "MAILWATCHD_LOG_LEVEL": "warning",
        "MAILWATCHD_LOG_FORMAT": "json",
        "NOTIFY_SOCKET": notify_socket,
    })
    return env


def run_mailwatchd(sink: Sink, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The daemon as a real process on a pre-filled spool, timed until the spool is drained."""
    spool = workdir / "spool-mailwatchd"
    prefill(spool, args.messages, args.size)
    command = shlex.split(args.daemon_cmd) if args.daemon_cmd else [sys.executable, "-m", "mailwatchd", "run"]
    log_path = workdir / "mailwatchd.log"
    result: dict[str, Any] = {"ok": False, "command": " ".join(command)}
    notify = NotifyListener()
    proc: subprocess.Popen[bytes] | None = None
    try:
        env = daemon_environment(spool, sink, args, notify.address)
        before = sink.count()
        with open(log_path, "wb") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        outcome = watch_daemon(proc, spool, sink, before, started, notify, log_path, args)
        result.update(outcome)
        if has_exited(proc):
            status, _ = reap(proc, 1.0)
            output = tail(log_path)
            if not outcome.get("delivered"):
                last = output.splitlines()[-1] if output else "no output"
                result["error"] = (f"mailwatchd is not runnable (`{' '.join(command)}` exited with status {status} "
                                   f"before delivering anything): {last}")
            else:
                result["error"] = f"mailwatchd exited early with status {status}; its last lines:\n{output}"
            return result
        cpu_before_term = cpu_seconds(proc.pid)
        peak_rss_kib = vm_hwm_kib(proc.pid)
        kill_group(proc, signal.SIGTERM)
        status, usage = reap(proc, args.shutdown_timeout)
        result["exit_status"] = status
        if usage is not None:
            cpu_total = usage.ru_utime + usage.ru_stime
            result["cpu_s_total"] = round(cpu_total, 3)
            result["cpu_s_user"], result["cpu_s_system"] = round(usage.ru_utime, 3), round(usage.ru_stime, 3)
            result["cpu_ms_per_msg"] = round(cpu_total * 1000 / args.messages, 3)
            # KiB on Linux. It counts the RSS the child had before exec(), a copy of this
            # benchmark's, so it is a floor of ~25 MiB; VmHWM (the daemon's own mm) is not.
            result["ru_maxrss_mib"] = round(usage.ru_maxrss / 1024, 1)
        if peak_rss_kib is not None:
            result["peak_rss_mib"] = round(peak_rss_kib / 1024, 1)
        elif usage is not None:
            result["peak_rss_mib"] = result["ru_maxrss_mib"]
        if cpu_before_term is not None:
            result["cpu_s_before_sigterm"] = round(cpu_before_term, 3)
        ready_cpu = result.pop("_cpu_at_ready", None)
        if cpu_before_term is not None and ready_cpu is not None:
            result["cpu_ms_per_msg_after_ready"] = round((cpu_before_term - ready_cpu) * 1000 / args.messages, 3)
        delivered = sink.count() - before  # again, after the daemon is gone: duplicates show here
        result["delivered"] = delivered
        failed, reasons = failures(spool)
        result["failed"] = failed
        result["log_lines"] = sum(1 for line in log_path.read_bytes().splitlines() if line.strip())
        problems = []
        if outcome.get("timed_out"):
            problems.append(outcome["timed_out"])
        if failed:
            problems.append(f"{failed} message(s) in failed/: " + "; ".join(reasons))
        if delivered != args.messages:
            word = "duplicates: " if delivered > args.messages else ""
            problems.append(f"{word}the sink counted {delivered} of {args.messages} messages")
        result["ok"] = not problems
        if problems:
            result["error"] = "; ".join(problems)
        if status != 0:
            last_lines = tail(log_path, 3)
            result["warning"] = f"mailwatchd exited with status {status} after SIGTERM" + \
                (f"; its last lines:\n{last_lines}" if last_lines else "")
        return result
    finally:
        stop(proc, grace=args.shutdown_timeout)
        notify.close()


def prefill_deferred(spool: Path, total: int, size: int, due_in: float) -> None:
    """A fresh spool with `total` deferred messages, none due for `due_in` seconds, stored by the spool's
    own code (Spool.add: state first, then the message). fsync is skipped while filling (a single
    os.sync() at the end): 200,000 fsyncs would take minutes and measure nothing the run needs."""
    sys.path.insert(0, str(REPO_ROOT))
    from mailwatchd.spool.messagestate import MessageState
    from mailwatchd.spool.store import Location, Spool

    store = Spool(spool)
    store.create_layout()
    date = email.utils.formatdate()
    token = secrets.token_hex(6)
    due = time.time() + due_in
    real_fsync = os.fsync
    os.fsync = lambda fd: None  # this process only, while filling
    try:
        for index in range(total):
            queue_id = store.new_id()
            state = MessageState(queue_id, time.time(), attempts=1, next_attempt_at=due + index * 1e-3,
                                 first_failure_at=time.time())
            store.add(make_message(index, total, size, date, token), state, Location.DEFERRED)
    finally:
        os.fsync = real_fsync
    os.sync()


def run_idle(sink: Sink, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The daemon on a spool of N deferred messages not due: its CPU over `--idle-window` s after READY."""
    spool = workdir / "spool-idle"
    filled = time.perf_counter()
    prefill_deferred(spool, args.idle, args.size, due_in=3600.0)
    command = shlex.split(args.daemon_cmd) if args.daemon_cmd else [sys.executable, "-m", "mailwatchd", "run"]
    log_path = workdir / "mailwatchd-idle.log"
    result: dict[str, Any] = {"ok": False, "deferred": args.idle, "window_s": args.idle_window,
                              "prefill_s": round(time.perf_counter() - filled, 1)}
    notify = NotifyListener()
    proc: subprocess.Popen[bytes] | None = None
    try:
        env = daemon_environment(spool, sink, args, notify.address)
        with open(log_path, "wb") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + args.timeout
        while notify.ready_at is None and not has_exited(proc) and time.perf_counter() < deadline:
            time.sleep(POLL)
        if notify.ready_at is None:
            result["error"] = f"no READY=1 within {args.timeout:g}s: {tail(log_path, 3) or 'no output'}"
            return result
        result["ready_s"] = round(notify.ready_at - started, 3)
        datagrams_at_ready = notify.datagrams
        cpu_at_ready = cpu_seconds(proc.pid)
        time.sleep(args.idle_window)
        cpu_after = cpu_seconds(proc.pid)
        if cpu_at_ready is None or cpu_after is None or has_exited(proc):
            result["error"] = f"the daemon exited while idle: {tail(log_path, 3) or 'no output'}"
            return result
        result["idle_cpu_s"] = round(cpu_after - cpu_at_ready, 3)
        result["notify_datagrams"] = notify.datagrams - datagrams_at_ready
        result["peak_rss_mib"] = round((vm_hwm_kib(proc.pid) or 0) / 1024, 1)
        result["ok"] = True
        return result
    finally:
        stop(proc, grace=args.shutdown_timeout)
        notify.close()


def vm_hwm_kib(pid: int) -> int | None:
    """The process's peak resident set size since its exec(), from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of the process and its running children (the daemon's SMTP listener)."""
    try:
        import psutil

        process = psutil.Process(pid)
        total = 0.0
        for member in (process, *process.children(recursive=True)):
            times = member.cpu_times()
            total += times.user + times.system
    except Exception:  # psutil missing, or the process is gone
        return None
    return total


def watch_daemon(proc: subprocess.Popen[bytes], spool: Path, sink: Sink, before: int, started: float,
                 notify: NotifyListener, log_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Poll until the sink counted N and new/, queue/, deferred/ are empty (or no more can come)."""
    deadline = started + args.timeout
    ready_at: float | None = None
    cpu_at_ready: float | None = None
    log_offset = 0
    last_progress = (started, -1, "")
    next_dir_check = started
    outcome: dict[str, Any] = {}
    while True:
        now = time.perf_counter()
        if ready_at is None:
            ready_at = notify.ready_at
            if ready_at is None:
                with open(log_path, "rb") as log:
                    log.seek(log_offset)
                    chunk = log.read()
                if b"daemon_ready" in chunk:
                    ready_at = now
                log_offset += max(0, chunk.rfind(b"\n") + 1)
            if ready_at is not None:
                cpu_at_ready = cpu_seconds(proc.pid)
        if has_exited(proc):
            outcome["delivered"] = sink.count() - before
            return outcome
        delivered = sink.count() - before
        if delivered >= args.messages or now >= next_dir_check:
            backlog = spool_backlog(spool)
            if not any(backlog.values()):  # everything was delivered or failed
                break
            next_dir_check = now + 0.1
            if (delivered, str(backlog)) != last_progress[1:]:
                last_progress = (now, delivered, str(backlog))
            elif now - last_progress[0] > args.stall:
                outcome["timed_out"] = (f"no progress for {args.stall:g}s: the sink counted {delivered}, "
                                        f"the spool still holds {backlog}")
                break
        if now >= deadline:
            outcome["timed_out"] = (f"not done after {args.timeout:g}s: the sink counted {delivered}, "
                                    f"the spool still holds {spool_backlog(spool)}")
            break
        time.sleep(POLL)
    done = time.perf_counter()
    wall = done - started
    if outcome.get("timed_out"):
        outcome["wall_s"] = round(wall, 3)
        return outcome
    outcome.update({
        "wall_s": round(wall, 3),
        "msg_per_s": rate(args.messages, wall),
        "ready_s": round(ready_at - started, 3) if ready_at is not None else None,
        "msg_per_s_from_ready": rate(args.messages, done - ready_at) if ready_at is not None else None,
        "ready_signal": "sd_notify READY=1" if notify.ready_at is not None else
        ("daemon_ready log event" if ready_at is not None else None),
        "_cpu_at_ready": cpu_at_ready,
    })
    return outcome


# -- report --------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def print_table(report: dict[str, Any], out: TextIO) -> None:
    sink = report["sink"]
    print(f"sink      {sink['kind']} ({sink['version']}) on {HOST}:{sink['port']}", file=out)
    if sink.get("note"):
        print(f"          {sink['note']}", file=out)
    print(f"EHLO      {', '.join(sink['extensions'])}", file=out)
    print(f"load      {report['messages']} messages x {report['size']} bytes, concurrency {report['concurrency']}, "
          f"spool on {report['spool_filesystem']}, {report['cpus']} CPUs", file=out)
    print(file=out)
    print(f"{'':34} {'msg/s':>9} {'CPU ms/msg':>11} {'peak RSS MiB':>13}", file=out)
    daemon = report.get("mailwatchd") or {}
    rows: list[tuple[str, dict[str, Any] | None]] = [
        ("mailwatchd (from process start)", report.get("mailwatchd")),
        ("mailwatchd (from ready)", {"msg_per_s": daemon.get("msg_per_s_from_ready"),
                                     "cpu_ms_per_msg": daemon.get("cpu_ms_per_msg_after_ready")}
         if daemon.get("msg_per_s_from_ready") is not None else None),
        ("naive smtplib loop", report.get("naive")),
        (f"smtp-source -s {report['concurrency']}", report.get("smtp_source")),
        (f"smtp-source -s {report['concurrency']} -d (reuse conn)", report.get("smtp_source_reuse")),
    ]
    postfix = report.get("postfix_running")
    if postfix is not None:
        rows.append(("Postfix running (from start)", postfix))
        if postfix.get("msg_per_s_after_start") is not None:
            rows.append(("Postfix running (start returned)", {"msg_per_s": postfix["msg_per_s_after_start"],
                                                               "cpu_ms_per_msg": postfix.get(
                                                                   "cpu_ms_per_msg_after_start")}))
    for label, row in rows:
        if row is None:
            continue
        if row.get("skipped"):
            print(f"{label:34} {'skipped':>9}   ({row['skipped']})", file=out)
            continue
        if not row.get("msg_per_s") and row.get("error"):
            print(f"{label:34} {'FAILED':>9}", file=out)
            continue
        print(f"{label:34} {fmt(row.get('msg_per_s')):>9} {fmt(row.get('cpu_ms_per_msg'), '.3f'):>11} "
              f"{fmt(row.get('peak_rss_mib')):>13}", file=out)
    if daemon.get("ready_s") is not None:
        print(f"{'':34} (mailwatchd was ready after {daemon['ready_s']:.3f}s: {daemon['ready_signal']})", file=out)
    if postfix and postfix.get("postfix_start_s") is not None:
        print(f"{'':34} (`postfix start` itself took {postfix['postfix_start_s']:.3f}s, "
              f"{fmt(postfix.get('cpu_s_postfix_start'), '.3f')}s CPU; the {report['messages']} messages went into "
              f"its maildrop by `sendmail -t` beforehand, untimed, in {postfix['submit_s']:.1f}s)", file=out)
        print(f"{'':34} (Postfix {postfix.get('version', '?')} CPU, all its processes: {postfix['cpu_method']})",
              file=out)
    for key, label in (("ratio_mailwatchd_postfix", "mailwatchd / Postfix running"),
                       ("ratio_mailwatchd_naive", "mailwatchd / naive")):
        if report.get(key) is not None:
            verdict = "met" if report[key] >= GOALS[key] else "NOT met"
            print(f"{label:34} {report[key]:>9.2f}   (goal >= {GOALS[key]:g}: {verdict})", file=out)
    for name in ("mailwatchd", "naive", "smtp_source", "smtp_source_reuse", "postfix_running"):
        row = report.get(name)
        if row and row.get("error"):
            print(f"\n{name}: ERROR: {row['error']}", file=out)
        if row and row.get("warning"):
            print(f"\n{name}: warning: {row['warning']}", file=out)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="messages per phase (default 2000)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per message (default 4096)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="MAILWATCHD_CONCURRENCY, and smtp-source's -s (default 2)")
    parser.add_argument("--sink", choices=("auto", "smtp-sink", "aiosmtpd"), default="auto",
                        help="auto: smtp-sink, or aiosmtpd if the postfix package cannot be had")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-smtp-source", action="store_true", help="skip the smtp-source upper bound")
    parser.add_argument("--no-postfix", action="store_true",
                        help="skip the running Postfix (the installed one as a private null client)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a phase may take (default 30 + messages/100)")
    parser.add_argument("--stall", type=float, default=15.0,
                        help="give up on mailwatchd after this many seconds without progress (default 15)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds mailwatchd gets to exit after SIGTERM before SIGKILL (default 30)")
    parser.add_argument("--daemon-cmd", default=None,
                        help="command that starts the daemon (default: this Python -m mailwatchd run)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the spools go (default: a new temporary directory; its filesystem matters)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (spools, logs)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where the postfix package is kept (default {DEFAULT_CACHE})")
    parser.add_argument("--idle", type=int, default=None, metavar="N",
                        help="instead of the drain: N deferred messages not due; the daemon's CPU while idle")
    parser.add_argument("--idle-window", type=float, default=30.0,
                        help="seconds of idle CPU measured after READY=1 (default 30)")
    parser.add_argument("--serve-aiosmtpd", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.size < 256 or args.concurrency < 1:
        parser.error("--messages must be >= 1, --size >= 256, --concurrency >= 1")
    if args.timeout is None:
        args.timeout = 30.0 + args.messages / 100
    return args


@contextlib.contextmanager
def work_directory(args: argparse.Namespace) -> Iterator[Path]:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="mailwatchd-bench.", dir=args.workdir))
    try:
        yield path
    finally:
        if args.keep:
            print(f"[bench] kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_aiosmtpd is not None:
        return serve_aiosmtpd(args.serve_aiosmtpd)
    quiet = args.json
    report: dict[str, Any] = {"messages": args.messages, "size": args.size, "concurrency": args.concurrency,
                              "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    postfix: Postfix | None = None
    postfix_error = ""
    if args.sink != "aiosmtpd" or not args.no_smtp_source:
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
            report["sink"] = {"kind": sink.kind, "version": sink.version, "port": sink.port,
                              "extensions": sink.extensions, "note": sink.note}
            note(f"sink {sink.kind} on {HOST}:{sink.port}; EHLO: {', '.join(sink.extensions)}", quiet=quiet)
            if args.idle is not None:
                note(f"idle: {args.idle} deferred messages, CPU over {args.idle_window:g}s after READY", quiet=quiet)
                report["idle"] = run_idle(sink, workdir, args)
                print(json.dumps(report["idle"]) if args.json else
                      "\n".join(f"{key:18} {value}" for key, value in report["idle"].items()))
                return 0 if report["idle"]["ok"] else 1
            if postfix is not None and not args.no_smtp_source:
                for reuse, key in ((False, "smtp_source"), (True, "smtp_source_reuse")):
                    note(f"smtp-source{' -d' if reuse else ''}: {args.messages} messages", quiet=quiet)
                    report[key] = run_smtp_source(sink, postfix, workdir, args, reuse=reuse)
            elif not args.no_smtp_source:
                report["smtp_source"] = {"skipped": postfix_error}
            note(f"naive smtplib loop: {args.messages} messages", quiet=quiet)
            try:
                report["naive"] = run_naive(sink, workdir, args)
            except (OSError, smtplib.SMTPException) as exc:
                report["naive"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            note(f"mailwatchd: {args.messages} messages, concurrency {args.concurrency}", quiet=quiet)
            try:
                report["mailwatchd"] = run_mailwatchd(sink, workdir, args)
            except OSError as exc:
                report["mailwatchd"] = {"ok": False, "error": f"could not run mailwatchd: {exc}"}
            if args.no_postfix:
                report["postfix_running"] = {"skipped": "--no-postfix"}
            else:
                note(f"Postfix running: {args.messages} messages into its maildrop, then postfix start", quiet=quiet)
                report["postfix_running"] = run_postfix_running(sink, workdir, args)
                if not report["postfix_running"].get("skipped"):
                    report["postfix_running"]["version"] = postfix_running.postfix_version()
        finally:
            sink.close()
        sink_errors = tail(sink.stderr_path, 5)
        if sink_errors:
            report["sink"]["stderr"] = sink_errors
    daemon, naive, running = report["mailwatchd"], report["naive"], report["postfix_running"]
    if daemon.get("ok") and naive.get("msg_per_s"):
        report["ratio_mailwatchd_naive"] = round(daemon["msg_per_s"] / naive["msg_per_s"], 2)
    if daemon.get("ok") and running.get("ok") and running.get("msg_per_s"):
        report["ratio_mailwatchd_postfix"] = round(daemon["msg_per_s"] / running["msg_per_s"], 2)
    if args.json:
        print(json.dumps(report, indent=None, sort_keys=False))
    else:
        print_table(report, sys.stdout)
    phases = [report[key] for key in ("mailwatchd", "naive", "smtp_source", "smtp_source_reuse", "postfix_running")
              if key in report]
    return 0 if all(phase.get("ok") for phase in phases if not phase.get("skipped")) else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise SystemExit(1) from None
        raise
