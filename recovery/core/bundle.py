"""Verifying a bundle file in full, streamed in constant memory, read once front to back.

A bundle is an uncompressed pax tar of exactly `manifest.json`, `manifest.json.sig` and the payload
`rootfs.tar.<ext>`, in that order (DESIGN.md, "The bundle"). The outer tar is parsed here by hand,
strictly, so that nothing the signature does not cover can hide in it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

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
from recovery.core.outertar import (
    Reader,
    check_bound,
    read_header,
    read_padding,
    read_trailer,
)
from recovery.core.output import MiB, Progress


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
        reader = Reader(f, whole, progress)
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
    reader: Reader, path: Path, file_size: int, keyring: Keyring,
    product: str | None, version: str | None, capacity: int | None,
) -> VerifiedBundle:
    manifest_member = read_header(reader, 1, MANIFEST_NAME)
    check_bound(manifest_member, MAX_MANIFEST)
    manifest_bytes = reader.read(manifest_member.size, f"member {MANIFEST_NAME}")
    read_padding(reader, manifest_member)

    signature_member = read_header(reader, 2, SIGNATURE_NAME)
    check_bound(signature_member, MAX_SIGNATURE)
    signature = Signature.parse(reader.read(signature_member.size, f"member {SIGNATURE_NAME}"))
    read_padding(reader, signature_member)

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

    payload_member = read_header(reader, 3, manifest.payload.name)
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
    read_padding(reader, payload_member)
    read_trailer(reader)
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


