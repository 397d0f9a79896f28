"""The operator's queue commands tell the truth: `queue` says why each message waits, `delete`
and `requeue` work on every listed message in every state (also while the daemon runs and is
attempting it), and `ack` takes failed mail out of the warnings without removing it."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailwatchd.spool.messagestate import Attempt, MessageState, State
from mailwatchd.spool.queueid import new_queue_id
from mailwatchd.spool.store import Location, Requeue, Spool
from tests.conftest import LOOPBACK, RecordingHandler, SmtpServer, wait_until
from tests.daemonproc import drop, message, relay_env, run_cli, spool_names
from tests.probe_servers import closed_port

MESSAGE = message(1, to="ann@example.org", sender="app@example.com")
STATE_DIRS = ("new", "queue", "deferred", "failed")


@pytest.fixture
def spool(spool_dir: Path) -> Spool:
    spool = Spool(spool_dir)
    spool.create_layout()
    return spool


@pytest.fixture
def env(clean_env: dict[str, str], spool_dir: Path) -> Iterator[dict[str, str]]:
    """The commands' environment: a relay on a port nobody listens on (no daemon runs unless a test starts one)."""
    with closed_port() as port:
        yield relay_env(clean_env, spool_dir, LOOPBACK, port)


def queued(spool: Spool) -> str:
    """A message claimed into queue/, as the daemon leaves it."""
    queue_id = new_queue_id()
    (spool.dir(Location.QUEUE) / queue_id).write_bytes(MESSAGE)
    return queue_id


def failed(spool: Spool, reason: str = "550 5.1.1 no such user") -> str:
    queue_id = queued(spool)
    state = MessageState(queue_id, 1000.0, attempts=2, reason=reason, first_failure_at=1000.0,
                         history=[Attempt(1000.0, "permanent", "recipient_rejected", reason, "smtp")])
    assert spool.fail(state, Location.QUEUE)
    return queue_id


def deferred(spool: Spool, due: float) -> str:
    queue_id = queued(spool)
    state = MessageState(queue_id, 1000.0, attempts=1, next_attempt_at=due,
                         history=[Attempt(1000.0, "temporary", "temporary_failure", "451 4.3.0 try later", "smtp")])
    assert spool.defer(state, Location.QUEUE)
    return queue_id


