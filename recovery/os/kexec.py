"""Straight into the installed release, past the firmware and GRUB (DESIGN.md "Straight into the recovery").

After an install (or a rollback's restore) the recovery does what GRUB would do next, from the same
files: GRUB's decision on cfg (`recovery.core.bootmenu.decide`) must be the system entry's first
trial boot; the release's kernel and initrd are loaded from the system partition where that entry
loads them (`/boot/vmlinuz`, `/boot/initrd.img`, links followed inside the tree) with the entry's
command line, trial boot 1 is counted in `recovery/trial` as GRUB's save_env would count it, and PID 1
then jumps instead of rebooting. Anything else is an ordinary reboot, and GRUB decides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from recovery.core import kexec
from recovery.core.bootmenu import TRIAL, Entry
from recovery.core.boottree import INITRD, KERNEL, resolve
from recovery.core.kexec import NoKexec, count_as_grub, grub_decision
from recovery.os.rollback import _lookup  # the tree's own lookup, as the rollback reads it

log = logging.getLogger(__name__)

Loader = Callable[..., None]  # (kernel, initrd, cmdline, *, what): kexec.load_file, or a test's


def load_system(cfg: Path, mount_system: Callable[[], Path], umount_system: Callable[[], None], *,
                loader: Loader | None = None, unload: Callable[[], object] = lambda: None) -> int:
    """Load the installed release for kexec and count its trial boot as GRUB would; the trial boot
    counted. `mount_system` mounts the system partition read-only and says where. Raises NoKexec, with
    nothing loaded and cfg unchanged, when GRUB's decision is anything but a first trial boot or the
    kernel cannot be loaded."""
    decision = grub_decision(cfg)
    save = decision.save
    if decision.entry is not Entry.system or decision.trial_boot != 1 or save is None or save.file != TRIAL:
        raise NoKexec(f"not the first trial boot of a release ({decision.why}): GRUB decides")
    if save.block is None:
        raise NoKexec("GRUB could not count the trial boot: GRUB decides")
    root = mount_system()
    try:
        paths = [resolve(path, _lookup(root)) for path in (KERNEL, INITRD)]
        if any(p is None or not (root / p).is_file() for p in paths):
            raise NoKexec(f"the installed tree has no {KERNEL} and {INITRD} to load")
        kernel, initrd = (root / p for p in paths if p is not None)
        (loader or kexec.load_file)(kernel, initrd, " ".join(decision.args), what=f"the installed release's /{KERNEL}")
    finally:
        umount_system()
    # A loaded kernel that is never jumped to does nothing: the ordinary reboot then goes through GRUB.
    count_as_grub(cfg, decision, unload=unload)
    return 1


def jump() -> None:
    """Into the loaded release (PID 1 has unmounted everything); returns only if the kernel refused."""
    log.error("recovery: the jump into the installed release failed (%s): rebooting", kexec.jump())
