"""Verifying a bundle file in full, streamed in constant memory, read once front to back.

A bundle is an uncompressed pax tar of exactly `manifest.json`, `manifest.json.sig` and the payload
`rootfs.tar.<ext>`, in that order (DESIGN.md, "The bundle"). The outer tar is parsed here by hand,
strictly, so that nothing the signature does not cover can hide in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Protocol

from recovery.core.errors import Rejected
from recovery.core.keys import Keyring
from recovery.core.manifest import (
    BLOCK_SIZE,
    DIGEST,
    HEX64,
    MANIFEST_NAME,
    MAX_MANIFEST,
    MAX_SIGNATURE,
    SIGNATURE_NAME,
    BlockDigests,
    Manifest,
    PayloadInfo,
    Signature,
)
from recovery.core.output import MiB, Progress


MAX_PAX_HEADER = 64 * 1024


# Tar writers pad the end to their record size (GNU tar and Python: 10 KiB); allow generous records.
MAX_TRAILER = 1 * MiB


BLOCK = 512


# Large reads keep the per-call overhead negligible; three of them in flight bound the memory.
CHUNK = 1 * MiB


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed verify_bundle; the extractor reads the payload at `payload_offset` and
    checks every block against `blocks` before it uses a byte of it.

    `blocks` are the signed block digests (format 2), or, for format 1, the digests of the blocks
    exactly as verification read them: those bytes hashed to the signed sha256, so their digests
    bind a second read to the signed payload just as well.
    """

    path: Path
    manifest: Manifest
    keyid: str
    payload_offset: int  # byte offset of the payload's data in the file
    sha256: str | None  # the whole file's sha256, when it was computed
    blocks: BlockDigests


def verify_bundle(
    path: Path | str,
    keyring: Keyring,
    *,
    product: str | None = None,
    version: str | None = None,
    sha256: str | None = None,
    capacity: int | None = None,
    progress: Progress | None = None,
    compute_sha256: bool = False,
) -> VerifiedBundle:
    """Verify a bundle in full, reading it once front to back; Rejected with the reason if anything is wrong.

    Checks the outer tar's structure, the signature, the manifest, `product` and `version` (equal when
    given), that the tree fits `capacity` bytes (the system partition's size) when given, the payload's
    size and sha256, and the whole file's sha256 when `sha256` is given (`compute_sha256` computes it
    without comparing). `progress` is told about every byte read and finished at the end.
    """
    path = Path(path)
    expected_sha256 = None
    if sha256 is not None:
        expected_sha256 = sha256.lower()
        if not HEX64.fullmatch(expected_sha256):
            raise Rejected(f"expected bundle sha256 {sha256!r} is not 64 hex digits")
    try:
        # O_NONBLOCK: a fifo in the bundle's place must be refused, not wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise Rejected(f"cannot open bundle {path}: {e.strerror or e}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Rejected(f"not a bundle: {path} is not a regular file")
    with open(fd, "rb", buffering=0) as f:
        if st.st_size == 0:
            raise Rejected(f"not a bundle: {path} is empty")
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass  # only a hint
        whole = hashlib.sha256() if (expected_sha256 is not None or compute_sha256) else None
        reader = _Reader(f, whole, progress)
        try:
            verified = _verify(reader, path, st.st_size, keyring, product, version, capacity)
        except OSError as e:
            raise Rejected(f"cannot read bundle {path}: {e.strerror or e}") from e
    if whole is not None:
        digest = whole.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise Rejected(f"bundle sha256 mismatch: expected {expected_sha256}, the file has {digest}")
        verified = replace(verified, sha256=digest)
    if progress is not None:
        progress.finish()
    return verified


