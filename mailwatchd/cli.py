"""The `mailwatchd` command: a thin face over the spool and the daemon.

Installed as `sendmail` (a symlink named sendmail), it behaves as `mailwatchd sendmail`; as
`mailq` and `newaliases`, as `sendmail -bp` and `sendmail -bi` (sendmail.py). Those names are
dispatched before argparse and the rest are imported: `sendmail -t` runs once per message.
Exit statuses follow sysexits(3): see exitcodes.py and the README.
"""

from __future__ import annotations

import os
import sys

from mailwatchd import __version__, exitcodes
from mailwatchd.errors import ConfigError, NotQueued
from mailwatchd.programs import SENDMAIL_PROGRAMS, exit_now

TYPE_CHECKING = False  # mypy takes it as true; `sendmail -t` does without typing (tests/test_imports.py)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    from mailwatchd.service import verdict
    from mailwatchd.service.statusfile import Status
    from mailwatchd.settings.config import Settings

# The commands that are monitoring plugins (exit 0-3, bad options included).
PLUGIN_COMMANDS = frozenset({"check", "status"})
DEFAULT_CHECK_TIMEOUT_S = 8.0


def _fail(message: str, code: int) -> int:
    print(f"mailwatchd: {message}", file=sys.stderr)
    return code


def _settings(args: argparse.Namespace, *, missing_file_ok: bool = True) -> Settings:
    """The settings the service sees: --config, else $MAILWATCHD_CONFIG, else the service's env file if
    there is one. `missing_file_ok`: a default env file this user may not read is skipped (a submitter's
    `enqueue`, a monitoring user's `status`); `check` needs it (the relay's credentials)."""
    from mailwatchd.settings.config import load_settings
    from mailwatchd.settings.environment import SERVICE_CONFIG

    if args.config is not None or os.environ.get("MAILWATCHD_CONFIG"):
        return load_settings(args.config)
    try:
        SERVICE_CONFIG.stat()
    except FileNotFoundError:
        return load_settings(None)
    except PermissionError:  # /etc/mailwatchd is 0750 root:mailwatchd
        if missing_file_ok:
            return load_settings(None)
        raise PermissionError(13, "Permission denied", str(SERVICE_CONFIG)) from None
    if missing_file_ok and not os.access(SERVICE_CONFIG, os.R_OK):
        return load_settings(None)
    return load_settings(SERVICE_CONFIG)


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

    from mailwatchd.spool.queueview import daemon_view, list_entries, render_table
    from mailwatchd.spool.store import Spool

    settings = _settings(args)
    spool = Spool(settings.spool, max_message_size=settings.max_message_size)
    daemon = daemon_view(spool, settings.status_path)
    entries = list_entries(spool, daemon)
    if args.json:
        print(json.dumps({"spool": str(settings.spool), "daemon_pid": daemon.pid, "messages": entries}, indent=2))
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
    """A fresh start for failed or deferred messages (attempts, lifetime, reason cleared); any listed
    message is accepted, and one already waiting (new, queued) is left as it is."""
    from mailwatchd.spool.store import Location, Requeue, Spool

    settings = _settings(args)
    spool = Spool(settings.spool)
    ids = spool.names(Location.FAILED) if args.failed else args.ids
    if not ids:
        return _fail("nothing to requeue (give queue ids, or --failed)", exitcodes.USAGE if not args.failed else 0)
    running = spool.running_pid() is not None
    missing, requeued = [], 0
    for queue_id in ids:
        was = spool.locate(queue_id)
        done = spool.requeue(queue_id)
        if done is None:
            missing.append(queue_id)
        elif done is Requeue.ALREADY_WAITING:
            print(f"{queue_id} is already waiting ({'new' if was == 'new' else 'queued'}): nothing to do")
        else:
            requeued += 1
            print(f"requeued {queue_id} (was {was or 'failed'})")
    if requeued and not running:
        print("no daemon is running: requeued messages are sent when it starts")
    if missing:
        return _fail(f"no such message: {', '.join(missing)}", exitcodes.NOINPUT)
    return exitcodes.OK


