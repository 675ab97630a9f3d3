"""Revoked keys in a keyring directory, and a key rotation over three releases with real signed bundles."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mkimage.bundle import create_bundle
from mkimage.keyring import install_keyring, new_key, release_keyring, revoke_key
from recovery.core.bundle import verify_bundle
from recovery.core.errors import Rejected
from recovery.core.feed import Feed, verify_feed
from recovery.core.keys import Keyring, keyid, load_private_key, public_key_pem, raw_public_key
from recovery.core.manifest import Signature


def pair(directory: Path, name: str) -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.pub").write_bytes(public_key_pem(key.public_key()))
    return key, keyid(raw_public_key(key.public_key()))


def rejected(fn, *args: object) -> str:
    with pytest.raises(Rejected) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_revoked_key_is_refused_even_with_its_pub_still_there(tmp_path: Path) -> None:
    a, ka = pair(tmp_path, "a")
    b, kb = pair(tmp_path, "b")
    (tmp_path / "revoked").write_text(f"# leaked on 2026-01-02\n\n{ka}  # a.pub is a stale copy\n")
    ring = Keyring.load(tmp_path)
    assert set(ring.keys) == {kb} and ring.revoked == {ka}
    assert ka not in ring and kb in ring
    assert rejected(ring.verify, ka, a.sign(b"data"), b"data") == f"signed by revoked key {ka}"
    ring.verify(kb, b.sign(b"data"), b"data")
    # An unknown key keeps its message.
    assert rejected(ring.verify, "0123456789abcdef", b.sign(b"data"), b"data").startswith(
        "signed by unknown key 0123456789abcdef (trusted: ")


def test_a_revoked_key_without_a_pub_is_still_refused(tmp_path: Path) -> None:
    a, ka = pair(tmp_path / "other", "a")
    pair(tmp_path, "b")
    (tmp_path / "revoked").write_text(f"{ka}\n")
    ring = Keyring.load(tmp_path)
    assert rejected(ring.verify, ka, a.sign(b"data"), b"data") == f"signed by revoked key {ka}"


@pytest.mark.parametrize("content, line, shown", [
    ("0123456789abcdeg\n", 1, "'0123456789abcdeg'"),
    ("# fine\n0123456789ABCDEF\n", 2, "'0123456789ABCDEF'"),
    ("0123456789abcdef\n\n0123456789abcde\n", 3, "'0123456789abcde'"),
    ("0123456789abcdef 0123456789abcdef\n", 1, "'0123456789abcdef 0123456789abcdef'"),
])
def test_a_malformed_revoked_list_is_rejected_naming_file_and_line(
    tmp_path: Path, content: str, line: int, shown: str
) -> None:
    pair(tmp_path, "a")
    (tmp_path / "revoked").write_text(content)
    reason = rejected(Keyring.load, tmp_path)
    assert reason == (f"revoked-key list {tmp_path / 'revoked'} line {line}: {shown} is not a keyid "
                      "(16 lowercase hex digits)")


def test_a_revoked_list_that_is_no_text_is_rejected(tmp_path: Path) -> None:
    pair(tmp_path, "a")
    (tmp_path / "revoked").write_bytes(b"\xff\xfe\n")
    assert rejected(Keyring.load, tmp_path) == f"revoked-key list {tmp_path / 'revoked'} is not UTF-8 text"
    (tmp_path / "revoked").write_bytes(b"0123456789abcdef\n" * 70000)
    assert "larger than" in rejected(Keyring.load, tmp_path)


def test_a_keyring_whose_keys_are_all_revoked_trusts_nothing(tmp_path: Path) -> None:
    _, ka = pair(tmp_path, "a")
    _, kb = pair(tmp_path, "b")
    (tmp_path / "revoked").write_text(f"{ka}\n{kb}\n")
    reason = rejected(Keyring.load, tmp_path)
    assert reason.startswith("no trusted keys: ") and "all revoked" in reason
    (tmp_path / "a.pub").unlink()
    (tmp_path / "b.pub").unlink()
    assert rejected(Keyring.load, tmp_path) == f"no trusted keys: {tmp_path} holds no *.pub file"


def test_a_feed_signed_by_a_revoked_key_is_refused(tmp_path: Path) -> None:
    a, ka = pair(tmp_path, "a")
    pair(tmp_path, "b")
    (tmp_path / "revoked").write_text(f"{ka}\n")
    raw = Feed("demo", ()).to_json()
    signature = Signature(ka, a.sign(raw)).to_json()
    assert rejected(verify_feed, raw, signature, Keyring.load(tmp_path)) == f"release feed signed by revoked key {ka}"


def make_tree(root: Path, version: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(f'NAME="Demo"\nVERSION_ID={version}\n')
    return root


def test_rotation_over_three_releases(tmp_path: Path) -> None:
    """A signs 2.0.0, which introduces B; B signs 3.0.0, which revokes A; 3.0.0 then refuses A's bundles."""
    keys = tmp_path / "keys"
    _, _, ka = new_key(keys, "a")
    build = {}

    def release(version: str, signing_key: str) -> tuple[Path, Path]:
        keyring = release_keyring(keys, signing_key)
        installed = tmp_path / version / "etc/recovery/keys"  # what the release's tree trusts
        install_keyring(keyring, installed)
        bundle = tmp_path / f"demo-{version}.bundle"
        create_bundle(make_tree(tmp_path / f"tree-{version}", version), bundle, key=keyring.signing,
                      product="demo", version=version, check_boot=False)
        build[version] = keyring
        return bundle, installed

    # 2.0.0: a new key B in the directory, still signed by A.
    _, _, kb = new_key(keys, "b")
    bundle2, ring2 = release("2.0.0", "a.pem")
    assert build["2.0.0"].signing_keyid == ka and sorted(p.name for p in ring2.iterdir()) == ["a.pub", "b.pub"]

    # 3.0.0: signed by B, A revoked (its .pub stays in the directory as a stale copy).
    assert revoke_key(keys, ka)
    bundle3, ring3 = release("3.0.0", "b.pem")
    assert build["3.0.0"].signing_keyid == kb and build["3.0.0"].revoked == [ka]
    assert sorted(p.name for p in ring3.iterdir()) == ["b.pub", "revoked"]

    # A bundle A signed after the rotation (a leaked A, say): 3.0.0 refuses it, 2.0.0 would take it.
    forged = tmp_path / "forged.bundle"
    create_bundle(make_tree(tmp_path / "tree-forged", "3.0.1"), forged, key=keys / "a.pem",
                  product="demo", version="3.0.1", check_boot=False)
    for a_signed in (bundle2, forged):
        assert rejected(verify_bundle, a_signed, Keyring.load(ring3)) == f"signed by revoked key {ka}"
    assert verify_bundle(bundle3, Keyring.load(ring3)).keyid == kb

    # 2.0.0 trusts both: the update to 3.0.0 (signed by B) goes through.
    assert verify_bundle(bundle2, Keyring.load(ring2)).keyid == ka
    assert verify_bundle(bundle3, Keyring.load(ring2)).keyid == kb

    # A stale A.pub put back into 3.0.0's keyring changes nothing: revoked stays revoked.
    (ring3 / "a.pub").write_bytes(public_key_pem(load_private_key(keys / "a.pem").public_key()))
    assert rejected(verify_bundle, forged, Keyring.load(ring3)) == f"signed by revoked key {ka}"
