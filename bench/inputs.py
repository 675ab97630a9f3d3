"""The benchmark inputs: a cached tree, its signed bundle, and the bare payload cut out for GNU tar."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mkimage.bundle import create_bundle, generate_keys
from recovery.core.keys import Keyring
from recovery.core.bundle import VerifiedBundle, verify_bundle

from . import tree as trees

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    name: str
    tree: trees.Tree
    keys: Path  # the directory with signing.pem and signing.pub
    bundle: VerifiedBundle
    payload: Path  # the payload alone (rootfs.tar.zst), the same bytes the bundle carries

    @property
    def bundle_size(self) -> int:
        return self.bundle.path.stat().st_size


def keys(cache: Path) -> Path:
    directory = cache / "keys"
    if not (directory / "signing.pem").exists():
        generate_keys(directory)
    return directory


def prepare(name: str) -> Inputs:
    """Tree, bundle and payload for trees.SPECS[name], each made once and reused from the cache."""
    tree = trees.cached_tree(name)
    cache = trees.CACHE
    key_dir = keys(cache)
    bundle_path = cache / f"bundle-{name}.bundle"
    payload_path = cache / f"payload-{name}.tar.zst"
    stamp = cache / f"bundle-{name}.json"
    # The bundle is as fresh as the tree it was made from; the tree's stamp says which that is.
    tree_key = (cache / f"tree-{name}.json").read_text()
    if not (stamp.exists() and stamp.read_text() == tree_key and bundle_path.exists() and payload_path.exists()):
        stamp.unlink(missing_ok=True)
        log.info("bench: making the %s bundle", name)
        create_bundle(tree.path, bundle_path, key=key_dir / "signing.pem", product="bench", version="1.0", check_boot=False)
        bundle = verify_bundle(bundle_path, Keyring.load(key_dir))
        _cut_payload(bundle, payload_path)
        stamp.write_text(tree_key)
    bundle = verify_bundle(bundle_path, Keyring.load(key_dir))
    if (bundle.manifest.rootfs_files, bundle.manifest.rootfs_bytes) != (tree.files, tree.bytes):
        raise RuntimeError(f"bundle {bundle_path} does not describe the tree: {bundle.manifest} vs {tree}")
    return Inputs(name=name, tree=tree, keys=key_dir, bundle=bundle, payload=payload_path)


def _cut_payload(bundle: VerifiedBundle, out: Path) -> None:
    left = bundle.manifest.payload.size
    with open(bundle.path, "rb") as src, open(out, "wb") as dst:
        src.seek(bundle.payload_offset)
        while left:
            chunk = src.read(min(left, 8 << 20))
            if not chunk:
                raise RuntimeError(f"{bundle.path} is shorter than its payload")
            dst.write(chunk)
            left -= len(chunk)

