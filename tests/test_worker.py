"""Worker: each outcome of one attempt settled into a real spool, through a real router and real
aiosmtpd relays on loopback; and the run loop's delivering, waiting for a relay, stopping and idling."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from mailwatchd.message import envelope
from mailwatchd.message.addressing import Addressing
from mailwatchd.service.backoff import JITTER
from mailwatchd.service.counters import Counters, Tally
from mailwatchd.service.handoff import ListenerHandoff
from mailwatchd.service.hedge import HEDGE_DELAY_S
from mailwatchd.service.live import Live
from mailwatchd.service.scheduler import Scheduler, WorkItem
from mailwatchd.service.worker import IDLE_LOOP_S, Followup, Retry, Worker
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.spool.messagestate import MessageState, State
from mailwatchd.spool.pending import PAUSE_S, PendingStores
from mailwatchd.spool.store import Claimed, Location, Spool
from mailwatchd.submission.submit import parse_sendmail_args, prepare
from mailwatchd.transports.outcome import Cause, Outcome
from tests.conftest import LOOPBACK, SmtpServer, wait_until
from tests.probe_servers import closed_port
from tests.rawservers import BlackHole, ScriptedServer
from tests.test_delivery import AuditHandler

ServerFactory = Callable[..., SmtpServer]

SENDER = "app@example.test"
RECIPIENT = "ann@example.test"
MESSAGE = f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: hi\r\n\r\nbody\r\n".encode()
RETRY_MIN = 2.0
RETRY_MAX = 60.0
UNUSED_PORT = 9  # never connected to: for tests that need a relay configured, not reachable


def make_settings(spool_dir: Path, *ports: int, **overrides: Any) -> Settings:
    """Short timeouts; one relay per port, named relay0, relay1..., each with one plain endpoint."""
    relays = tuple(RelayConfig(f"relay{index}", (Endpoint(LOOPBACK, port, TlsMode.NONE),))
                   for index, port in enumerate(ports))
    values: dict[str, Any] = {"helo_name": "worker.test", "connect_timeout": 0.5, "command_timeout": 2.0,
                              "transaction_timeout": 5.0, "retry_min": RETRY_MIN, "retry_max": RETRY_MAX}
    values.update(overrides)
    return Settings(spool=spool_dir, outbox=spool_dir.parent / "outbox", relays=relays, **values)


@dataclass
class Rig:
    """A worker wired to a real spool, scheduler, live configuration and counters."""

    spool: Spool
    scheduler: Scheduler
    live: Live
    counters: Counters
    stop: asyncio.Event
    worker: Worker

    def put(self, data: bytes = MESSAGE, name: str = "m1") -> str:
        """Drop a message into new/ and claim it into queue/; its queue id."""
        (self.spool.new / name).write_bytes(data)
        claimed = self.spool.claim(name)
        assert isinstance(claimed, Claimed), claimed
        return claimed.queue_id

    def attempt(self, queue_id: str, location: Location = Location.QUEUE) -> Followup:
        """One `worker.attempt` on its own event loop; the worker's sessions are closed after it."""
        async def run() -> Followup:
            try:
                return await self.worker.attempt(WorkItem(queue_id, location))
            finally:
                await self.worker.close_sessions()
        return asyncio.run(run())

    def everywhere(self) -> dict[Location, list[str]]:
        return {location: self.spool.names(location) for location in Location}


def make_rig(spool_dir: Path, *ports: int, **overrides: Any) -> Rig:
    spool = Spool(spool_dir)
    spool.create_layout()
    scheduler = Scheduler()
    live = Live(make_settings(spool_dir, *ports, **overrides))
    counters = Counters(lambda: (scheduler.ready_count, scheduler.deferred_count))
    stop = asyncio.Event()
    worker = Worker(0, spool=spool, scheduler=scheduler, live=live, counters=counters, stop=stop)
    return Rig(spool, scheduler, live, counters, stop, worker)


async def eventually(predicate: Callable[[], object], timeout: float = 5.0, message: str = "condition") -> None:
    """`wait_until` for code on the event loop: poll without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        await asyncio.sleep(0.01)


async def finish(rig: Rig, task: Awaitable[None], timeout: float = 1.0) -> float:
    """Stop the worker as the daemon does; seconds its run() took to end (fails past `timeout`)."""
    started = time.monotonic()
    rig.stop.set()
    rig.scheduler.close()
    await asyncio.wait_for(task, timeout)
    return time.monotonic() - started


def envelope_to(raw: bytes) -> list[str]:
    """The addresses of a spool file's X-Mailwatchd-Envelope-To lines."""
    prefix = f"{envelope.ENVELOPE_TO}:".encode()
    return [line[len(prefix):].strip().decode() for line in raw.splitlines() if line.startswith(prefix)]


def message_to(*recipients: str, sender: str = SENDER) -> bytes:
    return f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: hi\r\n\r\nbody\r\n".encode()


def load(spool: Spool, queue_id: str) -> MessageState:
    state = spool.load_state(queue_id)
    assert state is not None, f"no meta/{queue_id}.json"
    return state


