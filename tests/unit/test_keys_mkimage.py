"""The build host's side of key rotation: `reflash key new|revoke|list`, the keyring a release ships
(mkimage/keyring.py) and the image config's `signing_key` (and `bundle_recovery`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mkimage.cli import main as reflash
from mkimage.config import ImageConfig, load_config
from mkimage.keyring import ReleaseKeyring, install_keyring, release_keyring
from recovery.core.errors import Rejected
from recovery.core.keys import Keyring, keyid, load_private_key, load_public_key, raw_public_key


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = reflash(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def new(capsys: pytest.CaptureFixture[str], keys: Path, name: str) -> str:
    code, out, err = run(capsys, "key", "new", name, "-o", str(keys))
    assert code == 0, err
    return keyid(raw_public_key(load_public_key(keys / f"{name}.pub")))


def test_key_new_writes_a_private_pem_0600_and_its_pub(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    old = os.umask(0)  # a careless umask must not leak the private key
    try:
        code, out, err = run(capsys, "key", "new", "b", "-o", str(keys))
    finally:
        os.umask(old)
    assert code == 0, err
    pem, pub = keys / "b.pem", keys / "b.pub"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600 and stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    kid = keyid(raw_public_key(load_private_key(pem).public_key()))
    assert kid == keyid(raw_public_key(load_public_key(pub)))
    assert out == (f"made key b (keyid {kid}) in {keys}: "
                   "the next release built with this key directory introduces it\n")


def test_key_new_never_overwrites_and_defaults_to_keys(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "key", "new", "a")[0] == 0
    before = (tmp_path / "keys/a.pem").read_bytes()
    code, out, err = run(capsys, "key", "new", "a")
    assert (code, out) == (1, "") and err == "refused: keys/a.pem already exists: refusing to overwrite a key\n"
    (tmp_path / "keys/c.pub").write_text("a public key alone\n")
    assert "keys/c.pub already exists" in run(capsys, "key", "new", "c")[2]
    assert not (tmp_path / "keys/c.pem").exists() and (tmp_path / "keys/a.pem").read_bytes() == before
    for bad in ("../x", "x.pem", ".hidden"):
        code, _, err = run(capsys, "key", "new", bad)
        assert code == 1 and err.startswith("refused: key name ")


def test_key_revoke_appends_refuses_the_last_key_and_says_already(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    ka, kb = new(capsys, keys, "a"), new(capsys, keys, "b")
    (keys / "revoked").write_text("# revoked keys\n0123456789abcdef")  # no newline at the end
    code, out, err = run(capsys, "key", "revoke", ka, "--keys", str(keys))
    assert code == 0, err
    assert out.startswith(f"revoked {ka} (a.pub) in {keys}: ")
    assert (keys / "revoked").read_text() == f"# revoked keys\n0123456789abcdef\n{ka}\n"
    assert Keyring.load(keys).revoked == {ka, "0123456789abcdef"}

    assert run(capsys, "key", "revoke", ka, "--keys", str(keys)) == (0, f"{ka} is already revoked in {keys}\n", "")
    before = (keys / "revoked").read_bytes()
    assert run(capsys, "key", "revoke", kb, "--keys", str(keys)) == (
        1, "", f"refused: revoking {kb} leaves no trusted key in {keys}\n")
    code, _, err = run(capsys, "key", "revoke", "3FA9", "--keys", str(keys))
    assert code == 1 and err.startswith("refused: malformed keyid '3FA9': ") and err.count("\n") == 1
    assert (keys / "revoked").read_bytes() == before
    # A keyid no *.pub holds (a key removed earlier that appliances may still trust) can be revoked.
    code, out, _ = run(capsys, "key", "revoke", "fedcba9876543210", "--keys", str(keys))
    assert code == 0 and "(no *.pub here holds it)" in out


def test_key_revoke_refuses_a_malformed_revoked_list(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    new(capsys, keys, "a")
    kb = new(capsys, keys, "b")
    (keys / "revoked").write_text("nonsense\n")
    code, _, err = run(capsys, "key", "revoke", kb, "--keys", str(keys))
    assert code == 1 and f"revoked-key list {keys / 'revoked'} line 1: 'nonsense' is not a keyid" in err
    assert (keys / "revoked").read_text() == "nonsense\n"


def test_key_list_shows_state_and_the_key_that_signs(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    ka, kb = new(capsys, keys, "a"), new(capsys, keys, "b")
    (keys / "revoked").write_text(f"{ka}\nfedcba9876543210\n")
    code, out, err = run(capsys, "key", "list", "--keys", str(keys), "--signing-key", "b.pem")
    assert code == 0, err
    assert out.splitlines() == [
        f"{ka}  a.pub  revoked",
        f"{kb}  b.pub  trusted  signs",
        "fedcba9876543210  -      revoked",
    ]
    # Without a signing key: every line, and a note that none signs.
    code, out, err = run(capsys, "key", "list", "--keys", str(keys))
    assert code == 0 and "signs" not in out and err == f"no key signs: {keys / 'signing.pem'} does not exist\n"
    # A private key without its .pub: it would sign, nothing trusts it.
    (keys / "b.pub").unlink()
    out = run(capsys, "key", "list", "--keys", str(keys), "--signing-key", "b.pem")[1]
    assert f"{kb}  b.pem  untrusted  signs" in out.splitlines()


def test_key_list_takes_key_dir_and_signing_key_from_the_config(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "mykeys"
    new(capsys, keys, "a")
    kb = new(capsys, keys, "b")
    (tmp_path / "image.toml").write_text('key_dir = "mykeys"\nsigning_key = "b.pem"\n')
    code, out, err = run(capsys, "key", "list", "-c", str(tmp_path / "image.toml"))
    assert code == 0, err
    assert f"{kb}  b.pub  trusted  signs" in out.splitlines()


def test_release_keyring_is_the_trusted_pubs_and_the_signing_key(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    ka, kb, kc = new(capsys, keys, "a"), new(capsys, keys, "b"), new(capsys, keys, "c")
    (keys / "revoked").write_text(f"{kc}\n")
    ring = release_keyring(keys, "b.pem")
    assert ring == ReleaseKeyring(public=[keys / "a.pub", keys / "b.pub"], revoked=[kc], signing=keys / "b.pem",
                                  signing_keyid=kb)
    assert release_keyring(keys, "a.pem").signing_keyid == ka


def rejected(key_dir: Path, signing_key: str) -> str:
    with pytest.raises(Rejected) as e:
        release_keyring(key_dir, signing_key)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_release_keyring_refusals(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    ka, kb = new(capsys, keys, "a"), new(capsys, keys, "b")

    assert rejected(keys, "signing.pem").startswith(f"the signing key {keys / 'signing.pem'} does not exist")
    assert rejected(tmp_path / "nope", "a.pem").startswith(f"key_dir {tmp_path / 'nope'} does not exist")

    (keys / "revoked").write_text(f"{ka}\n")
    reason = rejected(keys, "a.pem")
    assert reason.startswith(f"the key that signs, {ka} ({keys / 'a.pem'}), is not trusted by the keyring "
                             "this release ships: ")
    assert "revokes it" in reason

    (keys / "revoked").unlink()
    (keys / "a.pub").unlink()
    reason = rejected(keys, "a.pem")
    assert reason.startswith(f"the key that signs, {ka} ({keys / 'a.pem'}), is not trusted by the keyring "
                             "this release ships: no *.pub")
    assert "a.pub" in reason and "reflash key new" in reason

    (keys / "revoked").write_text(f"{kb}\n")
    assert rejected(keys, "b.pem") == (f"key_dir {keys} leaves no trusted key (its 1 *.pub are all revoked): "
                                       "removing the last trusted key is refused")
    (keys / "b.pub").unlink()
    assert rejected(keys, "b.pem") == (f"key_dir {keys} leaves no trusted key (it holds no *.pub): "
                                       "removing the last trusted key is refused")


def test_install_keyring_copies_the_trusted_pubs_and_the_revoked_list(tmp_path: Path, capsys) -> None:
    keys = tmp_path / "keys"
    ka, kb = new(capsys, keys, "a"), new(capsys, keys, "b")
    dest = tmp_path / "tree/etc/recovery/keys"

    install_keyring(release_keyring(keys, "a.pem"), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a.pub", "b.pub"]  # no revoked file when none is
    assert (dest / "b.pub").read_bytes() == (keys / "b.pub").read_bytes()
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in dest.iterdir())

    (keys / "revoked").write_text(f"# rotated\n{ka}\n")
    install_keyring(release_keyring(keys, "b.pem"), dest)  # again into the same tree: the old a.pub goes
    assert sorted(p.name for p in dest.iterdir()) == ["b.pub", "revoked"]
    assert (dest / "revoked").read_text() == f"{ka}\n"
    ring = Keyring.load(dest)
    assert set(ring.keys) == {kb} and ring.revoked == {ka}

    with pytest.raises(Rejected, match="its own key directory"):
        install_keyring(release_keyring(keys, "b.pem"), keys)


def test_signing_key_and_bundle_recovery_in_the_config(tmp_path: Path) -> None:
    assert ImageConfig.signing_key == "signing.pem" and ImageConfig.bundle_recovery is False
    assert load_config(None).signing_key == "signing.pem"
    path = tmp_path / "image.toml"
    for flag in (True, False):
        path.write_text(f'signing_key = "b.pem"\nbundle_recovery = {str(flag).lower()}\n')
        c = load_config(path)
        assert c.signing_key == "b.pem" and c.bundle_recovery is flag
    for text, reason in (('signing_key = "../b.pem"\n', "signing_key '../b.pem'"),
                         ("signing_key = 3\n", "signing_key 3"),
                         ('bundle_recovery = "yes"\n', "bundle_recovery 'yes': true or false"),
                         ("bundle_recovery = 1\n", "bundle_recovery 1: true or false")):
        path.write_text(text)
        with pytest.raises(Rejected, match=reason):
            load_config(path)
