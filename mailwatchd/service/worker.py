"""One worker: take a due message, attempt it through the relays in failover order, and
settle the outcome back into the spool. Several workers run side by side (one session each
at a time), sharing the scheduler and the live configuration's router.

Order of writes on settling (crash-safety): a split-off part is stored before the original
is removed; a message's state is written before its file moves; a file is removed only after
the relay accepted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import NamedTuple, assert_never

from mailwatchd.errors import MalformedMessage, RefusedSpoolEntry, SpoolFull
from mailwatchd.message import envelope
from mailwatchd.message.envelope import OutgoingMessage
from mailwatchd.service.backoff import retry_delay
from mailwatchd.service.counters import Counters, FailedMail, HotLogger
from mailwatchd.service.hedge import Opening, Race, start_opening
from mailwatchd.service.live import Live
from mailwatchd.service.logs import get_logger
from mailwatchd.service.notices import NOTICE_SOURCE
from mailwatchd.service.scheduler import Scheduler, WorkItem
from mailwatchd.settings.relays import Endpoint, RelayConfig
from mailwatchd.spool.messagestate import Attempt, MessageState
from mailwatchd.spool.pending import PendingStore, PendingStores
from mailwatchd.spool.queueid import queue_id_time
from mailwatchd.spool.reaper import BACKLOG_LIMIT
from mailwatchd.spool.store import Location, Spool
from mailwatchd.transports.outcome import Cause, DeliveryResult, Outcome, RefusedRecipient
from mailwatchd.transports.transport import RelaySession, Session

log = get_logger()
hot_log = HotLogger()  # for the line logged per delivered message
# An idle worker goes round its loop at least this often (waiting for work or for a relay);
# the watchdog counts a worker that has not gone round for longer (plus a margin) as stuck.
IDLE_LOOP_S = 5.0


class Retry(NamedTuple):
    """A message to try again at `due` (epoch seconds), from the directory it is in."""

    due: float
    queue_id: str
    location: Location = Location.DEFERRED


@dataclass
class Followup:
    """What the scheduler must do once the worker let go of a message."""

    retry_at: list[Retry] = field(default_factory=list)
    give_back: bool = False  # no relay could take it now: first in line again


def _fresh_state(queue_id: str) -> MessageState:
    """The state of a message that has none yet (made only when it is needed)."""
    return MessageState(queue_id, queue_id_time(queue_id))


class Worker:
    """Attempts messages one at a time, reusing its session across consecutive messages."""

    def __init__(self, index: int, *, spool: Spool, scheduler: Scheduler, live: Live, counters: Counters,
                 stop: asyncio.Event, pending: PendingStores | None = None) -> None:
        self.index = index
        self.spool = spool
        self.pending = PendingStores() if pending is None else pending
        self.scheduler = scheduler
        self.live = live
        self.counters = counters
        self.stop = stop
        self.retired = False  # a reload lowered the concurrency: finish the current message, then end
        self.busy_until: float | None = None  # monotonic deadline of the delivery call in flight
        self.last_iteration = time.monotonic()  # the watchdog wants proof the loop goes round
        self._sessions: dict[tuple[str, Endpoint], RelaySession] = {}
        self._openings: dict[tuple[str, Endpoint], Opening] = {}  # under way; they may outlive a message
        self._outbox: Session | None = None
        self._generation = live.generation

    def stuck(self, now: float, margin: float) -> str | None:
        """Why this worker looks stuck (a delivery past its bound, a loop that stopped), or None."""
        if self.busy_until is not None:
            if now > self.busy_until + margin:
                return f"worker {self.index} is in a delivery {now - self.busy_until:.0f}s past its deadline"
            return None
        if now - self.last_iteration > IDLE_LOOP_S + margin:
            return f"worker {self.index} has not gone round its loop for {now - self.last_iteration:.0f}s"
        return None

    async def run(self) -> None:
        try:
            while not self.stop.is_set() and not self.retired:
                self.last_iteration = time.monotonic()
                await self._iteration()
        finally:
            await self.close_sessions()

    async def _iteration(self) -> None:
        live = self.live
        if self._generation != live.generation:
            await self.close_sessions()
            self._generation = live.generation
        if not live.settings.uses_outbox:
            wait = live.router.next_chance()
            if wait is not None:
                await self._wait_for_relay(wait)
                return
        item = self.scheduler.take_nowait()
        if item is None:
            self.spool.reaper.flush()  # out of work: the delivered messages' files go now
            await self._close_idle()
            item = await self.scheduler.take(timeout=self._idle_wait())
            if item is None:
                return
        if self.stop.is_set():
            self.scheduler.release(item)
            return
        self.counters.attempt_started()
        try:
            followup = await self.attempt(item)
        except (SpoolFull, OSError) as exc:
            log.error("spool_write_failed", queue_id=item.queue_id, detail=str(exc))
            followup = self._retry_later(item)
        except Exception:
            # One unexpected failure must not stall the queue: keep the file, retry later.
            log.exception("attempt_crashed", queue_id=item.queue_id)
            followup = self._retry_later(item)
        finally:
            self.busy_until = None
            self.scheduler.done(item.queue_id)
        if followup.give_back:
            self.scheduler.release(item)
        for retry in followup.retry_at:
            self.scheduler.add_deferred(*retry)
        self.counters.attempt_finished()
        reaper = self.spool.reaper
        if reaper.pending > BACKLOG_LIMIT:  # a disk slower at unlinking than the relay at taking mail
            await reaper.caught_up()

    def _retry_later(self, item: WorkItem) -> Followup:
        """The message did not move: it is retried from where it is."""
        return Followup(retry_at=[Retry(time.time() + self.live.settings.retry_min, item.queue_id, item.location)])

    async def _wait_for_relay(self, wait: float) -> None:
        """Until an endpoint may be usable, the configuration changes or the daemon stops."""
        changed = self.live.wakeup()
        changed.clear()
        waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=min(wait, IDLE_LOOP_S) + 0.01, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _idle_sessions(self) -> list[tuple[tuple[str, Endpoint] | None, Session]]:
        """The sessions the idle timeout applies to (keyed; None: the outbox): not those being opened."""
        found: list[tuple[tuple[str, Endpoint] | None, Session]] = [
            (key, session) for key, session in self._sessions.items() if key not in self._openings]
        if self._outbox is not None:
            found.append((None, self._outbox))
        return found

    def _idle_wait(self) -> float:
        """How long to wait for work: until the next open session's idle timeout, at most IDLE_LOOP_S."""
        idle_timeout = self.live.settings.idle_timeout
        remaining = [idle_timeout - session.idle_for for _, session in self._idle_sessions()]
        return max(0.0, min([IDLE_LOOP_S, *remaining]))

    async def _close_idle(self) -> None:
        idle_timeout = self.live.settings.idle_timeout
        for key, session in self._idle_sessions():
            if session.idle_for >= idle_timeout:
                if key is None:
                    self._outbox = None
                else:
                    del self._sessions[key]
                await session.close()

    async def close_sessions(self) -> None:
        openings, self._openings = list(self._openings.values()), {}
        for opening in openings:
            if opening.task is not None:
                opening.task.cancel()
        for opening in openings:
            if opening.task is not None:
                with contextlib.suppress(BaseException):
                    await opening.task
        sessions: list[Session] = list(self._sessions.values())
        if self._outbox is not None:
            sessions.append(self._outbox)
        self._sessions, self._outbox = {}, None
        for session in sessions:
            await session.close()

    def _outbox_session(self) -> Session:
        if self._outbox is None:
            self._outbox = self.live.make_session(None, None)
        return self._outbox

    def _opening(self, relay: RelayConfig, endpoint: Endpoint) -> Opening:
        """The endpoint's session: its opening under way, the open session, or a new opening."""
        key = (relay.name, endpoint)
        opening = self._openings.get(key)
        if opening is not None:
            return opening
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = self.live.make_relay_session(relay, endpoint)
        opening = start_opening(relay, endpoint, session, self.live.router, self._opening_ended)
        if opening.task is not None:
            self._openings[key] = opening
        return opening

    def _opening_ended(self, opening: Opening) -> None:
        key = (opening.relay.name, opening.endpoint)
        if self._openings.get(key) is opening:
            del self._openings[key]

    # -- one attempt --------------------------------------------------------------------------

    async def attempt(self, item: WorkItem) -> Followup:
        spool = self.spool
        queue_id, location = item.queue_id, item.location
        loaded = None if item.stateless else spool.load_state(queue_id)
        # A message the listener is still storing is read from its temporary file and may be relayed before it
        # is durable (spool/pending.py); the spool changes only once the store has ended.
        pending = self.pending.get(queue_id) if item.stateless else None
        relayed = self.pending.take_relayed(queue_id) if item.stateless else None
        raw = None
        if pending is not None:
            raw = None if pending.settled else spool.read_storing(queue_id)
            if raw is None:
                if not await self._stored(pending):
                    return Followup()
                pending = None
        try:
            raw = spool.read(queue_id, location) if raw is None else raw
        except FileNotFoundError:
            log.info("message_vanished", queue_id=queue_id, location=location.value)
            return Followup()
        except (RefusedSpoolEntry, PermissionError) as exc:
            self._fail(loaded or _fresh_state(queue_id), location, str(exc) if isinstance(exc, RefusedSpoolEntry)
                       else f"cannot read the spool file: {exc.strerror}")
            return Followup()
        try:
            # Parsed as stored; completed (bare local names qualified, aliases applied) from the settings.
            message = self.live.addressing.complete(*envelope.parse_with_fields(queue_id, raw))
        except MalformedMessage as exc:
            if pending is not None and not await self._stored(pending):
                return Followup()
            self._fail(loaded or _fresh_state(queue_id), location, f"malformed message: {exc}",
                       cause=Cause.MALFORMED.value)
            return Followup()

        result = relayed or await self._deliver(message, pending)
        if pending is not None and not await self._stored(pending):
            return Followup()  # not stored (no message to record), or left for a later listing
        if result is None:
            return Followup(give_back=True)
        if result.outcome is Outcome.DELIVERED and not result.refused:  # the common case: no state to make
            attempts, received_at = (loaded.attempts, loaded.received_at) if loaded else (0, queue_id_time(queue_id))
            return self._delivered(attempts + 1, received_at, loaded is not None, location, message, result)
        return self._settle(loaded or _fresh_state(queue_id), location, raw, message, result,
                            has_state=loaded is not None)

    async def _stored(self, pending: PendingStore) -> bool:
        """Whether a message the listener is storing is durable; False also when it took longer than a command
        may (the message is then listed afresh once stored)."""
        within = self.live.settings.command_timeout
        if not pending.settled:
            self.busy_until = max(self.busy_until or 0.0, time.monotonic() + within)
        return await pending.stored(within)

    async def _deliver(self, message: OutgoingMessage, pending: PendingStore | None = None) -> DeliveryResult | None:
        """One attempt, failing over across endpoints and relays (their sessions' openings hedged,
        hedge.py); None if none can take it now. A `pending` message (still being stored) goes at once on the
        first endpoint's open session unless early relaying is paused; anywhere else, only once it is stored."""
        live = self.live
        if live.settings.uses_outbox:
            if pending is not None and not await self._stored(pending):
                return None
            return await self._deliver_through(self._outbox_session(), message)
        router = live.router
        candidates = router.candidates()
        if not candidates:
            return None
        relay, endpoint = candidates[0]
        key = (relay.name, endpoint)
        session = self._sessions.get(key)
        if session is not None and session.connected and key not in self._openings:
            # The first endpoint's session is open (the common case): nothing to race.
            if pending is not None and not self.pending.relay_early:
                if not await self._stored(pending):
                    return None
                pending = None
            result = await self._deliver_through(session, message)
            router.report(relay, endpoint, result)
            if pending is not None and not await self._stored(pending):
                self.pending.unstored(pending, result)
                return result  # discarded by attempt(): there is no stored message to record it for
            if result.outcome is not Outcome.RELAY_FAULT:
                return result
            return await self._fail_over(message, candidates[1:], (relay, endpoint, result))
        if pending is not None and not await self._stored(pending):
            return None
        return await self._fail_over(message, candidates)

    async def _fail_over(self, message: OutgoingMessage, candidates: list[tuple[RelayConfig, Endpoint]],
                         failed: tuple[RelayConfig, Endpoint, DeliveryResult] | None = None) -> DeliveryResult | None:
        """The candidates' sessions raced (hedge.py) until one takes the message; `failed`: the relay fault
        of an endpoint tried before them."""
        live = self.live
        router = live.router
        race = Race(candidates, self._opening)
        bound = live.settings.command_timeout + live.settings.transaction_timeout  # one opening, at most
        last: DeliveryResult | None = None
        unexpressible: set[str] = set()  # relays whose API cannot carry this message as written
        while True:
            if failed is not None:
                relay, endpoint, result = failed
                failed = None
            else:
                self.busy_until = time.monotonic() + bound
                opening = await race.next()
                if opening is None:
                    break
                relay, endpoint = opening.relay, opening.endpoint
                failure = opening.failure  # reported to the router by the opening itself
                if failure is None:
                    result = await self._deliver_through(opening.session, message)
                    router.report(relay, endpoint, result)
                    if result.outcome is not Outcome.RELAY_FAULT:
                        return result
                else:
                    result = failure
            if result.cause is Cause.UNEXPRESSIBLE:
                unexpressible.add(relay.name)
            upcoming = race.upcoming()
            if upcoming is not None:  # only when there is somewhere else to go
                next_relay, next_endpoint = upcoming
                log.warning("relay_failover", queue_id=message.queue_id, relay=relay.name, endpoint=str(endpoint),
                            cause=result.cause.value, detail=result.summary, next_relay=next_relay.name,
                            next_endpoint=str(next_endpoint))
            last = result
        if last is not None and unexpressible:
            # Waiting would retry at once (the relay is up): back off, or fail when no relay can ever carry it.
            never = unexpressible >= {relay.name for relay in live.settings.relays}
            return replace(last, outcome=Outcome.PERMANENT if never else Outcome.TEMPORARY,
                           cause=Cause.UNEXPRESSIBLE, detail=f"no relay can carry this message as written: "
                           f"{last.detail}" if never else last.detail)
        if last is not None:
            log.info("delivery_waiting", queue_id=message.queue_id, reason="no relay can take mail now",
                     last_cause=last.cause.value, detail=last.summary)
        return None

    async def _deliver_through(self, session: Session, message: OutgoingMessage) -> DeliveryResult:
        self.busy_until = time.monotonic() + session.bound(message)
        return await session.deliver(message)

    def _delivered(self, attempt: int, received_at: float, has_state: bool, location: Location,
                   message: OutgoingMessage, result: DeliveryResult, followup: Followup | None = None) -> Followup:
        """The relay took the message (the recipients it refused are dealt with): its file goes."""
        self.spool.delivered(message.queue_id, location, has_state=has_state)
        hot_log.get().info("message_delivered", queue_id=message.queue_id, relay=result.relay, size=message.size,
                           recipients=len(message.recipients) - len(result.refused), attempt=attempt,
                           endpoint=result.endpoint, reply=result.detail)
        self.counters.delivered(result.relay, time.time() - received_at)
        return followup or Followup()

    def _settle(self, state: MessageState, location: Location, raw: bytes, message: OutgoingMessage,
                result: DeliveryResult, *, has_state: bool = True) -> Followup:
        settings = self.live.settings
        now = time.time()
        followup = Followup()
        permanent = [r for r in result.refused if r.outcome is Outcome.PERMANENT]
        temporary = [r for r in result.refused if r.outcome is Outcome.TEMPORARY]

        match result.outcome:
            case Outcome.DELIVERED:
                if permanent:
                    self._split(state, raw, message, permanent, Location.FAILED, now, relay=result.relay)
                if temporary:
                    due = now + retry_delay(1, settings.retry_min, settings.retry_max)
                    part = self._split(state, raw, message, temporary, Location.DEFERRED, now, due=due,
                                       relay=result.relay)
                    followup.retry_at.append(Retry(due, part))
                return self._delivered(state.attempts + 1, state.received_at, has_state, location, message, result,
                                       followup)
            case Outcome.RELAY_FAULT:
                # The relay's problem, not the message's (only the local outbox gets here; relay faults
                # are failed over before): kept in the history, never counted as an attempt.
                state.record(Attempt(now, result.outcome.value, result.cause.value, result.summary, result.relay),
                             counted=False)
                return self._defer(state, location, message, result, settings.retry_min)
            case Outcome.PERMANENT:
                state.record(Attempt(now, result.outcome.value, result.cause.value, result.summary, result.relay),
                             counted=True)
                self._fail(state, location, result.summary, cause=result.cause.value, relay=result.relay,
                           message=message)
                return followup
            case Outcome.TEMPORARY:
                state.record(Attempt(now, result.outcome.value, result.cause.value, result.summary, result.relay),
                             counted=True)
                return self._retry(state, location, raw, message, result, permanent, now)
            case _:
                assert_never(result.outcome)

    def _retry(self, state: MessageState, location: Location, raw: bytes, message: OutgoingMessage,
               result: DeliveryResult, permanent: list[RefusedRecipient], now: float) -> Followup:
        """A temporary failure: permanently refused recipients leave now; the rest wait for a retry."""
        settings = self.live.settings
        spool = self.spool
        # Expiry happens only on the message's own failure: an outage alone (relay faults) never fails it.
        age = now - (state.first_failure_at or now)
        if age >= settings.max_lifetime:
            refused = "".join(f"; {r.recipient} refused: {r.code} {r.reply}" for r in permanent)
            self._fail(state, location, f"gave up after {state.attempts} attempts over {age / 3600:.1f} h: "
                       f"{result.summary}{refused}", cause=Cause.EXPIRED.value, relay=result.relay,
                       message=message)
            return Followup()
        delay = retry_delay(state.attempts, settings.retry_min, settings.retry_max)
        if not permanent:
            return self._defer(state, location, message, result, delay)
        self._split(state, raw, message, permanent, Location.FAILED, now, relay=result.relay)
        remaining = [r for r in message.recipients if r not in {p.recipient for p in permanent}]
        part_state = MessageState(spool.new_id(), state.received_at, attempts=state.attempts,
                                  history=list(state.history), source=f"split from {message.queue_id}",
                                  first_failure_at=state.first_failure_at, next_attempt_at=now + delay)
        spool.add(envelope.with_envelope(raw, message.sender, remaining), part_state, Location.DEFERRED)
        spool.delivered(message.queue_id, location)  # superseded by the parts just stored
        log.info("message_deferred", queue_id=part_state.queue_id, relay=result.relay, size=message.size,
                 attempt=state.attempts, delay_s=round(delay, 1), split_from=message.queue_id,
                 cause=result.cause.value, reason=result.summary)
        self.counters.deferred(result.relay, result.cause.value)
        return Followup(retry_at=[Retry(now + delay, part_state.queue_id)])

    def _defer(self, state: MessageState, location: Location, message: OutgoingMessage, result: DeliveryResult,
               delay: float) -> Followup:
        state.next_attempt_at = time.time() + delay
        if not self.spool.defer(state, location):
            return Followup()
        next_attempt = datetime.fromtimestamp(state.next_attempt_at, UTC).isoformat(timespec="seconds")
        log.info("message_deferred", queue_id=message.queue_id, relay=result.relay, size=message.size,
                 attempt=state.attempts, delay_s=round(delay, 1), next_attempt=next_attempt,
                 cause=result.cause.value, reason=result.summary)
        self.counters.deferred(result.relay, result.cause.value)
        return Followup(retry_at=[Retry(state.next_attempt_at, message.queue_id)])

    def _split(self, state: MessageState, raw: bytes, message: OutgoingMessage, refused: list[RefusedRecipient],
               location: Location, now: float, due: float | None = None, relay: str | None = None) -> str:
        """Store a copy of the message for some recipients only; returns its queue id."""
        spool = self.spool
        part = MessageState(spool.new_id(), state.received_at, source=f"split from {message.queue_id}",
                            next_attempt_at=due)
        reason = "; ".join(f"{r.recipient}: {r.code} {r.reply}" for r in refused)
        part.record(Attempt(now, refused[0].outcome.value, Cause.RECIPIENT_REJECTED.value, reason, None),
                    counted=True)
        if location is Location.FAILED:
            part.reason = f"recipient refused: {reason}"
        spool.add(envelope.with_envelope(raw, message.sender, [r.recipient for r in refused]), part, location)
        event = "recipients_failed" if location is Location.FAILED else "recipients_deferred"
        log.info(event, queue_id=message.queue_id, part_id=part.queue_id, recipients=len(refused), reason=reason)
        if location is Location.FAILED:
            self.counters.failed(FailedMail(part.queue_id, f"recipient refused: {reason}",
                                            Cause.RECIPIENT_REJECTED.value, relay, message.sender,
                                            tuple(r.recipient for r in refused), state.source == NOTICE_SOURCE))
        else:
            self.counters.deferred(relay, Cause.RECIPIENT_REJECTED.value)
        return part.queue_id

    def _fail(self, state: MessageState, location: Location, reason: str, *, cause: str = Cause.MALFORMED.value,
              relay: str | None = None, message: OutgoingMessage | None = None) -> None:
        state.reason = reason
        if self.spool.fail(state, location):
            log.warning("message_failed", queue_id=state.queue_id, reason=reason, attempts=state.attempts,
                        cause=cause, relay=relay)
            self.counters.failed(FailedMail(
                state.queue_id, reason, cause, relay, message.sender if message else None,
                message.recipients if message else (), state.source == NOTICE_SOURCE))
