"""Prometheus metrics from a real daemon delivering to a real aiosmtpd relay: the node_exporter
textfile (atomic, 0644) and the loopback HTTP endpoint say the same, and no label names an address."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from prometheus_client.parser import text_string_to_metric_families

from mailwatchd.service.metrics import write_textfile
from tests.conftest import LOOPBACK, RecordingHandler, SmtpServer, wait_until
from tests.daemonproc import DaemonProcess, drop, message, relay_env
from tests.test_failover import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
FAMILIES = {
    "mailwatchd_up", "mailwatchd_healthy", "mailwatchd_last_update_timestamp_seconds", "mailwatchd_start_time_seconds",
    "mailwatchd_queue_messages", "mailwatchd_failed_messages", "mailwatchd_failed_unacknowledged_messages",
    "mailwatchd_oldest_message_age_seconds",
    "mailwatchd_deliveries", "mailwatchd_relay_up", "mailwatchd_probe_step_seconds",
    "mailwatchd_certificate_expiry_days", "mailwatchd_delivery_latency_seconds",
}


class RefusesNobody(RecordingHandler):
    """Accepts every recipient but nobody@…, refused for good with 550."""

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def parse(text: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def families(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


def refresh(daemon: DaemonProcess) -> None:
    """Have the metrics rewritten now rather than at the next 5-second tick: SIGUSR1 wakes the main loop."""
    daemon.signal(signal.SIGUSR1)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return str(response.read().decode())


@pytest.fixture
def relay(smtp_server_factory: Any) -> SmtpServer:
    server: SmtpServer = smtp_server_factory(RefusesNobody(), starttls=False)
    return server


@pytest.fixture
def textfile(tmp_path: Path) -> Path:
    directory = tmp_path / "textfile"
    directory.mkdir()
    return directory / "mailwatchd.prom"


def test_textfile_and_endpoint_count_deliveries_failures_and_latency(
        relay: SmtpServer, spool_dir: Path, textfile: Path, clean_env: dict[str, str], daemons: Any) -> None:
    port = free_port()
    daemon: DaemonProcess = daemons(relay_env(clean_env, spool_dir, relay.host, relay.port,
                                              MAILWATCHD_METRICS_FILE=str(textfile),
                                              MAILWATCHD_METRICS_LISTEN=f"{LOOPBACK}:{port}"))
    assert daemon.wait_event("metrics_listening")[0]["listen"] == f"{LOOPBACK}:{port}"
    for index in range(3):
        drop(spool_dir, message(index, to=f"user{index}@example.org"), f"m{index}")
    drop(spool_dir, message(9, to="nobody@example.org"), "m9")
    relay.handler.wait_for(3)
    daemon.wait_event("message_failed")
    refresh(daemon)
    relay_name, endpoint = relay.host, f"{relay.host}:{relay.port}/none"

    def settled(text: str) -> Samples | None:
        samples = parse(text)
        done = (value(samples, "mailwatchd_deliveries_total", relay=relay_name, outcome="delivered", cause="ok") == 3
                and value(samples, "mailwatchd_failed_messages") == 1
                and value(samples, "mailwatchd_queue_messages", state="in_flight") == 0)
        return samples if done else None

    from_file: Samples = wait_until(lambda: textfile.exists() and settled(textfile.read_text()), timeout=15,
                                    message="the textfile to count 3 deliveries and 1 failure")
    from_http: Samples = wait_until(lambda: settled(scrape(port)), timeout=15,
                                    message="the endpoint to count 3 deliveries and 1 failure")
    for samples in (from_file, from_http):
        assert value(samples, "mailwatchd_deliveries_total", relay=relay_name, outcome="permanent",
                     cause="recipient_rejected") == 1
        assert {labels for name, labels in samples if name == "mailwatchd_deliveries_total"} == {
            frozenset({"relay": relay_name, "outcome": "delivered", "cause": "ok"}.items()),
            frozenset({"relay": relay_name, "outcome": "permanent", "cause": "recipient_rejected"}.items())}
        for state in ("ready", "in_flight", "deferred"):
            assert value(samples, "mailwatchd_queue_messages", state=state) == 0
        assert value(samples, "mailwatchd_oldest_message_age_seconds") == 0
        assert value(samples, "mailwatchd_up") == 1
        assert value(samples, "mailwatchd_healthy") == 1
        updated = value(samples, "mailwatchd_last_update_timestamp_seconds")
        assert updated is not None and abs(time.time() - updated) < 30
        assert value(samples, "mailwatchd_relay_up", relay=relay_name, endpoint=endpoint) == 1
        connect = value(samples, "mailwatchd_probe_step_seconds", relay=relay_name, endpoint=endpoint, step="connect")
        assert connect is not None and 0 <= connect < 5
        latency = {"relay": relay_name}
        assert value(samples, "mailwatchd_delivery_latency_seconds_count", **latency) == 3
        assert value(samples, "mailwatchd_delivery_latency_seconds_bucket", **latency, le="+Inf") == 3
        total = value(samples, "mailwatchd_delivery_latency_seconds_sum", **latency)
        assert total is not None and 0 < total < 60
        assert value(samples, "mailwatchd_delivery_latency_seconds_bucket", **latency, le="0.005") is not None
        assert value(samples, "mailwatchd_delivery_latency_seconds_bucket", **latency, le="86400.0") == 3
    assert families(textfile.read_text()) == FAMILIES  # a private registry: no process_* or python_* collectors
    assert stat.S_IMODE(textfile.stat().st_mode) == 0o644
    listening = [c.laddr for c in psutil.Process(daemon.pid).net_connections("inet") if c.status == "LISTEN"]
    assert [(address.ip, address.port) for address in listening] == [(LOOPBACK, port)]

    assert daemon.stop() == 0
    stopped = parse(textfile.read_text())
    assert value(stopped, "mailwatchd_failed_messages") == 1
    assert value(stopped, "mailwatchd_failed_unacknowledged_messages") == 1
    assert value(stopped, "mailwatchd_failed_messages") == 1
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_no_label_names_an_address_a_secret_or_message_content(
        smtp_server_factory: Any, ca_file: Path, spool_dir: Path, textfile: Path, clean_env: dict[str, str],
        daemons: Any) -> None:
    relay = smtp_server_factory(RefusesNobody(), users={"account-name": "hunter2-secret"})
    env = relay_env(clean_env, spool_dir, "localhost", relay.port, MAILWATCHD_METRICS_FILE=str(textfile),
                    EMAIL_USE_TLS="true", EMAIL_SSL_CAFILE=str(ca_file),
                    EMAIL_HOST_USER="account-name", EMAIL_HOST_PASSWORD="hunter2-secret")
    daemon = daemons(env)
    drop(spool_dir, message(1, to="nobody@example.org", sender="sender@example.com",
                            extra_headers="X-Secret: content-marker\r\n"), "m1")
    daemon.wait_event("message_failed")
    refresh(daemon)
    text = wait_until(lambda: textfile.exists() and "mailwatchd_deliveries_total{" in textfile.read_text()
                      and textfile.read_text(), timeout=15, message="a deliveries sample in the textfile")
    days = value(parse(text), "mailwatchd_certificate_expiry_days", relay="localhost",
                 endpoint=f"localhost:{relay.port}/starttls")
    assert days is not None and days > 0, text
    labels = {label for family in text_string_to_metric_families(text)
              for sample in family.samples for label in sample.labels.values()}
    assert labels, text
    for forbidden in ("@", "example.org", "example.com", "account-name", "hunter2", "content-marker", "test 1"):
        assert not [label for label in labels if forbidden in label], (forbidden, labels)


def test_the_textfile_is_replaced_whole_while_a_reader_reads_it(
        relay: SmtpServer, spool_dir: Path, textfile: Path, clean_env: dict[str, str], daemons: Any) -> None:
    daemon: DaemonProcess = daemons(relay_env(clean_env, spool_dir, relay.host, relay.port,
                                              MAILWATCHD_METRICS_FILE=str(textfile)))
    wait_until(textfile.exists, message="the first textfile")
    stop = threading.Event()

    def poke() -> None:  # SIGUSR1 wakes the main loop: each wake-up rewrites the textfile
        while not stop.wait(0.01):
            daemon.signal(signal.SIGUSR1)

    poker = threading.Thread(target=poke, daemon=True)
    poker.start()
    inodes: set[int] = set()
    updates: set[float] = set()
    reads = 0
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            with open(textfile) as stream:
                inodes.add(os.fstat(stream.fileno()).st_ino)
                text = stream.read()
            reads += 1
            assert text.endswith("\n") and families(text) == FAMILIES, text
            samples = parse(text)
            assert value(samples, "mailwatchd_up") == 1
            updates.add(value(samples, "mailwatchd_last_update_timestamp_seconds") or 0.0)
    finally:
        stop.set()
        poker.join()
    assert len(updates) >= 20, f"only {len(updates)} rewrites seen in {reads} reads"
    assert len(inodes) >= 2  # replaced by a new file, not rewritten in place
    assert [name for name in os.listdir(textfile.parent) if name.endswith(".prom")] == [textfile.name]


def test_a_missing_textfile_directory_is_logged_once_and_delivery_goes_on(
        relay: SmtpServer, spool_dir: Path, tmp_path: Path, clean_env: dict[str, str], daemons: Any) -> None:
    textfile = tmp_path / "later" / "mailwatchd.prom"
    daemon: DaemonProcess = daemons(relay_env(clean_env, spool_dir, relay.host, relay.port,
                                              MAILWATCHD_METRICS_FILE=str(textfile)))
    failed = daemon.wait_event("metrics_write_failed")[0]
    assert failed["path"] == str(textfile) and "FileNotFoundError" in failed["detail"]
    for count in range(1, 6):  # one at a time: signals sent together may arrive as one
        daemon.signal(signal.SIGUSR1)
        daemon.wait_event("flush_requested", count=count)
    drop(spool_dir, message(1), "m1")
    relay.handler.wait_for(1)
    daemon.wait_event("message_delivered")
    assert len(daemon.named("metrics_write_failed")) == 1  # once per problem, not once per tick

    textfile.parent.mkdir()
    daemon.signal(signal.SIGUSR1)
    daemon.wait_event("metrics_write_recovered")
    assert textfile.exists()


def test_a_busy_metrics_port_is_reported_and_the_daemon_still_delivers(
        relay: SmtpServer, spool_dir: Path, textfile: Path, clean_env: dict[str, str], daemons: Any) -> None:
    with held_port() as port:
        daemon: DaemonProcess = daemons(relay_env(clean_env, spool_dir, relay.host, relay.port,
                                                  MAILWATCHD_METRICS_FILE=str(textfile),
                                                  MAILWATCHD_METRICS_LISTEN=f"{LOOPBACK}:{port}"))
        busy = daemon.wait_event("metrics_listen_failed")[0]
        assert busy["listen"] == f"{LOOPBACK}:{port}"
        drop(spool_dir, message(1), "m1")
        relay.handler.wait_for(1)
        daemon.wait_event("message_delivered")
        refresh(daemon)
        wait_until(lambda: textfile.exists() and "mailwatchd_delivery_latency_seconds_count" in textfile.read_text(),
                   timeout=15, message="the textfile, with the delivery")


def test_a_reload_keeps_the_metrics_settings_and_says_so(
        relay: SmtpServer, spool_dir: Path, textfile: Path, tmp_path: Path, clean_env: dict[str, str],
        daemons: Any) -> None:
    config = tmp_path / "mailwatchd.env"
    config.write_text(f"MAILWATCHD_METRICS_FILE={textfile}\n")
    daemon: DaemonProcess = daemons(relay_env(clean_env, spool_dir, relay.host, relay.port), "--config", str(config))
    wait_until(textfile.exists, message="the textfile")
    moved = textfile.with_name("moved.prom")
    config.write_text(f"MAILWATCHD_METRICS_FILE={moved}\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("config_reload_metrics_ignored")
    daemon.wait_event("config_reloaded")
    before = textfile.stat().st_ino
    daemon.signal(signal.SIGUSR1)
    wait_until(lambda: textfile.stat().st_ino != before, message="the kept textfile to be rewritten")
    assert not moved.exists()


def test_the_textfile_is_0644_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "mailwatchd.prom"
    previous = os.umask(0o077)
    try:
        write_textfile(path, b"mailwatchd_up 1\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes() == b"mailwatchd_up 1\n"
    assert os.listdir(tmp_path) == ["mailwatchd.prom"]


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A loopback port bound and listened on by the test, so the daemon cannot have it."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        yield int(sock.getsockname()[1])
