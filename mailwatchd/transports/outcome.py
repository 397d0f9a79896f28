"""What an SMTP reply or failure means: one closed set of outcomes, decided in one place.

RFC 5321 §4.2.1: 2yz success, 4yz transient, 5yz permanent. Which *phase* failed decides
whose problem it is: before MAIL FROM it is the relay's (fail over, never bounce the
message); from MAIL FROM on it is the message's, except quota replies (RFC 3463 X.4.5 and
the wording providers use), which are the relay's too.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    """How one delivery attempt ended. Exhaustive: every attempt ends in exactly one."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # defer this message with backoff; fresh connection next time
    PERMANENT = "permanent"  # the relay refused this message for good: failed store
    RELAY_FAULT = "relay_fault"  # the relay cannot take mail now: fail over, attempts not burned


class Phase(StrEnum):
    """The SMTP step an attempt was in when it ended."""

    DNS = "dns"
    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    TLS = "tls"
    TOKEN = "token"  # obtaining an OAuth2 access token (token endpoint or token command)
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    BODY = "body"  # the reply after the final dot
    HTTP = "http"  # an HTTPS API relay's request and reply
    LOCAL = "local"  # outbox delivery or reading the spool

    @property
    def is_session_setup(self) -> bool:
        return self in _SETUP_PHASES


_SETUP_PHASES = frozenset({Phase.DNS, Phase.CONNECT, Phase.GREETING, Phase.EHLO, Phase.STARTTLS,
                           Phase.TLS, Phase.TOKEN, Phase.AUTH})


class Cause(StrEnum):
    """Stable cause codes, shown by `mailwatchd check` and in logs (documented in the README)."""

    OK = "ok"
    DNS_FAILED = "dns_failed"
    CONNECTION_REFUSED = "connection_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    NETWORK_UNREACHABLE = "network_unreachable"
    BANNER_TIMEOUT = "banner_timeout"
    SERVER_BUSY = "server_busy"
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
    TLS_UNTRUSTED = "tls_untrusted"
    TLS_EXPIRED = "tls_expired"
    TLS_HOSTNAME_MISMATCH = "tls_hostname_mismatch"
    STARTTLS_UNAVAILABLE = "starttls_unavailable"
    AUTH_UNAVAILABLE = "auth_unavailable"
    AUTH_FAILED = "auth_failed"
    BASIC_AUTH_DISABLED = "basic_auth_disabled"  # the provider no longer takes passwords (Microsoft 5.7.139, 5.7.30)
    TOKEN_FAILED = "token_failed"  # the token endpoint (or command) refused: invalid_client, invalid_grant, ...
    TOKEN_UNREACHABLE = "token_unreachable"  # no answer from the token endpoint: DNS, connect, TLS, timeout, 5xx
    SENDER_REJECTED = "sender_rejected"
    RECIPIENT_REJECTED = "recipient_rejected"
    MESSAGE_REJECTED = "message_rejected"
    QUOTA_EXCEEDED = "quota_exceeded"
    TEMPORARY_FAILURE = "temporary_failure"
    TIMEOUT = "timeout"
    DISCONNECTED = "disconnected"
    PROTOCOL_ERROR = "protocol_error"
    LOCAL_ERROR = "local_error"
    EXPIRED = "expired"  # the message's lifetime ran out while it kept failing temporarily
    MALFORMED = "malformed"  # the spool file is not a sendable message (no sender, no recipient, unreadable)
    UNEXPRESSIBLE = "unexpressible"  # an HTTPS API relay cannot carry this message as written: try the next relay


class HttpProblem(StrEnum):
    """What an HTTPS API relay's reply means, as each provider module reads its status and error code."""

    NONE = "none"  # accepted (2xx with the provider's message id)
    AUTH = "auth"  # the key is wrong, revoked or lacks the send permission (401/403)
    ACCOUNT = "account"  # the account or domain cannot send now (suspended, paused, unverified domain)
    QUOTA = "quota"  # 429 or a quota reply: skip the relay until Retry-After
    UNAVAILABLE = "unavailable"  # 5xx: the provider has a problem
    MISCONFIGURED = "misconfigured"  # the URL, region or domain names nothing (404, a wrong base URL)
    SENDER = "sender"  # this message's sender is refused (an unverified sender identity)
    RECIPIENT = "recipient"  # this message's recipient is refused (an invalid address)
    MESSAGE = "message"  # this message is refused (too large, content, a field the provider rejects)
    UNEXPRESSIBLE = "unexpressible"  # the API cannot carry this message as written: the next relay may


