"""Exit statuses from sysexits(3), the convention sendmail-compatible tools share."""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs each `sendmail` run more than the rest (records.py); mypy takes this as true
if TYPE_CHECKING:
    from typing import Final

OK: Final = 0
USAGE: Final = 64  # EX_USAGE: bad command line
DATAERR: Final = 65  # EX_DATAERR: malformed message
NOINPUT: Final = 66  # EX_NOINPUT: named input (message, queue id) does not exist
UNAVAILABLE: Final = 69  # EX_UNAVAILABLE: daemon not running / service unavailable
SOFTWARE: Final = 70  # EX_SOFTWARE: internal error
OSERR: Final = 71  # EX_OSERR: system error (cannot fork, cannot lock)
CANTCREAT: Final = 73  # EX_CANTCREAT: cannot create a spool directory or file
IOERR: Final = 74  # EX_IOERR
TEMPFAIL: Final = 75  # EX_TEMPFAIL: spool cannot take the message now (disk full)
NOPERM: Final = 77  # EX_NOPERM
CONFIG: Final = 78  # EX_CONFIG: bad or contradictory configuration
