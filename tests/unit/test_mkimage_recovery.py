"""`reflash recovery`: the recovery partition for other image builders, made from the cache alone.

Runs after the session's real build (the `built_image` fixture), with an mmdebstrap on PATH that
fails: the same inputs must not run it again.
"""

from __future__ import annotations

import subprocess
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from mkimage.build import GRUB_SNIPPET, RECOVERY_IMAGE, build_recovery_only
from mkimage.config import MiB
from mkimage.grub import BOOTLOADER, slot_menu
from mkimage.recoveryos import _base_archive, recovery_spec
from mkimage.rootfs import cache_path
from recovery.core.slots import RecoveryImage


@pytest.fixture
def no_mmdebstrap(tmp_path, monkeypatch):
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mmdebstrap").write_text("#!/bin/sh\necho 'mmdebstrap was run' >&2\nexit 97\n")
    (bin_dir / "mmdebstrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def overlay_listing(initrd: Path, base: Path, tmp_path: Path) -> list[str]:
    """The names in the initrd's second archive (the overlay), which follows the cached base archive."""
    data = initrd.read_bytes()
    head = base.read_bytes()
    assert data.startswith(head), "the initrd must start with the cached base archive"
    rest = data[len(head):]
    for pad in range(4):  # the overlay archive is padded to 4 bytes with zeros for the kernel
        part = tmp_path / "overlay.cpio.zst"
        part.write_bytes(rest[: len(rest) - pad] if pad else rest)
        unpacked = subprocess.run(["zstd", "-dc", str(part)], capture_output=True)
        if unpacked.returncode == 0:
            listing = subprocess.run(["cpio", "-t", "--quiet"], input=unpacked.stdout, capture_output=True, check=True)
            return listing.stdout.decode().split("\n")
    raise AssertionError("the overlay archive does not decompress")


def test_recovery_only_from_cache(built_image, tmp_path, no_mmdebstrap):
    config = replace(built_image.config, output=tmp_path / "out")
    out = build_recovery_only(config)
    assert out == tmp_path / "out/recovery"
    assert (out / "vmlinuz").read_bytes()[:2] == b"MZ"
    initrd = out / "initrd.img"
    assert initrd.stat().st_size <= 40 * MiB
    assert (out / GRUB_SNIPPET).read_text().count("menuentry") == 3
    assert (out / "grub-stub.cfg").read_text() == (BOOTLOADER / "stub.cfg").read_text()
    assert (out / "menu.cfg").read_text() == slot_menu()  # the menu goes with the recovery
    image = out / RECOVERY_IMAGE
    assert image.stat().st_size == config.partitions.recovery
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    # Two slots holding the same recovery, each with its record (recovery/core/slots.py)
    record = RecoveryImage.read(out)
    assert record is not None and record.version == config.version
    assert record == RecoveryImage.of(out, config.version)
    for slot in ("a", "b"):
        listing = subprocess.run(["debugfs", "-R", f"ls /{slot}", str(image)], capture_output=True, text=True,
                                 check=True).stdout
        assert {"vmlinuz", "initrd.img", "recovery.json"} <= set(listing.split()), listing
        dumped = subprocess.run(["debugfs", "-R", f"cat /{slot}/recovery.json", str(image)], capture_output=True,
                                check=True).stdout
        assert RecoveryImage.from_json(dumped) == record
    assert (tmp_path / "out/keys/signing.pub").exists()

    base = _base_archive(cache_path(recovery_spec(config), config.cache), config.cache)
    names = overlay_listing(initrd, base, tmp_path)
    assert "init" in names
    assert "etc/recovery/recovery.toml" in names and "etc/recovery/keys/signing.pub" in names
    # the recovery OS carries the shared core and its own program, not the running system's
    site = "usr/lib/python3/dist-packages/recovery/"
    assert f"{site}os/pid1.py" in names and f"{site}core/bundle.py" in names and "usr/local/bin/recovery" in names
    assert not [n for n in names if n.startswith(f"{site}updated")] and "usr/local/bin/reflashctl" not in names
    assert "usr/lib/x86_64-linux-gnu/libxml2.so.2" in names
    assert any(n.endswith("/virtio_blk.ko") for n in names) and any(n.endswith("/ext4.ko") for n in names)


def test_recovery_toml_is_what_recovery_config_reads():
    from mkimage.config import load_config
    from mkimage.recoveryos import recovery_toml
    from recovery.os.config import RecoveryConfig

    text = recovery_toml(load_config(None))
    parsed = RecoveryConfig.from_dict(tomllib.loads(text))
    assert parsed.product == "demo-appliance"
    assert tuple(map(str, (parsed.cfg, parsed.system, parsed.recovery, parsed.storage))) == (
        "PARTLABEL=cfg", "PARTLABEL=system", "PARTLABEL=recovery", "PARTLABEL=storage",
    )
    assert str(parsed.keys) == "/etc/recovery/keys" and parsed.device_timeout == 30
    assert parsed.version == "1.0.0"  # the factory's, unless built for a release that carries it
    assert RecoveryConfig.from_dict(tomllib.loads(recovery_toml(load_config(None), "2.0.0"))).version == "2.0.0"
