"""Durable writes into the spool: tmp, fsync, rename, fsync the directory. And where the
Maildir drop is, the one part of the spool a submitter writes to.

Apart from store.py so that `sendmail` loads only what a submission needs.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from mailwatchd.errors import SpoolFull

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no room for the data, an inode or a directory entry


def drop_dirs(root: Path) -> tuple[Path, Path]:
    """The Maildir drop under a spool root: (tmp/, new/)."""
    return root / "tmp", root / "new"


def raise_if_full(exc: OSError) -> None:
    """Raise SpoolFull from `exc` when it says the filesystem is full; otherwise return."""
    if exc.errno in _FULL_ERRNOS:
        raise SpoolFull(f"the filesystem is full ({exc.strerror})") from exc


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to a new file at `path` and fsync it; SpoolFull when the disk is full."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise_if_full(exc)
        raise
    try:
        os.fchmod(fd, mode)  # exactly `mode`, whatever the writer's umask (the daemon reads 0640 drops)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise_if_full(exc)
        raise
    os.close(fd)


def install_durably(temporary: Path, final: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `temporary`, fsync, rename it to `final`, fsync that directory.

    `final` is never seen incomplete; on failure no temporary is left. SpoolFull when the disk is full.
    """
    write_durably(temporary, data, mode)
    try:
        os.rename(temporary, final)
        fsync_dir(final.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise_if_full(exc)
        raise
