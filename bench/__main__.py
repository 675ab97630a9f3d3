"""`python -m bench`: issue 2's measurements, side by side on this machine, printed as a table and
written to docs/performance.md: extraction vs GNU tar, verification vs sha256sum, peak memory.

`--quick` uses small inputs (seconds, for the smoke test) and writes no document unless `--output`.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recovery.install import extract_payload
from recovery.output import MiB
from recovery.run import run

from . import tree as trees
from .inputs import Inputs, prepare
from .measure import ChildRun, Timing, interleaved, peak_memory

REPO = Path(__file__).resolve().parent.parent
GNU_TAR = ["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-p", "-I", "zstd", "-x"]
GOALS = {"extract": 1.0, "verify": 0.9, "memory": 100 * MiB}


@dataclass(frozen=True)
class Results:
    machine: str
    main: Inputs
    extract: dict[str, Timing]
    verify: dict[str, Timing]
    memory: list[tuple[Inputs, ChildRun, ChildRun]]  # (inputs, verify, apply)


def _fresh(directory: Path) -> None:
    """An empty directory, with the previous run's dirty pages written out so they do not bill the next."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.sync()


def measure_extract(inputs: Inputs, scratch: Path, repeat: int) -> dict[str, Timing]:
    target = scratch / "extract"
    return interleaved(
        {"recovery extract_payload": lambda: extract_payload(inputs.bundle, target),
         "GNU tar -I zstd": lambda: run([*GNU_TAR, "-f", inputs.payload, "-C", target])},
        repeat=repeat, before=lambda: _fresh(target),
    )


def recovery_cli(*args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    return [sys.executable, "-m", "recovery", *args]


def measure_verify(inputs: Inputs, repeat: int) -> dict[str, Timing]:
    path = inputs.bundle.path
    run(["sha256sum", path])  # both read from the page cache, not one from the disk
    return interleaved(
        {"recovery verify": lambda: run(recovery_cli("verify", "--keys", inputs.keys, path), cwd=REPO),
         "sha256sum": lambda: run(["sha256sum", path])},
        repeat=repeat,
    )


def measure_memory(inputs: Inputs, scratch: Path) -> tuple[ChildRun, ChildRun]:
    path = inputs.bundle.path
    verify = peak_memory(recovery_cli("verify", "--keys", inputs.keys, path))
    target = scratch / "apply"
    _fresh(target)
    apply = peak_memory(recovery_cli("apply", "--keys", inputs.keys, path, "--target", target))
    shutil.rmtree(target)
    return verify, apply


def _machine() -> str:
    tar = run(["tar", "--version"]).stdout.decode().splitlines()[0]
    zstd = run(["zstd", "--version"]).stdout.decode().strip(" *\n")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs, {platform.machine()}, Linux "
            f"{platform.release()}; Python {platform.python_version()}; {tar}; {zstd}; load average {load} at start")


# --- the report ------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:,.0f}"


def _verdict(ok: bool) -> str:
    return "meets the goal" if ok else "MISSES the goal"


def render(r: Results) -> str:
    main = r.main
    lines = [
        f"Measured {r.machine}.",
        "",
        "### Inputs",
        "",
        "| input | files | tree bytes | bundle | payload (zstd) |",
        "|---|---:|---:|---:|---:|",
    ]
    seen = {main.name: main, **{i.name: i for i, _, _ in r.memory}}
    for i in seen.values():
        lines.append(f"| {i.name} | {i.tree.files:,} | {i.tree.bytes:,} ({_mib(i.tree.bytes)}) | "
                     f"{_mib(i.bundle_size)} | {_mib(i.bundle.manifest.payload.size)} |")

    def timing_table(title: str, timings: dict[str, Timing], nbytes: int, what: str) -> list[str]:
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

    def ratios(ours: Timing, ref: Timing) -> str:
        return (f"fastest runs {ref.min / ours.min:.2f}x, CPU time {ref.cpu_median / ours.cpu_median:.2f}x")

    ours, tar = r.extract["recovery extract_payload"], r.extract["GNU tar -I zstd"]
    ratio = tar.median / ours.median
    lines += timing_table(f"Payload extraction ({main.name} tree)", r.extract, main.tree.bytes, "tree data")
    lines += ["", f"Throughput ours / GNU tar: **{ratio:.2f}x** (goal >= {GOALS['extract']:.1f}x: "
                  f"{_verdict(ratio >= GOALS['extract'])}); {ratios(ours, tar)}."]

    ours, ref = r.verify["recovery verify"], r.verify["sha256sum"]
    ratio = ref.median / ours.median
    lines += timing_table(f"Verification ({main.name} bundle)", r.verify, main.bundle_size, "bundle")
    lines += ["", f"Throughput ours / sha256sum: **{ratio:.2f}x** (goal >= {GOALS['verify']:.1f}x: "
                  f"{_verdict(ratio >= GOALS['verify'])}); {ratios(ours, ref)}."]

    lines += [
        "", "### Peak memory (ru_maxrss of the child process)", "",
        "| bundle | size | `recovery verify` | s | `recovery apply` | s |", "|---|---:|---:|---:|---:|---:|",
    ]
    worst = 0
    for inputs, verify, apply in r.memory:
        worst = max(worst, verify.maxrss, apply.maxrss)
        lines.append(f"| {inputs.name} | {_mib(inputs.bundle_size)} | {_mib(verify.maxrss)} | {verify.seconds:.1f} | "
                     f"{_mib(apply.maxrss)} | {apply.seconds:.1f} |")
    lines += ["", f"Largest peak: **{_mib(worst)}** (goal <= {_mib(GOALS['memory'])}, the same for every size: "
                  f"{_verdict(worst <= GOALS['memory'])})."]
    return "\n".join(lines) + "\n"


