"""The SMTP listener in a process of its own, as Postfix's smtpd is apart from its queue manager.

Sessions and their stores then run on a CPU of their own: a busy client slows neither deliveries
nor the watchdog, and the relay's work does not sit between a client's command and its reply.

The daemon binds the listening sockets (or takes systemd's), then starts `python -I -c BOOT` with
them, two pipes and its configuration (a pickled ChildConfig in a memfd, which the child reads to
its end: however long the AUTH users file, the daemon never waits on the child to read it). It
keeps the control pipe open and writes nothing into it. It does not wait for the child: the
sockets listen already, so a client that connects meanwhile waits in the backlog, as it does while
systemd restarts the service. The child says on the events pipe `listening <json>` (or `failed
<json>`, and exits). For each message it then says `storing <id> <size>` once the bytes are in
queue/'s temporary file, before the fsyncs, so that the daemon can start relaying it meanwhile
(spool/pending.py); then `queued <id> <size>` once it is durably in queue/ (the same moment its 250
is written: a kill between the two leaves the message to recovery), or `dropped <id>` when the store
failed after all.

The child stops when the control pipe ends (the daemon is stopping, or died): a session in DATA
gets its reply, the others 421. It ignores SIGTERM and SIGINT, which systemd and a terminal send
the whole process group: its stop is the daemon's to order, so that its end is never taken for a
crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mailwatchd.service.logs import get_logger
from mailwatchd.settings.listen import ListenSettings
from mailwatchd.submission.listener import Address, Listener, address_of

log = get_logger()

EXIT_WAIT_S = 5.0  # after the child's sessions had their grace: how long its exit may take
# Run by `python -I -c`. The comment is what ps(1) shows first. The child starts with SIGTERM and SIGINT
# blocked (ListenerProcess.start): ignored before they are let through, one sent to the process group
# while it starts is dropped, not its death. Then the daemon's own import path, and the entry point.
_HELD = (signal.SIGTERM, signal.SIGINT)
BOOT = ("# mailwatchd SMTP listener\nimport signal\n"
        "for held in (signal.SIGTERM, signal.SIGINT): signal.signal(held, signal.SIG_IGN)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))\n"
        "import json, sys; sys.path[:] = json.loads(sys.argv[1])\n"
        "from mailwatchd.submission.process import child_main; sys.exit(child_main(sys.argv[2:]))")
PROCESS_NAME = b"mailwatchd"  # what ss -ltnp and ps -e show for the process holding port 25


class Stores(Protocol):
    """What the daemon does with the child's messages (called on its event loop)."""

    def storing(self, queue_id: str, size: int) -> None:
        """The message's bytes are written; it is not durable yet."""

    def queued(self, queue_id: str, size: int) -> None:
        """The message is durably in queue/ (its client is getting its 250)."""

    def dropped(self, queue_id: str) -> None:
        """The store failed after `storing`: there is no message."""


@dataclass(frozen=True)
class ChildConfig:
    """What the listener process needs of the daemon's settings."""

    spool: Path
    listen: ListenSettings
    hostname: str
    max_message_size: int
    command_timeout: float
    stop_grace: float
    log_format: str
    log_level: str


class ListenerProcess:
    """The daemon's side: starts the child, tells `stores` of its messages (on the event loop), and calls
    `on_exit` with its exit status should it end while the daemon does not stop it."""

    def __init__(self, config: ChildConfig, sockets: list[socket.socket], *,
                 stores: Stores, on_exit: Callable[[int | None], None]) -> None:
        self.config = config
        self.sockets = sockets
        self.stores = stores
        self.on_exit = on_exit
        self.addresses: list[Address] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._control = -1
        self._events = -1
        self._buffer = bytearray()
        self._ended: asyncio.Future[None] | None = None
        self._stopping = False
        self._reaper: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start the child (OSError if it cannot be); the daemon's copies of the sockets are closed either way."""
        loop = asyncio.get_running_loop()
        self.addresses = [address_of(sock) for sock in self.sockets]
        settings = config_file(self.config)
        control_read, control_write = os.pipe()
        events_read, events_write = os.pipe()
        fds = [sock.fileno() for sock in self.sockets]
        # Blocked in this thread while it forks, so in the child from its first instruction; a signal for
        # the daemon meanwhile goes to another of its threads, and Python's handler takes it as ever.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", BOOT, json.dumps(sys.path), str(control_read), str(events_write),
                 str(settings), *map(str, fds)],
                pass_fds=(control_read, events_write, settings, *fds), stdin=subprocess.DEVNULL)
        except OSError:
            for fd in (control_read, control_write, events_read, events_write):
                os.close(fd)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            os.close(settings)
            for sock in self.sockets:
                sock.close()
        os.close(control_read)
        os.close(events_write)
        self._control, self._events = control_write, events_read
        self._ended = loop.create_future()
        os.set_blocking(events_read, False)
        loop.add_reader(events_read, self._readable)

    def _readable(self) -> bool:
        """Take what the child wrote; False when there was nothing to read yet."""
        try:
            chunk = os.read(self._events, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            self._ended_now()
            return True
        self._buffer += chunk
        *lines, rest = self._buffer.split(b"\n")
        self._buffer[:] = rest
        for line in lines:
            try:
                self._event(bytes(line))
            except Exception:  # one bad line must not cost the lines after it (a later message's `queued`)
                log.exception("listener_event_failed", line=bytes(line[:200]).decode("ascii", "replace"))
        return True

    def _event(self, line: bytes) -> None:
        kind, _, rest = line.partition(b" ")
        if kind == b"storing":
            queue_id, _, size = rest.decode("ascii").partition(" ")
            self.stores.storing(queue_id, int(size))
        elif kind == b"queued":
            queue_id, _, size = rest.decode("ascii").partition(" ")
            self.stores.queued(queue_id, int(size))
        elif kind == b"dropped":
            self.stores.dropped(rest.decode("ascii"))
        elif kind == b"listening":
            log.debug("listener_serving", pid=self.pid)
        elif kind == b"failed":  # its exit follows: on_exit
            log.error("listener_failed", detail=json.loads(rest))

    def _ended_now(self) -> None:
        """The events pipe ended: the child has exited (or is exiting)."""
        asyncio.get_running_loop().remove_reader(self._events)
        os.close(self._events)
        self._events = -1
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        if not self._stopping:
            self._reaper = asyncio.get_running_loop().create_task(self._report_exit())

    async def _report_exit(self) -> None:
        status = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = await asyncio.to_thread(self.proc.wait, EXIT_WAIT_S)
        self.on_exit(status)

    async def stop(self, grace: float) -> int | None:
        """End the control pipe (the child stops: `grace` for a session in DATA), wait for its exit; SIGKILL
        after grace + EXIT_WAIT_S. Its exit status, or None."""
        self._stopping = True
        if self._control >= 0:
            os.close(self._control)
            self._control = -1
        if self.proc is None:
            return None
        if self._ended is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._ended), grace + EXIT_WAIT_S)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        status = await asyncio.to_thread(self.proc.wait)
        while self._events >= 0 and self._readable():  # what it wrote before it ended, to the end
            pass
        return status


