"""The host's mail domain: MAILWATCHD_DEFAULT_DOMAIN, else /etc/mailname, else a dotted FQDN.

The daemon completes bare local names with it (addressing.py), says it in EHLO, and the
submitter puts it in the Message-ID it adds.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from mailwatchd.errors import MalformedMessage
from mailwatchd.message.envelope import check_address

MAILNAME = Path("/etc/mailname")  # Debian's mail name of the host (Postfix myorigin, nullmailer defaulthost)


def read_mailname(path: Path = MAILNAME) -> str | None:
    """The first line of /etc/mailname, or None when it is missing, unreadable or not a host name."""
    try:
        with path.open("rb") as file:
            line = file.readline(256)
    except OSError:
        return None
    try:
        name = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return name if _usable_domain(name) else None


def _usable_domain(name: str) -> bool:
    try:
        check_address(f"postmaster@{name}", "domain")
    except MalformedMessage:
        return False
    return True


def local_domain(setting: str | None, *, mailname: Path = MAILNAME,
                 fqdn: Callable[[], str] | None = None) -> str | None:
    """MAILWATCHD_DEFAULT_DOMAIN, else /etc/mailname, else the host's FQDN (`fqdn`, by default
    socket.getfqdn); a guessed name only with a dot in it and not localhost (no relay takes
    `root@myhost`); None when there is none."""
    if setting:
        return setting
    mailname_value = read_mailname(mailname)
    if mailname_value is not None and _mail_domain(mailname_value):
        return mailname_value
    if fqdn is None:
        import socket  # here: `sendmail` reads /etc/mailname only and never pays for the module

        fqdn = socket.getfqdn
    host = fqdn().strip().rstrip(".")  # only now: it may ask DNS
    return host if _mail_domain(host) else None


def _mail_domain(name: str) -> bool:
    lowered = name.lower()
    return "." in name and lowered != "localhost" and not lowered.startswith("localhost.") and _usable_domain(name)


@functools.cache
def host_name(setting: str | None) -> str:
    """The name this host gives of itself (EHLO): the mail domain, else its host name; looked up once."""
    return local_domain(setting) or host_node_name()


def host_node_name() -> str:
    """The host name, as socket.gethostname() gives it on Linux (uname(2)), without that module."""
    return os.uname().nodename
