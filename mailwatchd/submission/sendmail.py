"""`sendmail` as Debian's callers run it: the command line (modes, flags, program names) and a
submission that exits 0 only once the message is durably in a spool the daemon drains.

Two ways in, in this order: the spool's new/ directly (root, the daemon's user, members of
mailwatchd-submit), else the daemon's submit socket, SMTP on a Unix socket that systemd holds
open even while the daemon restarts (what a setgid postdrop is to Postfix). No way in: exit 75,
never a silent loss.

Kept light on purpose: `sendmail -t` is run once per message, so only what a submission needs
is imported (and read of the settings), and the socket client (submitsocket.py) only when the
spool is not writable. Not even typing, enum or pathlib: tests/test_imports.py holds the list.
"""

from __future__ import annotations

import errno
import os
import sys

from mailwatchd import exitcodes
from mailwatchd.errors import MalformedMessage, NotQueued, SpoolFull
from mailwatchd.records import NamedTuple
from mailwatchd.settings.environment import SubmitterSettings, load_submitter_settings
from mailwatchd.submission.submit import Submission, enqueue, parse_sendmail_args, prepare, read_message

TYPE_CHECKING = False  # mypy takes it as true; typing itself is not imported (records.py)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import BinaryIO, Final, Literal

    from mailwatchd.settings.config import Settings

    ModeName = Literal["-bm", "-bp", "-q", "-bi", "-bs", "--help"]

# Errors that mean "this user cannot write there": the daemon's socket is the way in. Any other
# error (EIO after the rename, say) is reported as it is: retrying could queue the message twice.
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT})

USAGE = """\
usage: sendmail [--config FILE] [OPTION...] [--] [RECIPIENT...] < MESSAGE
       mailwatchd sendmail ...     mailq (sendmail -bp)     newaliases (sendmail -bi)

Queues the message on standard input for the mailwatchd daemon, in its spool when this user may
write there, else through the daemon's submit socket. Prints nothing on success.

Modes (the last one given counts):
  -bm                queue a message (the default)
  -bp                list the queue (as mailq, or mailwatchd queue)
  -q, -q30m, -qR...  retry deferred messages now (as mailwatchd flush); intervals and filters
                     are ignored: the daemon runs its queue itself
  -bi, -I            nothing to rebuild (as newaliases): the daemon reads MAILWATCHD_ALIASES
                     when it starts and on reload
  -bs                an SMTP session on standard input and output
  --help             this text

Options:
  -t                 recipients from the To, Cc and Bcc fields (recipient arguments are added);
                     bundles such as -ti work
  -i, -oi            a line holding a lone "." does not end the message
  -f ADDR, -r ADDR   envelope sender; -f '<>' is the null sender
  -F NAME            the full name in an added From: field
  --config FILE, -c FILE
                     settings file, as first argument only (default: $MAILWATCHD_CONFIG)
  --                 every argument after it is a recipient

Accepted and ignored:
  -o... (-oem, -odb), -e... (-em), -B TYPE (-B8BITMIME), -O OPTION=VALUE, -N DSN, -R RET,
  -V ENVID, -X LOGFILE, -L TAG, -p PROTOCOL, -h HOPS, -v, -m, -n, -U, -G

Environment: MAILWATCHD_CONFIG, MAILWATCHD_SPOOL, MAILWATCHD_SUBMIT_SOCKET (default
/run/mailwatchd/submit.sock).
Exit status: 0 queued; 64 bad command line; 65 the message or an address was refused;
75 not queued now, nothing was kept: send it again later; 78 bad settings.
"""

NEWALIASES_NOTE = ("mailwatchd: nothing to rebuild: the daemon reads the aliases file named by MAILWATCHD_ALIASES "
                   "when it starts and on reload (systemctl reload mailwatchd)")


class Mode:
    """What a command line asks for, named by its sendmail flag (plain strings: the enum module costs each
    `sendmail` run more than this whole module)."""

    SUBMIT: Final = "-bm"
    LIST_QUEUE: Final = "-bp"
    FLUSH: Final = "-q"
    NEWALIASES: Final = "-bi"
    SMTP_STDIO: Final = "-bs"
    HELP: Final = "--help"


