"""journal: entries sent to a real AF_UNIX datagram socket standing in for journald, parsed back with an
independent reader of the native protocol."""

from __future__ import annotations

import array
import fcntl
import io
import os
import socket
import struct
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from mailwatchd.service import journal
from mailwatchd.service.journal import JournalProcessor, JournalSender


def parse_entry(data: bytes) -> dict[str, str]:
    """The native protocol, read the way journald does (journald-native.c)."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(data):
        newline = data.index(b"\n", position)
        equals = data.find(b"=", position, newline)
        if equals >= 0:
            name, value = data[position:equals], data[equals + 1:newline]
            position = newline + 1
        else:
            name = data[position:newline]
            (length,) = struct.unpack_from("<Q", data, newline + 1)
            start = newline + 9
            value = data[start:start + length]
            assert data[start + length:start + length + 1] == b"\n", "binary field not closed by a newline"
            position = start + length + 1
        fields[name.decode("ascii")] = value.decode("utf-8")
    return fields


class FakeJournald:
    """A bound datagram socket; receives plain entries and memfd-passed ones."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        self.memfd_seals: int | None = None

    def receive_raw(self) -> bytes:
        fds = array.array("i")
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:fds.itemsize])
        if not fds:
            return data
        assert data == b""
        self.memfd_seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)  # journald refuses an unsealed memfd
        with os.fdopen(fds[0], "rb") as memfd:
            memfd.seek(0)  # the sender's offset: it is the same open file
            return memfd.read()

    def receive(self) -> dict[str, str]:
        return parse_entry(self.receive_raw())

    def nothing_pending(self) -> bool:
        self.sock.settimeout(0)
        try:
            self.sock.recv(1)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[FakeJournald]:
    path = tmp_path / "journal.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield FakeJournald(sock, path)


@pytest.fixture
def sender(journald: FakeJournald) -> Iterator[JournalSender]:
    sender = JournalSender(str(journald.path))
    yield sender
    sender.close()


def test_an_entry_carries_message_priority_identifier_and_fields(journald: FakeJournald,
                                                                 sender: JournalSender) -> None:
    assert sender.send("delivered to smtp.example.com", 6,
                       {"QUEUE_ID": "20261123T100000-abc", "RELAY": "primary", "EVENT": "message_delivered",
                        "ATTEMPT": "2"}) is True

    assert journald.receive() == {"QUEUE_ID": "20261123T100000-abc", "RELAY": "primary",
                                  "EVENT": "message_delivered", "ATTEMPT": "2", "SYSLOG_IDENTIFIER": "mailwatchd",
                                  "MESSAGE": "delivered to smtp.example.com", "PRIORITY": "6"}


def test_a_multiline_value_uses_the_length_prefixed_form(journald: FakeJournald, sender: JournalSender) -> None:
    try:
        raise ConnectionResetError("relay hung up")
    except ConnectionResetError as exc:
        text = "".join(traceback.format_exception(exc))
    assert text.count("\n") > 2

    sender.send("delivery crashed", 3, {"EXCEPTION": text})

    raw = journald.receive_raw()
    encoded = text.encode()
    assert b"EXCEPTION\n" + struct.pack("<Q", len(encoded)) + encoded + b"\n" in raw
    assert parse_entry(raw)["EXCEPTION"] == text


def test_module_level_send_uses_the_process_wide_sender(journald: FakeJournald,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "_default", JournalSender(str(journald.path)))

    assert journal.send("hello", 5, {"queue_id": "Q1"}) is True
    assert journald.receive()["QUEUE_ID"] == "Q1"


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(journald: FakeJournald,
                                                                  sender: JournalSender) -> None:
    big = "x" * (2 << 20)  # larger than any default datagram limit (net.core.wmem_max)

    assert sender.send("big", 6, {"BODY_SIZE": str(len(big)), "BLOB": big + "\nend"}) is True

    entry = journald.receive()
    assert entry["BLOB"] == big + "\nend"
    assert entry["MESSAGE"] == "big"
    assert journald.memfd_seals == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


