"""A disk laid out the way another image builder would, following README's "Adding the recovery to
another image builder" and nothing of mkimage's disk code: sfdisk for the table, mkfs and mtools for
the file systems, grub-mkimage for a UEFI GRUB with the builder's own grub.cfg that sources
`grub-recovery.cfg`, and `reflash recovery -o DIR` for the recovery partition.

The recovery output is made once per image and kept beside it (the roots come from mkimage's cache);
the disk itself takes seconds.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.vm.releases import unpack_payload

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024

# The builder's layout: an ESP first, then the partitions the README asks for, by GPT name. The
# recovery partition holds recovery.ext4 as it is: the image config's size (256 MiB by default).
SFDISK = """label: gpt
size=64MiB, type=U, name=esp
size=64MiB, type=L, name=cfg
size=1024MiB, type=L, name=system
size=256MiB, type=L, name=recovery
type=L, name=storage
"""
DISK_SIZE = (1 + 64 + 64 + 1024 + 256 + 768 + 1) * MiB  # GPT's own sectors at both ends

# GRUB's modules for this grub.cfg and grub-recovery.cfg, all built into BOOTX64.EFI (README lists them).
GRUB_MODULES = ("part_gpt", "fat", "ext2", "normal", "configfile", "search", "search_label", "linux", "loadenv",
                "test", "true", "echo", "serial", "terminal", "efi_gop", "all_video")

# The builder's own boot menu: its system entry first, then the recovery's, sourced as the README says.
GRUB_CFG = """serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
search --no-floppy --label --set=systemdev system
set default=0
menuentry "Builder's system" {
    if [ -n "$trial_counted" ]; then
        linux ($systemdev)/boot/vmlinuz root=PARTLABEL=system rw panic=10 systemd.watchdog_sec=30 console=ttyS0,115200
    else
        linux ($systemdev)/boot/vmlinuz root=PARTLABEL=system rw panic=10 console=ttyS0,115200
    fi
    initrd ($systemdev)/boot/initrd.img
}
source "$prefix/grub-recovery.cfg"
"""


def _run(*argv: object, **kw: Any) -> None:
    subprocess.run([str(a) for a in argv], check=True, stdin=kw.pop("stdin", subprocess.DEVNULL),
                   capture_output=True, **kw)


def recovery_output(built: Any) -> Path:
    """`reflash recovery -o DIR` with the image's signing key (key_dir), kept beside the image."""
    out = built.disk.parent / "dropin"
    out.mkdir(exist_ok=True)
    with open(out / ".lock-dropin", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "recovery/recovery.ext4").exists():
            return out
        config = out / "image.toml"
        config.write_text(f'key_dir = "{built.keys}"\n')
        _run(sys.executable, "-m", "mkimage", "recovery", "-c", config, "-o", out, cwd=REPO)
    return out


def lay_out(built: Any, recovery: Path, disk: Path) -> Path:
    """The whole raw disk at `disk`: GPT by sfdisk, each file system made on its own and written in."""
    with tempfile.TemporaryDirectory(dir=disk.parent) as t:
        work = Path(t)
        with open(disk, "wb") as f:
            f.truncate(DISK_SIZE)
        subprocess.run(["sfdisk", "--quiet", str(disk)], input=SFDISK.encode(), check=True, capture_output=True)
        starts, sizes = _table(disk)

        efi = work / "BOOTX64.EFI"
        _run("grub-mkimage", "-O", "x86_64-efi", "-p", "/grub", "-o", efi, *GRUB_MODULES)
        (work / "grub.cfg").write_text(GRUB_CFG)
        esp = work / "esp.img"
        _image(esp, sizes["esp"])
        _run("mkfs.fat", "-F", "32", "-n", "ESP", esp)
        _run("mmd", "-i", esp, "::/EFI", "::/EFI/BOOT", "::/grub")
        _run("mcopy", "-i", esp, efi, "::/EFI/BOOT/BOOTX64.EFI")
        _run("mcopy", "-i", esp, work / "grub.cfg", "::/grub/grub.cfg")
        _run("mcopy", "-i", esp, recovery / "recovery/grub-recovery.cfg", "::/grub/grub-recovery.cfg")

        (work / "cfg/recovery").mkdir(parents=True)
        _ext4(work / "cfg.img", "cfg", work / "cfg", sizes["cfg"])
        tree = work / "system"
        unpack_payload(built.bundles[built.config.version], tree)
        _ext4(work / "system.img", "system", tree, sizes["system"])
        (work / "storage/bundles").mkdir(parents=True)
        _ext4(work / "storage.img", "storage", work / "storage", sizes["storage"])

        parts = {"esp": esp, "cfg": work / "cfg.img", "system": work / "system.img",
                 "recovery": recovery / "recovery/recovery.ext4", "storage": work / "storage.img"}
        for name, image in parts.items():
            _run("dd", f"if={image}", f"of={disk}", "bs=1M", f"seek={starts[name] // MiB}", "conv=notrunc,sparse")
    return disk


def _image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _ext4(path: Path, label: str, root: Path, size: int) -> None:
    _image(path, size)
    _run("mkfs.ext4", "-q", "-F", "-L", label, "-d", root, path)


def _table(disk: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Each partition's first byte and size in bytes, by GPT name, as sfdisk reads the table back."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], check=True, capture_output=True).stdout)
    sector = table["partitiontable"].get("sectorsize", 512)
    parts = table["partitiontable"]["partitions"]
    return {p["name"]: p["start"] * sector for p in parts}, {p["name"]: p["size"] * sector for p in parts}
