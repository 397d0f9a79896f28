"""Log lines: one event per line, tracebacks kept on it, the format picked for the stream."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile

import structlog

from mailwatchd.service import logs


def emit(log_format: str, level: str = "info", **fields: object) -> str:
    stream = io.StringIO()
    logs.configure(log_format, level, stream=stream)
    structlog.get_logger().info("message_delivered", **fields)
    return stream.getvalue()


def test_console_line_has_time_level_event_and_quoted_fields() -> None:
    line = emit("console", queue_id="0660F3BF7D59FB8E93C5", reply="2.0.0 OK queued").strip()
    assert "\n" not in line
    assert " info    message_delivered queue_id=0660F3BF7D59FB8E93C5 reply=\"2.0.0 OK queued\"" in line


def test_json_line_is_one_object_with_the_fields() -> None:
    event = json.loads(emit("json", queue_id="Q1", attempt=2))
    assert event["event"] == "message_delivered" and event["attempt"] == 2 and event["level"] == "info"


def test_level_filter_drops_lower_events() -> None:
    assert emit("json", level="warning", queue_id="Q1") == ""


def test_traceback_stays_on_one_line() -> None:
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        structlog.get_logger().exception("attempt_crashed", queue_id="Q1")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert "ValueError: boom" in event["exception"] and "Traceback" in event["exception"]


def test_journal_line_leaves_time_and_level_to_the_journal() -> None:
    line = logs.render_journal(None, "info", {"timestamp": "t", "level": "info", "event": "relay_up",
                                              "relay": "gmail"})
    assert line == "relay_up relay=gmail"


def test_auto_picks_journal_only_when_journal_stream_names_the_stream() -> None:
    with tempfile.TemporaryFile("w+") as stream:
        st = os.fstat(stream.fileno())
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            assert logs.choose_format("auto", stream) == "journal"
            assert logs.choose_format("auto", io.StringIO()) == "console"
        finally:
            del os.environ["JOURNAL_STREAM"]
        assert logs.choose_format("auto", stream) == "console"


WRITER = """
import sys
from mailwatchd.service import logs
logs.configure("json", "info")
log = logs.get_logger()
for n in range(int(sys.argv[1])):
    log.info("line", writer=sys.argv[2], n=n)
"""


def test_two_processes_logging_to_one_stream_keep_every_line_whole() -> None:
    """The daemon and its listener's process share stderr (and the journal's stream): each line is one write,
    also where Python's streams are unbuffered (PYTHONUNBUFFERED, where print() writes a line and its
    newline apart)."""
    lines = 3000
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    read_end, write_end = os.pipe()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(lines), name], stderr=write_end, env=env)
               for name in ("daemon", "listener")]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        output = stream.read()
    assert [writer.wait(30) for writer in writers] == [0, 0]
    events = [json.loads(line) for line in output.splitlines()]  # a torn line fails here
    assert sorted((event["writer"], event["n"]) for event in events) == sorted(
        (name, n) for name in ("daemon", "listener") for n in range(lines))
