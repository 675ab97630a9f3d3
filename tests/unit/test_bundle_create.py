"""Bundle creation: round trips for each compression and for tar input, and the metadata surviving them.

GNU tar is the reference: it extracts each payload, and the extracted tree must equal the source tree
in everything `sample_tree.snapshot` sees (owners, modes, xattrs, ACLs, links, devices, sparseness).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from mkimage.bundle import create_bundle
from recovery.core.manifest import Compression, Manifest
from recovery.core.bundle import VerifiedBundle, verify_bundle
from recovery.core.errors import Rejected
from recovery.core.keys import Keyring
from recovery.core.run import run

from .sample_tree import SAMPLE_NON_UTF8, bundle_members, make_small_tree, snapshot

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the sample tree has device nodes, foreign owners, security.capability"
)

GNU_TAR_EXTRACT = ["tar", "--extract", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner",
                   "--same-permissions", "--same-owner"]


@pytest.fixture(scope="module")
def tree(sample: Path) -> Path:
    return sample


def extract_payload_with_gnu_tar(bundle: VerifiedBundle, into: Path) -> Path:
    """Cut the payload out at the verified offset and let GNU tar (auto-detecting the compression) unpack it."""
    payload = into.parent / bundle.manifest.payload.name
    with open(bundle.path, "rb") as src, open(payload, "wb") as dst:
        src.seek(bundle.payload_offset)
        dst.write(src.read(bundle.manifest.payload.size))
    into.mkdir()
    run([*GNU_TAR_EXTRACT, "--file", payload, "--directory", into])
    return into


def independent_counts(bundle: VerifiedBundle, scratch: Path) -> tuple[int, int]:
    """Entries and data bytes as Python's tarfile sees the payload (decompressed by the real tools)."""
    payload = scratch / "payload.tar"
    with open(bundle.path, "rb") as src:
        src.seek(bundle.payload_offset)
        packed = src.read(bundle.manifest.payload.size)
    tool = {Compression.zstd: ["zstd", "-dc"], Compression.xz: ["xz", "-dc"], Compression.gzip: ["gzip", "-dc"]}
    comp = bundle.manifest.payload.compression
    payload.write_bytes(run(tool[comp], input=packed).stdout if comp in tool else packed)
    with tarfile.open(payload) as tar:
        members = tar.getmembers()
    return len(members), sum(m.size for m in members if m.isreg())


@needs_root
@pytest.mark.parametrize("compression", list(Compression))
def test_directory_round_trip_keeps_everything(
    tree: Path, keys: Path, tmp_path: Path, compression: Compression
) -> None:
    out = tmp_path / "sample.bundle"
    made = create_bundle(tree, out, key=keys / "signing.pem", product="sample", version="2.0.0",
                         compression=compression, check_boot=False)
    verified = verify_bundle(out, Keyring.load(keys), product="sample", version="2.0.0", compute_sha256=True)

    assert verified.manifest == made
    assert made.payload.compression == compression
    assert made.payload.name == "rootfs" + {"zstd": ".tar.zst", "xz": ".tar.xz", "gzip": ".tar.gz", "none": ".tar"}[compression]
    assert verified.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert list(bundle_members(out)) == ["manifest.json", "manifest.json.sig", made.payload.name]
    assert json.loads(bundle_members(out)["manifest.json"])["rootfs"] == {
        "files": made.rootfs_files, "bytes": made.rootfs_bytes,
    }
    assert (made.rootfs_files, made.rootfs_bytes) == independent_counts(verified, tmp_path)
    assert made.rootfs_files == len(snapshot(tree))  # every entry, the root directory included

    extracted = extract_payload_with_gnu_tar(verified, tmp_path / "extracted")
    assert snapshot(extracted) == snapshot(tree)


