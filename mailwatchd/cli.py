"""The `mailwatchd` command: a thin face over the spool and the daemon.

Installed as `sendmail` (a symlink named sendmail), it behaves as `mailwatchd sendmail`; as
`mailq` and `newaliases`, as `sendmail -bp` and `sendmail -bi` (sendmail.py). Those names are
dispatched before argparse and the rest are imported: `sendmail -t` runs once per message.
Exit statuses follow sysexits(3): see exitcodes.py and the README.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NoReturn

from mailwatchd import __version__, exitcodes
from mailwatchd.errors import ConfigError, NotQueued

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    from mailwatchd.settings.config import Settings

# The names (argv[0]) under which the program is sendmail.py's: sendmail, mailq (-bp), newaliases (-bi).
SENDMAIL_PROGRAMS = frozenset({"sendmail", "sendmail.mailwatchd", "mailq", "newaliases"})


def _fail(message: str, code: int) -> int:
    print(f"mailwatchd: {message}", file=sys.stderr)
    return code


def _settings(args: argparse.Namespace) -> Settings:
    from mailwatchd.settings.config import load_settings

    return load_settings(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)  # a bad setting exits 78 before anything else is loaded
    from mailwatchd.service import logs
    from mailwatchd.service.daemon import run_daemon

    logs.configure(settings.log_format, settings.log_level)
    return run_daemon(settings)


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Queue a message as sendmail does and print its queue id (via the daemon's socket: the one its reply names)."""
    from mailwatchd.submission.sendmail import prepare_message, queue_message
    from mailwatchd.submission.submit import Submission

    settings = _settings(args)
    submission = Submission(sender=args.sender, recipients=tuple(args.recipients), dot_ends_input=False)
    try:
        queue_id = queue_message(settings, prepare_message(settings, submission, sys.stdin.buffer))
    except NotQueued as exc:
        return _fail(exc.message, exc.status)
    if queue_id is not None and not args.quiet:
        print(queue_id)
    return exitcodes.OK


def cmd_sendmail(args: argparse.Namespace) -> int:
    """`mailwatchd --config FILE sendmail ARGS`: main() runs the other spellings without argparse."""
    config = [] if args.config is None else ["--config", str(args.config)]
    return _run_sendmail("sendmail", [*config, *args.sendmail_args])


def _run_sendmail(program: str, argv: list[str]) -> int:
    """sendmail, mailq and newaliases: sendmail.py parses and submits; the queue commands are ours."""
    from mailwatchd.submission import sendmail

    try:
        request = sendmail.parse_command_line(argv, program=program)
    except sendmail.UsageError as exc:
        return _fail(f"{exc} (see sendmail --help)", exitcodes.USAGE)
    if request.mode in (sendmail.Mode.LIST_QUEUE, sendmail.Mode.FLUSH):
        import argparse

        args = argparse.Namespace(config=request.config, json=False)
        return cmd_queue(args) if request.mode is sendmail.Mode.LIST_QUEUE else cmd_flush(args)
    return sendmail.run(request, sys.stdin.buffer)


def cmd_queue(args: argparse.Namespace) -> int:
    import json

    from mailwatchd.spool.queueview import list_entries, render_table
    from mailwatchd.spool.store import Spool

    settings = _settings(args)
    entries = list_entries(Spool(settings.spool, max_message_size=settings.max_message_size))
    if args.json:
        print(json.dumps({"spool": str(settings.spool), "messages": entries}, indent=2))
    else:
        print(render_table(entries))
    return exitcodes.OK


