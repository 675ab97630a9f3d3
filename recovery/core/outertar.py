"""The bundle's outer tar, read strictly and front to back: every byte passes one reader (into the whole\nfile's hash and the progress), a header is a POSIX ustar/pax one or the bundle is refused, and nothing the\nsignature does not cover can hide between, before or after the members."""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from recovery.core.errors import Rejected
from recovery.core.output import MiB, Progress

MAX_PAX_HEADER = 64 * 1024


# Tar writers pad the end to their record size (GNU tar and Python: 10 KiB); allow generous records.
MAX_TRAILER = 1 * MiB


BLOCK = 512


# Large reads keep the per-call overhead negligible; three of them in flight bound the memory.
CHUNK = 1 * MiB


class Hash(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...


@dataclass(frozen=True)
class Member:
    index: int
    name: str
    size: int
    offset: int  # of the data in the file


class Reader:
    """Reads the bundle front to back; every byte passes here once, into the whole-file hash and progress."""

    def __init__(self, f: BinaryIO, whole: Hash | None, progress: Progress | None) -> None:
        self.f = f
        self.whole = whole
        self.progress = progress
        self.pos = 0

    def _advance(self, n: int) -> None:
        self.pos += n
        if self.progress is not None:
            self.progress.update(n)

    def read(self, n: int, what: str, *, eof_ok: bool = False) -> bytes:
        """Read exactly n bytes (fewer only at the end of the file when `eof_ok`)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            r = self.f.readinto(view[got:])
            if not r:
                if eof_ok:
                    break
                raise Rejected(f"truncated: the file ends {got} bytes into {what} (of {n})")
            got += r
        data = bytes(view[:got])
        if self.whole is not None:
            self.whole.update(data)
        self._advance(got)
        return data

    def stream(self, n: int, h: Hash, what: str) -> None:
        """Hash the next n bytes into `h` in large chunks; the whole-file hash runs in a second thread."""
        size = min(CHUNK, max(n, 1))
        with contextlib.ExitStack() as stack:
            background = None if self.whole is None else stack.enter_context(BackgroundHash(self.whole, size))
            own = bytearray(size)
            remaining = n
            while remaining:
                buf = own if background is None else background.buffer()
                view = memoryview(buf)
                got = self.f.readinto(view[: min(size, remaining)])
                if not got:
                    raise Rejected(f"truncated: the file ends {n - remaining} bytes into {what} (of {n})")
                if background is not None:
                    # The buffer returns to the pool only once the other thread hashed it, and we take the
                    # next one only after hashing this one: no bytes are overwritten while still needed.
                    background.submit(buf, got)
                h.update(view[:got])
                remaining -= got
                self._advance(got)


class BackgroundHash:
    """Feeds a hash from a second thread; hashlib drops the GIL on large buffers, so two hashes cost one."""

    def __init__(self, h: Hash, size: int, buffers: int = 3) -> None:
        self.h = h
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(buffers):
            self.free.put(bytearray(size))
        self.todo: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="bundle-sha256", daemon=True)

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            buf, n = item
            self.h.update(memoryview(buf)[:n])
            self.free.put(buf)

    def buffer(self) -> bytearray:
        return self.free.get()

    def submit(self, buf: bytearray, n: int) -> None:
        self.todo.put((buf, n))

    def __enter__(self) -> BackgroundHash:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.todo.put(None)
        self.thread.join()


def read_header(reader: Reader, index: int, expected: str) -> Member:
    """Read the header(s) of member `index` (a pax `x` header may precede it) and check its name."""
    start = reader.pos
    block = reader.read(BLOCK, f"the header of member {index}", eof_ok=True)
    if not block:
        raise Rejected(f"truncated: the file ends before member {index} ({expected})")
    if len(block) < BLOCK:
        if start == 0:
            raise Rejected("not a bundle: not a tar file (shorter than one tar header)")
        raise Rejected(f"truncated: the file ends inside the header of member {index} ({expected})")
    if block == bytes(BLOCK):
        if index == 1:
            raise Rejected("not a bundle: an empty tar archive")
        raise Rejected(f"not a bundle: the archive ends before member {index} ({expected})")
    header = parse_header(block, index, first=start == 0)
    pax: dict[str, str] = {}
    if header.typeflag == b"x":
        if header.size > MAX_PAX_HEADER:
            raise Rejected(f"not a bundle: the pax header of member {index} is larger than {MAX_PAX_HEADER} bytes")
        data = reader.read(header.size, f"the pax header of member {index}")
        read_zeros(reader, -header.size % BLOCK, f"the pax header of member {index}")
        pax = parse_pax(data, index)
        block = reader.read(BLOCK, f"the header of member {index}")
        header = parse_header(block, index, first=False)
        if header.typeflag == b"x":
            raise Rejected(f"not a bundle: two pax headers in a row before member {index}")
    if header.typeflag == b"g":
        raise Rejected("not a bundle: global pax headers are not allowed in a bundle")
    name = pax.get("path", header.name)
    if name != expected:
        which = {1: "first", 2: "second", 3: "third"}.get(index, f"member {index}")
        if index == 3:
            raise Rejected(f"not a bundle: the {which} member is {name!r}, the manifest names the payload {expected}")
        raise Rejected(f"not a bundle: the {which} member is {name!r}, expected {expected}")
    if header.typeflag not in (b"0", b"\0"):
        raise Rejected(f"not a bundle: member {name} is not a regular file (tar type {header.typeflag!r})")
    size = header.size
    if "size" in pax:
        if not pax["size"].isdigit() or not pax["size"].isascii():
            raise Rejected(f"not a bundle: the pax size of member {name} is not a number")
        size = int(pax["size"])
    return Member(index=index, name=name, size=size, offset=reader.pos)


@dataclass(frozen=True)
class Header:
    name: str
    size: int
    typeflag: bytes


def parse_header(block: bytes, index: int, *, first: bool) -> Header:
    stored = octal(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    # POSIX says unsigned; some old writers summed signed bytes, which costs nothing to accept.
    signed = unsigned - 256 * sum(1 for b in (*block[:148], *block[156:]) if b >= 128)
    if stored is None or stored not in (unsigned, signed):
        if first:
            raise Rejected("not a bundle: not a tar file (no valid tar header at the start)")
        raise Rejected(f"not a bundle: corrupt tar header (checksum mismatch) at member {index}")
    if block[257:263] != b"ustar\0" or block[263:265] != b"00":
        raise Rejected(f"not a bundle: member {index} is not in POSIX ustar/pax format")
    size = octal(block[124:136])
    if size is None:
        raise Rejected(f"not a bundle: corrupt tar header (size field) at member {index}")
    name = cstring(block[0:100])
    prefix = cstring(block[345:500])
    if prefix:
        name = f"{prefix}/{name}"
    return Header(name=name, size=size, typeflag=block[156:157])


def octal(field: bytes) -> int | None:
    """A tar numeric field: octal digits, space/NUL padded; None if it is anything else."""
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or any(c not in b"01234567" for c in digits):
        return None
    return int(digits, 8)


def cstring(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def parse_pax(data: bytes, index: int) -> dict[str, str]:
    """Parse `<len> <key>=<value>\\n` records; keep what matters for finding the member."""
    records: dict[str, str] = {}
    pos = 0
    bad = Rejected(f"not a bundle: corrupt pax header before member {index}")
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        if space < 0 or not data[pos:space].isdigit():
            raise bad
        length = int(data[pos:space])
        record = data[pos : pos + length]
        if length <= space - pos + 1 or len(record) != length or not record.endswith(b"\n"):
            raise bad
        key, eq, value = record[space - pos + 1 : -1].partition(b"=")
        if not eq:
            raise bad
        name = key.decode("utf-8", "replace")
        if name.startswith("GNU.sparse"):
            raise Rejected(f"not a bundle: member {index} is stored as a sparse file")
        records[name] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def check_bound(member: Member, limit: int) -> None:
    if member.size > limit:
        raise Rejected(f"not a bundle: {member.name} is {member.size} bytes, at most {limit} are allowed")


def read_padding(reader: Reader, member: Member) -> None:
    read_zeros(reader, -member.size % BLOCK, f"the padding after {member.name}")


def read_zeros(reader: Reader, n: int, what: str) -> None:
    if n and reader.read(n, what) != bytes(n):
        raise Rejected(f"not a bundle: {what} is not zeros")


def read_trailer(reader: Reader) -> None:
    """After the payload: the end-of-archive marker (at least two zero blocks), zeros up to the record size, EOF."""
    zero_blocks = 0
    while True:
        block = reader.read(BLOCK, "the end of the archive", eof_ok=True)
        if not block:
            break
        if block != bytes(len(block)):
            if len(block) == BLOCK and zero_blocks == 0 and octal(block[148:156]) is not None:
                try:
                    header = parse_header(block, 4, first=False)
                except Rejected:
                    pass
                else:
                    raise Rejected(f"not a bundle: an extra member {header.name!r} follows the payload")
            raise Rejected(f"not a bundle: junk after the end of the archive at byte {reader.pos - len(block)}")
        if len(block) < BLOCK:
            raise Rejected(f"not a bundle: {len(block)} stray bytes after the end of the archive")
        zero_blocks += 1
        if zero_blocks * BLOCK > MAX_TRAILER:
            raise Rejected(f"not a bundle: more than {MAX_TRAILER // MiB} MiB after the end of the archive")
    if zero_blocks < 2:
        raise Rejected("truncated: the end-of-archive marker (two zero blocks) is missing")
