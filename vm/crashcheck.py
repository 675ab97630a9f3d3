"""Offline checks of one crash state (vm/writelog.py): cfg read twice, as GRUB reads it (no journal
replay: debugfs on the exported partition) and as the recovery reads it (after `e2fsck -p`, which
pid1 runs before it mounts cfg), against the rules in DESIGN.md "Crash states". Nothing boots.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
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
    """One debugfs run (no -w: it replays nothing) for the label, and each file's type, size and bytes."""
    with tempfile.TemporaryDirectory(prefix=".cfg-view-", dir=image.parent) as tmp:
        out = Path(tmp)
        requests = ["stats -h"]
        for i, path in enumerate(READ):
            requests += [f'stat "/{path}"', f'dump "/{path}" "{out / str(i)}"']
        script = out / "requests"
        script.write_text("\n".join(requests) + "\n")
        proc = run(["debugfs", *options, "-f", script, image], check=False, error=VMError,
                   env={"DEBUGFS_PAGER": "__none__", "PAGER": "__none__"})
        stdout = proc.stdout.decode(errors="replace")
        stderr = proc.stderr.decode(errors="replace")
        sections = _sections(stdout)
        label = re.search(r"^Filesystem volume name:\s*(.*)$", sections.get("stats -h", ""), re.MULTILINE)
        if proc.returncode != 0 or label is None:
            why = next((line for line in stderr.splitlines() if "while" in line or "not open" in line),
                       f"debugfs exit status {proc.returncode}")
            return CfgView(False, dict.fromkeys(READ), problem=why.strip())
        if label.group(1).strip() != "cfg":
            return CfgView(False, dict.fromkeys(READ), problem=f"its label is {label.group(1).strip()!r}, not cfg")
        files: dict[str, bytes | None] = {}
        for i, path in enumerate(READ):
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
        return CfgView(True, files)


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
    incomplete_phases: Collection[str] = INCOMPLETE_PHASES,
) -> CfgCheck:
    """The rules, on two views already read."""
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
    return CfgCheck(state, phase, grub, replayed, decision, tuple(found))


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
        incomplete_phases: Collection[str] = INCOMPLETE_PHASES,
    ) -> None:
        self.workdir, self.partition, self.phases = workdir, partition, list(phases)
        self.incomplete_phases = incomplete_phases
        self._views: dict[tuple[object, ...], tuple[CfgView, CfgView]] = {}
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
        return judge(state.name, phase, grub, replayed, self.incomplete_phases)


@dataclass(frozen=True)
class Summary:
    """A whole replay checked: the log's flush points, every state's check, and the whole disk images
    made of the states chosen to be booted (by state name)."""

    flush_points: int
    checks: tuple[CfgCheck, ...]
    images: Mapping[str, Path]

    @property
    def findings(self) -> list[Finding]:
        return [f for check in self.checks for f in check.findings]


def check_replay(
    replay: Replay, checker: Checker, *, unordered: int = 0, seed: int = 0,
    boot: Callable[[CrashState], bool] = lambda state: False, images: Path | None = None,
) -> Summary:
    """Check every state of `replay` (its flush points and `unordered` seeded subsets); each state for
    which `boot` says so is also made a whole disk image in `images`, to be booted afterwards."""
    checks: list[CfgCheck] = []
    made: dict[str, Path] = {}
    for state in replay.states(unordered=unordered, seed=seed):
        checks.append(checker.check(state))
        if boot(state):
            if images is None:
                raise VMError("check_replay: states to boot, but no directory for their images")
            images.mkdir(parents=True, exist_ok=True)
            made[state.name] = state.materialize(images / f"state-{state.index}.img")
    return Summary(len(replay.points) - 1, tuple(checks), made)
