"""A throwaway systemd 252 booted as PID 1 in new namespaces, on an overlay of the host's root.

The recipe (stage_b.sh, stage_c.sh): a cgroup `<cgroup2>/<name>/payload` for the machine; the supervisor
`setsid timeout -s KILL <max> unshare --mount --pid --fork --kill-child --uts --ipc --net --propagation private`
runs stage B (PID 1 of the new PID namespace), which records its host PID, moves into the payload cgroup and
enters a cgroup namespace; stage C mounts an overlay (lower: the host's `/`, upper: a tmpfs into which our
layers and seed files are copied first), fresh /proc, /sys, cgroup2, a minimal /dev, tmpfs /run and /tmp,
pivots into it and execs systemd.

Invariant: systemd never boots over the real root. It empties /tmp and remounts /sys/fs/cgroup, and a mount
namespace does not protect the filesystem underneath; stage C refuses to exec systemd unless `/` is an
overlayfs and `/tmp` a tmpfs. Files reach the machine through layers and the seed prepared before boot, or
through `/proc/<hostpid>/root` after it; both land in the tmpfs upper layer. Files added to the host's root
while the machine runs may not show inside.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.conftest import wait_until

STAGES = Path(__file__).resolve().parent
CGROUP_PREFIX = "mailwatchd-machine"
MACHINE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT_S = 30.0
# The kernel kills the whole machine after this long even if the test process dies without stop().
MAX_LIFETIME_S = 900


class MachineError(RuntimeError):
    """The machine could not boot, died, or a command in it failed."""


def cgroup2_root() -> Path:
    """Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup` or, on hybrid hosts, `.../unified`)."""
    for candidate in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if candidate.is_dir() and _fs_type(candidate) == "cgroup2fs":
            return candidate
    raise MachineError("no cgroup2 hierarchy mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified")


def unavailable_reason() -> str | None:
    """Why a machine cannot boot on this host, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mount, unshare, pivot_root)"
    for tool in ("unshare", "nsenter", "setpriv", "timeout", "setsid", "systemd-id128", "mknod"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed (/lib/systemd/systemd)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    try:
        cgroup2_root()
    except MachineError as exc:
        return str(exc)
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--net", "--uts", "--ipc", "true"],
                           capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"unshare cannot create namespaces here: {probe.stderr.strip()}"
    return None


def _fs_type(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def remove_cgroup_tree(top: Path, timeout: float = 10.0) -> None:
    """rmdir a cgroup and its children depth-first, waiting for dying processes to leave them."""
    deadline = time.monotonic() + timeout
    while top.exists():
        try:
            for dirpath, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(dirpath)
        except OSError as exc:  # EBUSY: a process has not been reaped yet
            if time.monotonic() > deadline:
                raise MachineError(f"cannot remove cgroup {top}: {exc}") from exc
            time.sleep(0.02)


def remove_stale_cgroups() -> None:
    """Remove machine cgroups left by test processes that no longer exist (killed before stop())."""
    root = cgroup2_root()
    for entry in root.glob(f"{CGROUP_PREFIX}-*"):
        match = re.fullmatch(rf"{CGROUP_PREFIX}-(\d+)-\d+", entry.name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(MachineError):
                remove_cgroup_tree(entry, timeout=2.0)


class Machine:
    """One throwaway systemd machine. `prepare`/`write_file` before `boot()`, then drive it with `run()`."""

    _counter = 0

    def __init__(self, workdir: Path, *, layers: Sequence[Path] = (), max_lifetime: int = MAX_LIFETIME_S) -> None:
        Machine._counter += 1
        self.name = f"{CGROUP_PREFIX}-{os.getpid()}-{Machine._counter}"
        self.state = workdir / "machine"
        self.seed = workdir / "seed"
        self.state.mkdir(parents=True)
        self.seed.mkdir(mode=0o755)
        self.layers = [Path(layer) for layer in layers]
        self.max_lifetime = max_lifetime
        self.cgroup = cgroup2_root() / self.name
        self.console_log = self.state / "console.log"
        self.supervisor_log = self.state / "supervisor.log"
        self.pid: int | None = None
        self._supervisor: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None

    # -- files ----------------------------------------------------------------------------------

    def host_path(self, path: str) -> Path:
        """The host's view of `path` inside the machine: the seed layer before boot, /proc/PID/root after."""
        relative = path.lstrip("/")
        if self.pid is None:
            return self.seed / relative
        self._check_alive()
        return Path(f"/proc/{self.pid}/root") / relative

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644, *, owner: tuple[int, int] = (0, 0)) -> None:
        """Create or replace a file in the machine (uid/gid are the machine's, which are the host's)."""
        target = self.host_path(path)
        self._make_parents(target.parent, path)
        raw = data.encode() if isinstance(data, str) else data
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(raw)
        os.chown(tmp, *owner)
        os.chmod(tmp, mode)
        os.replace(tmp, target)

    def prepare(self, files: dict[str, bytes | str]) -> None:
        """Before boot: files to add on top of the host's root (mode 0644, owner root)."""
        if self.pid is not None:
            raise MachineError("prepare() is for files needed at boot; use write_file() now")
        for path, data in files.items():
            self.write_file(path, data)

    def read_file(self, path: str) -> bytes:
        return self.host_path(path).read_bytes()

    def _make_parents(self, directory: Path, machine_path: str) -> None:
        # A directory in the seed replaces the attributes of the host's directory in the machine: copy them.
        missing: list[tuple[Path, Path]] = []
        host_dir = Path(machine_path).parent
        while not directory.exists():
            missing.append((directory, host_dir))
            directory, host_dir = directory.parent, host_dir.parent
        for created, host in reversed(missing):
            created.mkdir()
            os.chmod(created, 0o755)  # not the test process's umask
            with contextlib.suppress(FileNotFoundError):
                if self.pid is None:
                    info = host.stat()
                    os.chown(created, info.st_uid, info.st_gid)
                    os.chmod(created, info.st_mode & 0o7777)

    # -- life -----------------------------------------------------------------------------------

    def boot(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Start the machine and wait until systemd reports the system running."""
        if self._supervisor is not None:
            raise MachineError("already booted")
        remove_stale_cgroups()
        started = time.monotonic()
        (self.cgroup / "payload").mkdir(parents=True)
        self.console_log.touch()
        layers = ":".join(str(layer) for layer in [*self.layers, self.seed])
        env = {"PATH": MACHINE_PATH, "MACHINE_NAME": self.name, "MACHINE_STATE": str(self.state),
               "MACHINE_CGROUP": str(self.cgroup), "MACHINE_STAGES": str(STAGES), "MACHINE_LAYERS": layers}
        supervisor = ("echo 0 > \"$MACHINE_CGROUP/cgroup.procs\" && exec setsid timeout -s KILL "
                      f"{self.max_lifetime} unshare --mount --pid --fork --kill-child --uts --ipc --net "
                      "--propagation private /bin/sh \"$MACHINE_STAGES/stage_b.sh\"")
        with self.supervisor_log.open("wb") as log:
            self._supervisor = subprocess.Popen(["/bin/sh", "-c", supervisor], env=env, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT)
        pid_file = self.state / "pid"
        deadline = started + timeout
        while not pid_file.exists():
            self._check_supervisor()
            if time.monotonic() > deadline:
                raise MachineError(f"stage B did not start within {timeout:g}s{self._logs()}")
            time.sleep(0.005)
        self.pid = int(pid_file.read_text())
        self.wait_running(deadline - time.monotonic())
        self.boot_seconds = time.monotonic() - started

    def wait_running(self, timeout: float = BOOT_TIMEOUT_S) -> str:
        """Wait for systemd's private bus, then `systemctl is-system-running --wait`; returns the state."""
        deadline = time.monotonic() + timeout
        private = self.host_path("/run/systemd/private")
        while not private.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise MachineError(f"systemd did not open its private bus within {timeout:g}s{self._logs()}")
            time.sleep(0.01)
        result = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                          timeout=max(deadline - time.monotonic(), 1.0))
        state = result.stdout.strip()
        if state != "running":
            failed = self.run(["systemctl", "list-units", "--failed", "--no-legend"], check=False).stdout
            raise MachineError(f"system is {state!r}, failed units:\n{failed}{self._logs()}")
        return state

    def stop(self) -> None:
        """Kill the machine's PID namespace, remove its cgroups, and check no mount of ours leaked."""
        try:
            if self.pid is not None and self._in_our_cgroup(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, 9)  # PID 1 of the namespace: the kernel kills every process in it
            if self._supervisor is not None:
                if self._supervisor.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self._supervisor.pid, 9)
                self._supervisor.wait(timeout=10)
        finally:
            self.pid = None
            self._supervisor = None
            if self.cgroup.exists():
                remove_cgroup_tree(self.cgroup)
            leaked = self.leaked_mounts()
            if leaked:
                raise MachineError(f"mounts of the machine are visible on the host: {leaked}")

    def leaked_mounts(self) -> list[str]:
        """Mount points of the host that lie in this machine's directories (should be none)."""
        ours = (str(self.state), str(self.seed), *(str(layer) for layer in self.layers))
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        return [mount for mount in mounts if mount.startswith(ours)]

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- commands -------------------------------------------------------------------------------

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command as root inside the machine (all its namespaces and its root)."""
        argv = self._nsenter(cmd, env)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                                    stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise MachineError(f"`{shlex.join(cmd)}` timed out after {timeout:g}s") from exc
        if check and result.returncode != 0:
            raise MachineError(f"`{shlex.join(cmd)}` exited {result.returncode}\nstdout: {result.stdout}\n"
                               f"stderr: {result.stderr}")
        return result

    def spawn(self, cmd: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start a command as root inside the machine without waiting; its stdout and stderr are one text pipe.

        The command runs as a child of nsenter, in the machine's PID namespace: killing the returned process
        does not reach it. Have it tell its in-machine pid (`sh -c 'echo $$; exec ...'`) and kill that; the
        machine's stop() ends it in any case."""
        return subprocess.Popen(self._nsenter(cmd, env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)

    def _nsenter(self, cmd: Sequence[str], env: dict[str, str] | None) -> list[str]:
        self._check_alive()
        assert self.pid is not None
        environment = {"PATH": MACHINE_PATH, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LANG": "C.UTF-8",
                       **(env or {})}
        # `--wd` without a value: the machine's cwd; `--wd=/` would open the host's /.
        return ["nsenter", f"--target={self.pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
                "--root", "--wd", "--", "env", "-i", *(f"{key}={value}" for key, value in environment.items()),
                *cmd]

    def systemctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p A,B unit` as a dict."""
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, unit: str, prop: str) -> str:
        return self.show(unit, prop).get(prop, "")

    def journal(self, *args: str) -> str:
        """`journalctl --no-pager ARGS` after the journal caught up with what was sent before the call."""
        self.run(["journalctl", "--sync"], check=False)
        return self.run(["journalctl", "--no-pager", *args]).stdout

    def systemd_run(self, unit: str, cmd: Sequence[str], *properties: str) -> None:
        """Start `cmd` as a transient service `unit` (`-p` properties as `Key=value`)."""
        props = [arg for prop in properties for arg in ("-p", prop)]
        self.run(["systemd-run", f"--unit={unit}", "--collect", *props, "--", *cmd])

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0, message: str = "condition") -> Any:
        """Poll `predicate` until truthy; fail at the deadline."""
        return wait_until(predicate, timeout, message=message)

    def wait_prop(self, unit: str, prop: str, expected: str, timeout: float = 15.0) -> None:
        seen: list[str] = []

        def matches() -> bool:
            seen.append(self.prop(unit, prop))
            return seen[-1] == expected
        try:
            self.wait_for(matches, timeout, f"{unit} {prop}={expected}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last {prop}={seen[-1] if seen else '?'}\n"
                                 f"{self.journal('-u', unit, '-o', 'cat')}") from None

    # -- safety ---------------------------------------------------------------------------------

    def _in_our_cgroup(self, pid: int) -> bool:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return False
        relative = "/" + str(self.cgroup.relative_to(cgroup2_root()))
        return any(line.startswith("0::") and (line[3:] + "/").startswith(relative + "/payload/") for line in lines)

    def _check_alive(self) -> None:
        """Refuse to touch a PID that is not our machine any more (dead, zombie, or recycled)."""
        if self.pid is None:
            raise MachineError("machine is not running")
        if not _pid_alive(self.pid) or not self._in_our_cgroup(self.pid):
            raise MachineError(f"machine PID {self.pid} is gone or not in {self.cgroup}{self._logs()}")

    def _check_supervisor(self) -> None:
        if self._supervisor is not None and self._supervisor.poll() is not None:
            raise MachineError(f"machine exited with {self._supervisor.returncode} during boot{self._logs()}")

    def _logs(self) -> str:
        parts = []
        for log in (self.supervisor_log, self.console_log):
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace")[-4000:]
                if text.strip():
                    parts.append(f"\n--- {log.name} ---\n{text}")
        return "".join(parts)
