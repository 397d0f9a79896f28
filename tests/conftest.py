"""Shared fixtures: a trustme CA → server certificate → TLS contexts, a real aiosmtpd server on
127.0.0.1 port 0 (STARTTLS, implicit TLS, AUTH as asked), a spool directory, and polling
with a deadline instead of sleeps."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

LOOPBACK = "127.0.0.1"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


@dataclass
class Received:
    """One message as the SMTP server received it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    authenticated_as: str | None


def _implicit_tls(server: SMTP) -> bool:
    """aiosmtpd sets session.ssl only after STARTTLS; implicit TLS shows on the transport."""
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


@dataclass
class RecordingHandler:
    """Accepts every message and keeps it; subclasses override one hook per failure mode."""

    messages: list[Received] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            login = session.auth_data
            user = login.login.decode() if isinstance(login, LoginPassword) else None
            self.messages.append(Received(envelope.mail_from or "", list(envelope.rcpt_tos),
                                          bytes(envelope.original_content or b""),
                                          session.ssl is not None or _implicit_tls(server), user))
            self.lock.notify_all()
        return "250 2.0.0 OK: queued"

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Block until `count` messages arrived; fail at the deadline."""
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"expected {count} messages, got {len(self.messages)} in {timeout:g}s")
            return list(self.messages)


class LoopbackController(Controller):
    """aiosmtpd's Controller on port 0: learn the bound port before its self-connect."""

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@dataclass
class SmtpServer:
    host: str
    port: int
    handler: Any
    controller: LoopbackController


def make_authenticator(users: dict[str, str]) -> Callable[..., AuthResult]:
    def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        ok = users.get(auth_data.login.decode()) == auth_data.password.decode()
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)
    return authenticator


@pytest.fixture(autouse=True)
def no_proxy_no_ca_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx honours proxy variables and SSL_CERT_FILE: none of the machine's may steer a test off loopback
    or change which certificates it trusts (a test that wants a proxy sets one itself)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "localhost")


@pytest.fixture(scope="session")
def server_tls_context(server_cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    return context


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def smtp_server_factory(server_tls_context: ssl.SSLContext) -> Iterator[Callable[..., SmtpServer]]:
    """Start real aiosmtpd servers: `start(handler, starttls=True, implicit_tls=False, users=None)`."""
    started: list[LoopbackController] = []

    def start(handler: Any = None, *, starttls: bool = True, implicit_tls: bool = False,
              users: dict[str, str] | None = None, require_starttls: bool = False,
              tls_context: ssl.SSLContext | None = None, **smtp_kwargs: Any) -> SmtpServer:
        handler = handler if handler is not None else RecordingHandler()
        context = tls_context or server_tls_context
        kwargs: dict[str, Any] = dict(smtp_kwargs)
        if implicit_tls:
            kwargs["ssl_context"] = context
        elif starttls:
            kwargs["tls_context"] = context
            kwargs["require_starttls"] = require_starttls
        if users is not None:
            kwargs["authenticator"] = make_authenticator(users)
            kwargs["auth_require_tls"] = starttls or implicit_tls
        controller = LoopbackController(handler, hostname=LOOPBACK, port=0, **kwargs)
        controller.start()
        started.append(controller)
        return SmtpServer(LOOPBACK, controller.port, handler, controller)

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
def smtp_server(smtp_server_factory: Callable[..., SmtpServer]) -> SmtpServer:
    """A STARTTLS-capable server that accepts and records every message."""
    return smtp_server_factory()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment for child processes with no EMAIL_*/MAILWATCHD_* leaking in."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("EMAIL_", "MAILWATCHD_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM"))
           and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")}  # loopback only, never a proxy
    env["PYTHONUNBUFFERED"] = "1"
    env["HOME"] = str(tmp_path)
    env["MAILWATCHD_LISTEN"] = ""  # no SMTP listener unless a test asks: daemons must not contend for a port
    return env


@pytest.fixture
def daemons() -> Iterator[Callable[..., Any]]:
    """Start `mailwatchd run` children: `start(env, *run_args)` waits for ready; killed at teardown if still up."""
    from tests.daemonproc import DaemonProcess

    started: list[DaemonProcess] = []

    def start(env: dict[str, str], *args: str) -> DaemonProcess:
        daemon = DaemonProcess(env).start(*args)
        started.append(daemon)
        return daemon.wait_ready()

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
