"""The benchmark's Markdown: a summary of every figure against its goal, then one section per
measurement with the runs, their spread and the size of every input."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from recovery.core.output import MiB

from .erase import EraseResult
from .guest import Cycle, MemoryTry, Rollback
from .host import Host
from .imagebuild import BuildTimes, RecoverySize
from .inputs import Inputs
from .measure import ChildRun, Timing
from .timeline import AFTER, DESCRIPTIONS, DOWNTIME_STEPS, STEPS, DowntimeRun, PhaseRun, median_run, spread

GOALS = {
    "extract": 1.0, "verify": 0.9, "memory": 100 * MiB, "memory_growth": 0.05, "phase": 60.0, "cycle": 180.0,
    "recovery_os": 40 * MiB, "guest_memory": 384, "warm_build": 30.0, "to_verdict": 30.0, "to_ready": 60.0,
}
TIMELINE = "recovery-timeline.svg"


@dataclass  # filled in as the run measures (bench.__main__.Bench)
class Results:
    host: Host
    accel: str | None = None
    image: str = ""  # where the booted image came from
    main: Inputs | None = None
    extract: dict[str, Timing] | None = None
    verify: dict[str, Timing] | None = None
    memory: list[tuple[Inputs, ChildRun, ChildRun]] = field(default_factory=list)  # (inputs, verify, apply)
    erase: EraseResult | None = None
    erase_input: str = ""
    build: BuildTimes | None = None
    recovery_os: RecoverySize | None = None
    phase: list[PhaseRun] = field(default_factory=list)
    boots: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (firmware, ready|recovery)
    guest_memory: list[MemoryTry] = field(default_factory=list)
    cycle: list[Cycle] = field(default_factory=list)
    rollback: list[Rollback] = field(default_factory=list)
    downtime: list[DowntimeRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # measurements that broke off, and why


@dataclass(frozen=True)
class Figure:
    figure: str
    reference: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run

    def row(self) -> str:
        verdict = {True: "met", False: "**MISSED**", None: "not measured"}[self.met]
        return f"| {self.figure} | {self.reference} | {self.goal} | {self.measured} | {verdict} |"


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:,.0f}"


def _verdict(ok: bool) -> str:
    return "meets the goal" if ok else "MISSES the goal"


def _mmm(values: Sequence[float], unit: str = "s") -> str:
    med, lo, hi = spread(values)
    return f"{med:.1f} {unit} (min {lo:.1f}, max {hi:.1f}, {len(values)} runs)"


# --- the summary --------------------------------------------------------------------------------------


def figures(r: Results) -> list[Figure]:
    """The summary table, one row per performance goal, in the report's order. Long (past 60 lines) on
    purpose: it is a table written as code, each goal's few lines beside the next, read top to bottom."""
    out: list[Figure] = []
    if r.extract:
        ours, tar = r.extract["recovery extract_payload"], r.extract["GNU tar -I zstd"]
        ratio = tar.median / ours.median
        out.append(Figure("payload extraction throughput", "GNU tar + zstd on the same payload", ">= 1.0x",
                          f"{ratio:.2f}x", ratio >= GOALS["extract"]))
    else:
        out.append(Figure("payload extraction throughput", "GNU tar + zstd on the same payload", ">= 1.0x", "–", None))
    if r.verify:
        ratio = r.verify["sha256sum"].median / r.verify["recovery verify"].median
        out.append(Figure("bundle verification throughput", "`sha256sum` on the same file", ">= 0.9x",
                          f"{ratio:.2f}x", ratio >= GOALS["verify"]))
    else:
        out.append(Figure("bundle verification throughput", "`sha256sum` on the same file", ">= 0.9x", "–", None))
    goal = "no growth, <= 100 MiB"
    if len(r.memory) >= 2:
        small, big = r.memory[0], r.memory[-1]
        lo, hi = max(small[1].maxrss, small[2].maxrss), max(big[1].maxrss, big[2].maxrss)
        ok = hi <= GOALS["memory"] and hi <= lo * (1 + GOALS["memory_growth"])
        out.append(Figure(f"peak memory, verify + apply, {small[0].name} vs {big[0].name} bundle", "the same program",
                          goal, f"{_mib(lo)} vs {_mib(hi)}", ok))
    else:
        out.append(Figure("peak memory, verify + apply, 100 MB vs 1 GB bundle", "the same program", goal, "–", None))
    if r.phase:
        phases = [p.phase for p in r.phase]
        med = median_run(r.phase)
        biggest = max(STEPS, key=lambda s: med.step(s[0]))[0]
        out.append(Figure("recovery phase under TCG, demo image", "–", "<= 60 s",
                          f"{statistics.median(phases):.1f} s (biggest step: {biggest}, "
                          f"{med.step(biggest) / med.phase:.0%})", statistics.median(phases) <= GOALS["phase"]))
    else:
        out.append(Figure("recovery phase under TCG, demo image", "–", "<= 60 s", "–", None))
    for firmware in ("bios", "uefi"):
        runs = [d for d in r.downtime if d.firmware == firmware]
        for what, key, attr in (("the recovery's verdict", "to_verdict", "to_verdict"),
                                ("`system … ready` of the new release", "to_ready", "to_ready")):
            name = f"downtime under TCG, {firmware}: the running system's reboot to {what}"
            goal = f"<= {GOALS[key]:.0f} s"
            if runs:
                value = statistics.median(getattr(d, attr) for d in runs)
                out.append(Figure(name, "–", goal, f"{value:.1f} s", value <= GOALS[key]))
            else:
                out.append(Figure(name, "–", goal, "–", None))
    if r.cycle:
        total = statistics.median(c.total for c in r.cycle)
        out.append(Figure("full demo cycle under TCG, images cached", "–", "<= 3 min", f"{total:.0f} s",
                          total <= GOALS["cycle"]))
    else:
        out.append(Figure("full demo cycle under TCG, images cached", "–", "<= 3 min", "–", None))
    if r.recovery_os:
        size = r.recovery_os.compressed
        out.append(Figure("recovery OS (kernel + initramfs), compressed", "–", "<= 40 MiB", _mib(size),
                          size <= GOALS["recovery_os"]))
    else:
        out.append(Figure("recovery OS (kernel + initramfs), compressed", "–", "<= 40 MiB", "–", None))
    if r.guest_memory:
        done = [t.mib for t in r.guest_memory if t.installed]
        smallest = min(done) if done else None
        tried_all = r.guest_memory[-1].installed
        text = (f"{smallest} MiB" + (" (the smallest tried)" if tried_all else "")) if smallest else \
            f"none of {', '.join(str(t.mib) for t in r.guest_memory)} MiB"
        out.append(Figure("smallest guest memory the recovery completes an install in", "–", "<= 384 MiB", text,
                          smallest is not None and smallest <= GOALS["guest_memory"]))
    else:
        out.append(Figure("smallest guest memory the recovery completes an install in", "–", "<= 384 MiB", "–", None))
    if r.build:
        warm = statistics.median(r.build.warm)
        out.append(Figure("`reflash build`, cold and warm", "–", "warm <= 30 s",
                          f"cold {r.build.cold:.0f} s, warm {warm:.1f} s", warm <= GOALS["warm_build"]))
    else:
        out.append(Figure("`reflash build`, cold and warm", "–", "warm <= 30 s", "–", None))
    if r.erase:
        ratio = r.erase.rm.median / r.erase.erase.median
        out.append(Figure("erase of the system partition", "`rm -rf` of the same tree", "faster",
                          f"{ratio:.1f}x as fast", ratio > 1.0))
    else:
        out.append(Figure("erase of the system partition", "`rm -rf` of the same tree", "faster", "–", None))
    return out


