"""The update service's operations, one implementation each for `reflashctl` and `reflashd`: download
ahead, install what was downloaded, cancel, status, check.

Every operation takes the bundle directory's lock (`Updater._lock`), so a CLI working on its own and
the daemon never run two at once; every state it leaves is on storage or cfg (servicestate.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from recovery.core.atomic import checkpoint_journal, durable_unlink, fsync_dir
from recovery.core.errors import Failed, Rejected, UpdateError
from recovery.core.feed import Release
from recovery.core.instruction import read_instruction
from recovery.core.keys import Keyring
from recovery.core.output import strip_controls
from recovery.core.trial import read_failed
from recovery.core.version import Version
from recovery.updated.servicestate import Download, Phase, ServiceState, parse_time, read_state, write_state
from recovery.updated.source import Scheme, Source
from recovery.updated.sysconfig import SystemConfig
from recovery.updated.transfer import PARTIAL, Interrupted
from recovery.updated.updater import Staged, Updater, newer

log = logging.getLogger(__name__)


RSS_NAME = "releases.rss"  # beside releases.json, as `reflash publish` writes it


class Cancelled(Rejected):
    """A running download was cancelled: its partial file goes."""


class Stopped(Interrupted):
    """The daemon is stopping: the partial file and the record stay, the next start resumes."""


class Stop:
    """Set from another thread to end a running download at its next chunk."""

    def __init__(self) -> None:
        self.reason: UpdateError | None = None

    def set(self, reason: UpdateError) -> None:
        self.reason = reason


class State:
    """The names `status` gives the update's state, most pressing first."""

    staged = "staged"  # an instruction is on cfg: the next reboot installs it
    downloading = "downloading"
    on_trial = "on-trial"
    downloaded = "downloaded"
    idle = "idle"


@dataclass(frozen=True)
class Latest:
    """What `--latest` found in a verified, current feed: a release to fetch, or why there is none."""

    source: Source | None
    release: Release
    running: str | None
    message: str | None = None  # "up to date: …" or "skipping …": nothing to do


