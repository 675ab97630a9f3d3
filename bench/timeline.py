"""The recovery phase's timeline: console lines stamped with host time, the steps between them, and a
hand-written SVG of one run (no plotting library needed)."""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from html import escape

# The console lines that mark the phase, in the order they appear (regexes searched in one line).
MARKS: tuple[tuple[str, str], ...] = (
    ("grub_recovery", r"Loading the recovery OS"),
    ("kernel", r"Linux version \d"),
    ("starting", r"recovery: starting"),
    ("verifying", r"recovery: verifying\s*$"),
    ("erasing", r"recovery: erasing\s*$"),
    ("extracting", r"recovery: extracting\s*$"),
    ("finishing", r"recovery: finishing\s*$"),
    ("rebooting", r"recovery: rebooting\s*$"),
    ("grub_system", r"Loading the system"),
    ("ready", r"system \S+ \S+ ready"),
)
# (step, from mark, to mark): the recovery phase runs from GRUB choosing the recovery to GRUB
# choosing the new system; `boot` in the brief's sense is load + kernel.
STEPS: tuple[tuple[str, str, str], ...] = (
    ("load", "grub_recovery", "kernel"),
    ("kernel", "kernel", "starting"),
    ("udev", "starting", "verifying"),
    ("verify", "verifying", "erasing"),
    ("erase", "erasing", "extracting"),
    ("extract", "extracting", "finishing"),
    ("finish", "finishing", "rebooting"),
    ("reboot", "rebooting", "grub_system"),
)
KERNEL_TIME = re.compile(r"\[\s*(\d+\.\d+)\]")
AFTER = ("system boot", "grub_system", "ready")  # shown beside the phase, not part of it
DESCRIPTIONS = {
    "load": "GRUB loads the recovery kernel and initramfs, the kernel decompresses itself",
    "kernel": "the kernel's clock starts to `recovery: starting` (initramfs unpacked, PID 1 up)",
    "udev": "udev trigger + settle, cfg checked and mounted, instruction read, storage found",
    "verify": "signature, manifest, payload and file sha256, fit",
    "erase": "mkfs.ext4 of the system partition, same label and UUID",
    "extract": "streaming extraction of the payload with re-hashing",
    "finish": "result, instruction removed, sync, unmount",
    "reboot": "reset, firmware, GRUB choosing the system",
    "system boot": "GRUB's `Loading the system` to `system … ready`",
}


# Downtime (issue 16): from the running system's reboot to the new release ready, every part a row.
_PHASE = dict(MARKS)
DOWNTIME_MARKS: tuple[tuple[str, str], ...] = (
    ("reboot", r"rebooting into the recovery to install it"),
    ("reset", r"reboot: Restarting system"),
    ("grub", r"GNU GRUB  version"),
    *((name, _PHASE[name]) for name in ("grub_recovery", "kernel", "starting", "verifying", "erasing", "extracting",
                                        "finishing")),
    ("verdict", r"recovery: installed \S+"),
    ("rebooting", _PHASE["rebooting"]),
    ("reset_recovery", r"reboot: Restarting system"),
    ("grub_system", _PHASE["grub_system"]),
    ("ready", _PHASE["ready"]),
)
# Not there when the running system kexecs into the recovery (recovery/updated/kexec.py): no reset, no
# firmware, no GRUB on the way in; the shutdown then runs to the recovery kernel's start. On the way
# out the recovery's own kexec (recovery/os/kexec.py) prints `Loading the system` where GRUB would.
DOWNTIME_OPTIONAL = frozenset({"reset", "grub", "grub_recovery", "reset_recovery"})
DOWNTIME_STEPS: tuple[tuple[str, str, str, str], ...] = (
    ("shutdown", "reboot", "reset", "the running system stops: units stopped, file systems unmounted"),
    ("firmware", "reset", "grub", "reset to GRUB's menu: the firmware, GRUB's core and its scripts"),
    ("menu", "grub", "grub_recovery", "GRUB's menu (its 1 s timeout) to `Loading the recovery OS`"),
    ("load", "grub_recovery", "kernel", "GRUB reads the recovery kernel and initramfs, the kernel starts"),
    ("kernel", "kernel", "starting", "the kernel to PID 1 (initramfs unpacked, Python up)"),
    ("udev", "starting", "verifying", "PID 1 to `verifying`: udev, cfg checked and mounted, disks found"),
    ("verify", "verifying", "erasing", "signature, manifest, payload sha256"),
    ("erase", "erasing", "extracting", "mkfs.ext4 of the system partition"),
    ("extract", "extracting", "finishing", "the payload streamed, re-hashed and written"),
    ("finish", "finishing", "verdict", "result, install record, trial started, instruction removed"),
    ("reboot", "verdict", "grub_system", "unmount, reset, firmware and GRUB's menu to `Loading the system`"),
    ("system boot", "grub_system", "ready", "the new release's boot to `system … ready`"),
)


