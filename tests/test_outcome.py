"""Properties of the one classifier: replies and real exceptions, by phase."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mailwatchd.transports.outcome import (
    Cause,
    Outcome,
    Phase,
    classify_exception,
    classify_reply,
    is_quota_reply,
)

SETUP = [phase for phase in Phase if phase.is_session_setup]
TRANSACTION = [Phase.MAIL, Phase.RCPT, Phase.DATA, Phase.BODY]
QUOTA_TEXTS = ["5.4.5 Daily user sending quota exceeded", "4.4.5 try later", "Sending limit reached",
               "rate limit exceeded for this account", "Too many messages in the last hour", "quota",
               "daily limit hit", "Message rejected: 5.4.5 Daily sending QUOTA"]
texts = st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=80)
# 530/535/538 at MAIL mean "authenticate first" (RFC 4954 §6): the relay's setup, not the message.
AUTH_AT_MAIL = {530, 535, 538}


@given(st.sampled_from(list(Phase)), st.integers(200, 299), texts)
def test_2xx_is_delivered(phase: Phase, code: int, text: str) -> None:
    assert classify_reply(phase, code, text).outcome is Outcome.DELIVERED


@given(st.sampled_from(SETUP), st.integers(-1, 999).filter(lambda code: not 200 <= code < 400), texts)
def test_any_failure_code_in_session_setup_is_a_relay_fault(phase: Phase, code: int, text: str) -> None:
    assert classify_reply(phase, code, text).outcome is Outcome.RELAY_FAULT


@given(st.sampled_from(SETUP), st.sampled_from([
    TimeoutError(), ConnectionResetError(), ConnectionRefusedError(), BrokenPipeError(), EOFError(),
    OSError(113, "No route to host"), OSError(101, "Network is unreachable"), ssl.SSLError(1, "bad"),
    ssl.SSLCertVerificationError(1, "bad"), socket.gaierror(-2, "Name or service not known"),
    ValueError("weird"), RuntimeError("odd"),
]))
def test_any_exception_in_session_setup_is_a_relay_fault(phase: Phase, exc: Exception) -> None:
    assert classify_exception(phase, exc).outcome is Outcome.RELAY_FAULT


@given(st.sampled_from(TRANSACTION), st.integers(500, 599), texts)
def test_5xx_in_the_transaction_is_permanent(phase: Phase, code: int, text: str) -> None:
    assume(not is_quota_reply(text))
    assume(not (phase is Phase.MAIL and code in AUTH_AT_MAIL))
    verdict = classify_reply(phase, code, text)
    assert verdict.outcome is Outcome.PERMANENT
    expected = {Phase.MAIL: Cause.SENDER_REJECTED, Phase.RCPT: Cause.RECIPIENT_REJECTED}.get(
        phase, Cause.MESSAGE_REJECTED)
    assert verdict.cause is expected


@pytest.mark.parametrize("code", sorted(AUTH_AT_MAIL))
def test_authentication_required_at_mail_is_the_relays_fault(code: int) -> None:
    verdict = classify_reply(Phase.MAIL, code, "5.7.0 Authentication required")
    assert (verdict.outcome, verdict.cause) == (Outcome.RELAY_FAULT, Cause.AUTH_FAILED)


@given(st.sampled_from(TRANSACTION), st.integers(400, 499).filter(lambda code: code != 421), texts)
def test_4xx_in_the_transaction_is_temporary(phase: Phase, code: int, text: str) -> None:
    assume(not is_quota_reply(text))
    assert classify_reply(phase, code, text).outcome is Outcome.TEMPORARY


@given(st.sampled_from(TRANSACTION), texts)
def test_421_in_the_transaction_is_temporary_server_busy(phase: Phase, text: str) -> None:
    assume(not is_quota_reply(text))
    verdict = classify_reply(phase, 421, text)
    assert (verdict.outcome, verdict.cause) == (Outcome.TEMPORARY, Cause.SERVER_BUSY)


@given(st.sampled_from(TRANSACTION), st.integers(400, 599), st.sampled_from(QUOTA_TEXTS), texts, texts)
def test_quota_text_is_a_relay_fault(phase: Phase, code: int, quota: str, before: str, after: str) -> None:
    verdict = classify_reply(phase, code, f"{before} {quota} {after}")
    assert (verdict.outcome, verdict.cause) == (Outcome.RELAY_FAULT, Cause.QUOTA_EXCEEDED)


@pytest.mark.parametrize("text", ["5.1.1 user unknown", "4.2.2 mailbox full", "5.4.50 not a code",
                                  "15.4.5 not a code either", "message accepted"])
def test_ordinary_replies_are_not_quota(text: str) -> None:
    assert not is_quota_reply(text)


def test_real_gaierror_is_dns_failed() -> None:
    with pytest.raises(socket.gaierror) as caught:
        socket.getaddrinfo("not a host name", 25, flags=socket.AI_NUMERICHOST)  # no lookup is made
    for phase in (Phase.DNS, Phase.CONNECT):
        verdict = classify_exception(phase, caught.value)
        assert (verdict.outcome, verdict.cause) == (Outcome.RELAY_FAULT, Cause.DNS_FAILED)


def test_real_timeout_while_connecting_is_connect_timeout() -> None:
    async def expire() -> None:
        async with asyncio.timeout(0.01):
            await asyncio.Event().wait()
    with pytest.raises(TimeoutError) as caught:
        asyncio.run(expire())
    verdict = classify_exception(Phase.CONNECT, caught.value)
    assert (verdict.outcome, verdict.cause) == (Outcome.RELAY_FAULT, Cause.CONNECT_TIMEOUT)
    assert classify_exception(Phase.GREETING, caught.value).cause is Cause.BANNER_TIMEOUT
    late = classify_exception(Phase.BODY, caught.value)
    assert (late.outcome, late.cause) == (Outcome.TEMPORARY, Cause.TIMEOUT)


def test_real_socket_timeout_is_a_timeout() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.settimeout(0.01)
        with pytest.raises(TimeoutError) as caught:
            left.recv(1)
    assert classify_exception(Phase.CONNECT, caught.value).cause is Cause.CONNECT_TIMEOUT


def test_real_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError) as caught, socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    verdict = classify_exception(Phase.CONNECT, caught.value)
    assert (verdict.outcome, verdict.cause) == (Outcome.RELAY_FAULT, Cause.CONNECTION_REFUSED)


@given(st.sampled_from(TRANSACTION), st.sampled_from([
    ConnectionResetError(), BrokenPipeError(), EOFError(), ssl.SSLEOFError(8, "EOF occurred in violation"),
    ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"),
]))
def test_a_connection_lost_in_the_transaction_is_temporary(phase: Phase, exc: Exception) -> None:
    verdict = classify_exception(phase, exc)
    assert (verdict.outcome, verdict.cause) == (Outcome.TEMPORARY, Cause.DISCONNECTED)


@given(st.integers(400, 599).filter(lambda code: code != 421), texts)
def test_a_refused_recipient_is_temporary_or_permanent_by_its_code(code: int, reply: str) -> None:
    """What delivery keeps for one refused recipient of several: a 4xx waits, a 5xx fails (not quota, not 421)."""
    assume(not is_quota_reply(reply))
    expected = Outcome.TEMPORARY if code < 500 else Outcome.PERMANENT
    assert classify_reply(Phase.RCPT, code, reply).outcome is expected


def test_local_errors_are_temporary() -> None:
    for exc in (OSError(28, "No space left on device"), PermissionError(13, "Permission denied")):
        verdict = classify_exception(Phase.LOCAL, exc)
        assert (verdict.outcome, verdict.cause) == (Outcome.TEMPORARY, Cause.LOCAL_ERROR)