def listing(env: dict[str, str]) -> dict[str, Any]:
    done = run_cli(env, "queue", "--json")
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def entry(env: dict[str, str], queue_id: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [m for m in listing(env)["messages"] if m["queue_id"] == queue_id]
    [found] = matches
    return found


def everything(spool: Path) -> dict[str, list[str]]:
    return spool_names(spool, *STATE_DIRS, "meta")


# -- delete: every listed message, every state ----------------------------------------------------------


def test_delete_takes_the_id_enqueue_printed_while_no_daemon_runs(env: dict[str, str], spool_dir: Path) -> None:
    printed = run_cli(env, "enqueue", stdin=MESSAGE)
    assert printed.returncode == 0, printed.stderr.decode()
    queue_id = printed.stdout.decode().strip()
    [listed] = listing(env)["messages"]
    assert (listed["queue_id"], listed["state"]) == (queue_id, "new")
    assert (listed["sender"], listed["recipients"]) == ("app@example.com", ["ann@example.org"])
    assert listed["waiting"] == "waiting to be claimed (the daemon is not running)"
    done = run_cli(env, "delete", queue_id)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == f"deleted {queue_id} (was new)\n"
    assert everything(spool_dir) == {name: [] for name in (*STATE_DIRS, "meta")}
    again = run_cli(env, "delete", queue_id)
    assert again.returncode == 66 and f"no such message: {queue_id}".encode() in again.stderr


def test_delete_takes_a_drop_by_the_name_queue_lists(env: dict[str, str], spool_dir: Path) -> None:
    drop(spool_dir, MESSAGE, "1700000000.M1P2.host")
    [listed] = listing(env)["messages"]
    assert (listed["queue_id"], listed["source"]) == (None, "1700000000.M1P2.host")
    assert run_cli(env, "delete", "1700000000.M1P2.host").returncode == 0
    assert everything(spool_dir)["new"] == []
    for name in ("../queue", ".hidden", ""):
        assert run_cli(env, "delete", name).returncode == 66


def test_delete_in_every_state_removes_state_and_acknowledgement(spool: Spool) -> None:
    drop(spool.root, MESSAGE, (new := new_queue_id()))
    ids = {"new": new, "queue": queued(spool), "deferred": deferred(spool, 2e9), "failed": failed(spool)}
    spool.acknowledge([ids["failed"]])
    for where, queue_id in ids.items():
        assert spool.delete(queue_id) == where
        assert spool.locate(queue_id) is None and not spool.meta_path(queue_id).exists()
    assert spool.acknowledged() == set() and not (spool.dir(Location.FAILED) / ".acknowledged").exists()


# -- requeue: a fresh start, shown sanely --------------------------------------------------------------


def test_requeued_failed_message_is_listed_with_its_envelope_and_why_it_waits(spool: Spool,
                                                                              env: dict[str, str]) -> None:
    queue_id = failed(spool)
    assert entry(env, queue_id)["reason"] == "550 5.1.1 no such user"
    done = run_cli(env, "requeue", queue_id)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == [
        f"requeued {queue_id} (was failed)", "no daemon is running: requeued messages are sent when it starts"]
    listed = entry(env, queue_id)
    assert (listed["state"], listed["sender"], listed["recipients"]) == ("new", "app@example.com",
                                                                         ["ann@example.org"])
    assert (listed["attempts"], listed["reason"], listed["size"]) == (0, None, len(MESSAGE))
    assert listed["requeued_at"] is not None
    assert listed["waiting"].startswith("requeued ") and listed["waiting"].endswith(
        " ago; waiting to be claimed (the daemon is not running)")
    table = run_cli(env, "queue").stdout.decode()
    assert f"{queue_id}  new" in table and "app@example.com -> ann@example.org" in table and "? -> ?" not in table
    state = spool.load_state(queue_id)
    assert state is not None and state.first_failure_at is None  # its lifetime starts again
    assert state.history[0].detail == "550 5.1.1 no such user"  # what happened before is kept


def test_requeue_of_a_waiting_message_is_a_no_op_success(spool: Spool, env: dict[str, str]) -> None:
    drop(spool.root, MESSAGE, (new := new_queue_id()))
    ready = queued(spool)
    done = run_cli(env, "requeue", new, ready)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == [f"{new} is already waiting (new): nothing to do",
                                                 f"{ready} is already waiting (queued): nothing to do"]
    assert everything(spool.root)["new"] == [new] and everything(spool.root)["queue"] == [ready]
    missing = run_cli(env, "requeue", new_queue_id())
    assert missing.returncode == 66 and b"no such message" in missing.stderr


def test_deferred_message_shows_its_last_attempt_and_next_attempt(spool: Spool, env: dict[str, str]) -> None:
    queue_id = deferred(spool, 2e9)
    listed = entry(env, queue_id)
    assert listed["waiting"].startswith("waiting: the daemon is not running (next attempt in ")
    assert listed["last_attempt"] == {"at": 1000.0, "outcome": "temporary", "cause": "temporary_failure",
                                      "detail": "451 4.3.0 try later", "relay": "smtp"}
    table = run_cli(env, "queue").stdout.decode()
    assert "last attempt " in table and " via smtp: temporary_failure: 451 4.3.0 try later" in table


# -- ack ---------------------------------------------------------------------------------------------------


def test_acknowledged_failures_stay_but_no_longer_count(spool: Spool) -> None:
    first, second, third = failed(spool), failed(spool), failed(spool)
    assert spool.unacknowledged_failed() == 3
    assert spool.acknowledge([first, "0000000000000000NONE"]) == ([first], ["0000000000000000NONE"])
    assert spool.unacknowledged_failed() == 2  # seen at once, within the same second as the change
    assert spool.acknowledge() == (sorted([first, second, third]), [])
    assert spool.unacknowledged_failed() == 0
    assert spool.names(Location.FAILED) == sorted([first, second, third])  # kept for inspection
    assert spool.requeue(second) is Requeue.REQUEUED
    assert spool.acknowledged() == {first, third}
    # Claimed and failing again, it is a new failure: it counts again.
    os.rename(spool.new / second, spool.dir(Location.QUEUE) / second)
    state = spool.load_state(second)
    assert state is not None and state.state is State.QUEUED
    assert spool.fail(state, Location.QUEUE)
    assert spool.unacknowledged_failed() == 1
    assert spool.delete(third) == "failed" and spool.acknowledged() == {first}
    assert spool.unacknowledged_failed() == 1


def test_unacknowledged_count_reads_nothing_while_failed_is_unchanged(spool: Spool) -> None:
    queue_id = failed(spool)
    acknowledged = spool.dir(Location.FAILED) / ".acknowledged"
    acknowledged.write_text("\n")
    os.utime(spool.dir(Location.FAILED), (1e9, 1e9))  # failed/ last changed long ago
    assert spool.unacknowledged_failed() == 1
    with acknowledged.open("w") as rewritten:  # in place, which no writer does: failed/ does not change
        rewritten.write(f"{queue_id}\n")
    assert spool.unacknowledged_failed() == 1  # the count kept: not even the list was read again
    os.utime(spool.dir(Location.FAILED))  # what any real change (a rename in failed/) does
    assert spool.unacknowledged_failed() == 0


def test_ack_command(spool: Spool, env: dict[str, str]) -> None:
    assert run_cli(env, "ack").stdout == b"no failed messages to acknowledge\n"
    first, second = failed(spool), failed(spool)
    one = run_cli(env, "ack", first)
    assert one.returncode == 0 and one.stdout.decode().startswith(f"acknowledged {first}\n1 failed message(s)")
    listed = {m["queue_id"]: m for m in listing(env)["messages"]}
    assert (listed[first]["acknowledged"], listed[second]["acknowledged"]) == (True, False)
    assert "reason (acknowledged): 550 5.1.1 no such user" in run_cli(env, "queue").stdout.decode()
    wrong = run_cli(env, "ack", queued(spool))
    assert wrong.returncode == 66 and b"not among the failed messages" in wrong.stderr
    assert run_cli(env, "ack").returncode == 0 and spool.unacknowledged_failed() == 0


# -- the daemon running ------------------------------------------------------------------------------------


def test_queue_says_which_relay_is_down_and_why(env: dict[str, str], spool_dir: Path, daemons: Any) -> None:
    daemon = daemons(env)
    drop(spool_dir, MESSAGE, (queue_id := new_queue_id()))
    daemon.wait_event("delivery_waiting", lambda e: e["queue_id"] == queue_id)

    def waiting() -> str | None:
        listed = entry(env, queue_id)
        return listed["waiting"] if listed["state"] == "queued" and "down" in (listed["waiting"] or "") else None

    reason = wait_until(waiting, message="queue naming the down relay")
    assert reason.startswith(f"waiting: relay {LOOPBACK} down (connection_refused: ")
    assert f"waiting: relay {LOOPBACK} down (connection_refused" in run_cli(env, "queue").stdout.decode()
    assert listing(env)["daemon_pid"] == daemon.pid


class HoldRetry(RecordingHandler):
    """451 to the first DATA; holds the second one until `release` is set, then accepts it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.holding = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.calls += 1
        if self.calls == 1:
            return "451 4.3.0 try again later"
        self.holding.set()
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 20.0)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def holding(smtp_server_factory: Callable[..., SmtpServer]) -> Iterator[SmtpServer]:
    server = smtp_server_factory(HoldRetry(), starttls=False)
    yield server
    server.handler.release.set()


def test_requeue_during_the_attempt_that_delivers_sends_it_once(holding: SmtpServer, clean_env: dict[str, str],
                                                               spool_dir: Path, daemons: Any) -> None:
    env = relay_env(clean_env, spool_dir, holding.host, holding.port)
    daemon = daemons(env)
    drop(spool_dir, MESSAGE, (queue_id := new_queue_id()))
    daemon.wait_event("message_deferred", lambda e: e["queue_id"] == queue_id)
    assert holding.handler.holding.wait(15), "the retry never reached DATA"
    # The retry (from deferred/) is in flight, its DATA unanswered: requeue it now.
    done = run_cli(env, "requeue", queue_id)
    assert done.returncode == 0 and done.stdout.decode() == f"requeued {queue_id} (was deferred)\n"
    wait_until(lambda: spool_names(spool_dir, "queue")["queue"] == [queue_id], message="the requeued copy claimed")
    holding.handler.release.set()
    daemon.wait_event("message_delivered", lambda e: e["queue_id"] == queue_id)
    wait_until(lambda: not any(everything(spool_dir).values()), message="an empty spool")
    assert len(holding.handler.messages) == 1
    assert len(daemon.named("message_delivered")) == 1


# -- settling an attempt that an operator overtook -----------------------------------------------------------


def test_an_attempt_that_defers_a_message_requeued_meanwhile_keeps_it_scheduled(spool: Spool) -> None:
    queue_id = deferred(spool, 2e9)
    attempt = spool.load_state(queue_id)
    assert attempt is not None and spool.requeue(queue_id) is Requeue.REQUEUED
    os.rename(spool.new / queue_id, spool.dir(Location.QUEUE) / queue_id)  # the daemon claimed it again
    attempt.next_attempt_at = 2e9 + 60
    assert spool.defer(attempt, Location.DEFERRED)  # the worker schedules the retry: nothing is stranded
    assert spool.locate(queue_id) == "deferred"
    stored = spool.load_state(queue_id)
    assert stored is not None and (stored.state, stored.next_attempt_at) == (State.DEFERRED, 2e9 + 60)


def test_an_attempt_that_fails_a_message_requeued_meanwhile_moves_the_requeued_copy(spool: Spool) -> None:
    queue_id = deferred(spool, 2e9)
    attempt = spool.load_state(queue_id)
    assert attempt is not None and spool.requeue(queue_id) is Requeue.REQUEUED
    assert spool.fail(attempt, Location.DEFERRED)
    assert spool.locate(queue_id) == "failed" and everything(spool.root)["new"] == []


def test_an_attempt_settling_a_message_deleted_meanwhile_leaves_nothing(spool: Spool) -> None:
    for settle in ("defer", "fail", "delivered"):
        queue_id = deferred(spool, 2e9)
        attempt = spool.load_state(queue_id)
        assert attempt is not None and spool.delete(queue_id) == "deferred"
        if settle == "delivered":
            spool.delivered(queue_id, Location.DEFERRED)
        else:
            assert not getattr(spool, settle)(attempt, Location.DEFERRED)  # not retried
        assert not any(everything(spool.root).values()), settle
