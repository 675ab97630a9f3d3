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

from recovery.core.errors import Rejected, UpdateError
from recovery.core.instruction import Action, Instruction
from recovery.core.trial import Installed, TrialCounter, TrialError, failure_reason, read_fallback, read_notes

KERNEL, INITRD = "boot/vmlinuz", "boot/initrd.img"  # what bootloader/grub.cfg loads
INITS = ("sbin/init", "etc/init", "bin/init")
MAX_LINKS = 40


class NoRollback(UpdateError):
    """There is nothing to roll back to, or going back again would not help: a person must look."""

    kind = "failed"


@dataclass(frozen=True)
class RollbackPlan:
    instruction: Instruction  # installs the fallback bundle
    failed_version: str
    reason: str  # why `failed_version` is being replaced, in one line


def _inside(root: Path, path: str) -> Path | None:
    """`path` below `root` with symlinks followed as the installed system would (an absolute target
    starts again at `root`), never leaving it; None when it leads nowhere."""
    todo, done, hops = [p for p in path.split("/") if p not in ("", ".")], [], 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if here.is_symlink():
            hops += 1
            if hops > MAX_LINKS:
                return None
            target = os.readlink(here)
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            if target.startswith("/"):
                done = []
            continue
        if not here.exists():
            return None
        done.append(part)
    return root.joinpath(*done)


def tree_problem(root: Path) -> str | None:
    """What a mounted system tree lacks to boot at all, in words; None when kernel, initrd and init are there."""
    missing = [f"no {what} at /{path}" for what, path in (("kernel", KERNEL), ("initrd", INITRD))
               if not _is_file(root, path)]
    if not any(_is_file(root, init) for init in INITS):
        missing.append("no init at /sbin/init, /etc/init or /bin/init")
    return "; ".join(missing) if missing else None


def _is_file(root: Path, path: str) -> bool:
    found = _inside(root, path)
    return found is not None and found.is_file()


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
            why = f"{failed} was not on trial: rollback chosen at the boot menu"
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
