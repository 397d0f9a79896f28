"""A private, running Postfix null client as the benchmarks' reference.

Built from the INSTALLED Postfix (`/usr/sbin/postfix`, `/usr/sbin/sendmail`): its main.cf, master.cf,
queue and data directories and its log file live in a directory of the benchmark's work directory;
/etc/postfix is only read (master.cf as the template, postfix-files through post-install) and the
system queue is never touched. It relays everything to one loopback port (`relayhost =
[127.0.0.1]:PORT`), delivers nothing locally, and its smtpd listens on 127.0.0.1:<a free port>.

The CPU of all its processes (master and every daemon it forks, `postfix start` included) is
counted by a cgroup of its own when one can be made (cgroup v1 `cpuacct`, else cgroup v2
`cpu.stat`), else by psutil over master's process tree (master's own and reaped children's times
plus the live daemons'), read before `stop`. `cpu_method` says which.

    with RunningPostfix(workdir / "postfix", relay_port=sink.port) as postfix:
        postfix.sendmail(["-t", "-i"], data)   # into its maildrop: master need not run
        started = postfix.start()              # seconds `postfix start` took
        ...
    # stopped, cgroup removed, also on errors and KeyboardInterrupt

Needs root (`postfix start`, and `sendmail` with a MAIL_CONFIG that the system main.cf does not
list); `unavailable_reason()` says why not, so callers can skip their Postfix rows.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

POSTFIX = Path("/usr/sbin/postfix")
SENDMAIL = Path("/usr/sbin/sendmail")
POSTDROP = Path("/usr/sbin/postdrop")
POSTCONF = Path("/usr/sbin/postconf")
SYSTEM_MASTER_CF = Path("/etc/postfix/master.cf")
HOST = "127.0.0.1"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
COMMAND_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.01
CGROUP_V1_ROOT = Path("/sys/fs/cgroup/cpuacct")
CGROUP_V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


class PostfixError(Exception):
    """The private instance could not be set up, started or stopped; the text says why."""


def unavailable_reason() -> str | None:
    """Why the private instance cannot run here, or None when it can."""
    missing = [str(path) for path in (POSTFIX, SENDMAIL, POSTDROP, POSTCONF) if not path.is_file()]
    if missing:
        return f"Postfix is not installed (no {', '.join(missing)})"
    if "mailwatchd" in str(SENDMAIL.resolve()):
        return f"{SENDMAIL} is mailwatchd's, not Postfix's"
    if not SYSTEM_MASTER_CF.is_file():
        return f"Postfix is installed but has no {SYSTEM_MASTER_CF} to start from"
    if os.geteuid() != 0:
        return "the private Postfix needs root (postfix start; sendmail with MAIL_CONFIG)"
    return None


def postfix_version() -> str:
    """The installed Postfix's mail_version, or '?'."""
    try:
        done = subprocess.run([str(POSTCONF), "-d", "-h", "mail_version"], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return done.stdout.strip() or "?"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


# -- CPU of every process of the instance ------------------------------------------------------


class Cgroup:
    """A child cgroup with CPU accounting; processes are put in by a shell that writes its pid and execs."""

    def __init__(self, path: Path, usage_file: str, method: str) -> None:
        self.path = path
        self.usage_file = usage_file
        self.method = method

    @classmethod
    def create(cls) -> tuple[Cgroup | None, str]:
        """A new cgroup, or None and why none could be made."""
        name = f"mailwatchd-bench-postfix.{os.getpid()}.{secrets.token_hex(4)}"
        reasons = []
        candidates = [(CGROUP_V1_ROOT, "cpuacct.usage", "cgroup v1 cpuacct.usage")]
        candidates += [(root, "cpu.stat", "cgroup v2 cpu.stat usage_usec") for root in CGROUP_V2_ROOTS
                       if (root / "cgroup.procs").is_file() and (root / "cpu.stat").is_file()]
        for root, usage_file, method in candidates:
            if not (root / usage_file).is_file():
                reasons.append(f"no {root / usage_file}")
                continue
            try:
                (root / name).mkdir()
            except OSError as exc:
                reasons.append(f"cannot create a cgroup in {root}: {exc.strerror}")
                continue
            group = cls(root / name, usage_file, method)
            if group.usage_ns() is None:
                group.remove()
                reasons.append(f"{root / name / usage_file} is not readable")
                continue
            return group, ""
        return None, "; ".join(reasons) or "no cgroup hierarchy with CPU accounting"

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run by a shell that first moves itself into the cgroup (its children follow)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def usage_ns(self) -> int | None:
        try:
            text = (self.path / self.usage_file).read_text(encoding="ascii")
        except OSError:
            return None
        if self.usage_file == "cpuacct.usage":
            return int(text.strip())
        found = re.search(r"^usage_usec (\d+)$", text, re.MULTILINE)
        return int(found.group(1)) * 1000 if found else None

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in (self.path / "cgroup.procs").read_text(encoding="ascii").split()]
        except (OSError, ValueError):
            return []

    def remove(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            try:
                self.path.rmdir()
            except OSError:
                return False
        return True


def process_tree_cpu_s(master_pid: int) -> float | None:
    """master's user+system, its reaped children's, and every live descendant's (psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        master = psutil.Process(master_pid)
        times = master.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in master.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
    except psutil.Error:
        return None
    return float(total)


# -- the instance ----------------------------------------------------------------------------------


def main_cf(work: Path, relay_port: int) -> str:
    return "\n".join([
        "# a private null client for mailwatchd's benchmarks (benchmarks/postfix_running.py)",
        "compatibility_level = 3.6",
        f"queue_directory = {work / 'queue'}",
        f"data_directory = {work / 'data'}",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        "myhostname = bench.example",
        "mydestination =",
        "local_transport = error:local delivery disabled",
        f"relayhost = [{HOST}]:{relay_port}",
        f"inet_interfaces = {HOST}",
        "inet_protocols = ipv4",
        "mynetworks = 127.0.0.0/8",
        # a loopback client's name needs no resolver; never the machine's DNS from a benchmark
        "smtpd_peername_lookup = no",
        "smtp_tls_security_level = none",
        # no syslog here: Postfix logs through postlogd into this file (its prefix must be allowed)
        f"maillog_file = {work / 'maillog'}",
        f"maillog_file_prefixes = /var, /dev/stdout, {work}",
        "alias_maps =",
        "alias_database =",
        "smtputf8_enable = no",
        "biff = no",
        "",
    ])


def master_cf(template: str, smtpd_port: int) -> str:
    """The system master.cf with chroot = n on every service and smtpd on 127.0.0.1:PORT."""
    lines = []
    for line in template.splitlines():
        fields = line.split()
        if line[:1] in ("", "#", " ", "\t") or len(fields) < 8:
            lines.append(line)
            continue
        fields[4] = "n"
        if fields[0] == "smtp" and fields[1] == "inet":
            fields[0] = f"{HOST}:{smtpd_port}"
        lines.append(" ".join(fields))
    return "\n".join(lines) + "\n"


class RunningPostfix:
    """The private instance: `setup` (config, queue; no process), `start`, `stop`; `close` always cleans up."""

    def __init__(self, base: Path, relay_port: int, *, use_cgroup: bool = True) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise PostfixError(reason)
        self.base = base
        self.config_dir = base / "config"
        self.queue_dir = base / "queue"
        self.maillog = base / "maillog"
        self.relay_port = relay_port
        self.smtpd_port = 0
        self.cgroup: Cgroup | None = None
        self.cgroup_error = "not asked for"
        self.use_cgroup = use_cgroup
        self.master_pid: int | None = None
        self.started = False
        self._cpu_at_stop: float | None = None

    # -- life cycle

    def __enter__(self) -> RunningPostfix:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def setup(self) -> None:
        """Write main.cf and master.cf, create the queue (`postfix check`), make the cgroup."""
        self.base.mkdir(parents=True, exist_ok=True)
        # The postfix user must reach its queue: every directory above it traversable. The base and
        # the work directory holding it (a benchmark's own temporary directory) are made so; a
        # directory further up is not changed.
        for directory in (self.base, *self.base.parents):
            mode = directory.stat().st_mode
            if mode & 0o001:
                continue
            if directory not in (self.base, self.base.parent):
                raise PostfixError(f"the postfix user cannot reach {self.base}: {directory} is not traversable "
                                   "by others (choose a work directory elsewhere)")
            directory.chmod(mode | 0o011)
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        data = self.base / "data"
        data.mkdir(exist_ok=True)
        shutil.chown(data, user="postfix")  # else master: "open lock file ... Permission denied"
        self.smtpd_port = free_port()
        (self.config_dir / "main.cf").write_text(main_cf(self.base, self.relay_port), encoding="utf-8")
        (self.config_dir / "master.cf").write_text(
            master_cf(SYSTEM_MASTER_CF.read_text(encoding="utf-8"), self.smtpd_port), encoding="utf-8")
        self._postfix("check")  # creates the queue's directories with Postfix's owners and modes
        if self.use_cgroup:
            self.cgroup, self.cgroup_error = Cgroup.create()

    @property
    def env(self) -> dict[str, str]:
        """The environment for its `sendmail`, `postqueue` and friends."""
        return {**os.environ, "MAIL_CONFIG": str(self.config_dir)}

    def sendmail_argv(self, options: list[str]) -> list[str]:
        return [str(SENDMAIL), *options]

    def sendmail(self, options: list[str], data: bytes, timeout: float = COMMAND_TIMEOUT_S) -> None:
        """Submit one message (into its maildrop; master need not run)."""
        done = subprocess.run(self.sendmail_argv(options), input=data, env=self.env, capture_output=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise PostfixError(f"postfix sendmail exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace').strip()[:300]}")

    def start(self) -> float:
        """`postfix -c CONFIG start` (in the cgroup, if there is one): the seconds it took."""
        argv = [str(POSTFIX), "-c", str(self.config_dir), "start"]
        if self.cgroup is not None:
            argv = self.cgroup.wrap(argv)
        self.started = True  # from here on close() stops it, whatever happens
        started = time.perf_counter()
        self._run(argv, "start")
        took = time.perf_counter() - started
        self.master_pid = self._read_master_pid()
        if self.master_pid is None:
            raise PostfixError(f"postfix start left no master running: {self.log_tail()}")
        return took

    def stop(self) -> None:
        """`postfix stop`, then wait (bounded) until master and every daemon are gone."""
        if not self.started:
            return
        self._cpu_at_stop = self.cpu_seconds()
        self.started = False
        # not running any more, or stop failed: the wait below and the kill deal with it
        with contextlib.suppress(PostfixError):
            self._run([str(POSTFIX), "-c", str(self.config_dir), "stop"], "stop")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._alive() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if self._alive():
            self._kill_ours()

    def close(self) -> None:
        """Stop it if started, remove the cgroup. Safe to call twice."""
        try:
            self.stop()
        finally:
            if self.cgroup is not None:
                deadline = time.monotonic() + 5.0
                while not self.cgroup.remove() and time.monotonic() < deadline:
                    self._kill_ours()
                    time.sleep(POLL_S * 5)
                self.cgroup = None

    # -- what the benchmarks read

    @property
    def cpu_method(self) -> str:
        if self.cgroup is not None:
            return f"{self.cgroup.method} of a cgroup of its own"
        return f"psutil over master's process tree, read before stop (no cgroup: {self.cgroup_error})"

    def cpu_seconds(self) -> float | None:
        """CPU of all its processes so far (after stop: as read just before it)."""
        if self.cgroup is not None:
            usage = self.cgroup.usage_ns()
            return usage / 1e9 if usage is not None else None
        if not self.started:
            return self._cpu_at_stop
        return process_tree_cpu_s(self.master_pid) if self.master_pid is not None else None

    def queued(self) -> int:
        """Files in maildrop, incoming, active, deferred and hold: 0 when it has nothing left to do."""
        count = 0
        for name in QUEUES:
            for _, _, files in os.walk(self.queue_dir / name):
                count += len(files)
        return count

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.maillog.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no maillog)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty maillog)"

    # -- internals

    def _postfix(self, command: str) -> None:
        self._run([str(POSTFIX), "-c", str(self.config_dir), command], command)

    def _run(self, argv: list[str], what: str) -> None:
        # output into a file, not a pipe: master inherits the command's descriptors when it starts
        output = self.base / f"postfix-{what}.out"
        with open(output, "wb") as out:
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=COMMAND_TIMEOUT_S, check=False)
            except subprocess.TimeoutExpired:
                raise PostfixError(f"postfix {what} did not finish within {COMMAND_TIMEOUT_S:g} s") from None
        if done.returncode != 0:
            said = output.read_text(encoding="utf-8", errors="replace").strip().replace("\n", " | ")
            raise PostfixError(f"postfix {what} exited {done.returncode}: {said[-400:]} / maillog: {self.log_tail()}")

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def _ours(self) -> list[int]:
        """The pids of this instance: its cgroup's, else master and its descendants."""
        if self.cgroup is not None:
            return self.cgroup.pids()
        if self.master_pid is None:
            return []
        try:
            import psutil

            master = psutil.Process(self.master_pid)
            if master.name() != "master":
                return []  # the pid was reused by something else
            return [self.master_pid, *(child.pid for child in master.children(recursive=True))]
        except ImportError:
            return [self.master_pid] if _pid_alive(self.master_pid) else []
        except psutil.Error:
            return []

    def _alive(self) -> bool:
        return any(_pid_alive(pid) for pid in self._ours())

    def _kill_ours(self) -> None:
        for pid in self._ours():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
