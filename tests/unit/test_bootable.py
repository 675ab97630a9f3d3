"""`reflash bundle` refuses a tree that cannot boot, judged on the payload it packed: a kernel and an
initrd where the boot menu loads them, an init where the kernel looks, os-release's VERSION_ID equal to
the bundle's version. Each miss is named in one line; `--no-boot-check` bundles it anyway."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from mkimage.bundle import create_bundle
from recovery.core.bundle import verify_bundle
from recovery.core.errors import Rejected
from recovery.core.keys import Keyring


def bootable_tree(root: Path, version: str = "2.0.0") -> Path:
    """The layout of a Debian system with merged /usr, as small as it gets."""
    for d in ("boot", "usr/lib/systemd", "usr/sbin", "etc"):
        (root / d).mkdir(parents=True)
    (root / "boot/vmlinuz-6.1.0").write_bytes(b"kernel")
    (root / "boot/initrd.img-6.1.0").write_bytes(b"initrd")
    os.symlink("vmlinuz-6.1.0", root / "boot/vmlinuz")
    os.symlink("initrd.img-6.1.0", root / "boot/initrd.img")
    (root / "usr/lib/systemd/systemd").write_bytes(b"#!init")
    os.symlink("/lib/systemd/systemd", root / "usr/sbin/init")  # absolute, through the /lib link
    for link in ("lib", "sbin", "bin"):
        os.symlink(f"usr/{link}", root / link)
    (root / "usr/lib/os-release").write_text(f"ID=demo\nVERSION_ID='{version}'\n")
    os.symlink("../usr/lib/os-release", root / "etc/os-release")
    return root


def bundle(tree: Path, tmp_path: Path, keys: Path, **kw: object) -> Path:
    out = tmp_path / "out.bundle"
    create_bundle(tree, out, key=keys / "signing.pem", product="demo", version="2.0.0", **kw)  # type: ignore[arg-type]
    return out


def refused(tree: Path, tmp_path: Path, keys: Path) -> str:
    with pytest.raises(Rejected) as info:
        bundle(tree, tmp_path, keys)
    assert not (tmp_path / "out.bundle").exists()
    message = str(info.value)
    assert "\n" not in message and message.startswith("not bootable: ") and "--no-boot-check" in message
    return message


def test_a_debian_layout_with_links_everywhere_is_bootable(tmp_path: Path, keys: Path) -> None:
    out = bundle(bootable_tree(tmp_path / "root"), tmp_path, keys)
    assert verify_bundle(out, Keyring.load(keys)).manifest.version == "2.0.0"


@pytest.mark.parametrize(("remove", "said"), [
    ("boot/vmlinuz-6.1.0", "no kernel at /boot/vmlinuz"),  # the link dangles now
    ("boot/initrd.img", "no initrd at /boot/initrd.img"),
    ("usr/lib/systemd/systemd", "no init at /sbin/init, /etc/init, /bin/init"),
    ("usr/lib/os-release", "no os-release at /etc/os-release or /usr/lib/os-release"),
])
def test_each_miss_is_named(tmp_path: Path, keys: Path, remove: str, said: str) -> None:
    tree = bootable_tree(tmp_path / "root")
    (tree / remove).unlink()
    assert said in refused(tree, tmp_path, keys)


def test_wrong_version_and_several_misses_in_one_line(tmp_path: Path, keys: Path) -> None:
    tree = bootable_tree(tmp_path / "root", version="1.9")
    (tree / "boot/vmlinuz").unlink()
    message = refused(tree, tmp_path, keys)
    assert "no kernel at /boot/vmlinuz" in message and "os-release says VERSION_ID=1.9, the bundle is 2.0.0" in message


def test_a_link_that_leaves_the_tree_does_not_count(tmp_path: Path, keys: Path) -> None:
    """An absolute link is read inside the tree, as on the installed system: the build host's own
    /boot/vmlinuz (if any) is no kernel of this tree."""
    tree = bootable_tree(tmp_path / "root")
    (tree / "boot/vmlinuz").unlink()
    os.symlink("/../../../boot/vmlinuz", tree / "boot/vmlinuz")
    assert "/boot/vmlinuz" in refused(tree, tmp_path, keys)


def test_a_tar_from_another_builder_is_checked_too(tmp_path: Path, keys: Path) -> None:
    tree = bootable_tree(tmp_path / "root")
    source = tmp_path / "root.tar"
    with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname=".")
    bundle(source, tmp_path, keys).unlink()
    shutil.rmtree(tree / "boot")
    with tarfile.open(source, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname=".")
    assert "no kernel at /boot/vmlinuz" in refused(source, tmp_path, keys)


def test_the_override_bundles_a_broken_tree(tmp_path: Path, keys: Path) -> None:
    tree = bootable_tree(tmp_path / "root")
    shutil.rmtree(tree / "boot")
    out = bundle(tree, tmp_path, keys, check_boot=False)
    assert verify_bundle(out, Keyring.load(keys)).manifest.version == "2.0.0"
