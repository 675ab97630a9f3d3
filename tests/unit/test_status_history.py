"""A verdict after failed tries of the same update keeps why they failed (`previous` in result.json),
and `reflashctl status` shows it under the last update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recovery.core.result import EARLIER_CAP, EarlierTry, Outcome, Result, read_result, write_result
from recovery.updated.cli import main

from .reflashctl_support import Releases, System, make_releases, make_system

DESIGN_KEYS = {"outcome", "reason", "from_version", "to_version", "try", "started", "finished", "seconds",
               "bytes", "files"}


def failed(try_: int, version: str = "2.0.0", reason: str = "mkfs.ext4 exited with status 1") -> Result:
    return Result(Outcome.failed, reason=reason, from_version="1.0.0", to_version=version, try_=try_,
                  finished=f"2026-01-01T00:0{try_}:00+00:00")


INSTALLED = Result(Outcome.installed, from_version="1.0.0", to_version="2.0.0", try_=2,
                   seconds={"verify": 3.0, "erase": 1.0, "extract": 37.0}, finished="2026-01-01T00:03:00+00:00")


def test_install_after_a_failed_try_keeps_that_try(tmp_path: Path) -> None:
    write_result(tmp_path, failed(1))
    write_result(tmp_path, INSTALLED)
    data = json.loads((tmp_path / "recovery/result.json").read_text())
    assert data["outcome"] == "installed" and data["try"] == 2
    assert data["previous"] == [{"outcome": "failed", "try": 1, "reason": "mkfs.ext4 exited with status 1",
                                 "finished": "2026-01-01T00:01:00+00:00"}]
    result = read_result(tmp_path)
    assert result is not None and result.previous == (
        EarlierTry(1, "mkfs.ext4 exited with status 1", "2026-01-01T00:01:00+00:00"),)
    assert result.summary() == (
        "installed 1.0.0 -> 2.0.0 in 41 s on 2026-01-01T00:03:00+00:00, after 1 failed try")


def test_failures_chain_oldest_first_and_are_capped(tmp_path: Path) -> None:
    for n in range(1, EARLIER_CAP + 3):
        write_result(tmp_path, failed(n, reason=f"failure {n}"))
    write_result(tmp_path, INSTALLED)
    result = read_result(tmp_path)
    assert result is not None
    assert [p.reason for p in result.previous] == [f"failure {n}" for n in range(3, EARLIER_CAP + 3)]
    assert result.summary().endswith(f", after {EARLIER_CAP} failed tries")


@pytest.mark.parametrize(
    "earlier",
    [
        Result(Outcome.installed, from_version="0.9.0", to_version="2.0.0"),  # not a failure
        Result(Outcome.rejected, reason="bad signature", to_version="2.0.0"),  # not a failure
        failed(1, version="1.5.0"),  # a failure of another update
        None,
    ],
)
def test_other_earlier_results_are_not_kept(tmp_path: Path, earlier: Result | None) -> None:
    if earlier is not None:
        write_result(tmp_path, earlier)
    write_result(tmp_path, INSTALLED)
    data = json.loads((tmp_path / "recovery/result.json").read_text())
    assert set(data) == DESIGN_KEYS  # no `previous` key at all: DESIGN.md's record as it was
    assert read_result(tmp_path) == INSTALLED


def test_a_rejection_after_failures_keeps_them_too(tmp_path: Path) -> None:
    write_result(tmp_path, failed(1))
    rejected = Result(Outcome.rejected, reason="wrong version", to_version="2.0.0")
    write_result(tmp_path, rejected)
    result = read_result(tmp_path)
    assert result is not None and [p.try_ for p in result.previous] == [1]
    assert result.summary().startswith("rejected 2.0.0: wrong version") and result.summary().endswith("1 failed try")


def test_unreadable_previous_entries_make_the_result_unreadable(tmp_path: Path) -> None:
    (tmp_path / "recovery").mkdir()
    (tmp_path / "recovery/result.json").write_text(json.dumps({"outcome": "installed", "previous": ["x"]}))
    assert read_result(tmp_path) is None


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return make_releases(tmp_path_factory.mktemp("releases"))


def test_reflashctl_status_shows_the_earlier_failure(
    tmp_path: Path, releases: Releases, capsys: pytest.CaptureFixture[str]
) -> None:
    system: System = make_system(tmp_path / "system", releases)
    write_result(system.config.cfg, failed(1))
    write_result(system.config.cfg, INSTALLED)
    assert main(["--config", str(system.config_path), "status"], reboot=lambda: None) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("last update:"))
    assert lines[at].startswith("last update: installed 1.0.0 -> 2.0.0 in 41 s")
    assert lines[at + 1] == ("  before that: try 1 failed: mkfs.ext4 exited with status 1 "
                        "on 2026-01-01T00:01:00+00:00")
    assert main(["--config", str(system.config_path), "status", "--json"], reboot=lambda: None) == 0
    last = json.loads(capsys.readouterr().out)["last_result"]
    assert last["previous"][0]["try"] == 1 and last["summary"].endswith("after 1 failed try")
