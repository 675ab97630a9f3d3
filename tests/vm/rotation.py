"""Three releases that rotate the signing key, made from the demo's 2.0.0 tree with mkimage's own key
commands (README "Rotating and revoking signing keys"):

- 2.1.0, signed by A (the build's key), introduces B: its keyring, and its recovery's, is {A, B};
- 3.0.0, signed by B, revokes A: its keyring, and its recovery's, is {B}, A revoked (A's .pub stays in
  the key directory, a stale copy, as it would on a builder's disk);
- 3.0.1, signed by A after the revocation: what an attacker with the leaked key A would try.

Each carries its own recovery OS built with its keyring (mkimage.recoveryos), as `reflash build` does with
`bundle_recovery`. Built once per image and kept beside it.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkimage.bundle import create_bundle
from mkimage.keyring import install_keyring, new_key, release_keyring, revoke_key
from mkimage.recoveryos import build_recovery_os
from recovery.core.slots import IN_RELEASE
from tests.vm.releases import _relabel, unpack_payload


@dataclass(frozen=True)
class Rotation:
    bundles: dict[str, Path]  # version -> bundle
    key_a: str  # keyids
    key_b: str


def rotation_bundles(built: Any) -> Rotation:
    out = built.disk.parent / "rotation"
    out.mkdir(exist_ok=True)
    versions = ("2.1.0", "3.0.0", "3.0.1")
    bundles = {v: out / f"{built.config.product}-{v}.bundle" for v in versions}
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        first, second = out / "keys-2.1.0", out / "keys-3.0.0"
        if not all(b.exists() for b in bundles.values()):
            for d in (first, second):
                shutil.rmtree(d, ignore_errors=True)
            with tempfile.TemporaryDirectory(dir=out) as t:
                _make(built, Path(t), first, second, bundles)
        a = release_keyring(first, "signing.pem").signing_keyid
        b = release_keyring(second, "b.pem").signing_keyid
    return Rotation(bundles, a, b)


def _make(built: Any, work: Path, first: Path, second: Path, bundles: dict[str, Path]) -> None:
    # The key directory of 2.1.0: the build's key A signs, B is new.
    first.mkdir()
    for name in ("signing.pem", "signing.pub"):
        shutil.copy2(built.keys / name, first / name)
    new_key(first, "b")
    # The one of 3.0.0: the same files, B signs, A revoked.
    shutil.copytree(first, second)
    a = release_keyring(first, "signing.pem")
    revoke_key(second, a.signing_keyid)
    b = release_keyring(second, "b.pem")
    for version, keyring, signer in (("2.1.0", a, a.signing), ("3.0.0", b, b.signing), ("3.0.1", b, a.signing)):
        tree = work / version
        unpack_payload(built.bundles["2.0.0"], tree)
        _relabel(tree, "2.0.0", version)
        install_keyring(keyring, tree / "etc/recovery/keys")
        carried = tree / IN_RELEASE
        shutil.rmtree(carried, ignore_errors=True)
        build_recovery_os(built.config, keyring, carried, work / f"recovery-{version}", version=version)
        partial = work / bundles[version].name
        create_bundle(tree, partial, key=signer, product=built.config.product, version=version)
        shutil.move(partial, bundles[version])
        shutil.rmtree(tree)
