"""Listening sockets (systemd's, or bound here), shutdown of open sessions, and `sendmail -bs`
driven through pipes by a real child process."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import pickle
import pwd
import select
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailwatchd.settings.listen import ListenSettings
from mailwatchd.submission.listener import Listener, inherited_sockets
from mailwatchd.submission.smtpserver import ServerFactory
from tests.test_smtpserver import MESSAGE, LoopThread, RawClient, transaction, unix_client

# Started with the listening sockets at descriptors 3 and 4, as systemd starts a service.
SOCKET_ACTIVATED = """
import asyncio, fcntl, json, os, sys
from pathlib import Path

passed = [int(fd) for fd in sys.argv[2:]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in passed]
for fd in passed:
    os.close(fd)
for target, fd in enumerate(high, 3):
    os.dup2(fd, target)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(passed)), LISTEN_FDNAMES="smtp:submit")

from mailwatchd.submission.listener import Listener, inherited_sockets
from mailwatchd.settings.listen import ListenSettings
from mailwatchd.submission.smtpserver import ServerFactory

sockets = inherited_sockets()
report = {"fds": [s.fileno() for s in sockets], "families": [s.family.name for s in sockets],
          "blocking": [s.getblocking() for s in sockets],
          "inheritable": [os.get_inheritable(s.fileno()) for s in sockets],
          "environ": sorted(key for key in os.environ if key.startswith("LISTEN_"))}

