"""Queue ids: the names of messages in the spool, made by the submitter and the daemon alike."""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # mypy takes it as true; `sendmail` imports neither typing nor re
if TYPE_CHECKING:
    import re

    QUEUE_ID_PATTERN: re.Pattern[str]

# 14 hex digits of microseconds since the epoch (good until the year 4253) then 24 random
# bits: ids sort by creation time, never contain a path separator, and have a fixed length.
QUEUE_ID_REGEX = r"\A[0-9A-F]{20}\Z"  # \Z: "$" would accept a trailing newline
QUEUE_ID_LENGTH = 20
QUEUE_ID_DIGITS = frozenset("0123456789ABCDEF")

if not TYPE_CHECKING:  # hidden from mypy, which would otherwise take any misspelt attribute for a pattern

    def __getattr__(name: str) -> re.Pattern[str]:
        """PEP 562: QUEUE_ID_PATTERN (QUEUE_ID_REGEX compiled), made on first use: `sendmail` makes ids
        and never matches one."""
        if name != "QUEUE_ID_PATTERN":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        import re

        value = globals()[name] = re.compile(QUEUE_ID_REGEX)
        return value


def new_queue_id(now_ns: int | None = None) -> str:
    """A fresh queue id; `now_ns` (time.time_ns()) is for tests."""
    microseconds = (time.time_ns() if now_ns is None else now_ns) // 1000
    # os.urandom, not secrets: the secrets module pulls in hmac and OpenSSL, a cost every `sendmail` would pay.
    return f"{microseconds:014X}{int.from_bytes(os.urandom(3), 'big'):06X}"


def is_queue_id(name: str) -> bool:
    """Whether `name` is a queue id: what QUEUE_ID_PATTERN matches, checked without re."""
    return len(name) == QUEUE_ID_LENGTH and QUEUE_ID_DIGITS.issuperset(name)


def queue_id_time(queue_id: str) -> float:
    """The creation time (epoch seconds) a queue id carries."""
    return int(queue_id[:14], 16) / 1_000_000
