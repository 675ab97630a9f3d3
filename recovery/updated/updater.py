"""`reflashctl`, the running system's side of an update: fetch and verify a bundle, stage it, reboot.

The plan reads in the order of the cycle: fetch into storage, verify in full (the recovery's own
checks), name the bundle's final place, write the instruction atomically, then reboot into the recovery.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from recovery.core.atomic import durable_unlink, fsync_dir
from recovery.core.bundle import VerifiedBundle, verify_bundle
from recovery.core.errors import Failed, Rejected, UpdateError
from recovery.core.feed import Feed, Release
from recovery.core.instruction import Instruction, read_instruction, write_instruction
from recovery.core.keys import Keyring
from recovery.core.output import Progress, step
from recovery.core.result import read_result
from recovery.core.run import reboot_now, run
from recovery.core.trial import Installed, TrialCounter, read_failed, read_fallback
from recovery.core.version import Version
from recovery.updated.feeds import load_feed
from recovery.updated.feedstate import check_fresh, read_state, remember
from recovery.updated.sysconfig import SystemConfig
from recovery.updated.source import Source
from recovery.updated.transfer import PARTIAL, FreeSpace, Report, download, free_space

log = logging.getLogger(__name__)


BUNDLE_SUFFIX = ".bundle"


Reboot = Callable[[], None]


Clock = Callable[[], datetime]


class Busy(Rejected):
    """Another update operation holds the bundle directory: nothing was done."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def reboot_system() -> None:
    """Reboot into the recovery: through systemd when it runs (a clean shutdown; by kexec, past the
    firmware and GRUB, when the system configuration allows it and it can), else sync + reboot(2)."""
    if Path("/run/systemd/system").exists():
        try:
            config = SystemConfig.load(None)  # /etc/recovery/system.toml, or $UPDATECTL_CONFIG
        except (Rejected, OSError) as e:
            log.info("no kexec: %s", e)
            config = None
        if config is not None and config.kexec:
            from recovery.updated.kexec import reboot_into_recovery

            reboot_into_recovery(config)
            return
        run(["systemctl", "reboot"])
        return
    try:
        reboot_now()
    except Failed as e:
        raise Failed(f"{e}; the update is staged, reboot by hand to install it") from None


@dataclass(frozen=True)
class Staged:
    """What `install` left for the recovery: the bundle on storage and the instruction naming it."""

    product: str
    version: str
    bundle: Path  # on this system
    file: PurePosixPath  # the same file as the recovery names it on the storage disk
    sha256: str
    allow_downgrade: bool = False  # the operator's --allow-downgrade, for the recovery to see


