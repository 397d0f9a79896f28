"""Failure notices: the digest's interval, daily cap, relay gate and content against a real spool
and a fake clock; then a real daemon and a real relay: a storm of 1,000 failures, a notice that
itself fails, and a notice held while every relay is down."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailwatchd.errors import SpoolFull
from mailwatchd.message import envelope
from mailwatchd.service.counters import Counters, FailedMail
from mailwatchd.service.live import Live
from mailwatchd.service.notices import (
    DAY_S,
    DETAIL_LIMIT,
    GATHER_S,
    NOTICE_SOURCE,
    RECIPIENTS_SHOWN,
    STATE_FILE,
    SUBMIT_RETRY_S,
    FailureNotices,
    Submit,
    spool_submitter,
)
from mailwatchd.service.scheduler import Scheduler
from mailwatchd.settings.config import Settings
from mailwatchd.settings.relays import Endpoint, RelayConfig, TlsMode
from mailwatchd.spool.store import Location, Spool
from tests.conftest import LOOPBACK, LoopbackController, RecordingHandler, SmtpServer, wait_until
from tests.daemonproc import DaemonProcess, drop, message, relay_env, spool_names
from tests.probe_servers import closed_port

ADMIN = "ops@example.com"
INTERVAL = 900.0
START = 1_700_000_000.0
RELAY = RelayConfig("relay0", (Endpoint(LOOPBACK, 9, TlsMode.NONE),))


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    spool: Spool
    scheduler: Scheduler
    live: Live
    clock: Clock
    notices: FailureNotices

    def relay_up(self, up: bool = True) -> None:
        for relay in self.live.router.relays:
            for health in relay.endpoints:
                self.live.router.report_probe(relay.config.name, health.endpoint, up, "ok" if up else "refused",
                                              "", {}, None)

    def restarted(self, submit: Submit | None = None) -> FailureNotices:
        """A new FailureNotices on the same spool: what a daemon restart gives."""
        return FailureNotices(live=self.live, submit=submit or self.notices.submit,
                              state_path=self.spool.root / STATE_FILE, clock=self.clock)

    def queued(self) -> list[EmailMessage]:
        """The digests in queue/, oldest first (queue ids sort by time)."""
        found = []
        for queue_id in self.spool.names(Location.QUEUE):
            parsed = email.message_from_bytes(self.spool.read(queue_id, Location.QUEUE), policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            found.append(parsed)
        return found


def settings_for(spool_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"relays": (RELAY,), "helo_name": "mail.example.com", "default_domain": "example.com",
                              "notice_address": ADMIN, "notice_interval": INTERVAL, "notice_max_per_day": 3}
    values.update(overrides)
    return Settings(spool=spool_dir, outbox=spool_dir / "outbox", **values)


@pytest.fixture
def rig(spool_dir: Path) -> Rig:
    return make_rig(settings_for(spool_dir))


def make_rig(settings: Settings) -> Rig:
    spool = Spool(settings.spool)
    spool.create_layout()
    scheduler = Scheduler()
    live = Live(settings)
    counters = Counters(lambda: (scheduler.ready_count, scheduler.deferred_count))
    clock = Clock()
    notices = FailureNotices(live=live, submit=spool_submitter(spool, scheduler, counters),
                             state_path=spool.root / STATE_FILE, clock=clock)
    counters.observers.append(notices)
    return Rig(spool, scheduler, live, clock, notices)


def failure(index: int, *, recipients: int = 1, is_notice: bool = False) -> FailedMail:
    return FailedMail(f"Q{index:05d}", f"recipient refused: bad-{index}@example.org: 550 5.1.1 no such user",
                      "recipient_rejected", "relay0", "app@example.com",
                      tuple(f"bad-{index}-{n}@example.org" for n in range(recipients)), is_notice)


def listed_ids(digest: EmailMessage) -> list[str]:
    return re.findall(r"^\d+\. Queue id:\s+(\S+)$", body_of(digest), re.MULTILINE)


def body_of(digest: EmailMessage) -> str:
    part = digest.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


def stated_count(digest: EmailMessage) -> int:
    match = re.fullmatch(r"mailwatchd: (\d+) messages? failed on \S+", str(digest["Subject"]))
    assert match, digest["Subject"]
    return int(match.group(1))


def not_listed(digest: EmailMessage) -> int:
    match = re.search(r"^\.\.\.and (\d+) more not listed", body_of(digest), re.MULTILINE)
    return int(match.group(1)) if match else 0


# -- unit: interval, cap, gate, memory --------------------------------------------------------------


def test_a_storm_of_1000_failures_becomes_one_digest_that_lists_200_and_counts_the_rest(rig: Rig) -> None:
    rig.relay_up()
    for index in range(1000):
        rig.notices.on_failed(failure(index))
    assert len(rig.notices.entries) == DETAIL_LIMIT and rig.notices.more == 1000 - DETAIL_LIMIT
    assert rig.notices.tick() is None, "the first failure is gathered for a moment"
    rig.clock.now += GATHER_S
    queue_id = rig.notices.tick()
    assert queue_id is not None and rig.spool.names(Location.QUEUE) == [queue_id]
    assert rig.scheduler.take_nowait() is not None
    (digest,) = rig.queued()
    assert stated_count(digest) == 1000
    assert listed_ids(digest) == [f"Q{index:05d}" for index in range(DETAIL_LIMIT)]
    assert not_listed(digest) == 800
    assert "(1000 recipients)" in body_of(digest)
    assert rig.notices.pending == 0 and rig.notices.tick() is None


def test_at_most_one_digest_per_interval_and_the_daily_cap_holds_the_rest(rig: Rig) -> None:
    rig.relay_up()
    sent_at: list[float] = []
    for index in range(10):  # a failure every 300 s for 50 minutes: digests at 10 s, 910 s, 1810 s
        rig.notices.on_failed(failure(index))
        for _ in range(30):  # the daemon's main loop ticks every 5 s at least
            rig.clock.now += 10.0
            if rig.notices.tick() is not None:
                sent_at.append(rig.clock.now)
    assert [at - START for at in sent_at] == [10.0, 910.0, 1810.0]
    digests = rig.queued()
    assert [stated_count(d) for d in digests] == [1, 3, 3]
    assert sum(stated_count(d) for d in digests) + rig.notices.pending == 10
    assert "This is the last one allowed for now" in body_of(digests[-1])
    assert "Notice 3 of at most 3 in 24 hours, at most one every 15m." in body_of(digests[-1])
    # The cap is a rolling 24 hours: the first digest's slot frees 24 h after it was sent.
    rig.clock.now = sent_at[0] + DAY_S - 1
    assert rig.notices.tick() is None
    rig.clock.now = sent_at[0] + DAY_S
    assert rig.notices.tick() is not None
    assert stated_count(rig.queued()[-1]) == 3 and rig.notices.pending == 0


def test_the_cap_and_the_interval_survive_a_restart(rig: Rig) -> None:
    rig.relay_up()
    for round_ in range(3):
        rig.notices.on_failed(failure(round_))
        rig.clock.now += INTERVAL
        assert rig.notices.tick() is not None
    saved = json.loads((rig.spool.root / STATE_FILE).read_bytes())
    assert saved == {"sent": [START + INTERVAL, START + 2 * INTERVAL, START + 3 * INTERVAL]}
    for _ in range(5):  # a crash loop: every new process has failures to report
        notices = rig.restarted()
        notices.on_failed(failure(99))
        rig.clock.now += INTERVAL
        assert notices.tick() is None
    assert len(rig.spool.names(Location.QUEUE)) == 3
    # After a restart the interval runs from the last digest sent, not from the start.
    rig.clock.now = START + DAY_S + INTERVAL + 1  # the first digest's slot is free again
    notices = rig.restarted()
    notices.on_failed(failure(100))
    rig.clock.now += GATHER_S
    assert notices.tick() is not None


def test_the_interval_runs_from_the_last_digest_across_a_restart(rig: Rig) -> None:
    rig.relay_up()
    rig.notices.on_failed(failure(1))
    rig.clock.now += GATHER_S
    assert rig.notices.tick() is not None
    notices = rig.restarted()
    notices.on_failed(failure(2))
    rig.clock.now += INTERVAL - 1
    assert notices.tick() is None
    rig.clock.now += 1
    assert notices.tick() is not None


def test_a_notice_that_fails_is_never_reported(rig: Rig) -> None:
    rig.relay_up()
    rig.notices.on_failed(failure(1, is_notice=True))
    assert rig.notices.pending == 0
    rig.clock.now += INTERVAL
    assert rig.notices.tick() is None
    assert rig.spool.names(Location.QUEUE) == []


def test_no_digest_while_no_relay_is_known_up_then_it_goes_once_one_is(rig: Rig) -> None:
    rig.notices.on_failed(failure(1))
    rig.clock.now += INTERVAL
    assert rig.notices.tick() is None, "endpoints never tried nor probed are not known to work"
    rig.relay_up(False)
    rig.clock.now += INTERVAL
    assert rig.notices.tick() is None
    assert rig.spool.names(Location.QUEUE) == []
    rig.relay_up()
    assert rig.notices.tick() is not None
    assert listed_ids(rig.queued()[0]) == ["Q00001"]


def test_the_local_outbox_counts_as_a_working_delivery(spool_dir: Path) -> None:
    rig = make_rig(settings_for(spool_dir, relays=()))
    rig.notices.on_failed(failure(1))
    rig.clock.now += GATHER_S
    assert rig.notices.tick() is not None


def test_switched_off_records_nothing_and_a_reload_that_switches_off_drops_what_was_pending(rig: Rig) -> None:
    rig.relay_up()
    rig.notices.on_failed(failure(1))
    assert rig.notices.pending == 1
    rig.live.replace(dataclasses.replace(rig.live.settings, notice_address=None))
    rig.relay_up()
    rig.clock.now += INTERVAL
    assert rig.notices.tick() is None and rig.notices.pending == 0
    rig.notices.on_failed(failure(2))
    assert rig.notices.pending == 0
    assert rig.spool.names(Location.QUEUE) == [] and not (rig.spool.root / STATE_FILE).exists()


def test_a_digest_that_cannot_be_queued_is_not_counted_and_is_tried_again_later(rig: Rig) -> None:
    rig.relay_up()
    working = rig.notices.submit

    def full(raw: bytes) -> str:
        raise SpoolFull("the filesystem is full (No space left on device)")

    notices = rig.restarted(submit=full)
    notices.on_failed(failure(1))
    rig.clock.now += GATHER_S
    assert notices.tick() is None
    assert json.loads((rig.spool.root / STATE_FILE).read_bytes()) == {"sent": []}
    assert notices.pending == 1
    notices.submit = working
    rig.clock.now += SUBMIT_RETRY_S - 1
    assert notices.tick() is None
    rig.clock.now += 1
    assert notices.tick() is not None
    assert len(json.loads((rig.spool.root / STATE_FILE).read_bytes())["sent"]) == 1


def test_a_clock_set_back_does_not_block_notices_for_a_day(rig: Rig) -> None:
    rig.relay_up()
    rig.notices.on_failed(failure(1))
    rig.clock.now += GATHER_S
    assert rig.notices.tick() is not None
    rig.clock.now -= 10 * DAY_S  # the last digest now looks 10 days ahead: it counts as sent when first seen
    rig.notices.on_failed(failure(2))
    rig.clock.now += GATHER_S
    assert rig.notices.tick() is None
    rig.clock.now += INTERVAL
    assert rig.notices.tick() is not None


def test_an_unreadable_state_file_counts_as_nothing_sent(rig: Rig) -> None:
    (rig.spool.root / STATE_FILE).write_text("{not json")
    notices = rig.restarted()
    rig.relay_up()
    notices.on_failed(failure(1))
    rig.clock.now += GATHER_S
    assert notices.tick() is not None
    assert len(json.loads((rig.spool.root / STATE_FILE).read_bytes())["sent"]) == 1


# -- unit: the digest itself ---------------------------------------------------------------------


def test_the_digest_is_an_auto_generated_plain_text_message_to_the_admin(rig: Rig) -> None:
    rig.relay_up()
    rig.notices.on_failed(failure(1, recipients=RECIPIENTS_SHOWN + 5))
    rig.notices.on_failed(FailedMail("Q00002", "refused: the spool entry is a FIFO"))  # a drop: no sender
    rig.notices.on_failed(FailedMail("Q00003", "550 5.7.1 rejected\r\nInjected: header\x1b[31m", "message_rejected",
                                     None, "", ("x@example.org",)))
    rig.clock.now += GATHER_S
    queue_id = rig.notices.tick()
    assert queue_id is not None
    raw = rig.spool.read(queue_id, Location.QUEUE)
    assert rig.spool.load_state(queue_id).source == NOTICE_SOURCE  # type: ignore[union-attr]
    outgoing = envelope.parse(queue_id, raw)
    assert outgoing.sender == "mailwatchd@example.com" and outgoing.recipients == (ADMIN,)
    (digest,) = rig.queued()
    assert digest["From"] == "mailwatchd <mailwatchd@example.com>" and digest["To"] == ADMIN
    assert digest["Auto-Submitted"] == "auto-generated"
    assert digest["X-Mailwatchd-Notice"] == "failure-digest"
    assert digest["Subject"] == "mailwatchd: 3 messages failed on mail.example.com"
    assert digest["Date"] and re.fullmatch(r"<\S+@example\.com>", str(digest["Message-ID"]).strip())
    assert digest.get_content_type() == "text/plain" and digest["Content-Transfer-Encoding"] == "7bit"
    body = body_of(digest)
    assert listed_ids(digest) == ["Q00001", "Q00002", "Q00003"]
    assert f"bad-1-{RECIPIENTS_SHOWN - 1}@example.org (and 5 more)" in body
    assert f"bad-1-{RECIPIENTS_SHOWN}@example.org" not in body
    assert "(unknown: the message could not be read)" in body and "<> (null sender)" in body
    assert "Cause:       recipient_rejected (relay relay0)" in body
    assert "550 5.7.1 rejected Injected: header [31m" in body and "\x1b" not in body
    for command in ("mailwatchd queue", "mailwatchd requeue ID", "mailwatchd delete ID"):
        assert command in body
    assert all(len(line) <= 78 for line in body.splitlines())


def test_the_notice_sender_is_the_relay_login_when_it_is_an_address(spool_dir: Path) -> None:
    relay = dataclasses.replace(RELAY, username="me@gmail.example")
    rig = make_rig(settings_for(spool_dir, relays=(relay,), default_domain=None, helo_name="myhost"))
    rig.relay_up()
    rig.notices.on_failed(failure(1))
    rig.clock.now += GATHER_S
    queue_id = rig.notices.tick()
    assert queue_id is not None
    assert envelope.parse(queue_id, rig.spool.read(queue_id, Location.QUEUE)).sender == "me@gmail.example"


def test_without_a_dotted_host_name_the_sender_takes_the_admin_domain(spool_dir: Path) -> None:
    rig = make_rig(settings_for(spool_dir, default_domain=None, helo_name="myhost"))
    rig.relay_up()
    rig.notices.on_failed(failure(1))
    rig.clock.now += GATHER_S
    queue_id = rig.notices.tick()
    assert queue_id is not None
    assert envelope.parse(queue_id, rig.spool.read(queue_id, Location.QUEUE)).sender == "mailwatchd@example.com"


# -- end to end: a real daemon, a real relay ----------------------------------------------------------


class RefuseBad(RecordingHandler):
    """550 to every recipient whose address starts with one of `refused`; records the rest."""

    def __init__(self, *refused: str) -> None:
        super().__init__()
        self.refused = refused

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith(self.refused):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def digests_at(server: SmtpServer) -> list[EmailMessage]:
    found = []
    for received in server.handler.messages:
        if ADMIN in received.rcpt_tos:
            parsed = email.message_from_bytes(received.data, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            found.append(parsed)
    return found


def notice_env(base: dict[str, str], spool: Path, port: int, **extra: str) -> dict[str, str]:
    """A 1 s notice interval; WATCHDOG_USEC (no NOTIFY_SOCKET: the pings go nowhere) makes the main
    loop, and so the notices' tick, run every 0.5 s instead of every 5 s."""
    return relay_env(base, spool, LOOPBACK, port, MAILWATCHD_DEFAULT_DOMAIN="example.com",
                     MAILWATCHD_NOTICE_INTERVAL="1s", WATCHDOG_USEC="1000000", **extra)


