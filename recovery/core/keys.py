"""Ed25519 signing keys: the trusted keyring a bundle's signature is checked against.

Key files are PEM, as `cryptography` and `openssl pkey` read and write them:
- public (`*.pub`): SubjectPublicKeyInfo, `-----BEGIN PUBLIC KEY-----` (`openssl pkey -pubout`);
- private (`signing.pem`): unencrypted PKCS#8, `-----BEGIN PRIVATE KEY-----` (`openssl genpkey -algorithm ed25519`).
A key is named by its keyid: the first 16 hex digits of sha256 over the raw 32-byte public key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from recovery.core.errors import Rejected

# A PEM public key is about 113 bytes; anything much larger is not one.
MAX_KEY_FILE = 16 * 1024


def keyid(public_key_raw: bytes) -> str:
    """The first 16 hex digits of sha256 over the raw 32-byte Ed25519 public key."""
    if len(public_key_raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(public_key_raw)}")
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read_small(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise Rejected(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(data) > MAX_KEY_FILE:
        raise Rejected(f"{what} {path} is larger than {MAX_KEY_FILE} bytes: not a key file")
    return data


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a PEM SubjectPublicKeyInfo Ed25519 public key; Rejected if it is anything else."""
    data = _read_small(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise Rejected(f"public key {path} is not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise Rejected(f"public key {path} is not an Ed25519 key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PEM PKCS#8 Ed25519 private key; Rejected if it is anything else."""
    data = _read_small(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise Rejected(f"private key {path} is not an unencrypted PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise Rejected(f"private key {path} is not an Ed25519 key")
    return key


@dataclass(frozen=True)
class Keyring:
    """The public keys a bundle may be signed by, by keyid."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def load(cls, directory: Path) -> Keyring:
        """Load every `*.pub` in `directory`; Rejected if there is none or one is not a valid key."""
        directory = Path(directory)
        if not directory.is_dir():
            raise Rejected(f"key directory {directory} does not exist")
        keys: dict[str, Ed25519PublicKey] = {}
        for path in sorted(directory.glob("*.pub")):
            key = load_public_key(path)
            keys[keyid(raw_public_key(key))] = key
        if not keys:
            raise Rejected(f"no trusted keys: {directory} holds no *.pub file")
        return cls(keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self.keys

    def verify(self, keyid: str, signature: bytes, data: bytes) -> None:
        """Check that `signature` over `data` was made by the key `keyid` of this ring; else Rejected."""
        key = self.keys.get(keyid)
        if key is None:
            known = ", ".join(sorted(self.keys))
            raise Rejected(f"signed by unknown key {keyid} (trusted: {known})")
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise Rejected(f"bad signature: the manifest was not signed by key {keyid}") from None
