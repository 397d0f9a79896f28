"""A test SMTP server that runs inside the machine, and the host's handle on it.

Inside (`python3 smtp_sink.py --port 2525 --dir /run/smtp-sink/NAME`, with aiosmtpd on PYTHONPATH, as a
transient `Type=notify` unit): every accepted message becomes `<dir>/<seq>.json`, written to a temporary
name and renamed, so a reader outside (through /proc/<pid>/root) never sees half a message. READY=1 is sent
once the socket listens, so `systemd-run` returns when the server accepts connections.
Outside: `SmtpSink.start(machine, ...)` installs the script, starts the unit and reads the messages back.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .machine import Machine

SCRIPT_PATH = "/usr/local/lib/mailwatchd-test/smtp_sink.py"
SINK_LIB = "/opt/mailwatchd-testsmtp"


# -- inside the machine ---------------------------------------------------------------------------

def _sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), "\0" + address[1:] if address.startswith("@") else address)


class SinkHandler:
    """Stores each message as one JSON file; answers DATA with `data_reply` when one is given, and only
    after `data_delay` seconds (a slow relay: the message is stored when the reply goes out)."""

    def __init__(self, directory: Path, data_reply: str | None, data_delay: float = 0.0) -> None:
        self.directory = directory
        self.data_reply = data_reply
        self.data_delay = data_delay
        # A sink started again on the same directory goes on numbering after what it stored before.
        self.count = max((int(path.stem) for path in directory.glob("[0-9]*.json")), default=0)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        self.count += 1
        login = session.auth_data
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "data_b64": base64.b64encode(bytes(envelope.original_content or b"")).decode(),
            "tls": session.ssl is not None,
            "login": login.login.decode() if login is not None and hasattr(login, "login") else None,
            "received_at": time.time(),
        }
        tmp = self.directory / f".{self.count:06d}.tmp"
        tmp.write_text(json.dumps(record))
        os.rename(tmp, self.directory / f"{self.count:06d}.json")
        return "250 2.0.0 OK: stored"


def serve(args: argparse.Namespace) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        kwargs["ssl_context" if args.implicit_tls else "tls_context"] = context
    if args.auth:
        user, password = args.auth.split(":", 1)

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == password
            return AuthResult(success=ok, handled=False, auth_data=data)  # auth_data: what session.auth_data gets
        kwargs["authenticator"] = authenticator
        kwargs["auth_require_tls"] = bool(args.tls_cert)
    handler = SinkHandler(directory, args.data_reply, args.data_delay)
    controller = Controller(handler, hostname=args.host, port=args.port, **kwargs)
    controller.start()
    _sd_notify("READY=1")
    try:
        asyncio.run(asyncio.Event().wait())
    finally:
        controller.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--data-reply", help="answer DATA with this reply instead of storing, e.g. '451 4.3.0 later'")
    parser.add_argument("--data-delay", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long after the message's final dot before replying")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte instead of STARTTLS")
    parser.add_argument("--auth", help="require AUTH as USER:PASSWORD")
    serve(parser.parse_args())


# -- outside: the host's handle ---------------------------------------------------------------------

@dataclass(frozen=True)
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    login: str | None


class SmtpSink:
    """A running sink in a machine: `messages()`, `wait_for(count)`, `stop()`."""

    def __init__(self, machine: Machine, name: str, port: int) -> None:
        self.machine = machine
        self.name = name
        self.port = port
        self.directory = f"/run/smtp-sink/{name}"

    @classmethod
    def start(cls, machine: Machine, name: str = "smtp-sink", port: int = 2525, args: Sequence[str] = ()) -> SmtpSink:
        """Start the sink as the transient unit `<name>.service`; `args` go to the script (see main())."""
        machine.write_file(SCRIPT_PATH, Path(__file__).read_bytes())
        sink = cls(machine, name, port)
        machine.systemd_run(f"{name}.service", ["/usr/bin/python3", SCRIPT_PATH, "--port", str(port),
                                                "--dir", sink.directory, *args],
                            "Type=notify", f"Environment=PYTHONPATH={SINK_LIB}", "Environment=PYTHONUNBUFFERED=1")
        return sink

    def messages(self) -> list[SinkMessage]:
        found = []
        directory = self.machine.host_path(self.directory)
        for path in sorted(directory.glob("[0-9]*.json")):
            record = json.loads(path.read_text())
            found.append(SinkMessage(record["mail_from"], record["rcpt_tos"], base64.b64decode(record["data_b64"]),
                                     record["tls"], record["login"]))
        return found

    def wait_for(self, count: int, timeout: float = 15.0) -> list[SinkMessage]:
        """Block until at least `count` messages arrived; fail at the deadline."""
        def enough() -> list[SinkMessage] | None:
            found = self.messages()
            return found if len(found) >= count else None
        return list(self.machine.wait_for(enough, timeout, f"{count} messages in {self.name}"))

    def stop(self) -> None:
        self.machine.systemctl("stop", f"{self.name}.service")


if __name__ == "__main__":
    main()