@dataclass(frozen=True)
class DowntimeRun:
    """One update's downtime: console marks in seconds from QEMU's start, under one firmware."""

    firmware: str
    marks: dict[str, float]

    def step(self, name: str) -> float | None:
        """Seconds of a step; None for the firmware's and GRUB's steps skipped by kexec (the shutdown
        then runs to the kernel's start)."""
        for step, a, b, _ in DOWNTIME_STEPS:
            if step == name:
                if a not in self.marks or b not in self.marks:
                    if name != "shutdown":
                        return None
                    b = next(m for m in ("reset", "grub", "grub_recovery", "kernel") if m in self.marks)
                return self.marks[b] - self.marks[a]
        raise KeyError(name)

    @property
    def kexec(self) -> bool:
        return "grub_recovery" not in self.marks

    @property
    def to_verdict(self) -> float:
        return self.marks["verdict"] - self.marks["reboot"]

    @property
    def to_ready(self) -> float:
        return self.marks["ready"] - self.marks["reboot"]


class LineClock:
    """A Machine's `on_output` callback: each console line with the host's monotonic time its end arrived."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.start = now()
        self.lines: list[tuple[float, str]] = []
        self._partial = b""
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Call just before QEMU starts: times are seconds from then."""
        self.start = self._now()

    def __call__(self, data: bytes) -> None:
        now = self._now() - self.start
        with self._lock:
            *complete, self._partial = (self._partial + data).split(b"\n")
            for raw in complete:
                self.lines.append((now, raw.decode(errors="replace").replace("\r", "").rstrip()))

    def marks(self, marks: Sequence[tuple[str, str]] = MARKS, optional: Collection[str] = ()) -> dict[str, float]:
        """Seconds from QEMU's start to each mark, found in order (a mark missing ends the search). A
        mark in `optional` counts only if it comes before the next mark that is not: else it is left out."""
        found: dict[str, float] = {}
        with self._lock:
            lines = list(self.lines)

        def first(pattern: str, start: int) -> int:
            regex = re.compile(pattern)
            return next((j for j in range(start, len(lines)) if regex.search(lines[j][1])), len(lines))

        i = 0
        for k, (name, pattern) in enumerate(marks):
            at = first(pattern, i)
            if name in optional:
                following = next((p for n, p in marks[k + 1:] if n not in optional), None)
                if at == len(lines) or (following is not None and first(following, i) < at):
                    continue
            if at == len(lines):
                break
            found[name] = lines[at][0]
            i = at + 1
        if "kernel" in found and "starting" in found:
            found["kernel"] = self._kernel_start(lines, found["kernel"], found["starting"])
        return found

    @staticmethod
    def _kernel_start(lines: list[tuple[float, str]], first: float, until: float) -> float:
        """The kernel's first lines reach the console only once its serial driver is up, seconds after
        it started; its own timestamps (`[    1.234567]`) say how much earlier: the earliest arrival
        minus timestamp (TCG's guest clock follows the host's) is when the kernel's clock began."""
        starts = [at - float(m.group(1)) for at, text in lines
                  if first <= at <= until and (m := KERNEL_TIME.match(text))]
        return min([first, *starts])


