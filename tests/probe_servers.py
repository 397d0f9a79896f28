"""Helpers for the probe and check tests: server TLS contexts from odd certificates, aiosmtpd
handlers that fail one way each, a closed port, and the settings a probe test runs with."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailwatchd.settings.config import Settings
from tests.conftest import LOOPBACK, RecordingHandler


def probe_settings(tmp_path: Path, *, connect_timeout: float = 1.0, command_timeout: float = 2.0) -> Settings:
    return Settings(spool=tmp_path / "spool", outbox=tmp_path / "outbox", helo_name="probe.mailwatchd.test",
                    connect_timeout=connect_timeout, command_timeout=command_timeout,
                    transaction_timeout=max(command_timeout, 5.0))


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: a connect is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield sock.getsockname()[1]


def noncritical_ca(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA whose Basic Constraints extension is NOT marked critical (RFC 5280 §4.2.1.9 says it
    MUST be), and a server context for 127.0.0.1 signed by it. Returns (CA PEM file, context)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailwatchd test CA, non-critical constraints")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "noncritical-ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain = directory / "noncritical-leaf.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain)
    return ca_file, context


class RejectMailHandler(RecordingHandler):
    """Answers MAIL FROM with a fixed reply (a 550 sender identity or quota refusal), except from `allowed`."""

    def __init__(self, reply: str, allowed: str | None = None) -> None:
        super().__init__()
        self.reply = reply
        self.allowed = allowed

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if address == self.allowed:
            envelope.mail_from, envelope.mail_options = address, mail_options
            return "250 OK"
        return self.reply


class RejectRcptHandler(RecordingHandler):
    """Answers every RCPT TO with a fixed reply."""

    def __init__(self, reply: str) -> None:
        super().__init__()
        self.reply = reply

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        return self.reply


class NoAuthHandler(RecordingHandler):
    """Leaves AUTH out of every EHLO reply, as relays do on ports meant for server-to-server mail."""

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [line for line in responses if "AUTH" not in line]
