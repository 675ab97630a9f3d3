"""The `reflash` command line run as a user runs it (`python -m mkimage` is `reflash`): keygen, bundle, verify."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .sample_tree import make_small_tree


def cli(*argv: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *map(str, argv)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cli")
    keygen = cli("mkimage", "keygen", base / "keys")
    assert keygen.returncode == 0, keygen.stderr
    assert (base / "keys/signing.pem").exists() and (base / "keys/signing.pub").exists()
    tree = make_small_tree(base / "tree")
    bundle = cli("mkimage", "bundle", "--no-boot-check", "--key", base / "keys/signing.pem", "--product", "demo", "--version", "2.0",
                 tree, "-o", base / "demo.bundle")
    assert bundle.returncode == 0, bundle.stderr
    assert bundle.stdout.startswith(f"wrote {base / 'demo.bundle'}: demo 2.0, 7 files")
    return base / "keys", base / "demo.bundle"


def test_verify_accepts_a_good_bundle(made: tuple[Path, Path]) -> None:
    keys, bundle = made
    result = cli("mkimage", "verify", "--keys", keys, "--product", "demo", bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("valid: demo 2.0, signed by ")
    assert result.stderr == ""


def test_verify_rejects_with_one_line(made: tuple[Path, Path], tmp_path: Path) -> None:
    keys, bundle = made
    result = cli("mkimage", "verify", "--keys", keys, "--product", "other", bundle)
    assert (result.returncode, result.stderr) == (1, "rejected: wrong product: the bundle is for demo, this system is other\n")

    tampered = tmp_path / "tampered.bundle"
    data = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tar:
        data[tar.getmember("rootfs.tar.zst").offset_data + 50] ^= 0xFF
    tampered.write_bytes(bytes(data))
    result = cli("mkimage", "verify", "--keys", keys, tampered)
    assert result.returncode == 1
    assert result.stderr.startswith("rejected: payload sha256 mismatch") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_verify_usage_error_exits_2(made: tuple[Path, Path]) -> None:
    _, bundle = made
    result = cli("mkimage", "verify", bundle)  # --keys is required
    assert result.returncode == 2
    assert "--keys" in result.stderr


def test_mkimage_errors_are_one_line(made: tuple[Path, Path], tmp_path: Path) -> None:
    keys, _ = made
    again = cli("mkimage", "keygen", keys)
    assert (again.returncode, again.stderr.splitlines()[-1:]) == (
        1, [f"refused: {keys / 'signing.pem'} already exists: refusing to overwrite a key"]
    )
    missing = cli("mkimage", "bundle", "--key", tmp_path / "nokey.pem", "--product", "p", "--version", "1",
                  tmp_path, "-o", tmp_path / "x.bundle")
    assert missing.returncode == 1
    assert missing.stderr.startswith("rejected: cannot read private key") and missing.stderr.count("\n") == 1
    assert not (tmp_path / "x.bundle").exists()
