"""GRUB core images from grub-mkimage and the hand-made BIOS install (boot.img + core.img patches)."""

from __future__ import annotations

import shutil
import struct

import pytest

from mkimage.config import Firmware
from mkimage.grub import (
    BLOCKLIST_LEN_AT, BLOCKLIST_START_AT, GRUB_LIB, KERNEL_SECTOR_AT, esp_volume_id, install_bios,
    make_core_images,
)

pytestmark = pytest.mark.skipif(
    shutil.which("grub-mkimage") is None or not (GRUB_LIB / "i386-pc").is_dir() or not (GRUB_LIB / "x86_64-efi").is_dir(),
    reason="needs grub-mkimage with i386-pc and x86_64-efi modules (grub-pc-bin, grub-efi-amd64-bin)",
)


@pytest.mark.parametrize("firmware", list(Firmware))
def test_core_images_per_firmware(tmp_path, firmware):
    cores = make_core_images(firmware, esp_volume_id("x"), tmp_path)
    assert (cores.bios is not None) == firmware.bios_boot
    assert (cores.efi is not None) == firmware.uefi_boot
    if cores.efi is not None:
        assert cores.efi.read_bytes()[:2] == b"MZ"  # a PE image the firmware can start
    if cores.bios is not None:
        assert cores.bios.stat().st_size < 1024 * 1024


def test_install_bios_patches_mbr_and_core(tmp_path):
    cores = make_core_images(Firmware.bios, esp_volume_id("x"), tmp_path)
    assert cores.bios is not None
    disk = tmp_path / "disk.img"
    # A protective MBR's partition table and signature, as pyparted leaves them: GRUB must keep them.
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF])
    mbr[510:512] = b"\x55\xaa"
    with open(disk, "wb") as f:
        f.write(mbr)
        f.truncate(4 * 1024 * 1024)
    core_offset = 1024 * 1024
    install_bios(disk, cores.bios, core_offset)

    data = disk.read_bytes()
    boot = (GRUB_LIB / "i386-pc/boot.img").read_bytes()
    assert data[:KERNEL_SECTOR_AT] == boot[:KERNEL_SECTOR_AT]
    assert struct.unpack_from("<Q", data, KERNEL_SECTOR_AT)[0] == core_offset // 512
    assert data[KERNEL_SECTOR_AT + 8:440] == boot[KERNEL_SECTOR_AT + 8:440]
    assert data[440:512] == bytes(mbr[440:512])  # partition table and 0x55aa untouched

    core = cores.bios.read_bytes()
    written = data[core_offset:core_offset + len(core)]
    assert struct.unpack_from("<Q", written, BLOCKLIST_START_AT)[0] == core_offset // 512 + 1
    sectors = -(-len(core) // 512)
    assert struct.unpack_from("<H", written, BLOCKLIST_LEN_AT)[0] == sectors - 1
    # Only the blocklist start differs from what grub-mkimage wrote.
    assert written[:BLOCKLIST_START_AT] == core[:BLOCKLIST_START_AT]
    assert written[BLOCKLIST_START_AT + 8:] == core[BLOCKLIST_START_AT + 8:]


def test_install_bios_refuses_unaligned_offset(tmp_path):
    from recovery.core.errors import Failed

    cores = make_core_images(Firmware.bios, esp_volume_id("x"), tmp_path)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(2 * 1024 * 1024))
    assert cores.bios is not None
    with pytest.raises(Failed, match="not sector aligned"):
        install_bios(disk, cores.bios, 1000)
