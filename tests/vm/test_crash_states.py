"""Every crash state of an update (issue 18). One whole update is recorded under QEMU through
blklogwrites (staging on the running system, the reboot, the recovery's install, the trial, the
confirmation with the recovery update), and one rollback (a release whose init exits, three failed trial
boots, the rollback, the restored release confirmed). From each log every flush point and a seeded
sample of unordered subsets is rebuilt and checked from the host (vm/replay.py, vm/crashcheck.py): cfg
as GRUB reads it and after journal replay, the recovery's slots as GRUB reads them, and for a sample of
the states in which GRUB boots the system, that system partition (a whole release, not half of one).
A seeded sample of flush points spread over each recording is then booted to the end, one test each:
GRUB's first choice must be the one `recovery.core.bootmenu.decide` gave for that state, and the boot
must end on a confirmed release whose tree is its bundle's payload.

The recordings are made once per run (the first test that needs one makes it; the other xdist worker
waits for it) in a directory the workers share.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from recovery.core.bootmenu import Entry
from recovery.core.envblock import parse_envblock
from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.releases import BROKEN, broken_bundle
from tests.vm.staging import INSTRUCTION, read_result, ready, stage
from tests.vm.treecheck import RUNNING_WRITES, Tree, differences, partition_tree, payload_tree
from vm.crashcheck import CfgCheck, Checker, SystemCheck, check_replay, spread
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.machine import Machine
from vm.replay import CrashState, Replay, StateKind
from vm.writelog import Recording, log_entries_now

pytestmark = pytest.mark.reliability

SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or 18
UNORDERED = int(os.environ.get("CRASH_UNORDERED", "60"))  # unordered subsets checked offline
BOOTED = int(os.environ.get("CRASH_BOOTED", "20"))  # update states booted to the end, one test each
ROLLBACK_BOOTED = int(os.environ.get("CRASH_ROLLBACK_BOOTED", "4"))  # rollback states booted to the end
SYSTEM_STATES = int(os.environ.get("CRASH_SYSTEM_STATES", "8"))  # system partitions checked offline
TRANSFER = 900.0
TRIAL = "/recovery/trial"
ROLLBACK = "init-exits"  # the quickest broken release: each trial boot ends in a kernel panic at once
# Console lines that start a phase of the recording, and the phase's name (vm.crashcheck: erasing and
# extracting are the phases in which the system partition is incomplete).
UPDATE_PHASES = (
    (r"recovery: starting", "recovery"),
    (r"recovery: erasing", "erasing"),
    (r"recovery: extracting", "extracting"),
    (r"recovery: finishing", "finishing"),
    (r"trial: 2\.0\.0 is on trial", "trial"),
    (r"trial: confirmed 2\.0\.0", "confirmed"),
)
ROLLBACK_PHASES = (
    (r"recovery: starting", "recovery"),
    (r"recovery: erasing", "erasing"),
    (r"recovery: extracting", "extracting"),
    (r"recovery: finishing", "finishing"),
    (r"recovery: installed ", "trial"),
    (r"recovery: rolling back to 1\.0\.0", "rollback"),
    (r"recovery: erasing", "erasing"),
    (r"recovery: extracting", "extracting"),
    (r"recovery: finishing", "finishing"),
    (r"recovery: rolled back to 1\.0\.0", "restored"),
)
# GRUB's first words on a boot (bootloader/grub.cfg, recovery.cfg), and the entry each one names.
GRUB_SAYS = re.compile(r"Loading the system|Loading the recovery OS \((?:(?P<rollback>rollback, )?try (?P<try>\d+)"
                       r"|(?P<rescue>rescue shell))\)")


@dataclass(frozen=True)
class Recorded:
    """One recording: the disk before it, its write log, the phases (log entries at each phase's start),
    and the versions whose trees a state's system partition may hold."""

    kind: str
    base: Path
    log: Path
    phases: list[tuple[int, str]]
    versions: tuple[str, ...]


def _shared(tmp_path_factory: pytest.TempPathFactory, built: Any) -> Path:
    """Where the recordings go: a directory every xdist worker of this run sees (without xdist: this
    run's own). With CRASH_RECORDINGS=DIR, DIR/<the image's input hash>, kept for later runs on the same
    image (a test changed in how it records needs a new DIR)."""
    if keep := os.environ.get("CRASH_RECORDINGS"):
        path = Path(keep) / built.disk.parent.name
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _record_update(machine: Callable[..., Machine], built: Any, disk: DiskImage, rec: Recording) -> list[tuple[int, str]]:
    phases: list[tuple[int, str]] = []
    m = machine(disk=rec.drive(), probe_kernel=built.recovery / "vmlinuz", name="recorded-update")
    m.expect(ready(built, "1.0.0"), BOOT)
    phases.append((log_entries_now(rec.log), "staging"))
    good = built.bundles["2.0.0"]
    code, out = m.shell(f"reflashctl install /storage/bundles/{good.name} --no-reboot", TRANSFER)
    assert code == 0 and "staged" in out, out
    phases.append((log_entries_now(rec.log), "staged"))
    m.send("systemctl reboot\n")
    for line, phase in UPDATE_PHASES:
        m.expect(line, 4 * RECOVERY)
        phases.append((log_entries_now(rec.log), phase))
    m.expect(r"recovery-slots: recovery 2\.0\.0 in slot b is active", BOOT)
    m.expect(ready(built, "2.0.0"), 2 * BOOT)
    m.stop()
    return phases


def _record_rollback(machine: Callable[..., Machine], built: Any, disk: DiskImage, rec: Recording) -> list[tuple[int, str]]:
    phases: list[tuple[int, str]] = [(0, "staged")]
    m = machine(disk=rec.drive(), probe_kernel=built.recovery / "vmlinuz", name="recorded-rollback")
    for line, phase in ROLLBACK_PHASES:
        m.expect(line, 3 * BOOT + 4 * RECOVERY)
        phases.append((log_entries_now(rec.log), phase))
    m.expect(ready(built, "1.0.0"), 2 * BOOT)
    m.stop()
    return phases


def recorded(kind: str, machine: Callable[..., Machine], built: Any, disk: DiskImage,
             tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """The recording `kind` ("update" or "rollback") of this run, made now if no test has made it yet."""
    root = _shared(tmp_path_factory, built) / f"crash-{kind}"
    root.mkdir(exist_ok=True)
    done = root / "phases.json"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if kind == "update":
                good = built.bundles["2.0.0"]
                disk.write_file("storage", f"/bundles/{good.name}", good.read_bytes())  # before the recording
                versions = ("1.0.0", "2.0.0")
            else:
                bundle = broken_bundle(built, ROLLBACK)
                stage(disk, bundle.read_bytes(), name=bundle.name, version=BROKEN[ROLLBACK].version)
                versions = ("1.0.0", BROKEN[ROLLBACK].version)
            rec = Recording.prepare(disk.path, root / "rec")
            phases = (_record_update if kind == "update" else _record_rollback)(machine, built, disk, rec)
            rec.image.unlink()  # the states are rebuilt from the base and the log
            done.write_text(json.dumps({"phases": phases, "versions": versions}))
    saved = json.loads(done.read_text())
    return Recorded(kind, root / "rec" / "base.img", root / "rec" / "writes.log",
                    [tuple(p) for p in saved["phases"]], tuple(saved["versions"]))


def _bundle(built: Any, version: str) -> Path:
    if version in built.bundles:
        return built.bundles[version]
    kind = next(k for k, b in BROKEN.items() if b.version == version)
    return broken_bundle(built, kind)


def system_is_a_release(built: Any, versions: tuple[str, ...], workdir: Path) -> SystemCheck:
    """A check for `check_replay`: the system partition, after its journal, holds one of `versions`'
    payloads whole (what that release writes to its root when it runs left out: RUNNING_WRITES)."""
    trees: dict[str, Tree] = {}

    def check(state: CrashState, cfg: CfgCheck) -> list[str]:
        if not trees:
            trees.update({v: payload_tree(_bundle(built, v), built.keys) for v in versions})
        workdir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".system-", dir=workdir))
        try:
            image = state.export_partition("system", scratch / "system.img")
            try:
                tree = partition_tree(image, scratch, what="the system partition")
            except AssertionError as e:
                return [f"GRUB boots the system ({cfg.decision.why}), but {e}"]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        found = {v: differences(t, tree, running=RUNNING_WRITES) for v, t in trees.items()}
        if any(not problems for problems in found.values()):
            return []
        return [f"GRUB boots the system ({cfg.decision.why}), which is no whole release: "
                + "; ".join(f"against {v}: {len(p)} differences, first {p[0]}" for v, p in found.items())]

    return check