def cmd_delete(args: argparse.Namespace) -> int:
    """Remove messages in any state, by queue id (or a drop in new/ by the name `queue` lists)."""
    from mailwatchd.spool.store import Location, Spool

    settings = _settings(args)
    spool = Spool(settings.spool)
    running = spool.running_pid() is not None
    missing, in_reach = [], []
    for name in args.ids:
        where = spool.delete(name)
        if where is None:
            missing.append(name)
            continue
        print(f"deleted {name} (was {where})")
        if where in (Location.QUEUE.value, Location.DEFERRED.value):
            in_reach.append(name)
    if running and in_reach:
        print("the daemon is running: an attempt it had already begun on one of these still ends (if the relay "
              "accepts the message, it is sent); none is tried again")
    if missing:
        hint = " (a drop the daemon claimed meanwhile has a queue id now: see `mailwatchd queue`)" if running else ""
        return _fail(f"no such message: {', '.join(missing)}{hint}", exitcodes.NOINPUT)
    return exitcodes.OK


def cmd_ack(args: argparse.Namespace) -> int:
    """Acknowledge failed messages: they stay in failed/ for inspection but no longer count toward
    `status` and `check`. Without ids: every message in failed/ now."""
    from mailwatchd.spool.store import Spool

    settings = _settings(args)
    done, missing = Spool(settings.spool).acknowledge(args.ids or None)
    for queue_id in done:
        print(f"acknowledged {queue_id}")
    if done:
        print(f"{len(done)} failed message(s) acknowledged: they stay in failed/ (see `mailwatchd queue`) and no "
              "longer count toward status and check; requeue or delete them when done")
    elif not args.ids:
        print("no failed messages to acknowledge")
    if missing:
        return _fail(f"not among the failed messages: {', '.join(missing)}", exitcodes.NOINPUT)
    return exitcodes.OK


def cmd_check(args: argparse.Namespace) -> int:
    """Probe every relay; print a monitoring-plugin verdict (exit 0-3) within --timeout."""
    import asyncio
    import dataclasses
    import json

    from mailwatchd.relays.diagnosis import run_check
    from mailwatchd.service import verdict

    if args.send_from is not None and args.send_test is None:
        return _plugin_unknown("--from goes with --send-test ADDRESS", args)
    try:
        settings = _settings(args, missing_file_ok=False)
    except ConfigError as exc:
        return _plugin_unknown(f"configuration error: {exc.key}: {exc.problem} (fix: {exc.fix})", args)
    except PermissionError as exc:
        return _plugin_unknown(f"cannot read {exc.filename}: run check as root or the mailwatchd user "
                               "(or use `mailwatchd status`, which needs no access to the settings)", args)
    # Every network step fits the whole-run deadline, so a silent relay is reported as such, in time.
    budget = max(args.timeout - 1.0, 0.5)
    quick = dataclasses.replace(settings, connect_timeout=min(settings.connect_timeout, budget / 2),
                                command_timeout=min(settings.command_timeout, budget / 2),
                                transaction_timeout=min(settings.transaction_timeout, budget))
    try:
        report = asyncio.run(asyncio.wait_for(
            run_check(quick, send_test_to=args.send_test, send_test_from=args.send_from), args.timeout))
    except ValueError as exc:  # an address that is not one
        return _plugin_unknown(str(exc), args)
    except TimeoutError:
        return _plugin_unknown(f"check did not finish within --timeout {args.timeout:g}s", args)
    daemon = _daemon_verdict(settings)
    result = verdict.judge_check(report, daemon[0] if daemon else None, system=_is_system(settings))
    if args.json:
        print(json.dumps({"state": result.state.name, "summary": result.summary(), **report.to_json()},
                         indent=2, default=str))
    else:
        result.details = ["", report.render_text()]
        print(result.render())
    return int(result.state)


def _is_system(settings: Settings) -> bool:
    from mailwatchd.settings.environment import SERVICE_SPOOL

    return settings.spool == SERVICE_SPOOL


