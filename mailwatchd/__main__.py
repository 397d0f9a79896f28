"""The `mailwatchd` command's entry point (the console script and `python -m mailwatchd`).

`sendmail -t` runs once per message, so the one common case, a message to queue under a sendmail
name (`sendmail`, `mailq`, `newaliases` as links to the command, or `mailwatchd sendmail`), is
carried out here without loading cli.py, the rest of the program's command line. Everything else,
a bad sendmail command line and the sendmail modes that are not a submission included, is cli.py's.
"""

from __future__ import annotations

import os
import sys

from mailwatchd.programs import SENDMAIL_PROGRAMS, exit_now


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
            exit_now(status)
    from mailwatchd.cli import main as cli_main

    return cli_main()


def _as_cli_reports(error: BaseException) -> int:
    """The exit status, and the sentence on stderr, that cli.py gives `error` (or `error` raised again)."""
    from mailwatchd.cli import _guarded

    def fail() -> int:
        raise error

    return _guarded(fail)


if __name__ == "__main__":
    raise SystemExit(main())
