"""What `status` and `check` tell a monitoring system: a state, the reasons, performance data.

Output follows the Monitoring Plugins guidelines (Nagios, Icinga, NRPE): exit 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN; the first line is `MAILWATCHD STATE - summary | perfdata`, the summary
naming the worst reasons first; the lines after it are detail for a human.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailwatchd.service.statusfile import Status

if TYPE_CHECKING:
    from mailwatchd.relays.diagnosis import CheckReport

STALE_AFTER_S = 60.0  # the daemon rewrites its status at least every 25 s (health.HEARTBEAT_S + a tick)
CERT_WARNING_DAYS = 14
CERT_CRITICAL_DAYS = 3
_PLAIN_LABEL = re.compile(r"[A-Za-z0-9_.:/-]+")


class State(enum.IntEnum):
    """Monitoring-plugin states; the value is the exit status."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class Reason:
    state: State
    text: str
    topic: str = "daemon"  # daemon, relay, failed, queue, certificate, reload: what `check` borrows from status


@dataclass(frozen=True)
class Perf:
    """One performance-data item: 'label'=value[unit];warn;crit;min."""

    label: str
    value: float
    unit: str = ""
    warn: float | None = None
    crit: float | None = None
    minimum: float | None = 0

    def render(self) -> str:
        label = self.label if _PLAIN_LABEL.fullmatch(self.label) else "'" + self.label.replace("'", "") + "'"
        numbers = [_number(self.value) + self.unit, *(_number(x) if x is not None else ""
                                                      for x in (self.warn, self.crit, self.minimum))]
        return f"{label}={';'.join(numbers).rstrip(';')}"


