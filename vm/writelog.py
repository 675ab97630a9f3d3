"""Every write a guest makes to a disk, recorded by QEMU's `blklogwrites` driver: how a machine's disk
is attached to it, and the log read back (vm/replay.py rebuilds the disk from it; DESIGN.md "Crash states").

The log is in Linux dm-log-writes format, all little-endian, in units of the log's sector size S:
sector 0 holds the super block (magic, version, nr_entries, sectorsize: `<QQQI`), entries follow
from sector 1, each one sector (sector, nr_sectors, flags, data_len: `<QQQQ`, zero padded; a MARK's
text follows in that sector, data_len bytes), then nr_sectors sectors of data, none for a discard
or a mark. `sector` and `nr_sectors` count S-byte sectors of the disk. QEMU writes FLUSH entries (no
data), plain writes (write-zeroes too, their zeros in the log), DISCARD entries, never FUA or MARK
(a FUA write reaches it as a write: virtio-blk has no FUA, the guest flushes instead); it updates
nr_entries at every flush and every `log-super-update-interval` entries.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path
from typing import Any

from recovery.core.run import run

from . import VMError
from .disk import DiskImage
from .drive import DiskInterface, Drive, ImageFormat

MAGIC = 0x6A736677736872
VERSION = 1
_SUPER = struct.Struct("<QQQI")
_ENTRY = struct.Struct("<QQQQ")


class Flag(IntFlag):
    FLUSH = 1 << 0
    FUA = 1 << 1
    DISCARD = 1 << 2
    MARK = 1 << 3


_KNOWN = Flag.FLUSH | Flag.FUA | Flag.DISCARD | Flag.MARK


# --- attaching: what QEMU is given ----------------------------------------------------------------


def blklogwrites(
    log: Path, *, sector_size: int = 512, append: bool = False, super_update_interval: int | None = None,
    discard: bool = False,
) -> dict[str, Any]:
    """A `blklogwrites` filter node for `Drive.filters`: every write below it is logged to `log`.

    The log file must exist (QEMU's file driver does not create it; `logged_drive` does). Its host
    flushes are skipped (`no-flush`): the log lives in the host's page cache and survives a killed
    QEMU, and a guest that flushes often would otherwise wait for the host's disk twice each time.
    With `discard` the guest's discards reach the disk and the log (QEMU's default drops them before
    either sees them). `append` continues an existing log (its sector size then comes from the log).
    """
    node: dict[str, Any] = {
        "driver": "blklogwrites",
        "log": {"driver": "file", "filename": str(Path(log).resolve()), "cache": {"no-flush": True}},
    }
    if append:
        node["log-append"] = True
    else:
        node["log-sector-size"] = sector_size
    if super_update_interval is not None:
        node["log-super-update-interval"] = super_update_interval
    if discard:
        node["discard"] = "unmap"
    return node


def logged_drive(
    image: Path, log: Path, *, interface: DiskInterface = DiskInterface.virtio, serial: str | None = None,
    **options: Any,
) -> Drive:
    """The raw disk `image` with its writes logged to `log`, which is created empty (a longer old log
    would leave stale entries after the new ones). `options` go to `blklogwrites`."""
    if DiskImage.open(image).format is not ImageFormat.raw:
        raise VMError(f"{image} is not a raw image: record on a raw copy, whose first state the log starts from")
    if not options.get("append"):
        log.write_bytes(b"")
    return Drive(image, ImageFormat.raw, interface, serial=serial, filters=(blklogwrites(log, **options),))


@dataclass(frozen=True)
class Recording:
    """One recording's files: `base`, the disk as it was before (never written again), `image`, the
    disk the guest writes, and `log`, every write it made. Between `prepare` and the last run nothing
    but the guest may write `image` (no `Machine.write_file`): the log would not know it."""

    base: Path
    image: Path
    log: Path

    @classmethod
    def prepare(cls, disk: Path, directory: Path) -> Recording:
        """Two raw copies of `disk` (a raw or qcow2 image) in `directory`, and an empty log."""
        directory.mkdir(parents=True, exist_ok=True)
        rec = cls(directory / "base.img", directory / "recorded.img", directory / "writes.log")
        source = DiskImage.open(disk)
        if source.format is ImageFormat.raw:
            copy_sparse(disk, rec.base)
        else:
            run(["qemu-img", "convert", "-U", "-O", "raw", disk, rec.base], error=VMError)
        copy_sparse(rec.base, rec.image)
        rec.log.write_bytes(b"")
        return rec

    def drive(
        self, *, interface: DiskInterface = DiskInterface.virtio, serial: str | None = None, **options: Any
    ) -> Drive:
        """The recorded disk for `Machine(disk=…)`: `image` through blklogwrites into `log`.

        Every QEMU run appends to the one log (an empty log starts with 512-byte sectors), so a
        recording may span several machines, one per boot; the super block is rewritten after every
        entry, so each run finds the end of the last. End each run with `Machine.stop()` (QMP quit):
        a killed QEMU may have written to the disk what it had not yet logged.
        """
        options = {"append": True, "super_update_interval": 1, **options}
        return Drive(self.image, ImageFormat.raw, interface, serial=serial,
                     filters=(blklogwrites(self.log, **options),))


def copy_sparse(source: Path, dest: Path) -> None:
    """A copy that shares blocks where the file system can (reflink) and keeps holes as holes."""
    run(["cp", "--reflink=auto", "--sparse=always", source, dest], error=VMError)


# --- reading the log ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    """One entry: `number` from 0 in log order; `data_at` is where its data lies in the log (0: none)."""

    number: int
    sector: int
    nr_sectors: int
    flags: Flag
    data_len: int
    data_at: int
    sector_size: int
    mark: str | None = None

    @property
    def offset(self) -> int:
        """Where on the disk it writes, in bytes."""
        return self.sector * self.sector_size

    @property
    def size(self) -> int:
        return self.nr_sectors * self.sector_size

    @property
    def changes_disk(self) -> bool:
        """A write or a discard of at least one sector (a flush with data is a write too)."""
        return self.size > 0 and not self.flags & Flag.MARK


@dataclass(frozen=True)
class FlushPoint:
    """A flush in the log: everything logged before it (and its own data) is on disk. Index 0 is the
    start, before the first entry. `bytes` counts the data written up to it (discards not counted);
    `mark` is the text of the last MARK entry before it, when the log has marks."""

    index: int
    entry: int | None
    bytes: int
    mark: str | None = None

    @property
    def entries(self) -> int:
        """How many log entries lie at or before it."""
        return 0 if self.entry is None else self.entry + 1


class WriteLog:
    """A dm-log-writes log, its entries read (their data stays in the file until replayed)."""

    def __init__(self, path: Path, sector_size: int, nr_entries: int, entries: tuple[LogEntry, ...]) -> None:
        self.path, self.sector_size, self.nr_entries, self.entries = path, sector_size, nr_entries, entries

    @classmethod
    def read(cls, path: Path, *, past_super: bool = False) -> WriteLog:
        """The log at `path`. The super block's count covers the entries up to the last flush; with
        `past_super` the whole entries written after it are read too (a log QEMU is still writing, or
        one a killed QEMU left)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_SUPER.size)
            if len(head) < _SUPER.size:
                raise VMError(f"{path} is no write log: {size} bytes, no super block")
            magic, version, nr_entries, sector_size = _SUPER.unpack(head)
            if magic != MAGIC:
                raise VMError(f"{path} is no write log: magic {magic:#x}, not {MAGIC:#x}")
            if version != VERSION:
                raise VMError(f"{path}: write log version {version}, only {VERSION} is known")
            if sector_size < _ENTRY.size or sector_size & (sector_size - 1):
                raise VMError(f"{path}: log sector size {sector_size} is not a power of 2 of at least {_ENTRY.size}")
            entries: list[LogEntry] = []
            pos = sector_size
            while len(entries) < nr_entries or past_super:
                expected = len(entries) < nr_entries
                entry, following = _entry_at(f, pos, len(entries), sector_size, size)
                if isinstance(entry, str):
                    if expected:
                        raise VMError(f"{path}: entry {len(entries)} of {nr_entries} at byte {pos}: {entry}")
                    break
                entries.append(entry)
                pos = following
        return cls(path, sector_size, nr_entries, tuple(entries))

    def flush_points(self) -> list[FlushPoint]:
        """The start and every flush, in log order."""
        points = [FlushPoint(0, None, 0)]
        written, mark = 0, None
        for e in self.entries:
            if e.flags & Flag.MARK:
                mark = e.mark
            elif e.size and not e.flags & Flag.DISCARD:
                written += e.size
            if e.flags & Flag.FLUSH:
                points.append(FlushPoint(len(points), e.number, written, mark))
        return points

    def data(self, entry: LogEntry) -> bytes:
        """An entry's data as the guest wrote it (empty for a discard, a mark or a flush)."""
        if not entry.data_at:
            return b""
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), entry.size, entry.data_at)


