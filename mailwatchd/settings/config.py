"""Settings: an explicit env file plus the process environment (environment.py), validated once.

Keys follow Django's EMAIL_* names so an existing `.env` keeps working; mailwatchd's own
keys start with MAILWATCHD_. Every problem raises ConfigError naming the key and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mailwatchd.errors import ConfigError
from mailwatchd.message.maildomain import host_name
from mailwatchd.settings.environment import (
    DEFAULT_MAX_MESSAGE_SIZE,
    default_domain_setting,
    read_source,
    spool_setting,
    status_file_setting,
)
from mailwatchd.settings.listen import ListenSettings, is_loopback, load_listen, parse_addresses
from mailwatchd.settings.parsing import parse_duration, parse_int, parse_size
from mailwatchd.settings.relays import RelayConfig, load_relays


@dataclass(frozen=True)
class Settings:
    """Validated settings. `relays` empty means the embedded outbox delivery."""

    spool: Path
    outbox: Path
    relays: tuple[RelayConfig, ...] = ()
    helo_name: str = ""  # MAILWATCHD_HELO_NAME; empty: the host's FQDN (see ehlo_name)
    default_domain: str | None = None
    connect_timeout: float = 5.0
    command_timeout: float = 30.0
    transaction_timeout: float = 120.0
    concurrency: int = 2
    idle_timeout: float = 10.0
    retry_min: float = 60.0
    retry_max: float = 3600.0
    max_lifetime: float = 5 * 86400.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    rescan_interval: float = 60.0
    probe_interval: float = 300.0
    probe_interval_down: float = 30.0
    shutdown_grace: float = 20.0
    log_format: str = "auto"
    log_level: str = "info"
    config_path: Path | None = None
    listen: ListenSettings = field(default_factory=ListenSettings)
    admin_address: str | None = None  # where mail to local users (root, postmaster, bare names) goes
    aliases: Path | None = None  # an aliases(5) file mapping local names to addresses
    status_file: Path | None = None  # None: SPOOL/status.json (load_settings always sets it)
    queue_age_warning: float = 3600.0  # oldest queued message older than this: WARNING
    queue_age_critical: float = 4 * 3600.0  # ... CRITICAL
    spool_min_free: int | None = None  # below this many free bytes the spool takes no new work; None: 2 x max size
    metrics_file: Path | None = None  # node_exporter textfile collector file
    metrics_listen: tuple[str, int] | None = None  # loopback HTTP endpoint for /metrics
    notice_address: str | None = None  # failure-notice digests go here (default: admin_address)
    notice_interval: float = 900.0  # at most one digest per interval
    notice_max_per_day: int = 24

    @property
    def status_path(self) -> Path:
        return self.status_file or self.spool / "status.json"

    @property
    def min_free_bytes(self) -> int:
        return self.spool_min_free if self.spool_min_free is not None else 2 * self.max_message_size

    @property
    def uses_outbox(self) -> bool:
        return not self.relays

    @property
    def ehlo_name(self) -> str:
        """The name this host gives in EHLO: MAILWATCHD_HELO_NAME, else the mail domain (maildomain.py)."""
        return self.helo_name or host_name(self.default_domain)


def load_settings(config_path: Path | str | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Load and validate settings; raise ConfigError on the first problem found."""
    env_source = os.environ if environ is None else environ
    source = read_source(config_path, env_source)
    path, env, get = source.config_path, source.env, source.get
    spool = spool_setting(source, env_source)
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
        ("MAILWATCHD_QUEUE_AGE_WARNING", "queue_age_warning", 1.0),
        ("MAILWATCHD_QUEUE_AGE_CRITICAL", "queue_age_critical", 1.0),
        ("MAILWATCHD_NOTICE_INTERVAL", "notice_interval", 1.0),
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

    if durations.get("queue_age_critical", defaults.queue_age_critical) < \
            durations.get("queue_age_warning", defaults.queue_age_warning):
        raise ConfigError("MAILWATCHD_QUEUE_AGE_CRITICAL", "is below MAILWATCHD_QUEUE_AGE_WARNING",
                          "make the critical age at least the warning age")

    extra: dict[str, object] = {"status_file": status_file_setting(source, spool)}
    if (raw := get("MAILWATCHD_CONCURRENCY")) is not None:
        extra["concurrency"] = parse_int("MAILWATCHD_CONCURRENCY", raw, minimum=1, maximum=64)
    if (raw := get("MAILWATCHD_MAX_MESSAGE_SIZE")) is not None:
        extra["max_message_size"] = parse_size("MAILWATCHD_MAX_MESSAGE_SIZE", raw)
    if (raw := get("MAILWATCHD_HELO_NAME")) is not None:
        extra["helo_name"] = raw.strip()
    if (raw := get("MAILWATCHD_DEFAULT_DOMAIN")) is not None:
        extra["default_domain"] = default_domain_setting(raw)
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

    if (raw := get("MAILWATCHD_ADMIN_ADDRESS")) is not None:
        extra["admin_address"] = address_setting("MAILWATCHD_ADMIN_ADDRESS", raw)
    if (raw := get("MAILWATCHD_ALIASES")) is not None:
        if not Path(raw).is_file():
            raise ConfigError("MAILWATCHD_ALIASES", f"{raw} does not exist or is not a file",
                              "point it at an aliases(5) file such as /etc/aliases, or remove the setting")
        extra["aliases"] = Path(raw)
    if (raw := get("MAILWATCHD_SPOOL_MIN_FREE")) is not None:
        extra["spool_min_free"] = parse_size("MAILWATCHD_SPOOL_MIN_FREE", raw)
    if (raw := get("MAILWATCHD_METRICS_FILE")) is not None:
        metrics_file = Path(raw)
        if not metrics_file.is_absolute():
            raise ConfigError("MAILWATCHD_METRICS_FILE", f"{raw} is a relative path",
                              "use an absolute path, e.g. /var/lib/prometheus/node-exporter/mailwatchd.prom")
        extra["metrics_file"] = metrics_file
    if (raw := get("MAILWATCHD_METRICS_LISTEN")) is not None:
        addresses = parse_addresses("MAILWATCHD_METRICS_LISTEN", raw)
        if len(addresses) != 1 or not is_loopback(addresses[0][0]):
            raise ConfigError("MAILWATCHD_METRICS_LISTEN", f"{raw!r} is not one loopback address",
                              "use 127.0.0.1:PORT or [::1]:PORT; scrape other hosts through the textfile")
        extra["metrics_listen"] = addresses[0]
    notice = get("MAILWATCHD_NOTICE_ADDRESS")
    if notice is not None and notice.strip().lower() in ("off", "none"):
        extra["notice_address"] = None
    elif notice is not None:
        extra["notice_address"] = address_setting("MAILWATCHD_NOTICE_ADDRESS", notice)
    elif "admin_address" in extra:
        extra["notice_address"] = extra["admin_address"]
    if (raw := get("MAILWATCHD_NOTICE_MAX_PER_DAY")) is not None:
        extra["notice_max_per_day"] = parse_int("MAILWATCHD_NOTICE_MAX_PER_DAY", raw, minimum=1, maximum=1440)
    extra["listen"] = load_listen(get, env)

    relays = load_relays(get, env)
    return Settings(spool=spool, outbox=outbox, relays=relays, config_path=path,
                    **durations, **extra)  # type: ignore[arg-type]


def address_setting(key: str, raw: str) -> str:
    """A full e-mail address setting, checked."""
    address = raw.strip()
    if address.count("@") != 1 or any(ch.isspace() or ch in "<>" for ch in address) or not all(address.split("@")):
        raise ConfigError(key, f"{raw!r} is not an e-mail address", "use a full address such as ops@example.com")
    return address
