"""Settings: an explicit env file plus the process environment, validated once.

Keys follow Django's EMAIL_* names so an existing `.env` keeps working; mailwatchd's own
keys start with MAILWATCHD_. Every problem raises ConfigError naming the key and the fix.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

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

    from mailwatchd.relays import load_relays  # relays.py builds on this module's types

    relays = load_relays(get, env)
    return Settings(spool=spool, outbox=outbox, relays=relays, config_path=path,
                    **durations, **extra)  # type: ignore[arg-type]