@pytest.mark.parametrize(("key", "name"), [
    ("queue_id", "QUEUE_ID"), ("relay-name", "RELAY_NAME"), ("_PID", "PID"), ("9lives", "LIVES"),
    ("héllo", "H_LLO"), ("___", None), ("a" * 80, "A" * 64),
])
def test_field_names_are_made_valid(key: str, name: str | None) -> None:
    assert journal.field_name(key) == name


def test_fields_cannot_override_message_or_priority(journald: FakeJournald, sender: JournalSender) -> None:
    sender.send("the message", 4, {"message": "forged", "PRIORITY": "0", "___": "dropped"})

    entry = journald.receive()
    assert (entry["MESSAGE"], entry["PRIORITY"]) == ("the message", "4")
    assert set(entry) == {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"}


def test_a_missing_socket_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    sender = JournalSender(str(tmp_path / "no-journald"))
    with structlog.testing.capture_logs() as logs:
        results = [sender.send("one", 6, {}), sender.send("two", 6, {}), sender.send("three", 6, {})]

    assert results == [False, False, False]
    assert [entry["event"] for entry in logs] == ["journal_send_failed"]


def test_stream_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream, (tmp_path / "other").open("w") as other:
        info = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}

        assert journal.stream_is_journal(stream, env) is True
        assert journal.stream_is_journal(stream.fileno(), env) is True
        assert journal.stream_is_journal(other, env) is False
        assert journal.stream_is_journal(stream, {}) is False
        assert journal.stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"}) is False
        assert journal.stream_is_journal(io.StringIO(), env) is False


def test_stream_is_journal_reads_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "stream").open("w") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert journal.stream_is_journal(stream) is True


def test_with_priority_prefixes_every_line() -> None:
    assert journal.with_priority("relay down", 4) == "<4>relay down"
    assert journal.with_priority("first\nsecond", 3) == "<3>first\n<3>second"


def test_journal_fields_of_a_structlog_event() -> None:
    event = {"event": "delivery_deferred", "level": "warning", "timestamp": "2026-11-23T10:00:00Z",
             "queue_id": "Q1", "relay": "primary", "attempt": 3, "next_try_s": 120.5, "tls": True,
             "reply": None, "exception": "Traceback (most recent call last):\n  ...\nTimeoutError"}

    assert journal.journal_fields(event) == {
        "EVENT": "delivery_deferred", "PRIORITY": "4", "SYSLOG_IDENTIFIER": "mailwatchd", "QUEUE_ID": "Q1",
        "RELAY": "primary", "ATTEMPT": "3", "NEXT_TRY_S": "120.5", "TLS": "true",
        "EXCEPTION": "Traceback (most recent call last):\n  ...\nTimeoutError"}


def render(_: object, __: str, event: object) -> str:
    assert isinstance(event, dict)
    return " ".join([event["event"], *(f"{key}={value}" for key, value in event.items() if key not in
                                        ("event", "level"))])


def test_processor_sends_the_event_natively_and_drops_the_stream_line(journald: FakeJournald,
                                                                      sender: JournalSender) -> None:
    stream = io.StringIO()
    log = structlog.wrap_logger(structlog.PrintLogger(stream), processors=[
        structlog.processors.add_log_level, JournalProcessor(render, sender)])

    log.error("relay_failover", queue_id="Q7", relay="backup")

    assert journald.receive() == {"EVENT": "relay_failover", "QUEUE_ID": "Q7", "RELAY": "backup",
                                  "SYSLOG_IDENTIFIER": "mailwatchd",
                                  "MESSAGE": "relay_failover queue_id=Q7 relay=backup", "PRIORITY": "3"}
    assert stream.getvalue() == ""


def test_processor_falls_back_to_the_prefixed_stream_line(tmp_path: Path) -> None:
    stream = io.StringIO()
    log = structlog.wrap_logger(structlog.PrintLogger(stream), processors=[
        structlog.processors.add_log_level, JournalProcessor(render, JournalSender(str(tmp_path / "none")))])

    with structlog.testing.capture_logs():  # the one journal_send_failed warning goes elsewhere
        log.warning("relay_down", relay="primary")
    log.info("message_delivered", queue_id="Q8")

    assert stream.getvalue() == "<4>relay_down relay=primary\n<6>message_delivered queue_id=Q8\n"
