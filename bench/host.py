"""The machine the figures were measured on: CPU model, cores, memory, accelerator, tool versions."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from recovery.core.run import run


@dataclass(frozen=True)
class Host:
    when: str
    cpu: str
    cores: int
    memory: int  # bytes
    kernel: str
    python: str
    tar: str
    zstd: str
    load: tuple[float, float, float]

    def describe(self, accel: str | None = None) -> str:
        guest = f"; QEMU guests under {accel.upper()}" if accel else ""
        return (f"{self.when}; {self.cpu}, {self.cores} CPUs, {self.memory / 2**30:.1f} GiB, x86_64 Linux "
                f"{self.kernel}{guest}; Python {self.python}; {self.tar}; {self.zstd}; load average "
                f"{', '.join(f'{x:.2f}' for x in self.load)} at start")


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def total_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def this_host() -> Host:
    return Host(
        when=time.strftime("%Y-%m-%d %H:%M %Z"),
        cpu=cpu_model(),
        cores=os.cpu_count() or 1,
        memory=total_memory(),
        kernel=platform.release(),
        python=platform.python_version(),
        tar=run(["tar", "--version"]).stdout.decode().splitlines()[0],
        zstd=run(["zstd", "--version"]).stdout.decode().strip(" *\n"),
        load=os.getloadavg(),
    )
