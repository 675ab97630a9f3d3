"""Straight into the recovery, past the firmware and GRUB: kexec (DESIGN.md "Straight into the recovery").

On a reboot into the recovery the running system does what GRUB would do, from the same files: it
takes GRUB's decision on cfg (`recovery.core.bootmenu.decide`, the model of the menu's scripts that
the tests hold against real GRUB), loads the kernel and initrd of the slot that decision names, checks
them against the slot's `recovery.json`, writes the try GRUB would have counted into the instruction,
and leaves the jump to `systemctl kexec`. It does so only for the plain case, the first try of a staged
instruction: anything else (a try already counted, a trial, a damaged slot, no kexec) is an ordinary
reboot, and GRUB decides as always. Whatever happens after the jump, the disk holds what GRUB's first
try would have left, so a power cut from then on ends in GRUB's counted tries.
"""

from __future__ import annotations

import logging

from recovery.core.bootmenu import INSTRUCTION, Entry
from recovery.core.errors import Failed
from recovery.core.kexec import KEXEC, NoKexec, available, count_as_grub, grub_decision, load
from recovery.core.run import run
from recovery.updated.recoveryslots import Partition, SlotError, _mismatch, _mounted, _record, _slotted
from recovery.updated.sysconfig import SystemConfig

log = logging.getLogger(__name__)

__all__ = ["NoKexec", "load_recovery", "reboot_into_recovery"]


def load_recovery(config: SystemConfig, *, partition: Partition = Partition(), kexec: str = KEXEC) -> str:
    """Load the recovery GRUB would boot now for `systemctl kexec` and count its try as GRUB would; the
    slot loaded. Raises NoKexec, with nothing loaded and the instruction unchanged, when it cannot."""
    available(kexec)
    decision = grub_decision(config.cfg)
    save = decision.save
    if decision.entry is not Entry.recovery or decision.count != 1 or save is None or save.file != INSTRUCTION:
        raise NoKexec(f"not the first try of a staged update ({decision.why}): GRUB decides")
    if save.block is None:
        raise NoKexec("GRUB could not count the try in the instruction: GRUB decides")
    slot = decision.slot
    device = partition.find(config.recovery_disk)
    if device is None or slot is None:
        raise NoKexec(f"no recovery partition {config.recovery_disk}")
    try:
        with _mounted(partition, device, read_only=True) as root:
            if not _slotted(root):
                raise NoKexec("the recovery partition has no slots (an image made before them)")
            record = _record(root / slot)
            if record is None:
                raise NoKexec(f"recovery slot {slot} has no readable recovery.json")
            if (wrong := _mismatch(root / slot, record, from_disk=False)) is not None:
                raise NoKexec(f"recovery slot {slot} does not match its recovery.json: {wrong}")
            load(root / slot / "vmlinuz", root / slot / "initrd.img", " ".join(decision.args), kexec=kexec,
                 what=f"recovery slot {slot}")
    except SlotError as e:
        raise NoKexec(str(e)) from None
    count_as_grub(config.cfg, decision, unload=lambda: run([kexec, "-u"], check=False))  # GRUB's save_env: the next boot through GRUB is try 2
    return slot


def reboot_into_recovery(config: SystemConfig) -> None:
    """`systemctl kexec` into the recovery when it is loaded, else `systemctl reboot` (both clean shutdowns)."""
    try:
        slot = load_recovery(config)
    except NoKexec as e:
        log.info("rebooting through the firmware: %s", e)
        run(["systemctl", "reboot"], error=Failed)
        return
    log.info("kexec into the recovery in slot %s (the firmware and GRUB are skipped)", slot)
    proc = run(["systemctl", "kexec"], check=False)
    if proc.returncode != 0:
        # The try is counted already: GRUB boots try 2 after this reboot, one of the three.
        log.warning("systemctl kexec failed (%s): rebooting through the firmware", proc.stderr.decode(errors="replace").strip())
        run(["systemctl", "reboot"], error=Failed)