STORM_MESSAGES = 125
STORM_RECIPIENTS = 8  # 1,000 refused recipients: 1,000 single-recipient messages take ~20 s of fsyncs here


def storm_message(index: int) -> bytes:
    return message(index, to=", ".join(f"bad-{index}-{n}@example.org" for n in range(STORM_RECIPIENTS)))


def stated_recipients(digest: EmailMessage) -> int:
    match = re.search(r"\((\d+) recipients?\) since its last", " ".join(body_of(digest).split()))
    assert match
    return int(match.group(1))


def test_a_storm_of_1000_refused_recipients_gives_as_many_digests_as_the_cap_allows(
        smtp_server_factory: Callable[..., SmtpServer], spool_dir: Path, clean_env: dict[str, str],
        daemons: Callable[..., DaemonProcess]) -> None:
    server = smtp_server_factory(RefuseBad("bad-"))
    half = STORM_MESSAGES // 2
    for index in range(half):
        drop(spool_dir, storm_message(index), f"storm-{index}")
    # MAILWATCHD_ADMIN_ADDRESS alone: notices go there by default.
    daemon = daemons(notice_env(clean_env, spool_dir, server.port, MAILWATCHD_ADMIN_ADDRESS=ADMIN,
                                MAILWATCHD_NOTICE_MAX_PER_DAY="2", MAILWATCHD_LOG_LEVEL="info"))
    daemon.wait_event("failure_notice_queued")
    for index in range(half, STORM_MESSAGES):  # the storm goes on after the first digest
        drop(spool_dir, storm_message(index), f"storm-{index}")
    wait_until(lambda: len(spool_names(spool_dir, "failed")["failed"]) == STORM_MESSAGES, timeout=15,
               message=f"{STORM_MESSAGES} messages in failed/")
    wait_until(lambda: len(digests_at(server)) == 2, timeout=10, message="two digests")
    late = 5
    for index in range(STORM_MESSAGES, STORM_MESSAGES + late):  # more failures once the cap is used up
        drop(spool_dir, storm_message(index), f"late-{index}")
    digests = digests_at(server)
    reported = sum(stated_count(digest) for digest in digests)
    # Every failure is either in a digest or still held: the count adds up exactly.
    held = daemon.wait_event("failure_notice_held",
                             lambda e: e["pending"] == STORM_MESSAGES + late - reported, timeout=10)[0]
    assert held["reason"] == "daily cap reached"
    assert len(digests_at(server)) == 2, "no digest beyond the cap"
    failed = set(spool_names(spool_dir, "failed")["failed"])
    listed = [queue_id for digest in digests for queue_id in listed_ids(digest)]
    assert len(listed) == len(set(listed)) == reported and set(listed) <= failed
    for digest in digests:
        assert stated_count(digest) == len(listed_ids(digest)) + not_listed(digest)
        assert stated_recipients(digest) == STORM_RECIPIENTS * stated_count(digest)
        assert digest["Auto-Submitted"] == "auto-generated"
    assert len(daemon.named("failure_notice_queued")) == 2
    assert not daemon.named("failure_notice_failed")


