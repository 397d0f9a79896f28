"""Where settings come from (an env file, then the process environment) and the few a submission
reads: the spool, the message size limit and the mail names.

`sendmail` loads only this module (load_submitter_settings): it runs once per message. The daemon,
`check` and `status` load everything (config.py), with these same checks for these keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from mailwatchd.errors import ConfigError
from mailwatchd.message.maildomain import host_name

SERVICE_SPOOL = Path("/var/spool/mailwatchd")
SUBMIT_SOCKET = Path("/run/mailwatchd/submit.sock")  # the service's local submission socket (SMTP)
# The service's status file: in its own runtime directory (RuntimeDirectory=mailwatchd/status, 0755), readable
# by a monitoring user who may neither submit nor read mail (the spool's gate is the submit group).
SERVICE_STATUS_FILE = Path("/run/mailwatchd/status/status.json")
SERVICE_CONFIG = Path("/etc/mailwatchd/mailwatchd.env")  # the service's env file, the commands' default
DEFAULT_MAX_MESSAGE_SIZE = 25 * 1024 * 1024

# Keys this program reads; an unknown MAILWATCHD_* key in the env file, or one close to a known
# key, is a typo worth stopping for, while other keys (Django's SECRET_KEY, EMAIL_BACKEND...) are ignored.
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
        "MAILWATCHD_LISTEN",
        "MAILWATCHD_LISTEN_ALLOW",
        "MAILWATCHD_LISTEN_USERS_FILE",
        "MAILWATCHD_LISTEN_TLS_CERT",
        "MAILWATCHD_LISTEN_TLS_KEY",
        "MAILWATCHD_LISTEN_MAX_CONNECTIONS",
        "MAILWATCHD_LISTEN_MAX_RECIPIENTS",
        "MAILWATCHD_ADMIN_ADDRESS",
        "MAILWATCHD_ALIASES",
        "MAILWATCHD_SUBMIT_SOCKET",
        "MAILWATCHD_STATUS_FILE",
        "MAILWATCHD_QUEUE_AGE_WARNING",
        "MAILWATCHD_QUEUE_AGE_CRITICAL",
        "MAILWATCHD_SPOOL_MIN_FREE",
        "MAILWATCHD_METRICS_FILE",
        "MAILWATCHD_METRICS_LISTEN",
        "MAILWATCHD_NOTICE_ADDRESS",
        "MAILWATCHD_NOTICE_INTERVAL",
        "MAILWATCHD_NOTICE_MAX_PER_DAY",
    }
)


# The Django-style keys this program reads (Django's own names, so an existing .env keeps working).
EMAIL_KEYS = frozenset({
    "EMAIL_HOST", "EMAIL_PORT", "EMAIL_HOST_USER", "EMAIL_HOST_PASSWORD", "EMAIL_HOST_PASSWORD_FILE",
    "EMAIL_USE_TLS", "EMAIL_USE_SSL", "EMAIL_TIMEOUT", "EMAIL_SSL_VERIFY", "EMAIL_SSL_CAFILE",
    "EMAIL_SSL_CERTFILE", "EMAIL_SSL_KEYFILE",
})
KNOWN_KEYS = MAILWATCHD_KEYS | EMAIL_KEYS
MAX_TYPO_EDITS = 2


def _edits(first: str, second: str, limit: int) -> int:
    """Levenshtein distance, or limit + 1 as soon as it must exceed `limit`."""
    if abs(len(first) - len(second)) > limit:
        return limit + 1
    previous = list(range(len(second) + 1))
    for row, char in enumerate(first, 1):
        current = [row]
        for column, other in enumerate(second, 1):
            current.append(min(previous[column] + 1, current[column - 1] + 1,
                               previous[column - 1] + (char != other)))
        if min(current) > limit:
            return limit + 1
        previous = current
    return previous[-1]


def meant_key(key: str) -> str | None:
    """The setting `key` is most likely a misspelling of (any case, at most two edits away), or None."""
    upper = key.upper()
    if upper in KNOWN_KEYS:
        return upper if upper != key else None
    distance, known = min((_edits(upper, known, MAX_TYPO_EDITS), known) for known in KNOWN_KEYS)
    return known if distance <= MAX_TYPO_EDITS else None


class Source(NamedTuple):
    """The settings' sources, merged: the env file's path, its keys overridden by the process's."""

    config_path: Path | None
    env: dict[str, str]

    def get(self, key: str) -> str | None:
        """The key's value; an empty one counts as unset."""
        value = self.env.get(key)
        return value if value not in (None, "") else None