@dataclass(frozen=True)
class Operations:
    updater: Updater
    interval: float = 1.0  # seconds between writes of the download's progress

    @property
    def config(self) -> SystemConfig:
        return self.updater.config

    @property
    def directory(self) -> Path:
        return self.config.bundle_dir

    # --- check -----------------------------------------------------------------------------------

    def latest(self, feed: str, *, force: bool = False, allow_downgrade: bool = False) -> Latest:
        """The feed's newest release, when it is one to install: newer, the same with `force`, older
        with `allow_downgrade`; a release rolled back once is skipped unless `force`."""
        _feed, source, newest, running = self.updater.check(feed)
        same = running is not None and Version(newest.version) == Version(running)
        if not (newer(newest, running) or (same and force) or (not same and allow_downgrade)):
            return Latest(None, newest, running, up_to_date(running, newest))
        failed = read_failed(self.config.cfg).get(newest.version)
        if failed is not None and not force:
            # Rolled back once already: the same bundle would fail the same way.
            return Latest(None, newest, running, f"skipping {strip_controls(newest.version)}: it was rolled back on "
                          f"{failed.at} ({failed.reason}); --force installs it anyway")
        return Latest(source.join(newest.file), newest, running)

    def check(self, feed: str) -> dict[str, Any]:
        """What the page shows of a feed: the newest release, its notes, the RSS link, what to do."""
        _feed, source, newest, running = self.updater.check(feed)
        failed = read_failed(self.config.cfg).get(newest.version)
        return {
            "running": running,
            "product": self.config.product,
            "feed": str(source),
            "rss": str(source.join(RSS_NAME)),
            "newest": {"version": newest.version, "notes": newest.notes, "size": newest.size,
                       "created": newest.created, "sha256": newest.sha256},
            "available": newer(newest, running) and failed is None,
            "rolled_back": {"reason": failed.reason, "at": failed.at} if failed else None,
            "message": (f"update available: {newest.version}" if newer(newest, running) and failed is None
                        else f"{newest.version} was rolled back on {failed.at} ({failed.reason})" if failed
                        else up_to_date(running, newest)),
        }

    # --- download --------------------------------------------------------------------------------

    def download(
        self, location: str | Source, *, release: Release | None = None, force: bool = False,
        allow_downgrade: bool = False, stop: Stop | None = None,
    ) -> Download:
        """Fetch (resuming a partial file), verify and keep a bundle as *downloaded*; no instruction."""
        source = location if isinstance(location, Source) else Source.parse(location)
        name = source.name
        self._refuse_while_staged("download")
        keyring = Keyring.load(self.config.keys)
        directory = self.updater.bundle_directory()
        with self.updater._lock(directory):
            record = Download(
                Phase.downloading, str(source), name, version=release.version if release else None,
                sha256=release.sha256 if release else None, size=release.size if release else None,
                force=force, allow_downgrade=allow_downgrade,
            )
            self._save_download(record)
            reporter = _Reporter(self, record, stop)
            partial = directory / (name + PARTIAL)
            try:
                fetched = self.updater._fetch(source, directory, release, reporter)
                verified = self.updater._verify(fetched, keyring, release, force=force,
                                                allow_downgrade=allow_downgrade, name=name)
                final = directory / name
                os.replace(fetched, final)
                fsync_dir(directory)
            except Interrupted as e:
                # Resumable: the partial file and the record stay; `download` again (or the daemon's
                # next start, for a stop) carries on.
                error = None if isinstance(e, Stopped) else f"{e.kind}: {e}"
                self._save_download(replace(reporter.record, error=error))
                raise
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt) and source.scheme.remote:
                    raise  # the partial file stays for the next run, as a plain download leaves it
                partial.unlink(missing_ok=True)
                if isinstance(e, Cancelled):
                    self._save_download(None)
                elif isinstance(e, UpdateError):
                    self._save_download(replace(reporter.record, phase=Phase.failed, error=f"{e.kind}: {e}"))
                raise
            size = final.stat().st_size
            done = replace(record, phase=Phase.downloaded, version=verified.manifest.version,
                           sha256=verified.sha256, size=size, done=size, error=None)
            self._save_download(done)
            self.updater._prune(directory, keep=final)
        log.info("downloaded %s %s to %s: `reflashctl install` installs it", verified.manifest.product,
                 verified.manifest.version, final)
        return done

    def resume(self, stop: Stop | None = None) -> Download | None:
        """Carry on with the recorded download that broke off; None when there is none."""
        record = self.state().download
        if record is None or record.phase != Phase.downloading:
            return None
        release = None
        if record.version and record.sha256 and record.size:
            release = Release(record.version, record.file, record.size, record.sha256, created="")
        log.info("resuming the download of %s", record.source)
        return self.download(record.source, release=release, force=record.force,
                             allow_downgrade=record.allow_downgrade, stop=stop)

    # --- install ---------------------------------------------------------------------------------

    def install(self, *, reboot_at: datetime | None = None) -> Staged:
        """Stage the downloaded bundle, verified again first (storage is not trusted between the two)."""
        record = self.state().download
        if record is None or record.phase == Phase.failed:
            raise Rejected("nothing downloaded: reflashctl download URL (or --latest FEED) first")
        if record.phase == Phase.downloading:
            raise Rejected(f"the download of {record.source} has not finished ({record.percent or 0}%)")
        path = self.directory / record.file
        if not path.is_file():
            raise Rejected(f"the downloaded bundle {path} is gone: download it again")
        if not (record.version and record.sha256 and record.size):
            raise Rejected(f"the download record of {record.file} lacks its version, sha256 or size: download it again")
        expected = Release(record.version, record.file, record.size, record.sha256, created="")
        try:
            staged = self.updater.install(Source(Scheme.file, str(path), path), release=expected,
                                          force=record.force, allow_downgrade=record.allow_downgrade)
        except Rejected as e:
            if not str(e).startswith("another update operation") and path not in self.updater._kept():
                # It no longer verifies (or is refused for good): it must not be offered again.
                path.unlink(missing_ok=True)
                self._save_download(replace(record, phase=Phase.failed, error=f"{e.kind}: {e}"))
            raise
        self._save(replace(self.state(), reboot_at=reboot_at.isoformat(timespec="seconds") if reboot_at else None))
        return staged

    # --- cancel ----------------------------------------------------------------------------------

    def cancel(self, *, discard: bool = False) -> list[str]:
        """Take back a staged install before the reboot (the instruction removed past cfg's journal, so
        GRUB sees it gone); with `discard`, the downloaded bundle goes too. Returns what was done."""
        done: list[str] = []
        directory = self.updater.bundle_directory()
        with self.updater._lock(directory):
            instruction = self.config.instruction
            staged_file: Path | None = None
            if instruction.exists():
                try:
                    staged = read_instruction(instruction)
                    staged_file = self.config.storage / str(staged.file).lstrip("/")
                    what = f"the staged update to {staged.version}"
                except UpdateError:
                    what = "an unreadable update instruction"
                try:
                    durable_unlink(instruction)
                except OSError as e:
                    raise Failed(f"cannot remove {instruction}: {e.strerror or e}") from None
                checkpoint_journal(self.config.cfg)
                done.append(f"cancelled {what}")
            try:
                state = self.state()
            except Rejected as e:
                if not discard:
                    # The instruction is gone all the same; the record waits for --discard.
                    return done + [str(e)]
                state = ServiceState()  # discarded: nothing in it is of use
            if state.reboot_at:
                done.append(f"the reboot scheduled for {state.reboot_at} is off")
            state = replace(state, reboot_at=None)
            if discard:
                kept = self.updater._kept()
                record = state.download
                doomed = {p for p in (staged_file, record and directory / record.file,
                                      record and directory / (record.file + PARTIAL)) if p is not None}
                for path in sorted(doomed):
                    if path in kept:
                        log.info("keeping %s: it is kept for a rollback", path.name)
                    elif path.parent == directory and durable_unlink(path):
                        done.append(f"removed {path.name}")
                state = replace(state, download=None)
            self._save(state)
        return done or ["nothing to cancel"]

    # --- status ----------------------------------------------------------------------------------

    def state(self) -> ServiceState:
        return read_state(self.directory)

    def status(self) -> dict[str, Any]:
        """`Updater.status()` and the service's part: the download, a scheduled reboot, one state name."""
        status = self.updater.status()
        try:
            state = self.state()
            problem = None
        except Rejected as e:
            state, problem = ServiceState(), str(e)
        record = state.download
        if record is not None and record.phase == Phase.downloaded:
            # A downloaded bundle that is gone (pruned by a one-step install) or already running is done.
            if not (self.directory / record.file).is_file() or (
                    status["staged"] is None and record.version == status["version"]):
                record = None
        running = self.updater.busy()
        download = {**record.to_dict(), "running": running and record.phase == Phase.downloading} if record else None
        staged = status["staged"] is not None or status["staged_error"] is not None
        if staged:
            name = State.staged
        elif download and download["phase"] == Phase.downloading:
            name = State.downloading
        elif status["trial"] is not None:
            name = State.on_trial
        elif download and download["phase"] == Phase.downloaded:
            name = State.downloaded
        else:
            name = State.idle
        return {**status, "state": name, "download": download, "download_error": problem,
                "reboot_at": state.reboot_at if staged else None, "busy": running}

    # --- records ---------------------------------------------------------------------------------

    def _save(self, state: ServiceState) -> None:
        write_state(self.directory, state)

    def _save_download(self, record: Download | None) -> None:
        try:
            state = self.state()
        except Rejected:
            state = ServiceState()  # an unreadable record is replaced by the one being written
        self._save(replace(state, download=record))

    def _refuse_while_staged(self, what: str) -> None:
        if self.config.instruction.exists():
            raise Rejected(f"an update is staged: cancel it first (reflashctl cancel) to {what} another")


