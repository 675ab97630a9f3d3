"""Failing disks under QEMU, made with `blkdebug` filters: write errors on the system partition during
the install, read errors on the storage disk while the bundle is verified.

`make test` runs the storage read errors; the system write errors (three tries, rescue, retry) are
marked `reliability` (`make reliability`).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recovery.core.run import run
from vm.deadlines import BOOT, KERNEL, RECOVERY
from vm.disk import DiskImage
from vm.drive import Drive, blkdebug, inject_error
from vm.machine import Machine

from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.staging import INSTRUCTION, partition_digest, read_result, ready, stage
from tests.vm.treecheck import check_installed

SECTOR = 512
MiB = 1024 * 1024
BUNDLE = "/bundles/demo-appliance-2.0.0.bundle"


def faulty(disk: DiskImage, *rules: dict[str, Any]) -> Drive:
    return Drive(disk.path, disk.format, filters=(blkdebug(*rules),))


def file_sectors(disk: DiskImage, partition: str, path: str) -> list[int]:
    """The disk sectors (512 bytes, from the start of the disk) that hold a file's data."""
    part = disk.partition(partition)
    with tempfile.TemporaryDirectory(dir=disk.path.parent) as tmp:
        image = Path(tmp) / "part"
        disk.export_range(part.start, part.size, image)
        out = run(["debugfs", "-R", "stats", image]).stdout.decode()
        block_size = int(re.search(r"Block size:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
        blocks = [int(b) for b in run(["debugfs", "-R", f'blocks "{path}"', image]).stdout.split()]
    assert blocks, f"{path} has no data blocks on {partition}"
    return [(part.start + b * block_size) // SECTOR for b in blocks]


def test_storage_read_errors_while_verifying_reject_the_update(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, system_digest: str,
    scenario: Scenario,
) -> None:
    scenario.name = "Storage disk returns read errors in the staged bundle while it is verified"
    scenario.checked = (
        "`recovery: rejected` naming the I/O error; result.json rejected; instruction removed; the system "
        "partition byte-for-byte as built; GRUB boots the system again"
    )
    stage(vm_disk, built_image.bundles["2.0.0"].read_bytes(), name=BUNDLE.rsplit("/", 1)[1])
    sectors = file_sectors(vm_disk, "storage", BUNDLE)
    bad = [sectors[len(sectors) // 3], sectors[2 * len(sectors) // 3]]  # in the payload, past the manifest
    m = machine(disk=faulty(vm_disk, *(inject_error(sector=s, iotype="read") for s in bad)),
                probe_kernel=built_image.recovery / "vmlinuz")
    m.expect(r"recovery: starting \(try 1\)", KERNEL)
    verdict = m.expect(r"recovery: (installed|rejected|failed)[^\r\n]*\r?\n", RECOVERY).group(0).strip()
    assert re.match(r"recovery: rejected: .*(Input/output error|I/O error)", verdict), verdict
    m.expect(r"Loading the system", KERNEL)
    m.power_cut()  # GRUB chose the old system; cut before its kernel mounts (and so changes) it
    result = read_result(vm_disk)
    assert result["outcome"] == "rejected", result
    assert vm_disk.read_file("cfg", INSTRUCTION) is None
    assert partition_digest(vm_disk, "system") == system_digest
    scenario.note(f"read errors at sectors {bad}; {verdict.strip()}")


@pytest.mark.reliability
def test_system_write_errors_fail_three_tries_then_rescue_then_retry_installs(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario
) -> None:
    scenario.name = "System partition returns write errors during the install; fault removed; `recovery retry`"
    scenario.checked = (
        "each of tries 1-3 ends `recovery: failed`; GRUB then boots the rescue shell; `Loading the system` is "
        "never printed while the system is half-written; after the fault is removed, `recovery retry` in the "
        "rescue shell and one reboot install 2.0.0; installed tree equals the payload; 2.0.0 boots"
    )
    stage(vm_disk, built_image.bundles["2.0.0"].read_bytes(), name=BUNDLE.rsplit("/", 1)[1])
    system = vm_disk.partition("system")
    # The middle of every MiB past group 0's metadata, except where mkfs puts the journal (mid-partition):
    # ext4 spreads directories over all block groups, so the extraction's data writes hit some of these.
    bad = [(system.start + offset * MiB + MiB // 2) // SECTOR
           for offset in range(16, system.size // MiB) if not 500 <= offset < 580]
    m = machine(disk=faulty(vm_disk, *(inject_error(sector=s, iotype="write") for s in bad)),
                probe_kernel=built_image.recovery / "vmlinuz")
    verdicts = []
    for n in (1, 2, 3):
        m.expect(rf"recovery: starting \(try {n}\)", KERNEL * 2)
        verdicts.append(m.expect(r"recovery: (installed|rejected|failed)[^\r\n]*\r?\n", RECOVERY).group(0).strip())
        assert verdicts[-1].startswith("recovery: failed"), verdicts
    m.expect(r"recovery: rescue shell", KERNEL * 2)
    status, out = m.shell("cat /proc/cmdline")
    assert status == 0 and "recovery.mode=rescue" in out
    m.power_cut()
    assert "Loading the system" not in m.console_log.read_text(errors="replace")
    result = read_result(vm_disk)
    assert (result["outcome"], result["try"]) == ("failed", 3), result
    scenario.note(f"write errors in {len(bad)} sectors of the system partition; {verdicts[0]}")

    m = machine(name="healthy-rescue")  # the fault is gone; GRUB is still past its three tries
    m.expect(r"recovery: rescue shell", KERNEL * 2)
    status, out = m.shell("recovery retry")
    assert status == 0, out
    m.send("exit\n")
    m.expect(r"recovery: starting \(try 1\)", KERNEL * 2)
    m.expect(r"recovery: installed 2\.0\.0", RECOVERY)
    m.expect(r"Loading the system", KERNEL)
    m.power_cut()
    checked = check_installed(vm_disk, built_image.bundles["2.0.0"], built_image.keys)
    m = machine(name="system")
    m.expect(ready(built_image, "2.0.0"), BOOT)
    m.power_cut()
    result = read_result(vm_disk)
    assert (result["outcome"], result["to_version"]) == ("installed", "2.0.0"), result
    assert vm_disk.read_file("cfg", INSTRUCTION) is None
    scenario.note(f"after retry: installed, {checked} paths checked")
