"""Issue 13: the Debian package built from this checkout (`dpkg-buildpackage -us -uc -b`), installed with apt in a
throwaway systemd 252, makes mailwatchd the host's MTA, and upgrades, removal and purge never lose mail.

The package is built once per test session on the host (debpackage.py), together with a rebuild carrying a higher
version and a changed env file template (the upgrade). The machines have no network: apt installs the .deb files
directly, and Postfix's .debs are fetched on the host beforehand (`apt-get install --download-only`).

Machines. `over_postfix` (module scope) has Postfix installed and running, then mailwatchd installed over it; the
scenarios that only look at it, or send mail through it, share it. The upgrade and the remove/purge scenarios each
get a machine of their own. A container host's /usr/sbin/policy-rc.d (exit 101: start nothing) is removed on the
machine's overlay: on a Debian server there is none, and deb-systemd-invoke starts the units.
"""

from __future__ import annotations

import argparse
import email
import functools
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailwatchd.cli import build_parser
from mailwatchd.settings.environment import KNOWN_KEYS

from .conftest import REQUIRE_ENV, require_machine
from .debpackage import (
    BUILD_COMMAND,
    Built,
    changelog_version,
    download_debs,
    dummy_package,
    lintian,
    missing_build_tools,
    start_build,
)
from .layer import PROJECT, Layer
from .machine import Machine
from .smtp_sink import SinkMessage, SmtpSink
from .test_service import readme_sh_block

pytestmark = pytest.mark.systemd

UNIT = "mailwatchd.service"
SOCKET = "mailwatchd.socket"
SPOOL = "/var/spool/mailwatchd"
ENV_FILE = "/etc/mailwatchd/mailwatchd.env"
VENV_COMMAND = "/usr/lib/mailwatchd/venv/bin/mailwatchd"
DEBS_IN_MACHINE = "/var/cache/mailwatchd-test"  # world-readable: apt's _apt user reads the local .debs
HOST_DEB_CACHE = Path("/var/cache/mailwatchd-tests/debs")  # Postfix and what it needs, fetched once
MAIL_DOMAIN = "machine.example.com"
MAX_EXPOSURE = 1.5
APT = ["apt-get", "--yes", "--quiet", "-o", "Dpkg::Use-Pty=0"]
ENV_NOTE = "A line the upgrade's version added to the template."
STATES = ("new", "queue", "deferred", "failed")
PACKAGE_MARKER = "<!-- package-steps:"



# -- the packages ------------------------------------------------------------------------------------------------

class Packages:
    """The package as the checkout builds it (`release`), and the same sources with a higher version and one
    more line in the env file template (`upgrade`): both built at once, in the background; each property
    waits for its build."""

    def __init__(self, workdir: Path) -> None:
        self._release = start_build(workdir / "release")
        self._upgrade = start_build(workdir / "upgrade", version=f"{changelog_version(PROJECT)}+upgrade1",
                                    env_note=ENV_NOTE)

    @functools.cached_property
    def release(self) -> Built:
        return self._release.wait()

    @functools.cached_property
    def upgrade(self) -> Built:
        return self._upgrade.wait()


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    """Started first: the builds go on while the machines' layer is built."""
    require_machine()
    missing = missing_build_tools()
    if missing is not None:
        message = f"cannot build the Debian package here: {missing}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(message)
    return Packages(tmp_path_factory.mktemp("debian"))


@pytest.fixture(scope="session")
def postfix_debs() -> list[Path]:
    require_machine()
    return download_debs(["postfix"], HOST_DEB_CACHE)


# -- machines ----------------------------------------------------------------------------------------------------

def boot(workdir: Path, layer: Layer, debs: list[Path]) -> Machine:
    """A booted machine with the SMTP sink's library, these .debs in DEBS_IN_MACHINE and a Debian host's mail
    name (the previous MTA's debconf wrote it), and nothing of mailwatchd yet."""
    machine = Machine(workdir, layers=[layer.sink_layer])
    for deb in debs:
        machine.write_file(f"{DEBS_IN_MACHINE}/{deb.name}", deb.read_bytes())
    machine.write_file("/etc/mailname", f"{MAIL_DOMAIN}\n")
    machine.boot()
    try:
        # Left on this host's root by a run by hand, seen through the overlay: removed on the overlay only.
        machine.run(["rm", "-rf", SPOOL, "/etc/mailwatchd", "/usr/sbin/policy-rc.d"])
    except BaseException:
        machine.stop()
        raise
    return machine


