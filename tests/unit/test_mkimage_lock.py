"""Two builds into one output directory: the second stops at once, with one line, and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mkimage.cli import main
from mkimage.outlock import hold_output
from recovery.core.errors import Rejected

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from pathlib import Path
from mkimage.outlock import hold_output
with hold_output(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path: Path):
    """The output directory, locked by another process as a running build holds it."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, out], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("command", ["build", "recovery"])
def test_a_second_build_into_the_same_directory_stops_with_one_line(
    held, command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, proc = held

    def started(*args: object) -> None:
        raise AssertionError("the build started although another one holds the directory")

    # Should the lock not hold, fail here rather than run mmdebstrap for minutes.
    monkeypatch.setattr("mkimage.build._recovery_first", started)
    before = sorted(p.name for p in out.iterdir())
    assert main([command, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"another build is writing into {out} (pid {proc.pid}, since " in err, err
    assert "build into another directory with -o" in err
    # Nothing was started: no work directory, no keys, no log, no recovery.
    assert sorted(p.name for p in out.iterdir()) == before == [".lock"]


def test_the_lock_is_free_once_the_holder_is_gone(held) -> None:
    out, proc = held
    with pytest.raises(Rejected, match="another build is writing"):
        with hold_output(out):
            pass
    proc.kill()
    proc.wait()
    with hold_output(out):  # a killed build leaves nothing locked
        assert f"pid {os.getpid()}," in (out / ".lock").read_text()
