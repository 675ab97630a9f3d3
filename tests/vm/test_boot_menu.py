"""The boot menu travels with the recovery, under QEMU: the ESP's stub sources the active slot's menu.cfg
once GRUB has checked it. A release whose recovery carries a changed menu installs, and the boot after
the switch shows the new menu; a menu deleted or truncated in the active slot gives way to the other's.
(A power cut while a menu is written or switched is the recovery's: tests/vm/test_recovery_update.py.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.menus import BANNER, VERSION, menu_release
from tests.vm.staging import ready, stage
from tests.vm.test_recovery_update import active_slot
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.machine import Machine


@pytest.mark.reliability
def test_a_changed_menu_arrives_with_its_recovery_and_shows_after_the_switch(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario,
) -> None:
    scenario.name = "Boot menu update: a release whose recovery carries a changed menu"
    scenario.checked = ("the old menu until the recovery switch; after it, the new menu's own line before the menu, "
                        "and the release boots from it")
    bundle = menu_release(built_image)
    stage(vm_disk, bundle.read_bytes(), name=bundle.name, version=VERSION)
    m = machine()
    first = m.expect(rf"{re.escape(BANNER)}|recovery: installed {re.escape(VERSION)}", 4 * RECOVERY)
    assert first.group(0).startswith("recovery:"), "the new menu showed before its recovery was written"
    m.expect(rf"recovery-slots: recovery {re.escape(VERSION)} in slot b is active", 3 * BOOT)
    m.expect(ready(built_image, VERSION), BOOT)
    m.power_cut()
    assert active_slot(vm_disk) == "b"

    m = machine()
    m.expect(re.escape(BANNER), BOOT)
    m.expect(ready(built_image, VERSION), BOOT)
    m.power_cut()


@pytest.mark.parametrize("damage", ["truncated", pytest.param("deleted", marks=pytest.mark.reliability)])
def test_a_damaged_menu_in_the_active_slot_gives_way_to_the_other_slots(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, damage: str, scenario: Scenario,
) -> None:
    scenario.name = "Boot menu: the active slot's menu.cfg truncated or deleted"
    scenario.checked = "the stub says slot a's menu cannot be used, sources slot b's, and 1.0.0 boots"
    scenario.note(damage)
    menu = vm_disk.read_file("recovery", "/a/menu.cfg")
    assert menu is not None and len(menu) > 4096
    if damage == "truncated":
        vm_disk.write_file("recovery", "/a/menu.cfg", menu[: len(menu) // 2])
    else:
        assert vm_disk.remove_file("recovery", "/a/menu.cfg")
    m = machine()
    m.expect(r"The boot menu in recovery slot a cannot be used", BOOT)
    m.expect(ready(built_image, "1.0.0"), BOOT)
    m.power_cut()
