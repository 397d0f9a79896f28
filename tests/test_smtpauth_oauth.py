"""XOAUTH2 and OAUTHBEARER (RFC 7628) against a fake relay that answers like Exchange Online and Gmail,
over real TLS on loopback: sessions opened by the production `open_session`, tokens of real size, the
providers' failure forms (a direct 535, or a 334 JSON challenge that the client must acknowledge), and
the published encodings byte for byte."""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from mailwatchd.settings.relays import AuthMethod, Endpoint, RelayConfig, TlsMode
from mailwatchd.transports.smtpauth import (
    MAX_AUTH_LINE,
    AuthRefused,
    AuthUnavailable,
    authenticate,
    authenticate_bearer,
    bearer_initial_response,
    bearer_secret_forms,
    offered_mechanisms,
    saslname,
    token_rejected,
)
from mailwatchd.transports.smtpclient import Connection, Timeouts, open_session, quit_session
from mailwatchd.transports.smtpwire import Reply, wire_body
from tests.conftest import LOOPBACK
from tests.oauth_relay import (
    BASIC_AUTH_DISABLED,
    BASIC_AUTH_DISABLED_TENANT,
    BASIC_AUTH_NOT_SUPPORTED,
    OAUTHBEARER_ERROR,
    OAuthRelay,
    start_oauth_relay,
)
from tests.rawservers import ScriptedServer

T = TypeVar("T")
MAILBOX = "alerts@contoso.onmicrosoft.com"
OTHER_MAILBOX = "ops@contoso.onmicrosoft.com"
XOAUTH2, OAUTHBEARER = AuthMethod.XOAUTH2, AuthMethod.OAUTHBEARER
GOOGLE_401 = {"status": "401", "schemes": "bearer mac", "scope": "https://mail.google.com/"}


def make_token(length: int) -> str:
    """A token of `length` characters from JWT's alphabet (base64url), as long as Microsoft's run."""
    return secrets.token_urlsafe(length)[:length]


GOOD = make_token(2000)
GOOD_2 = make_token(2100)
LONG = make_token(2500)
HUGE = make_token(9300)  # its XOAUTH2 AUTH line is over RFC 4954's 12,288 octets
EXPIRED = make_token(2000)
VALID = frozenset({GOOD, GOOD_2, LONG, HUGE})


def validate(token: str) -> bool:
    return token in VALID


def run(relay: OAuthRelay | ScriptedServer, ca_file: Path | None, scenario: Callable[[Connection], Awaitable[T]], *,
        implicit_tls: bool = False) -> T:
    """Open a session to the relay the production way (no credentials: it stops after EHLO), run, QUIT.
    Without `ca_file`, plain TCP (a scripted server)."""
    async def main() -> T:
        mode = TlsMode.NONE if ca_file is None else TlsMode.IMPLICIT if implicit_tls else TlsMode.STARTTLS
        endpoint = Endpoint(LOOPBACK, relay.port, mode)
        context = None if ca_file is None else ssl.create_default_context(cafile=str(ca_file))
        conn = await open_session(RelayConfig("oauth", (endpoint,)), endpoint,
                                  timeouts=Timeouts(connect=2.0, command=5.0, total=10.0),
                                  helo_name="mailwatchd.test", tls_context=context)
        try:
            return await scenario(conn)
        finally:
            await quit_session(conn.wire)
    return asyncio.run(main())


def login(conn: Connection, method: AuthMethod, token: str, *, port: int,
          username: str = MAILBOX) -> Awaitable[tuple[str, Reply]]:
    return authenticate_bearer(lambda line: conn.wire.command(line, 5.0), offered_mechanisms(conn.extensions),
                               method, username, token, host=LOOPBACK, port=port)


def refused(relay: OAuthRelay | ScriptedServer, ca_file: Path | None, method: AuthMethod, token: str) -> AuthRefused:
    async def scenario(conn: Connection) -> None:
        await login(conn, method, token, port=relay.port)
    with pytest.raises(AuthRefused) as info:
        run(relay, ca_file, scenario)
    assert_no_secret(info.value, method, token, relay.port)
    return info.value


