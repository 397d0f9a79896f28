"""OAuth2 end to end: delivery and `check` through a fake Exchange Online / Gmail relay that validates bearer
tokens against a fake token endpoint over real TLS; a real daemon child for failover and the secret scan."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.relays.diagnosis import hint_for
from mailwatchd.settings.credentials import Secret
from mailwatchd.settings.relays import AuthMethod, Endpoint, OAuthConfig, RelayConfig, TlsMode, TokenGrant
from mailwatchd.transports.delivery import SmtpSession
from mailwatchd.transports.outcome import Cause, Outcome, Phase, Verdict, classify_reply
from mailwatchd.transports.smtpclient import Step
from mailwatchd.transports.tlsconfig import client_context
from mailwatchd.transports.tokens import Tokens
from tests.conftest import LOOPBACK, SmtpServer
from tests.daemonproc import drop, message, relay_env, run_cli
from tests.oauth_endpoint import OAuthEndpoint
from tests.oauth_relay import BASIC_AUTH_NOT_SUPPORTED, OAuthRelay, start_oauth_relay
from tests.probe_servers import probe_settings

MAILBOX = "reports@contoso.example"
CLIENT_ID = "5f0c-app-registration"
SECRET = "Q~8Xv.client-secret-value-not-to-be-seen"
OUTLOOK = "https://outlook.office365.com/.default"


@pytest.fixture
def endpoint(ca: trustme.CA, tmp_path: Path) -> Iterator[OAuthEndpoint]:
    with OAuthEndpoint(ca, tmp_path) as running:
        running.register_client(CLIENT_ID, SECRET)
        yield running
    assert running.handler_errors == []


@pytest.fixture
def exchange(server_tls_context: ssl.SSLContext, endpoint: OAuthEndpoint) -> Iterator[OAuthRelay]:
    with start_oauth_relay(server_tls_context, validate=endpoint.is_valid, mailboxes={MAILBOX}) as relay:
        yield relay


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "oauth-client-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


def oauth_relay(relay: OAuthRelay, endpoint: OAuthEndpoint, ca_file: Path, **changes: Any) -> RelayConfig:
    oauth = OAuthConfig(grant=TokenGrant.CLIENT_CREDENTIALS, token_url=endpoint.microsoft_url(), client_id=CLIENT_ID,
                        client_secret=Secret(SECRET), scope=OUTLOOK, cafile=endpoint.ca_file)
    fields: dict[str, Any] = {"name": "m365", "endpoints": (Endpoint(relay.host, relay.port, TlsMode.STARTTLS),),
                              "username": MAILBOX, "cafile": ca_file, "auth": AuthMethod.XOAUTH2, "oauth": oauth}
    fields.update(changes)
    return RelayConfig(**fields)


def outgoing(index: int) -> OutgoingMessage:
    data = message(index, sender=MAILBOX)
    return OutgoingMessage(f"q{index}", MAILBOX, ("rcpt@example.org",), data, len(data))


def oauth_env(clean_env: dict[str, str], spool: Path, relay: OAuthRelay, endpoint: OAuthEndpoint, ca_file: Path,
              secret_file: Path, **extra: str) -> dict[str, str]:
    settings = {"EMAIL_USE_TLS": "true", "EMAIL_SSL_CAFILE": str(ca_file), "EMAIL_HOST_USER": MAILBOX,
                "EMAIL_AUTH": "xoauth2", "EMAIL_OAUTH_TOKEN_URL": endpoint.microsoft_url(),
                "EMAIL_OAUTH_CLIENT_ID": CLIENT_ID, "EMAIL_OAUTH_CLIENT_SECRET_FILE": str(secret_file),
                "EMAIL_OAUTH_SCOPE": OUTLOOK, "EMAIL_OAUTH_CAFILE": str(endpoint.ca_file)}
    return relay_env(clean_env, spool, relay.host, relay.port, **{**settings, **extra})


def assert_no_secret(text: str, endpoint: OAuthEndpoint) -> None:
    for secret in (SECRET, *endpoint.issued):
        assert secret not in text
    assert "auth=Bearer" not in text


async def deliver_twice(relay: RelayConfig, tmp_path: Path, tokens: Tokens, steps: list[Step],
                        between: Any = None) -> list[Any]:
    settings = probe_settings(tmp_path)
    results = []
    for index in range(2):
        session = SmtpSession(relay, relay.primary, settings, client_context(relay), on_step=steps.append,
                              tokens=tokens)
        results.append(await session.deliver(outgoing(index)))
        await session.close()
        if between is not None and index == 0:
            between()
    return results


def test_sessions_share_one_token_and_deliver_as_the_mailbox(
        exchange: OAuthRelay, endpoint: OAuthEndpoint, ca_file: Path, tmp_path: Path) -> None:
    steps: list[Step] = []
    results = asyncio.run(deliver_twice(oauth_relay(exchange, endpoint, ca_file), tmp_path, Tokens(), steps))
    assert [result.outcome for result in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert [item.authenticated_as for item in exchange.handler.wait_for(2)] == [MAILBOX, MAILBOX]
    assert len(endpoint.requests) == 1, "the second session uses the cached token"
    token_steps = [step for step in steps if step.name == "token"]
    assert [step.ok for step in token_steps] == [True, True]
    assert token_steps[0].detail.startswith("from ") and token_steps[1].detail.startswith("cached")
    assert max(attempt.token_length for attempt in exchange.handler.recorded()) > 1000


def test_a_cached_token_the_relay_refuses_is_replaced_on_the_same_connection(
        exchange: OAuthRelay, endpoint: OAuthEndpoint, ca_file: Path, tmp_path: Path) -> None:
    steps: list[Step] = []
    results = asyncio.run(deliver_twice(oauth_relay(exchange, endpoint, ca_file), tmp_path, Tokens(), steps,
                                        between=endpoint.expire_all))
    assert [result.outcome for result in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert len(endpoint.requests) == 2
    auth_steps = [step for step in steps if step.name == "auth"]
    assert "accepted with a new token" in auth_steps[1].detail
    assert [attempt.result for attempt in exchange.handler.recorded()] == ["accepted", "bad_token", "accepted"]


def test_an_unreachable_token_endpoint_is_a_relay_fault_naming_the_endpoint(
        exchange: OAuthRelay, endpoint: OAuthEndpoint, ca_file: Path, tmp_path: Path) -> None:
    endpoint.fail_with_status(503)
    relay = oauth_relay(exchange, endpoint, ca_file)
    session = SmtpSession(relay, relay.primary, probe_settings(tmp_path), client_context(relay), tokens=Tokens())
    result = asyncio.run(session.deliver(outgoing(0)))
    assert (result.outcome, result.cause) == (Outcome.RELAY_FAULT, Cause.TOKEN_UNREACHABLE)
    assert endpoint.address in result.detail and "503" in result.detail
    assert exchange.handler.recorded() == [], "no AUTH without a token"


def test_check_shows_the_token_step_and_no_secret(
        exchange: OAuthRelay, endpoint: OAuthEndpoint, ca_file: Path, secret_file: Path, spool_dir: Path,
        clean_env: dict[str, str]) -> None:
    env = oauth_env(clean_env, spool_dir, exchange, endpoint, ca_file, secret_file)
    result = run_cli(env, "check", "--json")
    report = json.loads(result.stdout)
    (entry,) = [e for e in report["endpoints"] if e["port"] == exchange.port]
    assert entry["ok"] is True, entry
    names = [step["name"] for step in entry["steps"]]
    assert names.index("ehlo_tls") < names.index("token") < names.index("auth")
    assert entry["timings_ms"]["token"] > 0
    plain = run_cli(env, "check")
    assert plain.returncode == 0, plain.stdout
    assert "token" in plain.stdout.decode()
    assert_no_secret(result.stdout.decode() + result.stderr.decode() + plain.stdout.decode()
                     + plain.stderr.decode(), endpoint)


def test_check_names_a_bad_client_secret_and_how_to_fix_it(
        exchange: OAuthRelay, endpoint: OAuthEndpoint, ca_file: Path, tmp_path: Path, spool_dir: Path,
        clean_env: dict[str, str]) -> None:
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret-value\n")
    env = oauth_env(clean_env, spool_dir, exchange, endpoint, ca_file, wrong)
    result = run_cli(env, "check", "--json")
    assert result.returncode == 2
    (entry,) = [e for e in json.loads(result.stdout)["endpoints"] if e["port"] == exchange.port]
    assert entry["cause"] == "token_failed" and "invalid_client" in entry["detail"]
    assert "AADSTS7000215" in entry["detail"] and "Trace ID" not in entry["detail"]
    assert "secret's value (not its ID)" in entry["hint"]
    assert "not-the-secret-value" not in result.stdout.decode() + result.stderr.decode()


def test_a_revoked_google_refresh_token_says_to_obtain_a_new_one(
        server_tls_context: ssl.SSLContext, endpoint: OAuthEndpoint, ca_file: Path, tmp_path: Path,
        spool_dir: Path, clean_env: dict[str, str]) -> None:
    refresh = endpoint.mint_refresh_token(CLIENT_ID)
    refresh_file = tmp_path / "oauth-refresh-token"
    refresh_file.write_text(refresh + "\n")
    endpoint.revoke_refresh_token(refresh)
    with start_oauth_relay(server_tls_context, validate=endpoint.is_valid, mailboxes={MAILBOX},
                           style="google", implicit_tls=True) as gmail:
        env = relay_env(clean_env, spool_dir, gmail.host, gmail.port, EMAIL_USE_SSL="true",
                        EMAIL_SSL_CAFILE=str(ca_file), EMAIL_HOST_USER=MAILBOX, EMAIL_AUTH="oauthbearer",
                        EMAIL_OAUTH_TOKEN_URL=endpoint.google_url, EMAIL_OAUTH_CLIENT_ID=CLIENT_ID,
                        EMAIL_OAUTH_CLIENT_SECRET_FILE=str(tmp_path / "secret"),
                        EMAIL_OAUTH_REFRESH_TOKEN_FILE=str(refresh_file), EMAIL_OAUTH_CAFILE=str(endpoint.ca_file))
        (tmp_path / "secret").write_text(SECRET)
        result = run_cli(env, "check", "--json")
    (entry,) = [e for e in json.loads(result.stdout)["endpoints"] if e["port"] == gmail.port]
    assert entry["cause"] == "token_failed" and "invalid_grant" in entry["detail"]
    assert "obtain a new one" in entry["hint"]
    output = result.stdout.decode() + result.stderr.decode()
    assert refresh not in output and SECRET not in output


@pytest.mark.parametrize("reply", [None, BASIC_AUTH_NOT_SUPPORTED])
def test_a_password_refused_by_a_tenant_without_basic_auth_says_to_switch_to_oauth(
        server_tls_context: ssl.SSLContext, endpoint: OAuthEndpoint, ca_file: Path, tmp_path: Path,
        spool_dir: Path, clean_env: dict[str, str], reply: str | None) -> None:
    password = tmp_path / "password"
    password.write_text("the-old-mailbox-password\n")
    with start_oauth_relay(server_tls_context, validate=endpoint.is_valid, mailboxes={MAILBOX},
                           basic_auth_reply=reply) as tenant:
        env = relay_env(clean_env, spool_dir, tenant.host, tenant.port, EMAIL_USE_TLS="true",
                        EMAIL_SSL_CAFILE=str(ca_file), EMAIL_HOST_USER=MAILBOX,
                        EMAIL_HOST_PASSWORD_FILE=str(password))
        result = run_cli(env, "check", "--json")
    (entry,) = [e for e in json.loads(result.stdout)["endpoints"] if e["port"] == tenant.port]
    assert entry["cause"] == "basic_auth_disabled"
    assert "EMAIL_AUTH=xoauth2" in entry["hint"] and "SMTP.SendAsApp" in entry["hint"]


def test_exchange_refusing_a_fresh_token_points_at_the_app_permissions(
        server_tls_context: ssl.SSLContext, endpoint: OAuthEndpoint, ca_file: Path, secret_file: Path,
        spool_dir: Path, clean_env: dict[str, str]) -> None:
    with start_oauth_relay(server_tls_context, validate=endpoint.is_valid, mailboxes={"other@contoso.example"}) \
            as tenant:
        env = oauth_env(clean_env, spool_dir, tenant, endpoint, ca_file, secret_file)
        result = run_cli(env, "check", "--json")
        attempts = tenant.handler.recorded()
    (entry,) = [e for e in json.loads(result.stdout)["endpoints"] if e["port"] == tenant.port]
    assert entry["cause"] == "auth_failed" and "5.7.3" in entry["detail"]
    assert "SMTP.SendAsApp" in entry["hint"] and "New-ServicePrincipal" in entry["hint"]
    assert len(attempts) == 1, "a token fetched for this session is not fetched again"
    assert_no_secret(result.stdout.decode() + result.stderr.decode(), endpoint)


def test_daemon_delivers_with_oauth_fails_over_when_the_token_endpoint_is_down_and_never_logs_a_secret(
        exchange: OAuthRelay, endpoint: OAuthEndpoint, ca_file: Path, secret_file: Path, spool_dir: Path,
        clean_env: dict[str, str], smtp_server_factory: Any, daemons: Any) -> None:
    fallback: SmtpServer = smtp_server_factory(starttls=False)
    env = oauth_env(clean_env, spool_dir, exchange, endpoint, ca_file, secret_file,
                    MAILWATCHD_RELAYS=f"smtp://{fallback.host}:{fallback.port}?name=fallback",
                    MAILWATCHD_STATUS_FILE=str(spool_dir / "status.json"))
    first = daemons(env)
    drop(spool_dir, message(0, sender=MAILBOX), "m0")
    assert exchange.handler.wait_for(1)[0].authenticated_as == MAILBOX
    first.wait_event("relay_up", lambda e: str(exchange.port) in str(e.get("endpoint")))  # the probe logged in too
    assert first.stop() == 0
    assert len(endpoint.requests) == 1, "delivery and the probe share one token"
    endpoint.expire_all()
    endpoint.fail_with_status(503)
    second = daemons(env)  # a new process: no cached token
    drop(spool_dir, message(1, sender=MAILBOX), "m1")
    assert len(fallback.handler.wait_for(1)) == 1
    down = second.wait_event("relay_down", lambda e: str(exchange.port) in str(e.get("endpoint")))[0]
    assert down["cause"] == "token_unreachable" and "503" in down["detail"]
    assert second.stop() == 0
    status = (spool_dir / "status.json").read_text()
    assert_no_secret("\n".join(first.raw_lines + second.raw_lines) + status, endpoint)


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that tunnels to loopback targets only, and records them."""

    def __init__(self) -> None:
        self.server = socket.create_server((LOOPBACK, 0))
        self.port = self.server.getsockname()[1]
        self.targets: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            host, port = target.rsplit(":", 1)
            if method != "CONNECT" or host != LOOPBACK:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                return
            self.targets.append(target)
            with socket.create_connection((host, int(port))) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                pipe = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
                pipe.start()
                _copy(client, upstream)
                pipe.join(5)

    def close(self) -> None:
        self.server.close()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def test_the_token_endpoint_is_reached_through_https_proxy(endpoint: OAuthEndpoint,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = ConnectProxy()
    monkeypatch.setenv("HTTPS_PROXY", f"http://{LOOPBACK}:{proxy.port}")
    oauth = OAuthConfig(grant=TokenGrant.CLIENT_CREDENTIALS, token_url=endpoint.microsoft_url(), client_id=CLIENT_ID,
                        client_secret=Secret(SECRET), scope=OUTLOOK, cafile=endpoint.ca_file)
    try:
        token = asyncio.run(Tokens().for_relay("m365", oauth, timeout=10.0).token())
    finally:
        proxy.close()
    assert endpoint.is_valid(token.value.reveal())
    assert proxy.targets == [endpoint.address]


def test_smtp_auth_switched_off_for_an_oauth_mailbox_says_how_to_turn_it_on(
        exchange: OAuthRelay, endpoint: OAuthEndpoint, ca_file: Path) -> None:
    relay = oauth_relay(exchange, endpoint, ca_file)
    detail = ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. "
              "Visit https://aka.ms/smtp_auth_disabled for more information.")
    verdict = classify_reply(Phase.AUTH, 535, detail)
    assert verdict == Verdict(Outcome.RELAY_FAULT, Cause.BASIC_AUTH_DISABLED)
    hint = hint_for(verdict.cause, relay.primary, detail, relay=relay)
    assert f"Set-CASMailbox -Identity {MAILBOX} -SmtpClientAuthenticationDisabled $false" in hint
    assert "blocks OAuth2 logins too" in hint


