"""Disk images on the host: copy-on-write overlays, the GPT, and files read and written in ext4 partitions.

Everything goes through qemu-img with a `raw` node limited to a byte range (`offset=`, `size=`) over
the image, so a qcow2 overlay and a raw image are read and edited alike, without mounts or loop
devices. Files are handled by debugfs on a copy of one partition, which is written back after an edit.
Only a disk that no running QEMU holds may be touched (qemu-img's image locking refuses otherwise).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import struct
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from recovery.core.run import run

from . import VMError
from .drive import ImageFormat
from .network import qemu_escape

SECTOR = 512
GPT_SIGNATURE = b"EFI PART"
MAX_SYMLINKS = 8


@dataclass(frozen=True)
class Partition:
    number: int
    name: str  # the GPT partition name (PARTLABEL)
    start: int  # bytes
    size: int  # bytes
    type_guid: str
    guid: str  # PARTUUID


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
        filename = qemu_escape(os.fspath(self.path))
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
        """The contents of `path` in an ext4 partition (symlinks followed), or None if there is no such file."""
        with self._filesystem(partition) as (part, image):
            fs = _Ext4(image, part)
            target = fs.resolve(_fs_path(path))
            kind = fs.kind(target) if target is not None else None
            if target is None or kind is None:
                return None
            if kind != "regular":
                raise VMError(f"{path} in partition {part.name} is a {kind}, not a file")
            return fs.read(target)

    def metadata(self, partition: str | int, path: str) -> tuple[str, ...] | None:
        """What `path` in an ext4 partition is, symlinks not followed: type, mode, owner, group, link count
        and its extended attributes (ACLs among them) as debugfs prints them; None if nothing is there."""
        target = _fs_path(path)
        with self._filesystem(partition) as (part, image):
            out, errors = _debugfs(image, [f"stat {_q(target)}"])
        fields = [re.search(rf"{key}:\s*(\S+)", out) for key in ("Type", "Mode", "User", "Group", "Links")]
        if any(f is None for f in fields):
            if "not found" in errors:
                return None
            raise VMError(f"cannot look up {target} in partition {part.name}: {_last_line(errors)}")
        xattrs = re.search(r"Extended attributes:\n((?:  .*\n)*)", out)
        return (*(f.group(1) for f in fields if f is not None), xattrs.group(1).strip() if xattrs else "")

    def write_file(self, partition: str | int, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Create or replace `path` (owner root, `mode`) in an ext4 partition; parent directories are created."""
        target = _fs_path(path)
        with self._filesystem(partition) as (part, image):
            fs = _Ext4(image, part)
            source = image.parent / "source"
            source.write_bytes(data)
            # debugfs's mkdir over an existing name leaks an inode: create only what is missing
            parents = [str(d) for d in reversed(PurePosixPath(target).parents[:-1])]
            requests = [f"mkdir {_q(d)}" for d in parents if fs.kind(d) is None]
            if fs.kind(target) is not None:
                requests.append(f"rm {_q(target)}")
            requests += [
                f"write {_q(source)} {_q(target)}",
                f"set_inode_field {_q(target)} mode 0{0o100000 | mode:o}",
                f"set_inode_field {_q(target)} uid 0",
                f"set_inode_field {_q(target)} gid 0",
            ]
            _, errors = _debugfs(image, requests, writable=True)
            if fs.kind(target) != "regular" or fs.read(target) != data:
                raise VMError(f"cannot write {target} to partition {part.name}: {_last_line(errors)}")
            self.import_range(part.start, image)

    def remove_file(self, partition: str | int, path: str) -> bool:
        """Remove `path` (a file or symlink) from an ext4 partition; False if it was not there."""
        target = _fs_path(path)
        with self._filesystem(partition) as (part, image):
            fs = _Ext4(image, part)
            if fs.kind(target) is None:
                return False
            _, errors = _debugfs(image, [f"rm {_q(target)}"], writable=True)
            if fs.kind(target) is not None:
                raise VMError(f"cannot remove {target} from partition {part.name}: {_last_line(errors)}")
            self.import_range(part.start, image)
            return True


    def tear_file(self, partition: str | int, path: str, *, on_disk: bytes, in_journal: bytes) -> None:
        """Leave the one-block file `path` (it must exist) as a power cut inside a journal checkpoint can:
        `on_disk` in its block, which is what GRUB reads (it reads past no journal), and `in_journal` in a
        committed transaction not yet written back, which is what Linux reads after its replay. Both are
        padded with zeros to the block; the inode, and so the file's size, stays as it is."""
        target = _fs_path(path)
        with self._filesystem(partition) as (part, image):
            stats, _ = _debugfs(image, ["stats -h"])
            size = re.search(r"^Block size:\s*(\d+)", stats, re.MULTILINE)
            where, errors = _debugfs(image, [f"bmap {_q(target)} 0"])
            block = re.search(r"^(\d+)$", where.strip(), re.MULTILINE)
            if size is None or block is None or int(block.group(1)) == 0:
                raise VMError(f"cannot find the block of {target} in partition {part.name}: {_last_line(errors)}")
            bsize, number = int(size.group(1)), int(block.group(1))
            if max(len(on_disk), len(in_journal)) > bsize:
                raise VMError(f"tear_file: {target} must fit in one block of {bsize} bytes")
            with open(image, "r+b") as f:
                f.seek(number * bsize)
                f.write(on_disk.ljust(bsize, b"\0"))
            journaled = image.parent / "journaled"
            journaled.write_bytes(in_journal.ljust(bsize, b"\0"))
            _debugfs(image, ["jo", f"jw -b {number} {_q(journaled)}", "jc"], writable=True)
            self.import_range(part.start, image)


