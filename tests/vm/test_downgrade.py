"""A downgrade the instruction does not allow, through the real system image: the recovery rejects it
before touching the system (issue 10, item 5), and the running system's `reflashctl` refuses it
without `--allow-downgrade` and records the choice with it.

The bundle is the demo's 1.0.0 bundle re-signed by the image's test key as 0.9.0: older than the
running 1.0.0, and genuine in every other respect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.staging import INSTRUCTION, partition_digest, read_result, ready, relabelled, stage
from vm.deadlines import BOOT, KERNEL, RECOVERY
from vm.disk import DiskImage
from vm.machine import Firmware, Machine

TRANSFER = 900.0  # verification of a bundle in the guest
NAME = "demo-appliance-0.9.0.bundle"


@pytest.fixture(scope="module")
def older_bundle(built_image: Any) -> bytes:
    return relabelled(built_image.bundles["1.0.0"].read_bytes(), built_image.keys / "signing.pem", "0.9.0")


@pytest.mark.reliability  # make reliability (the refusal itself: tests/unit, recovery and reflashctl)
def test_a_downgrade_the_instruction_does_not_allow_is_rejected_and_the_old_system_boots(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, older_bundle: bytes,
    system_digest: str, scenario: Scenario,
) -> None:
    # The same row as tests/unit/test_security_feed.py's downgrade scenarios.
    scenario.name = "Downgrade refused unless allowed (reflashctl install, install --latest, the recovery's own check)"
    scenario.note(
        "under QEMU: 0.9.0 staged on 1.0.0 without `recovery_allow_downgrade` rejected with the reason, "
        "system partition byte-for-byte as built, 1.0.0 boots again; its reflashctl refuses the bundle in one "
        "line and stages it with --allow-downgrade"
    )
    stage(vm_disk, older_bundle, name=NAME, version="0.9.0")
    m = machine(Firmware.bios)
    m.expect(r"recovery: starting \(try 1\)", KERNEL)
    verdict = m.expect(r"recovery: (installed|rejected|failed)[^\r\n]*\r?\n", RECOVERY).group(0).strip()
    assert verdict == "recovery: rejected: downgrade from 1.0.0 to 0.9.0 not allowed by the instruction"
    m.expect(r"recovery: rebooting", RECOVERY)
    # GRUB chooses the old system again; cut before it mounts (and so writes to) its root.
    m.expect(r"Loading the system", KERNEL)
    m.power_cut()
    result = read_result(vm_disk)
    assert (result["outcome"], result["from_version"], result["to_version"]) == ("rejected", "1.0.0", "0.9.0")
    assert result["reason"] == "downgrade from 1.0.0 to 0.9.0 not allowed by the instruction"
    assert result["seconds"]["verify"] >= 0
    assert vm_disk.read_file("cfg", INSTRUCTION) is None
    assert partition_digest(vm_disk, "system") == system_digest

    m = machine(Firmware.bios)
    m.expect(ready(built_image, "1.0.0"), BOOT)
    code, out = m.shell(f"reflashctl install /storage/bundles/{NAME} --no-reboot >/run/out 2>/run/err", TRANSFER)
    assert code == 1
    _, err = m.shell("cat /run/err")
    assert err.strip() == "rejected: downgrade from 1.0.0 to 0.9.0 refused (use --allow-downgrade to install it)"
    assert m.shell("test -e /cfg/update-instruction")[0] == 1
    code, out = m.shell(f"reflashctl install /storage/bundles/{NAME} --no-reboot --allow-downgrade", TRANSFER)
    assert code == 0 and "staged demo-appliance 0.9.0" in out, out
    code, out = m.shell("reflashctl status")
    assert code == 0 and "staged: 0.9.0 (a downgrade, allowed) from /bundles/" + NAME in out, out
    m.power_cut()
    staged = vm_disk.read_file("cfg", INSTRUCTION)
    assert staged is not None and b"\nrecovery_allow_downgrade=1\n" in staged