class _Reporter:
    """The download's progress into its record, at most once per `interval`; the place a stop lands."""

    def __init__(self, ops: Operations, record: Download, stop: Stop | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ops, self.record, self.stop, self.clock = ops, record, stop, clock
        self.last = clock()

    def __call__(self, done: int, total: int | None) -> None:
        if self.stop is not None and self.stop.reason is not None:
            raise self.stop.reason
        self.record = replace(self.record, done=done, size=total or self.record.size)
        if self.clock() - self.last >= self.ops.interval:
            self.last = self.clock()
            self.ops._save_download(self.record)


def up_to_date(running: str | None, newest: Release) -> str:
    older = running is not None and Version(newest.version) < Version(running)
    hint = " (older: --allow-downgrade installs it)" if older else ""
    return f"up to date: {running} is running, the newest release is {strip_controls(newest.version)}{hint}"


def reboot_time(text: str, now: datetime) -> datetime | None:
    """`now` -> None (reboot at once), else an ISO 8601 time with its zone, not in the past."""
    if text == "now":
        return None
    try:
        at = parse_time(text)
    except ValueError as e:
        raise Rejected(f"bad reboot time {text!r}: {e}") from None
    if at < now.replace(microsecond=0):
        raise Rejected(f"reboot time {text} is in the past")
    return at