DOC_HEAD = """# Performance

Issue 2's goals, measured by `make bench` (`python -m bench`) on the development machine: payload
extraction at least as fast as GNU tar with zstd on the same payload, verification at least 0.9x as
fast as `sha256sum` on the same bundle, and peak memory of `recovery verify` and `recovery apply` the
same for a ~100 MB and a ~1 GB bundle and at most 100 MiB.

How: the trees are generated deterministically (bench/tree.py: log-uniform file sizes, a few big
files, symlinks and hard links, content mixed from incompressible, text-like and low-entropy data)
and cached in /var/tmp/recovery-bench with their bundles (made by `create_bundle`, zstd). Every
extraction starts in an empty directory on the same ext4 file system after `sync`, the contenders
take turns run by run, and everything is read from the page cache.

GNU tar runs as `tar --xattrs --xattrs-include='*' --acls --numeric-owner -p -I zstd -xf payload`.
Ours (`extract_payload`) reads the payload out of the bundle through a libarchive read callback
that hashes it again, decompresses with libarchive's zstd filter in a second thread (as GNU tar's
zstd child runs beside tar), and extracts with libarchive with the secure flags, owners, ACLs,
xattrs and sparse files. Peak memory is ru_maxrss of the command, reported by a small
launcher (bench/peak.py) so that the benchmark's own memory is not counted.

Reading the numbers: this machine is a 2-CPU virtual machine shared with other jobs, and writing
files costs it mostly kernel time whose price changes from run to run (the same extraction has
taken from 2 to 6 CPU seconds), so single runs scatter widely. The median ratio is the goal's
measure; the ratios of the fastest runs and of CPU time show whether a gap is real or noise.
Writing to tmpfs instead (not in the table: there writing is cheap), GNU tar came out ahead in
our trials, about 1.2-1.45 s against 1.5-1.8 s for this tree under the same load, since it pays
for neither the re-hash nor libarchive's symlink checks (a few directory opens per entry). On ext4,
which is what the recovery writes to, the kernel's cost for the data dominates both.

"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small inputs, one set of measurements: a smoke test")
    p.add_argument("--cache", type=Path, help=f"where trees and bundles are kept (default {trees.CACHE})")
    p.add_argument("--output", type=Path, help="the Markdown report (default docs/performance.md, none with --quick)")
    p.add_argument("--repeat", type=int, default=3, help="runs per contender (default 3)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.cache is not None:
        trees.CACHE = args.cache
    output = args.output if args.output or args.quick else REPO / "docs" / "performance.md"
    scratch = trees.CACHE / "scratch"

    def say(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    machine = _machine()
    say("preparing inputs (cached after the first run)")
    main_inputs = prepare("quick" if args.quick else "standard")
    memory_inputs = [main_inputs] if args.quick else [prepare("100m"), prepare("1g")]
    say("extraction: ours vs GNU tar")
    extract = measure_extract(main_inputs, scratch, args.repeat)
    say("verification: recovery verify vs sha256sum")
    verify = measure_verify(main_inputs, args.repeat)
    memory = []
    for inputs in memory_inputs:
        say(f"peak memory: verify and apply of the {inputs.name} bundle")
        memory.append((inputs, *measure_memory(inputs, scratch)))
    shutil.rmtree(scratch, ignore_errors=True)

    report = render(Results(machine=machine, main=main_inputs, extract=extract, verify=verify, memory=memory))
    print(report)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(DOC_HEAD + report)
        say(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
