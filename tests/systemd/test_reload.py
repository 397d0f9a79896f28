"""Issue 9 under a throwaway systemd 252, the service installed by the README's steps: `systemctl reload` tells the
truth (a bad env file fails the reload job, the running settings are kept, the STATUS line and the status file
say so until a good reload), credential errors name `LoadCredential=` and the file under /etc/mailwatchd, and the
README's blocks work pasted in order: "Try it" as root, then "Install as a service", then the relay block with a
second provider's credential.

The README's lines run as written, but for what the machine's lack of network forces, as in test_service.py:
apt-get is not run (python3-venv is on the host the machine overlays) and pip installs the session's wheels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import require_machine
from .layer import Layer
from .machine import Machine
from .smtp_sink import SmtpSink
from .test_service import (
    CHECKOUT,
    DROP_INS,
    ENV_FILE,
    MAILWATCHD,
    SPOOL,
    UNIT,
    WHEELS,
    Service,
    boot_installed,
    message,
    readme_sh_block,
    relay_env,
    subjects,
)

pytestmark = pytest.mark.systemd

STATUS_FILE = "/run/mailwatchd/status/status.json"
VALIDATE_STEP = "ExecReload=/opt/mailwatchd/venv/bin/mailwatchd validate --reload"
PASSWORD = "/etc/mailwatchd/email-host-password"
TRY_IT = "## Try it"
RELAY_BLOCK = "**Configuring relays.**"
TRY_SPOOL = f"{CHECKOUT}/try-spool"
# The README's "Try it" line offline: its apt-get steps have nothing to do on this host, pip takes the wheels.
TRY_IT_OFFLINE = (
    ("apt-get update -qq && apt-get install -y -qq python3-venv && ", ""),
    (".venv/bin/pip install -q -e .", f".venv/bin/pip install -q --no-index --find-links {WHEELS} mailwatchd"),
)
# Where the README's relay block sends mail: names the machine resolves from /etc/hosts, never through DNS.
HOSTS = ("127.0.0.1 localhost\n::1 localhost\n127.0.0.1 smtp.gmail.com smtp.sendgrid.net smtp.office365.com "
         "login.microsoftonline.com\n")
MICROSOFT_BLOCK = "**Microsoft 365 (app-only).**"
OAUTH_SECRET = "/etc/mailwatchd/oauth-client-secret"


@pytest.fixture(scope="module")
def installed(mailwatchd_layer: Layer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    require_machine()
    service = boot_installed(mailwatchd_layer, tmp_path_factory.mktemp("reload"))
    yield service
    service.machine.stop()


def reload(service: Service) -> Any:
    return service.machine.systemctl("reload", UNIT, check=False, timeout=60)


def status_file(service: Service) -> dict[str, Any]:
    """What `mailwatchd status` reads: the daemon's status file."""
    data: dict[str, Any] = json.loads(service.machine.read_file(STATUS_FILE))
    return data


def wait_reload_error(service: Service, expected: Callable[[str | None], bool]) -> dict[str, Any]:
    """The status file once its reload_error is as `expected` says."""
    def matching() -> dict[str, Any] | None:
        status = status_file(service)
        return status if expected(status["reload_error"]) else None
    found: dict[str, Any] = service.machine.wait_for(matching, message="the status file's reload_error")
    return found


# -- reload ---------------------------------------------------------------------------------------------------

def test_a_bad_env_file_fails_the_reload_and_the_running_settings_deliver(installed: Service) -> None:
    machine = installed.machine
    old, new = SmtpSink.start(machine, "old-relay", 2591), SmtpSink.start(machine, "new-relay", 2592)
    installed.reset(relay_env(2591))
    app = installed.submitter()
    pid = machine.prop(UNIT, "MainPID")

    installed.write_env({**relay_env(2592), "EMAIL_HOTS": "127.0.0.1"})  # a new relay, and a typo
    result = reload(installed)
    assert result.returncode != 0 and "Job for mailwatchd.service failed" in result.stderr
    assert machine.prop(UNIT, "ReloadResult") == "exit-code"
    status = machine.systemctl("status", UNIT, check=False).stdout
    assert re.search(rf"{re.escape(VALIDATE_STEP)} \$MAINPID \(code=exited, status=78\)", status), status
    expected = f"EMAIL_HOTS: unknown setting in {ENV_FILE}; fix: did you mean EMAIL_HOST?"
    assert wait_reload_error(installed, lambda error: error is not None)["reload_error"] == expected
    machine.wait_for(lambda: machine.prop(UNIT, "StatusText").startswith(
        f"RELOAD FAILED, running settings kept: {expected}"), message="the failed reload in STATUS=")
    assert "Status: \"RELOAD FAILED" in machine.systemctl("status", UNIT, check=False).stdout
    installed.wait_event("EVENT=config_reload_failed", "KEY=EMAIL_HOTS")

    installed.enqueue("while the bad file is there", app)  # the running settings: the old relay
    assert subjects(installed.wait_sink(old, 1)) == ["while the bad file is there"]

    installed.write_env(relay_env(2592))
    assert reload(installed).returncode == 0
    assert machine.prop(UNIT, "ReloadResult") == "success"
    wait_reload_error(installed, lambda error: error is None)
    machine.wait_for(lambda: "RELOAD FAILED" not in machine.prop(UNIT, "StatusText"), message="STATUS= cleared")
    installed.enqueue("after the fix", app)
    assert subjects(installed.wait_sink(new, 1)) == ["after the fix"]
    assert len(old.messages()) == 1
    assert machine.show(UNIT, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}


