"""vm/disk.py's tear_file, on a real GPT disk image with a real ext4: GRUB's reading (no journal replay,
as vm/crashcheck.py reads it) sees the bytes in place, Linux's (after the replay) the journaled ones."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from recovery.core.envblock import format_envblock
from vm import VMError
from vm.crashcheck import grub_view, recovery_view
from vm.disk import DiskImage

pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in ("debugfs", "e2fsck", "mkfs.ext4", "qemu-img", "sfdisk")),
    reason="needs e2fsprogs, qemu-utils and fdisk: make setup",
)
MiB = 1024 * 1024


def _disk(tmp: Path) -> DiskImage:
    path = tmp / "disk.img"
    with open(path, "wb") as f:
        f.truncate(20 * MiB)
    subprocess.run(["sfdisk", "-q", str(path)], input="label: gpt\nstart=2048, size=16M, name=cfg\n", text=True,
                   check=True)
    fs = tmp / "cfg.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "cfg", str(fs), "16M"], check=True)
    disk = DiskImage.open(path)
    disk.import_range(disk.partition("cfg").start, fs)
    return disk


def test_a_torn_block_reads_one_way_for_grub_and_another_after_the_journal(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    empty = format_envblock({})
    disk.write_file("cfg", "/recovery/trial", format_envblock({"trial_max": "3"}))
    disk.tear_file("cfg", "/recovery/trial", on_disk=b"x" * 1024, in_journal=empty)
    part = disk.partition("cfg")
    exported = tmp_path / "exported.img"
    disk.export_range(part.start, part.size, exported)
    assert grub_view(exported).files["recovery/trial"] == b"x" * 1024
    assert recovery_view(exported, tmp_path).files["recovery/trial"] == empty
    assert disk.read_file("cfg", "/recovery/trial") == empty  # read_file replays, as a mount would


def test_only_an_existing_one_block_file_can_be_torn(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    with pytest.raises(VMError, match="cannot find the block of /recovery/trial"):
        disk.tear_file("cfg", "/recovery/trial", on_disk=b"x", in_journal=b"y")
    disk.write_file("cfg", "/small", b"1")
    with pytest.raises(VMError, match="must fit in one block"):
        disk.tear_file("cfg", "/small", on_disk=b"x" * 5000, in_journal=b"y")
