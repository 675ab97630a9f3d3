"""The recovery updates itself, under QEMU: a confirmed release writes the recovery it carries into the
spare slot and switches to it; the next install is done by that recovery (result.json says so); a power
cut while the slot is written or switched, and a slot made unbootable on purpose, still leave a recovery
that installs the next update.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recovery.core.envblock import parse_envblock
from recovery.core.slots import RecoveryImage
from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.staging import read_result, ready, stage
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.crashcheck import Checker, check_replay, spread
from vm.machine import Machine
from vm.replay import Replay, StateKind
from vm.writelog import Recording, log_entries_now

SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or 18

MiB = 1024 * 1024
WRITING = r"recovery-slots: writing recovery 2\.0\.0 into slot b"
VERIFIED = r"recovery-slots: slot b verified \(recovery 2\.0\.0\)"
ACTIVE = r"recovery-slots: recovery 2\.0\.0 in slot b is active"


def active_slot(disk: DiskImage) -> str:
    raw = disk.read_file("cfg", "/recovery/slot")
    return "b" if raw is not None and parse_envblock(raw).get("recovery_slot") == "b" else "a"


def slot_record(disk: DiskImage, slot: str) -> RecoveryImage | None:
    raw = disk.read_file("recovery", f"/{slot}/recovery.json")
    return None if raw is None else RecoveryImage.from_json(raw)


def _shell(m: Machine, cmd: str) -> str:
    code, out = m.shell(cmd)
    assert code == 0, out
    return out


# The recovery's lines that begin a phase of its install, and the phase's name (vm.crashcheck).
PHASES = ((r"recovery: erasing", "erasing"), (r"recovery: extracting", "extracting"),
          (r"recovery: finishing", "finishing"), (r"recovery: installed 2\.0\.0\r?\n", "trial"),
          (r"trial: confirmed 2\.0\.0 \(boot 1 of 3\)", "confirmed"))
SAMPLE = int(os.environ.get("CRASH_SAMPLE", "40"))  # flush points of the recorded install checked offline


def _install_2_0_0(
    machine: Callable[..., Machine], built: Any, disk: DiskImage, recovery: str, *, recording: Recording | None = None,
    phases: list[tuple[int, str]] | None = None,
) -> Machine:
    """Stage 2.0.0, boot, and follow its install by the recovery `recovery` (`1.0.0 (slot a)`) to the trial.
    With `recording` (prepared from a disk already staged) the disk's writes are logged, and each phase's
    start is noted in `phases`."""
    if recording is None:
        good = built.bundles["2.0.0"]
        stage(disk, good.read_bytes(), name=good.name)
    m = machine(disk=recording.drive() if recording else disk, probe_kernel=built.recovery / "vmlinuz",
                name="recorded" if recording else None)
    m.expect(rf"recovery: version {re.escape(recovery)}", 4 * RECOVERY)
    for line, phase in PHASES:
        m.expect(line, 4 * RECOVERY)
        if recording is not None and phases is not None:
            phases.append((log_entries_now(recording.log), phase))
    return m


def _repair_is_installed_by_the_new_recovery(machine: Callable[..., Machine], built: Any, disk: DiskImage) -> None:
    """The next update (2.0.0 again: a repair) is installed by recovery 2.0.0 from slot b."""
    m = _install_2_0_0(machine, built, disk, "2.0.0 (slot b)")
    m.expect(ready(built, "2.0.0"), BOOT)
    m.power_cut()
    result = read_result(disk)
    assert (result["outcome"], result["to_version"]) == ("installed", "2.0.0"), result
    assert result["recovery"] == {"version": "2.0.0", "slot": "b"}, result


def test_a_confirmed_release_updates_the_recovery_and_the_new_recovery_installs_the_next_update(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario, tmp_path: Path,
) -> None:
    scenario.name = "Recovery update: 2.0.0 confirms, writes its recovery into slot b, and that recovery installs"
    scenario.checked = ("recovery 1.0.0 (slot a) installs 2.0.0; once confirmed, 2.0.0 writes recovery 2.0.0 into slot b, "
                        "verifies it and switches; status shows both slots; slot a unchanged; the next install is done "
                        "by recovery 2.0.0 from slot b (result.json says so)")
    factory = slot_record(vm_disk, "a")
    assert factory is not None and factory.version == "1.0.0" and slot_record(vm_disk, "b") == factory
    assert active_slot(vm_disk) == "a"

    # The install, the trial and the recovery update are recorded (vm/writelog.py): a seeded sample of
    # the crash states they pass through is checked offline below (tests/vm/test_crash_states.py has
    # all of them, and a whole update, in make reliability).
    good = built_image.bundles["2.0.0"]
    stage(vm_disk, good.read_bytes(), name=good.name)  # before the recording: it starts from a staged disk
    recording = Recording.prepare(vm_disk.path, tmp_path / "rec")
    phases: list[tuple[int, str]] = [(0, "recovery")]
    m = _install_2_0_0(machine, built_image, vm_disk, "1.0.0 (slot a)", recording=recording, phases=phases)
    m.expect(WRITING, BOOT)
    phases.append((log_entries_now(recording.log), "recovery-update"))
    m.expect(VERIFIED, BOOT)
    m.expect(ACTIVE, BOOT)
    m.expect(ready(built_image, "2.0.0"), BOOT)
    status = _shell(m, "reflashctl status")
    assert "recovery: 2.0.0 in slot b (active); slot a: 1.0.0" in status, status
    # What the trial did too (tests/vm/test_rollback.py has the whole of it, in make reliability): the
    # confirmed release's bundle is the fallback, the factory's is gone, the trial boot had the watchdog.
    assert "fallback: 2.0.0 (/bundles/demo-appliance-2.0.0.bundle)" in status and "trial:" not in status, status
    assert _shell(m, "cat /proc/cmdline").count("systemd.watchdog_sec=30") == 1
    m.stop()  # not a power cut: a killed QEMU may have written what it had not yet logged
    vm_disk = DiskImage.open(recording.image)
    assert vm_disk.read_file("storage", "/bundles/demo-appliance-1.0.0.bundle") is None
    _check_a_sample_of_crash_states(recording, phases, tmp_path, scenario)

    result = read_result(vm_disk)
    assert result["recovery"] == {"version": "1.0.0", "slot": "a"}, result
    assert active_slot(vm_disk) == "b"
    new = slot_record(vm_disk, "b")
    assert new is not None and new.version == "2.0.0" and new != factory
    assert slot_record(vm_disk, "a") == factory  # the old recovery stays, whole, for a failing new one
    _repair_is_installed_by_the_new_recovery(machine, built_image, vm_disk)


def _check_a_sample_of_crash_states(rec: Recording, phases: list[tuple[int, str]], tmp: Path, scenario: Scenario) -> None:
    """SAMPLE flush points spread over the recorded install by the seed, and a few unordered subsets,
    each checked from the host as GRUB and the recovery would read cfg and the recovery's slots."""
    with Replay(rec.base, rec.log, tmp / "replay") as replay:
        chosen = spread(range(1, len(replay.points)), SAMPLE, SEED)
        summary = check_replay(replay, Checker(tmp / "check", phases=phases), unordered=4, seed=SEED,
                               only=lambda s: s.kind is not StateKind.flush or s.point.index in chosen)
    scenario.note(f"recorded: {summary.flush_points} flush points; {len(summary.checks)} states checked offline "
                  f"(seed {SEED}), {summary.held} held")
    assert len(summary.checks) >= min(SAMPLE, summary.flush_points)
    assert not summary.findings, "\n".join(map(str, summary.findings[:20]))


