"""One run of the install, from the instruction to the written result: every check before the erase,
then erase and extraction, with the incomplete marker on cfg from the erase until the verdict.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from uuid import uuid4

from recovery.core.atomic import atomic_write, checkpoint_journal, durable_unlink, write_block
from recovery.core.bundle import VerifiedBundle, verify_bundle
from recovery.core.envblock import format_envblock
from recovery.core.errors import Failed, Rejected, UpdateError
from recovery.core.instruction import Action, DiskSpecKind, Instruction, read_instruction
from recovery.core.keys import Keyring
from recovery.core.osrelease import read_os_release
from recovery.core.output import Progress
from recovery.core.result import Outcome, Result, now, write_result
from recovery.core.trial import NOTES, TRIAL, BundleRef, Installed, end_trial, read_failed, start_trial
from recovery.core.version import Version
from recovery.os import devices, mounts
from recovery.os import erase as erasing
from recovery.os.cmdline import Boot
from recovery.os.config import RecoveryConfig
from recovery.os.console import Console
from recovery.os.extract import ExtractStats, extract_payload

log = logging.getLogger("recovery")

RUN = Path("/run/recovery")
CFG_MOUNT = RUN / "cfg"
STORAGE_MOUNT = RUN / "storage"
SYSTEM_MOUNT = RUN / "system"


INSTRUCTION = Path("update-instruction")


# Present on cfg from the erase until the new system is complete: a later rejection must then not
# send the machine back to a system that is no longer there.
INCOMPLETE = Path("recovery/system-incomplete")


# GRUB's try counter for an instruction it cannot parse (see bootloader/recovery.cfg).
FALLBACK_COUNTER = Path("recovery/grubenv")


@contextmanager
def _stage(console: Console, name: str, seconds: dict[str, float], key: str | None = None) -> Iterator[None]:
    console.say(f"recovery: {name}")
    start = time.monotonic()
    try:
        yield
    finally:
        if key:
            seconds[key] = round(time.monotonic() - start, 2)


def _syncfs(fd: int, device: Path) -> None:
    """Write the file system behind `fd` to disk; Failed if any write to it failed since `fd` was opened."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        raise Failed(f"writing the new system to {device} failed: {os.strerror(ctypes.get_errno())}")


@dataclass(frozen=True)
class IncompleteMarker:
    """`recovery/system-incomplete` on cfg: written before the erase, removed with the instruction
    (schema in DESIGN.md). While it exists the system partition is not a system to go back to."""

    uuid: str  # the system file system's UUID, kept across the erase
    label: str | None = None
    since: str | None = None
    from_version: str | None = None
    try_: int | None = None

    @classmethod
    def read(cls, cfg: Path) -> IncompleteMarker | None:
        """The marker an earlier try left, or None when the system is whole."""
        try:
            raw = (cfg / INCOMPLETE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("uuid"), str):
            # Even an unreadable marker means the system was being rewritten: never treat it as whole.
            return cls(uuid=str(uuid4()))
        text = {k: v if isinstance(v, str) else None for k in ("label", "since", "from_version") for v in [doc.get(k)]}
        return cls(uuid=doc["uuid"], try_=doc["try"] if type(doc.get("try")) is int else None, **text)

    def write(self, cfg: Path, try_: int) -> None:
        doc = {"since": self.since, "from_version": self.from_version, "label": self.label, "uuid": self.uuid,
               "try": try_}
        atomic_write(cfg / INCOMPLETE, json.dumps(doc).encode() + b"\n")


def recovery_identity(config: RecoveryConfig, boot: Boot) -> dict[str, str]:
    """Which recovery OS writes this verdict, for result.json: its version and the slot GRUB loaded."""
    who = {"version": config.version or "unknown"}
    if boot.slot:
        who["slot"] = boot.slot
    return who


def _bundle_path(storage: Path, file: Path) -> Path:
    """The bundle's path below the storage mount, refusing symlinks that lead off that disk."""
    path = (storage / os.fspath(file).lstrip("/")).resolve()
    if storage.resolve() not in path.parents:
        raise Rejected(f"bundle {file} lies outside the storage disk")
    return path


@dataclass(frozen=True)
class Parts:
    """What the installer does to the machine; tests give fakes here (tests/unit/test_init_checks.py)."""

    find_device: Callable[..., Path] = devices.find_device
    same_device: Callable[[Path, Path], bool] = devices.same_device
    partition_info: Callable[[Path], devices.PartitionInfo] = devices.partition_info
    mounted_at: Callable[[Path], list[str]] = mounts.mounted_at
    mount: Callable[..., None] = devices.mount
    umount: Callable[[Path], None] = devices.umount
    erase: Callable[..., None] = erasing.erase
    filesystem_identity: Callable[[Path], tuple[str | None, str | None]] = erasing.filesystem_identity
    extract_payload: Callable[..., ExtractStats] = extract_payload
    write_marker: Callable[[IncompleteMarker, Path, int], None] = IncompleteMarker.write


