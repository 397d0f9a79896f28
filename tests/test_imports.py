"""The package's modules import each other in one direction: no cycle, not even through an import
inside a function or under TYPE_CHECKING (a cycle hidden that way is still two modules that
cannot be understood, or changed, one without the other). And `sendmail -t`, run once per message,
imports only its budget: the modules it needs, none of the standard library's heavier ones (and the
stand-ins that make that possible behave as what they stand in for)."""

from __future__ import annotations

import ast
import copy
import os
import pickle
import re
import subprocess
import sys
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailwatchd import records

PACKAGE = Path(__file__).resolve().parents[1] / "mailwatchd"


def imports_of(path: Path) -> set[str]:
    """The mailwatchd modules `path` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mailwatchd"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # a submodule, if it is one
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mailwatchd."))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {target for target in imports_of(path) if target in modules and target != name}
            for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    edges = graph()
    assert len(edges) > 30 and edges["mailwatchd.transports.delivery"]  # the walk sees the package
    assert find_cycle(edges) is None, " → ".join(find_cycle(edges) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# -- what `sendmail -t` imports: the budget of one process per message --------------------------------------

REPO_ROOT = PACKAGE.parent
# Every mailwatchd module a submission loads. A module added to this path costs every message its
# import: add it here only knowing that (benchmarks/submit.py measures the whole run).
SUBMISSION_MODULES = frozenset({
    "mailwatchd", "mailwatchd.__main__", "mailwatchd.programs", "mailwatchd.exitcodes", "mailwatchd.errors",
    "mailwatchd.records",
    "mailwatchd.settings", "mailwatchd.settings.environment",
    "mailwatchd.message", "mailwatchd.message.envelope", "mailwatchd.message.maildomain",
    "mailwatchd.spool", "mailwatchd.spool.durable", "mailwatchd.spool.queueid",
    "mailwatchd.submission", "mailwatchd.submission.submit", "mailwatchd.submission.sendmail",
})
# What the standard library may add to a bare interpreter: os (and what it imports), errno, and the
# __future__ module that `from __future__ import annotations` loads.
_STDLIB_PROBE = "from __future__ import annotations\nimport errno\nimport os\n"
# Named for the failure message: each of these once cost `sendmail -t` a millisecond or more.
NEVER_ON_THE_SUBMISSION_PATH = ("typing", "re", "pathlib", "enum", "collections", "functools", "contextlib",
                                "email", "asyncio", "argparse", "socket", "urllib.parse", "ipaddress",
                                "mailwatchd.cli", "mailwatchd.settings.config", "mailwatchd.spool.store")
PHP_MAIL = b"From: App <app@example.com>\nTo: ann@example.org\nBcc: hidden@example.org\nSubject: order 42\n\nbody\n"


def console_script(directory: Path, name: str) -> Path:
    """The `mailwatchd` console script as pip (25 and later, which no longer imports re in it) writes it for
    the entry point pyproject.toml declares, under `name` as a link to it would be called."""
    entry = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]["mailwatchd"]
    module, function = entry.split(":")
    path = directory / name
    path.write_text(f"import sys\nfrom {module} import {function}\nif __name__ == '__main__':\n"
                    f"    sys.exit({function}())\n")
    return path


def imported_by(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[set[str], bytes]:
    """The modules a bare interpreter (-S: no site, so nothing a .pth file imports) loads to run `argv`."""
    done = subprocess.run([sys.executable, "-S", "-X", "importtime", *argv], env=env, input=stdin,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.decode().splitlines()
    modules = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    return modules - {"imported package"}, b"\n".join(line.encode() for line in lines if not line.startswith("import"))


@pytest.mark.parametrize("command", [["sendmail", "-t"], ["mailwatchd", "sendmail", "-t"]])
def test_sendmail_t_imports_its_budget_and_nothing_else(tmp_path: Path, clean_env: dict[str, str],
                                                        command: list[str]) -> None:
    spool = tmp_path / "spool"
    env = {**clean_env, "PYTHONPATH": str(REPO_ROOT), "MAILWATCHD_SPOOL": str(spool)}
    (tmp_path / "probe.py").write_text(_STDLIB_PROBE)
    allowed_stdlib, _ = imported_by([str(tmp_path / "probe.py")], env)
    imported, stderr = imported_by([str(console_script(tmp_path, command[0])), *command[1:]], env, PHP_MAIL)
    assert stderr == b""
    assert len(os.listdir(spool / "new")) == 1  # the run did queue the message
    assert {name for name in imported if name.startswith("mailwatchd")} == SUBMISSION_MODULES
    assert not set(NEVER_ON_THE_SUBMISSION_PATH) & imported, sorted(set(NEVER_ON_THE_SUBMISSION_PATH) & imported)
    assert imported - SUBMISSION_MODULES <= allowed_stdlib, "the standard library beyond os and errno"


# -- the stand-ins that keep typing, re and pathlib off that path -------------------------------------------


class Ours(records.NamedTuple):
    """A record with what mailwatchd's records use: defaults, a property, a method."""

    name: str
    size: int = 0
    tags: tuple[str, ...] = ()

    @property
    def doubled(self) -> int:
        return self.size * 2

    def describe(self) -> str:
        return f"{self.name}:{self.size}"


