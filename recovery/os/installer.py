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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import uuid4

from recovery.core.atomic import atomic_write, checkpoint_journal, durable_unlink
from recovery.core.errors import Failed, Rejected, UpdateError
from recovery.core.output import Progress
from recovery.core.result import Outcome, Result, now, write_result
from recovery.core.version import Version
from recovery.os.cmdline import Boot
from recovery.os.config import RecoveryConfig
from recovery.os.console import Console

if TYPE_CHECKING:
    from recovery.core.instruction import Instruction




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


def _read_os_version(root: Path) -> str | None:
    try:
        for line in (root / "etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_ID":
                return value.strip().strip('"')
    except (OSError, UnicodeDecodeError):
        pass
    return None


def _read_marker(cfg: Path) -> dict | None:
    """The record an earlier try left before erasing, or None when the system is whole."""
    try:
        raw = (cfg / INCOMPLETE).read_bytes()
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(raw)
    except ValueError:
        marker = None
    # Even an unreadable marker means the system was being rewritten: never treat it as whole.
    return marker if isinstance(marker, dict) and isinstance(marker.get("uuid"), str) else {"uuid": str(uuid4())}


def _bundle_path(storage: Path, file: Path) -> Path:
    """The bundle's path below the storage mount, refusing symlinks that lead off that disk."""
    path = (storage / os.fspath(file).lstrip("/")).resolve()
    if storage.resolve() not in path.parents:
        raise Rejected(f"bundle {file} lies outside the storage disk")
    return path


class Installer:
    """One run of the install, from the instruction to the written result."""

    def __init__(self, config: RecoveryConfig, boot: Boot, console: Console, cfg: Path = CFG_MOUNT) -> None:
        self.config = config
        self.boot = boot
        self.console = console
        self.cfg = cfg
        self.seconds: dict[str, float] = {}
        self.started = now()
        self.from_version: str | None = None
        self.to_version: str | None = None

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
        )

    def run(self) -> Result:
        """Install; return installed or rejected, raise for failed (the caller decides what stays)."""
        from recovery.core.bundle import verify_bundle
        from recovery.core.instruction import DiskSpec, DiskSpecKind, read_instruction
        from recovery.core.keys import Keyring
        from recovery.os.devices import (
            find_device,
            mount,
            partition_info,
            same_device,
            umount,
        )
        from recovery.os.erase import erase, filesystem_identity
        from recovery.os.extract import extract_payload
        from recovery.os.mounts import mounted_at

        marker = _read_marker(self.cfg)
        incomplete = marker is not None
        if marker is not None:
            self.from_version = marker.get("from_version")
        try:
            with _stage(self.console, "verifying", self.seconds, "verify"):
                instruction = read_instruction(self.cfg / INSTRUCTION)
                self.to_version = instruction.version
                timeout = self.config.device_timeout
                system = find_device(DiskSpec.parse(self.config.system), timeout=timeout)
                storage = find_device(instruction.disk, timeout=timeout)
                for role in ("cfg", "recovery"):
                    other = find_device(DiskSpec.parse(getattr(self.config, role)), timeout=timeout)
                    if same_device(system, other):
                        raise Rejected(f"system partition {system} is the {role} partition")
                if same_device(system, storage):
                    raise Rejected(f"the bundle's disk {instruction.disk} is the system partition")
                if where := mounted_at(system):
                    raise Rejected(f"system partition {system} is mounted on {', '.join(where)}")
                part = partition_info(system)
                spec = DiskSpec.parse(self.config.system)
                if spec.kind == DiskSpecKind.partlabel and part.name != spec.value:
                    raise Rejected(f"partition {system} is named {part.name!r}, expected {spec.value!r}")
                if not incomplete:
                    self.from_version = self._installed_version(system)
                self._check_downgrade(instruction)
                mount(storage, STORAGE_MOUNT, options="ro,nosuid,nodev,noexec")
                bundle = verify_bundle(
                    _bundle_path(STORAGE_MOUNT, Path(os.fspath(instruction.file))),
                    Keyring.load(self.config.keys),
                    product=self.config.product,
                    version=instruction.version,
                    sha256=instruction.sha256,
                    capacity=part.size,
                )
        except (Rejected, Failed, OSError) as e:
            # Before the erase every problem is a rejection: the system is still whole.
            if not isinstance(e, Rejected):
                e = Rejected(str(e))
            if incomplete:
                # An earlier try erased the system: there is nothing to go back to.
                raise Failed(f"{e}; the system partition is incomplete from an earlier try") from None
            return self.result(Outcome.rejected, str(e))

        # The file system's identity is kept across the erase (fstab and GRUB may name it); it is
        # recorded first, so a try after a power cut mid-mkfs still knows it.
        if marker is None:
            label, uuid = filesystem_identity(system)
            marker = {"since": now(), "from_version": self.from_version, "label": label,
                      "uuid": uuid or str(uuid4())}
        atomic_write(self.cfg / INCOMPLETE, json.dumps({**marker, "try": self.boot.try_count}).encode() + b"\n")
        try:
            with _stage(self.console, "erasing", self.seconds, "erase"):
                erase(system, label=marker.get("label") or None, uuid=marker["uuid"],
                      files=bundle.manifest.rootfs_files)
            with _stage(self.console, "extracting", self.seconds, "extract"):
                mount(system, SYSTEM_MOUNT, options="rw,nosuid,nodev")
                # Opened before the first write: syncfs on it reports every write error since (sync(2)
                # reports none, and the page cache hides them from the extraction's own writes).
                root = os.open(SYSTEM_MOUNT, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    progress = Progress(
                        bundle.manifest.payload.size, "recovery: extracting", stream=sys.stdout, live=False
                    )
                    stats = extract_payload(bundle, SYSTEM_MOUNT, progress=progress)
                    progress.finish()
                    _syncfs(root, system)
                finally:
                    os.close(root)
                umount(SYSTEM_MOUNT)
        except UpdateError as e:
            raise Failed(str(e)) from None
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
        from recovery.os.devices import mount, umount

        try:
            mount(system, SYSTEM_MOUNT, options="ro,nosuid,nodev,noexec,noload")
        except Failed:
            return None
        try:
            return _read_os_version(SYSTEM_MOUNT)
        finally:
            umount(SYSTEM_MOUNT)

    def record(self, result: Result) -> None:
        """Write the verdict; the instruction goes only when nothing more will be tried."""
        with _stage(self.console, "finishing", self.seconds):
            write_result(self.cfg, result)
            # Marks the moment between the verdict on disk and the instruction's removal (power-cut tests).
            self.console.say(f"recovery: result written: {result.outcome}")
            if result.outcome != Outcome.failed:
                durable_unlink(self.cfg / INCOMPLETE)
                durable_unlink(self.cfg / INSTRUCTION)
                reset_fallback_counter(self.cfg)
            # GRUB reads cfg past its journal: without this a cut now would let it boot us once more.
            checkpoint_journal(self.cfg)


def reset_fallback_counter(cfg: Path) -> None:
    """An empty block for GRUB to count garbage instructions' tries in (made if it is missing)."""
    from recovery.core.envblock import format_envblock

    (cfg / FALLBACK_COUNTER).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg / FALLBACK_COUNTER, format_envblock({}))