@dataclass(frozen=True)
class Verdict:
    """The classifier's answer: the outcome and a cause code explaining it."""

    outcome: Outcome
    cause: Cause


# RFC 3463 X.4.5 "mail system congestion", used by Gmail for the daily sending limit
# (550 5.4.5), plus the words other providers put in quota and rate-limit replies.
_QUOTA = re.compile(r"\b[45]\.4\.5\b|quota|sending limit|rate limit|too many messages|daily limit",
                    re.IGNORECASE)


# Microsoft 365 refusing password logins: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication
# is disabled for the Tenant", "..., basic authentication is disabled", "550 5.7.30 Basic authentication is
# not supported for Client Submission" (and 5.7.139's security-defaults variant).
_BASIC_AUTH_DISABLED = re.compile(r"\b5\.7\.(139|30)\b|SmtpClientAuthentication is disabled|basic authentication is "
                                  r"(disabled|not supported)", re.IGNORECASE)


def is_quota_reply(text: str) -> bool:
    return bool(_QUOTA.search(text))


def is_basic_auth_disabled(text: str) -> bool:
    return bool(_BASIC_AUTH_DISABLED.search(text))


def classify_reply(phase: Phase, code: int, text: str = "") -> Verdict:
    """Classify a reply code received in `phase`."""
    if 200 <= code < 400:
        return Verdict(Outcome.DELIVERED, Cause.OK)
    if is_quota_reply(text) and phase in (Phase.MAIL, Phase.RCPT, Phase.DATA, Phase.BODY):
        return Verdict(Outcome.RELAY_FAULT, Cause.QUOTA_EXCEEDED)
    if code >= 500 and phase in (Phase.AUTH, Phase.MAIL) and is_basic_auth_disabled(text):
        return Verdict(Outcome.RELAY_FAULT, Cause.BASIC_AUTH_DISABLED)
    if code == 421 or phase == Phase.GREETING:
        # 421: the server is closing the channel (RFC 5321 §3.8): not the message's fault.
        cause = Cause.SERVER_BUSY
        return Verdict(Outcome.RELAY_FAULT if phase.is_session_setup else Outcome.TEMPORARY, cause)
    if phase.is_session_setup:
        cause = {
            Phase.AUTH: Cause.AUTH_FAILED,
            Phase.TOKEN: Cause.TOKEN_FAILED,
            Phase.STARTTLS: Cause.STARTTLS_UNAVAILABLE,
            Phase.TLS: Cause.TLS_HANDSHAKE_FAILED,
        }.get(phase, Cause.PROTOCOL_ERROR)
        return Verdict(Outcome.RELAY_FAULT, cause)
    if phase == Phase.MAIL and code in (530, 535, 538):
        # 530 authentication required (RFC 4954 §6): our setup, not the message.
        return Verdict(Outcome.RELAY_FAULT, Cause.AUTH_FAILED)
    if 400 <= code < 500:
        return Verdict(Outcome.TEMPORARY, Cause.TEMPORARY_FAILURE)
    if 500 <= code < 600:
        cause = {Phase.MAIL: Cause.SENDER_REJECTED, Phase.RCPT: Cause.RECIPIENT_REJECTED}.get(
            phase, Cause.MESSAGE_REJECTED)
        return Verdict(Outcome.PERMANENT, cause)
    return Verdict(Outcome.TEMPORARY, Cause.PROTOCOL_ERROR)


