"""Prometheus metrics: a node_exporter textfile (MAILWATCHD_METRICS_FILE) and an optional loopback
HTTP endpoint (MAILWATCHD_METRICS_LISTEN), both from one private registry.

Gauges and the deliveries counter are rebuilt from the health snapshot whenever one of its figures
changed (checked every main-loop tick, at most 5 s apart) and at least every health.HEARTBEAT_S, so
a reader sees one consistent picture and a relay removed by a reload disappears.
The delivery-latency histogram is fed live by the workers, as an Observer of the counters.
Labels name relays, endpoints (host:port/tls), causes, outcomes and probe steps: never a mail
address, a credential or anything from a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailwatchd.service.counters import Counters, FailedMail
from mailwatchd.service.logs import get_logger
from mailwatchd.service.statusfile import Status

log = get_logger()
disable_created_series: Callable[[], None] = disable_created_metrics  # untyped in prometheus_client

# From a loopback relay's 5 ms to a message that waited a day for a relay to come back.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                     600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0)


class SnapshotCollector(Collector):
    """Serves the families built at the last update; the HTTP thread reads, the event loop replaces."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)  # one reference read: a whole snapshot, never half of one


def snapshot_families(status: Status, outcomes: Mapping[tuple[str, str, str], int], *,
                      running: bool) -> list[Metric]:
    """The gauges and the deliveries counter for one health snapshot."""
    up = GaugeMetricFamily("mailwatchd_up", "1 while the daemon runs; 0 written as it stops",
                           value=1 if running else 0)
    healthy = GaugeMetricFamily("mailwatchd_healthy",
                                "1 while no worker is stuck and the spool takes writes (the watchdog gate)",
                                value=1 if status["healthy"] else 0)
    updated = GaugeMetricFamily("mailwatchd_last_update_timestamp_seconds",
                                "When the daemon last refreshed these metrics (Unix time): stale means stopped",
                                value=status["updated_at"])
    started = GaugeMetricFamily("mailwatchd_start_time_seconds", "When the daemon started (Unix time)",
                                value=status["started_at"])
    queue = GaugeMetricFamily("mailwatchd_queue_messages", "Messages waiting in the spool, by state",
                              labels=["state"])
    counts = status["queue"]
    for state, count in (("ready", counts["ready"]), ("in_flight", counts["in_flight"]),
                         ("deferred", counts["deferred"])):
        queue.add_metric([state], count)
    failed = GaugeMetricFamily("mailwatchd_failed_messages",
                               "Messages in failed/ (never delivered; see `mailwatchd queue`)",
                               value=status["queue"]["failed"])
    unacknowledged = GaugeMetricFamily("mailwatchd_failed_unacknowledged_messages",
                                       "Failed messages neither requeued, deleted nor acknowledged (`mailwatchd ack`)",
                                       value=status["failed_unacknowledged"])
    oldest = GaugeMetricFamily("mailwatchd_oldest_message_age_seconds",
                               "Age of the oldest ready or deferred message, since it was dropped; 0 when none",
                               value=status["oldest_age_s"] or 0.0)
    deliveries = CounterMetricFamily("mailwatchd_deliveries",
                                     "Settled delivery attempts since start, by relay, outcome "
                                     "(delivered, temporary, permanent) and cause",
                                     labels=["relay", "outcome", "cause"])
    for (relay, outcome, cause), count in sorted(outcomes.items()):
        deliveries.add_metric([relay, outcome, cause], count)
    relay_up = GaugeMetricFamily("mailwatchd_relay_up",
                                 "1 when the endpoint's last probe or delivery worked, 0 when it failed "
                                 "(absent until it is first tried)", labels=["relay", "endpoint"])
    steps = GaugeMetricFamily("mailwatchd_probe_step_seconds", "Duration of each step of the last probe",
                              labels=["relay", "endpoint", "step"])
    expiry = GaugeMetricFamily("mailwatchd_certificate_expiry_days",
                               "Whole days until the endpoint's TLS certificate expires (last probe)",
                               labels=["relay", "endpoint"])
    for relay_status in status["relays"]:
        name = relay_status["name"]
        for endpoint in relay_status["endpoints"]:
            where = [name, endpoint["endpoint"]]
            if endpoint["up"] is not None:
                relay_up.add_metric(where, 1 if endpoint["up"] else 0)
            for step, milliseconds in endpoint["timings_ms"].items():
                steps.add_metric([*where, step], milliseconds / 1000.0)
            if endpoint["cert_days_left"] is not None:
                expiry.add_metric(where, endpoint["cert_days_left"])
    return [up, healthy, updated, started, queue, failed, unacknowledged, oldest, deliveries, relay_up, steps, expiry]


