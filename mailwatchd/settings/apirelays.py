"""HTTPS API relays in MAILWATCHD_RELAYS: `mailgun://`, `ses://`, `sendgrid://`, `postmark://` URLs.

The URL's host is the API's host (the default for the provider or region when omitted), so the probe
checks exactly what delivery uses and a test or a regional endpoint is just another host:

    mailgun://api.eu.mailgun.net?domain=mg.example.com&password_file=mailgun-key
    mailgun://?region=eu&domain=mg.example.com&password_file=mailgun-key
    ses://AKIAIOSFODNN7EXAMPLE@email.eu-west-1.amazonaws.com?password_file=ses-secret-key
    ses://AKIAIOSFODNN7EXAMPLE@?region=eu-west-1&password_file=ses-secret-key
    sendgrid://?password_file=sendgrid-key            (region=eu: api.eu.sendgrid.com)
    postmark://?password_file=postmark-server-token
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from mailwatchd.errors import ConfigError
from mailwatchd.settings.credentials import Secret


class ApiKind(StrEnum):
    MAILGUN = "mailgun"
    SES = "ses"
    SENDGRID = "sendgrid"
    POSTMARK = "postmark"


@dataclass(frozen=True)
class ApiConfig:
    """One HTTPS API relay's account: where, with which key, for which domain or region."""

    kind: ApiKind
    base_url: str  # https://HOST[:PORT], no trailing slash
    key: Secret  # Mailgun API key, SES secret access key, SendGrid API key, Postmark server token
    key_id: str | None = None  # SES access key id
    domain: str | None = None  # Mailgun sending domain
    region: str | None = None  # SES region (signing scope); Mailgun/SendGrid "eu" chose the host
    message_stream: str | None = None  # Postmark message stream (default "outbound")


API_OPTIONS = {"name", "password_file", "cafile", "region", "domain", "message_stream", "max_per_minute",
               "max_per_day"}
_SES_HOST = re.compile(r"^email(?:-fips)?\.([a-z]{2}(?:-[a-z]+)+-\d)\.amazonaws\.com$")
_REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d$")


_DEFAULT_HOSTS: dict[ApiKind, dict[str | None, str]] = {
    ApiKind.MAILGUN: {None: "api.mailgun.net", "us": "api.mailgun.net", "eu": "api.eu.mailgun.net"},
    ApiKind.SENDGRID: {None: "api.sendgrid.com", "global": "api.sendgrid.com", "eu": "api.eu.sendgrid.com"},
    ApiKind.POSTMARK: {None: "api.postmarkapp.com"},
}


def api_host(key: str, kind: ApiKind, host: str | None, region: str | None, shown: str) -> str:
    """The API host: the URL's, else the provider's default for the region."""
    if host:
        return host
    if kind is ApiKind.SES:
        if region is None:
            raise ConfigError(key, f"{shown!r} names no AWS region",
                              "write ses://ACCESS_KEY_ID@email.REGION.amazonaws.com or add ?region=eu-west-1")
        return f"email.{region}.amazonaws.com"
    hosts = _DEFAULT_HOSTS[kind]
    if region not in hosts:
        allowed = " or ".join(name for name in hosts if name) or "nothing (it has one endpoint)"
        raise ConfigError(key, f"{shown!r} has an unknown region {region!r}", f"use region={allowed}")
    return hosts[region]


def api_config(key: str, kind: ApiKind, *, host: str, port: int, secret: Secret | None, key_id: str | None,
               region: str | None, domain: str | None, message_stream: str | None, shown: str) -> ApiConfig:
    """Check what each provider needs and build its ApiConfig."""
    if secret is None:
        raise ConfigError(key, f"{shown!r} has no API key", "add password_file=NAME (a credential holding the key)")
    if kind is ApiKind.SES:
        match = _SES_HOST.match(host)
        region = region or (match.group(1) if match else None)
        if region is None or not _REGION.match(region):
            raise ConfigError(key, f"{shown!r} names no valid AWS region",
                              "add ?region=eu-west-1 (the region of the SES identity)")
        if not key_id:
            raise ConfigError(key, f"{shown!r} has no access key id", "write ses://ACCESS_KEY_ID@...")
    elif key_id:
        raise ConfigError(key, f"{shown!r} has a user name, which {kind.value} does not use",
                          "remove the user@ part; the key goes in password_file")
    if kind is ApiKind.MAILGUN and not domain:
        raise ConfigError(key, f"{shown!r} names no sending domain", "add ?domain=mg.example.com")
    if domain and kind is not ApiKind.MAILGUN:
        raise ConfigError(key, f"{shown!r}: domain= is a Mailgun option", "remove it")
    if message_stream and kind is not ApiKind.POSTMARK:
        raise ConfigError(key, f"{shown!r}: message_stream= is a Postmark option", "remove it")
    netloc = host if port == 443 else f"{host}:{port}"
    if ":" in host:  # an IPv6 literal
        netloc = f"[{host}]" if port == 443 else f"[{host}]:{port}"
    return ApiConfig(kind=kind, base_url=f"https://{netloc}", key=secret, key_id=key_id or None, domain=domain,
                     region=region if kind is ApiKind.SES else None, message_stream=message_stream)
