"""Issue 9 under a throwaway systemd: the installed service with its spool on a small filesystem (a 4 MiB tmpfs
mounted over /var/spool/mailwatchd, laid out again by systemd-tmpfiles) that fills up. Starting and restarting
on the full spool leave the unit active (not failed, no start limit), `systemctl status` shows the DEGRADED
status, and once the filler is removed the mail that waited in new/ flows without a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import require_machine
from .layer import Layer
from .smtp_sink import SmtpSink
from .test_service import SPOOL, UNIT, Service, boot_installed, relay_env, subjects

pytestmark = pytest.mark.systemd

FILLER = f"{SPOOL}/filler"


@pytest.fixture
def service(mailwatchd_layer: Layer, tmp_path: Path) -> Iterator[Service]:
    """A machine of this scenario's own (it remounts the spool), mailwatchd installed per the README."""
    require_machine()
    installed = boot_installed(mailwatchd_layer, tmp_path / "machine")
    yield installed
    installed.machine.stop()


def test_a_full_spool_leaves_the_service_active_and_degraded_and_mail_flows_when_room_returns(
        service: Service) -> None:
    machine = service.machine
    sink = SmtpSink.start(machine, "relay", 2525)
    service.reset(relay_env(2525, MAILWATCHD_SPOOL_MIN_FREE="1M"), start=False)
    machine.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", SPOOL])
    machine.run(["systemd-tmpfiles", "--create", "mailwatchd.conf"])
    machine.systemctl("start", UNIT)  # on room enough: the spool's lock file exists from now on
    service.maildir_drop(["before the disk filled"], service.submitter())
    assert subjects(service.wait_sink(sink, 1)) == ["before the disk filled"]

    machine.systemctl("stop", UNIT)
    service.maildir_drop(["waited for room"])
    # As root, until the filesystem says ENOSPC (dd exits 1 then): not a byte left for the daemon's user.
    assert machine.run(["dd", "if=/dev/zero", f"of={FILLER}", "bs=64k"], check=False).returncode == 1
    assert machine.run(["stat", "-f", "-c", "%a", SPOOL]).stdout.strip() == "0"

    machine.systemctl("start", UNIT)
    machine.systemctl("restart", UNIT)
    state = machine.show(UNIT, "ActiveState", "SubState", "NRestarts", "StatusText", "MainPID")
    assert (state["ActiveState"], state["SubState"], state["NRestarts"]) == ("active", "running", "0")
    assert state["StatusText"].startswith(f"DEGRADED: spool full: 0 B free on {SPOOL}, below "
                                          "MAILWATCHD_SPOOL_MIN_FREE (1 MiB); new mail waits in new/"), state
    shown = machine.systemctl("status", UNIT, check=False).stdout
    assert f"Status: \"DEGRADED: spool full: 0 B free on {SPOOL}" in shown, shown
    assert len(service.events("EVENT=spool_full")) == 2  # once per start
    assert service.events("EVENT=spool_unusable") == [] and service.events("EVENT=daemon_unhealthy") == []
    assert len(service.spool_files("new")["new"]) == 1  # it waits
    assert len(sink.messages()) == 1

    machine.run(["rm", FILLER])
    service.wait_event("EVENT=spool_space_recovered", timeout=10)
    assert subjects(service.wait_sink(sink, 2)) == ["before the disk filled", "waited for room"]
    machine.wait_for(lambda: not machine.prop(UNIT, "StatusText").startswith("DEGRADED"),
                     message="STATUS without DEGRADED")
    machine.wait_for(lambda: service.waiting() == 0, message="the spool drained")
    after = machine.show(UNIT, "ActiveState", "NRestarts", "MainPID")
    assert after == {"ActiveState": "active", "NRestarts": "0", "MainPID": state["MainPID"]}
