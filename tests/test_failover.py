"""Failover scenarios from the incidents, end to end through a real daemon child."""

from __future__ import annotations

import datetime
import json
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import LOOPBACK, LoopbackController, RecordingHandler, SmtpServer, wait_until
from tests.daemonproc import drop, message, relay_env, run_cli, spool_names
from tests.rawservers import BlackHole


class QuotaExceeded(RecordingHandler):
    """Gmail's answer once the daily sending limit is reached."""

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        return "550 5.4.5 Daily user sending quota exceeded."


def test_blackholed_587_fails_over_to_465_and_check_says_so(
        smtp_server_factory: Any, spool_dir: Path, ca_file: Path, clean_env: dict[str, str], daemons: Any) -> None:
    tls_server = smtp_server_factory(implicit_tls=True)
    with BlackHole() as hole:
        env = relay_env(clean_env, spool_dir, "localhost", hole.port, EMAIL_USE_TLS="true",
                        EMAIL_SSL_CAFILE=str(ca_file), MAILWATCHD_FALLBACK_PORTS=f"{tls_server.port}/ssl",
                        MAILWATCHD_CONNECT_TIMEOUT="1s")
        daemon = daemons(env)
        for index in range(3):
            drop(spool_dir, message(index), f"m{index}")
        received = tls_server.handler.wait_for(3)
        assert all(item.tls for item in received)
        down = daemon.wait_event("relay_down", lambda e: str(hole.port) in e["endpoint"])[0]
        assert down["cause"] == "connect_timeout"
        # The circuit breaker spares later messages the black hole's timeout: at most the two
        # workers' first, concurrent attempts paid it, never the third message.
        assert len(daemon.named("relay_failover")) <= 2

        started = time.monotonic()
        result = run_cli(env, "check", "--json")
        elapsed = time.monotonic() - started
    report = json.loads(result.stdout)
    by_port = {entry["port"]: entry for entry in report["endpoints"]}
    assert by_port[hole.port]["ok"] is False and by_port[hole.port]["cause"] == "connect_timeout"
    assert by_port[tls_server.port]["ok"] is True and by_port[tls_server.port]["tls"] in ("ssl", "implicit")
    assert by_port[hole.port]["hint"]
    assert result.returncode in (0, 1), "mail can flow through 465"
    assert elapsed < 15, f"check took {elapsed:.1f}s: a black hole must cost one connect timeout"


