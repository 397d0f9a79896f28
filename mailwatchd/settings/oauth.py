"""OAuth2 settings of a relay: which SASL mechanism carries the token and where the token comes from.

The same options exist as relay-URL query keys (`auth=xoauth2&tenant=...&client_id=...`) and as
EMAIL_AUTH / EMAIL_OAUTH_* keys for the Django-style relay; `OAUTH_OPTIONS` maps one to the other.
The grant follows from the options given:

- `token_command` → a program that prints a token;
- `refresh_token_file` → the refresh-token grant (Google, Microsoft delegated);
- `client_secret_file` or `certificate_file` → client credentials (Microsoft 365 app-only).
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote, urlsplit

from mailwatchd.errors import ConfigError
from mailwatchd.settings.credentials import Secret, credential_path, read_secret_file


class AuthMethod(StrEnum):
    """How mailwatchd logs in: a password (PLAIN, LOGIN, CRAM-MD5) or an OAuth2 bearer token."""

    PASSWORD = "password"
    XOAUTH2 = "xoauth2"  # Google's and Microsoft's SASL mechanism
    OAUTHBEARER = "oauthbearer"  # RFC 7628


class TokenGrant(StrEnum):
    """Where an OAuth2 access token comes from."""

    CLIENT_CREDENTIALS = "client_credentials"  # app-only (Microsoft identity platform): secret or certificate
    REFRESH_TOKEN = "refresh_token"  # a user's consent, stored as a refresh token (Google, Microsoft delegated)
    COMMAND = "command"  # a program that prints a token (msmtp's passwordeval)


@dataclass(frozen=True)
class OAuthConfig:
    """An OAuth2 token source. `token_url` is None only for COMMAND; secrets never print."""

    grant: TokenGrant
    token_url: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    certificate: Path | None = None  # PEM with the certificate and its private key: a signed client assertion
    refresh_token: Secret | None = None
    scope: str | None = None
    command: tuple[str, ...] = ()
    cafile: Path | None = None  # CA for the token endpoint's certificate; None: the system's store


# URL query key → EMAIL_* key of the Django-style relay.
OAUTH_OPTIONS = {
    "auth": "EMAIL_AUTH",
    "tenant": "EMAIL_OAUTH_TENANT",
    "token_url": "EMAIL_OAUTH_TOKEN_URL",
    "client_id": "EMAIL_OAUTH_CLIENT_ID",
    "client_secret_file": "EMAIL_OAUTH_CLIENT_SECRET_FILE",
    "certificate_file": "EMAIL_OAUTH_CERTIFICATE_FILE",
    "refresh_token_file": "EMAIL_OAUTH_REFRESH_TOKEN_FILE",
    "scope": "EMAIL_OAUTH_SCOPE",
    "token_command": "EMAIL_OAUTH_TOKEN_COMMAND",
    "token_cafile": "EMAIL_OAUTH_CAFILE",
}

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
MICROSOFT_APP_SCOPE = "https://outlook.office365.com/.default"  # app-only: SMTP.SendAsApp
MICROSOFT_DELEGATED_SCOPE = "offline_access https://outlook.office.com/SMTP.Send"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
_GOOGLE_HOSTS = ("gmail.com", "googlemail.com", "google.com")
_MICROSOFT_HOSTS = ("office365.com", "outlook.com")

_METHODS = {method.value: method for method in AuthMethod}
_SOURCES = ("token_command", "refresh_token_file", "client_secret_file", "certificate_file")


def microsoft_token_url(tenant: str) -> str:
    return f"{MICROSOFT_AUTHORITY}/{quote(tenant, safe='')}/oauth2/v2.0/token"


def _is_host(host: str, domains: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == domain or host.endswith("." + domain) for domain in domains)


def parse_oauth(options: Mapping[str, str], *, key: Callable[[str], str], host: str, username: str | None,
                env: Mapping[str, str]) -> tuple[AuthMethod, OAuthConfig | None]:
    """The relay's AuthMethod and token source from `options` (URL query names; missing = unset).

    `key(option)` names the setting an error points at: the EMAIL_* key, or MAILWATCHD_RELAYS.
    """
    raw_method = options.get("auth", "password").strip().lower()
    method = _METHODS.get(raw_method)
    if method is None:
        raise ConfigError(key("auth"), f"{raw_method!r} is not an authentication method",
                          "use password, xoauth2 (Microsoft 365, Gmail) or oauthbearer (RFC 7628)")
    given = [option for option in OAUTH_OPTIONS if option != "auth" and options.get(option)]
    if method is AuthMethod.PASSWORD:
        if given:
            raise ConfigError(key(given[0]), "is an OAuth2 setting, but the relay logs in with a password",
                              f"set {key('auth')}=xoauth2 (or oauthbearer), or remove {key(given[0])}")
        return method, None
    if not username:
        raise ConfigError(key("auth"), f"{method.value} needs the mailbox to send as",
                          "set the user (EMAIL_HOST_USER, or user@ in the relay URL) to the mailbox address")
    sources = [option for option in _SOURCES if options.get(option)]
    if not sources:
        raise ConfigError(key("auth"), f"{method.value} needs a token source",
                          f"for Microsoft 365 app-only set {key('tenant')}, {key('client_id')} and "
                          f"{key('client_secret_file')}; for Gmail or a delegated Microsoft account set "
                          f"{key('client_id')}, {key('client_secret_file')} and {key('refresh_token_file')}; "
                          f"or set {key('token_command')} to a program that prints a token")
    if "token_command" in sources:
        return method, _command_source(options, key, sources)
    if "client_secret_file" in sources and "certificate_file" in sources:
        raise ConfigError(key("certificate_file"), f"both {key('client_secret_file')} and {key('certificate_file')} "
                          "are set", "keep one: the app registration's secret or its certificate")
    client_id = options.get("client_id")
    if not client_id:
        raise ConfigError(key("client_id"), "is not set", "set it to the application (client) ID of the app "
                          "registration (Entra ID) or the OAuth client (Google Cloud console)")
    grant = TokenGrant.REFRESH_TOKEN if "refresh_token_file" in sources else TokenGrant.CLIENT_CREDENTIALS
    token_url = _token_url(options, key, host, grant)
    scope = options.get("scope") or _default_scope(options, host, grant)
    client_secret = (read_secret_file(key("client_secret_file"), options["client_secret_file"], env)
                     if options.get("client_secret_file") else None)
    refresh_token = (read_secret_file(key("refresh_token_file"), options["refresh_token_file"], env)
                     if grant is TokenGrant.REFRESH_TOKEN else None)
    certificate = (_readable(key("certificate_file"), credential_path(key("certificate_file"),
                                                                       options["certificate_file"], env))
                   if options.get("certificate_file") else None)
    if grant is TokenGrant.CLIENT_CREDENTIALS and not scope:
        raise ConfigError(key("scope"), "is not set", f"for Microsoft 365 use {MICROSOFT_APP_SCOPE}")
    return method, OAuthConfig(grant=grant, token_url=token_url, client_id=client_id, client_secret=client_secret,
                               certificate=certificate, refresh_token=refresh_token, scope=scope or None,
                               cafile=_cafile(options, key))


def _command_source(options: Mapping[str, str], key: Callable[[str], str], sources: list[str]) -> OAuthConfig:
    if len(sources) > 1 or options.get("token_url") or options.get("tenant"):
        other = next(option for option in (*sources[1:], "token_url", "tenant") if options.get(option))
        raise ConfigError(key(other), f"is set together with {key('token_command')}",
                          "a token command is the whole token source: remove the other OAuth2 settings")
    raw = options["token_command"]
    try:
        argv = tuple(shlex.split(raw))
    except ValueError as exc:
        raise ConfigError(key("token_command"), f"cannot be split into words: {exc}",
                          "quote arguments as a shell would; no shell runs it") from None
    if not argv:
        raise ConfigError(key("token_command"), "is empty", "name a program that prints an access token")
    program = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
    if program is None or not os.access(program, os.X_OK) or not Path(program).is_file():
        raise ConfigError(key("token_command"), f"{argv[0]} is not an executable program",
                          "give the program's absolute path (it runs without a shell, as the daemon's user)")
    return OAuthConfig(grant=TokenGrant.COMMAND, command=(program, *argv[1:]), cafile=_cafile(options, key))


def _token_url(options: Mapping[str, str], key: Callable[[str], str], host: str, grant: TokenGrant) -> str:
    url = options.get("token_url")
    tenant = options.get("tenant")
    if url and tenant:
        raise ConfigError(key("tenant"), f"both {key('tenant')} and {key('token_url')} are set",
                          f"keep {key('token_url')} (a sovereign cloud's endpoint) or {key('tenant')}, not both")
    if not url and tenant:
        url = microsoft_token_url(tenant)
    if not url and grant is TokenGrant.REFRESH_TOKEN and _is_host(host, _GOOGLE_HOSTS):
        url = GOOGLE_TOKEN_URL
    if not url:
        raise ConfigError(key("tenant"), "the token endpoint is not known",
                          f"for Microsoft 365 set {key('tenant')} to the directory (tenant) ID or domain; otherwise "
                          f"set {key('token_url')} to the provider's token endpoint")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(key("token_url") if options.get("token_url") else key("tenant"),
                          f"{url!r} is not an https:// URL", "the token endpoint is always reached over HTTPS")
    return url


def _default_scope(options: Mapping[str, str], host: str, grant: TokenGrant) -> str:
    microsoft = bool(options.get("tenant")) or _is_host(host, _MICROSOFT_HOSTS) or (
        urlsplit(options.get("token_url") or "").hostname or "").endswith(MICROSOFT_AUTHORITY.split("//")[1])
    if grant is TokenGrant.CLIENT_CREDENTIALS:
        return MICROSOFT_APP_SCOPE if microsoft else ""
    return MICROSOFT_DELEGATED_SCOPE if microsoft else ""  # Google: the refresh token keeps its consented scope


def _cafile(options: Mapping[str, str], key: Callable[[str], str]) -> Path | None:
    raw = options.get("token_cafile")
    if not raw:
        return None
    if not Path(raw).is_file():
        raise ConfigError(key("token_cafile"), f"{raw} does not exist or is not a file",
                          "point it at the PEM file of the CA that signs the token endpoint's certificate")
    return Path(raw)


def _readable(key: str, path: Path) -> Path:
    try:
        with path.open("rb") as handle:
            head = handle.read(64 * 1024)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}",
                          "it must be a PEM file with the certificate and its private key, readable by the daemon's "
                          "user (or handed over as a systemd credential)") from None
    if b"PRIVATE KEY-----" not in head or b"CERTIFICATE-----" not in head:
        raise ConfigError(key, f"{path} does not hold both a PEM certificate and its private key",
                          "concatenate them: cat app.crt app.key > app.pem")
    return path

