"""Secrets read from files: a password file, the listener's users file. A relative name is a systemd
credential, looked up in $CREDENTIALS_DIRECTORY; an error names the file the operator edits and the
unit's `LoadCredential=` line, never the secret.

The file the operator edits: the unit's convention is `LoadCredential=NAME:/etc/mailwatchd/NAME`
(packaging/systemd/mailwatchd.service), so a credential systemd handed over in
/run/credentials/UNIT/NAME comes from /etc/mailwatchd/NAME. Anywhere else (a $CREDENTIALS_DIRECTORY
set by hand, an absolute path) the file read is the file edited.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mailwatchd.errors import ConfigError
from mailwatchd.settings.environment import SERVICE_CONFIG

SYSTEMD_CREDENTIALS = Path("/run/credentials")  # systemd's $CREDENTIALS_DIRECTORY is /run/credentials/UNIT
CREDENTIAL_SOURCES = SERVICE_CONFIG.parent  # the unit's LoadCredential= sources: /etc/mailwatchd/NAME
UNIT = "mailwatchd"


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


def load_credential_line(name: str) -> str:
    return f"LoadCredential={name}:{CREDENTIAL_SOURCES / name}"


def credential_source(name: str, credentials_directory: Path) -> Path:
    """The file the operator edits for credential `name` read from `credentials_directory`."""
    if credentials_directory.is_relative_to(SYSTEMD_CREDENTIALS):
        return CREDENTIAL_SOURCES / name
    return credentials_directory / name


def read_secret_file(key: str, raw: str, environ: Mapping[str, str]) -> Secret:
    """Read a secret file; a relative name is looked up in systemd's $CREDENTIALS_DIRECTORY."""
    path = credential_path(key, raw, environ)
    if Path(raw).is_absolute():
        return _read(key, path, source=path, name=None)
    return _read(key, path, source=credential_source(raw, path.parent), name=raw)


def credential_path(key: str, raw: str, environ: Mapping[str, str]) -> Path:
    """Where the file named `raw` is: itself if absolute, else the credential in $CREDENTIALS_DIRECTORY."""
    path = Path(raw)
    if path.is_absolute():
        return path
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        raise ConfigError(key, f"{raw!r} is a credential name and $CREDENTIALS_DIRECTORY is not set "
                               "(systemd sets it for the service)",
                          f"the service reads it with {load_credential_line(raw)} (add that line with "
                          f"`systemctl edit {UNIT}`); by hand, set CREDENTIALS_DIRECTORY={CREDENTIAL_SOURCES}; "
                          "or give an absolute path")
    return Path(cred_dir) / path


def _read(key: str, path: Path, *, source: Path, name: str | None) -> Secret:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _missing(key, path, source, name) from None
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}", _unreadable_fix(path, source, name)) from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise _empty(key, source, name)
    return Secret(secret)


def _missing(key: str, path: Path, source: Path, name: str | None) -> ConfigError:
    if name is None:
        return ConfigError(key, f"{path} does not exist", "create it, or point the setting at the right file")
    if source == path:  # $CREDENTIALS_DIRECTORY set by hand: the file itself is missing
        return ConfigError(key, f"the credential {name!r} is missing: {path} does not exist",
                           f"create it (install -m 0600 /dev/stdin {path}); the service also needs "
                           f"{load_credential_line(name)} (`systemctl edit {UNIT}`)")
    return ConfigError(key, f"the credential {name!r} is not loaded: the unit has no LoadCredential= for it",
                       f"put the secret in {source} (install -m 0600 /dev/stdin {source}), add "
                       f"[Service] {load_credential_line(name)} with `systemctl edit {UNIT}`, then "
                       f"`systemctl restart {UNIT}`")


def _empty(key: str, source: Path, name: str | None) -> ConfigError:
    if name is None:
        return ConfigError(key, f"{source} is empty", "put the secret in the file")
    return ConfigError(key, f"the credential {name!r} is empty: {source} {_describe(source)}",
                       f"put the secret in {source} (install -m 0600 /dev/stdin {source}), then "
                       f"`systemctl restart {UNIT}`")


def _describe(source: Path) -> str:
    """How the operator's file looks from here: the unit's SetCredential= fallback hides a missing one."""
    try:
        size = source.stat().st_size
    except FileNotFoundError:
        return "does not exist (systemd handed over the unit's empty fallback, SetCredential=)"
    except OSError:
        return "is empty or missing"
    if size == 0:
        return "is empty"
    if size <= len("\r\n"):
        return "holds only a line break"
    return "has content now, but systemd loaded the credential before it had (it loads credentials at start)"


def _unreadable_fix(path: Path, source: Path, name: str | None) -> str:
    if name is not None:
        return f"systemd hands {source} over as {load_credential_line(name)}; check that line (`systemctl cat {UNIT}`)"
    return (f"make {path} readable by the daemon's user (chgrp mailwatchd {path} && chmod 0640 {path}), or hand "
            f"it over as a credential: set a bare name and add LoadCredential=NAME:{path} with `systemctl edit {UNIT}`")
