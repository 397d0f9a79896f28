"""Settings: explicit env file + environment, Django's EMAIL_* keys, relay URLs, validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailwatchd import exitcodes
from mailwatchd.errors import ConfigError
from mailwatchd.settings import environment
from mailwatchd.settings.config import load_settings
from mailwatchd.settings.environment import SERVICE_SPOOL
from mailwatchd.settings.parsing import parse_duration, parse_size
from mailwatchd.settings.relays import DEFAULT_PORTS, Endpoint, Secret, TlsMode, parse_relay_url

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "Zq7-very-secret-pässword"


def env_file(path: Path, **values: str) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()), encoding="utf-8")
    return path


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """An environment with an absolute spool, so the default-spool branch is not involved."""
    return {"MAILWATCHD_SPOOL": str(tmp_path / "spool")}


def config_error(path: Path | None, environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ)
    return info.value


def assert_names_key_and_fix(error: ConfigError, key: str) -> None:
    assert error.key == key
    assert str(error).startswith(f"{key}: ")
    assert error.fix.strip()
    assert f"; fix: {error.fix}" in str(error)


def assert_no_password(error: ConfigError, password: str = PASSWORD) -> None:
    for text in (str(error), repr(error), error.problem, error.fix, *map(str, error.args)):
        assert password not in text


# -- where settings come from ------------------------------------------------------------------


def test_env_file_is_read(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = env_file(tmp_path / "mail.env", EMAIL_HOST="smtp.example.com", EMAIL_PORT="2525",
                    EMAIL_USE_TLS="true", EMAIL_HOST_USER="me@example.com", EMAIL_HOST_PASSWORD=PASSWORD)
    settings = load_settings(path, base_env)
    (relay,) = settings.relays
    assert relay.name == "smtp.example.com"
    assert relay.endpoints == (Endpoint("smtp.example.com", 2525, TlsMode.STARTTLS),)
    assert relay.username == "me@example.com"
    assert relay.password == Secret(PASSWORD)
    assert relay.password is not None and relay.password.reveal() == PASSWORD
    assert settings.config_path == path
    assert not settings.uses_outbox


def test_environment_wins_over_the_file(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = env_file(tmp_path / "mail.env", EMAIL_HOST="file.example.com", EMAIL_PORT="2525",
                    EMAIL_USE_TLS="true", EMAIL_TIMEOUT="7", MAILWATCHD_CONCURRENCY="3")
    settings = load_settings(path, {**base_env, "EMAIL_HOST": "env.example.com", "EMAIL_TIMEOUT": "9s"})
    (relay,) = settings.relays
    assert relay.primary == Endpoint("env.example.com", 2525, TlsMode.STARTTLS)
    assert settings.command_timeout == 9.0
    assert settings.concurrency == 3  # not overridden: the file's value stays


def test_environment_can_blank_a_file_value(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = env_file(tmp_path / "mail.env", EMAIL_HOST="file.example.com")
    settings = load_settings(path, {**base_env, "EMAIL_HOST": ""})
    assert settings.relays == ()
    assert settings.uses_outbox


def test_unrelated_environment_keys_do_not_count(tmp_path: Path, base_env: dict[str, str]) -> None:
    settings = load_settings(None, {**base_env, "HOST": "x", "PORT": "0", "TIMEOUT": "abc"})
    assert settings.relays == ()


def test_no_env_file_is_searched_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     base_env: dict[str, str]) -> None:
    parent = tmp_path / "project"
    cwd = parent / "app"
    cwd.mkdir(parents=True)
    # Both files would stop the start if read: an unknown MAILWATCHD_* key is an error.
    for folder in (parent, cwd):
        env_file(folder / ".env", EMAIL_HOST="found.example.com", MAILWATCHD_TYPO="1")
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MAILWATCHD_CONFIG", raising=False)
    settings = load_settings(None, base_env)
    assert settings.relays == ()
    assert settings.config_path is None
    # The same file is read when it is named.
    assert config_error(Path(".env"), base_env).key == "MAILWATCHD_TYPO"


def test_no_env_file_is_searched_for_with_the_real_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file(tmp_path / ".env", EMAIL_HOST="found.example.com")
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith(("EMAIL_", "MAILWATCHD_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MAILWATCHD_SPOOL", str(tmp_path / "spool"))
    assert load_settings().relays == ()


def test_config_path_from_mailwatchd_config(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = env_file(tmp_path / "mail.env", EMAIL_HOST="smtp.example.com", EMAIL_USE_SSL="yes")
    settings = load_settings(None, {**base_env, "MAILWATCHD_CONFIG": str(path)})
    assert settings.config_path == path
    assert settings.relays[0].primary == Endpoint("smtp.example.com", 465, TlsMode.IMPLICIT)


def test_missing_config_file(tmp_path: Path, base_env: dict[str, str]) -> None:
    error = config_error(tmp_path / "nope.env", base_env)
    assert_names_key_and_fix(error, "MAILWATCHD_CONFIG")
    assert "nope.env" in error.problem


def test_unknown_mailwatchd_key_in_the_file_is_an_error(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = env_file(tmp_path / "mail.env", MAILWATCHD_CONCURENCY="4")
    error = config_error(path, base_env)
    assert_names_key_and_fix(error, "MAILWATCHD_CONCURENCY")


def test_other_keys_in_the_file_are_ignored(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = env_file(tmp_path / "mail.env", SECRET_KEY="django-insecure-xyz", EMAIL_BACKEND="x.y.Backend",
                    DEBUG="maybe", DATABASE_URL="postgres://u:p@h/db", EMAIL_HOST="smtp.example.com",
                    EMAIL_USE_TLS="1")
    settings = load_settings(path, base_env)
    assert [relay.name for relay in settings.relays] == ["smtp.example.com"]


# -- EMAIL_* (Django's names) ---------------------------------------------------------------------


@pytest.mark.parametrize(("use_tls", "use_ssl", "mode", "port"), [
    ("false", "false", TlsMode.NONE, 25),
    ("true", "false", TlsMode.STARTTLS, 587),
    ("False", "True", TlsMode.IMPLICIT, 465),
    ("", "", TlsMode.NONE, 25),
])
def test_default_ports(base_env: dict[str, str], use_tls: str, use_ssl: str, mode: TlsMode, port: int) -> None:
    settings = load_settings(None, {**base_env, "EMAIL_HOST": "mx.example.com",
                                    "EMAIL_USE_TLS": use_tls, "EMAIL_USE_SSL": use_ssl})
    assert settings.relays[0].endpoints == (Endpoint("mx.example.com", port, mode),)
    assert DEFAULT_PORTS[mode] == port


def test_django_keys_and_fallback_ports(tmp_path: Path, base_env: dict[str, str]) -> None:
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "client.pem", "client.key"))
    for path in (ca, cert, key):
        path.write_text("pem\n")
    settings = load_settings(None, {
        **base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_PORT": "2465", "EMAIL_USE_SSL": "on",
        "EMAIL_HOST_USER": "user", "EMAIL_HOST_PASSWORD": PASSWORD, "EMAIL_TIMEOUT": "12",
        "EMAIL_SSL_VERIFY": "no", "EMAIL_SSL_CAFILE": str(ca), "EMAIL_SSL_CERTFILE": str(cert),
        "EMAIL_SSL_KEYFILE": str(key), "MAILWATCHD_MAX_PER_MINUTE": "10", "MAILWATCHD_MAX_PER_DAY": "500",
        "MAILWATCHD_FALLBACK_PORTS": "587/tls, 465, 2525,587/STARTTLS"})
    (relay,) = settings.relays
    host = "smtp.example.com"
    assert relay.endpoints == (Endpoint(host, 2465, TlsMode.IMPLICIT), Endpoint(host, 587, TlsMode.STARTTLS),
                               Endpoint(host, 465, TlsMode.IMPLICIT), Endpoint(host, 2525, TlsMode.STARTTLS),
                               Endpoint(host, 587, TlsMode.STARTTLS))
    assert relay.username == "user" and relay.password == Secret(PASSWORD)
    assert settings.command_timeout == 12.0
    assert relay.verify is False
    assert (relay.cafile, relay.certfile, relay.keyfile) == (ca, cert, key)
    assert (relay.max_per_minute, relay.max_per_day) == (10, 500)


def test_verify_defaults_to_true(base_env: dict[str, str]) -> None:
    settings = load_settings(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true"})
    relay = settings.relays[0]
    assert relay.verify is True
    assert (relay.cafile, relay.certfile, relay.keyfile, relay.username, relay.password) == (None,) * 5


def test_tls_and_ssl_together_name_email_use_ssl(base_env: dict[str, str]) -> None:
    error = config_error(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true",
                                "EMAIL_USE_SSL": "true", "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD": PASSWORD})
    assert_names_key_and_fix(error, "EMAIL_USE_SSL")
    assert "EMAIL_USE_TLS" in error.problem
    assert_no_password(error)


@pytest.mark.parametrize(("key", "value"), [
    ("EMAIL_PORT", "0"),
    ("EMAIL_PORT", "65536"),
    ("EMAIL_PORT", "abc"),
    ("EMAIL_PORT", "-25"),
    ("EMAIL_TIMEOUT", "abc"),
    ("EMAIL_TIMEOUT", "-5"),
    ("EMAIL_TIMEOUT", "0"),
    ("EMAIL_TIMEOUT", "10 minutes"),
    ("MAILWATCHD_CONNECT_TIMEOUT", "abc"),
    ("MAILWATCHD_CONNECT_TIMEOUT", "-1s"),
    ("MAILWATCHD_RETRY_MIN", "0"),
    ("MAILWATCHD_MAX_LIFETIME", "5w"),
    ("MAILWATCHD_MAX_MESSAGE_SIZE", "12"),
    ("MAILWATCHD_MAX_MESSAGE_SIZE", "lots"),
    ("MAILWATCHD_MAX_MESSAGE_SIZE", "-25M"),
    ("MAILWATCHD_CONCURRENCY", "0"),
    ("MAILWATCHD_CONCURRENCY", "65"),
    ("MAILWATCHD_CONCURRENCY", "two"),
    ("MAILWATCHD_MAX_PER_MINUTE", "-3"),
    ("MAILWATCHD_MAX_PER_DAY", "1.5"),
    ("MAILWATCHD_FALLBACK_PORTS", "465/tlsv1"),
    ("MAILWATCHD_FALLBACK_PORTS", "0"),
    ("EMAIL_USE_TLS", "maybe"),
    ("EMAIL_SSL_VERIFY", "sometimes"),
    ("EMAIL_SSL_CAFILE", "/nonexistent/ca.pem"),
    ("MAILWATCHD_LOG_FORMAT", "xml"),
    ("MAILWATCHD_LOG_LEVEL", "loud"),
    ("MAILWATCHD_DEFAULT_DOMAIN", "root@example.com"),
    ("MAILWATCHD_DEFAULT_DOMAIN", "exa mple.com"),
    ("MAILWATCHD_SPOOL", "relative/spool"),
])
def test_bad_values_name_the_key_and_a_fix(base_env: dict[str, str], key: str, value: str) -> None:
    environ = {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true",
               "EMAIL_HOST_USER": "user", "EMAIL_HOST_PASSWORD": PASSWORD, key: value}
    error = config_error(None, environ)
    assert_names_key_and_fix(error, key)
    assert_no_password(error)


def test_bad_value_in_the_file_names_the_key(tmp_path: Path, base_env: dict[str, str]) -> None:
    path = env_file(tmp_path / "mail.env", EMAIL_HOST="smtp.example.com", EMAIL_PORT="0", EMAIL_USE_TLS="true",
                    EMAIL_HOST_USER="user", EMAIL_HOST_PASSWORD=PASSWORD)
    error = config_error(path, base_env)
    assert_names_key_and_fix(error, "EMAIL_PORT")
    assert "1 to 65535" in error.fix
    assert_no_password(error)


def test_credentials_without_host(base_env: dict[str, str]) -> None:
    error = config_error(None, {**base_env, "EMAIL_HOST_PASSWORD": PASSWORD})
    assert_names_key_and_fix(error, "EMAIL_HOST_PASSWORD")
    assert_no_password(error)


def test_password_without_user(base_env: dict[str, str]) -> None:
    error = config_error(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true",
                                "EMAIL_HOST_PASSWORD": PASSWORD})
    assert_names_key_and_fix(error, "EMAIL_HOST_USER")
    assert_no_password(error)


def test_client_key_without_certificate(tmp_path: Path, base_env: dict[str, str]) -> None:
    key = tmp_path / "client.key"
    key.write_text("pem\n")
    error = config_error(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_SSL_KEYFILE": str(key)})
    assert_names_key_and_fix(error, "EMAIL_SSL_KEYFILE")
    assert "EMAIL_SSL_CERTFILE" in error.fix


# -- secrets --------------------------------------------------------------------------------------


def test_secret_never_shows() -> None:
    secret = Secret(PASSWORD)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret]), repr({"p": secret})):
        assert PASSWORD not in text
        assert "***" in text
    assert secret.reveal() == PASSWORD
    assert secret == Secret(PASSWORD) and secret != Secret("other") and secret != PASSWORD
    assert hash(secret) == hash(Secret(PASSWORD))


def test_settings_repr_hides_passwords(tmp_path: Path, base_env: dict[str, str]) -> None:
    settings = load_settings(None, {
        **base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true", "EMAIL_HOST_USER": "u",
        "EMAIL_HOST_PASSWORD": PASSWORD,
        "MAILWATCHD_RELAYS": f"smtps://other:{PASSWORD}@smtp.other.example?name=other"})
    assert [relay.password for relay in settings.relays] == [Secret(PASSWORD), Secret(PASSWORD)]
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.relays)


def test_both_password_and_password_file(tmp_path: Path, base_env: dict[str, str]) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(PASSWORD)
    error = config_error(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true",
                                "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD": PASSWORD,
                                "EMAIL_HOST_PASSWORD_FILE": str(secret_file)})
    assert_names_key_and_fix(error, "EMAIL_HOST_PASSWORD_FILE")
    assert_no_password(error)


def test_password_file_absolute(tmp_path: Path, base_env: dict[str, str]) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(PASSWORD + "\r\n")
    settings = load_settings(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true",
                                    "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD_FILE": str(secret_file)})
    assert settings.relays[0].password == Secret(PASSWORD)


def test_password_file_relative_to_credentials_directory(tmp_path: Path, base_env: dict[str, str]) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "smtp-password").write_text(PASSWORD + "\n")
    path = env_file(tmp_path / "mail.env", EMAIL_HOST="smtp.example.com", EMAIL_USE_TLS="true",
                    EMAIL_HOST_USER="u", EMAIL_HOST_PASSWORD_FILE="smtp-password")
    # systemd puts CREDENTIALS_DIRECTORY in the process environment, not in the env file.
    settings = load_settings(path, {**base_env, "CREDENTIALS_DIRECTORY": str(credentials)})
    assert settings.relays[0].password == Secret(PASSWORD)


def test_password_file_relative_without_credentials_directory(tmp_path: Path, base_env: dict[str, str]) -> None:
    error = config_error(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true",
                                "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD_FILE": "smtp-password"})
    assert_names_key_and_fix(error, "EMAIL_HOST_PASSWORD_FILE")
    assert "CREDENTIALS_DIRECTORY" in error.problem


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_password_file_missing_or_empty(tmp_path: Path, base_env: dict[str, str], content: str | None) -> None:
    secret_file = tmp_path / "pw"
    if content is not None:
        secret_file.write_text(content)
    error = config_error(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true",
                                "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD_FILE": str(secret_file)})
    assert_names_key_and_fix(error, "EMAIL_HOST_PASSWORD_FILE")
    assert str(secret_file) in error.problem


# -- credentials over plaintext -------------------------------------------------------------------


def test_credentials_over_plaintext_to_a_remote_host_are_refused(base_env: dict[str, str]) -> None:
    error = config_error(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_HOST_USER": "u",
                                "EMAIL_HOST_PASSWORD": PASSWORD})
    assert_names_key_and_fix(error, "EMAIL_USE_TLS")
    assert "smtp.example.com:25" in error.problem
    assert_no_password(error)


def test_plaintext_fallback_port_with_credentials_is_refused(base_env: dict[str, str]) -> None:
    error = config_error(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true",
                                "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD": PASSWORD,
                                "MAILWATCHD_FALLBACK_PORTS": "465,25/none"})
    assert_names_key_and_fix(error, "MAILWATCHD_FALLBACK_PORTS")
    assert_no_password(error)


def test_plaintext_relay_url_with_credentials_names_mailwatchd_relays(base_env: dict[str, str]) -> None:
    error = config_error(None, {**base_env, "MAILWATCHD_RELAYS": f"smtp://u:{PASSWORD}@mail.example.com"})
    assert_names_key_and_fix(error, "MAILWATCHD_RELAYS")
    assert_no_password(error)


@pytest.mark.parametrize("host", ["127.evil.example", "127.0.0.1.nip.example", "localhost.example.com"])
def test_loopback_lookalike_names_are_not_loopback(base_env: dict[str, str], host: str) -> None:
    error = config_error(None, {**base_env, "EMAIL_HOST": host, "EMAIL_HOST_USER": "u",
                                "EMAIL_HOST_PASSWORD": PASSWORD})
    assert error.key == "EMAIL_USE_TLS"


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "::1"])
def test_credentials_over_plaintext_to_loopback_are_allowed(base_env: dict[str, str], host: str) -> None:
    settings = load_settings(None, {**base_env, "EMAIL_HOST": host, "EMAIL_HOST_USER": "u",
                                    "EMAIL_HOST_PASSWORD": PASSWORD})
    assert settings.relays[0].endpoints == (Endpoint(host, 25, TlsMode.NONE),)


def test_plaintext_relay_url_to_ipv6_loopback_is_allowed(base_env: dict[str, str]) -> None:
    settings = load_settings(None, {**base_env, "MAILWATCHD_RELAYS": "smtp://u:pw@[::1]:2525"})
    assert settings.relays[0].endpoints == (Endpoint("::1", 2525, TlsMode.NONE),)


def test_plaintext_without_credentials_is_fine(base_env: dict[str, str]) -> None:
    settings = load_settings(None, {**base_env, "EMAIL_HOST": "mx.example.com", "EMAIL_HOST_USER": "u"})
    assert settings.relays[0].password is None


# -- MAILWATCHD_RELAYS ----------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "mode", "port"), [
    ("smtp", TlsMode.NONE, 25), ("smtp+tls", TlsMode.STARTTLS, 587), ("submission", TlsMode.STARTTLS, 587),
    ("smtp+ssl", TlsMode.IMPLICIT, 465), ("smtps", TlsMode.IMPLICIT, 465), ("SMTP+TLS", TlsMode.STARTTLS, 587),
])
def test_relay_url_schemes(scheme: str, mode: TlsMode, port: int) -> None:
    relay = parse_relay_url("MAILWATCHD_RELAYS", f"{scheme}://relay.example.net", {})
    assert relay.endpoints == (Endpoint("relay.example.net", port, mode),)
    relay = parse_relay_url("MAILWATCHD_RELAYS", f"{scheme}://relay.example.net:2500", {})
    assert relay.endpoints == (Endpoint("relay.example.net", 2500, mode),)


def test_relay_url_full(tmp_path: Path) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "gmail-app-password").write_text(PASSWORD + "\n")
    url = ("smtp+tls://me%40gmail.com@smtp.gmail.com:587?name=gmail&ports=465/ssl,2525"
           "&password_file=gmail-app-password&max_per_day=1800&max_per_minute=20&verify=false")
    relay = parse_relay_url("MAILWATCHD_RELAYS", url, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert relay.name == "gmail"
    assert relay.endpoints == (Endpoint("smtp.gmail.com", 587, TlsMode.STARTTLS),
                               Endpoint("smtp.gmail.com", 465, TlsMode.IMPLICIT),
                               Endpoint("smtp.gmail.com", 2525, TlsMode.STARTTLS))
    assert relay.username == "me@gmail.com"
    assert relay.password == Secret(PASSWORD)
    assert (relay.max_per_minute, relay.max_per_day, relay.verify) == (20, 1800, False)


def test_relay_url_inline_password_is_unquoted() -> None:
    relay = parse_relay_url("MAILWATCHD_RELAYS", "smtps://user:p%40ss%2Fw%3Ard@relay.example.net", {})
    assert relay.password == Secret("p@ss/w:rd")


def test_relays_from_the_environment_follow_the_email_relay(base_env: dict[str, str]) -> None:
    settings = load_settings(None, {
        **base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "true",
        "MAILWATCHD_RELAYS": "  smtps://a.example.net\n smtp+tls://b.example.net?name=backup  smtps://a.example.net"})
    assert [relay.name for relay in settings.relays] == ["smtp.example.com", "a.example.net#1", "backup",
                                                          "a.example.net#3"]


def test_first_relay_url_is_named_after_its_host(base_env: dict[str, str]) -> None:
    settings = load_settings(None, {**base_env, "MAILWATCHD_RELAYS": "smtps://a.example.net smtps://a.example.net"})
    assert [relay.name for relay in settings.relays] == ["a.example.net", "a.example.net#1"]


@pytest.mark.parametrize("relays", [
    "smtps://a.example.net?name=main smtp+tls://b.example.net?name=main",
    "smtps://relay.example.net?name=smtp.example.com",  # the EMAIL_HOST relay is named after its host
])
def test_duplicate_relay_names(base_env: dict[str, str], relays: str) -> None:
    error = config_error(None, {**base_env, "EMAIL_HOST": "smtp.example.com", "EMAIL_USE_TLS": "1",
                                "MAILWATCHD_RELAYS": relays})
    assert_names_key_and_fix(error, "MAILWATCHD_RELAYS")
    assert "name" in error.fix


@pytest.mark.parametrize(("url", "words"), [
    (f"smtps://user:{PASSWORD}@relay.example.net?nmae=x", "nmae"),
    (f"http://user:{PASSWORD}@relay.example.net", "scheme"),
    (f"smtps://user:{PASSWORD}@relay.example.net:99999", "port"),
    (f"smtps://user:{PASSWORD}@relay.example.net?ports=465/tlss", "TLS mode"),
    (f"smtps://user:{PASSWORD}@relay.example.net?max_per_minute=lots", "whole number"),
    (f"smtps://user:{PASSWORD}@relay.example.net?cafile=/nonexistent.pem", "/nonexistent.pem"),
    (f"smtps://user:{PASSWORD}@relay.example.net?password_file=/etc/x", "both"),
    (f"smtps://:{PASSWORD}@relay.example.net", "no user"),
    (f"smtps://user:{PASSWORD}@:465", "no host"),
    (f"smtps://user:{PASSWORD}@relay.example.net?verify=perhaps", "boolean"),
    ("smtps://user:pa@ss%word@relay.example.net?nmae=x", "nmae"),  # an unencoded @ in the password
    ("smtps://user:pass@word@relay.example.net?nmae=x", "nmae"),
])
def test_relay_url_errors_redact_the_password(base_env: dict[str, str], url: str, words: str) -> None:
    error = config_error(None, {**base_env, "MAILWATCHD_RELAYS": url})
    assert_names_key_and_fix(error, "MAILWATCHD_RELAYS")
    assert words in str(error)
    for secret in (PASSWORD, "pa@ss", "ss%word", "pass@word", "word@"):
        if secret in url:
            assert secret not in str(error)


def test_unknown_relay_option_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_url("MAILWATCHD_RELAYS", "smtps://relay.example.net?timeout=5", {})
    assert "'timeout'" in info.value.problem
    assert "password_file" in info.value.fix and "max_per_day" in info.value.fix


# -- durations, sizes and their checks ------------------------------------------------------------


@pytest.mark.parametrize(("raw", "seconds"), [
    ("30", 30.0), ("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("2h", 7200.0), ("2d", 172800.0),
    ("1.5m", 90.0), (" 10 s ", 10.0), ("0", 0.0),
])
def test_durations(raw: str, seconds: float) -> None:
    assert parse_duration("K", raw) == pytest.approx(seconds)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["", "ms", "s", "m", "h", "d"]))
def test_durations_property(number: int, unit: str) -> None:
    factor = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_duration("K", f"{number}{unit}") == pytest.approx(number * factor)


@pytest.mark.parametrize("raw", ["", "abc", "-1", "1e3", "5 m s", "inf", "nan", "5M", "1w", "1,5s"])
def test_bad_durations(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration("SOME_KEY", raw)
    assert info.value.key == "SOME_KEY"


def test_duration_minimum() -> None:
    assert parse_duration("K", "100ms", minimum=0.1) == pytest.approx(0.1)
    with pytest.raises(ConfigError) as info:
        parse_duration("K", "99ms", minimum=0.1)
    assert "0.1" in info.value.fix


@pytest.mark.parametrize(("raw", "size"), [
    ("2048", 2048), ("512K", 512 * 1024), ("25M", 25 * 2**20), ("25m", 25 * 2**20), ("25MB", 25 * 2**20),
    ("25MiB", 25 * 2**20), ("1G", 2**30), ("1k", 1024),
])
def test_sizes(raw: str, size: int) -> None:
    assert parse_size("K", raw) == size


@pytest.mark.parametrize("raw", ["1023", "0", "abc", "1.5M", "-1M", "25T", "M"])
def test_bad_sizes(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size("MAILWATCHD_MAX_MESSAGE_SIZE", raw)
    assert info.value.key == "MAILWATCHD_MAX_MESSAGE_SIZE"


def test_durations_and_sizes_through_settings(base_env: dict[str, str]) -> None:
    settings = load_settings(None, {
        **base_env, "MAILWATCHD_CONNECT_TIMEOUT": "500ms", "MAILWATCHD_RETRY_MIN": "5m",
        "MAILWATCHD_RETRY_MAX": "2h", "MAILWATCHD_MAX_LIFETIME": "2d", "MAILWATCHD_MAX_MESSAGE_SIZE": "10M",
        "MAILWATCHD_IDLE_TIMEOUT": "0", "MAILWATCHD_SHUTDOWN_GRACE": "1m", "MAILWATCHD_PROBE_INTERVAL": "10m",
        "MAILWATCHD_PROBE_INTERVAL_DOWN": "15s", "MAILWATCHD_RESCAN_INTERVAL": "90",
        "MAILWATCHD_LOG_LEVEL": "DEBUG", "MAILWATCHD_LOG_FORMAT": "json", "MAILWATCHD_HELO_NAME": " host.example ",
        "MAILWATCHD_DEFAULT_DOMAIN": "example.org", "MAILWATCHD_CONCURRENCY": "64"})
    assert settings.connect_timeout == 0.5
    assert (settings.retry_min, settings.retry_max) == (300.0, 7200.0)
    assert settings.max_lifetime == 172800.0
    assert settings.max_message_size == 10 * 2**20
    assert (settings.idle_timeout, settings.shutdown_grace) == (0.0, 60.0)
    assert (settings.probe_interval, settings.probe_interval_down, settings.rescan_interval) == (600.0, 15.0, 90.0)
    assert (settings.log_level, settings.log_format) == ("debug", "json")
    assert (settings.helo_name, settings.default_domain, settings.concurrency) == ("host.example", "example.org", 64)


def test_defaults(base_env: dict[str, str]) -> None:
    settings = load_settings(None, base_env)
    assert settings.spool == Path(base_env["MAILWATCHD_SPOOL"])
    assert settings.outbox == settings.spool / "outbox"
    assert (settings.connect_timeout, settings.command_timeout, settings.transaction_timeout) == (5.0, 30.0, 120.0)
    assert (settings.retry_min, settings.retry_max, settings.max_message_size) == (60.0, 3600.0, 25 * 2**20)
    assert settings.relays == () and settings.uses_outbox


def test_transaction_shorter_than_command_timeout_is_refused(base_env: dict[str, str]) -> None:
    error = config_error(None, {**base_env, "EMAIL_TIMEOUT": "60", "MAILWATCHD_TRANSACTION_TIMEOUT": "30s"})
    assert_names_key_and_fix(error, "MAILWATCHD_TRANSACTION_TIMEOUT")
    assert "EMAIL_TIMEOUT" in error.problem
    # The default transaction deadline (120 s) counts too.
    assert config_error(None, {**base_env, "EMAIL_TIMEOUT": "3m"}).key == "MAILWATCHD_TRANSACTION_TIMEOUT"
    settings = load_settings(None, {**base_env, "EMAIL_TIMEOUT": "30", "MAILWATCHD_TRANSACTION_TIMEOUT": "30s"})
    assert settings.transaction_timeout == settings.command_timeout == 30.0


def test_retry_max_below_min_is_refused(base_env: dict[str, str]) -> None:
    error = config_error(None, {**base_env, "MAILWATCHD_RETRY_MIN": "10m", "MAILWATCHD_RETRY_MAX": "5m"})
    assert_names_key_and_fix(error, "MAILWATCHD_RETRY_MAX")
    assert "MAILWATCHD_RETRY_MIN" in error.problem
    assert config_error(None, {**base_env, "MAILWATCHD_RETRY_MIN": "2h"}).key == "MAILWATCHD_RETRY_MAX"
    settings = load_settings(None, {**base_env, "MAILWATCHD_RETRY_MIN": "5m", "MAILWATCHD_RETRY_MAX": "300"})
    assert settings.retry_min == settings.retry_max == 300


# -- the default spool ----------------------------------------------------------------------------


def test_default_spool_for_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    settings = load_settings(None, {"XDG_STATE_HOME": "/somewhere"})
    assert settings.spool == SERVICE_SPOOL == Path("/var/spool/mailwatchd")
    assert settings.outbox == SERVICE_SPOOL / "outbox"


def test_default_spool_for_a_user_where_no_service_is_installed(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(environment, "SERVICE_SPOOL", tmp_path / "no-service-here")
    assert load_settings(None, {"XDG_STATE_HOME": str(tmp_path / "state")}).spool == \
        tmp_path / "state" / "mailwatchd" / "spool"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_settings(None, {}).spool == tmp_path / "home" / ".local" / "state" / "mailwatchd" / "spool"


def test_every_user_submits_to_the_service_spool_where_the_service_is_installed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A user outside the submit group must not fill a per-user spool that no daemon reads."""
    service_spool = tmp_path / "var-spool-mailwatchd"
    service_spool.mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(environment, "SERVICE_SPOOL", service_spool)
    assert load_settings(None, {"XDG_STATE_HOME": str(tmp_path / "state")}).spool == service_spool