def cmd_flush(args: argparse.Namespace) -> int:
    import signal
    import time

    from mailwatchd.spool.store import Location, Spool

    settings = _settings(args)
    spool = Spool(settings.spool)
    pid = spool.running_pid()
    if pid is not None:
        try:
            os.kill(pid, signal.SIGUSR1)
        except PermissionError:
            return _fail(f"not allowed to signal the daemon (pid {pid}); run as its user or root", exitcodes.NOPERM)
        except ProcessLookupError:
            return _fail("the daemon is not running", exitcodes.UNAVAILABLE)
        print(f"flush requested from the daemon (pid {pid})")
        return exitcodes.OK
    count = 0
    for queue_id in spool.names(Location.DEFERRED):
        state = spool.load_state(queue_id)
        if state is not None:
            state.next_attempt_at = time.time()
            spool.write_state(state)
            count += 1
    print(f"no daemon is running; {count} deferred message(s) will be tried as soon as it starts")
    return exitcodes.OK


def cmd_requeue(args: argparse.Namespace) -> int:
    from mailwatchd.spool.store import Location, Spool

    settings = _settings(args)
    spool = Spool(settings.spool)
    ids = spool.names(Location.FAILED) if args.failed else args.ids
    if not ids:
        return _fail("nothing to requeue (give queue ids, or --failed)", exitcodes.USAGE if not args.failed else 0)
    missing = [queue_id for queue_id in ids if not _valid(queue_id) or not spool.requeue(queue_id)]
    for queue_id in ids:
        if queue_id not in missing:
            print(f"requeued {queue_id}")
    if missing:
        return _fail(f"not found among failed or deferred messages: {', '.join(missing)}", exitcodes.NOINPUT)
    return exitcodes.OK


def cmd_delete(args: argparse.Namespace) -> int:
    from mailwatchd.spool.store import Spool

    settings = _settings(args)
    spool = Spool(settings.spool)
    missing = [queue_id for queue_id in args.ids if not _valid(queue_id) or not spool.delete(queue_id)]
    for queue_id in args.ids:
        if queue_id not in missing:
            print(f"deleted {queue_id}")
    if missing:
        return _fail(f"no such message: {', '.join(missing)}", exitcodes.NOINPUT)
    return exitcodes.OK


def _valid(queue_id: str) -> bool:
    from mailwatchd.spool.queueid import is_queue_id

    return is_queue_id(queue_id)


