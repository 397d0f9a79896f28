"""The monitoring verdict of a status snapshot: every condition an operator must hear about moves the state,
and the first line names the worst reason first (service/verdict.py). End to end: test_monitoring in
tests/systemd, test_status_* in test_failover.py and the CLI tests below."""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from mailwatchd.service.statusfile import Status
from mailwatchd.service.verdict import Perf, State, judge_status

from .conftest import RecordingHandler, SmtpServer, wait_until
from .daemonproc import drop, message, relay_env, run_cli

NOW = 1_800_000_000.0
ENDPOINT = "smtp.example.com:587/starttls"


def healthy() -> Status:
    return {
        "pid": 4242, "system": True, "started_at": NOW - 600, "updated_at": NOW - 2, "healthy": True,
        "problem": None, "degraded": None, "reload_error": None, "mode": "relay", "outbox": None,
        "relays": [{"name": "primary", "health": "up", "paused": False, "pause_cause": None, "last_delivery": NOW,
                    "endpoints": [{"endpoint": "smtp.example.com:587/starttls", "up": True, "cause": None,
                                   "detail": None, "last_probe": NOW - 30,
                                   "timings_ms": {"dns": 1.5, "connect": 12.25, "tls": 30.0, "auth": 40.0},
                                   "cert_days_left": 60}]}],
        "queue": {"ready": 1, "deferred": 2, "failed": 0, "in_flight": 1}, "failed_unacknowledged": 0,
        "thresholds": {"queue_age_warning": 3600.0, "queue_age_critical": 14400.0},
        "oldest_age_s": 30.0, "last_delivery": NOW - 5,
        "totals": {"delivered": 10, "deferred": 2, "failed": 0}, "process": {},
    }


def test_a_healthy_daemon_is_ok_with_performance_data() -> None:
    result = judge_status(healthy(), pid_alive=True, now=NOW)
    first = result.render().splitlines()[0]
    assert result.state is State.OK
    assert first == ("MAILWATCHD OK - running (pid 4242), 2 ready, 2 deferred, 0 failed; relays: primary up | "
                     "queue_ready=2;;;0 queue_deferred=2;;;0 failed=0;1;;0 oldest_age=30s;3600;14400;0 "
                     "'primary smtp.example.com:587/starttls dns'=1.5ms;;;0 "
                     "'primary smtp.example.com:587/starttls connect'=12.2ms;;;0 "
                     "'primary smtp.example.com:587/starttls tls'=30ms;;;0 "
                     "'primary smtp.example.com:587/starttls auth'=40ms;;;0 "
                     "'primary smtp.example.com:587/starttls cert_days'=60;14;3")


def _with(**changes: Any) -> Status:
    status = copy.deepcopy(healthy())
    for key, value in changes.items():
        status[key] = value  # type: ignore[literal-required]
    return status


def _endpoint(status: Status, **changes: Any) -> Status:
    status["relays"][0]["endpoints"][0].update(changes)  # type: ignore[typeddict-item]
    return status


@pytest.mark.parametrize(("status", "state", "summary"), [
    (_with(failed_unacknowledged=3), State.WARNING, "3 failed message(s) (see `mailwatchd queue`"),
    (_with(oldest_age_s=2 * 3600.0), State.WARNING, "oldest queued message is 2.0h old"),
    (_with(oldest_age_s=5 * 3600.0), State.CRITICAL, "oldest queued message is 5.0h old"),
    (_endpoint(healthy(), cert_days_left=10), State.WARNING, f"certificate of {ENDPOINT} expires in 10 day(s)"),
    (_endpoint(healthy(), cert_days_left=2), State.CRITICAL, f"certificate of {ENDPOINT} expires in 2 day(s)"),
    (_with(updated_at=NOW - 95), State.CRITICAL, "status file is 95s old"),
    (_with(healthy=False, problem="worker 1 stuck"), State.CRITICAL, "unhealthy: worker 1 stuck"),
    (_with(degraded="spool full: 1.0 MiB free"), State.CRITICAL, "spool full: 1.0 MiB free"),
    (_with(reload_error="EMAIL_HOTS: unknown setting"), State.WARNING, "last reload failed, running with the previous"),
    (_with(mode="outbox", outbox="/var/spool/mailwatchd/outbox", relays=[]), State.CRITICAL,
     "no relay configured: mail stays in the local outbox /var/spool/mailwatchd/outbox"),
])
def test_each_condition_moves_the_state_and_leads_the_summary(status: Status, state: State, summary: str) -> None:
    result = judge_status(status, pid_alive=True, now=NOW)
    assert result.state is state
    assert result.render().startswith(f"MAILWATCHD {state.name} - {summary}")


