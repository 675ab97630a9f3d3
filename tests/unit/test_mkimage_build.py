"""Signing keys for a build: a configured key directory, or a development key made with a warning."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from mkimage.build import _signing_keys
from mkimage.bundle import generate_keys
from mkimage.config import load_config
from recovery.core.errors import Rejected


def test_development_key_is_generated_with_a_warning(tmp_path, caplog):
    config = load_config(None, output=tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        keys, keyring = _signing_keys(config, config.output)
    private = keyring.signing
    assert keys == tmp_path / "out/keys"
    assert private == keys / "signing.pem" and private.exists() and (keys / "signing.pub").exists()
    assert "development signing key" in caplog.text
    # The next build signs with the same key: bundles of both builds stay installable.
    before, public = private.read_bytes(), (keys / "signing.pub").read_bytes()
    (keys / "signing.pub").unlink()
    _signing_keys(config, config.output)
    assert private.read_bytes() == before
    assert (keys / "signing.pub").read_bytes() == public  # the public half made again from the private


def test_configured_key_stays_where_it_is(tmp_path):
    generate_keys(tmp_path / "secret")
    config = replace(load_config(None, output=tmp_path / "out"), key_dir=tmp_path / "secret")
    keys, keyring = _signing_keys(config, config.output)
    assert keyring.signing == tmp_path / "secret/signing.pem"
    assert sorted(p.name for p in keys.iterdir()) == ["signing.pub"]  # never the private key
    assert (keys / "signing.pub").read_bytes() == (tmp_path / "secret/signing.pub").read_bytes()


def test_configured_key_missing(tmp_path):
    (tmp_path / "secret").mkdir()
    config = replace(load_config(None, output=tmp_path / "out"), key_dir=tmp_path / "secret")
    with pytest.raises(Rejected, match="the signing key .*/secret/signing.pem does not exist"):
        _signing_keys(config, config.output)


def test_configured_keyring_with_revoked_keys_goes_into_the_build(tmp_path):
    """The keys releases ship: key_dir's *.pub less the revoked ones, and the revoked list itself."""
    from mkimage.keyring import new_key, revoke_key

    generate_keys(tmp_path / "secret")
    _, _, old = new_key(tmp_path / "secret", "old")
    revoke_key(tmp_path / "secret", old)
    config = replace(load_config(None, output=tmp_path / "out"), key_dir=tmp_path / "secret")
    keys, keyring = _signing_keys(config, config.output)
    assert sorted(p.name for p in keys.iterdir()) == ["revoked", "signing.pub"]
    assert (keys / "revoked").read_text() == f"{old}\n" and keyring.revoked == [old]
    # and a key directory whose signing key is revoked is refused before anything is built
    (tmp_path / "secret/revoked").write_text(f"{old}\n{keyring.signing_keyid}\n")
    with pytest.raises(Rejected, match="leaves no trusted key|is not trusted"):
        _signing_keys(config, config.output)