def _number(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e15 else str(int(value))


@dataclass
class PluginResult:
    reasons: list[Reason] = field(default_factory=list)
    ok_summary: str = ""
    perfdata: list[Perf] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @property
    def state(self) -> State:
        return max((reason.state for reason in self.reasons), default=State.OK)

    def add(self, state: State, text: str, topic: str = "daemon") -> None:
        self.reasons.append(Reason(state, text, topic))

    def summary(self) -> str:
        problems = sorted((r for r in self.reasons if r.state is not State.OK), key=lambda r: -r.state)
        if not problems:
            return self.ok_summary
        return "; ".join(reason.text for reason in problems)

    def render(self) -> str:
        first = f"MAILWATCHD {self.state.name} - {self.summary()}"
        if self.perfdata:
            first += " | " + " ".join(item.render() for item in self.perfdata)
        return "\n".join([first, *self.details])


def unknown(text: str) -> PluginResult:
    """A result for when nothing could be judged: a bad option, an unreadable configuration, a timeout."""
    return PluginResult(reasons=[Reason(State.UNKNOWN, text)])


def judge_status(status: Status | None, *, pid_alive: bool, now: float | None = None) -> PluginResult:
    """The daemon's health, from its status file (None: there is none)."""
    now = time.time() if now is None else now
    result = PluginResult()
    if status is None or not pid_alive:
        result.add(State.CRITICAL, "mailwatchd is not running")
        return result
    age = now - status["updated_at"]
    if age > STALE_AFTER_S:
        result.add(State.CRITICAL, f"status file is {age:.0f}s old: the daemon is hung or cannot write it")
    if status["problem"]:
        result.add(State.CRITICAL, f"unhealthy: {status['problem']}")
    if status.get("degraded"):
        result.add(State.CRITICAL, str(status["degraded"]))
    if status["mode"] == "outbox":
        if status.get("system"):
            result.add(State.CRITICAL, f"no relay configured: mail stays in the local outbox {status['outbox']}")
        else:
            result.add(State.OK, f"no relay configured: delivering to the local outbox {status['outbox']}")
    relays = status["relays"]
    down = [relay["name"] for relay in relays if relay["health"] == "down"]
    degraded = [relay["name"] for relay in relays if relay["health"] == "degraded"]
    if relays and len(down) == len(relays):
        result.add(State.CRITICAL, "no relay usable: " + _relay_causes(status, down), "relay")
    elif down or degraded:
        result.add(State.WARNING, "relay down: " + _relay_causes(status, down + degraded), "relay")
    failed = status.get("failed_unacknowledged", status["queue"]["failed"])
    if failed:
        result.add(State.WARNING, f"{failed} failed message(s) (see `mailwatchd queue`; requeue, delete or ack)",
                   "failed")
    thresholds = status.get("thresholds") or {}
    warn_age = float(thresholds.get("queue_age_warning", 3600.0))
    crit_age = float(thresholds.get("queue_age_critical", 4 * 3600.0))
    oldest = status["oldest_age_s"]
    if oldest is not None and oldest >= warn_age:
        state = State.CRITICAL if oldest >= crit_age else State.WARNING
        result.add(state, f"oldest queued message is {_duration(oldest)} old", "queue")
    for relay in relays:
        for endpoint in relay["endpoints"]:
            days = endpoint["cert_days_left"]
            if days is not None and days <= CERT_WARNING_DAYS:
                state = State.CRITICAL if days <= CERT_CRITICAL_DAYS else State.WARNING
                result.add(state, f"certificate of {endpoint['endpoint']} expires in {days} day(s)", "certificate")
    if status.get("reload_error"):
        result.add(State.WARNING, f"last reload failed, running with the previous settings: {status['reload_error']}",
                   "reload")
    queue = status["queue"]
    ready = queue["ready"] + queue["in_flight"]
    result.ok_summary = (f"running (pid {status['pid']}), {ready} ready, {queue['deferred']} deferred, "
                         f"{queue['failed']} failed" + (f"; {_relay_summary(status)}" if relays else ""))
    if status["mode"] == "outbox" and not status.get("system"):
        result.ok_summary += f"; delivering to the local outbox {status['outbox']}"
    result.perfdata = status_perfdata(status, warn_age, crit_age)
    return result


def _relay_causes(status: Status, names: Iterable[str]) -> str:
    wanted = set(names)
    parts = []
    for relay in status["relays"]:
        if relay["name"] not in wanted:
            continue
        causes = sorted({ep["cause"] for ep in relay["endpoints"] if ep["up"] is False and ep["cause"]})
        if relay["paused"] and relay["pause_cause"]:
            causes.append(f"paused: {relay['pause_cause']}")
        parts.append(relay["name"] + (f" ({', '.join(causes)})" if causes else ""))
    return ", ".join(parts)


def _relay_summary(status: Status) -> str:
    return "relays: " + ", ".join(f"{relay['name']} {relay['health']}" for relay in status["relays"])


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"


def status_perfdata(status: Status, warn_age: float, crit_age: float) -> list[Perf]:
    queue = status["queue"]
    items = [
        Perf("queue_ready", queue["ready"] + queue["in_flight"]),
        Perf("queue_deferred", queue["deferred"]),
        Perf("failed", queue["failed"], warn=1),
        Perf("oldest_age", round(status["oldest_age_s"] or 0.0, 1), "s", warn=warn_age, crit=crit_age),
    ]
    for relay in status["relays"]:
        for endpoint in relay["endpoints"]:
            items += endpoint_perfdata(f"{relay['name']} {endpoint['endpoint']}", endpoint["timings_ms"])
            if endpoint["cert_days_left"] is not None:
                items.append(Perf(f"{relay['name']} {endpoint['endpoint']} cert_days", endpoint["cert_days_left"],
                                  warn=CERT_WARNING_DAYS, crit=CERT_CRITICAL_DAYS, minimum=None))
    return items


def endpoint_perfdata(name: str, timings_ms: dict[str, float]) -> list[Perf]:
    """connect/TLS/AUTH (and the other steps') milliseconds of one endpoint."""
    return [Perf(f"{name} {step}", round(ms, 1), "ms") for step, ms in timings_ms.items()]


def judge_check(report: CheckReport, daemon: PluginResult | None, *, system: bool) -> PluginResult:
    """`check`'s verdict: its own probes of every relay, plus what the running daemon knows and a probe
    cannot see (failed mail, an old queue, a full spool, a failed reload)."""
    result = PluginResult()
    if not report.relays:
        where = f"mail stays in the local outbox {report.outbox}"
        result.add(State.CRITICAL if system else State.OK, f"no relay configured: {where}", "relay")
        result.ok_summary = f"no relay configured: delivering to the local outbox {report.outbox}"
    else:
        usable = report.usable_relays()
        failing = [f"{f.relay} {f.endpoint} ({f.cause.value})" for f in report.endpoints if not f.ok]
        if report.send_test is not None and not report.send_test.ok:
            failing.append(f"test message via {report.send_test.relay} ({report.send_test.cause.value})")
        if not usable:
            result.add(State.CRITICAL, "mail cannot flow: " + ", ".join(failing), "relay")
        elif failing:
            result.add(State.WARNING, f"failing: {', '.join(failing)}; mail flows through {', '.join(usable)}",
                       "relay")
        for finding in report.endpoints:
            days = finding.report.cert_days_left
            if days is not None and days <= CERT_WARNING_DAYS:
                state = State.CRITICAL if days <= CERT_CRITICAL_DAYS else State.WARNING
                result.add(state, f"certificate of {finding.endpoint} expires in {days} day(s)", "certificate")
        result.ok_summary = (f"{len(report.relays)} relay(s), {len(report.endpoints)} endpoint(s) work"
                             + (", test message accepted" if report.send_test is not None else ""))
        for finding in report.endpoints:
            result.perfdata += endpoint_perfdata(f"{finding.relay} {finding.endpoint}", finding.report.timings_ms)
    if daemon is not None:
        result.reasons += [reason for reason in daemon.reasons if reason.topic in BORROWED_TOPICS]
        result.perfdata += [item for item in daemon.perfdata if item.label in BORROWED_PERFDATA]
    return result


BORROWED_TOPICS = frozenset({"daemon", "failed", "queue", "reload"})
BORROWED_PERFDATA = frozenset({"queue_ready", "queue_deferred", "failed", "oldest_age"})
