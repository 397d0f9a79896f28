"""Settings: an explicit env file plus the process environment, validated once.

Keys follow Django's EMAIL_* names so an existing `.env` keeps working; mailwatchd's own
keys start with MAILWATCHD_. Every problem raises ConfigError naming the key and the fix.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from dotenv import dotenv_values

from mailwatchd.errors import ConfigError

SERVICE_SPOOL = Path("/var/spool/mailwatchd")


class TlsMode(StrEnum):
    """How a connection is secured. STARTTLS is required, never opportunistic-then-plain."""

    STARTTLS = "starttls"
    IMPLICIT = "ssl"
    NONE = "none"


class Secret:
    """A credential that never shows in repr, str, logs or exception texts."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


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

    @property
    def primary(self) -> Endpoint:
        return self.endpoints[0]


@dataclass(frozen=True)
class Settings:
    """Validated settings. `relays` empty means the embedded outbox delivery."""

    spool: Path
    outbox: Path
    relays: tuple[RelayConfig, ...] = ()
    helo_name: str = field(default_factory=socket.getfqdn)
    default_domain: str | None = None
    connect_timeout: float = 5.0
    command_timeout: float = 30.0
    transaction_timeout: float = 120.0
    concurrency: int = 2
    idle_timeout: float = 10.0
    retry_min: float = 60.0
    retry_max: float = 3600.0
    max_lifetime: float = 5 * 86400.0
    max_message_size: int = 25 * 1024 * 1024
    rescan_interval: float = 60.0
    probe_interval: float = 300.0
    probe_interval_down: float = 30.0
    shutdown_grace: float = 20.0
    log_format: str = "auto"
    log_level: str = "info"
    config_path: Path | None = None

    @property
    def uses_outbox(self) -> bool:
        return not self.relays


# Keys this program reads; an unknown MAILWATCHD_* key in the env file is a typo worth
# stopping for, while other keys (Django's SECRET_KEY, EMAIL_BACKEND...) are ignored.
MAILWATCHD_KEYS = frozenset(
    {
        "MAILWATCHD_CONFIG",
        "MAILWATCHD_SPOOL",
        "MAILWATCHD_OUTBOX",
        "MAILWATCHD_RELAYS",
        "MAILWATCHD_FALLBACK_PORTS",
        "MAILWATCHD_MAX_PER_MINUTE",
        "MAILWATCHD_MAX_PER_DAY",
        "MAILWATCHD_HELO_NAME",
        "MAILWATCHD_DEFAULT_DOMAIN",
        "MAILWATCHD_CONNECT_TIMEOUT",
        "MAILWATCHD_TRANSACTION_TIMEOUT",
        "MAILWATCHD_CONCURRENCY",
        "MAILWATCHD_IDLE_TIMEOUT",
        "MAILWATCHD_RETRY_MIN",
        "MAILWATCHD_RETRY_MAX",
        "MAILWATCHD_MAX_LIFETIME",
        "MAILWATCHD_MAX_MESSAGE_SIZE",
        "MAILWATCHD_RESCAN_INTERVAL",
        "MAILWATCHD_PROBE_INTERVAL",
        "MAILWATCHD_PROBE_INTERVAL_DOWN",
        "MAILWATCHD_SHUTDOWN_GRACE",
        "MAILWATCHD_LOG_FORMAT",
        "MAILWATCHD_LOG_LEVEL",
    }
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]i?[bB]?)?\s*$")
_SIZE_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}
DEFAULT_PORTS = {TlsMode.STARTTLS: 587, TlsMode.IMPLICIT: 465, TlsMode.NONE: 25}
_SCHEMES = {
    "smtp": TlsMode.NONE,
    "smtp+tls": TlsMode.STARTTLS,
    "submission": TlsMode.STARTTLS,
    "smtp+ssl": TlsMode.IMPLICIT,
    "smtps": TlsMode.IMPLICIT,
}


