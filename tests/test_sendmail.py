"""`sendmail`, `mailq` and `newaliases` as Debian's callers run them: real child processes of the
CLI, a real spool, and a real SMTP server on a Unix socket standing in for the daemon's submit
socket when the spool is not writable."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import UnixSocketController
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailwatchd import exitcodes
from mailwatchd.errors import NotQueued
from mailwatchd.message import envelope
from mailwatchd.spool.store import Spool
from mailwatchd.submission.sendmail import Mode, UsageError, parse_command_line
from mailwatchd.submission.submitsocket import submit_over_socket
from tests.conftest import RecordingHandler, SmtpServer
from tests.daemonproc import MAILWATCHD, DaemonProcess, relay_env, run_cli, spool_names

REPO_ROOT = Path(__file__).resolve().parents[1]
PHP_MAIL = (b"From: App <app@example.com>\nTo: ann@example.org\nCc: Bob <bob@example.org>\n"
            b"Bcc: hidden@example.org\nSubject: order 42\n\nline one\n.a line that starts with a dot\n")
CRON_MAIL = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts /etc/cron.hourly\n"
             b"Content-Type: text/plain; charset=UTF-8\n\nthe job's output\n")


# -- the programs and their environment -------------------------------------------------------------


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with `sendmail`, `mailq`, `newaliases` and `mailwatchd`: links to the venv's
    launcher, as an administrator installs them (a script of the same shape if it is not installed)."""
    directory = tmp_path_factory.mktemp("bin")
    launcher = Path(sys.executable).parent / "mailwatchd"
    for name in ("sendmail", "mailq", "newaliases", "mailwatchd"):
        if launcher.is_file():
            (directory / name).symlink_to(launcher)
        else:
            (directory / name).write_text(f"#!{sys.executable}\nimport sys\nfrom mailwatchd.cli import main\n"
                                          "sys.exit(main())\n")
            (directory / name).chmod(0o755)
    return directory


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="mw-") as name:
        yield Path(name)


@pytest.fixture
def env(clean_env: dict[str, str], spool_dir: Path, short_dir: Path) -> dict[str, str]:
    """A writable spool; a submit socket path where nothing is, so no test reaches the host's daemon."""
    return {**clean_env, "MAILWATCHD_SPOOL": str(spool_dir), "MAILWATCHD_SUBMIT_SOCKET": str(short_dir / "none.sock"),
            "PYTHONPATH": str(REPO_ROOT)}


