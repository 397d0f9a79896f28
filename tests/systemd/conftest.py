"""Fixtures for scenarios under a throwaway systemd: `machine` (booted, bare), `machine_factory` (prepare
files, then boot), `mailwatchd_layer` (the daemon installed in /opt/mailwatchd/venv, built once per session)
and `mailwatchd_machine` (booted with that layer and the packaging files installed as a package would).

Without root, overlayfs or unshare these tests skip with the reason; with MAILWATCHD_REQUIRE_SYSTEMD=1 (CI)
they fail instead, so a runner that cannot boot a machine is noticed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from .layer import Layer, build_layer, install_packaging, postinst
from .machine import Machine, unavailable_reason

REQUIRE_ENV = "MAILWATCHD_REQUIRE_SYSTEMD"


@functools.cache
def _reason() -> str | None:
    return unavailable_reason()


def require_machine() -> None:
    """Skip (or fail, when CI requires these tests) if a machine cannot boot here."""
    reason = _reason()
    if reason is None:
        return
    message = f"cannot boot a throwaway systemd: {reason}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def machine_factory(tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    """`make(layers=...)` → an unbooted Machine: `prepare()`/`write_file()`, then `boot()`. Stopped at teardown."""
    require_machine()
    made: list[Machine] = []

    def make(layers: Sequence[Path] = ()) -> Machine:
        machine = Machine(tmp_path / f"m{len(made)}", layers=layers)
        made.append(machine)
        return machine

    yield make
    errors = []
    for machine in made:
        try:
            machine.stop()
        except Exception as exc:  # stop every machine, then report
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def machine(machine_factory: Callable[..., Machine]) -> Machine:
    """A booted bare machine (systemd, journald, dbus socket), stopped at teardown."""
    booted = machine_factory()
    booted.boot()
    return booted


@pytest.fixture(scope="session")
def mailwatchd_layer(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    """/opt/mailwatchd/venv with the project and /opt/mailwatchd-testsmtp, built once per session."""
    require_machine()
    return build_layer(tmp_path_factory.mktemp("mailwatchd-layer"))


@pytest.fixture
def mailwatchd_machine_factory(machine_factory: Callable[..., Machine],
                               mailwatchd_layer: Layer) -> Callable[[], Machine]:
    """An unbooted machine with the layer and the packaging files; after `boot()` call `layer.postinst()`."""
    def make() -> Machine:
        machine = machine_factory(layers=[mailwatchd_layer.path])
        install_packaging(machine)
        return machine
    return make


@pytest.fixture
def mailwatchd_machine(mailwatchd_machine_factory: Callable[[], Machine]) -> Machine:
    """A booted machine where mailwatchd is installed as a package would install it (not started)."""
    machine = mailwatchd_machine_factory()
    machine.boot()
    postinst(machine)
    return machine