CUTS = {
    # While the spare slot is written (its kernel, initrd, boot menu, menu sums and record, about 3 s under
    # TCG): the old recovery and its menu stay active and whole; the next boot writes again.
    "writing": (WRITING, 1.0),
    "writing-start": (WRITING, 0.0),
    "writing-late": (WRITING, 2.0),
    # Between the verification and the switch, or in it: either recovery is active, and whole.
    "switching": (VERIFIED, 0.0),
}


@pytest.mark.reliability
@pytest.mark.parametrize("point", list(CUTS))
def test_a_power_cut_while_the_recovery_is_written_or_switched_leaves_one_that_installs(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, point: str, scenario: Scenario,
) -> None:
    scenario.name = "Power cut: while the running system writes the new recovery into its slot, and at the switch"
    scenario.checked = ("the slot cfg names is whole (its files match its recovery.json); the next boot completes the "
                        "update of the recovery; the next install is done by recovery 2.0.0 from slot b")
    line, delay = CUTS[point]
    scenario.note(f"cut {delay:g} s after `{line}`")
    m = _install_2_0_0(machine, built_image, vm_disk, "1.0.0 (slot a)")
    m.expect(line, BOOT)
    time.sleep(delay)
    m.power_cut()
    slot = active_slot(vm_disk)
    assert slot == "a" or point == "switching", slot
    record = slot_record(vm_disk, slot)
    assert record is not None and record.version in ("1.0.0", "2.0.0")

    # The next boot (no trial now) settles: the recovery update is done again, to its end.
    m = machine()
    m.expect(ACTIVE + "|not on trial", BOOT)
    m.expect(ready(built_image, "2.0.0"), BOOT)
    m.power_cut()
    assert active_slot(vm_disk) == "b"
    assert (slot_record(vm_disk, "b") or factory_placeholder()).version == "2.0.0"
    _repair_is_installed_by_the_new_recovery(machine, built_image, vm_disk)


