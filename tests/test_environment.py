"""The settings a submission reads (load_submitter_settings): the same values and the same
errors as load_settings for its keys, and nothing else read."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailwatchd.errors import ConfigError
from mailwatchd.settings.config import load_settings
from mailwatchd.settings.environment import load_submitter_settings


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    return {"MAILWATCHD_SPOOL": str(tmp_path / "spool")}


@pytest.mark.parametrize("values", [
    {},
    {"MAILWATCHD_MAX_MESSAGE_SIZE": "10M", "MAILWATCHD_HELO_NAME": " mx1.example.org "},
    {"MAILWATCHD_DEFAULT_DOMAIN": " example.org ", "MAILWATCHD_MAX_MESSAGE_SIZE": ""},
])
def test_the_submitter_reads_what_load_settings_reads(base_env: dict[str, str], values: dict[str, str]) -> None:
    environ = {**base_env, **values}
    full, submitter = load_settings(None, environ), load_submitter_settings(None, environ)
    assert (submitter.spool, submitter.max_message_size, submitter.helo_name, submitter.default_domain) == \
        (full.spool, full.max_message_size, full.helo_name, full.default_domain)
    if values:  # (with no name set, ehlo_name may ask DNS)
        assert submitter.ehlo_name == full.ehlo_name


def test_the_env_file_counts_as_for_load_settings(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = tmp_path / "mail.env"
    path.write_text(f"MAILWATCHD_SPOOL={tmp_path / 'file-spool'}\nMAILWATCHD_MAX_MESSAGE_SIZE=1M\n")
    submitter = load_submitter_settings(None, {"MAILWATCHD_CONFIG": str(path)})
    assert (submitter.spool, submitter.max_message_size) == (tmp_path / "file-spool", 1024 * 1024)
    assert load_submitter_settings(path, base_env).spool == Path(base_env["MAILWATCHD_SPOOL"])  # environment wins


@pytest.mark.parametrize(("key", "value"), [
    ("MAILWATCHD_MAX_MESSAGE_SIZE", "12"),
    ("MAILWATCHD_MAX_MESSAGE_SIZE", "lots"),
    ("MAILWATCHD_DEFAULT_DOMAIN", "root@example.com"),
    ("MAILWATCHD_SPOOL", "relative/spool"),
])
def test_a_bad_value_is_the_same_error(base_env: dict[str, str], key: str, value: str) -> None:
    environ = {**base_env, key: value}
    errors = []
    for load in (load_settings, load_submitter_settings):
        with pytest.raises(ConfigError) as info:
            load(None, environ)
        errors.append((info.value.key, info.value.problem, info.value.fix))
    assert errors[0] == errors[1] and errors[0][0] == key


def test_an_unknown_key_in_the_env_file_stops_the_submitter_too(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = tmp_path / "mail.env"
    path.write_text("MAILWATCHD_SPOOOL=/var/spool/x\n")
    with pytest.raises(ConfigError) as info:
        load_submitter_settings(path, base_env)
    assert info.value.key == "MAILWATCHD_SPOOOL"


def test_settings_the_submitter_does_not_read_do_not_stop_it(base_env: dict[str, str]) -> None:
    """A message is queued while the daemon's own settings are wrong: the daemon, `check` and
    `status` report those (as Postfix's postdrop does not read the relay settings either)."""
    environ = {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_PORT": "0", "MAILWATCHD_LISTEN": "nowhere"}
    with pytest.raises(ConfigError):
        load_settings(None, environ)
    assert load_submitter_settings(None, environ).spool == Path(base_env["MAILWATCHD_SPOOL"])
