"""Bundle verification: every way a bundle can be wrong is Rejected with a reason, and a good one passes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

from mkimage.bundle import create_bundle, generate_keys
from recovery.core.manifest import MAX_MANIFEST, Compression, Manifest, PayloadInfo
from recovery.core.bundle import verify_bundle
from recovery.core.errors import Rejected
from recovery.core.keys import Keyring
from recovery.core.output import MiB, Progress
from recovery.core.run import run

from .sample_tree import assemble_bundle, bundle_members, make_small_tree, sign_manifest


@pytest.fixture(scope="module")
def keyring(keys: Path) -> Keyring:
    return Keyring.load(keys)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Path:
    """A valid bundle; tests copy and damage it."""
    base = tmp_path_factory.mktemp("good")
    tree = make_small_tree(base / "tree")
    create_bundle(tree, base / "good.bundle", key=keys / "signing.pem", product="sample", version="1.0.0", check_boot=False)
    return base / "good.bundle"


def members_with_offsets(bundle: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(bundle) as tar:
        return {m.name: m for m in tar}


def damaged(good: Path, tmp_path: Path, *, flip: int | None = None, put: tuple[int, int] | None = None,
            cut: int | None = None, append: bytes = b"") -> Path:
    data = bytearray(good.read_bytes())
    if flip is not None:
        data[flip] ^= 0x01
    if put is not None:
        data[put[0]] = put[1]
    if cut is not None:
        del data[cut:]
    out = tmp_path / "damaged.bundle"
    out.write_bytes(bytes(data) + append)
    return out


def rejected(path: Path, keyring: Keyring, **kw: object) -> str:
    with pytest.raises(Rejected) as info:
        verify_bundle(path, keyring, **kw)  # type: ignore[arg-type]
    return str(info.value)


# --- the good case -----------------------------------------------------------------------------


def test_good_bundle_verifies_and_points_at_its_payload(good: Path, keyring: Keyring) -> None:
    v = verify_bundle(good, keyring, product="sample", version="1.0.0")
    assert (v.manifest.product, v.manifest.version, v.path, v.sha256) == ("sample", "1.0.0", good, None)
    assert v.keyid == next(iter(keyring.keys))
    with open(good, "rb") as f:
        f.seek(v.payload_offset)
        payload = f.read(v.manifest.payload.size)
    assert payload == bundle_members(good)["rootfs.tar.zst"]
    # a small payload is one block; its digest is the manifest's, and the extractor gets that list
    assert v.manifest.format == 2 and v.blocks == v.manifest.payload.blocks
    assert v.blocks.digests == hashlib.sha256(payload).digest()


def test_whole_file_sha256_is_computed_and_compared(good: Path, keyring: Keyring) -> None:
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    assert verify_bundle(good, keyring, compute_sha256=True).sha256 == digest
    assert verify_bundle(good, keyring, sha256=digest).sha256 == digest
    assert verify_bundle(good, keyring, sha256=digest.upper()).sha256 == digest
    wrong = hashlib.sha256(b"another file").hexdigest()
    assert rejected(good, keyring, sha256=wrong) == f"bundle sha256 mismatch: expected {wrong}, the file has {digest}"
    assert "not 64 hex digits" in rejected(good, keyring, sha256="abc")


def test_progress_counts_every_byte_of_the_file(good: Path, keyring: Keyring) -> None:
    stream = io.StringIO()
    progress = Progress(good.stat().st_size, "verifying", stream=stream)
    verify_bundle(good, keyring, progress=progress, compute_sha256=True)
    assert progress.done == good.stat().st_size
    assert stream.getvalue().splitlines()[-1].startswith("verifying 100% ")


def test_a_bundle_written_by_gnu_tar_with_pax_headers_verifies(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    """Our parser is strict, not narrow: GNU tar's pax output (an `x` header before every member) is fine."""
    parts = tmp_path / "parts"
    parts.mkdir()
    for name, data in bundle_members(good).items():
        (parts / name).write_bytes(data)
    out = tmp_path / "gnu.bundle"
    run(["tar", "--format=pax", "--create", "--file", out, "--directory", parts,
         "manifest.json", "manifest.json.sig", "rootfs.tar.zst"])
    assert out.read_bytes()[156:157] == b"x"
    assert verify_bundle(out, keyring).manifest == verify_bundle(good, keyring).manifest