def test_credential_errors_name_load_credential_and_the_file_under_etc(installed: Service) -> None:
    """The reload's check looks at the credentials through the daemon's own root: it and the daemon agree."""
    machine = installed.machine
    sink = SmtpSink.start(machine, "credential-relay", 2593, ["--auth", "app:app-password"])
    machine.run(["rm", "-f", PASSWORD, "/etc/mailwatchd/sendgrid"])
    installed.reset(relay_env(2593))
    with_password = relay_env(2593, EMAIL_HOST_USER="app", EMAIL_HOST_PASSWORD_FILE="email-host-password")

    installed.write_env(with_password)  # no password file: the unit's empty SetCredential= fallback
    assert reload(installed).returncode != 0
    error = wait_reload_error(installed, lambda e: e is not None and "email-host-password" in e)["reload_error"]
    assert error == (f"EMAIL_HOST_PASSWORD_FILE: the credential 'email-host-password' is empty: {PASSWORD} does "
                     "not exist (systemd handed over the unit's empty fallback, SetCredential=); fix: put the "
                     f"secret in {PASSWORD} (install -m 0600 /dev/stdin {PASSWORD}), then `systemctl restart "
                     "mailwatchd`")
    assert f"the credential 'email-host-password' is empty: {PASSWORD} does not exist" in installed.journal()

    installed.write_env({**relay_env(2593), "MAILWATCHD_RELAYS": "smtp://apikey@127.0.0.1:2594?password_file=sendgrid"})
    assert reload(installed).returncode != 0
    error = wait_reload_error(installed, lambda e: e is not None and "sendgrid" in e)["reload_error"]
    assert error.startswith("MAILWATCHD_RELAYS: the credential 'sendgrid' is not loaded: ")
    assert ("add [Service] LoadCredential=sendgrid:/etc/mailwatchd/sendgrid with `systemctl edit mailwatchd`, "
            "then `systemctl restart mailwatchd`") in error

    # Written after the start: whether systemd 252 refreshes the credential in time for this reload is its
    # business; the check and the daemon see the same copy, so they agree.
    machine.write_file(PASSWORD, "app-password\n", 0o600)
    installed.write_env(with_password)
    if reload(installed).returncode == 0:
        wait_reload_error(installed, lambda e: e is None)
    else:
        wait_reload_error(installed, lambda e: e is not None and "has content now, but systemd loaded" in e)
    assert "app-password" not in installed.journal()

    machine.systemctl("restart", UNIT)
    assert machine.prop(UNIT, "ActiveState") == "active"
    assert reload(installed).returncode == 0
    installed.enqueue("with the password", installed.submitter())
    [received] = installed.wait_sink(sink, 1)
    assert received.login == "app"
    machine.run(["rm", "-f", PASSWORD])