def parse_bool(key: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(key, f"{raw!r} is not a boolean", "use true or false")


def parse_duration(key: str, raw: str, *, minimum: float = 0.0) -> float:
    """Seconds from '30', '30s', '500ms', '5m', '2h' or '5d'."""
    match = _DURATION.match(raw)
    if not match:
        raise ConfigError(key, f"{raw!r} is not a duration", "use seconds, or a number with ms, s, m, h or d")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds < minimum:
        raise ConfigError(key, f"{raw!r} is too small", f"use at least {minimum:g} seconds")
    return seconds


def parse_size(key: str, raw: str) -> int:
    """Bytes from '1048576', '512K', '25M' or '1G' (binary units)."""
    match = _SIZE.match(raw)
    if not match:
        raise ConfigError(key, f"{raw!r} is not a size", "use bytes, or a number with K, M or G")
    unit = (match.group(2) or "")[:1].lower()
    size = int(match.group(1)) * _SIZE_UNITS.get(unit, 1)
    if size < 1024:
        raise ConfigError(key, f"{raw!r} is too small", "use at least 1K")
    return size


def parse_int(key: str, raw: str, *, minimum: int, maximum: int) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(key, f"{raw!r} is not a whole number", f"use a number from {minimum} to {maximum}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(key, f"{value} is out of range", f"use a number from {minimum} to {maximum}")
    return value


def parse_port(key: str, raw: str) -> int:
    return parse_int(key, raw, minimum=1, maximum=65535)


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


def read_secret_file(key: str, raw: str, environ: Mapping[str, str]) -> Secret:
    """Read a password file; a relative name is looked up in systemd's $CREDENTIALS_DIRECTORY."""
    path = Path(raw)
    if not path.is_absolute():
        cred_dir = environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            raise ConfigError(key, f"{raw!r} is relative and $CREDENTIALS_DIRECTORY is not set",
                              "give an absolute path, or load the credential with LoadCredential=")
        path = Path(cred_dir) / path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}",
                          "check the path and that the daemon's user may read it") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise ConfigError(key, f"{path} is empty", "put the password in the file")
    return Secret(secret)


def default_spool(environ: Mapping[str, str]) -> Path:
    """/var/spool/mailwatchd for root, and for users who may drop mail into it (members of
    mailwatchd-submit); a per-user state directory otherwise."""
    if os.geteuid() == 0 or os.access(SERVICE_SPOOL / "new", os.W_OK | os.X_OK):
        return SERVICE_SPOOL
    state_home = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "mailwatchd" / "spool"


