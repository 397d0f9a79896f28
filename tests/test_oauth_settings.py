"""OAuth2 relay settings: EMAIL_AUTH / EMAIL_OAUTH_* and the relay-URL options, the grant they select, and
the errors that name the key and the fix."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from mailwatchd import exitcodes
from mailwatchd.errors import ConfigError
from mailwatchd.settings.config import load_settings
from mailwatchd.settings.relays import AuthMethod, TokenGrant

SECRET = "Xq8~client-secret-value-7f3a"
REFRESH = "1//0refresh-token-value-9c2e"


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "oauth-client-secret").write_text(SECRET + "\n")
    (directory / "oauth-refresh-token").write_text(REFRESH + "\n")
    return directory


def base(tmp_path: Path, secrets: Path, **values: str) -> dict[str, str]:
    return {"MAILWATCHD_SPOOL": str(tmp_path / "spool"), "CREDENTIALS_DIRECTORY": str(secrets), **values}


def microsoft(tmp_path: Path, secrets: Path, **values: str) -> dict[str, str]:
    return base(tmp_path, secrets, EMAIL_HOST="smtp.office365.com", EMAIL_PORT="587", EMAIL_USE_TLS="true",
                EMAIL_HOST_USER="reports@contoso.example", EMAIL_AUTH="xoauth2",
                EMAIL_OAUTH_TENANT="contoso.onmicrosoft.com", EMAIL_OAUTH_CLIENT_ID="0f1e2d3c-app",
                EMAIL_OAUTH_CLIENT_SECRET_FILE="oauth-client-secret", **values)


def error(environ: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ)
    return info.value


def test_microsoft_app_only_from_email_keys(tmp_path: Path, secrets: Path) -> None:
    relay = load_settings(None, microsoft(tmp_path, secrets)).relays[0]
    assert relay.auth is AuthMethod.XOAUTH2 and relay.password is None
    oauth = relay.oauth
    assert oauth is not None and oauth.grant is TokenGrant.CLIENT_CREDENTIALS
    assert oauth.token_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert oauth.scope == "https://outlook.office365.com/.default"
    assert oauth.client_id == "0f1e2d3c-app"
    assert oauth.client_secret is not None and oauth.client_secret.reveal() == SECRET
    assert SECRET not in repr(relay) and SECRET not in str(relay)


def test_google_refresh_token_from_a_relay_url(tmp_path: Path, secrets: Path) -> None:
    url = ("smtp+ssl://ops%40example.org@smtp.gmail.com:465?name=gmail&auth=oauthbearer&client_id=123.apps"
           "&client_secret_file=oauth-client-secret&refresh_token_file=oauth-refresh-token")
    relay = load_settings(None, base(tmp_path, secrets, MAILWATCHD_RELAYS=url)).relays[0]
    assert (relay.name, relay.username, relay.auth) == ("gmail", "ops@example.org", AuthMethod.OAUTHBEARER)
    oauth = relay.oauth
    assert oauth is not None and oauth.grant is TokenGrant.REFRESH_TOKEN
    assert oauth.token_url == "https://oauth2.googleapis.com/token"
    assert oauth.scope is None  # Google's refresh token keeps the scope the user consented to
    assert oauth.refresh_token is not None and oauth.refresh_token.reveal() == REFRESH
    assert REFRESH not in repr(relay)


def test_microsoft_delegated_refresh_token_gets_the_delegated_scope(tmp_path: Path, secrets: Path) -> None:
    environ = microsoft(tmp_path, secrets, EMAIL_OAUTH_REFRESH_TOKEN_FILE="oauth-refresh-token")
    oauth = load_settings(None, environ).relays[0].oauth
    assert oauth is not None and oauth.grant is TokenGrant.REFRESH_TOKEN
    assert oauth.scope == "offline_access https://outlook.office.com/SMTP.Send"


def test_a_token_url_replaces_the_tenant_for_sovereign_clouds(tmp_path: Path, secrets: Path) -> None:
    environ = microsoft(tmp_path, secrets, EMAIL_OAUTH_TOKEN_URL="https://login.microsoftonline.us/t/oauth2/v2.0/token")
    del environ["EMAIL_OAUTH_TENANT"]
    oauth = load_settings(None, environ).relays[0].oauth
    assert oauth is not None and oauth.token_url == "https://login.microsoftonline.us/t/oauth2/v2.0/token"
    environ["EMAIL_OAUTH_TENANT"] = "contoso"
    assert error(environ).key == "EMAIL_OAUTH_TENANT"


def test_certificate_credentials(tmp_path: Path, secrets: Path) -> None:
    ca = trustme.CA()
    pem = secrets / "oauth-certificate"
    leaf = ca.issue_cert("app.example")
    pem.write_bytes(leaf.cert_chain_pems[0].bytes() + leaf.private_key_pem.bytes())
    environ = microsoft(tmp_path, secrets, EMAIL_OAUTH_CERTIFICATE_FILE="oauth-certificate")
    assert error(environ).key == "EMAIL_OAUTH_CERTIFICATE_FILE"  # both a secret and a certificate
    del environ["EMAIL_OAUTH_CLIENT_SECRET_FILE"]
    oauth = load_settings(None, environ).relays[0].oauth
    assert oauth is not None and oauth.certificate == pem and oauth.client_secret is None
    pem.write_bytes(leaf.cert_chain_pems[0].bytes())  # no private key
    assert "private key" in str(error(environ))


def test_token_command_runs_without_a_shell(tmp_path: Path, secrets: Path) -> None:
    program = tmp_path / "get token"
    program.write_text("#!/bin/sh\necho t\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    environ = base(tmp_path, secrets, EMAIL_HOST="smtp.example.org", EMAIL_USE_TLS="true", EMAIL_HOST_USER="a@b.c",
                   EMAIL_AUTH="xoauth2", EMAIL_OAUTH_TOKEN_COMMAND=f"'{program}' --account 'a b'")
    oauth = load_settings(None, environ).relays[0].oauth
    assert oauth is not None and oauth.grant is TokenGrant.COMMAND
    assert oauth.command == (str(program), "--account", "a b")
    environ["EMAIL_OAUTH_TOKEN_COMMAND"] = "no-such-token-program-here"
    assert "not an executable program" in str(error(environ))
    environ["EMAIL_OAUTH_TOKEN_COMMAND"] = f"'{program}'"
    environ["EMAIL_OAUTH_TENANT"] = "contoso"
    assert error(environ).key == "EMAIL_OAUTH_TENANT"


@pytest.mark.parametrize(("change", "key", "words"), [
    ({"EMAIL_AUTH": "bearer"}, "EMAIL_AUTH", "not an authentication method"),
    ({"EMAIL_HOST_USER": None}, "EMAIL_AUTH", "needs the mailbox"),
    ({"EMAIL_OAUTH_CLIENT_SECRET_FILE": None}, "EMAIL_AUTH", "needs a token source"),
    ({"EMAIL_OAUTH_CLIENT_ID": None}, "EMAIL_OAUTH_CLIENT_ID", "is not set"),
    ({"EMAIL_OAUTH_TENANT": None}, "EMAIL_OAUTH_TENANT", "token endpoint is not known"),
    ({"EMAIL_OAUTH_TENANT": None, "EMAIL_OAUTH_TOKEN_URL": "http://login.example/token"}, "EMAIL_OAUTH_TOKEN_URL",
     "not an https:// URL"),
    ({"EMAIL_AUTH": "password"}, "EMAIL_OAUTH_TENANT", "is an OAuth2 setting"),
    ({"EMAIL_HOST_PASSWORD": "pw"}, "EMAIL_HOST_PASSWORD_FILE", "OAuth2 token"),
    ({"EMAIL_USE_TLS": "false", "EMAIL_PORT": "25"}, "EMAIL_USE_TLS", "without TLS"),
    ({"EMAIL_OAUTH_CLIENT_SECRET_FILE": "missing-credential"}, "EMAIL_OAUTH_CLIENT_SECRET_FILE", "missing"),
    ({"EMAIL_OAUTH_CAFILE": "/nonexistent/ca.pem"}, "EMAIL_OAUTH_CAFILE", "does not exist"),
])
def test_bad_oauth_settings_name_the_key(tmp_path: Path, secrets: Path, change: dict[str, str | None], key: str,
                                         words: str) -> None:
    environ = microsoft(tmp_path, secrets)
    for name, value in change.items():
        if value is None:
            environ.pop(name)
        else:
            environ[name] = value
    problem = error(environ)
    assert problem.key == key and words in str(problem)
    assert SECRET not in str(problem)


def test_oauth_keys_without_a_host_are_refused(tmp_path: Path, secrets: Path) -> None:
    problem = error(base(tmp_path, secrets, EMAIL_OAUTH_CLIENT_ID="x"))
    assert problem.key == "EMAIL_OAUTH_CLIENT_ID" and "EMAIL_HOST is not" in str(problem)


def test_relay_url_errors_point_at_mailwatchd_relays(tmp_path: Path, secrets: Path) -> None:
    url = "smtp+tls://a%40b.c@smtp.office365.com?auth=xoauth2&client_id=x&client_secret_file=oauth-client-secret"
    problem = error(base(tmp_path, secrets, MAILWATCHD_RELAYS=url))
    assert problem.key == "MAILWATCHD_RELAYS" and "token endpoint is not known" in str(problem)


def test_validate_counts_the_oauth_secrets_and_exits_78_on_a_bad_one(tmp_path: Path, secrets: Path) -> None:
    environ = {**os.environ, **microsoft(tmp_path, secrets)}
    environ.pop("MAILWATCHD_CONFIG", None)
    empty = tmp_path / "mailwatchd.env"
    empty.write_text("")
    ok = subprocess.run([sys.executable, "-m", "mailwatchd", "validate", "--config", str(empty)], env=environ,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "1 secret read" in ok.stdout and SECRET not in ok.stdout + ok.stderr
    environ["EMAIL_OAUTH_CLIENT_SECRET_FILE"] = "missing-credential"
    bad = subprocess.run([sys.executable, "-m", "mailwatchd", "validate", "--config", str(empty)], env=environ,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == exitcodes.CONFIG
    assert "EMAIL_OAUTH_CLIENT_SECRET_FILE" in bad.stderr
