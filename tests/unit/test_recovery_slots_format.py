"""The recovery's two slots as both sides read them: recovery.json, the version a recovery says it is, and
the recovery named in result.json (recovery/core/slots.py, recovery/os/config.py, recovery/core/result.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recovery.core.errors import Rejected
from recovery.core.result import Outcome, Result
from recovery.core.slots import RecoveryImage, other, write_record
from recovery.os.cmdline import Boot
from recovery.os.config import RecoveryConfig
from recovery.os.installer import recovery_identity

PARTS = {"cfg": "PARTLABEL=cfg", "system": "PARTLABEL=system", "recovery": "PARTLABEL=recovery",
         "storage": "PARTLABEL=storage"}


def _slot(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel" * 100)
    (tmp_path / "initrd.img").write_bytes(b"initrd" * 1000)
    return tmp_path


def test_the_record_describes_the_files_and_reads_back(tmp_path: Path) -> None:
    image = write_record(_slot(tmp_path), "2.0.0")
    assert image.kernel.size == 600 and image.initrd.size == 6000
    assert RecoveryImage.read(tmp_path) == image == RecoveryImage.of(tmp_path, "2.0.0")
    (tmp_path / "initrd.img").write_bytes(b"changed")
    assert RecoveryImage.of(tmp_path, "2.0.0") != image
    assert RecoveryImage.read(tmp_path / "nothing-here") is None
    assert (other("a"), other("b")) == ("b", "a")


@pytest.mark.parametrize(("change", "reason"), [
    (lambda d: d.update(extra=1), r"needs exactly version, kernel and initrd \(and menu\)"),
    (lambda d: d.update(version=""), "version must be a short non-empty string"),
    (lambda d: d["kernel"].update(size=-1), "kernel.size must be a whole number of bytes"),
    (lambda d: d["initrd"].update(size=True), "initrd.size must be a whole number of bytes"),
    (lambda d: d["initrd"].update(sha256="A" * 64), "initrd.sha256 must be 64 lowercase hex digits"),
    (lambda d: d["kernel"].pop("sha256"), "kernel needs exactly size and sha256"),
])
def test_a_malformed_record_is_refused_in_one_line(tmp_path: Path, change, reason: str) -> None:
    data = json.loads(write_record(_slot(tmp_path), "2.0.0").to_json())
    change(data)
    with pytest.raises(Rejected, match=reason):
        RecoveryImage.from_json(json.dumps(data).encode())
    with pytest.raises(Rejected, match="not JSON"):
        RecoveryImage.from_json(b"\xff{")


def test_the_recovery_knows_its_version_and_result_json_names_it() -> None:
    config = RecoveryConfig.from_dict({"product": "p", "version": "2.0.0", "partitions": PARTS})
    assert config.version == "2.0.0" and 'version = "2.0.0"' in config.to_toml()
    assert RecoveryConfig.from_dict({"product": "p", "partitions": PARTS}).version is None
    with pytest.raises(Rejected, match="version must be a non-empty string"):
        RecoveryConfig.from_dict({"product": "p", "version": 2, "partitions": PARTS})
    who = recovery_identity(config, Boot(2, slot="b"))
    assert who == {"version": "2.0.0", "slot": "b"}
    result = Result(Outcome.installed, to_version="2.0.0", recovery=who)
    again = Result.from_json(result.to_json())
    assert json.loads(result.to_json())["recovery"] == {"version": "2.0.0", "slot": "b"}
    assert again.recovery == who and again.recovery_words == "recovery 2.0.0 (slot b)"
    # A recovery from before slots, and a result from before this key
    assert recovery_identity(config, Boot(1)) == {"version": "2.0.0"}
    assert "recovery" not in json.loads(Result(Outcome.installed).to_json())
    assert Result.from_json(b'{"outcome": "installed", "recovery": "junk"}').recovery is None
