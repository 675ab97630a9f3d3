"""Crash-safe file replacement: a power cut leaves either the old file or the new one, never a mix."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from recovery.core.errors import Rejected

log = logging.getLogger(__name__)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` to a temp file beside `path`, fsync it, rename it over `path`, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def durable_unlink(path: Path) -> bool:
    """Remove `path` and make the removal survive a power cut; False when it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(Path(path).parent)
    return True


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite the file `path`, which must already be `len(data)` bytes, over its own blocks and fsync
    it, as GRUB's save_env does. No new inode, no rename: GRUB, which reads ext4 past its journal, sees
    the old block or the new one whatever a power cut leaves of a checkpoint (a renamed file can show it
    a directory entry whose inode is not yet written: DESIGN.md "Crash states")."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size != len(data):
            raise OSError(f"{path} is {size} bytes, not the {len(data)} of the block")
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(f"a short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def write_block(path: Path, data: bytes) -> None:
    """Replace a fixed-size block GRUB reads (an environment block on cfg): over the file's own blocks
    (`write_in_place`) when `path` is a regular file of `len(data)` bytes already, else `atomic_write`
    (a new file, or one of another size or kind). Once such a file exists it keeps its inode for good,
    so no cut in a later checkpoint can show GRUB a directory entry whose inode is not yet written."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == len(data):
        write_in_place(path, data)
    else:
        atomic_write(path, data)


# _IOW('f', 43, __u32): write an ext4 file system's journal out to the blocks it describes (Linux >= 5.13)
EXT4_IOC_CHECKPOINT = 0x4004662B


_NOTHING_TO_DO = {
    errno.ENOTTY: "not ext4",  # and the other file systems GRUB reads (FAT) have no journal to replay
    errno.EINVAL: "not ext4",
    errno.ENODEV: "no journal",
}


def checkpoint_journal(path: Path, *, ioctl: Callable[[int, int, bytes], object] = fcntl.ioctl) -> bool:
    """Write the journal of the ext4 file system holding `path` out to its final blocks.

    GRUB reads ext4 without replaying the journal. A change that is durable (fsync'd into the journal)
    but not yet checkpointed is invisible to it until the kernel writes it back, which after a power
    cut means: not before the next mount. A new instruction would then be missed for one boot, a
    removed one seen once more. Calling this after such a change closes the gap. True when the
    journal was written out; False (logged) when there is no journal or it cannot be done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        ioctl(fd, EXT4_IOC_CHECKPOINT, struct.pack("I", 0))
        return True
    except OSError as e:
        why = _NOTHING_TO_DO.get(e.errno)
        if why is not None:
            log.debug("no journal checkpoint for %s: %s", path, why)
        else:
            log.warning("cannot write the journal of %s out for GRUB (%s): the bootloader may see the "
                        "change one boot late", path, e.strerror or e)
        return False
    finally:
        os.close(fd)


def read_if_present(path: Path, *, absent: tuple[type[OSError], ...] = (FileNotFoundError,)) -> bytes | None:
    """A small record's bytes, None when it does not exist (`absent`); any other read error is
    `Rejected` with the path and the reason."""
    try:
        return path.read_bytes()
    except absent:
        return None
    except OSError as e:
        raise Rejected(f"cannot read {path}: {e.strerror or e}") from None
