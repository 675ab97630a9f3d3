"""Is a block device or image file in use? Mounted, a partition of it mounted, or behind a loop device.

Compared by device number and real path, so `/dev/disk/by-label/x`, `/dev/root` and loop-backed image
files are all recognised, not just the name written in /proc/self/mounts.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

SYS_BLOCK = Path("/sys/class/block")
MOUNTS = "/proc/self/mounts"


def mount_table(path: str = MOUNTS) -> list[tuple[str, str]]:
    """(device, mount point) of every mount, in the order they were mounted, the kernel's octal escapes
    (`\\040` for a space) undone. Read here rather than by psutil, whose import alone costs the recovery
    OS about a second under emulation and fails before /proc is mounted."""
    with open(path, "rb") as f:
        rows = [line.split() for line in f]
    return [(_unescape(row[0]), _unescape(row[1])) for row in rows if len(row) >= 2]


def _unescape(field: bytes) -> str:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field).decode(errors="surrogateescape")


def _rdev(path: str | os.PathLike[str]) -> int | None:
    """The device number of a block device node, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def _block_name(rdev: int) -> str | None:
    """The kernel's name (`sda1`, `loop0`) of a block device number, from sysfs."""
    link = Path("/sys/dev/block") / f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        return link.resolve(strict=True).name
    except OSError:
        return None


def _with_partitions(rdev: int) -> set[int]:
    """`rdev` and the device numbers of its partitions (a whole disk is busy if one of them is)."""
    numbers = {rdev}
    name = _block_name(rdev)
    if name is None:
        return numbers
    for child in (SYS_BLOCK / name).glob(f"{name}*/dev"):
        try:
            major, minor = child.read_text().strip().split(":")
        except (OSError, ValueError):
            continue
        numbers.add(os.makedev(int(major), int(minor)))
    return numbers


def _loop_devices_of(image: Path) -> set[int]:
    """Device numbers of the loop devices whose backing file is `image`."""
    numbers: set[int] = set()
    real = os.path.realpath(image)
    try:
        st = os.stat(image)
    except OSError:
        return numbers
    for backing in SYS_BLOCK.glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
        except OSError:
            continue
        # The sysfs name is cut at 64 bytes and says "(deleted)" for removed files: compare inodes too.
        same = name == real
        if not same:
            try:
                same = os.path.samestat(os.stat(name.removesuffix(" (deleted)")), st)
            except OSError:
                same = False
        if same:
            dev = (backing.parent.parent / "dev").read_text().strip().split(":")
            numbers.add(os.makedev(int(dev[0]), int(dev[1])))
    return numbers


def mounted_at(target: Path) -> list[str]:
    """Mount points of file systems on `target` (a block device or an image file), empty if none.

    Also counts mounts of a partition of `target`, of a loop device backed by it, and active swap.
    """
    numbers: set[int] = set()
    rdev = _rdev(target)
    if rdev is not None:
        numbers |= _with_partitions(rdev)
    else:
        for loop in _loop_devices_of(target):
            numbers |= _with_partitions(loop)
    real = os.path.realpath(target)
    found: list[str] = []
    for device, mountpoint in mount_table():
        if device.startswith("/") and (os.path.realpath(device) == real or _rdev(device) in numbers):
            found.append(mountpoint)
            continue
        # Mount tables can name a device that has no node here (`/dev/root`): ask the mount point.
        try:
            if os.stat(mountpoint).st_dev in numbers:
                found.append(mountpoint)
        except OSError:
            continue
    for swap in _swaps():
        if _rdev(swap) in numbers or os.path.realpath(swap) == real:
            found.append(f"swap ({swap})")
    return found


def _swaps() -> list[str]:
    """Active swap devices and files, from /proc/swaps."""
    try:
        lines = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        return []
    return [line.split()[0] for line in lines if line.strip()]
