"""`python -m bench` (`make bench`): every performance figure of the project in one command, printed
as a table and written to docs/performance.md with a plot of the recovery phase's timeline.

Measured side by side on this machine: extraction vs GNU tar, verification vs sha256sum, peak
memory, erase vs rm -rf; timed under QEMU (TCG): the recovery phase step by step, boot times under
BIOS and UEFI, the smallest guest memory an install completes in, the full update cycle; and the cold
and warm `reflash build` with the size of the recovery OS it makes.

`--quick` uses small inputs and no VM or image build (seconds, for the smoke test) and writes no
document unless `--output`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mkimage.build import BuildResult
from recovery.os.extract import extract_payload
from recovery.core.output import MiB
from recovery.core.run import run

from . import guest as vm
from . import tree as trees
from .erase import measure_erase
from .host import this_host
from .imagebuild import build_times, recovery_size
from .inputs import Inputs, prepare
from .measure import ChildRun, Timing, interleaved, peak_memory
from .report import TIMELINE, Results, render
from .timeline import median_run, svg

REPO = Path(__file__).resolve().parent.parent
GNU_TAR = ["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "-p", "-I", "zstd", "-x"]
SECTIONS = ("files", "erase", "build", "phase", "boot", "memory", "cycle", "rollback", "downtime")


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
    return [sys.executable, "-m", "recovery.os", *args]


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




def demo_tree(image: BuildResult, scratch: Path) -> Path:
    """The 2.0.0 release's system tree, extracted from its bundle (as the recovery would install it)."""
    from recovery.core.keys import Keyring
    from recovery.core.bundle import verify_bundle

    target = scratch / "demo-tree"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    bundle = verify_bundle(image.bundles[vm.TO_VERSION], Keyring.load(image.keys))
    extract_payload(bundle, target)
    return target


