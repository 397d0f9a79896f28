"""`mailwatchd validate`: the settings checked exactly as `run` and a reload check them, credentials included,
with no spool and no network; and the daemon's own reload telling the truth in its status until a good one.
Credential errors name the file the operator edits and the unit's `LoadCredential=` line, never the secret."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from mailwatchd.service.statusfile import status_line
from mailwatchd.settings.credentials import credential_source
from tests.conftest import wait_until
from tests.daemonproc import run_cli

SECRET = "s3cret-Value-never-shown"
SYSTEMD_CREDENTIALS = "/run/credentials/mailwatchd.service"  # as systemd names it for the unit


def write_env(path: Path, **values: str) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()), encoding="utf-8")
    return path


def two_relays(password_file: str = "smtp-password", relay_credential: str = "backup-key") -> dict[str, str]:
    """A relay whose password is a credential and a second one, as the README's relay block has them."""
    return {"EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true", "EMAIL_HOST_USER": "me@example.com",
            "EMAIL_HOST_PASSWORD_FILE": password_file,
            "MAILWATCHD_RELAYS": f"smtp+tls://apikey@backup.example.net:587?name=backup&password_file={relay_credential}"}


@pytest.fixture
def env(clean_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """No spool on disk: validate must not create one."""
    return {**clean_env, "MAILWATCHD_SPOOL": str(tmp_path / "spool")}


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    folder = tmp_path / "credentials"
    folder.mkdir()
    for name in ("smtp-password", "backup-key"):
        (folder / name).write_text(SECRET + "\n")
    return folder


def validate(env: dict[str, str], config: Path, *extra: str) -> tuple[int, str, str]:
    result = run_cli(env, "validate", "--config", str(config), *extra)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_a_good_file_is_one_line_and_touches_neither_spool_nor_network(
        env: dict[str, str], credentials: Path, tmp_path: Path) -> None:
    config = write_env(tmp_path / "mailwatchd.env", **two_relays())
    code, out, err = validate({**env, "CREDENTIALS_DIRECTORY": str(credentials)}, config)
    assert (code, err) == (0, "")
    # The hosts do not resolve anywhere: a validation that looked them up would have failed or hung.
    assert out == (f"configuration OK: 2 relays (smtp.example.com, backup), 2 secrets read; from {config}\n")
    assert not (tmp_path / "spool").exists()


def test_no_relay_says_where_mail_goes(env: dict[str, str], tmp_path: Path) -> None:
    code, out, _ = validate(env, write_env(tmp_path / "empty.env"))
    assert code == 0
    assert out.startswith(f"configuration OK: no relay: mail goes to the local outbox {tmp_path / 'spool' / 'outbox'}")


def test_a_typo_exits_78_with_the_key_and_the_fix(env: dict[str, str], tmp_path: Path) -> None:
    config = write_env(tmp_path / "mailwatchd.env", EMAIL_HOTS="smtp.example.com")
    code, out, err = validate(env, config)
    assert (code, out) == (78, "")
    assert err == (f"mailwatchd: configuration error: EMAIL_HOTS: unknown setting in {config}\n"
                   "mailwatchd: fix: did you mean EMAIL_HOST?\n")


def test_a_credential_the_unit_does_not_load_names_load_credential(env: dict[str, str], tmp_path: Path) -> None:
    """Under systemd, a name missing from /run/credentials/UNIT is a LoadCredential= line missing from the unit."""
    config = write_env(tmp_path / "mailwatchd.env", **two_relays())
    code, _, err = validate({**env, "CREDENTIALS_DIRECTORY": SYSTEMD_CREDENTIALS}, config)
    assert code == 78
    assert "EMAIL_HOST_PASSWORD_FILE: the credential 'smtp-password' is not loaded" in err
    assert ("fix: put the secret in /etc/mailwatchd/smtp-password (install -m 0600 /dev/stdin "
            "/etc/mailwatchd/smtp-password), add [Service] LoadCredential=smtp-password:/etc/mailwatchd/smtp-password "
            "with `systemctl edit mailwatchd`, then `systemctl restart mailwatchd`") in err
    assert "check the path" not in err


def test_the_second_relays_missing_credential_is_named_too(
        env: dict[str, str], credentials: Path, tmp_path: Path) -> None:
    (credentials / "backup-key").unlink()
    config = write_env(tmp_path / "mailwatchd.env", **two_relays())
    code, _, err = validate({**env, "CREDENTIALS_DIRECTORY": str(credentials)}, config)
    assert code == 78
    missing = credentials / "backup-key"
    assert f"MAILWATCHD_RELAYS: the credential 'backup-key' is missing: {missing} does not exist" in err
    assert "LoadCredential=backup-key:/etc/mailwatchd/backup-key (`systemctl edit mailwatchd`)" in err


@pytest.mark.parametrize("content", ["", "\n"])
def test_an_empty_credential_names_the_file_to_fill(
        env: dict[str, str], credentials: Path, tmp_path: Path, content: str) -> None:
    (credentials / "smtp-password").write_text(content)
    config = write_env(tmp_path / "mailwatchd.env", **two_relays())
    code, _, err = validate({**env, "CREDENTIALS_DIRECTORY": str(credentials)}, config)
    assert code == 78
    described = "is empty" if content == "" else "holds only a line break"
    assert f"the credential 'smtp-password' is empty: {credentials / 'smtp-password'} {described}" in err
    assert SECRET not in err


def test_a_credential_name_without_credentials_directory(env: dict[str, str], tmp_path: Path) -> None:
    config = write_env(tmp_path / "mailwatchd.env", **two_relays())
    code, _, err = validate(env, config)
    assert code == 78
    assert "'smtp-password' is a credential name and $CREDENTIALS_DIRECTORY is not set" in err
    assert "LoadCredential=smtp-password:/etc/mailwatchd/smtp-password" in err
    assert "CREDENTIALS_DIRECTORY=/etc/mailwatchd" in err


def test_systemds_credentials_map_back_to_the_file_the_operator_edits(tmp_path: Path) -> None:
    """The unit's convention: LoadCredential=NAME:/etc/mailwatchd/NAME. Elsewhere the file read is the file edited."""
    assert credential_source("sendgrid", Path(SYSTEMD_CREDENTIALS)) == Path("/etc/mailwatchd/sendgrid")
    assert credential_source("sendgrid", tmp_path) == tmp_path / "sendgrid"


@pytest.mark.parametrize("case", ["typo", "unloaded credential", "empty credential", "contradiction"])
def test_validate_and_run_refuse_the_same_files_with_the_same_words(
        env: dict[str, str], credentials: Path, tmp_path: Path, case: str) -> None:
    values = two_relays()
    cred_dir = str(credentials)
    if case == "typo":
        values["MAILWATCHD_CONCURENCY"] = "4"
    elif case == "unloaded credential":
        cred_dir = SYSTEMD_CREDENTIALS
    elif case == "empty credential":
        (credentials / "backup-key").write_text("\n")
    else:
        values["EMAIL_USE_SSL"] = "true"
    config = write_env(tmp_path / "mailwatchd.env", **values)
    child_env = {**env, "CREDENTIALS_DIRECTORY": cred_dir}
    code, _, err = validate(child_env, config)
    run = run_cli(child_env, "run", "--config", str(config))
    assert code == run.returncode == 78
    assert err == run.stderr.decode()
    assert not (tmp_path / "spool").exists()


def test_reload_of_no_such_process_exits_77(env: dict[str, str], tmp_path: Path) -> None:
    code, _, err = validate(env, write_env(tmp_path / "empty.env"), "--reload", "999999999")
    assert code == 77
    assert "cannot see the files as the daemon (pid 999999999) does" in err


def read_status(spool: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((spool / "status.json").read_text())
    return data


def test_a_failed_reload_shows_in_the_status_until_a_good_one(
        clean_env: dict[str, str], spool_dir: Path, tmp_path: Path, daemons: Any, smtp_server: Any) -> None:
    """The daemon's own reload: a bad file keeps the running settings and says so in status.json (what
    `mailwatchd status` and the STATUS= line show); a good reload clears it."""
    config = write_env(tmp_path / "mailwatchd.env", EMAIL_HOST=smtp_server.host, EMAIL_PORT=str(smtp_server.port))
    daemon = daemons({**clean_env, "MAILWATCHD_SPOOL": str(spool_dir)}, "--config", str(config))
    wait_until(lambda: (spool_dir / "status.json").exists(), 10, message="the status file")
    assert read_status(spool_dir)["reload_error"] is None

    write_env(config, EMAIL_HOTS="elsewhere.example.com")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("config_reload_failed")
    status = wait_until(lambda: (s := read_status(spool_dir))["reload_error"] and s, 10, message="reload_error")
    assert status["reload_error"] == f"EMAIL_HOTS: unknown setting in {config}; fix: did you mean EMAIL_HOST?"
    assert [relay["name"] for relay in status["relays"]] == [smtp_server.host]  # the running settings
    assert status_line(status).startswith("RELOAD FAILED, running settings kept: EMAIL_HOTS: unknown setting")

    write_env(config, EMAIL_HOST=smtp_server.host, EMAIL_PORT=str(smtp_server.port), MAILWATCHD_CONCURRENCY="3")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("config_reloaded")
    wait_until(lambda: read_status(spool_dir)["reload_error"] is None, 10, message="reload_error cleared")