def assert_no_secret(exc: Exception, method: AuthMethod, token: str, port: int) -> None:
    forms = bearer_secret_forms(method, MAILBOX, token, host=LOOPBACK, port=port)
    assert len(forms) == 2
    shown = [str(exc), repr(exc), *(str(arg) for arg in exc.args)]
    if isinstance(exc, AuthRefused):
        shown += [str(exc.reply), exc.reply.text, repr(exc.challenge)]
    for form in forms:
        assert not any(form in text for text in shown)


async def send_one(conn: Connection) -> None:
    """One message on the session; the relay records the mailbox that logged in."""
    wire = conn.wire
    assert (await wire.command(f"MAIL FROM:<{MAILBOX}>".encode(), 5.0)).code == 250
    assert (await wire.command(b"RCPT TO:<oncall@example.com>", 5.0)).code == 250
    assert (await wire.command(b"DATA", 5.0)).code == 354
    wire.write(wire_body(b"Subject: disk full\r\n\r\n/var is at 97%\r\n"))
    assert (await wire.read(5.0)).code == 250


# Accepted.

@pytest.mark.parametrize(("style", "success"), [("microsoft", "2.7.0 Authentication successful"),
                                                ("google", "2.7.0 Accepted")])
def test_xoauth2_inline_is_accepted_and_the_session_sends_as_the_mailbox(
        style: str, success: str, server_tls_context: ssl.SSLContext, ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}, style=style) as relay:
        async def scenario(conn: Connection) -> tuple[str, Reply]:
            result = await login(conn, XOAUTH2, GOOD, port=relay.port)
            await send_one(conn)
            return result
        mechanism, reply = run(relay, ca_file, scenario)
        assert (mechanism, reply) == ("XOAUTH2", Reply(235, success))
        [attempt] = relay.handler.recorded()
        assert (attempt.mechanism, attempt.mailbox, attempt.token_length, attempt.result, attempt.form) == (
            "XOAUTH2", MAILBOX, len(GOOD), "accepted", "inline")
        [received] = relay.handler.wait_for(1)
        assert received.authenticated_as == MAILBOX and received.tls


def test_each_style_offers_what_its_provider_offers_after_starttls(server_tls_context: ssl.SSLContext,
                                                                   ca_file: Path) -> None:
    offered = {}
    for style in ("microsoft", "google"):
        with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}, style=style) as relay:
            async def scenario(conn: Connection) -> list[str]:
                return offered_mechanisms(conn.extensions)
            offered[style] = run(relay, ca_file, scenario)
    assert offered == {"microsoft": ["LOGIN", "XOAUTH2"],
                       "google": ["LOGIN", "PLAIN", "XOAUTH2", "PLAIN-CLIENTTOKEN", "OAUTHBEARER", "XOAUTH"]}


def test_oauthbearer_is_accepted_with_host_and_port(server_tls_context: ssl.SSLContext, ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}, style="google") as relay:
        async def scenario(conn: Connection) -> tuple[str, Reply]:
            result = await login(conn, OAUTHBEARER, GOOD, port=relay.port)
            await send_one(conn)
            return result
        assert run(relay, ca_file, scenario) == ("OAUTHBEARER", Reply(235, "2.7.0 Accepted"))
        [attempt] = relay.handler.recorded()
        assert (attempt.mechanism, attempt.mailbox, attempt.result) == ("OAUTHBEARER", MAILBOX, "accepted")
        assert attempt.fields == ("host", "port", "auth")
        assert relay.handler.wait_for(1)[0].authenticated_as == MAILBOX


def test_oauthbearer_over_implicit_tls(server_tls_context: ssl.SSLContext, ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}, style="google",
                           implicit_tls=True) as relay:
        async def scenario(conn: Connection) -> tuple[str, Reply]:
            assert conn.tls_version is not None
            return await login(conn, OAUTHBEARER, GOOD, port=relay.port)
        assert run(relay, ca_file, scenario, implicit_tls=True)[0] == "OAUTHBEARER"


def test_a_relay_that_asks_for_the_response_after_334_gets_it(server_tls_context: ssl.SSLContext,
                                                              ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}, two_step_only=True) as relay:
        async def scenario(conn: Connection) -> tuple[str, Reply]:
            return await login(conn, XOAUTH2, GOOD, port=relay.port)
        assert run(relay, ca_file, scenario) == ("XOAUTH2", Reply(235, "2.7.0 Authentication successful"))
        [attempt] = relay.handler.recorded()
        assert (attempt.form, attempt.result, attempt.token_length) == ("two-step", "accepted", len(GOOD))


