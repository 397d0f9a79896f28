"""SmtpSession against real aiosmtpd servers and raw misbehaving sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailwatchd.message import envelope
from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, Secret, TlsMode
from mailwatchd.transports.delivery import SmtpSession
from mailwatchd.transports.outcome import Cause, DeliveryResult, Outcome, Phase, RefusedRecipient
from mailwatchd.transports.smtpwire import wire_body
from tests.conftest import LOOPBACK, RecordingHandler, SmtpServer, wait_until
from tests.rawservers import BlackHole, DripServer, ScriptedServer, SilentServer, ThreadedServer

BODY = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nline one\r\n.a line with a dot\r\n"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"helo_name": "client.test", "connect_timeout": 2.0, "command_timeout": 5.0,
                              "transaction_timeout": 10.0}
    values.update(overrides)
    return Settings(spool=tmp_path / "spool", outbox=tmp_path / "outbox", **values)


def make_relay(port: int, tls: TlsMode = TlsMode.NONE, host: str = LOOPBACK, **kwargs: Any) -> RelayConfig:
    return RelayConfig(name="test-relay", endpoints=(Endpoint(host, port, tls),), **kwargs)


def message(sender: str = "a@example.test", recipients: tuple[str, ...] = ("b@example.test",),
            data: bytes = BODY, queue_id: str = "q1") -> OutgoingMessage:
    return OutgoingMessage(queue_id, sender, recipients, data, len(data))


def session_for(relay: RelayConfig, settings: Settings) -> SmtpSession:
    return SmtpSession(relay, relay.primary, settings)


def run_session(session: SmtpSession, *messages: OutgoingMessage) -> tuple[list[DeliveryResult], bool]:
    """Deliver the messages in order on one event loop; the results and whether the connection stayed open."""
    async def run() -> tuple[list[DeliveryResult], bool]:
        results = [await session.deliver(item) for item in messages]
        connected = session.connected
        await session.close()
        assert not session.connected
        return results, connected
    return asyncio.run(run())


def deliver(session: SmtpSession, *messages: OutgoingMessage) -> list[DeliveryResult]:
    return run_session(session, *messages)[0]


@dataclass
class AuditHandler(RecordingHandler):
    """Records what the server saw; replies from the dicts (keyed by address or sender) override acceptance."""

    ehlos: list[str] = field(default_factory=list)
    mails: list[str] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    peers: list[Any] = field(default_factory=list)
    servers: list[SMTP] = field(default_factory=list)
    tls: list[bool] = field(default_factory=list)
    logins: list[str | None] = field(default_factory=list)
    pipelining: bool = False
    mail_replies: dict[str, str] = field(default_factory=dict)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: dict[str, str] = field(default_factory=dict)

    async def handle_EHLO(self, server: SMTP, session: Session, env: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        self.ehlos.append(hostname)
        session.host_name = hostname  # what aiosmtpd does itself when there is no hook
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        if session.peer not in self.peers:
            self.peers.append(session.peer)
            self.servers.append(server)
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, env: Envelope, address: str,
                          options: list[str]) -> str:
        self.mails.append(address)
        if address in self.mail_replies:
            return self.mail_replies[address]
        env.mail_from = address
        env.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, env: Envelope, address: str,
                          options: list[str]) -> str:
        self.rcpts.append(address)
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        env.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, env: Envelope) -> str:
        if (env.mail_from or "") in self.data_replies:
            return self.data_replies[env.mail_from or ""]
        # Received.tls and .authenticated_as miss implicit TLS and the authenticator's login: keep our own.
        assert server.transport is not None
        self.tls.append(server.transport.get_extra_info("ssl_object") is not None)
        auth = session.auth_data
        self.logins.append(auth.login.decode() if isinstance(auth, LoginPassword) else None)
        return await super().handle_DATA(server, session, env)


ServerFactory = Callable[..., SmtpServer]


@pytest.fixture(params=[False, True], ids=["lockstep", "pipelined"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    """Whether the aiosmtpd server advertises PIPELINING (RFC 2920); it handles both either way."""
    return bool(request.param)


def test_plain_delivery(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path) -> None:
    server = smtp_server_factory(AuditHandler(pipelining=pipelining), starttls=False)
    relay = make_relay(server.port)
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert result.outcome is Outcome.DELIVERED and result.cause is Cause.OK
    assert (result.phase, result.code, result.relay) == (Phase.BODY, 250, "test-relay")
    assert result.endpoint == f"{LOOPBACK}:{server.port}/none"
    [got] = server.handler.wait_for(1)
    assert (got.mail_from, got.rcpt_tos, got.tls) == ("a@example.test", ["b@example.test"], False)
    assert got.data == BODY  # dot-stuffed on the wire, unstuffed by the server


def test_starttls_delivery_verifies_with_the_ca(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path,
                                                ca_file: Path) -> None:
    server = smtp_server_factory(AuditHandler(pipelining=pipelining), starttls=True)
    relay = make_relay(server.port, TlsMode.STARTTLS, cafile=ca_file)
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert result.outcome is Outcome.DELIVERED, result
    [got] = server.handler.wait_for(1)
    assert got.tls
    assert server.handler.ehlos == ["client.test", "client.test"]  # RFC 3207 §4.2: EHLO again after TLS


def recording_authenticator(calls: list[str], users: dict[str, str] | None = None) -> Callable[..., AuthResult]:
    """An aiosmtpd authenticator that records each attempt's mechanism and checks `users`."""
    def authenticator(server: SMTP, session: Session, env: Envelope, mechanism: str, data: Any) -> AuthResult:
        calls.append(mechanism)
        ok = isinstance(data, LoginPassword) and (users or {}).get(data.login.decode()) == data.password.decode()
        return AuthResult(success=ok, auth_data=data if ok else None)
    return authenticator


