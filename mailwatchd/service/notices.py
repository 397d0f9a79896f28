"""Failure notices: a digest of permanently failed mail, mailed to the admin (issue 9).

Bounded on every side, so that a storm of failures cannot become a storm of mail:
- at most one digest per MAILWATCHD_NOTICE_INTERVAL, and at most MAILWATCHD_NOTICE_MAX_PER_DAY in
  any 24 hours; the send times are kept in SPOOL/notices.json, so a restart loop cannot exceed either;
- a digest lists at most DETAIL_LIMIT failures and counts the rest ("...and 812 more");
- it is queued only while some relay endpoint is known up (or the local outbox is the delivery);
- never about a notice itself: a notice carries X-Mailwatchd-Notice, and its own failure is only logged.

Failures not yet mailed live in memory: a restart forgets them (they stay in failed/, where
`mailwatchd queue` lists them); only the send times survive it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from pathlib import Path

from mailwatchd.errors import MalformedMessage, SpoolFull
from mailwatchd.message.envelope import check_address
from mailwatchd.service.counters import Counters, FailedMail
from mailwatchd.service.live import Live
from mailwatchd.service.logs import get_logger
from mailwatchd.service.scheduler import Scheduler, WorkItem
from mailwatchd.settings.config import Settings
from mailwatchd.spool.durable import install_durably
from mailwatchd.spool.messagestate import MessageState
from mailwatchd.spool.store import Location, Spool

log = get_logger()
NOTICE_HEADER = b"X-Mailwatchd-Notice"
NOTICE_KIND = "failure-digest"
STATE_FILE = "notices.json"  # in the spool root
DAY_S = 86400.0
DETAIL_LIMIT = 200  # failures kept (and listed) in detail per digest; the rest are counted
RECIPIENTS_SHOWN = 10  # per failure
REASON_CHARS = 500
LINE_WIDTH = 76
GATHER_S = 10.0  # a digest waits this long (at most one interval) after its first failure: a burst goes together
SUBMIT_RETRY_S = 60.0  # after a digest could not be queued (spool full)
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")

Submit = Callable[[bytes], str]


# The state file's `source` of a notice the daemon queued. The state lives in meta/, which only the daemon
# writes: a submitter can copy the notice header into its own message, not this.
NOTICE_SOURCE = "failure notice"


def spool_submitter(spool: Spool, scheduler: Scheduler, counters: Counters) -> Submit:
    """`submit(raw) -> queue id`: store a notice in queue/ (state first, durably) and make it ready."""
    def submit(raw: bytes) -> str:
        queue_id = spool.new_id()
        spool.add(raw, MessageState(queue_id, time.time(), source=NOTICE_SOURCE), Location.QUEUE)
        scheduler.add_ready(WorkItem(queue_id, Location.QUEUE))
        counters.queued()
        return queue_id
    return submit


@dataclass(frozen=True)
class Entry:
    """One failure as a digest shows it: trimmed, so that a pending digest's memory stays bounded."""

    failed: FailedMail  # recipients cut to RECIPIENTS_SHOWN, reason to REASON_CHARS
    recipient_count: int
    at: float  # epoch seconds