def apt(machine: Machine, *args: str, check: bool = True) -> str:
    """`apt-get --yes ARGS` in the machine, offline, non-interactive; its stdout and stderr."""
    result = machine.run([*APT, *args], check=False, timeout=240, env={"DEBIAN_FRONTEND": "noninteractive"})
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"apt-get {shlex.join(args)} exited {result.returncode}:\n{output}")
    return output


def local(deb: Path) -> str:
    return f"{DEBS_IN_MACHINE}/{deb.name}"


def dpkg_status(machine: Machine, package: str) -> str:
    """`dpkg-query`'s status and version ("install ok installed 0.1.0"), or "" for a package dpkg never had."""
    result = machine.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package], check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def listeners_on_25(machine: Machine) -> str:
    return machine.run(["ss", "-Hltnp", "sport = :25"]).stdout


def write_env(machine: Machine, env: dict[str, str]) -> None:
    """The env file's content replaced as root would (`cat >`): an edit of the conffile; its mode stays."""
    machine.run(["sh", "-c", f"cat > {ENV_FILE}"], input="".join(f"{key}={value}\n" for key, value in env.items()))


def relay(port: int) -> dict[str, str]:
    """A relay on 127.0.0.1:`port`, retried and probed every half second while it is down."""
    return {"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port), "MAILWATCHD_RETRY_MIN": "500ms",
            "MAILWATCHD_RETRY_MAX": "1s", "MAILWATCHD_PROBE_INTERVAL_DOWN": "500ms"}


def message(subject: str) -> str:
    return f"To: rcpt@example.com\nSubject: {subject}\n\nThe message called {subject}.\n"


def send(machine: Machine, subject: str, user: str = "root") -> None:
    """`/usr/sbin/sendmail -t` as `user` (root, or a login outside mailwatchd-submit: the submit socket)."""
    argv = ["/usr/sbin/sendmail", "-t"]
    result = machine.run(argv if user == "root" else ["runuser", "-u", user, "--", *argv], input=message(subject))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def add_user(machine: Machine, name: str) -> str:
    if machine.run(["id", name], check=False).returncode != 0:
        machine.run(["useradd", "--no-create-home", name])
    return name


def subjects(messages: list[SinkMessage]) -> list[str]:
    return sorted(str(email.message_from_bytes(m.data)["Subject"]) for m in messages)


def spool_files(machine: Machine) -> dict[str, list[str]]:
    """The messages in each state folder of the spool."""
    return {state: sorted(path.name for path in machine.host_path(f"{SPOOL}/{state}").iterdir()
                          if not path.name.startswith(".")) for state in STATES}


def waiting(machine: Machine) -> int:
    files = spool_files(machine)
    return len(files["queue"]) + len(files["deferred"]) if not files["new"] else 0


def journal(machine: Machine, since: str, *matches: str) -> str:
    """The service's journal since `since` (`@EPOCH`), entries matching `FIELD=value`s only if given."""
    return machine.journal("-u", UNIT, f"--since={since}", "-o", "cat", *matches)


# -- the env file template ----------------------------------------------------------------------------------------

def commands() -> list[str]:
    """The commands of `mailwatchd --help`, from the parser."""
    [subparsers] = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return list(subparsers.choices)


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), field], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_env_file_template_lists_every_key_commented() -> None:
    """Every key the program reads, as a commented `#KEY=` line under its explanation; nothing set."""
    lines = (PROJECT / "debian" / "mailwatchd.env").read_text().splitlines()
    commented = {match.group(1): index for index, line in enumerate(lines)
                 if (match := re.match(r"#([A-Z][A-Z0-9_]*)=", line))}
    assert set(commented) == set(KNOWN_KEYS)
    assert [line for line in lines if line.strip() and not line.startswith("#")] == []
    for key, index in commented.items():  # under its explanation, or under the other key of a pair
        assert re.match(r"# \S|#[A-Z][A-Z0-9_]*=", lines[index - 1]), key


