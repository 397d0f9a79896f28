"""SMTP AUTH (RFC 4954): choose a mechanism the server offers and run its exchange.

This is the only AUTH code: delivery, the probe and `check --send-test` all log in through
`authenticate`. The encodings come from aiosmtplib. A new mechanism is one more entry in
`_PREFERENCE` and one more case in `_exchange`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable

from aiosmtplib.auth import auth_crammd5_verify, auth_login_encode, auth_plain_encode

from mailwatchd.transports.smtpwire import Reply

Command = Callable[[bytes], Awaitable[Reply]]

# Under TLS the password is protected anyway, and PLAIN works with every password store;
# CRAM-MD5 keeps the password off a plain-text connection (allowed to loopback relays only).
_PREFERENCE = {True: ("PLAIN", "LOGIN", "CRAM-MD5"), False: ("CRAM-MD5", "PLAIN", "LOGIN")}


class AuthUnavailable(Exception):
    """The server offers no mechanism mailwatchd can use."""


class AuthRefused(Exception):
    """The server answered the exchange with something other than success."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


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
