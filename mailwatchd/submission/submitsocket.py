"""The client side of the daemon's submit socket: how `sendmail` queues a message when this user
may not write to the spool. SMTP on a Unix socket that systemd holds open even while the daemon
restarts; one transaction under one deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mailwatchd import exitcodes
from mailwatchd.errors import NotQueued
from mailwatchd.settings.environment import SUBMIT_SOCKET

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from mailwatchd.message.envelope import OutgoingMessage

SUBMIT_SOCKET_ENV = "MAILWATCHD_SUBMIT_SOCKET"  # overrides SUBMIT_SOCKET (tests, non-systemd setups)
BS_SILENCE_LIMIT_S = 600.0
# One deadline for the whole socket transaction: socket activation may have to start the daemon.
SOCKET_DEADLINE_S = 60.0
_QUEUED_AS = re.compile(r"queued as (\S+)")  # the daemon's final reply: "250 2.0.0 Ok: queued as <id>"
_SYSTEMCTL_HINT = "is mailwatchd.socket running? (systemctl status mailwatchd.socket)"


def submit_socket() -> Path:
    return Path(os.environ.get(SUBMIT_SOCKET_ENV) or SUBMIT_SOCKET)


class _DeadlineSocket(socket.socket):
    """A socket whose every send and receive ends by one absolute deadline: a total for the
    transaction, so a server that drips a byte at a time cannot stretch it."""

    deadline = 0.0

    def arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline passed")
        self.settimeout(left)

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0, /) -> int:
        self.arm()
        return super().recv_into(buffer, nbytes, flags)

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        self.arm()
        super().sendall(data, flags)


def submit_over_socket(path: Path, message: OutgoingMessage, *, helo: str, spool_problem: str = "",
                       timeout: float = SOCKET_DEADLINE_S) -> str | None:
    """One SMTP transaction with the daemon on its Unix socket, all of it within `timeout` seconds.

    Returns the queue id the daemon names in its final 250, if any. NotQueued otherwise: 65 when
    the daemon refused the message or an address for good (outcome.classify_reply), 75 for
    everything else (no socket, nobody listening, a 4xx, a fault before MAIL, a timeout).
    """
    import smtplib

    from mailwatchd.transports.outcome import Outcome, Phase, classify_reply
    from mailwatchd.transports.smtpwire import Reply, wire_body

    def step(phase: Phase, reply: tuple[int, bytes], expected: range) -> Reply:
        answer = Reply(reply[0], reply[1].decode("utf-8", errors="replace"))
        if answer.code in expected:
            return answer
        if classify_reply(phase, answer.code, answer.text).outcome is Outcome.PERMANENT:
            raise NotQueued(exitcodes.DATAERR, f"the daemon refused the message: {answer}")
        raise NotQueued(exitcodes.TEMPFAIL, f"the daemon did not take the message: {answer}; "
                                            "nothing was queued: send it again later")

    deadline = time.monotonic() + timeout
    client = smtplib.SMTP(local_hostname=helo)
    try:
        sock = _DeadlineSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.sock = sock
        sock.deadline = deadline
        sock.arm()
        sock.connect(str(path))
        step(Phase.GREETING, client.getreply(), range(220, 221))
        step(Phase.EHLO, client.ehlo(helo), range(250, 251))
        options = ""
        if not all(address.isascii() for address in (message.sender, *message.recipients)):
            if not client.has_extn("smtputf8"):
                raise NotQueued(exitcodes.DATAERR, "the daemon's submit socket takes no non-ASCII address (SMTPUTF8)")
            options, client.command_encoding = " SMTPUTF8", "utf-8"
        if not message.data.isascii() and client.has_extn("8bitmime"):
            options += " BODY=8BITMIME"
        step(Phase.MAIL, client.docmd("MAIL", f"FROM:<{message.sender}>{options}"), range(200, 300))
        for recipient in message.recipients:
            step(Phase.RCPT, client.docmd("RCPT", f"TO:<{recipient}>"), range(200, 300))
        step(Phase.DATA, client.docmd("DATA"), range(354, 355))
        client.send(wire_body(message.data))
        final = step(Phase.BODY, client.getreply(), range(200, 300))
    except NotQueued:
        raise
    except FileNotFoundError:
        problem = f"the daemon's submit socket {path} is missing: {_SYSTEMCTL_HINT}"
    except ConnectionRefusedError:
        problem = f"nothing answers on the daemon's submit socket {path}: {_SYSTEMCTL_HINT}"
    except PermissionError as exc:
        problem = f"this user may not connect to the daemon's submit socket {path} ({exc.strerror})"
    except OSError as exc:  # smtplib reports a timeout in a read as SMTPServerDisconnected, from a TimeoutError
        if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError) or time.monotonic() >= deadline:
            problem = (f"the daemon did not complete the submission on {path} within {timeout:g} s: "
                       "is mailwatchd running? (systemctl status mailwatchd)")
        else:
            problem = f"the submission on the daemon's socket {path} failed: {exc or type(exc).__name__}"
    else:
        return match.group(1) if (match := _QUEUED_AS.search(final.text)) else None
    finally:
        with contextlib.suppress(OSError):
            client.quit()
        client.close()
    raise NotQueued(exitcodes.TEMPFAIL, f"{spool_problem + ' and ' if spool_problem else ''}{problem}; "
                                        "nothing was queued")


def relay_stdio(path: Path, spool: Path) -> int:
    """Carry an SMTP session between standard input/output and the daemon's submit socket.

    NotQueued (75) when the socket does not answer.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise NotQueued(exitcodes.TEMPFAIL,
                        f"cannot write to {spool / 'new'} and the daemon's submit socket {path} does not answer "
                        f"({exc.strerror or exc}): {_SYSTEMCTL_HINT}") from None

    def upstream() -> None:
        with contextlib.suppress(OSError):
            while data := os.read(0, 65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

    import threading

    threading.Thread(target=upstream, name="sendmail-bs", daemon=True).start()
    # The daemon ends a session that is silent for 5 minutes (RFC 5321 §4.5.3.2.7) with a 421: a
    # daemon silent for twice that is stuck, and the caller is told so rather than left waiting.
    sock.settimeout(BS_SILENCE_LIMIT_S)
    with sock:
        try:
            while data := sock.recv(65536):
                os.write(1, data)
        except TimeoutError:
            raise NotQueued(exitcodes.TEMPFAIL, f"the daemon said nothing on {path} for "
                                                f"{BS_SILENCE_LIMIT_S:g}s: {_SYSTEMCTL_HINT}") from None
    return exitcodes.OK
