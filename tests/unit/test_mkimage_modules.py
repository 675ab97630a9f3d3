"""Kernel module trimming: the wanted modules, everything they depend on, and a fresh index."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mkimage.modules import copy_modules, select_modules, trim_modules

KVER = "6.1.0-test-amd64"
DEP = """kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/sound/core/snd.ko:
kernel/drivers/gpu/drm/drm.ko:
"""


def fake_moddir(root: Path) -> Path:
    moddir = root / "usr/lib/modules" / KVER
    for line in DEP.splitlines():
        rel = line.partition(":")[0]
        (moddir / rel).parent.mkdir(parents=True, exist_ok=True)
        (moddir / rel).write_bytes(b"")  # depmod indexes only what modinfo it finds: none here
    (moddir / "modules.dep").write_text(DEP)
    (moddir / "modules.order").write_text("".join(line.partition(":")[0] + "\n" for line in DEP.splitlines()))
    (moddir / "modules.builtin").write_text("")
    return moddir


def test_select_follows_dependencies(tmp_path):
    moddir = fake_moddir(tmp_path)
    chosen = select_modules(moddir, ("drivers/block/virtio_blk.ko*", "fs/ext4/*"))
    assert chosen == {
        "kernel/drivers/block/virtio_blk.ko", "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko", "kernel/fs/ext4/ext4.ko", "kernel/fs/jbd2/jbd2.ko",
        "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko",
    }


needs_depmod = pytest.mark.skipif(shutil.which("depmod") is None, reason="needs depmod (kmod)")


@needs_depmod
def test_trim_removes_the_rest_and_reindexes(tmp_path):
    moddir = fake_moddir(tmp_path)
    removed = trim_modules(tmp_path, KVER, ("fs/ext4/*",))
    assert removed == 5
    left = sorted(str(p.relative_to(moddir)) for p in moddir.rglob("*.ko"))
    assert left == ["kernel/fs/ext4/ext4.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko"]
    assert not (moddir / "kernel/sound").exists()  # emptied directories go too
    # depmod rewrote the index for what is left.
    assert "snd.ko" not in (moddir / "modules.dep").read_text()


@needs_depmod
def test_copy_selected(tmp_path):
    moddir = fake_moddir(tmp_path / "src")
    n = copy_modules(moddir, KVER, ("drivers/block/virtio_blk.ko*",), tmp_path / "dest")
    assert n == 3
    out = tmp_path / "dest/usr/lib/modules" / KVER
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.ko")) == [
        "kernel/drivers/block/virtio_blk.ko", "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
    ]
    assert (out / "modules.dep").exists() and (out / "modules.order").exists()