@needs_root
def test_payload_metadata_is_what_gnu_tar_lists(tree: Path, keys: Path, tmp_path: Path) -> None:
    """Spot checks in GNU tar's own listing, so a failure says which kind of metadata went missing."""
    out = tmp_path / "sample.bundle"
    create_bundle(tree, out, key=keys / "signing.pem", product="sample", version="2.0.0", compression="none", check_boot=False)
    verified = verify_bundle(out, Keyring.load(keys))
    payload = tmp_path / "rootfs.tar"
    payload.write_bytes(bundle_members(out)["rootfs.tar"])
    listing = run(["tar", "--list", "--verbose", "--numeric-owner", "--file", payload]).stdout.decode(errors="replace")
    lines = {}
    for line in listing.splitlines():
        rest = line.split(maxsplit=5)[5]  # after mode, owner, size (or major,minor), date, time
        lines[rest.split(" -> ")[0].split(" link to ")[0]] = line
    assert lines["./usr/bin/su"].startswith("-rwsr-xr-x 0/0 ")
    assert lines["./usr/bin/wall"].startswith("-rwxr-sr-x 0/5678 ")
    assert lines["./tmp/"].startswith("drwxrwxrwt ")
    assert lines["./home/user/notes.txt"].startswith("-rw------- 1234/5678 ")
    assert lines["./dev/null"].startswith("crw-rw---- 0/0 ") and " 1,3 " in lines["./dev/null"]
    assert lines["./dev/loop0"].startswith("brw-rw---- 0/0 ") and " 7,0 " in lines["./dev/loop0"]
    assert lines["./run/initctl"].startswith("prw------- ")
    assert "link to ./usr/bin/gunzip" in lines["./usr/bin/gzip"] or "link to ./usr/bin/gzip" in lines["./usr/bin/gunzip"]
    assert lines["./bin"].endswith("./bin -> usr/bin")
    assert lines["./etc/localtime"].endswith("-> /usr/share/zoneinfo/UTC")
    with tarfile.open(payload, encoding="utf-8", errors="surrogateescape") as tar:
        members = {m.name: m for m in tar}
    assert members["./usr/bin/ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert members["./etc/motd"].pax_headers["SCHILY.xattr.user.comment"] == "greeting for the operator"
    assert "user:1234:rwx" in members["./etc/shared.conf"].pax_headers["SCHILY.acl.access"]
    assert "group:5678:r-x" in members["./srv/shared"].pax_headers["SCHILY.acl.default"]
    assert members["./var/lib/disk.img"].pax_headers["GNU.sparse.realsize"] == str(8 * 1024 * 1024)
    assert "./" + os.fsdecode(SAMPLE_NON_UTF8) in members
    assert verified.manifest.rootfs_files == len(members)


@needs_root
@pytest.mark.parametrize("tar_argv, compression", [
    (["tar", "--format=gnu", "--gzip"], "xz"),  # GNU format, compressed, re-encoded as pax
    (["tar", "--format=pax", "--zstd"], "zstd"),
    (["tar", "--format=pax"], "none"),
])
def test_tar_input_round_trip_keeps_everything(
    tree: Path, keys: Path, tmp_path: Path, tar_argv: list[str], compression: str
) -> None:
    source = tmp_path / "source.tar"
    run([*tar_argv, "--create", "--file", source, "--xattrs", "--xattrs-include=*",
         "--xattrs-exclude=system.posix_acl_*", "--acls", "--sparse", "--numeric-owner", "--directory", tree, "."])
    out = tmp_path / "from-tar.bundle"
    made = create_bundle(source, out, key=keys / "signing.pem", product="sample", version="2.0.0",
                         compression=compression, check_boot=False)
    verified = verify_bundle(out, Keyring.load(keys), product="sample")
    assert verified.manifest == made
    assert (made.rootfs_files, made.rootfs_bytes) == independent_counts(verified, tmp_path)

    extracted = extract_payload_with_gnu_tar(verified, tmp_path / "extracted")
    want = snapshot(tree)
    got = snapshot(extracted)
    if "--format=gnu" in tar_argv:
        # The GNU format cannot carry ACLs or xattrs, nor nanoseconds: what it had must survive.
        for entry in (*want.values(), *got.values()):
            entry.pop("acl", None)
            entry.pop("xattrs", None)
            entry["mtime_ns"] = int(entry["mtime_ns"]) // 10**9  # type: ignore[call-overload]
    assert got == want


def test_tar_input_written_by_python_with_hardlinks(keys: Path, tmp_path: Path) -> None:
    """A tar not from GNU tar, with a hardlink: counted as an entry with no data bytes."""
    source = tmp_path / "py.tar"
    with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/a", b"A" * 1000), ("etc/b", b"B" * 24)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("etc/hard")
        link.type, link.linkname = tarfile.LNKTYPE, "etc/a"
        tar.addfile(link)
    made = create_bundle(source, tmp_path / "b.bundle", key=keys / "signing.pem", product="p", version="1", check_boot=False)
    assert (made.rootfs_files, made.rootfs_bytes) == (3, 1024)
    verify_bundle(tmp_path / "b.bundle", Keyring.load(keys))


def test_small_tree_bundle_needs_no_root(keys: Path, tmp_path: Path) -> None:
    tree = make_small_tree(tmp_path / "tree")
    made = create_bundle(tree, tmp_path / "s.bundle", key=keys / "signing.pem", product="p", version="1.0", check_boot=False)
    assert made.rootfs_files == 7  # ., bin, etc, etc/os-release, usr, usr/bin, usr/bin/tool
    assert made.rootfs_bytes == (tree / "etc/os-release").stat().st_size + (tree / "usr/bin/tool").stat().st_size
    assert verify_bundle(tmp_path / "s.bundle", Keyring.load(keys)).manifest == made


def test_output_is_replaced_atomically_and_no_temp_files_stay(keys: Path, tmp_path: Path) -> None:
    tree = make_small_tree(tmp_path / "tree")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.bundle"
    out.write_bytes(b"the previous bundle")
    with pytest.raises(Rejected):
        create_bundle(tmp_path / "missing", out, key=keys / "signing.pem", product="p", version="1", check_boot=False)
    with pytest.raises(Rejected, match="product"):
        create_bundle(tree, out, key=keys / "signing.pem", product="bad name", version="1", check_boot=False)
    (tmp_path / "not-a-tar").write_bytes(b"hello, this is not a tar archive at all" * 100)
    with pytest.raises(Rejected, match="cannot read .* as a tar archive"):
        create_bundle(tmp_path / "not-a-tar", out, key=keys / "signing.pem", product="p", version="1", check_boot=False)
    assert out.read_bytes() == b"the previous bundle"
    assert sorted(p.name for p in out_dir.iterdir()) == ["x.bundle"]

    create_bundle(tree, out, key=keys / "signing.pem", product="p", version="1", check_boot=False)
    assert sorted(p.name for p in out_dir.iterdir()) == ["x.bundle"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    verify_bundle(out, Keyring.load(keys))


def test_tar_input_with_names_outside_the_tree_is_refused(keys: Path, tmp_path: Path) -> None:
    for bad in ("../escape", "/etc/passwd", "a/../../b"):
        source = tmp_path / "bad.tar"
        with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(bad)
            tar.addfile(info, io.BytesIO(b""))
        with pytest.raises(Rejected, match="outside the tree"):
            create_bundle(source, tmp_path / "b.bundle", key=keys / "signing.pem", product="p", version="1", check_boot=False)
        assert not (tmp_path / "b.bundle").exists()


def test_tar_input_with_a_name_no_file_system_takes_is_refused(keys: Path, tmp_path: Path) -> None:
    # 256 bytes in one name: ext4 would refuse it during the extraction, after the erase.
    source = tmp_path / "long.tar"
    with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("etc/ok"), io.BytesIO(b""))
        tar.addfile(tarfile.TarInfo("etc/" + "é" * 128), io.BytesIO(b""))  # 128 characters, 256 bytes
    with pytest.raises(Rejected, match="has a name longer than 255 bytes"):
        create_bundle(source, tmp_path / "b.bundle", key=keys / "signing.pem", product="p", version="1", check_boot=False)
    assert not (tmp_path / "b.bundle").exists()
    # 255 bytes is fine
    with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("etc/" + "é" * 127 + "x"), io.BytesIO(b""))
    create_bundle(source, tmp_path / "b.bundle", key=keys / "signing.pem", product="p", version="1", check_boot=False)


def test_manifest_created_follows_source_date_epoch(keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    tree = make_small_tree(tmp_path / "tree")
    made = create_bundle(tree, tmp_path / "a.bundle", key=keys / "signing.pem", product="p", version="1", check_boot=False)
    assert made.created == "2023-11-14T22:13:20Z"
    assert Manifest.parse(made.to_json()) == made


def test_empty_tar_is_refused(keys: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.tar").write_bytes(bytes(10240))
    with pytest.raises(Rejected, match="holds no entries"):
        create_bundle(tmp_path / "empty.tar", tmp_path / "a.bundle", key=keys / "signing.pem", product="p", version="1", check_boot=False)
    assert not (tmp_path / "a.bundle").exists()


def test_unknown_compression_is_refused(keys: Path, tmp_path: Path) -> None:
    tree = make_small_tree(tmp_path / "tree")
    with pytest.raises(Rejected, match="unknown compression 'lz4'"):
        create_bundle(tree, tmp_path / "a.bundle", key=keys / "signing.pem", product="p", version="1", compression="lz4", check_boot=False)
