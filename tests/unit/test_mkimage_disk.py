"""The disk image: GPT (names, types, sizes) read back with pyparted and by hand, and clean file systems.

A small image assembled from tiny trees runs in seconds; the same checks then run on the real demo
image from the session's `built_image` fixture.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import parted
import pytest

from mkimage.config import MiB, ImageConfig, load_config
from mkimage.disk import FS_LABELS, TYPE_BIOS_BOOT, TYPE_ESP, TYPE_LINUX_FS, assemble
from mkimage.grub import BOOTLOADER, esp_volume_id

TOOLS = ("mkfs.ext4", "mkfs.fat", "mcopy", "mdir", "e2fsck", "fsck.vfat", "debugfs")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)} (e2fsprogs, dosfstools, mtools)"
)
EXPECTED_TYPES = {"bios": TYPE_BIOS_BOOT, "esp": TYPE_ESP}


def gpt_entries(image: Path) -> list[tuple[str, str, int, int]]:
    """(name, type GUID, first byte, size) of each used GPT entry, parsed from the raw bytes."""
    with open(image, "rb") as f:
        f.seek(512)
        header = f.read(92)
        assert header[:8] == b"EFI PART"
        entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
        f.seek(entries_lba * 512)
        table = f.read(count * entry_size)
    out = []
    for i in range(count):
        entry = table[i * entry_size:(i + 1) * entry_size]
        type_guid = uuid.UUID(bytes_le=entry[:16])
        if type_guid.int == 0:
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        name = entry[56:128].decode("utf-16-le").rstrip("\0")
        out.append((name, str(type_guid), first * 512, (last - first + 1) * 512))
    return out


def extract(image: Path, offset: int, size: int, dest: Path) -> Path:
    """Copy one partition's bytes to `dest`, keeping holes (file systems are mostly empty)."""
    chunk = MiB
    with open(image, "rb") as src, open(dest, "wb") as out:
        src.seek(offset)
        left = size
        while left:
            data = src.read(min(chunk, left))
            if data.count(0) == len(data):
                out.seek(len(data), os.SEEK_CUR)
            else:
                out.write(data)
            left -= len(data)
        out.truncate(size)
    return dest


def check_image(image: Path, config: ImageConfig, tmp_path: Path) -> dict[str, Path]:
    """The layout and every file system of `image`; returns each file system extracted to a file."""
    assert image.stat().st_size == config.disk_size
    device = parted.getDevice(str(image))
    disk = parted.newDisk(device)
    assert disk.type == "gpt"
    parts = disk.partitions
    assert [p.name for p in parts] == ["bios", "esp", "cfg", "recovery", "system", "storage"]
    for p, (name, size) in zip(parts, config.partitions.items(), strict=True):
        assert p.geometry.length * device.sectorSize == size, name
        assert p.geometry.start * device.sectorSize % MiB == 0, f"{name} is not MiB aligned"
    assert parts[0].getFlag(parted.PARTITION_BIOS_GRUB)
    assert parts[1].getFlag(parted.PARTITION_BOOT)
    # The same, from the raw table: the type GUIDs firmware and GRUB look at.
    raw = gpt_entries(image)
    assert [(n, t) for n, t, _, _ in raw] == [(n, EXPECTED_TYPES.get(n, TYPE_LINUX_FS)) for n, _ in config.partitions.items()]
    assert [s for _, _, _, s in raw] == [s for _, s in config.partitions.items()]

    fs: dict[str, Path] = {}
    for name, _, offset, size in raw:
        if name == "bios":
            continue
        part = extract(image, offset, size, tmp_path / f"{name}.fs")
        if name == "esp":
            r = subprocess.run(["fsck.vfat", "-n", str(part)], capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr
            label = subprocess.run(["fatlabel", str(part)], capture_output=True, text=True, check=True).stdout.strip()
            assert label == FS_LABELS["esp"]
        else:
            r = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True)
            assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
            info = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True, check=True).stdout
            assert f"Filesystem volume name:   {FS_LABELS[name]}\n" in info
        fs[name] = part
    return fs


def debugfs(fs: Path, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(fs)], capture_output=True, text=True, check=True).stdout


