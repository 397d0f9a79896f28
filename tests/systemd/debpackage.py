"""The Debian package, as the README builds it, for the machine: built on the host from a copy of the checkout.

- `start_build(workdir, ...)` runs `dpkg-buildpackage -us -uc -b` in a copy of the checkout's packaged parts
  (debian/, mailwatchd/, packaging/, pyproject.toml, README.md), in the background; `.wait()` gives the .deb.
  A copy may carry a newer version (a changelog entry on top, as `dch` writes it) and a changed env file
  template: the package an upgrade installs.
- `download_debs(packages, into)`: what `apt-get install PACKAGES` would fetch on this host, fetched and not
  installed (the machine's root is an overlay of this host's, so it lacks exactly what this host lacks).
- `dummy_package(...)`: a package with nothing in it but its control fields, made with dpkg-deb.
- `lintian(deb)`: lintian's tags for the package.

The build needs the Build-Depends of debian/control on this host, and PyPI (dh-virtualenv's pip); the rest, in
the machine, is offline.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from .layer import PROJECT

PACKAGE = "mailwatchd"
SOURCES = ("debian", "mailwatchd", "packaging", "pyproject.toml", "README.md", "LICENSE")
BUILD_COMMAND = ("dpkg-buildpackage", "-us", "-uc", "-b")  # as the README's package block has it
BUILD_TIMEOUT_S = 600
MAINTAINER = "mailwatchd maintainers <mailwatchd@example.org>"


@dataclass(frozen=True)
class Built:
    """A built package and what building it cost."""

    deb: Path
    version: str
    seconds: float


class PendingBuild:
    """`dpkg-buildpackage` running in the background; `wait()` for the .deb."""

    def __init__(self, source: Path, version: str) -> None:
        self.source = source
        self.version = version
        self.log = source.parent / "build.log"
        self.started = time.monotonic()
        env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # not the test venv's bin
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(BUILD_COMMAND, cwd=source, env=env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def wait(self) -> Built:
        try:
            code = self.process.wait(timeout=max(BUILD_TIMEOUT_S - (time.monotonic() - self.started), 1.0))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"dpkg-buildpackage did not finish in {BUILD_TIMEOUT_S}s:\n{self._tail()}") from None
        seconds = time.monotonic() - self.started
        if code != 0:
            raise RuntimeError(f"dpkg-buildpackage exited {code}:\n{self._tail()}")
        [deb] = self.source.parent.glob(f"{PACKAGE}_{self.version}_*.deb")
        return Built(deb, self.version, seconds)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def missing_build_tools() -> str | None:
    """What this host lacks to build and check the package (debian/control's Build-Depends, lintian), or None."""
    checked = subprocess.run(["dpkg-checkbuilddeps"], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    if checked.returncode != 0:
        return (checked.stderr.strip() or checked.stdout.strip()) + " (apt-get build-dep ./)"
    if shutil.which("lintian") is None:
        return "lintian is not installed"
    return None


def changelog_version(source: Path) -> str:
    """The version at the top of debian/changelog."""
    first = (source / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(rf"{PACKAGE} \(([^)]+)\)", first)
    assert match is not None, first
    return match.group(1)


def copy_sources(workdir: Path) -> Path:
    """The packaged parts of the checkout under `workdir/src` (no bytecode, no build leftovers)."""
    source = workdir / "src"
    source.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = PROJECT / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, source / name)
    # What a previous build in the checkout itself left in debian/ is not part of the sources.
    for leftover in ("mailwatchd", ".debhelper", "generated", "files", "debhelper-build-stamp", "mailwatchd.service"):
        target = source / "debian" / leftover
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return source


def add_changelog_entry(source: Path, version: str, change: str) -> None:
    """A new entry on top of debian/changelog, as `dch -v VERSION CHANGE` writes it."""
    changelog = source / "debian" / "changelog"
    entry = (f"{PACKAGE} ({version}) bookworm; urgency=medium\n\n  * {change}\n\n"
             f" -- {MAINTAINER}  {formatdate(usegmt=False)}\n\n")
    changelog.write_text(entry + changelog.read_text())


def start_build(workdir: Path, *, version: str | None = None, env_note: str | None = None) -> PendingBuild:
    """Build the package from a copy of the checkout; with `version`, as that newer version, and with `env_note`
    added to the env file template (a maintainer's change to the conffile)."""
    source = copy_sources(workdir)
    if version is not None:
        add_changelog_entry(source, version, "Rebuilt with a higher version (tests/systemd/test_debian.py).")
    if env_note is not None:
        template = source / "debian" / "mailwatchd.env"
        template.write_text(template.read_text() + f"# {env_note}\n")
    return PendingBuild(source, changelog_version(source))


def download_debs(packages: list[str], into: Path) -> list[Path]:
    """Fetch what `apt-get install PACKAGES` needs on this host into `into` (kept between runs); the .debs."""
    (into / "partial").mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["apt-get", "install", "--download-only", "--yes", "--quiet", "--no-install-recommends",
                             "-o", f"Dir::Cache::archives={into}", "-o", "APT::Sandbox::User=root", *packages],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if result.returncode != 0:
        raise RuntimeError(f"apt-get --download-only {' '.join(packages)} failed:\n{result.stdout}\n{result.stderr}")
    wanted = [line.split()[1] for line in subprocess.run(
        ["apt-get", "install", "--simulate", "--no-install-recommends", *packages], capture_output=True, text=True,
        timeout=60, check=True).stdout.splitlines() if line.startswith("Inst ")]
    debs = [next(into.glob(f"{name}_*.deb")) for name in wanted]
    assert {deb.name.split("_")[0] for deb in debs} >= set(packages), (wanted, debs)
    return debs


def dummy_package(workdir: Path, name: str, **fields: str) -> Path:
    """A package holding nothing, with these control fields (e.g. Recommends=...), built with dpkg-deb."""
    root = workdir / name
    (root / "DEBIAN").mkdir(parents=True)
    control = {"Package": name, "Version": "1.0", "Architecture": "all", "Maintainer": MAINTAINER,
               **{key.replace("_", "-"): value for key, value in fields.items()},
               "Description": "a package that wants a mail transport agent (test)"}
    (root / "DEBIAN" / "control").write_text("".join(f"{key}: {value}\n" for key, value in control.items()))
    deb = workdir / f"{name}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True, timeout=60)
    return deb


@dataclass(frozen=True)
class LintianTag:
    severity: str  # E, W, I, P, X, O (overridden)
    name: str
    detail: str


def lintian(deb: Path) -> tuple[list[LintianTag], str]:
    """lintian's tags for `deb` (errors and warnings, and those overridden), and its whole output."""
    result = subprocess.run(["lintian", "--show-overrides", "--no-tag-display-limit", str(deb)],
                            capture_output=True, text=True, timeout=300)
    tags = []
    for line in result.stdout.splitlines():
        match = re.match(rf"([EWIPXO]): {PACKAGE}: (\S+)\s*(.*)$", line)
        if match:
            tags.append(LintianTag(*match.groups()))
    return tags, result.stdout + result.stderr