def test_google_refusing_a_token_and_a_mechanism_not_offered_get_their_own_hints(
        server_tls_context: ssl.SSLContext, endpoint: OAuthEndpoint, ca_file: Path, secret_file: Path,
        spool_dir: Path, clean_env: dict[str, str]) -> None:
    with start_oauth_relay(server_tls_context, validate=endpoint.is_valid, mailboxes={"someone@else.example"},
                           style="google") as gmail:
        env = oauth_env(clean_env, spool_dir, gmail, endpoint, ca_file, secret_file)
        refused = run_cli(env, "check", "--json")
    (entry,) = [e for e in json.loads(refused.stdout)["endpoints"] if e["port"] == gmail.port]
    assert entry["cause"] == "auth_failed" and "5.7.8" in entry["detail"]
    assert "https://mail.google.com/ scope" in entry["hint"]
    with start_oauth_relay(server_tls_context, validate=endpoint.is_valid, mailboxes={MAILBOX}) as exchange:
        env = oauth_env(clean_env, spool_dir, exchange, endpoint, ca_file, secret_file, EMAIL_AUTH="oauthbearer")
        unavailable = run_cli(env, "check", "--json")
    (entry,) = [e for e in json.loads(unavailable.stdout)["endpoints"] if e["port"] == exchange.port]
    assert entry["cause"] == "auth_unavailable" and "OAUTHBEARER" in entry["detail"]
    assert "use auth=xoauth2" in entry["hint"]