_HTTP_VERDICTS = {
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


def classify_http(problem: HttpProblem) -> Verdict:
    """An HTTPS API relay's reply in the closed set: the provider's problems (its key, account, quota,
    a 5xx) are relay faults that fail over; only what is wrong with this message is permanent."""
    outcome, cause = _HTTP_VERDICTS[problem]
    return Verdict(outcome, cause)


def classify_exception(phase: Phase, exc: BaseException) -> Verdict:
    """Classify a failure that came without a usable reply (timeouts, resets, TLS, DNS)."""
    setup = phase.is_session_setup
    fault = Outcome.RELAY_FAULT if setup else Outcome.TEMPORARY
    if phase == Phase.TOKEN:  # the token endpoint, not the relay: its own cause, for its own fix
        return Verdict(Outcome.RELAY_FAULT, Cause.TOKEN_UNREACHABLE)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Verdict(Outcome.RELAY_FAULT, certificate_cause(exc))
    if isinstance(exc, ssl.SSLError):
        # After the handshake a TLS error (SSLEOFError, a bad record) is a connection lost mid-way.
        return Verdict(Outcome.RELAY_FAULT, Cause.TLS_HANDSHAKE_FAILED) if setup else Verdict(fault, Cause.DISCONNECTED)
    if isinstance(exc, socket.gaierror):
        return Verdict(Outcome.RELAY_FAULT, Cause.DNS_FAILED)
    if isinstance(exc, TimeoutError):
        if phase in (Phase.CONNECT, Phase.DNS):
            return Verdict(fault, Cause.CONNECT_TIMEOUT)
        if phase == Phase.GREETING:
            return Verdict(fault, Cause.BANNER_TIMEOUT)
        if phase in (Phase.STARTTLS, Phase.TLS):
            return Verdict(fault, Cause.TLS_HANDSHAKE_FAILED)
        return Verdict(fault, Cause.TIMEOUT)
    if isinstance(exc, ConnectionRefusedError):
        return Verdict(Outcome.RELAY_FAULT, Cause.CONNECTION_REFUSED)
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return Verdict(Outcome.RELAY_FAULT, Cause.NETWORK_UNREACHABLE)
    if isinstance(exc, ConnectionError | EOFError) or (isinstance(exc, OSError) and phase != Phase.LOCAL):
        return Verdict(fault, Cause.DISCONNECTED)
    if phase == Phase.LOCAL:
        return Verdict(Outcome.TEMPORARY, Cause.LOCAL_ERROR)
    return Verdict(fault, Cause.PROTOCOL_ERROR)


def certificate_cause(exc: ssl.SSLCertVerificationError) -> Cause:
    """Name what is wrong with a certificate from OpenSSL's verify code."""
    # X509_V_ERR_* codes from OpenSSL's x509_vfy.h.
    code = getattr(exc, "verify_code", None)
    message = str(getattr(exc, "verify_message", "") or exc).lower()
    if code == 10 or "expired" in message:
        return Cause.TLS_EXPIRED
    if code == 62 or "hostname mismatch" in message or "ip address mismatch" in message:
        return Cause.TLS_HOSTNAME_MISMATCH
    return Cause.TLS_UNTRUSTED


@dataclass(frozen=True)
class RefusedRecipient:
    """A recipient the relay refused while the transaction went on for others."""

    recipient: str
    code: int
    reply: str
    outcome: Outcome  # TEMPORARY or PERMANENT, as classify_reply(Phase.RCPT, ...) said


@dataclass(frozen=True)
class DeliveryResult:
    """One attempt at one message: the outcome for its accepted or remaining recipients.

    `refused` lists recipients refused individually (RCPT 4xx/5xx) while the attempt went on;
    they are not covered by `outcome`. `detail` is the server's reply or a one-line
    description of the failure: never a password, an AUTH string or a message body.
    """

    outcome: Outcome
    cause: Cause
    phase: Phase
    code: int | None = None
    detail: str = ""
    relay: str | None = None
    endpoint: str | None = None
    refused: tuple[RefusedRecipient, ...] = field(default=())
    retry_after: float | None = None  # seconds the relay asked to be left alone (HTTP Retry-After, a quota reset)

    @property
    def summary(self) -> str:
        code = f"{self.code} " if self.code is not None else ""
        return f"{self.phase.value}: {code}{self.detail}".strip()
