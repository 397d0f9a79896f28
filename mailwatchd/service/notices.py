"""Failure notices: a digest of permanently failed mail, mailed to the admin (stub; see issue 9)."""

from __future__ import annotations

from mailwatchd.service.counters import FailedMail

NOTICE_HEADER = b"X-Mailwatchd-Notice"


def is_notice(raw: bytes) -> bool:
    """Whether a spool file is one of our own failure notices (never the subject of another)."""
    header_end = raw.find(b"\n\n")
    head = raw if header_end < 0 else raw[:header_end]
    return (b"\n" + head.lower()).find(b"\n" + NOTICE_HEADER.lower() + b":") >= 0


class FailureNotices:
    """Collects failed mail and sends a bounded digest (stub)."""

    def on_delivered(self, relay: str, latency_s: float) -> None:
        return None

    def on_failed(self, failed: FailedMail) -> None:
        return None
