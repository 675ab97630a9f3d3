"""Signed bundles: the manifest, and full verification of a bundle file, streamed in constant memory.

A bundle is an uncompressed pax tar of exactly `manifest.json`, `manifest.json.sig` and the payload
`rootfs.tar.<ext>`, in that order (DESIGN.md, "The bundle"). The outer tar is parsed here by hand,
strictly, so that nothing the signature does not cover can hide in it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import queue
import re
import stat
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .errors import Rejected
from .keys import Keyring
from .output import MiB, Progress

__all__ = [
    "BlockDigests", "Compression", "Keyring", "Manifest", "PayloadInfo", "Signature", "VerifiedBundle",
    "verify_bundle", "MANIFEST_NAME", "SIGNATURE_NAME", "FORMAT", "FORMATS", "BLOCK_SIZE",
]

# Format 2 signs a sha256 per payload block (DESIGN.md, "The bundle"); format 1 signs one sha256 of
# the whole payload. Both are read; new bundles are format 2.
FORMAT = 2
FORMATS = (1, 2)
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.sig"

# The payload's blocks: what the extractor checks before it hands a byte to the decompressor, and
# the memory it needs for that (one block).
BLOCK_SIZE = 1 * MiB
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 16 * MiB
DIGEST = 32
# The block list is most of a format-2 manifest: 43 base64 bytes per block, so 8 MiB is room for a
# payload of about 190 GiB in 1 MiB blocks.
MAX_MANIFEST = 8 * MiB
MAX_SIGNATURE = 4 * 1024
MAX_PAX_HEADER = 64 * 1024
# Tar writers pad the end to their record size (GNU tar and Python: 10 KiB); allow generous records.
MAX_TRAILER = 1 * MiB
BLOCK = 512
# Large reads keep the per-call overhead negligible; three of them in flight bound the memory.
CHUNK = 1 * MiB

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~:-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYID = re.compile(r"[0-9a-f]{16}")


class Compression(StrEnum):
    """How the payload tar is compressed; the payload's member name follows from it."""

    zstd = "zstd"
    xz = "xz"
    gzip = "gzip"
    none = "none"

    @property
    def suffix(self) -> str:
        return {"zstd": ".tar.zst", "xz": ".tar.xz", "gzip": ".tar.gz", "none": ".tar"}[self.value]

    @property
    def payload_name(self) -> str:
        return "rootfs" + self.suffix


@dataclass(frozen=True)
class BlockDigests:
    """The sha256 of each `block_size` piece of the payload, in order (the last piece may be shorter):
    32 bytes each, concatenated."""

    block_size: int
    digests: bytes

    @classmethod
    def count_for(cls, size: int, block_size: int) -> int:
        return -(-size // block_size)

    def __len__(self) -> int:
        return len(self.digests) // DIGEST

    def digest(self, index: int) -> bytes:
        return self.digests[index * DIGEST : (index + 1) * DIGEST]

    def span(self, index: int, size: int) -> str:
        """Block `index` of a payload of `size` bytes, for a message: "block 17 (bytes 17825792-18874367)"."""
        start = index * self.block_size
        return f"block {index} (bytes {start}-{min(start + self.block_size, size) - 1})"


@dataclass(frozen=True)
class PayloadInfo:
    """The payload as the manifest describes it: `sha256` of the whole (format 1) or `blocks`, the
    digest of every `block_size` piece (format 2), never both."""

    name: str
    size: int
    sha256: str | None
    compression: Compression
    blocks: BlockDigests | None = None

    def __post_init__(self) -> None:
        _check_count(self.size, "payload.size")
        if (self.sha256 is None) == (self.blocks is None):
            raise Rejected("malformed manifest: the payload needs either sha256 (format 1) or blocks (format 2)")
        if self.sha256 is not None and (not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256)):
            raise Rejected("malformed manifest: payload.sha256 must be 64 lowercase hex digits")
        if self.blocks is not None:
            bs = self.blocks.block_size
            if not isinstance(bs, int) or isinstance(bs, bool) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE \
                    or bs & (bs - 1):
                raise Rejected(f"malformed manifest: payload.block_size {bs!r} must be a power of two from "
                               f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}")
            want = BlockDigests.count_for(self.size, bs)
            if len(self.blocks.digests) != want * DIGEST:
                raise Rejected(f"malformed manifest: payload.blocks holds {len(self.blocks.digests) / DIGEST:g} "
                               f"digests, a payload of {self.size} bytes in blocks of {bs} has {want}")
        if not isinstance(self.compression, Compression):
            raise Rejected(f"malformed manifest: unknown payload compression {self.compression!r}")
        if self.name != self.compression.payload_name:
            raise Rejected(
                f"malformed manifest: payload name {self.name!r} does not match compression "
                f"{self.compression} (expected {self.compression.payload_name})"
            )


