"""Rollback mode: the release on trial did not confirm itself, so the recovery reinstalls the fallback.

`plan_rollback` decides from cfg alone (and a look at the failed release's files) whether there is a
release to go back to and why the trial failed; the rollback itself is then an ordinary install of an
instruction with action `rollback`, with every check and power-cut guarantee of one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recovery.core.boottree import INITRD, INITS, KERNEL, Lookup, resolve
from recovery.core.errors import Rejected, UpdateError
from recovery.core.instruction import Action, Instruction
from recovery.core.trial import Installed, TrialCounter, TrialError, failure_reason, read_fallback, read_notes

class NoRollback(UpdateError):
    """There is nothing to roll back to, or going back again would not help: a person must look."""

    kind = "failed"


class NotOnTrial(Exception):
    """Rollback mode, but cfg (after its journal) says no trial and the system's tree is whole: the
    installed release confirmed itself. Nothing is rolled back; the recovery boots it again.

    GRUB reads cfg past its journal, so a power cut inside the checkpoint that follows `confirm`'s end
    of the trial can show it a trial block that is no block, and it boots the rollback entry
    (DESIGN.md "What a power cut leaves"); by hand the entry is chosen the same way."""


@dataclass(frozen=True)
class RollbackPlan:
    instruction: Instruction  # installs the fallback bundle
    failed_version: str
    reason: str  # why `failed_version` is being replaced, in one line


def _lookup(root: Path) -> Lookup:
    def kind(here: str) -> tuple[str | None, str | None]:
        path = root / here
        if path.is_symlink():
            return "symlink", os.readlink(path)
        return ("file" if path.is_file() else "other", None) if path.exists() else (None, None)
    return kind


def tree_problem(root: Path) -> str | None:
    """What a mounted system tree lacks to boot at all, in words; None when kernel, initrd and init are there."""
    missing = [f"no {what} at /{path}" for what, path in (("kernel", KERNEL), ("initrd", INITRD))
               if not _is_file(root, path)]
    if not any(_is_file(root, init) for init in INITS):
        missing.append("no init at /sbin/init, /etc/init or /bin/init")
    return "; ".join(missing) if missing else None


def _is_file(root: Path, path: str) -> bool:
    found = resolve(path, _lookup(root))
    return found is not None and (root / found).is_file()


def plan_rollback(cfg: Path, *, installed_version: Callable[[], str | None],
                  problem: Callable[[], str | None]) -> RollbackPlan:
    """The instruction that restores the fallback, and why; NoRollback when there is none to restore.

    `installed_version` and `problem` look at the system partition (its os-release, what it lacks),
    asked only when cfg's records do not say."""
    try:
        installed = Installed.read(cfg)
    except TrialError as e:
        installed = None
        unreadable = str(e)
    else:
        unreadable = None
    failed = installed.bundle.version if installed is not None else (installed_version() or "the installed release")
    try:
        counter = TrialCounter.read(cfg)
    except TrialError as e:
        counter, why = None, f"{failed} is rolled back: {e}"
    if counter is not None:
        if counter.on_trial:
            why = failure_reason(failed, counter, read_notes(cfg, failed), problem())
        else:
            broken = problem()
            if broken is None:
                raise NotOnTrial(f"{failed} is not on trial: it confirmed itself")
            why = f"{failed} is not on trial, but its system cannot boot: {broken}"
    if installed is not None and installed.restored and counter is not None and counter.on_trial:
        raise NoRollback(f"{failed} was itself restored by a rollback and did not confirm either: {why}")
    try:
        fallback = read_fallback(cfg)
    except TrialError as e:
        raise NoRollback(f"{why}; the fallback record is unreadable: {e}") from None
    if fallback is None:
        extra = f" ({unreadable})" if unreadable else ""
        raise NoRollback(f"{why}; no fallback bundle is recorded on cfg{extra}")
    try:
        instruction = fallback.instruction(Action.rollback, allow_downgrade=True)
    except Rejected as e:
        raise NoRollback(f"{why}; the fallback record is unusable: {e}") from None
    return RollbackPlan(instruction=instruction, failed_version=failed, reason=why)