async def main():
    # An address this host cannot bind: the listener must serve on what systemd passed instead.
    listen = ListenSettings(addresses=(("192.0.2.123", 25),))
    factory = ServerFactory(spool_root=Path(sys.argv[1]), listen=listen, hostname="mx.test",
                            max_message_size=100_000, command_timeout=10)
    listener = Listener(factory, listen, sockets)
    await listener.start()
    report["addresses"] = listener.addresses
    print(json.dumps(report), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await listener.stop()

asyncio.run(main())
"""

NOT_A_LISTENING_SOCKET = """
import os, socket, sys
if sys.argv[1] == "pipe":
    os.dup2(os.pipe()[0], 3)
else:
    os.dup2(socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach(), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
from mailwatchd.errors import ConfigError
from mailwatchd.submission.listener import inherited_sockets
try:
    inherited_sockets()
except ConfigError as exc:
    print(exc)
"""

SENDMAIL_BS = """
import asyncio, sys
from pathlib import Path
from mailwatchd.submission.listener import serve_stdio
from mailwatchd.settings.listen import ListenSettings
from mailwatchd.submission.smtpserver import ServerFactory

factory = ServerFactory(spool_root=Path(sys.argv[1]), listen=ListenSettings(), hostname="mx.test",
                        max_message_size=100_000, command_timeout=10, via="sendmail -bs")
sys.exit(asyncio.run(serve_stdio(factory)))
"""


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


def stored(spool: Path) -> list[str]:
    return sorted(os.listdir(spool / "new")) if (spool / "new").is_dir() else []


def tcp_addresses(listener: Listener) -> list[tuple[str, int]]:
    found = []
    for address in listener.addresses:
        assert isinstance(address, tuple), address
        found.append(address)
    return found


def make_factory(spool: Path, listen: ListenSettings | None = None) -> ServerFactory:
    return ServerFactory(spool_root=spool, listen=listen or ListenSettings(), hostname="mx.test",
                         max_message_size=100_000, command_timeout=10)


# -- systemd's sockets -----------------------------------------------------------------------------


def test_sockets_passed_by_systemd_are_served(tmp_path: Path, spool_dir: Path, clean_env: dict[str, str]) -> None:
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    path = str(tmp_path / "submit.sock")
    unix.bind(path)
    unix.listen()
    child = subprocess.Popen([sys.executable, "-c", SOCKET_ACTIVATED, str(spool_dir), str(tcp.fileno()),
                              str(unix.fileno())], pass_fds=(tcp.fileno(), unix.fileno()), env=clean_env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdin is not None
        report = json.loads(child.stdout.readline())
        port = tcp.getsockname()[1]
        tcp.close()  # from here on only the child holds the listening sockets
        unix.close()
        assert report == {"fds": [3, 4], "families": ["AF_INET", "AF_UNIX"], "blocking": [False, False],
                          "inheritable": [False, False], "environ": [],
                          "addresses": [["127.0.0.1", port], path]}
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
            client.ehlo()
            assert transaction(client, "app@example.com", ["ann@example.org"])[0] == 250
        with unix_client(path) as client:
            client.ehlo()
            assert transaction(client, "root", ["root"])[0] == 250
        child.stdin.close()
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert len(stored(spool_dir)) == 2


@pytest.mark.parametrize(("kind", "problem", "fix"), [
    ("pipe", "descriptor 3 from systemd is not a socket", "use ListenStream= in the socket unit"),
    ("udp", "descriptor 3 from systemd is not a listening stream socket",
     "use ListenStream= and Accept=no in the socket unit"),
])
def test_a_descriptor_that_is_not_a_listening_socket_is_a_config_error(kind: str, problem: str, fix: str,
                                                                      clean_env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-c", NOT_A_LISTENING_SOCKET, kind], env=clean_env,
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == f"LISTEN_FDS: {problem}; fix: {fix}", result.stderr


def test_sockets_meant_for_another_process_are_left_alone() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"}
    assert inherited_sockets(environ) == []
    assert environ == {"PATH": "/bin"}  # and no child of ours takes them for its own
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert inherited_sockets(environ) == [] and environ == {}
    assert inherited_sockets({}) == []


# -- sockets bound here ----------------------------------------------------------------------------


def test_the_listener_binds_its_addresses_and_stops(loop_thread: LoopThread, spool_dir: Path) -> None:
    addresses: tuple[tuple[str, int], ...] = (("127.0.0.1", 0),)
    if socket.has_ipv6:
        try:
            socket.create_server(("::1", 0), family=socket.AF_INET6).close()
            addresses += (("::1", 0),)
        except OSError:
            pass
    listen = ListenSettings(addresses=addresses)
    factory = make_factory(spool_dir, listen)
    listener = Listener(factory, listen, [])
    loop_thread.run(listener.start())
    bound = tcp_addresses(listener)
    assert [host for host, _ in bound] == [host for host, _ in addresses]
    for host, port in bound:
        assert port > 0
        with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as client:
            assert client.noop()[0] == 250
            # Nagle off on the accepted connection: a multi-line reply must not wait for a delayed ACK.
            [session] = factory.sessions
            assert session.transport is not None
            accepted = session.transport.get_extra_info("socket")
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    loop_thread.run(listener.stop())
    assert listener.addresses == []
    for host, port in bound:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=5)


def test_an_ipv6_listener_takes_ipv6_only(loop_thread: LoopThread, spool_dir: Path) -> None:
    listen = ListenSettings(addresses=(("::", 0),))
    listener = Listener(make_factory(spool_dir, listen), listen, [])
    try:
        loop_thread.run(listener.start())
    except OSError as exc:
        pytest.skip(f"no IPv6 here: {exc}")
    try:
        [(_, port)] = tcp_addresses(listener)
        with socket.create_server(("0.0.0.0", port)):  # EADDRINUSE if [::] took IPv4 as well
            pass
    finally:
        loop_thread.run(listener.stop())


def test_a_failed_bind_leaves_nothing_listening(loop_thread: LoopThread, spool_dir: Path) -> None:
    first = socket.create_server(("127.0.0.1", 0))
    port = first.getsockname()[1]
    first.close()
    listen = ListenSettings(addresses=(("127.0.0.1", port), ("192.0.2.123", 25)))  # not an address of this host
    listener = Listener(make_factory(spool_dir, listen), listen, [])
    with pytest.raises(OSError) as info:
        loop_thread.run(listener.start())
    assert listener.addresses == []
    with pytest.raises(ConnectionRefusedError):  # closed, not left to the garbage collector: `info` holds the frames
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert info.value.errno == errno.EADDRNOTAVAIL


def test_stop_lets_a_message_in_data_finish_and_sends_the_others_away(loop_thread: LoopThread,
                                                                       spool_dir: Path) -> None:
    listen = ListenSettings(addresses=(("127.0.0.1", 0),))
    listener = Listener(make_factory(spool_dir, listen), listen, [])
    loop_thread.run(listener.start())
    [(host, port)] = tcp_addresses(listener)
    idle = RawClient(socket.create_connection((host, port), timeout=10))
    busy = RawClient(socket.create_connection((host, port), timeout=10))
    try:
        assert idle.reply().startswith("220") and busy.reply().startswith("220")
        busy.send(b"EHLO c\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n")
        assert [busy.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
        busy.send(MESSAGE[:20])
        stopping = loop_thread.run_soon(listener.stop(grace=10))
        assert idle.reply() == "421 4.3.2 Service shutting down, try again later"
        assert idle.reply() == ""
        assert not stopping.done()
        busy.send(MESSAGE[20:] + b".\r\n")
        queued = busy.reply()
        assert queued.startswith("250 2.0.0 Ok: queued as ")
        assert busy.reply() == "421 4.3.2 Service shutting down, try again later"
        stopping.result(10)
    finally:
        idle.close()
        busy.close()
    assert stored(spool_dir) == [queued.rsplit(" ", 1)[1]]


def test_stop_cuts_a_session_that_outlasts_the_grace(loop_thread: LoopThread, spool_dir: Path) -> None:
    listen = ListenSettings(addresses=(("127.0.0.1", 0),))
    listener = Listener(make_factory(spool_dir, listen), listen, [])
    loop_thread.run(listener.start())
    [(host, port)] = tcp_addresses(listener)
    slow = RawClient(socket.create_connection((host, port), timeout=10))
    try:
        slow.reply()
        slow.send(b"EHLO c\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n")
        assert [slow.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
        started = time.monotonic()
        loop_thread.run(listener.stop(grace=0.3))
        assert 0.25 < time.monotonic() - started < 5
        with contextlib.suppress(ConnectionResetError):  # aborted: the unread DATA makes it a reset
            assert slow.reply() == ""
    finally:
        slow.close()
    assert stored(spool_dir) == []


# -- sendmail -bs ----------------------------------------------------------------------------------


class Piped:
    """Drive a child's SMTP session through its stdin and stdout, as Symfony Mailer's sendmail -bs does."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc, self.stdin, self.stdout = proc, proc.stdin, proc.stdout
        self.buffer = b""

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no reply in time; read so far {self.buffer!r}")
            chunk = os.read(self.stdout.fileno(), 4096)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def reply(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while True:
            line = self._line(deadline).decode()
            if not line:
                return "\n".join(lines)
            assert line.endswith("\r\n"), line
            lines.append(line[:-2])
            if line[3:4] != "-":
                return "\n".join(lines)

    def command(self, line: bytes) -> str:
        self.stdin.write(line + b"\r\n")
        self.stdin.flush()
        return self.reply()


@pytest.fixture
def sendmail_bs(spool_dir: Path, clean_env: dict[str, str]) -> Iterator[Piped]:
    proc = subprocess.Popen([sys.executable, "-c", SENDMAIL_BS, str(spool_dir)], env=clean_env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield Piped(proc)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_sendmail_bs_is_one_smtp_session_over_pipes(sendmail_bs: Piped, spool_dir: Path) -> None:
    session = sendmail_bs
    assert session.reply().startswith("220 mx.test ESMTP")
    assert "250-PIPELINING" in session.command(b"EHLO app.test")
    assert session.command(b"MAIL FROM:<app@example.com>").startswith("250")
    assert session.command(b"RCPT TO:<root>").startswith("250")
    assert session.command(b"DATA").startswith("354")
    queued = session.command(MESSAGE + b".")
    assert queued.startswith("250 2.0.0 Ok: queued as ")
    assert session.command(b"QUIT").startswith("221")
    assert session.reply() == ""  # nothing after the session on stdout
    assert session.proc.wait(10) == 0
    queue_id = queued.rsplit(" ", 1)[1]
    assert stored(spool_dir) == [queue_id]
    data = (spool_dir / "new" / queue_id).read_bytes()
    name = pwd.getpwuid(os.getuid()).pw_name
    assert f"Received: from local user {os.getuid()} ({name}) via sendmail -bs\r\n\tby mx.test".encode() in data
    assert data.startswith(b"X-Mailwatchd-Envelope-From: <app@example.com>\r\nX-Mailwatchd-Envelope-To: <root>\r\n")


def test_sendmail_bs_ends_when_stdin_closes(sendmail_bs: Piped, spool_dir: Path) -> None:
    session = sendmail_bs
    session.reply()
    session.command(b"EHLO app.test")
    session.command(b"MAIL FROM:<app@example.com>")
    session.command(b"RCPT TO:<ann@example.org>")
    assert session.command(b"DATA").startswith("354")
    session.stdin.write(MESSAGE)  # and then the client goes away
    session.stdin.close()
    assert session.reply().startswith("421 4.4.2")
    assert session.reply() == ""
    assert session.proc.wait(10) == 0
    assert stored(spool_dir) == []


def test_the_listener_process_gets_its_settings_whole_whatever_their_size(tmp_path: Path) -> None:
    """AUTH users, the TLS files and the plain-AUTH networks reach the child's side as the daemon has them, in
    a memfd written before the child starts: a users file longer than a pipe holds never waits on the child."""
    from mailwatchd.settings.credentials import Secret
    from mailwatchd.submission import process

    users = (("app", Secret("s3cret")), *((f"user{n}", Secret(f"password {n}")) for n in range(5000)))
    listen = ListenSettings(addresses=(("0.0.0.0", 2525),), users=users,
                            tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem",
                            plain_auth_networks=(ipaddress.ip_network("172.17.0.0/16"),), max_connections=7)
    config = process.ChildConfig(spool=tmp_path / "spool", listen=listen, hostname="mx.example.org",
                                 max_message_size=1000, command_timeout=300.0, stop_grace=5.0,
                                 log_format="json", log_level="info")
    fd = process.config_file(config)  # no reader yet: it must not block
    assert os.fstat(fd).st_size == len(pickle.dumps(config)) > 65536  # more than a pipe's buffer
    assert os.get_inheritable(fd) is False  # passed to the child alone (pass_fds), not to every child
    received = process.read_config(os.dup(fd))
    os.close(fd)
    assert received == config
    assert received.listen.users[0][1].reveal() == "s3cret" and len(received.listen.users) == 5001


def test_the_daemon_takes_every_line_its_listener_wrote_a_bad_one_costing_no_other(tmp_path: Path) -> None:
    """The daemon's side of the events pipe (a real pipe, more than one read's worth): a line it cannot act on
    is logged and skipped; the lines after it still list their messages."""
    from mailwatchd.service.counters import Counters
    from mailwatchd.service.handoff import ListenerHandoff
    from mailwatchd.service.scheduler import Scheduler
    from mailwatchd.spool.pending import PendingStores
    from mailwatchd.spool.queueid import new_queue_id
    from mailwatchd.submission import process

    async def run() -> tuple[Scheduler, PendingStores, list[str]]:
        scheduler, pending = Scheduler(), PendingStores()
        counters = Counters(lambda: (scheduler.ready_count, scheduler.deferred_count))
        config = process.ChildConfig(spool=tmp_path, listen=ListenSettings(addresses=()), hostname="mx.test",
                                     max_message_size=1000, command_timeout=1.0, stop_grace=0.1,
                                     log_format="json", log_level="info")
        child = process.ListenerProcess(config, [], stores=ListenerHandoff(scheduler, pending, counters),
                                        on_exit=lambda status: None)
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        child._events, child._stopping = read_end, True
        ids = [new_queue_id() for _ in range(3000)]
        lines = "storing ../../etc/passwd 5\n" + "".join(f"storing {queue_id} 10\nqueued {queue_id} 10\n"
                                                          for queue_id in ids)
        assert len(lines) > 65536  # more than one read takes
        def write() -> None:  # the child, ended: all its lines, then the end
            with os.fdopen(write_end, "wb") as writer:
                writer.write(lines.encode())

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 10
        while child._events >= 0 and time.monotonic() < deadline:  # as stop() drains it, but the writer is alive
            if not child._readable():
                await asyncio.sleep(0.001)
        writer.join(5)
        return scheduler, pending, ids

    scheduler, pending, ids = asyncio.run(run())
    assert scheduler.ready_count == len(ids) and len(pending) == 0
    assert scheduler.knows(ids[0]) and scheduler.knows(ids[-1])