@dataclass(frozen=True)
class Manifest:
    """What a bundle is and holds; every instance is valid (checked on construction).

    `rootfs_files` counts the payload archive's entries of every type; `rootfs_bytes` sums the sizes
    of its regular-file entries that carry data (a hardlink entry counts 0).
    """

    format: int
    product: str
    version: str
    created: str
    payload: PayloadInfo
    rootfs_files: int
    rootfs_bytes: int

    def __post_init__(self) -> None:
        if self.format not in FORMATS or isinstance(self.format, bool):
            raise Rejected(f"unsupported manifest format {self.format!r} (this recovery reads formats 1 and 2)")
        for field, value in (("product", self.product), ("version", self.version)):
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise Rejected(
                    f"malformed manifest: {field} {value!r} must be 1-128 of A-Z a-z 0-9 . _ + ~ : - "
                    "starting with a letter or digit"
                )
        if not isinstance(self.created, str):
            raise Rejected("malformed manifest: created must be an ISO 8601 time stamp")
        try:
            datetime.fromisoformat(self.created)
        except ValueError:
            raise Rejected(f"malformed manifest: created {self.created!r} is not an ISO 8601 time stamp") from None
        if not isinstance(self.payload, PayloadInfo):
            raise Rejected("malformed manifest: payload must be an object")
        if (self.payload.blocks is not None) != (self.format == 2):
            raise Rejected(f"malformed manifest: a format {self.format} payload "
                           f"{'has' if self.format == 2 else 'has no'} a block list")
        _check_count(self.rootfs_files, "rootfs.files")
        _check_count(self.rootfs_bytes, "rootfs.bytes")

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Parse manifest.json strictly: Rejected on anything malformed, unknown or duplicated."""
        if len(data) > MAX_MANIFEST:
            raise Rejected(f"malformed manifest: larger than {MAX_MANIFEST} bytes")
        top = _parse_json(data, "manifest")
        # The format decides what the rest means, so it is checked before anything else.
        if "format" not in top:
            raise Rejected("malformed manifest: no format field")
        fmt = top["format"]
        if fmt not in FORMATS or isinstance(fmt, bool):
            raise Rejected(f"unsupported manifest format {fmt!r} (this recovery reads formats 1 and 2)")
        _exact_keys(top, {"format", "product", "version", "created", "payload", "rootfs"}, "manifest")
        payload = top["payload"]
        rootfs = top["rootfs"]
        if not isinstance(payload, dict):
            raise Rejected("malformed manifest: payload must be an object")
        if not isinstance(rootfs, dict):
            raise Rejected("malformed manifest: rootfs must be an object")
        hashes = {"sha256"} if fmt == 1 else {"block_size", "blocks"}
        _exact_keys(payload, {"name", "size", "compression", *hashes}, "manifest payload")
        _exact_keys(rootfs, {"files", "bytes"}, "manifest rootfs")
        try:
            compression = Compression(payload["compression"])
        except ValueError:
            raise Rejected(
                f"malformed manifest: unknown payload compression {payload['compression']!r} "
                f"(known: {', '.join(Compression)})"
            ) from None
        if not isinstance(payload["name"], str):
            raise Rejected("malformed manifest: payload.name must be a string")
        return cls(
            format=fmt,
            product=top["product"],
            version=top["version"],
            created=top["created"],
            payload=PayloadInfo(
                name=payload["name"], size=payload["size"], sha256=payload.get("sha256"), compression=compression,
                blocks=_parse_blocks(payload) if fmt == 2 else None,
            ),
            rootfs_files=rootfs["files"],
            rootfs_bytes=rootfs["bytes"],
        )

    def to_json(self) -> bytes:
        """The exact bytes that go into the bundle and get signed."""
        payload: dict[str, Any] = {"name": self.payload.name, "size": self.payload.size}
        if self.payload.blocks is None:
            payload["sha256"] = self.payload.sha256
        payload["compression"] = str(self.payload.compression)
        if self.payload.blocks is not None:
            payload["block_size"] = self.payload.blocks.block_size
            payload["blocks"] = base64.b64encode(self.payload.blocks.digests).decode("ascii")
        doc = {
            "format": self.format,
            "product": self.product,
            "version": self.version,
            "created": self.created,
            "payload": payload,
            "rootfs": {"files": self.rootfs_files, "bytes": self.rootfs_bytes},
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    def required_bytes(self) -> int:
        """A conservative estimate of the ext4 partition size the unpacked tree needs.

        Each entry may waste up to a 4 KiB block (file tails, directory blocks, xattr blocks); on top
        of the tree, 1/16 for what mke2fs sets aside (inode tables at 256 bytes per 16 KiB, the
        journal, bitmaps) and 16 MiB so that tiny trees are not judged by percentages alone.
        """
        tree = self.rootfs_bytes + self.rootfs_files * 4096
        return tree + tree // 16 + 16 * MiB


@dataclass(frozen=True)
class Signature:
    """manifest.json.sig: which key signed the manifest, and the Ed25519 signature over its bytes."""

    keyid: str
    signature: bytes

    @classmethod
    def parse(cls, data: bytes) -> Signature:
        if len(data) > MAX_SIGNATURE:
            raise Rejected(f"malformed signature file: larger than {MAX_SIGNATURE} bytes")
        doc = _parse_json(data, "signature file")
        _exact_keys(doc, {"keyid", "signature"}, "signature file")
        kid, sig = doc["keyid"], doc["signature"]
        if not isinstance(kid, str) or not _KEYID.fullmatch(kid):
            raise Rejected("malformed signature file: keyid must be 16 lowercase hex digits")
        if not isinstance(sig, str):
            raise Rejected("malformed signature file: signature must be a base64 string")
        try:
            raw = base64.b64decode(sig.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise Rejected("malformed signature file: signature is not valid base64") from None
        if len(raw) != 64:
            raise Rejected(f"malformed signature file: an Ed25519 signature has 64 bytes, not {len(raw)}")
        return cls(kid, raw)

    def to_json(self) -> bytes:
        doc = {"keyid": self.keyid, "signature": base64.b64encode(self.signature).decode("ascii")}
        return (json.dumps(doc) + "\n").encode()


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
        if not _HEX64.fullmatch(expected_sha256):
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


# --- the outer tar -----------------------------------------------------------------------------


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


# --- small helpers -----------------------------------------------------------------------------


def _parse_json(data: bytes, what: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise Rejected(f"malformed {what}: field {key!r} appears twice")
            obj[key] = value
        return obj

    def no_constants(name: str) -> Any:
        raise Rejected(f"malformed {what}: {name} is not a JSON number")

    try:
        text = data.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except UnicodeDecodeError:
        raise Rejected(f"malformed {what}: not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise Rejected(f"malformed {what}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise Rejected(f"malformed {what}: not a JSON object")
    return doc


def _exact_keys(obj: dict[str, Any], keys: set[str], what: str) -> None:
    missing = keys - obj.keys()
    if missing:
        raise Rejected(f"malformed {what}: missing field {sorted(missing)[0]!r}")
    unknown = obj.keys() - keys
    if unknown:
        raise Rejected(f"malformed {what}: unknown field {sorted(unknown)[0]!r}")


def _parse_blocks(payload: dict[str, Any]) -> BlockDigests:
    """payload.block_size and payload.blocks (base64 of the concatenated 32-byte digests)."""
    size, text = payload["block_size"], payload["blocks"]
    if not isinstance(size, int) or isinstance(size, bool):
        raise Rejected("malformed manifest: payload.block_size must be an integer")
    if not isinstance(text, str):
        raise Rejected("malformed manifest: payload.blocks must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise Rejected("malformed manifest: payload.blocks is not valid base64") from None
    if len(raw) % DIGEST:
        raise Rejected(f"malformed manifest: payload.blocks is not a whole number of {DIGEST}-byte digests")
    return BlockDigests(size, raw)


def _check_count(value: object, field: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Rejected(f"malformed manifest: {field} must be a non-negative integer")