@contextmanager
def dead_endpoint(kind: str) -> Iterator[tuple[int, Cause]]:
    """A loopback port no relay answers on, and the cause a connect to it gives."""
    if kind == "refused":
        with closed_port() as port:
            yield port, Cause.CONNECTION_REFUSED
    else:
        with BlackHole() as hole:
            yield hole.port, Cause.CONNECT_TIMEOUT


# -- one attempt, each outcome ------------------------------------------------------------------


def test_delivered_message_leaves_the_spool(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    server = smtp_server_factory(AuditHandler(), starttls=False)
    rig = make_rig(spool_dir, server.port)
    queue_id = rig.put()
    before = time.time()
    followup = rig.attempt(queue_id)
    assert followup == Followup()
    assert rig.everywhere() == {location: [] for location in Location}
    assert not rig.spool.meta_path(queue_id).exists()
    [got] = server.handler.wait_for(1)
    assert (got.mail_from, got.rcpt_tos, got.data) == (SENDER, [RECIPIENT], MESSAGE)
    assert rig.counters.totals == Tally(delivered=1)
    assert rig.counters.last_delivery is not None and before <= rig.counters.last_delivery <= time.time()
    assert rig.counters.failed_in_store == 0


@pytest.mark.parametrize("refusal", ["data_451", "rcpt_450"])
def test_temporary_failure_defers_with_backoff(refusal: str, smtp_server_factory: ServerFactory,
                                               spool_dir: Path) -> None:
    if refusal == "data_451":
        handler = AuditHandler(data_replies={SENDER: "451 4.3.0 try again later"})
    else:
        handler = AuditHandler(rcpt_replies={RECIPIENT: "450 4.2.1 mailbox busy"})
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port)
    queue_id = rig.put()
    before = time.time()
    followup = rig.attempt(queue_id)
    after = time.time()

    assert rig.everywhere() == {Location.QUEUE: [], Location.DEFERRED: [queue_id], Location.FAILED: []}
    state = load(rig.spool, queue_id)
    assert (state.state, state.attempts, state.reason) == (State.DEFERRED, 1, None)
    assert state.next_attempt_at is not None
    # retry_delay(1): retry_min with jitter, never below retry_min nor above retry_max.
    assert before + RETRY_MIN <= state.next_attempt_at <= after + min(RETRY_MAX, RETRY_MIN * (1 + JITTER))
    assert state.first_failure_at is not None and before <= state.first_failure_at <= after
    [attempt] = state.history
    assert (attempt.outcome, attempt.cause, attempt.relay) == ("temporary", "temporary_failure", "relay0")
    assert refusal[-3:] in attempt.detail
    assert followup == Followup(retry_at=[Retry(state.next_attempt_at, queue_id)])
    assert rig.counters.totals == Tally(deferred=1)
    assert handler.messages == []


def test_permanent_failure_goes_to_failed_with_the_reply(smtp_server_factory: ServerFactory,
                                                         spool_dir: Path) -> None:
    handler = AuditHandler(mail_replies={SENDER: "550 5.7.1 sender not allowed"})
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port)
    queue_id = rig.put()
    followup = rig.attempt(queue_id)

    assert followup == Followup()
    assert rig.everywhere() == {Location.QUEUE: [], Location.DEFERRED: [], Location.FAILED: [queue_id]}
    state = load(rig.spool, queue_id)
    assert state.state is State.FAILED and state.attempts == 1
    assert state.reason is not None and "550 5.7.1 sender not allowed" in state.reason
    assert state.history[-1].cause == Cause.SENDER_REJECTED.value
    assert rig.counters.failed_in_store == 1 and rig.counters.totals == Tally(failed=1)
    assert handler.mails == [SENDER] and handler.rcpts == [] and handler.messages == []


@pytest.mark.parametrize("kind", ["refused", "blackhole"])
def test_relay_fault_gives_the_message_back_uncounted_and_opens_the_breaker(kind: str, spool_dir: Path) -> None:
    with dead_endpoint(kind) as (port, cause):
        rig = make_rig(spool_dir, port)
        queue_id = rig.put()
        assert rig.live.router.candidates() != []
        followup = rig.attempt(queue_id)

    assert followup == Followup(give_back=True)
    assert rig.everywhere() == {Location.QUEUE: [queue_id], Location.DEFERRED: [], Location.FAILED: []}
    assert rig.spool.load_state(queue_id) is None, "a relay fault is not the message's attempt"
    assert rig.counters.totals == Tally()
    router = rig.live.router
    assert router.candidates() == []
    [health] = router.relays[0].endpoints
    assert (health.up, health.cause) == (False, cause.value)
    wait = router.next_chance()
    assert wait is not None and wait > 0