def test_a_2500_character_token_passes_in_one_auth_line(server_tls_context: ssl.SSLContext, ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}) as relay:
        async def scenario(conn: Connection) -> tuple[str, Reply]:
            return await login(conn, XOAUTH2, LONG, port=relay.port)
        assert run(relay, ca_file, scenario)[1].code == 235
        assert relay.handler.recorded()[0].form == "inline"
        assert relay.handler.longest_auth_line > 1001 + 2000  # aiosmtpd's default limits would have said 500


def test_an_initial_response_over_12288_octets_goes_after_the_334(server_tls_context: ssl.SSLContext,
                                                                   ca_file: Path) -> None:
    """RFC 4954 §4: an AUTH line may not exceed the limit; the relay refuses such a line, so only the
    two-step form can succeed."""
    response = bearer_initial_response(XOAUTH2, MAILBOX, HUGE, host=LOOPBACK, port=0)
    assert len(b"AUTH XOAUTH2 " + response) + 2 > MAX_AUTH_LINE
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}) as relay:
        async def scenario(conn: Connection) -> tuple[Reply, tuple[str, Reply]]:
            too_long = await conn.wire.command(b"AUTH XOAUTH2 " + response, 5.0)
            return too_long, await login(conn, XOAUTH2, HUGE, port=relay.port)
        too_long, (mechanism, reply) = run(relay, ca_file, scenario)
        assert too_long == Reply(500, "Command line too long")
        assert reply.code == 235
        [attempt] = relay.handler.recorded()
        assert (attempt.form, attempt.token_length) == ("two-step", len(HUGE))


# Refused.

def test_microsoft_refuses_a_bad_token_with_a_direct_535_573(server_tls_context: ssl.SSLContext,
                                                             ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}) as relay:
        exc = refused(relay, ca_file, XOAUTH2, EXPIRED)
        assert exc.reply == Reply(535, "5.7.3 Authentication unsuccessful [SN4PR0701CA0035.namprd07.prod.outlook.com]")
        assert exc.challenge is None and token_rejected(exc)
        assert [(a.result, a.ack) for a in relay.handler.recorded()] == [("bad_token", None)]


def test_google_refuses_a_bad_token_with_a_334_json_then_535_578(server_tls_context: ssl.SSLContext,
                                                                 ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}, style="google") as relay:
        exc = refused(relay, ca_file, XOAUTH2, EXPIRED)
        assert exc.challenge == GOOGLE_401
        assert exc.reply == Reply(535, "5.7.8 Username and Password not accepted. Learn more at\n"
                                       "5.7.8  https://support.google.com/mail/?p=BadCredentials")
        assert token_rejected(exc)
        [attempt] = relay.handler.recorded()
        assert (attempt.result, attempt.ack) == ("bad_token", b"")  # XOAUTH2: an empty line


def test_oauthbearer_failure_is_acknowledged_with_a_single_0x01(server_tls_context: ssl.SSLContext,
                                                                ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}, style="google") as relay:
        exc = refused(relay, ca_file, OAUTHBEARER, EXPIRED)
        assert exc.challenge == OAUTHBEARER_ERROR and exc.reply.code == 535
        assert token_rejected(exc)
        [attempt] = relay.handler.recorded()
        assert (attempt.result, attempt.ack) == ("bad_token", b"\x01")  # the client sent AQ==


def test_a_mailbox_the_token_may_not_send_as_is_refused(server_tls_context: ssl.SSLContext, ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}) as relay:
        async def scenario(conn: Connection) -> tuple[str, Reply]:
            return await login(conn, XOAUTH2, GOOD, port=relay.port, username=OTHER_MAILBOX)
        with pytest.raises(AuthRefused) as info:
            run(relay, ca_file, scenario)
        assert info.value.reply.code == 535
        assert relay.handler.recorded()[0].mailbox == OTHER_MAILBOX


