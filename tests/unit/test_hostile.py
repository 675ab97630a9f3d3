"""Hostile payloads: archives that try to write outside the target must fail with a clear reason and
leave everything outside the target exactly as it was.

The archives are hand-made tar headers (GNU tar and create_bundle refuse to make some of them), in
bundles whose payload hash is right: only the extractor stands between them and the disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from recovery.bundle import Compression
from recovery.errors import Failed
from recovery.install import extract_payload

from .test_install import raw_bundle

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


def tree_state(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under root with mode, link count, mtime and content (or link target)."""
    state = {}
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
            state[str(path)] = (st.st_mode, st.st_nlink, st.st_mtime_ns, what)
    return state


@pytest.fixture()
def arena(tmp_path: Path) -> Path:
    """tmp_path/target (empty) next to tmp_path/outside (a secret and a directory to write into)."""
    (tmp_path / "target").mkdir()
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_text("do not touch")
    return tmp_path


def extract_hostile(arena: Path, payload: bytes, compression: Compression = Compression.none) -> Failed:
    """Extract `payload` into arena/target; return the Failed, after checking nothing outside changed."""
    if compression == Compression.zstd:
        payload = subprocess.run(["zstd", "-q", "-c"], input=payload, capture_output=True, check=True).stdout
    bundle = raw_bundle(arena / "hostile.bundle", payload, compression=compression, offset=1536)
    outside_before = tree_state(arena / "outside")
    threads_before = threading.active_count()
    cwd = os.getcwd()
    with pytest.raises(Failed) as info:
        extract_payload(bundle, arena / "target")
    assert tree_state(arena / "outside") == outside_before
    assert sorted(p.name for p in arena.iterdir()) == ["hostile.bundle", "outside", "target"]
    assert os.getcwd() == cwd
    assert threading.active_count() == threads_before  # the decompressor thread has ended
    message = str(info.value)
    assert "\n" not in message
    return info.value


@pytest.fixture(params=[Compression.none, Compression.zstd])
def compression(request: pytest.FixtureRequest) -> Compression:
    return request.param


def test_absolute_path(arena: Path, compression: Compression) -> None:
    evil = os.fsencode(arena / "outside/dir/evil")
    e = extract_hostile(arena, tar(Entry(b"ok", data=b"fine"), Entry(evil, data=b"pwned")), compression)
    assert str(e) == f"Failed to extract {os.fsdecode(evil)}: absolute path"


@pytest.mark.parametrize("name", [b"../outside/dir/evil", b"./../outside/dir/evil", b"a/../../outside/dir/evil"])
def test_dotdot_path(arena: Path, name: bytes, compression: Compression) -> None:
    e = extract_hostile(arena, tar(Entry(b"a/", b"5"), Entry(name, data=b"pwned")), compression)
    assert str(e) == f"Failed to extract {name.decode()}: '..' in path"


def test_dotdot_in_pax_path(arena: Path) -> None:
    """The pax `path` record wins over the harmless ustar name."""
    e = extract_hostile(arena, tar(Entry(b"harmless", data=b"pwned", pax_path=b"../outside/dir/evil")))
    assert str(e) == "Failed to extract ../outside/dir/evil: '..' in path"


@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_write_through_symlink(arena: Path, target: str, compression: Compression) -> None:
    link = os.fsencode(arena / "outside/dir") if target == "absolute" else b"../outside/dir"
    e = extract_hostile(arena, tar(Entry(b"link", b"2", link=link), Entry(b"link/evil", data=b"pwned")), compression)
    assert str(e).startswith("Failed to extract link/evil: ")
    assert "symlink" in str(e).lower()


def test_symlink_through_symlink(arena: Path) -> None:
    e = extract_hostile(arena, tar(
        Entry(b"link", b"2", link=os.fsencode(arena / "outside")),
        Entry(b"link/secret", b"2", link=b"/etc/passwd"),
    ))
    assert str(e).startswith("Failed to extract link/secret: ")


def test_hardlink_to_outside(arena: Path, compression: Compression) -> None:
    e = extract_hostile(arena, tar(Entry(b"h", b"1", link=b"../outside/secret")), compression)
    assert str(e) == "Failed to extract h: hard link to ../outside/secret: '..' in path"
    e = extract_hostile(arena, tar(Entry(b"h", b"1", link=os.fsencode(arena / "outside/secret"))), compression)
    assert str(e).endswith(": absolute path") and "hard link to" in str(e)


def test_hardlink_through_symlink(arena: Path, compression: Compression) -> None:
    """A link to outside/secret made via a symlinked directory, then data written into it."""
    e = extract_hostile(arena, tar(
        Entry(b"link", b"2", link=os.fsencode(arena / "outside")),
        Entry(b"h", b"1", link=b"link/secret"),
        Entry(b"h", data=b"pwned"),
    ), compression)
    assert str(e).startswith("Failed to extract h: ")
    assert not (arena / "target/h").exists()


def test_directory_replaced_by_symlink(arena: Path, compression: Compression) -> None:
    e = extract_hostile(arena, tar(
        Entry(b"d/", b"5", mode=0o755),
        Entry(b"d", b"2", link=os.fsencode(arena / "outside/dir")),
        Entry(b"d/evil", data=b"pwned"),
    ), compression)
    assert str(e) == "Failed to extract d: duplicate entry, the path exists already"


def test_duplicate_file(arena: Path) -> None:
    e = extract_hostile(arena, tar(Entry(b"etc/passwd", data=b"verified"), Entry(b"etc/passwd", data=b"swapped")))
    assert str(e) == "Failed to extract etc/passwd: duplicate entry, the path exists already"
    assert (arena / "target/etc/passwd").read_bytes() == b"verified"


def test_directory_twice_is_fine(arena: Path) -> None:
    payload = tar(Entry(b"d/", b"5", mode=0o755), Entry(b"d/f", data=b"x"), Entry(b"d/", b"5", mode=0o700))
    bundle = raw_bundle(arena / "ok.bundle", payload, files=3, nbytes=1)
    assert extract_payload(bundle, arena / "target").files == 3
    assert (arena / "target/d/f").read_bytes() == b"x"


def test_huge_claimed_size_with_truncated_data(arena: Path, compression: Compression) -> None:
    archive = tar(Entry(b"big", data=b"x" * 1000, size=10 << 30), end=False)
    e = extract_hostile(arena, archive, compression)
    assert str(e).startswith("Failed to extract big: ")
    assert "runcated" in str(e)


def test_garbage_payload(arena: Path, compression: Compression) -> None:
    e = extract_hostile(arena, os.urandom(3000), compression)
    assert str(e) == "Failed to read the payload: Unrecognized archive format"

