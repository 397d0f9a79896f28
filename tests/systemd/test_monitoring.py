"""Issue 9 under the throwaway systemd: `mailwatchd status` and `check` as monitoring plugins on an installed host.

A `nagios` user (in no mailwatchd group: it may neither submit nor read mail) runs `status` and gets the
service's truth from the status file in /run/mailwatchd/status; root runs `check` without `--config` and it
reads the service's env file. Exit statuses 0-3 only, the state on the first line, performance data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import require_machine
from .layer import Layer
from .smtp_sink import SmtpSink
from .test_service import MAILWATCHD, UNIT, Service, boot_installed, message, relay_env

pytestmark = pytest.mark.systemd

SILENT_SERVER = """\
import socket
server = socket.create_server(("127.0.0.1", 2599))
held = []
while True:
    held.append(server.accept())  # accepts, never greets
"""


@pytest.fixture(scope="module")
def host(mailwatchd_layer: Layer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    require_machine()
    service = boot_installed(mailwatchd_layer, tmp_path_factory.mktemp("monitoring"))
    service.machine.run(["useradd", "--no-create-home", "nagios"])
    yield service
    service.machine.stop()


def as_nagios(host: Service, *args: str) -> tuple[int, list[str]]:
    done = host.machine.run(["runuser", "-u", "nagios", "--", MAILWATCHD, *args], check=False)
    return done.returncode, done.stdout.splitlines()


def as_root(host: Service, *args: str, timeout: float = 30.0) -> tuple[int, list[str]]:
    done = host.machine.run([MAILWATCHD, *args], check=False, timeout=timeout)
    return done.returncode, done.stdout.splitlines()


def test_a_monitoring_user_sees_the_service_as_it_is(host: Service) -> None:
    machine = host.machine
    host.reset({})  # as installed: no relay, so mail is not leaving this host
    assert machine.run(["id", "-nG", "nagios"]).stdout.split() == ["nagios"]
    code, lines = as_nagios(host, "status")
    assert code == 2 and lines[0].startswith("MAILWATCHD CRITICAL - no relay configured"), lines
    code, lines = as_root(host, "check")  # no --config: the service's env file
    assert code == 2 and lines[0].startswith("MAILWATCHD CRITICAL - no relay configured"), lines

    SmtpSink.start(machine, "refusing-relay", 2531, ["--data-reply", "554 5.7.1 Sender identity not verified"])
    host.write_env(relay_env(2531))
    machine.systemctl("reload", UNIT)
    host.wait_event("EVENT=config_reloaded")
    code, lines = as_root(host, "check")
    assert code == 0 and lines[0].startswith("MAILWATCHD OK - 1 relay(s), 1 endpoint(s) work"), lines
    assert "'127.0.0.1 127.0.0.1:2531/none connect'=" in lines[0]

    host.enqueue("refused by the relay", host.submitter())
    host.wait_event("EVENT=message_failed")
    # A permanent failure makes both WARNING until an operator acts; the first line says why.
    machine.wait_for(lambda: as_nagios(host, "status")[0] == 1, message="status WARNING")
    code, lines = as_nagios(host, "status")
    assert lines[0].startswith("MAILWATCHD WARNING - 1 failed message(s)"), lines
    assert " failed=1;1;;0 " in lines[0] and "queue_ready=0;;;0" in lines[0]
    code, lines = as_root(host, "check")
    assert code == 1 and lines[0].startswith("MAILWATCHD WARNING - 1 failed message(s)"), lines
    # The operator has seen it: acknowledged, it stays in failed/ and stops counting.
    assert as_root(host, "ack")[0] == 0
    machine.wait_for(lambda: as_nagios(host, "status")[0] == 0, message="status OK after ack")
    code, lines = as_nagios(host, "status")
    assert lines[0].startswith("MAILWATCHD OK - running") and " failed=1;1;;0 " in lines[0], lines
    assert len(host.spool_files("failed")["failed"]) == 1

    # The service stopped: its status file goes with it (RuntimeDirectory=).
    machine.systemctl("stop", UNIT)
    code, lines = as_nagios(host, "status")
    assert code == 2 and lines[0] == "MAILWATCHD CRITICAL - mailwatchd is not running", lines
    machine.systemctl("start", UNIT)


def test_bad_options_are_unknown_and_a_silent_relay_is_reported_within_the_timeout(host: Service) -> None:
    machine = host.machine
    code, lines = as_nagios(host, "status", "--no-such-option")
    assert code == 3 and lines == ["MAILWATCHD UNKNOWN - bad command line (see mailwatchd check --help)"]
    code, lines = as_root(host, "check", "--timeout", "soon")
    assert code == 3 and lines[0].startswith("MAILWATCHD UNKNOWN"), lines

    machine.write_file("/usr/local/lib/mailwatchd-test/silent.py", SILENT_SERVER)
    machine.systemd_run("silent-relay.service", ["/usr/bin/python3", "/usr/local/lib/mailwatchd-test/silent.py"])
    machine.wait_for(lambda: machine.run(["ss", "-ltnH", "sport = :2599"]).stdout.strip(), message="listening")
    host.reset(relay_env(2599, EMAIL_TIMEOUT="30s"))
    started = time.monotonic()
    code, lines = as_root(host, "check", "--timeout", "4", timeout=20.0)
    elapsed = time.monotonic() - started
    # NRPE gives a plugin 10 s; the relay's 30 s command timeout must not make check miss it.
    assert elapsed < 8.0, f"check took {elapsed:.1f}s"
    assert code == 2 and lines[0].startswith("MAILWATCHD CRITICAL - mail cannot flow: 127.0.0.1 127.0.0.1:2599"), lines
    assert "banner_timeout" in lines[0]


def test_the_status_file_is_readable_by_anyone_and_names_no_address(host: Service) -> None:
    machine = host.machine
    SmtpSink.start(machine, "plain-relay", 2532)
    host.reset(relay_env(2532, MAILWATCHD_ADMIN_ADDRESS="ops@example.net"))
    host.enqueue("private subject", host.submitter())
    status = Path("/run/mailwatchd/status/status.json")
    machine.wait_for(lambda: "delivered\": 1" in machine.host_path(str(status)).read_text(), message="delivered")
    listing = machine.run(["stat", "-c", "%A %U", str(status.parent), str(status)]).stdout.split("\n")
    assert listing[:2] == ["drwxr-xr-x mailwatchd", "-rw-r--r-- mailwatchd"]
    text = machine.run(["runuser", "-u", "nagios", "--", "cat", str(status)]).stdout
    assert "@" not in text and "private subject" not in text and message("x") not in text
