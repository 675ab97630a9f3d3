"""The trial of a newly installed release, and the fallback bundle it is measured against, on cfg.

After an install the new release boots *on trial*: GRUB counts its boots in `recovery/trial` (an
environment block), the release ends the trial once healthy (`reflashctl confirm`), and past the last
trial boot GRUB boots the recovery in rollback mode, which reinstalls the bundle of the release that
last confirmed (`recovery/fallback.json`). The recovery writes the trial's start and the record of
what it installed; the running system writes what it saw on each trial boot and the confirmation.
DESIGN.md ("Trial boots and rollback") has the schemas and what a power cut at each step leaves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recovery.core.atomic import atomic_write, checkpoint_journal, write_block
from recovery.core.envblock import format_envblock, parse_envblock
from recovery.core.errors import Rejected
from recovery.core.instruction import Action, Instruction
from recovery.core.result import now

# GRUB's block: `trial_max` (the recovery writes it when a trial starts) and `trial_boot` (GRUB counts
# 1, 2, ... before each boot of the system). No `trial_max`: no trial. Only these two are whitelisted.
TRIAL = Path("recovery/trial")
KEY_MAX, KEY_BOOT = "trial_max", "trial_boot"
MAX_BOOTS = 9  # bootloader/recovery.cfg counts with literals up to this

INSTALLED = Path("recovery/installed.json")  # the release the recovery installed last, and its bundle
FALLBACK = Path("recovery/fallback.json")  # the bundle of the release that confirmed last
NOTES = Path("recovery/trial-notes.json")  # what the running system saw on each trial boot
FAILED = Path("recovery/failed.json")  # releases that did not confirm and were rolled back
FAILED_CAP = 20
NOTES_CAP = 30


class TrialError(Rejected):
    """A trial record on cfg that cannot be read."""


def _read_json(path: Path, what: str) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise TrialError(f"{what} {path} is not JSON") from None


def _write_json(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class BundleRef:
    """A bundle on a disk, as an instruction names it: enough to install it again."""

    version: str
    disk: str
    file: str
    sha256: str

    def instruction(self, action: Action = Action.install, *, allow_downgrade: bool = False) -> Instruction:
        """The instruction that installs this bundle (validated: a bad record is Rejected here)."""
        return Instruction.create(self.disk, self.file, self.sha256, self.version, action=action,
                                  allow_downgrade=allow_downgrade)

    def to_dict(self) -> dict[str, str]:
        return {"version": self.version, "disk": self.disk, "file": self.file, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, doc: object, what: str) -> BundleRef:
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("version", "disk", "file", "sha256")):
            raise TrialError(f"{what} lacks version, disk, file or sha256")
        ref = cls(doc["version"], doc["disk"], doc["file"], doc["sha256"])
        try:
            ref.instruction()
        except Rejected as e:
            raise TrialError(f"{what}: {e}") from None
        return ref

    @classmethod
    def of(cls, instruction: Instruction) -> BundleRef:
        return cls(instruction.version, str(instruction.disk), str(instruction.file), instruction.sha256)


# --- GRUB's counter ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialCounter:
    """`recovery/trial` as GRUB reads it: on trial while `max_boots` is set; `boot` is GRUB's count."""

    max_boots: int | None = None
    boot: int | None = None

    @property
    def on_trial(self) -> bool:
        return self.max_boots is not None

    @property
    def exhausted(self) -> bool:
        """GRUB has used every trial boot: the next boot is the rollback."""
        return self.on_trial and self.boot is not None and self.boot >= (self.max_boots or 0)

    @classmethod
    def read(cls, cfg: Path) -> TrialCounter:
        """The counter; no file means no trial. A block GRUB could not read is TrialError (GRUB rolls back)."""
        try:
            data = (cfg / TRIAL).read_bytes()
        except FileNotFoundError:
            return cls()
        try:
            env = parse_envblock(data)
        except Rejected as e:
            raise TrialError(f"trial counter {cfg / TRIAL}: {e}") from None
        return cls(max_boots=_count(env, KEY_MAX), boot=_count(env, KEY_BOOT))

    def summary(self) -> str:
        if not self.on_trial:
            return "not on trial"
        if self.boot is None:
            return f"on trial, not booted yet (at most {self.max_boots} boots)"
        return f"on trial, boot {self.boot} of {self.max_boots}"


def _count(env: dict[str, str], key: str) -> int | None:
    if key not in env:
        return None
    text = env[key]
    if text not in {str(n) for n in range(1, MAX_BOOTS + 1)}:
        raise TrialError(f"trial counter: {key} is {text!r}, not 1 to {MAX_BOOTS}")
    return int(text)


def _write_counter(cfg: Path, env: dict[str, str]) -> None:
    (cfg / TRIAL).parent.mkdir(parents=True, exist_ok=True)
    write_block(cfg / TRIAL, format_envblock(env))  # over its own blocks once it exists, as GRUB counts
    # GRUB reads cfg past its journal: the next boot must see this block, not the one before.
    checkpoint_journal(cfg / TRIAL.parent)


