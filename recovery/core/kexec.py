"""Loading a kernel for kexec, shared by the two places that skip the firmware and GRUB: the running
system on its way into the recovery (recovery/updated/kexec.py) and the recovery on its way into the
release it installed (recovery/os/kexec.py). Both take the command line and the count from GRUB's own
decision (recovery/core/bootmenu.py), so that after the jump the disk holds what GRUB would have left."""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from recovery.core.atomic import checkpoint_journal, write_in_place
from recovery.core.bootmenu import FILES, Decision, decide
from recovery.core.run import run

KEXEC = "kexec"


class NoKexec(Exception):
    """Why this reboot goes through the firmware and GRUB instead, in one line."""


def grub_decision(cfg: Path) -> Decision:
    """What GRUB's menu would boot, with the files it reads on cfg (mounted at `cfg`) as they are now."""
    files: dict[str, bytes | None] = {}
    for name in FILES:
        path = cfg / name
        try:
            files[name] = path.read_bytes() if path.is_file() else None
        except OSError:
            files[name] = b""  # there, but not readable: GRUB fails on it the same way
    return decide(files)


def available(kexec: str = KEXEC) -> None:
    if shutil.which(kexec) is None:
        raise NoKexec("kexec-tools is not installed")


def load(kernel: Path, initrd: Path, cmdline: str, *, kexec: str = KEXEC, what: str) -> None:
    """kexec_file_load first (the only one a locked-down kernel allows: it checks the kernel's
    signature), then kexec_load. `what` names the kernel in the reason of a NoKexec."""
    why = ""
    for mode in ("-s", "-c"):
        proc = run([kexec, mode, "-l", kernel, f"--initrd={initrd}", f"--command-line={cmdline}"], check=False)
        if proc.returncode == 0:
            return
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
    raise NoKexec(f"kexec cannot load {what}: {why}")


# kexec_file_load(2) by number: the recovery OS carries no kexec-tools, PID 1 calls it itself.
SYS_KEXEC_FILE_LOAD = {"x86_64": 320, "aarch64": 294}
LINUX_REBOOT_CMD_KEXEC = 0x45584543


def load_file(kernel: Path, initrd: Path, cmdline: str, *, what: str) -> None:
    """kexec_file_load(2) of `kernel` and `initrd` (the kernel checks the image, and its signature when
    locked down); NoKexec with the kernel's reason when it refuses."""
    number = SYS_KEXEC_FILE_LOAD.get(os.uname().machine)
    if number is None:
        raise NoKexec(f"no kexec_file_load on {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    line = cmdline.encode() + b"\0"
    with open(kernel, "rb") as k, open(initrd, "rb") as i:
        done = libc.syscall(ctypes.c_long(number), ctypes.c_int(k.fileno()), ctypes.c_int(i.fileno()),
                            ctypes.c_ulong(len(line)), ctypes.c_char_p(line), ctypes.c_ulong(0))
    if done != 0:
        raise NoKexec(f"the kernel does not load {what}: {os.strerror(ctypes.get_errno())}")


def jump() -> str:
    """reboot(2) into the kernel kexec_file_load loaded (file systems unmounted by the caller); returns
    only when the kernel refuses, with its reason."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync()
    libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_KEXEC))
    return os.strerror(ctypes.get_errno())


def count_as_grub(cfg: Path, decision: Decision, *, unload: Callable[[], object]) -> None:
    """Write the count GRUB's save_env would write for `decision`: its bytes, where GRUB writes them
    (over the file's own blocks: `recovery.core.atomic.write_in_place`), then past cfg's journal;
    `unload` the loaded kernel again if that cannot be done."""
    save = decision.save
    assert save is not None and save.block is not None
    try:
        write_in_place(cfg / save.file, save.block)
        checkpoint_journal(cfg)
    except OSError as e:
        unload()
        raise NoKexec(f"cannot count {save.name} in {save.file}: {e}") from None
