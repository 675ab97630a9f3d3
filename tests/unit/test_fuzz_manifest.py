"""manifest parser (`Manifest.parse`) on arbitrary bytes, arbitrary JSON and mutated manifests.

Whatever it is given, the answer is a Manifest that writes back to itself, or `Rejected` with a one-line
reason; never another exception, never a hang.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from recovery.core.manifest import BlockDigests, Compression, Manifest, PayloadInfo
from recovery.core.errors import Rejected

VALID = Manifest(
    format=1, product="demo-appliance", version="2.0.0", created="2026-01-02T03:04:05Z",
    payload=PayloadInfo(name="rootfs.tar.zst", size=12345, sha256="ab" * 32, compression=Compression.zstd),
    rootfs_files=7, rootfs_bytes=4096,
)
# format 2: a block list instead of one sha256 (12345 bytes in 64 KiB blocks: one digest)
VALID2 = Manifest(
    format=2, product="demo-appliance", version="2.0.0", created="2026-01-02T03:04:05Z",
    payload=PayloadInfo(name="rootfs.tar.zst", size=12345, sha256=None, compression=Compression.zstd,
                        blocks=BlockDigests(65536, bytes(range(32)))),
    rootfs_files=7, rootfs_bytes=4096,
)
DOC: dict[str, Any] = json.loads(VALID.to_json())
DOC2: dict[str, Any] = json.loads(VALID2.to_json())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# values that sit on the edges of what a field may hold
edgy = st.sampled_from([
    0, -1, 1, 2**63, 2**64, 10**30, -(10**30), 1.5, True, False, None, "", "1", "2.0.0", "../x", "a/b", "\x00",
    "zstd", "xz", "ZSTD", "ab" * 32, "AB" * 32, "g" * 64, "2026-01-02T03:04:05Z", "yesterday", [], {},
    65536, 65537, 1 << 20, 1 << 25, "AAAA", "A" * 43 + "=", DOC2["payload"]["blocks"] * 2, "not base64!",
])


def check(data: bytes) -> None:
    try:
        manifest = Manifest.parse(data)
    except Rejected as e:
        assert str(e) and "\n" not in str(e)
        return
    assert Manifest.parse(manifest.to_json()) == manifest


def paths(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in doc.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += paths(value, (*prefix, key))
    return out


FIELDS = sorted(set(paths(DOC)) | set(paths(DOC2)))


@given(st.binary(max_size=2048))
@example(b"")
@example(b"{}")
@example(b'{"format": 1, "format": 1}')
@example(VALID.to_json() + b"x")
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    check(json.dumps(value).encode())


@given(st.sampled_from([DOC, DOC2]),
       st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(["set", "drop", "add"]), edgy | json_values),
                min_size=1, max_size=4))
def test_mutated_manifests(base: dict[str, Any], changes: list[tuple[tuple[str, ...], str, Any]]) -> None:
    doc = json.loads(json.dumps(base))
    for path, kind, value in changes:
        node = doc
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if kind == "set":
            node[path[-1]] = value
        elif kind == "drop":
            node.pop(path[-1], None)
        else:
            node[path[-1] + "_extra"] = value
    check(json.dumps(doc).encode())


def test_the_valid_manifest_parses() -> None:
    """So the mutations start from something the parser accepts."""
    assert Manifest.parse(VALID.to_json()) == VALID
    assert Manifest.parse(VALID2.to_json()) == VALID2
