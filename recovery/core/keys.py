"""Ed25519 signing keys: the trusted keyring a bundle's signature is checked against.

Key files are PEM, as `cryptography` and `openssl pkey` read and write them:
- public (`*.pub`): SubjectPublicKeyInfo, `-----BEGIN PUBLIC KEY-----` (`openssl pkey -pubout`);
- private (`signing.pem`): unencrypted PKCS#8, `-----BEGIN PRIVATE KEY-----` (`openssl genpkey -algorithm ed25519`).
A key is named by its keyid: the first 16 hex digits of sha256 over the raw 32-byte public key.

A keyring directory trusts its `*.pub` files, except the keys its optional `revoked` file lists (one
keyid a line; `#` starts a comment): a revoked key is never trusted, even with a `.pub` still beside it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
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
# The revoked-key list beside the *.pub files, and its bound (about 60000 keyids).
REVOKED_NAME = "revoked"
MAX_REVOKED_FILE = 1024 * 1024
KEYID = re.compile(r"[0-9a-f]{16}")


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


def _read_small(path: Path, what: str, limit: int = MAX_KEY_FILE, kind: str = "a key file") -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise Rejected(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(data) > limit:
        raise Rejected(f"{what} {path} is larger than {limit} bytes: not {kind}")
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


def read_revoked(directory: Path) -> tuple[str, ...]:
    """The keyids `directory/revoked` lists, in its order (none when there is no such file).

    Rejected, naming the file and the line, for a line that is neither a keyid, a comment nor blank.
    """
    path = Path(directory) / REVOKED_NAME
    if not path.exists() and not path.is_symlink():
        return ()
    data = _read_small(path, "revoked-key list", MAX_REVOKED_FILE, "a list of keyids")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(f"revoked-key list {path} is not UTF-8 text") from None
    revoked: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not KEYID.fullmatch(entry):
            raise Rejected(f"revoked-key list {path} line {number}: {entry[:40]!r} is not a keyid "
                           "(16 lowercase hex digits)")
        revoked[entry] = None
    return tuple(revoked)


def public_key_files(directory: Path) -> list[tuple[Path, str, Ed25519PublicKey]]:
    """Every `*.pub` in `directory` (sorted by name) with its keyid; Rejected if one is not a valid key."""
    found = []
    for path in sorted(Path(directory).glob("*.pub")):
        key = load_public_key(path)
        found.append((path, keyid(raw_public_key(key)), key))
    return found


@dataclass(frozen=True)
class Keyring:
    """The public keys a bundle may be signed by, by keyid, and the keyids that are never trusted."""

    keys: Mapping[str, Ed25519PublicKey]
    revoked: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def load(cls, directory: Path) -> Keyring:
        """Load every `*.pub` in `directory` but the revoked ones.

        Rejected if there is no `*.pub`, if every one is revoked, if one is not a valid key, or if the
        `revoked` list is malformed.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise Rejected(f"key directory {directory} does not exist")
        revoked = frozenset(read_revoked(directory))
        files = public_key_files(directory)
        keys = {kid: key for _, kid, key in files if kid not in revoked}
        if not files:
            raise Rejected(f"no trusted keys: {directory} holds no *.pub file")
        if not keys:
            raise Rejected(f"no trusted keys: the {len(files)} *.pub in {directory} are all revoked "
                           f"(by {directory / REVOKED_NAME})")
        return cls(keys, revoked)

    def __contains__(self, kid: object) -> bool:
        return kid in self.keys and kid not in self.revoked

    def verify(self, keyid: str, signature: bytes, data: bytes) -> None:
        """Check that `signature` over `data` was made by the key `keyid` of this ring; else Rejected."""
        if keyid in self.revoked:
            raise Rejected(f"signed by revoked key {keyid}")
        key = self.keys.get(keyid)
        if key is None:
            known = ", ".join(sorted(self.keys))
            raise Rejected(f"signed by unknown key {keyid} (trusted: {known})")
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise Rejected(f"bad signature: the manifest was not signed by key {keyid}") from None