def _check_all(rec: Recorded, built: Any, tmp_path: Path, scenario: Scenario, what: str) -> None:
    with Replay(rec.base, rec.log, tmp_path / "replay") as replay:
        summary = check_replay(replay, Checker(tmp_path / "check", phases=rec.phases), unordered=UNORDERED, seed=SEED,
                               system=system_is_a_release(built, rec.versions, tmp_path / "system"),
                               system_states=SYSTEM_STATES)
    states = len(summary.checks)
    scenario.runs, scenario.ok = states, summary.held
    scenario.checked = (f"{what}: {summary.flush_points} flush points and {UNORDERED} unordered subsets, each state "
                        "checked offline: cfg as GRUB reads it and after journal replay, the recovery slot GRUB loads, "
                        "and for a sample of the states in which GRUB boots the system, that system a whole release "
                        "(rules: vm/crashcheck.py)")
    scenario.note(f"{rec.kind}: {summary.flush_points} flush points, {states} states checked offline, {summary.held} "
                  f"held, {len(summary.findings)} findings; {len(summary.system_checked)} system partitions checked "
                  f"(seed {SEED})")
    assert not summary.findings, "\n".join(map(str, summary.findings[:20]))
    assert summary.system_checked, "no state in which GRUB boots the system was checked"


RECORDED = {
    "update": ("an update", "one whole update (staging, install, trial, confirm, recovery update)"),
    "rollback": ("a rollback", f"one rollback ({ROLLBACK}: install, three failed trial boots, rollback, 1.0.0 confirmed)"),
}


