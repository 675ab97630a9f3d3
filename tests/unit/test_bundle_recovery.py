"""`reflash bundle --recovery DIR` carries a recovery OS in a tree from another builder, at
/usr/lib/reflash/recovery (DESIGN.md, "Where a new recovery comes from"); a recovery a tree carries
itself must match its recovery.json. Both are judged before anything is signed."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mkimage.bundle import create_bundle
from recovery.core.bundle import verify_bundle
from recovery.core.errors import Rejected
from recovery.core.keys import Keyring
from recovery.core.slots import IN_RELEASE, RecoveryImage, write_record
from recovery.os.extract import extract_payload

from .sample_tree import _pattern, bundle_members
from .test_bootable import bootable_tree

CREATED = 1_700_000_000  # SOURCE_DATE_EPOCH: the bundle's `created`
CARRIES = ("the tree already carries a recovery at /usr/lib/reflash/recovery: leave out --recovery, or remove it "
           "from the tree")
MISMATCH = "the recovery the tree carries at /usr/lib/reflash/recovery does not match its recovery.json: "


@pytest.fixture(autouse=True)
def _created(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(CREATED))


def make_recovery(directory: Path, version: str = "2.0.0") -> Path:
    """What `reflash recovery -o OUT` leaves in OUT/recovery/ (the initrd larger than a write chunk)."""
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(_pattern(300_000, 21))
    (directory / "initrd.img").write_bytes(_pattern(1_500_000, 22))
    write_record(directory, version)
    return directory


def bundle(source: Path, tmp_path: Path, keys: Path, **kw: object) -> Path:
    out = tmp_path / "out.bundle"
    create_bundle(source, out, key=keys / "signing.pem", product="demo", version="2.0.0", **kw)  # type: ignore[arg-type]
    return out


def refused(source: Path, tmp_path: Path, keys: Path, **kw: object) -> str:
    with pytest.raises(Rejected) as info:
        bundle(source, tmp_path, keys, **kw)
    assert not (tmp_path / "out.bundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.bundle.")]  # no staged payload left
    message = str(info.value)
    assert "\n" not in message
    return message


def tar_of(tree: Path, tar: Path) -> Path:
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(tree, arcname=".")
    return tar


def extracted(out: Path, keys: Path, tmp_path: Path) -> Path:
    """The bundle verified and extracted by the recovery's own extractor, which holds the tree to the
    manifest's counts exactly."""
    target = tmp_path / "target"
    target.mkdir()
    extract_payload(verify_bundle(out, Keyring.load(keys), product="demo"), target)
    return target


def payload_members(out: Path) -> dict[str, tarfile.TarInfo]:
    """The payload of a bundle made with compression "none", read by Python's tarfile: name -> member."""
    members = bundle_members(out)
    with tarfile.open(fileobj=io.BytesIO(members["rootfs.tar"])) as tar:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tar}


def tree_counts(tree: Path) -> tuple[int, int]:
    """Entries (the root included) and regular file bytes, as the manifest counts them."""
    paths = list(tree.rglob("*"))
    return len(paths) + 1, sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