def test_failover_delivers_through_the_second_relay(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    server = smtp_server_factory(AuditHandler(), starttls=False)
    with closed_port() as dead, structlog.testing.capture_logs() as logs:
        rig = make_rig(spool_dir, dead, server.port)
        queue_id = rig.put()
        followup = rig.attempt(queue_id)

    assert followup == Followup()
    assert rig.everywhere() == {location: [] for location in Location}
    [got] = server.handler.wait_for(1)
    assert got.rcpt_tos == [RECIPIENT]
    [(relay, endpoint)] = rig.live.router.candidates()
    assert (relay.name, endpoint.port) == ("relay1", server.port)
    [failover] = [entry for entry in logs if entry["event"] == "relay_failover"]
    assert (failover["relay"], failover["next_relay"], failover["cause"]) == (
        "relay0", "relay1", Cause.CONNECTION_REFUSED.value)
    [delivered] = [entry for entry in logs if entry["event"] == "message_delivered"]
    assert delivered["relay"] == "relay1"
    assert rig.counters.totals == Tally(delivered=1)


def test_partly_refused_recipients_are_split_off(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    handler = AuditHandler(rcpt_replies={"gone@example.test": "550 5.1.1 no such user",
                                         "busy@example.test": "450 4.2.1 mailbox busy"})
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port)
    queue_id = rig.put(message_to(RECIPIENT, "gone@example.test", "busy@example.test"))
    before = time.time()
    followup = rig.attempt(queue_id)

    [got] = handler.wait_for(1)
    assert got.rcpt_tos == [RECIPIENT]
    assert rig.spool.names(Location.QUEUE) == [] and not rig.spool.exists(queue_id)
    assert not rig.spool.meta_path(queue_id).exists()

    [failed_id] = rig.spool.names(Location.FAILED)
    failed = load(rig.spool, failed_id)
    assert failed.state is State.FAILED and failed.attempts == 1 and failed.source == f"split from {queue_id}"
    assert failed.reason == "recipient refused: gone@example.test: 550 5.1.1 no such user"
    assert envelope_to((rig.spool.dir(Location.FAILED) / failed_id).read_bytes()) == ["<gone@example.test>"]

    [deferred_id] = rig.spool.names(Location.DEFERRED)
    deferred = load(rig.spool, deferred_id)
    assert deferred.state is State.DEFERRED and deferred.attempts == 1 and deferred.reason is None
    assert deferred.source == f"split from {queue_id}"
    assert deferred.next_attempt_at is not None
    assert before + RETRY_MIN <= deferred.next_attempt_at <= time.time() + RETRY_MIN * (1 + JITTER)
    raw = (rig.spool.dir(Location.DEFERRED) / deferred_id).read_bytes()
    assert envelope_to(raw) == ["<busy@example.test>"]
    assert envelope.parse(deferred_id, raw).recipients == ("busy@example.test",)
    assert followup == Followup(retry_at=[Retry(deferred.next_attempt_at, deferred_id)])
    assert rig.counters.totals == Tally(delivered=1, deferred=1, failed=1) and rig.counters.failed_in_store == 1


def test_temporary_failure_splits_off_the_permanently_refused_recipient(smtp_server_factory: ServerFactory,
                                                                         spool_dir: Path) -> None:
    handler = AuditHandler(rcpt_replies={"gone@example.test": "550 5.1.1 no such user",
                                         "busy1@example.test": "450 4.2.1 mailbox busy",
                                         "busy2@example.test": "450 4.2.1 mailbox busy"})
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port)
    queue_id = rig.put(message_to("busy1@example.test", "gone@example.test", "busy2@example.test"))
    before = time.time()
    followup = rig.attempt(queue_id)

    assert handler.messages == []
    assert rig.spool.names(Location.QUEUE) == [] and not rig.spool.exists(queue_id)
    assert not rig.spool.meta_path(queue_id).exists()
    [failed_id] = rig.spool.names(Location.FAILED)
    failed = load(rig.spool, failed_id)
    assert failed.reason == "recipient refused: gone@example.test: 550 5.1.1 no such user"
    assert envelope_to((rig.spool.dir(Location.FAILED) / failed_id).read_bytes()) == ["<gone@example.test>"]

    [deferred_id] = rig.spool.names(Location.DEFERRED)
    deferred = load(rig.spool, deferred_id)
    assert envelope_to((rig.spool.dir(Location.DEFERRED) / deferred_id).read_bytes()) == [
        "<busy1@example.test>", "<busy2@example.test>"]
    # The rest carries the original's attempt: the retry is its second, its lifetime already running.
    assert (deferred.state, deferred.attempts, deferred.source) == (State.DEFERRED, 1, f"split from {queue_id}")
    assert deferred.first_failure_at is not None and deferred.first_failure_at >= before
    assert [attempt.outcome for attempt in deferred.history] == [Outcome.TEMPORARY.value]
    assert deferred.next_attempt_at is not None
    assert before + RETRY_MIN <= deferred.next_attempt_at <= time.time() + RETRY_MIN * (1 + JITTER)
    assert followup == Followup(retry_at=[Retry(deferred.next_attempt_at, deferred_id)])
    assert rig.counters.failed_in_store == 1


def test_temporary_failure_past_the_lifetime_gives_up(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    handler = AuditHandler(data_replies={SENDER: "451 4.3.0 try again later"})
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port, max_lifetime=600.0)
    queue_id = rig.put()
    now = time.time()
    rig.spool.write_state(MessageState(queue_id, now - 7200, attempts=3, first_failure_at=now - 3600))
    with structlog.testing.capture_logs() as logs:
        followup = rig.attempt(queue_id)

    assert followup == Followup()
    assert rig.everywhere() == {Location.QUEUE: [], Location.DEFERRED: [], Location.FAILED: [queue_id]}
    state = load(rig.spool, queue_id)
    assert state.reason is not None and state.reason.startswith("gave up after 4 attempts over 1.0 h: ")
    assert "451 4.3.0 try again later" in state.reason
    assert state.attempts == 4 and state.next_attempt_at is None
    [failed] = [entry for entry in logs if entry["event"] == "message_failed"]
    assert failed["cause"] == Cause.EXPIRED.value
    assert rig.counters.totals == Tally(failed=1)


