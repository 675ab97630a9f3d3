"""The recovery dropped into a disk another builder laid out (tests/vm/dropin.py: sfdisk, mkfs, mtools,
grub-mkimage, the builder's own grub.cfg sourcing grub-recovery.cfg, `reflash recovery -o DIR`), and an
update through it: the system boots, `reflashctl install` stages the bundle and reboots, GRUB boots the
recovery, the recovery installs, the new release boots and confirms itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recovery.core.envblock import format_envblock
from tests.vm.dropin import lay_out, recovery_output
from tests.vm.staging import INSTRUCTION, read_result, ready
from vm.deadlines import BOOT, KERNEL, RECOVERY
from vm.disk import DiskImage
from vm.machine import Firmware, Machine


@pytest.mark.reliability  # make test keeps the foreign tree path in test-foreign and the installs of test_install
@pytest.mark.timeout(1800)
def test_an_update_through_the_recovery_on_a_disk_laid_out_by_another_builder(
    machine: Callable[..., Machine], built_image: Any, tmp_path: Path,
) -> None:
    recovery = recovery_output(built_image)
    raw = lay_out(built_image, recovery, tmp_path / "builder.img")
    disk = DiskImage.open(raw).overlay(tmp_path / "builder.qcow2")
    update = built_image.bundles["2.0.0"]
    disk.write_file("storage", f"/bundles/{update.name}", update.read_bytes())

    def boot() -> Machine:
        return machine(Firmware.uefi, disk=disk, probe_kernel=recovery / "recovery/vmlinuz")

    m = boot()
    m.expect(ready(built_image, "1.0.0"), BOOT)
    code, out = m.shell(f"reflashctl install /storage/bundles/{update.name} --no-reboot", timeout=600)
    assert code == 0, out
    assert m.shell("test -f /cfg/update-instruction")[0] == 0
    m.send("reboot\n")  # the shell goes with the system: no answer to wait for
    m.expect(r"recovery: starting \(try 1\)", KERNEL + BOOT)  # the system's shutdown, then GRUB's choice
    m.expect(r"recovery: installed 2\.0\.0\r?\n", 4 * RECOVERY)
    m.expect(r"recovery: rebooting", RECOVERY)
    m.expect(r"trial: confirmed 2\.0\.0 \(boot 1 of 3\)", BOOT)
    m.expect(ready(built_image, "2.0.0"), BOOT)
    code, status = m.shell("reflashctl status")
    assert code == 0 and re.search(r"^last update: installed 1\.0\.0 -> 2\.0\.0", status, re.MULTILINE), status
    m.power_cut()

    result = read_result(disk)
    assert (result["outcome"], result["from_version"], result["to_version"]) == ("installed", "1.0.0", "2.0.0")
    assert disk.read_file("cfg", INSTRUCTION) is None
    # GRUB counted the install's try in the instruction and the trial boot on cfg: grub-recovery.cfg
    # found its partitions by label on this disk too.
    assert disk.read_file("cfg", "/recovery/trial") is not None
    # This builder's cfg held an empty recovery/ only: the recovery made both blocks GRUB counts in as
    # its install began (ensure_counters), so every later write of them went over their own bytes.
    assert disk.read_file("cfg", "/recovery/grubenv") == format_envblock({})