def test_the_readme_package_steps_are_the_ones_tested() -> None:
    """The README's block, and where each line runs here: `apt-get build-dep ./` is what the `packages` fixture
    checks with dpkg-checkbuilddeps (the tests' .ci/run installs the same Build-Depends), the build runs this very
    command in a copy of the checkout, and the machines install the .deb with apt from a local path."""
    assert readme_sh_block(PACKAGE_MARKER) == [
        "apt-get update && apt-get build-dep -y ./",
        shlex.join(BUILD_COMMAND),
        "apt-get install -y ../mailwatchd_*.deb",
    ]


# -- over Postfix ------------------------------------------------------------------------------------------------

@dataclass
class OverPostfix:
    machine: Machine
    postfix_before: str  # who listened on port 25 with Postfix installed
    apt_output: str  # `apt-get install ./mailwatchd_*.deb`


@pytest.fixture(scope="module")
def over_postfix(packages: Packages, postfix_debs: list[Path], mailwatchd_layer: Layer,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverPostfix]:
    machine = boot(tmp_path_factory.mktemp("over-postfix"), mailwatchd_layer, [*postfix_debs, packages.release.deb])
    try:
        apt(machine, "install", *(local(deb) for deb in postfix_debs))
        assert machine.prop("postfix.service", "ActiveState") == "active"
        before = listeners_on_25(machine)
        output = apt(machine, "install", local(packages.release.deb))
        yield OverPostfix(machine, before, output)
    finally:
        machine.stop()


def test_apt_replaces_postfix_and_sendmail_goes_through_mailwatchd(over_postfix: OverPostfix) -> None:
    machine = over_postfix.machine
    assert '"master"' in over_postfix.postfix_before  # Postfix served port 25
    assert "The following packages will be REMOVED:\n  postfix\n" in over_postfix.apt_output
    assert "The following NEW packages will be installed:\n  mailwatchd\n" in over_postfix.apt_output
    assert dpkg_status(machine, "postfix").startswith("deinstall ok config-files")
    assert dpkg_status(machine, "mailwatchd") == f"install ok installed {changelog_version(PROJECT)}"
    for unit in (UNIT, SOCKET):  # enabled and started by the postinst
        assert machine.show(unit, "UnitFileState", "ActiveState") == {"UnitFileState": "enabled",
                                                                       "ActiveState": "active"}, unit
    assert machine.prop("postfix.service", "LoadState") == "not-found"
    on_25 = listeners_on_25(machine)
    assert "127.0.0.1:25" in on_25 and '"mailwatchd"' in on_25 and "master" not in on_25
    assert machine.run(["readlink", "-f", "/usr/sbin/sendmail"]).stdout.strip() == VENV_COMMAND

    sink = SmtpSink.start(machine, "relay", 2600)
    write_env(machine, relay(2600))
    machine.systemctl("reload", UNIT)
    send(machine, "from root")
    send(machine, "from a user", add_user(machine, "outsider"))
    received = sink.wait_for(2)
    assert subjects(received) == ["from a user", "from root"]
    assert sorted(m.mail_from for m in received) == [f"outsider@{MAIL_DOMAIN}", f"root@{MAIL_DOMAIN}"]
    assert all(m.rcpt_tos == ["rcpt@example.com"] for m in received)
    machine.wait_for(lambda: waiting(machine) == 0 and not spool_files(machine)["new"], message="the spool drained")
    # mailq and newaliases: the same command under sendmail's other names.
    assert machine.run(["mailq"]).stdout.strip().endswith("empty")
    assert machine.run(["newaliases"]).stdout.startswith("mailwatchd: nothing to rebuild")


