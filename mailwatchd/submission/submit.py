"""The submitter's side: put a message durably into the spool's new/ directory.

Maildir delivery: write tmp/<id>, fsync, rename into new/<id>, fsync new/. Nothing
half-written is ever visible in new/. Never waits on the network (no DNS either), and
never completes addresses: a bare local name (`root`) is stored as given, and the
daemon qualifies it from its own settings (addressing.py).
"""

from __future__ import annotations

import os
import time

from mailwatchd.errors import MalformedMessage
from mailwatchd.message import envelope
from mailwatchd.message.maildomain import MAILNAME_PATH, host_node_name, read_mailname
from mailwatchd.records import NamedTuple
from mailwatchd.spool.durable import DROP_NEW, DROP_TMP, install_durably
from mailwatchd.spool.queueid import new_queue_id

TYPE_CHECKING = False  # mypy takes it as true; `sendmail` imports neither typing nor pathlib
if TYPE_CHECKING:
    from collections.abc import Sequence

_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Submission(NamedTuple):
    """What a sendmail-style command line asked for."""

    sender: str | None = None  # -f
    full_name: str | None = None  # -F
    recipients: tuple[str, ...] = ()
    from_headers: bool = False  # -t
    dot_ends_input: bool = True  # cleared by -i / -oi


def enqueue(spool_root: str | os.PathLike[str], data: bytes) -> str:
    """Store `data` in new/ durably; returns the queue id. SpoolFull when the disk is full."""
    tmp_dir, new_dir = os.path.join(spool_root, DROP_TMP), os.path.join(spool_root, DROP_NEW)
    for directory in (tmp_dir, new_dir):
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
    queue_id = new_queue_id()
    install_durably(os.path.join(tmp_dir, queue_id), os.path.join(new_dir, queue_id), data, mode=0o640)
    return queue_id


def read_message(stream: object, dot_ends_input: bool) -> bytes:
    """Read a message from a binary stream; classic sendmail stops at a lone '.' line."""
    read = getattr(stream, "read")  # noqa: B009 - typed loosely to accept any binary stream
    if not dot_ends_input:
        return bytes(read())
    lines = []
    readline = getattr(stream, "readline")  # noqa: B009
    while True:
        line = readline()
        if not line or line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def message_id_domain(mailname: str | os.PathLike[str] = MAILNAME_PATH) -> str:
    """The right side of a Message-ID: /etc/mailname, else the host name. Unique, not routable; no DNS."""
    return read_mailname(mailname) or host_node_name()


def date_value(now: float) -> str:
    """A Date field's value in local time (RFC 5322 §3.3), as email.utils.formatdate(now, localtime=True)
    writes it; email.utils would cost a `sendmail` run more than the rest of its imports."""
    t = time.localtime(now)
    sign, offset = ("-", -t.tm_gmtoff) if t.tm_gmtoff < 0 else ("+", t.tm_gmtoff)
    return (f"{_DAY_NAMES[t.tm_wday]}, {t.tm_mday:02d} {_MONTH_NAMES[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{offset // 3600:02d}{offset // 60 % 60:02d}")


def message_id(domain: str) -> str:
    """A Message-ID field's value of email.utils.make_msgid's form: <time.pid.random@domain>."""
    return f"<{int(time.time() * 100)}.{os.getpid()}.{int.from_bytes(os.urandom(8), 'big')}@{domain}>"


def _local_user() -> str:
    import getpass  # only for a message with no From and no -f

    return getpass.getuser()


def _mailbox(name: str, address: str) -> str:
    """A From field's value. formataddr takes ASCII addresses only; RFC 6532 §3.2 allows UTF-8."""
    if not name:
        return address
    from email.utils import formataddr  # only for a -F name: it may need quoting or RFC 2047 encoding

    if address.isascii():
        return formataddr((name, address))
    return f"{formataddr((name, 'x@x')).removesuffix(' <x@x>')} <{address}>"


def prepare(raw: bytes, submission: Submission) -> bytes:
    """The spool file for a submission: headers completed, explicit envelope where given.

    Adds From (from -f/-F or the local user's bare name), Date and Message-ID when missing, as
    MTAs do on submission (RFC 6409 §8). Bare local names are kept: the daemon completes them.
    MalformedMessage when it could not be sent.
    """
    if not raw.strip():
        raise MalformedMessage("the message is empty")
    newline = b"\r\n" if b"\r\n" in raw[:2000] else b"\n"
    try:
        fields, _ = envelope.split_header(raw)
        names = {field.name for field in fields}
    except MalformedMessage:
        names = set()
        if not raw.startswith((b"\n", b"\r\n")):
            raw = newline + raw  # a body with no header at all: the blank line that will end the added ones
    sender = submission.sender
    if sender:
        envelope.check_address(sender, "sender", local=True)
    added = []
    if b"from" not in names:
        added.append(f"From: {_mailbox(submission.full_name or '', sender or _local_user())}".encode())
    if b"date" not in names:
        added.append(f"Date: {date_value(time.time())}".encode())
    if b"message-id" not in names:
        added.append(f"Message-ID: {message_id(message_id_domain())}".encode())
    if added:
        raw = newline.join(added) + newline + raw
    recipients = list(submission.recipients)
    if recipients and submission.from_headers:
        parsed = envelope.parse("check", raw)
        recipients = list(dict.fromkeys([*parsed.recipients, *recipients]))
    if recipients or sender is not None:
        if not recipients:
            recipients = list(envelope.parse("check", raw).recipients)
        if sender is None:
            sender = envelope.sender_of(raw)
        raw = envelope.with_envelope(raw, sender, recipients)
    envelope.parse("check", raw)  # MalformedMessage if unusable
    return raw


def parse_sendmail_args(argv: Sequence[str]) -> Submission:
    """Parse sendmail(8) options: -t, -i/-oi, -f, -F, -o*, -B*, -bm; the rest are recipients.

    Raises ValueError with a message for options mailwatchd does not support.
    """
    sender: str | None = None
    full_name: str | None = None
    recipients: list[str] = []
    from_headers = False
    dot_ends = True
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            recipients.extend(args[index:])
            break
        if not arg.startswith("-") or arg == "-":
            recipients.append(arg)
            continue
        if len(arg) > 2 and set(arg[1:]) <= {"t", "i"}:
            args[index:index] = [f"-{flag}" for flag in arg[1:]]  # bundled, as in "-ti"
            continue
        flag, value = arg[:2], arg[2:]
        if flag in ("-f", "-r", "-F", "-O", "-N", "-R", "-V", "-X", "-L", "-p", "-h") and not value:
            if index >= len(args):
                raise ValueError(f"option {arg} needs a value")
            value = args[index]
            index += 1
        if flag in ("-f", "-r"):
            sender = value.strip("<>")
        elif flag == "-F":
            full_name = value
        elif arg == "-t":
            from_headers = True
        elif arg in ("-i", "-oi") or (flag == "-o" and value == "i"):
            dot_ends = False
        elif flag == "-b" and value not in ("m", ""):
            raise ValueError(f"mode -b{value} is not supported by `mailwatchd sendmail`; "
                             "use `mailwatchd queue` (-bp) or `mailwatchd flush` (-q)")
        # -o*, -B*, -N, -R, -V, -X, -L, -p, -h, -v, -m, -e*, -bm: accepted and ignored
    return Submission(sender, full_name, tuple(recipients), from_headers, dot_ends)
