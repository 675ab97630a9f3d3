"""The in-use check behind erase, on real loop devices and mounts: an image file is busy when a loop
device on it is mounted, a whole disk when one of its partitions is, and nothing else is."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from recovery.errors import Failed, Rejected
from recovery.install import erase
from recovery.mounts import mounted_at
from recovery.run import run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and mounts")


@pytest.fixture()
def partitioned(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(image, loop device, its first partition): a GPT disk image with one ext4 partition, attached."""
    image = tmp_path / "disk.img"
    run(["truncate", "-s", "64M", image])
    run(["parted", "-s", image, "mklabel", "gpt", "mkpart", "system", "ext4", "1MiB", "63MiB"])
    try:
        loop = Path(run(["losetup", "--find", "--show", "--partscan", image]).stdout.decode().strip())
    except Failed as e:
        pytest.skip(f"no loop devices here: {e}")
    try:
        part = Path(f"{loop}p1")  # the kernel scans the table while losetup attaches
        if not part.exists():
            pytest.skip(f"the kernel made no partition device {part} (no partscan here)")
        run(["mkfs.ext4", "-q", "-L", "system", part])
        yield image, loop, part
    finally:
        run(["losetup", "-d", loop])


def test_other_mounts_do_not_count(tmp_path: Path) -> None:
    """One image mounted through a loop device: a second image, attached or not, is not in use."""
    images = []
    for name in ("mounted.img", "attached.img", "lone.img"):
        images.append(tmp_path / name)
        run(["truncate", "-s", "16M", images[-1]])
        run(["mkfs.ext4", "-q", images[-1]])
    mounted, attached, lone = images
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        loop = Path(run(["losetup", "--find", "--show", attached]).stdout.decode().strip())
    except Failed as e:
        pytest.skip(f"no loop devices here: {e}")
    try:
        run(["mount", "-o", "loop", mounted, mnt])
        try:
            assert mounted_at(mounted) == [str(mnt)]
            assert mounted_at(attached) == []  # attached to a loop device, mounted nowhere
            assert mounted_at(loop) == []
            assert mounted_at(lone) == []
        finally:
            run(["umount", mnt])
        assert mounted_at(mounted) == []
    finally:
        run(["losetup", "-d", loop])


def test_a_mounted_partition_makes_its_disk_busy(partitioned: tuple[Path, Path, Path], tmp_path: Path) -> None:
    image, loop, part = partitioned
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", part, mnt])
    try:
        assert mounted_at(part) == [str(mnt)]
        assert mounted_at(loop) == [str(mnt)]  # the whole disk: a partition of it is mounted
        assert mounted_at(image) == [str(mnt)]  # the file behind the disk
        with pytest.raises(Rejected, match=f"cannot erase {part}: it is in use \\({mnt}\\)"):
            erase(part)
    finally:
        run(["umount", mnt])
    assert mounted_at(part) == []
