"""Measurements that boot the demo image under QEMU: the recovery phase step by step, seconds from
QEMU's start to `ready` and to `recovery: starting` under each firmware, the smallest guest memory
the recovery installs in, and the whole update cycle from the running 1.0.0 to a ready 2.0.0."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mkimage.build import BuildResult
from mkimage.config import load_config
from recovery.core.instruction import Instruction
from vm.accel import Accel, requested
from vm.console import ConsoleClosed, ConsoleTimeout
from vm.disk import DiskImage
from vm.machine import Firmware, Machine

from .timeline import DOWNTIME_MARKS, DOWNTIME_OPTIONAL, DowntimeRun, LineClock, PhaseRun


INSTRUCTION = "/update-instruction"
BOOT = 600.0  # generous deadlines under TCG on a loaded machine; only a hang reaches them
RECOVERY = 900.0
MEMORY_LEVELS = (512, 384, 320, 256, 192, 160)  # MiB, tried from the top down
TO_VERSION = "2.0.0"


def open_image(directory: Path) -> BuildResult:
    """A finished `reflash build` of the demo config in `directory`."""
    config = load_config(None, output=directory)
    result = BuildResult(config=config, disk=directory / "disk.img", keys=directory / "keys",
                         recovery=directory / "recovery",
                         bundles={v: directory / f"{config.product}-{v}.bundle" for v in config.releases})
    missing = [p for p in (result.disk, *result.bundles.values(), result.recovery / "vmlinuz") if not p.exists()]
    if missing:
        raise RuntimeError(f"{directory} holds no built image: {', '.join(map(str, missing))} missing")
    return result


def accel() -> Accel:
    """TCG unless VM_ACCEL asks for something else: the goals are stated for TCG."""
    return requested() or Accel.tcg


def bundle_name(image: BuildResult, version: str = TO_VERSION) -> str:
    return f"{image.config.product}-{version}.bundle"


def stage(disk: DiskImage, image: BuildResult, *, bundle: bool = True) -> None:
    """The 2.0.0 bundle on storage and an instruction naming it on cfg, as `reflashctl install` leaves them."""
    path = image.bundles[TO_VERSION]
    name = f"/bundles/{bundle_name(image)}"
    if bundle:
        disk.write_file("storage", name, path.read_bytes())
    sha = _sha256(path)
    instruction = Instruction.create(disk="PARTLABEL=storage", file=name, sha256=sha, version=TO_VERSION)
    disk.write_file("cfg", INSTRUCTION, instruction.to_block())


_SHA: dict[Path, str] = {}


def _sha256(path: Path) -> str:
    if path not in _SHA:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _SHA[path] = h.hexdigest()
    return _SHA[path]


@dataclass
class Guest:
    """One fresh overlay of the image per boot, in a work directory that keeps the console logs."""

    image: BuildResult
    workdir: Path
    counter: int = 0

    def overlay(self) -> DiskImage:
        self.counter += 1
        path = self.workdir / f"boot{self.counter:02d}.qcow2"
        path.unlink(missing_ok=True)
        return DiskImage.open(self.image.disk).overlay(path)

    def machine(self, disk: DiskImage, clock: LineClock, *, firmware: Firmware = Firmware.bios,
                memory: int = 1024) -> Machine:
        return Machine(disk, firmware=firmware, memory=memory, accel=accel(), on_output=clock,
                       name=f"bench{self.counter:02d}", workdir=self.workdir)

    def done(self, disk: DiskImage) -> None:
        disk.path.unlink(missing_ok=True)

    def ready(self, version: str) -> str:
        return re.escape(f"system {self.image.config.product} {version} ready")


def _start(m: Machine, clock: LineClock) -> None:
    clock.reset()
    m.start()


# --- the recovery phase -----------------------------------------------------------------------------


def recovery_phase(guest: Guest) -> PhaseRun:
    """Stage the update, boot, and stamp every console line until the new system is ready."""
    disk = guest.overlay()
    stage(disk, guest.image)
    clock = LineClock()
    m = guest.machine(disk, clock)
    try:
        _start(m, clock)
        m.expect(r"recovery: starting", BOOT)
        m.expect(r"recovery: installed " + re.escape(TO_VERSION), RECOVERY)
        m.expect(r"Loading the system", BOOT)
        m.expect(guest.ready(TO_VERSION), BOOT)
    finally:
        m.power_cut()
        m.close()
    result = json.loads(disk.read_file("cfg", "/recovery/result.json") or b"{}")
    guest.done(disk)
    return PhaseRun(marks=clock.marks(), guest_seconds=dict(result.get("seconds", {})))


# --- boot times from QEMU's start ---------------------------------------------------------------------


def seconds_to(guest: Guest, firmware: Firmware, target: str) -> float:
    """QEMU start to `system … ready` (target "ready") or to `recovery: starting` ("recovery")."""
    disk = guest.overlay()
    if target == "recovery":
        stage(disk, guest.image, bundle=False)  # only the instruction: the boot stops at `starting`
    pattern = guest.ready(guest.image.config.version) if target == "ready" else r"recovery: starting"
    clock = LineClock()
    m = guest.machine(disk, clock, firmware=firmware)
    try:
        _start(m, clock)
        m.expect(pattern, BOOT)
        seconds = time.monotonic() - clock.start
    finally:
        m.power_cut()
        m.close()
    guest.done(disk)
    return seconds


# --- the smallest guest memory -----------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryTry:
    mib: int
    started: bool  # the recovery's PID 1 printed `recovery: starting`
    installed: bool
    outcome: str  # the verdict line or what went wrong instead


# Whole lines: the console may have delivered only part of one when a shorter pattern would match.
FAILURE = r"(?:recovery: installed \S+|recovery: (rejected|failed): [^\r\n]*|Kernel panic[^\r\n]*|Out of memory[^\r\n]*)\r?\n"


def install_in(guest: Guest, mib: int) -> MemoryTry:
    """One real install with `mib` MiB of guest memory, up to the recovery's verdict."""
    disk = guest.overlay()
    stage(disk, guest.image)
    clock = LineClock()
    m = guest.machine(disk, clock, memory=mib)
    try:
        _start(m, clock)
        try:
            verdict = m.expect(FAILURE, RECOVERY).group(0).strip()
        except (ConsoleTimeout, ConsoleClosed) as e:
            verdict = f"no verdict: {str(e).splitlines()[0]}"
    finally:
        m.power_cut()
        m.close()
    guest.done(disk)
    started = any("recovery: starting" in line for _, line in clock.lines)
    return MemoryTry(mib, started, verdict.startswith("recovery: installed"), verdict)


