"""The `mailwatchd` command's entry point (the console script and `python -m mailwatchd`).

`sendmail -t` runs once per message, so the one common case, a message to queue under a sendmail
name (`sendmail`, `mailq`, `newaliases` as links to the command, or `mailwatchd sendmail`), is
carried out here without loading cli.py, the rest of the program's command line. Everything else,
a bad sendmail command line and the sendmail modes that are not a submission included, is cli.py's.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # mypy takes it as true; `sendmail` does without typing (tests/test_imports.py)
if TYPE_CHECKING:
    from typing import NoReturn

# The names (argv[0]) under which the program is sendmail.py's: as cli.SENDMAIL_PROGRAMS.
SENDMAIL_PROGRAMS = frozenset({"sendmail", "sendmail.mailwatchd", "mailq", "newaliases"})


def main() -> int:
    """Run the command line in sys.argv."""
    program = os.path.basename(sys.argv[0])
    argv = sys.argv[1:]
    if program in SENDMAIL_PROGRAMS or argv[:1] == ["sendmail"]:
        from mailwatchd.submission import sendmail

        name, rest = (program, argv) if program in SENDMAIL_PROGRAMS else ("sendmail", argv[1:])
        try:
            request = sendmail.parse_command_line(rest, program=name)
        except sendmail.UsageError:
            request = None
        if request is not None and request.mode == sendmail.Mode.SUBMIT:
            try:
                status = sendmail.run(request, sys.stdin.buffer)
            except (Exception, KeyboardInterrupt) as exc:
                status = _as_cli_reports(exc)
            _exit_now(status)
    from mailwatchd.cli import main as cli_main

    return cli_main()


def _as_cli_reports(error: BaseException) -> int:
    """The exit status, and the sentence on stderr, that cli.py gives `error` (or `error` raised again)."""
    from mailwatchd.cli import _guarded

    def fail() -> int:
        raise error

    return _guarded(fail)


def _exit_now(status: int) -> NoReturn:
    """As cli._exit_now: end the process without the interpreter's teardown, which frees every module
    one by one. The message is fsynced by now; only stdout and stderr may hold output still."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: as Python's own exit does
            status = status or 120
    os._exit(status)


if __name__ == "__main__":
    raise SystemExit(main())