def factory_placeholder() -> RecoveryImage:
    raise AssertionError("slot b has no recovery.json")


@pytest.mark.reliability
def test_a_slot_that_cannot_boot_gives_way_to_the_other_one(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario,
) -> None:
    scenario.name = "Recovery slot a made unbootable (initrd truncated to 1 MiB)"
    scenario.checked = ("tries 1 and 2 fail in slot a, try 3 installs from slot b; then the confirmed 2.0.0 writes its "
                        "recovery over the damaged slot, never over the only whole one")
    initrd = vm_disk.read_file("recovery", "/a/initrd.img")
    assert initrd is not None and len(initrd) > 8 * MiB
    vm_disk.write_file("recovery", "/a/initrd.img", initrd[:MiB])
    good = built_image.bundles["2.0.0"]
    stage(vm_disk, good.read_bytes(), name=good.name)
    m = machine()
    m.expect(r"Loading the recovery OS \(try 1\)", RECOVERY)
    m.expect(r"Loading the recovery OS \(try 2\)", 2 * RECOVERY)
    m.expect(r"Loading the recovery OS \(try 3\)", 2 * RECOVERY)
    m.expect(r"recovery: version 1\.0\.0 \(slot b\)", RECOVERY)
    m.expect(r"recovery: installed 2\.0\.0\r?\n", 2 * RECOVERY)
    m.expect(r"trial: confirmed 2\.0\.0 \(boot 1 of 3\)", 2 * BOOT)
    # The damaged slot a is the one written: slot b, the only whole recovery, is kept.
    m.expect(r"recovery-slots: writing recovery 2\.0\.0 into slot a", BOOT)
    m.expect(r"recovery-slots: recovery 2\.0\.0 in slot a is active", BOOT)
    m.expect(ready(built_image, "2.0.0"), BOOT)
    m.power_cut()
    result = read_result(vm_disk)
    assert (result["outcome"], result["try"], result["recovery"]) == (
        "installed", 3, {"version": "1.0.0", "slot": "b"}), result
    assert active_slot(vm_disk) == "a"
    assert (slot_record(vm_disk, "a") or factory_placeholder()).version == "2.0.0"
    assert (slot_record(vm_disk, "b") or factory_placeholder()).version == "1.0.0"
