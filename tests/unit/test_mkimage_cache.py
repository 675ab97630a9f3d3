"""Root file systems are cached by a hash of their inputs: the same inputs never run mmdebstrap again."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from mkimage.recoveryos import recovery_spec
from mkimage.rootfs import RootfsSpec, build_rootfs, cache_path
from mkimage.system import system_spec
from recovery.core.errors import Failed


@pytest.fixture
def no_mmdebstrap(tmp_path, monkeypatch):
    """An mmdebstrap first on PATH that fails loudly: a build that calls it cannot pass unnoticed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mmdebstrap"
    fake.write_text("#!/bin/sh\necho 'mmdebstrap was run' >&2\nexit 97\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return fake


def spec(**changes) -> RootfsSpec:
    base = RootfsSpec(name="t", suite="bookworm", sources=("deb http://example.invalid/debian bookworm main",),
                      packages=("python3",))
    return replace(base, **changes)


def test_key_covers_every_input():
    keys = {
        spec().key(),
        spec(packages=("python3", "udev")).key(),
        spec(suite="trixie").key(),
        spec(sources=("deb http://other.invalid/debian bookworm main",)).key(),
        spec(hooks=("true",)).key(),
        spec(files=(("etc/x", "1", 0o644),)).key(),
        spec(files=(("etc/x", "1", 0o755),)).key(),
        spec(variant="essential").key(),
    }
    assert len(keys) == 8
    assert spec().key() == spec().key()


def test_a_cache_miss_runs_mmdebstrap(tmp_path, no_mmdebstrap):
    with pytest.raises(Failed, match="mmdebstrap exited with status 97"):
        build_rootfs(spec(), tmp_path / "cache")
    # Nothing half-made counts as cached.
    assert not cache_path(spec(), tmp_path / "cache").exists()


def test_a_cached_root_is_reused(tmp_path, no_mmdebstrap, caplog):
    cache = tmp_path / "cache"
    target = cache_path(spec(), cache)
    (target / "etc").mkdir(parents=True)
    target.with_name(target.name + ".json").write_text("{}")
    with caplog.at_level(logging.INFO):
        assert build_rootfs(spec(), cache) == target
    assert "reusing cached t root" in caplog.text
    # A root without its completion marker is an interrupted build: made again.
    target.with_name(target.name + ".json").unlink()
    with pytest.raises(Failed, match="status 97"):
        build_rootfs(spec(), cache)


def test_second_build_of_the_demo_reuses_its_roots(built_image, no_mmdebstrap, caplog):
    """After the session's real build, the same inputs find both roots in the cache."""
    config = built_image.config
    with caplog.at_level(logging.INFO):
        for s in (system_spec(config), recovery_spec(config)):
            root = build_rootfs(s, config.cache)
            assert (root / "usr/bin/python3").exists()
    assert caplog.text.count("reusing cached") == 2


def test_prune_keeps_the_most_recently_used(tmp_path):
    import os
    import time

    from mkimage.rootfs import prune

    now = time.time()
    for i in range(5):
        (tmp_path / f"system-{i}").mkdir()
        marker = tmp_path / f"system-{i}.json"
        marker.write_text("{}")
        os.utime(marker, (now - 100 * i, now - 100 * i))  # system-0 is the newest
    (tmp_path / "recovery-x").mkdir()
    (tmp_path / "recovery-x.json").write_text("{}")
    prune(tmp_path, "system", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "recovery-x", "recovery-x.json", "system-0", "system-0.json", "system-1", "system-1.json",
    ]