def run(programs: Path, name: str, env: dict[str, str], *args: str, stdin: bytes = b"",
        prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[bytes]:
    """The program called `name` (sendmail, mailq, newaliases) as a real child process."""
    return subprocess.run([*prefix, str(programs / name), *args], env=env, input=stdin, capture_output=True,
                          timeout=60, check=False)


def queued(spool: Path) -> list[bytes]:
    return [(spool / "new" / name).read_bytes() for name in spool_names(spool, "new")["new"]]


def one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    """The single line a failing command printed on stderr (a traceback is not one)."""
    text = done.stderr.decode()
    assert text.startswith("mailwatchd: ") and text.count("\n") == 1, text
    return text


# -- submission into the spool ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["program", "subcommand"])
def test_t_queues_into_the_spool_and_prints_nothing(programs: Path, env: dict[str, str], spool_dir: Path,
                                                    how: str) -> None:
    if how == "program":
        done = run(programs, "sendmail", env, "-t", "-i", stdin=PHP_MAIL)
    else:
        done = run_cli(env, "sendmail", "-t", "-i", stdin=PHP_MAIL)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    (data,) = queued(spool_dir)
    parsed = envelope.parse("Q", data)
    assert (parsed.sender, parsed.recipients) == ("app@example.com",
                                                  ("ann@example.org", "bob@example.org", "hidden@example.org"))
    assert data.endswith(PHP_MAIL)  # Date and Message-ID added in front, nothing else changed


def test_crons_exact_invocation(programs: Path, env: dict[str, str], spool_dir: Path) -> None:
    """Debian's cron: `sendmail -FCronDaemon -i -B8BITMIME -oem root`, bare names in the headers too."""
    done = run(programs, "sendmail", env, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=CRON_MAIL)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    (data,) = queued(spool_dir)
    parsed = envelope.parse("Q", data)
    assert (parsed.sender, parsed.recipients) == ("root", ("root",))
    assert parsed.data.endswith(CRON_MAIL)


def test_every_ignored_option_at_once(programs: Path, env: dict[str, str], spool_dir: Path) -> None:
    done = run(programs, "sendmail", env, "-bm", "-oem", "-odb", "-em", "-B", "7BIT", "-O", "DeliveryMode=b",
               "-N", "never", "-R", "hdrs", "-V", "envid", "-X", "/dev/null", "-L", "tag", "-p", "smtp", "-h", "17",
               "-v", "-m", "-n", "-U", "-G", "-ti", stdin=PHP_MAIL)
    assert (done.returncode, done.stderr) == (0, b"")
    (data,) = queued(spool_dir)
    assert envelope.parse("Q", data).recipients == ("ann@example.org", "bob@example.org", "hidden@example.org")


def test_a_bad_setting_it_reads_exits_78_and_queues_nothing(programs: Path, env: dict[str, str],
                                                           spool_dir: Path) -> None:
    done = run(programs, "sendmail", {**env, "MAILWATCHD_MAX_MESSAGE_SIZE": "lots"}, "-t", stdin=PHP_MAIL)
    assert done.returncode == exitcodes.CONFIG
    assert "MAILWATCHD_MAX_MESSAGE_SIZE" in done.stderr.decode()
    assert queued(spool_dir) == []


def test_a_bad_relay_setting_does_not_stop_a_submission(programs: Path, env: dict[str, str], spool_dir: Path) -> None:
    """sendmail reads only the spool, the size limit and the mail names; the daemon reports the rest."""
    done = run(programs, "sendmail", {**env, "EMAIL_HOST": "smtp.example.com", "EMAIL_PORT": "0"}, "-t",
               stdin=PHP_MAIL)
    assert (done.returncode, done.stderr) == (0, b"")
    assert len(queued(spool_dir)) == 1


def test_enqueue_still_prints_the_queue_id(env: dict[str, str], spool_dir: Path) -> None:
    done = run_cli(env, "enqueue", stdin=PHP_MAIL)
    assert done.returncode == 0, done.stderr
    assert spool_names(spool_dir, "new")["new"] == [done.stdout.decode().strip()]


# -- the other modes and names ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "args"), [("sendmail", ["-bp"]), ("mailq", [])])
def test_bp_and_mailq_list_the_queue(programs: Path, env: dict[str, str], spool_dir: Path, name: str,
                                     args: list[str]) -> None:
    assert run_cli(env, "enqueue", "-q", stdin=PHP_MAIL).returncode == 0
    (queue_id,) = spool_names(spool_dir, "new")["new"]
    done = run(programs, name, env, *args)
    assert (done.returncode, done.stderr) == (0, b"")
    assert queue_id in done.stdout.decode()
    # The same listing as `mailwatchd queue`, but for the age, which may have ticked between the two runs.
    def listing(output: bytes) -> str:
        return re.sub(r"(?<= )\d+[smhd](?= )", "AGE", output.decode())
    assert listing(done.stdout) == listing(run_cli(env, "queue").stdout)


@pytest.mark.parametrize("args", [["-q"], ["-q30m"], ["-qRexample.org"]])
def test_q_asks_the_running_daemon_to_flush(programs: Path, env: dict[str, str], spool_dir: Path,
                                            args: list[str]) -> None:
    """This test process holds the spool's lock as the daemon does, so it is the one signalled."""
    signalled: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: signalled.append(signum))
    spool = Spool(spool_dir)
    spool.acquire_lock()
    try:
        done = run(programs, "sendmail", env, *args)
    finally:
        spool.release_lock()
        signal.signal(signal.SIGUSR1, previous)
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.decode() == f"flush requested from the daemon (pid {os.getpid()})\n"
    assert signalled == [signal.SIGUSR1]


