"""HTTPS API relays end to end through a real daemon child and `mailwatchd check`: every SMTP port black-holed
→ mail flows through the API and check says so; a revoked key fails over and bounces nothing; a 429 spills
over and the relay comes back; the parts of a rich message arrive as written."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import SmtpServer, wait_until
from tests.daemonproc import drop, message, relay_env, run_cli, spool_names
from tests.fake_sendgrid import KEY, FakeSendGrid
from tests.rawservers import BlackHole

BLOCKED_HOST = "127.0.0.2"  # loopback, but nothing of the tests listens there


@pytest.fixture
def sendgrid(ca: trustme.CA) -> Iterator[FakeSendGrid]:
    with FakeSendGrid(ca) as fake:
        yield fake  # type: ignore[misc]
    assert fake.handler_errors == []


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "sendgrid-key"
    path.write_text(KEY + "\n")
    return path


def sendgrid_url(fake: FakeSendGrid, key_file: Path, ca_file: Path, **options: str) -> str:
    extra = "".join(f"&{name}={value}" for name, value in options.items())
    return f"sendgrid://127.0.0.1:{fake.port}?name=sendgrid&password_file={key_file}&cafile={ca_file}{extra}"


def blocked_smtp_ports() -> list[BlackHole]:
    """587, 465 and 2525 on a loopback address, each dropping connects as a firewall does."""
    return [BlackHole(host=BLOCKED_HOST, port=port) for port in (587, 465, 2525)]


def test_every_smtp_port_blocked_mail_flows_through_the_https_relay_and_check_says_so(
        sendgrid: FakeSendGrid, key_file: Path, ca_file: Path, spool_dir: Path, clean_env: dict[str, str],
        daemons: Any) -> None:
    holes = blocked_smtp_ports()
    for hole in holes:
        hole.__enter__()
    try:
        metrics = spool_dir / "mailwatchd.prom"
        env = relay_env(clean_env, spool_dir, BLOCKED_HOST, 587, EMAIL_USE_TLS="true",
                        MAILWATCHD_FALLBACK_PORTS="465/ssl,2525/tls", MAILWATCHD_CONNECT_TIMEOUT="1s",
                        MAILWATCHD_RELAYS=sendgrid_url(sendgrid, key_file, ca_file),
                        MAILWATCHD_METRICS_FILE=str(metrics))
        daemon = daemons(env)
        drop(spool_dir, message(0), "m0")
        wait_until(lambda: sendgrid.accepted, message="the message at the HTTPS relay")
        labels = f'endpoint="127.0.0.1:{sendgrid.port}/https",relay="sendgrid"'

        def exported() -> bool:
            text = metrics.read_text() if metrics.exists() else ""
            return (f"mailwatchd_relay_up{{{labels}}} 1.0" in text
                    and f'mailwatchd_probe_step_seconds{{{labels},step="api"}}' in text)

        wait_until(exported, timeout=30, message="the HTTPS relay in the metrics, as one more endpoint")
        delivered = daemon.wait_event("message_delivered")[0]
        assert delivered["relay"] == "sendgrid" and sendgrid.accepted[0].message_id in delivered["reply"]
        result = run_cli(env, "check", "--json")
        plain = run_cli(env, "check")
        assert daemon.stop() == 0
    finally:
        for hole in holes:
            hole.__exit__(None, None, None)
    report = json.loads(result.stdout)
    assert result.returncode == 1, "degraded: mail flows through the HTTPS relay"
    (api,) = [e for e in report["endpoints"] if e["relay"] == "sendgrid"]
    assert api["ok"] is True and api["tls"] == "https" and api["cert_days_left"] is not None
    assert [step["name"] for step in api["steps"]] == ["connect", "tls", "api"]
    assert any("SMTP ports 465, 587 and 2525 are blocked here; mail flows through the HTTPS relay sendgrid" in note
               for note in report["notes"])
    assert "mail flows through the HTTPS relay sendgrid" in plain.stdout.decode()
    assert KEY not in result.stdout.decode() + plain.stdout.decode() + "\n".join(daemon.raw_lines)


def test_check_without_an_https_relay_says_how_to_add_one(spool_dir: Path, clean_env: dict[str, str]) -> None:
    holes = blocked_smtp_ports()
    for hole in holes:
        hole.__enter__()
    try:
        env = relay_env(clean_env, spool_dir, BLOCKED_HOST, 587, EMAIL_USE_TLS="true",
                        MAILWATCHD_CONNECT_TIMEOUT="1s")
        result = run_cli(env, "check", "--json")
    finally:
        for hole in holes:
            hole.__exit__(None, None, None)
    assert result.returncode == 2
    notes = json.loads(result.stdout)["notes"]
    assert any("blocked by policy" in note and "sendgrid://" in note for note in notes), notes


def test_a_revoked_key_fails_over_and_nothing_bounces(
        sendgrid: FakeSendGrid, key_file: Path, ca_file: Path, spool_dir: Path, clean_env: dict[str, str],
        smtp_server_factory: Any, daemons: Any) -> None:
    fallback: SmtpServer = smtp_server_factory(starttls=False)
    sendgrid.revoke_key()
    env = relay_env(clean_env, spool_dir, "127.0.0.1", fallback.port,
                    MAILWATCHD_RELAYS=sendgrid_url(sendgrid, key_file, ca_file))
    env.pop("EMAIL_HOST")
    env.pop("EMAIL_PORT")
    env["MAILWATCHD_RELAYS"] += f" smtp://127.0.0.1:{fallback.port}?name=fallback"
    daemon = daemons(env)
    for index in range(3):
        drop(spool_dir, message(index), f"m{index}")
    assert len(fallback.handler.wait_for(3)) == 3
    down = daemon.wait_event("relay_down", lambda e: e.get("relay") == "sendgrid")[0]
    assert down["cause"] == "auth_failed" and "revoked" in down["detail"]
    assert daemon.stop() == 0
    assert spool_names(spool_dir, "failed")["failed"] == []
    result = run_cli(env, "check", "--json")
    (api,) = [e for e in json.loads(result.stdout)["endpoints"] if e["relay"] == "sendgrid"]
    assert api["cause"] == "auth_failed" and "API key" in api["hint"]


def test_a_429_spills_over_and_the_relay_comes_back_after_its_reset(
        sendgrid: FakeSendGrid, key_file: Path, ca_file: Path, spool_dir: Path, clean_env: dict[str, str],
        smtp_server_factory: Any, daemons: Any) -> None:
    fallback: SmtpServer = smtp_server_factory(starttls=False)
    env = relay_env(clean_env, spool_dir, "127.0.0.1", fallback.port, MAILWATCHD_CONCURRENCY="1",
                    MAILWATCHD_RELAYS=sendgrid_url(sendgrid, key_file, ca_file)
                    + f" smtp://127.0.0.1:{fallback.port}?name=fallback")
    env.pop("EMAIL_HOST")
    env.pop("EMAIL_PORT")
    daemon = daemons(env)
    daemon.wait_event("relay_up", lambda e: e.get("relay") == "sendgrid")  # the start-up probe is done
    reset_at = time.time() + 4
    sendgrid.rate_limit(reset_in=4, times=1)  # the next request, m0's, gets the 429
    drop(spool_dir, message(0), "m0")
    fallback.handler.wait_for(1)
    spill = daemon.wait_event("relay_failover", lambda e: e.get("relay") == "sendgrid")[0]
    assert spill["cause"] == "quota_exceeded"
    drop(spool_dir, message(1), "m1")  # during the pause: the fallback takes it too
    assert len(fallback.handler.wait_for(2)) == 2
    # X-RateLimit-Reset said when the limit resets: from then on (not after a bare quota reply's 15 minutes)
    # the HTTPS relay takes mail again.
    wait_until(lambda: time.time() > reset_at, message="the provider's rate-limit reset")
    drop(spool_dir, message(2), "m2")
    wait_until(lambda: sendgrid.accepted, message="the HTTPS relay taking mail again")
    assert [accepted.payload["subject"] for accepted in sendgrid.accepted] == ["test 2"]
    assert len(fallback.handler.messages) == 2
    assert daemon.stop() == 0


def rich_message() -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = "App <app@example.com>"
    mail["To"] = "Ann <ann@example.org>"
    mail["Cc"] = "bob@example.org"
    mail["Reply-To"] = "support@example.com"
    mail["Subject"] = "Rapport trimestriel — été"
    mail["X-Campaign"] = "q3"
    mail.set_content("Bonjour,\nle rapport est joint.\n")
    mail.add_alternative('<p>Bonjour, <img src="cid:logo@example.com"> le rapport est joint.</p>', subtype="html")
    html = mail.get_body(("html",))
    assert isinstance(html, EmailMessage)
    html.add_related(b"\x89PNG\r\n\x1a\nfake-png", maintype="image", subtype="png", cid="<logo@example.com>",
                     filename="logo.png")
    mail.add_attachment(b"%PDF-1.4 fake pdf \x00\x01\x02", maintype="application", subtype="pdf",
                        filename="rapport.pdf")
    return mail


def test_a_message_with_attachments_inline_image_cc_and_bcc_arrives_with_the_same_parts(
        sendgrid: FakeSendGrid, key_file: Path, ca_file: Path, spool_dir: Path, clean_env: dict[str, str],
        daemons: Any) -> None:
    env = relay_env(clean_env, spool_dir, "127.0.0.1", 1, MAILWATCHD_RELAYS=sendgrid_url(sendgrid, key_file, ca_file))
    env.pop("EMAIL_HOST")
    env.pop("EMAIL_PORT")
    daemons(env)
    original = rich_message()
    submitted = run_cli(env, "sendmail", "-f", "app@example.com", "ann@example.org", "bob@example.org",
                        "carol@example.org", stdin=original.as_bytes())
    assert submitted.returncode == 0, submitted.stderr
    accepted = wait_until(lambda: sendgrid.accepted, message="the message at SendGrid")[0]
    payload = accepted.payload
    (personalization,) = payload["personalizations"]
    assert [to["email"] for to in personalization["to"]] == ["ann@example.org"]
    assert [cc["email"] for cc in personalization["cc"]] == ["bob@example.org"]
    assert [bcc["email"] for bcc in personalization["bcc"]] == ["carol@example.org"]  # envelope only: never shown
    assert payload["subject"] == "Rapport trimestriel — été"
    assert payload["reply_to"]["email"] == "support@example.com"
    assert payload["headers"]["X-Campaign"] == "q3"
    parsed = message_from_bytes(original.as_bytes(), policy=policy.default)
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and html is not None
    bodies = {part["type"]: part["value"] for part in payload["content"]}
    assert bodies == {"text/plain": text.get_content(), "text/html": html.get_content()}
    attachments = {item["filename"]: (item, accepted.attachment_bytes(index))
                   for index, item in enumerate(payload["attachments"])}
    logo, logo_bytes = attachments["logo.png"]
    assert (logo["type"], logo["disposition"], logo["content_id"]) == ("image/png", "inline", "logo@example.com")
    assert logo_bytes == b"\x89PNG\r\n\x1a\nfake-png"
    pdf, pdf_bytes = attachments["rapport.pdf"]
    assert (pdf["type"], pdf["disposition"]) == ("application/pdf", "attachment")
    assert pdf_bytes == b"%PDF-1.4 fake pdf \x00\x01\x02"


def test_a_message_the_api_cannot_carry_goes_to_the_next_relay_with_the_reason_logged(
        sendgrid: FakeSendGrid, key_file: Path, ca_file: Path, spool_dir: Path, clean_env: dict[str, str],
        smtp_server_factory: Any, daemons: Any) -> None:
    fallback: SmtpServer = smtp_server_factory(starttls=False)
    env = relay_env(clean_env, spool_dir, "127.0.0.1", fallback.port,
                    MAILWATCHD_RELAYS=sendgrid_url(sendgrid, key_file, ca_file)
                    + f" smtp://127.0.0.1:{fallback.port}?name=fallback")
    env.pop("EMAIL_HOST")
    env.pop("EMAIL_PORT")
    daemon = daemons(env)
    signed = message(0, extra_headers="DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s1; b=abc\r\n")
    drop(spool_dir, signed, "m0")
    drop(spool_dir, message(1), "m1")
    assert fallback.handler.wait_for(1)[0].data.count(b"DKIM-Signature") == 1
    wait_until(lambda: sendgrid.accepted, message="the plain message at SendGrid")
    moved = daemon.wait_event("relay_failover", lambda e: e.get("cause") == "unexpressible")[0]
    assert "DKIM-Signature" in moved["detail"] and moved["next_relay"] == "fallback"
    assert daemon.named("relay_down") == []
    assert daemon.stop() == 0


def without_bcc(data: bytes) -> bytes:
    """The message as submitted, less its Bcc field (which raw providers must not upload)."""
    head, _, body = data.partition(b"\n\n") if b"\r\n\r\n" not in data else data.partition(b"\r\n\r\n")
    lines = [line for line in head.splitlines(keepends=True) if not line.lower().startswith(b"bcc:")]
    separator = b"\r\n\r\n" if b"\r\n\r\n" in data else b"\n\n"
    return b"".join(lines).rstrip(b"\r\n") + separator + body


@pytest.mark.parametrize("provider", ["mailgun", "ses"])
def test_raw_providers_carry_the_message_as_written_with_bcc_in_the_envelope_only(
        provider: str, ca: trustme.CA, ca_file: Path, tmp_path: Path, spool_dir: Path, clean_env: dict[str, str],
        daemons: Any) -> None:
    from tests.fake_mailgun import API_KEY, FakeMailgun
    from tests.fake_ses import ACCESS_KEY_ID, SECRET_ACCESS_KEY, FakeSes

    fake: FakeMailgun | FakeSes
    if provider == "mailgun":
        fake, secret = FakeMailgun(ca), API_KEY
    else:
        fake, secret = FakeSes(ca), SECRET_ACCESS_KEY
    (tmp_path / "key").write_text(secret + "\n")
    with fake:
        if provider == "mailgun":
            url = f"mailgun://127.0.0.1:{fake.port}?domain=mg.example.com"
        else:
            url = f"ses://{ACCESS_KEY_ID}@127.0.0.1:{fake.port}?region=us-east-1"
        env = relay_env(clean_env, spool_dir, "127.0.0.1", 1,
                        MAILWATCHD_RELAYS=f"{url}&password_file={tmp_path / 'key'}&cafile={ca_file}")
        env.pop("EMAIL_HOST")
        env.pop("EMAIL_PORT")
        daemon = daemons(env)
        original = rich_message()
        original["Bcc"] = "carol@example.org"
        submitted = run_cli(env, "sendmail", "-f", "app@example.com", "ann@example.org", "bob@example.org",
                            "carol@example.org", stdin=original.as_bytes())
        assert submitted.returncode == 0, submitted.stderr
        wait_until(lambda: fake.messages, message=f"the message at {provider}")
        delivered = daemon.wait_event("message_delivered")[0]
        assert daemon.stop() == 0
    (received,) = fake.messages
    assert fake.handler_errors == []
    assert sorted(received.recipients) == ["ann@example.org", "bob@example.org", "carol@example.org"]
    assert b"carol@example.org" not in received.mime
    assert received.message_id in delivered["reply"]
    stored = message_from_bytes(received.mime, policy=policy.default)
    sent = message_from_bytes(without_bcc(original.as_bytes()), policy=policy.default)
    assert [part.get_content_type() for part in stored.walk()] == [part.get_content_type() for part in sent.walk()]
    assert [part.get_payload(decode=True) for part in stored.walk() if not part.is_multipart()] == \
        [part.get_payload(decode=True) for part in sent.walk() if not part.is_multipart()]
    assert secret not in "\n".join(daemon.raw_lines)


def test_a_message_no_relay_can_carry_goes_to_the_failed_store_with_the_reason(
        sendgrid: FakeSendGrid, key_file: Path, ca_file: Path, spool_dir: Path, clean_env: dict[str, str],
        daemons: Any) -> None:
    env = relay_env(clean_env, spool_dir, "127.0.0.1", 1, MAILWATCHD_RELAYS=sendgrid_url(sendgrid, key_file, ca_file))
    env.pop("EMAIL_HOST")
    env.pop("EMAIL_PORT")
    daemon = daemons(env)
    drop(spool_dir, message(0, extra_headers="DKIM-Signature: v=1; a=rsa-sha256; d=example.com; b=abc\r\n"), "m0")
    failed = daemon.wait_event("message_failed")[0]
    assert failed["cause"] == "unexpressible" and "no relay can carry this message as written" in failed["reason"]
    assert "DKIM-Signature" in failed["reason"]
    assert spool_names(spool_dir, "failed")["failed"]
    assert all(request.path != "/v3/mail/send" for request in sendgrid.requests)
    assert daemon.stop() == 0


def test_check_send_test_goes_through_the_https_relay(
        sendgrid: FakeSendGrid, key_file: Path, ca_file: Path, spool_dir: Path, clean_env: dict[str, str]) -> None:
    env = relay_env(clean_env, spool_dir, "127.0.0.1", 1, MAILWATCHD_RELAYS=sendgrid_url(sendgrid, key_file, ca_file))
    env.pop("EMAIL_HOST")
    env.pop("EMAIL_PORT")
    result = run_cli(env, "check", "--json", "--send-test", "you@example.org", "--from", "app@example.com")
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    test = report["send_test"]
    assert test["ok"] is True and test["tls"] == "https" and "accepted" in test["detail"]
    (accepted,) = sendgrid.accepted
    assert [to["email"] for to in accepted.payload["personalizations"][0]["to"]] == ["you@example.org"]
    assert accepted.message_id in test["detail"]


def test_one_worker_reuses_its_connection_and_honours_https_proxy(
        sendgrid: FakeSendGrid, key_file: Path, ca_file: Path, spool_dir: Path, clean_env: dict[str, str],
        daemons: Any) -> None:
    from tests.test_oauth_delivery import ConnectProxy

    proxy = ConnectProxy()
    env = relay_env(clean_env, spool_dir, "127.0.0.1", 1, MAILWATCHD_CONCURRENCY="1", MAILWATCHD_IDLE_TIMEOUT="30s",
                    MAILWATCHD_RELAYS=sendgrid_url(sendgrid, key_file, ca_file),
                    HTTPS_PROXY=f"http://127.0.0.1:{proxy.port}")
    env.pop("EMAIL_HOST")
    env.pop("EMAIL_PORT")
    try:
        daemon = daemons(env)
        for index in range(3):
            drop(spool_dir, message(index), f"m{index}")
        wait_until(lambda: len(sendgrid.accepted) == 3, message="three messages at SendGrid")
        assert daemon.stop() == 0
    finally:
        proxy.close()
    sends = [request for request in sendgrid.requests if request.path == "/v3/mail/send"]
    assert len({request.peer for request in sends}) == 1, "one keep-alive connection for the worker's messages"
    assert f"127.0.0.1:{sendgrid.port}" in proxy.targets


def test_http_readings_map_into_the_closed_set() -> None:
    from mailwatchd.transports.outcome import Cause, HttpProblem, Outcome, classify_http

    expected = {
        HttpProblem.NONE: (Outcome.DELIVERED, Cause.OK),
        HttpProblem.AUTH: (Outcome.RELAY_FAULT, Cause.AUTH_FAILED),
        HttpProblem.ACCOUNT: (Outcome.RELAY_FAULT, Cause.SENDER_REJECTED),
        HttpProblem.QUOTA: (Outcome.RELAY_FAULT, Cause.QUOTA_EXCEEDED),
        HttpProblem.UNAVAILABLE: (Outcome.RELAY_FAULT, Cause.SERVER_BUSY),
        HttpProblem.MISCONFIGURED: (Outcome.RELAY_FAULT, Cause.PROTOCOL_ERROR),
        HttpProblem.SENDER: (Outcome.PERMANENT, Cause.SENDER_REJECTED),
        HttpProblem.RECIPIENT: (Outcome.PERMANENT, Cause.RECIPIENT_REJECTED),
        HttpProblem.MESSAGE: (Outcome.PERMANENT, Cause.MESSAGE_REJECTED),
        HttpProblem.UNEXPRESSIBLE: (Outcome.RELAY_FAULT, Cause.UNEXPRESSIBLE),
    }
    assert {problem: (v.outcome, v.cause) for problem in HttpProblem for v in [classify_http(problem)]} == expected


def test_a_provider_that_raises_is_a_temporary_local_error_not_a_crashed_attempt(
        sendgrid: FakeSendGrid, key_file: Path, ca_file: Path, tmp_path: Path) -> None:
    import asyncio

    from mailwatchd.message.envelope import OutgoingMessage
    from mailwatchd.settings.relays import parse_relay_url
    from mailwatchd.transports.api.provider import ApiReply, ApiRequest
    from mailwatchd.transports.api.session import ApiSession, make_provider
    from mailwatchd.transports.outcome import Cause, Outcome
    from tests.probe_servers import probe_settings

    relay = parse_relay_url("MAILWATCHD_RELAYS", sendgrid_url(sendgrid, key_file, ca_file), {})
    assert relay.api is not None
    real = make_provider(relay.api)

    class Broken:
        """SendGrid's module, but its reading of the reply fails (a provider bug, or a reply it never saw)."""

        name = real.name

        def send_request(self, message: OutgoingMessage) -> ApiRequest:
            return real.send_request(message)

        def probe_request(self) -> ApiRequest:
            return real.probe_request()

        def interpret(self, reply: ApiReply, *, probing: bool = False) -> Any:
            raise KeyError("X-Message-Id")

    data = message(0)
    session = ApiSession(relay, relay.primary, probe_settings(tmp_path), provider=Broken())
    result = asyncio.run(session.deliver(OutgoingMessage("q0", "app@example.com", ("rcpt@example.org",), data,
                                                         len(data))))
    assert (result.outcome, result.cause) == (Outcome.TEMPORARY, Cause.LOCAL_ERROR)
    assert "KeyError" in result.detail and "X-Message-Id" not in result.detail
    assert len(sendgrid.accepted) == 1  # the request went out; only its reading failed
