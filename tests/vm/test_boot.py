"""The built appliance image under QEMU: the system boots under BIOS and UEFI; with an update instruction
GRUB boots the recovery OS, counts its tries 1, 2, 3 in the instruction, then boots the rescue entry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from recovery.core.instruction import Instruction, parse_instruction
from vm import deadlines
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.machine import Firmware, Machine

INSTRUCTION = "/update-instruction"


def ready_line(built: Any) -> str:
    return deadlines.ready(built.config.product, built.config.version)


@pytest.mark.parametrize("firmware", list(Firmware))
def test_system_boots_without_an_instruction(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, firmware: Firmware
) -> None:
    assert vm_disk.read_file("cfg", INSTRUCTION) is None
    m = machine(firmware)
    m.expect(ready_line(built_image), BOOT)
    # Firmware and GRUB up to the menu's choice say nothing alarming (UEFI puts GRUB's early lines
    # on the serial console; the core image once printed "Unknown command `#'" three times there).
    before_menu = m.console_log.read_text(errors="replace").split("Loading the system")[0]
    assert not re.search(r"(?i)\berror\b|Unknown command", before_menu), before_menu[-2000:]
    status, cmdline = m.shell("cat /proc/cmdline")
    assert status == 0 and "root=PARTLABEL=system" in cmdline and "recovery." not in cmdline
    assert m.shell("test -d /sys/firmware/efi")[0] == (0 if firmware is Firmware.uefi else 1)


def test_grub_counts_recovery_tries_then_boots_rescue(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage
) -> None:
    # The disk it names never appears: the recovery waits its device_timeout (30 s) for it before
    # rejecting, a wide window to cut the power in before it acts on the instruction. Only GRUB's
    # choice and count are under test here.
    instruction = Instruction.create(
        disk="PARTLABEL=nowhere", file=f"/{built_image.config.product}-2.0.0.bundle", sha256="0" * 64,
        version="2.0.0",
    )
    vm_disk.write_file("cfg", INSTRUCTION, instruction.to_block())
    for n in (1, 2, 3):
        m = machine()
        # The recovery's own line (written through the tty layer, unlike the kernel's printk lines,
        # which a loaded host can make the emulated UART drop characters of).
        m.expect(rf"recovery: starting \(try {n}\)", RECOVERY)
        m.power_cut()
        block = m.read_file("cfg", INSTRUCTION)
        assert block is not None, f"the instruction vanished after boot {n}"
        assert parse_instruction(block).try_count == n, f"boot {n}"
    m = machine()
    m.expect(r"recovery: rescue shell", RECOVERY)
    m.power_cut()
    block = m.read_file("cfg", INSTRUCTION)
    assert block is not None and parse_instruction(block).try_count == 3


def test_a_system_that_cannot_boot_falls_back_to_the_rescue_shell(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage
) -> None:
    """A failed `linux` once sent GRUB back to its menu and into the same entry after the timeout, for
    ever. Now GRUB's fallback is the recovery's rescue shell, after one failed try."""
    assert vm_disk.remove_file("system", "/boot/vmlinuz")
    m = machine()
    m.expect(r"Loading the system", BOOT)
    m.expect(r"Loading the recovery OS \(rescue shell\)", BOOT)
    m.expect(r"recovery: rescue shell", RECOVERY)
    m.power_cut()
    log = m.console_log.read_text(errors="replace")
    assert log.count("Loading the system") == 1, "GRUB ran the system entry again"
