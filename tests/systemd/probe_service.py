"""Stands in for `mailwatchd run` under the real mailwatchd.service (a drop-in swaps ExecStart only), to
show the unit's sandbox lets a Python asyncio daemon do its job, using mailwatchd's notify and journal.

It claims every drop in new/ into queue/, sends it with aiosmtplib to the SMTP sink on 127.0.0.1:2525,
checks what the sandbox must forbid, reports the findings as JSON in STATUS= (and a journal entry with
fields), then sends READY=1 and waits: SIGHUP → RELOADING=1 … READY=1, SIGTERM → STOPPING=1, exit 0.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import pwd
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiosmtplib

from mailwatchd.service import journal, notify


def denied(action: Any) -> bool:
    try:
        action()
    except OSError:  # EPERM, EACCES, EROFS, EAFNOSUPPORT: whichever the sandbox answers with
        return True
    return False


async def deliver(spool: Path) -> list[str]:
    claimed = []
    for name in sorted(os.listdir(spool / "new")):
        data = (spool / "new" / name).read_bytes()
        os.rename(spool / "new" / name, spool / "queue" / name)
        await aiosmtplib.send(data, sender="probe@example.com", recipients=["rcpt@example.com"],
                              hostname="127.0.0.1", port=2525, start_tls=False, timeout=10)
        os.unlink(spool / "queue" / name)
        claimed.append(name)
    return claimed


def findings(claimed: list[str]) -> dict[str, Any]:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY", "")
    password = Path(credentials, "email-host-password").read_text() if credentials else None
    spool = Path(os.environ["MAILWATCHD_SPOOL"])
    (spool / "meta" / "probe.json").write_text("{}")  # ReadWritePaths: the spool is writable
    Path("/tmp/probe").write_text("private")  # PrivateTmp: a /tmp of its own
    return {
        "claimed": claimed,
        "user": pwd.getpwuid(os.getuid()).pw_name,
        "password_length": None if password is None else len(password.rstrip("\n")),
        "wx_mapping_denied": denied(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE
                                                      | mmap.PROT_EXEC)),
        # /run/lock is world-writable: only ProtectSystem=strict keeps the service out.
        "run_lock_write_denied": denied(lambda: Path("/run/lock/probe").write_text("x")),
        "netlink_denied": denied(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
        "stderr_is_journal": journal.stream_is_journal(sys.stderr),
        "watchdog_interval": notify.Notifier().watchdog_interval(),
    }


async def main() -> None:
    notifier = notify.Notifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hup = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    spool = Path(os.environ["MAILWATCHD_SPOOL"])
    report = findings(await deliver(spool))
    print("<4>probe: a warning on stderr", file=sys.stderr, flush=True)
    journal.send("probe finished", 6, {"EVENT": "probe_done", "QUEUE_ID": ",".join(report["claimed"]) or "none",
                                       "REPORT": json.dumps(report, indent=1)})
    notifier.status(json.dumps(report))
    notifier.ready()
    while not stop.is_set():
        notifier.watchdog_ping()
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(hup.wait())]
        await asyncio.wait(waiters, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if hup.is_set():
            hup.clear()
            notifier.reloading()
            print("probe: reloaded", flush=True)
            notifier.ready()
    notifier.stopping()


if __name__ == "__main__":
    asyncio.run(main())
