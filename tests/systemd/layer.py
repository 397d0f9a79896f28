"""mailwatchd as installed on a server, for the machine: built on the host once per test session.

The layer is a directory tree copied into the machine's upper layer at boot:
- `/opt/mailwatchd/venv`: a venv from Debian's `/usr/bin/python3` (ProtectHome hides any Python under /root)
  with the project's wheel and its runtime dependencies, installed with `--no-index` from wheels built here;
- `/opt/mailwatchd-testsmtp`: aiosmtpd for the test SMTP sink, kept out of the daemon's venv so a missing
  dependency of the daemon cannot hide behind one of the sink's.
`sink_layer` holds only the latter, and `wheels` the wheels both were installed from: a machine that installs
mailwatchd itself (the README's steps) boots with the sink layer and installs from those wheels offline.
The venv is created inside a private mount namespace with the layer's `opt/` bound on `/opt`, so its absolute
paths (script shebangs) are the ones it has in the machine and the host's /opt is never written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .machine import Machine

PROJECT = Path(__file__).resolve().parents[2]
PACKAGING = PROJECT / "packaging" / "systemd"
SYSTEM_PYTHON = "/usr/bin/python3"
VENV = "/opt/mailwatchd/venv"
SINK_LIB = "/opt/mailwatchd-testsmtp"
APP_LIB = "/opt/mailwatchd-testapp"  # Django, for an app that sends through localhost:25
# What a package would install: (file in packaging/systemd, path on the server).
PACKAGING_FILES = (
    ("mailwatchd.service", "/usr/lib/systemd/system/mailwatchd.service"),
    ("mailwatchd.socket", "/usr/lib/systemd/system/mailwatchd.socket"),
    ("mailwatchd.sysusers", "/usr/lib/sysusers.d/mailwatchd.conf"),
    ("mailwatchd.tmpfiles", "/usr/lib/tmpfiles.d/mailwatchd.conf"),
)


@dataclass(frozen=True)
class Layer:
    """A built layer, its parts, and what building it cost."""

    path: Path
    wheels_seconds: float
    venv_seconds: float
    sink_layer: Path  # /opt/mailwatchd-testsmtp and /opt/mailwatchd-testapp alone
    wheels: Path  # the project's wheel and its dependencies' (aiosmtpd's too)


def _pip_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def build_wheels(workdir: Path) -> Path:
    """Wheels of the project (from a copy of its sources, so no build/ lands in the tree) and its deps."""
    source = workdir / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (PROJECT / name).exists():
            shutil.copy2(PROJECT / name, source / name)
    shutil.copytree(PROJECT / "mailwatchd", source / "mailwatchd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = workdir / "wheels"
    # Uses the host's pip configuration (index or find-links) for the dependencies; nothing at run time.
    _run([SYSTEM_PYTHON, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), str(source), "aiosmtpd",
          "django"],
         _pip_env(), "building wheels")
    return wheels


def build_layer(workdir: Path) -> Layer:
    """Build the mailwatchd layer under `workdir` (a session-scoped temporary directory)."""
    started = time.monotonic()
    wheels = build_wheels(workdir)
    built_wheels = time.monotonic()
    layer = workdir / "layer"
    (layer / "opt").mkdir(parents=True)
    (layer / "opt").chmod(0o755)  # it becomes the machine's /opt
    env = {**_pip_env(), "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(wheels), "PIP_NO_INDEX": "1"}
    script = (
        'set -e; umask 022; mount --bind "$LAYER/opt" /opt; '
        f"{SYSTEM_PYTHON} -m venv --without-pip {VENV}; "
        f"{SYSTEM_PYTHON} -m pip --python {VENV}/bin/python install --quiet mailwatchd; "
        f"{SYSTEM_PYTHON} -m pip install --quiet --root-user-action=ignore --target {SINK_LIB} aiosmtpd; "
        f"{SYSTEM_PYTHON} -m pip install --quiet --root-user-action=ignore --target {APP_LIB} django"
    )
    _run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script], {**env, "LAYER": str(layer)},
         "installing into the layer")
    sink_layer = workdir / "sink-layer"
    (sink_layer / "opt").mkdir(parents=True)
    (sink_layer / "opt").chmod(0o755)
    for lib in (SINK_LIB, APP_LIB):
        shutil.copytree(layer / lib.lstrip("/"), sink_layer / lib.lstrip("/"), symlinks=True)
    return Layer(layer, built_wheels - started, time.monotonic() - built_wheels, sink_layer, wheels)


def install_packaging(machine: Machine) -> None:
    """Before boot: put the unit, sysusers.d and tmpfiles.d files where a package would."""
    for name, target in PACKAGING_FILES:
        machine.write_file(target, (PACKAGING / name).read_bytes())


def postinst(machine: Machine) -> None:
    """After boot: what a package's postinst does (create users, the spool, reload units)."""
    # A fresh host has no spool: one a run by hand left on this host's root (seen through the overlay)
    # must not leak in. Removed on the overlay only.
    machine.run(["rm", "-rf", "/var/spool/mailwatchd"])
    machine.run(["systemd-sysusers", "mailwatchd.conf"])
    machine.run(["systemd-tmpfiles", "--create", "mailwatchd.conf"])
    machine.systemctl("daemon-reload")