class SubmitterSettings(NamedTuple):
    """What a submission reads of the settings."""

    spool: Path
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    helo_name: str = ""
    default_domain: str | None = None

    @property
    def ehlo_name(self) -> str:
        """As Settings.ehlo_name: MAILWATCHD_HELO_NAME, else the mail domain (maildomain.py)."""
        return self.helo_name or host_name(self.default_domain)


def default_spool(environ: Mapping[str, str]) -> Path:
    """/var/spool/mailwatchd wherever the service is installed (its spool exists), for every user:
    mail must reach the daemon that runs; a per-user state directory only where no service is."""
    if os.geteuid() == 0 or SERVICE_SPOOL.is_dir():
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
        from dotenv import dotenv_values  # here: `sendmail` without an env file never pays for the import

        try:
            values = dotenv_values(config_path, interpolate=False)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("MAILWATCHD_CONFIG", f"cannot read {config_path}: {exc}",
                              "make the file readable UTF-8 text") from None
        for key, value in values.items():
            if key not in KNOWN_KEYS:
                # A typo would silently switch a setting off (EMAIL_HOTS: no relay at all); other
                # keys of a shared Django .env (SECRET_KEY, EMAIL_BACKEND) are not ours and stay ignored.
                meant = meant_key(key)
                if meant is not None:
                    raise ConfigError(key, f"unknown setting in {config_path}", f"did you mean {meant}?")
                if key.startswith("MAILWATCHD_"):
                    raise ConfigError(key, f"unknown setting in {config_path}",
                                      "check the spelling against the README's list of settings")
            merged[key] = value or ""
    for key, value in environ.items():
        if key.startswith(("EMAIL_", "MAILWATCHD_")) or key == "CREDENTIALS_DIRECTORY":
            merged[key] = value
    return merged


def read_source(config_path: Path | str | None, environ: Mapping[str, str]) -> Source:
    """The env file (`config_path`, else $MAILWATCHD_CONFIG, else none) merged with `environ`."""
    if config_path is None and environ.get("MAILWATCHD_CONFIG"):
        config_path = environ["MAILWATCHD_CONFIG"]
    path = Path(config_path) if config_path is not None else None
    return Source(path, load_environment(path, environ))


def spool_setting(source: Source, environ: Mapping[str, str]) -> Path:
    """MAILWATCHD_SPOOL, else the default spool for this user."""
    spool = Path(source.get("MAILWATCHD_SPOOL") or default_spool(environ))
    if not spool.is_absolute():
        raise ConfigError("MAILWATCHD_SPOOL", f"{spool} is a relative path", "use an absolute path")
    return spool


def status_file_setting(source: Source, spool: Path) -> Path:
    """MAILWATCHD_STATUS_FILE, else the service's (for the service's spool), else SPOOL/status.json."""
    raw = source.get("MAILWATCHD_STATUS_FILE")
    if raw is not None:
        path = Path(raw)
        if not path.is_absolute():
            raise ConfigError("MAILWATCHD_STATUS_FILE", f"{raw} is a relative path", "use an absolute path")
        return path
    return SERVICE_STATUS_FILE if spool == SERVICE_SPOOL else spool / "status.json"


def default_domain_setting(raw: str) -> str:
    """MAILWATCHD_DEFAULT_DOMAIN's value, checked."""
    if "@" in raw or not raw.strip() or any(ch.isspace() for ch in raw.strip()):
        raise ConfigError("MAILWATCHD_DEFAULT_DOMAIN", f"{raw!r} is not a domain",
                          "use a bare domain such as example.com")
    return raw.strip()


def load_submitter_settings(config_path: Path | str | None = None,
                            environ: Mapping[str, str] | None = None) -> SubmitterSettings:
    """The settings a submission reads, checked as load_settings checks them; ConfigError on the first problem."""
    env_source = os.environ if environ is None else environ
    source = read_source(config_path, env_source)
    spool = spool_setting(source, env_source)
    max_message_size = DEFAULT_MAX_MESSAGE_SIZE
    if (raw := source.get("MAILWATCHD_MAX_MESSAGE_SIZE")) is not None:
        from mailwatchd.settings.parsing import parse_size  # only when set: its regexes and math cost ~1 ms

        max_message_size = parse_size("MAILWATCHD_MAX_MESSAGE_SIZE", raw)
    helo_name = source.get("MAILWATCHD_HELO_NAME")
    domain = source.get("MAILWATCHD_DEFAULT_DOMAIN")
    return SubmitterSettings(spool, max_message_size, helo_name.strip() if helo_name is not None else "",
                             default_domain_setting(domain) if domain is not None else None)
