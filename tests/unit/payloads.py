"""Hand-made payloads for the extractor's tests: tar archives exactly as described (GNU tar and
create_bundle refuse to make some of them), and VerifiedBundles of a bare payload, as verify_bundle
would return them, for archives no signer of ours would make.

A helper module, not a test module: unit and VM tests both import it.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from recovery.core.manifest import BLOCK_SIZE, BlockDigests, Compression, Manifest, PayloadInfo
from recovery.core.bundle import VerifiedBundle

MTIME = 1_700_000_000


@dataclass(frozen=True)
class Entry:
    name: bytes
    kind: bytes = b"0"  # ustar typeflag: 0 file, 1 hard link, 2 symlink, 5 directory
    data: bytes = b""
    link: bytes = b""
    mode: int = 0o644
    size: int | None = None  # what the header claims, if not len(data)
    pax_path: bytes | None = None  # a pax `path` record overriding the header's name
    pax: tuple[tuple[bytes, bytes], ...] = ()  # more pax records (`size`, `SCHILY.acl.access`, …)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _header(name: bytes, kind: bytes, size: int, link: bytes = b"", mode: int = 0o644) -> bytes:
    h = bytearray(512)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(MTIME, 12)
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[157:257] = link[:100].ljust(100, b"\0")
    h[257:265] = b"ustar\x0000"
    h[265:269], h[297:301] = b"root", b"root"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pax_record(key: bytes, value: bytes) -> bytes:
    """`<length> key=value\n`, where the length counts its own digits."""
    rest = b" " + key + b"=" + value + b"\n"
    length = len(rest) + 1
    while len(str(length)) + len(rest) != length:
        length = len(str(length)) + len(rest)
    return b"%d%s" % (length, rest)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def tar(*entries: Entry, end: bool = True) -> bytes:
    """A ustar/pax archive exactly as described, with no sanity applied."""
    out = io.BytesIO()
    for e in entries:
        records = ((b"path", e.pax_path),) if e.pax_path is not None else ()
        if records or e.pax:
            body = b"".join(_pax_record(key, value) for key, value in (*records, *e.pax))
            out.write(_header(b"PaxHeaders/x", b"x", len(body)) + _pad(body))
        size = len(e.data) if e.size is None else e.size
        out.write(_header(e.name, e.kind, size, e.link, e.mode) + _pad(e.data))
    if end:
        out.write(b"\0" * 1024)
    return out.getvalue()


def tree_state(root: Path) -> dict[str, tuple[object, ...]]:
    """Every path under `root` (the root too): type and mode, owner, link count, mtime, content or link
    target, and every extended attribute (ACLs are the system.posix_acl_* ones)."""
    state: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            else:
                what = ""
            xattrs = tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False))
                                  for k in os.listxattr(path, follow_symlinks=False)))
            state[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, what, xattrs)
    return state


def raw_bundle(path: Path, payload: bytes, *, compression: Compression = Compression.none,
               files: int = 1 << 20, nbytes: int = 1 << 60, offset: int = 0) -> VerifiedBundle:
    """A VerifiedBundle for a bare payload written at `offset` of `path`, as verify_bundle would
    return it: for archives that create_bundle would refuse to make (extract_payload trusts only what
    the manifest says about the payload, so this is all it needs). The counts default to limits out of
    the way of whatever else a test wants refused; tests of the counts give their own."""
    path.write_bytes(b"\0" * offset + payload)
    blocks = block_digests(payload)
    manifest = Manifest(
        format=2, product="hostile", version="1.0", created="2024-01-01T00:00:00Z",
        payload=PayloadInfo(name=compression.payload_name, size=len(payload), sha256=None,
                            compression=compression, blocks=blocks),
        rootfs_files=files, rootfs_bytes=nbytes,
    )
    return VerifiedBundle(path=path, manifest=manifest, keyid="0" * 16, payload_offset=offset, sha256=None,
                          blocks=blocks)


def block_digests(payload: bytes, block_size: int = BLOCK_SIZE) -> BlockDigests:
    """The payload's block list, as mkimage writes it into a format-2 manifest."""
    return BlockDigests(block_size, b"".join(hashlib.sha256(payload[i : i + block_size]).digest()
                                             for i in range(0, len(payload), block_size)))


def payload_bytes(bundle: VerifiedBundle) -> bytes:
    with open(bundle.path, "rb") as f:
        f.seek(bundle.payload_offset)
        return f.read(bundle.manifest.payload.size)