def test_explicit_spool_and_outbox(tmp_path: Path) -> None:
    settings = load_settings(None, {"MAILWATCHD_SPOOL": str(tmp_path / "s"), "MAILWATCHD_OUTBOX": str(tmp_path / "o")})
    assert (settings.spool, settings.outbox) == (tmp_path / "s", tmp_path / "o")


# -- the command line -----------------------------------------------------------------------------


def run_mailwatchd(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mailwatchd", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("values", "key"), [
    ({"EMAIL_HOST": "smtp.example.com", "EMAIL_PORT": "0", "EMAIL_USE_TLS": "true",
      "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD": PASSWORD}, "EMAIL_PORT"),
    ({"EMAIL_HOST": "smtp.example.com", "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD": PASSWORD}, "EMAIL_USE_TLS"),
    ({"MAILWATCHD_RELAYS": f"smtps://u:{PASSWORD}@relay.example.net?bogus=1"}, "MAILWATCHD_RELAYS"),
])
def test_cli_run_with_a_bad_file_exits_78(tmp_path: Path, clean_env: dict[str, str], values: dict[str, str],
                                         key: str) -> None:
    path = env_file(tmp_path / "bad.env", MAILWATCHD_SPOOL=str(tmp_path / "spool"), **values)
    result = run_mailwatchd(["run", "--config", str(path)], clean_env)
    assert result.returncode == exitcodes.CONFIG == 78, result.stderr
    assert key in result.stderr
    assert "fix:" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    assert not (tmp_path / "spool").exists()  # stopped before touching the spool


