"""`mailwatchd check`: every endpoint probed at once, alternatives found, hints, JSON, exit codes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mailwatchd.relays.diagnosis import (
    DEFAULT_ALT_PORTS,
    CheckReport,
    Tried,
    alternative_endpoints,
    hint_for,
    run_check,
)
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, Secret, TlsMode
from mailwatchd.transports.outcome import Cause
from tests.conftest import LOOPBACK, SmtpServer
from tests.daemonproc import run_cli
from tests.probe_servers import RejectMailHandler, RejectRcptHandler, closed_port, probe_settings
from tests.rawservers import BlackHole

Factory = Callable[..., SmtpServer]


def relay(name: str, *endpoints: tuple[int, TlsMode], cafile: Path | None = None, user: str | None = None,
          password: str | None = None) -> RelayConfig:
    return RelayConfig(name=name, endpoints=tuple(Endpoint(LOOPBACK, port, tls) for port, tls in endpoints),
                       username=user, password=Secret(password) if password else None, cafile=cafile)


def check(settings: Settings, relays: tuple[RelayConfig, ...], **kwargs: Any) -> CheckReport:
    kwargs.setdefault("alt_ports", ())
    return asyncio.run(run_check(replace(settings, relays=relays), **kwargs))


@pytest.fixture
def refused_port() -> Iterator[int]:
    with closed_port() as port:
        yield port


def test_blocked_587_with_465_answering_names_465_and_how_to_configure_it(
        smtp_server_factory: Factory, ca_file: Path, tmp_path: Path, refused_port: int) -> None:
    implicit = smtp_server_factory(implicit_tls=True)
    settings = probe_settings(tmp_path, connect_timeout=0.5, command_timeout=2.0)
    with BlackHole() as hole:
        primary = RelayConfig(name=LOOPBACK, endpoints=(Endpoint(LOOPBACK, hole.port, TlsMode.STARTTLS),),
                              username="alice@example.com", password=Secret("pw-not-shown"), cafile=ca_file)
        started = time.monotonic()
        report = check(settings, (primary,), alt_ports=((implicit.port, TlsMode.IMPLICIT),
                                                         (refused_port, TlsMode.STARTTLS)))
        elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 0.5, elapsed  # the alternatives ran alongside, not after the timeout
    [blocked] = report.endpoints
    assert blocked.cause is Cause.CONNECT_TIMEOUT
    assert [(alt.port, alt.ok, alt.cause) for alt in blocked.alternatives] == [
        (implicit.port, True, Cause.OK), (refused_port, False, Cause.CONNECTION_REFUSED)]
    assert "auth" not in blocked.alternatives[0].timings_ms  # alternatives never log in
    answered = blocked.alternatives[0].answered_ms
    assert blocked.hint == (
        f"port {hole.port} looks blocked by a firewall: connects time out; {implicit.port} answered in "
        f"{answered:g} ms — set EMAIL_PORT={implicit.port} and EMAIL_USE_SSL=true (with EMAIL_USE_TLS=false) "
        f"(or smtp+ssl://{LOOPBACK}:{implicit.port} in MAILWATCHD_RELAYS), or ask the network admin to allow "
        f"outbound {hole.port}")
    assert report.exit_code == 2
    text = report.render_text()
    assert blocked.hint in text and "connect_timeout" in text and f"{implicit.port}/ssl works" in text
    assert "pw-not-shown" not in text + json.dumps(report.to_json())


def test_many_black_holed_endpoints_take_one_connect_timeout_together(tmp_path: Path) -> None:
    settings = probe_settings(tmp_path, connect_timeout=0.5)
    with BlackHole() as first, BlackHole() as second, BlackHole() as third:
        relays = (relay("primary", (first.port, TlsMode.STARTTLS), (second.port, TlsMode.IMPLICIT)),
                  relay("fallback", (third.port, TlsMode.STARTTLS)))
        started = time.monotonic()
        report = check(settings, relays, alt_ports=((third.port, TlsMode.IMPLICIT),))
        elapsed = time.monotonic() - started
    assert [r.cause for r in report.endpoints] == [Cause.CONNECT_TIMEOUT] * 3
    assert [alt.cause for alt in report.endpoints[0].alternatives] == [Cause.CONNECT_TIMEOUT]
    assert report.exit_code == 2
    assert elapsed < 0.5 + 0.4, elapsed


def test_alternatives_that_fail_too_are_named(tmp_path: Path, refused_port: int) -> None:
    settings = probe_settings(tmp_path, connect_timeout=0.5)
    with closed_port() as other:
        report = check(settings, (relay("r", (refused_port, TlsMode.STARTTLS)),),
                       alt_ports=((other, TlsMode.IMPLICIT), (refused_port, TlsMode.STARTTLS)))
    [down] = report.endpoints
    assert [alt.port for alt in down.alternatives] == [other]  # the configured port is not an alternative
    assert f"alternative ports failed too ({other}/ssl connection_refused)" in down.hint


def test_json_shape(smtp_server_factory: Factory, ca_file: Path, tmp_path: Path, refused_port: int) -> None:
    up = smtp_server_factory()
    report = check(probe_settings(tmp_path), (relay("main", (up.port, TlsMode.STARTTLS), (refused_port, TlsMode.NONE),
                                                     cafile=ca_file),))
    data = json.loads(json.dumps(report.to_json()))
    assert data["exit_code"] == 1 and data["mode"] == "relay"
    assert data["relays"] == [{"name": "main", "usable": True}]
    assert [(e["port"], e["tls"], e["ok"], e["cause"]) for e in data["endpoints"]] == [
        (up.port, "starttls", True, "ok"), (refused_port, "none", False, "connection_refused")]
    for entry in data["endpoints"]:
        assert {"relay", "host", "port", "tls", "ok", "cause", "detail", "hint", "timings_ms", "cert_days_left",
                "alternatives", "steps", "extensions", "tls_version", "checked_at"} <= entry.keys()
        assert entry["host"] == LOOPBACK and all(isinstance(ms, float) for ms in entry["timings_ms"].values())
    assert data["endpoints"][0]["cert_days_left"] > 0 and data["endpoints"][0]["hint"] == ""
    assert f"mail still flows through the configured {LOOPBACK}:{up.port}/starttls" in data["endpoints"][1]["hint"]


@pytest.mark.parametrize(("first_up", "second_up", "code"), [(True, True, 0), (True, False, 1), (False, False, 2),
                                                            (False, True, 1)])
def test_exit_codes_with_two_relays(first_up: bool, second_up: bool, code: int, smtp_server_factory: Factory,
                                    ca_file: Path, tmp_path: Path, refused_port: int) -> None:
    def port(up: bool) -> int:
        return smtp_server_factory().port if up else refused_port

    relays = (relay("primary", (port(first_up), TlsMode.STARTTLS), cafile=ca_file),
              relay("fallback", (port(second_up), TlsMode.STARTTLS), cafile=ca_file))
    report = check(probe_settings(tmp_path), relays)
    assert report.exit_code == code
    assert report.render_text().splitlines()[-1].startswith(
        {0: "verdict: OK (exit 0)", 1: "verdict: DEGRADED (exit 1)", 2: "verdict: MAIL CANNOT FLOW (exit 2)"}[code])


def test_send_test_goes_through_the_first_usable_relay(smtp_server_factory: Factory, ca_file: Path,
                                                       tmp_path: Path, refused_port: int) -> None:
    fallback = smtp_server_factory()
    relays = (relay("primary", (refused_port, TlsMode.STARTTLS)),
              relay("fallback", (fallback.port, TlsMode.STARTTLS), cafile=ca_file))
    report = check(probe_settings(tmp_path), relays, send_test_to="ops@example.org")
    assert report.send_test is not None and report.send_test.ok, report.send_test
    assert report.send_test.relay == "fallback"
    assert fallback.handler.wait_for(1)[0].rcpt_tos == ["ops@example.org"]
    assert report.exit_code == 1
    assert "send test to ops@example.org via 'fallback'" in report.render_text()


def test_send_test_from_an_address_the_relay_accepts(smtp_server_factory: Factory, ca_file: Path,
                                                     tmp_path: Path) -> None:
    """A relay that enforces the sender identity (SendGrid's login is 'apikey') is tested with --from."""
    identity = "550 5.7.1 The from address does not match a verified Sender Identity"
    server = smtp_server_factory(RejectMailHandler(identity, allowed="alerts@example.com"))
    relays = (relay("sendgrid", (server.port, TlsMode.STARTTLS), cafile=ca_file),)
    refused = check(probe_settings(tmp_path), relays, send_test_to="ops@example.org")
    assert refused.send_test is not None and refused.send_test.cause is Cause.SENDER_REJECTED
    accepted = check(probe_settings(tmp_path), relays, send_test_to="ops@example.org",
                     send_test_from="alerts@example.com")
    assert accepted.send_test is not None and accepted.send_test.ok and accepted.exit_code == 0
    assert server.handler.wait_for(1)[0].mail_from == "alerts@example.com"


def test_send_test_refused_sender_makes_the_relay_unusable(smtp_server_factory: Factory, ca_file: Path,
                                                           tmp_path: Path) -> None:
    server = smtp_server_factory(RejectMailHandler("550 5.7.1 Sender address not verified"))
    report = check(probe_settings(tmp_path), (relay("only", (server.port, TlsMode.STARTTLS), cafile=ca_file),),
                   send_test_to="ops@example.org")
    assert report.send_test is not None and report.send_test.cause is Cause.SENDER_REJECTED
    assert report.exit_code == 2
    assert report.to_json()["send_test"]["cause"] == "sender_rejected"


def test_send_test_refused_recipient_leaves_the_relay_usable(smtp_server_factory: Factory, ca_file: Path,
                                                             tmp_path: Path) -> None:
    server = smtp_server_factory(RejectRcptHandler("550 5.1.1 No such user"))
    report = check(probe_settings(tmp_path), (relay("only", (server.port, TlsMode.STARTTLS), cafile=ca_file),),
                   send_test_to="nobody@example.org")
    assert report.send_test is not None and report.send_test.cause is Cause.RECIPIENT_REJECTED
    assert report.exit_code == 1
    assert report.usable_relays() == ["only"]


def test_send_test_address_is_checked_before_probing(tmp_path: Path, refused_port: int) -> None:
    with pytest.raises(ValueError, match="not an e-mail address"):
        check(probe_settings(tmp_path), (relay("r", (refused_port, TlsMode.STARTTLS)),), send_test_to="no address")


def test_no_relay_reports_the_outbox(tmp_path: Path) -> None:
    settings = probe_settings(tmp_path)
    report = check(settings, (), send_test_to="ops@example.org")
    assert report.exit_code == 0
    text = report.render_text()
    assert "no relay is configured" in text and str(settings.outbox) in text and "send test skipped" in text
    data = report.to_json()
    assert (data["mode"], data["outbox"], data["endpoints"]) == ("outbox", str(settings.outbox), [])


def test_render_text_shows_every_step_with_its_timing(smtp_server_factory: Factory, ca_file: Path,
                                                      tmp_path: Path) -> None:
    up = smtp_server_factory()
    report = check(probe_settings(tmp_path), (relay("main", (up.port, TlsMode.STARTTLS), cafile=ca_file),))
    text = report.render_text()
    [finding] = report.endpoints
    endpoint = finding.report
    for step in endpoint.steps:
        assert f"{step.name:<9}{step.ms:>9.1f} ms  ok" in text
    assert f"certificate: {endpoint.cert_days_left} days left" in text


def test_alternative_ports_skip_configured_ones_and_default_to_the_usual_modes() -> None:
    assert alternative_endpoints("smtp.example.com", (587, 465, 2525),
                                 [Endpoint("smtp.example.com", 587, TlsMode.STARTTLS)]) == [
        Endpoint("smtp.example.com", 465, TlsMode.IMPLICIT), Endpoint("smtp.example.com", 2525, TlsMode.STARTTLS)]


def test_every_usual_mode_of_each_port_is_an_alternative() -> None:
    host = "smtp.example.com"
    assert alternative_endpoints(host, DEFAULT_ALT_PORTS, [Endpoint(host, 465, TlsMode.STARTTLS)]) == [
        Endpoint(host, 587, TlsMode.STARTTLS), Endpoint(host, 465, TlsMode.IMPLICIT),
        Endpoint(host, 2525, TlsMode.STARTTLS)]
    assert alternative_endpoints(host, DEFAULT_ALT_PORTS, [Endpoint(host, 587, TlsMode.IMPLICIT)]) == [
        Endpoint(host, 587, TlsMode.STARTTLS), Endpoint(host, 465, TlsMode.IMPLICIT),
        Endpoint(host, 2525, TlsMode.STARTTLS)]
    assert alternative_endpoints(host, (), [Endpoint(host, 2465, TlsMode.IMPLICIT)]) == [
        Endpoint(host, 2465, TlsMode.STARTTLS)]  # a port with no usual mode: the other one
    assert alternative_endpoints(host, (), [Endpoint(host, 25, TlsMode.NONE)]) == []  # plain SMTP on purpose


def test_advice_never_suggests_the_usual_ports_once_they_failed(tmp_path: Path, refused_port: int) -> None:
    """The endpoint is refused and so is the stand-in for 465/ssl: no advice to try 465 or 587."""
    with closed_port() as other:
        report = check(probe_settings(tmp_path, connect_timeout=0.5),
                       (relay(LOOPBACK, (refused_port, TlsMode.STARTTLS)),), alt_ports=((other, TlsMode.IMPLICIT),))
    [down] = report.endpoints
    assert down.cause is Cause.CONNECTION_REFUSED
    assert [(alt.port, alt.tls, alt.cause) for alt in down.alternatives] == [
        (other, TlsMode.IMPLICIT, Cause.CONNECTION_REFUSED)]  # not the refused port in another mode
    assert f"the usual alternative ports failed too ({other}/ssl connection_refused)" in down.hint
    for advice in ("465 for implicit TLS", "587 for STARTTLS", "EMAIL_USE_SSL", "try another port"):
        assert advice not in down.hint


def test_advice_never_suggests_a_configured_endpoint_found_failing() -> None:
    host = "smtp.example.com"
    primary, fallback = Endpoint(host, 587, TlsMode.STARTTLS), Endpoint(host, 465, TlsMode.IMPLICIT)
    refused = _fake(fallback, ok=False, cause=Cause.CONNECTION_REFUSED)
    hint = hint_for(Cause.CONNECTION_REFUSED, primary, "refused", tried=Tried.of(primary, [refused]))
    assert "465" not in hint and "check EMAIL_HOST and EMAIL_PORT" in hint
    assert "465 for implicit TLS" in hint_for(Cause.CONNECTION_REFUSED, primary, "refused")  # nothing tried yet
    unavailable = hint_for(Cause.STARTTLS_UNAVAILABLE, primary, "", tried=Tried.of(primary, [refused]))
    assert "EMAIL_PORT=465" not in unavailable and "never disable TLS" in unavailable


def test_starttls_endpoint_on_an_implicit_tls_port_is_tried_with_implicit_tls(
        smtp_server_factory: Factory, ca_file: Path, tmp_path: Path) -> None:
    """A 465/starttls endpoint (here: an implicit-TLS-only server's port, configured STARTTLS)."""
    server = smtp_server_factory(implicit_tls=True)
    report = check(probe_settings(tmp_path, command_timeout=0.5),
                   (relay(LOOPBACK, (server.port, TlsMode.STARTTLS), cafile=ca_file),))
    [finding] = report.endpoints
    assert finding.cause is Cause.BANNER_TIMEOUT
    [alt] = finding.alternatives
    assert (alt.port, alt.tls, alt.ok) == (server.port, TlsMode.IMPLICIT, True)
    port = server.port
    assert finding.hint == (
        f"port {port} waits for a TLS handshake, not a plain greeting; {port}/ssl answered in {alt.answered_ms:g} ms "
        f"— keep EMAIL_PORT={port} and set EMAIL_USE_SSL=true (with EMAIL_USE_TLS=false) "
        f"(or smtp+ssl://{LOOPBACK}:{port} in MAILWATCHD_RELAYS)")
    assert f"also tried on {LOOPBACK}: {port}/ssl works" in report.render_text()


def test_implicit_tls_endpoint_on_a_plain_port_is_tried_with_starttls(
        smtp_server_factory: Factory, ca_file: Path, tmp_path: Path) -> None:
    with_starttls, without = smtp_server_factory(), smtp_server_factory(starttls=False)
    report = check(probe_settings(tmp_path), (relay("a", (with_starttls.port, TlsMode.IMPLICIT), cafile=ca_file),
                                              relay("b", (without.port, TlsMode.IMPLICIT), cafile=ca_file)))
    fixed, stuck = report.endpoints
    assert fixed.cause is stuck.cause is Cause.TLS_HANDSHAKE_FAILED
    assert f"{with_starttls.port}/starttls answered in" in fixed.hint
    assert f"use smtp+tls://{LOOPBACK}:{with_starttls.port} for relay a" in fixed.hint
    assert [(alt.tls, alt.cause) for alt in stuck.alternatives] == [(TlsMode.STARTTLS, Cause.STARTTLS_UNAVAILABLE)]
    assert "STARTTLS on it failed too (starttls_unavailable" in stuck.hint
    assert "EMAIL_USE_TLS=true" not in stuck.hint


@pytest.mark.parametrize("cause", [cause for cause in Cause if cause is not Cause.OK])
def test_every_failure_cause_has_a_hint(cause: Cause) -> None:
    hint = hint_for(cause, Endpoint("smtp.example.com", 587, TlsMode.STARTTLS), "550 some reply")
    assert hint and "—" in hint
    assert hint_for(Cause.OK, Endpoint("smtp.example.com", 587, TlsMode.STARTTLS), "") == ""


def test_hints_name_the_provider_specific_fix() -> None:
    gmail = Endpoint("smtp.gmail.com", 587, TlsMode.STARTTLS)
    assert "app password" in hint_for(Cause.AUTH_FAILED, gmail, "535 5.7.8 Username and Password not accepted")
    named = RelayConfig("sendgrid", (Endpoint("smtp.sendgrid.net", 587, TlsMode.STARTTLS),))
    assert "use smtp+ssl://smtp.sendgrid.net:465 for relay sendgrid" in hint_for(
        Cause.CONNECT_TIMEOUT, named.primary, "", relay=named,
        alternatives=[_fake_ok(Endpoint("smtp.sendgrid.net", 465, TlsMode.IMPLICIT))])
    assert "EMAIL_USE_SSL=true" in hint_for(Cause.BANNER_TIMEOUT, Endpoint("h", 465, TlsMode.STARTTLS), "")
    host = "smtp.example.com"
    django = RelayConfig(host, (Endpoint(host, 587, TlsMode.STARTTLS), Endpoint(host, 2525, TlsMode.STARTTLS)))
    assert "list 465/ssl in MAILWATCHD_FALLBACK_PORTS instead of 2525" in hint_for(
        Cause.CONNECT_TIMEOUT, django.endpoints[1], "", relay=django,
        alternatives=[_fake_ok(Endpoint(host, 465, TlsMode.IMPLICIT))])


def _fake_ok(endpoint: Endpoint) -> Any:
    return _fake(endpoint)


def _fake(endpoint: Endpoint, *, ok: bool = True, cause: Cause = Cause.OK) -> Any:
    """A probe report as data (what hints are computed from), without probing."""
    from datetime import UTC, datetime

    from mailwatchd.relays.probe import ProbeReport
    from mailwatchd.transports.outcome import Phase
    from mailwatchd.transports.smtpclient import Step
    steps = [Step("connect", Phase.CONNECT, True, 10.0), Step("tls", Phase.TLS, True, 20.0),
             Step("banner", Phase.GREETING, True, 11.0)] if ok else [Step("connect", Phase.CONNECT, False, 0.1)]
    return ProbeReport("r", endpoint.host, endpoint.port, endpoint.tls, ok, cause, "", steps, [], None, None,
                       datetime.now(UTC))


def test_cli_check_json_exit_code(clean_env: dict[str, str], tmp_path: Path, refused_port: int) -> None:
    env = {**clean_env, "EMAIL_HOST": LOOPBACK, "EMAIL_PORT": str(refused_port), "EMAIL_USE_TLS": "true",
           "MAILWATCHD_SPOOL": str(tmp_path / "spool"), "MAILWATCHD_HELO_NAME": "probe.mailwatchd.test",
           "MAILWATCHD_CONNECT_TIMEOUT": "1"}
    done = run_cli(env, "check", "--json")
    assert done.returncode == 2, done.stderr.decode()
    data = json.loads(done.stdout)
    assert data["endpoints"][0]["cause"] == "connection_refused"
    assert [alt["port"] for alt in data["endpoints"][0]["alternatives"]] == [587, 465, 2525]


def test_cli_check_send_test_from(clean_env: dict[str, str], tmp_path: Path, refused_port: int) -> None:
    env = {**clean_env, "EMAIL_HOST": LOOPBACK, "EMAIL_PORT": str(refused_port),
           "MAILWATCHD_SPOOL": str(tmp_path / "spool"), "MAILWATCHD_CONNECT_TIMEOUT": "1"}
    # check is a monitoring plugin: a usage problem is UNKNOWN (3), named on the first line.
    lone = run_cli(env, "check", "--from", "alerts@example.com")
    assert lone.returncode == 3 and lone.stdout.startswith(b"MAILWATCHD UNKNOWN - --from goes with --send-test")
    bad = run_cli(env, "check", "--send-test", "ops@example.org", "--from", "not an address")
    assert bad.returncode == 3 and bad.stdout.startswith(b"MAILWATCHD UNKNOWN - ")
    assert b"is not an e-mail address" in bad.stdout