class Request(NamedTuple):
    """What a sendmail command line asks for; `submission` is set in SUBMIT mode only."""

    mode: ModeName
    config: str | None = None  # --config FILE, as given
    submission: Submission | None = None


class UsageError(ValueError):
    """The command line is wrong: exit 64 with this one-line message."""


# Option letters that take a value, attached (-fme@x) or as the next argument (-f me@x), as getopt does.
_TAKES_VALUE = frozenset("frFbBONRVXLph")
_SUBMISSION_LETTERS = frozenset("frF")  # handed to submit.parse_sendmail_args
_IGNORED_WITH_VALUE = frozenset("BONRVXLph")
_IGNORED_ANY_SUFFIX = frozenset("oe")  # -oem, -odb, -em: sendmail's -o and -e options
_IGNORED_FLAGS = frozenset("vmnUG")
_MODE_OF_B: dict[str, ModeName] = {"m": Mode.SUBMIT, "p": Mode.LIST_QUEUE, "i": Mode.NEWALIASES,
                                   "s": Mode.SMTP_STDIO}
_MODE_OF_PROGRAM: dict[str, ModeName] = {"mailq": Mode.LIST_QUEUE, "newaliases": Mode.NEWALIASES}


def parse_command_line(argv: Sequence[str], *, program: str = "sendmail") -> Request:
    """Parse a sendmail(8) command line run as `program` (sendmail, mailq, newaliases). UsageError if wrong."""
    args = list(argv)
    config: str | None = None
    if args[:1] in (["--config"], ["-c"]):
        if len(args) < 2:
            raise UsageError(f"option {args[0]} needs a file")
        config, args = args[1], args[2:]
    elif args and args[0].startswith("--config="):
        config, args = args[0].removeprefix("--config="), args[1:]
    mode: ModeName = _MODE_OF_PROGRAM.get(program, Mode.SUBMIT)
    kept: list[str] = []  # the submission's arguments, for parse_sendmail_args
    recipients = False
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--help":
            return Request(Mode.HELP, config)
        if arg == "--":
            recipients = recipients or index < len(args)
            kept.extend(args[index - 1:])
            break
        if not arg.startswith("-") or arg == "-":
            recipients = True
            kept.append(arg)
            continue
        letter, value = arg[1], arg[2:]
        if letter in _TAKES_VALUE and not value:
            if index >= len(args):
                raise UsageError(f"option {arg} needs a value")
            value = args[index]
            index += 1
        if set(arg[1:]) <= {"t", "i"}:
            kept.append(arg)
        elif letter in _SUBMISSION_LETTERS:
            kept.extend((f"-{letter}", value))
        elif letter == "b" and value in _MODE_OF_B:
            mode = _MODE_OF_B[value]
        elif letter == "b":
            raise UsageError(f"mode -b{value} is not supported by mailwatchd's sendmail")
        elif letter == "q":
            mode = Mode.FLUSH
        elif arg == "-I":
            mode = Mode.NEWALIASES
        elif arg == "-oi":
            kept.append(arg)
        elif letter in _IGNORED_WITH_VALUE or letter in _IGNORED_ANY_SUFFIX or arg[1:] in _IGNORED_FLAGS:
            pass
        else:
            raise UsageError(f"unknown option {arg}")
    if mode != Mode.SUBMIT:
        if recipients:
            raise UsageError(f"recipients given with {mode}: only -bm (the default) queues mail")
        return Request(mode, config)
    try:
        submission = parse_sendmail_args(kept)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not submission.from_headers and not submission.recipients:
        raise UsageError("no recipients given (pass addresses, or -t to read them from the headers)")
    return Request(Mode.SUBMIT, config, submission)


