"""Durable writes into the spool: tmp, fsync, rename, fsync the directory. And where the
Maildir drop is, the one part of the spool a submitter writes to.

Apart from store.py so that `sendmail` loads only what a submission needs.
"""

from __future__ import annotations

import errno
import os

from mailwatchd.errors import SpoolFull

TYPE_CHECKING = False  # mypy takes it as true; `sendmail` imports neither typing nor pathlib
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    StrPath = str | os.PathLike[str]

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no room for the data, an inode or a directory entry
DROP_TMP, DROP_NEW = "tmp", "new"  # the Maildir drop's directories under a spool root


def drop_dirs(root: Path) -> tuple[Path, Path]:
    """The Maildir drop under a spool root: (tmp/, new/)."""
    return root / DROP_TMP, root / DROP_NEW


def raise_if_full(exc: OSError) -> None:
    """Raise SpoolFull from `exc` when it says the filesystem is full; otherwise return."""
    if exc.errno in _FULL_ERRNOS:
        raise SpoolFull(f"the filesystem is full ({exc.strerror})") from exc


def fsync_dir(path: StrPath) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: StrPath, data: bytes, mode: int = 0o600, written: Callable[[], None] | None = None) -> None:
    """Write `data` to a new file at `path` and fsync it; SpoolFull when the disk is full. `written` is called
    once the data is in the file, before the fsync."""
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
        if written is not None:
            written()
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _remove(path)
        raise_if_full(exc)
        raise
    os.close(fd)


def install_durably(temporary: StrPath, final: StrPath, data: bytes, mode: int = 0o600,
                    written: Callable[[], None] | None = None) -> None:
    """Write `data` to `temporary`, fsync, rename it to `final`, fsync that directory.

    `final` is never seen incomplete; on failure no temporary is left. SpoolFull when the disk is full.
    `written`: as write_durably's.
    """
    write_durably(temporary, data, mode, written)
    try:
        os.rename(temporary, final)
        fsync_dir(os.path.dirname(final) or ".")  # Path.parent's answer, without pathlib
    except OSError as exc:
        _remove(temporary)
        raise_if_full(exc)
        raise


def _remove(path: StrPath) -> None:
    """Unlink `path` if it can be; an error here is not the one to report."""
    try:  # noqa: SIM105 - contextlib.suppress would cost each `sendmail` run the contextlib import
        os.unlink(path)
    except OSError:
        pass
