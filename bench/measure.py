"""Timing and peak-memory measurement: medians over repeated runs, ru_maxrss of one child process."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Timing:
    """Wall-clock and CPU seconds (user + system, threads and children included) of repeated runs."""

    runs: tuple[float, ...]
    cpu: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def interleaved(contenders: dict[str, Callable[[], object]], *, repeat: int,
                before: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time each contender `repeat` times, taking turns round by round, so that a burst of load from
    elsewhere on the machine hits all of them rather than one. `before` runs untimed before each run."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            if before is not None:
                before()
            cpu, start = cpu_seconds(), time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - start, cpu_seconds() - cpu))
    return {name: Timing(tuple(w for w, _ in v), tuple(c for _, c in v)) for name, v in runs.items()}


@dataclass(frozen=True)
class ChildRun:
    seconds: float
    maxrss: int  # bytes: the peak resident set of the child (and of its own waited-for children)


PEAK = Path(__file__).with_name("peak.py")


def peak_memory(argv: Sequence[str | os.PathLike[str]]) -> ChildRun:
    """Run a program to completion and return its wall time and peak resident memory.

    run() cannot report a child's resource usage, and a child of this (large) process would inherit
    its peak, so a small launcher (peak.py) runs the program and reports what wait4 says.
    """
    args = [os.fspath(a) for a in argv]
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.run([sys.executable, "-I", "-S", PEAK, *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=errors, check=False)
        fields = proc.stdout.decode().split()
        if proc.returncode != 0 or len(fields) != 3 or fields[2] != "0":
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{' '.join(args[:4])} … failed: {' '.join(tail) or proc.stdout.decode()}")
    return ChildRun(seconds=float(fields[1]), maxrss=int(fields[0]) * 1024)  # Linux reports KiB
