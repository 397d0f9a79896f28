"""The reachability probe against real servers on loopback, one failure (and cause code) each."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailwatchd.relays import probe as probe_module
from mailwatchd.relays.diagnosis import hint_for, send_test_sender
from mailwatchd.relays.probe import ProbeReport, SendTest, probe_endpoint
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, Secret, TlsMode
from mailwatchd.transports.outcome import Cause
from mailwatchd.transports.tlsconfig import client_context
from tests.conftest import LOOPBACK, RecordingHandler, SmtpServer
from tests.probe_servers import (
    NoAuthHandler,
    RejectMailHandler,
    RejectRcptHandler,
    closed_port,
    noncritical_ca,
    probe_settings,
    server_context,
)
from tests.rawservers import BlackHole, DripServer, ScriptedServer, SilentServer

Factory = Callable[..., SmtpServer]
PASSWORD = "s3cret-Passw0rd-never-shown"


def relay_for(port: int, tls: TlsMode, *, cafile: Path | None = None, user: str | None = None,
              password: str | None = None, host: str = LOOPBACK, verify: bool = True) -> RelayConfig:
    return RelayConfig(name="test-relay", endpoints=(Endpoint(host, port, tls),), username=user,
                       password=Secret(password) if password is not None else None, cafile=cafile, verify=verify)


def run_probe(relay: RelayConfig, settings: Settings, *, send_test_to: str | None = None,
              **kwargs: Any) -> ProbeReport:
    test = SendTest(send_test_sender(relay, settings.helo_name), send_test_to) if send_test_to else None
    report = asyncio.run(probe_endpoint(relay, relay.primary, settings, send_test=test, **kwargs))
    HINTS[id(report)] = hint_for(report.cause, report.endpoint, report.detail, relay=relay)
    return report


HINTS: dict[int, str] = {}


def hint(report: ProbeReport) -> str:
    """What `mailwatchd check` would advise for this report (hints are diagnosis.py's)."""
    return HINTS[id(report)]


def step_names(report: ProbeReport) -> list[str]:
    return [step.name for step in report.steps]


def assert_no_secret(report: ProbeReport) -> None:
    dumped = json.dumps(report.to_json())
    token = base64.b64encode(f"\0alice@example.com\0{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, token, base64.b64encode(PASSWORD.encode()).decode()):
        assert secret not in dumped


# -- a healthy relay ------------------------------------------------------------------------------


def test_good_starttls_server_is_ok_with_timings_and_certificate_days(
        smtp_server_factory: Factory, ca: trustme.CA, ca_file: Path, tmp_path: Path) -> None:
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30, hours=12)
    cert = ca.issue_cert(LOOPBACK, not_after=expires.replace(tzinfo=None))
    server = smtp_server_factory(tls_context=server_context(cert))
    report = run_probe(relay_for(server.port, TlsMode.STARTTLS, cafile=ca_file), probe_settings(tmp_path))
    assert report.ok and report.cause is Cause.OK, report
    assert step_names(report) == ["connect", "banner", "ehlo", "starttls", "tls", "ehlo_tls", "quit"]  # an IP: no DNS
    assert all(step.ok and step.ms >= 0 for step in report.steps)
    assert report.timings_ms.keys() == set(step_names(report))
    assert report.cert_days_left == 30
    assert report.tls_version in ("TLSv1.2", "TLSv1.3")
    assert "STARTTLS" in report.steps[2].detail and "STARTTLS" not in report.extensions  # after TLS: not again
    assert any(ext.startswith("AUTH") for ext in report.extensions)
    assert hint(report) == "" and report.checked_at.tzinfo is not None
    assert server.handler.messages == []


def test_implicit_tls_server_is_ok(smtp_server_factory: Factory, ca_file: Path, tmp_path: Path) -> None:
    server = smtp_server_factory(implicit_tls=True)
    report = run_probe(relay_for(server.port, TlsMode.IMPLICIT, cafile=ca_file), probe_settings(tmp_path))
    assert report.ok, report
    assert step_names(report) == ["connect", "tls", "banner", "ehlo", "quit"]
    assert report.cert_days_left is not None and report.cert_days_left > 300_000  # trustme: year 3000


def test_nothing_is_sent_without_a_test_address_and_auth_plain_is_well_formed(tmp_path: Path) -> None:
    script = ["220 scripted ESMTP", "250-scripted\r\n250 AUTH PLAIN", "235 2.7.0 Authentication successful",
              "221 2.0.0 Bye"]
    with ScriptedServer(script) as server:
        relay = relay_for(server.port, TlsMode.NONE, user="alice@example.com", password=PASSWORD)
        report = run_probe(relay, probe_settings(tmp_path))
    assert report.ok, report
    commands = [line.split(b" ")[0] for line in server.received]
    assert commands == [b"EHLO", b"AUTH", b"QUIT"]
    token = server.received[1].split()[2]
    assert base64.b64decode(token) == f"\0alice@example.com\0{PASSWORD}".encode()
    assert_no_secret(report)


# -- connection failures --------------------------------------------------------------------------


def test_nothing_listening_is_connection_refused(tmp_path: Path) -> None:
    with closed_port() as port:
        report = run_probe(relay_for(port, TlsMode.STARTTLS), probe_settings(tmp_path))
    assert (report.ok, report.cause) == (False, Cause.CONNECTION_REFUSED)
    assert step_names(report) == ["connect"] and not report.steps[0].ok
    assert "refused" in report.detail and "EMAIL_PORT" in hint(report)


def test_black_hole_is_connect_timeout_within_one_connect_timeout(tmp_path: Path) -> None:
    settings = probe_settings(tmp_path, connect_timeout=0.5, command_timeout=5.0)
    with BlackHole() as hole:
        started = time.monotonic()
        report = run_probe(relay_for(hole.port, TlsMode.STARTTLS), settings)
        elapsed = time.monotonic() - started
    assert report.cause is Cause.CONNECT_TIMEOUT, report
    assert 0.45 <= elapsed < 0.5 + 0.3, elapsed
    assert 450 <= report.timings_ms["connect"] < 800
    assert f"port {hole.port} looks blocked by a firewall" in hint(report)


def test_silent_server_is_banner_timeout(tmp_path: Path) -> None:
    settings = probe_settings(tmp_path, command_timeout=0.5)
    with SilentServer() as server:
        started = time.monotonic()
        report = run_probe(relay_for(server.port, TlsMode.STARTTLS), settings)
        elapsed = time.monotonic() - started
    assert report.cause is Cause.BANNER_TIMEOUT, report
    assert step_names(report) == ["connect", "banner"] and report.steps[0].ok
    assert elapsed < 0.5 + 0.3


def test_drip_server_is_cut_off_at_the_banner_deadline(tmp_path: Path) -> None:
    settings = probe_settings(tmp_path, command_timeout=0.6)
    with DripServer(interval=0.05) as server:
        started = time.monotonic()
        report = run_probe(relay_for(server.port, TlsMode.STARTTLS), settings)
        elapsed = time.monotonic() - started
        sent = server.sent
    assert report.cause is Cause.BANNER_TIMEOUT, report
    assert sent > 3  # it really was dripping, not silent
    assert elapsed < 0.6 + 0.3


def test_421_greeting_is_server_busy(tmp_path: Path) -> None:
    with ScriptedServer(["421 4.7.0 Too many connections, try again later"], then="close") as server:
        report = run_probe(relay_for(server.port, TlsMode.STARTTLS), probe_settings(tmp_path))
    assert report.cause is Cause.SERVER_BUSY, report
    assert "421 4.7.0 Too many connections" in report.detail


def test_garbage_greeting_is_protocol_error(tmp_path: Path) -> None:
    with ScriptedServer(["SSH-2.0-OpenSSH_9.2"]) as server:
        report = run_probe(relay_for(server.port, TlsMode.STARTTLS), probe_settings(tmp_path))
    assert report.cause is Cause.PROTOCOL_ERROR, report
    assert "SSH-2.0" in report.detail


# -- TLS -------------------------------------------------------------------------------------------


def test_missing_starttls_is_starttls_unavailable(smtp_server_factory: Factory, tmp_path: Path) -> None:
    server = smtp_server_factory(starttls=False)
    report = run_probe(relay_for(server.port, TlsMode.STARTTLS), probe_settings(tmp_path))
    assert report.cause is Cause.STARTTLS_UNAVAILABLE, report
    assert step_names(report)[-1] == "starttls" and "does not offer STARTTLS" in report.detail
    assert "EMAIL_USE_SSL" in hint(report) and "never disable TLS" in hint(report)


def test_implicit_tls_against_a_plain_port_is_tls_handshake_failed(smtp_server_factory: Factory,
                                                                    tmp_path: Path) -> None:
    server = smtp_server_factory(starttls=True)
    report = run_probe(relay_for(server.port, TlsMode.IMPLICIT), probe_settings(tmp_path))
    assert report.cause is Cause.TLS_HANDSHAKE_FAILED, report
    assert "plain SMTP" in hint(report) and "EMAIL_USE_TLS=true" in hint(report)


@pytest.mark.parametrize(("kind", "cause", "reason"), [
    ("expired", Cause.TLS_EXPIRED, "certificate has expired"),
    ("other-host", Cause.TLS_HOSTNAME_MISMATCH, "IP address mismatch"),
    ("unknown-ca", Cause.TLS_UNTRUSTED, "unable to get local issuer certificate"),
])
def test_bad_certificates(kind: str, cause: Cause, reason: str, smtp_server_factory: Factory, ca: trustme.CA,
                          ca_file: Path, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    cert = {
        "expired": lambda: ca.issue_cert(LOOPBACK, not_before=now - datetime.timedelta(days=90),
                                         not_after=now - datetime.timedelta(days=1)),
        "other-host": lambda: ca.issue_cert("mail.other.example"),
        "unknown-ca": lambda: trustme.CA().issue_cert(LOOPBACK),
    }[kind]()
    for implicit in (False, True):
        server = smtp_server_factory(tls_context=server_context(cert), implicit_tls=implicit)
        mode = TlsMode.IMPLICIT if implicit else TlsMode.STARTTLS
        report = run_probe(relay_for(server.port, mode, cafile=ca_file), probe_settings(tmp_path))
        assert report.cause is cause, report
        assert reason in report.detail and reason in hint(report)
        assert step_names(report)[-1] == "tls" and report.cert_days_left is None


def test_verification_turned_off_says_so(smtp_server_factory: Factory, tmp_path: Path) -> None:
    server = smtp_server_factory(tls_context=server_context(trustme.CA().issue_cert("mail.other.example")))
    report = run_probe(relay_for(server.port, TlsMode.STARTTLS, verify=False), probe_settings(tmp_path))
    assert report.ok, report
    assert "certificate NOT verified" in report.steps[4].detail and report.cert_days_left is None


def strict_like_python_313(relay: RelayConfig) -> ssl.SSLContext:
    context = client_context(relay)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def test_noncritical_basic_constraints_ca_under_strict_verification_is_untrusted_with_openssl_reason(
        smtp_server_factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The incident: Python 3.13 verifies with VERIFY_X509_STRICT by default, and OpenSSL then
    refuses a CA whose Basic Constraints is not critical (verify code 89). Reproduced here with
    the relay's own client context plus that flag."""
    ca_file, context = noncritical_ca(tmp_path)
    server = smtp_server_factory(tls_context=context)
    monkeypatch.setattr(probe_module, "client_context", strict_like_python_313)
    report = run_probe(relay_for(server.port, TlsMode.STARTTLS, cafile=ca_file), probe_settings(tmp_path))
    assert report.cause is Cause.TLS_UNTRUSTED, report
    assert "Basic Constraints of CA cert not marked critical" in report.detail
    assert "OpenSSL verify code 89" in report.detail
    assert "Basic Constraints of CA cert not marked critical" in hint(report) and "EMAIL_SSL_CAFILE" in hint(report)


def test_noncritical_basic_constraints_ca_is_accepted_by_this_pythons_default_verification(
        smtp_server_factory: Factory, tmp_path: Path) -> None:
    """What OpenSSL 3.0 says here without X509_STRICT (Python 3.11's default flags): nothing, the
    chain verifies. The probe uses the delivery's context, so it agrees with delivery."""
    assert not ssl.create_default_context().verify_flags & ssl.VERIFY_X509_STRICT
    ca_file, context = noncritical_ca(tmp_path)
    server = smtp_server_factory(tls_context=context)
    report = run_probe(relay_for(server.port, TlsMode.STARTTLS, cafile=ca_file), probe_settings(tmp_path))
    assert report.ok, report


# -- AUTH --------------------------------------------------------------------------------------------


def test_auth_accepted(smtp_server_factory: Factory, ca_file: Path, tmp_path: Path) -> None:
    server = smtp_server_factory(users={"alice@example.com": PASSWORD})
    relay = relay_for(server.port, TlsMode.STARTTLS, cafile=ca_file, user="alice@example.com", password=PASSWORD)
    report = run_probe(relay, probe_settings(tmp_path))
    assert report.ok, report
    assert "auth" in report.timings_ms and report.steps[-2].name == "auth"
    assert_no_secret(report)


def test_wrong_password_is_auth_failed_and_never_shown(smtp_server_factory: Factory, ca_file: Path,
                                                        tmp_path: Path) -> None:
    server = smtp_server_factory(users={"alice@example.com": "the-right-one"})
    relay = relay_for(server.port, TlsMode.STARTTLS, cafile=ca_file, user="alice@example.com", password=PASSWORD)
    report = run_probe(relay, probe_settings(tmp_path))
    assert report.cause is Cause.AUTH_FAILED, report
    assert report.detail.startswith("535")
    assert "app password" in hint(report) and "EMAIL_HOST_USER" in hint(report)
    assert_no_secret(report)


def test_auth_echoed_by_the_server_is_scrubbed(tmp_path: Path) -> None:
    script = ["220 scripted", "250-scripted\r\n250 AUTH PLAIN", f"535 5.7.8 bad credentials {PASSWORD}"]
    with ScriptedServer(script) as server:
        relay = relay_for(server.port, TlsMode.NONE, user="alice@example.com", password=PASSWORD)
        report = run_probe(relay, probe_settings(tmp_path))
    assert report.cause is Cause.AUTH_FAILED
    assert "***" in report.detail
    assert_no_secret(report)


def test_no_auth_offered_is_auth_unavailable(smtp_server_factory: Factory, ca_file: Path, tmp_path: Path) -> None:
    server = smtp_server_factory(NoAuthHandler(), users={"alice@example.com": PASSWORD})
    relay = relay_for(server.port, TlsMode.STARTTLS, cafile=ca_file, user="alice@example.com", password=PASSWORD)
    report = run_probe(relay, probe_settings(tmp_path))
    assert report.cause is Cause.AUTH_UNAVAILABLE, report
    assert step_names(report)[-1] == "auth"


# -- the test message ------------------------------------------------------------------------------


def test_send_test_delivers_a_small_message(smtp_server_factory: Factory, ca_file: Path, tmp_path: Path) -> None:
    server = smtp_server_factory(users={"alice@example.com": PASSWORD})
    relay = relay_for(server.port, TlsMode.STARTTLS, cafile=ca_file, user="alice@example.com", password=PASSWORD)
    report = run_probe(relay, probe_settings(tmp_path), send_test_to="ops@example.org")
    assert report.ok, report
    assert step_names(report)[-2:] == ["send", "quit"]
    assert "250 2.0.0 OK: queued" in report.detail
    [received] = server.handler.wait_for(1)
    assert (received.mail_from, received.rcpt_tos, received.tls) == ("alice@example.com", ["ops@example.org"], True)
    assert b"Subject: mailwatchd test" in received.data and b"From: alice@example.com" in received.data


def test_send_test_without_user_sends_from_helo_name(smtp_server_factory: Factory, ca_file: Path,
                                                     tmp_path: Path) -> None:
    server = smtp_server_factory()
    report = run_probe(relay_for(server.port, TlsMode.STARTTLS, cafile=ca_file), probe_settings(tmp_path),
                       send_test_to="ops@example.org")
    assert report.ok, report
    assert server.handler.wait_for(1)[0].mail_from == "mailwatchd@probe.mailwatchd.test"


@pytest.mark.parametrize(("handler", "cause", "words"), [
    (lambda: RejectMailHandler("550 5.7.1 The from address does not match a verified Sender Identity"),
     Cause.SENDER_REJECTED, "Sender Identity"),
    (lambda: RejectMailHandler("550 5.4.5 Daily user sending quota exceeded"), Cause.QUOTA_EXCEEDED,
     "fallback relay"),
    (lambda: RejectRcptHandler("550 5.1.1 No such user"), Cause.RECIPIENT_REJECTED, "check the address"),
])
def test_send_test_refusals(handler: Callable[[], RecordingHandler], cause: Cause, words: str,
                            smtp_server_factory: Factory, ca_file: Path, tmp_path: Path) -> None:
    server = smtp_server_factory(handler())
    report = run_probe(relay_for(server.port, TlsMode.STARTTLS, cafile=ca_file), probe_settings(tmp_path),
                       send_test_to="ops@example.org")
    assert report.cause is cause, report
    assert report.detail.startswith("550 5.")
    assert words in hint(report)
    assert server.handler.messages == []


def test_send_test_address_must_be_an_address(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        run_probe(relay_for(25, TlsMode.NONE), probe_settings(tmp_path), send_test_to="ops@example.org>\r\nRSET")


def test_unreadable_ca_file_is_local_error_before_any_connection(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    with ScriptedServer(["220 never reached"]) as server:
        report = run_probe(relay_for(server.port, TlsMode.STARTTLS, cafile=bogus), probe_settings(tmp_path))
        connections = server.connections
    assert report.cause is Cause.LOCAL_ERROR, report
    assert report.steps == [] and connections == 0
    assert "EMAIL_SSL_CAFILE" in hint(report)


# -- DNS -------------------------------------------------------------------------------------------


def test_unresolvable_name_is_dns_failed(tmp_path: Path) -> None:
    """A real getaddrinfo failure without asking any DNS server: AI_NUMERICHOST forbids lookups."""
    async def numeric_only(host: str, port: int) -> Sequence[tuple[Any, ...]]:
        return await asyncio.get_running_loop().getaddrinfo(host, port, flags=socket.AI_NUMERICHOST)

    relay = relay_for(587, TlsMode.STARTTLS, host="relay.mailwatchd-test.invalid")
    report = run_probe(relay, probe_settings(tmp_path), resolve=numeric_only)
    assert report.cause is Cause.DNS_FAILED, report
    assert step_names(report) == ["dns"]
    assert "relay.mailwatchd-test.invalid" in report.detail and "EMAIL_HOST" in hint(report)


def test_an_ip_address_has_no_dns_step_and_asks_no_resolver(smtp_server_factory: Factory, tmp_path: Path) -> None:
    server = smtp_server_factory(starttls=False)
    asked: list[str] = []

    async def recording(host: str, port: int) -> Sequence[tuple[Any, ...]]:
        asked.append(host)
        return await asyncio.get_running_loop().getaddrinfo(host, port, flags=socket.AI_NUMERICHOST)

    report = run_probe(relay_for(server.port, TlsMode.NONE), probe_settings(tmp_path), resolve=recording)
    assert report.ok, report
    assert step_names(report)[0] == "connect" and "dns" not in report.timings_ms
    assert asked == []
    named = run_probe(relay_for(server.port, TlsMode.NONE, host="relay.mailwatchd.test"), probe_settings(tmp_path),
                      resolve=lambda host, port: recording(LOOPBACK, port))
    assert named.ok and step_names(named)[0] == "dns" and asked == [LOOPBACK]  # a name is looked up


def test_every_resolved_address_is_tried_within_the_deadline(smtp_server_factory: Factory, tmp_path: Path) -> None:
    server = smtp_server_factory(starttls=False)

    async def two_addresses(host: str, port: int) -> Sequence[tuple[Any, ...]]:
        assert (host, port) == ("relay.mailwatchd.test", server.port)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (LOOPBACK, port))]

    relay = relay_for(server.port, TlsMode.NONE, host="relay.mailwatchd.test")
    report = run_probe(relay, probe_settings(tmp_path), resolve=two_addresses)
    assert report.ok, report
    assert [step.detail for step in report.steps[:2]] == ["127.0.0.2, 127.0.0.1",
                                                          f"connected to 127.0.0.1:{server.port}"]


ISOLATED_PROBE = """
import asyncio, json, pathlib, sys
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.relays.probe import probe_endpoint
endpoint = Endpoint("relay.mailwatchd-test.invalid", 587, TlsMode.STARTTLS)
settings = Settings(spool=pathlib.Path("/nonexistent"), outbox=pathlib.Path("/nonexistent"), helo_name="probe.test",
                    connect_timeout=3.0)
report = asyncio.run(probe_endpoint(RelayConfig("r", (endpoint,)), endpoint, settings))
print(json.dumps(report.to_json()))
"""


def _can_isolate() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_isolate(), reason="needs root and unshare(1) for a private mount and net namespace")
def test_dns_failure_through_the_default_resolver_in_an_isolated_namespace(tmp_path: Path) -> None:
    """The probe's default resolver (the loop's getaddrinfo) fails for real: in a private network
    namespace with only loopback, /etc/resolv.conf bind-mounted to name 127.0.0.1, where nothing
    listens on port 53. No query can leave the machine."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    script = (f"ip link set lo up 2>/dev/null; mount --bind {resolv} /etc/resolv.conf && "
              f"exec {sys.executable} -c \"$PROBE\"")
    env = {**os.environ, "PROBE": ISOLATED_PROBE, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.monotonic()
    done = subprocess.run(["unshare", "--mount", "--net", "sh", "-c", script], env=env, capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["cause"] == Cause.DNS_FAILED.value, report
    assert [step["name"] for step in report["steps"]] == ["dns"]
    assert time.monotonic() - started < 10