@pytest.mark.parametrize("kind", list(RECORDED))
def test_every_flush_point_leaves_a_state_that_ends_well(
    kind: str, machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, tmp_path: Path,
    scenario: Scenario, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    scenario.name = f"Crash states of {RECORDED[kind][0]}: every flush point and unordered subsets, checked offline"
    rec = recorded(kind, machine, built_image, vm_disk, tmp_path_factory)
    _check_all(rec, built_image, tmp_path, scenario, RECORDED[kind][1])


def booted_states(points: int, count: int) -> list[int]:
    """The flush points (state indexes 1..points) booted: one drawn by the seed from each of `count`
    equal runs, so the sample spreads over the whole recording."""
    return sorted(spread(range(1, points + 1), count, SEED))


def _state(replay: Replay, index: int) -> Iterator[CrashState]:
    for state in replay.states():
        if state.index == index:
            yield state
            return
    raise AssertionError(f"the replay has no state {index}")


def expected_grub_words(check: CfgCheck) -> str:
    """What GRUB prints first for the entry `decide` chose (GRUB_SAYS's words)."""
    d = check.decision
    match d.entry:
        case Entry.system:
            return "Loading the system"
        case Entry.recovery:
            return f"Loading the recovery OS (try {d.count})"
        case Entry.rollback:
            return f"Loading the recovery OS (rollback, try {d.count})"
        case Entry.rescue:
            return "Loading the recovery OS (rescue shell)"
    raise AssertionError(f"no words for {d.entry}")


def _boot_state(kind: str, k: int, count: int, machine: Callable[..., Machine], built: Any, disk: DiskImage,
                tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, scenario: Scenario) -> None:
    rec = recorded(kind, machine, built, disk, tmp_path_factory)
    with Replay(rec.base, rec.log, tmp_path / "replay") as replay:
        chosen = booted_states(len(replay.points) - 1, count)
        if k >= len(chosen):
            pytest.skip(f"the {kind} recording has only {len(chosen)} flush points to boot")
        for state in _state(replay, chosen[k]):
            assert state.kind is StateKind.flush
            check = Checker(tmp_path / "check", phases=rec.phases).check(state)
            image = state.materialize(tmp_path / f"state-{state.index}.img")
            name = state.name
    shutil.rmtree(tmp_path / "replay")
    scenario.note(f"{kind}: {name}, phase {check.phase}: decide says {check.decision.entry} ({check.decision.why})")

    m = machine(disk=DiskImage.open(image), probe_kernel=built.recovery / "vmlinuz", name=f"{kind}-state-{chosen[k]}")
    first = m.expect(GRUB_SAYS, 4 * RECOVERY)
    assert first.group(0) == expected_grub_words(check), (
        f"{name}: real GRUB said {first.group(0)!r}; bootmenu.decide said {expected_grub_words(check)!r} "
        f"({check.decision.why})")
    if check.decision.slot is not None:
        m.expect(rf"Recovery slot {check.decision.slot}\b", RECOVERY)
    end = m.expect(r"system demo-appliance (?P<v>\S+) ready", 4 * RECOVERY + 4 * BOOT)
    version = end.group("v")
    code, status = m.shell("reflashctl status")
    assert code == 0 and "trial:" not in status, status
    m.stop()

    booted = DiskImage.open(image)
    assert version in rec.versions and (kind == "update" or version == "1.0.0"), version
    assert booted.read_file("cfg", INSTRUCTION) is None, name
    trial = booted.read_file("cfg", TRIAL)
    assert trial is None or not parse_envblock(trial).get("trial_max"), f"{name}: {version} is still on trial"
    if version != "1.0.0" or kind == "rollback":
        result = read_result(booted)
        assert (result["outcome"], result["to_version"]) == (
            ("installed", "2.0.0") if kind == "update" else ("rolled-back", "1.0.0")), result
    with tempfile.TemporaryDirectory(prefix=".tree-", dir=tmp_path) as tmp:
        part, exported = booted.partition("system"), Path(tmp) / "system.img"
        booted.export_range(part.start, part.size, exported)
        problems = differences(payload_tree(_bundle(built, version), built.keys), partition_tree(exported, Path(tmp)),
                               running=RUNNING_WRITES)
    assert not problems, f"{name}: the tree of {version} differs from its bundle: " + "; ".join(problems[:10])
    scenario.note(f"{kind}: {name}: GRUB said {first.group(0)!r} as decide did; ended on {version}, confirmed, tree "
                  "equal to its bundle")
    image.unlink()


BOOTED_CHECKED = {
    "update": ("real GRUB's first choice is bootmenu.decide's for the state; the boot ends, with no help, on a "
               "confirmed release whose tree is its bundle's payload, with no instruction left"),
    "rollback": ("real GRUB's first choice is bootmenu.decide's for the state; the boot ends, with no help, on "
                 "1.0.0 confirmed, its tree its bundle's payload, result.json rolled-back"),
}


@pytest.mark.timeout(7200)  # may wait for the recording, then a recovery install and trial boots
@pytest.mark.parametrize(("kind", "k"), [("update", k) for k in range(BOOTED)] + [
    ("rollback", k) for k in range(ROLLBACK_BOOTED)], ids=lambda v: str(v))
def test_a_seeded_flush_point_boots_to_a_confirmed_release(
    kind: str, k: int, machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, tmp_path: Path,
    scenario: Scenario, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    scenario.name = f"Crash states of {RECORDED[kind][0]}: seeded flush points booted to the end"
    scenario.checked = BOOTED_CHECKED[kind]
    _boot_state(kind, k, BOOTED if kind == "update" else ROLLBACK_BOOTED, machine, built_image, vm_disk, tmp_path,
                tmp_path_factory, scenario)