def test_relays_down_warn_while_one_works_and_are_critical_when_none_does() -> None:
    status = healthy()
    status["relays"].append(copy.deepcopy(status["relays"][0]))
    status["relays"][1]["name"] = "backup"
    status["relays"][0]["health"] = "down"
    _endpoint(status, up=False, cause="connect_timeout")
    assert judge_status(status, pid_alive=True, now=NOW).render().startswith(
        "MAILWATCHD WARNING - relay down: primary (connect_timeout)")
    status["relays"][1]["health"] = "down"
    assert judge_status(status, pid_alive=True, now=NOW).render().startswith(
        "MAILWATCHD CRITICAL - no relay usable: primary (connect_timeout), backup")


def test_the_worst_reason_comes_first_and_a_dead_pid_means_not_running() -> None:
    status = _with(failed_unacknowledged=1, oldest_age_s=5 * 3600.0)
    assert judge_status(status, pid_alive=True, now=NOW).summary().startswith(
        "oldest queued message is 5.0h old; 1 failed message(s)")
    assert judge_status(status, pid_alive=False, now=NOW).render() == "MAILWATCHD CRITICAL - mailwatchd is not running"
    assert judge_status(None, pid_alive=False, now=NOW).state is State.CRITICAL


def test_a_per_user_outbox_is_ok_and_labels_with_odd_characters_are_quoted() -> None:
    status = _with(system=False, mode="outbox", outbox="/home/u/outbox", relays=[])
    result = judge_status(status, pid_alive=True, now=NOW)
    assert result.state is State.OK and result.summary().endswith("delivering to the local outbox /home/u/outbox")
    assert Perf("it's odd", 1.5, "ms").render() == "'its odd'=1.5ms;;;0"


class RefuseSender(RecordingHandler):
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "554 5.7.1 Sender address rejected: not owned by user"


# -- the commands ---------------------------------------------------------------------------------------------


def test_status_of_a_frozen_daemon_goes_critical_with_the_age(smtp_server: SmtpServer, spool_dir: Path,
                                                             clean_env: dict[str, str], daemons: Any) -> None:
    env = relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port)
    daemon = daemons(env)
    drop(spool_dir, message(1), "m1")
    smtp_server.handler.wait_for(1)
    wait_until(lambda: run_cli(env, "status").returncode == 0, message="status OK")
    status_file = spool_dir / "status.json"
    os.kill(daemon.pid, signal.SIGSTOP)  # frozen: alive, but no longer rewriting its status
    try:
        data = json.loads(status_file.read_text())
        data["updated_at"] = time.time() - 120  # what two minutes of being frozen leave behind
        status_file.write_text(json.dumps(data))
        done = run_cli(env, "status")
        assert done.returncode == 2
        assert done.stdout.decode().startswith("MAILWATCHD CRITICAL - status file is 120s old")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def test_a_permanent_failure_makes_status_and_check_warn(smtp_server_factory: Any, spool_dir: Path,
                                                        clean_env: dict[str, str], daemons: Any) -> None:
    relay = smtp_server_factory(RefuseSender(), starttls=False)
    env = relay_env(clean_env, spool_dir, relay.host, relay.port)
    daemon = daemons(env)
    drop(spool_dir, message(1), "m1")
    daemon.wait_event("message_failed")
    done = wait_until(lambda: (r := run_cli(env, "status")).returncode == 1 and r, message="status WARNING")
    assert done.stdout.decode().startswith("MAILWATCHD WARNING - 1 failed message(s)")
    check = run_cli(env, "check")
    first = check.stdout.decode().splitlines()[0]
    assert check.returncode == 1 and first.startswith("MAILWATCHD WARNING - 1 failed message(s)"), first
    assert f"'127.0.0.1 127.0.0.1:{relay.port}/none connect'=" in first and " failed=1;1;;0" in first
