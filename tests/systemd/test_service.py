"""Issue 4 end to end: the real daemon, installed by the README's own steps in a throwaway systemd 252, driven
through `systemctl`, `journalctl` and an SMTP relay inside the machine (smtp_sink.py).

Machines. `shared` (module scope) is installed once and serves the scenarios that leave the unit healthy; each
of them begins with `Service.reset()` (unit stopped, spool emptied, drop-ins removed, start limit reset, its
own settings, started again), so each passes or fails on its own and in any order. The scenarios that kill the
daemon or exhaust its start limit (watchdog, crash loop) get a machine of their own.

The README's install block runs line by line inside the machine, as root, from a copy of packaging/ (the
checkout's part those lines read). The machine has no network, so exactly two things differ (OFFLINE), and
every other line runs verbatim (test_readme_install_steps checks that):
- `apt-get install -y -qq python3-venv` is not run: the machine's root is an overlay of this host's, where
  python3-venv is installed (checked with dpkg-query), so apt-get would have nothing to do;
- `pip install -q .` becomes `pip install -q --no-index --find-links WHEELS mailwatchd`: the wheel the session
  built from this checkout (layer.py) and its dependencies' wheels, instead of building `.` against PyPI.
"""

from __future__ import annotations

import contextlib
import email
import json
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from .conftest import require_machine
from .layer import APP_LIB, PACKAGING, PROJECT, Layer
from .machine import Machine
from .smtp_sink import SinkMessage, SmtpSink

pytestmark = pytest.mark.systemd

UNIT = "mailwatchd.service"
MAIL_DOMAIN = "machine.example.com"
SPOOL = "/var/spool/mailwatchd"
ENV_FILE = "/etc/mailwatchd/mailwatchd.env"
MAILWATCHD = "/opt/mailwatchd/venv/bin/mailwatchd"
CHECKOUT = "/usr/local/src/mailwatchd"  # packaging/ is copied here; the README's lines run in it
WHEELS = "/usr/local/src/mailwatchd-wheels"
DROP_INS = f"/etc/systemd/system/{UNIT}.d"
INSTALL_MARKER = "<!-- install-steps:"
MAILDIR_DROP = "/usr/local/lib/mailwatchd-test/maildir_drop.py"
MAILDIR_DROP_SCRIPT = """\
import mailbox, sys
box = mailbox.Maildir(sys.argv[1], create=False)
for text in sys.stdin.read().split("\\0"):
    print(box.add(text.encode()))
"""
SUBMIT_MARKER = "**Letting an app send mail.**"


@dataclass(frozen=True)
class Offline:
    """A README command replaced because the machine has no network: `readme` (a whole line when `whole`,
    else a word sequence within one) runs as `offline`, or not at all when that is None."""

    readme: str
    offline: str | None
    whole: bool = False


OFFLINE = (
    Offline("apt-get install -y -qq python3-venv", None, whole=True),
    Offline("pip install -q .", f"pip install -q --no-index --find-links {WHEELS} mailwatchd"),
)


def readme_sh_block(after: str) -> list[str]:
    """The command lines of the first ```sh block after the README line starting with `after`."""
    lines = (PROJECT / "README.md").read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(after))
    fence = lines.index("```sh", start)
    end = lines.index("```", fence + 1)
    return [line for line in lines[fence + 1:end] if line.strip() and not line.lstrip().startswith("#")]


def offline_line(line: str, used: list[Offline]) -> str | None:
    """The line as it runs in the machine (None: skipped); records the substitutions it needed."""
    for sub in OFFLINE:
        if sub.whole and line == sub.readme:
            used.append(sub)
            return None
        # A command word: after a space, the start or a path's "/" (…/venv/bin/pip), before a space or the end.
        pattern = rf"(?<![^\s/]){re.escape(sub.readme)}(?!\S)"
        if not sub.whole and re.search(pattern, line):
            used.append(sub)
            assert sub.offline is not None
            line = re.sub(pattern, sub.offline, line)
    return line


@dataclass(frozen=True)
class Step:
    """One line of the README's install block, and what ran for it in the machine."""

    readme: str
    ran: str | None  # None: skipped


def install_per_readme(machine: Machine) -> list[Step]:
    """Run the README's install block in the machine, as root, from the copied checkout."""
    used: list[Offline] = []
    steps = [Step(line, offline_line(line, used)) for line in readme_sh_block(INSTALL_MARKER)]
    assert sorted(sub.readme for sub in used) == sorted(sub.readme for sub in OFFLINE), (
        "the README's install block changed: update OFFLINE (and the module docstring)")
    for step in steps:
        if step.ran is None:  # apt-get: what it would install must be there already
            status = machine.run(["dpkg-query", "-W", "-f=${Status}", "python3-venv"], check=False).stdout
            assert status == "install ok installed", f"skipping `{step.readme}` needs python3-venv: {status}"
        else:
            machine.run(["sh", "-c", f"cd {CHECKOUT} || exit 1\n{step.ran}"], timeout=180)
    return steps


# -- the service under test ------------------------------------------------------------------------------------

