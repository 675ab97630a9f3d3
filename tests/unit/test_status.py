"""The recovery's records on cfg: result.json, the capped log, the config, the kernel command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recovery.core.atomic import atomic_write, durable_unlink
from recovery.os.config import RecoveryConfig
from recovery.core.errors import Rejected
from recovery.os.cmdline import Boot
from recovery.core.result import Outcome, Result, append_log, log_tail, read_result, write_result

CONFIG = {
    "product": "demo-appliance",
    "partitions": {r: f"PARTLABEL={r}" for r in ("cfg", "system", "recovery", "storage")},
}


def test_result_round_trip_uses_design_keys(tmp_path: Path) -> None:
    result = Result(
        outcome=Outcome.installed, from_version="1.0.0", to_version="2.0.0", try_=2,
        started="2026-01-01T00:00:00+00:00", finished="2026-01-01T00:00:41+00:00",
        seconds={"verify": 3.0, "erase": 1.0, "extract": 37.0}, bytes=123, files=4,
    )
    write_result(tmp_path, result)
    data = json.loads((tmp_path / "recovery/result.json").read_text())
    assert set(data) == {"outcome", "reason", "from_version", "to_version", "try", "started",
                         "finished", "seconds", "bytes", "files"}
    assert data["outcome"] == "installed" and data["try"] == 2
    assert read_result(tmp_path) == result
    assert result.summary().startswith("installed 1.0.0 -> 2.0.0 in 41 s on 2026-01-01")


def test_rejected_summary_names_reason() -> None:
    r = Result(outcome=Outcome.rejected, reason="payload sha256 mismatch", to_version="2.0.1")
    assert r.summary().startswith("rejected 2.0.1: payload sha256 mismatch")


def test_unreadable_result_is_none(tmp_path: Path) -> None:
    assert read_result(tmp_path) is None
    (tmp_path / "recovery").mkdir()
    (tmp_path / "recovery/result.json").write_text("{not json")
    assert read_result(tmp_path) is None


def test_log_is_capped_at_line_boundary(tmp_path: Path) -> None:
    for run in range(50):
        append_log(tmp_path, "".join(f"run {run} line {i}\n" for i in range(20)), cap=4096)
    data = (tmp_path / "recovery/log").read_bytes()
    assert len(data) <= 4096
    assert data.startswith(b"run ") and data.endswith(b"run 49 line 19\n")
    assert log_tail(tmp_path, 2) == "run 49 line 18\nrun 49 line 19"


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]
    assert durable_unlink(target) and not durable_unlink(target)


def test_atomic_write_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "f", b"x")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("cmdline", "boot"),
    [
        ("console=ttyS0 recovery.try=2 quiet", Boot(2, False)),
        ("recovery.mode=rescue recovery.try=3", Boot(3, True)),
        ("console=ttyS0", Boot(1, False)),
    ],
)
def test_boot_parse(cmdline: str, boot: Boot) -> None:
    assert Boot.parse(cmdline) == boot


def test_config_round_trip_and_errors(tmp_path: Path) -> None:
    config = RecoveryConfig.from_dict(CONFIG)
    path = tmp_path / "recovery.toml"
    path.write_text(config.to_toml())
    assert RecoveryConfig.load(path) == config
    with pytest.raises(Rejected, match="missing"):
        RecoveryConfig.load(tmp_path / "absent.toml")
    path.write_text('product = "x"\n[partitions]\ncfg = "PARTLABEL=cfg"\n')
    with pytest.raises(Rejected, match="lacks system, recovery, storage"):
        RecoveryConfig.load(path)
    path.write_text("product = [")
    with pytest.raises(Rejected, match="unreadable"):
        RecoveryConfig.load(path)
