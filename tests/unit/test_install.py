"""Extraction and erase with real parts: bundles from create_bundle, GNU tar as the reference, real
ext4 images checked with e2fsck, a real loop mount for the in-use check, and `recovery apply` run as
a program.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import sys
import uuid as uuidlib
from pathlib import Path

import pytest

from mkimage.bundle import create_bundle
from recovery.core.manifest import Compression
from recovery.core.bundle import VerifiedBundle, verify_bundle
from recovery.core.errors import Failed, Rejected
from recovery.os.extract import ExtractStats, apply_bundle, extract_payload
from recovery.os.erase import erase, inodes_for
from recovery.core.keys import Keyring
from recovery.core.run import run

from .payloads import payload_bytes
from .sample_tree import (
    SAMPLE_BLOCK_DEVICE,
    SAMPLE_CAPABILITY,
    SAMPLE_CHAR_DEVICE,
    SAMPLE_FIFO,
    SAMPLE_HARDLINKS,
    SAMPLE_LONG_NAME,
    SAMPLE_NON_UTF8,
    SAMPLE_SETUID,
    SAMPLE_SPARSE,
    SAMPLE_SYMLINKS,
    make_small_tree,
    snapshot,
)

REPO = Path(__file__).resolve().parents[2]
GNU_TAR_EXTRACT = ["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-p", "-x"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: owners, device nodes, capabilities, mkfs on loop")


# --- helpers shared with test_hostile.py --------------------------------------------------------


class RecordingProgress:
    def __init__(self) -> None:
        self.total = 0

    def update(self, n: int) -> None:
        self.total += n


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Path, sample: Path) -> dict[str, VerifiedBundle]:
    """The sample tree as a verified bundle, once per compression."""
    out = tmp_path_factory.mktemp("bundles")
    result = {}
    for comp in Compression:
        path = out / f"sample-{comp}.bundle"
        create_bundle(sample, path, key=keys / "signing.pem", product="sample", version="2.0.0", compression=str(comp), check_boot=False)
        result[str(comp)] = verify_bundle(path, Keyring.load(keys))
    return result


# --- fidelity ------------------------------------------------------------------------------------


def gnu_tar_extract(bundle: VerifiedBundle, into: Path) -> None:
    payload = into.parent / f"{into.name}.{bundle.manifest.payload.name}"
    payload.write_bytes(payload_bytes(bundle))
    into.mkdir()
    run([*GNU_TAR_EXTRACT, "-f", payload, "-C", into])


@needs_root
@pytest.mark.parametrize("comp", [str(c) for c in Compression])
def test_extraction_equals_gnu_tar(comp: str, bundles: dict[str, VerifiedBundle], sample: Path, tmp_path: Path) -> None:
    bundle = bundles[comp]
    ours, gnu = tmp_path / "ours", tmp_path / "gnu"
    ours.mkdir()
    progress = RecordingProgress()
    stats = extract_payload(bundle, ours, progress=progress)  # type: ignore[arg-type]
    gnu_tar_extract(bundle, gnu)

    assert stats == ExtractStats(bundle.manifest.rootfs_files, bundle.manifest.rootfs_bytes)
    assert progress.total == bundle.manifest.payload.size
    mine, reference = snapshot(ours), snapshot(gnu)
    assert mine.keys() == reference.keys()
    for name in reference:
        assert mine[name] == reference[name], name

    # Both could lose the same thing: check the hard cases against the contract directly.
    def at(rel: str | bytes) -> Path:
        return ours / os.fsdecode(rel)

    assert stat.S_IMODE(at(SAMPLE_SETUID).stat().st_mode) == 0o4755
    assert os.getxattr(at(SAMPLE_CAPABILITY), "security.capability")
    assert "cap_net_raw=ep" in run(["getcap", at(SAMPLE_CAPABILITY)]).stdout.decode()
    first, second = SAMPLE_HARDLINKS
    assert os.path.samefile(at(first), at(second))
    for link, target in SAMPLE_SYMLINKS.items():
        assert os.readlink(at(link)) == target
    rel, major, minor = SAMPLE_CHAR_DEVICE
    assert stat.S_ISCHR(at(rel).lstat().st_mode) and at(rel).lstat().st_rdev == os.makedev(major, minor)
    rel, major, minor = SAMPLE_BLOCK_DEVICE
    assert stat.S_ISBLK(at(rel).lstat().st_mode) and at(rel).lstat().st_rdev == os.makedev(major, minor)
    assert stat.S_ISFIFO(at(SAMPLE_FIFO).lstat().st_mode)
    rel, size = SAMPLE_SPARSE
    st = at(rel).stat()
    assert st.st_size == size and st.st_blocks * 512 <= size // 8, "sparse file was filled in"
    assert at(SAMPLE_NON_UTF8).read_bytes() == b"latin-1 name\n"
    assert at(SAMPLE_LONG_NAME).is_file()
    assert mine == snapshot(sample)  # the root directory's own metadata included


def test_apply_small_tree(tmp_path: Path, keys: Path) -> None:
    """A plain tree: stats, content and the restored cwd, with no special privileges involved."""
    source = make_small_tree(tmp_path / "src")
    path = tmp_path / "small.bundle"
    manifest = create_bundle(source, path, key=keys / "signing.pem", product="sample", version="1.0", check_boot=False)
    bundle = verify_bundle(path, Keyring.load(keys))
    target = tmp_path / "target"
    target.mkdir()
    cwd = os.getcwd()
    stats = apply_bundle(bundle, target)
    assert os.getcwd() == cwd
    assert stats == ExtractStats(manifest.rootfs_files, manifest.rootfs_bytes)
    assert (target / "usr/bin/tool").read_bytes() == (source / "usr/bin/tool").read_bytes()
    assert os.readlink(target / "bin") == "usr/bin"


# --- the payload is hashed again --------------------------------------------------------------------


@pytest.fixture()
def small_bundle(tmp_path: Path, keys: Path) -> VerifiedBundle:
    source = make_small_tree(tmp_path / "src")
    (source / "etc/config").write_bytes(b"A" * 20000)
    path = tmp_path / "small.bundle"
    create_bundle(source, path, key=keys / "signing.pem", product="sample", version="1.0", compression="none", check_boot=False)
    return verify_bundle(path, Keyring.load(keys))


def flip_payload_byte(bundle: VerifiedBundle, needle: bytes) -> None:
    """Change one byte of the payload in the file after it was verified (in a file's data)."""
    data = payload_bytes(bundle)
    index = data.index(needle) + len(needle) // 2
    with open(bundle.path, "r+b") as f:
        f.seek(bundle.payload_offset + index)
        f.write(bytes([data[index] ^ 0x01]))


def test_payload_changed_after_verification_fails(small_bundle: VerifiedBundle, tmp_path: Path) -> None:
    # An uncompressed payload with a changed data byte is still a valid tar: only the hash notices.
    flip_payload_byte(small_bundle, b"A" * 1000)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(Failed, match=r"^payload sha256 mismatch during extraction: block 0 \(bytes 0-\d+\) changed "
                                     r"after verification$"):
        extract_payload(small_bundle, target)


def test_compressed_payload_changed_after_verification_fails(sample_small_zstd: VerifiedBundle, tmp_path: Path) -> None:
    data = payload_bytes(sample_small_zstd)
    with open(sample_small_zstd.path, "r+b") as f:
        f.seek(sample_small_zstd.payload_offset + len(data) // 2)
        f.write(bytes([data[len(data) // 2] ^ 0xFF]))
    target = tmp_path / "target"
    target.mkdir()
    # The changed block never reaches the decompressor; the hash is the reason given.
    with pytest.raises(Failed, match=r"^payload sha256 mismatch during extraction: block 0 "):
        extract_payload(sample_small_zstd, target)


@pytest.fixture()
def sample_small_zstd(tmp_path: Path, keys: Path) -> VerifiedBundle:
    source = make_small_tree(tmp_path / "src")
    (source / "usr/lib").mkdir()
    (source / "usr/lib/data").write_bytes(os.urandom(300_000))
    path = tmp_path / "small-zstd.bundle"
    create_bundle(source, path, key=keys / "signing.pem", product="sample", version="1.0", check_boot=False)
    return verify_bundle(path, Keyring.load(keys))


def test_bundle_truncated_after_verification_fails(small_bundle: VerifiedBundle, tmp_path: Path) -> None:
    end = small_bundle.payload_offset + small_bundle.manifest.payload.size
    os.truncate(small_bundle.path, end - 5000)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(Failed, match="ends 5000 bytes before the end of its payload"):
        extract_payload(small_bundle, target)


def test_counts_differing_from_manifest_fail(small_bundle: VerifiedBundle, tmp_path: Path) -> None:
    manifest = dataclasses.replace(small_bundle.manifest, rootfs_files=small_bundle.manifest.rootfs_files + 1)
    lying = dataclasses.replace(small_bundle, manifest=manifest)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(Failed, match=r"payload has \d+ entries with \d+ file bytes, the manifest says"):
        extract_payload(lying, target)


# --- apply: the target ---------------------------------------------------------------------------


def test_apply_rejects_unusable_targets(small_bundle: VerifiedBundle, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("mine")
    with pytest.raises(Rejected, match="is not empty"):
        apply_bundle(small_bundle, full)
    assert [p.name for p in full.iterdir()] == ["keep"]
    with pytest.raises(Rejected, match="does not exist"):
        apply_bundle(small_bundle, tmp_path / "missing")
    with pytest.raises(Rejected, match="is not a directory"):
        apply_bundle(small_bundle, full / "keep")


@needs_root
def test_disk_full_names_the_file(small_bundle: VerifiedBundle, tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    try:
        run(["mount", "-t", "tmpfs", "-o", "size=16k", "tiny", target])
    except Failed as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    try:
        with pytest.raises(Failed, match=r"^Failed to extract \S+: .*No space left on device"):
            extract_payload(small_bundle, target)
    finally:
        run(["umount", target])


# --- erase -----------------------------------------------------------------------------------------


def make_ext4(path: Path, *, label: str, uuid: str, content: Path | None = None) -> Path:
    run(["truncate", "-s", "32M", path])
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid, *(["-d", content] if content else []), path])
    return path


def fs_identity(path: Path) -> tuple[str, str]:
    out = run(["blkid", "-p", "-o", "export", path]).stdout.decode()
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return values["LABEL"], values["UUID"]


def test_erase_keeps_label_and_uuid(tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "old-release").write_text("1.0.0")
    fs_uuid = str(uuidlib.uuid4())
    image = make_ext4(tmp_path / "system.img", label="system", uuid=fs_uuid, content=content)
    assert "old-release" in run(["debugfs", "-R", "ls /", image]).stdout.decode()

    erase(image)

    assert fs_identity(image) == ("system", fs_uuid)
    assert "old-release" not in run(["debugfs", "-R", "ls /", image]).stdout.decode()
    run(["e2fsck", "-fn", image])  # raises unless clean


def test_erase_with_explicit_identity(tmp_path: Path) -> None:
    image = make_ext4(tmp_path / "system.img", label="old", uuid=str(uuidlib.uuid4()))
    new_uuid = str(uuidlib.uuid4())
    erase(image, label="system", uuid=new_uuid)
    assert fs_identity(image) == ("system", new_uuid)
    run(["e2fsck", "-fn", image])


def inode_count(image: Path) -> int:
    out = run(["dumpe2fs", "-h", image]).stdout.decode()
    return int(re.search(r"^Inode count:\s+(\d+)", out, re.MULTILINE).group(1))


def test_erase_makes_room_for_a_tree_of_many_small_files(tmp_path: Path) -> None:
    # 32 MiB: mke2fs's default gives 8192 inodes, fewer than 20,000 entries need (found: the bytes of such
    # a tree fit the partition, so it passed verification and ran out of inodes after the erase).
    image = make_ext4(tmp_path / "system.img", label="system", uuid=str(uuidlib.uuid4()))
    default = inode_count(image)
    assert default < 20_000
    erase(image, files=20_000)
    # what was asked for, give or take mke2fs's rounding to whole inode-table blocks per group
    assert inode_count(image) >= inodes_for(20_000) - 64 > 20_000 + 20_000 // 8
    assert fs_identity(image)[0] == "system"
    run(["e2fsck", "-fn", image])


def test_erase_keeps_the_default_inodes_when_they_suffice(tmp_path: Path) -> None:
    image = make_ext4(tmp_path / "system.img", label="system", uuid=str(uuidlib.uuid4()))
    default = inode_count(image)
    erase(image, files=100)
    assert inode_count(image) == default


def test_erase_refuses_what_it_cannot_keep(tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    run(["truncate", "-s", "32M", blank])
    with pytest.raises(Rejected, match="no file system UUID to keep"):
        erase(blank)
    assert blank.read_bytes() == b"\0" * (32 << 20)  # nothing written
    with pytest.raises(Rejected, match="No such file"):
        erase(tmp_path / "missing.img")
    with pytest.raises(Rejected, match="not a block device or an image file"):
        erase(tmp_path)


@needs_root
def test_erase_refuses_a_mounted_target(tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    (content / "precious").write_text("in use")
    image = make_ext4(tmp_path / "system.img", label="system", uuid=str(uuidlib.uuid4()), content=content)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        loop = run(["losetup", "--find", "--show", image]).stdout.decode().strip()
    except Failed as e:
        pytest.skip(f"no loop devices here: {e}")
    try:
        run(["mount", loop, mnt])
        try:
            with pytest.raises(Rejected, match=f"in use.*{mnt}"):
                erase(Path(loop))
            with pytest.raises(Rejected, match=f"in use.*{mnt}"):
                erase(image)  # the file behind the loop device
            assert (mnt / "precious").read_text() == "in use"
        finally:
            run(["umount", mnt])
    finally:
        run(["losetup", "-d", loop])
    erase(image)  # no longer in use


# --- the command line -----------------------------------------------------------------------------


def recovery_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recovery.os", *map(os.fspath, args)],
        capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL,
    )


def test_cli_apply(tmp_path: Path, keys: Path, small_bundle: VerifiedBundle) -> None:
    target = tmp_path / "target"
    target.mkdir()
    ok = recovery_cli("apply", "--keys", keys, small_bundle.path, "--target", target)
    assert ok.returncode == 0, ok.stderr
    assert f"{small_bundle.manifest.rootfs_files} files" in ok.stdout
    assert (target / "etc/config").read_bytes() == b"A" * 20000

    again = recovery_cli("apply", "--keys", keys, small_bundle.path, "--target", target)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [f"rejected: target {target} is not empty"]

    garbage = tmp_path / "garbage.bundle"
    garbage.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = recovery_cli("apply", "--keys", keys, garbage, "--target", empty)
    assert bad.returncode == 1
    assert len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("rejected: "), bad.stderr
    assert not any(empty.iterdir())

    usage = recovery_cli("apply", "--keys", keys, small_bundle.path)  # no --target
    assert usage.returncode == 2
    assert "--target" in usage.stderr


def test_sparseness_is_kept_not_invented(tmp_path: Path, keys: Path) -> None:
    """Holes the archive records come back; zeros written as data stay data, as GNU tar keeps them
    (a swap file with holes is refused by swapon)."""
    source = tmp_path / "src"
    source.mkdir()
    with open(source / "sparse.img", "wb") as f:
        f.write(b"head")
        f.seek(4 << 20)
        f.write(b"tail")
    with open(source / "swapfile", "wb") as f:
        f.write(b"\0" * (1 << 20))
        os.fsync(f.fileno())  # allocated on disk, so GNU tar's --sparse sees a dense file
    path = tmp_path / "zeros.bundle"
    create_bundle(source, path, key=keys / "signing.pem", product="sample", version="1.0", check_boot=False)
    target = tmp_path / "target"
    target.mkdir()
    apply_bundle(verify_bundle(path, Keyring.load(keys)), target)
    sparse, dense = (target / "sparse.img").stat(), (target / "swapfile").stat()
    assert sparse.st_blocks * 512 < 64 * 1024 < sparse.st_size
    assert dense.st_blocks * 512 >= dense.st_size
    assert (target / "swapfile").read_bytes() == b"\0" * (1 << 20)


def test_erase_refuses_a_foreign_uuid(tmp_path: Path) -> None:
    image = tmp_path / "vfat.img"
    run(["truncate", "-s", "32M", image])
    run(["mkfs.fat", "-i", "12345678", image])  # a vfat volume id, not a UUID ext4 can take
    before = image.read_bytes()
    with pytest.raises(Rejected, match="is not a UUID that ext4 can carry"):
        erase(image)
    assert image.read_bytes() == before


def test_bundle_gone_after_verification_fails(small_bundle: VerifiedBundle, tmp_path: Path) -> None:
    small_bundle.path.unlink()
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(Failed, match="^Failed to read the payload from .*: No such file or directory$"):
        extract_payload(small_bundle, target)