def test_q_without_a_daemon_says_so_as_flush_does(programs: Path, env: dict[str, str]) -> None:
    done = run(programs, "sendmail", env, "-q")
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == run_cli(env, "flush").stdout
    assert b"no daemon is running" in done.stdout


@pytest.mark.parametrize(("name", "args"), [("sendmail", ["-bi"]), ("sendmail", ["-I"]), ("newaliases", [])])
def test_bi_and_newaliases_have_nothing_to_rebuild(programs: Path, env: dict[str, str], spool_dir: Path, name: str,
                                                   args: list[str]) -> None:
    done = run(programs, name, env, *args)
    assert (done.returncode, done.stderr) == (0, b"")
    assert b"nothing to rebuild" in done.stdout and b"MAILWATCHD_ALIASES" in done.stdout
    assert not queued(spool_dir)


# Every flag the help must list, with a command line that uses it (each must queue a message).
ACCEPTED = {
    "-t": ["-t"], "-i": ["-i", "x@example.org"], "-oi": ["-oi", "x@example.org"],
    "-f": ["-f", "a@example.com", "-t"], "-r": ["-ra@example.com", "-t"], "-F": ["-F", "Cron Daemon", "-t"],
    "-bm": ["-bm", "-t"], "--": ["--", "x@example.org"],
}
IGNORED = {
    "-o": ["-oem"], "-e": ["-em"], "-B": ["-B", "8BITMIME"], "-O": ["-O", "DeliveryMode=b"], "-N": ["-N", "never"],
    "-R": ["-R", "hdrs"], "-V": ["-V", "id"], "-X": ["-X", "/dev/null"], "-L": ["-L", "tag"], "-p": ["-p", "smtp"],
    "-h": ["-h", "17"], "-v": ["-v"], "-m": ["-m"], "-n": ["-n"], "-U": ["-U"], "-G": ["-G"],
}
MODES = {"-bp": Mode.LIST_QUEUE, "-q": Mode.FLUSH, "-bi": Mode.NEWALIASES, "-I": Mode.NEWALIASES,
         "-bs": Mode.SMTP_STDIO, "--help": Mode.HELP}


def _mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?!\w)", text) is not None


def test_help_lists_every_flag_accepted_and_every_flag_ignored(programs: Path, env: dict[str, str]) -> None:
    done = run(programs, "sendmail", env, "--help")
    assert (done.returncode, done.stderr) == (0, b"")
    text = done.stdout.decode()
    missing = [flag for flag in [*ACCEPTED, *IGNORED, *MODES, "--config"] if not _mentions(text, flag)]
    assert not missing, f"not in --help: {missing}"
    assert run_cli(env, "sendmail", "--help").stdout == done.stdout


@pytest.mark.parametrize("flag", [*ACCEPTED, *IGNORED])
def test_each_listed_flag_is_accepted(flag: str) -> None:
    request = parse_command_line([*(ACCEPTED | IGNORED)[flag], *(["-t"] if flag in IGNORED else [])])
    assert request.mode is Mode.SUBMIT and request.submission is not None


@pytest.mark.parametrize("flag", list(MODES))
def test_each_mode_flag_selects_its_mode(flag: str) -> None:
    assert parse_command_line([flag]).mode is MODES[flag]


@pytest.mark.parametrize(("args", "words"), [
    (["-Z", "x@example.org"], "unknown option -Z"),
    (["--bogus", "-t"], "unknown option --bogus"),
    (["-tx"], "unknown option -tx"),
    (["-bd"], "mode -bd is not supported"),
    (["-bv", "x@example.org"], "mode -bv is not supported"),
    (["-t", "-f"], "option -f needs a value"),
    (["-h"], "option -h needs a value"),  # sendmail's hop count, not help
    ([], "no recipients given"),
    (["-bp", "x@example.org"], "recipients given with -bp"),
    (["--config"], "option --config needs a file"),
])
def test_bad_command_lines_exit_64_with_one_line(programs: Path, env: dict[str, str], spool_dir: Path,
                                                 args: list[str], words: str) -> None:
    done = run(programs, "sendmail", env, *args, stdin=PHP_MAIL)
    assert done.returncode == exitcodes.USAGE
    assert words in one_line_error(done) and done.stdout == b""
    assert not queued(spool_dir)