def _verify(
    reader: _Reader, path: Path, file_size: int, keyring: Keyring,
    product: str | None, version: str | None, capacity: int | None,
) -> VerifiedBundle:
    manifest_member = _read_header(reader, 1, MANIFEST_NAME)
    _check_bound(manifest_member, MAX_MANIFEST)
    manifest_bytes = reader.read(manifest_member.size, f"member {MANIFEST_NAME}")
    _read_padding(reader, manifest_member)

    signature_member = _read_header(reader, 2, SIGNATURE_NAME)
    _check_bound(signature_member, MAX_SIGNATURE)
    signature = Signature.parse(reader.read(signature_member.size, f"member {SIGNATURE_NAME}"))
    _read_padding(reader, signature_member)

    # Nothing in the manifest is believed before its signature is checked.
    keyring.verify(signature.keyid, signature.signature, manifest_bytes)
    manifest = Manifest.parse(manifest_bytes)
    if product is not None and manifest.product != product:
        raise Rejected(f"wrong product: the bundle is for {manifest.product}, this system is {product}")
    if version is not None and manifest.version != version:
        raise Rejected(f"wrong version: the bundle carries {manifest.version}, expected {version}")
    if capacity is not None and manifest.required_bytes() > capacity:
        needs = -(-manifest.required_bytes() // MiB)
        raise Rejected(f"does not fit: needs {needs} MiB, system partition has {capacity // MiB} MiB")

    payload_member = _read_header(reader, 3, manifest.payload.name)
    if payload_member.size != manifest.payload.size:
        raise Rejected(
            f"payload size mismatch: the manifest says {manifest.payload.size} bytes, "
            f"the bundle holds {payload_member.size}"
        )
    if payload_member.offset + payload_member.size > file_size:
        raise Rejected(
            f"truncated: the payload ends at byte {payload_member.offset + payload_member.size} "
            f"but the file has only {file_size} bytes"
        )
    check = _PayloadCheck(manifest.payload)
    reader.stream(payload_member.size, check, f"member {payload_member.name}")
    blocks = check.finish()
    _read_padding(reader, payload_member)
    _read_trailer(reader)
    return VerifiedBundle(path, manifest, signature.keyid, payload_member.offset, sha256=None, blocks=blocks)


class _PayloadCheck:
    """Checks the payload as it streams past: each block against the signed list (format 2, failing at
    the first wrong block), or the whole against the signed sha256 (format 1) while recording each
    block's digest for the extractor."""

    def __init__(self, payload: PayloadInfo) -> None:
        self.payload = payload
        self.signed = payload.blocks
        self.block_size = BLOCK_SIZE if self.signed is None else self.signed.block_size
        self.whole = hashlib.sha256() if self.signed is None else None
        self.seen = bytearray()  # the digests of the blocks read so far
        self.current = hashlib.sha256()
        self.filled = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if self.whole is not None:
            self.whole.update(view)
        while view:
            take = min(len(view), self.block_size - self.filled)
            if not self.filled and take == self.block_size:
                self._block(hashlib.sha256(view[:take]).digest())  # the usual case: one read, one block
            else:
                self.current.update(view[:take])
                self.filled += take
                if self.filled == self.block_size:
                    self._block(self.current.digest())
            view = view[take:]

    def _block(self, digest: bytes) -> None:
        index = len(self.seen) // DIGEST
        if self.signed is not None and digest != self.signed.digest(index):
            raise Rejected(f"payload sha256 mismatch: {self.signed.span(index, self.payload.size)} is not "
                           "the one the manifest was signed for")
        self.seen += digest
        self.current, self.filled = hashlib.sha256(), 0

    def finish(self) -> BlockDigests:
        if self.filled:
            self._block(self.current.digest())
        if self.whole is not None and self.whole.hexdigest() != self.payload.sha256:
            raise Rejected("payload sha256 mismatch: the payload is not the one the manifest was signed for")
        return BlockDigests(self.block_size, bytes(self.seen))


class _Hash(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...


@dataclass(frozen=True)
class _Member:
    index: int
    name: str
    size: int
    offset: int  # of the data in the file


class _Reader:
    """Reads the bundle front to back; every byte passes here once, into the whole-file hash and progress."""

    def __init__(self, f: BinaryIO, whole: _Hash | None, progress: Progress | None) -> None:
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

    def stream(self, n: int, h: _Hash, what: str) -> None:
        """Hash the next n bytes into `h` in large chunks; the whole-file hash runs in a second thread."""
        size = min(CHUNK, max(n, 1))
        with contextlib.ExitStack() as stack:
            background = None if self.whole is None else stack.enter_context(_BackgroundHash(self.whole, size))
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


class _BackgroundHash:
    """Feeds a hash from a second thread; hashlib drops the GIL on large buffers, so two hashes cost one."""

    def __init__(self, h: _Hash, size: int, buffers: int = 3) -> None:
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

    def __enter__(self) -> _BackgroundHash:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.todo.put(None)
        self.thread.join()


def _read_header(reader: _Reader, index: int, expected: str) -> _Member:
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
    header = _parse_header(block, index, first=start == 0)
    pax: dict[str, str] = {}
    if header.typeflag == b"x":
        if header.size > MAX_PAX_HEADER:
            raise Rejected(f"not a bundle: the pax header of member {index} is larger than {MAX_PAX_HEADER} bytes")
        data = reader.read(header.size, f"the pax header of member {index}")
        _read_zeros(reader, -header.size % BLOCK, f"the pax header of member {index}")
        pax = _parse_pax(data, index)
        block = reader.read(BLOCK, f"the header of member {index}")
        header = _parse_header(block, index, first=False)
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
    return _Member(index=index, name=name, size=size, offset=reader.pos)


@dataclass(frozen=True)
class _Header:
    name: str
    size: int
    typeflag: bytes


def _parse_header(block: bytes, index: int, *, first: bool) -> _Header:
    stored = _octal(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    # POSIX says unsigned; some old writers summed signed bytes, which costs nothing to accept.
    signed = unsigned - 256 * sum(1 for b in (*block[:148], *block[156:]) if b >= 128)
    if stored is None or stored not in (unsigned, signed):
        if first:
            raise Rejected("not a bundle: not a tar file (no valid tar header at the start)")
        raise Rejected(f"not a bundle: corrupt tar header (checksum mismatch) at member {index}")
    if block[257:263] != b"ustar\0" or block[263:265] != b"00":
        raise Rejected(f"not a bundle: member {index} is not in POSIX ustar/pax format")
    size = _octal(block[124:136])
    if size is None:
        raise Rejected(f"not a bundle: corrupt tar header (size field) at member {index}")
    name = _cstring(block[0:100])
    prefix = _cstring(block[345:500])
    if prefix:
        name = f"{prefix}/{name}"
    return _Header(name=name, size=size, typeflag=block[156:157])


def _octal(field: bytes) -> int | None:
    """A tar numeric field: octal digits, space/NUL padded; None if it is anything else."""
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or any(c not in b"01234567" for c in digits):
        return None
    return int(digits, 8)


def _cstring(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_pax(data: bytes, index: int) -> dict[str, str]:
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


def _check_bound(member: _Member, limit: int) -> None:
    if member.size > limit:
        raise Rejected(f"not a bundle: {member.name} is {member.size} bytes, at most {limit} are allowed")


def _read_padding(reader: _Reader, member: _Member) -> None:
    _read_zeros(reader, -member.size % BLOCK, f"the padding after {member.name}")


def _read_zeros(reader: _Reader, n: int, what: str) -> None:
    if n and reader.read(n, what) != bytes(n):
        raise Rejected(f"not a bundle: {what} is not zeros")


def _read_trailer(reader: _Reader) -> None:
    """After the payload: the end-of-archive marker (at least two zero blocks), zeros up to the record size, EOF."""
    zero_blocks = 0
    while True:
        block = reader.read(BLOCK, "the end of the archive", eof_ok=True)
        if not block:
            break
        if block != bytes(len(block)):
            if len(block) == BLOCK and zero_blocks == 0 and _octal(block[148:156]) is not None:
                try:
                    header = _parse_header(block, 4, first=False)
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