def test_a_reply_that_echoes_the_token_is_scrubbed_and_a_garbage_challenge_tolerated() -> None:
    """A server that quotes what it got: the exception shows *** instead. Its 334 is not base64 JSON:
    no challenge, and the exchange still ends with the empty line and the final reply."""
    response = bearer_initial_response(XOAUTH2, MAILBOX, EXPIRED, host=LOOPBACK, port=0).decode()
    script = ["220 relay.test ESMTP", "250-relay.test\r\n250 AUTH XOAUTH2", "334 {not base64: json}",
              f"535 5.7.3 token {EXPIRED} in {response} refused", "221 2.0.0 bye"]
    with ScriptedServer(script) as server:
        exc = refused(server, None, XOAUTH2, EXPIRED)
    assert exc.challenge is None and token_rejected(exc)
    assert exc.reply == Reply(535, "5.7.3 token *** in *** refused")
    assert server.received[1:3] == [b"AUTH XOAUTH2 " + response.encode(), b""]


def test_a_server_that_wants_more_after_the_acknowledgement_is_cancelled() -> None:
    script = ["220 relay.test ESMTP", "250-relay.test\r\n250 AUTH OAUTHBEARER", "334 e30=", "334 ",
              "501 5.7.0 Auth aborted", "221 2.0.0 bye"]
    with ScriptedServer(script) as server:
        exc = refused(server, None, OAUTHBEARER, EXPIRED)
    assert exc.challenge == {} and exc.reply == Reply(501, "5.7.0 Auth aborted") and not token_rejected(exc)
    assert server.received[2:4] == [b"AQ==", b"*"]  # RFC 4954 §4: '*' cancels


@pytest.mark.parametrize(("style", "method"), [("microsoft", XOAUTH2), ("google", XOAUTH2), ("google", OAUTHBEARER)])
def test_a_fresh_token_succeeds_on_the_same_connection_after_a_refusal(
        style: str, method: AuthMethod, server_tls_context: ssl.SSLContext, ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}, style=style) as relay:
        async def scenario(conn: Connection) -> tuple[bool, Reply]:
            try:
                await login(conn, method, EXPIRED, port=relay.port)
            except AuthRefused as exc:
                rejected = token_rejected(exc)
            else:
                raise AssertionError("the expired token was accepted")
            _, reply = await login(conn, method, GOOD_2, port=relay.port)
            await send_one(conn)
            return rejected, reply
        rejected, reply = run(relay, ca_file, scenario)
        assert rejected and reply.code == 235
        assert [a.result for a in relay.handler.recorded()] == ["bad_token", "accepted"]
        assert relay.handler.wait_for(1)[0].authenticated_as == MAILBOX


def test_oauthbearer_is_not_offered_by_microsoft(server_tls_context: ssl.SSLContext, ca_file: Path) -> None:
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX}) as relay:
        async def scenario(conn: Connection) -> tuple[str, Reply]:
            return await login(conn, OAUTHBEARER, GOOD, port=relay.port)
        with pytest.raises(AuthUnavailable) as info:
            run(relay, ca_file, scenario)
        assert str(info.value) == "the server does not offer OAUTHBEARER (offers: LOGIN XOAUTH2)"
        assert relay.handler.recorded() == []
        assert_no_secret(info.value, OAUTHBEARER, GOOD, relay.port)


def test_no_auth_at_all_is_said_so() -> None:
    async def never(line: bytes) -> Reply:
        raise AssertionError("nothing may be sent")
    with pytest.raises(AuthUnavailable, match="^the server does not offer AUTH on this connection$"):
        asyncio.run(authenticate_bearer(never, [], XOAUTH2, MAILBOX, GOOD, host=LOOPBACK, port=587))


