"""Power cuts during the recovery's install and while the running system stages an update, under QEMU.

Each cut is a SIGKILL of QEMU (no flush, no shutdown) at a point read from the serial console. The
next boot gets no help: a new Machine on the same overlay must end with 2.0.0 booted, result.json
saying installed and the installed tree equal to the bundle's payload (checked from the host, file by
file). `make test` runs one cut point; the rest are marked `reliability` (`make reliability`).
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from recovery.core.errors import Rejected
from recovery.core.instruction import parse_instruction
from vm.console import ConsoleTimeout
from vm.deadlines import BOOT, KERNEL, RECOVERY
from vm.disk import DiskImage
from vm.machine import Machine

from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.staging import INSTRUCTION, read_result, ready, sha256, stage, unmounted_cleanly
from tests.vm.treecheck import check_installed, differences, installed_tree, payload_tree

MARKER = "/recovery/system-incomplete"
SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or random.SystemRandom().randrange(1, 1 << 31)
CHECKED = (
    "after the cut, boots on its own to `system demo-appliance 2.0.0 ready`; result.json says installed 2.0.0; "
    "no boot printed rejected; the instruction and the incomplete-marker are gone; every path of the installed "
    "system partition has the payload's type, mode (setuid too), owner, sha256 or symlink target, device "
    "numbers and hard links, nothing extra"
)


@dataclass(frozen=True)
class CutPoint:
    """Where to cut: the console line to wait for, and what must be on cfg once it has been printed."""

    label: str
    pattern: str
    marker: bool | None = None  # the incomplete-marker is there (True), gone (False), either (None)
    result: str | None = None  # result.json's outcome must already be this
    instruction: bool | None = None
    straight: bool = False  # the next boot must go straight to the system (cfg's journal was written out)


POINTS: dict[str, CutPoint] = {
    "verifying": CutPoint("recovery: verifying", r"recovery: verifying\r?\n", marker=False),
    "erasing": CutPoint("recovery: erasing", r"recovery: erasing\r?\n", marker=True, instruction=True),
    "extracting-start": CutPoint("recovery: extracting (start)", r"recovery: extracting\r?\n", marker=True, instruction=True),
    "extracting-10%": CutPoint("extracting progress ≥ 10%", r"recovery: extracting (?:[1-9]\d|100)% ", marker=True, instruction=True),
    "extracting-50%": CutPoint("extracting progress ≥ 50%", r"recovery: extracting (?:[5-9]\d|100)% ", marker=True, instruction=True),
    "extracting-90%": CutPoint("extracting progress ≥ 90%", r"recovery: extracting (?:9\d|100)% ", marker=True, instruction=True),
    "finishing": CutPoint("recovery: finishing (before result.json)", r"recovery: finishing\r?\n", instruction=True),
    "result-written": CutPoint("result.json written, instruction still there", r"recovery: result written: installed\r?\n", result="installed"),
    "instruction-removed": CutPoint(
        "instruction just removed (recovery: installed)", r"recovery: installed 2\.0\.0\r?\n", marker=False, result="installed", instruction=False,
        straight=True,
    ),
    "kexec-loaded": CutPoint(
        "2.0.0 loaded for kexec, trial boot 1 counted", r"recovery: 2\.0\.0 is loaded for kexec \(trial boot 1 counted\)\r?\n",
        marker=False, result="installed", instruction=False, straight=True,
    ),
    "rebooting": CutPoint("recovery: rebooting", r"recovery: rebooting\r?\n", marker=False, result="installed", instruction=False,
                          straight=True),
}
FAST = ("extracting-50%",)  # the one `make test` runs (the suite must stay under 30 minutes)
RANDOM_RUNS = 2
RANDOM_WINDOW = 90.0  # seconds after `recovery: starting` within which a random cut falls


def last_line(m: Machine) -> str:
    lines = [line for line in m.tail(8).splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def cfg_state(disk: DiskImage) -> dict[str, Any]:
    """What the next boot will find on cfg."""
    raw = disk.read_file("cfg", "/recovery/result.json")
    return {
        "instruction": disk.read_file("cfg", INSTRUCTION) is not None,
        "marker": disk.read_file("cfg", MARKER) is not None,
        "result": None if raw is None else read_result(disk)["outcome"],
    }


def boot_until_installed(
    machine: Callable[..., Machine], built: Any, disk: DiskImage, scenario: Scenario, *, straight: bool = False
) -> None:
    """Boot without help until GRUB loads the system; check the tree; boot it to 2.0.0; check cfg.

    `straight`: GRUB must not boot the recovery again (the instruction's removal had reached GRUB's view)."""
    m = machine()
    m.expect(r"Loading the system", RECOVERY * 3)
    m.power_cut()  # GRUB has not touched the system partition yet: the tree is as the recovery left it
    log = m.console_log.read_text(errors="replace")
    assert not re.search(r"recovery: (rejected|failed)", log), "a boot after the cut did not install cleanly"
    scenario.note(f"next boot: {'recovery ran again' if 'recovery: starting' in log else 'straight to the system'}")
    if straight:
        assert "recovery: starting" not in log, "GRUB still saw the removed instruction"
    checked = check_installed(disk, built.bundles["2.0.0"], built.keys)
    m = machine()
    m.expect(ready(built, "2.0.0"), BOOT)
    status, out = m.shell(". /etc/os-release && echo $VERSION_ID")
    assert (status, out.strip()) == (0, "2.0.0")
    m.power_cut()
    result = read_result(disk)
    assert (result["outcome"], result["to_version"]) == ("installed", "2.0.0"), result
    assert disk.read_file("cfg", INSTRUCTION) is None
    assert disk.read_file("cfg", MARKER) is None
    scenario.note(f"{checked} paths checked; result try {result['try']}, from {result['from_version']}")


def _cut_params() -> list[Any]:
    return [pytest.param(name, marks=() if name in FAST else pytest.mark.reliability) for name in POINTS]


@pytest.mark.parametrize("point", _cut_params())
def test_power_cut_during_the_install(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario, point: str
) -> None:
    cut = POINTS[point]
    scenario.name = f"Power cut: {cut.label}"
    scenario.checked = CHECKED
    stage(vm_disk, built_image.bundles["2.0.0"].read_bytes(), name="demo-appliance-2.0.0.bundle")
    m = machine()
    m.expect(r"recovery: starting \(try 1\)", KERNEL)
    m.expect(cut.pattern, RECOVERY)
    m.power_cut()
    state = cfg_state(vm_disk)
    scenario.note(f"cut after “{last_line(m)}”; cfg then: {state}")
    # the cut really landed where named
    if cut.marker is not None:
        assert state["marker"] is cut.marker, state
    if cut.instruction is not None:
        assert state["instruction"] is cut.instruction, state
    if cut.result is not None:
        assert state["result"] == cut.result, state
    boot_until_installed(machine, built_image, vm_disk, scenario, straight=cut.straight)


@pytest.mark.reliability
@pytest.mark.parametrize("run", range(RANDOM_RUNS))
def test_power_cut_at_a_random_moment(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario, run: int
) -> None:
    rng = random.Random(SEED + run)
    delay = rng.uniform(0, RANDOM_WINDOW)
    scenario.name = f"Power cut at a random moment within {RANDOM_WINDOW:.0f} s of `recovery: starting`"
    scenario.checked = CHECKED
    print(f"seed {SEED + run} (RELIABILITY_SEED={SEED}): cut {delay:.2f} s after recovery: starting")
    stage(vm_disk, built_image.bundles["2.0.0"].read_bytes(), name="demo-appliance-2.0.0.bundle")
    m = machine()
    m.expect(r"recovery: starting \(try 1\)", KERNEL)
    # The window ends with the recovery phase: once the new system boots it changes its own files
    # (machine-id, random-seed), and the tree check compares against the bundle.
    try:
        m.expect(r"recovery: rebooting", delay)
    except ConsoleTimeout:
        pass
    m.power_cut()
    scenario.note(f"seed {SEED + run}, cut {delay:.1f} s after start, after “{last_line(m)}”; "
                  f"cfg then: {cfg_state(vm_disk)}")
    boot_until_installed(machine, built_image, vm_disk, scenario)


WRITE_RUNS = 2


@pytest.mark.reliability
@pytest.mark.parametrize("run", range(WRITE_RUNS))
def test_power_cut_while_the_system_writes_the_instruction(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario, run: int
) -> None:
    scenario.name = "Power cut while the running system writes the instruction (random moment)"
    scenario.checked = (
        "the instruction on cfg is either absent or a complete, valid one; the next boot is a clean 1.0.0 "
        "(no instruction, no rejection) or a clean install of 2.0.0; never `rejected`"
    )
    bundle = built_image.bundles["2.0.0"].read_bytes()
    vm_disk.write_file("storage", "/bundles/demo-appliance-2.0.0.bundle", bundle)
    vm_disk.write_file("storage", "/write-instruction.py", WRITER.encode())
    write = f"python3 /storage/write-instruction.py none {{path}} {sha256(bundle)}"
    m = machine()
    m.expect(ready(built_image, "1.0.0"), BOOT)
    # how long the whole command takes here, on a scratch name
    start = time.monotonic()
    status, out = m.shell(write.format(path="/cfg/calibration") + " && rm /cfg/calibration")
    took = time.monotonic() - start
    assert status == 0, out
    rng = random.Random(SEED + 100 + run)
    delay = rng.uniform(0.5 * took, 1.1 * took)  # late in the command, where the file is written
    print(f"seed {SEED + 100 + run}: the command took {took:.2f} s, cut after {delay:.2f} s")
    m.send(write.format(path="/cfg/update-instruction") + "\n")
    time.sleep(delay)
    m.power_cut()
    block = vm_disk.read_file("cfg", INSTRUCTION)
    if block is not None:
        try:
            parse_instruction(block)
        except Rejected as e:
            pytest.fail(f"the cut left a half-written instruction: {e}")
    scenario.note(f"seed {SEED + 100 + run}, command {took:.1f} s, cut at {delay:.1f} s: instruction "
                  f"{'complete' if block is not None else 'absent'}")
    m = machine()
    if block is None:
        m.expect(ready(built_image, "1.0.0"), BOOT)
        m.power_cut()
        assert vm_disk.read_file("cfg", "/recovery/result.json") is None
    else:
        m.expect(r"recovery: installed 2\.0\.0", RECOVERY * 2)
        m.expect(ready(built_image, "2.0.0"), BOOT)
        m.power_cut()
        assert read_result(vm_disk)["outcome"] == "installed"
    assert "recovery: rejected" not in m.console_log.read_text(errors="replace")


def test_treecheck_tells_releases_apart(built_image: Any, vm_disk: DiskImage, scenario: Scenario) -> None:
    """The checker itself: the built image's system is bundle 1.0.0's payload exactly, and not 2.0.0's."""
    scenario.name = "Tree check self-test (built image vs bundles 1.0.0 and 2.0.0)"
    scenario.checked = "the host-side tree check finds no difference to 1.0.0's payload and the changed files of 2.0.0"
    tree = installed_tree(vm_disk)
    assert differences(payload_tree(built_image.bundles["1.0.0"], built_image.keys), tree) == []
    assert differences(payload_tree(built_image.bundles["2.0.0"], built_image.keys), tree) != []


