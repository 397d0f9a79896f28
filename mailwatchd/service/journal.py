"""Logging to systemd's journal: the stream prefix and the native protocol.

- On a stream connected to journald ($JOURNAL_STREAM names it, systemd.exec(5)), a line starting with
  `<N>` is stored with PRIORITY=N (sd-daemon(3)).
- The native protocol (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/) sends one entry per datagram to
  /run/systemd/journal/socket: `KEY=value\\n` per field, or, for a value holding a newline,
  `KEY\\n` + its length as 64-bit little endian + the value + `\\n`. Entries too large for a datagram go in a
  sealed memfd passed with SCM_RIGHTS, as sd_journal_send(3) does. Fields of our own are searchable:
  `journalctl QUEUE_ID=...`.

Sending never raises; the first failure is logged (`journal_send_failed`) and the caller falls back to
the stream.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import struct
from collections.abc import Callable, Mapping, MutableMapping
from typing import IO, Any

import structlog

SOCKET_PATH = "/run/systemd/journal/socket"
IDENTIFIER = "mailwatchd"
DEFAULT_PRIORITY = 6  # LOG_INFO
# syslog(3) priorities for the "<N>" prefix journald understands on a stream.
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
# Keys of a structlog event that are not fields of the entry: journald keeps its own time and priority.
_NOT_FIELDS = frozenset({"event", "level", "timestamp"})
_INVALID_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")
_MAX_FIELD_NAME = 64
_MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

log = structlog.get_logger()


# -- the stream ------------------------------------------------------------------------------------

def stream_is_journal(stream: IO[Any] | int, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` (or fd) is the journal stream systemd connected us to ($JOURNAL_STREAM=dev:ino)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat(stream if isinstance(stream, int) else stream.fileno())
    except (ValueError, OSError):  # unset or malformed, or a stream without an fd (io.UnsupportedOperation)
        return False
    return info.st_dev == device and info.st_ino == inode


def with_priority(text: str, priority: int) -> str:
    """`<N>` before every line of `text`: journald makes each line an entry of that priority."""
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


# -- the native protocol ---------------------------------------------------------------------------

def field_name(key: str) -> str | None:
    """A journal field name for `key` (uppercase A-Z, 0-9, _; not starting with _ or a digit), or None."""
    name = _INVALID_FIELD_CHARS.sub("_", key.upper()).lstrip("_0123456789")[:_MAX_FIELD_NAME]
    return name or None


def encode_entry(fields: Mapping[str, str]) -> bytes:
    """One native-protocol entry: `KEY=value\\n`, or the length-prefixed form for values with a newline."""
    parts: list[bytes] = []
    for key, value in fields.items():
        name = key.encode("ascii")
        data = value.encode("utf-8", errors="surrogateescape")
        if b"\n" in data:
            parts.append(name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSender:
    """Sends entries to journald's native socket; one unconnected datagram socket, reused."""

    def __init__(self, path: str = SOCKET_PATH, identifier: str = IDENTIFIER) -> None:
        self.path = path
        self.identifier = identifier
        self._socket: socket.socket | None = None
        self._failed = False

    def send(self, message: str, priority: int = DEFAULT_PRIORITY, fields: Mapping[str, str] | None = None) -> bool:
        """Send one entry; False (never an exception) when it could not be sent."""
        entry: dict[str, str] = {}
        for key, value in (fields or {}).items():
            name = field_name(key)
            if name is not None and name not in ("MESSAGE", "PRIORITY"):
                entry[name] = value
        entry.setdefault("SYSLOG_IDENTIFIER", self.identifier)
        entry["MESSAGE"] = message
        entry["PRIORITY"] = str(priority)
        try:
            self._send(encode_entry(entry))
        except OSError as exc:
            self._close()
            if not self._failed:
                self._failed = True  # before logging: the log call may come back here
                log.warning("journal_send_failed", socket=self.path, error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _send(self, payload: bytes) -> None:
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.sendto(payload, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        """An entry larger than a datagram: journald reads it from a sealed memfd sent as SCM_RIGHTS."""
        assert self._socket is not None
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS)
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())
            self._socket.sendmsg([], [rights], 0, self.path)
        finally:
            os.close(fd)

    def _close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None

    def close(self) -> None:
        self._close()


_default = JournalSender()


def send(message: str, priority: int = DEFAULT_PRIORITY, fields: Mapping[str, str] | None = None) -> bool:
    """Send one entry to journald through the process-wide sender; False when it could not be sent."""
    return _default.send(message, priority, fields)


# -- structlog -------------------------------------------------------------------------------------

def _field_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


def priority_of(event: Mapping[str, Any]) -> int:
    return SYSLOG_PRIORITY.get(str(event.get("level", "")).lower(), DEFAULT_PRIORITY)


def journal_fields(event: Mapping[str, Any]) -> dict[str, str]:
    """The journal fields of a structlog event: EVENT, PRIORITY, SYSLOG_IDENTIFIER and each bound key
    uppercased (queue_id → QUEUE_ID). No MESSAGE: the renderer's line is the message."""
    fields = {"EVENT": str(event.get("event", "")), "PRIORITY": str(priority_of(event)),
              "SYSLOG_IDENTIFIER": IDENTIFIER}
    for key, value in event.items():
        name = field_name(key)
        if key not in _NOT_FIELDS and name is not None and name not in fields and value is not None:
            fields[name] = _field_value(value)
    return fields


class JournalProcessor:
    """The last structlog processor when logging to the journal.

    Sends the event as a native entry (MESSAGE = the renderer's line, plus one field per bound key) and
    drops it from the stream, so it is stored once. When the native socket fails, the rendered line goes
    to the stream with its `<N>` priority prefix instead.
    """

    def __init__(self, renderer: Callable[[Any, str, MutableMapping[str, Any]], str],
                 sender: JournalSender | None = None) -> None:
        self.renderer = renderer
        self.sender = sender or _default

    def __call__(self, logger: Any, method_name: str, event: MutableMapping[str, Any]) -> str:
        fields = journal_fields(event)
        line = self.renderer(logger, method_name, event)
        priority = int(fields.pop("PRIORITY"))
        if self.sender.send(line, priority, fields):
            raise structlog.DropEvent
        return with_priority(line, priority)
