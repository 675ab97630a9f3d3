"""Every crash state of an update (issue 18): one whole update recorded under QEMU through blklogwrites
(staging on the running system, the recovery's install, the trial and the confirmation with the
recovery update), then every flush point and a seeded sample of unordered subsets rebuilt from the log
and checked from the host as GRUB and as the recovery would read cfg (vm/replay.py, vm/crashcheck.py);
a seeded sample of states is booted to the end.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.staging import read_result, ready
from vm.crashcheck import Checker, check_replay
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.machine import Machine
from vm.replay import Replay, StateKind
from vm.writelog import Recording, log_entries_now

pytestmark = pytest.mark.reliability

SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or 18
UNORDERED = int(os.environ.get("CRASH_UNORDERED", "60"))  # unordered subsets checked offline
BOOTED = int(os.environ.get("CRASH_BOOTED", "20"))  # states booted to the end (CRASH_BOOTED=4 for a quicker run)
TRANSFER = 900.0
# Console lines that start a phase of the update, and the phase's name (vm.crashcheck: erasing and
# extracting are the phases in which the system partition is incomplete).
PHASES = (
    (r"recovery: starting", "recovery"),
    (r"recovery: erasing", "erasing"),
    (r"recovery: extracting", "extracting"),
    (r"recovery: finishing", "finishing"),
    (r"trial: 2\.0\.0 is on trial", "trial"),
    (r"trial: confirmed 2\.0\.0", "confirmed"),
)


@pytest.mark.timeout(7200)  # the recording, the offline checks, and every booted state's whole boot
def test_every_flush_point_of_an_update_leaves_a_state_that_ends_well(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, tmp_path: Any, scenario: Scenario,
) -> None:
    scenario.name = "Crash states: every flush point of one whole update, and unordered subsets, checked offline"
    good = built_image.bundles["2.0.0"]
    vm_disk.write_file("storage", f"/bundles/{good.name}", good.read_bytes())  # before the recording starts
    rec = Recording.prepare(vm_disk.path, tmp_path / "rec")
    phases: list[tuple[int, str]] = []

    m = machine(disk=rec.drive(), probe_kernel=built_image.recovery / "vmlinuz", name="recorded")
    m.expect(ready(built_image, "1.0.0"), BOOT)
    phases.append((log_entries_now(rec.log), "staging"))
    code, out = m.shell(f"reflashctl install /storage/bundles/{good.name} --no-reboot", TRANSFER)
    assert code == 0 and "staged" in out, out
    phases.append((log_entries_now(rec.log), "staged"))
    m.send("systemctl reboot\n")
    for line, phase in PHASES:
        m.expect(line, 4 * RECOVERY)
        phases.append((log_entries_now(rec.log), phase))
    m.expect(ready(built_image, "2.0.0"), 2 * BOOT)
    m.stop()

    with Replay(rec.base, rec.log, tmp_path / "replay") as replay:
        points = list(replay.points)
        rng = random.Random(SEED)
        chosen = set(rng.sample(range(len(points)), min(BOOTED, len(points))))
        summary = check_replay(replay, Checker(tmp_path / "check", phases=phases), unordered=UNORDERED, seed=SEED,
                               boot=lambda s: s.kind == StateKind.flush and s.point.index in chosen,
                               images=tmp_path / "boot")
    scenario.checked = (f"{summary.flush_points} flush points and {UNORDERED} unordered subsets: cfg as GRUB reads it "
                        "and after journal replay holds every rule of vm/crashcheck.py; "
                        f"{len(summary.images)} states booted end on a confirmed release")
    scenario.note(f"{summary.flush_points} flush points, {len(summary.checks)} states checked offline, "
                  f"{len(summary.findings)} findings, {len(summary.images)} booted (seed {SEED})")
    assert not summary.findings, "\n".join(map(str, summary.findings[:20]))

    for name, image in summary.images.items():
        m = machine(disk=DiskImage.open(image), probe_kernel=built_image.recovery / "vmlinuz", name=image.stem)
        end = m.expect(r"system demo-appliance (?P<v>1\.0\.0|2\.0\.0) ready", 4 * RECOVERY + 3 * BOOT)
        m.stop()
        disk = DiskImage.open(image)
        version = end.group("v")
        if version == "2.0.0":
            assert read_result(disk)["outcome"] == "installed", name
        assert disk.read_file("cfg", "/update-instruction") is None, name
