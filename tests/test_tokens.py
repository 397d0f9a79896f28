"""OAuth2 access tokens: fetched from a real (fake) token endpoint over HTTPS on loopback, or from a real
child process; cached, shared, refreshed, and every failure named without a secret in it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mailwatchd.settings.credentials import Secret
from mailwatchd.settings.relays import OAuthConfig, TokenGrant
from mailwatchd.transports.outcome import Cause
from mailwatchd.transports.tokens import (
    ASSERTION_LIFETIME_S,
    COMMAND_TOKEN_LIFETIME_S,
    AccessToken,
    TokenFailed,
    TokenProvider,
    Tokens,
    refresh_margin,
)
from tests.conftest import wait_until
from tests.oauth_endpoint import (
    ASSERTION_TYPE,
    OAuthEndpoint,
    b64url,
    b64url_decode,
    make_certificate,
    sha1_thumbprint,
)
from tests.probe_servers import closed_port

OUTLOOK = "https://outlook.office365.com/.default"
SECRET = "Qx8Q~client-secret-value.Do-not-print-0123456789"
PY = sys.executable


@pytest.fixture
def endpoint(ca: trustme.CA, tmp_path: Path) -> Iterator[OAuthEndpoint]:
    with OAuthEndpoint(ca, tmp_path) as running:
        yield running
    assert running.handler_errors == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def app_config(endpoint: OAuthEndpoint, secret: str = SECRET, **changes: object) -> OAuthConfig:
    endpoint.register_client("app-id", SECRET)
    fields: dict[str, object] = {"grant": TokenGrant.CLIENT_CREDENTIALS, "token_url": endpoint.microsoft_url(),
                                 "client_id": "app-id", "client_secret": Secret(secret), "scope": OUTLOOK,
                                 "cafile": endpoint.ca_file}
    fields.update(changes)
    return OAuthConfig(**fields)  # type: ignore[arg-type]


def fetch(provider: TokenProvider) -> AccessToken:
    return asyncio.run(provider.token())


def failure(provider: TokenProvider) -> TokenFailed:
    with pytest.raises(TokenFailed) as caught:
        fetch(provider)
    return caught.value


def assert_no_secret(texts: list[str], *secrets: str) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, (secret[:12], text)


def failure_texts(exc: TokenFailed) -> list[str]:
    return [str(exc), repr(exc), exc.detail, str(exc.error), *map(str, exc.args)]


# -- client secret: issue, cache, share ------------------------------------------------------------------


def test_a_client_secret_token_is_fetched_once_then_served_from_the_cache(endpoint: OAuthEndpoint) -> None:
    provider = TokenProvider(app_config(endpoint), timeout=5)
    first = fetch(provider)
    again = [fetch(provider), fetch(provider)]  # separate event loops, as `check` and the daemon may use
    assert first.fetched and first.detail == f"from {endpoint.address}, expires in 3599 s"
    assert all(not token.fetched and token.value == first.value for token in again)
    assert again[0].detail.startswith("cached, expires in ")
    assert len(endpoint.requests) == 1 and endpoint.is_valid(first.value.reveal())
    assert 1500 <= len(first.value.reveal()) <= 2500 and first.value.reveal().startswith("eyJ")
    request = endpoint.requests[0]
    assert request.form == {"grant_type": "client_credentials", "scope": OUTLOOK, "client_id": "app-id",
                            "client_secret": SECRET}  # client_secret_post: in the body, not in a Basic header
    assert "authorization" not in request.headers and provider.endpoint == endpoint.address


def test_concurrent_callers_share_one_fetch(endpoint: OAuthEndpoint) -> None:
    provider = TokenProvider(app_config(endpoint), timeout=5)
    endpoint.delay = 0.3

    async def five() -> list[AccessToken]:
        return await asyncio.gather(*(provider.token() for _ in range(5)))

    tokens = asyncio.run(five())
    assert len(endpoint.requests) == 1
    assert len({token.value.reveal() for token in tokens}) == 1 and [t.fetched for t in tokens].count(True) == 1


def test_concurrent_callers_share_one_failure(endpoint: OAuthEndpoint) -> None:
    provider = TokenProvider(app_config(endpoint, secret="wrong"), timeout=5)
    endpoint.delay = 0.2

    async def three() -> list[AccessToken | BaseException]:
        return await asyncio.gather(*(provider.token() for _ in range(3)), return_exceptions=True)

    results = asyncio.run(three())
    assert all(isinstance(result, TokenFailed) and result.error == "invalid_client" for result in results)
    assert len(endpoint.requests) == 1


# -- refresh before expiry, invalidate ---------------------------------------------------------------------


def test_the_refresh_margin_is_max_60s_or_a_tenth_but_at_most_half_the_lifetime() -> None:
    assert refresh_margin(3599) == pytest.approx(359.9)
    assert refresh_margin(COMMAND_TOKEN_LIFETIME_S) == 60
    assert refresh_margin(100) == 50 and refresh_margin(2) == 1


def test_a_token_is_replaced_when_it_expires_within_the_margin(endpoint: OAuthEndpoint) -> None:
    clock = FakeClock()
    provider = TokenProvider(app_config(endpoint), timeout=5, clock=clock)
    first = fetch(provider)
    assert first.expires_at == clock.now + 3599
    clock.now += 3599 - 359.9 - 1
    assert not fetch(provider).fetched and len(endpoint.requests) == 1
    clock.now += 2
    second = fetch(provider)
    assert second.fetched and second.value != first.value and len(endpoint.requests) == 2


def test_a_short_lived_token_is_reused_then_replaced_while_the_endpoint_still_takes_it(
        ca: trustme.CA, tmp_path: Path) -> None:
    """A 2 s token (the endpoint's own clock expires it): reused at once, replaced after about 1 s, before it
    expired at the endpoint."""
    with OAuthEndpoint(ca, tmp_path, lifetime=2) as endpoint:
        provider = TokenProvider(app_config(endpoint), timeout=5)
        first = fetch(provider)
        assert not fetch(provider).fetched and len(endpoint.requests) == 1

        def replaced() -> tuple[AccessToken, bool] | None:
            still_valid = endpoint.is_valid(first.value.reveal())
            token = fetch(provider)
            return (token, still_valid) if token.fetched else None

        second, old_was_valid = wait_until(replaced, timeout=5, interval=0.05, message="a new token")
        assert old_was_valid and second.value != first.value and endpoint.is_valid(second.value.reveal())
        wait_until(lambda: not endpoint.is_valid(first.value.reveal()), timeout=5, message="the old token to expire")
        assert len(endpoint.requests) == 2


def test_invalidate_makes_the_next_call_fetch_and_a_stale_invalidate_changes_nothing(
        endpoint: OAuthEndpoint) -> None:
    provider = TokenProvider(app_config(endpoint), timeout=5)
    first = fetch(provider)
    endpoint.expire_all()  # what the relay then says: 535 5.7.3
    assert not endpoint.is_valid(first.value.reveal())
    provider.invalidate(first)
    second = fetch(provider)
    assert second.fetched and endpoint.is_valid(second.value.reveal())
    provider.invalidate(first)  # a second session's late report about the old token
    third = fetch(provider)
    assert not third.fetched and third.value == second.value and len(endpoint.requests) == 2


# -- certificate (client assertion) ------------------------------------------------------------------------


def test_a_certificate_client_assertion_is_accepted(endpoint: OAuthEndpoint) -> None:
    pem = endpoint.register_certificate_client("cert-app")
    config = OAuthConfig(TokenGrant.CLIENT_CREDENTIALS, endpoint.microsoft_url(), "cert-app", certificate=pem,
                         scope=OUTLOOK, cafile=endpoint.ca_file)
    token = fetch(TokenProvider(config, timeout=5))
    assert token.fetched and endpoint.is_valid(token.value.reveal())
    form = endpoint.requests[0].form
    assert form["client_assertion_type"] == ASSERTION_TYPE and "client_secret" not in form
    header_b64, claims_b64, _ = form["client_assertion"].split(".")
    header, claims = json.loads(b64url_decode(header_b64)), json.loads(b64url_decode(claims_b64))
    assert header["alg"] == "RS256" and header["x5t"] == sha1_thumbprint(pem) and "x5t#S256" in header
    assert claims["aud"] == endpoint.microsoft_url() and claims["iss"] == claims["sub"] == "cert-app"
    assert claims["exp"] - claims["iat"] == ASSERTION_LIFETIME_S and claims["jti"] and claims["nbf"] <= time.time()


def test_an_unregistered_certificate_is_refused(endpoint: OAuthEndpoint, tmp_path: Path) -> None:
    endpoint.register_certificate_client("cert-app")
    config = OAuthConfig(TokenGrant.CLIENT_CREDENTIALS, endpoint.microsoft_url(), "cert-app",
                         certificate=make_certificate(tmp_path, "other"), scope=OUTLOOK, cafile=endpoint.ca_file)
    exc = failure(TokenProvider(config, timeout=5))
    assert exc.cause is Cause.TOKEN_FAILED and exc.error == "invalid_client"
    assert "AADSTS700027" in exc.detail and "not registered on application." in exc.detail


def test_a_certificate_file_without_a_key_is_named(endpoint: OAuthEndpoint, tmp_path: Path) -> None:
    cert_only = tmp_path / "cert-only.pem"
    pem = make_certificate(tmp_path).read_text()
    cert_only.write_text(pem[:pem.index("-----BEGIN PRIVATE KEY")])
    config = OAuthConfig(TokenGrant.CLIENT_CREDENTIALS, endpoint.microsoft_url(), "cert-app", certificate=cert_only,
                         scope=OUTLOOK, cafile=endpoint.ca_file)
    exc = failure(TokenProvider(config, timeout=5))
    assert exc.cause is Cause.TOKEN_FAILED and str(cert_only) in exc.detail and "private key" in exc.detail
    assert endpoint.requests == []


# -- the endpoint says no ----------------------------------------------------------------------------------


def test_a_wrong_secret_is_token_failed_with_the_first_sentence_only(endpoint: OAuthEndpoint) -> None:
    wrong = "wrong-secret-value-0123456789"
    exc = failure(TokenProvider(app_config(endpoint, secret=wrong), timeout=5))
    reply = endpoint.requests[0].reply
    assert exc.cause is Cause.TOKEN_FAILED and exc.error == "invalid_client"
    assert exc.detail == (f"{endpoint.address} refused the token request (HTTP 401): invalid_client: "
                          "AADSTS7000215: Invalid client secret provided.")
    assert reply["trace_id"] not in exc.detail and "Trace ID" not in exc.detail
    assert_no_secret(failure_texts(exc), wrong, SECRET)


def test_a_scope_without_default_is_refused_as_invalid_scope(endpoint: OAuthEndpoint) -> None:
    exc = failure(TokenProvider(app_config(endpoint, scope="https://outlook.office.com/SMTP.Send"), timeout=5))
    assert exc.cause is Cause.TOKEN_FAILED and exc.error == "invalid_scope" and "AADSTS70011" in exc.detail


def test_an_http_token_url_is_refused_without_a_request(endpoint: OAuthEndpoint) -> None:
    url = endpoint.microsoft_url().replace("https://", "http://")
    exc = failure(TokenProvider(app_config(endpoint, token_url=url), timeout=5))
    assert exc.cause is Cause.TOKEN_FAILED and "https://" in exc.detail and endpoint.requests == []


# -- refresh tokens ----------------------------------------------------------------------------------------


def google_config(endpoint: OAuthEndpoint, refresh_token: str) -> OAuthConfig:
    return OAuthConfig(TokenGrant.REFRESH_TOKEN, endpoint.google_url, "google-app.apps.googleusercontent.com",
                       client_secret=Secret(SECRET), refresh_token=Secret(refresh_token),
                       scope="https://mail.google.com/", cafile=endpoint.ca_file)


def test_a_refresh_token_grant_sends_what_google_requires(endpoint: OAuthEndpoint) -> None:
    endpoint.register_client("google-app.apps.googleusercontent.com", SECRET)
    refresh = endpoint.mint_refresh_token("google-app.apps.googleusercontent.com")
    token = fetch(TokenProvider(google_config(endpoint, refresh), timeout=5))
    assert token.fetched and endpoint.is_valid(token.value.reveal())
    assert endpoint.requests[0].form == {"grant_type": "refresh_token", "refresh_token": refresh,
                                         "scope": "https://mail.google.com/",
                                         "client_id": "google-app.apps.googleusercontent.com", "client_secret": SECRET}


def test_a_rotated_refresh_token_is_used_from_then_on(ca: trustme.CA, tmp_path: Path) -> None:
    """Microsoft delegated, a public client (no secret): each reply carries a new refresh token; the old one
    stays valid at Microsoft, the provider uses the newest."""
    with OAuthEndpoint(ca, tmp_path, rotate_refresh_tokens=True) as endpoint:
        endpoint.register_client("public-app")
        original = endpoint.mint_refresh_token("public-app")
        config = OAuthConfig(TokenGrant.REFRESH_TOKEN, endpoint.microsoft_url("organizations"), "public-app",
                             refresh_token=Secret(original), scope="offline_access https://outlook.office.com/SMTP.Send",
                             cafile=endpoint.ca_file)
        provider = TokenProvider(config, timeout=5)
        provider.invalidate(fetch(provider))
        fetch(provider)
        first, second = endpoint.requests
        rotated = first.reply["refresh_token"]
        assert first.form["refresh_token"] == original and "client_secret" not in first.form
        assert second.form["refresh_token"] == rotated != original and endpoint.refresh_token_valid(original)
        assert {original, rotated, second.reply["refresh_token"]} <= set(provider.secrets())


def test_a_revoked_refresh_token_is_token_failed_invalid_grant(endpoint: OAuthEndpoint) -> None:
    endpoint.register_client("google-app.apps.googleusercontent.com", SECRET)
    refresh = endpoint.mint_refresh_token("google-app.apps.googleusercontent.com")
    endpoint.revoke_refresh_token(refresh)
    exc = failure(TokenProvider(google_config(endpoint, refresh), timeout=5))
    assert exc.cause is Cause.TOKEN_FAILED and exc.error == "invalid_grant"
    assert exc.detail.endswith("(HTTP 400): invalid_grant: Token has been expired or revoked.")
    assert_no_secret(failure_texts(exc), refresh, SECRET)


# -- no usable answer --------------------------------------------------------------------------------------


def test_an_endpoint_answering_503_is_unreachable(endpoint: OAuthEndpoint) -> None:
    endpoint.fail_with_status(503)
    exc = failure(TokenProvider(app_config(endpoint), timeout=5))
    assert exc.cause is Cause.TOKEN_UNREACHABLE and exc.error is None
    assert exc.detail == f"token endpoint {endpoint.address}: HTTP 503 Service Unavailable"


def test_a_slow_endpoint_is_unreachable_at_the_deadline(endpoint: OAuthEndpoint) -> None:
    endpoint.delay = 10
    started = time.monotonic()
    exc = failure(TokenProvider(app_config(endpoint), timeout=0.5))
    assert time.monotonic() - started < 5
    assert exc.cause is Cause.TOKEN_UNREACHABLE
    assert exc.detail == f"token endpoint {endpoint.address}: no reply within 0.5s"


def test_a_closed_port_is_unreachable(endpoint: OAuthEndpoint) -> None:
    with closed_port() as port:
        exc = failure(TokenProvider(app_config(endpoint, token_url=f"https://127.0.0.1:{port}/t/oauth2/v2.0/token"),
                                    timeout=5))
    assert exc.cause is Cause.TOKEN_UNREACHABLE
    assert exc.detail == f"token endpoint 127.0.0.1:{port}: cannot connect: Connection refused"


def test_an_untrusted_certificate_is_unreachable_and_named(endpoint: OAuthEndpoint) -> None:
    exc = failure(TokenProvider(app_config(endpoint, cafile=None), timeout=5))  # the system's store
    assert exc.cause is Cause.TOKEN_UNREACHABLE
    assert exc.detail.startswith(f"token endpoint {endpoint.address}: TLS certificate not trusted: ")
    assert endpoint.requests == []


# -- the token command -------------------------------------------------------------------------------------


def command_provider(*code: str, timeout: float = 5, clock: FakeClock | None = None) -> TokenProvider:
    config = OAuthConfig(TokenGrant.COMMAND, command=(PY, "-c", "\n".join(code)))
    return TokenProvider(config, timeout=timeout, clock=clock or time.monotonic)


def test_a_command_printing_json_gives_its_token_and_lifetime() -> None:
    clock = FakeClock()
    provider = command_provider('print(\'{"access_token": "ya29.json-token", "expires_in": 1200}\')', clock=clock)
    token = fetch(provider)
    assert token.value == Secret("ya29.json-token") and token.expires_at == clock.now + 1200
    assert token.detail == f"from the command {PY}, expires in 1200 s" and provider.endpoint == f"command {PY}"
    assert not fetch(provider).fetched


def test_a_command_printing_a_plain_token_gives_its_first_line_for_300s() -> None:
    clock = FakeClock()
    token = fetch(command_provider('print("\\n  plain-token-0123  \\nsecond line")', clock=clock))
    assert token.value == Secret("plain-token-0123") and token.expires_at == clock.now + COMMAND_TOKEN_LIFETIME_S


def test_a_failing_command_is_token_failed_with_its_first_stderr_line_scrubbed() -> None:
    leaked = "ya29.leaked-token-value"
    exc = failure(command_provider("import sys", f"print('{leaked}')",
                                   f"sys.stderr.write('\\nconsent required for {leaked}\\nmore detail\\n')",
                                   "sys.exit(3)"))
    assert exc.cause is Cause.TOKEN_FAILED
    assert exc.detail == f"token command {PY} exited 3: consent required for ***"


def test_a_command_printing_nothing_is_token_failed() -> None:
    exc = failure(command_provider("pass"))
    assert exc.cause is Cause.TOKEN_FAILED and exc.detail == f"token command {PY} printed nothing"


def test_a_command_past_the_deadline_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    exc = failure(command_provider(
        "import os, subprocess, sys, time",
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])",
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')",
        "time.sleep(60)", timeout=1.5))
    assert exc.cause is Cause.TOKEN_UNREACHABLE and "printed no token within 1.5s: killed its process group" \
        in exc.detail
    for pid in map(int, pids.read_text().split()):
        wait_until(partial(gone, pid), timeout=5, message=f"process {pid} to be gone")


def gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan is reaped by init, whenever it gets to it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_missing_or_unexecutable_command_is_token_failed(tmp_path: Path) -> None:
    missing = tmp_path / "get-token"
    exc = failure(TokenProvider(OAuthConfig(TokenGrant.COMMAND, command=(str(missing),)), timeout=5))
    assert exc.cause is Cause.TOKEN_FAILED and exc.detail == f"token command {missing} not found"
    missing.write_text("#!/bin/sh\necho token\n")
    missing.chmod(0o644)
    exc = failure(TokenProvider(OAuthConfig(TokenGrant.COMMAND, command=(str(missing),)), timeout=5))
    assert exc.cause is Cause.TOKEN_FAILED and "is not executable" in exc.detail


# -- no secret anywhere ------------------------------------------------------------------------------------


def test_no_secret_shows_in_tokens_or_failures(endpoint: OAuthEndpoint) -> None:
    provider = TokenProvider(app_config(endpoint), timeout=5)
    token = fetch(provider)
    value = token.value.reveal()
    assert value not in repr(token) and value not in str(token) and SECRET not in repr(provider.config)
    assert set(provider.secrets()) == {SECRET, value}
    endpoint.register_client("google-app.apps.googleusercontent.com", SECRET)
    refresh = endpoint.mint_refresh_token("google-app.apps.googleusercontent.com")
    endpoint.revoke_refresh_token(refresh)
    failures = [failure(TokenProvider(app_config(endpoint, secret=SECRET[:-1]), timeout=5)),
                failure(TokenProvider(google_config(endpoint, refresh), timeout=5))]
    endpoint.fail_with_status(503)
    failures.append(failure(TokenProvider(app_config(endpoint), timeout=5)))
    for exc in failures:
        assert_no_secret(failure_texts(exc), SECRET, SECRET[:-1], refresh, value)
        assert exc.__cause__ is None and exc.__context__ is None  # no library exception (or request) rides along
        encoded = base64.b64encode(SECRET.encode()).decode()
        assert encoded not in exc.detail


# -- the process's providers -------------------------------------------------------------------------------


def test_tokens_keep_one_provider_per_relay_until_its_settings_change(endpoint: OAuthEndpoint) -> None:
    tokens = Tokens()
    config = app_config(endpoint)
    provider = tokens.for_relay("m365", config, timeout=5)
    assert tokens.for_relay("m365", app_config(endpoint), timeout=7) is provider and provider.timeout == 7
    assert tokens.for_relay("other", config, timeout=5) is not provider
    changed = tokens.for_relay("m365", app_config(endpoint, secret="rotated-secret"), timeout=7)
    assert changed is not provider and tokens.for_relay("m365", changed.config, timeout=7) is changed


def test_importing_the_smtp_client_does_not_import_authlib() -> None:
    code = ("import sys, mailwatchd.transports.smtpclient, mailwatchd.transports.tokens; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('authlib', 'httpx', 'joserfc')))")
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.stdout.strip() == "[]"


def test_secrets_the_provider_knows_are_scrubbed_from_outside_texts() -> None:
    """An error text from outside (here a command's stderr) that quotes a configured secret loses it."""
    config = OAuthConfig(TokenGrant.COMMAND, client_secret=Secret(SECRET),
                         command=(PY, "-c", f"import sys; sys.stderr.write('bad secret {SECRET}'); sys.exit(1)"))
    exc = failure(TokenProvider(config, timeout=5))
    assert exc.detail == f"token command {PY} exited 1: bad secret ***"


# -- the fake endpoint refuses what the real ones refuse ---------------------------------------------------


def sign_assertion(pem: Path, header: Mapping[str, object], claims: Mapping[str, object]) -> str:
    key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signing_input = ".".join(b64url(json.dumps(part).encode()) for part in (header, claims))
    return f"{signing_input}.{b64url(key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def test_the_fake_endpoint_refuses_what_entra_id_and_google_refuse(endpoint: OAuthEndpoint) -> None:
    endpoint.register_client("app-id", SECRET)
    pem = endpoint.register_certificate_client("cert-app")
    url, now = endpoint.microsoft_url(), int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "x5t": sha1_thumbprint(pem)}
    claims = {"aud": url, "iss": "cert-app", "sub": "cert-app", "jti": "1", "nbf": now, "exp": now + 600}
    form = {"grant_type": "client_credentials", "scope": OUTLOOK}
    basic = "Basic " + base64.b64encode(f"app-id:{SECRET}".encode()).decode()

    def assertion(**changes: object) -> dict[str, str]:
        return {**form, "client_id": "cert-app", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": sign_assertion(pem, header, {**claims, **changes})}

    with httpx.Client(verify=ssl.create_default_context(cafile=str(endpoint.ca_file)), trust_env=False) as client:
        def post(data: dict[str, str], target: str = url, **headers: str) -> tuple[int, str]:
            reply = client.post(target, data=data, headers=headers)
            return reply.status_code, reply.json().get("error") or ("ok" if "access_token" in reply.json() else "?")

        assert client.get(url).status_code == 405
        assert client.post(url, json=form).status_code == 400  # not form-encoded
        assert post({**form, "client_id": "app-id", "client_secret": SECRET}) == (200, "ok")
        assert post(form, Authorization=basic) == (200, "ok")
        assert post({**form, "client_secret": SECRET}, Authorization=basic) == (400, "invalid_request")
        assert post({**form, "grant_type": "password", "client_id": "app-id"}) == (400, "unsupported_grant_type")
        assert post({**form, "client_id": "nobody", "client_secret": SECRET}) == (400, "unauthorized_client")
        assert post({**form, "client_id": "app-id"}) == (401, "invalid_client")  # no secret at all
        assert post({**form, "client_id": "app-id", "client_secret": SECRET}, endpoint.google_url) == \
            (400, "unsupported_grant_type")  # Google has no client_credentials grant
        assert post(assertion()) == (200, "ok")
        assert post(assertion(aud=endpoint.google_url)) == (401, "invalid_client")
        assert post(assertion(exp=now - 3600)) == (401, "invalid_client")
        assert post(assertion(iss="app-id")) == (401, "invalid_client")
        tampered = assertion()
        tampered["client_assertion"] = tampered["client_assertion"][:-8] + "AAAAAAAA"
        assert post(tampered) == (401, "invalid_client")
    descriptions = [request.reply.get("error_description", "") for request in endpoint.requests]
    assert [text.split(":")[0] for text in descriptions[-4:]] == ["AADSTS50012", "AADSTS700024", "AADSTS700021",
                                                                  "AADSTS700027"]
