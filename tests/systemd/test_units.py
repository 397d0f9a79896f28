"""packaging/systemd under a real systemd 252: the unit verifies clean and is hardened, the spool's modes
do what the tmpfiles comments say, and a Python asyncio daemon runs inside the unit's sandbox using
mailwatchd's notify and journal modules against the real manager and journald."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from .layer import postinst
from .machine import Machine
from .smtp_sink import SmtpSink

pytestmark = pytest.mark.systemd

UNIT = "mailwatchd.service"
SPOOL = "/var/spool/mailwatchd"
PROBE = "/usr/local/lib/mailwatchd-test/probe_service.py"
MAX_EXPOSURE = 1.5


def drop_in(machine: Machine, name: str, body: str) -> None:
    machine.write_file(f"/etc/systemd/system/{UNIT}.d/{name}.conf", f"[Service]\n{body}\n")


def as_user(machine: Machine, user: str, script: str) -> int:
    return machine.run(["runuser", "-u", user, "--", "sh", "-c", script], check=False).returncode


def add_user(machine: Machine, name: str, *groups: str) -> None:
    extra = ["--groups", ",".join(groups)] if groups else []
    machine.run(["useradd", "--system", "--no-create-home", *extra, name])


def test_unit_verifies_clean_and_is_hardened(mailwatchd_machine: Machine) -> None:
    verify = mailwatchd_machine.run(["systemd-analyze", "verify", UNIT, "mailwatchd.socket"], check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    security = mailwatchd_machine.run(["systemd-analyze", "security", "--offline=true", UNIT]).stdout
    exposure = re.search(r"Overall exposure level for mailwatchd\.service: ([\d.]+)", security)
    assert exposure is not None, security
    assert float(exposure.group(1)) <= MAX_EXPOSURE, security


def test_users_and_spool_modes(mailwatchd_machine: Machine) -> None:
    getent = mailwatchd_machine.run(["getent", "passwd", "mailwatchd"]).stdout.split(":")
    assert getent[5:] == ["/var/spool/mailwatchd", "/usr/sbin/nologin\n"]
    assert mailwatchd_machine.run(["id", "-nG", "mailwatchd"]).stdout.split() == ["mailwatchd"]
    assert mailwatchd_machine.run(["getent", "group", "mailwatchd-submit"]).returncode == 0

    listing = mailwatchd_machine.run(["stat", "-c", "%n %a %U %G", SPOOL, *(f"{SPOOL}/{sub}" for sub in (
        "tmp", "new", "queue", "deferred", "failed", "meta", "outbox")), "/etc/mailwatchd"]).stdout
    assert listing.splitlines() == [
        f"{SPOOL} 710 mailwatchd mailwatchd-submit",
        f"{SPOOL}/tmp 3777 mailwatchd mailwatchd", f"{SPOOL}/new 3777 mailwatchd mailwatchd",
        *(f"{SPOOL}/{sub} 700 mailwatchd mailwatchd" for sub in ("queue", "deferred", "failed", "meta", "outbox")),
        "/etc/mailwatchd 750 root mailwatchd"]


def test_submitters_drop_mail_and_cannot_reach_each_other_or_the_daemon(mailwatchd_machine: Machine) -> None:
    machine = mailwatchd_machine
    add_user(machine, "app", "mailwatchd-submit")
    add_user(machine, "other", "mailwatchd-submit")
    add_user(machine, "outsider")

    # A Maildir drop with the submitter's umask: tmp/, then rename into new/, then fsync new/ (needs r).
    assert as_user(machine, "app", f"umask 022 && cd {SPOOL} && echo 'Subject: hi' > tmp/m1 && chmod 0640 tmp/m1 "
                                   "&& mv tmp/m1 new/m1 && /usr/bin/python3 -c 'import os; "
                                   f"os.fsync(os.open(\"{SPOOL}/new\", os.O_RDONLY))'") == 0
    assert machine.run(["stat", "-c", "%a %U %G", f"{SPOOL}/new/m1"]).stdout.strip() == "640 app mailwatchd"

    assert as_user(machine, "other", f"cat {SPOOL}/new/m1") != 0
    assert as_user(machine, "other", f"rm -f {SPOOL}/new/m1") != 0  # sticky
    assert as_user(machine, "other", f"mv {SPOOL}/new/m1 {SPOOL}/tmp/stolen") != 0
    for state in ("queue", "deferred", "failed", "meta", "outbox"):
        assert as_user(machine, "app", f"ls {SPOOL}/{state}") != 0
        assert as_user(machine, "app", f"touch {SPOOL}/{state}/x") != 0
    assert as_user(machine, "app", f"ls {SPOOL}") != 0
    assert as_user(machine, "outsider", f"ls {SPOOL}/new") != 0
    assert as_user(machine, "outsider", f"touch {SPOOL}/tmp/x") != 0

    # The daemon's user reads the drop through its group and claims it; stale tmp/ files are its to clear.
    assert as_user(machine, "app", f"touch {SPOOL}/tmp/stale") == 0
    assert as_user(machine, "mailwatchd", f"cat {SPOOL}/new/m1 && mv {SPOOL}/new/m1 {SPOOL}/queue/m1 "
                                          f"&& rm {SPOOL}/tmp/stale") == 0


@pytest.fixture
def probe_machine(mailwatchd_machine_factory: Callable[[], Machine]) -> Callable[..., Machine]:
    """A machine running the probe under mailwatchd.service with a drop waiting in new/."""
    def boot(password: str | None) -> Machine:
        machine = mailwatchd_machine_factory()
        machine.write_file(PROBE, (Path(__file__).parent / "probe_service.py").read_bytes())
        drop_in(machine, "probe", f"ExecStart=\nExecStart=/opt/mailwatchd/venv/bin/python {PROBE}")
        if password is not None:
            machine.write_file("/etc/mailwatchd/email-host-password", password, 0o600)
        machine.boot()
        postinst(machine)
        SmtpSink.start(machine, "relay", 2525)
        add_user(machine, "app", "mailwatchd-submit")
        assert as_user(machine, "app", f"cd {SPOOL} && printf 'Subject: probe\\r\\n\\r\\nbody\\r\\n' > tmp/q1 "
                                       "&& chmod 0640 tmp/q1 && mv tmp/q1 new/q1") == 0
        return machine
    return boot


def test_a_python_asyncio_daemon_works_inside_the_sandbox(probe_machine: Callable[..., Machine]) -> None:
    machine = probe_machine("app-password\n")
    machine.systemctl("start", UNIT)  # returns once READY=1 arrived

    state = machine.show(UNIT, "ActiveState", "StatusText", "MainPID")
    assert state["ActiveState"] == "active"
    report = json.loads(state["StatusText"])
    assert report == {"claimed": ["q1"], "user": "mailwatchd", "password_length": 12, "wx_mapping_denied": True,
                      "run_lock_write_denied": True, "netlink_denied": True, "stderr_is_journal": True,
                      "watchdog_interval": 15.0}
    received = SmtpSink(machine, "relay", 2525).wait_for(1)
    assert b"Subject: probe" in received[0].data

    entry = json.loads(machine.journal("QUEUE_ID=q1", "EVENT=probe_done", "-o", "json").splitlines()[-1])
    assert (entry["SYSLOG_IDENTIFIER"], entry["_SYSTEMD_UNIT"], entry["PRIORITY"]) == ("mailwatchd", UNIT, "6")
    assert json.loads(entry["REPORT"]) == report  # a multi-line field, parsed by journald
    warning = machine.journal("-u", UNIT, "-p", "warning", "-o", "cat")
    assert "probe: a warning on stderr" in warning and "<4>" not in warning

    machine.systemctl("reload", UNIT)
    machine.wait_for(lambda: "probe: reloaded" in machine.journal("-u", UNIT, "-o", "cat"), message="reload")
    assert machine.prop(UNIT, "MainPID") == state["MainPID"]
    machine.systemctl("stop", UNIT)
    assert machine.show(UNIT, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}


def test_a_missing_password_file_is_not_fatal(probe_machine: Callable[..., Machine]) -> None:
    machine = probe_machine(None)
    machine.systemctl("start", UNIT)

    assert json.loads(machine.prop(UNIT, "StatusText"))["password_length"] == 0


def test_exit_78_is_not_restarted_and_a_crash_loop_gives_up(mailwatchd_machine_factory: Callable[[], Machine]) -> None:
    machine = mailwatchd_machine_factory()
    machine.write_file("/etc/systemd/system/mailwatchd-crash.service",
                       (Path(__file__).parents[2] / "packaging/systemd/mailwatchd.service").read_text())
    drop_in(machine, "config-error", "Type=simple\nExecStart=\nExecStart=/bin/sh -c 'exit 78'")
    machine.write_file("/etc/systemd/system/mailwatchd-crash.service.d/crash.conf",
                       "[Service]\nType=simple\nExecStart=\nExecStart=/bin/false\nRestartSec=100ms\n")
    machine.boot()
    postinst(machine)

    machine.systemctl("start", UNIT)
    machine.wait_prop(UNIT, "ActiveState", "failed")
    assert machine.show(UNIT, "Result", "NRestarts", "ExecMainStatus") == {
        "Result": "exit-code", "NRestarts": "0", "ExecMainStatus": "78"}

    machine.systemctl("start", "mailwatchd-crash.service")
    machine.wait_prop("mailwatchd-crash.service", "ActiveState", "failed", timeout=20)
    assert machine.prop("mailwatchd-crash.service", "NRestarts") == "5"
    assert "Start request repeated too quickly." in machine.journal("-u", "mailwatchd-crash.service", "-o", "cat")