def mdir(fs: Path, path: str) -> str:
    return subprocess.run(["mdir", "-b", "-i", str(fs), path], capture_output=True, text=True, check=True,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout


def test_small_image(tmp_path):
    """assemble() on tiny trees: layout, labels, clean file systems, the files where they belong."""
    toml = tmp_path / "image.toml"
    toml.write_text("[partitions]\nesp = 34\ncfg = 8\nrecovery = 64\nsystem = 128\nstorage = 16\n")
    config = load_config(toml, output=tmp_path / "out")
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    (recovery / "vmlinuz").write_bytes(b"kernel")
    system = tmp_path / "system"
    (system / "etc").mkdir(parents=True)
    (system / "etc/os-release").write_text('VERSION_ID="1.0.0"\n')
    cfg = tmp_path / "cfg"
    (cfg / "recovery").mkdir(parents=True)
    grub_cfg = tmp_path / "grub.cfg"
    grub_cfg.write_text("# test\n")
    image = tmp_path / "disk.img"
    volume_id = esp_volume_id(config.product)
    assemble(image, config, esp_files={"grub/grub.cfg": grub_cfg, "EFI/BOOT/BOOTX64.EFI": grub_cfg},
             esp_volume_id=volume_id, recovery_dir=recovery, system_dir=system, cfg_dir=cfg)
    fs = check_image(image, config, tmp_path)
    assert "grub.cfg" in mdir(fs["esp"], "::/grub")
    assert "BOOTX64.EFI" in mdir(fs["esp"], "::/EFI/BOOT")
    blkid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", str(fs["esp"])], capture_output=True, text=True)
    assert blkid.stdout.strip().replace("-", "") == volume_id
    assert debugfs(fs["system"], "cat /etc/os-release") == 'VERSION_ID="1.0.0"\n'
    assert debugfs(fs["recovery"], "cat /vmlinuz") == "kernel"
    assert "recovery" in debugfs(fs["cfg"], "ls -l /")
    assert "lost+found" in debugfs(fs["storage"], "ls /")


def test_tree_too_big_is_refused(tmp_path):
    from mkimage.disk import Placement, check_fits
    from recovery.core.errors import Failed

    tree = tmp_path / "t"
    tree.mkdir()
    with open(tree / "big", "wb") as f:
        f.truncate(10 * MiB)  # counted by size: a sparse file still needs its blocks in mkfs -d
    with pytest.raises(Failed, match="does not fit the 8 MiB system partition"):
        check_fits(tree, Placement(5, "system", MiB, 8 * MiB))


# --- the real demo image ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_fs(built_image, tmp_path_factory):
    return check_image(built_image.disk, built_image.config, tmp_path_factory.mktemp("demo-fs"))


def test_demo_layout_and_file_systems(demo_fs):
    assert set(demo_fs) == {"esp", "cfg", "recovery", "system", "storage"}


def test_demo_esp_holds_grub(demo_fs):
    assert "BOOTX64.EFI" in mdir(demo_fs["esp"], "::/EFI/BOOT")
    listing = mdir(demo_fs["esp"], "::/grub")
    # Only the stub: the menu is in the recovery slots, where it can be updated.
    assert "grub.cfg" in listing and "recovery.cfg" not in listing
    stub = subprocess.run(["mtype", "-i", str(demo_fs["esp"]), "::/grub/grub.cfg"], capture_output=True,
                          check=True).stdout
    assert stub == (BOOTLOADER / "stub.cfg").read_bytes()


def test_demo_bios_boot_code(built_image):
    with open(built_image.disk, "rb") as f:
        data = f.read(512)
    core_lba = struct.unpack_from("<Q", data, 0x5C)[0]
    assert core_lba * 512 == MiB  # the bios partition, where core.img went
    assert data[510:512] == b"\x55\xaa"


def test_demo_system_is_release_1(built_image, demo_fs):
    config = built_image.config
    os_release = debugfs(demo_fs["system"], "cat /usr/lib/os-release")
    assert f'VERSION_ID="{config.version}"' in os_release
    assert "vmlinuz" in debugfs(demo_fs["system"], "ls /boot") and "initrd.img" in debugfs(demo_fs["system"], "ls /boot")
    # the project came as the reflash-appliance package: its commands in /usr/bin, its units enabled by it
    commands = debugfs(demo_fs["system"], "ls /usr/bin").split()
    assert "reflashctl" in commands and "reflashd" in commands and "recovery" not in commands
    assert "reflashctl" not in debugfs(demo_fs["system"], "ls /usr/local/bin")
    status = debugfs(demo_fs["system"], "cat /var/lib/dpkg/status")
    assert re.search(r"^Package: reflash-appliance\nStatus: install ok installed$", status, re.M), status[-2000:]
    for target, unit in (("sysinit", "reflash-trial-guard"), ("multi-user", "reflash-confirm")):
        wants = debugfs(demo_fs["system"], f"stat /etc/systemd/system/{target}.target.wants/{unit}.service")
        assert f"Fast link dest: \"/lib/systemd/system/{unit}.service\"" in wants, wants
    # the system carries the shared core and its own program, not the recovery OS's
    package = debugfs(demo_fs["system"], "ls /usr/lib/python3/dist-packages/recovery").split()
    assert "core" in package and "updated" in package and "os" not in package
    assert "updater.py" in debugfs(demo_fs["system"], "ls /usr/lib/python3/dist-packages/recovery/updated")
    ready = debugfs(demo_fs["system"], "cat /etc/profile.d/zz-appliance-ready.sh")
    assert f"system {config.product} {config.version} ready" in ready
    assert "signing.pem" not in debugfs(demo_fs["system"], "ls /etc/recovery/keys")


def test_demo_cfg_has_only_grubs_counters_and_the_fallback(demo_fs, tmp_path):
    """cfg starts with no instruction and no result: only the empty blocks GRUB counts in (garbage
    instructions' tries, trial boots: no trial yet), the record of the factory bundle as the fallback,
    and the block naming recovery slot a active. All three blocks are there from the start, so every
    later write of one goes over its own blocks (none is a rename GRUB could read half-done)."""
    names = [line.split()[-1] for line in debugfs(demo_fs["cfg"], "ls -l /recovery").splitlines() if line.strip()]
    assert sorted(names) == [".", "..", "fallback.json", "grubenv", "slot", "trial"]
    assert "update-instruction" not in debugfs(demo_fs["cfg"], "ls /")
    for name, listing in (("slot", "recovery_slot=a\n"), ("grubenv", ""), ("trial", "")):
        block = tmp_path / name
        debugfs(demo_fs["cfg"], f"dump /recovery/{name} {block}")
        listed = subprocess.run(["grub-editenv", str(block), "list"], capture_output=True, text=True, check=True)
        assert len(block.read_bytes()) == 1024 and listed.stdout == listing, name


def test_demo_recovery_partition(built_image, demo_fs):
    for slot in ("a", "b"):
        listing = debugfs(demo_fs["recovery"], f"ls /{slot}")
        assert {"vmlinuz", "initrd.img", "menu.cfg", "menu.sha256", "recovery.json"} <= set(listing.split()), listing
    initrd = built_image.recovery / "initrd.img"
    assert initrd.stat().st_size <= 40 * MiB
    assert (built_image.recovery / "vmlinuz").exists()
    assert (built_image.recovery / "grub-recovery.cfg").exists()
    assert (built_image.recovery / "recovery.ext4").stat().st_size == built_image.config.partitions.recovery


def test_demo_storage_holds_the_factory_bundle_as_the_fallback(built_image, demo_fs, tmp_path):
    """The factory release's bundle lies on storage and cfg names it, byte for byte: even the first
    update can roll back."""
    import hashlib
    import json

    names = [line.split()[-1] for line in debugfs(demo_fs["storage"], "ls -l /").splitlines() if line.strip()]
    assert sorted(names) == [".", "..", "bundles", "lost+found"]
    factory = built_image.bundles[built_image.config.version]
    debugfs(demo_fs["cfg"], f"dump /recovery/fallback.json {tmp_path / 'fallback.json'}")
    fallback = json.loads((tmp_path / "fallback.json").read_text())
    assert fallback == {"version": built_image.config.version, "disk": "PARTLABEL=storage",
                        "file": f"/bundles/{factory.name}", "sha256": hashlib.sha256(factory.read_bytes()).hexdigest()}
    debugfs(demo_fs["storage"], f"dump {fallback['file']} {tmp_path / 'factory.bundle'}")
    assert (tmp_path / "factory.bundle").read_bytes() == factory.read_bytes()


def test_demo_bundles_verify(built_image):
    from recovery.core.bundle import verify_bundle
    from recovery.core.keys import Keyring

    assert set(built_image.bundles) == {"1.0.0", "2.0.0"}
    keyring = Keyring.load(built_image.keys)
    for version, path in built_image.bundles.items():
        assert path.name == f"demo-appliance-{version}.bundle"
        bundle = verify_bundle(path, keyring, product="demo-appliance")
        assert bundle.manifest.version == version
    assert (built_image.keys / "signing.pub").exists()
