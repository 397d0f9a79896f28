"""client_context: verification on unless the operator turned it off; client certificates."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import trustme

from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.transports.delivery import SmtpSession
from mailwatchd.transports.outcome import DeliveryResult, Outcome
from mailwatchd.transports.tlsconfig import client_context
from tests.conftest import LOOPBACK, RecordingHandler, SmtpServer

DATA = b"From: a@example.test\r\nTo: b@example.test\r\n\r\nbody\r\n"


def relay(port: int = 465, **kwargs: object) -> RelayConfig:
    return RelayConfig("r", (Endpoint(LOOPBACK, port, TlsMode.IMPLICIT),), **kwargs)  # type: ignore[arg-type]


def test_verification_is_on_by_default() -> None:
    context = client_context(relay())
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_cafile_is_added_to_the_trust_store(ca_file: Path) -> None:
    before = client_context(relay()).cert_store_stats()["x509_ca"]
    assert client_context(relay(cafile=ca_file)).cert_store_stats()["x509_ca"] == before + 1


def test_verify_false_turns_verification_off() -> None:
    context = client_context(relay(verify=False))
    assert context.verify_mode is ssl.CERT_NONE and not context.check_hostname


def send(relay_config: RelayConfig, tmp_path: Path) -> DeliveryResult:
    settings = Settings(spool=tmp_path, outbox=tmp_path, helo_name="client.test", command_timeout=5.0)
    session = SmtpSession(relay_config, relay_config.primary, settings)

    async def run() -> DeliveryResult:
        result = await session.deliver(OutgoingMessage("q", "a@example.test", ("b@example.test",), DATA, len(DATA)))
        await session.close()
        return result
    return asyncio.run(run())


def test_client_certificate_is_presented(smtp_server_factory: Callable[..., SmtpServer], ca: trustme.CA,
                                         server_cert: trustme.LeafCert, ca_file: Path, tmp_path: Path) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_context)
    ca.configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server = smtp_server_factory(RecordingHandler(), implicit_tls=True, tls_context=server_context)
    client = ca.issue_cert("client.test")
    certfile, keyfile = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(certfile))
    client.private_key_pem.write_to_path(str(keyfile))

    with_cert = send(relay(server.port, cafile=ca_file, certfile=certfile, keyfile=keyfile), tmp_path)
    assert with_cert.outcome is Outcome.DELIVERED, with_cert
    without = send(relay(server.port, cafile=ca_file), tmp_path)
    assert without.outcome is Outcome.RELAY_FAULT, without
    assert len(server.handler.wait_for(1)) == 1
