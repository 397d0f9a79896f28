"""The harness proves itself: a Type=notify unit, the watchdog, journald fields, and a stop that leaves
the host as it was."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sdnotify

from .machine import Machine, MachineError, cgroup2_root

pytestmark = pytest.mark.systemd

LIB = "/usr/local/lib/machine-test"
# Debian's python3 in the machine has no sdnotify: the test hands it the module the host has.
SDNOTIFY = {f"{LIB}/sdnotify/__init__.py": Path(sdnotify.__file__).read_text()}
NOTIFIER = """\
import os, sys, time
import sdnotify

notifier = sdnotify.SystemdNotifier(debug=True)
notifier.notify("STATUS=starting")
notifier.notify("READY=1")
notifier.notify("STATUS=serving 3 mailboxes")
if sys.argv[1:] == ["hang-once"] and not os.path.exists("/run/notifier-hung"):
    open("/run/notifier-hung", "w").close()
    for _ in range(3):  # healthy for a moment, then never again: the watchdog must fire
        notifier.notify("WATCHDOG=1")
        time.sleep(0.1)
    time.sleep(3600)
while True:
    notifier.notify("WATCHDOG=1")
    time.sleep(0.3)
"""


def notify_unit(args: str = "", extra: str = "") -> str:
    return f"""\
[Service]
Type=notify
Environment=PYTHONPATH={LIB} PYTHONUNBUFFERED=1
ExecStart=/usr/bin/python3 {LIB}/notifier.py {args}
{extra}
"""


@pytest.fixture
def notify_machine(machine_factory: Callable[..., Machine]) -> Machine:
    machine = machine_factory()
    machine.prepare({**SDNOTIFY, f"{LIB}/notifier.py": NOTIFIER,
                     "/etc/systemd/system/notifier.service": notify_unit(),
                     "/etc/systemd/system/watched.service": notify_unit(
                         "hang-once", "WatchdogSec=2\nRestart=on-failure\nRestartSec=1")})
    machine.boot()
    return machine


def test_notify_unit_is_active_with_its_status(notify_machine: Machine) -> None:
    notify_machine.systemctl("start", "notifier.service")  # returns once READY=1 arrived

    state = notify_machine.show("notifier.service", "ActiveState", "SubState", "StatusText", "Type")
    assert state == {"ActiveState": "active", "SubState": "running", "StatusText": "serving 3 mailboxes",
                     "Type": "notify"}
    assert "Status: \"serving 3 mailboxes\"" in notify_machine.systemctl("status", "notifier.service").stdout


def test_watchdog_kills_a_service_that_stops_pinging_and_restarts_it(notify_machine: Machine) -> None:
    notify_machine.systemctl("start", "watched.service")

    # Result=watchdog lasts for the RestartSec between the kill and the restart (it resets at restart).
    notify_machine.wait_prop("watched.service", "Result", "watchdog", timeout=10)
    notify_machine.wait_prop("watched.service", "NRestarts", "1", timeout=10)
    notify_machine.wait_prop("watched.service", "ActiveState", "active", timeout=10)
    log = notify_machine.journal("-u", "watched.service", "-o", "cat")
    assert "Watchdog timeout" in log
    assert "Failed with result 'watchdog'" in log


def test_journald_indexes_fields_sent_with_the_native_protocol(machine: Machine) -> None:
    marker = uuid.uuid4().hex
    send = ("import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
            f"s.sendto(b'MESSAGE=hello from the test\\nPRIORITY=4\\nFOO=bar\\nMARKER={marker}\\n', "
            "'/run/systemd/journal/socket')")
    machine.run(["/usr/bin/python3", "-c", send])

    found = machine.journal(f"MARKER={marker}", "FOO=bar", "-o", "export")
    assert "MESSAGE=hello from the test\n" in found
    assert "PRIORITY=4\n" in found


def test_files_go_in_before_boot_and_through_proc_after(machine_factory: Callable[..., Machine]) -> None:
    machine = machine_factory()
    machine.write_file("/etc/mailwatchd-test/before", "seeded\n", 0o640)
    machine.boot()
    machine.write_file("/run/after", "live\n")

    assert machine.run(["cat", "/etc/mailwatchd-test/before", "/run/after"]).stdout == "seeded\nlive\n"
    assert machine.run(["stat", "-c", "%a %U", "/etc/mailwatchd-test/before"]).stdout.strip() == "640 root"
    assert machine.run(["stat", "-c", "%a", "/etc/mailwatchd-test"]).stdout.strip() == "755"
    assert not Path("/etc/mailwatchd-test").exists()  # the host's /etc never saw it


def test_stop_leaves_the_host_untouched(machine_factory: Callable[..., Machine], tmp_path: Path) -> None:
    # Host /tmp is what a systemd booted over the real root would empty: a marker there must survive.
    marker = Path("/tmp") / f"mailwatchd-machine-marker-{uuid.uuid4().hex}"
    marker.write_text("still here")
    try:
        machine = machine_factory()
        machine.boot()
        pid = machine.pid
        assert machine.run(["stat", "-f", "-c", "%T", "/", "/tmp"]).stdout.split() == ["overlayfs", "tmpfs"]
        machine.run(["systemd-tmpfiles", "--clean", "--remove"])
        machine.run(["touch", f"/tmp/{marker.name}-inside"])
        cgroup = machine.cgroup

        machine.stop()

        assert marker.read_text() == "still here"
        assert not Path(f"/tmp/{marker.name}-inside").exists()
        assert pid is not None and not Path(f"/proc/{pid}").exists()
        assert not cgroup.exists()
        assert machine.leaked_mounts() == []
        assert not any(name.startswith(machine.name) for name in os.listdir(cgroup2_root()))
        host_cgroup = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()
                       if line.split()[4] == str(cgroup2_root())]
        assert host_cgroup and all(fields[5].split(",")[0] == "rw" for fields in host_cgroup)
        with pytest.raises(MachineError, match="not running"):
            machine.run(["true"])
    finally:
        marker.unlink()


def test_run_reports_failures_with_their_output(machine: Machine) -> None:
    result = machine.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(MachineError, match="exited 3"):
        machine.run(["sh", "-c", "exit 3"])
