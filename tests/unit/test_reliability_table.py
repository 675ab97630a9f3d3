"""The reliability table's merge: a partial run replaces its own rows and carries the others."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.reliability import Scenario, carried, render

EARLIER = """# Reliability

Run on 2026-12-02 06:00 UTC, commit `ad382b6`, Hypothesis profile `full`. Command: `pytest -q x`.

| Scenario | Runs | As promised | What was checked |
|---|---:|---:|---|
| Power cut: recovery: verifying | 1 | 1 | boots on to 2.0.0 |
| Rollback \\| with a bar | 2 | 1 **(broken)** | 1.0.0 restored |

Total: 2 of 3 runs ended as promised.

## Runs in detail

- `tests/vm/test_powercut.py::test_cut[verifying]`: passed, 60 s; cut after verifying
- `tests/vm/test_rollback.py::test_rolled_back[hangs]`: failed, 900 s; timed out
"""


def _config() -> Any:
    return SimpleNamespace(rootpath=Path("/nonexistent"), invocation_params=SimpleNamespace(args=("-q", "y")))


def test_a_partial_run_replaces_its_rows_and_carries_the_rest() -> None:
    run = Scenario(name="Rollback | with a bar", checked="1.0.0 restored", nodeid="tests/vm/test_rollback.py::test_rolled_back[hangs]",
                   outcome="passed", seconds=1200.0)
    table = render([run], _config(), earlier=EARLIER)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Scenario")]
    assert rows == [
        "| Rollback \\| with a bar | 1 | 1 | 1.0.0 restored | this one |",
        "| Power cut: recovery: verifying | 1 | 1 | boots on to 2.0.0 | 2026-12-02 06:00 UTC, `ad382b6` |",
    ]
    assert "Total: 2 of 2 runs ended as promised." in table
    assert "1 rows were not run by it and are carried" in table
    # The failed run's old detail is replaced by this run's; the carried row keeps its own.
    assert "timed out" not in table
    assert "- `tests/vm/test_powercut.py::test_cut[verifying]`: passed, 60 s; cut after verifying" in table


def test_a_merged_table_merges_again_keeping_each_row_s_origin() -> None:
    first = render([Scenario(name="New", nodeid="tests/vm/t.py::test_new", outcome="passed")], _config(), earlier=EARLIER)
    kept = carried(first, {"New"}, {"tests/vm/t.py::test_new"})
    assert [r[0] for r in kept.rows] == ["Power cut: recovery: verifying", "Rollback \\| with a bar"]
    assert {r[4] for r in kept.rows} == {"2026-12-02 06:00 UTC, `ad382b6`"}
    assert kept.rows[1][2] == "1 **(broken)**"


def test_without_an_earlier_table_only_this_run_is_shown() -> None:
    table = render([Scenario(name="Only", nodeid="a.py::test_a", outcome="failed")], _config())
    assert "| Only | 1 | 0 **(broken)** |  | this one |" in table
    assert "carried" not in table