DOC_HEAD = """# Performance

Every performance figure of the project, measured by `make bench` (`python -m bench`) in one run on
one machine (below). Each figure is a ratio against a reference measured in the same run, a size or
a count, or an absolute time with the machine it ran on. Times are medians of several runs with
their min and max; a missed goal is marked as such, the inputs were not tuned to meet it.

How the file-level figures are taken: the trees are generated deterministically (bench/tree.py:
log-uniform file sizes, a few big files, symlinks and hard links, content mixed from
incompressible, text-like and low-entropy data) and cached in /var/tmp/recovery-bench with their
bundles (made by `create_bundle`, zstd). Every extraction starts in an empty directory on the same
ext4 file system after `sync`, the contenders take turns run by run, and everything is read from
the page cache. GNU tar runs as `tar --xattrs --xattrs-include='*' --acls --numeric-owner -p -I zstd
-xf payload`; ours (`extract_payload`) reads the payload out of the bundle through a libarchive read
callback that hashes it again, decompresses in a second thread and extracts with the secure flags,
owners, ACLs, xattrs and sparse files. Peak memory is ru_maxrss of the command, reported by a small
launcher (bench/peak.py) so that the benchmark's own memory is not counted.

How the VM figures are taken: the demo image is built by the run itself (the warm `reflash build`),
every boot uses a fresh copy-on-write overlay of it under QEMU with TCG (no KVM), and the serial
console's lines are stamped with the host's monotonic time as they arrive (bench/timeline.py).

Reading the numbers: this machine is a 2-CPU virtual machine that may be shared with other jobs
(the load average at the start is given below; a run beside other QEMU guests halved the extraction
ratio once), and writing files costs it mostly kernel time whose price changes from run to run, so
single runs scatter widely; the median is the goal's measure, min and max show the spread.

"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small inputs, file-level measurements only (no VM, no image build): a smoke test")
    p.add_argument("--cache", type=Path, help=f"where trees, bundles and images are kept (default {trees.CACHE})")
    p.add_argument("--output", type=Path, help="the Markdown report (default docs/performance.md, none with --quick)")
    p.add_argument("--repeat", type=int, default=3, help="runs per contender of the file-level measurements (3)")
    p.add_argument("--vm-repeat", type=int, default=3, help="runs of each VM measurement (3)")
    p.add_argument("--image", type=Path,
                   help="boot this finished `reflash build` output instead of building (skips the build figures)")
    p.add_argument("--only", help=f"comma-separated sections to run, of: {', '.join(SECTIONS)} (default all)")
    return p


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


VM_SECTIONS = {"phase", "boot", "memory", "cycle", "rollback", "downtime"}


class Bench:
    """One run of the benchmark: the sections asked for, measured into `results` in order."""

    def __init__(self, args: argparse.Namespace, sections: set[str]) -> None:
        self.args, self.sections = args, sections
        self.scratch = trees.CACHE / "scratch"
        self.results = Results(host=this_host())
        self.inputs: Inputs | None = None
        self.image: BuildResult | None = None

    def run(self) -> Results:
        if "files" in self.sections or (self.args.quick and "erase" in self.sections):
            say("preparing inputs (cached after the first run)")
            self.inputs = prepare("quick" if self.args.quick else "standard")
        if "files" in self.sections:
            self.files()
        self.image = self.open_image()
        if "erase" in self.sections:
            self.attempt("erase", self.erase)
        if self.image is not None and self.sections & VM_SECTIONS:
            self.vm_figures(self.image)
        shutil.rmtree(self.scratch, ignore_errors=True)
        return self.results

    def files(self) -> None:
        """Extraction, verification and peak memory, side by side with GNU tar and sha256sum."""
        assert self.inputs is not None
        r, repeat = self.results, self.args.repeat
        say("extraction: ours vs GNU tar")
        r.extract = measure_extract(self.inputs, self.scratch, repeat)
        say("verification: recovery verify vs sha256sum")
        r.verify = measure_verify(self.inputs, repeat)
        for inputs in [self.inputs] if self.args.quick else [prepare("100m"), prepare("1g")]:
            say(f"peak memory: verify and apply of the {inputs.name} bundle")
            r.memory.append((inputs, *measure_memory(inputs, self.scratch)))
        r.main = self.inputs

    def open_image(self) -> BuildResult | None:
        """The demo image the VM and erase figures need: given, or built (which measures the build)."""
        args, r = self.args, self.results
        image = None
        if args.image is not None:
            image = vm.open_image(args.image)
            r.image = f"{args.image} (given with --image)"
        elif "build" in self.sections:
            out = trees.CACHE / "image"
            say("reflash build: cold (empty cache, downloads Debian packages), then warm")
            r.build = build_times(out, trees.CACHE / "mkimage-cache", warm_runs=args.vm_repeat)
            image = vm.open_image(out)
            r.image = "the demo image this run built (warm `reflash build`)"
        elif self.sections & VM_SECTIONS or ("erase" in self.sections and not args.quick):
            _parser().error("the VM and erase measurements need an image: include the build section or give --image")
        if image is not None:
            r.recovery_os = recovery_size(image.recovery)
        return image

    def attempt(self, what: str, measure: Callable[[], None]) -> None:
        """A VM measurement that breaks off (a guest hung, QEMU died) is reported, not fatal to the rest."""
        try:
            measure()
        except Exception as e:  # the report names it; the other figures are still worth having
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.results.errors.append(f"{what}: {type(e).__name__}: {first}")
            say(f"{what} broke off: {first}")

    def erase(self) -> None:
        if self.args.quick:
            assert self.inputs is not None
            tree, what, size = self.inputs.tree.path, "the quick tree", 64 * MiB
        else:
            assert self.image is not None
            tree, what = demo_tree(self.image, self.scratch), "the demo's 2.0.0 system tree"
            size = self.image.config.partitions.system
        say(f"erase vs rm -rf of {what}")
        self.results.erase = measure_erase(tree, self.scratch / "erase", size, max(self.args.repeat, 5))
        self.results.erase_input = what

    def vm_figures(self, image: BuildResult) -> None:
        """The recovery phase, boot times, the memory floor and the whole cycle, under QEMU."""
        g = vm.Guest(image, vm.workdir(trees.CACHE / "vm"))
        r, repeat = self.results, self.args.vm_repeat
        r.accel = str(vm.accel())

        def phase() -> None:
            for i in range(repeat):
                r.phase.append(vm.recovery_phase(g))
                say(f"recovery phase, run {i + 1}/{repeat}: {r.phase[-1].phase:.1f} s")

        def boot() -> None:
            for firmware in (vm.Firmware.bios, vm.Firmware.uefi):
                for target in ("recovery", "ready"):
                    values = r.boots[(str(firmware), target)] = [vm.seconds_to(g, firmware, target) for _ in range(repeat)]
                    say(f"boot {firmware} to {target}: {statistics.median(values):.1f} s")

        def memory() -> None:
            say("smallest guest memory: installs from 512 MiB down")
            r.guest_memory = vm.smallest_memory(g, say=say)

        def cycle() -> None:
            for i in range(max(2, repeat - 1)):
                r.cycle.append(vm.demo_cycle(g))
                say(f"full cycle, run {i + 1}: {r.cycle[-1].total:.0f} s")

        def rollback() -> None:
            # One run: three trial boots, a whole install and two boots of the restored release.
            r.rollback.append(vm.rollback_time(g))
            say(f"rollback, first failed trial boot to the restored release confirmed: {r.rollback[-1].total:.0f} s")

        def downtime() -> None:
            for firmware in (vm.Firmware.bios, vm.Firmware.uefi):
                for i in range(repeat):
                    r.downtime.append(vm.downtime(g, firmware))
                    d = r.downtime[-1]
                    say(f"downtime {firmware}, run {i + 1}/{repeat}: {d.to_verdict:.1f} s to the verdict, "
                        f"{d.to_ready:.1f} s to ready")

        for name, measure in (("phase", phase), ("boot", boot), ("memory", memory), ("cycle", cycle),
                              ("rollback", rollback), ("downtime", downtime)):
            if name in self.sections:
                self.attempt(name, measure)


def write_report(results: Results, output: Path | None) -> None:
    report = render(results)
    print(report)
    if output is None:
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(DOC_HEAD + report)
    say(f"wrote {output}")
    if results.phase:
        plot = output.with_name(TIMELINE)
        plot.write_text(svg(median_run(results.phase), "The recovery phase under TCG (median run)"))
        say(f"wrote {plot}")


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.cache is not None:
        trees.CACHE = args.cache
    sections = set(args.only.split(",")) if args.only else set(SECTIONS)
    if unknown := sections - set(SECTIONS):
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if args.quick:
        sections &= {"files", "erase"}
    results = Bench(args, sections).run()
    write_report(results, args.output if args.output or args.quick else REPO / "docs" / "performance.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