# Run in the running system: write an instruction with the system's own code (recovery.core), with a
# pause at one point inside the atomic write announced on the console, so that a power cut lands
# exactly there (Python's start-up is most of the command's time: a random moment almost never falls
# inside the write). Point "none" writes without pausing.
WRITER = """
import os, sys, time
from recovery.core import instruction

point, path, sha256 = sys.argv[1:4]

def pause_at(name, real):
    def paused(*args, **kwargs):
        if name == point:
            print("CUT-HOOK at " + name, flush=True)
            time.sleep(3600)
        return real(*args, **kwargs)
    return paused

os.replace = pause_at("rename", os.replace)  # atomic_write: temp file written and fsync'd, not renamed
instruction.checkpoint_journal = pause_at("checkpoint", instruction.checkpoint_journal)  # renamed, not checkpointed
instruction.write_instruction(path, instruction.Instruction.create(
    disk="PARTLABEL=storage", file="/bundles/demo-appliance-2.0.0.bundle", sha256=sha256, version="2.0.0"))
"""


@pytest.mark.reliability
@pytest.mark.parametrize("point", ["rename", "checkpoint"])
def test_power_cut_inside_the_instruction_write(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario, point: str
) -> None:
    scenario.name = f"Power cut inside the instruction write, before the {point}"
    scenario.checked = (
        "the instruction on cfg is absent (before the rename) or complete and valid; GRUB and the system then "
        "take it or not, never half: a clean 1.0.0, or a clean install of 2.0.0 at once or at the next reboot; "
        "never `rejected`"
    )
    bundle = built_image.bundles["2.0.0"].read_bytes()
    vm_disk.write_file("storage", "/bundles/demo-appliance-2.0.0.bundle", bundle)
    vm_disk.write_file("storage", "/write-instruction.py", WRITER.encode())
    m = machine()
    m.expect(ready(built_image, "1.0.0"), BOOT)
    m.send(f"python3 /storage/write-instruction.py {point} /cfg/update-instruction {sha256(bundle)}\n")
    m.expect(rf"CUT-HOOK at {point}", KERNEL)
    m.power_cut()
    block = vm_disk.read_file("cfg", INSTRUCTION)  # as the system sees it, after journal replay
    if point == "rename":
        assert block is None, "the instruction appeared before its rename"
    else:
        assert block is not None, "the rename was fsync'd: the instruction must survive"
        parse_instruction(block)
    m = machine()
    seen = m.expect(rf"recovery: installed 2\.0\.0|{ready(built_image, '1.0.0')}", RECOVERY * 2).group(0)
    if block is not None and "1.0.0" in seen:
        # GRUB read cfg past the journal, which held the rename: the system's own mount replayed it,
        # so the instruction is whole now and the next boot installs it.
        scenario.note(f"cut before the {point}: GRUB did not see the instruction at once; it installed on the next boot")
        m.send("reboot\n")
        m.expect(r"recovery: installed 2\.0\.0", RECOVERY * 2)
        seen = "recovery: installed 2.0.0"
    if "installed" in seen:
        m.expect(ready(built_image, "2.0.0"), BOOT)
        m.power_cut()
        assert block is not None and read_result(vm_disk)["outcome"] == "installed"
    else:
        m.power_cut()
        assert block is None and vm_disk.read_file("cfg", "/recovery/result.json") is None
    assert "recovery: rejected" not in m.console_log.read_text(errors="replace")
    scenario.note(f"cut before the {point}: instruction {'complete' if block is not None else 'absent'}, {seen}")


def test_recovery_with_nothing_staged_boots_the_system(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario
) -> None:
    """GRUB reads cfg without its journal: after a cut just as the instruction was removed it may still boot
    the recovery, which then finds nothing staged. It must reboot on its own, not wait in a shell (found by
    the `result-written` cut: the appliance stood in the rescue shell)."""
    scenario.name = "Recovery booted with nothing staged (GRUB saw a removed instruction through a stale journal)"
    scenario.checked = "the recovery says so and reboots by itself; cfg unmounted cleanly"
    # -no-reboot: QEMU ends when the guest reboots, so nothing mounts cfg again before it is read
    m = machine(
        disk=vm_disk, kernel=built_image.recovery / "vmlinuz", initrd=built_image.recovery / "initrd.img",
        append="recovery.try=1 console=ttyS0,115200", extra_args=["-no-reboot"],
    )
    m.expect(r"recovery: no update instruction", RECOVERY)
    m.expect(r"recovery: rebooting", RECOVERY)
    m.wait_exit(KERNEL)  # the guest asked for the reboot itself: nobody cut its power
    assert unmounted_cleanly(vm_disk, "cfg")
    assert vm_disk.read_file("cfg", INSTRUCTION) is None