def test_ehlo_names_the_mail_domain_unless_told_otherwise(base_env: dict[str, str]) -> None:
    """EHLO and the completed addresses say the same domain (MAILWATCHD_DEFAULT_DOMAIN here)."""
    settings = load_settings(None, {**base_env, "MAILWATCHD_DEFAULT_DOMAIN": "mail.example.org"})
    assert settings.helo_name == "" and settings.ehlo_name == "mail.example.org"
    told = load_settings(None, {**base_env, "MAILWATCHD_DEFAULT_DOMAIN": "mail.example.org",
                                "MAILWATCHD_HELO_NAME": "mx1.example.org"})
    assert told.ehlo_name == "mx1.example.org"


@pytest.mark.parametrize(("key", "meant"), [
    ("EMAIL_HOTS", "EMAIL_HOST"), ("email_host", "EMAIL_HOST"), ("Email_Use_Tls", "EMAIL_USE_TLS"),
    ("MAILWATCHD_CONCURENCY", "MAILWATCHD_CONCURRENCY"), ("EMAIL_USE_SL", "EMAIL_USE_SSL"),
])
def test_a_misspelt_key_stops_the_start_with_the_key_it_resembles(key: str, meant: str, base_env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """A typo must not silently switch a setting off: EMAIL_HOTS used to mean 'no relay, local outbox'."""
    config = env_file(tmp_path / "mailwatchd.env", EMAIL_PORT="587", **{key: "smtp.example.com"})
    with pytest.raises(ConfigError) as info:
        load_settings(config, base_env)
    assert (info.value.key, info.value.fix) == (key, f"did you mean {meant}?")
    assert str(config) in info.value.problem


def test_the_other_keys_of_a_shared_django_env_file_are_ignored(base_env: dict[str, str], tmp_path: Path) -> None:
    config = env_file(tmp_path / ".env", SECRET_KEY="x", DEBUG="true", ALLOWED_HOSTS="*", EMAIL_BACKEND="smtp",
                      EMAIL_SUBJECT_PREFIX="[app] ", EMAIL_USE_LOCALTIME="true", DEFAULT_FROM_EMAIL="a@b.example",
                      SERVER_EMAIL="s@b.example", DATABASE_URL="postgres://db/app", EMAIL_HOST="smtp.example.com")
    assert load_settings(config, base_env).relays[0].primary.host == "smtp.example.com"


def test_a_misspelt_key_fails_the_cli_with_78_and_names_the_fix(clean_env: dict[str, str], tmp_path: Path) -> None:
    config = env_file(tmp_path / "mailwatchd.env", EMAIL_HOTS="smtp.example.com")
    env = {**clean_env, "MAILWATCHD_SPOOL": str(tmp_path / "spool")}
    done = subprocess.run([sys.executable, "-m", "mailwatchd", "queue", "--config", str(config)],
                          env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == exitcodes.CONFIG
    assert b"EMAIL_HOTS" in done.stderr and b"did you mean EMAIL_HOST?" in done.stderr
    # check is a monitoring plugin: the same mistake is UNKNOWN (3) with the fix on its first line.
    done = subprocess.run([sys.executable, "-m", "mailwatchd", "check", "--config", str(config)],
                          env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 3
    first = done.stdout.splitlines()[0]
    assert first.startswith(b"MAILWATCHD UNKNOWN - configuration error: EMAIL_HOTS")
    assert b"did you mean EMAIL_HOST?" in first