def run(request: Request, stdin: BinaryIO) -> int:
    """Carry out a SUBMIT, SMTP_STDIO, NEWALIASES or HELP request (cli.py runs the queue commands)."""
    if request.mode == Mode.HELP:
        sys.stdout.write(USAGE)
        return exitcodes.OK
    if request.mode == Mode.NEWALIASES:
        print(NEWALIASES_NOTE)
        return exitcodes.OK
    # A bad setting: ConfigError, exit 78, before reading anything.
    if request.mode == Mode.SMTP_STDIO:
        from mailwatchd.settings.config import load_settings

        return run_bs(load_settings(request.config))
    if request.mode != Mode.SUBMIT or request.submission is None:
        raise ValueError(f"run() does not carry out {request.mode}")
    settings = load_submitter_settings(request.config)  # what it reads only: the daemon checks the rest
    try:
        data = prepare_message(settings, request.submission, stdin)
        queue_message(settings, data)
    except NotQueued as exc:
        return fail(exc.message, exc.status)
    return exitcodes.OK


def fail(message: str, status: int) -> int:
    print(f"mailwatchd: {message}", file=sys.stderr)
    return status


def prepare_message(settings: Settings | SubmitterSettings, submission: Submission, stdin: BinaryIO) -> bytes:
    """Read the message and complete it for the spool; NotQueued(65) when it cannot be sent."""
    raw = read_message(stdin, submission.dot_ends_input)
    if len(raw) > settings.max_message_size:
        raise NotQueued(exitcodes.DATAERR,
                        f"message too large ({len(raw)} bytes; limit {settings.max_message_size})")
    try:
        return prepare(raw, submission)
    except MalformedMessage as exc:
        raise NotQueued(exitcodes.DATAERR, f"malformed message: {exc}") from None


def queue_message(settings: Settings | SubmitterSettings, data: bytes) -> str | None:
    """Queue `data` durably: in the spool when writable, else through the daemon's socket.

    Returns the queue id when known; NotQueued when the message is not queued.
    """
    spool = settings.spool_dir if isinstance(settings, SubmitterSettings) else os.fspath(settings.spool)
    try:
        return enqueue(spool, data)
    except SpoolFull as exc:
        raise NotQueued(exitcodes.TEMPFAIL, f"the spool cannot take the message now: {exc}") from None
    except OSError as exc:
        if exc.errno not in _NOT_WRITABLE:
            raise NotQueued(exitcodes.CANTCREAT, f"cannot write to the spool {settings.spool}: {exc}") from None
        spool_problem = f"cannot write to {settings.spool / 'new'} ({exc.strerror})"
    from mailwatchd.message import envelope
    from mailwatchd.submission.submitsocket import submit_over_socket, submit_socket

    try:
        message = envelope.parse("submit", data)
    except MalformedMessage as exc:  # prepare() parsed it already
        raise NotQueued(exitcodes.DATAERR, f"malformed message: {exc}") from None
    return submit_over_socket(submit_socket(), message, helo=settings.ehlo_name, spool_problem=spool_problem)


def run_bs(settings: Settings) -> int:
    """`sendmail -bs`: one SMTP session on standard input and output (Symfony Mailer's default).

    The very session the daemon's listener runs: served here when the caller may write to the
    spool, else relayed byte for byte to the daemon's submit socket, which serves it."""
    if not os.access(settings.spool / "new", os.W_OK | os.X_OK):
        from mailwatchd.submission.submitsocket import relay_stdio, submit_socket

        try:
            return relay_stdio(submit_socket(), settings.spool)
        except NotQueued as exc:
            return fail(exc.message, exc.status)
    import asyncio

    from mailwatchd.service.daemon import LISTEN_COMMAND_TIMEOUT_S
    from mailwatchd.submission.listener import serve_stdio
    from mailwatchd.submission.smtpserver import ServerFactory

    factory = ServerFactory(spool_root=settings.spool, listen=settings.listen, hostname=settings.ehlo_name,
                            max_message_size=settings.max_message_size, command_timeout=LISTEN_COMMAND_TIMEOUT_S,
                            via="sendmail -bs")
    return asyncio.run(serve_stdio(factory))
