"""The VM rig's pytest plugin: the `vm` marker on tests/vm, a `machine` factory, console logs on failures.

Registered by tests/vm/conftest.py. A failing test that booted machines shows the end of each one's
console in its report, with the path of the whole log (kept in the test's tmp_path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .disk import DiskImage
from .drive import Drive
from .machine import Firmware, Machine, qemu_available

MACHINES = pytest.StashKey[list[Machine]]()
REPORT_LINES = 200

MachineFactory = Callable[..., Machine]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots real disk images under QEMU (slow)")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    vm_tests = config.rootpath / "tests" / "vm"
    for item in items:
        if item.path.is_relative_to(vm_tests) or "machine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed:
        return
    for machine in item.stash.get(MACHINES, []):
        report.sections.append((f"console {machine.name}: {machine.console_log}", _log_tail(machine.console_log)))


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no console log: {e.strerror})"
    cut = f"... {len(lines) - REPORT_LINES} earlier lines in {path}\n" if len(lines) > REPORT_LINES else ""
    return cut + "\n".join(lines[-REPORT_LINES:])


@pytest.fixture
def vm_disk(request: pytest.FixtureRequest, tmp_path: Path) -> DiskImage:
    """A fresh copy-on-write overlay of the session's built image (`built_image.disk`), for this test."""
    built = request.getfixturevalue("built_image")
    return DiskImage.open(built.disk).overlay(tmp_path / "disk.qcow2")


@pytest.fixture
def machine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MachineFactory]:
    """Boot machines: `machine(Firmware.uefi)` starts one on this test's overlay (`vm_disk`) and returns it.

    Every call makes a new Machine on the same overlay by default, so a test can cut the power and
    boot again; `disk=` / `kernel=` and any other `Machine` argument override, `start=False` returns
    it unstarted. All machines are stopped after the test, their logs stay in tmp_path.
    """
    if (missing := qemu_available()) is not None:
        pytest.skip(missing)
    machines = request.node.stash.setdefault(MACHINES, [])

    def boot(
        firmware: Firmware = Firmware.bios,
        *,
        disk: Path | DiskImage | Drive | None = None,
        kernel: Path | None = None,
        name: str | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> Machine:
        if disk is None and kernel is None:
            disk = request.getfixturevalue("vm_disk")
            kwargs.setdefault("probe_kernel", request.getfixturevalue("built_image").recovery / "vmlinuz")
        m = Machine(
            disk, firmware=firmware, kernel=kernel, name=name or f"{firmware}-{len(machines) + 1}",
            workdir=tmp_path, **kwargs,
        )
        machines.append(m)
        return m.start() if start else m

    yield boot
    for m in machines:
        m.stop()