def test_starttls_required_but_not_offered_sends_nothing_more(smtp_server_factory: ServerFactory,
                                                              tmp_path: Path, ca_file: Path) -> None:
    handler = AuditHandler()
    auth_calls: list[str] = []
    server = smtp_server_factory(handler, starttls=False, authenticator=recording_authenticator(auth_calls),
                                 auth_require_tls=False)
    relay = make_relay(server.port, TlsMode.STARTTLS, cafile=ca_file, username="alice", password=Secret("pw"))
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert (result.outcome, result.cause, result.phase) == (
        Outcome.RELAY_FAULT, Cause.STARTTLS_UNAVAILABLE, Phase.STARTTLS)
    wait_until(lambda: handler.servers and handler.servers[0].transport is None, message="the server saw the close")
    assert handler.ehlos == ["client.test"]
    assert handler.mails == [] and auth_calls == [] and handler.messages == []


def test_starttls_missing_on_the_wire_only_ehlo_was_sent(tmp_path: Path, ca_file: Path) -> None:
    with ScriptedServer(["220 scripted ESMTP", "250-scripted\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME"]) as server:
        relay = make_relay(server.port, TlsMode.STARTTLS, cafile=ca_file, username="alice", password=Secret("pw"))
        [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
        assert result.cause is Cause.STARTTLS_UNAVAILABLE
        assert server.disconnected.wait(5)
        assert server.received == [b"EHLO client.test"]


def other_ca_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


def test_certificate_from_an_unknown_ca_is_refused(smtp_server_factory: ServerFactory, tmp_path: Path,
                                                   ca_file: Path) -> None:
    handler = AuditHandler()
    server = smtp_server_factory(handler, tls_context=other_ca_context(trustme.CA(), LOOPBACK))
    relay = make_relay(server.port, TlsMode.STARTTLS, cafile=ca_file)
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert (result.outcome, result.cause, result.phase) == (Outcome.RELAY_FAULT, Cause.TLS_UNTRUSTED, Phase.TLS)
    assert "certificate" in result.detail and "\n" not in result.detail
    assert handler.mails == []


@pytest.mark.parametrize("host", [LOOPBACK, "localhost"])
def test_certificate_for_another_name_is_refused(smtp_server_factory: ServerFactory, tmp_path: Path,
                                                 ca: trustme.CA, ca_file: Path, host: str) -> None:
    server = smtp_server_factory(AuditHandler(), tls_context=other_ca_context(ca, "mail.example.test"))
    relay = make_relay(server.port, TlsMode.STARTTLS, host=host, cafile=ca_file)
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert (result.outcome, result.cause) == (Outcome.RELAY_FAULT, Cause.TLS_HOSTNAME_MISMATCH), result


def test_verification_can_be_switched_off_explicitly(smtp_server_factory: ServerFactory, tmp_path: Path) -> None:
    server = smtp_server_factory(AuditHandler(), tls_context=other_ca_context(trustme.CA(), "mail.example.test"))
    relay = make_relay(server.port, TlsMode.STARTTLS, verify=False)
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert result.outcome is Outcome.DELIVERED, result


def test_implicit_tls_delivery(smtp_server_factory: ServerFactory, tmp_path: Path, ca_file: Path) -> None:
    server = smtp_server_factory(AuditHandler(), implicit_tls=True)
    relay = make_relay(server.port, TlsMode.IMPLICIT, cafile=ca_file)
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert result.outcome is Outcome.DELIVERED, result
    assert server.handler.wait_for(1) and server.handler.tls == [True]


def test_implicit_tls_against_an_unknown_ca(smtp_server_factory: ServerFactory, tmp_path: Path,
                                            ca_file: Path) -> None:
    server = smtp_server_factory(AuditHandler(), implicit_tls=True,
                                 tls_context=other_ca_context(trustme.CA(), LOOPBACK))
    relay = make_relay(server.port, TlsMode.IMPLICIT, cafile=ca_file)
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert (result.outcome, result.cause, result.phase) == (Outcome.RELAY_FAULT, Cause.TLS_UNTRUSTED, Phase.TLS)


def test_auth_succeeds_after_starttls(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path,
                                      ca_file: Path) -> None:
    calls: list[str] = []
    authenticator = recording_authenticator(calls, {"alice": "s3cret-pw"})
    server = smtp_server_factory(AuditHandler(pipelining=pipelining), authenticator=authenticator,
                                 auth_require_tls=True)
    relay = make_relay(server.port, TlsMode.STARTTLS, cafile=ca_file, username="alice",
                       password=Secret("s3cret-pw"))
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert result.outcome is Outcome.DELIVERED, result
    assert server.handler.wait_for(1) and server.handler.logins == ["alice"] and server.handler.tls == [True]
    assert len(calls) == 1


def test_wrong_password_is_auth_failed_and_never_shown(smtp_server_factory: ServerFactory, tmp_path: Path,
                                                      ca_file: Path) -> None:
    handler = AuditHandler()
    server = smtp_server_factory(handler, users={"alice": "right-pw"})
    relay = make_relay(server.port, TlsMode.STARTTLS, cafile=ca_file, username="alice",
                       password=Secret("wrong-pw-123"))
    [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
    assert (result.outcome, result.cause, result.phase, result.code) == (
        Outcome.RELAY_FAULT, Cause.AUTH_FAILED, Phase.AUTH, 535)
    assert "wrong-pw-123" not in repr(result) and handler.mails == []


def test_server_echoing_the_auth_string_is_scrubbed(tmp_path: Path) -> None:
    blob = "AGFsaWNlAHMzY3JldA=="  # base64 of "\0alice\0s3cret", the AUTH PLAIN string
    with ScriptedServer(["220 hi", "250-hi\r\n250 AUTH PLAIN", f"535 5.7.8 rejected {blob} (s3cret)"]) as server:
        relay = make_relay(server.port, username="alice", password=Secret("s3cret"))
        [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
        assert result.cause is Cause.AUTH_FAILED
        assert blob not in result.detail and "s3cret" not in result.detail and "***" in result.detail


def test_no_auth_offered_is_auth_unavailable(tmp_path: Path) -> None:
    with ScriptedServer(["220 hi", "250-hi\r\n250 8BITMIME"]) as server:
        relay = make_relay(server.port, username="alice", password=Secret("pw"))
        [result] = deliver(session_for(relay, make_settings(tmp_path)), message())
        assert (result.outcome, result.cause, result.phase) == (Outcome.RELAY_FAULT, Cause.AUTH_UNAVAILABLE, Phase.AUTH)
        assert server.disconnected.wait(5)
        assert [line.split()[0] for line in server.received] == [b"EHLO"]


def test_4xx_at_rcpt_is_temporary_and_drops_the_connection(pipelining: bool, smtp_server_factory: ServerFactory,
                                                           tmp_path: Path) -> None:
    handler = AuditHandler(pipelining=pipelining, rcpt_replies={"b@example.test": "450 4.2.1 mailbox busy"})
    server = smtp_server_factory(handler, starttls=False)
    session = session_for(make_relay(server.port), make_settings(tmp_path))
    [result], connected = run_session(session, message())
    assert (result.outcome, result.phase, result.code) == (Outcome.TEMPORARY, Phase.RCPT, 450)
    assert result.refused == (RefusedRecipient("b@example.test", 450, "4.2.1 mailbox busy", Outcome.TEMPORARY),)
    assert not connected and handler.messages == []


def test_4xx_after_the_data_is_temporary(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path) -> None:
    handler = AuditHandler(pipelining=pipelining, data_replies={"a@example.test": "451 4.3.0 try again later"})
    server = smtp_server_factory(handler, starttls=False)
    session = session_for(make_relay(server.port), make_settings(tmp_path))
    [result], connected = run_session(session, message())
    assert (result.outcome, result.cause, result.phase, result.code) == (
        Outcome.TEMPORARY, Cause.TEMPORARY_FAILURE, Phase.BODY, 451)
    assert result.detail == "4.3.0 try again later" and not connected


def test_5xx_at_mail_is_permanent_then_rset_keeps_the_connection(pipelining: bool, smtp_server_factory: ServerFactory,
                                                                 tmp_path: Path) -> None:
    handler = AuditHandler(pipelining=pipelining,
                           mail_replies={"bad@example.test": "550 5.7.1 sender rejected by policy"})
    server = smtp_server_factory(handler, starttls=False)
    session = session_for(make_relay(server.port), make_settings(tmp_path))
    first, second = deliver(session, message(sender="bad@example.test"), message(queue_id="q2"))
    assert (first.outcome, first.cause, first.phase, first.code) == (
        Outcome.PERMANENT, Cause.SENDER_REJECTED, Phase.MAIL, 550)
    assert first.detail == "5.7.1 sender rejected by policy"
    assert second.outcome is Outcome.DELIVERED, second
    assert len(handler.peers) == 1 and len(handler.wait_for(1)) == 1


def test_5xx_after_the_data_is_permanent_with_the_reply(pipelining: bool, smtp_server_factory: ServerFactory,
                                                        tmp_path: Path) -> None:
    handler = AuditHandler(pipelining=pipelining, data_replies={"a@example.test": "554 5.6.0 message content rejected"})
    server = smtp_server_factory(handler, starttls=False)
    session = session_for(make_relay(server.port), make_settings(tmp_path))
    first, second = deliver(session, message(), message(sender="c@example.test"))
    assert (first.outcome, first.cause, first.phase, first.code) == (
        Outcome.PERMANENT, Cause.MESSAGE_REJECTED, Phase.BODY, 554)
    assert first.detail == "5.6.0 message content rejected"
    assert second.outcome is Outcome.DELIVERED and len(handler.peers) == 1


def test_5xx_to_the_data_command_is_permanent(tmp_path: Path) -> None:
    script = ["220 hi", "250 hi", "250 ok", "250 ok", "554 5.5.1 no valid recipients", "250 reset", "221 bye"]
    with ScriptedServer(script) as server:
        session = session_for(make_relay(server.port), make_settings(tmp_path))
        [result], connected = run_session(session, message())
        assert (result.outcome, result.phase, result.code) == (Outcome.PERMANENT, Phase.DATA, 554)
        assert connected
        assert server.disconnected.wait(5)
        assert server.received[-3:] == [b"DATA", b"RSET", b"QUIT"]


def test_some_recipients_refused(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path) -> None:
    handler = AuditHandler(pipelining=pipelining, rcpt_replies={"gone@example.test": "550 5.1.1 no such user"})
    server = smtp_server_factory(handler, starttls=False)
    item = message(recipients=("gone@example.test", "b@example.test"))
    [result] = deliver(session_for(make_relay(server.port), make_settings(tmp_path)), item)
    assert result.outcome is Outcome.DELIVERED
    assert result.refused == (RefusedRecipient("gone@example.test", 550, "5.1.1 no such user", Outcome.PERMANENT),)
    assert handler.wait_for(1)[0].rcpt_tos == ["b@example.test"]


def test_all_recipients_refused_permanently(pipelining: bool, smtp_server_factory: ServerFactory,
                                            tmp_path: Path) -> None:
    handler = AuditHandler(pipelining=pipelining, rcpt_replies={"x@example.test": "550 5.1.1 no such user",
                                         "y@example.test": "553 5.1.3 bad address"})
    server = smtp_server_factory(handler, starttls=False)
    session = session_for(make_relay(server.port), make_settings(tmp_path))
    [result], connected = run_session(session, message(recipients=("x@example.test", "y@example.test")))
    assert (result.outcome, result.cause, result.phase) == (Outcome.PERMANENT, Cause.RECIPIENT_REJECTED, Phase.RCPT)
    assert [item.recipient for item in result.refused] == ["x@example.test", "y@example.test"]
    assert connected and handler.messages == []


def test_mixed_refusals_are_temporary(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path) -> None:
    handler = AuditHandler(pipelining=pipelining, rcpt_replies={"x@example.test": "550 5.1.1 no such user",
                                         "y@example.test": "451 4.7.1 greylisted"})
    server = smtp_server_factory(handler, starttls=False)
    [result] = deliver(session_for(make_relay(server.port), make_settings(tmp_path)),
                       message(recipients=("x@example.test", "y@example.test")))
    assert (result.outcome, result.code) == (Outcome.TEMPORARY, 451) and len(result.refused) == 2


@pytest.mark.parametrize("where", ["mail", "rcpt", "data"])
def test_quota_reply_is_a_relay_fault(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path,
                                      where: str) -> None:
    reply = "550 5.4.5 Daily user sending quota exceeded"
    handler = AuditHandler(pipelining=pipelining, mail_replies={"a@example.test": reply} if where == "mail" else {},
                           rcpt_replies={"b@example.test": reply} if where == "rcpt" else {},
                           data_replies={"a@example.test": reply} if where == "data" else {})
    server = smtp_server_factory(handler, starttls=False)
    [result] = deliver(session_for(make_relay(server.port), make_settings(tmp_path)),
                       message(recipients=("ok@example.test", "b@example.test")))
    assert (result.outcome, result.cause, result.code) == (Outcome.RELAY_FAULT, Cause.QUOTA_EXCEEDED, 550)


def test_connection_is_reused(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path,
                              ca_file: Path) -> None:
    handler = AuditHandler(pipelining=pipelining)
    server = smtp_server_factory(handler)
    relay = make_relay(server.port, TlsMode.STARTTLS, cafile=ca_file)
    session = session_for(relay, make_settings(tmp_path))
    results, connected = run_session(session, message(), message(queue_id="q2"), message(queue_id="q3"))
    assert [item.outcome for item in results] == [Outcome.DELIVERED] * 3
    assert len(handler.peers) == 1 and len(handler.wait_for(3)) == 3
    assert connected and session.idle_for < 5


def test_idle_connection_dropped_by_the_server_is_reopened(pipelining: bool, smtp_server_factory: ServerFactory,
                                                           tmp_path: Path) -> None:
    handler = AuditHandler(pipelining=pipelining)
    server = smtp_server_factory(handler, starttls=False)
    session = session_for(make_relay(server.port), make_settings(tmp_path))

    async def run() -> list[DeliveryResult]:
        first = await session.deliver(message())
        assert session.connected
        peer = handler.servers[0]
        transport = peer.transport
        assert transport is not None
        server.controller.loop.call_soon_threadsafe(transport.close)
        wait_until(lambda: peer.transport is None, message="the server to drop the connection")
        assert session.connected  # this loop has not run since: the client finds out at MAIL FROM
        second = await session.deliver(message(queue_id="q2"))
        await session.close()
        return [first, second]

    results = asyncio.run(run())
    assert [item.outcome for item in results] == [Outcome.DELIVERED] * 2, results
    assert len(handler.peers) == 2 and len(handler.wait_for(2)) == 2


def test_421_at_mail_on_a_reused_connection_is_retried_on_a_fresh_one(tmp_path: Path) -> None:
    script = ["220 hi", "250 hi", "250 ok", "250 ok", "354 go", "250 queued", "421 4.4.2 idle timeout"]
    with ScriptedServer(script, then="close") as server:
        session = session_for(make_relay(server.port), make_settings(tmp_path))
        results = deliver(session, message(), message(queue_id="q2"))
        assert [item.outcome for item in results] == [Outcome.DELIVERED] * 2
        assert server.connections == 2


def test_dripping_banner_is_cut_by_the_session_deadline(tmp_path: Path) -> None:
    with DripServer(interval=0.2) as server:
        settings = make_settings(tmp_path, command_timeout=60.0, transaction_timeout=1.0)
        started = time.monotonic()
        [result] = deliver(session_for(make_relay(server.port), settings), message())
        elapsed = time.monotonic() - started
        assert (result.outcome, result.cause, result.phase) == (
            Outcome.RELAY_FAULT, Cause.BANNER_TIMEOUT, Phase.GREETING)
        assert 0.9 < elapsed < 3.0 and server.sent >= 2


def test_silence_after_the_data_is_cut_by_the_transaction_deadline(tmp_path: Path) -> None:
    with ScriptedServer(["220 hi", "250 hi", "250 ok", "250 ok", "354 go"]) as server:
        settings = make_settings(tmp_path, command_timeout=60.0, transaction_timeout=1.0)
        session = session_for(make_relay(server.port), settings)
        started = time.monotonic()
        [result], connected = run_session(session, message())
        elapsed = time.monotonic() - started
        assert (result.outcome, result.cause, result.phase) == (Outcome.TEMPORARY, Cause.TIMEOUT, Phase.BODY)
        assert 0.9 < elapsed < 3.0 and not connected
        assert len(server.bodies) == 1


def test_silent_server_is_a_banner_timeout(tmp_path: Path) -> None:
    with SilentServer() as server:
        settings = make_settings(tmp_path, command_timeout=0.5)
        started = time.monotonic()
        [result] = deliver(session_for(make_relay(server.port), settings), message())
        assert (result.outcome, result.cause, result.phase) == (
            Outcome.RELAY_FAULT, Cause.BANNER_TIMEOUT, Phase.GREETING)
        assert time.monotonic() - started < 3.0


def test_black_hole_is_a_connect_timeout(tmp_path: Path) -> None:
    with BlackHole() as hole:
        settings = make_settings(tmp_path, connect_timeout=0.5)
        started = time.monotonic()
        [result] = deliver(session_for(make_relay(hole.port), settings), message())
        elapsed = time.monotonic() - started
        assert (result.outcome, result.cause, result.phase) == (
            Outcome.RELAY_FAULT, Cause.CONNECT_TIMEOUT, Phase.CONNECT)
        assert 0.4 < elapsed < 2.5


def test_nothing_listening_is_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    [result] = deliver(session_for(make_relay(port), make_settings(tmp_path)), message())
    assert (result.outcome, result.cause, result.phase) == (
        Outcome.RELAY_FAULT, Cause.CONNECTION_REFUSED, Phase.CONNECT)
    assert result.relay == "test-relay" and result.endpoint == f"{LOOPBACK}:{port}/none"


def test_bcc_never_reaches_the_server(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path) -> None:
    raw = (b"From: a@example.test\r\nTo: b@example.test\r\nBcc: hidden@example.test\r\n"
           b"Subject: s\r\n\r\nbody\r\n")
    parsed = envelope.parse("q1", raw)
    server = smtp_server_factory(AuditHandler(pipelining=pipelining), starttls=False)
    [result] = deliver(session_for(make_relay(server.port), make_settings(tmp_path)), parsed)
    assert result.outcome is Outcome.DELIVERED
    [got] = server.handler.wait_for(1)
    assert sorted(got.rcpt_tos) == ["b@example.test", "hidden@example.test"]
    assert b"hidden" not in got.data and b"bcc" not in got.data.lower()


def test_null_sender_and_8bit_body(pipelining: bool, smtp_server_factory: ServerFactory, tmp_path: Path) -> None:
    data = "From: a@example.test\nSubject: café\n\nünïcode body\n".encode()
    server = smtp_server_factory(AuditHandler(pipelining=pipelining), starttls=False)
    [result] = deliver(session_for(make_relay(server.port), make_settings(tmp_path)), message(sender="", data=data))
    assert result.outcome is Outcome.DELIVERED, result
    [got] = server.handler.wait_for(1)
    assert got.mail_from == "<>" or got.mail_from == ""
    assert got.data == data.replace(b"\n", b"\r\n")


def test_wire_body_normalises_and_stuffs() -> None:
    assert wire_body(b"a\nb") == b"a\r\nb\r\n.\r\n"
    assert wire_body(b".x\r\n..y\rz\n") == b"..x\r\n...y\r\nz\r\n.\r\n"
    assert wire_body(b"a\r\n.\r\n") == b"a\r\n..\r\n.\r\n"


class PipelineOnlyServer(ThreadedServer):
    """Answers MAIL, RCPT and DATA only once all of them have arrived: a lockstep client stalls here."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[bytes]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 pipeline-only\r\n")
        await reader.readline()
        writer.write(b"250-pipeline-only\r\n250 PIPELINING\r\n")
        while True:
            batch: list[bytes] = []
            while not batch or not batch[-1].startswith((b"DATA", b"QUIT")):
                line = await asyncio.wait_for(reader.readline(), 3)
                if not line:
                    return
                batch.append(line.rstrip(b"\r\n"))
            self.batches.append(batch)
            if batch[-1] == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            writer.write(b"250 ok\r\n" * (len(batch) - 1) + b"354 go\r\n")
            await reader.readuntil(b"\r\n.\r\n")
            writer.write(b"250 queued\r\n")


def test_pipelining_sends_mail_rcpt_and_data_in_one_go(tmp_path: Path) -> None:
    with PipelineOnlyServer() as server:
        session = session_for(make_relay(server.port), make_settings(tmp_path, command_timeout=2.0))
        results = deliver(session, message(recipients=("b@example.test", "c@example.test")),
                          message(sender="", queue_id="q2"))
        assert [item.outcome for item in results] == [Outcome.DELIVERED] * 2, results
        assert server.disconnected.wait(5)
        assert server.batches == [
            [b"MAIL FROM:<a@example.test>", b"RCPT TO:<b@example.test>", b"RCPT TO:<c@example.test>", b"DATA"],
            [b"MAIL FROM:<>", b"RCPT TO:<b@example.test>", b"DATA"],
            [b"QUIT"],
        ]


def test_pipelined_354_after_a_refused_sender_drops_the_connection(tmp_path: Path) -> None:
    script = ["220 hi", "250-hi\r\n250 PIPELINING", "550 5.7.1 sender refused", "503 5.5.1 need MAIL", "354 go"]
    with ScriptedServer(script) as server:
        session = session_for(make_relay(server.port), make_settings(tmp_path, command_timeout=5.0))
        started = time.monotonic()
        [result], connected = run_session(session, message())
        assert (result.outcome, result.cause, result.code) == (Outcome.PERMANENT, Cause.SENDER_REJECTED, 550)
        assert not connected  # neither RSET nor anything else: the server would take it as message text
        assert time.monotonic() - started < 2.5  # no wait for an RSET reply that cannot come
        assert server.disconnected.wait(5)
        assert server.received == [b"EHLO client.test", b"MAIL FROM:<a@example.test>", b"RCPT TO:<b@example.test>",
                                   b"DATA"]
        assert server.bodies == []


@pytest.mark.parametrize("ehlo", ["250 hi", "250-hi\r\n250 PIPELINING"], ids=["lockstep", "pipelined"])
def test_421_at_mail_on_a_fresh_connection_is_temporary(tmp_path: Path, ehlo: str) -> None:
    with ScriptedServer(["220 hi", ehlo, "421 4.3.2 shutting down"], then="close") as server:
        session = session_for(make_relay(server.port), make_settings(tmp_path))
        [result], connected = run_session(session, message())
        assert (result.outcome, result.cause, result.phase, result.code) == (
            Outcome.TEMPORARY, Cause.SERVER_BUSY, Phase.MAIL, 421)
        assert not connected and server.connections == 1


def test_malformed_reply_is_a_protocol_error(tmp_path: Path) -> None:
    with ScriptedServer(["220 hi", "250 hi", "hello? this is not SMTP"]) as server:
        session = session_for(make_relay(server.port), make_settings(tmp_path))
        [result], connected = run_session(session, message())
        assert (result.outcome, result.cause, result.phase) == (Outcome.TEMPORARY, Cause.PROTOCOL_ERROR, Phase.MAIL)
        assert result.code is None and "not SMTP" in result.detail and not connected


def test_unsafe_address_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    with ScriptedServer(["220 hi", "250 hi", "250 ok", "250 ok", "354 go", "250 queued", "221 bye"]) as server:
        session = session_for(make_relay(server.port), make_settings(tmp_path))
        bad, good = run_session(session, message(recipients=("b@example.test>\r\nRSET",)), message())[0]
        assert (bad.outcome, bad.cause) == (Outcome.PERMANENT, Cause.MESSAGE_REJECTED)
        assert good.outcome is Outcome.DELIVERED
        assert server.disconnected.wait(5)
        assert b"RSET" not in server.received


def test_non_ascii_address_needs_smtputf8(pipelining: bool, smtp_server_factory: ServerFactory,
                                          tmp_path: Path) -> None:
    # aiosmtpd's Controller turns SMTPUTF8 on unless told otherwise.
    plain = smtp_server_factory(AuditHandler(pipelining=pipelining), starttls=False, enable_SMTPUTF8=False)
    utf8 = smtp_server_factory(AuditHandler(pipelining=pipelining), starttls=False, enable_SMTPUTF8=True)
    item = message(recipients=("jösé@exämple.test",))
    [refused] = deliver(session_for(make_relay(plain.port), make_settings(tmp_path)), item)
    assert (refused.outcome, refused.cause) == (Outcome.PERMANENT, Cause.MESSAGE_REJECTED)
    assert "SMTPUTF8" in refused.detail and plain.handler.mails == []
    [sent] = deliver(session_for(make_relay(utf8.port), make_settings(tmp_path)), item)
    assert sent.outcome is Outcome.DELIVERED, sent
    assert utf8.handler.wait_for(1)[0].rcpt_tos == ["jösé@exämple.test"]


def test_the_relay_connection_sends_short_writes_at_once(smtp_server_factory: Callable[..., SmtpServer],
                                                         tmp_path: Path) -> None:
    """Nagle's algorithm off (TCP_NODELAY): an end of data written apart from its body must not wait for the
    server's delayed ACK."""
    server = smtp_server_factory(starttls=False)
    session = session_for(make_relay(server.port), make_settings(tmp_path))

    async def run() -> int:
        assert await session.open() is None
        wire = session._wire
        assert wire is not None and wire._transport is not None
        sock = wire._transport.get_extra_info("socket")
        nodelay: int = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await session.close()
        return nodelay

    assert asyncio.run(run()) != 0
