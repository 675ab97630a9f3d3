"""The reliability table: a pytest plugin that counts how each fault scenario ended and writes docs/reliability.md.

Loaded with `-p tests.reliability` (the Makefile's test and reliability targets do). It registers the
`reliability` marker (full matrix only: `make test` deselects it with `-m "not reliability"`) and the
`scenario` fixture, through which a test names its scenario, says what it checked and adds notes
(seeds, where a power cut landed). Property-based tests count one run per Hypothesis example; tests
in the hostile-input modules are mapped to scenarios by module. `--reliability-table FILE` writes the
table at the end of the session, whatever the outcome: it shows failures, it does not hide them.
With `--reliability-merge`, a session that ran only part of the matrix replaces just its own rows: the
rows of scenarios it did not run are carried from FILE unchanged, each naming the run it came from.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

RUNS = pytest.StashKey["Scenario"]()
RESULTS = pytest.StashKey[list["Scenario"]]()

# Tests that predate the plugin, by module: (scenario, what was checked).
MODULES: dict[str, tuple[str, str]] = {
    "test_instruction_fuzz.py": (
        "Fuzzing: instruction parser (arbitrary, mutated and structured blocks; grub-editenv differential)",
        "`parse_instruction` returns an Instruction or raises `Rejected` with a one-line reason, never another "
        "exception or a hang; what it accepts, grub-editenv reads the same",
    ),
    "test_bundle_fuzz.py": (
        "Fuzzing: bundle reader (arbitrary bytes, mutated bundles)",
        "`verify_bundle` raises `Rejected` with a one-line reason, or the mutation was meaningless and the "
        "manifest and payload are the original ones",
    ),
    "test_hostile.py": (
        "Hostile archives applied to a directory (traversal, absolute paths, symlink/hardlink escapes, "
        "duplicates, directory replaced by a symlink, huge claimed size)",
        "`extract_payload` fails with the reason; every path outside the target keeps mode, link count, "
        "mtime and content; no stray files, no leftover threads",
    ),
    "test_fuzz_manifest.py": (
        "Fuzzing: manifest parser `Manifest.parse` (arbitrary bytes, arbitrary JSON, mutated manifests)",
        "a Manifest that writes back to itself, or `Rejected` with a one-line reason; never another exception",
    ),
    "test_fuzz_hostile.py": (
        "Hostile archives: enormous sizes (pax, base-256, petabyte sparse) and generated escaping archives",
        "success or `Failed` with a one-line reason; nothing outside the target changes; nothing resolves "
        "outside the target; working directory kept",
    ),
}


@dataclass
class Scenario:
    """What one test contributes to the table; tests fill it through the `scenario` fixture."""

    name: str
    checked: str = ""
    runs: int = 1
    ok: int | None = None  # None: 1 if the test passed, else 0 (per Hypothesis example for fuzz tests)
    notes: list[str] = field(default_factory=list)
    nodeid: str = ""
    outcome: str = "not run"
    seconds: float = 0.0

    def note(self, text: str) -> None:
        self.notes.append(text)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-table", metavar="FILE", default=None,
        help="write the reliability table (markdown) of the scenarios run in this session to FILE",
    )
    parser.addoption(
        "--reliability-merge", action="store_true", default=False,
        help="keep FILE's rows of the scenarios this session did not run (a partial run of the matrix)",
    )


_CONFIG: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _CONFIG
    config.addinivalue_line("markers", "reliability: part of the full reliability matrix only (make reliability)")
    config.stash[RESULTS] = []
    _CONFIG = config


def _default(item: pytest.Item) -> Scenario | None:
    mapped = MODULES.get(item.path.name)
    if mapped is None and item.path.name.startswith("test_fuzz_"):
        doc = (item.module.__doc__ or item.path.stem).strip().splitlines()[0] if hasattr(item, "module") else ""
        mapped = (f"Fuzzing: {doc.rstrip('.')}", "")
    if mapped is None:
        return None
    return Scenario(name=mapped[0], checked=mapped[1])


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Scenario:
    """This test's entry in the reliability table: set `name`, `checked`, add `note(...)`s."""
    found = request.node.stash.get(RUNS, None)
    if found is None:
        found = request.node.stash[RUNS] = Scenario(name=request.node.name)
    return found


def pytest_runtest_setup(item: pytest.Item) -> None:
    if RUNS not in item.stash and (default := _default(item)) is not None:
        item.stash[RUNS] = default


