"""The in-use check behind erase, on real loop devices and mounts: an image file is busy when a loop
device on it is mounted, and nothing else is (test_install.py has the refusals themselves).

A whole disk is busy when one of its partitions is mounted too, but this machine's kernel makes no
partition devices for loop devices (losetup --partscan gives no loopNp1), so that is not tested here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recovery.core.errors import Failed
from recovery.os.mounts import mounted_at
from recovery.core.run import run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices and mounts")


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


def test_the_mount_table_is_read_as_the_kernel_writes_it(tmp_path):
    """recovery/os/mounts.py reads /proc/self/mounts itself: spaces, tabs and backslashes come escaped."""
    from recovery.os.mounts import mount_table

    table = tmp_path / "mounts"
    table.write_bytes(b"/dev/vda3 /run/recovery/cfg ext4 rw,sync 0 0\n"
                      b"/dev/sdb1 /mnt/a\\040b\\011c\\134d vfat ro 0 0\n"
                      b"proc /proc proc rw 0 0\n\n")
    assert mount_table(str(table)) == [("/dev/vda3", "/run/recovery/cfg"), ("/dev/sdb1", "/mnt/a b\tc\\d"),
                                       ("proc", "/proc")]
    assert ("proc", "/proc") in mount_table()  # this machine's own table