class SendLog:
    """When digests were queued (epoch seconds), for the interval and the rolling 24-hour cap.

    Kept in a small JSON file replaced atomically; an unreadable file counts as no digest sent.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: list[float] = []
        self._loaded = False

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            raw = json.loads(self.path.read_bytes())
            self.times = sorted(float(value) for value in raw["sent"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("failure_notice_state_unreadable", path=str(self.path), detail=str(exc),
                        action="counting no digest sent in the last 24 hours")

    def within_day(self, now: float) -> list[float]:
        """Send times in the 24 hours before `now`; a time ahead of the clock (it was set back) counts as now."""
        self.times = [min(at, now) for at in self.times if at > now - DAY_S]
        return self.times

    def record(self, at: float) -> None:
        """Add a send time and persist; SpoolFull or OSError when it cannot be written (nothing recorded)."""
        self._write([*self.times, at])
        self.times.append(at)

    def forget(self, at: float) -> None:
        """Take back a send time whose digest could not be queued after all (best effort)."""
        with contextlib.suppress(ValueError):
            self.times.remove(at)
        with contextlib.suppress(SpoolFull, OSError):
            self._write(self.times)

    def _write(self, times: list[float]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        install_durably(temporary, self.path, json.dumps({"sent": times}).encode())


class FailureNotices:
    """Collects permanently failed mail (a Counters observer) and queues a bounded digest on `tick()`.

    Reads the live settings on every call: a reload that sets, changes or switches off
    MAILWATCHD_NOTICE_ADDRESS (or the interval or the cap) applies at once.
    """

    def __init__(self, *, live: Live, submit: Submit, state_path: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.live = live
        self.submit = submit
        self.sent = SendLog(state_path)
        self.clock = clock
        self.entries: list[Entry] = []
        self.more = 0  # failures beyond DETAIL_LIMIT, counted only
        self.more_recipients = 0
        self._first_at: float | None = None
        self._retry_at = 0.0
        self._held_logged_at: float | None = None

    @property
    def pending(self) -> int:
        """Failures waiting for the next digest."""
        return len(self.entries) + self.more

    # -- Counters observer --------------------------------------------------------------------

    def on_delivered(self, relay: str, latency_s: float) -> None:
        return None

    def on_failed(self, failed: FailedMail) -> None:
        address = self.live.settings.notice_address
        if address is None:
            return
        if failed.is_notice:
            log.warning("failure_notice_failed", queue_id=failed.queue_id, to=address, reason=failed.reason,
                        hint="check MAILWATCHD_NOTICE_ADDRESS and the relay; a failed notice is never itself reported")
            return
        now = self.clock()
        if self._first_at is None:
            self._first_at = now
        if len(self.entries) >= DETAIL_LIMIT:
            self.more += 1
            self.more_recipients += len(failed.recipients)
            return
        shown = FailedMail(failed.queue_id, _clip(failed.reason, REASON_CHARS), failed.cause, failed.relay,
                           failed.sender, failed.recipients[:RECIPIENTS_SHOWN])
        self.entries.append(Entry(shown, len(failed.recipients), now))

    # -- the main loop's tick ------------------------------------------------------------------

    def tick(self) -> str | None:
        """Queue a digest if one is due and allowed; returns its queue id, else None."""
        settings = self.live.settings
        if settings.notice_address is None:
            self._clear()
            return None
        if not self.pending or self._first_at is None:
            return None
        now = self.clock()
        self.sent.load()
        recent = self.sent.within_day(now)
        interval = settings.notice_interval
        due = max(self._first_at + min(GATHER_S, interval), recent[-1] + interval if recent else 0.0,
                  self._retry_at)
        if now < due:
            return None
        if len(recent) >= settings.notice_max_per_day:
            self._held(now, interval, "daily cap reached", next_possible=recent[0] + DAY_S,
                       hint="raise MAILWATCHD_NOTICE_MAX_PER_DAY or run `mailwatchd queue`")
            return None
        if not self._relay_works(settings):
            self._held(now, interval, "no relay is known to be up",
                       hint="the digest goes out once a relay endpoint answers (see `mailwatchd status`)")
            return None
        return self._send(settings, now, number=len(recent) + 1)

    def _send(self, settings: Settings, now: float, number: int) -> str | None:
        assert settings.notice_address is not None
        raw = build_digest(settings, self.entries, self.more, self.more_recipients, now=now, number=number)
        try:
            self.sent.record(now)  # first: the cap holds even if we die right after queueing
        except (SpoolFull, OSError) as exc:
            self._not_queued(now, exc)
            return None
        try:
            queue_id = self.submit(raw)
        except (SpoolFull, OSError) as exc:
            self.sent.forget(now)
            self._not_queued(now, exc)
            return None
        log.info("failure_notice_queued", queue_id=queue_id, to=settings.notice_address, failures=self.pending,
                 listed=len(self.entries), digest=number, max_per_day=settings.notice_max_per_day)
        self._clear()
        return queue_id

    def _not_queued(self, now: float, exc: BaseException) -> None:
        log.error("failure_notice_not_queued", detail=str(exc), pending=self.pending,
                  retry_in_s=SUBMIT_RETRY_S)
        self._retry_at = now + SUBMIT_RETRY_S

    def _held(self, now: float, interval: float, reason: str, *, hint: str, next_possible: float | None = None) -> None:
        """Log why a due digest waits: at most once per interval."""
        if self._held_logged_at is not None and now - self._held_logged_at < interval:
            return
        self._held_logged_at = now
        extra = {} if next_possible is None else {"next_possible": _iso(next_possible)}
        log.warning("failure_notice_held", reason=reason, pending=self.pending, hint=hint, **extra)

    def _relay_works(self, settings: Settings) -> bool:
        """A notice goes only through a relay that works: some endpoint answered its last attempt or
        probe. The local outbox (no relay configured) is always usable: it is where all mail goes."""
        if settings.uses_outbox:
            return True
        return any(endpoint.up is True for relay in self.live.router.relays for endpoint in relay.endpoints)

    def _clear(self) -> None:
        self.entries = []
        self.more = self.more_recipients = 0
        self._first_at = None
        self._retry_at = 0.0
        self._held_logged_at = None


# -- the digest ------------------------------------------------------------------------------------


def notice_sender(settings: Settings) -> str:
    """Who notices are from (envelope and From:): the first relay's login when it is an address (a
    relay that enforces the sender identity takes it, as `check --send-test` assumes), else
    mailwatchd@<mail domain>."""
    if settings.relays and settings.relays[0].username:
        with contextlib.suppress(MalformedMessage):
            return check_address(settings.relays[0].username, "sender")
    return f"mailwatchd@{_mail_domain(settings)}"


def _mail_domain(settings: Settings) -> str:
    """MAILWATCHD_DEFAULT_DOMAIN, else the host's name if it is a dotted one, else the notice address's domain."""
    if settings.default_domain:
        return settings.default_domain
    host = settings.ehlo_name
    if "." in host and not host.lower().startswith("localhost"):
        return host
    assert settings.notice_address is not None
    return settings.notice_address.rpartition("@")[2]


def build_digest(settings: Settings, entries: list[Entry], more: int, more_recipients: int, *, now: float,
                 number: int) -> bytes:
    """The digest as an RFC 5322 message (CRLF line ends), marked auto-generated (RFC 3834 §5)."""
    assert settings.notice_address is not None
    host = settings.ehlo_name
    count = len(entries) + more
    recipients = sum(entry.recipient_count for entry in entries) + more_recipients
    sender = notice_sender(settings)
    message = EmailMessage(policy=SMTP)
    message["From"] = f"mailwatchd <{sender}>"
    message["To"] = settings.notice_address
    message["Subject"] = f"mailwatchd: {_plural(count, 'message')} failed on {host}"
    message["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5: no auto-reply to this
    message[NOTICE_HEADER.decode()] = NOTICE_KIND
    message.set_content(_body(settings, entries, more, count, recipients, number))
    return message.as_bytes()


def _body(settings: Settings, entries: list[Entry], more: int, count: int, recipients: int, number: int) -> str:
    lines = _wrapped(f"mailwatchd on {settings.ehlo_name} gave up on {_plural(count, 'message')} "
                     f"({_plural(recipients, 'recipient')}) since its last notice. They stay in the "
                     "spool's failed/ directory until you requeue or delete them.")
    lines.append("")
    for index, entry in enumerate(entries, 1):
        failed = entry.failed
        shown = ", ".join(_one_line(address) for address in failed.recipients) or "(unknown)"
        if entry.recipient_count > len(failed.recipients):
            shown += f" (and {entry.recipient_count - len(failed.recipients)} more)"
        if failed.sender is None:
            sender = "(unknown: the message could not be read)"
        else:
            sender = _one_line(failed.sender) or "<> (null sender)"
        cause = failed.cause + (f" (relay {failed.relay})" if failed.relay else "")
        for label, value in ((f"{index}. Queue id:", failed.queue_id), ("   Failed at:", _iso(entry.at)),
                             ("   Sender:", sender), ("   Recipients:", shown), ("   Cause:", _one_line(cause)),
                             ("   Reason:", _one_line(failed.reason))):
            lines += _wrapped(value, first=f"{label:<16}", rest=" " * 16)
        lines.append("")
    if more:
        lines += [f"...and {more} more not listed here (`mailwatchd queue` lists them all).", ""]
    lines += ["What to do:",
              "  mailwatchd queue              list failed messages with their reasons",
              "  mailwatchd requeue ID         try a message again once the cause is fixed",
              "  mailwatchd requeue --failed   try every failed message again",
              "  mailwatchd delete ID          remove a message for good", ""]
    cap = settings.notice_max_per_day
    lines += _wrapped(f"Notice {number} of at most {cap} in 24 hours, at most one every "
                      f"{_duration(settings.notice_interval)}.")
    if number >= cap:
        lines += _wrapped("This is the last one allowed for now: later failures are mailed once the 24-hour "
                          "window allows, and logged (failure_notice_held) meanwhile.")
    lines += ["", "-- ", f"mailwatchd, MAILWATCHD_NOTICE_ADDRESS={settings.notice_address}",
              "(set it to off to stop these notices)"]
    return "\n".join(lines) + "\n"


def _wrapped(text: str, first: str = "", rest: str = "") -> list[str]:
    """`text` in lines of at most LINE_WIDTH characters where it has spaces to break at (an ASCII
    body then goes as 7bit, readable as it is)."""
    return textwrap.wrap(text, LINE_WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _one_line(text: str) -> str:
    """Text from a relay or a message kept on one line: no control characters reach the body."""
    return _CONTROLS.sub(" ", text).strip()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
