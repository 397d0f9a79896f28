"""Queue ids: the names of messages in the spool, made by the submitter and the daemon alike."""

from __future__ import annotations

import os
import re
import time

# 14 hex digits of microseconds since the epoch (good until the year 4253) then 24 random
# bits: ids sort by creation time, never contain a path separator, and have a fixed length.
QUEUE_ID_PATTERN = re.compile(r"\A[0-9A-F]{20}\Z")  # \Z: "$" would accept a trailing newline


def new_queue_id(now_ns: int | None = None) -> str:
    """A fresh queue id; `now_ns` (time.time_ns()) is for tests."""
    microseconds = (time.time_ns() if now_ns is None else now_ns) // 1000
    # os.urandom, not secrets: the secrets module pulls in hmac and OpenSSL, a cost every `sendmail` would pay.
    return f"{microseconds:014X}{int.from_bytes(os.urandom(3), 'big'):06X}"


def is_queue_id(name: str) -> bool:
    return bool(QUEUE_ID_PATTERN.match(name))


def queue_id_time(queue_id: str) -> float:
    """The creation time (epoch seconds) a queue id carries."""
    return int(queue_id[:14], 16) / 1_000_000
