"""The gooseBit plugin (integrations/goosebit-reflash): its manifest reader on real and hostile files,
agreeing with our own verified manifest, and its upload route inside a real gooseBit."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from recovery.core.bundle import verify_bundle
from recovery.core.keys import Keyring

from .goosebit_support import REPO, Goosebit, goosebit
from .reflashctl_support import PRODUCT, Releases


def _manifest_module() -> ModuleType:
    # Loaded by path: the plugin's package is installed only in gooseBit's venv, and this module is
    # standard library only for exactly that reason.
    path = REPO / "integrations/goosebit-reflash/goosebit_reflash/manifest.py"
    spec = importlib.util.spec_from_file_location("goosebit_reflash_manifest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


manifest = _manifest_module()


def tar_of(path: Path, *members: tuple[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_it_reads_what_our_verification_reads(releases: Releases) -> None:
    for version in ("1.0.0", "2.0.0", "1.10.0"):
        bundle = releases.bundles[version]
        verified = verify_bundle(bundle, Keyring.load(releases.keys), product=PRODUCT)
        info = manifest.read_info(bundle)
        assert (info.product, info.version) == (verified.manifest.product, verified.manifest.version) == (PRODUCT, version)


@pytest.mark.parametrize("members, why", [
    ((), "not a tar archive"),
    ((("payload", b"x"),), "first member is not manifest.json"),
    ((("manifest.json", b"{not json"),), "is not JSON"),
    ((("manifest.json", b"[]"),), "is not an object"),
    ((("manifest.json", json.dumps({"product": "p\x1b[2J", "version": "2.0.0"}).encode()),), "no usable product"),
    ((("manifest.json", json.dumps({"product": "p", "version": "2.0.0\n; rm"}).encode()),), "no usable version"),
    ((("manifest.json", json.dumps({"product": "p"}).encode()),), "no usable version"),
])
def test_it_refuses_what_is_not_a_bundle(tmp_path: Path, members: tuple[tuple[str, bytes], ...], why: str) -> None:
    path = tmp_path / "x.bundle"
    if members:
        tar_of(path, *members)
    else:
        path.write_bytes(b"hsqs" + b"\0" * 600)  # a squashfs (RAUC) magic, say
    with pytest.raises(manifest.NotABundle, match=why):
        manifest.read_info(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Goosebit]:
    with goosebit(tmp_path_factory.mktemp("goosebit-plugin")) as g:
        yield g


def test_the_upload_becomes_goosebit_software(server: Goosebit, releases: Releases) -> None:
    software = server.upload(releases.bundles["1.10.0"], hw_revision="plugin-test")
    listed = {s["id"]: s for s in server.call("GET", "/api/v1/software")["software"]}
    assert listed[software]["version"] == "1.10.0"
    assert [(c["model"], c["revision"]) for c in listed[software]["compatibility"]] == [(PRODUCT, "plugin-test")]
    with pytest.raises(AssertionError, match="HTTP 409"):  # the same version for the same hardware
        server.upload(releases.bundles["1.10.0"], hw_revision="plugin-test")


def test_the_upload_refuses_other_files_and_strangers(server: Goosebit, tmp_path: Path) -> None:
    other = tar_of(tmp_path / "other.bundle", ("payload", b"x"))
    with pytest.raises(AssertionError, match="HTTP 422.*not a reflash bundle"):
        server.upload(other)
    named = tmp_path / "image.swu"
    named.write_bytes(other.read_bytes())
    with pytest.raises(AssertionError, match="HTTP 400"):
        server.upload(named)
    stranger = Goosebit(server.url, server.log)  # no login
    with pytest.raises(AssertionError, match="HTTP 401"):
        stranger.upload(other)