def test_an_expired_message_with_a_refused_recipient_gives_up_whole(smtp_server_factory: ServerFactory,
                                                                     spool_dir: Path) -> None:
    """Past its lifetime, a temporary failure ends the message even when one recipient was refused for
    good in the same attempt: no split-off part goes on waiting."""
    handler = AuditHandler(rcpt_replies={"gone@example.test": "550 5.1.1 no such user",
                                         RECIPIENT: "450 4.2.1 mailbox busy"})
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port, max_lifetime=600.0)
    queue_id = rig.put(MESSAGE.replace(b"To: ", b"Cc: gone@example.test\r\nTo: ", 1))
    now = time.time()
    rig.spool.write_state(MessageState(queue_id, now - 7200, attempts=3, first_failure_at=now - 3600))
    assert rig.attempt(queue_id) == Followup()
    assert rig.everywhere() == {Location.QUEUE: [], Location.DEFERRED: [], Location.FAILED: [queue_id]}
    reason = load(rig.spool, queue_id).reason or ""
    assert reason.startswith("gave up after 4 attempts") and "gone@example.test refused: 550" in reason


def test_retry_from_deferred_delivers_and_forgets_the_state(smtp_server_factory: ServerFactory,
                                                             spool_dir: Path) -> None:
    handler = AuditHandler(data_replies={SENDER: "451 4.3.0 try again later"})
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port)
    queue_id = rig.put()
    rig.attempt(queue_id)
    assert rig.spool.names(Location.DEFERRED) == [queue_id]

    handler.data_replies.clear()
    assert rig.attempt(queue_id, Location.DEFERRED) == Followup()
    assert handler.wait_for(1)[0].rcpt_tos == [RECIPIENT]
    assert rig.everywhere() == {location: [] for location in Location}
    assert not rig.spool.meta_path(queue_id).exists()


def test_vanished_file_changes_nothing(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    handler = AuditHandler()
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port)
    queue_id = rig.put()
    (rig.spool.dir(Location.QUEUE) / queue_id).unlink()
    assert rig.attempt(queue_id) == Followup()
    assert rig.everywhere() == {location: [] for location in Location}
    assert rig.spool.load_state(queue_id) is None
    assert rig.counters.totals == Tally()
    assert handler.ehlos == [], "nothing to send: no connection"


def test_message_without_recipient_fails_as_malformed(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    handler = AuditHandler()
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port)
    queue_id = rig.put(f"From: {SENDER}\r\nSubject: to no one\r\n\r\nbody\r\n".encode())
    assert rig.attempt(queue_id) == Followup()
    assert rig.everywhere() == {Location.QUEUE: [], Location.DEFERRED: [], Location.FAILED: [queue_id]}
    state = load(rig.spool, queue_id)
    assert state.reason is not None and state.reason.startswith("malformed message: no recipient")
    assert state.attempts == 0, "never sent"
    assert rig.counters.failed_in_store == 1
    assert handler.ehlos == []


def test_address_with_invalid_utf8_fails_without_sending(smtp_server_factory: ServerFactory,
                                                         spool_dir: Path) -> None:
    handler = AuditHandler()
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port)
    queue_id = rig.put(f"From: {SENDER}\r\nTo: ".encode() + b"\xff\xfe@y.test\r\nSubject: hi\r\n\r\nbody\r\n")
    assert rig.attempt(queue_id) == Followup()
    assert rig.spool.names(Location.FAILED) == [queue_id]
    state = load(rig.spool, queue_id)
    assert state.reason is not None and state.reason.startswith("malformed message: ")
    assert "not valid UTF-8" in state.reason and r"\xff\xfe@y.test" in state.reason
    assert handler.ehlos == [] and handler.rcpts == [] and handler.messages == []


# -- bare local names: completed by the daemon -----------------------------------------------------

# What cron (Debian's cron 3.0pl1) pipes into `sendmail -FCronDaemon -i -B8BITMIME -oem root`.
CRON_ARGS = ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]
CRON_MESSAGE = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts /etc/cron.daily\n"
                b"Content-Type: text/plain; charset=UTF-8\n\n/etc/cron.daily/logrotate: error: skipping\n")
ADMIN = "ops@example.net"


def cron_spool_file() -> bytes:
    """cron's message as `mailwatchd sendmail` stores it: the bare names left for the daemon."""
    return prepare(CRON_MESSAGE, parse_sendmail_args(CRON_ARGS))


def test_cron_mail_is_completed_by_the_daemon(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    handler = AuditHandler()
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port, default_domain="example.com", admin_address=ADMIN)
    stored = cron_spool_file()
    queue_id = rig.put(stored)
    assert rig.attempt(queue_id) == Followup()

    [got] = handler.wait_for(1)
    assert (got.mail_from, got.rcpt_tos) == ("root@example.com", [ADMIN])
    # The stored message (envelope fields dropped) with the two addresses qualified, and nothing else changed.
    expected = envelope.parse("Q", stored).data.replace(b"From: root (", b"From: root@example.com (")
    expected = expected.replace(b"\nTo: root\n", b"\nTo: root@example.com\n")
    assert b"From: root@example.com (Cron Daemon)\r\n" in got.data
    assert got.data.replace(b"\r\n", b"\n") == expected
    assert rig.everywhere() == {location: [] for location in Location}