def test_a_notice_that_itself_fails_is_not_reported_by_another(
        smtp_server_factory: Callable[..., SmtpServer], spool_dir: Path, clean_env: dict[str, str],
        daemons: Callable[..., DaemonProcess]) -> None:
    server = smtp_server_factory(RefuseBad("bad-", ADMIN))
    daemon = daemons(notice_env(clean_env, spool_dir, server.port, MAILWATCHD_NOTICE_ADDRESS=ADMIN))
    drop(spool_dir, message(1, to="bad-1@example.org"), "first")
    first = daemon.wait_event("message_failed")[0]["queue_id"]
    notice = daemon.wait_event("failure_notice_queued")[0]
    assert notice["failures"] == 1
    assert daemon.wait_event("failure_notice_failed")[0]["queue_id"] == notice["queue_id"]
    drop(spool_dir, message(2, to="bad-2@example.org"), "second")
    second = daemon.wait_event("message_failed", lambda e: e["queue_id"] not in (first, notice["queue_id"]))[0]
    notices = daemon.wait_event("failure_notice_queued", count=2)
    assert notices[1]["failures"] == 1, "the failed notice must not be among the failures reported"
    daemon.wait_event("failure_notice_failed", lambda e: e["queue_id"] == notices[1]["queue_id"])
    raw = (spool_dir / "failed" / notices[1]["queue_id"]).read_bytes()
    assert second["queue_id"].encode() in raw and notice["queue_id"].encode() not in raw
    assert len(daemon.named("failure_notice_queued")) == 2 and server.handler.messages == []


