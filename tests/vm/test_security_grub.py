"""Words in the instruction never reach the recovery's kernel command line (issue 10, item 4).

Whoever can write files on cfg writes the instruction, and GRUB reads `recovery_try` from it. GRUB
passes only a literal try count 1, 2 or 3 on; and the recovery refuses a command line it does not
understand with a rescue shell, never an install.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vm.deadlines import RECOVERY
from vm.disk import DiskImage
from vm.machine import Machine

from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from recovery.core.instruction import Instruction
from tests.vm.staging import INSTRUCTION, stage


HOSTILE_TRY = "x recovery.mode=install init=/bin/sh"
# The recovery's first line that shows which way it went: the rescue shell, or an install begun.
FIRST_STEP = r"recovery: (rescue shell|verifying|kernel command line refused)[^\r\n]*\r?\n"


def editenv(disk: DiskImage, *args: str, tmp: Path) -> bytes:
    """Run the real grub-editenv on the instruction of `disk`'s cfg partition; the block as written back."""
    block = disk.read_file("cfg", INSTRUCTION)
    assert block is not None, "no instruction staged"
    path = tmp / "update-instruction"
    path.write_bytes(block)
    subprocess.run(["grub-editenv", str(path), *args], check=True)
    edited = path.read_bytes()
    disk.write_file("cfg", INSTRUCTION, edited)
    return edited


def env_lines(block: bytes, tmp: Path) -> list[str]:
    path = tmp / "listed"
    path.write_bytes(block)
    return subprocess.run(["grub-editenv", str(path), "list"], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def test_kernel_arguments_in_the_try_counter_end_in_the_rescue_shell(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, tmp_path: Path, scenario: Scenario,
) -> None:
    scenario.name = f"Instruction's try counter carries kernel arguments (`recovery_try={HOSTILE_TRY}`)"
    scenario.checked = (
        "written with grub-editenv into a staged instruction: GRUB boots the rescue entry, the recovery "
        "starts the rescue shell (no `recovery: verifying`), `/proc/cmdline` read in that shell has "
        "`recovery.mode=rescue` and no `init=`, `recovery.mode=install` or `recovery.try`; the "
        "instruction is left byte-for-byte as written"
    )
    # A real, valid update: if the words got through, the recovery would go on to install it.
    stage(vm_disk, built_image.bundles["2.0.0"].read_bytes(), name="demo-appliance-2.0.0.bundle")
    written = editenv(vm_disk, "set", f"recovery_try={HOSTILE_TRY}", tmp=tmp_path)
    assert f"recovery_try={HOSTILE_TRY}" in env_lines(written, tmp_path)

    m = machine()
    m.expect(r"Loading the recovery OS \(rescue shell\)", RECOVERY)
    step = m.expect(FIRST_STEP, RECOVERY).group(0).strip()
    assert step.startswith("recovery: rescue shell"), f"the recovery went on with {step!r}"
    status, cmdline = m.shell("cat /proc/cmdline")
    assert status == 0, cmdline
    words = cmdline.split()
    scenario.note(f"/proc/cmdline: {cmdline.strip()}")
    assert "recovery.mode=rescue" in words, cmdline
    assert "init=" not in cmdline and "recovery.mode=install" not in cmdline, cmdline
    assert not any(w.startswith("recovery.try") for w in words), cmdline
    m.power_cut()
    # GRUB counted nothing (the counter is not 1, 2 or 3) and the recovery removed nothing.
    assert vm_disk.read_file("cfg", INSTRUCTION) == written
    assert "recovery: verifying" not in m.console_log.read_text(errors="replace")


def test_recovery_refuses_a_conflicting_command_line_with_the_rescue_shell(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario,
) -> None:
    scenario.name = "Recovery booted with conflicting `recovery.mode` arguments (rescue, then install)"
    scenario.checked = (
        "the recovery as PID 1 prints `recovery: kernel command line refused: …` naming the repeat, then "
        "starts the rescue shell, which answers; the staged update is not touched (no `recovery: verifying`)"
    )
    stage(vm_disk, built_image.bundles["2.0.0"].read_bytes(), name="demo-appliance-2.0.0.bundle")
    staged = vm_disk.read_file("cfg", INSTRUCTION)
    recovery = built_image.recovery
    m = machine(
        disk=vm_disk, kernel=recovery / "vmlinuz", initrd=recovery / "initrd.img",
        append="recovery.mode=rescue recovery.try=3 recovery.mode=install console=tty0 console=ttyS0,115200",
    )
    refused = m.expect(FIRST_STEP, RECOVERY).group(0).strip()
    assert re.fullmatch(r"recovery: kernel command line refused: recovery\.mode given twice .*; rescue shell",
                        refused), refused
    step = m.expect(FIRST_STEP, RECOVERY).group(0).strip()
    assert step.startswith("recovery: rescue shell"), step
    assert m.shell("echo rescue-shell-answers") == (0, "rescue-shell-answers\n")
    scenario.note(refused)
    m.power_cut()
    assert vm_disk.read_file("cfg", INSTRUCTION) == staged
    assert "recovery: verifying" not in m.console_log.read_text(errors="replace")


@pytest.mark.reliability  # make reliability (test_boot.py counts GRUB's tries in make test)
def test_grub_still_passes_its_own_counts(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, tmp_path: Path, scenario: Scenario,
) -> None:
    """The other two command lines GRUB writes, now from literals: an install's try 3, a rescue's try 3."""
    scenario.name = "GRUB's own try counts after the literal-only change (counter 2, then 3)"
    scenario.checked = (
        "counter 2: GRUB counts 3 in the instruction and boots the recovery with `recovery.try=3` "
        "(`recovery: starting (try 3)`); counter 3: the rescue shell, `/proc/cmdline` with "
        "`recovery.mode=rescue recovery.try=3 recovery.slot=b` (try 3 loads the other slot), the instruction unchanged"
    )
    # A disk that never appears: the recovery waits for it, long enough to cut the power first.
    instruction = Instruction.create(disk="PARTLABEL=nowhere", file="/nothing.bundle", sha256="0" * 64,
                                     version="2.0.0")
    vm_disk.write_file("cfg", INSTRUCTION, instruction.to_block())
    editenv(vm_disk, "set", "recovery_try=2", tmp=tmp_path)
    m = machine()
    m.expect(r"Loading the recovery OS \(try 3\)", RECOVERY)
    m.expect(r"recovery: starting \(try 3\)", RECOVERY)
    m.power_cut()
    counted = vm_disk.read_file("cfg", INSTRUCTION)
    assert counted is not None and "recovery_try=3" in env_lines(counted, tmp_path)

    m = machine(name="rescue")
    m.expect(r"Loading the recovery OS \(rescue shell\)", RECOVERY)
    step = m.expect(FIRST_STEP, RECOVERY).group(0).strip()
    assert step.startswith("recovery: rescue shell"), step
    status, cmdline = m.shell("cat /proc/cmdline")
    # try 3 loads the other recovery slot (DESIGN.md "The recovery's two slots"): b, with a active
    assert status == 0 and "/b/vmlinuz recovery.mode=rescue recovery.try=3 recovery.slot=b panic=10 console=" in cmdline, \
        cmdline
    scenario.note(f"/proc/cmdline in the rescue shell: {cmdline.strip()}")
    m.power_cut()
    assert vm_disk.read_file("cfg", INSTRUCTION) == counted
