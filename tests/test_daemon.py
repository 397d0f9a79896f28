"""The daemon end to end: a real `mailwatchd run` child delivering to a real aiosmtpd."""

from __future__ import annotations

import asyncio
import json
import mailbox
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import LoopbackController, RecordingHandler, SmtpServer, wait_until
from tests.daemonproc import DaemonProcess, drop, message, relay_env, run_cli, spool_names

STATE_DIRS = ("new", "queue", "deferred", "failed")





def spool_is_empty(spool: Path) -> bool:
    return not any(spool_names(spool, *STATE_DIRS).values())


class TempFailOnce(RecordingHandler):
    """451 to the first DATA of each message, then accept it."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = bytes(envelope.original_content or b"")
        if content not in self.refused:
            self.refused.append(content)
            return "451 4.3.0 try again later"
        return await super().handle_DATA(server, session, envelope)


class RejectData(RecordingHandler):
    """554 after DATA while `reject` is set; accepts once it is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.reject = True

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.reject:
            return "554 5.7.1 message content rejected by policy"
        return await super().handle_DATA(server, session, envelope)


class RefuseOneRecipient(RecordingHandler):
    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"


class HoldData(RecordingHandler):
    """Holds every DATA until `release` is set (a slow relay inside its deadline)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.holding = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.holding += 1
        await self.release.wait()
        return await super().handle_DATA(server, session, envelope)


def test_maildir_writer_message_is_delivered_and_leaves_the_spool(smtp_server: SmtpServer, spool_dir: Path,
                                                                   clean_env: dict[str, str], daemons: Any) -> None:
    daemon = daemons(relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port))
    msg = mailbox.MaildirMessage(message(1, to="Alice <alice@example.org>", extra_headers="Cc: bob@example.org\r\n"))
    mailbox.Maildir(str(spool_dir)).add(msg)
    received = smtp_server.handler.wait_for(1)
    assert received[0].mail_from == "app@example.com"
    assert received[0].rcpt_tos == ["alice@example.org", "bob@example.org"]
    assert b"Subject: test 1" in received[0].data
    queued = daemon.wait_event("message_queued")[0]
    daemon.wait_event("message_delivered", lambda e: e["queue_id"] == queued["queue_id"])
    wait_until(lambda: spool_is_empty(spool_dir), message="empty spool")


def test_delivered_files_are_gone_by_the_time_the_daemon_has_stopped(smtp_server: SmtpServer, spool_dir: Path,
                                                                     clean_env: dict[str, str]) -> None:
    count = 40  # more than one of the reaper's batches, and some left over for the flush
    for index in range(count):
        drop(spool_dir, message(index), f"drop{index:03d}")
    daemon = DaemonProcess(relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port)).start()
    try:
        daemon.wait_ready(timeout=30)
        daemon.wait_event("message_delivered", count=count, timeout=60)
        assert all(name not in spool_names(spool_dir, "queue")["queue"]
                   for name in (event["queue_id"] for event in daemon.named("message_delivered")))
    finally:
        assert daemon.stop() == 0
    assert len(smtp_server.handler.messages) == count
    # Dot files included: no delivered message's file (.sent-*) is left once the daemon has exited.
    assert {name: os.listdir(spool_dir / name) for name in ("new", "queue", "deferred", "meta")} == \
        {"new": [], "queue": [], "deferred": [], "meta": []}


def test_bcc_recipients_get_the_message_without_the_bcc_header(smtp_server: SmtpServer, spool_dir: Path,
                                                                clean_env: dict[str, str], daemons: Any) -> None:
    daemons(relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port))
    drop(spool_dir, message(2, extra_headers="Bcc: hidden@example.net,\r\n  second@example.net\r\n"), "m2")
    received = smtp_server.handler.wait_for(1)[0]
    assert sorted(received.rcpt_tos) == ["hidden@example.net", "rcpt@example.org", "second@example.net"]
    assert b"bcc" not in received.data.lower()
    assert b"hidden@example.net" not in received.data


def test_starttls_required_but_not_offered_sends_nothing_and_keeps_the_message(
        smtp_server_factory: Any, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    server = smtp_server_factory(starttls=False)
    daemon = daemons(relay_env(clean_env, spool_dir, server.host, server.port, EMAIL_USE_TLS="true"))
    drop(spool_dir, message(3), "m3")
    daemon.wait_event("message_queued")
    down = daemon.wait_event("relay_down")[0]
    assert down["cause"] == "starttls_unavailable"
    assert server.handler.messages == []
    assert spool_names(spool_dir, "queue")["queue"], "the message must stay queued, not fail"
    assert spool_names(spool_dir, "failed")["failed"] == []


def test_starttls_with_verified_certificate_delivers(smtp_server: SmtpServer, spool_dir: Path, ca_file: Path,
                                                     clean_env: dict[str, str], daemons: Any) -> None:
    env = relay_env(clean_env, spool_dir, "localhost", smtp_server.port, EMAIL_USE_TLS="true",
                    EMAIL_SSL_CAFILE=str(ca_file))
    daemons(env)
    drop(spool_dir, message(4), "m4")
    assert smtp_server.handler.wait_for(1)[0].tls


def test_certificate_from_unknown_ca_is_refused(smtp_server: SmtpServer, spool_dir: Path,
                                                clean_env: dict[str, str], daemons: Any) -> None:
    daemon = daemons(relay_env(clean_env, spool_dir, "localhost", smtp_server.port, EMAIL_USE_TLS="true"))
    drop(spool_dir, message(5), "m5")
    daemon.wait_event("message_queued")
    assert daemon.wait_event("relay_down")[0]["cause"] == "tls_untrusted"
    assert smtp_server.handler.messages == []
    assert spool_names(spool_dir, "queue")["queue"]


def test_temporary_failure_is_deferred_then_delivered(smtp_server_factory: Any, spool_dir: Path,
                                                      clean_env: dict[str, str], daemons: Any) -> None:
    server = smtp_server_factory(TempFailOnce())
    daemon = daemons(relay_env(clean_env, spool_dir, server.host, server.port))
    drop(spool_dir, message(6), "m6")
    deferred = daemon.wait_event("message_deferred")[0]
    assert deferred["attempt"] == 1 and "451" in deferred["reason"]
    assert deferred["next_attempt"].endswith("+00:00") and deferred["delay_s"] > 0
    server.handler.wait_for(1)
    daemon.wait_event("message_delivered", lambda e: e["queue_id"] == deferred["queue_id"])
    wait_until(lambda: spool_is_empty(spool_dir) and not os.listdir(spool_dir / "meta"), message="empty spool")


def test_permanent_failure_goes_to_the_failed_store_with_the_reply(smtp_server_factory: Any, spool_dir: Path,
                                                                   clean_env: dict[str, str], daemons: Any) -> None:
    server = smtp_server_factory(RejectData())
    env = relay_env(clean_env, spool_dir, server.host, server.port)
    daemon = daemons(env)
    drop(spool_dir, message(7), "m7")
    failed = daemon.wait_event("message_failed")[0]
    assert "554" in failed["reason"] and "rejected by policy" in failed["reason"]
    listing = json.loads(run_cli(env, "queue", "--json").stdout)["messages"]
    assert [(m["state"], m["queue_id"]) for m in listing] == [("failed", failed["queue_id"])]
    assert "rejected by policy" in listing[0]["reason"]


def test_partial_recipients_deliver_to_the_accepted_and_record_the_refused(
        smtp_server_factory: Any, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    server = smtp_server_factory(RefuseOneRecipient())
    env = relay_env(clean_env, spool_dir, server.host, server.port)
    daemon = daemons(env)
    drop(spool_dir, message(8, to="ok@example.org, nobody@example.org"), "m8")
    assert server.handler.wait_for(1)[0].rcpt_tos == ["ok@example.org"]
    daemon.wait_event("recipients_failed")
    listing = wait_until(lambda: [m for m in json.loads(run_cli(env, "queue", "--json").stdout)["messages"]
                                  if m["state"] == "failed"], message="a failed part")
    assert listing[0]["recipients"] == ["nobody@example.org"]
    assert "no such user" in listing[0]["reason"]


def test_bad_inputs_go_to_the_failed_store_and_the_daemon_keeps_going(
        smtp_server: SmtpServer, spool_dir: Path, clean_env: dict[str, str], daemons: Any, tmp_path: Path) -> None:
    env = relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port, MAILWATCHD_MAX_MESSAGE_SIZE="64K")
    daemon = daemons(env)
    secret = tmp_path / "secret.txt"
    secret.write_text("From: a@b.c\nTo: attacker@example.org\n\nnot for you\n")
    os.symlink(secret, spool_dir / "new" / "symlink")
    os.mkfifo(spool_dir / "new" / "fifo")
    os.mkdir(spool_dir / "new" / "directory")
    os.link(secret, spool_dir / "tmp" / "hardlink")
    os.rename(spool_dir / "tmp" / "hardlink", spool_dir / "new" / "hardlink")
    drop(spool_dir, b"this is not an email at all\n", "garbage")
    drop(spool_dir, b"From: a@example.com\r\nSubject: nobody\r\n\r\nno recipients\r\n", "norcpt")
    drop(spool_dir, message(9, body="x" * 70_000), "oversize")
    drop(spool_dir, message(10), "good")
    assert smtp_server.handler.wait_for(1)[0].rcpt_tos == ["rcpt@example.org"]
    failures = daemon.wait_event("message_failed", count=7)
    reasons = " | ".join(event["reason"] for event in failures)
    for fragment in ("symbolic link", "FIFO", "directory", "hard links", "not an RFC 5322", "no recipient",
                     "too large"):
        assert fragment in reasons
    assert all(m.rcpt_tos == ["rcpt@example.org"] for m in smtp_server.handler.messages)
    assert secret.read_text().endswith("not for you\n")
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert len(spool_names(spool_dir, "failed")["failed"]) == 7


def test_sigterm_mid_drain_finishes_in_flight_and_loses_nothing(smtp_server_factory: Any, spool_dir: Path,
                                                                clean_env: dict[str, str], daemons: Any) -> None:
    handler = HoldData()
    server = smtp_server_factory(handler)
    env = relay_env(clean_env, spool_dir, server.host, server.port)
    daemon = daemons(env)
    for index in range(20):
        drop(spool_dir, message(index), f"m{index:02d}")
    wait_until(lambda: handler.holding >= 2, message="two transactions in flight")
    daemon.signal(signal.SIGTERM)
    daemon.wait_event("daemon_stopping")
    server.controller.loop.call_soon_threadsafe(handler.release.set)
    assert daemon.wait_exit(20) == 0
    delivered = {e["queue_id"] for e in daemon.named("message_delivered")}
    assert len(delivered) == 2 == len(handler.messages)
    left = spool_names(spool_dir, "new", "queue")
    assert len(left["new"]) + len(left["queue"]) == 18
    again = daemons(env)
    handler.wait_for(20)
    wait_until(lambda: spool_is_empty(spool_dir), message="empty spool after restart")
    assert again.stop() == 0


def test_second_sigterm_stops_at_once_and_the_message_stays_queued(
        smtp_server_factory: Any, spool_dir: Path, clean_env: dict[str, str], daemons: Any) -> None:
    handler = HoldData()
    server = smtp_server_factory(handler)
    env = relay_env(clean_env, spool_dir, server.host, server.port, MAILWATCHD_SHUTDOWN_GRACE="60s")
    daemon = daemons(env)
    drop(spool_dir, message(1), "m1")
    wait_until(lambda: handler.holding >= 1, message="a transaction in flight")
    daemon.signal(signal.SIGTERM)
    daemon.wait_event("daemon_stopping")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(10) == 0
    assert daemon.named("daemon_stopping_now")
    assert spool_names(spool_dir, "queue")["queue"], "the interrupted message stays queued"
    server.controller.loop.call_soon_threadsafe(handler.release.set)
    daemons(env)
    handler.wait_for(1)
    wait_until(lambda: spool_is_empty(spool_dir), message="delivered after restart")


README_MESSAGE = b"From: app@example.com\nTo: you@example.org\nSubject: hello\n\nIt works.\n"


def test_readme_quick_start_delivers_to_the_local_outbox(spool_dir: Path, clean_env: dict[str, str]) -> None:
    """The README's first command: `sendmail -t` with no daemon running, then `run`, then Ctrl-C."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "printf 'From: app@example.com\\nTo: you@example.org\\nSubject: hello\\n\\nIt works.\\n'" in readme
    assert "| .venv/bin/mailwatchd sendmail -t && .venv/bin/mailwatchd run" in readme
    env = dict(clean_env, MAILWATCHD_SPOOL=str(spool_dir))
    submitted = run_cli(env, "sendmail", "-t", stdin=README_MESSAGE)
    assert submitted.returncode == 0, submitted.stderr
    assert len(os.listdir(spool_dir / "new")) == 1
    daemon = DaemonProcess(dict(env, MAILWATCHD_LOG_FORMAT="console")).start()
    try:
        wait_until(lambda: any("message_delivered" in line for line in daemon.raw_lines), message="delivery")
        assert any("no_relay_configured" in line for line in daemon.raw_lines)
        outbox = mailbox.Maildir(str(spool_dir / "outbox"), create=False)
        messages = list(outbox)
        assert len(messages) == 1 and messages[0]["Subject"] == "hello"
        assert messages[0]["Message-ID"] and messages[0]["Date"], "sendmail adds the missing headers"
        status = json.loads(run_cli(env, "status", "--json").stdout)
        assert status["running"] and status["status"]["mode"] == "outbox"
        assert "NO RELAY CONFIGURED" in run_cli(env, "status").stdout.decode()
    finally:
        daemon.signal(signal.SIGINT)
        assert daemon.wait_exit(20) == 0
    assert spool_is_empty(spool_dir)