def _daemon_verdict(settings: Settings) -> tuple[verdict.PluginResult, Status] | None:
    """The running daemon's verdict from its status file; None when there is no status file."""
    from mailwatchd.service import verdict
    from mailwatchd.service.statusfile import read_status

    status = read_status(settings.status_path)
    if status is None:
        return None
    return verdict.judge_status(status, pid_alive=_alive(status["pid"])), status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process (the service's user): it exists
        return True
    return True


def _plugin_unknown(text: str, args: argparse.Namespace) -> int:
    """A monitoring-plugin UNKNOWN (exit 3): bad options, unreadable settings, no answer in time."""
    from mailwatchd.service import verdict

    result = verdict.unknown(text)
    if getattr(args, "json", False):
        import json

        print(json.dumps({"state": result.state.name, "summary": result.summary()}, indent=2))
    else:
        print(result.render())
    return int(result.state)


def cmd_status(args: argparse.Namespace) -> int:
    """The running daemon's health from its status file, as a monitoring plugin (exit 0-3).

    Needs no access to the spool or the settings: a monitoring user reads the status file
    (0644, in the service's runtime directory) and the thresholds the daemon wrote there."""
    import json

    from mailwatchd.service import verdict
    from mailwatchd.settings.config import load_settings

    broken: ConfigError | None = None
    try:
        settings = _settings(args)
    except ConfigError as exc:  # the daemon runs on what it loaded before: report both
        broken, settings = exc, load_settings(None)
    judged = _daemon_verdict(settings)
    result, status = judged if judged else (verdict.judge_status(None, pid_alive=False), None)
    if broken is not None:
        result.add(verdict.State.WARNING, f"the settings do not validate, a restart would fail: {broken.key}: "
                                          f"{broken.problem} (fix: {broken.fix})", "config")
    running = status is not None and _alive(status["pid"])
    if args.json:
        print(json.dumps({"state": result.state.name, "summary": result.summary(), "running": running,
                          "pid": status["pid"] if status and running else None,
                          "status": status if running else None}, indent=2))
        return int(result.state)
    if status is None or not running:
        result.details = [f"(no running daemon's status at {settings.status_path})"]
    else:
        result.details = _status_details(status)
    print(result.render())
    return int(result.state)


def _status_details(status: Status) -> list[str]:
    import time

    from mailwatchd.service.statusfile import status_line

    lines = [f"pid {status['pid']}, status updated {time.time() - status['updated_at']:.0f}s ago",
             status_line(status)]
    for relay in status["relays"]:
        for endpoint in relay["endpoints"]:
            state = {True: "up", False: "DOWN", None: "unknown"}[endpoint["up"]]
            extra = f" ({endpoint['cause']}: {endpoint['detail']})" if endpoint["up"] is False else ""
            lines.append(f"  {relay['name']:<24} {endpoint['endpoint']:<32} {state}{extra}")
    proc = status.get("process", {})
    if proc:
        lines.append(f"  rss {proc.get('rss_bytes', 0) / 2**20:.1f} MiB, {proc.get('open_fds')} open fds, "
                     f"{proc.get('spool_free_bytes', 0) / 2**30:.1f} GiB free on the spool's filesystem")
    return lines


def _seconds(raw: str) -> float:
    import argparse

    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{raw!r} is out of range (0-3600 seconds)")
    return value


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate the settings exactly as `run` and a reload do, credentials included; no spool, no network.
    `--reload PID` (the unit's ExecReload=): look at the files as that daemon does, then signal it to reload
    whatever the verdict: it re-reads the same files, keeps its settings on a bad one and shows the failure
    in its status, while this command's exit fails `systemctl reload`."""
    import signal

    daemon: int | None = None
    try:
        if args.reload is not None:
            try:
                daemon = os.pidfd_open(args.reload)  # signalled below even if the pid is reused meanwhile
                _see_as_daemon(args.reload)
            except (OSError, ValueError) as exc:
                return _fail(f"cannot see the files as the daemon (pid {args.reload}) does: {exc}", exitcodes.NOPERM)
        settings = _settings(args)  # a ConfigError is printed with its key and fix, exit 78 (_guarded)
    finally:
        if daemon is not None:
            signal.pidfd_send_signal(daemon, signal.SIGHUP)
    relays = [relay.name for relay in settings.relays]
    secrets = len(settings.listen.users) + sum(
        (relay.password is not None) + (relay.oauth is not None and relay.oauth.client_secret is not None)
        + (relay.oauth is not None and relay.oauth.refresh_token is not None) for relay in settings.relays)
    delivery = f"{len(relays)} relay{'s' if len(relays) != 1 else ''} ({', '.join(relays)})" if relays \
        else f"no relay: mail goes to the local outbox {settings.outbox}"
    source = settings.config_path or "the environment only"
    print(f"configuration OK: {delivery}, {secrets} secret{'s' if secrets != 1 else ''} read; from {source}")
    return exitcodes.OK


def _see_as_daemon(pid: int) -> None:
    """Look at the files as the running daemon does: its mount namespace's root (ProtectHome=, PrivateTmp=,
    its credentials) and its user and groups. Needs root: the unit's ExecReload= runs with `+`."""
    from pathlib import Path

    import dotenv  # noqa: F401 - what loading the settings imports, loaded before the root changes

    import mailwatchd.settings.config  # noqa: F401

    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    uid, gid = int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])
    groups = [int(group) for group in fields["Groups"].split()]
    os.chroot(f"/proc/{pid}/root")
    os.chdir("/")
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)


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
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON object (endpoints, steps, causes, hints, notes)")
    p.add_argument("--send-test", metavar="ADDRESS", help="also send a test message through the first healthy relay")
    p.add_argument("--from", dest="send_from", metavar="ADDRESS",
                   help="the test message's sender (default: the relay's login if it is an address, else "
                        "mailwatchd@<mail domain>); use an identity the relay accepts")
    p.add_argument("--timeout", "-t", type=_seconds, default=DEFAULT_CHECK_TIMEOUT_S, metavar="SECONDS",
                   help=f"answer within this time, UNKNOWN if the probes take longer (default "
                        f"{DEFAULT_CHECK_TIMEOUT_S:g}, under NRPE's 10)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("status", parents=[common], help="the running daemon's health (monitoring plugin)")
    p.add_argument("--json", action="store_true", help="print the verdict and the daemon's status as one JSON object")
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
    p.add_argument("--json", action="store_true", help="print the listing as one JSON object")
    p.set_defaults(func=cmd_queue)
    sub.add_parser("flush", parents=[common], help="retry every deferred message now").set_defaults(func=cmd_flush)
    p = sub.add_parser("requeue", parents=[common], help="give failed (or deferred) messages a fresh start")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--failed", action="store_true", help="requeue every failed message")
    p.set_defaults(func=cmd_requeue)
    p = sub.add_parser("delete", parents=[common], help="remove messages from the spool")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_delete)
    p = sub.add_parser("ack", parents=[common],
                       help="acknowledge failed messages (default: all): kept in failed/, no longer warned about")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.set_defaults(func=cmd_ack)
    p = sub.add_parser("validate", parents=[common],
                       help="check the settings as run and a reload would (exit 0, or 78 naming the key and the "
                            "fix); no spool, no network")
    p.add_argument("--reload", type=int, metavar="PID",
                   help="see the files as the running daemon PID does (needs root), then signal it to reload "
                        "whatever the verdict (the unit's ExecReload=)")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    standalone = argv is None  # the process's own command line, not a caller's list
    program = os.path.basename(sys.argv[0]) if argv is None else "mailwatchd"
    argv = list(sys.argv[1:] if argv is None else argv)
    if program in SENDMAIL_PROGRAMS or argv[:1] == ["sendmail"]:
        name, rest = (program, argv) if program in SENDMAIL_PROGRAMS else ("sendmail", argv[1:])
        status = _guarded(lambda: _run_sendmail(name, rest))
        if standalone:
            exit_now(status)
        return status
    plugin = _command_word(argv) in PLUGIN_COMMANDS
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        if not plugin or exc.code in (0, None):
            raise
        # argparse printed the usage error; a monitoring system must see UNKNOWN, not 2 (CRITICAL).
        print("MAILWATCHD UNKNOWN - bad command line (see mailwatchd check --help)")
        return 3
    if not hasattr(args, "config"):
        args.config = None
    if plugin:
        try:
            return int(args.func(args))
        except Exception as exc:  # a monitoring system must get UNKNOWN and a reason, never a traceback
            return _plugin_unknown(f"{type(exc).__name__}: {exc}", args)
    return _guarded(lambda: int(args.func(args)))


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand in argv, skipping the global options and --config's value."""
    words = iter(argv)
    for word in words:
        if word in ("--config", "-c"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


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
        if str(exc.filename or "").startswith("/etc/"):
            return _fail(f"permission denied{where}: the settings are readable by root and the mailwatchd "
                         "group only; run this command as one of them", exitcodes.NOPERM)
        return _fail(f"permission denied{where}: the spool's state is readable by root and the mailwatchd "
                     "user only; run this command as one of them", exitcodes.NOPERM)
    except KeyboardInterrupt:
        return 130
