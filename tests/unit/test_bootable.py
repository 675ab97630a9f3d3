"""`reflash bundle` refuses a tree that cannot boot, judged on the payload it packed: a kernel and an
initrd where the boot menu loads them, an init where the kernel looks, os-release's VERSION_ID equal to
the bundle's version. Each miss is named in one line; `--no-boot-check` bundles it anyway."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mkimage.bootable import normal
from mkimage.bundle import create_bundle
from recovery.core.bundle import verify_bundle
from recovery.core.errors import Rejected
from recovery.core.keys import Keyring
from recovery.core.libarchive_api import TarReader, entry_pathname, entry_symlink, kind_of
from tests.unit.sample_tree import bundle_members


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


# --- the standard Debian layout: kernels in /boot/vmlinuz-<version>, the links at the root ------------


def debian_tree(root: Path) -> Path:
    """What mmdebstrap with a linux-image package leaves: /vmlinuz and /initrd.img at the root, relative,
    and nothing at /boot/vmlinuz."""
    tree = bootable_tree(root)
    for name in ("vmlinuz", "initrd.img"):
        (tree / "boot" / name).unlink()
        os.symlink(f"boot/{name}-6.1.0", tree / name)
    return tree


def payload_links(out: Path, tmp_path: Path) -> dict[str, str]:
    """The payload's symbolic links: path (normalised) -> target."""
    members = bundle_members(out)
    payload = tmp_path / "payload.tar.zst"
    payload.write_bytes(members[list(members)[2]])
    links = {}
    with TarReader(payload) as reader:
        for entry in reader:
            if kind_of(entry) == "symlink":
                links[normal(os.fsdecode(entry_pathname(entry)))] = os.fsdecode(entry_symlink(entry))
    return links


@pytest.mark.parametrize("source", ["directory", "tar"])
def test_a_stock_debian_tree_gets_the_boot_menus_links(tmp_path: Path, keys: Path, source: str) -> None:
    tree = debian_tree(tmp_path / "root")
    given: Path = tree
    if source == "tar":
        given = tmp_path / "root.tar"
        with tarfile.open(given, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(tree, arcname=".")
    out = bundle(given, tmp_path, keys)
    bundled = verify_bundle(out, Keyring.load(keys))
    links = payload_links(out, tmp_path)
    assert links["boot/vmlinuz"] == "vmlinuz-6.1.0" and links["boot/initrd.img"] == "initrd.img-6.1.0"
    assert links["vmlinuz"] == "boot/vmlinuz-6.1.0"  # Debian's own links stay as they were
    assert bundled.manifest.rootfs_files == sum(1 for _ in tree.rglob("*")) + 1 + 2  # ".", the two links
    assert not os.path.lexists(tree / "boot/vmlinuz")  # the source is untouched
    # The recovery's extractor writes them: GRUB finds the kernel at /boot/vmlinuz of the installed tree.
    target = tmp_path / "target"
    target.mkdir()
    subprocess.run([sys.executable, "-m", "recovery.os", "apply", "--keys", keys, out, "--target", target],
                   check=True, capture_output=True)
    assert (target / "boot/vmlinuz").read_bytes() == b"kernel" and (target / "boot/initrd.img").read_bytes() == b"initrd"


def test_a_tree_with_the_boot_menus_links_gets_nothing_added(tmp_path: Path, keys: Path) -> None:
    tree = bootable_tree(tmp_path / "root")
    os.symlink("boot/vmlinuz-6.1.0", tree / "vmlinuz")
    (tree / "boot/vmlinuz").unlink()
    (tree / "boot/vmlinuz").write_bytes(b"another kernel")  # the boot menu's own file wins
    links = payload_links(bundle(tree, tmp_path, keys), tmp_path)
    assert "boot/vmlinuz" not in links and links["boot/initrd.img"] == "initrd.img-6.1.0"


@pytest.mark.parametrize(("change", "said"), [
    ("no-kernel", "no kernel at /boot/vmlinuz, which the boot menu loads, nor Debian's link /vmlinuz"),
    ("no-initrd", "no initrd at /boot/initrd.img, which the boot menu loads, nor Debian's link /initrd.img"),
    ("dangling", "no kernel at /boot/vmlinuz, which the boot menu loads, and Debian's link /vmlinuz leads to no "
                 "file (/boot/vmlinuz-6.1.0 is not in the tree)"),
    ("outside", "no kernel at /boot/vmlinuz, which the boot menu loads, and Debian's link /vmlinuz leads to no "
                "file (a link on the way points outside the tree (.. past its root))"),
    ("host-path", "Debian's link /vmlinuz leads to no file (/home is not in the tree (an absolute link is read "
                  "from the tree's root, not the build host's))"),
    ("boot-link-dangles", "no kernel at /boot/vmlinuz, which the boot menu loads (/boot/vmlinuz-9 is not in the tree)"),
    ("a-directory", "no kernel at /boot/vmlinuz, which the boot menu loads, and Debian's link /vmlinuz leads to no "
                    "file (/vmlinuz leads to /boot/vmlinuz-6.1.0, which is a dir, not a file)"),
    ("boot-is-a-link", "no kernel at /boot/vmlinuz, which the boot menu loads; Debian's link /vmlinuz leads to "
                       "/realboot/vmlinuz-6.1.0, but /boot is no directory of the tree to add /boot/vmlinuz to"),
    ("no-init", "no init at /sbin/init, /etc/init, /bin/init, where the kernel looks"),
    ("no-os-release", "no os-release at /etc/os-release or /usr/lib/os-release"),
])
def test_a_debian_tree_that_cannot_boot_is_refused_saying_what_is_missing(
    tmp_path: Path, keys: Path, change: str, said: str,
) -> None:
    tree = debian_tree(tmp_path / "root")
    if change == "no-kernel":
        (tree / "vmlinuz").unlink()
    elif change == "no-initrd":
        (tree / "initrd.img").unlink()
    elif change == "dangling":
        (tree / "boot/vmlinuz-6.1.0").unlink()
    elif change == "outside":
        (tree / "vmlinuz").unlink()
        # made relative on the build host, out of the tree and back into it there
        os.symlink(f"../../..{tree}/boot/vmlinuz-6.1.0", tree / "vmlinuz")
    elif change == "host-path":
        (tree / "vmlinuz").unlink()
        os.symlink(f"/home/builder{tree}/boot/vmlinuz-6.1.0", tree / "vmlinuz")
    elif change == "boot-link-dangles":
        os.symlink("vmlinuz-9", tree / "boot/vmlinuz")  # the boot menu's path is taken: nothing is added
    elif change == "a-directory":
        (tree / "boot/vmlinuz-6.1.0").unlink()
        (tree / "boot/vmlinuz-6.1.0").mkdir()
    elif change == "boot-is-a-link":
        # /boot a link: the links cannot be added below it (the extraction would write through a link)
        (tree / "boot").rename(tree / "realboot")
        os.symlink("realboot", tree / "boot")
        for name in ("vmlinuz", "initrd.img"):
            (tree / name).unlink()
            os.symlink(f"realboot/{name}-6.1.0", tree / name)
    elif change == "no-init":
        (tree / "usr/lib/systemd/systemd").unlink()
    elif change == "no-os-release":
        (tree / "usr/lib/os-release").unlink()
    message = refused(tree, tmp_path, keys)
    assert said in message, message
