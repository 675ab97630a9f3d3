"""Erasing the system partition (`recovery.os.erase.erase`: mkfs.ext4 keeping label and UUID) against
`rm -rf` of the same tree: the two ways to get rid of an installed release."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recovery.os.erase import erase
from recovery.core.run import run

from .measure import Timing, cpu_seconds


@dataclass(frozen=True)
class EraseResult:
    files: int  # entries, the root included
    bytes: int  # regular-file data
    partition: int  # the image file's size
    erase: Timing
    rm: Timing


def count(tree: Path) -> tuple[int, int]:
    entries, data, seen = 1, 0, set()
    for root, dirs, files in os.walk(tree):
        entries += len(dirs) + len(files)
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            if not os.path.islink(os.path.join(root, name)):
                data += st.st_size
    return entries, data


def _timed(prepare: Callable[[], None], act: Callable[[], None]) -> tuple[float, float]:
    """Wall and CPU seconds of `act` plus the sync that writes out what it did; `prepare` runs untimed."""
    prepare()
    os.sync()
    cpu, start = cpu_seconds(), time.perf_counter()
    act()
    os.sync()
    return time.perf_counter() - start, cpu_seconds() - cpu


def measure_erase(tree: Path, scratch: Path, partition_size: int, repeat: int) -> EraseResult:
    """`repeat` rounds, taking turns: erase of an ext4 image file of `partition_size` bytes that holds
    `tree` (made by mkfs.ext4 -d) vs `rm -rf` of a copy of `tree` in a directory on the host's disk."""
    scratch.mkdir(parents=True, exist_ok=True)
    image, copy = scratch / "system.ext4", scratch / "rm-tree"
    ident = str(uuid.uuid4())

    def fill_image() -> None:
        image.unlink(missing_ok=True)
        with image.open("wb") as f:
            f.truncate(partition_size)
        run(["mkfs.ext4", "-q", "-F", "-L", "system", "-U", ident, "-d", tree, image])

    def copy_tree() -> None:
        if copy.exists():
            shutil.rmtree(copy)
        run(["cp", "-a", tree, copy])

    erased, removed = [], []
    for _ in range(repeat):
        erased.append(_timed(fill_image, lambda: erase(image)))
        removed.append(_timed(copy_tree, lambda: run(["rm", "-rf", copy])))
    image.unlink(missing_ok=True)
    files, data = count(tree)
    return EraseResult(files=files, bytes=data, partition=partition_size,
                       erase=Timing(tuple(w for w, _ in erased), tuple(c for _, c in erased)),
                       rm=Timing(tuple(w for w, _ in removed), tuple(c for _, c in removed)))
