"""The SMTP server session: real sockets on port 0, Python's smtplib (or a raw socket) as the
client, a real spool directory, trustme certificates for STARTTLS."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import ipaddress
import os
import pwd
import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
import trustme
from aiosmtpd.smtp import SMTP
from hypothesis import example, given
from hypothesis import strategies as st

from mailwatchd.errors import MalformedMessage, SpoolFull
from mailwatchd.settings.listen import ListenSettings
from mailwatchd.settings.relays import Secret
from mailwatchd.submission.smtpserver import (
    NotAMessage,
    Peer,
    Queued,
    ServerFactory,
    SmtpSession,
    TooBig,
    _Hooks,
    is_local,
    may_auth_in_clear,
    received_field,
    reply_for,
)
from mailwatchd.submission.submit import enqueue
from tests.conftest import LOOPBACK, wait_until
from tests.test_spool import tmpfs

T = TypeVar("T")
MESSAGE = b"From: app@example.com\r\nTo: ann@example.org\r\nSubject: hello\r\n\r\nHi Ann.\r\n"
USERS = (("app", Secret("s3cret")),)


class LoopThread:
    """An event loop in a thread, for servers the blocking test clients talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def run_soon(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Running:
    host: str
    port: int
    spool: Path
    factory: ServerFactory
    queued: list[Queued] = field(default_factory=list)

    def client(self, **kwargs: Any) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, local_hostname="client.test", timeout=10, **kwargs)

    def raw(self) -> RawClient:
        return RawClient(socket.create_connection((self.host, self.port), timeout=10))

    def stored(self) -> list[str]:
        new = self.spool / "new"
        return sorted(os.listdir(new)) if new.is_dir() else []


class RawClient:
    """A client that writes what it is told, in one write, and reads replies one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One reply, its lines joined by newlines; '' at EOF."""
        lines: list[str] = []
        while True:
            line = self.file.readline().decode()
            if not line:
                return "\n".join(lines)
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture
def serve(loop_thread: LoopThread, spool_dir: Path) -> Iterator[Callable[..., Running]]:
    """`serve(listen=ListenSettings(...), host=..., **ServerFactory keywords)` on port 0."""
    servers: list[tuple[asyncio.Server, ServerFactory]] = []

    def start(listen: ListenSettings | None = None, host: str = LOOPBACK, **kwargs: Any) -> Running:
        queued: list[Queued] = []
        options: dict[str, Any] = {"spool_root": spool_dir, "hostname": "mx.test", "max_message_size": 100_000,
                                   "command_timeout": 10.0, "on_queued": queued.append}
        options.update(kwargs)
        factory = ServerFactory(listen=listen or ListenSettings(), **options)

        async def listen_now() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(factory, host, 0)

        server = loop_thread.run(listen_now())
        servers.append((server, factory))
        return Running(host, server.sockets[0].getsockname()[1], options["spool_root"], factory, queued)

    yield start

    async def stop_all() -> None:
        for server, factory in servers:
            server.close()
            await factory.close_all(grace=1.0)

    loop_thread.run(stop_all())


NETNS_ADDRESS_ENV = "MAILWATCHD_TEST_NETNS_ADDRESS"
EXPOSED_TESTS = ("must_auth_before_mail", "allowed_network_logs_in", "auth_over_starttls", "swaks_logs_in")


def non_loopback_address() -> str:
    """The address of the network namespace test_exposed_listeners_in_their_own_network_namespace makes,
    where these tests run again: never an address of this host's own network."""
    address = os.environ.get(NETNS_ADDRESS_ENV)
    if not address:
        pytest.skip("runs inside the network namespace that test_exposed_listeners_in_their_own_network_namespace"
                    " makes (root and unshare(1))")
    return address


