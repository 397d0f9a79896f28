"""A fake submission relay that takes OAuth2 bearer tokens the way Exchange Online and Gmail do.

Real aiosmtpd on 127.0.0.1 port 0, TLS required (STARTTLS, or implicit TLS), AUTH offered only
under TLS. XOAUTH2 (both styles) and OAUTHBEARER (Gmail, RFC 7628) come inline (`AUTH XOAUTH2
<b64>`) or in two steps (`AUTH XOAUTH2`, `334 `, `<b64>`). The token is checked by the
`validate` callable the test passes in, the mailbox against a set.

- microsoft: EHLO `AUTH LOGIN XOAUTH2`; `235 2.7.0 Authentication successful`; a bad token gets
  `535 5.7.3 ...` at once; LOGIN gets the tenant's basic-auth refusal (5.7.139 by default).
- google: EHLO `AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH`; `235 2.7.0
  Accepted`; a bad token gets `334 <base64 JSON>`, and after the client's acknowledgement (an
  empty line for XOAUTH2, `AQ==` for OAUTHBEARER) a multi-line `535 5.7.8`.

aiosmtpd's limits (`command_size_limit` 512, `line_length_limit` 1001) would refuse a real token
with `500 Command line too long`: the relay takes AUTH lines of RFC 4954's 12,288 octets.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.conftest import LOOPBACK, LoopbackController, Received, RecordingHandler

AUTH_LINE_LIMIT = 12288  # RFC 4954 §4: an AUTH line, CRLF included
READ_LIMIT = 16384  # a continuation line after `334 ` may be as long as the AUTH line it replaces, and more

MICROSOFT_HOST = "SN4PR0701CA0035.namprd07.prod.outlook.com"
BASIC_AUTH_DISABLED_TENANT = ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
                              "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. "
                              f"[{MICROSOFT_HOST}]")
BASIC_AUTH_NOT_SUPPORTED = "550 5.7.30 Basic authentication is not supported for Client Submission."
BASIC_AUTH_DISABLED = "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."
GOOGLE_BAD_CREDENTIALS = ("535-5.7.8 Username and Password not accepted. Learn more at\r\n"
                          "535 5.7.8  https://support.google.com/mail/?p=BadCredentials")
# Gmail's XOAUTH2 error challenge, byte for byte as Google documents it (the JSON ends in a line feed).
GOOGLE_XOAUTH2_CHALLENGE = ("eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIG1hYyIsInNjb3BlIjoiaHR0cHM6Ly9tYWls"
                            "Lmdvb2dsZS5jb20vIn0K")
# RFC 7628 §3.2.2's error form; the fields beyond "status" are Gmail's as far as known.
OAUTHBEARER_ERROR = {"status": "invalid_token", "scope": "https://mail.google.com/",
                     "openid-configuration": "https://accounts.google.com/.well-known/openid-configuration"}


@dataclass(frozen=True)
class Style:
    """What one provider says: its EHLO AUTH line, success, bad-token replies and password refusal."""

    mechanisms: str
    size: int
    success: str
    bad_token: str
    error_challenge: dict[str, str] | None  # XOAUTH2's: a 334 JSON before the 535, or None for a direct 535
    basic_auth_reply: str


STYLES = {
    "microsoft": Style("LOGIN XOAUTH2", 157286400, "235 2.7.0 Authentication successful",
                       f"535 5.7.3 Authentication unsuccessful [{MICROSOFT_HOST}]", None,
                       BASIC_AUTH_DISABLED_TENANT),
    "google": Style("LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH", 35882577, "235 2.7.0 Accepted",
                    GOOGLE_BAD_CREDENTIALS, json.loads(base64.b64decode(GOOGLE_XOAUTH2_CHALLENGE)),
                    GOOGLE_BAD_CREDENTIALS),
}


@dataclass(frozen=True)
class BearerLogin:
    """The session's identity after a bearer-token AUTH (aiosmtpd's `session.auth_data`)."""

    mechanism: str
    mailbox: str


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH exchange as the relay saw it. `form`: inline or two-step; `ack`: the client's decoded
    answer to the error challenge (b"" for an empty line, b"\\x01" for AQ==), None without one."""

    mechanism: str
    mailbox: str | None
    token_length: int
    result: str  # accepted, bad_token, malformed, password_refused, aborted
    form: str = "inline"
    ack: bytes | None = None
    fields: tuple[str, ...] = ()  # OAUTHBEARER's key names (host, port, auth)


