"""SMTP AUTH (RFC 4954): choose a mechanism the server offers and run its exchange.

This is the only AUTH code: delivery, the probe and `check --send-test` all log in here, with a
password through `authenticate` (PLAIN, LOGIN, CRAM-MD5: `_PREFERENCE` and `_exchange`) or with an
OAuth2 access token through `authenticate_bearer` (XOAUTH2, Google's and Microsoft's mechanism;
OAUTHBEARER, RFC 7628). The password encodings and XOAUTH2's come from aiosmtplib; OAUTHBEARER's
is `bearer_initial_response` below.

A bearer token goes as the initial response on the AUTH line (RFC 4954 §4), or after an empty
`334` when the server asks for it there. A refused token is answered either at once with a 535
(Exchange Online) or first with `334 <base64 JSON>` (Gmail; RFC 7628 §3.2.2), which the client
acknowledges (XOAUTH2: an empty line; OAUTHBEARER: a single 0x01) before the 535 comes.
`token_rejected` tells a bad token (fetch a fresh one, retry once) from a policy refusal.

Nothing here logs. Exception texts hold no password, token or initial response; a caller scrubs
its own texts with `bearer_secret_forms`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable

from aiosmtplib.auth import auth_crammd5_verify, auth_login_encode, auth_plain_encode, auth_xoauth2_encode

from mailwatchd.settings.relays import AuthMethod
from mailwatchd.transports.smtpwire import Reply

Command = Callable[[bytes], Awaitable[Reply]]

# Under TLS the password is protected anyway, and PLAIN works with every password store;
# CRAM-MD5 keeps the password off a plain-text connection (allowed to loopback relays only).
_PREFERENCE = {True: ("PLAIN", "LOGIN", "CRAM-MD5"), False: ("CRAM-MD5", "PLAIN", "LOGIN")}

BEARER_MECHANISMS = {AuthMethod.XOAUTH2: "XOAUTH2", AuthMethod.OAUTHBEARER: "OAUTHBEARER"}
MAX_AUTH_LINE = 12288  # RFC 4954 §4: octets of an AUTH line, CRLF included; longer goes after a 334
# What ends a failed exchange after the server's error challenge: XOAUTH2 wants an empty line,
# OAUTHBEARER a single %x01 (RFC 7628 §3.2.3), base64 "AQ==".
_ERROR_ACK = {"XOAUTH2": b"", "OAUTHBEARER": b"AQ=="}
# The token itself is bad (expired, revoked, for another resource): the JSON status of the error
# challenge (Gmail's "400"/"401", RFC 7628's "invalid_token"), or the 535's enhanced code
# (Microsoft 5.7.3; Google 5.7.8, in its documentation 5.7.1). Not Microsoft's 5.7.139 / 5.7.30:
# those are tenant policy, and a fresh token changes nothing.
_TOKEN_STATUSES = frozenset({"400", "401", "invalid_token"})
_TOKEN_CODES = frozenset({"5.7.1", "5.7.3", "5.7.8"})
_ENHANCED_CODE = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})(?!\d)")


class AuthUnavailable(Exception):
    """The server offers no mechanism mailwatchd can use."""


class AuthRefused(Exception):
    """The server answered the exchange with something other than success.

    `challenge` is the decoded JSON of a bearer-token error challenge (`334 <base64 JSON>`), when
    the server sent one that decodes to a JSON object.
    """

    def __init__(self, reply: Reply, challenge: dict[str, object] | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.challenge = challenge


def offered_mechanisms(extensions: dict[str, str]) -> list[str]:
    """The mechanisms in the EHLO AUTH line (upper case), empty when AUTH is not offered."""
    return extensions.get("AUTH", "").upper().split()


def choose_mechanism(offered: list[str], *, encrypted: bool) -> str:
    for mechanism in _PREFERENCE[encrypted]:
        if mechanism in offered:
            return mechanism
    raise AuthUnavailable(f"no AUTH mechanism mailwatchd supports (offered: {' '.join(offered) or 'none'})")


async def authenticate(command: Command, offered: list[str], username: str, password: str, *,
                       encrypted: bool) -> tuple[str, Reply]:
    """Log in; returns the mechanism and the server's 235 reply, or raises AuthUnavailable / AuthRefused."""
    if not offered:
        raise AuthUnavailable("the server does not offer AUTH on this connection")
    mechanism = choose_mechanism(offered, encrypted=encrypted)
    reply = await _exchange(command, mechanism, username, password)
    if reply.code != 235:
        raise AuthRefused(reply)
    return mechanism, reply