def summary(r: Results) -> list[str]:
    lines = ["| figure | reference | goal | measured (median) | verdict |", "|---|---|---|---|---|"]
    lines += [f.row() for f in figures(r)]
    missed = [f.figure for f in figures(r) if f.met is False]
    lines += ["", f"Goals missed: {', '.join(missed)}." if missed else "Every measured goal is met."]
    lines += [f"Not measured, the measurement broke off: {e}" for e in r.errors]
    return lines


# --- the sections -------------------------------------------------------------------------------------


def _timing_table(title: str, timings: dict[str, Timing], nbytes: int, what: str) -> list[str]:
    out = [
        "", f"### {title}", "",
        f"Median of {len(next(iter(timings.values())).runs)} runs; MiB/s of {what} per median second; "
        "CPU is user + system time of all threads and child processes.", "",
        "| tool | median s | min s | max s | MiB/s | CPU s (median) |", "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in timings.items():
        out.append(f"| {name} | {t.median:.2f} | {t.min:.2f} | {t.max:.2f} | {_rate(nbytes, t.median)} | "
                   f"{t.cpu_median:.2f} |")
    return out


def _ratios(ours: Timing, ref: Timing) -> str:
    return f"fastest runs {ref.min / ours.min:.2f}x, CPU time {ref.cpu_median / ours.cpu_median:.2f}x"


def files_sections(r: Results) -> list[str]:
    if r.main is None:
        return []
    main = r.main
    lines = [
        "", "### Inputs", "",
        "| input | files | tree bytes | bundle | payload (zstd) |",
        "|---|---:|---:|---:|---:|",
    ]
    seen = {main.name: main, **{i.name: i for i, _, _ in r.memory}}
    for i in seen.values():
        lines.append(f"| {i.name} | {i.tree.files:,} | {i.tree.bytes:,} ({_mib(i.tree.bytes)}) | "
                     f"{_mib(i.bundle_size)} | {_mib(i.bundle.manifest.payload.size)} |")
    if r.extract:
        ours, tar = r.extract["recovery extract_payload"], r.extract["GNU tar -I zstd"]
        ratio = tar.median / ours.median
        lines += _timing_table(f"Payload extraction ({main.name} tree)", r.extract, main.tree.bytes, "tree data")
        lines += ["", f"Throughput ours / GNU tar: **{ratio:.2f}x** (goal >= {GOALS['extract']:.1f}x: "
                      f"{_verdict(ratio >= GOALS['extract'])}); {_ratios(ours, tar)}."]
    if r.verify:
        ours, ref = r.verify["recovery verify"], r.verify["sha256sum"]
        ratio = ref.median / ours.median
        lines += _timing_table(f"Verification ({main.name} bundle)", r.verify, main.bundle_size, "bundle")
        lines += ["", f"Throughput ours / sha256sum: **{ratio:.2f}x** (goal >= {GOALS['verify']:.1f}x: "
                      f"{_verdict(ratio >= GOALS['verify'])}); {_ratios(ours, ref)}."]
    if r.memory:
        lines += [
            "", "### Peak memory (ru_maxrss of the child process)", "",
            "| bundle | size | `recovery verify` | s | `recovery apply` | s |", "|---|---:|---:|---:|---:|---:|",
        ]
        worst = 0
        for inputs, verify, apply in r.memory:
            worst = max(worst, verify.maxrss, apply.maxrss)
            lines.append(f"| {inputs.name} | {_mib(inputs.bundle_size)} | {_mib(verify.maxrss)} | "
                         f"{verify.seconds:.1f} | {_mib(apply.maxrss)} | {apply.seconds:.1f} |")
        lines += ["", f"Largest peak: **{_mib(worst)}** (goal <= {_mib(GOALS['memory'])}, the same for every "
                      f"size: {_verdict(worst <= GOALS['memory'])})."]
    return lines


def erase_section(r: Results) -> list[str]:
    e = r.erase
    if e is None:
        return []
    ratio = e.rm.median / e.erase.median
    return [
        "", "### Erasing the system partition", "",
        f"Input: {r.erase_input}, {e.files:,} files, {e.bytes:,} bytes ({_mib(e.bytes)}). `erase` makes a new "
        f"ext4 on an image file of the system partition's size ({_mib(e.partition)}) that `mkfs.ext4 -d` filled "
        "with the tree; `rm -rf` removes a `cp -a` copy of the tree from a directory on the same host file "
        "system. Each is timed with the `sync` after it, the preparation untimed; they take turns.", "",
        "| how | median s | min s | max s | CPU s (median) |", "|---|---:|---:|---:|---:|",
        f"| `recovery.os.erase.erase` (mkfs.ext4) | {e.erase.median:.2f} | {e.erase.min:.2f} | {e.erase.max:.2f} | "
        f"{e.erase.cpu_median:.2f} |",
        f"| `rm -rf` | {e.rm.median:.2f} | {e.rm.min:.2f} | {e.rm.max:.2f} | {e.rm.cpu_median:.2f} |",
        "", f"Erase / `rm -rf`: **{ratio:.1f}x as fast** ({_verdict(ratio > 1.0)} of being faster); "
            f"fastest runs {e.rm.min / e.erase.min:.1f}x.",
    ]


def build_section(r: Results) -> list[str]:
    lines: list[str] = []
    if r.build:
        b = r.build
        warm = statistics.median(b.warm)
        lines += [
            "", "### `reflash build` of the demo image", "",
            "Cold: an empty cache (`MKIMAGE_CACHE` pointed at a new directory), so mmdebstrap downloads every "
            "Debian package of the system and recovery roots from deb.debian.org; its time depends on the "
            "network as much as on this machine. Warm: the same command again with that cache.", "",
            "| build | median s | min s | max s | runs |", "|---|---:|---:|---:|---:|",
            f"| cold | {b.cold:.1f} | {b.cold:.1f} | {b.cold:.1f} | 1 |",
            f"| warm | {warm:.1f} | {min(b.warm):.1f} | {max(b.warm):.1f} | {len(b.warm)} |",
            "", f"Warm build: **{warm:.1f} s** (goal <= {GOALS['warm_build']:.0f} s: "
                f"{_verdict(warm <= GOALS['warm_build'])}).",
        ]
    if r.recovery_os:
        s = r.recovery_os
        lines += [
            "", "### Recovery OS size", "",
            "| part | bytes | MiB |", "|---|---:|---:|",
            f"| vmlinuz | {s.kernel:,} | {s.kernel / MiB:.1f} |",
            f"| initrd.img ({s.compression}) | {s.initramfs:,} | {s.initramfs / MiB:.1f} |",
            f"| **kernel + initramfs, compressed** | {s.compressed:,} | **{s.compressed / MiB:.1f}** |",
            f"| initramfs unpacked (the cpio archives){' ' + s.unpack_note if s.unpack_note else ''} | "
            f"{s.initramfs_unpacked:,} | {s.initramfs_unpacked / MiB:.1f} |",
            "", f"Goal <= {_mib(GOALS['recovery_os'])}: {_verdict(s.compressed <= GOALS['recovery_os'])}.",
        ]
    return lines


def phase_section(r: Results) -> list[str]:
    if not r.phase:
        return []
    med = median_run(r.phase)
    phases = [p.phase for p in r.phase]
    lines = [
        "", "### The recovery phase under TCG", "",
        "Demo image, BIOS, 1 vCPU, 1024 MiB guest; the 2.0.0 bundle and an instruction staged on a fresh overlay "
        f"per run, as `reflashctl install` leaves them. Every console line is stamped with the host's monotonic "
        f"time as it arrives; the phase runs from GRUB's `Loading the recovery OS` to GRUB's `Loading the "
        f"system` after the reboot. {len(r.phase)} runs; the share is of the median run (the one plotted).", "",
        f"![timeline of the median run]({TIMELINE})", "",
        "| step | from → to | median s | min s | max s | share | recovery's own (result.json) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, a, b in (*STEPS, AFTER):
        values = [p.step(name) for p in r.phase]
        m, lo, hi = spread(values)
        share = f"{med.step(name) / med.phase:.0%}" if name != AFTER[0] else "(after)"
        guest = [p.guest_seconds[name] for p in r.phase if name in p.guest_seconds]
        own = f"{statistics.median(guest):.1f}" if guest else ""
        lines.append(f"| {name}: {DESCRIPTIONS[name]} | `{a}` → `{b}` | {m:.1f} | {lo:.1f} | {hi:.1f} | "
                     f"{share} | {own} |")
    total = statistics.median(phases)
    lines += [
        f"| **recovery phase** | `grub_recovery` → `grub_system` | **{total:.1f}** | {min(phases):.1f} | "
        f"{max(phases):.1f} | 100% | |",
        "", f"Recovery phase: **{total:.1f} s** (goal <= {GOALS['phase']:.0f} s: {_verdict(total <= GOALS['phase'])}). "
            "`boot` in the issue's sense is load + kernel "
            f"({statistics.median([p.step('load') + p.step('kernel') for p in r.phase]):.1f} s). Seconds from QEMU's "
            f"start to GRUB's choice: {_mmm([p.marks['grub_recovery'] for p in r.phase])}.",
    ]
    return lines


def boot_section(r: Results) -> list[str]:
    if not r.boots:
        return []
    lines = [
        "", "### Boot times from QEMU's start under TCG", "",
        "A fresh overlay of the demo image per run, 1 vCPU, 1024 MiB. `ready`: the 1.0.0 system's "
        "`system … ready` line; `recovery init`: the recovery's `recovery: starting` (an instruction staged).", "",
        "| firmware | to | median s | min s | max s | runs |", "|---|---|---:|---:|---:|---:|",
    ]
    for (firmware, target), values in sorted(r.boots.items()):
        m, lo, hi = spread(values)
        what = "`system … ready`" if target == "ready" else "`recovery: starting`"
        lines.append(f"| {firmware} | {what} | {m:.1f} | {lo:.1f} | {hi:.1f} | {len(values)} |")
    return lines


def guest_memory_section(r: Results) -> list[str]:
    if not r.guest_memory:
        return []
    lines = [
        "", "### Smallest guest memory", "",
        "Real installs of the 2.0.0 bundle (BIOS, 1 vCPU), from the largest memory down, stopping at the "
        "first that does not complete.", "",
        "| guest memory | recovery started | install completed | verdict |", "|---:|---|---|---|",
    ]
    for t in r.guest_memory:
        lines.append(f"| {t.mib} MiB | {'yes' if t.started else 'no'} | {'yes' if t.installed else 'no'} | "
                     f"{t.outcome.replace('|', '/')[:120]} |")
    done = [t.mib for t in r.guest_memory if t.installed]
    booted = [t.mib for t in r.guest_memory if t.started]
    smallest = min(done) if done else None
    lines += ["", (f"Smallest that completes an install: **{smallest} MiB** (goal <= {GOALS['guest_memory']} MiB: "
                   f"{_verdict(smallest <= GOALS['guest_memory'])})" if smallest else
                   "No tried size completed an install (goal <= 384 MiB: MISSES the goal)")
              + (f"; smallest the recovery boots in (reaches `recovery: starting`): {min(booted)} MiB." if booted
                 else ".")]
    if r.guest_memory[-1].installed:
        lines.append(f"Every size tried completed; {r.guest_memory[-1].mib} MiB is the bottom of the list "
                     "tried, not a measured limit.")
    return lines


def cycle_section(r: Results) -> list[str]:
    if not r.cycle:
        return []
    totals = [c.total for c in r.cycle]
    med = sorted(r.cycle, key=lambda c: c.total)[(len(r.cycle) - 1) // 2]
    m = med.marks
    parts = [("boot 1.0.0 to ready", 0.0, m.get("ready_old")),
             ("ready to the recovery's start (reflashctl install, the reboot or kexec, the recovery's boot)",
              m.get("ready_old"), m.get("starting")),
             ("the recovery's start to `Loading the system` (GRUB's, or the recovery's before its kexec)",
              m.get("starting"), m.get("grub_system")),
             ("boot 2.0.0 to ready", m.get("grub_system"), m.get("ready_new"))]
    lines = [
        "", "### The full update cycle under TCG", "",
        f"Measured by the benchmark itself ({med.how}); the image built before (cached), BIOS, 1 vCPU, "
        f"1024 MiB. From QEMU's start to `system … 2.0.0 ready`: {_mmm(totals)}.", "",
        "| part (median run) | s |", "|---|---:|",
    ]
    for name, a, b in parts:
        lines.append(f"| {name} | {b - a:.1f} |" if a is not None and b is not None else f"| {name} | – |")
    total = statistics.median(totals)
    lines += ["", f"Full cycle: **{total:.0f} s** (goal <= {GOALS['cycle']:.0f} s: {_verdict(total <= GOALS['cycle'])})."]
    return lines


def rollback_section(r: Results) -> list[str]:
    if not r.rollback:
        return []
    run = sorted(r.rollback, key=lambda x: x.total)[(len(r.rollback) - 1) // 2]
    m = run.marks
    parts = [("trial boots (three, each ending in a failed health check and a reboot)", m.get("first_trial"), m.get("rollback")),
             ("rollback: GRUB to the recovery's verdict (verify, erase, extract the fallback)", m.get("rollback"), m.get("rolled_back")),
             ("reboot and the restored release's boot to its confirmation", m.get("rolled_back"), m.get("confirmed"))]
    lines = ["", "### A release that fails its trial, rolled back under TCG", "",
             f"Measured by the benchmark itself ({run.how}); BIOS, 1 vCPU, 1024 MiB. From GRUB loading the "
             f"first failed trial boot to the restored release's `trial: confirmed`: {_mmm([x.total for x in r.rollback])}.",
             "", "| part | s |", "|---|---:|"]
    for name, a, b in parts:
        lines.append(f"| {name} | {b - a:.1f} |" if a is not None and b is not None else f"| {name} | – |")
    return lines


def downtime_section(r: Results) -> list[str]:
    if not r.downtime:
        return []
    size = (f" The recovery OS booted: kernel {_mib(r.recovery_os.kernel)} + initramfs {_mib(r.recovery_os.initramfs)} "
            f"({r.recovery_os.compression}; {_mib(r.recovery_os.initramfs_unpacked)} unpacked)." if r.recovery_os else "")
    lines = [
        "", "### Downtime of one update under TCG, step by step", "",
        "The demo image on a fresh overlay, 1 vCPU, 1024 MiB: 1.0.0 boots with the 2.0.0 bundle on storage, "
        "`reflashctl install FILE` verifies and stages it and reboots; downtime runs from its line `rebooting "
        "into the recovery to install it` to the new release's `system … 2.0.0 ready`. Every console line is "
        "stamped with the host's monotonic time as it arrives (the kernel's start is backdated by its own "
        f"timestamps, as in the recovery phase above).{size}", "",
    ]
    for firmware in ("bios", "uefi"):
        runs = [d for d in r.downtime if d.firmware == firmware]
        if not runs:
            continue
        kexec = [d.kexec for d in runs]
        into = "by kexec (no firmware, no GRUB on the way in)" if all(kexec) else \
            "through the firmware and GRUB" if not any(kexec) else "by kexec in some runs only"
        lines += [f"**{firmware.upper()}**, {len(runs)} runs, into the recovery {into}:", "",
                  "| step | from → to | median s | min s | max s |", "|---|---|---:|---:|---:|"]
        for name, a, b, what in DOWNTIME_STEPS:
            values = [v for d in runs if (v := d.step(name)) is not None]
            if not values:
                lines.append(f"| {name}: {what} | `{a}` → `{b}` | – | – | – |")
                continue
            if name == "shutdown" and any(kexec):
                a, b, what = "reboot", "kernel", "the running system stops and kexecs into the recovery kernel"
            m, lo, hi = spread(values)
            lines.append(f"| {name}: {what} | `{a}` → `{b}` | {m:.1f} | {lo:.1f} | {hi:.1f} |")
        for label, attr in (("reboot to the recovery's verdict", "to_verdict"), ("reboot to `ready`", "to_ready")):
            m, lo, hi = spread([getattr(d, attr) for d in runs])
            lines.append(f"| **{label}** | | **{m:.1f}** | {lo:.1f} | {hi:.1f} |")
        lines.append("")
    return lines


def render(r: Results) -> str:
    lines = [f"Measured {r.host.describe(r.accel)}.", ""]
    if r.image:
        lines += [f"Booted image: {r.image}.", ""]
    lines += summary(r)
    for section in (files_sections, erase_section, build_section, phase_section, boot_section,
                    guest_memory_section, cycle_section, rollback_section, downtime_section):
        lines += section(r)
    return "\n".join(lines) + "\n"