def _can_make_a_network_namespace() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_make_a_network_namespace(), reason="needs root, unshare(1) and ip(8)")
def test_exposed_listeners_in_their_own_network_namespace() -> None:
    """Peers that are not loopback: the tests below run again in a network namespace of their own, where
    192.0.2.1 (TEST-NET-1, not a loopback address) sits on the namespace's own lo; nothing can leave it."""
    setup = "ip link set lo up && ip addr add 192.0.2.1/32 dev lo && exec \"$0\" \"$@\""
    done = subprocess.run(["unshare", "--net", "sh", "-c", setup, sys.executable, "-m", "pytest", "-q",
                           "-p", "no:cacheprovider", str(Path(__file__)), "-k", " or ".join(EXPOSED_TESTS)],
                          env={**os.environ, NETNS_ADDRESS_ENV: "192.0.2.1"}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and f"{len(EXPOSED_TESTS)} passed" in done.stdout, done.stdout + done.stderr


def write_tls_files(leaf: trustme.LeafCert, directory: Path) -> tuple[Path, Path]:
    """MAILWATCHD_LISTEN_TLS_CERT and _KEY files for `leaf`."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture(scope="session")
def tls_files(server_cert: trustme.LeafCert, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tls_files(server_cert, tmp_path_factory.mktemp("listen-tls"))


def unix_client(path: str) -> smtplib.SMTP:
    """smtplib over a Unix stream socket, greeting read."""
    client = smtplib.SMTP(local_hostname="client.test", timeout=10)
    client.sock = socket.socket(socket.AF_UNIX)
    client.sock.settimeout(10)
    client.sock.connect(path)
    code, greeting = client.getreply()
    assert code == 220, greeting
    return client


def transaction(client: smtplib.SMTP, sender: str, recipients: list[str], data: bytes = MESSAGE) -> tuple[int, str]:
    """MAIL, RCPT..., DATA; the reply to the end of DATA."""
    code, text = client.mail(sender)
    assert code == 250, text
    for recipient in recipients:
        code, text = client.rcpt(recipient)
        assert code == 250, text
    code, reply = client.data(data)
    return code, reply.decode()


# -- a message accepted ----------------------------------------------------------------------------


def test_a_message_is_stored_with_trace_and_envelope_before_the_250(serve: Callable[..., Running]) -> None:
    running = serve()
    with running.client() as client:
        code, features = client.ehlo()
        assert code == 250 and features.decode().splitlines()[0] == "mx.test"
        for keyword in ("pipelining", "8bitmime", "smtputf8"):
            assert client.has_extn(keyword), keyword
        assert client.esmtp_features["size"] == "100000"
        assert not client.has_extn("auth")  # nobody to log in as
        code, reply = transaction(client, "app@example.com", ["ann@example.org", "root"])
    assert code == 250 and reply.startswith("2.0.0 Ok: queued as ")
    queue_id = reply.removeprefix("2.0.0 Ok: queued as ")
    assert running.stored() == [queue_id]
    data = (running.spool / "new" / queue_id).read_bytes()
    head, _, rest = data.partition(b"From: app@example.com\r\n")
    lines = head.decode().split("\r\n")
    assert lines[:3] == ["X-Mailwatchd-Envelope-From: <app@example.com>", "X-Mailwatchd-Envelope-To: <ann@example.org>",
                         "X-Mailwatchd-Envelope-To: <root>"]
    assert lines[3] == "Received: from client.test ([127.0.0.1])"
    assert lines[4].startswith("\tby mx.test (mailwatchd) with ESMTP; ")
    assert rest == MESSAGE.removeprefix(b"From: app@example.com\r\n")
    assert running.queued == [Queued(queue_id, len(MESSAGE), "127.0.0.1", "app@example.com", 2)]


def test_the_null_sender_is_accepted(serve: Callable[..., Running]) -> None:
    running = serve()
    with running.client() as client:
        client.ehlo()
        code, reply = transaction(client, "", ["ann@example.org"])  # smtplib writes MAIL FROM:<>
    assert code == 250, reply
    data = (running.spool / "new" / running.stored()[0]).read_bytes()
    assert data.startswith(b"X-Mailwatchd-Envelope-From: <>\r\nX-Mailwatchd-Envelope-To: <ann@example.org>\r\n")


def test_pipelined_commands_in_one_write_get_their_replies_in_order(serve: Callable[..., Running]) -> None:
    running = serve()
    client = running.raw()
    try:
        assert client.reply().startswith("220 mx.test ESMTP")
        client.send(b"EHLO client.test\r\n")
        assert "250-PIPELINING" in client.reply()
        client.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<ann@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
                    b"DATA\r\n")
        assert [client.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
        client.send(MESSAGE + b".\r\nQUIT\r\n")
        queued, bye = client.reply(), client.reply()
    finally:
        client.close()
    assert queued.startswith("250 2.0.0 Ok: queued as ") and bye.startswith("221")
    assert running.stored() == [queued.rsplit(" ", 1)[1]]


def test_a_client_that_half_closes_after_quit_still_gets_its_replies(serve: Callable[..., Running]) -> None:
    running = serve()
    client = running.raw()
    try:
        client.reply()
        client.send(b"EHLO c\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n" + MESSAGE
                    + b".\r\nQUIT\r\n")
        client.sock.shutdown(socket.SHUT_WR)  # as `nc -N` does when its input ends
        replies = [client.reply() for _ in range(6)]
        assert client.reply() == ""  # then the server closes
    finally:
        client.close()
    assert [reply[:3] for reply in replies] == ["250", "250", "250", "354", "250", "221"]
    assert running.stored() == [replies[4].rsplit(" ", 1)[1]]


def test_a_client_that_closes_inside_data_stores_nothing(serve: Callable[..., Running]) -> None:
    running = serve()
    client = running.raw()
    try:
        client.reply()
        client.send(b"EHLO c\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n" + MESSAGE)
        client.sock.shutdown(socket.SHUT_WR)
        replies = [client.reply() for _ in range(5)]
    finally:
        client.close()
    assert replies[4].startswith("421 4.4.2")
    assert running.stored() == []


def reset_while_writing(running: Running, writing: threading.Event) -> None:
    """Send a message, wait until the server is writing it, reset the connection (SO_LINGER 0), and wait
    until the server has seen the connection go."""
    client = running.raw()
    try:
        start_data(client)
        client.send(MESSAGE + b".\r\n")
        assert writing.wait(10), "the write never began"
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        client.close()
    wait_until(lambda: not running.factory.sessions, message="the server to see the connection gone")


def test_a_message_stored_after_its_client_went_away_is_still_handed_on(serve: Callable[..., Running],
                                                                       spool_dir: Path) -> None:
    """The client resets the connection while its message is being written: nobody gets a 250, but the
    message is in the spool, so on_queued must still hear of it (the daemon schedules it from there)."""
    writing, finish = threading.Event(), threading.Event()

    def slow_deposit(data: bytes) -> str:
        writing.set()
        assert finish.wait(10), "the test never let the write finish"
        return enqueue(spool_dir, data)

    running = serve(deposit=slow_deposit)
    reset_while_writing(running, writing)
    assert running.queued == []
    finish.set()
    queued = wait_until(lambda: running.queued, message="on_queued for the stored message")
    assert [item.queue_id for item in queued] == running.stored()


def test_a_store_that_fails_after_its_client_went_away_is_logged_and_nothing_is_handed_on(
        serve: Callable[..., Running]) -> None:
    writing, finish = threading.Event(), threading.Event()

    def full_disk(data: bytes) -> str:
        writing.set()
        assert finish.wait(10), "the test never let the write finish"
        raise SpoolFull("the filesystem is full (No space left on device)")

    running = serve(deposit=full_disk)
    with structlog.testing.capture_logs() as logs:
        reset_while_writing(running, writing)
        finish.set()
        refused = wait_until(lambda: [line for line in logs if line["event"] == "smtp_message_refused"],
                             message="the refusal logged")
    assert refused[0]["reply"] == "452 4.3.1 Insufficient system storage"
    assert running.queued == [] and running.stored() == []


def start_data(client: RawClient) -> None:
    """Greeting, EHLO, MAIL, RCPT, DATA: the server now reads the message."""
    client.reply()
    client.send(b"EHLO c\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n")
    assert [client.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]


def stored_body(running: Running, queue_id: str) -> bytes:
    """The message as stored, without the envelope and trace fields this server put before it."""
    data = (running.spool / "new" / queue_id).read_bytes()
    return data[data.index(b"From: app@example.com\r\n"):]


@pytest.mark.parametrize("body", [
    b"Hi.\r\n.\r\n..\r\n.x\r\n...\r\nend .\r\n",  # dot lines that are not the end, as smtplib stuffs them
    b".\r\n",  # the first body line a lone dot
    b"x" * 998 + b"\r\n",  # the longest line RFC 5321 allows
    (b"line\r\n" * 20_000),  # many blocks of the server's reader
])
def test_the_data_comes_back_byte_for_byte_unstuffed(serve: Callable[..., Running], body: bytes) -> None:
    running = serve(max_message_size=1_000_000)
    message = MESSAGE + body
    with running.client() as client:
        client.ehlo()
        code, reply = transaction(client, "app@example.com", ["ann@example.org"], message)
    assert code == 250, reply
    assert stored_body(running, reply.rsplit(" ", 1)[1]) == message


def test_data_sent_a_byte_at_a_time_ends_at_its_end_line_and_leaves_the_next_command(
        serve: Callable[..., Running]) -> None:
    running = serve()
    client = running.raw()
    try:
        start_data(client)
        for byte in MESSAGE + b"..\r\nlast.\r\n.\r\nNOOP\r\n":
            client.send(bytes([byte]))
        queued, noop = client.reply(), client.reply()
        client.send(b"QUIT\r\n")
        assert client.reply().startswith("221")
    finally:
        client.close()
    assert queued.startswith("250 2.0.0 Ok: queued as ") and noop.startswith("250")
    assert stored_body(running, queued.rsplit(" ", 1)[1]) == MESSAGE + b".\r\nlast.\r\n"


def test_an_empty_message_ends_at_the_first_line_and_the_session_goes_on(serve: Callable[..., Running]) -> None:
    running = serve()
    client = running.raw()
    try:
        start_data(client)
        client.send(b".\r\nMAIL FROM:<app@example.com>\r\n")
        queued, next_mail = client.reply(), client.reply()
    finally:
        client.close()
    assert queued.startswith("250 2.0.0 Ok: queued as ") and next_mail.startswith("250")
    data = (running.spool / "new" / queued.rsplit(" ", 1)[1]).read_bytes()
    assert data.endswith(b" (mailwatchd) with ESMTP; " + data.rsplit(b"; ", 1)[1]) and data.count(b"\r\n") == 4


def test_a_line_over_1000_octets_is_refused_after_the_end_of_data(serve: Callable[..., Running]) -> None:
    running = serve()
    with running.client() as client:
        client.ehlo()
        client.mail("app@example.com")
        client.rcpt("ann@example.org")
        code, text = client.data(MESSAGE + b"x" * 1000 + b"\r\n")  # aiosmtpd's limit: 1001 with the CRLF
        assert (code, text) == (500, b"Line too long (see RFC5321 4.5.3.1.6)")
        assert transaction(client, "app@example.com", ["ann@example.org"])[0] == 250
    assert len(running.stored()) == 1


@pytest.mark.parametrize("length", [600, 2_000, 200_000])  # past RFC 5321's 512, past 1001, past the read limit
def test_an_over_long_command_line_gets_500_and_the_session_goes_on(serve: Callable[..., Running],
                                                                    length: int) -> None:
    running = serve()
    client = running.raw()
    try:
        client.reply()
        client.send(b"EHLO c\r\n")
        client.reply()
        client.send(b"MAIL FROM:<" + b"a" * length + b"@example.com>\r\n")
        assert client.reply() == "500 Command line too long"
        client.send(b"MAIL FROM:<app@example.com>\r\n")
        assert client.reply().startswith("250")
    finally:
        client.close()


def test_data_far_past_the_limit_is_read_to_its_end_and_dropped(serve: Callable[..., Running]) -> None:
    running = serve(max_message_size=10_000)
    with running.client() as client:
        client.ehlo()
        client.mail("app@example.com")
        client.rcpt("ann@example.org")
        code, text = client.data(MESSAGE + (b"y" * 78 + b"\r\n") * 20_000)  # 1.6 MB
        assert (code, text) == (552, b"5.3.4 Message too big")
        assert transaction(client, "app@example.com", ["ann@example.org"])[0] == 250
    assert len(running.stored()) == 1


@given(st.text(alphabet=st.sampled_from("ab.@<> \t()\"[]:+-=SIZE8BITMIMé"), max_size=30))
@example("<a@b.c> SIZE=10")
@example(" <a.b@c-d.e>\tBODY=8BITMIME")
@example("<a@b.c> (comment) SIZE=1")
@example("<a@b.c.>")
@example("<a..b@c>")
def test_the_quick_path_reads_addresses_as_aiosmtpd_does(arg: str) -> None:
    session = SmtpSession(ServerFactory(spool_root=Path("/nonexistent"), listen=ListenSettings(), hostname="mx.test",
                                        max_message_size=1000, command_timeout=1.0))

    def outcome(getaddr: Callable[[str], tuple[str | None, str | None]]) -> object:
        try:
            return getaddr(arg)
        except Exception as exc:  # aiosmtpd's parser raises IndexError on some (e.g. '<'): both must
            return type(exc)

    assert outcome(session._getaddr) == outcome(functools.partial(SMTP._getaddr, session))


# -- limits ----------------------------------------------------------------------------------------


def test_size_limit_is_advertised_and_enforced(serve: Callable[..., Running]) -> None:
    running = serve(max_message_size=2000)
    with running.client() as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "2000"
        code, text = client.mail("app@example.com", ["SIZE=2001"])
        assert (code, text) == (552, b"5.3.4 Message too big")
        code, text = client.mail("app@example.com", ["SIZE=1000"])
        assert code == 250
        client.rcpt("ann@example.org")
        code, text = client.data(MESSAGE + (b"x" * 98 + b"\r\n") * 20)
        assert (code, text) == (552, b"5.3.4 Message too big")
        # Within SIZE as sent, past it with the fields this server adds: the spool would refuse it later.
        lines = (1990 - len(MESSAGE)) // 100
        body = (b"x" * 98 + b"\r\n") * lines + b"x" * (1990 - len(MESSAGE) - 100 * lines - 2) + b"\r\n"
        assert len(MESSAGE + body) == 1990
        assert transaction(client, "app@example.com", ["ann@example.org"], MESSAGE + body) == (
            552, "5.3.4 Message too big")
        assert transaction(client, "app@example.com", ["ann@example.org"])[0] == 250
    assert len(running.stored()) == 1


def test_too_many_recipients(serve: Callable[..., Running]) -> None:
    running = serve(ListenSettings(max_recipients=2))
    with running.client() as client:
        client.ehlo()
        client.mail("app@example.com")
        assert client.rcpt("ann@example.org")[0] == 250
        assert client.rcpt("bob@example.org")[0] == 250
        assert client.rcpt("cat@example.org") == (452, b"4.5.3 Too many recipients")
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    data = (running.spool / "new" / running.stored()[0]).read_bytes()
    assert data.count(b"X-Mailwatchd-Envelope-To:") == 2 and b"cat@" not in data


def test_a_full_disk_is_a_temporary_failure_and_leaves_nothing_in_new(tmp_path: Path,
                                                                      serve: Callable[..., Running]) -> None:
    with tmpfs(tmp_path / "small", "size=256k,mode=0700") as root:
        (root / "tmp").mkdir()
        (root / "new").mkdir()
        running = serve(spool_root=root, max_message_size=2_000_000)
        with running.client() as client:
            client.ehlo()
            big = MESSAGE + (b"y" * 998 + b"\r\n") * 400  # 400 kB into 256 kB
            assert transaction(client, "app@example.com", ["ann@example.org"], big) == (
                452, "4.3.1 Insufficient system storage")
            assert os.listdir(root / "tmp") == [] and os.listdir(root / "new") == []
            code, reply = transaction(client, "app@example.com", ["ann@example.org"])  # the space is still there
        assert code == 250 and running.stored() == [reply.rsplit(" ", 1)[1]]


def test_a_spool_that_cannot_be_written_is_a_temporary_failure(tmp_path: Path,
                                                               serve: Callable[..., Running]) -> None:
    if os.geteuid() != 0:
        spool = tmp_path / "spool"
        (spool / "tmp").mkdir(parents=True)
        (spool / "new").mkdir()
        (spool / "new").chmod(0o500)
        running = serve(spool_root=spool)
        with running.client() as client:
            client.ehlo()
            reply = transaction(client, "app@example.com", ["ann@example.org"])
        assert reply == (451, f"4.3.0 Cannot write to the spool: {os.strerror(errno.EACCES)}")
        assert os.listdir(spool / "tmp") == []
        return
    with tmpfs(tmp_path / "ro", "size=256k,mode=0700") as root:  # root writes through 0500: remount read-only
        (root / "tmp").mkdir()
        (root / "new").mkdir()
        result = subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot remount read-only: {result.stderr.strip()}")
        running = serve(spool_root=root)
        with running.client() as client:
            client.ehlo()
            reply = transaction(client, "app@example.com", ["ann@example.org"])
        assert reply == (451, f"4.3.0 Cannot write to the spool: {os.strerror(errno.EROFS)}")


def test_what_cannot_be_stored_is_refused_with_the_reason(serve: Callable[..., Running]) -> None:
    running = serve()
    with running.client() as client:
        client.ehlo()
        code, reply = transaction(client, "app@example.com", ["ann@example.org"], b"no header here\r\n")
        assert (code, reply) == (554, "5.6.0 not an RFC 5322 message: a header line has no field name")
        client.mail("app@example.com")
        assert client.docmd("RCPT", 'TO:<"ann bob"@example.org>')[0] == 250  # decided with the whole envelope
        code, text = client.data(MESSAGE)
        assert code == 550 and text.startswith(b"5.1.3 recipient address '\"ann bob\"@example.org' is not"), text
        client.mail("app@example.com")
        assert client.docmd("RCPT", "TO:<>") == (553, b"5.1.3 The null path <> is not a recipient")
    assert running.stored() == []


def test_failures_map_to_replies() -> None:
    assert reply_for(SpoolFull("the filesystem is full")) == "452 4.3.1 Insufficient system storage"
    assert reply_for(TooBig("x")) == "552 5.3.4 Message too big"
    assert reply_for(NotAMessage("no\r\nheader")) == "554 5.6.0 no header"
    assert reply_for(MalformedMessage("sender address 'é' is bad")) == "550 5.1.3 sender address '\\xe9' is bad"
    assert reply_for(PermissionError(errno.EACCES, "Permission denied", "/spool/new")) == (
        "451 4.3.0 Cannot write to the spool: Permission denied")  # the reason, not the path
    assert reply_for(ValueError("a bug")) is None


# -- who may submit --------------------------------------------------------------------------------


@pytest.mark.parametrize(("peer", "local"), [
    (Peer(address="127.0.0.1"), True), (Peer(address="127.0.0.3"), True), (Peer(address="::1"), True),
    (Peer(address="::ffff:127.0.0.1"), True), (Peer(uid=1000), True), (Peer(uid=0, via="sendmail -bs"), True),
    (Peer(address="192.0.2.10"), False), (Peer(address="::ffff:192.0.2.10"), False),
    (Peer(address="2001:db8::1"), False), (Peer(), False), (Peer(address="localhost"), False),
])
def test_only_local_peers_may_submit_without_auth(peer: Peer, local: bool) -> None:
    assert is_local(peer) is local


def test_auth_in_clear_only_from_named_networks() -> None:
    listen = ListenSettings(plain_auth_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    assert may_auth_in_clear(Peer(address="192.0.2.10"), listen)
    assert may_auth_in_clear(Peer(address="::ffff:192.0.2.10"), listen)
    assert not may_auth_in_clear(Peer(address="198.51.100.1"), listen)
    assert not may_auth_in_clear(Peer(uid=0), listen)
    assert not may_auth_in_clear(Peer(address="192.0.2.10"), ListenSettings())


def test_a_peer_that_is_not_loopback_must_auth_before_mail(serve: Callable[..., Running]) -> None:
    running = serve(ListenSettings(users=USERS, plain_auth_networks=(ipaddress.ip_network("198.51.100.0/24"),)),
                    host=non_loopback_address())
    with running.client() as client:
        client.ehlo()
        assert not client.has_extn("auth")  # no TLS here, and not a network allowed to log in in clear
        assert client.mail("app@example.com") == (530, b"5.7.0 Authentication required")
        assert client.docmd("AUTH", "PLAIN AGFwcABzM2NyZXQ=")[0] == 538
    assert running.stored() == []


def test_a_peer_from_an_allowed_network_logs_in_without_tls(serve: Callable[..., Running]) -> None:
    address = non_loopback_address()
    running = serve(ListenSettings(users=USERS, plain_auth_networks=(ipaddress.ip_network(f"{address}/32"),)),
                    host=address)
    with running.client() as client:
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login("app", "wrong")
        assert info.value.smtp_code == 535
        assert client.login("app", "s3cret")[0] == 235
        code, reply = transaction(client, "app@example.com", ["ann@example.org"])
    assert code == 250, reply
    data = (running.spool / "new" / running.stored()[0]).read_bytes()
    assert f"Received: from client.test ([{address}])\r\n\tby mx.test (mailwatchd) with ESMTPA; ".encode() in data


def test_auth_over_starttls(serve: Callable[..., Running], ca: trustme.CA, ca_file: Path, tmp_path: Path) -> None:
    address = non_loopback_address()
    cert, key = write_tls_files(ca.issue_cert(address), tmp_path)
    running = serve(ListenSettings(users=USERS, tls_cert=cert, tls_key=key), host=address)
    with running.client() as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN AGFwcABzM2NyZXQ=")[0] == 538  # never a password in clear
        client.starttls(context=ssl.create_default_context(cafile=str(ca_file)))
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        assert client.mail("app@example.com")[0] == 530
        client.rset()
        assert client.docmd("AUTH", "PLAIN AGFwcAB3cm9uZw==") == (535, b"5.7.8 Authentication credentials invalid")
        assert client.login("app", "s3cret")[0] == 235
        code, reply = transaction(client, "app@example.com", ["ann@example.org"])
    assert code == 250, reply
    assert b"with ESMTPSA; " in (running.spool / "new" / running.stored()[0]).read_bytes()


@pytest.mark.skipif(shutil.which("swaks") is None, reason="Debian's swaks is not installed")
def test_swaks_logs_in_over_starttls_on_an_exposed_listener_and_not_without_it(
        serve: Callable[..., Running], ca: trustme.CA, ca_file: Path, tmp_path: Path) -> None:
    address = non_loopback_address()
    cert, key = write_tls_files(ca.issue_cert(address), tmp_path)
    running = serve(ListenSettings(users=USERS, tls_cert=cert, tls_key=key), host=address)
    base = ["swaks", "--server", address, "--port", str(running.port), "--from", "app@example.com",
            "--to", "ann@example.org", "--auth", "PLAIN", "--auth-user", "app", "--auth-password", "s3cret"]
    in_clear = subprocess.run(base, capture_output=True, text=True, timeout=30, check=False)
    assert in_clear.returncode != 0 and running.stored() == [], in_clear.stdout
    secured = subprocess.run([*base, "--tls", "--tls-verify", "--tls-ca-path", str(ca_file), "--pipeline"],
                             capture_output=True, text=True, timeout=30, check=False)
    assert secured.returncode == 0, secured.stdout + secured.stderr
    assert "235 " in secured.stdout and "250 2.0.0 Ok: queued as" in secured.stdout
    assert len(running.stored()) == 1


def test_auth_attempts_are_limited(serve: Callable[..., Running], tls_files: tuple[Path, Path],
                                   ca_file: Path) -> None:
    cert, key = tls_files
    running = serve(ListenSettings(users=USERS, tls_cert=cert, tls_key=key))
    with running.client() as client:
        client.starttls(context=ssl.create_default_context(cafile=str(ca_file)))
        client.ehlo()
        replies = [client.docmd("AUTH", "PLAIN AGFwcAB3cm9uZw==")[0] for _ in range(4)]
    assert replies == [535, 535, 535, 421]


def test_loopback_needs_no_auth_and_is_offered_none_without_users(serve: Callable[..., Running],
                                                                  tls_files: tuple[Path, Path],
                                                                  ca_file: Path) -> None:
    cert, key = tls_files
    running = serve(ListenSettings(tls_cert=cert, tls_key=key))
    with running.client() as client:
        client.starttls(context=ssl.create_default_context(cafile=str(ca_file)))
        client.ehlo()
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN AGFwcABzM2NyZXQ=")[0] == 504
        code, reply = transaction(client, "app@example.com", ["ann@example.org"])
    assert code == 250, reply
    assert b"with ESMTPS; " in (running.spool / "new" / running.stored()[0]).read_bytes()


# -- connections -----------------------------------------------------------------------------------


def test_connections_over_the_cap_get_421(serve: Callable[..., Running]) -> None:
    running = serve(ListenSettings(max_connections=2))
    first, second = running.client(), running.client()
    third = running.raw()
    try:
        assert third.reply() == "421 4.7.0 Too many connections, try again later"
        assert third.reply() == ""
        first.quit()
        fourth = wait_until(lambda: (client := running.raw()).reply().startswith("220") and client,
                            timeout=5, message="a free slot")
        fourth.close()
        assert second.noop()[0] == 250  # the sessions inside the cap were never disturbed
    finally:
        third.close()
        second.close()


def test_a_silent_client_is_disconnected_and_stalls_no_one(serve: Callable[..., Running]) -> None:
    running = serve(command_timeout=0.5)
    silent = running.raw()
    try:
        started = time.monotonic()
        assert silent.reply().startswith("220")
        with running.client() as client:  # served while the silent one waits
            client.ehlo()
            assert transaction(client, "app@example.com", ["ann@example.org"])[0] == 250
        assert silent.reply() == "421 4.4.2 Timeout exceeded, closing the connection"
        assert silent.reply() == ""
        assert 0.4 < time.monotonic() - started < 5
    finally:
        silent.close()


def test_each_command_moves_the_timeout_and_silence_after_the_last_one_ends_the_session(
        serve: Callable[..., Running]) -> None:
    """RFC 5321 §4.5.3.2: the timeout runs from the last command, however long the session has lasted."""
    running = serve(command_timeout=0.5)
    client = running.raw()
    try:
        assert client.reply().startswith("220")
        started = last = time.monotonic()
        while last - started < 1.5:  # three timeouts' worth of a client that keeps talking
            time.sleep(0.15)  # the client's pace: the gaps are what is tested
            client.send(b"NOOP\r\n")
            assert client.reply().startswith("250"), "disconnected although the client kept talking"
            last = time.monotonic()
        assert client.reply() == "421 4.4.2 Timeout exceeded, closing the connection"
        assert 0.4 < time.monotonic() - last < 3
    finally:
        client.close()


def test_a_unix_socket_peer_is_a_local_user(loop_thread: LoopThread, spool_dir: Path, tmp_path: Path) -> None:
    factory = ServerFactory(spool_root=spool_dir, listen=ListenSettings(), hostname="mx.test",
                            max_message_size=100_000, command_timeout=10)
    path = str(tmp_path / "submit.sock")

    async def listen_now() -> asyncio.Server:
        return await asyncio.get_running_loop().create_unix_server(factory, path)

    server = loop_thread.run(listen_now())
    try:
        with unix_client(path) as client:
            client.ehlo()
            code, reply = transaction(client, "root", ["root"])
        assert code == 250, reply
        data = (spool_dir / "new" / reply.rsplit(" ", 1)[1]).read_bytes()
        name = pwd.getpwuid(os.getuid()).pw_name
        assert f"Received: from local user {os.getuid()} ({name})\r\n\tby mx.test".encode() in data
    finally:
        server.close()


@pytest.mark.parametrize("users", [(), (("ann", Secret("pw")),)])
def test_a_session_knows_every_command_and_mechanism_its_class_has(users: tuple[tuple[str, Secret], ...]) -> None:
    """aiosmtpd finds them with dir() of the session, which SmtpSession keeps to those names."""
    session = SmtpSession(ServerFactory(spool_root=Path("/nonexistent"), listen=ListenSettings(users=users),
                                        hostname="mx.test", max_message_size=1000, command_timeout=1.0))
    names = dir(SmtpSession)
    assert set(session._smtp_methods) == {name.removeprefix("smtp_") for name in names if name.startswith("smtp_")}
    offered = {name.removeprefix("auth_") for name in names if name.startswith("auth_")} if users else set()
    assert set(session._auth_methods) == offered
    assert not users or offered >= {"PLAIN", "LOGIN"}
    hooks = {name.removeprefix("handle_") for name in dir(_Hooks) if name.startswith("handle_")}
    assert set(session._handle_hooks) == hooks and "DATA" in hooks


def test_a_multi_line_reply_leaves_in_one_write(serve: Callable[..., Running]) -> None:
    running = serve(listen=ListenSettings(users=(("ann", Secret("pw")),)))
    client = running.raw()
    try:
        assert client.reply().startswith("220 ")
        session = wait_until(lambda: next(iter(running.factory.sessions), None), message="the session")
        writes: list[bytes] = []
        write = session._writer.write

        def recorded(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        session._writer.write = recorded
        client.send(b"EHLO c\r\n")
        reply = client.reply()
        before_close = list(writes)  # the close makes the server write its 421 to a client that went away
    finally:
        client.close()
    assert len(reply.splitlines()) >= 5
    assert before_close == [reply.replace("\n", "\r\n").encode() + b"\r\n"]


def test_received_field_keeps_the_client_text_harmless() -> None:
    field = received_field(helo="evil (x) é;", peer=Peer(address="2001:db8::1"), hostname="mx.test",
                           protocol="ESMTP", date="Mon, 1 Dec 2025 10:00:00 +0000")
    assert field == (b"Received: from evil??x???? ([IPv6:2001:db8::1])\r\n"
                     b"\tby mx.test (mailwatchd) with ESMTP; Mon, 1 Dec 2025 10:00:00 +0000\r\n")


def test_a_lone_session_stores_on_the_event_loop_and_two_store_on_threads(
        serve: Callable[..., Running], loop_thread: LoopThread, spool_dir: Path) -> None:
    """inline_stores (the listener's own process): a lone client's message is written on the loop; while a
    second client is connected, on a store thread, so that one client's fsync never holds up the other."""
    writers: list[int] = []

    def deposit(data: bytes) -> str:
        writers.append(threading.get_ident())
        return enqueue(spool_dir, data)

    running = serve(deposit=deposit, inline_stores=True)
    with smtplib.SMTP(running.host, running.port, timeout=10) as client:
        client.sendmail("a@example.org", ["b@example.org"], b"Subject: alone\r\n\r\nx\r\n")
        with smtplib.SMTP(running.host, running.port, timeout=10) as other:
            other.ehlo("other.example.org")
            client.sendmail("a@example.org", ["b@example.org"], b"Subject: in company\r\n\r\nx\r\n")
    assert writers[0] == loop_thread.thread.ident
    assert writers[1] != loop_thread.thread.ident
    assert len(running.stored()) == 2 and len(running.queued) == 2


def test_a_new_connection_is_served_by_the_session_made_while_the_loop_was_idle(
        serve: Callable[..., Running]) -> None:
    running = serve()
    with smtplib.SMTP(running.host, running.port, timeout=10) as first:
        first.ehlo("first.example.org")
    spare = wait_until(lambda: running.factory._spare, message="the next connection's session, made ahead")
    with smtplib.SMTP(running.host, running.port, timeout=10) as second:
        assert second.ehlo("second.example.org")[0] == 250
        assert spare in running.factory.sessions  # this connection's session
        assert second.sendmail("a@example.org", ["b@example.org"], b"Subject: spare\r\n\r\nx\r\n") == {}
    assert len(running.stored()) == 1
    wait_until(lambda: running.factory._spare not in (None, spare), message="a fresh one for the connection after")
