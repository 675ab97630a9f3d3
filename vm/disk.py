"""Disk images on the host: copy-on-write overlays, the GPT, and files read and written in ext4 partitions.

Everything goes through qemu-img with a `raw` node limited to a byte range (`offset=`, `size=`) over
the image, so a qcow2 overlay and a raw image are read and edited alike, without mounts or loop
devices. Files are handled by debugfs on a copy of one partition, which is written back after an edit.
Only a disk that no running QEMU holds may be touched (qemu-img's image locking refuses otherwise).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from recovery.run import run

from . import VMError
from .drive import ImageFormat

SECTOR = 512
GPT_SIGNATURE = b"EFI PART"


@dataclass(frozen=True)
class Partition:
    number: int
    name: str  # the GPT partition name (PARTLABEL)
    start: int  # bytes
    size: int  # bytes
    type_guid: str
    guid: str  # PARTUUID


def _opts_value(value: str) -> str:
    return value.replace(",", ",,")  # QEMU option syntax doubles commas in values


@dataclass(frozen=True)
class DiskImage:
    """A disk image file and its format."""

    path: Path
    format: ImageFormat = ImageFormat.raw

    @classmethod
    def open(cls, path: Path) -> DiskImage:
        """The image at `path`, its format detected by qemu-img."""
        if not path.is_file():
            raise VMError(f"disk image {path} not found")
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", path], error=VMError).stdout)
        try:
            fmt = ImageFormat(info["format"])
        except ValueError:
            raise VMError(f"disk image {path} is {info['format']}, not raw or qcow2") from None
        return cls(path, fmt)

    def overlay(self, path: Path) -> DiskImage:
        """A new qcow2 overlay at `path` backed by this image, which from then on is only read."""
        run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", self.format, "-b", self.path.resolve(), path],
            error=VMError,
        )
        return DiskImage(path, ImageFormat.qcow2)

    @property
    def size(self) -> int:
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", self.path], error=VMError).stdout)
        return int(info["virtual-size"])

    # -- byte ranges --------------------------------------------------------------------------------

    def _range_opts(self, offset: int, size: int) -> str:
        """`--image-opts` for a raw view of bytes [offset, offset+size) of this image."""
        filename = _opts_value(os.fspath(self.path))
        if self.format is ImageFormat.raw:
            inner = f"file.driver=file,file.filename={filename}"
        else:
            inner = f"file.driver={self.format},file.file.driver=file,file.file.filename={filename}"
        return f"driver=raw,offset={offset},size={size},{inner}"

    def _qemu_img(self, argv: list[str | os.PathLike[str]]) -> None:
        try:
            run(["qemu-img", *argv], error=VMError)
        except VMError as e:
            hint = " (is a machine still running on it?)" if "lock" in str(e) else ""
            raise VMError(f"{self.path}: {e}{hint}") from None

    def export_range(self, offset: int, size: int, dest: Path) -> None:
        """Copy bytes [offset, offset+size) into the raw file `dest`; both must be sector aligned."""
        self._qemu_img(["convert", "--image-opts", self._range_opts(offset, size), "-O", "raw", dest])

    def import_range(self, offset: int, source: Path) -> None:
        """Write the raw file `source` over the bytes starting at `offset` (sector aligned)."""
        size = source.stat().st_size
        self._qemu_img(
            ["convert", "-n", "-f", "raw", source, "--target-image-opts", self._range_opts(offset, size)]
        )

    @contextmanager
    def _scratch(self) -> Iterator[Path]:
        # next to the image: a partition copy can be as large as the partition (sparse, but still)
        with tempfile.TemporaryDirectory(prefix=".vm-disk-", dir=self.path.parent) as tmp:
            yield Path(tmp)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) as the guest sees them."""
        start = offset - offset % SECTOR
        end = -(-(offset + size) // SECTOR) * SECTOR
        with self._scratch() as tmp:
            self.export_range(start, end - start, tmp / "range")
            data = (tmp / "range").read_bytes()
        return data[offset - start : offset - start + size]

    def write(self, offset: int, data: bytes) -> None:
        """Overwrite bytes at `offset` as the guest would see them (read-modify-write of whole sectors)."""
        start = offset - offset % SECTOR
        end = -(-(offset + len(data)) // SECTOR) * SECTOR
        with self._scratch() as tmp:
            chunk = tmp / "range"
            self.export_range(start, end - start, chunk)
            buf = bytearray(chunk.read_bytes())
            buf[offset - start : offset - start + len(data)] = data
            chunk.write_bytes(buf)
            self.import_range(start, chunk)

    # -- partitions ---------------------------------------------------------------------------------

    def partitions(self) -> list[Partition]:
        """The GPT's partitions, in table order (a partition's number is its entry index + 1)."""
        header = self.read(SECTOR, 92)
        if header[:8] != GPT_SIGNATURE:
            raise VMError(f"{self.path} has no GPT")
        entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
        table = self.read(entries_lba * SECTOR, count * entry_size)
        parts = []
        for i in range(count):
            entry = table[i * entry_size : (i + 1) * entry_size]
            if entry[:16] == bytes(16):
                continue
            first, last = struct.unpack_from("<QQ", entry, 32)
            parts.append(
                Partition(
                    number=i + 1,
                    name=entry[56:128].decode("utf-16-le").rstrip("\0"),
                    start=first * SECTOR,
                    size=(last - first + 1) * SECTOR,
                    type_guid=str(uuid.UUID(bytes_le=entry[:16])),
                    guid=str(uuid.UUID(bytes_le=entry[16:32])),
                )
            )
        return parts

    def partition(self, key: str | int) -> Partition:
        """A partition by GPT name (`"cfg"`) or number (`3`)."""
        parts = self.partitions()
        for part in parts:
            if part.number == key or part.name == key:
                return part
        names = ", ".join(f"{p.number}:{p.name}" for p in parts)
        raise VMError(f"{self.path} has no partition {key!r} (has {names})")

    @contextmanager
    def _filesystem(self, key: str | int) -> Iterator[tuple[Partition, Path]]:
        """A consistent copy of an ext4 partition: the journal of an unclean stop replayed, as a mount would."""
        part = self.partition(key)
        with self._scratch() as tmp:
            image = tmp / "partition"
            self.export_range(part.start, part.size, image)
            status = run(["e2fsck", "-p", "-E", "journal_only", image], check=False, error=VMError).returncode
            if status & ~1:  # 1: the journal was replayed; anything else: not a file system we can use
                raise VMError(f"partition {part.number} ({part.name}) of {self.path} is no usable ext file system")
            yield part, image

    # -- files --------------------------------------------------------------------------------------

    def read_file(self, partition: str | int, path: str) -> bytes | None:
        """The contents of `path` in an ext4 partition, or None if there is no such file."""
        target = _fs_path(path)
        with self._filesystem(partition) as (part, image):
            out = image.parent / "file"
            proc = _debugfs(image, [f"dump {_q(target)} {_q(out)}"])
            if out.exists():
                return out.read_bytes()
            if "File not found" in proc or "not found" in proc:
                return None
            raise VMError(f"cannot read {target} from partition {part.name}: {_last_line(proc)}")

    def write_file(self, partition: str | int, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Create or replace `path` (owner root, `mode`) in an ext4 partition; parent directories are created."""
        target = _fs_path(path)
        with self._filesystem(partition) as (part, image):
            source = image.parent / "source"
            source.write_bytes(data)
            parents = reversed(PurePosixPath(target).parents[:-1])
            # debugfs's mkdir over an existing name leaks an inode: create only what is missing
            requests = [f"mkdir {_q(d)}" for d in parents if not _exists(image, str(d))]
            requests += [
                f"rm {_q(target)}",
                f"write {_q(source)} {_q(target)}",
                f"set_inode_field {_q(target)} mode 0{0o100000 | mode:o}",
                f"set_inode_field {_q(target)} uid 0",
                f"set_inode_field {_q(target)} gid 0",
            ]
            proc = _debugfs(image, requests, writable=True)
            check = image.parent / "check"
            _debugfs(image, [f"dump {_q(target)} {_q(check)}"])
            if not check.exists() or check.read_bytes() != data:
                raise VMError(f"cannot write {target} to partition {part.name}: {_last_line(proc)}")
            self.import_range(part.start, image)

    def remove_file(self, partition: str | int, path: str) -> bool:
        """Remove `path` from an ext4 partition; False if it was not there."""
        target = _fs_path(path)
        with self._filesystem(partition) as (part, image):
            probe = image.parent / "probe"
            _debugfs(image, [f"dump {_q(target)} {_q(probe)}"])
            if not probe.exists():
                return False
            proc = _debugfs(image, [f"rm {_q(target)}"], writable=True)
            probe.unlink()
            _debugfs(image, [f"dump {_q(target)} {_q(probe)}"])
            if probe.exists():
                raise VMError(f"cannot remove {target} from partition {part.name}: {_last_line(proc)}")
            self.import_range(part.start, image)
            return True


def _fs_path(path: str) -> str:
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts or any(c in path for c in '"\n'):
        raise VMError(f"{path!r} is not a plain absolute path inside a file system")
    return str(p)


def _exists(image: Path, path: str) -> bool:
    return "not found" not in _debugfs(image, [f"stat {_q(path)}"])


def _q(value: object) -> str:
    """Quote one argument of a debugfs request."""
    return f'"{value}"'


def _debugfs(image: Path, requests: list[str], *, writable: bool = False) -> str:
    """Run debugfs requests on a file system image; returns its stderr (debugfs exits 0 regardless)."""
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", dir=image.parent, delete=False) as f:
        f.write("\n".join(requests) + "\n")
    argv: list[str | os.PathLike[str]] = ["debugfs", *(["-w"] if writable else []), "-f", f.name, image]
    try:
        proc = run(argv, check=False, error=VMError)
    finally:
        os.unlink(f.name)
    stderr: str = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise VMError(f"debugfs failed on {image.name}: {_last_line(stderr)}")
    return stderr


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("debugfs ")]
    return lines[-1] if lines else "no reason given"