@dataclass(frozen=True)
class PhaseRun:
    marks: dict[str, float]  # seconds from QEMU start
    guest_seconds: dict[str, float]  # result.json's own step times

    def step(self, name: str) -> float:
        for step, a, b in (*STEPS, AFTER):
            if step == name:
                return self.marks[b] - self.marks[a]
        raise KeyError(name)

    @property
    def phase(self) -> float:
        return self.marks["grub_system"] - self.marks["grub_recovery"]


def median_run(runs: Sequence[PhaseRun]) -> PhaseRun:
    """The run whose phase took the median time (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.phase)
    return ordered[(len(ordered) - 1) // 2]


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


# --- the plot ---------------------------------------------------------------------------------------

COLOURS = {
    "load": "#8da0cb", "kernel": "#7570b3", "udev": "#a6cee3", "verify": "#66c2a5", "erase": "#fc8d62",
    "extract": "#e78ac3", "finish": "#a6d854", "reboot": "#ffd92f", "system boot": "#d9d9d9",
}


def svg(run: PhaseRun, title: str) -> str:
    """A horizontal timeline of one run: each step a bar segment labelled with its seconds."""
    segments = [(name, run.step(name)) for name, _, _ in STEPS] + [(AFTER[0], run.step(AFTER[0]))]
    total = sum(s for _, s in segments)
    width, left, right, bar_y, bar_h = 960, 20, 20, 60, 44
    scale = (width - left - right) / total
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="260" viewBox="0 0 {width} 260" '
        'font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{left}" y="24" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="{left}" y="44" fill="#444">recovery phase {run.phase:.1f} s (GRUB choosing the recovery to '
        f'GRUB choosing the new system), then the system boot; host time of console lines</text>',
    ]
    x = float(left)
    for i, (name, seconds) in enumerate(segments):
        w = seconds * scale
        out.append(f'<rect x="{x:.1f}" y="{bar_y}" width="{max(w, 0.5):.1f}" height="{bar_h}" '
                   f'fill="{COLOURS[name]}" stroke="white" stroke-width="1"><title>{escape(name)}: '
                   f'{seconds:.1f} s</title></rect>')
        if w >= 46:
            out.append(f'<text x="{x + w / 2:.1f}" y="{bar_y + 18}" text-anchor="middle">{escape(name)}</text>')
            out.append(f'<text x="{x + w / 2:.1f}" y="{bar_y + 34}" text-anchor="middle">{seconds:.1f} s</text>')
        else:  # too narrow: label below, on staggered rows
            row = bar_y + bar_h + 16 + 14 * (i % 3)
            out.append(f'<line x1="{x + w / 2:.1f}" y1="{bar_y + bar_h}" x2="{x + w / 2:.1f}" y2="{row - 10}" '
                       'stroke="#888"/>')
            out.append(f'<text x="{x + w / 2:.1f}" y="{row}" text-anchor="middle">{escape(name)} '
                       f'{seconds:.1f} s</text>')
        x += w
    phase_end = left + run.phase * scale
    out.append(f'<line x1="{phase_end:.1f}" y1="{bar_y - 8}" x2="{phase_end:.1f}" y2="{bar_y + bar_h + 8}" '
               'stroke="black" stroke-width="2"/>')
    axis_y = 190
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{width - right}" y2="{axis_y}" stroke="black"/>')
    step = 10 if total <= 150 else 20
    for t in range(0, int(total) + 1, step):
        tx = left + t * scale
        out.append(f'<line x1="{tx:.1f}" y1="{axis_y}" x2="{tx:.1f}" y2="{axis_y + 5}" stroke="black"/>')
        out.append(f'<text x="{tx:.1f}" y="{axis_y + 18}" text-anchor="middle">{t}</text>')
    out.append(f'<text x="{width - right}" y="{axis_y + 36}" text-anchor="end">seconds after GRUB\'s '
               '"Loading the recovery OS"</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