def test_the_permission_hint_says_what_to_run_and_that_repairs_it(installed: Service) -> None:
    """What a `mailwatchd run` as root leaves in the service's spool: files the daemon's user cannot write."""
    machine = installed.machine
    installed.reset(relay_env(2595), "RestartSec=100ms", start=False)
    machine.run(["sh", "-c", f"chown root:root {SPOOL}/mailwatchd.lock {SPOOL}/meta && chmod 0755 {SPOOL}/meta"])

    assert machine.systemctl("start", UNIT, check=False).returncode != 0
    [first, *_] = installed.wait_event("EVENT=spool_unusable")
    commands = [f"chown -R mailwatchd:mailwatchd {SPOOL} && systemd-tmpfiles --create mailwatchd.conf",
                "systemctl reset-failed mailwatchd; systemctl start mailwatchd"]
    assert first["HINT"] == ("the spool must be writable by the daemon's user mailwatchd (files left by `mailwatchd "
                             f"run` as root?): run `{commands[0]}`, then `{commands[1]}`")
    machine.wait_prop(UNIT, "ActiveState", "failed", timeout=20)
    for command in commands:
        machine.run(["sh", "-c", command])
    assert machine.show(UNIT, "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}
    assert machine.run(["stat", "-c", "%a %U %G", SPOOL]).stdout == "710 mailwatchd mailwatchd-submit\n"


# -- the README's blocks, pasted in order ---------------------------------------------------------------------

def test_the_readme_relay_block_with_a_second_credential_leaves_the_service_running(installed: Service) -> None:
    machine = installed.machine
    installed.reset({})
    machine.write_file("/etc/hosts", HOSTS)
    pid = machine.prop(UNIT, "MainPID")
    block = "\n".join(readme_sh_block(RELAY_BLOCK))
    assert "LoadCredential=sendgrid:/etc/mailwatchd/sendgrid" in block  # the second provider's credential
    try:
        pasted = machine.run(["sh", "-c", f"set -e\ncd /root\n{block}"], timeout=60)
        assert pasted.stdout == ("configuration OK: 2 relays (smtp.gmail.com, sendgrid), 2 secrets read; "
                                 f"from {ENV_FILE}\n")
        state = machine.show(UNIT, "ActiveState", "SubState", "NRestarts", "MainPID")
        assert (state["ActiveState"], state["SubState"], state["NRestarts"]) == ("active", "running", "0")
        assert state["MainPID"] != pid  # restarted, with the new credential
        status = status_file(installed)
        assert [relay["name"] for relay in status["relays"]] == ["smtp.gmail.com", "sendgrid"]
        assert status["reload_error"] is None
        assert installed.events("EVENT=config_invalid") == []
        assert reload(installed).returncode == 0  # and the reload's check sees both credentials
    finally:
        machine.run(["rm", "-rf", PASSWORD, "/etc/mailwatchd/sendgrid", DROP_INS])
        machine.systemctl("daemon-reload")


def test_the_readme_microsoft_365_block_validates_and_the_unit_loads_its_secret(installed: Service) -> None:
    machine = installed.machine
    installed.reset({})
    machine.write_file("/etc/hosts", HOSTS)
    block = "\n".join(readme_sh_block(MICROSOFT_BLOCK))
    try:
        pasted = machine.run(["sh", "-c", f"set -e\ncd /root\n{block}"], timeout=60)
        assert pasted.stdout == f"configuration OK: 1 relay (smtp.office365.com), 1 secret read; from {ENV_FILE}\n"
        assert machine.run(["stat", "-c", "%a %U", OAUTH_SECRET]).stdout == "600 root\n"
        machine.systemctl("restart", UNIT)
        state = machine.show(UNIT, "ActiveState", "SubState")
        assert (state["ActiveState"], state["SubState"]) == ("active", "running")
        assert machine.prop(UNIT, "LimitCORE") == "0"  # no core dump holds a token
        assert installed.events("EVENT=config_invalid") == []
        status = status_file(installed)
        assert [relay["name"] for relay in status["relays"]] == ["smtp.office365.com"]
        assert "the-client-secret-value" not in json.dumps(status) + installed.journal()
        assert reload(installed).returncode == 0  # the reload's check reads the credential as the daemon does
    finally:
        machine.run(["rm", "-f", OAUTH_SECRET])
        installed.reset({})


def try_it_as_root(machine: Machine) -> None:
    """The README's "Try it" line, as root, in the checkout: it queues, runs the daemon, which delivers; Ctrl-C."""
    [line] = readme_sh_block(TRY_IT)
    for readme, offline in TRY_IT_OFFLINE:
        assert readme in line, "the README's Try it line changed: update TRY_IT_OFFLINE"
        line = line.replace(readme, offline)
    assert machine.run(["dpkg-query", "-W", "-f=${Status}", "python3-venv"]).stdout == "install ok installed"
    running = machine.spawn(["sh", "-c", f"cd {CHECKOUT} && {line}"])
    outbox = machine.host_path(f"{TRY_SPOOL}/outbox/new")
    machine.wait_for(lambda: outbox.is_dir() and any(outbox.iterdir()), timeout=120, message="Try it's delivery")
    daemon = machine.read_file(f"{TRY_SPOOL}/mailwatchd.lock").decode().strip()
    machine.run(["kill", "-INT", daemon])  # Ctrl-C
    output, _ = running.communicate(timeout=30)
    assert running.returncode == 0, output
    for event in ("no_relay_configured", "message_queued", "message_delivered"):
        assert event in output, output


def test_try_it_as_root_then_install_leaves_a_service_that_delivers(
        mailwatchd_layer: Layer, tmp_path: Path) -> None:
    require_machine()
    service = boot_installed(mailwatchd_layer, tmp_path / "try-it", before_install=try_it_as_root)
    machine = service.machine
    try:
        after = service.after_install
        assert (after["ActiveState"], after["SubState"]) == ("active", "running"), after
        assert machine.prop(UNIT, "NRestarts") == "0"
        # Root's mail, as root would send it once the service is installed: the service's spool and outbox.
        machine.run([MAILWATCHD, "sendmail", "-t"], input=message("after the install", "root@example.com"))
        outbox = machine.host_path(f"{SPOOL}/outbox/new")
        delivered = machine.wait_for(lambda: outbox.is_dir() and list(outbox.iterdir()),
                                     message="the service's outbox delivery")
        assert b"Subject: after the install" in delivered[0].read_bytes()
        assert machine.run(["stat", "-c", "%U", str(Path(SPOOL, "outbox/new", delivered[0].name))]).stdout == \
            "mailwatchd\n"
        assert machine.run(["find", SPOOL, "-user", "root"]).stdout == ""
        assert service.events("EVENT=spool_unusable") == []
    finally:
        machine.stop()