def test_a_package_that_recommends_an_mta_leaves_mailwatchd_the_mta(over_postfix: OverPostfix,
                                                                    tmp_path: Path) -> None:
    """logwatch, mdadm, unattended-upgrades...: `Recommends: default-mta | mail-transport-agent`. apt installs
    recommendations, and would install exim4 (default-mta) if nothing provided mail-transport-agent: offline, that
    would fail to download."""
    machine = over_postfix.machine
    deb = dummy_package(tmp_path, "wants-an-mta", Recommends="default-mta | mail-transport-agent")
    machine.write_file(local(deb), deb.read_bytes())
    output = apt(machine, "install", "-o", "APT::Install-Recommends=true", local(deb))
    assert "0 upgraded, 1 newly installed, 0 to remove" in output, output
    assert "exim4" not in output and "postfix" not in output, output
    assert dpkg_status(machine, "wants-an-mta") == "install ok installed 1.0"
    assert dpkg_status(machine, "mailwatchd").startswith("install ok installed")
    assert machine.run(["readlink", "-f", "/usr/sbin/sendmail"]).stdout.strip() == VENV_COMMAND
    assert machine.prop(UNIT, "ActiveState") == "active"


def test_files_are_where_debian_puts_them_and_the_unit_is_hardened(over_postfix: OverPostfix) -> None:
    machine = over_postfix.machine
    listed = set(machine.run(["dpkg", "-L", "mailwatchd"]).stdout.split())
    assert {"/usr/sbin/sendmail", "/usr/bin/mailq", "/usr/bin/newaliases", "/usr/bin/mailwatchd",
            "/lib/systemd/system/mailwatchd.service", "/lib/systemd/system/mailwatchd.socket",
            "/usr/lib/sysusers.d/mailwatchd.conf", "/usr/lib/tmpfiles.d/mailwatchd.conf", ENV_FILE,
            "/usr/share/man/man8/mailwatchd.8.gz", "/usr/share/man/man8/sendmail.8.gz",
            "/usr/share/man/man8/mailq.8.gz", "/usr/share/man/man8/newaliases.8.gz",
            "/usr/share/bash-completion/completions/mailwatchd"} <= listed
    assert not [path for path in listed if path.startswith(("/opt", "/usr/local"))]
    for link in ("/usr/sbin/sendmail", "/usr/bin/mailq", "/usr/bin/newaliases", "/usr/bin/mailwatchd"):
        assert machine.run(["readlink", "-f", link]).stdout.strip() == VENV_COMMAND, link
    assert machine.run(["readlink", "-f", "/usr/lib/mailwatchd/venv/bin/python3"]).stdout.strip() == \
        "/usr/bin/python3.11"
    # A launcher that imports nothing it does not need (pip 23's imports re; the site module), and ignores
    # PYTHONPATH and the user's site-packages: the venv's own site-packages is named in it.
    launcher = machine.read_file(VENV_COMMAND).decode()
    assert launcher.startswith("#!/usr/lib/mailwatchd/venv/bin/python -IS\n") and "import re" not in launcher
    assert 'sys.path.append("/usr/lib/mailwatchd/venv/lib/python3.11/site-packages")' in launcher
    # The conffile, its modes (tmpfiles gave it to the daemon's group), and a template the program accepts.
    conffiles = machine.run(["dpkg-query", "-W", "-f=${Conffiles}", "mailwatchd"]).stdout.split()
    assert conffiles[0] == ENV_FILE and len(conffiles) == 2
    assert machine.run(["stat", "-c", "%a %U %G", ENV_FILE, "/etc/mailwatchd"]).stdout.splitlines() == [
        "640 root mailwatchd", "750 root mailwatchd"]
    assert machine.run(["stat", "-c", "%a %U %G", SPOOL]).stdout == "710 mailwatchd mailwatchd-submit\n"
    # The man pages, generated from the command line: each command in mailwatchd(8), each mode in sendmail(8).
    assert machine.run(["man", "-w", "8", "sendmail"]).stdout.strip() == "/usr/share/man/man8/sendmail.8.gz"
    page = machine.run(["man", "8", "mailwatchd"], env={"MANWIDTH": "200"}).stdout
    for command in commands():
        assert re.search(rf"^ +mailwatchd {command}\b", page, re.M), command
    page = machine.run(["man", "8", "sendmail"], env={"MANWIDTH": "200"}).stdout
    for mode in ("-bm", "-bp", "-bi, -I", "-bs", "-t", "-f ADDR, -r ADDR"):
        assert re.search(rf"^ +{re.escape(mode)}\b", page, re.M), mode
    completed = machine.run(["bash", "-c", ". /usr/share/bash-completion/completions/mailwatchd && "
                             'COMP_WORDS=(mailwatchd va) COMP_CWORD=1 && _mailwatchd && echo "${COMPREPLY[@]}"'])
    assert completed.stdout == "validate\n"

    # The unit as packaged: the packaged command, verified clean, hardened as the venv install's.
    exec_start = machine.prop(UNIT, "ExecStart")
    assert "argv[]=/usr/bin/mailwatchd run " in exec_start, exec_start
    assert machine.prop(UNIT, "FragmentPath") == "/lib/systemd/system/mailwatchd.service"
    verify = machine.run(["systemd-analyze", "verify", UNIT, SOCKET], check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    security = machine.run(["systemd-analyze", "security", UNIT]).stdout
    exposure = re.search(r"Overall exposure level for mailwatchd\.service: ([\d.]+)", security)
    assert exposure is not None and float(exposure.group(1)) <= MAX_EXPOSURE, security


# -- upgrade -----------------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_an_upgrade_restarts_the_daemon_and_every_queued_message_arrives_once(
        packages: Packages, mailwatchd_layer: Layer, tmp_path: Path) -> None:
    machine = boot(tmp_path, mailwatchd_layer, [packages.release.deb, packages.upgrade.deb])
    try:
        apt(machine, "install", local(packages.release.deb))
        write_env(machine, relay(2610))  # the local edit the upgrade must keep; the relay is not up yet
        edited = machine.read_file(ENV_FILE)
        since = f"@{time.time():.6f}"
        machine.systemctl("restart", UNIT)
        outsider = add_user(machine, "outsider")
        sent = [f"queued {n}" for n in range(3)] + [f"queued by a user {n}" for n in range(3)]
        for subject in sent:
            send(machine, subject, outsider if "user" in subject else "root")
        machine.wait_for(lambda: waiting(machine) == len(sent), message="6 messages claimed and waiting")
        machine.wait_for(lambda: journal(machine, since, "EVENT=relay_down"), message="relay_down in the journal")
        before = machine.show(UNIT, "MainPID", "ActiveState")
        socket_since = machine.prop(SOCKET, "ActiveEnterTimestampMonotonic")
        queued = spool_files(machine)

        output = apt(machine, "install", "-o", "Dpkg::Options::=--force-confold", local(packages.upgrade.deb))
        assert (f"Unpacking mailwatchd ({packages.upgrade.version}) over ({packages.release.version})"
                in output), output
        assert dpkg_status(machine, "mailwatchd") == f"install ok installed {packages.upgrade.version}"
        # The edited conffile is kept (--force-confold, as unattended-upgrades does), the new one beside it.
        assert machine.read_file(ENV_FILE) == edited
        assert machine.read_file(f"{ENV_FILE}.dpkg-dist").decode().endswith(f"# {ENV_NOTE}\n")
        # The service restarted; the socket stayed up through the upgrade.
        after = machine.show(UNIT, "MainPID", "ActiveState", "NRestarts")
        assert after["ActiveState"] == "active" and after["MainPID"] != before["MainPID"], (before, after)
        assert after["NRestarts"] == "0"
        assert machine.prop(SOCKET, "ActiveEnterTimestampMonotonic") == socket_since
        assert spool_files(machine) == queued, "the upgrade touched the queued mail"

        sink = SmtpSink.start(machine, "relay", 2610)
        assert subjects(sink.wait_for(len(sent), timeout=30)) == sorted(sent)
        machine.wait_for(lambda: not any(spool_files(machine).values()), message="the spool drained")
        assert subjects(sink.messages()) == sorted(sent)  # each exactly once
        assert journal(machine, since, "EVENT=message_failed") == ""
    finally:
        machine.stop()


