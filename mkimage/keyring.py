"""The keyring a release ships and the key that signs it, and the `reflash key` commands (new, revoke, list).

A key directory (the image config's `key_dir`) holds private keys `NAME.pem`, public keys `NAME.pub` and
the optional `revoked` list (recovery/core/keys.py reads it). A release trusts the directory's `*.pub`
less the revoked ones; DESIGN.md ("Signing keys") has the rotation this makes possible.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recovery.core.atomic import atomic_write
from recovery.core.errors import Rejected
from recovery.core.keys import (
    KEYID,
    REVOKED_NAME,
    keyid,
    load_private_key,
    private_key_pem,
    public_key_files,
    public_key_pem,
    raw_public_key,
    read_revoked,
)

log = logging.getLogger(__name__)

DEFAULT_SIGNING_KEY = "signing.pem"
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Refused(Rejected):
    """A key command that would break the keyring, or that names nothing sensible: nothing was written."""

    kind = "refused"


@dataclass(frozen=True)
class ReleaseKeyring:
    """What one release trusts (its `/etc/recovery/keys/`) and the private key its bundle is signed with."""

    public: list[Path]  # the trusted *.pub files of the key directory
    revoked: list[str]  # keyids the release refuses, in the order of the directory's `revoked`
    signing: Path  # the private key that signs (never enters an image)
    signing_keyid: str


def release_keyring(key_dir: Path, signing_key: str = DEFAULT_SIGNING_KEY) -> ReleaseKeyring:
    """The keyring a release built from `key_dir` ships, signed by `key_dir/signing_key`.

    Rejected, in one line, for a missing signing key, a directory that leaves no key trusted, and a
    signing key the keyring does not trust: a release must trust the key its successors are signed with.
    """
    key_dir = Path(key_dir)
    if not key_dir.is_dir():
        raise Rejected(f"key_dir {key_dir} does not exist (make a key in it with `reflash key new NAME -o {key_dir}`)")
    signing = key_dir / signing_key
    if not signing.is_file():
        raise Rejected(f"the signing key {signing} does not exist (signing_key = {signing_key!r}; "
                       f"`reflash key list --keys {key_dir}` shows the keys, `reflash key new NAME -o {key_dir}` makes one)")
    signing_keyid = keyid(raw_public_key(load_private_key(signing).public_key()))
    revoked = read_revoked(key_dir)
    files = public_key_files(key_dir)
    public = [path for path, kid, _ in files if kid not in revoked]
    if not public:
        why = f"its {len(files)} *.pub are all revoked" if files else "it holds no *.pub"
        raise Rejected(f"key_dir {key_dir} leaves no trusted key ({why}): removing the last trusted key is refused")
    trusted = {kid for _, kid, _ in files if kid not in revoked}
    if signing_keyid not in trusted:
        head = f"the key that signs, {signing_keyid} ({signing}), is not trusted by the keyring this release ships"
        if signing_keyid in revoked:
            raise Rejected(f"{head}: {key_dir / REVOKED_NAME} revokes it; sign with a trusted key "
                           f"(signing_key; `reflash key list --keys {key_dir}`)")
        raise Rejected(f"{head}: no *.pub in {key_dir} holds it; put its public key beside it "
                       f"({signing.with_suffix('.pub').name}) or make a new pair with `reflash key new NAME -o {key_dir}` "
                       "(a release must trust the key its successors are signed with)")
    return ReleaseKeyring(public=public, revoked=list(revoked), signing=signing, signing_keyid=signing_keyid)


def install_keyring(keyring: ReleaseKeyring, dest: Path) -> None:
    """Make `dest` hold exactly this keyring: the trusted *.pub files and `revoked` (when it lists any).

    A revoked key's .pub is never copied. A `*.pub` or `revoked` already in `dest` is replaced or removed.
    """
    dest = Path(dest)
    if any(path.parent.resolve() == dest.resolve() for path in keyring.public):
        raise Rejected(f"cannot install a keyring into its own key directory {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    for stale in [*dest.glob("*.pub"), dest / REVOKED_NAME]:
        if stale.is_symlink() or stale.exists():
            stale.unlink()
    for path in keyring.public:
        atomic_write(dest / path.name, path.read_bytes(), mode=0o644)
    if keyring.revoked:
        atomic_write(dest / REVOKED_NAME, "".join(f"{kid}\n" for kid in keyring.revoked).encode(), mode=0o644)


def new_key(directory: Path, name: str) -> tuple[Path, Path, str]:
    """Write `directory/NAME.pem` (private, 0600, unencrypted PKCS#8) and `NAME.pub`; return both and the keyid.

    Never overwrites: a lost signing key strands every appliance that trusts only it.
    """
    if not _KEY_NAME.fullmatch(name) or name.endswith((".pem", ".pub")):
        raise Refused(f"key name {name!r}: letters, digits, '.', '_', '-', without .pem or .pub")
    directory = Path(directory)
    pem, pub = directory / f"{name}.pem", directory / f"{name}.pub"
    for path in (pem, pub):
        if path.exists() or path.is_symlink():
            raise Refused(f"{path} already exists: refusing to overwrite a key")
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    try:
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise Refused(f"{pem} already exists: refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask says
        f.write(private_key_pem(key))
        f.flush()
        os.fsync(f.fileno())
    atomic_write(pub, public_key_pem(key.public_key()), mode=0o644)
    kid = keyid(raw_public_key(key.public_key()))
    log.debug("key %s: private %s, public %s", kid, pem, pub)
    return pem, pub, kid


def revoke_key(directory: Path, kid: str) -> bool:
    """Append `kid` to `directory/revoked` (atomically); False when it is revoked already.

    Refused for a malformed keyid and for a revocation that would leave the directory no trusted key.
    """
    if not KEYID.fullmatch(kid):
        raise Refused(f"malformed keyid {kid!r}: 16 lowercase hex digits (`reflash key list` shows them)")
    directory = Path(directory)
    if not directory.is_dir():
        raise Refused(f"key directory {directory} does not exist")
    revoked = read_revoked(directory)
    if kid in revoked:
        return False
    if not {k for _, k, _ in public_key_files(directory) if k not in revoked and k != kid}:
        raise Refused(f"revoking {kid} leaves no trusted key in {directory}")
    path = directory / REVOKED_NAME
    before = path.read_bytes() if path.exists() else b""
    if before and not before.endswith(b"\n"):
        before += b"\n"
    atomic_write(path, before + f"{kid}\n".encode(), mode=0o644)
    return True


class KeyState(StrEnum):
    """What a release built from the directory makes of a key."""

    trusted = "trusted"
    revoked = "revoked"
    untrusted = "untrusted"  # a private key without its .pub beside it: a build signing with it is refused


@dataclass(frozen=True)
class KeyEntry:
    keyid: str
    file: str  # the .pub's name; the .pem's for a signing key without a .pub; "" for a revoked keyid alone
    state: KeyState
    signs: bool  # the key `reflash build` signs with


def list_keys(directory: Path, signing_key: str = DEFAULT_SIGNING_KEY) -> list[KeyEntry]:
    """Every key of `directory`: each *.pub, the signing key if no .pub holds it, revoked keyids without a file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise Rejected(f"key directory {directory} does not exist")
    signing = directory / signing_key
    signer = keyid(raw_public_key(load_private_key(signing).public_key())) if signing.is_file() else None
    revoked = read_revoked(directory)
    entries = [
        KeyEntry(kid, path.name, KeyState.revoked if kid in revoked else KeyState.trusted, kid == signer)
        for path, kid, _ in public_key_files(directory)
    ]
    seen = {e.keyid for e in entries}
    if signer is not None and signer not in seen:
        state = KeyState.revoked if signer in revoked else KeyState.untrusted
        entries.append(KeyEntry(signer, signing.name, state, True))
        seen.add(signer)
    entries += [KeyEntry(kid, "", KeyState.revoked, False) for kid in revoked if kid not in seen]
    return entries