class OAuthRelayHandler(RecordingHandler):
    """aiosmtpd handler: the XOAUTH2 / OAUTHBEARER mechanisms, password refusals, messages kept."""

    def __init__(self, validate: Callable[[str], bool], mailboxes: set[str] | frozenset[str], style: str,
                 basic_auth_reply: str | None = None, *, two_step_only: bool = False) -> None:
        super().__init__()
        self.validate = validate
        self.mailboxes = frozenset(mailboxes)
        self.style = STYLES[style]
        self.basic_auth_reply = basic_auth_reply or self.style.basic_auth_reply
        self.two_step_only = two_step_only
        self.attempts: list[AuthAttempt] = []
        self.longest_auth_line = 0  # octets without CRLF, the AUTH line or its continuation

    # aiosmtpd hooks.

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [f"250-AUTH {self.style.mechanisms}" if line.startswith("250-AUTH ") else line for line in responses]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        login = session.auth_data
        user = (login.mailbox if isinstance(login, BearerLogin)
                else login.login.decode() if isinstance(login, LoginPassword) else None)
        tls = session.ssl is not None or (server.transport is not None
                                          and server.transport.get_extra_info("ssl_object") is not None)
        with self.lock:
            self.messages.append(Received(envelope.mail_from or "", list(envelope.rcpt_tos),
                                          bytes(envelope.original_content or b""), tls, user))
            self.lock.notify_all()
        return "250 2.0.0 OK: queued"

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._bearer(server, "XOAUTH2", args)

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self._bearer(server, "OAUTHBEARER", args)

    def refuse_password(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                        auth_data: Any) -> AuthResult:
        """aiosmtpd's `authenticator` for the built-in LOGIN and PLAIN: the provider takes no passwords."""
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else None
        self._record(AuthAttempt(mechanism, login, 0, "password_refused"), 0)
        return AuthResult(success=False, handled=False, message=self.basic_auth_reply)

    # The exchange.

    async def _bearer(self, server: SMTP, mechanism: str, args: list[str]) -> AuthResult:
        if len(args) == 2 and not self.two_step_only:
            form, line_length = "inline", len(f"AUTH {mechanism} {args[1]}")
            try:
                blob = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                self._record(AuthAttempt(mechanism, None, 0, "malformed", form), line_length)
                return AuthResult(success=False, handled=False, message="501 5.5.2 Cannot decode base64")
        else:  # `AUTH XOAUTH2`, or a relay that ignores an initial response: ask for it with an empty 334
            form = "two-step"
            answer = await server.challenge_auth(b"")  # answers 501 itself to `*` and to bad base64
            if answer is MISSING:
                self._record(AuthAttempt(mechanism, None, 0, "aborted", form), 0)
                return AuthResult(success=False, handled=True)
            assert isinstance(answer, bytes)
            blob, line_length = answer, len(base64.b64encode(answer))
        parsed = _parse_xoauth2(blob) if mechanism == "XOAUTH2" else _parse_oauthbearer(blob)
        if parsed is None:
            self._record(AuthAttempt(mechanism, None, 0, "malformed", form), line_length)
            return AuthResult(success=False, handled=False, message="501 5.5.2 Malformed initial response")
        mailbox, token, fields = parsed
        complete = mechanism == "XOAUTH2" or {"host", "port"} <= set(fields)
        if complete and mailbox in self.mailboxes and self.validate(token):
            self._record(AuthAttempt(mechanism, mailbox, len(token), "accepted", form, fields=fields), line_length)
            return AuthResult(success=True, auth_data=BearerLogin(mechanism, mailbox), message=self.style.success)
        challenge = OAUTHBEARER_ERROR if mechanism == "OAUTHBEARER" else self.style.error_challenge
        if challenge is None:
            self._record(AuthAttempt(mechanism, mailbox, len(token), "bad_token", form, fields=fields), line_length)
            return AuthResult(success=False, handled=False, message=self.style.bad_token)
        # RFC 7628 §3.2.2: the error goes as a challenge; the exchange ends after the client's answer.
        encoded = json.dumps(challenge, separators=(",", ":")).encode() + b"\n"
        ack = await server.challenge_auth(encoded)
        acked = ack if isinstance(ack, bytes) else None
        self._record(AuthAttempt(mechanism, mailbox, len(token), "bad_token", form, acked, fields), line_length)
        if acked is None:
            return AuthResult(success=False, handled=True)
        if acked != (b"\x01" if mechanism == "OAUTHBEARER" else b""):
            # The fake's own strictness (no provider documents this reply): a wrong acknowledgement fails loudly.
            return AuthResult(success=False, handled=False, message="501 5.5.2 Unexpected answer to the challenge")
        return AuthResult(success=False, handled=False, message=self.style.bad_token)

    def _record(self, attempt: AuthAttempt, line_length: int) -> None:
        with self.lock:
            self.attempts.append(attempt)
            self.longest_auth_line = max(self.longest_auth_line, line_length)
            self.lock.notify_all()

    def recorded(self) -> list[AuthAttempt]:
        with self.lock:
            return list(self.attempts)