def start_trial(cfg: Path, max_boots: int) -> None:
    """Put the installed release on trial: GRUB counts its boots from 1 and rolls back past `max_boots`."""
    if not 1 <= max_boots <= MAX_BOOTS:
        raise Rejected(f"trial boots must be 1 to {MAX_BOOTS}, not {max_boots}")
    _write_counter(cfg, {KEY_MAX: str(max_boots)})


def end_trial(cfg: Path) -> None:
    """No trial: an empty block (kept, so GRUB's `-f` and the writes stay the same every time)."""
    _write_counter(cfg, {})


# --- the records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """`recovery/installed.json`: what the recovery installed last, from which bundle, and whether it was
    a rollback's restore (a restored release that fails its trial is not rolled back again)."""

    bundle: BundleRef
    from_version: str | None = None
    at: str | None = None
    restored: bool = False

    def write(self, cfg: Path) -> None:
        _write_json(cfg / INSTALLED, {"bundle": self.bundle.to_dict(), "from_version": self.from_version,
                                      "at": self.at or now(), "restored": self.restored})

    @classmethod
    def read(cls, cfg: Path) -> Installed | None:
        doc = _read_json(cfg / INSTALLED, "install record")
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise TrialError(f"install record {cfg / INSTALLED} is not an object")
        from_version = doc.get("from_version")
        return cls(bundle=BundleRef.from_dict(doc.get("bundle"), f"install record {cfg / INSTALLED}"),
                   from_version=from_version if isinstance(from_version, str) else None,
                   at=doc.get("at") if isinstance(doc.get("at"), str) else None,
                   restored=doc.get("restored") is True)


def read_fallback(cfg: Path) -> BundleRef | None:
    doc = _read_json(cfg / FALLBACK, "fallback record")
    return None if doc is None else BundleRef.from_dict(doc, f"fallback record {cfg / FALLBACK}")


def write_fallback(cfg: Path, ref: BundleRef) -> None:
    _write_json(cfg / FALLBACK, ref.to_dict())


@dataclass(frozen=True)
class Note:
    """One thing the running system saw on a trial boot: `started`, a failed health check, the time limit."""

    boot: int | None
    seen: str
    at: str


def read_notes(cfg: Path, version: str) -> tuple[Note, ...]:
    """The notes about trial boots of `version` (notes about other releases are stale)."""
    try:
        doc = _read_json(cfg / NOTES, "trial notes")
    except TrialError:
        return ()
    if not isinstance(doc, dict) or doc.get("version") != version or not isinstance(doc.get("notes"), list):
        return ()
    out = []
    for item in doc["notes"]:
        if isinstance(item, dict) and isinstance(item.get("seen"), str):
            boot = item.get("boot")
            out.append(Note(boot if type(boot) is int else None, item["seen"], str(item.get("at") or "")))
    return tuple(out)


def add_note(cfg: Path, version: str, boot: int | None, seen: str) -> None:
    notes = [*read_notes(cfg, version), Note(boot, seen, now())][-NOTES_CAP:]
    _write_json(cfg / NOTES, {"version": version,
                              "notes": [{"boot": n.boot, "seen": n.seen, "at": n.at} for n in notes]})


@dataclass(frozen=True)
class FailedRelease:
    version: str
    reason: str
    at: str


def read_failed(cfg: Path) -> dict[str, FailedRelease]:
    """Releases rolled back after their trial, by version (the newest record of each)."""
    try:
        doc = _read_json(cfg / FAILED, "failed releases")
    except TrialError:
        return {}
    out: dict[str, FailedRelease] = {}
    for item in doc.get("releases", []) if isinstance(doc, dict) else []:
        if isinstance(item, dict) and isinstance(item.get("version"), str):
            out[item["version"]] = FailedRelease(item["version"], str(item.get("reason") or ""), str(item.get("at") or ""))
    return out


def remember_failed(cfg: Path, version: str, reason: str) -> None:
    known = read_failed(cfg)
    known.pop(version, None)
    entries = [*known.values(), FailedRelease(version, reason, now())][-FAILED_CAP:]
    _write_json(cfg / FAILED, {"releases": [{"version": f.version, "reason": f.reason, "at": f.at} for f in entries]})


# --- why a trial failed --------------------------------------------------------------------------


def failure_reason(version: str, counter: TrialCounter, notes: tuple[Note, ...], tree: str | None = None) -> str:
    """In one line, why `version` is rolled back: the boots it had and the last thing it was seen doing.

    `tree` is what the recovery found wrong with the release's files (no kernel, no init), if anything."""
    boots = counter.max_boots or 0
    if counter.exhausted:
        head = f"{version} did not confirm within {boots} boot{'s' if boots != 1 else ''}"
    else:
        head = f"{version} could not be booted on trial boot {counter.boot or 1} of {boots}"
    if tree:
        return f"{head}: {tree}"
    if not notes:
        return f"{head}: no boot got as far as starting its services (the kernel, its initrd or init failed)"
    last = notes[-1]
    where = f"boot {last.boot}" if last.boot else "last boot"
    if last.seen == "started":
        return f"{head}: {where} started its services, then stopped before confirming (a hang or crash; " \
               "the watchdog or a panic restarted it)"
    return f"{head}: {where}: {last.seen}"