@dataclass
class Service:
    """mailwatchd installed in one machine, with what the install did and helpers to drive it."""

    machine: Machine
    steps: list[Step]
    after_install: dict[str, str]
    # The journal since this time (`journalctl --since=@EPOCH.µs`) belongs to the current scenario. Not a cursor:
    # with matches (-u, FIELD=value), systemd 252's --after-cursor also skips the first matching entry after the
    # cursor when the cursor's own entry does not match.
    since: str = "@0"
    users: set[str] = field(default_factory=set)

    # -- set-up --------------------------------------------------------------------------------------

    def reset(self, env: dict[str, str] | None = None, drop_in: str = "", *, start: bool = True) -> None:
        """A clean slate for a scenario: stopped, spool empty and as tmpfiles makes it, only `drop_in` on the
        shipped unit, start limit reset, the env file holding `env`; then started (and active) if `start`."""
        machine = self.machine
        machine.systemctl("stop", UNIT)
        machine.run(["find", *(f"{SPOOL}/{sub}" for sub in ("tmp", "new", "queue", "deferred", "failed", "meta",
                                                             "outbox")), "-mindepth", "1", "-delete"])
        machine.run(["systemd-tmpfiles", "--create", "mailwatchd.conf"])
        machine.run(["rm", "-rf", DROP_INS])
        if drop_in:
            machine.write_file(f"{DROP_INS}/test.conf", f"[Service]\n{drop_in}\n")
        machine.systemctl("daemon-reload")
        machine.systemctl("reset-failed", UNIT, check=False)
        self.write_env(env or {})
        self.since = f"@{time.time():.6f}"  # the host's clock is the machine's
        if start:
            machine.systemctl("start", UNIT)
            assert self.machine.prop(UNIT, "ActiveState") == "active"

    def write_env(self, env: dict[str, str]) -> None:
        """Replace the env file's content as root would (`cat >`): it keeps its 0640 root:mailwatchd."""
        self.machine.run(["sh", "-c", f"cat > {ENV_FILE}"], input="".join(f"{k}={v}\n" for k, v in env.items()))

    def submitter(self, name: str = "app") -> str:
        """A user allowed to drop mail: `useradd`, then `usermod -aG mailwatchd-submit` as the README says."""
        if name not in self.users:
            self.machine.run(["useradd", "--no-create-home", name])
            self.machine.run(["usermod", "-aG", "mailwatchd-submit", name])
            self.users.add(name)
        return name

    # -- submitting -----------------------------------------------------------------------------------

    def as_user(self, user: str, command: str, stdin: str | None = None) -> str:
        """Run a shell command as `user` with a restrictive umask (077); its stdout."""
        return self.machine.run(["runuser", "-u", user, "--", "sh", "-c", f"umask 077 && {command}"],
                                input=stdin).stdout

    def enqueue(self, subject: str, user: str = "app") -> str:
        """`mailwatchd enqueue` as `user`; the queue id it printed."""
        return self.as_user(user, f"exec {MAILWATCHD} enqueue", message(subject)).strip()

    def maildir_drop(self, subjects: list[str], user: str = "app") -> list[str]:
        """Maildir writes (Python's mailbox.Maildir.add: tmp/, link into new/, unlink) as `user`; their keys.
        Nothing completes such a message: it carries its own From."""
        self.machine.write_file(MAILDIR_DROP, MAILDIR_DROP_SCRIPT)
        out = self.as_user(user, f"exec /usr/bin/python3 {MAILDIR_DROP} {SPOOL}",
                           "\0".join(message(subject, f"{user}@example.com") for subject in subjects))
        return out.split()

    # -- observing ------------------------------------------------------------------------------------

    def journal(self, *args: str) -> str:
        """This scenario's journal of the unit (`-o cat` unless told otherwise)."""
        return self.machine.journal("-u", UNIT, f"--since={self.since}", *(args or ("-o", "cat")))

    def events(self, *matches: str) -> list[dict[str, str]]:
        """This scenario's entries of the unit matching `FIELD=value`s, as journalctl's JSON."""
        out = self.machine.journal("-u", UNIT, f"--since={self.since}", "-o", "json", *matches)
        return [json.loads(line) for line in out.splitlines()]

    def wait_event(self, *matches: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, str]]:
        def found() -> list[dict[str, str]] | None:
            entries = self.events(*matches)
            return entries if len(entries) >= count else None
        try:
            return list(self.machine.wait_for(found, timeout, f"{count} journal entries {' '.join(matches)}"))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.journal()}") from None

    def wait_sink(self, sink: SmtpSink, count: int, timeout: float = 15.0) -> list[SinkMessage]:
        """`sink.wait_for(count)`, failing with what the relay got and the daemon logged."""
        try:
            return sink.wait_for(count, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it has {subjects(sink.messages())}\n{self.journal()}") from None

    def spool_files(self, *subdirs: str) -> dict[str, list[str]]:
        return {sub: sorted(name for name in (p.name for p in self.machine.host_path(f"{SPOOL}/{sub}").iterdir())
                            if not name.startswith(".")) for sub in subdirs}

    def waiting(self) -> int:
        """Messages in the spool not yet delivered (nor failed)."""
        return sum(len(names) for names in self.spool_files("new", "queue", "deferred").values())


def message(subject: str, sender: str | None = None) -> str:
    """A message as an app writes it; `sendmail` and `enqueue` add From (and Date, Message-ID) when missing."""
    header = f"From: {sender}\n" if sender else ""
    return f"{header}To: rcpt@example.com\nSubject: {subject}\n\nThe message called {subject}.\n"


def subjects(messages: list[SinkMessage]) -> list[str]:
    return sorted(str(email.message_from_bytes(m.data)["Subject"]) for m in messages)


def relay_env(port: int, **extra: str) -> dict[str, str]:
    return {"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port), **extra}


def boot_installed(layer: Layer, workdir: Path, before_install: Callable[[Machine], None] | None = None) -> Service:
    """A machine with the sink's library and the wheels, booted, with mailwatchd installed per the README
    (after `before_install`, if given: what an operator did first, such as the README's "Try it")."""
    machine = Machine(workdir, layers=[layer.sink_layer])
    for wheel in sorted(layer.wheels.glob("*.whl")):
        machine.write_file(f"{WHEELS}/{wheel.name}", wheel.read_bytes())
    for path in sorted(PACKAGING.iterdir()):
        machine.write_file(f"{CHECKOUT}/packaging/systemd/{path.name}", path.read_bytes())
    # A Debian host's mail domain (debconf writes it when an MTA is installed): the daemon completes
    # bare local names (cron's root, a submitter's login) with it.
    machine.write_file("/etc/mailname", f"{MAIL_DOMAIN}\n")
    machine.boot()
    try:
        # A fresh host has no spool: one a run by hand left on this host's root (seen through the overlay)
        # must not leak in. Removed on the overlay only.
        machine.run(["rm", "-rf", "/var/spool/mailwatchd", "/etc/mailwatchd"])
        if before_install is not None:
            before_install(machine)
        steps = install_per_readme(machine)
        after = machine.show(UNIT, "ActiveState", "SubState", "StatusText", "UnitFileState", "FragmentPath")
        return Service(machine, steps, after)
    except BaseException:
        machine.stop()
        raise


@pytest.fixture(scope="module")
def shared(mailwatchd_layer: Layer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    require_machine()
    service = boot_installed(mailwatchd_layer, tmp_path_factory.mktemp("service"))
    yield service
    service.machine.stop()


@pytest.fixture
def own_machine(mailwatchd_layer: Layer, tmp_path: Path) -> Iterator[Callable[[], Service]]:
    """`make()` → a machine of the scenario's own with mailwatchd installed per the README (stopped at the end)."""
    made: list[Service] = []

    def make() -> Service:
        made.append(boot_installed(mailwatchd_layer, tmp_path / f"m{len(made)}"))
        return made[-1]
    yield make
    for service in made:
        service.machine.stop()


class Follower:
    """`journalctl -f` running inside the machine; its lines as they come."""

    def __init__(self, machine: Machine, *args: str) -> None:
        self.machine = machine
        # `exec timeout`: $$ becomes timeout, which passes a SIGTERM on to journalctl (and bounds it anyway).
        self.process = machine.spawn(["sh", "-c", 'echo "$$" && exec timeout 120 journalctl --no-pager "$@"',
                                      "sh", "--follow", *args])
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.pid = self.next_line(10.0)

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"journalctl -f printed nothing within {timeout:g}s") from None
        if line is None:
            raise AssertionError(f"journalctl -f ended (exit {self.process.wait()})")
        return line

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        """The first line from now on that `predicate` accepts; fail at the deadline with what it printed."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        with contextlib.suppress(AssertionError):
            while (remaining := deadline - time.monotonic()) > 0:
                seen.append(self.next_line(remaining))
                if predicate(seen[-1]):
                    return seen[-1]
        raise AssertionError(f"journalctl -f did not show the line within {timeout:g}s; it showed:\n"
                             + "\n".join(seen))

    def close(self) -> None:
        self.machine.run(["kill", self.pid], check=False)  # the in-machine pid it printed first
        self.process.wait(timeout=10)


# -- 0. install -----------------------------------------------------------------------------------------------

def test_readme_install_steps(shared: Service) -> None:
    readme = readme_sh_block(INSTALL_MARKER)
    assert [step.readme for step in shared.steps] == readme
    substituted = {(step.readme, step.ran) for step in shared.steps if step.ran != step.readme}
    assert substituted == {
        ("apt-get install -y -qq python3-venv", None),
        ("/usr/bin/python3 -m venv /opt/mailwatchd/venv && /opt/mailwatchd/venv/bin/pip install -q .",
         "/usr/bin/python3 -m venv /opt/mailwatchd/venv && /opt/mailwatchd/venv/bin/pip install -q "
         f"--no-index --find-links {WHEELS} mailwatchd"),
    }

    machine = shared.machine
    cfg = machine.read_file("/opt/mailwatchd/venv/pyvenv.cfg").decode()
    assert "home = /usr/bin\n" in cfg  # Debian's python3, not one ProtectHome= would hide
    for name, target in (("mailwatchd.service", "/etc/systemd/system/mailwatchd.service"),
                         ("mailwatchd.sysusers", "/etc/sysusers.d/mailwatchd.conf"),
                         ("mailwatchd.tmpfiles", "/etc/tmpfiles.d/mailwatchd.conf")):
        assert machine.read_file(target) == (PACKAGING / name).read_bytes()
    assert machine.run(["stat", "-c", "%a %U %G", ENV_FILE]).stdout == "640 root mailwatchd\n"
    # `enable --now`: enabled, and started with the empty env file (the local outbox until a relay is set).
    after = shared.after_install
    assert (after["UnitFileState"], after["ActiveState"], after["SubState"]) == ("enabled", "active", "running")
    assert after["FragmentPath"] == "/etc/systemd/system/mailwatchd.service"
    assert re.search(r"queue: 0 ready, 0 deferred, 0 failed", after["StatusText"]), after


# -- 1. configure a relay, submit mail every way the README offers, follow it in the journal ------------------------

def test_configured_relay_receives_mail_from_every_submission_path(shared: Service) -> None:
    machine = shared.machine
    shared.reset({})  # as installed: an empty env file
    assert "queue: 0 ready" in machine.prop(UNIT, "StatusText")
    main_pid = machine.prop(UNIT, "MainPID")

    ca = trustme.CA()
    machine.write_file("/etc/mailwatchd/relay-ca.pem", ca.cert_pem.bytes())
    machine.write_file("/etc/relay/cert.pem", ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.bytes(), 0o600)
    sink = SmtpSink.start(machine, "relay", 2587, ["--tls-cert", "/etc/relay/cert.pem",
                                                    "--tls-key", "/etc/relay/cert.pem"])
    shared.write_env(relay_env(2587, EMAIL_USE_TLS="true", EMAIL_SSL_CAFILE="/etc/mailwatchd/relay-ca.pem"))
    machine.systemctl("reload", UNIT)
    shared.wait_event("EVENT=config_reloaded", "RELAYS=127.0.0.1")
    machine.wait_for(lambda: "relays: 127.0.0.1" in machine.prop(UNIT, "StatusText"), message="the relay in STATUS")
    assert machine.prop(UNIT, "MainPID") == main_pid

    app = shared.submitter("app")
    [maildir_key] = shared.maildir_drop(["by maildir"], app)
    assert shared.as_user(app, f"{MAILWATCHD} sendmail -t", message("by sendmail -t")) == ""
    queue_id = shared.enqueue("by enqueue", app)
    # The README's lines for an app (verbatim, for its www-data), then the classic path.
    for line in readme_sh_block(SUBMIT_MARKER):
        machine.run(["sh", "-c", line])
    assert shared.as_user("www-data", "/usr/sbin/sendmail -t", message("by /usr/sbin/sendmail")) == ""

    received = shared.wait_sink(sink, 4)
    assert subjects(received) == ["by /usr/sbin/sendmail", "by enqueue", "by maildir", "by sendmail -t"]
    assert all(m.tls and m.rcpt_tos == ["rcpt@example.com"] for m in received)
    assert sorted(m.mail_from.split("@")[0] for m in received) == ["app", "app", "app", "www-data"]
    # The commands added the missing From: as the caller's login; the daemon completed it with /etc/mailname.
    assert {m.mail_from for m in received if m.mail_from.endswith(f"@{MAIL_DOMAIN}")} == {
        f"app@{MAIL_DOMAIN}", f"www-data@{MAIL_DOMAIN}"}

    # journalctl -u mailwatchd QUEUE_ID=<id>: the id `enqueue` printed, and the one the Maildir drop got.
    delivered = shared.wait_event(f"QUEUE_ID={queue_id}", "EVENT=message_delivered")
    assert delivered[0]["RELAY"] == "127.0.0.1" and delivered[0]["PRIORITY"] == "6"
    [claimed] = shared.wait_event("EVENT=message_queued", f"SOURCE={maildir_key}")
    by_id = shared.wait_event(f"QUEUE_ID={claimed['QUEUE_ID']}", count=2)
    assert [entry["EVENT"] for entry in by_id] == ["message_queued", "message_delivered"]
    assert machine.journal("-u", UNIT, f"QUEUE_ID={queue_id}", "-o", "cat").startswith(
        f"message_queued queue_id={queue_id} ")
    assert shared.spool_files("failed") == {"failed": []}

    follower = Follower(machine, "-u", UNIT, "-n", "1", "-o", "cat")
    try:
        follower.next_line(10.0)  # the last entry so far: it is following now
        live_id = shared.enqueue("while following", app)
        follower.wait_line(lambda line: line.startswith(f"message_delivered queue_id={live_id} "))
    finally:
        follower.close()
    assert subjects(shared.wait_sink(sink, 5))[-1] == "while following"


# -- 2. the watchdog -------------------------------------------------------------------------------------------

def test_watchdog_kills_a_frozen_daemon_and_the_waiting_mail_goes_out_after(
        own_machine: Callable[[], Service]) -> None:
    service = own_machine()
    machine = service.machine
    sink = SmtpSink.start(machine, "relay", 2525)
    service.reset(relay_env(2525), "WatchdogSec=2")
    assert machine.prop(UNIT, "WatchdogUSec") == "2s"
    sink.stop()  # the relay is unreachable: mail waits

    waiting = [f"waiting {n}" for n in range(3)]
    service.maildir_drop(waiting, service.submitter())
    service.wait_event("EVENT=relay_down")
    machine.wait_for(lambda: [len(names) for names in service.spool_files("new", "queue").values()] == [0, 3],
                     message="the 3 messages claimed and waiting in queue/")
    frozen = machine.prop(UNIT, "MainPID")
    machine.run(["kill", "-STOP", frozen])

    # Result=watchdog holds during RestartSec (5 s, as shipped), before the restart resets it.
    machine.wait_prop(UNIT, "Result", "watchdog", timeout=10)
    # systemd writes "Failed with result" a moment after Result= changes: poll the journal for it.
    def watchdog_logged() -> bool:
        log = service.journal()
        return "Watchdog timeout (limit 2s)!" in log and "Failed with result 'watchdog'." in log

    machine.wait_for(watchdog_logged, timeout=10, message="the watchdog lines in the journal")
    sink = SmtpSink.start(machine, "relay", 2525)  # the relay is back before the daemon is
    machine.wait_prop(UNIT, "NRestarts", "1", timeout=15)
    machine.wait_prop(UNIT, "ActiveState", "active", timeout=15)
    assert machine.prop(UNIT, "MainPID") not in ("0", frozen)

    assert subjects(service.wait_sink(sink, 3, 20)) == waiting
    machine.wait_for(lambda: service.waiting() == 0, message="the spool drained")
    assert service.spool_files("failed") == {"failed": []}
    assert machine.prop(UNIT, "NRestarts") == "1"


# -- 3. a relay that is slow inside its deadline --------------------------------------------------------------

def test_a_relay_slow_inside_its_deadline_does_not_trip_the_watchdog(shared: Service) -> None:
    machine = shared.machine
    delay = 6.0
    sink = SmtpSink.start(machine, "slow-relay", 2530, ["--data-delay", str(delay)])
    shared.reset(relay_env(2530, MAILWATCHD_TRANSACTION_TIMEOUT="60s", EMAIL_TIMEOUT="20s"), "WatchdogSec=2")
    assert machine.prop(UNIT, "WatchdogUSec") == "2s"
    pid = machine.prop(UNIT, "MainPID")

    queue_id = shared.enqueue("slow", shared.submitter())
    [queued] = shared.wait_event(f"QUEUE_ID={queue_id}", "EVENT=message_queued")
    pinged = int(machine.prop(UNIT, "WatchdogTimestampMonotonic"))
    [delivered] = shared.wait_event(f"QUEUE_ID={queue_id}", "EVENT=message_delivered", timeout=delay + 15)

    took = (int(delivered["__REALTIME_TIMESTAMP"]) - int(queued["__REALTIME_TIMESTAMP"])) / 1e6
    assert took >= delay - 0.5  # the relay did hold the reply, three times WatchdogSec
    assert subjects(shared.wait_sink(sink, 1)) == ["slow"]
    state = machine.show(UNIT, "ActiveState", "NRestarts", "MainPID", "WatchdogTimestampMonotonic")
    assert (state["ActiveState"], state["NRestarts"], state["MainPID"]) == ("active", "0", pid)
    assert int(state["WatchdogTimestampMonotonic"]) > pinged + 1_000_000  # pings went on during the wait
    assert "atchdog" not in shared.journal()


# -- 4. a start-up failure that is not the configuration's ------------------------------------------------------

def test_an_unusable_spool_is_retried_then_the_start_limit_gives_up(own_machine: Callable[[], Service]) -> None:
    service = own_machine()
    machine = service.machine
    service.reset(relay_env(2525), "RestartSec=100ms", start=False)
    limits = machine.show(UNIT, "StartLimitBurst", "StartLimitIntervalUSec", "Restart", "RestartUSec")
    assert limits == {"StartLimitBurst": "5", "StartLimitIntervalUSec": "1min", "Restart": "always",
                      "RestartUSec": "100ms"}
    machine.run(["chmod", "0500", f"{SPOOL}/meta"])  # the daemon's own state directory, read-only

    assert machine.systemctl("start", UNIT, check=False).returncode != 0
    machine.wait_prop(UNIT, "ActiveState", "failed", timeout=20)
    # Five runs, then the sixth start is refused. systemd 252 keeps the first failure's Result (a service's
    # result is only set while it is still "success"); the refusal shows in the journal.
    state = machine.show(UNIT, "Result", "NRestarts", "ExecMainStatus")
    assert state == {"Result": "exit-code", "NRestarts": "5", "ExecMainStatus": "73"}  # EX_CANTCREAT
    unusable = service.events("EVENT=spool_unusable")
    assert len(unusable) == 5 and "Permission denied" in unusable[0]["DETAIL"]
    def start_limit_logged() -> str | None:
        log = service.journal()
        return log if "Start request repeated too quickly." in log else None

    log = machine.wait_for(start_limit_logged, timeout=10, message="the start-limit line in the journal")
    assert log.count("Main process exited, code=exited, status=73/CANTCREAT") == 5

    # Once the operator repairs the spool, the unit starts again.
    machine.run(["systemd-tmpfiles", "--create", "mailwatchd.conf"])
    machine.systemctl("reset-failed", UNIT)
    machine.systemctl("start", UNIT)
    assert machine.show(UNIT, "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}


# -- 5. a bad configuration ---------------------------------------------------------------------------------

def test_a_bad_configuration_fails_once_naming_the_key(shared: Service) -> None:
    machine = shared.machine
    shared.reset(relay_env(2525, EMAIL_USE_TLS="true", EMAIL_USE_SSL="true"), start=False)

    assert machine.systemctl("start", UNIT, check=False).returncode != 0
    machine.wait_prop(UNIT, "ActiveState", "failed")
    assert machine.show(UNIT, "Result", "ExecMainStatus", "NRestarts", "SubState") == {
        "Result": "exit-code", "ExecMainStatus": "78", "NRestarts": "0", "SubState": "failed"}
    log = shared.journal()
    assert "mailwatchd: configuration error: EMAIL_USE_SSL: " in log
    assert log.count("Main process exited") == 1  # started once, not restarted


# -- 6. reload and stop -------------------------------------------------------------------------------------

def test_reload_switches_to_the_new_relay(shared: Service) -> None:
    machine = shared.machine
    first = SmtpSink.start(machine, "first-relay", 2541)
    second = SmtpSink.start(machine, "second-relay", 2542)
    shared.reset(relay_env(2541))
    app = shared.submitter()
    shared.enqueue("before reload", app)
    assert subjects(shared.wait_sink(first, 1)) == ["before reload"]
    pid = machine.prop(UNIT, "MainPID")

    shared.write_env(relay_env(2542))
    machine.systemctl("reload", UNIT)
    shared.wait_event("EVENT=config_reloaded")
    queue_id = shared.enqueue("after reload", app)

    assert subjects(shared.wait_sink(second, 1)) == ["after reload"]
    shared.wait_event(f"QUEUE_ID={queue_id}", "EVENT=message_delivered")
    assert subjects(first.messages()) == ["before reload"]
    assert machine.show(UNIT, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}


def outsider(machine: Machine) -> None:
    """A user who is not in mailwatchd-submit (created once per machine)."""
    if machine.run(["id", "outsider"], check=False).returncode != 0:
        machine.run(["useradd", "--no-create-home", "outsider"])


def test_a_user_outside_the_submit_group_sends_through_the_submit_socket(shared: Service) -> None:
    """No group membership, no spool access: /usr/sbin/sendmail -t and -bs still reach the relay, through
    the socket unit's /run/mailwatchd/submit.sock, and exit 0 only once the daemon stored the message."""
    machine = shared.machine
    sink = SmtpSink.start(machine, "outsider-relay", 2570)
    shared.reset(relay_env(2570, MAILWATCHD_ADMIN_ADDRESS="ops@example.net"))
    for line in readme_sh_block(SUBMIT_MARKER):  # the README's sendmail link
        machine.run(["sh", "-c", line])
    outsider(machine)
    assert "mailwatchd-submit" not in machine.run(["id", "-nG", "outsider"]).stdout
    assert shared.as_user("outsider", "/usr/sbin/sendmail -t", message("outsider -t")) == ""
    session = "\r\n".join(["EHLO outsider.example", "MAIL FROM:<outsider>", "RCPT TO:<root>", "DATA",
                            "Subject: outsider -bs\r\n\r\nhello\r\n.", "QUIT", ""])
    replies = shared.as_user("outsider", "/usr/sbin/sendmail -bs", session)
    assert "250 2.0.0 Ok: queued as" in replies and replies.rstrip().splitlines()[-1].startswith("221")
    received = shared.wait_sink(sink, 2)
    assert sorted(subjects(received)) == ["outsider -bs", "outsider -t"]
    by_subject = {subjects([m])[0]: m for m in received}
    assert by_subject["outsider -bs"].mail_from == f"outsider@{MAIL_DOMAIN}"
    assert by_subject["outsider -bs"].rcpt_tos == ["ops@example.net"]  # root: the admin address
    assert by_subject["outsider -t"].rcpt_tos == ["rcpt@example.com"]
    # PrivateUsers=yes maps every other uid to nobody inside the service: the peer is a local user, unnamed.
    peers = [entry["PEER"] for entry in shared.events("EVENT=smtp_received")]
    assert len(peers) == 2 and all(peer.startswith("local user") for peer in peers), peers


CRON_USER = "reporter"  # a login with a crontab, outside mailwatchd-submit
CRON_D_FILE = "/etc/cron.d/mailwatchd-test"  # root's job as a package installs one (MAILTO unset)
# Each job prints its marker; the marker finds its mail at the relay. `* * * * *`: the next minute boundary.
CRON_ROOT_JOB = "cron-job-of-root-for-the-admin"
CRON_MAILTO_JOB = "cron-job-of-root-for-someone"
CRON_USER_JOB = "cron-job-of-a-user-for-the-admin"


def cron_log(shared: Service) -> str:
    """This scenario's lines from cron (its syslog lines and its PAM sessions), by syslog identifier: by unit
    (-u cron.service) journald misses a line whose sender, a job's short-lived cron child, exited before
    journald looked up its cgroup."""
    return shared.machine.journal("-t", "CRON", "-t", "cron", f"--since={shared.since}", "-o", "cat")


def cron_jobs_done(shared: Service) -> str | None:
    """cron's log once the three jobs ran (their CMD lines are in) and each one's PAM session closed, which cron
    does after it mailed the output and logged the mailer's status. cron's children log through syslog's
    datagram socket: a CMD line may reach the journal after the session lines another child sent."""
    log = cron_log(shared)
    opened, closed = (log.count(f"pam_unix(cron:session): session {what}") for what in ("opened", "closed"))
    commands = all(f"CMD (echo {job})" in log for job in (CRON_ROOT_JOB, CRON_MAILTO_JOB, CRON_USER_JOB))
    return log if opened >= 3 and closed == opened and commands else None


@pytest.mark.timeout(240)  # up to two minute boundaries, and the shared machine's set-up when run alone
def test_cron_mail_reaches_the_admin_address_qualified(shared: Service) -> None:
    """Debian's cron mails a job's output with `sendmail -FCronDaemon -i -B8BITMIME -oem <MAILTO or the job's
    user>`, `From: root (Cron Daemon)` (for every job: it names the daemon, not the job's user) and bare local
    names: the daemon completes them with /etc/mailname and sends a local user's mail to the admin address."""
    machine = shared.machine
    # The machine's root is this host's: cron is there only if the host has it (the README's test command).
    assert machine.host_path("/usr/sbin/cron").exists(), "cron is not installed on this host"
    sink = SmtpSink.start(machine, "cron-relay", 2580)
    shared.reset(relay_env(2580, MAILWATCHD_ADMIN_ADDRESS="ops@example.net"))
    for line in readme_sh_block(SUBMIT_MARKER):  # the README's sendmail link
        machine.run(["sh", "-c", line])
    if CRON_USER not in shared.users:
        machine.run(["useradd", "--create-home", CRON_USER])  # cron runs a job in its home
        shared.users.add(CRON_USER)
    assert "mailwatchd-submit" not in machine.run(["id", "-nG", CRON_USER]).stdout
    machine.systemctl("start", "cron.service")
    try:
        assert machine.prop("cron.service", "ActiveState") == "active"
        # cron reads changed crontabs when it wakes at a minute boundary, then runs that minute's jobs; one
        # installed in the last moments before a boundary may wait for the next.
        to_boundary = 60 - time.time() % 60
        machine.write_file(CRON_D_FILE, f"* * * * * root echo {CRON_ROOT_JOB}\n")
        machine.run(["crontab", "-u", "root", "-"],
                    input=f"MAILTO=someone@example.org\n* * * * * echo {CRON_MAILTO_JOB}\n")
        machine.run(["crontab", "-u", CRON_USER, "-"], input=f"* * * * * echo {CRON_USER_JOB}\n")
        shared.wait_sink(sink, 3, timeout=to_boundary + (15 if to_boundary > 5 else 75))
        try:
            log = machine.wait_for(lambda: cron_jobs_done(shared), timeout=30, message="cron's jobs finished")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; cron's log:\n{cron_log(shared)}") from None
    finally:
        machine.run(["rm", "-f", CRON_D_FILE])
        machine.run(["crontab", "-u", "root", "-r"], check=False)
        machine.run(["crontab", "-u", CRON_USER, "-r"], check=False)
        machine.systemctl("stop", "cron.service")

    by_job = {job: [m for m in sink.messages() if job.encode() in m.data]
              for job in (CRON_ROOT_JOB, CRON_MAILTO_JOB, CRON_USER_JOB)}
    assert {job: len(found) for job, found in by_job.items()} == dict.fromkeys(by_job, 1), subjects(sink.messages())
    root, mailto, user = (by_job[job][0] for job in (CRON_ROOT_JOB, CRON_MAILTO_JOB, CRON_USER_JOB))
    assert (root.rcpt_tos, mailto.rcpt_tos, user.rcpt_tos) == (["ops@example.net"], ["someone@example.org"],
                                                                ["ops@example.net"])
    # No -f: the envelope sender is the From: address (README, "The message format and its envelope").
    assert {m.mail_from for m in (root, mailto, user)} == {f"root@{MAIL_DOMAIN}"}
    headers = [(str(parsed["From"]), str(parsed["To"]))
               for parsed in (email.message_from_bytes(m.data) for m in (root, mailto, user))]
    assert headers == [(f"root@{MAIL_DOMAIN} (Cron Daemon)", f"root@{MAIL_DOMAIN}"),
                       (f"root@{MAIL_DOMAIN} (Cron Daemon)", "someone@example.org"),
                       (f"root@{MAIL_DOMAIN} (Cron Daemon)", f"{CRON_USER}@{MAIL_DOMAIN}")]
    assert f"LOGNAME={CRON_USER}".encode() in user.data  # the user's job, mailed by cron as that user:
    assert user.data.startswith(b"Received: from local user ")  # through the submit socket

    shared.wait_event("EVENT=message_delivered", count=3)
    assert shared.spool_files("failed") == {"failed": []}
    assert shared.events("EVENT=message_failed") == []
    for job in (CRON_ROOT_JOB, CRON_MAILTO_JOB, CRON_USER_JOB):
        assert f"CMD (echo {job})" in log, log
    # cron logs a mailer that failed ("mailed N bytes of output but got status 0x…") or is missing.
    assert "got status" not in log and "No MTA installed" not in log, log


def test_a_submission_while_the_daemon_is_stopped_starts_it_through_the_socket(shared: Service) -> None:
    """The socket unit outlives the service: `systemctl stop mailwatchd` leaves the submit socket, and the
    next submission by a user outside the submit group starts the daemon and is delivered."""
    machine = shared.machine
    sink = SmtpSink.start(machine, "activation-relay", 2575)
    shared.reset(relay_env(2575))
    for line in readme_sh_block(SUBMIT_MARKER):
        machine.run(["sh", "-c", line])
    outsider(machine)
    machine.systemctl("stop", UNIT)
    assert machine.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    assert machine.show("mailwatchd.socket", "ActiveState")["ActiveState"] == "active"
    assert shared.as_user("outsider", "/usr/sbin/sendmail -t", message("while stopped")) == ""
    assert subjects(shared.wait_sink(sink, 1)) == ["while stopped"]
    assert machine.show(UNIT, "ActiveState")["ActiveState"] == "active"


DJANGO_DEFAULTS = """\
import django
from django.conf import settings
settings.configure(DEFAULT_FROM_EMAIL="app@example.org")  # EMAIL_HOST='localhost', EMAIL_PORT=25: Django's defaults
django.setup()
from django.core.mail import send_mail
print(send_mail("from django", "sent with Django's defaults", None, ["rcpt@example.com"]))
"""


def test_djangos_default_smtp_backend_sends_through_localhost_25(shared: Service) -> None:
    """An app that configured nothing about mail: Django's SMTP backend on localhost:25, served through
    mailwatchd.socket by a daemon that binds no privileged port itself."""
    machine = shared.machine
    sink = SmtpSink.start(machine, "django-relay", 2560)
    shared.reset(relay_env(2560))
    machine.write_file("/usr/local/lib/mailwatchd-test/django_app.py", DJANGO_DEFAULTS)
    out = shared.as_user("nobody", f"PYTHONPATH={APP_LIB} exec /usr/bin/python3 "
                                   "/usr/local/lib/mailwatchd-test/django_app.py")
    assert out.strip() == "1"
    [received] = shared.wait_sink(sink, 1)
    assert subjects([received]) == ["from django"] and received.rcpt_tos == ["rcpt@example.com"]
    assert machine.show(UNIT, "CapabilityBoundingSet")["CapabilityBoundingSet"] == ""
    assert "127.0.0.1:25" in shared.events("EVENT=daemon_ready")[-1]["LISTEN"]


def test_stop_during_a_drain_loses_nothing(shared: Service) -> None:
    machine = shared.machine
    total = 200
    sink = SmtpSink.start(machine, "busy-relay", 2550, ["--data-delay", "0.05"])
    shared.reset(relay_env(2550))
    batch = [f"drain {n:03d}" for n in range(total)]
    shared.maildir_drop(batch, shared.submitter())

    shared.wait_sink(sink, 20, 30)
    machine.systemctl("stop", UNIT, timeout=40)
    assert machine.show(UNIT, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    stopping = shared.events("EVENT=daemon_stopping")
    assert len(stopping) == 1

    received = len(sink.messages())
    left = shared.spool_files("new", "queue", "deferred", "failed")
    reasons = [machine.read_file(f"{SPOOL}/meta/{name}.json").decode() for name in left["failed"]]
    assert left["failed"] == [], (reasons, shared.events(f"QUEUE_ID={left['failed'][0]}"))
    assert received + len(left["new"]) + len(left["queue"]) + len(left["deferred"]) == total, (received, left)
    assert received < total, "the drain was over before the stop: nothing was tested"

    machine.systemctl("start", UNIT)
    assert subjects(shared.wait_sink(sink, total, 60)) == batch  # each exactly once
    machine.wait_for(lambda: shared.waiting() == 0, message="the spool drained")
    assert len(sink.messages()) == total
