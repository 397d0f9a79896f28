"""The names the program answers to, and ending it without the interpreter's teardown (shared by the
`sendmail -t` fast path in __main__.py and cli.py; both import only os and sys from here)."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # mypy takes it as true; `sendmail` does without typing (tests/test_imports.py)
if TYPE_CHECKING:
    from typing import NoReturn

# The names (argv[0]) under which the program is sendmail.py's: sendmail, mailq (-bp), newaliases (-bi).
SENDMAIL_PROGRAMS = frozenset({"sendmail", "sendmail.mailwatchd", "mailq", "newaliases"})


def exit_now(status: int) -> NoReturn:
    """End the process without the interpreter's teardown, which frees every module one by one:
    a sixth of a `sendmail -t` run. The message is fsynced by now; only stdout and stderr may
    hold output still, and they are flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`mailq | head -1`): as Python's own exit does
            status = status or 120
    os._exit(status)