# -- remove and purge --------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_remove_keeps_spool_and_settings_and_purge_keeps_only_the_mail(
        packages: Packages, mailwatchd_layer: Layer, tmp_path: Path) -> None:
    machine = boot(tmp_path, mailwatchd_layer, [packages.release.deb])
    deb = local(packages.release.deb)
    try:
        # An empty spool: the purge removes it, and the settings, and says so.
        apt(machine, "install", deb)
        output = apt(machine, "purge", "mailwatchd")
        assert f"mailwatchd: removed {SPOOL} (it held no mail)" in output, output
        assert machine.run(["ls", "-d", SPOOL, "/etc/mailwatchd"], check=False).returncode != 0
        assert dpkg_status(machine, "mailwatchd") in ("", "unknown ok not-installed")

        # Mail waiting for a relay that is down, then `apt remove`.
        apt(machine, "install", deb)
        write_env(machine, relay(2620))
        machine.systemctl("restart", UNIT)
        kept = [f"kept {n}" for n in range(2)]
        for subject in kept:
            send(machine, subject)
        machine.wait_for(lambda: waiting(machine) == 2, message="2 messages waiting")
        files = spool_files(machine)
        output = apt(machine, "remove", "mailwatchd")
        assert re.search(rf"mailwatchd: kept {SPOOL}, which holds mail \((queue|deferred)/: 2\), and "
                         r"/etc/mailwatchd", output), output
        assert dpkg_status(machine, "mailwatchd").startswith("deinstall ok config-files")
        for unit in (UNIT, SOCKET):
            assert machine.show(unit, "ActiveState", "LoadState") == {"ActiveState": "inactive",
                                                                     "LoadState": "not-found"}, unit
        assert listeners_on_25(machine) == ""
        assert machine.run(["ls", "/usr/sbin/sendmail", "/usr/lib/mailwatchd"], check=False).returncode != 0
        assert spool_files(machine) == files
        assert machine.read_file(ENV_FILE).startswith(b"EMAIL_HOST=127.0.0.1\n")

        # Installed again, with the settings it kept: what waited goes out, once.
        apt(machine, "install", deb)
        sink = SmtpSink.start(machine, "relay", 2620)
        assert subjects(sink.wait_for(2, timeout=30)) == kept
        machine.wait_for(lambda: not any(spool_files(machine).values()), message="the spool drained")
        sink.stop()

        # More mail waiting, then `apt purge`: the settings go, the spool with its mail stays.
        left = [f"left {n}" for n in range(2)]
        for subject in left:
            send(machine, subject)
        machine.wait_for(lambda: waiting(machine) == 2, message="2 messages waiting")
        files = spool_files(machine)
        output = apt(machine, "purge", "mailwatchd")
        assert re.search(rf"mailwatchd: purge kept {SPOOL}: it still holds mail \((queue|deferred)/: 2\)\.",
                         output), output
        assert machine.run(["ls", "/etc/mailwatchd"], check=False).returncode != 0
        assert spool_files(machine) == files
        assert dpkg_status(machine, "mailwatchd") in ("", "unknown ok not-installed")
        assert subjects(sink.messages()) == kept
    finally:
        machine.stop()


