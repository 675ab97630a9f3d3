"""hostile archives: enormous sizes, and generated archives of escaping names and links.

Completes test_hostile.py's hand-made corpus: sizes no disk holds (pax and base-256 size fields, a
sparse file claiming a petabyte), then Hypothesis-built archives mixing traversal, absolute paths,
symlinks and hard links that point out, duplicates and a directory turned into a symlink. Whatever
the archive, nothing outside the target changes and the answer is success or `Failed`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recovery.core.errors import Failed
from recovery.os.extract import extract_payload

from .payloads import Entry, _header, _pad, _pax_record, raw_bundle, tar, tree_state
from .test_hostile import arena, extract_hostile  # noqa: F401  (a fixture and its helper)


def _pax(records: bytes, entry: bytes) -> bytes:
    return _header(b"PaxHeaders/x", b"x", len(records)) + _pad(records) + entry


@pytest.mark.parametrize("size", [b"99999999999999999999999999999", b"18446744073709551616", b"-1", b"12x"])
def test_enormous_or_bogus_pax_size(arena: Path, size: bytes) -> None:
    archive = _pax(_pax_record(b"size", size), _header(b"big", b"0", 5) + _pad(b"hello")) + b"\0" * 1024
    e = extract_hostile(arena, archive)
    assert "big" in str(e) or "payload" in str(e)


def test_enormous_base256_size(arena: Path) -> None:
    header = bytearray(_header(b"big", b"0", 0))
    header[124:136] = b"\x80" + b"\x7f" + b"\xff" * 10  # GNU base-256: about 2**87 bytes
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    e = extract_hostile(arena, bytes(header) + b"\0" * 4096)
    assert str(e).startswith("Failed to")


def test_sparse_file_claiming_a_petabyte(arena: Path) -> None:
    """GNU sparse 1.0 in pax: a tiny map whose real size no file system holds."""
    sparse_map = _pad(b"1\n0\n5\n") + b"hello"
    records = (_pax_record(b"GNU.sparse.major", b"1") + _pax_record(b"GNU.sparse.minor", b"0")
               + _pax_record(b"GNU.sparse.name", b"huge") + _pax_record(b"GNU.sparse.realsize", b"%d" % 10**15))
    archive = _pax(records, _header(b"GNUSparseFile.0/huge", b"0", len(sparse_map)) + _pad(sparse_map))
    archive += b"\0" * 1024
    bundle = raw_bundle(arena / "hostile.bundle", archive, files=1, nbytes=5)
    before = tree_state(arena / "outside")
    try:
        extract_payload(bundle, arena / "target")
    except Failed as e:
        assert "\n" not in str(e)
    else:  # a sparse file may be made if the file system allows its size: inside the target only
        assert (arena / "target/huge").stat().st_blocks * 512 < 1 << 20
    assert tree_state(arena / "outside") == before


NAMES = [b"a", b"a/b", b"d", b"d/x", b"../outside/dir/evil", b"a/../../outside/secret", b"./a", b"a//b",
         b"", b".", b"..", b"link", b"link/evil", b"d/../..", b"\xff", b"a\nb"]
LINK_TARGETS = [b"a", b"d", b"..", b"../outside", b"../outside/secret", b"/", b"/etc/passwd", b"link",
                b"d/x", b"../../", b"outside"]

entries = st.builds(
    Entry,
    name=st.sampled_from(NAMES) | st.binary(min_size=1, max_size=12),
    kind=st.sampled_from([b"0", b"1", b"2", b"5", b"3", b"6", b"7", b"\0"]),
    data=st.sampled_from([b"", b"pwned", b"x" * 700]),
    link=st.sampled_from(LINK_TARGETS),
    mode=st.sampled_from([0o644, 0o755, 0o4755, 0o7777, 0o000]),
    pax_path=st.none() | st.sampled_from(NAMES),
)


@given(st.lists(entries, min_size=1, max_size=8))
def test_generated_archives_never_touch_the_outside(archive_entries: list[Entry]) -> None:
    with tempfile.TemporaryDirectory() as t:
        root = Path(t)
        (root / "target").mkdir()
        (root / "outside/dir").mkdir(parents=True)
        (root / "outside/secret").write_text("do not touch")
        before = tree_state(root / "outside")
        bundle = raw_bundle(root / "hostile.bundle", tar(*archive_entries), files=len(archive_entries))
        cwd = os.getcwd()
        try:
            extract_payload(bundle, root / "target")
        except Failed as e:
            assert "\n" not in str(e)
        assert os.getcwd() == cwd
        assert tree_state(root / "outside") == before
        assert sorted(p.name for p in root.iterdir()) == ["hostile.bundle", "outside", "target"]
        for path in (root / "target").rglob("*"):
            if path.is_symlink():
                continue
            assert path.resolve().is_relative_to((root / "target").resolve()), path
        shutil.rmtree(root / "target", ignore_errors=True)