def test_huge_member_sizes_in_pax_headers_are_understood(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    """A payload past 8 GiB needs a pax `size`; a lying one is caught by the size check, not misparsed."""
    members = bundle_members(good)
    out = tmp_path / "pax-size.bundle"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name.startswith("rootfs"):
                info.pax_headers = {"size": str(len(data))}
            tar.addfile(info, io.BytesIO(data))
    assert verify_bundle(out, keyring).manifest.payload.size == len(members["rootfs.tar.zst"])


# --- damaged bundles ---------------------------------------------------------------------------


def test_flipped_byte_in_payload(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    payload = members_with_offsets(good)["rootfs.tar.zst"]
    for where in (payload.offset_data, payload.offset_data + payload.size // 2, payload.offset_data + payload.size - 1):
        assert rejected(damaged(good, tmp_path, flip=where), keyring).startswith("payload sha256 mismatch")


def test_flipped_byte_in_manifest(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    manifest = members_with_offsets(good)["manifest.json"]
    reason = rejected(damaged(good, tmp_path, flip=manifest.offset_data + 20), keyring)
    assert reason.startswith("bad signature")


def test_flipped_byte_in_signature(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    sig = members_with_offsets(good)["manifest.json.sig"]
    text = bundle_members(good)["manifest.json.sig"]
    at = sig.offset_data + text.index(b'"signature": "') + 20
    other = ord("A") if good.read_bytes()[at] != ord("A") else ord("B")  # still base64, another signature
    assert rejected(damaged(good, tmp_path, put=(at, other)), keyring).startswith("bad signature")
    assert "not valid base64" in rejected(damaged(good, tmp_path, put=(at, ord("*"))), keyring)
    # Another valid keyid (one hex digit changed) names a key nobody trusts; a non-hex one is malformed.
    at = sig.offset_data + text.index(b'"keyid": "') + len(b'"keyid": "')
    other = ord("0") if good.read_bytes()[at] != ord("0") else ord("1")
    assert rejected(damaged(good, tmp_path, put=(at, other)), keyring).startswith("signed by unknown key")
    assert "keyid must be 16 lowercase hex digits" in rejected(damaged(good, tmp_path, put=(at, ord("G"))), keyring)


def test_flipped_byte_in_a_header_or_padding(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    assert "not a tar file" in rejected(damaged(good, tmp_path, flip=0), keyring)
    sig = members_with_offsets(good)["manifest.json.sig"]
    assert "checksum mismatch" in rejected(damaged(good, tmp_path, flip=sig.offset + 10), keyring)
    assert "not zeros" in rejected(damaged(good, tmp_path, flip=sig.offset_data + sig.size + 3), keyring)


def test_unknown_key(good: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate_keys(other)
    reason = rejected(good, Keyring.load(other))
    kid = json.loads(bundle_members(good)["manifest.json.sig"])["keyid"]
    assert reason.startswith(f"signed by unknown key {kid}")


@pytest.mark.parametrize("where", ["header1", "manifest", "header3", "payload", "padding", "trailer"])
def test_truncated(good: Path, keyring: Keyring, tmp_path: Path, where: str) -> None:
    m = members_with_offsets(good)
    payload = m["rootfs.tar.zst"]
    cut = {
        "header1": 300,
        "manifest": m["manifest.json"].offset_data + 10,
        "header3": payload.offset + 100,
        "payload": payload.offset_data + payload.size // 2,
        "padding": payload.offset_data + payload.size + (1 if payload.size % 512 < 511 else 0),
        "trailer": (payload.offset_data + payload.size + 511) // 512 * 512 + 512,
    }[where]
    reason = rejected(damaged(good, tmp_path, cut=cut), keyring)
    assert reason.startswith("truncated: ") or (where == "header1" and "not a tar file" in reason), reason


def test_appended_junk(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    reason = rejected(damaged(good, tmp_path, append=b"junk"), keyring)
    assert "junk after the end of the archive" in reason or "stray bytes" in reason
    assert "junk after the end of the archive" in rejected(damaged(good, tmp_path, append=b"J" * 512), keyring)
    # Zeros beyond any sane record size are junk too, even though they are zeros.
    assert "after the end of the archive" in rejected(damaged(good, tmp_path, append=bytes(2 * MiB)), keyring)
    # A few more zero blocks are just a larger tar record: fine.
    verify_bundle(damaged(good, tmp_path, append=bytes(4096)), keyring)


def test_wrong_member_order(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    m = bundle_members(good)
    out = assemble_bundle(tmp_path / "order.bundle", [
        ("manifest.json.sig", m["manifest.json.sig"]), ("manifest.json", m["manifest.json"]),
        ("rootfs.tar.zst", m["rootfs.tar.zst"]),
    ])
    assert rejected(out, keyring) == "not a bundle: the first member is 'manifest.json.sig', expected manifest.json"


@pytest.mark.parametrize("name", ["./manifest.json", "Manifest.json", "dir/manifest.json"])
def test_wrong_member_name(good: Path, keyring: Keyring, tmp_path: Path, name: str) -> None:
    m = bundle_members(good)
    out = assemble_bundle(tmp_path / "name.bundle", [(name, m["manifest.json"]), *list(m.items())[1:]])
    assert rejected(out, keyring) == f"not a bundle: the first member is {name!r}, expected manifest.json"


def test_payload_member_must_have_the_manifest_name(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    m = bundle_members(good)
    out = assemble_bundle(tmp_path / "p.bundle", [*list(m.items())[:2], ("rootfs.tar.xz", m["rootfs.tar.zst"])])
    assert "the third member is 'rootfs.tar.xz', the manifest names the payload rootfs.tar.zst" in rejected(out, keyring)


def test_extra_member(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    out = assemble_bundle(tmp_path / "extra.bundle", [*bundle_members(good).items(), ("extra.txt", b"hi")])
    assert rejected(out, keyring) == "not a bundle: an extra member 'extra.txt' follows the payload"


def test_missing_member(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    out = assemble_bundle(tmp_path / "two.bundle", list(bundle_members(good).items())[:2])
    assert "the archive ends before member 3" in rejected(out, keyring)


def test_members_must_be_regular_files(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    out = tmp_path / "link.bundle"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    assert "member manifest.json is not a regular file" in rejected(out, keyring)


def test_gnu_format_outer_tar_is_not_a_bundle(good: Path, keyring: Keyring, tmp_path: Path) -> None:
    out = assemble_bundle(tmp_path / "gnu.bundle", list(bundle_members(good).items()), tar_format=tarfile.GNU_FORMAT)
    assert "not in POSIX ustar/pax format" in rejected(out, keyring)


def test_oversized_manifest_and_signature(good: Path, keyring: Keyring, tmp_path: Path, keys: Path) -> None:
    m = bundle_members(good)
    big = m["manifest.json"] + b" " * MAX_MANIFEST
    out = assemble_bundle(tmp_path / "big.bundle", [("manifest.json", big), *list(m.items())[1:]])
    assert f"manifest.json is {len(big)} bytes, at most {MAX_MANIFEST}" in rejected(out, keyring)
    out = assemble_bundle(tmp_path / "bigsig.bundle", [
        ("manifest.json", m["manifest.json"]), ("manifest.json.sig", b" " * 5000), ("rootfs.tar.zst", m["rootfs.tar.zst"]),
    ])
    assert "at most 4096" in rejected(out, keyring)


def test_not_a_tar_at_all(keyring: Keyring, tmp_path: Path) -> None:
    text = tmp_path / "text.bundle"
    text.write_bytes(b"#!/bin/sh\necho this is a script, not a bundle\n" * 40)
    assert rejected(text, keyring) == "not a bundle: not a tar file (no valid tar header at the start)"
    short = tmp_path / "short.bundle"
    short.write_bytes(b"tiny")
    assert "not a tar file" in rejected(short, keyring)
    zeros = tmp_path / "zeros.bundle"
    zeros.write_bytes(bytes(10240))
    assert rejected(zeros, keyring) == "not a bundle: an empty tar archive"


def test_empty_missing_and_directory(keyring: Keyring, tmp_path: Path) -> None:
    (tmp_path / "empty.bundle").write_bytes(b"")
    assert rejected(tmp_path / "empty.bundle", keyring).endswith("is empty")
    assert rejected(tmp_path / "missing.bundle", keyring).startswith("cannot open bundle")
    assert rejected(tmp_path, keyring) == f"not a bundle: {tmp_path} is not a regular file"
    os.mkfifo(tmp_path / "fifo.bundle")
    assert rejected(tmp_path / "fifo.bundle", keyring).endswith("is not a regular file")  # and does not hang


# --- signed but wrong --------------------------------------------------------------------------


def resigned(good: Path, keys: Path, tmp_path: Path, manifest: bytes, payload: bytes | None = None,
             payload_name: str = "rootfs.tar.zst") -> Path:
    m = bundle_members(good)
    return assemble_bundle(tmp_path / "resigned.bundle", [
        ("manifest.json", manifest), ("manifest.json.sig", sign_manifest(manifest, keys / "signing.pem")),
        (payload_name, m["rootfs.tar.zst"] if payload is None else payload),
    ])


def good_manifest(good: Path) -> Manifest:
    return Manifest.parse(bundle_members(good)["manifest.json"])


def test_wrong_product_and_version(good: Path, keyring: Keyring) -> None:
    assert rejected(good, keyring, product="other") == "wrong product: the bundle is for sample, this system is other"
    assert rejected(good, keyring, version="1.0.1") == "wrong version: the bundle carries 1.0.0, expected 1.0.1"
    assert rejected(good, keyring, version="1.0") == "wrong version: the bundle carries 1.0.0, expected 1.0"


def test_too_big_for_capacity(good: Path, keyring: Keyring) -> None:
    need = good_manifest(good).required_bytes()
    verify_bundle(good, keyring, capacity=need)
    reason = rejected(good, keyring, capacity=need - 1)
    assert reason.startswith("does not fit: needs 17 MiB, system partition has 16 MiB"), reason


def test_signed_manifest_with_wrong_payload_size(good: Path, keys: Path, keyring: Keyring, tmp_path: Path) -> None:
    m = good_manifest(good)
    lying = replace(m, payload=replace(m.payload, size=m.payload.size + 1)).to_json()
    assert rejected(resigned(good, keys, tmp_path, lying), keyring).startswith("payload size mismatch")


def test_signed_manifest_with_another_payload(good: Path, keys: Path, keyring: Keyring, tmp_path: Path) -> None:
    other = b"\x28\xb5\x2f\xfd" + b"\0" * 100
    m = good_manifest(good)
    manifest = replace(m, payload=replace(m.payload, size=len(other))).to_json()
    assert rejected(resigned(good, keys, tmp_path, manifest, other), keyring).startswith("payload sha256 mismatch")


def test_signed_manifest_of_an_unknown_format(good: Path, keys: Path, keyring: Keyring, tmp_path: Path) -> None:
    doc = json.loads(good_manifest(good).to_json())
    doc["format"] = 3
    reason = rejected(resigned(good, keys, tmp_path, json.dumps(doc).encode()), keyring)
    assert reason == "unsupported manifest format 3 (this recovery reads formats 1 and 2)"


def test_signed_manifest_whose_payload_name_contradicts_compression(
    good: Path, keys: Path, keyring: Keyring, tmp_path: Path
) -> None:
    doc = json.loads(good_manifest(good).to_json())
    doc["payload"]["compression"] = "xz"
    reason = rejected(resigned(good, keys, tmp_path, json.dumps(doc).encode()), keyring)
    assert "payload name 'rootfs.tar.zst' does not match compression xz" in reason


# --- the manifest on its own -------------------------------------------------------------------


def sample_manifest() -> Manifest:
    return Manifest(
        format=1, product="demo", version="1.2.3", created="2024-05-01T12:00:00Z",
        payload=PayloadInfo("rootfs.tar.zst", 1234, "ab" * 32, Compression.zstd),
        rootfs_files=10, rootfs_bytes=5000,
    )


def test_manifest_json_round_trip_and_shape() -> None:
    m = sample_manifest()
    assert Manifest.parse(m.to_json()) == m
    assert json.loads(m.to_json()) == {
        "format": 1, "product": "demo", "version": "1.2.3", "created": "2024-05-01T12:00:00Z",
        "payload": {"name": "rootfs.tar.zst", "size": 1234, "sha256": "ab" * 32, "compression": "zstd"},
        "rootfs": {"files": 10, "bytes": 5000},
    }


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.pop("product"), "missing field 'product'"),
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
    (lambda d: d["payload"].update(size=-1), "payload.size must be a non-negative integer"),
    (lambda d: d["payload"].update(size=True), "payload.size must be a non-negative integer"),
    (lambda d: d["payload"].update(size=1.5), "payload.size must be a non-negative integer"),
    (lambda d: d["payload"].update(sha256="AB" * 32), "64 lowercase hex"),
    (lambda d: d["payload"].update(compression="lz4"), "unknown payload compression 'lz4'"),
    (lambda d: d["payload"].update(name="rootfs.tar"), "does not match compression zstd"),
    (lambda d: d["rootfs"].update(files="10"), "rootfs.files must be a non-negative integer"),
    (lambda d: d.update(product="a b"), "product 'a b' must be"),
    (lambda d: d.update(version=""), "version '' must be"),
    (lambda d: d.update(version=3), "version 3 must be"),
    (lambda d: d.update(created="yesterday"), "not an ISO 8601 time stamp"),
    (lambda d: d.update(format="1"), "unsupported manifest format '1'"),
    (lambda d: d.update(format=True), "unsupported manifest format True"),
    (lambda d: d.pop("format"), "no format field"),
    (lambda d: d.update(payload=[]), "payload must be an object"),
])
def test_manifest_parse_rejects(edit: object, reason: str) -> None:
    doc = json.loads(sample_manifest().to_json())
    edit(doc)  # type: ignore[operator]
    with pytest.raises(Rejected, match=reason.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Manifest.parse(json.dumps(doc).encode())


@pytest.mark.parametrize("data, reason", [
    (b"", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"format": 1, "format": 1}', "field 'format' appears twice"),
    (b'{"format": NaN}', "NaN is not a JSON number"),
    (b"[" * (MAX_MANIFEST // 2) + b"]" * (MAX_MANIFEST // 2 + 1), f"larger than {MAX_MANIFEST} bytes"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    (b"[" * 30000 + b"]" * 30000, "not valid JSON"),
])
def test_manifest_parse_rejects_bad_json(data: bytes, reason: str) -> None:
    with pytest.raises(Rejected, match=reason):
        Manifest.parse(data)


def test_required_bytes_is_conservative() -> None:
    m = sample_manifest()
    assert m.required_bytes() > m.rootfs_bytes + m.rootfs_files * 4096
    bigger = replace(m, rootfs_bytes=m.rootfs_bytes + 10 * MiB)
    more = replace(m, rootfs_files=m.rootfs_files + 1000)
    assert bigger.required_bytes() > m.required_bytes() + 10 * MiB
    assert more.required_bytes() >= m.required_bytes() + 1000 * 4096


# --- memory ------------------------------------------------------------------------------------


def test_memory_does_not_grow_with_the_payload(keys: Path, keyring: Keyring, tmp_path: Path) -> None:
    """A 64 MiB payload verified with both hashes: Python's peak stays at a few chunk buffers."""
    payload = tmp_path / "rootfs.tar"
    with open(payload, "wb") as f:
        for i in range(64):
            f.write(hashlib.sha256(str(i).encode()).digest() * (MiB // 32))
    manifest = Manifest(
        format=1, product="p", version="1", created="2024-01-01T00:00:00Z",
        payload=PayloadInfo("rootfs.tar", 64 * MiB, hashlib.sha256(payload.read_bytes()).hexdigest(), Compression.none),
        rootfs_files=1, rootfs_bytes=1,
    ).to_json()
    out = tmp_path / "big.bundle"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", manifest), ("manifest.json.sig", sign_manifest(manifest, keys / "signing.pem"))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(payload, "rootfs.tar")
    os.unlink(payload)
    tracemalloc.start()
    try:
        verify_bundle(out, keyring, compute_sha256=True)
        verify_bundle(out, keyring)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * MiB, f"peak {peak / MiB:.1f} MiB"