_EXAMPLES = re.compile(r"(\d+) passing, (\d+) failing")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    entry = item.stash.get(RUNS, None)
    if entry is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        entry.outcome = report.outcome
        entry.seconds = report.duration
    if report.when != "teardown":
        return
    if report.failed and entry.outcome == "passed":
        entry.outcome = "failed"
    stats = getattr(item, "hypothesis_statistics", None)
    if stats:
        found = [(int(p), int(f)) for p, f in _EXAMPLES.findall(stats)]
        passing, failing = sum(p for p, _ in found), sum(f for _, f in found)
        entry.runs = passing + failing
        # a failing test: the examples that passed kept the promise, the counterexample did not
        entry.ok = entry.runs if entry.outcome == "passed" else passing
    entry.nodeid = item.nodeid
    # Carried on the report, so the table also comes together when pytest-xdist runs tests in workers.
    report.user_properties.append(("reliability", asdict(entry)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "teardown" or _CONFIG is None:
        return
    for name, value in report.user_properties:
        if name == "reliability":
            _CONFIG.stash[RESULTS].append(Scenario(**value))


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = session.config.getoption("--reliability-table")
    if target:
        path = Path(target)
        earlier = path.read_text() if session.config.getoption("--reliability-merge") and path.exists() else None
        path.write_text(render(session.config.stash[RESULTS], session.config, earlier=earlier))


def _commit(root: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _profile() -> str:
    try:
        from hypothesis import settings
    except ImportError:
        return "none"
    return f"{getattr(settings, '_current_profile', None) or 'default'}, up to {settings.default.max_examples} examples per test"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_RUN_LINE = re.compile(r"^Run on (?P<when>[^,]+), commit `(?P<commit>[^`]*)`")
_CELLS = re.compile(r"(?<!\\)\|")


@dataclass(frozen=True)
class Carried:
    """What a merged table keeps of an earlier one: rows (cells as written) and detail lines."""

    rows: list[list[str]]
    details: list[str]


def carried(earlier: str, ran: set[str], nodeids: set[str]) -> Carried:
    """The rows of `earlier` whose scenario is not in `ran`, each with the run it came from in its last
    cell, and the detail lines of tests not among `nodeids` (test functions, parameters dropped)."""
    lines = earlier.splitlines()
    origin = "earlier run"
    for line in lines:
        if (m := _RUN_LINE.match(line)) is not None:
            origin = f"{m['when']}, `{m['commit']}`"
            break
    rows: list[list[str]] = []
    details: list[str] = []
    for line in lines:
        if line.startswith("| ") and not line.startswith("| Scenario |"):
            cells = [c.strip() for c in _CELLS.split(line)[1:-1]]
            if len(cells) == 4:
                cells.append(origin)
            if len(cells) == 5 and cells[0].replace("\\|", "|") not in ran:
                rows.append(cells)
        elif line.startswith("- `") and "`: " in line:
            nodeid = line[3:line.index("`: ")]
            if nodeid.split("[")[0] not in nodeids:
                details.append(line)
    return Carried(rows, details)


def render(entries: list[Scenario], config: pytest.Config, *, earlier: str | None = None) -> str:
    """The markdown table: one row per scenario, then each run's notes; with `earlier`, the rows this
    session did not run are carried from it."""
    rows: dict[str, list[Scenario]] = {}
    for e in entries:
        if e.outcome == "skipped":
            continue
        rows.setdefault(e.name, []).append(e)
    skipped = [e for e in entries if e.outcome == "skipped"]
    keep = carried(earlier, set(rows), {e.nodeid.split("[")[0] for e in entries}) if earlier else Carried([], [])
    lines = [
        "# Reliability",
        "",
        "Generated by `make reliability` (`tests/reliability.py`); do not edit by hand. Every power cut is a",
        "SIGKILL of QEMU (no flush, no shutdown), every failing disk a QEMU `blkdebug` filter, every hostile",
        "input real bytes through the real parsers. A scenario is *as promised* when every check of its test",
        "held; fuzzing counts one run per Hypothesis example.",
        "",
        f"Run on {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, commit `{_commit(config.rootpath)}`, "
        f"Hypothesis profile `{_profile()}`. Command: `pytest {' '.join(config.invocation_params.args)}`."
        + (f" {len(keep.rows)} rows were not run by it and are carried from the run their last column names."
           if keep.rows else ""),
        "",
        "| Scenario | Runs | As promised | What was checked | Run |",
        "|---|---:|---:|---|---|",
    ]
    total_runs = total_ok = 0
    for name, group in rows.items():
        runs = sum(e.runs for e in group)
        ok = sum(e.ok if e.ok is not None else (e.runs if e.outcome == "passed" else 0) for e in group)
        total_runs, total_ok = total_runs + runs, total_ok + ok
        checked = next((e.checked for e in group if e.checked), "")
        mark = "" if ok == runs else " **(broken)**"
        lines.append(f"| {_cell(name)} | {runs} | {ok}{mark} | {_cell(checked)} | this one |")
    for cells in keep.rows:
        runs, ok = int(cells[1]), int(cells[2].split()[0])
        total_runs, total_ok = total_runs + runs, total_ok + ok
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Total: {total_ok} of {total_runs} runs ended as promised.", ""]
    noted = [e for group in rows.values() for e in group if e.notes or e.outcome != "passed"]
    if noted or keep.details:
        lines += ["## Runs in detail", ""]
        for e in noted:
            lines.append(f"- `{e.nodeid}`: {e.outcome}, {e.seconds:.0f} s" + (f"; {'; '.join(e.notes)}" if e.notes else ""))
        lines += keep.details
        lines.append("")
    if skipped:
        lines += ["## Skipped", ""] + [f"- `{e.nodeid}`" for e in skipped] + [""]
    lines += [f"Wall time of the session: {time.monotonic() - _START:.0f} s.", ""]
    return "\n".join(lines)


_START = time.monotonic()
