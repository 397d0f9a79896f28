"""Settings of the SMTP listener for local apps (MAILWATCHD_LISTEN and friends), validated so that
it can never be an open relay: a listener on an address other than loopback requires AUTH, over
TLS or from networks named in MAILWATCHD_LISTEN_ALLOW."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mailwatchd.errors import ConfigError
from mailwatchd.settings.credentials import Secret, read_secret_file
from mailwatchd.settings.parsing import parse_int, parse_port

DEFAULT_LISTEN = "127.0.0.1:2525"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ListenSettings:
    """Where the listener listens and who may submit through it."""

    addresses: tuple[tuple[str, int], ...] = (("127.0.0.1", 2525),)
    plain_auth_networks: tuple[Network, ...] = ()  # AUTH without TLS is allowed from these
    users: tuple[tuple[str, Secret], ...] = ()  # AUTH PLAIN/LOGIN logins
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_connections: int = 20
    max_recipients: int = 100

    @property
    def offers_auth(self) -> bool:
        return bool(self.users)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() in ("localhost", "localhost.localdomain")


def parse_addresses(key: str, raw: str) -> tuple[tuple[str, int], ...]:
    """'127.0.0.1:2525 [::1]:2525' → ((host, port), ...); empty: no listener."""
    addresses: list[tuple[str, int]] = []
    for item in raw.replace(",", " ").split():
        host, separator, port = item.rpartition(":")
        if not separator or not host:
            raise ConfigError(key, f"{item!r} is not HOST:PORT", "write e.g. 127.0.0.1:2525 or [::1]:2525")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IP address", "listen on an address, e.g. 127.0.0.1") from None
        addresses.append((host, parse_port(key, port)))
    return tuple(addresses)


def parse_networks(key: str, raw: str) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in raw.replace(",", " ").split())
    except ValueError as exc:
        raise ConfigError(key, str(exc), "list networks such as 172.17.0.0/16 10.0.0.0/8") from None


def read_users(key: str, raw: str, environ: Mapping[str, str]) -> tuple[tuple[str, Secret], ...]:
    """`user:password` lines from a file (a relative name is looked up in $CREDENTIALS_DIRECTORY)."""
    users: list[tuple[str, Secret]] = []
    for number, line in enumerate(read_secret_file(key, raw, environ).reveal().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, separator, password = line.partition(":")
        if not separator or not user.strip() or not password:
            raise ConfigError(key, f"line {number} of the users file is not user:password",
                              "write one user:password per line")
        users.append((user.strip(), Secret(password)))
    return tuple(users)


def load_listen(get: Callable[[str], str | None], env: Mapping[str, str]) -> ListenSettings:
    raw = env.get("MAILWATCHD_LISTEN")
    addresses = parse_addresses("MAILWATCHD_LISTEN", DEFAULT_LISTEN if raw is None else raw)
    allow = parse_networks("MAILWATCHD_LISTEN_ALLOW", get("MAILWATCHD_LISTEN_ALLOW") or "")
    users_file = get("MAILWATCHD_LISTEN_USERS_FILE")
    users = read_users("MAILWATCHD_LISTEN_USERS_FILE", users_file, env) if users_file else ()
    cert, key = get("MAILWATCHD_LISTEN_TLS_CERT"), get("MAILWATCHD_LISTEN_TLS_KEY")
    for name, value in (("MAILWATCHD_LISTEN_TLS_CERT", cert), ("MAILWATCHD_LISTEN_TLS_KEY", key)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(name, f"{value} does not exist or is not a file", "point it at a PEM file")
    if (cert is None) != (key is None):
        raise ConfigError("MAILWATCHD_LISTEN_TLS_KEY" if key is None else "MAILWATCHD_LISTEN_TLS_CERT",
                          "a TLS certificate needs its key, and a key its certificate",
                          "set both MAILWATCHD_LISTEN_TLS_CERT and MAILWATCHD_LISTEN_TLS_KEY")
    settings = ListenSettings(
        addresses=addresses, plain_auth_networks=allow, users=users,
        tls_cert=Path(cert) if cert else None, tls_key=Path(key) if key else None,
        max_connections=parse_int("MAILWATCHD_LISTEN_MAX_CONNECTIONS", get("MAILWATCHD_LISTEN_MAX_CONNECTIONS")
                                  or "20", minimum=1, maximum=10_000),
        max_recipients=parse_int("MAILWATCHD_LISTEN_MAX_RECIPIENTS", get("MAILWATCHD_LISTEN_MAX_RECIPIENTS")
                                 or "100", minimum=1, maximum=100_000))
    refuse_open_relay(settings)
    return settings


def refuse_open_relay(settings: ListenSettings) -> None:
    """A listener others can reach must make them log in, over TLS or from networks named for it."""
    exposed = [host for host, _ in settings.addresses if not is_loopback(host)]
    if not exposed:
        return
    if not settings.users:
        raise ConfigError("MAILWATCHD_LISTEN", f"{exposed[0]} is not a loopback address and nobody has to log in",
                          "set MAILWATCHD_LISTEN_USERS_FILE (AUTH is then required of every non-loopback "
                          "client), or listen on 127.0.0.1 / [::1] only")
    if settings.tls_cert is None and not settings.plain_auth_networks:
        raise ConfigError("MAILWATCHD_LISTEN", f"{exposed[0]} would take passwords without TLS",
                          "set MAILWATCHD_LISTEN_TLS_CERT and MAILWATCHD_LISTEN_TLS_KEY, or name the networks "
                          "allowed to log in without TLS in MAILWATCHD_LISTEN_ALLOW")
