"""One SMTP client: the probe and delivery open sessions through the same code, so they agree
about every relay. Each fault below is met by both paths, against real servers on loopback."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from mailwatchd.relays.probe import ProbeReport, probe_endpoint
from mailwatchd.settings.relays import Endpoint, RelayConfig, Secret, TlsMode
from mailwatchd.transports.delivery import SmtpSession
from mailwatchd.transports.outcome import Cause, DeliveryResult, Outcome, Phase
from mailwatchd.transports.smtpclient import CONNECT_STAGGER_S, Resolver, literal_address
from tests.conftest import LOOPBACK, RecordingHandler, SmtpServer
from tests.probe_servers import probe_settings
from tests.rawservers import BlackHole, ScriptedServer
from tests.test_delivery import message

Factory = Callable[..., SmtpServer]
PASSWORD = "cram-md5-shared-secret"


def both(relay: RelayConfig, tmp_path: Path, resolve: Resolver | None = None,
         **settings: Any) -> tuple[ProbeReport, DeliveryResult, float, float]:
    """Probe the relay's endpoint, then deliver one message to it; both results and how long each took."""
    config = probe_settings(tmp_path, **settings)

    async def run() -> tuple[ProbeReport, DeliveryResult, float, float]:
        started = time.monotonic()
        report = await probe_endpoint(relay, relay.primary, config, resolve=resolve)
        probed = time.monotonic() - started
        session = SmtpSession(relay, relay.primary, config, resolve=resolve)
        started = time.monotonic()
        result = await session.deliver(message())
        delivered = time.monotonic() - started
        await session.close()
        return report, result, probed, delivered
    return asyncio.run(run())


def test_a_black_holed_first_address_costs_a_stagger_not_a_connect_timeout(
        smtp_server_factory: Factory, tmp_path: Path) -> None:
    """A host whose first address is black-holed (broken IPv6, say) and whose second works: both paths
    connect to the second within a fraction of the connect timeout, and the probe calls the relay up."""
    server = smtp_server_factory(starttls=False)

    async def two_addresses(host: str, port: int) -> Sequence[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (LOOPBACK, port))]

    relay = RelayConfig("dual", (Endpoint("relay.mailwatchd.test", server.port, TlsMode.NONE),))
    with BlackHole(host="127.0.0.2", port=server.port):
        report, result, probed, delivered = both(relay, tmp_path, two_addresses, connect_timeout=4.0)
    assert report.ok, report
    assert report.steps[1].detail == f"connected to 127.0.0.1:{server.port}"
    assert CONNECT_STAGGER_S * 1000 <= report.timings_ms["connect"] < 1000
    assert result.outcome is Outcome.DELIVERED, result
    assert probed < 2.0 and delivered < 2.0
    assert len(server.handler.wait_for(1)) == 1


def test_ip_addresses_are_literal_and_names_are_not() -> None:
    assert literal_address("127.0.0.1") == (socket.AF_INET, "127.0.0.1")
    assert literal_address("::1") == (socket.AF_INET6, "::1")
    assert literal_address("relay.mailwatchd.test") is None and literal_address("127.0.0.1.nip.io") is None


def test_an_ip_address_is_never_looked_up_by_the_probe_or_delivery(smtp_server_factory: Factory,
                                                                    tmp_path: Path) -> None:
    server = smtp_server_factory(starttls=False)
    asked: list[str] = []

    async def recording(host: str, port: int) -> Sequence[tuple[Any, ...]]:
        asked.append(host)
        return await asyncio.get_running_loop().getaddrinfo(host, port, flags=socket.AI_NUMERICHOST)

    relay = RelayConfig("literal", (Endpoint(LOOPBACK, server.port, TlsMode.NONE),))
    report, result, _, _ = both(relay, tmp_path, recording)
    assert report.ok and result.outcome is Outcome.DELIVERED, (report, result)
    assert asked == [] and [step.name for step in report.steps][:1] == ["connect"]


def test_every_address_black_holed_is_one_connect_timeout_naming_each(tmp_path: Path) -> None:
    with BlackHole() as first, BlackHole(host="127.0.0.2", port=first.port):

        async def two_addresses(host: str, port: int) -> Sequence[tuple[Any, ...]]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in ("127.0.0.2", LOOPBACK)]

        relay = RelayConfig("dual", (Endpoint("relay.mailwatchd.test", first.port, TlsMode.NONE),))
        report, result, probed, delivered = both(relay, tmp_path, two_addresses, connect_timeout=0.6)
    assert report.cause is Cause.CONNECT_TIMEOUT and result.cause is Cause.CONNECT_TIMEOUT, (report, result)
    assert result.outcome is Outcome.RELAY_FAULT
    assert "127.0.0.2" in report.detail and "no answer" in report.detail
    # Each address had its own deadline; the second started a stagger after the first.
    for elapsed in (probed, delivered):
        assert 0.6 + CONNECT_STAGGER_S - 0.05 <= elapsed < 0.6 + CONNECT_STAGGER_S + 0.5