def test_a_reload_changes_where_local_mail_goes(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    handler = AuditHandler()
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port, default_domain="example.com", admin_address=ADMIN)
    rig.live.replace(make_settings(spool_dir, server.port, default_domain="example.org",
                                   admin_address="root-mail@example.org"))
    queue_id = rig.put(cron_spool_file())
    assert rig.attempt(queue_id) == Followup()
    [got] = handler.wait_for(1)
    assert (got.mail_from, got.rcpt_tos) == ("root@example.org", ["root-mail@example.org"])


def test_a_bare_name_that_cannot_be_completed_fails_naming_the_settings(smtp_server_factory: ServerFactory,
                                                                      spool_dir: Path) -> None:
    handler = AuditHandler()
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port, admin_address=ADMIN)
    rig.live.addressing = Addressing(domain=None, admin_address=ADMIN)  # not this host's mailname or FQDN
    queue_id = rig.put(cron_spool_file())
    assert rig.attempt(queue_id) == Followup()
    assert rig.spool.names(Location.FAILED) == [queue_id]
    state = load(rig.spool, queue_id)
    assert state.reason == ("malformed message: sender address 'root' is a bare local name and no mail domain is "
                            "known for this host: set MAILWATCHD_DEFAULT_DOMAIN or /etc/mailname")
    assert state.attempts == 0 and handler.ehlos == []


# -- the run loop ---------------------------------------------------------------------------------


def test_run_loop_delivers_defers_and_stops_promptly(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    slow = "slow@example.test"
    handler = AuditHandler(data_replies={slow: "451 4.3.0 try again later"})
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port)
    delivered_id = rig.put(name="m1")
    deferred_id = rig.put(message_to(RECIPIENT, sender=slow), name="m2")

    async def scenario() -> float:
        rig.scheduler.add_ready(WorkItem(delivered_id, Location.QUEUE))
        rig.scheduler.add_ready(WorkItem(deferred_id, Location.QUEUE))
        task = asyncio.create_task(rig.worker.run())
        await eventually(lambda: rig.spool.names(Location.DEFERRED) == [deferred_id]
                         and rig.counters.in_flight == 0, message="both messages settled")
        assert rig.spool.names(Location.QUEUE) == []
        assert rig.scheduler.deferred_count == 1 and rig.scheduler.knows(deferred_id)
        assert not rig.scheduler.knows(delivered_id)
        assert rig.worker.busy_until is None
        return await finish(rig, task)

    assert asyncio.run(scenario()) < 1.0
    [got] = handler.wait_for(1)
    assert got.mail_from == SENDER
    assert rig.counters.totals == Tally(delivered=1, deferred=1)
    wait_until(lambda: handler.servers and all(s.transport is None for s in handler.servers), timeout=2.0,
               message="the worker's connection closed")


def test_worker_waiting_for_a_relay_notices_stop_at_once(spool_dir: Path) -> None:
    # Regression: the wait for a relay used to notice a stop only on its IDLE_LOOP_S tick.
    with closed_port() as port:
        rig = make_rig(spool_dir, port)
        queue_id = rig.put()

        async def scenario() -> float:
            rig.scheduler.add_ready(WorkItem(queue_id, Location.QUEUE))
            task = asyncio.create_task(rig.worker.run())
            # Given back after the relay fault: from here the worker waits for the breaker.
            await eventually(lambda: rig.live.router.candidates() == [] and rig.scheduler.ready_count == 1,
                             message="the relay down and the message given back")
            assert rig.live.router.next_chance() is not None
            assert not task.done()
            started = time.monotonic()
            rig.stop.set()
            await asyncio.wait_for(task, 2.0)
            return time.monotonic() - started

        elapsed = asyncio.run(scenario())
    assert elapsed < 0.5 < IDLE_LOOP_S
    assert rig.spool.names(Location.QUEUE) == [queue_id] and rig.spool.load_state(queue_id) is None