async def _exchange(command: Command, mechanism: str, username: str, password: str) -> Reply:
    match mechanism:
        case "PLAIN":
            return await command(b"AUTH PLAIN " + auth_plain_encode(username, password))
        case "LOGIN":
            user, secret = auth_login_encode(username, password)
            for line in (b"AUTH LOGIN", user):
                reply = await command(line)
                if reply.code != 334:
                    return reply
            return await command(secret)
        case "CRAM-MD5":
            reply = await command(b"AUTH CRAM-MD5")
            if reply.code != 334:
                return reply
            try:
                base64.b64decode(reply.text.strip(), validate=True)
            except (binascii.Error, ValueError):
                await command(b"*")  # RFC 4954 §4: cancel the exchange
                return Reply(501, f"the server's CRAM-MD5 challenge is not base64: {reply.text[:40]!r}")
            return await command(auth_crammd5_verify(username, password, reply.text.strip()))
    raise AuthUnavailable(f"mechanism {mechanism} is not implemented")


# Bearer tokens (OAuth2).

def bearer_mechanism(method: AuthMethod) -> str:
    """The SASL mechanism name of a bearer-token method; ValueError for PASSWORD."""
    try:
        return BEARER_MECHANISMS[method]
    except KeyError:
        raise ValueError(f"{method.value} is not a bearer-token method") from None


def saslname(name: str) -> str:
    """`name` as a GS2 saslname (RFC 5801 §4): '=' → '=3D', ',' → '=2C'."""
    return name.replace("=", "=3D").replace(",", "=2C")


def bearer_initial_response(method: AuthMethod, username: str, token: str, *, host: str, port: int) -> bytes:
    """The base64 initial response of XOAUTH2 or OAUTHBEARER (RFC 7628 §3.1)."""
    mechanism = bearer_mechanism(method)
    # 0x01 separates the fields: a control character in either value would cut one or forge another.
    if not token:
        raise ValueError("the access token is empty")
    if any(not "\x21" <= char <= "\x7e" for char in token):  # RFC 6750 §2.1: b64token is printable ASCII
        raise ValueError("the access token contains a character other than printable ASCII")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in username):
        raise ValueError("the mailbox name contains a control character")
    if mechanism == "XOAUTH2":
        return auth_xoauth2_encode(username, token)
    authzid = f"a={saslname(username)}" if username else ""
    message = f"n,{authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(message.encode())


def bearer_secret_forms(method: AuthMethod, username: str, token: str, *, host: str,
                        port: int) -> tuple[str, ...]:
    """Every form in which the token goes over the wire: the token and the base64 initial response."""
    if not token:
        return ()
    try:
        response = bearer_initial_response(method, username, token, host=host, port=port).decode()
    except ValueError:
        return (token,)
    return token, response


async def authenticate_bearer(command: Command, offered: list[str], method: AuthMethod, username: str, token: str,
                              *, host: str, port: int) -> tuple[str, Reply]:
    """Log in with an OAuth2 access token; the mechanism and the server's 235 reply.

    `host` and `port` are the relay as connected to (OAUTHBEARER sends them). Raises
    AuthUnavailable when the server does not offer the mechanism, AuthRefused otherwise.
    """
    mechanism = bearer_mechanism(method)
    if not offered:
        raise AuthUnavailable("the server does not offer AUTH on this connection")
    if mechanism not in offered:
        raise AuthUnavailable(f"the server does not offer {mechanism} (offers: {' '.join(offered)})")
    response = bearer_initial_response(method, username, token, host=host, port=port)
    secrets = (token, response.decode())
    start = b"AUTH " + mechanism.encode()
    inline = len(start) + 1 + len(response) + 2 <= MAX_AUTH_LINE  # RFC 4954 §4: else no initial response
    reply = await command(start + b" " + response if inline else start)
    if reply.code == 334 and not reply.text.strip():  # the server wants the response after the command
        reply = await command(response)
    challenge: dict[str, object] | None = None
    if reply.code == 334:  # the error challenge: acknowledge it, the final reply follows
        challenge = _error_challenge(reply.text)
        reply = await command(_ERROR_ACK[mechanism])
        if reply.code == 334:  # a server that still wants more: cancel (RFC 4954 §4)
            reply = await command(b"*")
    if reply.code != 235:
        raise AuthRefused(_without(reply, secrets), challenge)
    return mechanism, _without(reply, secrets)


def _error_challenge(text: str) -> dict[str, object] | None:
    """The JSON object of an error challenge, or None for anything else (not base64, not JSON, not an object)."""
    data = text.strip()
    try:
        decoded = json.loads(base64.b64decode(data + "=" * (-len(data) % 4), validate=True).decode())
    except (binascii.Error, ValueError):  # also UnicodeDecodeError and json.JSONDecodeError
        return None
    return decoded if isinstance(decoded, dict) else None


def _without(reply: Reply, secrets: tuple[str, ...]) -> Reply:
    """`reply` with any echo of a secret replaced by ***."""
    text = reply.text
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return reply if text == reply.text else Reply(reply.code, text)


def token_rejected(exc: AuthRefused) -> bool:
    """True when the server says the token itself is bad: a fresh token may succeed where this one failed."""
    if exc.challenge is not None and str(exc.challenge.get("status", "")).strip().lower() in _TOKEN_STATUSES:
        return True
    if exc.reply.code != 535:
        return False
    enhanced = _ENHANCED_CODE.match(exc.reply.text)
    return enhanced is not None and enhanced.group(1) in _TOKEN_CODES
