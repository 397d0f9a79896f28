"""The host's mail domain: MAILWATCHD_DEFAULT_DOMAIN, else /etc/mailname, else a dotted FQDN.

The daemon completes bare local names with it (addressing.py), says it in EHLO, and the
submitter puts it in the Message-ID it adds.
"""

from __future__ import annotations

import os

from mailwatchd.errors import MalformedMessage
from mailwatchd.message.envelope import check_address

TYPE_CHECKING = False  # mypy takes it as true; `sendmail` imports neither typing nor pathlib
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    MAILNAME: Path

# Debian's mail name of the host (Postfix myorigin, nullmailer defaulthost); MAILNAME is it as a Path.
MAILNAME_PATH = "/etc/mailname"
_HOST_NAMES: dict[str | None, str] = {}  # host_name's answers, by setting

if not TYPE_CHECKING:  # hidden from mypy, which would otherwise take any misspelt attribute for a Path

    def __getattr__(name: str) -> Path:
        """PEP 562: MAILNAME, made on first use."""
        if name != "MAILNAME":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from pathlib import Path

        value = globals()[name] = Path(MAILNAME_PATH)
        return value


def read_mailname(path: str | os.PathLike[str] = MAILNAME_PATH) -> str | None:
    """The first line of /etc/mailname, or None when it is missing, unreadable or not a host name."""
    try:
        with open(path, "rb") as file:
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


def local_domain(setting: str | None, *, mailname: str | os.PathLike[str] = MAILNAME_PATH,
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


def host_name(setting: str | None) -> str:
    """The name this host gives of itself (EHLO): the mail domain, else its host name; looked up once."""
    if setting not in _HOST_NAMES:  # a dict, not functools.cache: `sendmail` does without functools
        _HOST_NAMES[setting] = local_domain(setting) or host_node_name()
    return _HOST_NAMES[setting]


def host_node_name() -> str:
    """The host name, as socket.gethostname() gives it on Linux (uname(2)), without that module."""
    return os.uname().nodename
