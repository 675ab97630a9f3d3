"""Signing keys rotate over three releases under QEMU (tests/vm/rotation.py): A signs 2.1.0, which introduces
B; B signs 3.0.0, which revokes A; then a bundle signed by A is refused by `reflashctl` on the running
3.0.0 and, staged by hand on cfg, by the recovery 3.0.0 wrote into its slot, with the system untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.rotation import rotation_bundles
from tests.vm.staging import partition_digest, read_result, ready, stage
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.machine import Machine

INCOMING = "/incoming"
TRANSFER = 900.0  # verification of a bundle in the guest, under TCG


def _installed_and_confirmed(m: Machine, built: Any, version: str, recovery: str, slot: str) -> None:
    """Follow an install of `version` by `recovery` to the new release's confirmation and its recovery update."""
    v = re.escape(version)
    m.expect(rf"recovery: version {re.escape(recovery)}", 4 * RECOVERY)
    m.expect(rf"recovery: installed {v}\r?\n", 4 * RECOVERY)
    m.expect(rf"trial: confirmed {v} \(boot 1 of 3\)", 2 * BOOT)
    m.expect(rf"recovery-slots: recovery {v} in slot {slot} is active", BOOT)
    m.expect(ready(built, version), BOOT)


@pytest.mark.reliability
@pytest.mark.timeout(3600)
def test_keys_rotate_over_three_releases_and_the_revoked_key_is_refused_everywhere(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario,
) -> None:
    scenario.name = "Key rotation: A signs 2.1.0 (introduces B), B signs 3.0.0 (revokes A), A's 3.0.1 refused"
    scenario.checked = ("2.1.0 and 3.0.0 install and confirm, each writing its recovery into the spare slot; the "
                        "A-signed 3.0.1 is refused by reflashctl on 3.0.0 and by recovery 3.0.0 when staged by hand, "
                        "`signed by revoked key <A>`, with the system partition unchanged")
    rotation = rotation_bundles(built_image)
    b = rotation.bundles
    for version in ("3.0.0", "3.0.1"):
        vm_disk.write_file("storage", f"{INCOMING}/{b[version].name}", b[version].read_bytes())

    # 2.1.0, signed by A: the factory's recovery (trusting A only) installs it.
    stage(vm_disk, b["2.1.0"].read_bytes(), name=b["2.1.0"].name, version="2.1.0")
    m = machine()
    _installed_and_confirmed(m, built_image, "2.1.0", "1.0.0 (slot a)", "b")

    # 3.0.0, signed by B: 2.1.0 trusts B, and so does its recovery, now in slot b.
    code, out = m.shell(f"reflashctl install /storage{INCOMING}/{b['3.0.0'].name} --no-reboot", TRANSFER)
    assert code == 0 and "staged" in out, out
    m.power_cut()
    m = machine()
    _installed_and_confirmed(m, built_image, "3.0.0", "2.1.0 (slot b)", "a")

    # 3.0.1, signed by the revoked A: reflashctl refuses it, staging nothing.
    code, out = m.shell(f"reflashctl install /storage{INCOMING}/{b['3.0.1'].name} --no-reboot", TRANSFER)
    assert code != 0 and f"signed by revoked key {rotation.key_a}" in out, out
    assert m.shell("test -e /cfg/update-instruction")[0] == 1
    m.power_cut()

    # Staged by hand on cfg: the recovery 3.0.0 (slot a) refuses it before touching the system.
    before = partition_digest(vm_disk, "system")
    stage(vm_disk, b["3.0.1"].read_bytes(), name=b["3.0.1"].name, version="3.0.1")
    m = machine()
    m.expect(r"recovery: version 3\.0\.0 \(slot a\)", 4 * RECOVERY)
    m.expect(rf"recovery: rejected: [^\n]*signed by revoked key {rotation.key_a}", RECOVERY)
    # Compared before 3.0.0 runs again: a running system writes its own root (journal, timers).
    m.expect(r"Loading the system", RECOVERY)
    m.power_cut()
    assert partition_digest(vm_disk, "system") == before
    result = read_result(vm_disk)
    assert result["outcome"] == "rejected" and f"signed by revoked key {rotation.key_a}" in result["reason"], result
    assert result["recovery"] == {"version": "3.0.0", "slot": "a"}, result
    assert vm_disk.read_file("cfg", "/update-instruction") is None
    m = machine()
    m.expect(ready(built_image, "3.0.0"), 2 * BOOT)
    m.power_cut()
