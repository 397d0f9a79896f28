"""Relays: their types (endpoints, TLS modes; secrets in credentials.py) and their definitions, the Django-style
EMAIL_* relay and the MAILWATCHD_RELAYS URLs (`smtp+tls://user@host:587?name=...&ports=465/ssl`),
with their credentials and limits."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from mailwatchd.errors import ConfigError
from mailwatchd.settings.apirelays import API_OPTIONS, ApiKind, api_config, api_host
from mailwatchd.settings.apirelays import ApiConfig as ApiConfig  # re-exported: relays carry it
from mailwatchd.settings.credentials import Secret as Secret  # re-exported: relays carry it
from mailwatchd.settings.credentials import read_secret_file
from mailwatchd.settings.oauth import OAUTH_OPTIONS, parse_oauth
from mailwatchd.settings.oauth import AuthMethod as AuthMethod  # re-exported: relays carry them
from mailwatchd.settings.oauth import OAuthConfig as OAuthConfig
from mailwatchd.settings.oauth import TokenGrant as TokenGrant
from mailwatchd.settings.parsing import parse_bool, parse_int, parse_port


class TlsMode(StrEnum):
    """How a connection is secured. STARTTLS is required, never opportunistic-then-plain."""

    STARTTLS = "starttls"
    IMPLICIT = "ssl"
    NONE = "none"
    HTTPS = "https"  # an HTTPS API relay (apirelays.py): TLS, always verified


@dataclass(frozen=True)
class Endpoint:
    """One place to connect to: host, port and how to secure it."""

    host: str
    port: int
    tls: TlsMode

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.tls.value}"


@dataclass(frozen=True)
class RelayConfig:
    """One relay (a provider account): endpoints tried in order, credentials, limits."""

    name: str
    endpoints: tuple[Endpoint, ...]
    username: str | None = None
    password: Secret | None = None
    verify: bool = True
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    max_per_minute: int | None = None
    max_per_day: int | None = None
    auth: AuthMethod = AuthMethod.PASSWORD
    oauth: OAuthConfig | None = None  # set exactly when auth is XOAUTH2 or OAUTHBEARER; username is the mailbox
    api: ApiConfig | None = None  # an HTTPS API relay (Mailgun, SES, SendGrid, Postmark): one HTTPS endpoint

    @property
    def uses_oauth(self) -> bool:
        return self.oauth is not None

    @property
    def primary(self) -> Endpoint:
        return self.endpoints[0]


DEFAULT_PORTS = {TlsMode.STARTTLS: 587, TlsMode.IMPLICIT: 465, TlsMode.NONE: 25}
_SCHEMES = {
    "smtp": TlsMode.NONE,
    "smtp+tls": TlsMode.STARTTLS,
    "submission": TlsMode.STARTTLS,
    "smtp+ssl": TlsMode.IMPLICIT,
    "smtps": TlsMode.IMPLICIT,
}


def load_relays(get: Callable[[str], str | None], env: Mapping[str, str]) -> tuple[RelayConfig, ...]:
    """The EMAIL_* relay (if EMAIL_HOST is set), then MAILWATCHD_RELAYS in order."""
    relays = list(_email_relay(get, env))
    for relay in relays:
        _refuse_plaintext_credentials(relay, "EMAIL_USE_TLS", "MAILWATCHD_FALLBACK_PORTS")
    if (raw := get("MAILWATCHD_RELAYS")) is not None:
        names = {relay.name for relay in relays}
        offset = len(relays)
        for index, url in enumerate(raw.split()):
            relay = parse_relay_url("MAILWATCHD_RELAYS", url, env, index=index + offset)
            if relay.name in names:
                raise ConfigError("MAILWATCHD_RELAYS", f"two relays are named {relay.name!r}",
                                  "give each relay a distinct ?name=")
            _refuse_plaintext_credentials(relay, "MAILWATCHD_RELAYS", "MAILWATCHD_RELAYS")
            names.add(relay.name)
            relays.append(relay)
    return tuple(relays)


def parse_ports(key: str, raw: str, host: str) -> tuple[Endpoint, ...]:
    """'465/ssl,2525/tls' → endpoints; a bare port takes 465 → ssl, anything else → STARTTLS."""
    endpoints = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        port_text, _, mode_text = item.partition("/")
        port = parse_port(key, port_text)
        if mode_text:
            mode = {"tls": TlsMode.STARTTLS, "starttls": TlsMode.STARTTLS, "ssl": TlsMode.IMPLICIT,
                    "none": TlsMode.NONE}.get(mode_text.lower())
            if mode is None:
                raise ConfigError(key, f"{item!r} has an unknown TLS mode", "write PORT/tls, PORT/ssl or PORT/none")
        else:
            mode = TlsMode.IMPLICIT if port == 465 else TlsMode.STARTTLS
        endpoints.append(Endpoint(host, port, mode))
    return tuple(endpoints)


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name such as 127.example.com is not loopback


def _refuse_plaintext_credentials(relay: RelayConfig, key: str, fallback_key: str) -> None:
    """A password or a bearer token is never sent over an unencrypted connection to another machine."""
    if relay.password is None and relay.oauth is None:
        return
    for index, endpoint in enumerate(relay.endpoints):
        if endpoint.tls is TlsMode.NONE and not _is_loopback(endpoint.host):
            raise ConfigError(key if index == 0 else fallback_key,
                              f"credentials for {endpoint} would be sent without TLS",
                              "use EMAIL_USE_TLS=true (587) or EMAIL_USE_SSL=true (465), or smtp+tls:// / smtp+ssl://")


def _email_relay(get: Callable[[str], str | None], env: Mapping[str, str]) -> list[RelayConfig]:
    """The Django-style single relay from EMAIL_*; none when EMAIL_HOST is unset."""
    host = get("EMAIL_HOST")
    if host is None:
        for key in ("EMAIL_HOST_USER", "EMAIL_HOST_PASSWORD", "EMAIL_HOST_PASSWORD_FILE", *OAUTH_OPTIONS.values()):
            if get(key) is not None:
                raise ConfigError(key, "is set but EMAIL_HOST is not",
                                  "set EMAIL_HOST to your relay, or remove the credentials")
        return []
    use_tls = parse_bool("EMAIL_USE_TLS", get("EMAIL_USE_TLS") or "false")
    use_ssl = parse_bool("EMAIL_USE_SSL", get("EMAIL_USE_SSL") or "false")
    if use_tls and use_ssl:
        raise ConfigError("EMAIL_USE_SSL", "EMAIL_USE_TLS and EMAIL_USE_SSL are both true",
                          "use EMAIL_USE_TLS=true for port 587 (STARTTLS) or EMAIL_USE_SSL=true for 465, not both")
    mode = TlsMode.IMPLICIT if use_ssl else TlsMode.STARTTLS if use_tls else TlsMode.NONE
    port_raw = get("EMAIL_PORT")
    port = parse_port("EMAIL_PORT", port_raw) if port_raw else DEFAULT_PORTS[mode]
    endpoints: tuple[Endpoint, ...] = (Endpoint(host, port, mode),)
    if (raw := get("MAILWATCHD_FALLBACK_PORTS")) is not None:
        endpoints += parse_ports("MAILWATCHD_FALLBACK_PORTS", raw, host)
    username = get("EMAIL_HOST_USER")
    password = _password("EMAIL_HOST_PASSWORD", get("EMAIL_HOST_PASSWORD"),
                         "EMAIL_HOST_PASSWORD_FILE", get("EMAIL_HOST_PASSWORD_FILE"), env)
    if password is not None and username is None:
        raise ConfigError("EMAIL_HOST_USER", "a password is set but no user",
                          "set EMAIL_HOST_USER to the account name")
    cafile, certfile, keyfile = _tls_files("EMAIL_SSL_CAFILE", get("EMAIL_SSL_CAFILE"),
                           "EMAIL_SSL_CERTFILE", get("EMAIL_SSL_CERTFILE"),
                           "EMAIL_SSL_KEYFILE", get("EMAIL_SSL_KEYFILE"))
    verify = parse_bool("EMAIL_SSL_VERIFY", get("EMAIL_SSL_VERIFY") or "true")
    per_minute, per_day = _limits("MAILWATCHD_MAX_PER_MINUTE", get("MAILWATCHD_MAX_PER_MINUTE"),
                     "MAILWATCHD_MAX_PER_DAY", get("MAILWATCHD_MAX_PER_DAY"))
    oauth_options = {option: value for option, email_key in OAUTH_OPTIONS.items()
                     if (value := get(email_key)) is not None}
    auth, oauth = parse_oauth(oauth_options, key=OAUTH_OPTIONS.__getitem__, host=host, username=username, env=env)
    _refuse_password_with_oauth(oauth, password, "EMAIL_HOST_PASSWORD_FILE")
    return [RelayConfig(name=host, endpoints=endpoints, username=username, password=password, verify=verify,
                        cafile=cafile, certfile=certfile, keyfile=keyfile,
                        max_per_minute=per_minute, max_per_day=per_day, auth=auth, oauth=oauth)]


def _refuse_password_with_oauth(oauth: OAuthConfig | None, password: Secret | None, key: str) -> None:
    if oauth is not None and password is not None:
        raise ConfigError(key, "a password is set for a relay that logs in with an OAuth2 token",
                          "remove the password (the token source replaces it), or log in with auth=password")


def _password(key: str, inline: str | None, file_key: str, file_raw: str | None,
              env: Mapping[str, str]) -> Secret | None:
    if inline is not None and file_raw is not None:
        raise ConfigError(file_key, f"both {key} and {file_key} are set", f"keep only {file_key}")
    if file_raw is not None:
        return read_secret_file(file_key, file_raw, env)
    return Secret(inline) if inline is not None else None


def _tls_files(ca_key: str, ca: str | None, cert_key: str, cert: str | None,
               key_key: str, key: str | None) -> tuple[Path | None, Path | None, Path | None]:
    files: dict[str, Path | None] = {}
    for setting, raw, attr in ((ca_key, ca, "cafile"), (cert_key, cert, "certfile"), (key_key, key, "keyfile")):
        if raw is not None and not Path(raw).is_file():
            raise ConfigError(setting, f"{raw} does not exist or is not a file", "point it at a PEM file")
        files[attr] = Path(raw) if raw is not None else None
    if files["keyfile"] is not None and files["certfile"] is None:
        raise ConfigError(key_key, "a client key is set without a client certificate",
                          f"set {cert_key} too, or remove {key_key}")
    return files["cafile"], files["certfile"], files["keyfile"]


def _limits(minute_key: str, minute: str | None, day_key: str, day: str | None) -> tuple[int | None, int | None]:
    return (parse_int(minute_key, minute, minimum=1, maximum=10**9) if minute else None,
            parse_int(day_key, day, minimum=1, maximum=10**9) if day else None)


def parse_relay_url(key: str, url: str, env: Mapping[str, str], *, index: int = 0) -> RelayConfig:
    """A relay from `smtp+tls://user@host:587?name=gmail&ports=465/ssl,2525&password_file=...`.

    Schemes: smtp (no TLS), smtp+tls / submission (STARTTLS, required), smtp+ssl / smtps
    (implicit TLS). Query keys: name, ports, password_file (relative names are looked up in
    $CREDENTIALS_DIRECTORY), cafile, certfile, keyfile, verify, max_per_minute, max_per_day, and
    the OAuth2 keys of settings/oauth.py (auth=xoauth2, tenant, client_id, client_secret_file, ...).
    """
    shown = re.sub(r"//([^:@/?#]*):.*@", r"//\1:***@", url)  # to the last @: a password may hold one
    parts = urlsplit(url)
    if parts.scheme.lower() in ApiKind.__members__.values():
        return _api_relay(key, url, shown, env, index=index)
    mode = _SCHEMES.get(parts.scheme.lower())
    if mode is None:
        raise ConfigError(key, f"{shown!r} has an unknown scheme",
                          "start each relay with smtp+tls://, smtp+ssl:// or smtp://, or an HTTPS API's "
                          "mailgun://, ses://, sendgrid:// or postmark://")
    host = parts.hostname
    if not host:
        raise ConfigError(key, f"{shown!r} has no host", "write smtp+tls://user@host:587")
    try:
        port = parts.port or DEFAULT_PORTS[mode]
    except ValueError:
        raise ConfigError(key, f"{shown!r} has a bad port", "use a port from 1 to 65535") from None
    query = {name: values[-1] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
    allowed = {"name", "ports", "password_file", "cafile", "certfile", "keyfile", "verify",
               "max_per_minute", "max_per_day", *OAUTH_OPTIONS}
    for name in query:
        if name not in allowed:
            raise ConfigError(key, f"{shown!r} has an unknown option {name!r}",
                              f"use only {', '.join(sorted(allowed))}")
    endpoints: tuple[Endpoint, ...] = (Endpoint(host, port, mode),)
    if query.get("ports"):
        endpoints += parse_ports(key, query["ports"], host)
    username = unquote(parts.username) if parts.username else None
    inline = unquote(parts.password) if parts.password is not None else None
    password = _password(key, inline, key, query.get("password_file"), env)
    if password is not None and username is None:
        raise ConfigError(key, f"{shown!r} has a password but no user", "write smtp+tls://user@host")
    cafile, certfile, keyfile = _tls_files(key, query.get("cafile"), key, query.get("certfile"),
                                           key, query.get("keyfile"))
    verify = parse_bool(key, query.get("verify", "true"))
    per_minute, per_day = _limits(key, query.get("max_per_minute"), key, query.get("max_per_day"))
    name = query.get("name") or (host if index == 0 else f"{host}#{index}")
    auth, oauth = parse_oauth({option: query[option] for option in OAUTH_OPTIONS if option in query},
                              key=lambda _option: key, host=host, username=username, env=env)
    _refuse_password_with_oauth(oauth, password, key)
    return RelayConfig(name=name, endpoints=endpoints, username=username, password=password, verify=verify,
                       cafile=cafile, certfile=certfile, keyfile=keyfile,
                       max_per_minute=per_minute, max_per_day=per_day, auth=auth, oauth=oauth)


def _api_relay(key: str, url: str, shown: str, env: Mapping[str, str], *, index: int) -> RelayConfig:
    """An HTTPS API relay from `mailgun://`, `ses://`, `sendgrid://` or `postmark://` (settings/apirelays.py)."""
    parts = urlsplit(url)
    kind = ApiKind(parts.scheme.lower())
    query = {name: values[-1] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
    for name in query:
        if name not in API_OPTIONS:
            raise ConfigError(key, f"{shown!r} has an unknown option {name!r}",
                              f"use only {', '.join(sorted(API_OPTIONS))}")
    try:
        port = parts.port or 443
    except ValueError:
        raise ConfigError(key, f"{shown!r} has a bad port", "use a port from 1 to 65535") from None
    region = query.get("region") or None
    host = api_host(key, kind, parts.hostname, region, shown)
    inline = unquote(parts.password) if parts.password is not None else None
    secret = _password(key, inline, key, query.get("password_file"), env)
    config = api_config(key, kind, host=host, port=port, secret=secret,
                        key_id=unquote(parts.username) if parts.username else None, region=region,
                        domain=query.get("domain") or None, message_stream=query.get("message_stream") or None,
                        shown=shown)
    cafile, _, _ = _tls_files(key, query.get("cafile"), key, None, key, None)
    per_minute, per_day = _limits(key, query.get("max_per_minute"), key, query.get("max_per_day"))
    name = query.get("name") or (kind.value if index == 0 else f"{kind.value}#{index}")
    return RelayConfig(name=name, endpoints=(Endpoint(host, port, TlsMode.HTTPS),), cafile=cafile,
                       max_per_minute=per_minute, max_per_day=per_day, api=config)