# --- --recovery DIR ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["directory", "tar"])
def test_the_recovery_is_added_at_its_place_and_counted(tmp_path: Path, keys: Path, source: str) -> None:
    tree = bootable_tree(tmp_path / "root")
    recovery = make_recovery(tmp_path / "out/recovery")
    given = tree if source == "directory" else tar_of(tree, tmp_path / "root.tar")
    before = sorted(os.fsdecode(p) for p in tree.rglob("*"))

    out = bundle(given, tmp_path, keys, recovery=recovery)

    manifest = verify_bundle(out, Keyring.load(keys)).manifest
    files, nbytes = tree_counts(tree)
    added = sum((recovery / name).stat().st_size for name in ("vmlinuz", "initrd.img", "recovery.json"))
    # usr and usr/lib are the tree's; usr/lib/reflash and its recovery/ are new, and the three files
    assert (manifest.rootfs_files, manifest.rootfs_bytes) == (files + 2 + 3, nbytes + added)
    target = extracted(out, keys, tmp_path)
    carried = target / IN_RELEASE
    for name in ("vmlinuz", "initrd.img", "recovery.json"):
        assert (carried / name).read_bytes() == (recovery / name).read_bytes()
        st = os.lstat(carried / name)
        assert (oct(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (oct(0o100644), 0, 0, CREATED)
    for directory in (carried.parent, carried):
        st = os.lstat(directory)
        assert (oct(st.st_mode), st.st_uid, st.st_gid) == (oct(0o040755), 0, 0)
    assert RecoveryImage.read(carried) == RecoveryImage.of(carried, "2.0.0")
    assert (target / "usr/lib/systemd/systemd").read_bytes() == b"#!init"  # the tree as it was, besides
    assert sorted(os.fsdecode(p) for p in tree.rglob("*")) == before  # the source is untouched
    assert not (tree / "usr/lib/reflash").exists()


def test_every_missing_parent_is_added_and_the_boot_links_in_the_same_pass(tmp_path: Path, keys: Path) -> None:
    """A tar with no /usr at all, and a stock Debian tree's root links: one payload, all of it counted."""
    source = tmp_path / "root.tar"
    with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tar:
        boot = tarfile.TarInfo("boot")
        boot.type, boot.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(boot)
        for name, data in (("boot/vmlinuz-6.1.0", b"kernel"), ("boot/initrd.img-6.1.0", b"initrd")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in ("vmlinuz", "initrd.img"):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, f"boot/{name}-6.1.0"
            tar.addfile(link)
    recovery = make_recovery(tmp_path / "recovery")

    out = bundle(source, tmp_path, keys, recovery=recovery, compression="none", check_boot=False)

    members = payload_members(out)
    assert [name for name, m in members.items() if m.isdir()] == [
        "boot", "usr", "usr/lib", "usr/lib/reflash", "usr/lib/reflash/recovery"]
    assert list(members)[-3:] == [f"{IN_RELEASE}/{name}" for name in ("vmlinuz", "initrd.img", "recovery.json")]
    assert members["boot/vmlinuz"].linkname == "vmlinuz-6.1.0"
    for m in members.values():
        if m.name.startswith("usr"):
            assert (m.uid, m.gid, m.mtime, m.mode) == (0, 0, CREATED, 0o755 if m.isdir() else 0o644)
    manifest = verify_bundle(out, Keyring.load(keys)).manifest
    assert manifest.rootfs_files == len(members) == 5 + 2 + 4 + 3
    assert (extracted(out, keys, tmp_path) / IN_RELEASE / "initrd.img").read_bytes() == (
        recovery / "initrd.img").read_bytes()


@pytest.mark.parametrize(("change", "said"), [
    ("no-dir", "--recovery {dir} is no directory: give the recovery/ that `reflash recovery -o OUT` writes"),
    ("no-kernel", "--recovery {dir} has no vmlinuz: a recovery is vmlinuz, initrd.img and recovery.json, as "
                  "`reflash recovery` writes them"),
    ("no-record", "--recovery {dir} has no recovery.json: a recovery is vmlinuz, initrd.img and recovery.json, "
                  "as `reflash recovery` writes them"),
    ("initrd-longer", "--recovery {dir} does not match its recovery.json: initrd.img is 1500001 bytes, the "
                      "record says 1500000"),
    ("kernel-changed", "--recovery {dir} does not match its recovery.json: vmlinuz has sha256 "),
    ("malformed", "malformed {dir}/recovery.json: needs exactly version, kernel and initrd (and menu)"),
])
def test_a_recovery_that_is_not_whole_is_refused_before_packing(
    tmp_path: Path, keys: Path, caplog: pytest.LogCaptureFixture, change: str, said: str,
) -> None:
    tree = bootable_tree(tmp_path / "root")
    recovery = make_recovery(tmp_path / "recovery")
    if change == "no-dir":
        shutil.rmtree(recovery)
    elif change == "no-kernel":
        (recovery / "vmlinuz").unlink()
    elif change == "no-record":
        (recovery / "recovery.json").unlink()
    elif change == "initrd-longer":
        with open(recovery / "initrd.img", "ab") as f:
            f.write(b"x")
    elif change == "kernel-changed":
        data = bytearray((recovery / "vmlinuz").read_bytes())
        data[1000] ^= 0xFF
        (recovery / "vmlinuz").write_bytes(bytes(data))
    elif change == "malformed":
        (recovery / "recovery.json").write_text('{"version": "2.0.0"}')
    caplog.set_level(logging.INFO)
    assert refused(tree, tmp_path, keys, recovery=recovery).startswith(said.format(dir=recovery))
    assert not any("Packing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("source", ["directory", "tar"])
def test_a_tree_that_has_the_recovery_directory_already_is_refused(tmp_path: Path, keys: Path, source: str) -> None:
    tree = bootable_tree(tmp_path / "root")
    (tree / IN_RELEASE).mkdir(parents=True)  # even empty
    recovery = make_recovery(tmp_path / "recovery")
    given = tree if source == "directory" else tar_of(tree, tmp_path / "root.tar")
    assert refused(given, tmp_path, keys, recovery=recovery) == CARRIES


def test_a_tar_with_a_file_below_the_recovery_directory_alone_is_refused(tmp_path: Path, keys: Path) -> None:
    source = tmp_path / "root.tar"
    with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo(f"{IN_RELEASE}/notes.txt"), io.BytesIO(b""))
    recovery = make_recovery(tmp_path / "recovery")
    assert refused(source, tmp_path, keys, recovery=recovery, check_boot=False) == CARRIES


def test_a_parent_that_is_a_link_is_refused(tmp_path: Path, keys: Path) -> None:
    """The recovery's files would be written through it (the extractor refuses that, after the erase)."""
    tree = bootable_tree(tmp_path / "root")
    (tree / "usr/share/reflash").mkdir(parents=True)
    os.symlink("../share/reflash", tree / "usr/lib/reflash")
    recovery = make_recovery(tmp_path / "recovery")
    assert refused(tree, tmp_path, keys, recovery=recovery) == (
        "cannot add the recovery at /usr/lib/reflash/recovery: /usr/lib/reflash is a symlink in the tree, "
        "not a directory")


# --- a recovery the tree carries itself ------------------------------------------------------------


def carrying_tree(root: Path) -> Path:
    """A tree with its own recovery in it, as `reflash build` (bundle_recovery) or a builder puts it."""
    tree = bootable_tree(root)
    make_recovery(tree / IN_RELEASE)
    return tree


@pytest.mark.parametrize("source", ["directory", "tar"])
@pytest.mark.parametrize(("change", "said"), [
    ("initrd-shorter", MISMATCH + "initrd.img is 1499999 bytes, the record says 1500000"),
    ("kernel-changed", MISMATCH + "vmlinuz has sha256 "),
    ("malformed", "malformed /usr/lib/reflash/recovery/recovery.json in the tree: kernel.sha256 must be 64 "
                  "lowercase hex digits"),
    ("not-json", "malformed /usr/lib/reflash/recovery/recovery.json in the tree: not JSON"),
    ("no-kernel", "the recovery the tree carries at /usr/lib/reflash/recovery has no vmlinuz: "
                  "/usr/lib/reflash/recovery/vmlinuz is not in the tree"),
])
def test_a_carried_recovery_that_does_not_match_its_record_is_refused(
    tmp_path: Path, keys: Path, source: str, change: str, said: str,
) -> None:
    tree = carrying_tree(tmp_path / "root")
    given = tree if source == "directory" else tmp_path / "root.tar"
    if source == "tar":
        bundle(tar_of(tree, given), tmp_path, keys).unlink()  # whole, it is taken
    else:
        bundle(given, tmp_path, keys).unlink()
    carried = tree / IN_RELEASE
    if change == "initrd-shorter":
        (carried / "initrd.img").write_bytes((carried / "initrd.img").read_bytes()[:-1])
    elif change == "kernel-changed":
        (carried / "vmlinuz").write_bytes(_pattern(300_000, 99))
    elif change == "malformed":
        (carried / "recovery.json").write_text((carried / "recovery.json").read_text().replace(
            RecoveryImage.read(carried).kernel.sha256, "ABC"))  # type: ignore[union-attr]
    elif change == "not-json":
        (carried / "recovery.json").write_text("version = 2.0.0\n")
    elif change == "no-kernel":
        (carried / "vmlinuz").unlink()
    if source == "tar":
        tar_of(tree, given)
    assert refused(given, tmp_path, keys).startswith(said)


def test_a_carried_recovery_is_followed_through_links_in_the_tree(tmp_path: Path, keys: Path) -> None:
    """A builder that links the recovery's kernel to the system's: symbolic (absolute, read from the
    tree's root) and hard links lead to the data that is checked."""
    tree = carrying_tree(tmp_path / "root")
    carried = tree / IN_RELEASE
    os.replace(carried / "vmlinuz", tree / "boot/recovery-vmlinuz")
    os.symlink("/boot/recovery-vmlinuz", carried / "vmlinuz")
    os.link(carried / "initrd.img", tree / "boot/a-recovery-initrd")  # GNU tar writes boot/ first: the data
    bundle(tree, tmp_path, keys).unlink()

    (tree / "boot/recovery-vmlinuz").write_bytes(_pattern(300_000, 98))
    assert refused(tree, tmp_path, keys).startswith(MISMATCH + "vmlinuz has sha256 ")
    (tree / "boot/recovery-vmlinuz").unlink()
    assert refused(tree, tmp_path, keys) == (
        "the recovery the tree carries at /usr/lib/reflash/recovery has no vmlinuz: /boot/recovery-vmlinuz is "
        "not in the tree (an absolute link is read from the tree's root, not the build host's)")
    # Without recovery.json the release carries no recovery (the running system keeps its own): not checked.
    (tree / IN_RELEASE / "recovery.json").unlink()
    verify_bundle(bundle(tree, tmp_path, keys), Keyring.load(keys))


# --- the command line ------------------------------------------------------------------------------


def test_the_command_line_takes_recovery(tmp_path: Path, keys: Path) -> None:
    tree = bootable_tree(tmp_path / "root")
    recovery = make_recovery(tmp_path / "out/recovery")
    out = tmp_path / "cli.bundle"

    def reflash(*argv: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mkimage", "bundle", "--key", keys / "signing.pem",
                               "--product", "demo", "--version", "2.0.0", *argv, tree, "-o", out],
                              capture_output=True, text=True, timeout=120, check=False)

    done = reflash("--recovery", recovery)
    assert done.returncode == 0, done.stderr
    files, _ = tree_counts(tree)
    assert done.stdout.startswith(f"wrote {out}: demo 2.0.0, {files + 5} files")
    target = extracted(out, keys, tmp_path)
    assert (target / IN_RELEASE / "vmlinuz").read_bytes() == (recovery / "vmlinuz").read_bytes()

    out.unlink()
    (recovery / "initrd.img").write_bytes(b"another initrd")
    failed = reflash("--recovery", recovery)
    assert (failed.returncode, failed.stderr) == (
        1, f"rejected: --recovery {recovery} does not match its recovery.json: initrd.img is 14 bytes, the "
           "record says 1500000\n")
    assert not out.exists()
