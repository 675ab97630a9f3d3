"""The running system's side of a trial: health checks, `confirm`, and the time limit that reboots a
boot which never confirms, whatever state it got stuck in.

GRUB counts the trial boots and the recovery rolls back (recovery/core/trial.py has the records); what
happens here only ends a trial early (confirm) or moves it on (reboot). `settle()` runs at every boot, so
a confirmation a power cut interrupted is completed by the next one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recovery.core.atomic import durable_unlink
from recovery.core.errors import Failed, Rejected
from recovery.core.instruction import read_instruction
from recovery.core.run import program_env
from recovery.core.trial import (
    BundleRef,
    Installed,
    TrialCounter,
    add_note,
    end_trial,
    read_fallback,
    write_fallback,
)
from recovery.updated import recoveryslots
from recovery.updated.sysconfig import SystemConfig

log = logging.getLogger(__name__)

OUTPUT_TAIL = 200  # characters of a failed check's output kept in its note

Reboot = Callable[[], None]


@dataclass(frozen=True)
class TrialState:
    """What the running system knows of its trial: GRUB's counter and what the recovery installed."""

    counter: TrialCounter
    installed: Installed | None

    @classmethod
    def read(cls, config: SystemConfig) -> TrialState:
        return cls(TrialCounter.read(config.cfg), Installed.read(config.cfg))

    @property
    def version(self) -> str:
        return self.installed.bundle.version if self.installed else "the release on trial"


def _on_trial(config: SystemConfig, *, strict: bool = True) -> TrialState | None:
    """The trial of the running release, or None when there is none. With `strict`, Rejected when cfg
    disagrees with what is running (a trial of another release: it cannot confirm)."""
    state = TrialState.read(config)
    if not state.counter.on_trial:
        return None
    if not strict:
        return state
    running = config.running_version()
    if state.installed is None:
        raise Rejected(f"on trial, but cfg has no install record ({config.cfg}/recovery/installed.json)")
    if running != state.installed.bundle.version:
        raise Rejected(f"the trial is of {state.installed.bundle.version}, but {running or 'an unknown version'} is running")
    return state


# --- health checks -------------------------------------------------------------------------------


def health_checks(directory: Path) -> list[Path]:
    """The product's checks: executable files in `directory`, in name order (none: healthy)."""
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    return [p for p in entries if not p.name.startswith(".") and p.is_file() and os.access(p, os.X_OK)]


def run_health_checks(directory: Path, timeout: float) -> str | None:
    """Run every check, each with `timeout` seconds; the first failure in words, or None when all pass."""
    for check in health_checks(directory):
        log.info("health check %s", check.name)
        try:
            proc = subprocess.run([os.fspath(check)], stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, env=program_env(), check=False)
        except subprocess.TimeoutExpired:
            return f"health check {check.name} did not finish within {timeout:g} s"
        except OSError as e:
            return f"health check {check.name} could not run: {e.strerror or e}"
        if proc.returncode != 0:
            said = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
            tail = f": {said[-1][:OUTPUT_TAIL]}" if said else ""
            status = f"exit status {proc.returncode}" if proc.returncode > 0 else f"signal {-proc.returncode}"
            return f"health check {check.name} failed ({status}){tail}"
    return None


# --- confirm -------------------------------------------------------------------------------------


def confirm(config: SystemConfig, *, check: bool, reboot: Reboot,
            announce: Callable[[str], None] | None = None) -> str:
    """End the running release's trial (after its health checks, with `check`) and make its bundle the
    fallback. A failed check is noted on cfg and reboots, so GRUB counts the next trial boot."""
    state = _on_trial(config)
    if state is None:
        settle(config)
        return f"not on trial: {config.running_version() or 'the running release'} is confirmed"
    counter, version = state.counter, state.version
    boot = f"boot {counter.boot or '?'} of {counter.max_boots}"
    if check:
        problem = run_health_checks(config.health_dir, config.health_timeout)
        if problem is not None:
            add_note(config.cfg, version, counter.boot, problem)
            print(f"trial: {version} {problem}; rebooting ({boot})", flush=True)
            reboot()
            raise Failed(f"{version} is not healthy: {problem}")
    # The trial ends first; the fallback follows from the install record (settle), also after a cut.
    end_trial(config.cfg)
    add_note(config.cfg, version, counter.boot, "confirmed")
    _settle_fallback(config)
    line = f"trial: confirmed {version} ({boot}): its bundle is the fallback now"
    if announce is not None:
        announce(line)  # before the recovery update, which takes seconds: the release is confirmed now
    _update_recovery(config)
    return line


def settle(config: SystemConfig) -> None:
    """Outside a trial, the fallback is the bundle of the release that was installed (and so confirmed):
    bring the record up to date and remove the bundle it replaces; then the recovery partition gets
    the recovery OS the release carries, if it is new. Idempotent; run at every boot."""
    if TrialCounter.read(config.cfg).on_trial:
        return
    _settle_fallback(config)
    _update_recovery(config)


def _update_recovery(config: SystemConfig) -> None:
    try:
        recoveryslots.update_recovery(config)
    except Exception as e:  # noqa: BLE001 - it never raises; if it did, the boot goes on all the same
        log.warning("recovery-slots: the recovery was not updated: %s", e)


def _settle_fallback(config: SystemConfig) -> None:
    installed = Installed.read(config.cfg)
    if installed is None:
        return
    previous = read_fallback(config.cfg)
    if previous == installed.bundle:
        return
    write_fallback(config.cfg, installed.bundle)
    log.info("the fallback is now %s (%s)", installed.bundle.version, installed.bundle.file)
    if previous is not None and previous.file != installed.bundle.file:
        _remove_replaced(config, previous)


def _remove_replaced(config: SystemConfig, previous: BundleRef) -> None:
    """Delete the bundle the fallback no longer names, unless a staged update still needs it."""
    if previous.disk != config.storage_disk:
        return  # not on the storage partition we have mounted
    try:
        if str(read_instruction(config.instruction).file) == previous.file:
            return
    except Rejected:
        pass
    path = config.storage / previous.file.lstrip("/")
    try:
        if durable_unlink(path):
            log.info("removed %s, the fallback before", path)
    except OSError as e:
        log.warning("cannot remove the old fallback %s: %s", path, e.strerror or e)


# --- the time limit ------------------------------------------------------------------------------


def uptime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def guard(config: SystemConfig, *, reboot: Reboot, clock: Callable[[], float] = uptime,
          sleep: Callable[[float], None] = time.sleep, poll: float = 5.0) -> str:
    """At boot: note that a trial boot started, then reboot it if it has not confirmed `trial_time_limit`
    seconds after boot, whatever it is doing. Outside a trial: settle the fallback and return. A release
    that cannot confirm (cfg says another one is on trial) is held to the limit all the same."""
    state = _on_trial(config, strict=False)
    if state is None:
        settle(config)
        return "not on trial"
    counter, version, limit = state.counter, state.version, config.trial_time_limit
    boot = f"boot {counter.boot or '?'} of {counter.max_boots}"
    add_note(config.cfg, version, counter.boot, "started")
    print(f"trial: {version} is on trial ({boot}); it reboots unless confirmed within {limit:g} s of boot", flush=True)
    while clock() < limit:
        sleep(min(poll, max(limit - clock(), 0.1)))
        if not TrialCounter.read(config.cfg).on_trial:
            return f"{version} confirmed"
    seen = f"not confirmed within {limit:g} s of boot"
    add_note(config.cfg, version, counter.boot, seen)
    print(f"trial: {version} {seen}; rebooting ({boot})", flush=True)
    reboot()
    return seen