class Theirs(typing.NamedTuple):
    """A record with what mailwatchd's records use: defaults, a property, a method."""

    name: str
    size: int = 0
    tags: tuple[str, ...] = ()

    @property
    def doubled(self) -> int:
        return self.size * 2

    def describe(self) -> str:
        return f"{self.name}:{self.size}"


def test_a_record_is_what_typing_namedtuple_makes() -> None:
    ours, theirs = Ours("a", 2, ("x",)), Theirs("a", 2, ("x",))
    assert tuple(ours) == tuple(theirs) == ("a", 2, ("x",)) and hash(ours) == hash(theirs)
    assert repr(ours) == repr(theirs).replace("Theirs", "Ours") == "Ours(name='a', size=2, tags=('x',))"
    assert (Ours._fields, Ours._field_defaults, Ours.__match_args__) == \
        (Theirs._fields, Theirs._field_defaults, Theirs.__match_args__)
    assert (Ours.__doc__, Ours.__module__, Ours.__qualname__) == (Theirs.__doc__, __name__, "Ours")
    assert (ours.name, ours.size, ours.tags, ours.doubled, ours.describe()) == ("a", 2, ("x",), 4, "a:2")
    assert tuple(Ours("b")) == tuple(Theirs("b")) and tuple(Ours(size=3, name="c")) == tuple(Theirs(size=3, name="c"))
    assert tuple(ours._replace(size=5)) == tuple(theirs._replace(size=5)) == ("a", 5, ("x",))
    assert type(ours._replace(size=5)) is Ours and type(Ours._make(["d", 1, ()])) is Ours
    assert ours._asdict() == theirs._asdict() == {"name": "a", "size": 2, "tags": ("x",)}
    assert pickle.loads(pickle.dumps(ours)) == ours and type(pickle.loads(pickle.dumps(ours))) is Ours
    assert copy.copy(ours) == ours and copy.deepcopy(ours) == ours
    match ours:
        case Ours(name, size):
            assert (name, size) == ("a", 2)
        case _:
            raise AssertionError("__match_args__")
    assert not hasattr(ours, "__dict__")
    assert isinstance(ours, tuple) and ours == ("a", 2, ("x",))  # last: mypy narrows `ours` to a plain tuple


@pytest.mark.parametrize("make", [
    lambda cls: cls(),  # a field without a default
    lambda cls: cls("a", 1, (), "extra"),
    lambda cls: cls("a", colour="red"),
    lambda cls: cls("a", name="b"),
    lambda cls: cls._make(["a"]),
])
def test_a_record_refuses_what_typing_namedtuple_refuses(make: Callable[[type[Any]], object]) -> None:
    for cls in (Ours, Theirs):
        with pytest.raises(TypeError):
            make(cls)


def test_a_record_is_read_only_and_checks_its_fields() -> None:
    record: Any = Ours("a")
    with pytest.raises(AttributeError):
        record.name = "b"
    with pytest.raises(ValueError, match="unexpected field names"):
        record._replace(colour="red")
    with pytest.raises(TypeError):  # a field without a default after one with a default, as typing refuses
        type("Bad", (records.NamedTuple,), {"__module__": __name__, "__annotations__": {"a": "int", "b": "int"},
                                            "a": 1})


def test_the_path_constants_are_paths_made_on_first_use() -> None:
    from mailwatchd.message import maildomain
    from mailwatchd.settings import environment
    from mailwatchd.settings.environment import SERVICE_CONFIG
    from mailwatchd.spool import queueid

    paths = (environment.SERVICE_SPOOL, environment.SUBMIT_SOCKET, environment.SERVICE_STATUS_FILE, SERVICE_CONFIG)
    assert paths == (Path("/var/spool/mailwatchd"), Path("/run/mailwatchd/submit.sock"),
                     Path("/run/mailwatchd/status/status.json"), Path("/etc/mailwatchd/mailwatchd.env"))
    assert maildomain.MAILNAME == Path("/etc/mailname") == Path(maildomain.MAILNAME_PATH)
    assert queueid.QUEUE_ID_PATTERN.pattern == queueid.QUEUE_ID_REGEX
    for module in (environment, maildomain, queueid):
        with pytest.raises(AttributeError):
            module.NO_SUCH_NAME  # noqa: B018


@given(st.text(alphabet="0123456789ABCDEFabcdefXYZ\n /", min_size=18, max_size=22))
def test_is_queue_id_is_what_the_pattern_matches(name: str) -> None:
    from mailwatchd.spool import queueid

    assert queueid.is_queue_id(name) is bool(re.match(queueid.QUEUE_ID_REGEX, name))


def test_is_queue_id_for_real_ids_and_near_misses() -> None:
    from mailwatchd.spool import queueid

    real = queueid.new_queue_id()
    assert queueid.is_queue_id(real)
    assert not any(queueid.is_queue_id(name) for name in (real + "\n", real[:-1], real.lower(), real + "0", ""))
