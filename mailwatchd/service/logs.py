"""Logging: one line per event, snake_case event names with bound fields.

Formats: `console` (readable key=value lines), `json` (one object per line, for shippers),
`journal` (stdout/stderr is journald: each line gets its syslog priority prefix, sd-daemon(3),
and the event is sent with its fields through the native journal protocol). `auto` picks
`journal` when $JOURNAL_STREAM names our stderr, else `console`.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger

from mailwatchd.service import journal

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_RESERVED = ("timestamp", "level", "event")


def one_line_exception(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Render exc_info as one field on one line, so a traceback stays one entry."""
    exc_info = event.pop("exc_info", None)
    if exc_info:
        if exc_info is True:
            exc_info = sys.exc_info()
        if isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        text = "".join(traceback.format_exception(*exc_info)).strip()
        event["exception"] = text.replace("\n", " ⏎ ")
    return event


def _format_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(ch in text for ch in ' "=\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


def render_console(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    """`2026-11-23T10:00:00Z info  message_delivered queue_id=... relay=...`"""
    head = f"{event.get('timestamp', '')} {event.get('level', 'info'):<7} {event.get('event', '')}"
    fields = " ".join(f"{key}={_format_value(value)}" for key, value in event.items() if key not in _RESERVED)
    return f"{head} {fields}".rstrip()


def render_journal(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    """`message_delivered queue_id=...`: the journal records time and priority itself."""
    fields = " ".join(f"{key}={_format_value(value)}" for key, value in event.items() if key not in _RESERVED)
    return f"{event.get('event', '')} {fields}".rstrip()


def render_json(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    return json.dumps(event, default=str, ensure_ascii=False, separators=(",", ":"))


def choose_format(requested: str, stream: TextIO) -> str:
    if requested != "auto":
        return requested
    return "journal" if journal.stream_is_journal(stream) else "console"


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Set up structlog for the process; returns the format chosen."""
    stream = stream or sys.stderr
    chosen = choose_format(log_format, stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="%Y-%m-%dT%H:%M:%S.%fZ", utc=True),
        one_line_exception,
    ]
    if chosen == "json":
        processors.append(render_json)
    elif chosen == "journal":
        processors.append(journal.JournalProcessor(render_journal))
    else:
        processors.append(render_console)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        # One write(2) a line (print() makes two on an unbuffered stream): the listener's process shares the
        # stream, and a line under PIPE_BUF stays whole between the two processes' lines.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    return chosen


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """The process's logger: `log.info("event_name", field=value)`, one line per event."""
    return cast(FilteringBoundLogger, structlog.get_logger(**bound))
