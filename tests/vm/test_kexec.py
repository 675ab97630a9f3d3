"""Past the firmware and GRUB by kexec, under QEMU (recovery/updated/kexec.py, recovery/os/kexec.py):
`reflashctl install` stages 2.0.0 and the running system kexecs into recovery slot a's kernel with the
try counted in the instruction as GRUB would; the recovery installs and kexecs into 2.0.0 with its
first trial boot counted as GRUB would; and a power cut in the kexec'd recovery ends in GRUB's next
counted try, which installs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from recovery.core.envblock import parse_envblock
from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.staging import INSTRUCTION, read_result, ready
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.machine import Machine

KEXEC = r"kexec into the recovery in slot a"
TRANSFER = 900.0  # verification of the bundle by reflashctl, under TCG


def _stage_and_kexec(machine: Callable[..., Machine], built: Any, disk: DiskImage) -> tuple[Machine, int]:
    """Boot 1.0.0 with 2.0.0 on storage and `reflashctl install` it; up to the kexec'd recovery's start.
    Returns the machine and where in its console the reboot began."""
    good = built.bundles["2.0.0"]
    disk.write_file("storage", f"/bundles/{good.name}", good.read_bytes())
    m = machine()
    m.expect(ready(built, "1.0.0"), BOOT)
    m.shell("true", BOOT)
    m.send(f"reflashctl install /storage/bundles/{good.name}\n")
    m.expect(r"rebooting into the recovery to install it", TRANSFER)
    start = m.console.cursor
    m.expect(KEXEC, BOOT)
    m.expect(r"recovery: starting \(try 1\)", BOOT)
    return m, start


@pytest.mark.reliability  # make test sees both jumps in the update page's cycle (tests/vm/test_daemon.py)
def test_an_update_kexecs_into_the_recovery_and_into_the_new_release(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario,
) -> None:
    scenario.name = "kexec into the recovery: reflashctl install, the firmware and GRUB skipped"
    scenario.checked = ("no GRUB menu between the reboot line and the recovery's start (try 1, slot a); 2.0.0 installed, "
                        "then kexec'd into with trial boot 1 counted, no GRUB menu before it; confirmed")
    m, start = _stage_and_kexec(machine, built_image, vm_disk)
    between = m.console.text[start:m.console.cursor]
    assert "GNU GRUB" not in between and "Loading the recovery OS" not in between, between[-2000:]
    m.expect(r"recovery: version 1\.0\.0 \(slot a\)", RECOVERY)
    m.expect(r"recovery: installed 2\.0\.0\r?\n", RECOVERY)
    m.expect(r"recovery: 2\.0\.0 is loaded for kexec \(trial boot 1 counted\)", RECOVERY)
    m.expect(r"Loading the system \(by kexec from the recovery", RECOVERY)
    start = m.console.cursor
    m.expect(r"trial: 2\.0\.0 is on trial \(boot 1 of 3\)", BOOT)  # counted once: by the recovery, as GRUB would
    assert "GNU GRUB" not in m.console.text[start:m.console.cursor]
    m.expect(r"trial: confirmed 2\.0\.0 \(boot 1 of 3\)", BOOT)
    m.expect(ready(built_image, "2.0.0"), BOOT)
    m.power_cut()
    result = read_result(vm_disk)
    assert (result["outcome"], result["to_version"], result["try"]) == ("installed", "2.0.0", 1), result
    assert vm_disk.read_file("cfg", INSTRUCTION) is None


@pytest.mark.reliability
def test_a_power_cut_in_the_kexecd_recovery_ends_in_grubs_next_try(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario,
) -> None:
    scenario.name = "kexec into the recovery, power cut while it extracts"
    scenario.checked = ("the instruction holds try 1 as GRUB would have written it; after the cut GRUB boots try 2, "
                        "which installs 2.0.0")
    m, _ = _stage_and_kexec(machine, built_image, vm_disk)
    m.expect(r"recovery: extracting\r?\n", RECOVERY)
    m.power_cut()
    raw = vm_disk.read_file("cfg", INSTRUCTION)
    assert raw is not None and parse_envblock(raw).get("recovery_try") == "1"
    m = machine()
    m.expect(r"Loading the recovery OS \(try 2\)", BOOT)
    m.expect(r"recovery: installed 2\.0\.0\r?\n", 2 * RECOVERY)
    m.expect(ready(built_image, "2.0.0"), 2 * BOOT)
    m.power_cut()
    assert read_result(vm_disk)["try"] == 2