@dataclass(frozen=True)
class Plan:
    """Everything the install acts on, resolved and checked while the system partition is untouched."""

    instruction: Instruction
    system: Path  # the system partition's device node
    bundle: VerifiedBundle
    marker: IncompleteMarker  # the identity the erase keeps: an earlier try's, or the system's own


class Installer:
    """One run of the install: `resolve()` makes the plan (every rejection happens there), `apply(plan)`
    erases and extracts; `run()` is both, `record()` writes the verdict."""

    def __init__(self, config: RecoveryConfig, boot: Boot, console: Console, cfg: Path = CFG_MOUNT,
                 parts: Parts = Parts()) -> None:
        self.config = config
        self.boot = boot
        self.console = console
        self.cfg = cfg
        self.parts = parts
        self.seconds: dict[str, float] = {}
        self.started = now()
        self.from_version: str | None = None
        self.to_version: str | None = None
        self.instruction: Instruction | None = None

    @property
    def rollback(self) -> bool:
        """Whether this run restores the fallback after a failed trial (an instruction with action rollback)."""
        return self.instruction is not None and self.instruction.action == Action.rollback

    def result(self, outcome: Outcome, reason: str | None = None, *, files: int = 0, nbytes: int = 0) -> Result:
        return Result(
            outcome=outcome,
            reason=reason,
            from_version=self.from_version,
            to_version=self.to_version,
            try_=self.boot.try_count,
            started=self.started,
            finished=now(),
            seconds=dict(self.seconds),
            bytes=nbytes,
            files=files,
            recovery=recovery_identity(self.config, self.boot),
        )

    def run(self) -> Result:
        """Install; return installed or rejected, raise for failed (the caller decides what stays)."""
        earlier = IncompleteMarker.read(self.cfg)
        if earlier is not None:
            self.from_version = earlier.from_version
        try:
            with _stage(self.console, "verifying", self.seconds, "verify"):
                plan = self.resolve(earlier)
        except (Rejected, Failed, OSError) as e:
            # Before the erase every problem is a rejection: the system is still whole.
            reason = str(e)
            if earlier is not None:
                # An earlier try erased the system: there is nothing to go back to.
                raise Failed(f"{reason}; the system partition is incomplete from an earlier try") from None
            return self.result(Outcome.rejected, reason)
        try:
            return self.apply(plan)
        except UpdateError as e:
            raise Failed(str(e)) from None

    def resolve(self, earlier: IncompleteMarker | None) -> Plan:
        """Instruction -> disks -> bundle, every check made; nothing is written."""
        p, config = self.parts, self.config
        instruction = read_instruction(self.cfg / INSTRUCTION)
        self.instruction, self.to_version = instruction, instruction.version
        timeout = config.device_timeout
        system = p.find_device(config.system, timeout=timeout)
        storage = p.find_device(instruction.disk, timeout=timeout)
        for role in ("cfg", "recovery"):
            if p.same_device(system, p.find_device(getattr(config, role), timeout=timeout)):
                raise Rejected(f"system partition {system} is the {role} partition")
        if p.same_device(system, storage):
            raise Rejected(f"the bundle's disk {instruction.disk} is the system partition")
        if where := p.mounted_at(system):
            raise Rejected(f"system partition {system} is mounted on {', '.join(where)}")
        part = p.partition_info(system)
        if config.system.kind == DiskSpecKind.partlabel and part.name != config.system.value:
            raise Rejected(f"partition {system} is named {part.name!r}, expected {config.system.value!r}")
        if earlier is None:
            self.from_version = self._installed_version(system)
        self._check_downgrade(instruction)
        p.mount(storage, STORAGE_MOUNT, options="ro,nosuid,nodev,noexec")
        bundle = verify_bundle(
            _bundle_path(STORAGE_MOUNT, Path(os.fspath(instruction.file))),
            Keyring.load(config.keys),
            product=config.product, version=instruction.version, sha256=instruction.sha256, capacity=part.size,
        )
        if earlier is None:
            # The file system's identity is kept across the erase (fstab and GRUB may name it).
            label, uuid = p.filesystem_identity(system)
            earlier = IncompleteMarker(uuid=uuid or str(uuid4()), label=label, since=now(),
                                       from_version=self.from_version)
        return Plan(instruction=instruction, system=system, bundle=bundle, marker=earlier)

    def apply(self, plan: Plan) -> Result:
        """Erase the system partition and extract the bundle into it. The marker goes to cfg first, so a
        try after a power cut mid-mkfs still knows the identity to keep."""
        p, bundle = self.parts, plan.bundle
        p.write_marker(plan.marker, self.cfg, self.boot.try_count)
        with _stage(self.console, "erasing", self.seconds, "erase"):
            p.erase(plan.system, label=plan.marker.label or None, uuid=plan.marker.uuid,
                    files=bundle.manifest.rootfs_files)
        with _stage(self.console, "extracting", self.seconds, "extract"):
            p.mount(plan.system, SYSTEM_MOUNT, options="rw,nosuid,nodev")
            # Opened before the first write: syncfs on it reports every write error since (sync(2)
            # reports none, and the page cache hides them from the extraction's own writes).
            root = os.open(SYSTEM_MOUNT, os.O_RDONLY | os.O_DIRECTORY)
            try:
                progress = Progress(bundle.manifest.payload.size, "recovery: extracting", stream=sys.stdout, live=False)
                stats = p.extract_payload(bundle, SYSTEM_MOUNT, progress=progress)
                progress.finish()
                _syncfs(root, plan.system)
            finally:
                os.close(root)
            p.umount(SYSTEM_MOUNT)
        return self.result(Outcome.installed, files=stats.files, nbytes=stats.bytes)

    def _check_downgrade(self, instruction: Instruction) -> None:
        """A version older than the installed one only when the instruction says so (`reflashctl install
        --allow-downgrade`). The same version again is a repair, not a downgrade. With no version to
        compare (no os-release on the system) there is nothing to refuse: the system may be the problem."""
        installed = self.from_version
        if not isinstance(installed, str) or instruction.allow_downgrade:
            return
        if Version(instruction.version) < Version(installed):
            raise Rejected(f"downgrade from {installed} to {instruction.version} not allowed by the instruction")

    def _installed_version(self, system: Path) -> str | None:
        try:
            self.parts.mount(system, SYSTEM_MOUNT, options="ro,nosuid,nodev,noexec,noload")
        except Failed:
            return None
        try:
            return read_os_release(SYSTEM_MOUNT).version_id
        finally:
            self.parts.umount(SYSTEM_MOUNT)

    def record(self, result: Result) -> Result:
        """Write the verdict and return it; the instruction goes only when nothing more will be tried.

        A completed install puts the new release on trial (GRUB counts its boots from now on) before
        the instruction goes, so there is no moment in which it boots unwatched."""
        result = self._as_rollback(result)
        with _stage(self.console, "finishing", self.seconds):
            write_result(self.cfg, result)
            # Marks the moment between the verdict on disk and the instruction's removal (power-cut tests).
            self.console.say(f"recovery: result written: {result.outcome}")
            if result.outcome in (Outcome.installed, Outcome.rolled_back) and self.instruction is not None:
                Installed(BundleRef.of(self.instruction), from_version=self.from_version, at=result.finished,
                          restored=self.rollback).write(self.cfg)
                durable_unlink(self.cfg / NOTES)  # notes of an earlier trial of the same version are stale
                start_trial(self.cfg, self.config.trial_boots)
            if result.outcome != Outcome.failed:
                durable_unlink(self.cfg / INCOMPLETE)
                durable_unlink(self.cfg / INSTRUCTION)
                reset_fallback_counter(self.cfg)
            # GRUB reads cfg past its journal: without this a cut now would let it boot us once more.
            checkpoint_journal(self.cfg)
        return result

    def _as_rollback(self, result: Result) -> Result:
        """A rollback's verdict in its own words: rolled back, and why the release before it failed."""
        if not self.rollback:
            return result
        if result.outcome == Outcome.installed:
            failed = read_failed(self.cfg).get(self.from_version or "")
            reason = failed.reason if failed else f"{self.from_version or 'the release on trial'} failed its trial"
            return replace(result, outcome=Outcome.rolled_back, reason=reason)
        return replace(result, reason=f"cannot roll back to {self.to_version}: {result.reason}")


def reset_fallback_counter(cfg: Path) -> None:
    """An empty block for GRUB to count garbage instructions' tries in (made if it is missing; once it
    exists, written over its own blocks: `write_block`)."""

    (cfg / FALLBACK_COUNTER).parent.mkdir(parents=True, exist_ok=True)
    write_block(cfg / FALLBACK_COUNTER, format_envblock({}))


def ensure_counters(cfg: Path) -> None:
    """Make the blocks GRUB counts in that are missing (an image builder's cfg may have neither): the
    fallback counter, and an empty trial block (no trial). Made now, while the instruction that brought
    us here is there (GRUB then reads neither), they are written over their own blocks from then on, so
    the writes that finish an install rename neither (DESIGN.md "Crash states")."""
    missing = [name for name in (FALLBACK_COUNTER, TRIAL) if not (cfg / name).exists()]
    if FALLBACK_COUNTER in missing:
        reset_fallback_counter(cfg)
    if TRIAL in missing:
        end_trial(cfg)  # checkpoints cfg's journal, with the counter made just before
    elif missing:
        checkpoint_journal(cfg)
