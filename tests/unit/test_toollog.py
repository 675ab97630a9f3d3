"""A build's long tool runs keep the terminal readable: their output goes to DIR/build.log, a few progress
lines show they are alive, a failure prints the log's tail and path, `--verbose` shows everything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mkimage import toollog
from mkimage.toollog import run_logged, tool_log
from recovery.core.errors import Failed

CHATTY = "import sys, time\nfor i in range(300):\n    print(f'Reading database ... {i}%', flush=True)\n    time.sleep(0.005)\n"


def test_output_goes_to_the_log_and_the_terminal_sees_progress_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(toollog, "PROGRESS_EVERY", 0.5)
    log = tmp_path / "out/build.log"
    with tool_log(log):
        run_logged([sys.executable, "-c", CHATTY], what="chatty")
    out, err = capsys.readouterr()
    text = log.read_text()
    assert text.startswith("+ ") and [line for line in text.splitlines()[1:] if line][-1] == "Reading database ... 299%"
    assert sum(1 for line in text.splitlines() if line.startswith("Reading database")) == 300
    assert "Reading database" not in out
    progress = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(progress) <= 6 and all(line.startswith("  chatty: ") for line in progress), progress


def test_a_failure_shows_the_tail_and_names_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "build.log"
    script = "import sys\nfor i in range(50): print('line', i)\nprint('E: Unable to locate package nosuch', flush=True)\nsys.exit(100)\n"
    with tool_log(log), pytest.raises(Failed) as info:
        run_logged([sys.executable, "-c", script], what="mmdebstrap")
    assert str(info.value) == f"{sys.executable} exited with status 100; its whole output is in {log}"
    err = capsys.readouterr().err
    assert f"the last 20 lines of {log}" in err and "E: Unable to locate package nosuch" in err
    assert "line 30" not in err and "line 31" in err  # the tail, not the whole


def test_verbose_shows_everything_and_writes_no_log(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "build.log"
    with tool_log(log, verbose=True), tool_log(tmp_path / "inner.log"):  # an inner log keeps the outer choice
        run_logged([sys.executable, "-c", "print('every line')"], what="x")
    assert "every line" in capfd.readouterr().out
    assert not log.exists() and not (tmp_path / "inner.log").exists()