def test_reload_wakes_a_worker_waiting_for_a_relay(smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    server = smtp_server_factory(AuditHandler(), starttls=False)
    with closed_port() as port:
        rig = make_rig(spool_dir, port)
        queue_id = rig.put()

        async def scenario() -> float:
            rig.scheduler.add_ready(WorkItem(queue_id, Location.QUEUE))
            task = asyncio.create_task(rig.worker.run())
            await eventually(lambda: rig.live.router.candidates() == [] and rig.scheduler.ready_count == 1,
                             message="the relay down and the message given back")
            started = time.monotonic()
            rig.live.replace(make_settings(spool_dir, server.port))
            await eventually(lambda: not rig.spool.names(Location.QUEUE), timeout=2.0,
                             message="delivery through the reloaded relay")
            elapsed = time.monotonic() - started
            await finish(rig, task)
            return elapsed

        elapsed = asyncio.run(scenario())
    assert elapsed < 1.0
    assert server.handler.wait_for(1)[0].rcpt_tos == [RECIPIENT]


def test_idle_timeout_zero_does_not_make_an_idle_worker_spin(smtp_server_factory: ServerFactory,
                                                             spool_dir: Path) -> None:
    handler = AuditHandler()
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port, idle_timeout=0.0)
    queue_id = rig.put()

    # A worker that spins without awaiting starves the loop and this test with it: after a deadline
    # the guard retires it from this thread (a plain flag its loop checks every time round).
    guard = threading.Timer(5.0, setattr, (rig.worker, "retired", True))

    async def scenario() -> tuple[float, int]:
        rig.scheduler.add_ready(WorkItem(queue_id, Location.QUEUE))
        task = asyncio.create_task(rig.worker.run())
        await eventually(lambda: not rig.spool.names(Location.QUEUE) and rig.counters.in_flight == 0,
                         message="the message delivered")
        # Idle from here, with a session that idle_timeout=0 says to close at once.
        seen = {rig.worker.last_iteration}
        cpu_before = time.process_time()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            seen.add(rig.worker.last_iteration)
            await asyncio.sleep(0.01)
        cpu = time.process_time() - cpu_before
        await finish(rig, task)
        return cpu, len(seen)

    guard.start()
    try:
        cpu, iterations = asyncio.run(scenario())
    finally:
        guard.cancel()
    assert not rig.worker.retired, "the idle worker never yielded to the event loop"
    assert cpu < 0.2, f"an idle worker used {cpu:.2f}s of CPU in 1s"
    assert iterations <= 3, f"an idle worker went round its loop {iterations} times in 1s"
    assert handler.wait_for(1)[0].rcpt_tos == [RECIPIENT]
    wait_until(lambda: handler.servers and all(s.transport is None for s in handler.servers), timeout=2.0,
               message="the idle session closed")


def test_stuck_reports_a_delivery_past_its_bound_and_a_stopped_loop(spool_dir: Path) -> None:
    worker = make_rig(spool_dir, UNUSED_PORT).worker
    margin = 10.0
    now = time.monotonic()
    assert worker.stuck(now, margin) is None, "idle and fresh"

    worker.busy_until = now + 30.0
    assert worker.stuck(now, margin) is None, "a delivery within its bound"
    worker.busy_until = now - margin / 2
    assert worker.stuck(now, margin) is None, "past the bound, within the margin"
    worker.busy_until = now - margin - 20.0
    reason = worker.stuck(now, margin)
    assert reason is not None and "worker 0" in reason and "30s past its deadline" in reason

    worker.busy_until = None
    worker.last_iteration = now - IDLE_LOOP_S - margin - 1.0
    reason = worker.stuck(now, margin)
    assert reason is not None and "has not gone round its loop" in reason


# -- bugs ---------------------------------------------------------------------------------------


def test_spool_write_failure_retries_the_message_where_it_is(smtp_server_factory: ServerFactory,
                                                             spool_dir: Path) -> None:
    handler = AuditHandler(mail_replies={SENDER: "550 5.7.1 sender not allowed"})
    server = smtp_server_factory(handler, starttls=False)
    rig = make_rig(spool_dir, server.port, retry_min=0.3)
    queue_id = rig.put()
    rig.spool.meta.rmdir()  # the state write fails, as on a full disk: the message stays in queue/

    async def scenario() -> None:
        rig.scheduler.add_ready(WorkItem(queue_id, Location.QUEUE))
        task = asyncio.create_task(rig.worker.run())
        try:
            await eventually(lambda: rig.scheduler.deferred_count == 1, message="the retry scheduled")
            assert rig.spool.names(Location.QUEUE) == [queue_id] and handler.mails == [SENDER]
            rig.spool.meta.mkdir()
            await eventually(lambda: rig.spool.names(Location.FAILED) == [queue_id], timeout=3.0,
                             message="the retried message in failed/")
        finally:
            await finish(rig, task)

    asyncio.run(scenario())
    assert handler.mails == [SENDER, SENDER]


# -- hedged failover ------------------------------------------------------------------------------