# -- the child ------------------------------------------------------------------------------------


def config_file(config: ChildConfig) -> int:
    """A memfd holding `config`, read from its start (the daemon's side: passed to the child, then closed)."""
    fd = os.memfd_create("mailwatchd-listener-config", os.MFD_CLOEXEC)
    try:
        _write_all(fd, pickle.dumps(config))
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def child_main(argv: list[str]) -> int:
    """`BOOT`'s entry point: argv is the control pipe, the events pipe, the configuration (config_file),
    then the listening sockets."""
    control, events, settings, *fds = map(int, argv)
    with contextlib.suppress(OSError), open("/proc/self/comm", "wb") as comm:  # cosmetic
        comm.write(PROCESS_NAME)
    for signum in (signal.SIGHUP, signal.SIGUSR1):  # the daemon's to act on (BOOT ignores SIGTERM, SIGINT)
        signal.signal(signum, signal.SIG_IGN)
    config = read_config(settings)
    from mailwatchd.service import logs

    logs.configure(config.log_format, config.log_level)
    sockets = [socket.socket(fileno=fd) for fd in fds]
    return asyncio.run(_serve(config, control, events, sockets))


def read_config(fd: int) -> ChildConfig:
    """The child's side of config_file: read to the end, then closed."""
    with os.fdopen(fd, "rb") as settings:
        config = pickle.load(settings)  # noqa: S301 - written by our own parent, passed to us alone
    assert isinstance(config, ChildConfig)
    return config


async def _serve(config: ChildConfig, control: int, events: int, sockets: list[socket.socket]) -> int:
    from mailwatchd.spool.store import Spool
    from mailwatchd.submission.smtpserver import Queued, ServerFactory

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def control_readable() -> None:
        if not os.read(control, 4096):  # the daemon is stopping, or died: stop taking mail
            loop.remove_reader(control)
            stopping.set()

    loop.add_reader(control, control_readable)
    spool = Spool(config.spool, max_message_size=config.max_message_size)

    def deposit(data: bytes) -> str:
        """spool.accept, telling the daemon of the message before its fsyncs (on a store thread, or the loop)."""
        told: list[str] = []

        def written(queue_id: str) -> None:
            _tell(events, f"storing {queue_id} {len(data)}")
            told.append(queue_id)

        try:
            return spool.accept(data, written)
        except BaseException:
            if told:
                _tell(events, f"dropped {told[0]}")
            raise

    def queued(message: Queued) -> None:
        _tell(events, f"queued {message.queue_id} {message.size}")
        log.info("smtp_received", queue_id=message.queue_id, peer=message.peer, size=message.size,
                 recipients=message.recipients)

    factory = ServerFactory(spool_root=config.spool, listen=config.listen, hostname=config.hostname,
                            max_message_size=config.max_message_size, command_timeout=config.command_timeout,
                            on_queued=queued, deposit=deposit, inline_stores=True)
    listener = Listener(factory, config.listen, sockets)
    try:
        await listener.start()
    except OSError as exc:
        _tell(events, "failed " + json.dumps(exc.strerror or str(exc)))
        return 1
    _tell(events, "listening " + json.dumps(listener.addresses))
    await stopping.wait()
    await listener.stop(config.stop_grace)
    factory.store_threads.close()
    return 0


def _tell(events: int, line: str) -> None:
    """One line to the daemon. Blocking: a daemon that reads slowly slows the listener, never loses a line.
    From the loop and the store threads alike: a line is far shorter than PIPE_BUF, so one write(2), whole."""
    _write_all(events, (line + "\n").encode())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