def test_a_blackholed_primary_costs_a_fraction_of_a_second_not_a_connect_timeout(
        smtp_server_factory: Any, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    fallback = smtp_server_factory(starttls=False)
    with BlackHole() as hole:
        env = relay_env(clean_env, spool_dir, LOOPBACK, hole.port, MAILWATCHD_CONNECT_TIMEOUT="5s",
                        MAILWATCHD_CONCURRENCY="2", MAILWATCHD_RELAYS=f"smtp://{LOOPBACK}:{fallback.port}?name=fallback")
        daemon = daemons(env)
        started = time.monotonic()
        drop(spool_dir, message(0), "m0")
        fallback.handler.wait_for(1)
        first_after = time.monotonic() - started
        for index in range(1, 200):
            drop(spool_dir, message(index), f"m{index}")
        received = fallback.handler.wait_for(200, timeout=30)
        down = daemon.wait_event("relay_down", lambda e: str(hole.port) in e["endpoint"])[0]
        wait_until(lambda: not any(spool_names(spool_dir, "new", "queue", "deferred").values()),
                   message="an empty spool")
        assert daemon.stop() == 0
    # The hedge delay, not the 5 s connect timeout (generous bound for a loaded machine: speed is
    # measured in benchmarks/failover.py).
    assert first_after < 2.5, f"the first message reached the fallback {first_after:.1f}s after it was dropped"
    ids = sorted(int(item.data.split(b"Message-ID: <msg-")[1].split(b"@")[0]) for item in received)
    assert ids == list(range(200)), "every message arrived exactly once"
    assert len(fallback.handler.messages) == 200
    assert down["cause"] == "connect_timeout"
    assert len([e for e in daemon.named("relay_down") if str(hole.port) in e["endpoint"]]) == 1
    assert not [e for e in daemon.named("relay_up") if str(hole.port) in e["endpoint"]]
    assert len(daemon.named("relay_hedged")) <= 2, "at most each worker's first message waited for the hedge"
    assert not daemon.named("message_failed")


def test_primary_auth_failure_falls_back_to_the_second_provider(
        smtp_server_factory: Any, spool_dir: Path, ca_file: Path, clean_env: dict[str, str], daemons: Any) -> None:
    primary = smtp_server_factory(users={"app": "right-password"})
    fallback = smtp_server_factory()
    env = relay_env(clean_env, spool_dir, "localhost", primary.port, EMAIL_USE_TLS="true",
                    EMAIL_SSL_CAFILE=str(ca_file), EMAIL_HOST_USER="app", EMAIL_HOST_PASSWORD="wrong-password",
                    MAILWATCHD_RELAYS=f"smtp+tls://localhost:{fallback.port}?name=fallback&cafile={ca_file}")
    daemon = daemons(env)
    for index in range(3):
        drop(spool_dir, message(index), f"m{index}")
    fallback.handler.wait_for(3)
    assert primary.handler.messages == []
    assert daemon.wait_event("relay_down", lambda e: e["relay"] == "localhost")[0]["cause"] == "auth_failed"
    wait_until(lambda: not any(spool_names(spool_dir, "new", "queue", "deferred", "failed").values()),
               message="an empty spool: nothing bounced")
    assert not daemon.named("message_failed")
    assert all("wrong-password" not in line for line in daemon.raw_lines)


def test_quota_reply_spills_over_to_the_next_relay(smtp_server_factory: Any, spool_dir: Path,
                                                   clean_env: dict[str, str], daemons: Any) -> None:
    gmail = smtp_server_factory(QuotaExceeded(), starttls=False)
    backup = smtp_server_factory(starttls=False)
    env = relay_env(clean_env, spool_dir, gmail.host, gmail.port,
                    MAILWATCHD_RELAYS=f"smtp://{backup.host}:{backup.port}?name=backup")
    daemon = daemons(env)
    drop(spool_dir, message(1), "m1")
    backup.handler.wait_for(1)
    delivered = daemon.wait_event("message_delivered")[0]
    assert delivered["relay"] == "backup"
    assert not daemon.named("message_failed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def test_all_relays_down_then_back_drains_within_seconds(spool_dir: Path, clean_env: dict[str, str],
                                                         daemons: Any) -> None:
    port = free_port()
    env = relay_env(clean_env, spool_dir, LOOPBACK, port, MAILWATCHD_PROBE_INTERVAL_DOWN="300ms")
    daemon = daemons(env)
    for index in range(5):
        drop(spool_dir, message(index), f"m{index}")
    daemon.wait_event("relay_down")
    daemon.wait_event("message_queued", count=5)
    assert not daemon.named("message_failed")
    assert len(spool_names(spool_dir, "queue")["queue"]) == 5
    status = run_cli(env, "status", "--json")
    assert status.returncode == 2 and json.loads(status.stdout)["status"]["relays"][0]["health"] == "down"

    handler = RecordingHandler()
    controller = LoopbackController(handler, hostname=LOOPBACK, port=port)
    controller.start()
    try:
        back = time.monotonic()
        handler.wait_for(5, timeout=20)
        drained_in = time.monotonic() - back
        assert drained_in < 5, f"the queue drained {drained_in:.1f}s after the relay came back"
        daemon.wait_event("relay_up")
    finally:
        controller.stop()
    assert not daemon.named("message_failed")


def test_reload_switches_relay_and_keeps_the_old_one_on_a_bad_file(
        smtp_server_factory: Any, spool_dir: Path, clean_env: dict[str, str], daemons: Any, tmp_path: Path) -> None:
    first = smtp_server_factory(starttls=False)
    second = smtp_server_factory(starttls=False)
    config = tmp_path / "mailwatchd.env"
    config.write_text(f"EMAIL_HOST={first.host}\nEMAIL_PORT={first.port}\n")
    env = relay_env(clean_env, spool_dir, first.host, first.port)
    for key in ("EMAIL_HOST", "EMAIL_PORT"):
        env.pop(key)
    daemon = daemons(env, "--config", str(config))
    drop(spool_dir, message(1), "m1")
    first.handler.wait_for(1)

    config.write_text("EMAIL_HOST=x\nEMAIL_USE_TLS=true\nEMAIL_USE_SSL=true\n")
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_event("config_reload_failed")[0]
    assert failed["key"] == "EMAIL_USE_SSL"
    drop(spool_dir, message(2), "m2")
    first.handler.wait_for(2)

    config.write_text(f"EMAIL_HOTS={second.host}\nEMAIL_PORT={second.port}\n")  # a typo: no relay at all
    daemon.signal(signal.SIGHUP)
    typo = daemon.wait_event("config_reload_failed", count=2)[1]
    assert (typo["key"], typo["fix"]) == ("EMAIL_HOTS", "did you mean EMAIL_HOST?")

    config.write_text(f"EMAIL_HOST={second.host}\nEMAIL_PORT={second.port}\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("config_reloaded")
    drop(spool_dir, message(3), "m3")
    assert b"test 3" in second.handler.wait_for(1)[0].data
    assert len(first.handler.messages) == 2


def test_a_stop_wakes_workers_waiting_for_a_relay_at_once(spool_dir: Path, clean_env: dict[str, str],
                                                         daemons: Any) -> None:
    """Every relay down, mail waiting: SIGTERM ends the daemon at once, not on a worker's next tick."""
    env = relay_env(clean_env, spool_dir, LOOPBACK, free_port(), MAILWATCHD_CONCURRENCY="3",
                    MAILWATCHD_PROBE_INTERVAL="1h", MAILWATCHD_PROBE_INTERVAL_DOWN="1h")
    daemon = daemons(env)
    daemon.wait_event("relay_down")  # the start-up probe opened the breaker: workers wait for the relay
    drop(spool_dir, message(1), "m1")
    daemon.wait_event("message_queued")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(10) == 0
    assert time.monotonic() - started < 2.0  # a worker's idle loop goes round only every 5 s
    assert spool_names(spool_dir, "queue")["queue"]


def test_reload_lowers_and_raises_the_number_of_workers(
        smtp_server_factory: Any, spool_dir: Path, clean_env: dict[str, str], daemons: Any, tmp_path: Path) -> None:
    server = smtp_server_factory(starttls=False)
    config = tmp_path / "mailwatchd.env"
    config.write_text(f"EMAIL_HOST={server.host}\nEMAIL_PORT={server.port}\nMAILWATCHD_CONCURRENCY=4\n")
    env = relay_env(clean_env, spool_dir, server.host, server.port)
    for key in ("EMAIL_HOST", "EMAIL_PORT"):
        env.pop(key)
    daemon = daemons(env, "--config", str(config))
    assert daemon.named("daemon_ready")[0]["concurrency"] == 4

    config.write_text(f"EMAIL_HOST={server.host}\nEMAIL_PORT={server.port}\nMAILWATCHD_CONCURRENCY=1\n")
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_event("config_reloaded")[0]["workers"] == "4 -> 1"
    for index in range(3):
        drop(spool_dir, message(index), f"m{index}")
    server.handler.wait_for(3)

    config.write_text(f"EMAIL_HOST={server.host}\nEMAIL_PORT={server.port}\nMAILWATCHD_CONCURRENCY=2\n")
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_event("config_reloaded", count=2)[1]["workers"] == "1 -> 2"
    drop(spool_dir, message(9), "m9")
    server.handler.wait_for(4)
    assert not daemon.named("worker_crashed")


def test_status_reports_a_running_healthy_daemon(smtp_server: SmtpServer, spool_dir: Path,
                                                 clean_env: dict[str, str], daemons: Any) -> None:
    env = relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port)
    stopped = run_cli(env, "status")
    assert stopped.returncode == 2 and stopped.stdout.startswith(b"MAILWATCHD CRITICAL - mailwatchd is not running")
    daemon = daemons(env)
    drop(spool_dir, message(1), "m1")
    smtp_server.handler.wait_for(1)
    daemon.wait_event("relay_up")
    result = wait_until(lambda: (r := run_cli(env, "status", "--json")).returncode == 0 and
                        json.loads(r.stdout)["status"]["totals"]["delivered"] == 1 and r, message="status")
    status = json.loads(result.stdout)["status"]
    assert status["pid"] == daemon.pid and status["healthy"] is True
    assert status["process"]["rss_bytes"] > 0 and status["process"]["open_fds"] > 0
    assert status["relays"][0]["health"] == "up"
    text = run_cli(env, "status")
    first = text.stdout.decode().splitlines()[0]
    assert text.returncode == 0 and first.startswith(f"MAILWATCHD OK - running (pid {daemon.pid})"), first
    assert "| queue_ready=0;;;0 queue_deferred=0;;;0 failed=0;1;;0 oldest_age=0s;3600;14400;0" in first


def test_per_minute_budget_spills_over_to_the_next_relay(smtp_server_factory: Any, spool_dir: Path,
                                                         clean_env: dict[str, str], daemons: Any) -> None:
    primary = smtp_server_factory(starttls=False)
    backup = smtp_server_factory(starttls=False)
    env = relay_env(clean_env, spool_dir, primary.host, primary.port, MAILWATCHD_MAX_PER_MINUTE="2",
                    MAILWATCHD_CONCURRENCY="1",
                    MAILWATCHD_RELAYS=f"smtp://{backup.host}:{backup.port}?name=backup")
    daemon = daemons(env)
    for index in range(5):
        drop(spool_dir, message(index), f"m{index}")
    daemon.wait_event("message_delivered", count=5)
    assert len(primary.handler.messages) == 2
    assert len(backup.handler.messages) == 3
    assert not daemon.named("message_failed")


def test_certificate_close_to_expiry_is_warned_about(smtp_server_factory: Any, ca: Any, ca_file: Path,
                                                     spool_dir: Path, clean_env: dict[str, str],
                                                     daemons: Any) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert = ca.issue_cert("localhost", not_before=now - datetime.timedelta(days=80),
                         not_after=now + datetime.timedelta(days=5, hours=12))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    server = smtp_server_factory(tls_context=context)
    env = relay_env(clean_env, spool_dir, "localhost", server.port, EMAIL_USE_TLS="true",
                    EMAIL_SSL_CAFILE=str(ca_file))
    daemon = daemons(env)
    warning = daemon.wait_event("certificate_expiring")[0]
    assert warning["days_left"] == 5 and warning["relay"] == "localhost"
    drop(spool_dir, message(1), "m1")
    server.handler.wait_for(1)  # still valid: mail flows
