"""Intake's start costs no `ldconfig` run: inotify_simple would find libc with ctypes.util.find_library."""

from __future__ import annotations

import subprocess
import sys


def test_creating_the_inotify_watch_never_asks_find_library_for_libc() -> None:
    # A fresh interpreter: inotify_simple keeps the libc it found in a module global.
    script = (
        "import ctypes.util\n"
        "def refuse(name):\n"
        "    raise AssertionError(f'find_library({name!r}) runs ldconfig -p')\n"
        "ctypes.util.find_library = refuse\n"
        "import mailwatchd.spool.intake\n"
        "from inotify_simple import INotify, flags\n"
        "import tempfile\n"
        "watch = INotify()\n"
        "watch.add_watch(tempfile.mkdtemp(), flags.CREATE)\n"
        "print('watching')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == "watching\n", done.stderr