def test_a_submitter_cannot_hide_its_failure_behind_the_notice_header(
        smtp_server_factory: Callable[..., SmtpServer], spool_dir: Path, clean_env: dict[str, str],
        daemons: Callable[..., DaemonProcess]) -> None:
    server = smtp_server_factory(RefuseBad("bad-"))
    daemon = daemons(notice_env(clean_env, spool_dir, server.port, MAILWATCHD_NOTICE_ADDRESS=ADMIN))
    forged = b"X-Mailwatchd-Notice: failure-digest\n" + message(1, to="bad-1@example.org")
    drop(spool_dir, forged, "forged")
    failed = daemon.wait_event("message_failed")[0]["queue_id"]
    notice = daemon.wait_event("failure_notice_queued")[0]
    assert notice["failures"] == 1
    [digest] = server.handler.wait_for(1)
    assert failed.encode() in digest.data


def test_no_notice_while_every_relay_is_down_and_it_goes_once_one_is_up(
        spool_dir: Path, clean_env: dict[str, str], daemons: Callable[..., DaemonProcess]) -> None:
    with closed_port() as port:
        daemon = daemons(notice_env(clean_env, spool_dir, port, MAILWATCHD_NOTICE_ADDRESS=ADMIN,
                                    MAILWATCHD_PROBE_INTERVAL_DOWN="200ms"))
        daemon.wait_event("relay_down")
        os.symlink("/nonexistent", spool_dir / "new" / "a-symlink")  # refused at intake, no relay needed
        refused = daemon.wait_event("message_failed")[0]["queue_id"]
        held = daemon.wait_event("failure_notice_held")[0]
        assert held["reason"] == "no relay is known to be up" and held["pending"] == 1
        assert not daemon.named("failure_notice_queued")
    with relay_on(port) as handler:
        handler.wait_for(1)
        (digest,) = [email.message_from_bytes(m.data, policy=email.policy.default) for m in handler.messages]
        assert isinstance(digest, EmailMessage)
        assert listed_ids(digest) == [refused] and "symbolic link" in body_of(digest)
    assert len(daemon.named("failure_notice_queued")) == 1


@contextmanager
def relay_on(port: int) -> Iterator[RecordingHandler]:
    """A recording aiosmtpd relay on a given loopback port."""
    handler = RecordingHandler()
    controller = LoopbackController(handler, hostname=LOOPBACK, port=port)
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()