def load_environment(config_path: Path | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The env file's keys (if a path is given), overridden by the process environment."""
    merged: dict[str, str] = {}
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError("MAILWATCHD_CONFIG", f"config file {config_path} does not exist",
                              "create it or point --config at the right file")
        try:
            values = dotenv_values(config_path, interpolate=False)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("MAILWATCHD_CONFIG", f"cannot read {config_path}: {exc}",
                              "make the file readable UTF-8 text") from None
        for key, value in values.items():
            if key.startswith("MAILWATCHD_") and key not in MAILWATCHD_KEYS:
                raise ConfigError(key, f"unknown setting in {config_path}",
                                  "check the spelling against the README's list of settings")
            merged[key] = value or ""
    for key, value in environ.items():
        if key.startswith(("EMAIL_", "MAILWATCHD_")) or key == "CREDENTIALS_DIRECTORY":
            merged[key] = value
    return merged


def load_settings(config_path: Path | str | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Load and validate settings; raise ConfigError on the first problem found."""
    env_source = os.environ if environ is None else environ
    if config_path is None and env_source.get("MAILWATCHD_CONFIG"):
        config_path = env_source["MAILWATCHD_CONFIG"]
    path = Path(config_path) if config_path is not None else None
    env = load_environment(path, env_source)

    def get(key: str) -> str | None:
        value = env.get(key)
        return value if value not in (None, "") else None

    spool = Path(get("MAILWATCHD_SPOOL") or default_spool(env_source))
    if not spool.is_absolute():
        raise ConfigError("MAILWATCHD_SPOOL", f"{spool} is a relative path", "use an absolute path")
    outbox = Path(get("MAILWATCHD_OUTBOX") or spool / "outbox")

    durations: dict[str, float] = {}
    for key, attr, minimum in (
        ("MAILWATCHD_CONNECT_TIMEOUT", "connect_timeout", 0.1),
        ("EMAIL_TIMEOUT", "command_timeout", 0.1),
        ("MAILWATCHD_TRANSACTION_TIMEOUT", "transaction_timeout", 0.1),
        ("MAILWATCHD_IDLE_TIMEOUT", "idle_timeout", 0.0),
        ("MAILWATCHD_RETRY_MIN", "retry_min", 0.01),
        ("MAILWATCHD_RETRY_MAX", "retry_max", 0.01),
        ("MAILWATCHD_MAX_LIFETIME", "max_lifetime", 1.0),
        ("MAILWATCHD_RESCAN_INTERVAL", "rescan_interval", 0.1),
        ("MAILWATCHD_PROBE_INTERVAL", "probe_interval", 0.1),
        ("MAILWATCHD_PROBE_INTERVAL_DOWN", "probe_interval_down", 0.1),
        ("MAILWATCHD_SHUTDOWN_GRACE", "shutdown_grace", 0.0),
    ):
        raw = get(key)
        if raw is not None:
            durations[attr] = parse_duration(key, raw, minimum=minimum)
    defaults = Settings(spool=spool, outbox=outbox)
    command_timeout = durations.get("command_timeout", defaults.command_timeout)
    transaction_timeout = durations.get("transaction_timeout", defaults.transaction_timeout)
    if transaction_timeout < command_timeout:
        raise ConfigError("MAILWATCHD_TRANSACTION_TIMEOUT",
                          f"{transaction_timeout:g}s is shorter than EMAIL_TIMEOUT ({command_timeout:g}s)",
                          "make the whole-transaction deadline at least one command timeout")
    retry_min = durations.get("retry_min", defaults.retry_min)
    retry_max = durations.get("retry_max", defaults.retry_max)
    if retry_max < retry_min:
        raise ConfigError("MAILWATCHD_RETRY_MAX", f"{retry_max:g}s is below MAILWATCHD_RETRY_MIN ({retry_min:g}s)",
                          "make the longest retry delay at least the shortest")

    extra: dict[str, object] = {}
    if (raw := get("MAILWATCHD_CONCURRENCY")) is not None:
        extra["concurrency"] = parse_int("MAILWATCHD_CONCURRENCY", raw, minimum=1, maximum=64)
    if (raw := get("MAILWATCHD_MAX_MESSAGE_SIZE")) is not None:
        extra["max_message_size"] = parse_size("MAILWATCHD_MAX_MESSAGE_SIZE", raw)
    if (raw := get("MAILWATCHD_HELO_NAME")) is not None:
        extra["helo_name"] = raw.strip()
    if (raw := get("MAILWATCHD_DEFAULT_DOMAIN")) is not None:
        if "@" in raw or not raw.strip() or any(ch.isspace() for ch in raw.strip()):
            raise ConfigError("MAILWATCHD_DEFAULT_DOMAIN", f"{raw!r} is not a domain",
                              "use a bare domain such as example.com")
        extra["default_domain"] = raw.strip()
    if (raw := get("MAILWATCHD_LOG_FORMAT")) is not None:
        if raw not in ("auto", "console", "json", "journal"):
            raise ConfigError("MAILWATCHD_LOG_FORMAT", f"{raw!r} is not a log format",
                              "use auto, console, json or journal")
        extra["log_format"] = raw
    if (raw := get("MAILWATCHD_LOG_LEVEL")) is not None:
        if raw.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("MAILWATCHD_LOG_LEVEL", f"{raw!r} is not a log level",
                              "use debug, info, warning or error")
        extra["log_level"] = raw.lower()

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

    return Settings(spool=spool, outbox=outbox, relays=tuple(relays), config_path=path,
                    **durations, **extra)  # type: ignore[arg-type]


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name such as 127.example.com is not loopback


def _refuse_plaintext_credentials(relay: RelayConfig, key: str, fallback_key: str) -> None:
    """A password is never sent over an unencrypted connection to another machine."""
    if relay.password is None:
        return
    for index, endpoint in enumerate(relay.endpoints):
        if endpoint.tls is TlsMode.NONE and not _is_loopback(endpoint.host):
            raise ConfigError(key if index == 0 else fallback_key,
                              f"credentials for {endpoint} would be sent without TLS",
                              "use EMAIL_USE_TLS=true (587) or EMAIL_USE_SSL=true (465), or smtp+tls:// / smtp+ssl://")


def _email_relay(get: object, env: Mapping[str, str]) -> list[RelayConfig]:
    """The Django-style single relay from EMAIL_*; none when EMAIL_HOST is unset."""
    assert callable(get)
    host = get("EMAIL_HOST")
    if host is None:
        for key in ("EMAIL_HOST_USER", "EMAIL_HOST_PASSWORD", "EMAIL_HOST_PASSWORD_FILE"):
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
    return [RelayConfig(name=host, endpoints=endpoints, username=username, password=password, verify=verify,
                        cafile=cafile, certfile=certfile, keyfile=keyfile,
                        max_per_minute=per_minute, max_per_day=per_day)]


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
    $CREDENTIALS_DIRECTORY), cafile, certfile, keyfile, verify, max_per_minute, max_per_day.
    """
    shown = re.sub(r"//([^:@/?#]*):.*@", r"//\1:***@", url)  # to the last @: a password may hold one
    parts = urlsplit(url)
    mode = _SCHEMES.get(parts.scheme.lower())
    if mode is None:
        raise ConfigError(key, f"{shown!r} has an unknown scheme",
                          "start each relay with smtp+tls://, smtp+ssl:// or smtp://")
    host = parts.hostname
    if not host:
        raise ConfigError(key, f"{shown!r} has no host", "write smtp+tls://user@host:587")
    try:
        port = parts.port or DEFAULT_PORTS[mode]
    except ValueError:
        raise ConfigError(key, f"{shown!r} has a bad port", "use a port from 1 to 65535") from None
    query = {name: values[-1] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
    allowed = {"name", "ports", "password_file", "cafile", "certfile", "keyfile", "verify",
               "max_per_minute", "max_per_day"}
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
    return RelayConfig(name=name, endpoints=endpoints, username=username, password=password, verify=verify,
                       cafile=cafile, certfile=certfile, keyfile=keyfile,
                       max_per_minute=per_minute, max_per_day=per_day)
