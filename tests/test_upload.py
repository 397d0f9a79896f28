"""The message body goes out as the relay reads it (RFC 5321 §4.5.3.2): a slow reader gets the
whole message, one that stops reading is cut off after EMAIL_TIMEOUT without progress, and the
transaction deadline grows with the message's size."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mailwatchd.transports.delivery import UPLOAD_FLOOR_BYTES_PER_S, SmtpSession, attempt_bound, transaction_deadline
from mailwatchd.transports.outcome import Cause, DeliveryResult, Outcome, Phase
from tests.rawservers import SlowReaderServer
from tests.test_delivery import make_relay, make_settings, message

HEADER = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: big\r\n\r\n"


def big_message(size: int) -> bytes:
    line = b"0123456789abcdef" * 4 + b"\r\n"  # 66 bytes, never a lone dot
    return HEADER + line * (size // len(line))


def deliver_to(server: SlowReaderServer, tmp_path: Path, data: bytes,
               **settings: float) -> tuple[DeliveryResult, float]:
    relay = make_relay(server.port)
    session = SmtpSession(relay, relay.primary, make_settings(tmp_path, **settings))

    async def run() -> tuple[DeliveryResult, float]:
        started = time.monotonic()
        result = await session.deliver(message(data=data))
        elapsed = time.monotonic() - started
        await session.close()
        return result, elapsed
    return asyncio.run(run())


def test_a_slow_reader_gets_a_message_that_takes_longer_than_the_command_timeout(tmp_path: Path) -> None:
    """3 MB at 1.5 MB/s is two seconds of upload against a one-second EMAIL_TIMEOUT: the reply
    timeout must not run while the body is still being read."""
    data = big_message(3 * 1024 * 1024)
    with SlowReaderServer(rate=1.5 * 1024 * 1024) as server:
        result, elapsed = deliver_to(server, tmp_path, data, command_timeout=1.0, transaction_timeout=30.0)
        assert result.outcome is Outcome.DELIVERED, result
        assert server.replied.is_set() and server.body_bytes >= len(data)
    assert elapsed > 1.5  # the upload really took longer than one command timeout


def test_a_relay_that_stops_reading_is_cut_off_after_the_stall_timeout(tmp_path: Path) -> None:
    """The server answers 354 and reads nothing more: once the kernel buffers are full, the upload
    makes no progress and ends after EMAIL_TIMEOUT, long before the size-scaled deadline."""
    data = big_message(12 * 1024 * 1024)  # more than loopback's socket buffers can hold
    with SlowReaderServer(rate=0) as server:
        result, elapsed = deliver_to(server, tmp_path, data, command_timeout=1.0, transaction_timeout=30.0)
    assert (result.outcome, result.cause, result.phase) == (Outcome.TEMPORARY, Cause.TIMEOUT, Phase.BODY), result
    assert "read nothing of the message for 1s" in result.detail
    assert 1.0 <= elapsed < 8.0
    assert not server.replied.is_set()


def test_the_transaction_deadline_grows_with_the_message_size(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, transaction_timeout=120.0)
    assert transaction_deadline(settings, 4096) == 120.0
    twenty_mb = 20 * 1024 * 1024
    assert transaction_deadline(settings, twenty_mb) == twenty_mb / UPLOAD_FLOOR_BYTES_PER_S > 120.0
    assert attempt_bound(settings, twenty_mb) > transaction_deadline(settings, twenty_mb)
