"""Host-side helpers for the install tests: stage bundles and instructions on a disk, craft bad bundles."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recovery.core.instruction import Instruction
from recovery.core.run import run
from tests.unit.sample_tree import assemble_bundle, bundle_members, sign_manifest
from vm import deadlines
from vm.disk import DiskImage

INSTRUCTION = "/update-instruction"
RESULT = "/recovery/result.json"
BUNDLES = "/bundles"
MiB = 1024 * 1024


def ready(built: Any, version: str) -> str:
    """The line the built image's system prints once `version` is up (vm.deadlines.ready)."""
    return deadlines.ready(built.config.product, version)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unmounted_cleanly(disk: DiskImage, name: str) -> bool:
    """Whether the ext4 file system of partition `name` was last unmounted cleanly: its superblock, read
    from an exported copy without replaying anything, does not ask for journal recovery."""
    part = disk.partition(name)
    with tempfile.TemporaryDirectory(dir=disk.path.parent) as tmp:
        copy = Path(tmp) / "part"
        disk.export_range(part.start, part.size, copy)
        out = run(["dumpe2fs", "-h", copy]).stdout.decode(errors="replace")
    features = next((line for line in out.splitlines() if line.startswith("Filesystem features:")), None)
    assert features is not None, out
    return "needs_recovery" not in features.split()


def partition_digest(disk: DiskImage, name: str) -> str:
    """sha256 of a whole partition as the guest sees it, streamed from an exported copy."""
    part = disk.partition(name)
    with tempfile.TemporaryDirectory(dir=disk.path.parent) as tmp:
        dest = Path(tmp) / "part"
        disk.export_range(part.start, part.size, dest)
        h = hashlib.sha256()
        with dest.open("rb") as f:
            while chunk := f.read(4 * MiB):
                h.update(chunk)
    return h.hexdigest()


def stage(
    disk: DiskImage,
    bundle: bytes | None,
    *,
    name: str = "update.bundle",
    version: str = "2.0.0",
    disk_spec: str = "PARTLABEL=storage",
    sha: str | None = None,
) -> Instruction:
    """Put `bundle` on the storage partition and an instruction naming it on cfg, as reflashctl would."""
    path = f"{BUNDLES}/{name}"
    if bundle is not None:
        disk.write_file("storage", path, bundle)
    instruction = Instruction.create(
        disk=disk_spec, file=path, sha256=sha or sha256(bundle or b""), version=version
    )
    disk.write_file("cfg", INSTRUCTION, instruction.to_block())
    return instruction


def read_result(disk: DiskImage) -> dict[str, Any]:
    raw = disk.read_file("cfg", RESULT)
    assert raw is not None, "the recovery wrote no result.json"
    return json.loads(raw)


@dataclass(frozen=True)
class BadBundle:
    """A bundle that must be rejected, and the reason the recovery must give."""

    bundle: bytes
    reason: str  # regex


def _with_manifest(good: bytes, key: Path | None, tmp: Path, **changes: Any) -> bytes:
    """The good bundle with manifest fields changed and re-signed (by `key`, else the original signature)."""
    src = tmp / "good.bundle"
    src.write_bytes(good)
    members = bundle_members(src)
    names = list(members)
    manifest = json.loads(members["manifest.json"])
    for dotted, value in changes.items():
        node = manifest
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    sig = sign_manifest(raw, key) if key is not None else members["manifest.json.sig"]
    out = assemble_bundle(tmp / "bad.bundle", [(names[0], raw), (names[1], sig), (names[2], members[names[2]])])
    return out.read_bytes()


def bad_bundles(good: bytes, signing_key: Path, foreign_key: Path) -> dict[str, BadBundle]:
    """Every way a staged bundle can be wrong that the recovery must catch before touching the system."""
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0x01  # the middle of the file lies in the payload
        return {
            "payload-byte-flipped": BadBundle(bytes(flipped), r"payload sha256 mismatch"),
            "manifest-changed": BadBundle(
                _with_manifest(good, None, tmp, created="2001-01-01T00:00:00Z"), r"bad signature"
            ),
            "untrusted-key": BadBundle(_with_manifest(good, foreign_key, tmp), r"signed by unknown key"),
            "truncated": BadBundle(good[: len(good) * 2 // 3], r"truncated"),
            "wrong-product": BadBundle(
                _with_manifest(good, signing_key, tmp, product="other-appliance"), r"wrong product"
            ),
            "too-large": BadBundle(
                _with_manifest(good, signing_key, tmp, rootfs__bytes=64 * 1024 * MiB), r"does not fit"
            ),
        }


def relabelled(good: bytes, key: Path, version: str) -> bytes:
    """`good` re-signed by `key` claiming another `version`: a genuine bundle for the test keys, at once
    (building one from a tree takes minutes under the image's size)."""
    with tempfile.TemporaryDirectory() as t:
        return _with_manifest(good, key, Path(t), version=version)