def test_restart_recovers_claimed_messages(smtp_server: SmtpServer, spool_dir: Path, clean_env: dict[str, str],
                                           daemons: Any) -> None:
    for name in ("queue", "new", "tmp", "meta"):
        (spool_dir / name).mkdir()
    (spool_dir / "queue" / "0000000000000000ABCD").write_bytes(message(12))
    daemon = daemons(relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port))
    assert daemon.named("spool_recovered")[0]["ready"] == 1
    assert smtp_server.handler.wait_for(1)[0].data.count(b"test 12") == 1
    wait_until(lambda: spool_is_empty(spool_dir), message="empty spool")


def test_bad_config_exits_78_naming_the_key(spool_dir: Path, clean_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "mailwatchd.env"
    config.write_text("EMAIL_HOST=smtp.example.com\nEMAIL_PORT=587\nEMAIL_USE_TLS=true\nEMAIL_USE_SSL=true\n"
                      "EMAIL_HOST_USER=me\nEMAIL_HOST_PASSWORD=hunter2-secret\n")
    result = run_cli(dict(clean_env, MAILWATCHD_SPOOL=str(spool_dir)), "run", "--config", str(config))
    assert result.returncode == 78
    assert b"EMAIL_USE_SSL" in result.stderr and b"fix:" in result.stderr
    assert b"hunter2" not in result.stderr + result.stdout


def test_operator_commands_flush_requeue_delete(smtp_server_factory: Any, spool_dir: Path,
                                                clean_env: dict[str, str], daemons: Any) -> None:
    server = smtp_server_factory(RejectData())
    env = relay_env(clean_env, spool_dir, server.host, server.port)
    daemon = daemons(env)
    drop(spool_dir, message(13), "m13")
    drop(spool_dir, message(14), "m14")
    failed = daemon.wait_event("message_failed", count=2)
    first, second = (event["queue_id"] for event in failed)
    assert run_cli(env, "delete", second).returncode == 0
    assert run_cli(env, "delete", second).returncode == 66
    server.handler.reject = False  # the relay now accepts mail
    assert run_cli(env, "requeue", first).returncode == 0
    server.handler.wait_for(1)
    daemon.wait_event("message_delivered", lambda e: e["queue_id"] == first)
    assert run_cli(env, "flush").returncode == 0
    daemon.wait_event("flush_requested")
    wait_until(lambda: spool_is_empty(spool_dir), message="empty spool")


def test_queue_listing_without_permission_says_so(spool_dir: Path) -> None:
    """An operator who may not read the daemon's state gets exit 77 and a sentence, not a traceback."""
    from mailwatchd import cli

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    for name in ("queue", "deferred", "failed", "meta", "new", "tmp"):
        (spool_dir / name).mkdir(mode=0o700)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, then run the command in-process
        os.close(read_end)
        sys.stderr = open(write_end, "w")  # noqa: SIM115 - pytest's capture owns the old one
        os.environ["MAILWATCHD_SPOOL"] = str(spool_dir)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        code = cli.main(["queue"])
        sys.stderr.flush()
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        stderr = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 77, stderr
    assert b"permission denied" in stderr and b"Traceback" not in stderr


class AlwaysTempFail(RecordingHandler):
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "451 4.7.1 greylisted, try again"


def test_a_message_failing_past_its_lifetime_gives_up(smtp_server_factory: Any, spool_dir: Path,
                                                     clean_env: dict[str, str], daemons: Any) -> None:
    server = smtp_server_factory(AlwaysTempFail())
    env = relay_env(clean_env, spool_dir, server.host, server.port, MAILWATCHD_MAX_LIFETIME="2s",
                    MAILWATCHD_RETRY_MIN="300ms", MAILWATCHD_RETRY_MAX="500ms")
    daemon = daemons(env)
    drop(spool_dir, message(1), "m1")
    failed = daemon.wait_event("message_failed", timeout=20)[0]
    assert failed["cause"] == "expired" and "gave up after" in failed["reason"] and "451" in failed["reason"]
    assert len(daemon.named("message_deferred")) >= 2
    assert len(spool_names(spool_dir, "failed")["failed"]) == 1


def test_time_waiting_for_a_relay_does_not_count_toward_the_lifetime(spool_dir: Path, clean_env: dict[str, str],
                                                                      daemons: Any) -> None:
    """A relay outage longer than the lifetime must not fail queued messages at the first 4xx."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = relay_env(clean_env, spool_dir, "127.0.0.1", port, MAILWATCHD_MAX_LIFETIME="1s",
                    MAILWATCHD_PROBE_INTERVAL_DOWN="200ms")
    daemon = daemons(env)
    drop(spool_dir, message(1), "m1")
    daemon.wait_event("relay_down")
    started = time.monotonic()
    wait_until(lambda: time.monotonic() - started > 1.5 or daemon.named("message_failed"), message="the outage")
    handler = TempFailOnce()
    controller = LoopbackController(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        daemon.wait_event("message_deferred", timeout=20)
        handler.wait_for(1, timeout=20)
    finally:
        controller.stop()
    assert not daemon.named("message_failed")