class SlowGreeting(ScriptedServer):
    """A relay that accepts at once but greets only after `delay` seconds, then follows its script."""

    def __init__(self, replies: list[str], delay: float) -> None:
        super().__init__(replies)
        self.delay = delay

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.delay)
        await super().serve(reader, writer)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def test_a_blackholed_primary_is_hedged_past_and_then_opens_its_breaker_once(
        smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    fallback = smtp_server_factory(AuditHandler(), starttls=False)
    with BlackHole() as hole, structlog.testing.capture_logs() as logs:
        rig = make_rig(spool_dir, hole.port, fallback.port, connect_timeout=1.5)
        first, second = rig.put(message_to(RECIPIENT), "m1"), rig.put(message_to("bob@example.test"), "m2")
        router = rig.live.router

        async def run() -> None:
            try:
                assert await rig.worker.attempt(WorkItem(first, Location.QUEUE)) == Followup()
                # Delivered while the connect to the black hole is still under way (no timeout waited),
                # and the router lists the black hole last until that connect ends.
                [opening] = rig.worker._openings.values()
                assert opening.endpoint.port == hole.port and not opening.done
                assert [endpoint.port for _, endpoint in router.candidates()] == [fallback.port, hole.port]
                assert await rig.worker.attempt(WorkItem(second, Location.QUEUE)) == Followup()
                await eventually(lambda: not rig.worker._openings, timeout=5, message="the connect timeout")
            finally:
                await rig.worker.close_sessions()

        asyncio.run(run())

    assert [got.rcpt_tos for got in fallback.handler.wait_for(2)] == [[RECIPIENT], ["bob@example.test"]]
    [hedged] = events(logs, "relay_hedged")  # the second message went straight to the fallback
    assert (hedged["relay"], hedged["next_relay"]) == ("relay0", "relay1")
    assert hedged["waited_ms"] >= HEDGE_DELAY_S * 1000
    assert [entry["relay"] for entry in events(logs, "message_delivered")] == ["relay1", "relay1"]
    [down] = events(logs, "relay_down")
    assert (down["relay"], down["cause"]) == ("relay0", Cause.CONNECT_TIMEOUT.value)
    assert [endpoint.port for _, endpoint in router.candidates()] == [fallback.port], "the breaker is open"
    assert router.relays[0].endpoints[0].slow_connects == 0
    assert rig.counters.totals == Tally(delivered=2)


def test_a_primary_that_greets_late_loses_the_race_and_keeps_its_connection(
        smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    fallback = smtp_server_factory(AuditHandler(), starttls=False)
    script = ["220 late ESMTP", "250 late", "250 sender ok", "250 recipient ok", "354 go ahead", "250 queued",
              "221 bye"]
    with SlowGreeting(script, delay=HEDGE_DELAY_S + 0.35) as primary, \
            structlog.testing.capture_logs() as logs:
        rig = make_rig(spool_dir, primary.port, fallback.port)
        first, second = rig.put(message_to(RECIPIENT), "m1"), rig.put(message_to("bob@example.test"), "m2")

        async def run() -> None:
            try:
                assert await rig.worker.attempt(WorkItem(first, Location.QUEUE)) == Followup()
                await eventually(lambda: not rig.worker._openings, message="the late greeting")
                assert primary.received == [b"EHLO worker.test"], "the first message went to one relay only"
                assert await rig.worker.attempt(WorkItem(second, Location.QUEUE)) == Followup()
            finally:
                await rig.worker.close_sessions()

        asyncio.run(run())
        wait_until(lambda: len(primary.received) >= 5, message="QUIT at the primary")

    [got] = fallback.handler.wait_for(1)
    assert got.rcpt_tos == [RECIPIENT]
    assert primary.connections == 1, "the loser's connection was kept and used"
    assert primary.received[1:4] == [b"MAIL FROM:<app@example.test>", b"RCPT TO:<bob@example.test>", b"DATA"]
    assert [entry["relay"] for entry in events(logs, "message_delivered")] == ["relay1", "relay0"]
    assert events(logs, "relay_down") == [] and events(logs, "relay_failover") == []
    assert rig.live.router.relays[0].endpoints[0].up is True


def test_a_refused_primary_fails_over_at_once_without_waiting_for_the_hedge(
        smtp_server_factory: ServerFactory, spool_dir: Path) -> None:
    fallback = smtp_server_factory(AuditHandler(), starttls=False)
    with closed_port() as dead, structlog.testing.capture_logs() as logs:
        rig = make_rig(spool_dir, dead, fallback.port)
        assert rig.attempt(rig.put()) == Followup()
    fallback.handler.wait_for(1)
    assert events(logs, "relay_hedged") == [], "a refusal is an answer: nothing to hedge"
    [failover] = events(logs, "relay_failover")
    assert failover["cause"] == Cause.CONNECTION_REFUSED.value


class HeldStore:
    """Spool.accept on a thread, as the listener's process stores a message, held between writing its bytes
    and its fsyncs; `handoff` hears of it as the daemon does from the listener's events (storing, then
    queued or dropped). With `fail`, the store fails after its bytes were written (as a failed fsync does)."""

    def __init__(self, spool: Spool, handoff: ListenerHandoff, data: bytes, *, fail: bool = False) -> None:
        self.handoff = handoff
        self.size = len(data)
        self.release = threading.Event()
        loop = asyncio.get_running_loop()
        self.written: asyncio.Future[str] = loop.create_future()

        def hold(queue_id: str) -> None:
            loop.call_soon_threadsafe(self._written, queue_id)
            self.release.wait(10)
            if fail:
                raise OSError(errno.EIO, "the disk failed (test)")

        self.task = asyncio.create_task(asyncio.to_thread(spool.accept, data, hold))

    def _written(self, queue_id: str) -> None:
        self.handoff.storing(queue_id, self.size)
        self.written.set_result(queue_id)

    async def finish(self) -> None:
        self.release.set()
        try:
            queue_id = await self.task
        except OSError:
            self.handoff.dropped(await self.written)
        else:
            self.handoff.queued(queue_id, self.size)


# One connection, three messages (the pipelined MAIL, RCPT and DATA each get their reply).
TRANSACTION = ["250 ok", "250 ok", "354 go", "250 2.0.0 queued"]
THREE_ON_ONE = ["220 hi", "250-hi\r\n250 PIPELINING", *TRANSACTION * 3]


def cut_through_rig(spool_dir: Path, port: int, **overrides: Any) -> tuple[Rig, PendingStores, ListenerHandoff]:
    rig = make_rig(spool_dir, port, **overrides)
    pending = PendingStores()
    rig.worker.pending = pending
    return rig, pending, ListenerHandoff(rig.scheduler, pending, rig.counters)


async def open_session_with_one_message(rig: Rig, relay: ScriptedServer) -> asyncio.Task[None]:
    """The worker running, its session to the relay open (cut-through needs an open session)."""
    rig.scheduler.add_ready(WorkItem(rig.put(name="first"), Location.QUEUE))
    task = asyncio.create_task(rig.worker.run())
    await eventually(lambda: len(relay.bodies) == 1 and rig.counters.in_flight == 0, message="the first message")
    return task


STORED_FORM = envelope.with_envelope(MESSAGE, SENDER, [RECIPIENT])


def test_a_message_being_stored_is_relayed_at_once_and_recorded_once_durable(spool_dir: Path) -> None:
    with ScriptedServer(THREE_ON_ONE) as relay:
        rig, pending, handoff = cut_through_rig(spool_dir, relay.port)

        async def scenario() -> None:
            task = await open_session_with_one_message(rig, relay)
            held = HeldStore(rig.spool, handoff, STORED_FORM)
            queue_id = await held.written
            await eventually(lambda: len(relay.bodies) == 2, message="the whole message at the relay")
            assert relay.bodies[1].endswith(b"\r\nbody\r\n.\r\n")
            # The relay's 250 is recorded only once the store ends: the spool has not changed meanwhile.
            assert rig.counters.in_flight == 1 and pending.get(queue_id) is not None
            assert rig.spool.names(Location.QUEUE) == [] and rig.counters.totals == Tally(delivered=1)
            await held.finish()
            await eventually(lambda: rig.counters.in_flight == 0, message="the delivery recorded")
            assert len(pending) == 0 and pending.relay_early
            await finish(rig, task)

        asyncio.run(scenario())
        assert relay.connections == 1 and len(relay.bodies) == 2
        assert rig.counters.totals == Tally(delivered=2)
        assert all(not names for names in rig.everywhere().values())


def test_a_store_that_fails_after_the_relay_took_it_is_told_and_stops_early_relaying(spool_dir: Path) -> None:
    """The relay has a message whose client is told to try again: logged, and until PAUSE_S has passed each
    message waits for its store before it goes."""
    with ScriptedServer([*THREE_ON_ONE, "221 bye"]) as relay, structlog.testing.capture_logs() as logs:
        rig, pending, handoff = cut_through_rig(spool_dir, relay.port)

        async def scenario() -> None:
            task = await open_session_with_one_message(rig, relay)
            failing = HeldStore(rig.spool, handoff, STORED_FORM, fail=True)
            lost_id = await failing.written
            await eventually(lambda: len(relay.bodies) == 2, message="the whole message at the relay")
            await failing.finish()
            await eventually(lambda: rig.counters.in_flight == 0, message="the attempt ended")
            assert not pending.relay_early
            [told] = events(logs, "message_relayed_unstored")
            assert told["queue_id"] == lost_id
            [paused] = events(logs, "cut_through_paused")
            assert paused["seconds"] == PAUSE_S

            held = HeldStore(rig.spool, handoff, STORED_FORM)
            await held.written
            await eventually(lambda: rig.counters.in_flight == 1, message="the next message taken")
            assert len(relay.bodies) == 2 and relay.partial == b""  # nothing of it before its store ends
            await held.finish()
            await eventually(lambda: len(relay.bodies) == 3 and rig.counters.in_flight == 0, message="the next one")
            await finish(rig, task)

        asyncio.run(scenario())
        assert relay.connections == 1
        assert rig.counters.totals == Tally(delivered=2)  # the unstored message was never the spool's
        assert all(not names for names in rig.everywhere().values())
        assert [name for name in os.listdir(rig.spool.dir(Location.QUEUE)) if name.startswith(".tmp-")] == []


def test_a_store_slower_than_a_command_is_given_up_and_its_delivery_recorded_once_stored(spool_dir: Path) -> None:
    with ScriptedServer(THREE_ON_ONE) as relay:
        rig, pending, handoff = cut_through_rig(spool_dir, relay.port, command_timeout=0.5, transaction_timeout=0.5)

        async def scenario() -> None:
            task = await open_session_with_one_message(rig, relay)
            held = HeldStore(rig.spool, handoff, STORED_FORM)
            store = pending.get(await held.written)
            assert store is not None
            await eventually(lambda: store.given_up and rig.counters.in_flight == 0, message="the worker gave up")
            assert len(relay.bodies) == 2 and not pending.relay_early
            await held.finish()  # stored after all: listed afresh, and the relay's 250 recorded without a resend
            await eventually(lambda: rig.spool.names(Location.QUEUE) == [] and rig.counters.in_flight == 0,
                             message="the delivery recorded")
            await finish(rig, task)

        asyncio.run(scenario())
        assert relay.connections == 1 and len(relay.bodies) == 2
        assert rig.counters.totals == Tally(delivered=2)
        assert all(not names for names in rig.everywhere().values())
