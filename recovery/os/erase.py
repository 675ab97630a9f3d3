"""Erasing the system partition: a new, empty ext4 that keeps the old one's label and UUID and has the
inodes the tree to come needs.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import uuid as uuidlib
from pathlib import Path

from recovery.core.errors import Rejected
from recovery.core.run import run
from recovery.os.mounts import mounted_at





log = logging.getLogger(__name__)


def filesystem_identity(device: Path) -> tuple[str | None, str | None]:
    """(label, uuid) of the file system on `device`, read with blkid without trusting its cache."""
    proc = run(["blkid", "-p", "-o", "export", device], check=False, error=Rejected)
    values = dict(line.split("=", 1) for line in proc.stdout.decode(errors="replace").splitlines() if "=" in line)
    return values.get("LABEL"), values.get("UUID")


def inodes_for(files: int) -> int:
    """The inodes a tree of `files` entries needs, with room for the files the running system adds."""
    return files + files // 8 + 1024


def erase(device: Path, *, label: str | None = None, uuid: str | None = None, files: int = 0) -> None:
    """Make a new, empty ext4 file system on `device` (a block device or an image file) that keeps
    the old one's label and UUID, so fstab and the boot loader still find it.

    `files`: the entries the tree to come has. mke2fs gives one inode per 16 KiB by default, which a
    tree of many small files outgrows while its bytes fit: the extraction would run out of inodes
    after the erase. When the default is too few, the file system gets `inodes_for(files)`.

    Rejected (nothing written) if the device is missing, in use, or its label/UUID are unknown.
    """
    device = Path(device)
    try:
        st = os.stat(device)
    except OSError as e:
        raise Rejected(f"cannot erase {device}: {e.strerror or e}") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise Rejected(f"cannot erase {device}: not a block device or an image file")
    if where := mounted_at(device):
        raise Rejected(f"cannot erase {device}: it is in use ({', '.join(where)})")
    if label is None or uuid is None:
        old_label, old_uuid = filesystem_identity(device)
        label = old_label if label is None else label
        uuid = old_uuid if uuid is None else uuid
    if not uuid:
        raise Rejected(f"cannot erase {device}: no file system UUID to keep (pass it explicitly)")
    try:
        uuid = str(uuidlib.UUID(uuid))
    except ValueError:
        raise Rejected(f"cannot erase {device}: {uuid!r} is not a UUID that ext4 can carry") from None
    argv: list[str | os.PathLike[str]] = ["mkfs.ext4", "-F", "-U", uuid]
    if label:
        argv += ["-L", label]
    if files and (default := _default_inodes(argv, device)) < inodes_for(files):
        log.info("%s: %d inodes by default, %d entries to come: making %d", device, default, files, inodes_for(files))
        argv += ["-N", str(inodes_for(files))]
    run([*argv, "-q", device])


def _default_inodes(argv: list[str | os.PathLike[str]], device: Path) -> int:
    """How many inodes mke2fs would make with `argv` (its dry run, -n, writes nothing)."""
    out = run([*argv, "-n", device], error=Rejected).stdout.decode(errors="replace")
    found = re.search(r"blocks and (\d+) inodes", out)
    if found is None:
        raise Rejected(f"cannot erase {device}: mke2fs -n did not say how many inodes it would make")
    return int(found.group(1))