def _entry_at(f: Any, pos: int, number: int, sector_size: int, size: int) -> tuple[LogEntry | str, int]:
    """The entry whose sector starts at `pos` and where the next one starts, or why there is none."""
    if pos + sector_size > size:
        return "the log ends here", pos
    raw = os.pread(f.fileno(), sector_size, pos)
    sector, nr_sectors, bits, data_len = _ENTRY.unpack_from(raw)
    if bits & ~_KNOWN:
        return f"unknown flags {bits:#x}", pos
    flags = Flag(bits)
    if not bits and not nr_sectors:
        return "an empty entry (no flags, no sectors)", pos
    if flags & Flag.MARK:
        if data_len > sector_size - _ENTRY.size:
            return f"a mark of {data_len} bytes in a {sector_size}-byte sector", pos
        mark = raw[_ENTRY.size : _ENTRY.size + data_len].decode("utf-8", errors="replace")
    elif any(raw[_ENTRY.size :]):
        return "its padding is not zero", pos
    else:
        mark = None
    following = pos + sector_size
    data_at = 0
    if nr_sectors and not flags & (Flag.DISCARD | Flag.MARK):
        data_at = following
        following += nr_sectors * sector_size
        if following > size:
            return f"its {nr_sectors} sectors of data run past the log's end", pos
    return LogEntry(number, sector, nr_sectors, flags, data_len, data_at, sector_size, mark), following


def log_entries_now(path: Path) -> int:
    """How many whole entries a log holds at this moment, its super block notwithstanding: what a
    recorder notes when the guest reaches a phase (the next entries come after it)."""
    try:
        return len(WriteLog.read(path, past_super=True).entries)
    except VMError:
        return 0  # QEMU writes the super block at its first flush: no entries before that count


__all__ = [
    "MAGIC", "Flag", "FlushPoint", "LogEntry", "Recording", "WriteLog", "blklogwrites", "copy_sparse",
    "log_entries_now", "logged_drive",
]
