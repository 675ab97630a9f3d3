"""GRUB for both firmwares without grub-install: core images from grub-mkimage, the MBR patched by hand."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from recovery.core.errors import Failed
from recovery.core.output import step
from recovery.core.run import run

from .config import Firmware

BOOTLOADER = Path(__file__).resolve().parent.parent / "bootloader"
GRUB_LIB = Path("/usr/lib/grub")
SECTOR = 512

# Everything grub.cfg and recovery.cfg use is built in: the ESP then needs no module directories.
COMMON_MODULES = (
    "part_gpt", "part_msdos", "fat", "ext2", "search", "search_fs_uuid", "search_label", "normal",
    "configfile", "linux", "loadenv", "test", "echo", "serial", "terminal", "sleep", "reboot", "halt",
    "cat", "ls", "help", "minicmd", "true", "probe", "regexp",
    # stub.cfg checks a slot's menu.cfg with `sha256sum --check` before it sources it
    "hashsum", "gcry_sha256", "crypto",
)
PLATFORM_MODULES = {"i386-pc": ("biosdisk",), "x86_64-efi": ("efi_gop", "all_video")}

# boot.img's fields (GRUB's include/grub/i386/pc/boot.h) and core.img's first-sector blocklist.
KERNEL_SECTOR_AT = 0x5C
BOOT_CODE_END = 440  # the MBR's disk signature and partition table follow: keep the disk's own
BLOCKLIST_START_AT = 500
BLOCKLIST_LEN_AT = 508


@dataclass(frozen=True)
class CoreImages:
    bios: Path | None
    efi: Path | None


def esp_volume_id(product: str) -> str:
    """A FAT volume id derived from the product: stable across builds, unlike a random one."""
    return hashlib.sha256(product.encode()).hexdigest()[:8].upper()


def grub_volume_uuid(volume_id: str) -> str:
    """The volume id as GRUB's `search --fs-uuid` spells it: XXXX-XXXX."""
    return f"{volume_id[:4]}-{volume_id[4:]}"


def early_config(volume_id: str) -> str:
    """bootloader/early.cfg for the core images, without its comments: the core image runs it before
    normal mode, which alone understands `#`; every comment line would print "Unknown command `#'" on
    each boot and send an operator reading the console after errors that are none."""
    text = (BOOTLOADER / "early.cfg").read_text().replace("@ESP_UUID@", grub_volume_uuid(volume_id))
    return "".join(line for line in text.splitlines(keepends=True) if line.strip() and not line.lstrip().startswith("#"))


# The line of grub.cfg that the menu a recovery slot carries replaces with recovery.cfg itself.
RECOVERY_SOURCE = 'source "$prefix/recovery.cfg"'
MENU_LOADED = "set reflash_menu_loaded=1"


def slot_menu() -> str:
    """The boot menu a recovery slot carries (menu.cfg): bootloader/grub.cfg with recovery.cfg in place of
    the line that sources it (one file: GRUB checks it whole before the stub sources it), and last of
    all the line that tells the stub it was read to its end. Checked with grub-script-check."""
    menu = (BOOTLOADER / "grub.cfg").read_text()
    if menu.count(RECOVERY_SOURCE) != 1:
        raise Failed(f"bootloader/grub.cfg must source recovery.cfg exactly once ({RECOVERY_SOURCE})")
    recovery = (BOOTLOADER / "recovery.cfg").read_text()
    text = menu.replace(RECOVERY_SOURCE, f"# --- bootloader/recovery.cfg ---\n{recovery}# --- end of recovery.cfg ---")
    text += f"\n# Read to its end: the stub (bootloader/stub.cfg) sources no other slot's menu.\n{MENU_LOADED}\n"
    return text


def write_slot_menu(dest: Path) -> Path:
    """`dest`/menu.cfg, refused when grub-script-check finds fault with it."""
    path = Path(dest) / "menu.cfg"
    path.write_text(slot_menu())
    checked = run(["grub-script-check", path], check=False)
    if checked.returncode != 0:
        said = (checked.stdout + checked.stderr).decode(errors="replace").strip()
        raise Failed(f"the boot menu {path} does not pass grub-script-check: {said}")
    return path


def make_core_images(firmware: Firmware, volume_id: str, work: Path) -> CoreImages:
    """Build the core images `firmware` needs, each with the early config that finds the ESP."""
    work.mkdir(parents=True, exist_ok=True)
    early = work / "early.cfg"
    early.write_text(early_config(volume_id))
    bios = efi = None
    with step("Making the GRUB core images"):
        if firmware.bios_boot:
            bios = _mkimage("i386-pc", early, work / "core.img")
            if bios.stat().st_size > 1024 * 1024 - SECTOR:
                raise Failed(f"GRUB core.img is {bios.stat().st_size} bytes: it does not fit the bios partition")
        if firmware.uefi_boot:
            efi = _mkimage("x86_64-efi", early, work / "BOOTX64.EFI")
    return CoreImages(bios=bios, efi=efi)


def _mkimage(platform: str, early: Path, output: Path) -> Path:
    directory = GRUB_LIB / platform
    if not directory.is_dir():
        raise Failed(f"{directory} is missing: install grub-pc-bin and grub-efi-amd64-bin")
    run([
        "grub-mkimage", "--directory", directory, "--format", platform, "--output", output,
        "--config", early, "--prefix", "/grub", "--compression", "auto",
        *COMMON_MODULES, *PLATFORM_MODULES[platform],
    ])
    return output


def install_bios(disk: Path, core: Path, core_offset: int) -> None:
    """Put boot.img's code in the MBR and core.img at `core_offset` (the bios partition), patched.

    boot.img loads one sector from the LBA at 0x5c; that first sector of core.img (diskboot) loads
    the rest from the blocklist at its offset 500. grub-mkimage already wrote the length there.
    """
    boot = (GRUB_LIB / "i386-pc/boot.img").read_bytes()
    if len(boot) != SECTOR:
        raise Failed(f"boot.img is {len(boot)} bytes, expected {SECTOR}")
    if core_offset % SECTOR:
        raise Failed(f"core.img offset {core_offset} is not sector aligned")
    core = bytearray(core.read_bytes())
    lba = core_offset // SECTOR
    sectors = -(-len(core) // SECTOR)
    (length,) = struct.unpack_from("<H", core, BLOCKLIST_LEN_AT)
    if length != sectors - 1:
        raise Failed(f"core.img blocklist says {length} sectors, the image has {sectors - 1} after the first")
    struct.pack_into("<Q", core, BLOCKLIST_START_AT, lba + 1)
    with open(disk, "r+b") as f:
        mbr = bytearray(f.read(SECTOR))
        mbr[:BOOT_CODE_END] = boot[:BOOT_CODE_END]
        struct.pack_into("<Q", mbr, KERNEL_SECTOR_AT, lba)
        f.seek(0)
        f.write(mbr)
        f.seek(core_offset)
        f.write(core)
