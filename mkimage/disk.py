"""The raw disk image: a GPT written with pyparted into a plain file, file systems made in place.

No loop devices and no mounts: mkfs.ext4 and mkfs.fat write at an offset into the image and mtools
copies into the FAT file system there.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import parted

from recovery.core.errors import Failed
from recovery.core.output import step
from recovery.core.run import run

from .config import MiB, ImageConfig

SECTOR = 512

# GPT partition type GUIDs, as a reader checks them.
TYPE_BIOS_BOOT = "21686148-6449-6e6f-744e-656564454649"
TYPE_ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
TYPE_LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"
PARTITION_TYPES = {"bios": TYPE_BIOS_BOOT, "esp": TYPE_ESP}
# File system labels (DESIGN.md): the ESP's is "ESP", the bios partition has none.
FS_LABELS = {"esp": "ESP", "cfg": "cfg", "recovery": "recovery", "system": "system", "storage": "storage"}


@dataclass(frozen=True)
class Placement:
    """Where a partition lies in the image, in bytes."""

    number: int
    name: str
    offset: int
    size: int

    @property
    def type_guid(self) -> str:
        return PARTITION_TYPES.get(self.name, TYPE_LINUX_FS)


def layout(config: ImageConfig) -> list[Placement]:
    """The partitions in DESIGN.md's order, back to back from 1 MiB (so every one is MiB aligned)."""
    placements = []
    offset = MiB
    for number, (name, size) in enumerate(config.partitions.items(), start=1):
        placements.append(Placement(number=number, name=name, offset=offset, size=size))
        offset += size
    return placements


def write_partition_table(image: Path, config: ImageConfig) -> list[Placement]:
    """Create `image` (sparse, config.disk_size bytes) with its GPT; return where the partitions are."""
    placements = layout(config)
    with open(image, "wb") as f:
        f.truncate(config.disk_size)
    device = parted.getDevice(os.fspath(image))
    disk = parted.freshDisk(device, "gpt")
    for p in placements:
        geometry = parted.Geometry(device=device, start=p.offset // SECTOR, length=p.size // SECTOR)
        partition = parted.Partition(disk=disk, type=parted.PARTITION_NORMAL, geometry=geometry)
        disk.addPartition(partition, constraint=parted.Constraint(exactGeom=geometry))
        partition.set_name(p.name)
        if p.name == "bios":
            partition.setFlag(parted.PARTITION_BIOS_GRUB)
        elif p.name == "esp":
            # On GPT, libparted's boot flag is the EFI System partition type.
            partition.setFlag(parted.PARTITION_BOOT)
    disk.commitToDevice()
    return placements


def make_ext4(
    image: Path, placement: Placement, *, label: str, root: Path | None = None, fs_uuid: str | None = None
) -> None:
    """mkfs.ext4 inside `image` at the partition's offset, filled from `root` if given."""
    argv: list[str | os.PathLike[str]] = [
        "mkfs.ext4", "-q", "-F", "-L", label, "-U", fs_uuid or str(uuid.uuid4()),
        "-E", f"offset={placement.offset}", "-O", "^metadata_csum_seed",
    ]
    if root is not None:
        argv += ["-d", root]
    argv += [image, f"{placement.size // 1024}k"]
    run(argv)


def make_esp(image: Path, placement: Placement, *, volume_id: str, files: dict[str, Path]) -> None:
    """A FAT32 ESP with the fixed `volume_id` the early GRUB config searches for, holding `files`."""
    # mkfs.fat sizes clusters by the whole image file, not by the block count it is given: say it.
    # FAT32 needs at least 65525 clusters; the largest cluster (up to 4 KiB) that leaves enough.
    per_cluster = 1
    while per_cluster < 8 and placement.size // (SECTOR * per_cluster * 2) >= 65600:
        per_cluster *= 2
    run([
        "mkfs.fat", "-F", "32", "-S", str(SECTOR), "-s", str(per_cluster), "-n", FS_LABELS["esp"],
        "-i", volume_id, "--offset", str(placement.offset // SECTOR), image, str(placement.size // 1024),
    ])
    target = f"{os.fspath(image)}@@{placement.offset}"
    env = {"MTOOLS_SKIP_CHECK": "1"}
    made: set[str] = set()
    for dest in sorted(files):
        parts = dest.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            directory = "/".join(parts[:i])
            if directory not in made:
                run(["mmd", "-i", target, f"::/{directory}"], env=env)
                made.add(directory)
        run(["mcopy", "-i", target, files[dest], f"::/{dest}"], env=env)


def check_fits(root: Path, placement: Placement) -> None:
    """Refuse a tree that cannot fit its partition before mkfs fails on it obscurely."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    # ext4's own metadata (inode tables, journal) takes roughly a tenth.
    if total > placement.size * 0.88:
        raise Failed(
            f"{root} holds {total // MiB} MiB: it does not fit the {placement.size // MiB} MiB "
            f"{placement.name} partition; enlarge partitions.{placement.name}"
        )


def assemble(
    image: Path,
    config: ImageConfig,
    *,
    esp_files: dict[str, Path],
    esp_volume_id: str,
    recovery_dir: Path,
    system_dir: Path,
    cfg_dir: Path,
    storage_dir: Path | None = None,
) -> list[Placement]:
    """Write the whole disk image: GPT, ESP, cfg, recovery, system and storage (empty without `storage_dir`)."""
    with step(f"Writing {image} ({config.disk_size // MiB} MiB, GPT with pyparted)"):
        placements = write_partition_table(image, config)
    by_name = {p.name: p for p in placements}
    with step("Making the ESP (FAT32, GRUB and its configuration)"):
        make_esp(image, by_name["esp"], volume_id=esp_volume_id, files=esp_files)
    for name, root in (("cfg", cfg_dir), ("recovery", recovery_dir), ("system", system_dir), ("storage", storage_dir)):
        with step(f"Making the {name} file system (ext4)"):
            if root is not None:
                check_fits(root, by_name[name])
            make_ext4(image, by_name[name], label=FS_LABELS[name], root=root)
    if image.stat().st_size != config.disk_size:
        raise Failed(f"{image} grew to {image.stat().st_size} bytes: a file system overran the image")
    return placements
