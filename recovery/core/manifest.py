"""What a bundle says about itself: the signed manifest (formats 1 and 2, DESIGN.md "The bundle") and
the signature file beside it, parsed strictly.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from recovery.core.errors import Rejected
from recovery.core.output import MiB

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


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~:-]{0,127}")


HEX64 = re.compile(r"[0-9a-f]{64}")


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
        if self.sha256 is not None and (not isinstance(self.sha256, str) or not HEX64.fullmatch(self.sha256)):
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