def smallest_memory(guest: Guest, levels: tuple[int, ...] = MEMORY_LEVELS,
                    say: Callable[[str], None] = print) -> list[MemoryTry]:
    """Installs from the largest level down, stopping at the first that fails."""
    tries: list[MemoryTry] = []
    for mib in levels:
        t = install_in(guest, mib)
        say(f"  {mib} MiB: {t.outcome}")
        tries.append(t)
        if not t.installed:
            break
    return tries


# --- the whole cycle ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cycle:
    total: float  # QEMU start to `system … 2.0.0 ready`
    marks: dict[str, float]
    how: str


CYCLE_MARKS = (
    ("ready_old", r"system \S+ 1\.0\.0 ready"),
    ("starting", r"recovery: starting"),
    ("installed", r"recovery: installed"),
    ("grub_system", r"Loading the system"),
    ("ready_new", r"system \S+ 2\.0\.0 ready"),
)


def demo_cycle(guest: Guest) -> Cycle:
    """Boot 1.0.0 with the bundle already on storage, `reflashctl install FILE` in the guest, through the
    recovery to a ready 2.0.0 whose `reflashctl status` reports the install."""
    image = guest.image
    disk = guest.overlay()
    name = f"/bundles/{bundle_name(image)}"
    disk.write_file("storage", name, image.bundles[TO_VERSION].read_bytes())
    clock = LineClock()
    m = guest.machine(disk, clock)
    try:
        _start(m, clock)
        m.expect(guest.ready(image.config.version), BOOT)
        m.shell("true", BOOT)  # the shell is there and in step
        m.send(f"reflashctl install /storage{name}\n")
        m.expect(r"recovery: installed " + re.escape(TO_VERSION), RECOVERY)
        m.expect(guest.ready(TO_VERSION), BOOT)
        total = time.monotonic() - clock.start
        status, out = m.shell("reflashctl status", BOOT)
        if status != 0 or TO_VERSION not in out:
            raise RuntimeError(f"reflashctl status after the cycle: exit {status}: {out.strip()}")
    finally:
        m.power_cut()
        m.close()
    guest.done(disk)
    return Cycle(total=total, marks=clock.marks(CYCLE_MARKS),
                 how="boot 1.0.0 (bundle on storage), `reflashctl install FILE`, recovery, boot 2.0.0")