# -- the package as built, and lintian -------------------------------------------------------------------------

def test_the_package_is_built_by_debians_tools_and_lintian_finds_nothing(packages: Packages) -> None:
    deb = packages.release.deb
    assert deb.name == f"mailwatchd_{changelog_version(PROJECT)}_amd64.deb"
    print(f"\nbuild: {packages.release.seconds:.0f} s and {packages.upgrade.seconds:.0f} s (both at once)")
    assert packages.release.seconds < 240, "the package build should take about a minute"
    for field in ("Provides", "Conflicts", "Replaces"):
        assert deb_field(deb, field) == "mail-transport-agent", field
    depends = deb_field(deb, "Depends")
    for wanted in ("python3 (>= 3.11~)", "python3 (<< 3.12~)", "systemd (>= 252)"):
        assert wanted in depends, depends

    tags, output = lintian(deb)
    print(f"lintian: {len(tags)} tags shown, {sum(tag.severity == 'O' for tag in tags)} overridden")
    assert [tag for tag in tags if tag.severity in ("E", "W")] == [], output
    # Every override says why, on the comment line above it.
    overrides = (PROJECT / "debian" / "mailwatchd.lintian-overrides").read_text().splitlines()
    for index, line in enumerate(overrides):
        if line.startswith("mailwatchd: "):
            above = next(previous for previous in reversed(overrides[:index]) if not previous.startswith("mailwatchd"))
            assert above.startswith("# ") and len(above) > 20, line
    assert {tag.name for tag in tags if tag.severity == "O"} <= {
        "non-standard-dir-perm", "non-standard-file-perm", "unusual-interpreter"}, output
