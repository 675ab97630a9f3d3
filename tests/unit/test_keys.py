"""Signing keys: keygen files and modes, keyids, and the keyring's verdicts."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mkimage.bundle import generate_keys
from recovery.core.errors import Rejected
from recovery.core.keys import Keyring, keyid, load_private_key, load_public_key, public_key_pem, raw_public_key


def test_keyid_is_the_first_16_hex_of_sha256_over_the_raw_key() -> None:
    raw = bytes(range(32))
    assert keyid(raw) == hashlib.sha256(raw).hexdigest()[:16]
    assert keyid(bytes(32)) == "66687aadf862bd77"  # sha256 of 32 zero bytes, by hand
    with pytest.raises(ValueError):
        keyid(bytes(31))


def test_keygen_writes_a_private_pem_0600_and_a_public_key(tmp_path: Path) -> None:
    old = os.umask(0)  # a careless umask must not leak the private key
    try:
        pub = generate_keys(tmp_path / "keys")
    finally:
        os.umask(old)
    pem = tmp_path / "keys/signing.pem"
    assert pub == tmp_path / "keys/signing.pub"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    private, public = load_private_key(pem), load_public_key(pub)
    assert raw_public_key(private.public_key()) == raw_public_key(public)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["signing.pem", "signing.pub"]


def test_keygen_never_overwrites_a_signing_key(tmp_path: Path) -> None:
    generate_keys(tmp_path)
    before = (tmp_path / "signing.pem").read_bytes()
    with pytest.raises(Rejected, match="already exists"):
        generate_keys(tmp_path)
    assert (tmp_path / "signing.pem").read_bytes() == before


def test_keyring_loads_every_pub_and_verifies_with_the_named_key(tmp_path: Path) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "a.pub").write_bytes(public_key_pem(a.public_key()))
    (tmp_path / "b.pub").write_bytes(public_key_pem(b.public_key()))
    (tmp_path / "README").write_text("not a key, not a .pub: ignored\n")
    ring = Keyring.load(tmp_path)
    ka, kb = keyid(raw_public_key(a.public_key())), keyid(raw_public_key(b.public_key()))
    assert set(ring.keys) == {ka, kb}

    ring.verify(ka, a.sign(b"data"), b"data")
    ring.verify(kb, b.sign(b"data"), b"data")
    with pytest.raises(Rejected, match="bad signature"):
        ring.verify(ka, b.sign(b"data"), b"data")  # right key named, wrong key used
    with pytest.raises(Rejected, match="bad signature"):
        ring.verify(ka, a.sign(b"data"), b"datA")
    with pytest.raises(Rejected, match="signed by unknown key 0123456789abcdef"):
        ring.verify("0123456789abcdef", a.sign(b"data"), b"data")


def test_keyring_rejects_an_empty_or_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(Rejected, match="no trusted keys"):
        Keyring.load(tmp_path)
    with pytest.raises(Rejected, match="does not exist"):
        Keyring.load(tmp_path / "nope")


@pytest.mark.parametrize("content, reason", [
    (b"", "not a PEM public key"),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
    (b"x" * 20000, "not a key file"),
])
def test_keyring_rejects_a_broken_pub_file(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "good.pub").write_bytes(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    (tmp_path / "bad.pub").write_bytes(content)
    with pytest.raises(Rejected, match=reason):
        Keyring.load(tmp_path)


def test_keyring_rejects_keys_of_another_algorithm(tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "ec.pub").write_bytes(
        other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(Rejected, match="not an Ed25519 key"):
        Keyring.load(tmp_path)


def test_each_keygen_makes_a_new_key(tmp_path: Path) -> None:
    first = load_public_key(generate_keys(tmp_path / "a"))
    second = load_public_key(generate_keys(tmp_path / "b"))
    assert raw_public_key(first) != raw_public_key(second)
