"""`mailwatchd check`: probe every relay endpoint at once and say, in plain words, what to fix.

Every endpoint and the usual alternatives on each relay host are probed concurrently: the
usual ports (587 STARTTLS, 465 implicit TLS, 2525 STARTTLS) and the usual TLS modes of each
configured port (465/ssl for a 465/starttls endpoint; both modes for a port with no usual
mode), so the whole check takes about one connect timeout plus a few command timeouts however
many endpoints are down. Alternatives are probed without credentials (no extra login
attempts), and only reported for an endpoint that failed in a way another port or mode might
avoid. Advice never suggests a port and mode this check found failing.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailwatchd.errors import MalformedMessage
from mailwatchd.message.envelope import check_address
from mailwatchd.relays.probe import ProbeReport, SendTest, TlsContexts, probe_endpoint
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import AuthMethod, Endpoint, RelayConfig, TlsMode
from mailwatchd.transports.outcome import Cause
from mailwatchd.transports.smtpclient import Resolver
from mailwatchd.transports.tokens import Tokens

AltPort = int | tuple[int, TlsMode]
DEFAULT_ALT_PORTS: tuple[AltPort, ...] = (587, 465, 2525)
# The TLS modes each well-known submission port is served with (RFC 8314 §3.3: 465 is implicit
# TLS; RFC 6409 and common practice: 587, 25 and 2525 are STARTTLS). Any other port: either.
USUAL_MODES: dict[int, tuple[TlsMode, ...]] = {
    25: (TlsMode.STARTTLS,), 465: (TlsMode.IMPLICIT,), 587: (TlsMode.STARTTLS,), 2525: (TlsMode.STARTTLS,)}
EITHER_MODE = (TlsMode.STARTTLS, TlsMode.IMPLICIT)
ALT_CAUSES = frozenset({
    Cause.CONNECT_TIMEOUT, Cause.CONNECTION_REFUSED, Cause.NETWORK_UNREACHABLE, Cause.BANNER_TIMEOUT,
    Cause.DISCONNECTED, Cause.TLS_HANDSHAKE_FAILED, Cause.TLS_UNTRUSTED, Cause.TLS_EXPIRED,
    Cause.TLS_HOSTNAME_MISMATCH, Cause.STARTTLS_UNAVAILABLE, Cause.TIMEOUT, Cause.PROTOCOL_ERROR,
})
# Failures before any byte of SMTP or TLS: the same port in another TLS mode fails the same way.
TCP_CAUSES = frozenset({Cause.CONNECT_TIMEOUT, Cause.CONNECTION_REFUSED, Cause.NETWORK_UNREACHABLE})
# A failed test message that says nothing about the relay itself: the address was refused
# or the relay deferred. Any other failure means mail cannot flow through that relay.
_TEST_ADDRESS_CAUSES = frozenset({Cause.RECIPIENT_REJECTED, Cause.TEMPORARY_FAILURE})
_OPENSSL_REASON = re.compile(r"certificate verify failed: (.*?) \(OpenSSL verify code")


def _reason(detail: str) -> str:
    match = _OPENSSL_REASON.search(detail)
    return match.group(1) if match else detail


def usual_modes(port: int) -> tuple[TlsMode, ...]:
    return USUAL_MODES.get(port, EITHER_MODE)


@dataclass(frozen=True)
class Tried:
    """What this check found elsewhere on an endpoint's host: every other probe of it, by (port, mode),
    so that advice never suggests what was just found failing."""

    reports: Mapping[tuple[int, TlsMode], ProbeReport] = field(default_factory=dict)
    other_ports_probed: bool = False  # the usual other ports were probed: unprobed ones are not the usual ones

    @classmethod
    def of(cls, endpoint: Endpoint, reports: Sequence[ProbeReport], *, other_ports_probed: bool = False) -> Tried:
        return cls({(r.port, r.tls): r for r in reports if r.host == endpoint.host and r.endpoint != endpoint},
                   other_ports_probed)

    def failure(self, port: int, mode: TlsMode) -> ProbeReport | None:
        report = self.reports.get((port, mode))
        return report if report is not None and not report.ok else None

    def worked(self, port: int, mode: TlsMode) -> bool:
        report = self.reports.get((port, mode))
        return report is not None and report.ok

    def may_suggest(self, port: int, mode: TlsMode) -> bool:
        """Not found failing, and found working or (when the usual ports were not probed) untested."""
        if (port, mode) in self.reports:
            return self.worked(port, mode)
        return not self.other_ports_probed

    @property
    def other_ports_help(self) -> bool:
        """"Try another port" is still advice: the other ports were not probed, or one of them works."""
        return not self.other_ports_probed or any(r.ok for r in self.reports.values())


def _usual_ports(tried: Tried, endpoint: Endpoint) -> list[str]:
    choices = ((587, TlsMode.STARTTLS, "587 for STARTTLS"), (465, TlsMode.IMPLICIT, "465 for implicit TLS"))
    return [label for port, mode, label in choices
            if (port, mode) != (endpoint.port, endpoint.tls) and tried.may_suggest(port, mode)]


def _problem_and_fix(cause: Cause, endpoint: Endpoint, detail: str, relay: RelayConfig | None,
                     tried: Tried) -> tuple[str, str]:
    """What is wrong, and what to do about it, for one cause code."""
    host, port = endpoint.host, endpoint.port
    gmail = "gmail" in host or "google" in host or "support.google.com" in detail
    oauth = relay is not None and relay.oauth is not None
    mailbox = relay.username if relay is not None and relay.username else "MAILBOX"
    match cause:
        case Cause.OK:
            return "", ""
        case Cause.DNS_FAILED:
            return (f"{host} does not resolve ({detail})",
                    f"check EMAIL_HOST for a typo and that this machine's DNS works (getent hosts {host})")
        case Cause.CONNECTION_REFUSED if usual := _usual_ports(tried, endpoint):
            return (f"nothing accepts connections on {host}:{port}",
                    f"check EMAIL_PORT ({', '.join(usual)}) or the firewall rejecting outbound {port}")
        case Cause.CONNECTION_REFUSED:
            return (f"nothing accepts connections on {host}:{port}",
                    f"check EMAIL_HOST and EMAIL_PORT against the provider's documentation, and whether a firewall "
                    f"rejects outbound connections to {host}")
        case Cause.CONNECT_TIMEOUT:
            return (f"port {port} looks blocked by a firewall: connects time out",
                    f"ask the network admin to allow outbound {port}")
        case Cause.NETWORK_UNREACHABLE:
            return f"there is no route to {host}", "check this machine's network (and IPv6) configuration"
        case Cause.BANNER_TIMEOUT if endpoint.tls is not TlsMode.IMPLICIT and (
                tried.worked(port, TlsMode.IMPLICIT) or (port == 465 and tried.may_suggest(port, TlsMode.IMPLICIT))):
            return (f"port {port} waits for a TLS handshake, not a plain greeting",
                    f"set EMAIL_USE_SSL=true (implicit TLS) instead of EMAIL_USE_TLS for port {port}")
        case Cause.BANNER_TIMEOUT:
            return (f"{host}:{port} accepted the connection but never sent its greeting",
                    "an overloaded relay, or a proxy or antivirus intercepting SMTP"
                    + ("; try another port" if tried.other_ports_help else ""))
        case Cause.SERVER_BUSY:
            return (f"the relay refuses sessions for now ({detail})",
                    "it is overloaded or throttles this address; mail waits in the spool, and a fallback relay "
                    "in MAILWATCHD_RELAYS would take over meanwhile")
        case Cause.TLS_HANDSHAKE_FAILED if "WRONG_VERSION_NUMBER" in detail and endpoint.tls is TlsMode.IMPLICIT:
            starttls = tried.failure(port, TlsMode.STARTTLS)
            if starttls is not None:
                return (f"port {port} speaks plain SMTP, not implicit TLS, and STARTTLS on it failed too "
                        f"({starttls.cause.value}: {starttls.detail})",
                        "check EMAIL_HOST and EMAIL_PORT against the provider's documentation; never disable TLS")
            return (f"port {port} speaks plain SMTP, not implicit TLS",
                    "set EMAIL_USE_TLS=true (STARTTLS) and EMAIL_USE_SSL=false for this port")
        case Cause.TLS_HANDSHAKE_FAILED:
            return (f"the TLS handshake with {host}:{port} failed ({detail})",
                    "the relay may only offer outdated TLS versions or ciphers: ask the provider; never disable TLS")
        case Cause.TLS_UNTRUSTED if "not marked critical" in detail:
            return (f"the certificate of {host} is not trusted: OpenSSL says \"{_reason(detail)}\"",
                    "the CA certificate's Basic Constraints extension must be critical (RFC 5280 §4.2.1.9), and "
                    "strict verification (Python 3.13 and later) refuses it otherwise: have that CA reissued with "
                    "critical Basic Constraints, then point EMAIL_SSL_CAFILE at the new CA file; never disable "
                    "verification")
        case Cause.TLS_UNTRUSTED:
            return (f"the certificate of {host} is not trusted: OpenSSL says \"{_reason(detail)}\"",
                    "if the relay uses a private or corporate CA, set EMAIL_SSL_CAFILE to that CA's PEM file; "
                    "never disable verification")
        case Cause.TLS_EXPIRED:
            return (f"the certificate of {host} is not valid now: OpenSSL says \"{_reason(detail)}\"",
                    "the provider must renew it; if this machine's clock is wrong, fix it (timedatectl)")
        case Cause.TLS_HOSTNAME_MISMATCH:
            return (f"the certificate is not issued for {host} ({_reason(detail)})",
                    "EMAIL_HOST must match a name in the certificate: use the host name the provider documents, "
                    "not an IP address or an alias")
        case Cause.STARTTLS_UNAVAILABLE if tried.may_suggest(465, TlsMode.IMPLICIT):
            return (f"{host}:{port} does not offer STARTTLS, and mailwatchd never sends without TLS",
                    "use implicit TLS instead (EMAIL_PORT=465, EMAIL_USE_SSL=true, EMAIL_USE_TLS=false); never "
                    "disable TLS. A firewall that strips STARTTLS causes this too")
        case Cause.STARTTLS_UNAVAILABLE:
            return (f"{host}:{port} does not offer STARTTLS, and mailwatchd never sends without TLS",
                    "ask the provider which port offers TLS; never disable TLS. A firewall that strips STARTTLS "
                    "causes this too")
        case Cause.AUTH_UNAVAILABLE if oauth:
            return (f"{host}:{port} offers no usable AUTH ({detail})",
                    "Exchange Online offers XOAUTH2 (not OAUTHBEARER) after STARTTLS on 587, Gmail offers both on 587 "
                    "and 465: use auth=xoauth2 (EMAIL_AUTH=xoauth2) and check EMAIL_PORT and EMAIL_USE_TLS")
        case Cause.AUTH_UNAVAILABLE:
            return (f"{host}:{port} offers no usable AUTH ({detail})",
                    "providers offer AUTH only after STARTTLS on 587, or on 465 with implicit TLS (port 25 is for "
                    "server-to-server mail): check EMAIL_PORT and EMAIL_USE_TLS / EMAIL_USE_SSL")
        case Cause.BASIC_AUTH_DISABLED if oauth:
            return (f"Microsoft 365 has SMTP AUTH switched off for this tenant or mailbox ({detail}); that blocks "
                    "OAuth2 logins too",
                    f"an Exchange admin turns it on for the mailbox: Set-CASMailbox -Identity {mailbox} "
                    "-SmtpClientAuthenticationDisabled $false (see https://aka.ms/smtp_auth_disabled)")
        case Cause.BASIC_AUTH_DISABLED:
            return (f"Microsoft 365 no longer accepts a password for SMTP AUTH here ({detail})",
                    "switch this relay to OAuth2: register an app with the SMTP.SendAsApp permission, register its "
                    "service principal in Exchange, then set EMAIL_AUTH=xoauth2, EMAIL_OAUTH_TENANT, "
                    "EMAIL_OAUTH_CLIENT_ID and EMAIL_OAUTH_CLIENT_SECRET_FILE (README: Microsoft 365 with OAuth2). "
                    f"Until then an admin can allow passwords for the mailbox (Set-CASMailbox -Identity {mailbox} "
                    "-SmtpClientAuthenticationDisabled $false), while Microsoft still permits it")
        case Cause.TOKEN_FAILED:
            return f"no OAuth2 token: {detail}", _token_fix(detail)
        case Cause.TOKEN_UNREACHABLE:
            return (f"the OAuth2 token endpoint cannot be reached ({detail})",
                    "this is not the SMTP port: the daemon must reach the token endpoint over HTTPS (443; "
                    "login.microsoftonline.com, oauth2.googleapis.com). Allow it in the firewall, or set HTTPS_PROXY "
                    "for the service (`systemctl edit mailwatchd`) if web traffic goes through a proxy")
        case Cause.AUTH_FAILED if oauth and gmail:
            return (f"Google refused the OAuth2 token ({detail})",
                    f"the token must carry the https://mail.google.com/ scope and {mailbox} must be the account that "
                    "gave consent (or, with domain-wide delegation, the user the service account acts for)")
        case Cause.AUTH_FAILED if oauth:
            return (f"the relay refused the OAuth2 token for {mailbox} ({detail})",
                    "for Microsoft 365 app-only: the app needs the SMTP.SendAsApp application permission with admin "
                    "consent, its service principal registered in Exchange (New-ServicePrincipal -AppId APP_ID "
                    f"-ServiceId OBJECT_ID, the object ID from Enterprise applications) and access to {mailbox} "
                    f"(Add-MailboxPermission -Identity {mailbox} -User OBJECT_ID -AccessRights FullAccess); the "
                    "mailbox must be the user (EMAIL_HOST_USER)")
        case Cause.AUTH_FAILED if "5.7.9" in detail:
            return (f"the relay wants an app password ({detail})",
                    "Google requires an app password for accounts with 2-step verification (Google account → "
                    "Security → App passwords), or switch to OAuth2 (EMAIL_AUTH=xoauth2, README: Gmail with OAuth2)")
        case Cause.AUTH_FAILED:
            app = ("Gmail needs an app password (Google account → Security → App passwords), not the account "
                   "password" if gmail else
                   "Gmail and Microsoft 365 need an app password when 2-step verification is on, and SendGrid's "
                   "user name is literally 'apikey'")
            user = f" ({relay.username})" if relay is not None and relay.username else ""
            return (f"the relay refused the login ({detail})",
                    f"check EMAIL_HOST_USER{user} and the password in EMAIL_HOST_PASSWORD_FILE; {app}")
        case Cause.SENDER_REJECTED if "5.7.60" in detail or "SendAsDenied" in detail:
            return (f"the mailbox may not send as this sender ({detail})",
                    "send from the mailbox's own address, or grant it SendAs on the sender: Add-RecipientPermission "
                    "-Identity SENDER -Trustee MAILBOX -AccessRights SendAs")
        case Cause.SENDER_REJECTED:
            return (f"the relay refuses the sender address ({detail})",
                    "verify the sender identity with the provider (SendGrid: Sender Identity or domain "
                    "authentication; Mailgun and SES: a verified domain), or send from the account's own address")
        case Cause.RECIPIENT_REJECTED:
            return (f"the relay refused the recipient ({detail})",
                    "check the address; sandboxed accounts (SES, Mailgun) deliver only to verified recipients")
        case Cause.MESSAGE_REJECTED:
            return f"the relay refused the message ({detail})", "read the relay's reply; it names the policy"
        case Cause.QUOTA_EXCEEDED:
            return (f"the provider's sending quota is used up ({detail})",
                    "wait for the daily reset or raise the plan's limit, keep MAILWATCHD_MAX_PER_DAY below it, and "
                    "add a fallback relay in MAILWATCHD_RELAYS so mail keeps flowing")
        case Cause.TEMPORARY_FAILURE:
            return f"the relay deferred ({detail})", "this usually passes; mail stays in the spool and is retried"
        case Cause.TIMEOUT:
            return (f"the relay stopped answering in the middle of the session ({detail})",
                    "an overloaded relay or a middlebox" + ("; try another port" if tried.other_ports_help else ""))
        case Cause.DISCONNECTED:
            return (f"{host}:{port} dropped the connection ({detail})",
                    "the relay may block this address, or a firewall or proxy interferes")
        case Cause.PROTOCOL_ERROR:
            return (f"{host}:{port} does not speak SMTP as expected ({detail})",
                    "check that EMAIL_HOST and EMAIL_PORT name an SMTP relay")
        case Cause.LOCAL_ERROR:
            return (f"a problem on this machine ({detail})",
                    "check that EMAIL_SSL_CAFILE, EMAIL_SSL_CERTFILE and EMAIL_SSL_KEYFILE are readable PEM files"
                    if "TLS files" in detail else "see the detail")
        case _:
            return detail, "see the detail"


def _token_fix(detail: str) -> str:
    """What to do about a token endpoint's (or token command's) refusal, from its OAuth2 error code."""
    if "token command" in detail:
        return "run the command by hand as the daemon's user (sudo -u mailwatchd COMMAND) and fix what it says"
    if "invalid_client" in detail:
        return ("check EMAIL_OAUTH_CLIENT_ID and the client secret: the file holds the secret's value (not its ID), "
                "and Entra ID secrets expire (App registrations → Certificates & secrets); a certificate must be the "
                "one uploaded to the app registration")
    if "invalid_grant" in detail:
        return ("the refresh token was revoked or has expired (Google apps in testing status: after 7 days): obtain "
                "a new one with the consent step in the README and put it in EMAIL_OAUTH_REFRESH_TOKEN_FILE")
    if "invalid_scope" in detail:
        return "for Microsoft 365 app-only the scope is https://outlook.office365.com/.default (EMAIL_OAUTH_SCOPE)"
    if "unauthorized_client" in detail:
        return ("the OAuth client may not use this grant or scope: check the app registration's permissions and "
                "admin consent (Google: the client ID authorized for domain-wide delegation)")
    return "check the OAuth2 settings (EMAIL_OAUTH_TENANT or EMAIL_OAUTH_TOKEN_URL, EMAIL_OAUTH_CLIENT_ID)"


def smtp_blocked_note(relays: Sequence[RelayConfig], reports: Sequence[ProbeReport],
                      alternatives: Sequence[ProbeReport]) -> str:
    """One finding when every SMTP port probed on every SMTP relay host fails before a byte of SMTP (the
    host's outbound SMTP is blocked, as on many cloud hosts): where mail flows instead, or how to make it."""
    api = {relay.name for relay in relays if relay.api is not None}
    smtp = [r for r in [*reports, *alternatives] if r.relay not in api]
    if not smtp or any(r.ok or r.cause not in TCP_CAUSES for r in smtp):
        return ""
    ports = sorted({r.port for r in smtp})
    named = ", ".join(map(str, ports[:-1])) + f" and {ports[-1]}" if len(ports) > 1 else str(ports[0])
    working = [r for r in reports if r.relay in api and r.ok]
    if working:
        flows = ", ".join(f"{r.relay} ({r.host}:{r.port})" for r in working)
        return f"SMTP ports {named} are blocked here; mail flows through the HTTPS relay {flows}"
    fix = ("make an HTTPS API relay work" if api else
           "configure an HTTPS API relay, which uses port 443, e.g. MAILWATCHD_RELAYS=sendgrid://?password_file="
           "sendgrid-key (also mailgun://, ses://, postmark://; README: HTTPS API relays)")
    return (f"SMTP ports {named} are blocked here (outbound SMTP looks blocked by policy, as on many cloud hosts); "
            f"{fix}")


def _api_problem(cause: Cause, relay: RelayConfig, detail: str) -> tuple[str, str] | None:
    """What to fix for an HTTPS API relay's own failures; None where the generic advice fits."""
    assert relay.api is not None
    provider = relay.api.kind.value
    match cause:
        case Cause.AUTH_FAILED:
            return (f"{provider} refused the API key ({detail})",
                    "put a valid key with permission to send in the relay's password_file credential (Mailgun: the "
                    "primary or the domain's sending key; SES: the IAM user's secret access key, allowed "
                    "ses:SendEmail; SendGrid: a key with Mail Send; Postmark: the server API token)")
        case Cause.SENDER_REJECTED:
            return (f"the {provider} account or domain cannot send ({detail})",
                    "verify the sending domain or sender with the provider, move the account out of the sandbox, "
                    "or resolve the suspension in the provider's console")
        case Cause.PROTOCOL_ERROR:
            return (f"the {provider} API does not know this account here ({detail})",
                    "check the relay URL's host or region= (EU accounts live on the EU endpoint) and domain=")
    return None


def switch_advice(endpoint: Endpoint, relay: RelayConfig | None, current: Endpoint | None = None) -> str:
    """How to configure `endpoint` instead of `current`: EMAIL_* for the Django-style relay, a URL otherwise."""
    implicit = endpoint.tls is TlsMode.IMPLICIT
    flag, other = ("EMAIL_USE_SSL", "EMAIL_USE_TLS") if implicit else ("EMAIL_USE_TLS", "EMAIL_USE_SSL")
    url = f"{'smtp+ssl' if implicit else 'smtp+tls'}://{endpoint.host}:{endpoint.port}"
    if relay is not None and relay.name != endpoint.host:
        return f"use {url} for relay {relay.name} in MAILWATCHD_RELAYS"
    if relay is not None and current is not None and current != relay.primary:
        mode = "ssl" if implicit else "tls"
        was = current.port if current.port != endpoint.port else f"{current.port}/{_fallback_mode(current.tls)}"
        return f"list {endpoint.port}/{mode} in MAILWATCHD_FALLBACK_PORTS instead of {was}"
    same_mode = current is not None and current.tls is endpoint.tls
    flags = f"{flag}=true" if same_mode else f"{flag}=true (with {other}=false)"
    if current is not None and current.port == endpoint.port:
        return f"keep EMAIL_PORT={endpoint.port} and set {flags} (or {url} in MAILWATCHD_RELAYS)"
    return f"set EMAIL_PORT={endpoint.port} and {flags} (or {url} in MAILWATCHD_RELAYS)"


def _fallback_mode(mode: TlsMode) -> str:
    """How MAILWATCHD_FALLBACK_PORTS spells a TLS mode."""
    return {TlsMode.IMPLICIT: "ssl", TlsMode.STARTTLS: "tls"}.get(mode, mode.value)


def hint_for(cause: Cause, endpoint: Endpoint, detail: str, *, relay: RelayConfig | None = None,
             alternatives: Sequence[ProbeReport] = (), fallback: Endpoint | None = None,
             tried: Tried | None = None) -> str:
    """The fix hint for one endpoint's verdict, naming a working alternative port or mode if any.

    `tried`: what the check found on the rest of the host (its other endpoints and alternatives);
    by default just `alternatives`.
    """
    if tried is None:
        tried = Tried.of(endpoint, alternatives, other_ports_probed=any(a.port != endpoint.port for a in alternatives))
    api_advice = _api_problem(cause, relay, detail) if relay is not None and relay.api is not None else None
    problem, fix = api_advice or _problem_and_fix(cause, endpoint, detail, relay, tried)
    if not problem:
        return ""
    working = [alt for alt in alternatives if alt.ok]
    if working:
        best = working[0]
        same_port = best.port == endpoint.port
        answered = f"{best.port}/{best.tls.value}" if same_port else f"{best.port}"
        hint = (f"{problem}; {answered} answered in {best.answered_ms:g} ms — "
                f"{switch_advice(best.endpoint, relay, endpoint)}")
        if not same_port:  # on the same port the switch of mode is the fix
            hint += f", or {fix}"
    else:
        hint = f"{problem} — {fix}"
        if alternatives:
            failed = ", ".join(f"{alt.port}/{alt.tls.value} {alt.cause.value}" for alt in alternatives)
            same = {alt.port == endpoint.port for alt in alternatives}
            what = "ports and modes" if same == {True, False} else "modes" if True in same else "ports"
            hint += f"; the usual alternative {what} failed too ({failed})"
    if fallback is not None:
        hint += f". Meanwhile mail still flows through the configured {fallback}"
    return hint


@dataclass
class Finding:
    """One probed endpoint with what to do about it and, if it failed, how the usual other ports fared."""

    report: ProbeReport
    hint: str = ""
    alternatives: list[ProbeReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.report.ok

    @property
    def relay(self) -> str:
        return self.report.relay

    @property
    def cause(self) -> Cause:
        return self.report.cause

    @property
    def endpoint(self) -> Endpoint:
        return self.report.endpoint

    def to_json(self) -> dict[str, Any]:
        return {**self.report.to_json(), "hint": self.hint,
                "alternatives": [{**alt.to_json(), "hint": "", "alternatives": []} for alt in self.alternatives]}


@dataclass
class CheckReport:
    """The result of `mailwatchd check`."""

    endpoints: list[Finding]
    relays: list[str]
    duration_ms: float
    checked_at: datetime
    outbox: Path | None = None
    send_test_to: str | None = None
    send_test: Finding | None = None
    notes: list[str] = field(default_factory=list)

    def usable_relays(self) -> list[str]:
        usable = [name for name in self.relays if any(r.ok for r in self.endpoints if r.relay == name)]
        test = self.send_test
        if test is not None and not test.ok and test.cause not in _TEST_ADDRESS_CAUSES:
            usable = [name for name in usable if name != test.relay]
        return usable

    @property
    def exit_code(self) -> int:
        """0: every relay usable and nothing failed; 1: something is down but mail flows; 2: it does not."""
        if not self.relays:
            return 0
        usable = self.usable_relays()
        if not usable:
            return 2
        all_ok = all(r.ok for r in self.endpoints) and (self.send_test is None or self.send_test.ok)
        return 0 if all_ok and len(usable) == len(self.relays) else 1

    def to_json(self) -> dict[str, Any]:
        usable = self.usable_relays()
        return {
            "exit_code": self.exit_code,
            "mode": "relay" if self.relays else "outbox",
            "outbox": str(self.outbox) if self.outbox is not None else None,
            "relays": [{"name": name, "usable": name in usable} for name in self.relays],
            "endpoints": [report.to_json() for report in self.endpoints],
            "send_test": self.send_test.to_json() if self.send_test is not None else None,
            "notes": list(self.notes),
            "duration_ms": self.duration_ms,
            "checked_at": self.checked_at.isoformat(),
        }

    def render_text(self) -> str:
        if not self.relays:
            return "\n".join([f"no relay is configured: mail goes to the local outbox at {self.outbox}",
                              "(set EMAIL_HOST, or MAILWATCHD_RELAYS, to send through a relay)", *self.notes])
        lines = [f"mailwatchd check: {len(self.relays)} relay(s), {len(self.endpoints)} endpoint(s), "
                 f"{self.duration_ms:.0f} ms", ""]
        for report in self.endpoints:
            lines += _render_endpoint(report)
        if self.send_test is not None:
            lines += _render_endpoint(self.send_test, title=f"send test to {self.send_test_to} via")
        lines += self.notes
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        usable = self.usable_relays()
        down = [name for name in self.relays if name not in usable]
        code = self.exit_code
        if code == 0:
            return "verdict: OK (exit 0): every relay endpoint works"
        if code == 2:
            return "verdict: MAIL CANNOT FLOW (exit 2): no relay is usable; mail waits in the spool"
        broken = ", ".join(f"{r.relay} {r.endpoint}" for r in self.endpoints if not r.ok)
        problems = f"relay(s) down: {', '.join(down)}; " if down else ""
        if self.send_test is not None and not self.send_test.ok:
            broken = ", ".join(filter(None, [broken, "the test message"]))
        return f"verdict: DEGRADED (exit 1): {problems}failing: {broken}; mail flows through {', '.join(usable)}"


def _render_endpoint(finding: Finding, title: str = "relay") -> list[str]:
    report = finding.report
    state = "OK" if report.ok else f"FAILED ({report.cause.value})"
    lines = [f"{title} {report.relay!r}, endpoint {report.endpoint}: {state}"]
    for step in report.steps:
        lines.append(f"  {step.name:<9}{step.ms:>9.1f} ms  {'ok  ' if step.ok else 'FAIL'}  {step.detail}")
    if report.cert_days_left is not None:
        lines.append(f"  certificate: {report.cert_days_left} days left ({report.tls_version})")
    if not report.ok:
        lines.append(f"  cause: {report.cause.value}")
        lines.append(f"  fix: {finding.hint}")
    else:
        lines.append(f"  result: {report.detail}")
    if finding.alternatives:
        alts = "; ".join(f"{alt.port}/{alt.tls.value} " + (f"works (answered in {alt.answered_ms:g} ms)" if alt.ok
                                                              else alt.cause.value) for alt in finding.alternatives)
        lines.append(f"  also tried on {report.host}: {alts}")
    lines.append("")
    return lines


def alternative_endpoints(host: str, alt_ports: Sequence[AltPort], configured: Sequence[Endpoint]) -> list[Endpoint]:
    """What else to probe on `host`: the usual modes of the usual ports (a bare port number in
    `alt_ports` means each usual mode of it: 465 implicit TLS, 587 STARTTLS), then the usual modes of
    each configured port (465/ssl for a 465/starttls endpoint; either mode for an unusual port) —
    every (port, mode) that is not configured already, once."""
    taken = {(endpoint.port, endpoint.tls) for endpoint in configured if endpoint.host == host}
    wanted: list[tuple[int, TlsMode]] = []
    for alt in alt_ports:
        wanted += [alt] if isinstance(alt, tuple) else [(alt, mode) for mode in usual_modes(alt)]
    for endpoint in configured:
        if endpoint.host == host and endpoint.tls is not TlsMode.NONE:  # plain SMTP was chosen on purpose
            wanted += [(endpoint.port, mode) for mode in usual_modes(endpoint.port)]
    endpoints = []
    for port, mode in dict.fromkeys(wanted):
        if (port, mode) not in taken:
            endpoints.append(Endpoint(host, port, mode))
    return endpoints


def alternatives_for(endpoint: Endpoint, cause: Cause, probed: Sequence[ProbeReport],
                     configured_ports: set[int]) -> list[ProbeReport]:
    """The alternatives that say something about this endpoint's failure: the usual other ports, and
    the other modes of its own port unless nothing answered there at all. Its own port first."""
    same_port = [] if cause in TCP_CAUSES else [alt for alt in probed if alt.port == endpoint.port]
    return same_port + [alt for alt in probed if alt.port not in configured_ports]


def send_test_sender(relay: RelayConfig, helo_name: str) -> str:
    """Who the test message is from: the relay's login when it is an address, else mailwatchd@<helo name>."""
    user = relay.username
    if user is not None:
        try:
            return str(check_address(user, "sender"))
        except MalformedMessage:
            pass
    return f"mailwatchd@{helo_name}"


async def run_check(settings: Settings, *, send_test_to: str | None = None, send_test_from: str | None = None,
                    resolve: Resolver | None = None,
                    alt_ports: Sequence[AltPort] = DEFAULT_ALT_PORTS) -> CheckReport:
    """Probe every endpoint of every relay (and the alternatives) concurrently; optionally send a test."""
    if send_test_to is not None:
        SendTest(send_test_from or "mailwatchd@example.invalid", send_test_to)  # ValueError before any probe
    start = time.perf_counter()
    checked_at = datetime.now(UTC)
    if not settings.relays:
        notes = [f"send test skipped: no relay is configured ({send_test_to} not sent)"] if send_test_to else []
        return CheckReport(endpoints=[], relays=[], duration_ms=0.0, checked_at=checked_at,
                           outbox=settings.outbox, send_test_to=send_test_to, notes=notes)
    targets = [(relay, endpoint) for relay in settings.relays for endpoint in relay.endpoints]
    alt_targets: list[tuple[RelayConfig, Endpoint]] = []
    for relay in settings.relays:
        if relay.api is not None:
            continue  # an HTTPS API has one port and one mode
        anonymous = replace(relay, username=None, password=None, auth=AuthMethod.PASSWORD, oauth=None)  # no logins
        for host in dict.fromkeys(endpoint.host for endpoint in relay.endpoints):
            alt_targets += [(anonymous, alt) for alt in alternative_endpoints(host, alt_ports, relay.endpoints)]
    contexts: TlsContexts = {}
    tokens = Tokens()  # the relays' endpoints share one token fetch each
    results = await asyncio.gather(*(probe_endpoint(relay, endpoint, settings, resolve=resolve, contexts=contexts,
                                                    tokens=tokens)
                                     for relay, endpoint in targets + alt_targets))
    reports, alt_reports = list(results[: len(targets)]), results[len(targets):]
    findings: list[Finding] = []
    for (relay, endpoint), report in zip(targets, reports, strict=True):
        finding = Finding(report)
        findings.append(finding)
        if report.ok:
            continue
        probed = [alt for (alt_relay, alt_endpoint), alt in zip(alt_targets, alt_reports, strict=True)
                  if alt_relay.name == relay.name and alt_endpoint.host == endpoint.host]
        configured_ports = {ep.port for ep in relay.endpoints if ep.host == endpoint.host}
        if report.cause in ALT_CAUSES:
            finding.alternatives = alternatives_for(endpoint, report.cause, probed, configured_ports)
        siblings = [r for r in reports if r.relay == relay.name]
        tried = Tried.of(endpoint, [*siblings, *probed],
                         other_ports_probed=any(alt.port not in configured_ports for alt in probed))
        fallback = next((r.endpoint for r in siblings if r.ok), None)
        finding.hint = hint_for(report.cause, endpoint, report.detail, relay=relay,
                                alternatives=finding.alternatives, fallback=fallback, tried=tried)
    check = CheckReport(endpoints=findings, relays=[relay.name for relay in settings.relays], duration_ms=0.0,
                        checked_at=checked_at, send_test_to=send_test_to)
    blocked = smtp_blocked_note(settings.relays, reports, list(alt_reports))
    if blocked:
        check.notes.append(blocked)
    if send_test_to is not None:
        healthy = next(((relay, r.endpoint) for relay in settings.relays for r in reports
                        if r.relay == relay.name and r.ok), None)
        if healthy is None:
            check.notes.append(f"send test skipped: no usable relay ({send_test_to} not sent)")
        else:
            relay, endpoint = healthy
            test = SendTest(send_test_from or send_test_sender(relay, settings.ehlo_name), send_test_to)
            report = await probe_endpoint(relay, endpoint, settings, resolve=resolve, send_test=test,
                                          contexts=contexts, tokens=tokens)
            check.send_test = Finding(report, hint_for(report.cause, endpoint, report.detail, relay=relay))
    check.duration_ms = round((time.perf_counter() - start) * 1000, 1)
    return check
