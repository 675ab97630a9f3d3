"""Hostile payloads: archives that try to write outside the target must fail with a clear reason and
leave everything outside the target exactly as it was.

The archives are hand-made tar headers (GNU tar and create_bundle refuse to make some of them), in
bundles whose payload hash is right: only the extractor stands between them and the disk.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from recovery.core.manifest import Compression
from recovery.core.errors import Failed
from recovery.os.extract import extract_payload

from .payloads import Entry, raw_bundle, tar, tree_state

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