class _Ext4:
    """Questions to debugfs about one file system image."""

    def __init__(self, image: Path, part: Partition) -> None:
        self.image, self.part = image, part

    def kind(self, path: str) -> str | None:
        """`regular`, `directory`, `symlink`, ... or None if nothing is at `path`."""
        out, errors = _debugfs(self.image, [f"stat {_q(path)}"])
        match = re.search(r"Type: (\S+)", out)
        if match is None:
            if "not found" in errors:
                return None
            raise VMError(f"cannot look up {path} in partition {self.part.name}: {_last_line(errors)}")
        return match.group(1)

    def read(self, path: str) -> bytes:
        out = self.image.parent / "dump"
        out.unlink(missing_ok=True)
        _, errors = _debugfs(self.image, [f"dump {_q(path)} {_q(out)}"])
        if not out.exists():
            raise VMError(f"cannot read {path} from partition {self.part.name}: {_last_line(errors)}")
        return out.read_bytes()

    def resolve(self, path: str) -> str | None:
        """`path` with a symlink in its last component followed (as `cat` would), None if it dangles."""
        for _ in range(MAX_SYMLINKS):
            if self.kind(path) != "symlink":
                return path
            out, _ = _debugfs(self.image, [f"stat {_q(path)}"])
            fast = re.search(r'Fast link dest: "(.*)"', out)
            link = fast.group(1) if fast else self.read(path).decode(errors="replace")
            path = posixpath.normpath(posixpath.join(posixpath.dirname(path), link))
        raise VMError(f"too many levels of symbolic links at {path} in partition {self.part.name}")


def _fs_path(path: str) -> str:
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts or any(c in path for c in '"\n'):
        raise VMError(f"{path!r} is not a plain absolute path inside a file system")
    return str(p)


def _q(value: object) -> str:
    """Quote one argument of a debugfs request."""
    return f'"{value}"'


def _debugfs(image: Path, requests: list[str], *, writable: bool = False) -> tuple[str, str]:
    """Run debugfs requests on a file system image: (stdout, stderr). debugfs exits 0 even when a request fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", dir=image.parent, delete=False) as f:
        f.write("\n".join(requests) + "\n")
    argv: list[str | os.PathLike[str]] = ["debugfs", *(["-w"] if writable else []), "-f", f.name, image]
    try:
        proc = run(argv, check=False, error=VMError)
    finally:
        os.unlink(f.name)
    out: str = proc.stdout.decode(errors="replace")
    errors: str = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise VMError(f"debugfs failed on {image.name}: {_last_line(errors)}")
    return out, errors


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("debugfs ")]
    return lines[-1] if lines else "no reason given"
