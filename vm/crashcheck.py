"""Offline checks of one crash state (vm/writelog.py): cfg read twice, as GRUB reads it (no journal
replay: debugfs on the exported partition) and as the recovery reads it (after `e2fsck -p`, which
pid1 runs before it mounts cfg), against the rules in DESIGN.md "Crash states". Nothing boots.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from recovery.core.bootmenu import (
    FILES,
    GRUBENV,
    INSTRUCTION,
    SLOT,
    TRIAL,
    Decision,
    Entry,
    decide,
    load_env,
)
from recovery.core.envblock import ENVBLK_SIZE, parse_envblock
from recovery.core.errors import Rejected
from recovery.core.instruction import parse_instruction
from recovery.core.run import run
from recovery.core.slots import CONTENT as SLOT_CONTENT
from recovery.core.slots import MENU, MENU_SUMS, RECORD, SLOTS, RecoveryImage

from . import VMError
from .replay import CrashState, Replay
from .writelog import copy_sparse

INCOMPLETE = "recovery/system-incomplete"
READ = (*FILES, INCOMPLETE)
# Phases of the recovery between the start of its erase and its removal of the instruction (console
# lines "recovery: erasing", "recovery: extracting"): the system partition is not a system then.
INCOMPLETE_PHASES = frozenset({"erasing", "extracting"})
TRIES = ("1", "2", "3")
BOOTS = tuple(str(n) for n in range(1, 10))


@dataclass(frozen=True)
class CfgView:
    """cfg as one reader sees it. `files` maps each path of `READ` to its bytes: None when there is no
    such file (or a directory is there), `b""` when it is there but cannot be read. `opened` False:
    the file system cannot be read at all (GRUB's `search --label cfg` finds nothing); `problem` why.
    `fsck` is `e2fsck -p`'s exit status (the recovery's view only)."""

    opened: bool
    files: Mapping[str, bytes | None]
    fsck: int | None = None
    problem: str | None = None


def grub_view(image: Path) -> CfgView:
    """cfg as GRUB reads it: the file system as the blocks say, its journal not replayed, and (as
    GRUB's ext2 driver) neither its bitmaps read nor its metadata checksums checked (debugfs -c -n)."""
    return _read_view(image, ["-c", "-n"])


def recovery_view(image: Path, scratch: Path) -> CfgView:
    """cfg as the recovery reads it: a copy of `image` in `scratch`, put through `e2fsck -p` as pid1
    does (the journal replayed first, as a mount would; then only what preening repairs), then read."""
    copy = scratch / "replayed.img"
    copy_sparse(image, copy)
    try:
        status = run(["e2fsck", "-p", copy], check=False, error=VMError).returncode
        view = _read_view(copy, [])
    finally:
        copy.unlink(missing_ok=True)
    return CfgView(view.opened, view.files, status, view.problem)


def _read_view(image: Path, options: list[str]) -> CfgView:
    opened, files, problem = _read_files(image, options, READ, "cfg")
    return CfgView(opened, files, problem=problem)


def _read_files(
    image: Path, options: list[str], paths: Sequence[str], label: str,
) -> tuple[bool, dict[str, bytes | None], str | None]:
    """One debugfs run (no -w: it replays nothing) for the label, and each path's type, size and bytes:
    (opened, path -> bytes, None when absent or a directory, b"" when it cannot be read whole; why not)."""
    with tempfile.TemporaryDirectory(prefix=".fs-view-", dir=image.parent) as tmp:
        out = Path(tmp)
        requests = ["stats -h"]
        for i, path in enumerate(paths):
            requests += [f'stat "/{path}"', f'dump "/{path}" "{out / str(i)}"']
        script = out / "requests"
        script.write_text("\n".join(requests) + "\n")
        proc = run(["debugfs", *options, "-f", script, image], check=False, error=VMError,
                   env={"DEBUGFS_PAGER": "__none__", "PAGER": "__none__"})
        stdout = proc.stdout.decode(errors="replace")
        stderr = proc.stderr.decode(errors="replace")
        sections = _sections(stdout)
        found = re.search(r"^Filesystem volume name:\s*(.*)$", sections.get("stats -h", ""), re.MULTILINE)
        if proc.returncode != 0 or found is None:
            why = next((line for line in stderr.splitlines() if "while" in line or "not open" in line),
                       f"debugfs exit status {proc.returncode}")
            return False, dict.fromkeys(paths), why.strip()
        if found.group(1).strip() != label:
            return False, dict.fromkeys(paths), f"its label is {found.group(1).strip()!r}, not {label}"
        files: dict[str, bytes | None] = {}
        for i, path in enumerate(paths):
            stat = sections.get(f'stat "/{path}"', "")
            kind = re.search(r"Type: (\S+)", stat)
            if kind is None or kind.group(1) == "directory":
                files[path] = None
                continue
            size = re.search(r"Size: (\d+)", stat)
            dumped = out / str(i)
            data = dumped.read_bytes() if dumped.exists() else b""
            # A file GRUB cannot read whole (its blocks gone or past the end) reads as one it cannot read.
            files[path] = data if size is not None and len(data) == int(size.group(1)) else b""
        return True, files, None


@dataclass(frozen=True)
class SlotsView:
    """The recovery partition as GRUB reads it (no journal replay): for each slot, None when it is whole
    (its recovery.json parses, and each file it names, and menu.sha256, holds what it says), else why not.
    `opened` False: GRUB cannot read the partition (`problem` says why)."""

    opened: bool
    broken: Mapping[str, str | None]
    problem: str | None = None

    @property
    def whole(self) -> tuple[str, ...]:
        return tuple(slot for slot in SLOTS if self.broken.get(slot) is None) if self.opened else ()


def slots_view(image: Path) -> SlotsView:
    """The recovery partition in the file `image`, read as GRUB reads it (debugfs -c -n)."""
    paths = [f"{slot}/{name}" for slot in SLOTS for name in SLOT_CONTENT]
    opened, files, problem = _read_files(image, ["-c", "-n"], paths, "recovery")
    if not opened:
        return SlotsView(False, dict.fromkeys(SLOTS, problem), problem)
    return SlotsView(True, {slot: _slot_problem(slot, files) for slot in SLOTS})


def _slot_problem(slot: str, files: Mapping[str, bytes | None]) -> str | None:
    raw = files.get(f"{slot}/{RECORD}")
    if not raw:
        return f"no readable {slot}/{RECORD}"
    try:
        record = RecoveryImage.from_json(raw, what=f"{slot}/{RECORD}")
    except Rejected as e:
        return str(e)
    for name, want in record.files().items():
        data = files.get(f"{slot}/{name}")
        if data is None:
            return f"no {slot}/{name}"
        if len(data) != want.size or hashlib.sha256(data).hexdigest() != want.sha256:
            return f"{slot}/{name} ({len(data)} bytes) is not what {RECORD} says"
    sums = record.menu_sums()
    if sums is not None and files.get(f"{slot}/{MENU_SUMS}") != sums:
        return f"{slot}/{MENU_SUMS} does not match {slot}/{MENU}"
    return None


def _sections(stdout: str) -> dict[str, str]:
    """debugfs -f echoes each request as `debugfs: REQUEST` before its output."""
    sections: dict[str, str] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("debugfs: "):
            current = line.removeprefix("debugfs: ")
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


@dataclass(frozen=True)
class Finding:
    """A rule one state breaks: `str()` is the one line to print."""

    state: str
    rule: str
    reason: str

    def __str__(self) -> str:
        return f"{self.state}: {self.rule}: {self.reason}"


@dataclass(frozen=True)
class CfgCheck:
    """One state's cfg, both views, GRUB's decision on its view, and what is wrong."""

    state: str
    phase: str | None
    grub: CfgView
    recovery: CfgView
    decision: Decision
    findings: tuple[Finding, ...]
    slots: SlotsView | None = None

    @property
    def ok(self) -> bool:
        return not self.findings


def check_cfg(
    image: Path, *, state: str, phase: str | None = None, incomplete_phases: Collection[str] = INCOMPLETE_PHASES,
) -> CfgCheck:
    """Check the cfg file system in the file `image` (one partition, as `CrashState.export_partition`
    writes it); `state` names it in the findings, `phase` is where the recording was (e.g. `erasing`)."""
    with tempfile.TemporaryDirectory(prefix=".cfg-check-", dir=image.parent) as tmp:
        grub, replayed = grub_view(image), recovery_view(image, Path(tmp))
    return judge(state, phase, grub, replayed, incomplete_phases)


def judge(
    state: str, phase: str | None, grub: CfgView, replayed: CfgView,
    incomplete_phases: Collection[str] = INCOMPLETE_PHASES, slots: SlotsView | None = None,
) -> CfgCheck:
    """The rules, on two views of cfg already read (and, given `slots`, the recovery partition as GRUB
    reads it)."""
    decision = decide(grub.files, cfg_found=grub.opened)
    found: list[Finding] = []

    def fail(rule: str, reason: str) -> None:
        found.append(Finding(state, rule, reason))

    if not grub.opened:
        fail("cfg", f"GRUB cannot read cfg ({grub.problem}), so it boots the system unasked")
    if replayed.fsck is not None and replayed.fsck >= 4:
        fail("fsck", f"e2fsck -p exits {replayed.fsck} after the journal: the recovery would not mount cfg")
    if not replayed.opened:
        fail("cfg", f"the recovery cannot read cfg after e2fsck -p ({replayed.problem})")
    for who, view, strict in (("GRUB", grub, False), ("the recovery", replayed, True)):
        for reason in _block_problems(view, strict):
            # Found by this check (the second recording): a cut in a checkpoint with the disk's writes
            # reordered can show GRUB, which reads past no journal, an instruction that is no block (0
            # bytes). That is the garbage path by design: GRUB counts in recovery/grubenv and boots the
            # recovery, which reads cfg after the journal (whole instruction or none; the rules below).
            if (not strict and reason[0] == "instruction" and decision.entry is Entry.recovery
                    and decision.save is not None and decision.save.file == GRUBENV):
                continue
            # Found by this check (the third recording): the same kind of cut in the checkpoint that
            # follows `confirm`'s end of the trial shows GRUB a trial block that is no block, and GRUB
            # boots the rollback entry. The recovery reads the ended trial after the journal and boots
            # the confirmed release again without rolling back (recovery/os/rollback.py NotOnTrial):
            # one boot more. (Before that fix it reinstalled the fallback, still the release before.)
            if (not strict and reason[0] == "trial" and decision.entry is Entry.rollback
                    and not _on_trial(replayed) and _env(replayed.files.get(TRIAL) or b"", True) is not None):
                continue
            # Found by this check (the rollback recording): the same kind of cut in the checkpoint that
            # follows the recovery's start of a trial (a renamed recovery/trial) shows GRUB a trial block
            # that is no block. While an instruction is there GRUB reads no trial block at all: it boots
            # the recovery, which installs again and writes the trial again, checkpointed before it
            # removes the instruction (the states after that are judged on their own).
            if (not strict and reason[0] == "trial" and grub.files.get(INSTRUCTION) is not None
                    and decision.entry is Entry.recovery):
                continue
            fail(reason[0], f"{who} reads {reason[1]}")
    instruction = replayed.files.get(INSTRUCTION)
    if instruction is not None:
        try:
            parse_instruction(instruction)
        except Rejected as e:
            fail("instruction", f"the recovery reads an instruction it rejects: {e}")
    marker = replayed.files.get(INCOMPLETE) is not None
    if marker and instruction is None:
        fail("marker", f"{INCOMPLETE} is there without an {INSTRUCTION} (after the journal)")
    if decision.entry is Entry.system:
        if marker:
            fail("boot", f"GRUB boots the system ({decision.why}) while {INCOMPLETE} says it is incomplete")
        elif phase in incomplete_phases:
            fail("boot", f"GRUB boots the system ({decision.why}) in phase {phase!r}: the erase has begun")
        if decision.trial_boot is None and _on_trial(replayed):
            fail("unwatched", f"GRUB boots the system unwatched ({decision.why}) while {TRIAL} is on trial")
    if decision.entry is Entry.rescue:
        fail("rescue", f"GRUB boots the rescue shell ({decision.why}): a person has to look")
    if slots is not None:
        # The recovery's slots change only in `settle` (recovery/updated/recoveryslots.py): the inactive
        # one is written and read back, then cfg's block names it. So in every state one slot is whole,
        # and the slot GRUB loads first (as it reads recovery/slot on cfg) is a whole one.
        if not slots.opened:
            fail("slots", f"GRUB cannot read the recovery partition ({slots.problem})")
        elif not slots.whole:
            fail("slots", "no recovery slot is whole: " + "; ".join(f"{s}: {slots.broken[s]}" for s in SLOTS))
        elif decision.slot is not None and decision.slot not in slots.whole:
            fail("slot", f"GRUB loads the recovery from slot {decision.slot} ({decision.entry}), which is not "
                         f"whole: {slots.broken[decision.slot]}")
    return CfgCheck(state, phase, grub, replayed, decision, tuple(found), slots)


def _env(data: bytes, strict: bool) -> dict[str, str] | None:
    """A block's variables as this reader reads them; None if it is not one."""
    if strict:
        try:
            return parse_envblock(data)
        except Rejected:
            return None
    return load_env(data)


def _block_problems(view: CfgView, strict: bool) -> list[tuple[str, str]]:
    """(rule, what) for every block on cfg that breaks its rule, in this reader's reading."""
    problems: list[tuple[str, str]] = []
    if not view.opened:
        return problems
    data = view.files.get(INSTRUCTION)
    if data is not None and not strict:  # the recovery's reading is parse_instruction's (judge)
        env = _env(data, strict)
        if len(data) != ENVBLK_SIZE or env is None:
            problems.append(("instruction", f"an {INSTRUCTION} of {len(data)} bytes that is no whole block"))
        elif env.get("recovery_try", TRIES[0]) not in TRIES:
            problems.append(("try", f"recovery_try {env['recovery_try']!r} in {INSTRUCTION}"))
    data = view.files.get(GRUBENV)
    if data is not None:
        env = _env(data, strict)
        if env is None:
            problems.append(("try", f"a {GRUBENV} that is no block GRUB can count in"))
        elif env.get("recovery_try", TRIES[0]) not in TRIES:
            problems.append(("try", f"recovery_try {env['recovery_try']!r} in {GRUBENV}"))
    data = view.files.get(TRIAL)
    if data is not None:
        env = _env(data, strict)
        most, boot = (env or {}).get("trial_max"), (env or {}).get("trial_boot")
        if env is None:
            problems.append(("trial", f"a {TRIAL} that is no block"))
        elif most is None and boot is not None:
            problems.append(("trial", f"trial_boot {boot!r} without trial_max in {TRIAL}"))
        elif most is not None and most not in BOOTS:
            problems.append(("trial", f"trial_max {most!r} in {TRIAL}"))
        elif boot is not None and (boot not in BOOTS or most is None or int(boot) > int(most)):
            problems.append(("trial", f"trial_boot {boot!r} with trial_max {most!r} in {TRIAL}"))
    data = view.files.get(SLOT)
    # As GRUB reads it (not strict), any recovery/slot is sane: what is not `b` means `a`, and the block
    # changes only when both slots hold a whole recovery (DESIGN.md "The running system writes the new
    # recovery"). Found by this check itself: a cut in the checkpoint that follows the switch, with the
    # disk's cache reordering, can leave GRUB an inode whose block is not yet written: GRUB then boots
    # slot a, whole, while Linux reads b (GRUB reads past no journal). After the replay the block must be
    # whole and name a slot.
    if data is not None and strict:
        slot = (_env(data, strict) or {}).get("recovery_slot")
        if slot not in ("a", "b"):
            problems.append(("slot", f"recovery_slot {slot!r} in {SLOT}" if slot is not None
                             else f"a {SLOT} without recovery_slot"))
    return problems


def _on_trial(view: CfgView) -> bool:
    data = view.files.get(TRIAL)
    return data is not None and bool((_env(data, True) or {}).get("trial_max"))


def phase_of(entries: int, phases: Sequence[tuple[int, str]]) -> str | None:
    """The phase a state reaching `entries` log entries may be cut in: the last of `phases` (log entry
    counts noted when the guest entered each phase, `log_entries_now`, in order) that began at or before."""
    current = None
    for start, label in phases:
        if start <= entries:
            current = label
    return current


class Checker:
    """Checks the states of one replay, exporting cfg into `workdir`; two states whose cfg bytes are
    the same by construction (`CrashState.range_key`) are read once. `phases` as for `phase_of`; without
    them a state's phase is its last MARK's text."""

    def __init__(
        self, workdir: Path, *, partition: str | int = "cfg", phases: Sequence[tuple[int, str]] = (),
        incomplete_phases: Collection[str] = INCOMPLETE_PHASES, slots: str | int | None = "recovery",
    ) -> None:
        self.workdir, self.partition, self.phases = workdir, partition, list(phases)
        self.incomplete_phases = incomplete_phases
        self.slots = slots  # the recovery partition (None: the disk has none to check)
        self._views: dict[tuple[object, ...], tuple[CfgView, CfgView]] = {}
        self._slots: dict[tuple[object, ...], SlotsView] = {}
        self.exported = 0

    def check(self, state: CrashState, phase: str | None = None) -> CfgCheck:
        phase = phase or phase_of(state.entries, self.phases) or state.mark
        part = state.replay.partition(self.partition)
        key = state.range_key(part.start, part.size)
        if key not in self._views:
            self.workdir.mkdir(parents=True, exist_ok=True)
            image = state.export_partition(self.partition, self.workdir / "cfg.img")
            self.exported += 1
            try:
                scratch = Path(tempfile.mkdtemp(prefix=".replayed-", dir=self.workdir))
                try:
                    self._views[key] = (grub_view(image), recovery_view(image, scratch))
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            finally:
                os.unlink(image)
        grub, replayed = self._views[key]
        return judge(state.name, phase, grub, replayed, self.incomplete_phases, self._slots_of(state))

    def _slots_of(self, state: CrashState) -> SlotsView | None:
        if self.slots is None:
            return None
        part = state.replay.partition(self.slots)
        key = state.range_key(part.start, part.size)
        if key not in self._slots:
            self.workdir.mkdir(parents=True, exist_ok=True)
            image = state.export_partition(self.slots, self.workdir / "recovery.img")
            try:
                self._slots[key] = slots_view(image)
            finally:
                os.unlink(image)
        return self._slots[key]


@dataclass(frozen=True)
class Summary:
    """A whole replay checked: the log's flush points, every state's check, the whole disk images made
    of the states chosen to be booted (by state name), and the names of the states whose system
    partition was checked too."""

    flush_points: int
    checks: tuple[CfgCheck, ...]
    images: Mapping[str, Path]
    system_checked: tuple[str, ...] = ()

    @property
    def findings(self) -> list[Finding]:
        return [f for check in self.checks for f in check.findings]

    @property
    def held(self) -> int:
        """How many states broke no rule."""
        return sum(1 for check in self.checks if check.ok)


# A check of one state's system partition: what is wrong with it (empty when it is a whole release).
SystemCheck = Callable[[CrashState, CfgCheck], Sequence[str]]


def check_replay(
    replay: Replay, checker: Checker, *, unordered: int = 0, seed: int = 0,
    boot: Callable[[CrashState], bool] = lambda state: False, images: Path | None = None,
    system: SystemCheck | None = None, system_states: int = 0, system_partition: str | int = "system",
    only: Callable[[CrashState], bool] | None = None,
) -> Summary:
    """Check every state of `replay` (its flush points and `unordered` seeded subsets); each state for
    which `boot` says so is also made a whole disk image in `images`, to be booted afterwards.

    With `system`: of the states in which GRUB boots the system, up to `system_states` whose system
    partitions differ (spread over the replay by `seed`, and the first of each phase always among them)
    are made again in a second pass and given to `system`, whose complaints are findings ("system").
    With `only`, the states it refuses are made but not checked (a sample of a long replay)."""
    checks: list[CfgCheck] = []
    made: dict[str, Path] = {}
    candidates: dict[tuple[object, ...], int] = {}  # system partition's content -> first state with it
    part = replay.partition(system_partition) if system is not None else None
    positions: list[int] = []  # each check's state, by its place in replay.states()
    for n, state in enumerate(replay.states(unordered=unordered, seed=seed)):
        if only is not None and not only(state):
            continue
        check = checker.check(state)
        checks.append(check)
        positions.append(n)
        if part is not None and check.decision.entry is Entry.system:
            candidates.setdefault(state.range_key(part.start, part.size), len(checks) - 1)
        if boot(state):
            if images is None:
                raise VMError("check_replay: states to boot, but no directory for their images")
            images.mkdir(parents=True, exist_ok=True)
            made[state.name] = state.materialize(images / f"state-{state.index}.img")
    chosen = spread(sorted(candidates.values()), system_states, seed, [c.phase for c in checks])
    checked: list[str] = []
    if system is not None and chosen:
        at = {positions[c]: c for c in chosen}
        for n, state in enumerate(replay.states(unordered=unordered, seed=seed)):
            if (c := at.get(n)) is not None:
                problems = system(state, checks[c])
                checked.append(state.name)
                if problems:
                    checks[c] = replace(checks[c], findings=checks[c].findings + tuple(
                        Finding(state.name, "system", problem) for problem in problems))
            if n >= max(at):
                break
    return Summary(len(replay.points) - 1, tuple(checks), made, tuple(checked))


def spread(candidates: Sequence[int], count: int, seed: int, phases: Sequence[str | None] = ()) -> set[int]:
    """Up to `count` of `candidates` (state positions, in order), one drawn by `seed` from each of
    `count` equal runs of them; with `phases` (each position's phase), the first candidate of every
    phase is taken as well."""
    if count <= 0 or not candidates:
        return set()
    rng = random.Random(seed)
    chosen: set[int] = set()
    seen: set[str | None] = set()
    for n in candidates if phases else ():
        if phases[n] not in seen:
            seen.add(phases[n])
            chosen.add(n)
    runs = min(count, len(candidates))
    for i in range(runs):
        run_of = candidates[i * len(candidates) // runs : (i + 1) * len(candidates) // runs]
        chosen.add(rng.choice(run_of))
    return chosen
