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
import shutil
from pathlib import Path

from recovery.core.atomic import atomic_write, checkpoint_journal
from recovery.core.bootmenu import FILES, INSTRUCTION, Decision, Entry, decide
from recovery.core.errors import Failed
from recovery.core.run import run
from recovery.updated.recoveryslots import Partition, SlotError, _mismatch, _mounted, _record, _slotted
from recovery.updated.sysconfig import SystemConfig

log = logging.getLogger(__name__)

KEXEC = "kexec"


class NoKexec(Exception):
    """Why this reboot goes through the firmware and GRUB instead, in one line."""


def grub_decision(cfg: Path) -> Decision:
    """What GRUB's menu would boot, with the files it reads on cfg as they are now."""
    files: dict[str, bytes | None] = {}
    for name in FILES:
        path = cfg / name
        try:
            files[name] = path.read_bytes() if path.is_file() else None
        except OSError:
            files[name] = b""  # there, but not readable: GRUB fails on it the same way
    return decide(files)


def command_line(decision: Decision) -> str:
    """The kernel command line GRUB's recovery entry writes (its words are literals; so are these)."""
    return " ".join(decision.args)


def load_recovery(config: SystemConfig, *, partition: Partition = Partition(), kexec: str = KEXEC) -> str:
    """Load the recovery GRUB would boot now for `systemctl kexec` and count its try as GRUB would; the
    slot loaded. Raises NoKexec, with nothing loaded and the instruction unchanged, when it cannot."""
    if shutil.which(kexec) is None:
        raise NoKexec("kexec-tools is not installed")
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
            _load(kexec, root / slot, command_line(decision))
    except SlotError as e:
        raise NoKexec(str(e)) from None
    try:
        # GRUB's save_env of recovery_try, done here: the next boot through GRUB counts try 2.
        atomic_write(config.cfg / save.file, save.block)
        checkpoint_journal(config.cfg)
    except OSError as e:
        run([kexec, "-u"], check=False)
        raise NoKexec(f"cannot count the try in the instruction: {e}") from None
    return slot


def _load(kexec: str, slot: Path, cmdline: str) -> None:
    """kexec_file_load first (the only one a locked-down kernel allows), then kexec_load."""
    why = ""
    for mode in ("-s", "-c"):
        argv = [kexec, mode, "-l", slot / "vmlinuz", f"--initrd={slot / 'initrd.img'}", f"--command-line={cmdline}"]
        proc = run(argv, check=False)
        if proc.returncode == 0:
            return
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
    raise NoKexec(f"kexec cannot load recovery slot {slot.name}: {why}")


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