def test_mailq_with_a_bad_option_exits_64(programs: Path, env: dict[str, str]) -> None:
    done = run(programs, "mailq", env, "--json")
    assert done.returncode == exitcodes.USAGE and "unknown option --json" in one_line_error(done)


def test_bs_is_an_smtp_session_on_stdin_and_stdout_the_way_symfony_mailer_drives_it(
        programs: Path, env: dict[str, str], spool_dir: Path) -> None:
    """Symfony Mailer's default transport: `sendmail -bs`, one command at a time, each reply read before
    the next command; the message is in the spool when the 250 to the final dot comes."""
    (spool_dir / "tmp").mkdir(exist_ok=True)
    (spool_dir / "new").mkdir(exist_ok=True)
    child = subprocess.Popen([str(programs / "sendmail"), "-bs"], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None

    def reply() -> bytes:
        assert child.stdout is not None
        lines = [child.stdout.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(child.stdout.readline())
        return b"".join(lines)

    def command(line: bytes) -> bytes:
        assert child.stdin is not None
        child.stdin.write(line + b"\r\n")
        child.stdin.flush()
        return reply()

    try:
        assert reply().startswith(b"220 ")
        assert command(b"EHLO symfony.example").startswith(b"250-")
        assert command(b"MAIL FROM:<app@example.org>").startswith(b"250 ")
        assert command(b"RCPT TO:<root>").startswith(b"250 ")
        assert command(b"DATA").startswith(b"354 ")
        done = command(b"From: app@example.org\r\nTo: root\r\nSubject: from symfony\r\n\r\nhello\r\n.")
        assert done.startswith(b"250 2.0.0 Ok: queued as ")
        [stored] = queued(spool_dir)  # durably there before the 250
        assert done.split()[-1].decode() == spool_names(spool_dir, "new")["new"][0]
        assert command(b"QUIT").startswith(b"221 ")
        assert child.wait(10) == 0
    finally:
        child.kill()
    assert b"X-Mailwatchd-Envelope-To: <root>" in stored and b"via sendmail -bs" in stored
    assert b"Subject: from symfony" in stored


def test_bs_without_the_right_to_write_the_spool_and_no_daemon_is_a_temporary_failure(
        programs: Path, env: dict[str, str], tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    done = run(programs, "sendmail", {**env, "MAILWATCHD_SPOOL": str(blocked / "spool")}, "-bs",
               stdin=b"QUIT\r\n")
    assert done.returncode == exitcodes.TEMPFAIL and b"submit socket" in done.stderr


# -- when this user may not write to the spool: the daemon's submit socket --------------------------


@dataclass(frozen=True)
class Unwritable:
    spool: Path
    prefix: tuple[str, ...] = ()  # runs the child as a caller who may not write there


# Root without the capabilities that let it ignore file modes: a caller like any other.
AS_PLAIN_ROOT = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--")


@pytest.fixture(params=["under_a_regular_file", "read_only_directory"])
def unwritable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Unwritable]:
    """A spool the child cannot write to: a path that cannot be created (ENOTDIR, as root too), or
    directories without write permission (EACCES; as root, the child runs without CAP_DAC_OVERRIDE)."""
    if request.param == "under_a_regular_file":
        blocker = tmp_path / "a-file"
        blocker.write_bytes(b"")
        yield Unwritable(blocker / "spool")
        return
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root ignores file modes, and setpriv (util-linux) is not there to drop CAP_DAC_OVERRIDE")
        prefix = AS_PLAIN_ROOT
    spool = tmp_path / "spool"
    for directory in (spool / "tmp", spool / "new"):
        directory.mkdir(parents=True)
        directory.chmod(0o555)
    yield Unwritable(spool, prefix)
    for directory in (spool / "tmp", spool / "new"):
        directory.chmod(0o755)


class TempFail(RecordingHandler):
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "452 4.3.1 Insufficient system storage"


class TooBig(RecordingHandler):
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "552 5.3.4 Message too big"


class NoSuchUser(RecordingHandler):
    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("bob@"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


class NamesTheQueueId(RecordingHandler):
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await super().handle_DATA(server, session, envelope)
        return "250 2.0.0 Ok: queued as 0661A2B3C4D5E6F7A8B9"


@pytest.fixture
def socket_server(short_dir: Path) -> Iterator[Callable[..., Any]]:
    """Start an SMTP server on short_dir/submit.sock: `start(handler)` returns the handler."""
    started: list[UnixSocketController] = []

    def start(handler: Any = None) -> Any:
        handler = handler if handler is not None else RecordingHandler()
        controller = UnixSocketController(handler, unix_socket=short_dir / "submit.sock", hostname="daemon.test")
        controller.start()
        started.append(controller)
        return handler

    yield start
    for controller in started:
        controller.stop()


@pytest.fixture
def socket_env(env: dict[str, str], unwritable: Unwritable, short_dir: Path) -> dict[str, str]:
    return {**env, "MAILWATCHD_SPOOL": str(unwritable.spool),
            "MAILWATCHD_SUBMIT_SOCKET": str(short_dir / "submit.sock")}


def test_unwritable_spool_submits_over_the_socket(programs: Path, socket_env: dict[str, str], unwritable: Unwritable,
                                                  socket_server: Callable[..., Any]) -> None:
    handler = socket_server()
    done = run(programs, "sendmail", socket_env, "-t", "-i", stdin=PHP_MAIL, prefix=unwritable.prefix)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    (received,) = handler.wait_for(1)
    assert received.mail_from == "app@example.com"
    assert received.rcpt_tos == ["ann@example.org", "bob@example.org", "hidden@example.org"]
    assert b"hidden@" not in received.data  # Bcc never leaves the submitter
    # CRLF on the wire, dot-stuffed and unstuffed: the line arrives as it was written.
    assert received.data.endswith(b"Subject: order 42\r\n\r\nline one\r\n.a line that starts with a dot\r\n")
    assert re.search(rb"^Message-ID: <.+>\r$", received.data, re.MULTILINE)
    assert not spool_names(unwritable.spool, "new")["new"]


def test_explicit_envelope_over_the_socket(programs: Path, socket_env: dict[str, str], unwritable: Unwritable,
                                           socket_server: Callable[..., Any]) -> None:
    handler = socket_server()
    done = run(programs, "sendmail", socket_env, "-f", "bounce@example.com", "-i", "ops@example.net", stdin=PHP_MAIL,
               prefix=unwritable.prefix)
    assert (done.returncode, done.stderr) == (0, b"")
    (received,) = handler.wait_for(1)
    assert (received.mail_from, received.rcpt_tos) == ("bounce@example.com", ["ops@example.net"])
    assert b"X-Mailwatchd-Envelope" not in received.data


def test_enqueue_over_the_socket_prints_the_daemons_queue_id(programs: Path, socket_env: dict[str, str],
                                                              unwritable: Unwritable,
                                                              socket_server: Callable[..., Any]) -> None:
    socket_server(NamesTheQueueId())
    done = run(programs, "mailwatchd", socket_env, "enqueue", stdin=PHP_MAIL, prefix=unwritable.prefix)
    assert (done.returncode, done.stdout) == (0, b"0661A2B3C4D5E6F7A8B9\n"), done.stderr


def test_socket_missing_exits_75_and_says_what_to_do(programs: Path, socket_env: dict[str, str],
                                                      unwritable: Unwritable) -> None:
    done = run(programs, "sendmail", socket_env, "-t", stdin=PHP_MAIL, prefix=unwritable.prefix)
    assert done.returncode == exitcodes.TEMPFAIL
    text = one_line_error(done)
    assert f"cannot write to {unwritable.spool / 'new'} (" in text
    assert f"submit socket {socket_env['MAILWATCHD_SUBMIT_SOCKET']} is missing" in text
    assert "systemctl status mailwatchd.socket" in text


def test_nobody_listening_on_the_socket_exits_75(programs: Path, socket_env: dict[str, str],
                                                 unwritable: Unwritable) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(socket_env["MAILWATCHD_SUBMIT_SOCKET"])  # the file stays; nothing listens
    done = run(programs, "sendmail", socket_env, "-t", stdin=PHP_MAIL, prefix=unwritable.prefix)
    assert done.returncode == exitcodes.TEMPFAIL
    assert "nothing answers on the daemon's submit socket" in one_line_error(done)


@pytest.mark.parametrize(("handler", "status", "reply"), [
    (TempFail, exitcodes.TEMPFAIL, "452 4.3.1 Insufficient system storage"),
    (TooBig, exitcodes.DATAERR, "552 5.3.4 Message too big"),
    (NoSuchUser, exitcodes.DATAERR, "550 5.1.1 No such user"),
])
def test_the_daemons_refusal_decides_the_exit_status(programs: Path, socket_env: dict[str, str], unwritable: Unwritable,
                                                     socket_server: Callable[..., Any], handler: type[RecordingHandler],
                                                     status: int, reply: str) -> None:
    server = socket_server(handler())
    done = run(programs, "sendmail", socket_env, "-t", "-i", stdin=PHP_MAIL, prefix=unwritable.prefix)
    assert done.returncode == status
    assert reply in one_line_error(done)
    assert not server.messages


def test_the_socket_transaction_has_one_deadline(short_dir: Path) -> None:
    """A daemon that accepts the connection and never greets: the submission ends at the deadline."""
    path = short_dir / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen()  # the kernel completes the connection; nobody ever answers
        message = envelope.parse("Q", b"From: a@example.com\nTo: b@example.org\n\nbody\n")
        started = time.monotonic()
        with pytest.raises(NotQueued) as info:
            submit_over_socket(path, message, helo="client.test", timeout=0.5)
        elapsed = time.monotonic() - started
    assert info.value.status == exitcodes.TEMPFAIL
    assert "did not complete the submission" in info.value.message and "within 0.5 s" in info.value.message
    assert 0.5 <= elapsed < 5


def test_a_dripping_daemon_cannot_stretch_the_deadline(short_dir: Path) -> None:
    """One byte of greeting at a time, each well inside any per-read timeout: the total still ends it."""
    path = short_dir / "drip.sock"
    stop = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()

        def drip() -> None:
            connection, _ = server.accept()
            with connection:
                for byte in b"220-" + b"x" * 10_000:
                    if stop.wait(0.05):
                        return
                    connection.send(bytes([byte]))

        thread = threading.Thread(target=drip, daemon=True)
        thread.start()
        message = envelope.parse("Q", b"From: a@example.com\nTo: b@example.org\n\nbody\n")
        started = time.monotonic()
        try:
            with pytest.raises(NotQueued) as info:
                submit_over_socket(path, message, helo="client.test", timeout=0.6)
        finally:
            stop.set()
            thread.join(5)
    assert info.value.status == exitcodes.TEMPFAIL
    assert 0.6 <= time.monotonic() - started < 5


# -- what `sendmail -t` imports --------------------------------------------------------------------


def test_submission_imports_neither_argparse_nor_the_daemon(env: dict[str, str], spool_dir: Path) -> None:
    """The fast path: one process per message must not pay for the rest of the program."""
    heavy = {"argparse", "asyncio", "smtplib", "mailwatchd.spool.queueview", "mailwatchd.service.daemon",
             "mailwatchd.transports.smtpwire", "mailwatchd.cli",
             # the standard library's heavier modules: dataclasses pulls in inspect and ast; email.utils
             # random, datetime, calendar, locale and socket
             "dataclasses", "inspect", "email.utils", "socket", "json", "shutil", "getpass",
             # the settings beyond those a submission reads, the spool beyond its drop, the socket client
             "mailwatchd.settings.config", "mailwatchd.settings.relays", "mailwatchd.settings.listen",
             "mailwatchd.settings.parsing", "mailwatchd.spool.store", "mailwatchd.spool.messagestate",
             "mailwatchd.submission.submitsocket"}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mailwatchd", "sendmail", "-t"], env=env,
                          input=PHP_MAIL, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert "mailwatchd.submission.submit" in imported  # the listing is what it claims to be
    assert not heavy & imported
    assert len(queued(spool_dir)) == 1


# The same command lines through the console script's entry point (mailwatchd.__main__, which queues a
# message without loading cli.py) and through cli.main: the same exit status, output and spool.
ENTRY_POINTS = {"fast path": "from mailwatchd.__main__ import main", "cli": "from mailwatchd.cli import main"}


@pytest.mark.parametrize(("name", "args", "stdin", "extra_env", "status", "queues"), [
    ("sendmail", ["-t"], PHP_MAIL, {}, exitcodes.OK, 1),
    ("mailwatchd", ["sendmail", "-t", "-i", "-f", "app@example.com"], PHP_MAIL, {}, exitcodes.OK, 1),
    ("sendmail", ["-t"], b"", {}, exitcodes.DATAERR, 0),
    ("sendmail", ["-t"], PHP_MAIL, {"MAILWATCHD_MAX_MESSAGE_SIZE": "lots"}, exitcodes.CONFIG, 0),
    ("sendmail", ["-t"], PHP_MAIL, {"MAILWATCHD_CONFIG": "/nonexistent/mailwatchd.env"}, exitcodes.CONFIG, 0),
    ("sendmail", ["-Z", "x@example.org"], PHP_MAIL, {}, exitcodes.USAGE, 0),
    ("sendmail", ["--help"], b"", {}, exitcodes.OK, 0),
    ("newaliases", [], b"", {}, exitcodes.OK, 0),
    ("mailq", [], b"", {}, exitcodes.OK, 0),
])
def test_the_fast_path_answers_as_cli_does(tmp_path: Path, env: dict[str, str], name: str, args: list[str],
                                            stdin: bytes, extra_env: dict[str, str], status: int,
                                            queues: int) -> None:
    outcomes = []
    for label, entry in ENTRY_POINTS.items():
        spool = tmp_path / label.replace(" ", "-") / "spool"
        script = tmp_path / label.replace(" ", "-") / name
        script.parent.mkdir()
        script.write_text(f"import sys\n{entry}\nsys.exit(main())\n")
        done = subprocess.run([sys.executable, str(script), *args], input=stdin, capture_output=True, timeout=60,
                              env={**env, "MAILWATCHD_SPOOL": str(spool), **extra_env}, check=False)
        stdout, stderr = (out.replace(str(spool).encode(), b"SPOOL") for out in (done.stdout, done.stderr))
        outcomes.append((done.returncode, stdout, stderr, len(queued(spool)) if (spool / "new").is_dir() else 0))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0][0], outcomes[0][3]) == (status, queues)


def test_usage_error_is_a_value_error() -> None:
    with pytest.raises(UsageError):
        parse_command_line(["-Z"])
    assert issubclass(UsageError, ValueError)


# -- end to end: the daemon's own listener on a socket-activated submit socket ----------------------


# What systemd does before it executes a socket-activated service: the socket at fd 3, and
# LISTEN_PID naming the process that exec() will become.
_ACTIVATE = """import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""


class SocketActivatedDaemon(DaemonProcess):
    """`mailwatchd run` handed a listening Unix socket as systemd does (fd 3, LISTEN_PID, LISTEN_FDS)."""

    def __init__(self, env: dict[str, str], listening: socket.socket) -> None:
        super().__init__(env)
        self.listening = listening

    def start(self, *args: str) -> SocketActivatedDaemon:
        fd = self.listening.fileno()
        self.proc = subprocess.Popen([sys.executable, "-c", _ACTIVATE, str(fd), *MAILWATCHD, "run", *args],
                                     env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, pass_fds=(fd,))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self


@pytest.fixture
def activated_daemon(clean_env: dict[str, str], spool_dir: Path, short_dir: Path,
                     smtp_server: SmtpServer) -> Iterator[tuple[SocketActivatedDaemon, Path]]:
    """A daemon delivering to `smtp_server`, started with its submit socket; not waited for: the
    socket is there before the daemon is, as with systemd."""
    path = short_dir / "submit.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(path))
        listening.listen()
        env = relay_env(clean_env, spool_dir, smtp_server.host, smtp_server.port,
                        MAILWATCHD_DEFAULT_DOMAIN="example.com", MAILWATCHD_ADMIN_ADDRESS="ops@example.net")
        daemon = SocketActivatedDaemon(env, listening).start()
    try:
        yield daemon, path
    finally:
        daemon.stop()


def test_through_the_daemons_socket_to_the_relay(programs: Path, env: dict[str, str], tmp_path: Path,
                                                 activated_daemon: tuple[SocketActivatedDaemon, Path],
                                                 smtp_server: SmtpServer) -> None:
    daemon, path = activated_daemon
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    caller = {**env, "MAILWATCHD_SPOOL": str(blocker / "spool"), "MAILWATCHD_SUBMIT_SOCKET": str(path)}
    done = run(programs, "sendmail", caller, "-t", "-i", stdin=PHP_MAIL)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b""), daemon.tail()
    (received,) = smtp_server.handler.wait_for(1)
    assert received.mail_from == "app@example.com"
    assert received.rcpt_tos == ["ann@example.org", "bob@example.org", "hidden@example.org"]
    assert received.data.endswith(b"\r\n\r\nline one\r\n.a line that starts with a dot\r\n")


def test_cron_through_the_daemons_socket(programs: Path, env: dict[str, str], tmp_path: Path,
                                         activated_daemon: tuple[SocketActivatedDaemon, Path],
                                         smtp_server: SmtpServer) -> None:
    """Bare `root` over the socket: the daemon completes it (admin address), as from the spool."""
    daemon, path = activated_daemon
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    caller = {**env, "MAILWATCHD_SPOOL": str(blocker / "spool"), "MAILWATCHD_SUBMIT_SOCKET": str(path)}
    done = run(programs, "sendmail", caller, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", stdin=CRON_MAIL)
    assert (done.returncode, done.stderr) == (0, b""), daemon.tail()
    (received,) = smtp_server.handler.wait_for(1)
    assert received.rcpt_tos == ["ops@example.net"]
    assert received.data.endswith(b"\r\n\r\nthe job's output\r\n")


SILENT_DAEMON_CLIENT = """
import sys
from pathlib import Path
from mailwatchd.errors import NotQueued
from mailwatchd.submission import submitsocket
submitsocket.BS_SILENCE_LIMIT_S = 0.5
try:
    submitsocket.relay_stdio(Path(sys.argv[1]), Path("/nonexistent-spool"))
except NotQueued as exc:
    print(exc.message, file=sys.stderr)
    sys.exit(exc.status)
"""


def test_bs_relayed_to_a_daemon_that_says_nothing_ends_with_75(short_dir: Path) -> None:
    """`sendmail -bs` for a caller without spool access carries the session to the submit socket; a daemon
    that accepts the connection and then says nothing must not hold the caller forever."""
    path = short_dir / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        child = subprocess.Popen([sys.executable, "-c", SILENT_DAEMON_CLIENT, str(path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        try:
            connection, _ = server.accept()  # accepted, and never answered
            with connection:
                _, stderr = child.communicate(timeout=30)
        finally:
            child.kill()
    assert child.returncode == exitcodes.TEMPFAIL and b"said nothing" in stderr, stderr
