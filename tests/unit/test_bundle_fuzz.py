"""Hypothesis: whatever bytes verify_bundle is given, it answers with a result or Rejected, nothing else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mkimage.bundle import create_bundle, generate_keys
from recovery.core.manifest import Manifest
from recovery.core.bundle import VerifiedBundle, verify_bundle
from recovery.core.errors import Rejected
from recovery.core.keys import Keyring

from .sample_tree import make_small_tree

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Keyring, bytes, Manifest, Path]:
    base = tmp_path_factory.mktemp("fuzz")
    generate_keys(base / "keys")
    tree = make_small_tree(base / "tree")
    # Uncompressed and small, so mutations land in headers, JSON and payload alike.
    manifest = create_bundle(tree, base / "good.bundle", key=base / "keys/signing.pem", product="p",
                             version="1", compression="none", check_boot=False)
    return Keyring.load(base / "keys"), (base / "good.bundle").read_bytes(), manifest, base


def outcome(data: bytes, keyring: Keyring, directory: Path, **kw: object) -> VerifiedBundle | Rejected:
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".bundle") as f:
        f.write(data)
        f.flush()
        try:
            return verify_bundle(f.name, keyring, **kw)  # type: ignore[arg-type]
        except Rejected as e:
            assert str(e) and "\n" not in str(e)
            return e


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_are_rejected(world: tuple[Keyring, bytes, Manifest, Path], data: bytes) -> None:
    keyring, _, _, base = world
    assert isinstance(outcome(data, keyring, base), Rejected)


@FUZZ
@given(data=st.data())
def test_mutated_bundles_are_rejected_or_still_the_same_bundle(
    world: tuple[Keyring, bytes, Manifest, Path], data: st.DataObject
) -> None:
    keyring, good, manifest, base = world
    offset = verify_bundle(base / "good.bundle", keyring).payload_offset
    payload = good[offset : offset + manifest.payload.size]
    bundle = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]), label="kind")
        at = data.draw(st.integers(0, max(len(bundle) - 1, 0)), label="at")
        if kind == "flip" and bundle:
            bundle[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and bundle:
            bundle[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del bundle[at:]
        elif kind == "insert":
            bundle[at:at] = data.draw(st.binary(min_size=1, max_size=600))
        elif kind == "delete":
            del bundle[at : at + data.draw(st.integers(1, 600))]
    result = outcome(bytes(bundle), keyring, base, compute_sha256=True)
    if isinstance(result, VerifiedBundle):
        # A few header bytes are not meaningful (e.g. a checksum's terminator); anything else must be caught.
        assert result.manifest == manifest
        size = manifest.payload.size
        assert bytes(bundle)[result.payload_offset : result.payload_offset + size] == payload