def cmd_check(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from mailwatchd.relays.diagnosis import run_check

    settings = _settings(args)
    if args.send_from is not None and args.send_test is None:
        return _fail("--from goes with --send-test ADDRESS", exitcodes.USAGE)
    try:
        report = asyncio.run(run_check(settings, send_test_to=args.send_test, send_test_from=args.send_from))
    except ValueError as exc:  # an address that is not one
        return _fail(str(exc), exitcodes.USAGE)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(report.render_text())
    return int(report.exit_code)


def cmd_status(args: argparse.Namespace) -> int:
    import json
    import time

    from mailwatchd.service.statusfile import read_status, status_line
    from mailwatchd.spool.store import Spool

    settings = _settings(args)
    spool = Spool(settings.spool)
    pid = spool.running_pid()
    status = read_status(settings.status_path)
    running = pid is not None and status is not None and status.get("pid") == pid
    if args.json:
        print(json.dumps({"running": running, "pid": pid, "status": status if running else None}, indent=2))
    elif not running:
        print(f"mailwatchd is not running on {settings.spool}")
    else:
        assert status is not None
        age = time.time() - status["updated_at"]
        print(f"mailwatchd running (pid {pid}), status updated {age:.0f}s ago")
        print(status_line(status))
        for relay in status["relays"]:
            for endpoint in relay["endpoints"]:
                state = {True: "up", False: "DOWN", None: "unknown"}[endpoint["up"]]
                extra = f" ({endpoint['cause']}: {endpoint['detail']})" if endpoint["up"] is False else ""
                print(f"  {relay['name']:<24} {endpoint['endpoint']:<32} {state}{extra}")
        proc = status.get("process", {})
        if proc:
            print(f"  rss {proc.get('rss_bytes', 0) / 2**20:.1f} MiB, {proc.get('open_fds')} open fds, "
                  f"{proc.get('spool_free_bytes', 0) / 2**30:.1f} GiB free on the spool's filesystem")
    if not running:
        return 3
    assert status is not None
    if not status["healthy"]:
        return 2
    if any(relay["health"] in ("down", "degraded") for relay in status["relays"]):
        return 2 if all(relay["health"] == "down" for relay in status["relays"]) else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS,
                        help="env file with settings (default: $MAILWATCHD_CONFIG; else the environment only)")
    parser = argparse.ArgumentParser(prog="mailwatchd", parents=[common],
                                     description="A crash-safe outbound-mail daemon: spool, relays, probes.")
    parser.add_argument("--version", action="version", version=f"mailwatchd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[common], help="run the daemon in the foreground").set_defaults(func=cmd_run)
    p = sub.add_parser("check", parents=[common], help="probe every relay and diagnose problems")
    p.add_argument("--json", action="store_true")
    p.add_argument("--send-test", metavar="ADDRESS", help="also send a test message through the first healthy relay")
    p.add_argument("--from", dest="send_from", metavar="ADDRESS",
                   help="the test message's sender (default: the relay's login if it is an address, else "
                        "mailwatchd@<mail domain>); use an identity the relay accepts")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("status", parents=[common], help="the running daemon's health")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("enqueue", parents=[common], help="queue a message read from standard input")
    p.add_argument("-f", "--from", dest="sender", help="envelope sender (default: from the headers)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the queue id")
    p.add_argument("recipients", nargs="*", help="envelope recipients (default: To, Cc, Bcc)")
    p.set_defaults(func=cmd_enqueue)
    p = sub.add_parser("sendmail", parents=[common], help="sendmail-compatible submission (-t, -i, -f, -F)",
                       prefix_chars="+")
    p.add_argument("sendmail_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_sendmail, quiet=True)
    p = sub.add_parser("queue", parents=[common], help="list waiting, deferred and failed messages")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue)
    sub.add_parser("flush", parents=[common], help="retry every deferred message now").set_defaults(func=cmd_flush)
    p = sub.add_parser("requeue", parents=[common], help="give failed (or deferred) messages a fresh start")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--failed", action="store_true", help="requeue every failed message")
    p.set_defaults(func=cmd_requeue)
    p = sub.add_parser("delete", parents=[common], help="remove messages from the spool")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_delete)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    standalone = argv is None  # the process's own command line, not a caller's list
    program = os.path.basename(sys.argv[0]) if argv is None else "mailwatchd"
    argv = list(sys.argv[1:] if argv is None else argv)
    if program in SENDMAIL_PROGRAMS or argv[:1] == ["sendmail"]:
        name, rest = (program, argv) if program in SENDMAIL_PROGRAMS else ("sendmail", argv[1:])
        status = _guarded(lambda: _run_sendmail(name, rest))
        if standalone:
            _exit_now(status)
        return status
    args = build_parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    return _guarded(lambda: int(args.func(args)))


def _exit_now(status: int) -> NoReturn:
    """End the process without the interpreter's teardown, which frees every module one by one:
    a sixth of a `sendmail -t` run. The message is fsynced by now; only stdout and stderr may
    hold output still, and they are flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`mailq | head -1`): as Python's own exit does
            status = status or 120
    os._exit(status)


def _guarded(command: Callable[[], int]) -> int:
    """Run a command; the errors every command may meet become a sentence and an exit status."""
    try:
        return command()
    except ConfigError as exc:
        print(f"mailwatchd: configuration error: {exc.key}: {exc.problem}\n"
              f"mailwatchd: fix: {exc.fix}", file=sys.stderr)
        return exitcodes.CONFIG
    except PermissionError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"permission denied{where}: the spool's state is readable by root and the mailwatchd "
                     "user only; run this command as one of them", exitcodes.NOPERM)
    except KeyboardInterrupt:
        return 130