def downtime(guest: Guest, firmware: Firmware) -> DowntimeRun:
    """Boot 1.0.0 with the 2.0.0 bundle on storage, stage it with `reflashctl install FILE` and stamp
    everything from its reboot line to `system … 2.0.0 ready` (timeline.DOWNTIME_MARKS)."""
    image = guest.image
    disk = guest.overlay()
    name = f"/bundles/{bundle_name(image)}"
    disk.write_file("storage", name, image.bundles[TO_VERSION].read_bytes())
    clock = LineClock()
    m = guest.machine(disk, clock, firmware=firmware)
    try:
        _start(m, clock)
        m.expect(guest.ready(image.config.version), BOOT)
        m.shell("true", BOOT)
        m.send(f"reflashctl install /storage{name}\n")
        m.expect(r"recovery: installed " + re.escape(TO_VERSION), RECOVERY)
        m.expect(guest.ready(TO_VERSION) + r"[^\n]*\n", BOOT)  # whole: the clock stamps ended lines
    finally:
        m.power_cut()
        m.close()
    guest.done(disk)
    marks = clock.marks(DOWNTIME_MARKS, optional=DOWNTIME_OPTIONAL)
    missing = [n for n, _ in DOWNTIME_MARKS if n not in marks and n not in DOWNTIME_OPTIONAL]
    if missing:
        raise RuntimeError(f"downtime: no console line for {', '.join(missing)} (log in {guest.workdir})")
    return DowntimeRun(str(firmware), marks)


# --- the rollback ------------------------------------------------------------------------------------


ROLLBACK_MARKS = (
    ("installed", r"recovery: installed"),
    ("first_trial", r"Loading the system"),
    ("rollback", r"Loading the recovery OS \(rollback"),
    ("rolled_back", r"recovery: rolled back to"),
    ("restored_boot", r"Loading the system"),
    ("confirmed", r"trial: confirmed"),
)


@dataclass(frozen=True)
class Rollback:
    total: float  # the first failed trial boot (GRUB loading it) to the restored release confirmed
    marks: dict[str, float]
    how: str


def rollback_time(guest: Guest, kind: str = "unhealthy") -> Rollback:
    """Install a release whose health check fails (tests/vm/releases.py) and time its trial boots, the
    rollback and the restored release's boot up to its confirmation."""
    from tests.vm.releases import BROKEN, broken_bundle

    image, broken = guest.image, BROKEN[kind]
    bundle = broken_bundle(image, kind)
    disk = guest.overlay()
    disk.write_file("storage", f"/bundles/{bundle.name}", bundle.read_bytes())
    instruction = Instruction.create(disk="PARTLABEL=storage", file=f"/bundles/{bundle.name}",
                                     sha256=_sha256(bundle), version=broken.version)
    disk.write_file("cfg", "/update-instruction", instruction.to_block())
    clock = LineClock()
    m = guest.machine(disk, clock)
    try:
        _start(m, clock)
        m.expect(r"recovery: installed " + re.escape(broken.version), RECOVERY)
        m.expect(r"recovery: rolled back to " + re.escape(image.config.version), 3 * BOOT + RECOVERY)
        # The whole line: the clock stamps a line once it ends, and the power cut follows at once.
        m.expect(r"trial: confirmed " + re.escape(image.config.version) + r"[^\n]*\n", BOOT)
    finally:
        m.power_cut()
        m.close()
    guest.done(disk)
    marks = clock.marks(ROLLBACK_MARKS)
    return Rollback(total=marks["confirmed"] - marks["first_trial"], marks=marks,
                    how=f"{broken.version}, whose health check fails, installed over {image.config.version}")


def workdir(root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root
