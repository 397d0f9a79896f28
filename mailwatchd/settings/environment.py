"""Where settings come from (an env file, then the process environment) and the few a submission
reads: the spool, the message size limit and the mail names.

`sendmail` loads only this module (load_submitter_settings): it runs once per message. The daemon,
`check` and `status` load everything (config.py), with these same checks for these keys.
"""

from __future__ import annotations

import os

from mailwatchd.errors import ConfigError
from mailwatchd.records import NamedTuple

TYPE_CHECKING = False  # mypy takes it as true; typing itself is not imported (records.py)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    SERVICE_SPOOL: Path
    SUBMIT_SOCKET: Path
    SERVICE_STATUS_FILE: Path
    SERVICE_CONFIG: Path

# The service's paths. Each is a module attribute holding a Path, made on first use (__getattr__ below),
# so that `sendmail`, which reads none of them as a Path, never imports pathlib.
_SERVICE_PATHS = {
    "SERVICE_SPOOL": "/var/spool/mailwatchd",
    "SUBMIT_SOCKET": "/run/mailwatchd/submit.sock",  # the service's local submission socket (SMTP)
    # The service's status file: in its own runtime directory (RuntimeDirectory=mailwatchd/status, 0755), readable
    # by a monitoring user who may neither submit nor read mail (the spool's gate is the submit group).
    "SERVICE_STATUS_FILE": "/run/mailwatchd/status/status.json",
    "SERVICE_CONFIG": "/etc/mailwatchd/mailwatchd.env",  # the service's env file, the commands' default
}
DEFAULT_MAX_MESSAGE_SIZE = 25 * 1024 * 1024

if not TYPE_CHECKING:  # hidden from mypy, which would otherwise take any misspelt attribute for a Path

    def __getattr__(name: str) -> Path:
        """PEP 562: SERVICE_SPOOL, SUBMIT_SOCKET, SERVICE_STATUS_FILE and SERVICE_CONFIG, made once."""
        if name not in _SERVICE_PATHS:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from pathlib import Path

        value = globals()[name] = Path(_SERVICE_PATHS[name])
        return value


def _service_path(name: str) -> str:
    """A service path as a string: the module's attribute when it is set (by __getattr__, or by a
    test that moves the service elsewhere), else its default."""
    value = globals().get(name)
    return _SERVICE_PATHS[name] if value is None else os.fspath(value)


def _as_path(path: str | os.PathLike[str]) -> Path:
    from pathlib import Path

    return Path(path)


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
    "EMAIL_SSL_CERTFILE", "EMAIL_SSL_KEYFILE", "EMAIL_AUTH", "EMAIL_OAUTH_TENANT", "EMAIL_OAUTH_TOKEN_URL",
    "EMAIL_OAUTH_CLIENT_ID", "EMAIL_OAUTH_CLIENT_SECRET_FILE", "EMAIL_OAUTH_CERTIFICATE_FILE",
    "EMAIL_OAUTH_REFRESH_TOKEN_FILE", "EMAIL_OAUTH_SCOPE", "EMAIL_OAUTH_TOKEN_COMMAND", "EMAIL_OAUTH_CAFILE",
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

    spool_dir: str  # the spool as MAILWATCHD_SPOOL (or the default) names it; `spool` is the same as a Path
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    helo_name: str = ""
    default_domain: str | None = None

    @property
    def spool(self) -> Path:
        """As Settings.spool."""
        return _as_path(self.spool_dir)

    @property
    def ehlo_name(self) -> str:
        """As Settings.ehlo_name: MAILWATCHD_HELO_NAME, else the mail domain (maildomain.py)."""
        from mailwatchd.message.maildomain import host_name  # the socket's EHLO only: a spool drop says no name

        return self.helo_name or host_name(self.default_domain)


def default_spool_dir(environ: Mapping[str, str]) -> str:
    """/var/spool/mailwatchd wherever the service is installed (its spool exists), for every user:
    mail must reach the daemon that runs; a per-user state directory only where no service is."""
    service_spool = _service_path("SERVICE_SPOOL")
    if os.geteuid() == 0 or os.path.isdir(service_spool):
        return service_spool
    state_home = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state_home, "mailwatchd", "spool")


def load_environment(config_path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The env file's keys (if a path is given), overridden by the process environment."""
    merged: dict[str, str] = {}
    if config_path is not None:
        if not os.path.isfile(config_path):
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
    path = _as_path(config_path) if config_path is not None else None  # pathlib only with an env file
    return Source(path, load_environment(path, environ))


def spool_dir_setting(source: Source, environ: Mapping[str, str]) -> str:
    """MAILWATCHD_SPOOL, else the default spool for this user."""
    spool = source.get("MAILWATCHD_SPOOL") or default_spool_dir(environ)
    if not os.path.isabs(spool):
        raise ConfigError("MAILWATCHD_SPOOL", f"{_as_path(spool)} is a relative path", "use an absolute path")
    return spool


def spool_setting(source: Source, environ: Mapping[str, str]) -> Path:
    """MAILWATCHD_SPOOL, else the default spool for this user, as a Path."""
    return _as_path(spool_dir_setting(source, environ))


def status_file_setting(source: Source, spool: Path) -> Path:
    """MAILWATCHD_STATUS_FILE, else the service's (for the service's spool), else SPOOL/status.json."""
    raw = source.get("MAILWATCHD_STATUS_FILE")
    if raw is not None:
        path = _as_path(raw)
        if not path.is_absolute():
            raise ConfigError("MAILWATCHD_STATUS_FILE", f"{raw} is a relative path", "use an absolute path")
        return path
    if spool == _as_path(_service_path("SERVICE_SPOOL")):
        return _as_path(_service_path("SERVICE_STATUS_FILE"))
    return spool / "status.json"


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
    spool = spool_dir_setting(source, env_source)
    max_message_size = DEFAULT_MAX_MESSAGE_SIZE
    if (raw := source.get("MAILWATCHD_MAX_MESSAGE_SIZE")) is not None:
        from mailwatchd.settings.parsing import parse_size  # only when set: its regexes and math cost ~1 ms

        max_message_size = parse_size("MAILWATCHD_MAX_MESSAGE_SIZE", raw)
    helo_name = source.get("MAILWATCHD_HELO_NAME")
    domain = source.get("MAILWATCHD_DEFAULT_DOMAIN")
    return SubmitterSettings(spool, max_message_size, helo_name.strip() if helo_name is not None else "",
                             default_domain_setting(domain) if domain is not None else None)
