"""Kernel module selection: keep what disks and file systems need (and what that needs), drop the rest."""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
from pathlib import Path

from recovery.core.run import run

# Paths below /usr/lib/modules/<version>/kernel/. Dependencies are added from modules.dep.
RECOVERY_MODULES = (
    "drivers/block/virtio_blk.ko*",
    "drivers/scsi/virtio_scsi.ko*",
    "drivers/scsi/sd_mod.ko*",
    "drivers/scsi/scsi_mod.ko*",
    "drivers/ata/ahci.ko*",
    "drivers/ata/ata_piix.ko*",
    "drivers/ata/ata_generic.ko*",
    "drivers/nvme/host/nvme.ko*",
    "drivers/virtio/*",
    "drivers/char/hw_random/virtio-rng.ko*",
    "fs/ext4/*",
    "fs/fat/*",
    "fs/nls/nls_cp437.ko*",
    "fs/nls/nls_ascii.ko*",
    "fs/nls/nls_iso8859-1.ko*",
    "fs/nls/nls_utf8.ko*",
    "crypto/crc32c_generic.ko*",
    "arch/x86/crypto/crc32c-intel.ko*",
    "lib/crc*",
)
SYSTEM_MODULES = RECOVERY_MODULES + (
    "drivers/net/virtio_net.ko*",
    "drivers/net/ethernet/intel/e1000/*",
    "drivers/net/ethernet/intel/e1000e/*",
    "drivers/char/hw_random/*",
    "drivers/input/*",
    "drivers/hid/*",
    "fs/efivarfs/*",
    # Hardware watchdogs: systemd arms one on trial boots (QEMU's i6300esb in the rig).
    "drivers/watchdog/*",
    "net/packet/af_packet.ko*",
)
# What depmod reads besides the modules themselves.
INDEX_FILES = ("modules.order", "modules.builtin", "modules.builtin.modinfo")


def select_modules(moddir: Path, patterns: tuple[str, ...]) -> set[str]:
    """Module paths (as modules.dep names them, `kernel/...`) matching `patterns`, with their dependencies."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    wanted = [m for m in deps if any(fnmatch.fnmatch(m, "kernel/" + p) for p in patterns)]
    chosen: set[str] = set()
    while wanted:
        m = wanted.pop()
        if m not in chosen:
            chosen.add(m)
            wanted.extend(deps.get(m, ()))
    return chosen


def trim_modules(root: Path, kver: str, patterns: tuple[str, ...]) -> int:
    """Delete every module of `root`'s kernel not selected by `patterns`, then rebuild its index."""
    moddir = root / "usr/lib/modules" / kver
    keep = select_modules(moddir, patterns)
    removed = 0
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        if str(path.relative_to(moddir)) not in keep:
            path.unlink()
            removed += 1
    for d in sorted((moddir / "kernel").rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    _depmod(moddir, kver)
    return removed


def copy_modules(moddir: Path, kver: str, patterns: tuple[str, ...], dest_root: Path) -> int:
    """Copy the selected modules of `moddir` to `dest_root`/usr/lib/modules/`kver` with a fresh index."""
    keep = select_modules(moddir, patterns)
    out = dest_root / "usr/lib/modules" / kver
    for rel in sorted(keep):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, target)
    for name in INDEX_FILES:
        if (moddir / name).exists():
            shutil.copy2(moddir / name, out / name)
    _depmod(out, kver)
    return len(keep)


def _depmod(moddir: Path, kver: str) -> None:
    # depmod looks for <base>/lib/modules/<version>: give it that layout over the real directory.
    with tempfile.TemporaryDirectory(prefix="depmod-") as tmp:
        (Path(tmp) / "lib/modules").mkdir(parents=True)
        (Path(tmp) / "lib/modules" / kver).symlink_to(moddir.resolve())
        run(["depmod", "-b", tmp, kver])