class Metrics:
    """The daemon's Prometheus metrics: an Observer of the counters, refreshed by the health tick."""

    def __init__(self, *, textfile: Path | None, listen: tuple[str, int] | None) -> None:
        self.textfile = textfile
        self.listen = listen
        # A private registry: no process/platform collectors (node_exporter and systemd report those).
        self.registry = CollectorRegistry(auto_describe=False)
        disable_created_series()  # process-wide (the daemon has no other metrics): no *_created series
        self.latency = Histogram("mailwatchd_delivery_latency_seconds",
                                 "From the drop into the spool to the relay's reply to DATA, per delivered message",
                                 ["relay"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.snapshot = SnapshotCollector()
        self.registry.register(self.snapshot)
        self._last: tuple[Status, dict[tuple[str, str, str], int]] | None = None
        self._write_problem: str | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # -- Observer ---------------------------------------------------------------------------------

    def on_delivered(self, relay: str, latency_s: float) -> None:
        self.latency.labels(relay=relay).observe(max(latency_s, 0.0))

    def on_failed(self, failed: FailedMail) -> None:
        """Counted from the snapshot (deliveries_total, failed_messages): nothing to do here."""

    # -- refresh ----------------------------------------------------------------------------------

    def update(self, status: Status, counters: Counters) -> None:
        """Take a health snapshot; rewrite the textfile when one is configured."""
        self._last = (status, dict(counters.outcomes))
        self.snapshot.families = snapshot_families(status, self._last[1], running=True)
        self._write_textfile()

    # -- the loopback endpoint --------------------------------------------------------------------

    def start(self) -> None:
        """Serve /metrics on the configured loopback address from a thread (the event loop never waits)."""
        if self.listen is None:
            return
        host, port = self.listen
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.error("metrics_listen_failed", listen=_shown(host, port), detail=exc.strerror or str(exc),
                      hint="another program holds the address: set MAILWATCHD_METRICS_LISTEN to a free port; "
                           "the textfile (if set) and delivery go on")
            return
        bound_port = self._server.server_address[1]
        log.info("metrics_listening", listen=_shown(host, bound_port))

    async def stop(self) -> None:
        """Stop serving; leave a textfile that says the daemon is down (mailwatchd_up 0)."""
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)  # returns once serve_forever's poll loop has left
            server.server_close()
            if self._thread is not None:
                await asyncio.to_thread(self._thread.join, 5.0)
        if self._last is not None:
            status, outcomes = self._last
            self.snapshot.families = snapshot_families(status, outcomes, running=False)
            self._write_textfile()

    # -- the textfile -----------------------------------------------------------------------------

    def _write_textfile(self) -> None:
        if self.textfile is None:
            return
        try:
            write_textfile(self.textfile, generate_latest(self.registry))
        except OSError as exc:
            problem = f"{type(exc).__name__}: {exc.strerror or exc}"
            if problem != self._write_problem:
                self._write_problem = problem
                log.warning("metrics_write_failed", path=str(self.textfile), detail=problem,
                            hint="the daemon's user needs write access to the textfile's directory")
            return
        if self._write_problem is not None:
            self._write_problem = None
            log.info("metrics_write_recovered", path=str(self.textfile))


def write_textfile(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data` (mode 0644): node_exporter never reads half of it.

    The temporary file is a dot file ending in .tmp in the same directory: the textfile
    collector reads only *.prom, and os.replace stays within one filesystem.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            os.fchmod(descriptor, 0o644)  # readable by node_exporter's user whatever the daemon's umask
            stream.write(data)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
