"""`reflash build` of the demo image, cold (an empty cache: every Debian package downloaded) and warm
(the same inputs again), and the size of the recovery OS it makes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from recovery.core.run import run

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BuildTimes:
    cold: float
    warm: tuple[float, ...]


def build_once(output: Path, cache: Path) -> float:
    """Seconds of one `python -m reflash build -o OUTPUT` with MKIMAGE_CACHE=CACHE."""
    start = time.perf_counter()
    run([sys.executable, "-m", "mkimage", "build", "-o", output], env={"MKIMAGE_CACHE": os.fspath(cache)}, cwd=REPO)
    return time.perf_counter() - start


def build_times(output: Path, cache: Path, warm_runs: int) -> BuildTimes:
    """A cold build into an emptied cache, then `warm_runs` more with everything cached; `output` keeps
    the last image (the VM measurements boot it)."""
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    cold = build_once(output, cache)
    return BuildTimes(cold=cold, warm=tuple(build_once(output, cache) for _ in range(warm_runs)))


@dataclass(frozen=True)
class RecoverySize:
    kernel: int
    initramfs: int  # compressed, as on the recovery partition
    initramfs_unpacked: int
    compression: str
    unpack_note: str = ""  # set when the decompressor could not read all of it

    @property
    def compressed(self) -> int:
        return self.kernel + self.initramfs


def _compression(path: Path) -> str:
    magic = path.read_bytes()[:6] if path.stat().st_size < 64 else path.open("rb").read(6)
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if magic.startswith(b"\xfd7zXZ"):
        return "xz"
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"
    return "none"


def recovery_size(recovery: Path) -> RecoverySize:
    """Sizes of DIR/recovery/vmlinuz and initrd.img, and the initramfs's size unpacked (the cpio archive)."""
    initrd = recovery / "initrd.img"
    kind = _compression(initrd)
    note = ""
    if kind == "none":
        unpacked = initrd.stat().st_size
    else:
        tool = {"zstd": ["zstd", "-dcq"], "xz": ["xz", "-dc"], "gzip": ["gzip", "-dc"]}[kind]
        unpacked = 0
        with subprocess.Popen([*tool, os.fspath(initrd)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as proc:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(1 << 20):
                unpacked += len(chunk)
        # The kernel reads archives that the zstd tool gives up on (it stops at bytes after a frame
        # that it does not recognise): then the count is what the tool unpacked, and the report says so.
        note = "" if proc.returncode == 0 else f"at least: `{' '.join(tool)}` stopped with exit {proc.returncode}"
    return RecoverySize(kernel=(recovery / "vmlinuz").stat().st_size, initramfs=initrd.stat().st_size,
                        initramfs_unpacked=unpacked, compression=kind, unpack_note=note)
