"""The SMTP listener of a real daemon child: apps that speak SMTP (Python's smtplib, Django's
default SMTP backend, swaks) hand mail to it on loopback, and it reaches the relay, completed the
way a null client completes it (cron's bare `root` goes to the admin address)."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psutil
import pytest

from mailwatchd import exitcodes
from tests.conftest import LOOPBACK, SmtpServer, wait_until
from tests.daemonproc import DaemonProcess, relay_env, spool_names
from tests.test_failover import free_port


def listening_env(clean_env: dict[str, str], spool_dir: Path, relay: SmtpServer,
                  **extra: str) -> tuple[dict[str, str], int]:
    port = free_port()
    env = relay_env(clean_env, spool_dir, relay.host, relay.port, MAILWATCHD_LISTEN=f"{LOOPBACK}:{port}",
                    MAILWATCHD_DEFAULT_DOMAIN="example.com", MAILWATCHD_ADMIN_ADDRESS="ops@example.net", **extra)
    return env, port


def test_smtplib_pipelined_submission_reaches_the_relay(smtp_server: SmtpServer, spool_dir: Path,
                                                        clean_env: dict[str, str], daemons: Any) -> None:
    env, port = listening_env(clean_env, spool_dir, smtp_server)
    daemon = daemons(env)
    assert daemon.named("daemon_ready")[0]["listen"] == f"{LOOPBACK}:{port}"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "app@example.org", "ann@example.org", "via SMTP"
    message.set_content("hello\n")
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        code, capabilities = client.ehlo("app.example.org")
        assert code == 250 and b"PIPELINING" in capabilities and b"SIZE" in capabilities
        refused = client.send_message(message, to_addrs=["ann@example.org", "root"])
        assert refused == {}
    [received] = smtp_server.handler.wait_for(1)
    assert received.mail_from == "app@example.org"
    assert sorted(received.rcpt_tos) == ["ann@example.org", "ops@example.net"]
    assert b"Received: from app.example.org" in received.data and b"Subject: via SMTP" in received.data
    queued = daemon.wait_event("smtp_received")[0]
    assert queued["peer"].startswith("127.0.0.1") and queued["recipients"] == 2


def test_djangos_default_smtp_backend_sends_through_the_listener(smtp_server: SmtpServer, spool_dir: Path,
                                                                 clean_env: dict[str, str], daemons: Any) -> None:
    """Django's own EmailBackend, configured as its defaults are (no user, no TLS) but on the listener's port."""
    env, port = listening_env(clean_env, spool_dir, smtp_server)
    daemons(env)
    script = (
        "import django; from django.conf import settings\n"
        f"settings.configure(EMAIL_HOST='localhost', EMAIL_PORT={port}, DEFAULT_FROM_EMAIL='app@example.org')\n"
        "django.setup(); from django.core.mail import send_mail\n"
        "print(send_mail('from django', 'body text', None, ['ann@example.org']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0 and done.stdout.strip() == b"1", done.stderr.decode()
    [received] = smtp_server.handler.wait_for(1)
    assert received.mail_from == "app@example.org" and received.rcpt_tos == ["ann@example.org"]
    assert b"Subject: from django" in received.data


@pytest.mark.skipif(shutil.which("swaks") is None, reason="Debian's swaks is not installed")
def test_swaks_sees_the_error_replies(smtp_server: SmtpServer, spool_dir: Path, clean_env: dict[str, str],
                                      daemons: Any) -> None:
    env, port = listening_env(clean_env, spool_dir, smtp_server, MAILWATCHD_MAX_MESSAGE_SIZE="8K")
    daemons(env)
    ok = subprocess.run(["swaks", "--server", LOOPBACK, "--port", str(port), "--from", "app@example.org",
                         "--to", "ann@example.org", "--pipeline", "--header", "Subject: swaks"],
                        capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "250 2.0.0 Ok: queued as" in ok.stdout
    big = subprocess.run(["swaks", "--server", LOOPBACK, "--port", str(port), "--from", "app@example.org",
                          "--to", "ann@example.org", "--body", "a line of text\n" * 2000],
                         capture_output=True, text=True, timeout=30, check=False)
    assert big.returncode != 0 and "552" in big.stdout, big.stdout
    assert smtp_server.handler.wait_for(1)[0].rcpt_tos == ["ann@example.org"]


def test_the_listener_queues_straight_into_queue_and_a_kill_after_the_250_loses_nothing(
        smtp_server_factory: Any, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    relay = smtp_server_factory(starttls=False)
    env, port = listening_env(clean_env, spool_dir, relay, MAILWATCHD_CONNECT_TIMEOUT="200ms")
    daemon = daemons({**env, "EMAIL_PORT": str(free_port())})  # the relay is down: the 250's promise must wait
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        client.ehlo("app.example.org")
        client.mail("app@example.org")
        client.rcpt("ann@example.org")
        code, reply = client.data(b"Subject: promised\r\n\r\nkept\r\n")
    assert code == 250
    queue_id = reply.decode().rsplit(" ", 1)[-1]
    # The daemon stored it as its own: in queue/, never a drop in new/ to claim.
    assert spool_names(spool_dir, "new", "queue") == {"new": [], "queue": [queue_id]}
    [queued] = daemon.wait_event("message_queued")
    assert queued["queue_id"] == queue_id and queued["source"] == "smtp"
    daemon.kill()

    restarted = daemons(env)
    [received] = relay.handler.wait_for(1)
    assert b"Subject: promised" in received.data and received.rcpt_tos == ["ann@example.org"]
    restarted.wait_event("message_delivered", lambda e: e["queue_id"] == queue_id)


def test_listener_messages_reach_the_relay_once_each_and_leave_nothing(
        smtp_server_factory: Any, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    """Listener messages over one kept connection and a connection each, relayed with cut-through
    (spool/pending.py; tests/test_worker.py holds a store to show the order): each reaches the relay once,
    its delivery is recorded once, and its file goes."""
    relay = smtp_server_factory(starttls=False)
    env, port = listening_env(clean_env, spool_dir, relay)
    daemon = daemons(env)
    count = 12
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        for index in range(count // 2):
            client.sendmail("app@example.org", ["ann@example.org"], f"Subject: kept {index}\r\n\r\nbody\r\n")
    for index in range(count // 2):
        with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
            client.sendmail("app@example.org", ["ann@example.org"], f"Subject: new {index}\r\n\r\nbody\r\n")
    received = relay.handler.wait_for(count)
    subjects = sorted(next(line for line in item.data.splitlines() if line.startswith(b"Subject:"))
                      for item in received)
    assert subjects == sorted({*subjects}) and len(subjects) == count
    wait_until(lambda: spool_names(spool_dir, "queue") == {"queue": []}, message="every file delivered and gone")
    wait_until(lambda: len(daemon.named("message_delivered")) == count, message="each delivery recorded once")
    assert daemon.named("message_relayed_unstored") == [] and daemon.named("cut_through_paused") == []


def _listener_process(daemon: Any) -> psutil.Process:
    """The daemon's one child: its SMTP listener (submission/process.py)."""
    children: list[psutil.Process] = wait_until(lambda: psutil.Process(daemon.pid).children(),
                                                message="the listener process")
    [child] = children
    assert "child_main" in " ".join(child.cmdline())
    return child


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_listener_runs_in_a_process_of_its_own_whose_end_stops_the_daemon(
        smtp_server: SmtpServer, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    env, port = listening_env(clean_env, spool_dir, smtp_server)
    daemon = daemons(env)
    child = _listener_process(daemon)
    with smtplib.SMTP(LOOPBACK, port, timeout=10) as client:
        assert client.sendmail("app@example.org", ["ann@example.org"], b"Subject: apart\r\n\r\nx\r\n") == {}
    assert b"Subject: apart" in smtp_server.handler.wait_for(1)[0].data
    [received] = daemon.wait_event("smtp_received")
    assert received["recipients"] == 1
    child.kill()
    [exited] = daemon.wait_event("listener_exited")
    assert exited["status"] == -signal.SIGKILL
    assert daemon.wait_exit() == exitcodes.SOFTWARE  # systemd's Restart= starts both again


def test_a_killed_daemons_listener_finishes_and_frees_its_port(
        smtp_server: SmtpServer, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    env, port = listening_env(clean_env, spool_dir, smtp_server)
    daemon = daemons(env)
    child = _listener_process(daemon)
    daemon.kill()
    wait_until(lambda: _gone(child), message="the listener's exit after its daemon's")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=5).close()


def test_a_stopping_daemon_lets_a_message_in_data_finish_and_keeps_it(
        smtp_server_factory: Any, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    relay = smtp_server_factory(starttls=False)
    env, port = listening_env(clean_env, spool_dir, relay)
    daemon = daemons({**env, "EMAIL_PORT": str(free_port())})  # the relay is down: the message stays queued
    idle = smtplib.SMTP(LOOPBACK, port, timeout=10)
    idle.ehlo("idle.example.org")
    client = smtplib.SMTP(LOOPBACK, port, timeout=10)
    client.ehlo("app.example.org")
    client.mail("app@example.org")
    client.rcpt("ann@example.org")
    assert client.docmd("DATA")[0] == 354
    client.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    daemon.signal(signal.SIGTERM)
    daemon.wait_event("daemon_stopping")
    assert idle.getreply()[0] == 421  # not in DATA: sent away at once
    client.send(b"second half\r\n.\r\n")
    code, reply = client.getreply()
    assert code == 250, reply
    assert client.getreply()[0] == 421  # and then it too is sent away
    client.close()
    idle.close()
    assert daemon.wait_exit() == exitcodes.OK
    queue_id = reply.decode().rsplit(" ", 1)[-1]
    assert spool_names(spool_dir, "queue")["queue"] == [queue_id]


def test_a_stop_sent_to_the_whole_process_group_is_a_clean_stop(
        smtp_server: SmtpServer, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    """systemd (KillMode=control-group) and a terminal's Ctrl-C signal the listener too: it waits for the daemon."""
    env, _ = listening_env(clean_env, spool_dir, smtp_server)
    daemon = daemons(env)
    child = _listener_process(daemon)
    os.killpg(daemon.pid, signal.SIGTERM)
    assert daemon.wait_exit() == exitcodes.OK
    assert daemon.named("listener_exited") == []
    wait_until(lambda: _gone(child), message="the listener's exit")


def test_an_address_already_taken_is_named_and_the_daemon_exits_75(
        smtp_server: SmtpServer, spool_dir: Path, clean_env: dict[str, str]) -> None:
    taken = socket.create_server((LOOPBACK, 0))
    free = free_port()
    try:
        busy = taken.getsockname()[1]
        env, _ = listening_env(clean_env, spool_dir, smtp_server)
        env["MAILWATCHD_LISTEN"] = f"{LOOPBACK}:{free} {LOOPBACK}:{busy}"
        daemon = DaemonProcess(env).start()
        assert daemon.wait_exit() == exitcodes.TEMPFAIL
    finally:
        taken.close()
    [failed] = daemon.named("listen_failed")
    assert f"{LOOPBACK}:{busy}" in failed["listen"] and "in use" in failed["detail"]
    assert daemon.named("daemon_ready") == []  # (bind_all's closing of the first address: test_listener.py)
