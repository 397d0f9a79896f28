"""Where SMTP sessions come from: listening sockets (systemd's, sd_listen_fds(3), or bound here)
and `sendmail -bs`, one session over standard input and output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterable, MutableMapping

from mailwatchd import exitcodes
from mailwatchd.errors import ConfigError
from mailwatchd.settings.listen import ListenSettings

TYPE_CHECKING = False
if TYPE_CHECKING:  # the daemon uses bind() and inherited_sockets() and leaves aiosmtpd to its listener process
    from mailwatchd.submission.smtpserver import ServerFactory

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here
LISTEN_ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
BACKLOG = 100
STOP_GRACE_S = 5.0  # a session in DATA may finish its reply this long after stop()
_CHUNK = 65536

Address = tuple[str, int] | str  # (host, port), or a Unix socket's path


def inherited_sockets(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The listening stream sockets systemd passed us (LISTEN_PID is ours), non-blocking and close-on-exec.

    LISTEN_* are removed from `environ` either way, so that no child takes them for its own.
    """
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    for key in LISTEN_ENVIRONMENT:
        environ.pop(key, None)
    if not (pid.isdigit() and count.isdigit()) or int(pid) != os.getpid():
        return []
    sockets: list[socket.socket] = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            raise ConfigError("LISTEN_FDS", f"descriptor {fd} from systemd is not a socket",
                              "use ListenStream= in the socket unit") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ConfigError("LISTEN_FDS", f"descriptor {fd} from systemd is not a listening stream socket",
                              "use ListenStream= and Accept=no in the socket unit")
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; an IPv6 one takes IPv6 only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say so, and with
    # Nagle on, a multi-line reply waits for the client's delayed ACK (40 ms per EHLO).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_all(addresses: Iterable[tuple[str, int]]) -> list[socket.socket]:
    """bind() each address; on the first failure the ones bound so far are closed and the OSError raised."""
    sockets: list[socket.socket] = []
    try:
        for host, port in addresses:
            sockets.append(bind(host, port))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def address_of(sock: socket.socket) -> Address:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return str(name[0]), int(name[1])
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


class Listener:
    """Serves SMTP sessions on systemd's sockets when it passed any, else on MAILWATCHD_LISTEN."""

    def __init__(self, factory: ServerFactory, listen: ListenSettings, inherited: list[socket.socket]) -> None:
        self.factory = factory
        self.listen = listen
        self.inherited = list(inherited)
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sockets = list(self.inherited) or bind_all(self.listen.addresses)
        try:
            for sock in sockets:
                if sock.family == socket.AF_UNIX:
                    server = await loop.create_unix_server(self.factory, sock=sock, backlog=BACKLOG)
                else:
                    server = await loop.create_server(self.factory, sock=sock, backlog=BACKLOG)
                self._servers.append(server)
        except BaseException:
            for server in self._servers:
                server.close()
            for sock in sockets:
                sock.close()
            self._servers = []
            raise

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop accepting, then end the open sessions (one in DATA gets up to `grace` seconds)."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        await self.factory.close_all(grace)
        for server in servers:
            await server.wait_closed()

    @property
    def addresses(self) -> list[Address]:
        return [address_of(sock) for server in self._servers for sock in server.sockets]


async def serve_stdio(factory: Callable[[], asyncio.Protocol], stdin: int = 0, stdout: int = 1) -> int:
    """`sendmail -bs`: one SMTP session over stdin/stdout. 0 once the client QUITs or closes stdin."""
    loop = asyncio.get_running_loop()
    server_end, client_end = socket.socketpair()
    finished: asyncio.Future[int] = loop.create_future()

    def pump_in() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(stdin, _CHUNK):
                client_end.sendall(chunk)
        with contextlib.suppress(OSError):
            client_end.shutdown(socket.SHUT_WR)  # the session sees EOF, as from a closed connection

    def pump_out() -> None:
        status = exitcodes.OK
        try:
            while chunk := client_end.recv(_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(stdout, view):]
        except OSError:
            status = exitcodes.IOERR
        loop.call_soon_threadsafe(finished.set_result, status)

    transport, _ = await loop.connect_accepted_socket(factory, server_end)
    # Threads, not the event loop: stdin may be a regular file, which epoll cannot watch. The
    # reader may stay blocked on a stdin nobody closes; as a daemon thread it does not hold the exit.
    threading.Thread(target=pump_in, name="stdio-in", daemon=True).start()
    threading.Thread(target=pump_out, name="stdio-out", daemon=True).start()
    try:
        return await finished
    finally:
        transport.close()
        client_end.close()
