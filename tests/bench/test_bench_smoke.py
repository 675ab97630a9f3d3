"""`python -m bench --quick` runs end to end on small inputs and reports every measurement.

Minutes, not seconds: its own folder and marker, so `tests/unit` stays fast (`make test` runs it as a
step of its own).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.tree import SPECS, generate

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.bench
def test_bench_quick(tmp_path: Path) -> None:
    report = tmp_path / "performance.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--repeat", "1", "--cache", tmp_path / "cache", "--output", report],
        cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("| recovery extract_payload |", "| GNU tar -I zstd |", "| recovery verify |", "| sha256sum |"):
        assert re.search(re.escape(row) + r" [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d,]+ \| [\d.]+ \|", out), row
    assert re.search(r"Throughput ours / GNU tar: \*\*[\d.]+x\*\*", out)
    assert re.search(r"Throughput ours / sha256sum: \*\*[\d.]+x\*\*", out)
    memory = re.search(r"\| quick \| [\d.,]+ MiB \| ([\d.,]+) MiB \| [\d.]+ \| ([\d.,]+) MiB \|", out)
    assert memory, out
    # A Python process with its libraries is tens of MiB: not zero, and not the benchmark's own size.
    assert all(5 < float(m.replace(",", "")) < 500 for m in memory.groups())
    assert re.search(r"\| quick \| [\d,]+ \| [\d,]+ \(", out)
    assert re.search(r"\| `recovery.os.erase.erase` \(mkfs.ext4\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out)
    assert re.search(r"Erase / `rm -rf`: \*\*[\d.]+x as fast\*\*", out)
    # the summary lists every figure of the issue; what --quick does not measure says so
    summary = [line for line in out.splitlines() if line.startswith("| ") and line.endswith(" |")][:15]
    assert len([s for s in summary if "not measured" in s]) == 10, summary  # 4 of them the downtime rows
    assert re.search(r"\| payload extraction throughput \| GNU tar \+ zstd on the same payload \| >= 1.0x \| [\d.]+x \| "
                     r"(met|\*\*MISSED\*\*) \|", out)
    assert re.search(r"Measured .*CPUs, [\d.]+ GiB", out)
    text = report.read_text()
    assert text.startswith("# Performance") and "### Peak memory" in text and "### Erasing" in text


def test_tree_is_deterministic(tmp_path: Path) -> None:
    first = generate(SPECS["quick"], tmp_path / "a")
    second = generate(SPECS["quick"], tmp_path / "b")
    assert (first.files, first.bytes) == (second.files, second.bytes)
    names = sorted(p.relative_to(first.path) for p in first.path.rglob("*"))
    assert names == sorted(p.relative_to(second.path) for p in second.path.rglob("*"))
    sample = [n for n in names if (first.path / n).is_file() and not (first.path / n).is_symlink()][:50]
    assert all((first.path / n).read_bytes() == (second.path / n).read_bytes() for n in sample)