def _parse_xoauth2(blob: bytes) -> tuple[str, str, tuple[str, ...]] | None:
    """`user=U^Aauth=Bearer T^A^A` → (U, T, ()), or None."""
    if not blob.endswith(b"\x01\x01"):
        return None
    pairs = dict(_key_values(blob[:-2].split(b"\x01")))
    user, auth = pairs.get("user"), pairs.get("auth", "")
    if user is None or not auth.startswith("Bearer "):
        return None
    return user, auth.removeprefix("Bearer "), ()


def _parse_oauthbearer(blob: bytes) -> tuple[str, str, tuple[str, ...]] | None:
    """`n,a=U,^Ahost=H^Aport=P^Aauth=Bearer T^A^A` (RFC 7628 §3.1) → (U, T, key names), or None."""
    if not blob.endswith(b"\x01\x01"):
        return None
    header, *rest = blob[:-2].split(b"\x01")
    gs2 = header.decode("utf-8", "replace").split(",")
    if len(gs2) != 3 or gs2[0] != "n" or not gs2[1].startswith("a=") or gs2[2]:
        return None
    user = gs2[1][2:].replace("=2C", ",").replace("=3D", "=")
    pairs = _key_values(rest)
    values = dict(pairs)
    auth = values.get("auth", "")
    if not auth.startswith("Bearer ") or ("port" in values and not values["port"].isdigit()):
        return None
    return user, auth.removeprefix("Bearer "), tuple(key for key, _ in pairs)


def _key_values(items: list[bytes]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, _, value = item.decode("utf-8", "replace").partition("=")
        pairs.append((key, value))
    return pairs


class OAuthSMTP(SMTP):
    """aiosmtpd's SMTP with room for real tokens, in a limits table of its own.

    aiosmtpd's `command_size_limits` is a class attribute that every instance clears and EHLO
    adds to; a table per instance keeps this relay's AUTH limit out of other servers in the process.
    """

    line_length_limit = READ_LIMIT  # read by SMTP.__init__ for the stream reader

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit,
                                                           {"AUTH": AUTH_LINE_LIMIT - 2})


class OAuthController(LoopbackController):
    def factory(self) -> SMTP:
        return OAuthSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class OAuthRelay:
    host: str
    port: int
    handler: OAuthRelayHandler
    controller: OAuthController


@contextmanager
def start_oauth_relay(tls_context: ssl.SSLContext, *, validate: Callable[[str], bool],
                      mailboxes: set[str] | frozenset[str], style: str = "microsoft", implicit_tls: bool = False,
                      basic_auth_reply: str | None = None, two_step_only: bool = False) -> Iterator[OAuthRelay]:
    """A running fake relay; `basic_auth_reply` replaces the style's answer to LOGIN/PLAIN,
    `two_step_only` makes it ignore initial responses and always ask with `334 `."""
    handler = OAuthRelayHandler(validate, mailboxes, style, basic_auth_reply, two_step_only=two_step_only)
    excluded = {"PLAIN", "OAUTHBEARER"} if style == "microsoft" else set()
    kwargs: dict[str, Any] = {"authenticator": handler.refuse_password, "auth_exclude_mechanism": excluded,
                              "data_size_limit": STYLES[style].size}
    if implicit_tls:
        kwargs.update(ssl_context=tls_context, auth_require_tls=False)  # aiosmtpd sees TLS only after STARTTLS
    else:
        kwargs.update(tls_context=tls_context, require_starttls=True, auth_require_tls=True)
    controller = OAuthController(handler, hostname=LOOPBACK, port=0, **kwargs)
    controller.start()
    try:
        yield OAuthRelay(LOOPBACK, controller.port, handler, controller)
    finally:
        controller.stop()