@dataclass(frozen=True)
class Updater:
    """Everything `reflashctl` does, on one configuration; the side effects a test must control are fields."""

    config: SystemConfig
    reboot: Reboot = reboot_system
    free: FreeSpace = free_space
    progress: bool = True
    clock: Clock = utc_now  # what an expired feed is measured against

    # --- install ---------------------------------------------------------------------------------

    def install(
        self, location: str | Source, *, force: bool = False, allow_downgrade: bool = False,
        release: Release | None = None,
    ) -> Staged:
        """Fetch, verify and stage the bundle at `location`; the instruction is written last.

        `release` (from a verified feed) adds its version and sha256 to what the bundle must match.
        A bundle older than the running version is refused unless `allow_downgrade`, which the
        instruction then carries (the recovery refuses a downgrade it does not).
        """
        source = location if isinstance(location, Source) else Source.parse(location)
        keyring = Keyring.load(self.config.keys)  # before any download: a system without keys cannot verify
        directory = self.bundle_directory()
        with self._lock(directory):
            in_place = self._in_storage(source)
            if in_place is not None:
                bundle, owned = in_place, False
                log.info("%s already lies on the storage partition: staging it in place", bundle)
            else:
                bundle, owned = self._fetch(source, directory, release), True
            try:
                verified = self._verify(
                    bundle, keyring, release, force=force, allow_downgrade=allow_downgrade, name=source.name
                )
                if owned:
                    final = directory / source.name
                    os.replace(bundle, final)
                    fsync_dir(directory)
                    bundle = final
                staged = Staged(
                    product=verified.manifest.product, version=verified.manifest.version, bundle=bundle,
                    file=self._path_on_storage(bundle), sha256=verified.sha256 or "",
                    allow_downgrade=allow_downgrade,
                )
                self._write_instruction(staged)
            except BaseException as e:
                # A bundle that is not staged is of no use and takes space: it goes. One the operator put
                # on storage is not ours to delete; a verification stopped by the operator proves nothing.
                if owned and isinstance(e, UpdateError):
                    durable_unlink(bundle)
                raise
            self._prune(directory, keep=bundle)
        return staged

    def bundle_directory(self) -> Path:
        """The bundle directory on the mounted storage partition, made when missing."""
        if not self.config.storage.is_dir():
            raise Rejected(f"the storage partition is not mounted at {self.config.storage}")
        directory = self.config.bundle_dir
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Rejected(f"cannot create {directory}: {e.strerror or e}") from None
        return directory

    def _in_storage(self, source: Source) -> Path | None:
        """The local file itself when it lies on the storage partition already (no copy is needed)."""
        if source.path is None:
            return None
        try:
            path = source.path.resolve(strict=True)
            storage = self.config.storage.resolve(strict=True)
        except (OSError, RuntimeError):
            return None  # a missing file is reported by the copy, with its reason
        if not path.is_relative_to(storage) or path.name.endswith(PARTIAL):
            return None
        try:
            # Another file system mounted below the storage mount is not the storage partition.
            if path.stat().st_dev != storage.stat().st_dev:
                return None
        except OSError:
            return None
        return path

    def _fetch(self, source: Source, directory: Path, release: Release | None, report: Report | None = None) -> Path:
        name = source.name
        partial = directory / (name + PARTIAL)
        verb = "Downloading" if source.scheme.remote else "Copying"
        with step(f"{verb} {source} to {directory}"):
            try:
                transfer = download(
                    source, partial, where=self.config.storage, size=release.size if release else None,
                    free=self.free, progress=self.progress, report=report,
                )
            except Rejected as e:
                kept = [p for p in sorted(self._kept()) if p.is_file()]
                if not str(e).startswith("not enough space") or not kept:
                    raise
                # The space the fallback takes is not free for a download: say so, or the operator
                # deletes it by hand and loses the rollback.
                sizes = ", ".join(f"{p.name} ({-(-p.stat().st_size // (1 << 20))} MiB)" for p in kept)
                raise Rejected(f"{e}; kept for a rollback: {sizes}") from None
        return transfer.path

    def _verify(
        self, bundle: Path, keyring: Keyring, release: Release | None, *, force: bool, allow_downgrade: bool,
        name: str,
    ) -> VerifiedBundle:
        size = bundle.stat().st_size
        with step(f"Verifying {name}"):
            verified = verify_bundle(
                bundle, keyring, product=self.config.product,
                version=release.version if release else None,
                sha256=release.sha256 if release else None,
                compute_sha256=True,
                progress=Progress(size, f"verifying {name}", stream=sys.stdout) if self.progress else None,
            )
        version = Version(verified.manifest.version)
        running = self.config.running_version()
        if running is not None and version == Version(running) and not force:
            raise Rejected(f"{verified.manifest.version} is already running (use --force to install it again)")
        if running is not None and version < Version(running):
            # Decided on the verified manifest's version: the bundle's name or a feed could lie.
            if not allow_downgrade:
                raise Rejected(f"downgrade from {running} to {version} refused (use --allow-downgrade to install it)")
            log.warning("this is a downgrade: %s is running, the bundle carries %s", running, version)
        return verified

    def _path_on_storage(self, bundle: Path) -> PurePosixPath:
        """The bundle's path as the recovery names it: absolute on the storage disk."""
        relative = bundle.resolve().relative_to(self.config.storage.resolve())
        return PurePosixPath("/") / relative.as_posix()

    def _write_instruction(self, staged: Staged) -> None:
        instruction = Instruction.create(
            disk=self.config.storage_disk, file=str(staged.file), sha256=staged.sha256,
            version=staged.version, allow_downgrade=staged.allow_downgrade,
        )
        try:
            write_instruction(self.config.instruction, instruction)
        except OSError as e:
            raise Failed(f"cannot write the update instruction {self.config.instruction}: {e.strerror or e}") from None

    def _kept(self) -> set[Path]:
        """Bundles that must stay: the fallback (a failed trial reinstalls it) and the one installed
        last (it becomes the fallback when it confirms)."""
        kept = set()
        for read in (read_fallback, lambda cfg: (i.bundle if (i := Installed.read(cfg)) else None)):
            try:
                ref = read(self.config.cfg)
            except UpdateError as e:
                log.warning("%s", e)
                continue
            if ref is not None and ref.disk == self.config.storage_disk:
                kept.add(self.config.storage / ref.file.lstrip("/"))
        return kept

    def _prune(self, directory: Path, *, keep: Path) -> None:
        """Only the staged bundle is of use now, besides the fallback and the release installed last:
        older bundles and stale partial downloads go."""
        kept = {keep, *self._kept()}
        for path in directory.iterdir():
            if path in kept or not path.is_file() or path.name.startswith("."):
                continue
            if path.name.endswith(BUNDLE_SUFFIX) or path.name.endswith(PARTIAL):
                log.info("removing %s, which the staged update replaces", path.name)
                try:
                    path.unlink()
                except OSError as e:
                    log.warning("cannot remove %s: %s", path, e.strerror or e)

    @contextmanager
    def _lock(self, directory: Path, *, wait: float = 1.0) -> Iterator[None]:
        # Two installs at once would write one partial file from two places and race on the instruction.
        # The directory itself is the lock, so no lock file is left lying about. `wait`: a status that
        # looks whether the lock is free holds it for a moment; an operation starting then waits that out.
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise Busy("another update operation is running (reflashctl or reflashd)") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)

    def busy(self) -> bool:
        """Whether an update operation (of any process) holds the bundle directory right now."""
        try:
            with self._lock(self.config.bundle_dir, wait=0):
                return False
        except Busy:
            return True
        except OSError:
            return False  # no bundle directory: nothing can be running in it

    # --- feeds -----------------------------------------------------------------------------------

    def check(self, location: str) -> tuple[Feed, Source, Release, str | None]:
        """The verified, current feed at `location`, its newest release and the running version.

        A feed older than the newest one this system accepted, or past its `expires`, is rejected;
        the remembered time moves forward only after the signature and every other check passed."""
        keyring = Keyring.load(self.config.keys)
        remembered = read_state(self.config.cfg)
        feed, source = load_feed(location, keyring, product=self.config.product)
        now = self.clock()
        check_fresh(feed, remembered, now)
        remember(self.config.cfg, feed, remembered, source=str(source), now=now)
        newest = feed.newest()
        assert newest is not None  # load_feed rejects an empty feed
        return feed, source, newest, self.config.running_version()

    # --- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The running version, any staged update and the last recovery result, as plain data."""
        staged: dict[str, Any] | None = None
        problem: str | None = None
        if self.config.instruction.exists():
            try:
                staged = read_instruction(self.config.instruction).to_dict()
            except UpdateError as e:
                problem = str(e)
        result = read_result(self.config.cfg)
        last: dict[str, Any] | None = None
        if result is not None:
            last = json.loads(result.to_json())
            last["summary"] = result.summary()
        on_trial: dict[str, Any] | None = None
        trial_problem: str | None = None
        fallback: dict[str, Any] | None = None
        try:
            counter = TrialCounter.read(self.config.cfg)
            installed = Installed.read(self.config.cfg)
            if counter.on_trial:
                on_trial = {"version": installed.bundle.version if installed else None, "boot": counter.boot,
                            "max_boots": counter.max_boots, "summary": counter.summary()}
            ref = read_fallback(self.config.cfg)
            fallback = ref.to_dict() if ref else None
        except UpdateError as e:
            trial_problem = str(e)
        failed = {v: {"reason": f.reason, "at": f.at} for v, f in read_failed(self.config.cfg).items()}
        return {
            "trial": on_trial,
            "trial_error": trial_problem,
            "fallback": fallback,
            "rolled_back": failed,
            "product": self.config.product,
            "version": self.config.running_version(),
            "staged": staged,
            "staged_error": problem,
            "last_result": last,
        }


def newer(release: Release, running: str | None) -> bool:
    return running is None or Version(release.version) > Version(running)