class CramMd5Handler(RecordingHandler):
    """A relay offering only CRAM-MD5 (RFC 2195): the server keeps the shared secret."""

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802 - aiosmtpd's naming
        challenge = f"<{secrets.token_hex(8)}.{time.time():.0f}@relay.mailwatchd.test>".encode()
        response = await server.challenge_auth(challenge)
        if not isinstance(response, bytes) or b" " not in response:
            return AuthResult(success=False, handled=False)
        user, digest = response.rsplit(b" ", 1)
        expected = hmac.new(PASSWORD.encode(), challenge, "md5").hexdigest().encode()
        if user != b"alice" or not hmac.compare_digest(digest, expected):
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=LoginPassword(user, b""))


def test_a_relay_offering_only_cram_md5_is_up_for_the_probe_and_for_delivery(
        smtp_server_factory: Factory, tmp_path: Path) -> None:
    server = smtp_server_factory(CramMd5Handler(), starttls=False, auth_require_tls=False,
                                 auth_exclude_mechanism=["LOGIN", "PLAIN"])
    relay = RelayConfig("cram", (Endpoint(LOOPBACK, server.port, TlsMode.NONE),), username="alice",
                        password=Secret(PASSWORD))
    report, result, _, _ = both(relay, tmp_path)
    assert report.ok, report
    assert report.steps[-2].name == "auth" and report.steps[-2].detail.startswith("CRAM-MD5 accepted: 235")
    assert result.outcome is Outcome.DELIVERED, result
    assert server.handler.wait_for(1)[0].authenticated_as == "alice"


def test_a_wrong_cram_md5_secret_is_auth_failed_on_both_paths(smtp_server_factory: Factory, tmp_path: Path) -> None:
    server = smtp_server_factory(CramMd5Handler(), starttls=False, auth_require_tls=False,
                                 auth_exclude_mechanism=["LOGIN", "PLAIN"])
    relay = RelayConfig("cram", (Endpoint(LOOPBACK, server.port, TlsMode.NONE),), username="alice",
                        password=Secret("not-the-secret"))
    report, result, _, _ = both(relay, tmp_path)
    assert report.cause is Cause.AUTH_FAILED and result.cause is Cause.AUTH_FAILED
    assert (result.outcome, result.phase) == (Outcome.RELAY_FAULT, Phase.AUTH)


def scripted_both(script: list[str], tmp_path: Path) -> tuple[ProbeReport, DeliveryResult]:
    """Probe and deliver against the same script, each on its own connection."""
    with ScriptedServer(script, then="close") as probed:
        relay = RelayConfig("scripted", (Endpoint(LOOPBACK, probed.port, TlsMode.NONE),))
        report = asyncio.run(probe_endpoint(relay, relay.primary, probe_settings(tmp_path)))
    with ScriptedServer(script, then="close") as delivered:
        relay = RelayConfig("scripted", (Endpoint(LOOPBACK, delivered.port, TlsMode.NONE),))
        session = SmtpSession(relay, relay.primary, probe_settings(tmp_path))
        result = asyncio.run(session.deliver(message()))
    return report, result


def test_a_non_smtp_greeting_is_a_protocol_error_on_both_paths(tmp_path: Path) -> None:
    report, result = scripted_both(["SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"], tmp_path)
    assert report.cause is Cause.PROTOCOL_ERROR and result.cause is Cause.PROTOCOL_ERROR
    assert (result.outcome, result.phase) == (Outcome.RELAY_FAULT, Phase.GREETING)
    assert "SSH-2.0" in report.detail and "SSH-2.0" in result.detail


def test_a_554_greeting_is_a_relay_fault_on_both_paths(tmp_path: Path) -> None:
    report, result = scripted_both(["554 5.7.1 no service for you"], tmp_path)
    assert report.cause is Cause.SERVER_BUSY and result.cause is Cause.SERVER_BUSY
    assert (result.outcome, result.code) == (Outcome.RELAY_FAULT, 554)


def test_a_reply_injected_before_the_tls_handshake_stops_the_session(tmp_path: Path, ca_file: Path) -> None:
    """RFC 3207 §6 (the 2011 STARTTLS command-injection class): bytes that arrive with the 220 to
    STARTTLS were not protected by TLS; taking them as the server's next reply would be a downgrade."""
    script = ["220 hi", "250-hi\r\n250 STARTTLS", "220 go ahead\r\n250 injected"]
    with ScriptedServer(script) as server:
        relay = RelayConfig("inject", (Endpoint(LOOPBACK, server.port, TlsMode.STARTTLS),), cafile=ca_file)
        report = asyncio.run(probe_endpoint(relay, relay.primary, probe_settings(tmp_path)))
        session = SmtpSession(relay, relay.primary, probe_settings(tmp_path))
        result = asyncio.run(session.deliver(message()))
    assert report.cause is Cause.PROTOCOL_ERROR and "before the TLS handshake" in report.detail
    assert (result.outcome, result.cause) == (Outcome.RELAY_FAULT, Cause.PROTOCOL_ERROR)
    assert [line.split()[0] for line in server.received] == [b"EHLO", b"STARTTLS"] * 2