@pytest.mark.parametrize("refusal", [BASIC_AUTH_DISABLED_TENANT, BASIC_AUTH_NOT_SUPPORTED, BASIC_AUTH_DISABLED])
def test_microsoft_password_refusals_are_policy_not_a_bad_token(refusal: str, server_tls_context: ssl.SSLContext,
                                                                ca_file: Path) -> None:
    """Exchange offers LOGIN (not PLAIN) for passwords; its basic-auth refusals must not trigger a token retry."""
    with start_oauth_relay(server_tls_context, validate=validate, mailboxes={MAILBOX},
                           basic_auth_reply=refusal) as relay:
        async def scenario(conn: Connection) -> tuple[str, Reply]:
            return await authenticate(lambda line: conn.wire.command(line, 5.0), offered_mechanisms(conn.extensions),
                                      MAILBOX, "hunter2-app-password", encrypted=True)
        with pytest.raises(AuthRefused) as info:
            run(relay, ca_file, scenario)
        assert str(info.value.reply) == refusal
        assert not token_rejected(info.value)
        assert [(a.mechanism, a.result) for a in relay.handler.recorded()] == [("LOGIN", "password_refused")]


# token_rejected on its own: the codes and statuses the providers document.

@pytest.mark.parametrize(("reply", "challenge", "expected"), [
    (Reply(535, "5.7.3 Authentication unsuccessful [host]"), None, True),
    (Reply(535, "5.7.8 Username and Password not accepted. Learn more at\n5.7.8 https://x"), None, True),
    (Reply(535, "5.7.1 Username and Password not accepted."), None, True),
    (Reply(535, "5.7.8 Username and Password not accepted."), {"status": "400"}, True),
    (Reply(535, "5.7.1 x"), {"status": "invalid_token"}, True),
    (Reply(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox."),
     None, False),
    (Reply(535, "5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults "
                "policy."), None, False),
    (Reply(550, "5.7.30 Basic authentication is not supported for Client Submission."), None, False),
    (Reply(535, "5.7.30 x"), None, False),
    (Reply(454, "4.7.0 Temporary authentication failure"), None, False),
    (Reply(535, "5.7.9 x"), {"status": "insufficient_scope"}, False),
    (Reply(535, "Authentication failed"), None, False),
])
def test_token_rejected(reply: Reply, challenge: dict[str, object] | None, expected: bool) -> None:
    assert token_rejected(AuthRefused(reply, challenge)) is expected


# The encodings, checked against the published examples.

def test_xoauth2_matches_microsofts_documented_example() -> None:
    response = bearer_initial_response(XOAUTH2, "test@contoso.onmicrosoft.com",
                                       "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA", host="smtp.office365.com", port=587)
    assert response == (b"dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVyIEV3QkFBbDNCQUFVRkZwVUFvN0ozVm"
                        b"UwYmpMQldaV0NjbFJDM0VvQUEBAQ==")


def test_oauthbearer_matches_rfc_7628s_example() -> None:
    """RFC 7628 §4.1: n,a=user@example.com,^Ahost=server.example.com^Aport=143^Aauth=Bearer ...^A^A."""
    response = bearer_initial_response(OAUTHBEARER, "user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==",
                                       host="server.example.com", port=143)
    assert response == (b"bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVyIH"
                        b"ZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB")


def test_saslname_escapes_comma_and_equals() -> None:
    assert saslname("a,b=c@example.com") == "a=2Cb=3Dc@example.com"
    assert saslname("=2C") == "=3D2C"  # '=' first, or an escape would be escaped again


def test_secret_forms_are_the_token_and_the_initial_response() -> None:
    forms = bearer_secret_forms(OAUTHBEARER, MAILBOX, GOOD, host=LOOPBACK, port=587)
    assert forms == (GOOD, bearer_initial_response(OAUTHBEARER, MAILBOX, GOOD, host=LOOPBACK, port=587).decode())


@pytest.mark.parametrize(("username", "token"), [(MAILBOX, GOOD[:40] + "\x01user=x"), (MAILBOX, GOOD + " "),
                                                 (MAILBOX, ""), ("a\x01b@example.com", GOOD)])
def test_a_value_that_would_break_the_framing_is_refused_without_showing_the_token(username: str,
                                                                                  token: str) -> None:
    with pytest.raises(ValueError) as info:
        bearer_initial_response(XOAUTH2, username, token, host=LOOPBACK, port=587)
    assert not token or token not in str(info.value)
    assert "access token" in str(info.value) or "mailbox" in str(info.value)


def test_a_password_method_is_not_a_bearer_method() -> None:
    with pytest.raises(ValueError, match="password is not a bearer-token method"):
        bearer_initial_response(AuthMethod.PASSWORD, MAILBOX, GOOD, host=LOOPBACK, port=587)
