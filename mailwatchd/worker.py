"""One worker: take a due message, attempt it through the relays in failover order, and
settle the outcome back into the spool. Several workers run side by side (one SMTP session
each at a time), sharing the scheduler and the router.

Order of writes on settling (crash-safety): a split-off part is stored before the original
is removed; a message's state is written before its file moves; a file is removed only after
the relay accepted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from mailwatchd import envelope
from mailwatchd.backoff import retry_delay
from mailwatchd.envelope import OutgoingMessage
from mailwatchd.errors import MalformedMessage, RefusedSpoolEntry, SpoolFull
from mailwatchd.logs import get_logger
from mailwatchd.messagestate import Attempt, MessageState, queue_id_time
from mailwatchd.outcome import DeliveryResult, Outcome, RefusedRecipient
from mailwatchd.relays import Endpoint, RelayConfig
from mailwatchd.scheduler import WorkItem
from mailwatchd.spool import Location

if TYPE_CHECKING:
    from mailwatchd.daemon import Daemon

log = get_logger()


class Session(Protocol):
    """What a worker needs of a transport (SMTP session or local outbox)."""

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult: ...

    async def close(self) -> None: ...

    @property
    def idle_for(self) -> float: ...


@dataclass
class Followup:
    """What the scheduler must do once the worker let go of a message."""

    retry_at: list[tuple[float, str]] = field(default_factory=list)
    give_back: bool = False  # no relay could take it now: first in line again


class Worker:
    """Attempts messages one at a time, reusing its session across consecutive messages."""

    def __init__(self, daemon: Daemon, index: int) -> None:
        self.daemon = daemon
        self.index = index
        self.busy_since: float | None = None  # monotonic start of the delivery call in flight
        self.last_iteration = time.monotonic()  # the watchdog wants proof the loop goes round
        self._sessions: dict[tuple[str, Endpoint | None], Session] = {}
        self._generation = daemon.generation

    async def run(self) -> None:
        daemon = self.daemon
        while not daemon.stopping:
            self.last_iteration = time.monotonic()
            if self._generation != daemon.generation:
                await self.close_sessions()
                self._generation = daemon.generation
            if not daemon.settings.uses_outbox:
                wait = daemon.router.next_chance()
                if wait is not None:
                    await self._wait_for_relay(wait)
                    continue
            item = await daemon.scheduler.take(timeout=max(daemon.settings.idle_timeout, 0.05))
            if item is None:
                await self._close_idle()
                continue
            if daemon.stopping:
                daemon.scheduler.release(item)
                break
            followup = Followup()
            daemon.health.work_started()
            try:
                followup = await self.attempt(item)
            except (SpoolFull, OSError) as exc:
                log.error("spool_write_failed", queue_id=item.queue_id, detail=str(exc))
                followup = Followup(retry_at=[(time.time() + daemon.settings.retry_min, item.queue_id)])
            except Exception:
                # One unexpected failure must not stall the queue: keep the file, retry later.
                log.exception("attempt_crashed", queue_id=item.queue_id)
                followup = Followup(retry_at=[(time.time() + daemon.settings.retry_min, item.queue_id)])
            finally:
                self.busy_since = None
                daemon.scheduler.done(item.queue_id)
            if followup.give_back:
                daemon.scheduler.release(item)
            for due, queue_id in followup.retry_at:
                daemon.scheduler.add_deferred(due, queue_id)
            daemon.health.work_finished()

    async def _wait_for_relay(self, wait: float) -> None:
        router = self.daemon.router
        router.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(router.changed.wait(), min(wait, 5.0) + 0.01)

    async def _close_idle(self) -> None:
        idle_timeout = self.daemon.settings.idle_timeout
        for key, session in list(self._sessions.items()):
            if session.idle_for >= idle_timeout:
                del self._sessions[key]
                await session.close()

    async def close_sessions(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    def _session(self, relay: RelayConfig | None, endpoint: Endpoint | None) -> Session:
        key = (relay.name if relay else "outbox", endpoint)
        session = self._sessions.get(key)
        if session is None:
            session = self.daemon.make_session(relay, endpoint)
            self._sessions[key] = session
        return session

    # -- one attempt --------------------------------------------------------------------------

    async def attempt(self, item: WorkItem) -> Followup:
        daemon = self.daemon
        spool = daemon.spool
        queue_id, location = item.queue_id, item.location
        loaded = spool.load_state(queue_id)
        state = loaded or MessageState(queue_id, queue_id_time(queue_id))
        try:
            raw = spool.read(queue_id, location)
        except FileNotFoundError:
            log.info("message_vanished", queue_id=queue_id, location=location.value)
            return Followup()
        except (RefusedSpoolEntry, PermissionError) as exc:
            self._fail(state, location, str(exc) if isinstance(exc, RefusedSpoolEntry)
                       else f"cannot read the spool file: {exc.strerror}")
            return Followup()
        try:
            message = envelope.parse(queue_id, raw, default_domain=daemon.settings.default_domain)
        except MalformedMessage as exc:
            self._fail(state, location, f"malformed message: {exc}")
            return Followup()

        result = await self._deliver(message)
        if result is None:
            return Followup(give_back=True)
        return self._settle(state, location, raw, message, result, has_state=loaded is not None)

    async def _deliver(self, message: OutgoingMessage) -> DeliveryResult | None:
        """One attempt, failing over across endpoints and relays; None if none is usable now."""
        daemon = self.daemon
        if daemon.settings.uses_outbox:
            self.busy_since = time.monotonic()
            return await self._session(None, None).deliver(message)
        last: DeliveryResult | None = None
        for relay, endpoint in daemon.router.candidates():
            self.busy_since = time.monotonic()
            result = await self._session(relay, endpoint).deliver(message)
            daemon.health.note_transition(daemon.router.report(relay, endpoint, result))
            if result.outcome is not Outcome.RELAY_FAULT:
                return result
            log.warning("relay_failover", queue_id=message.queue_id, relay=relay.name, endpoint=str(endpoint),
                        cause=result.cause.value, detail=result.summary)
            last = result
        if last is not None:
            log.info("delivery_waiting", queue_id=message.queue_id, reason="no relay can take mail now",
                     last_cause=last.cause.value)
        return None

    def _settle(self, state: MessageState, location: Location, raw: bytes, message: OutgoingMessage,
                result: DeliveryResult, *, has_state: bool = True) -> Followup:
        daemon = self.daemon
        spool = daemon.spool
        now = time.time()
        followup = Followup()
        permanent = [r for r in result.refused if r.outcome is Outcome.PERMANENT]
        temporary = [r for r in result.refused if r.outcome is Outcome.TEMPORARY]
        base = {"queue_id": message.queue_id, "relay": result.relay, "size": message.size}

        if result.outcome is Outcome.DELIVERED:
            if permanent:
                self._split(state, raw, message, permanent, Location.FAILED, now)
            if temporary:
                due = now + retry_delay(1, daemon.settings.retry_min, daemon.settings.retry_max)
                part = self._split(state, raw, message, temporary, Location.DEFERRED, now, due=due)
                followup.retry_at.append((due, part))
            spool.delivered(message.queue_id, location, has_state=has_state)
            accepted = len(message.recipients) - len(result.refused)
            log.info("message_delivered", **base, recipients=accepted, attempt=state.attempts + 1,
                     endpoint=result.endpoint, reply=result.detail)
            daemon.stats.delivered += 1
            daemon.stats.last_delivery = now
            daemon.health.count("delivered")
            return followup

        state.record(Attempt(now, result.outcome.value, result.cause.value, result.summary, result.relay),
                     counted=True)
        if result.outcome is Outcome.PERMANENT:
            self._fail(state, location, result.summary, cause=result.cause.value, relay=result.relay)
            return followup

        # Temporary: permanently refused recipients leave now; the rest wait for a retry.
        if permanent:
            self._split(state, raw, message, permanent, Location.FAILED, now)
            remaining = [r for r in message.recipients if r not in {p.recipient for p in permanent}]
            part_state = MessageState(spool.new_id(), state.received_at, attempts=state.attempts,
                                      history=list(state.history), source=f"split from {message.queue_id}",
                                      first_failure_at=state.first_failure_at)
            due = now + retry_delay(state.attempts, daemon.settings.retry_min, daemon.settings.retry_max)
            part_state.next_attempt_at = due
            spool.add(envelope.with_envelope(raw, message.sender, remaining), part_state, Location.DEFERRED)
            spool.delivered(message.queue_id, location)  # superseded by the parts just stored
            followup.retry_at.append((due, part_state.queue_id))
            return followup
        # Time spent waiting for any relay to come back does not count: an outage is not the message's fault.
        age = now - (state.first_failure_at or now)
        if age >= daemon.settings.max_lifetime:
            self._fail(state, location, f"gave up after {state.attempts} attempts over {age / 3600:.1f} h: "
                       f"{result.summary}", cause="expired", relay=result.relay)
            return followup
        delay = retry_delay(state.attempts, daemon.settings.retry_min, daemon.settings.retry_max)
        state.next_attempt_at = now + delay
        if spool.defer(state, location):
            followup.retry_at.append((state.next_attempt_at, message.queue_id))
            next_attempt = datetime.fromtimestamp(state.next_attempt_at, UTC).isoformat(timespec="seconds")
            log.info("message_deferred", **base, attempt=state.attempts, delay_s=round(delay, 1),
                     next_attempt=next_attempt, cause=result.cause.value, reason=result.summary)
            daemon.stats.deferred += 1
            daemon.health.count("deferred")
        return followup

    def _split(self, state: MessageState, raw: bytes, message: OutgoingMessage, refused: list[RefusedRecipient],
               location: Location, now: float, due: float | None = None) -> str:
        """Store a copy of the message for some recipients only; returns its queue id."""
        spool = self.daemon.spool
        part = MessageState(spool.new_id(), state.received_at, source=f"split from {message.queue_id}",
                            next_attempt_at=due)
        reason = "; ".join(f"{r.recipient}: {r.code} {r.reply}" for r in refused)
        part.record(Attempt(now, refused[0].outcome.value, "recipient_rejected", reason, None), counted=True)
        if location is Location.FAILED:
            part.reason = f"recipient refused: {reason}"
        spool.add(envelope.with_envelope(raw, message.sender, [r.recipient for r in refused]), part, location)
        event = "recipients_failed" if location is Location.FAILED else "recipients_deferred"
        log.info(event, queue_id=message.queue_id, part_id=part.queue_id, recipients=len(refused), reason=reason)
        if location is Location.FAILED:
            self.daemon.stats.failed_total += 1
        return part.queue_id

    def _fail(self, state: MessageState, location: Location, reason: str, **fields: Any) -> None:
        state.reason = reason
        if self.daemon.spool.fail(state, location):
            log.warning("message_failed", queue_id=state.queue_id, reason=reason, attempts=state.attempts, **fields)
            self.daemon.stats.failed += 1
            self.daemon.stats.failed_total += 1
            self.daemon.health.count("failed")
