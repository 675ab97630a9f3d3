"""Choosing QEMU's accelerator: TCG unless a KVM probe boot shows that KVM really runs guests here.

KVM on these machines is nested and can hang a guest at its first steps (a boot sector runs fine,
a Linux kernel spins forever), so the probe boots a real kernel until it panics for want of a root
file system, with a short deadline, and kills QEMU either way. `VM_ACCEL=tcg|kvm|auto` overrides.
"""

from __future__ import annotations

import logging
import os
import tempfile
from enum import StrEnum
from pathlib import Path

from . import VMError

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 8.0  # a kernel reaches its root mount in about a second under working KVM
KVM_DEVICE = Path("/dev/kvm")


class Accel(StrEnum):
    tcg = "tcg"
    kvm = "kvm"

    def qemu_args(self) -> list[str]:
        match self:
            case Accel.kvm:
                return ["-accel", "kvm", "-cpu", "host"]
            case Accel.tcg:
                return ["-accel", "tcg"]


_probed: Accel | None = None


def requested() -> Accel | None:
    """What VM_ACCEL asks for; None for auto (unset, empty or `auto`)."""
    value = os.environ.get("VM_ACCEL", "").strip().lower()
    if value in ("", "auto"):
        return None
    try:
        return Accel(value)
    except ValueError:
        raise VMError(f"VM_ACCEL={value!r} is not one of tcg, kvm, auto") from None


def choose(probe_kernel: Path | None = None) -> Accel:
    """The accelerator to use: VM_ACCEL if set, else KVM if a probe boot of `probe_kernel` succeeds.

    The probe runs once per process; without a kernel to probe with, TCG is used (and nothing cached).
    """
    global _probed
    if (forced := requested()) is not None:
        return forced
    if _probed is not None:
        return _probed
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        _probed = Accel.tcg
        log.debug("%s not usable: using TCG", KVM_DEVICE)
        return _probed
    if probe_kernel is None or not probe_kernel.exists():
        log.debug("no kernel to probe KVM with: using TCG")
        return Accel.tcg
    _probed = Accel.kvm if probe_kvm(probe_kernel) else Accel.tcg
    log.info("KVM probe boot %s: using %s", "succeeded" if _probed is Accel.kvm else "failed", _probed)
    return _probed


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> bool:
    """Boot `kernel` under KVM without a root file system; True if it gets as far as looking for one."""
    # here, not at the top: vm.machine imports this module to choose its accelerator
    from .console import ConsoleClosed, ConsoleTimeout
    from .machine import Machine

    with tempfile.TemporaryDirectory(prefix="kvm-probe-") as tmp:
        machine = Machine(
            kernel=kernel, append="console=ttyS0 panic=-1", accel=Accel.kvm, memory=256,
            name="kvm-probe", workdir=Path(tmp),
        )
        try:
            with machine:
                try:
                    machine.expect(r"VFS: |Kernel panic|Run /init", timeout=timeout)
                finally:
                    machine.power_cut()  # a hung guest may not even let QEMU quit
            return True
        except (ConsoleTimeout, ConsoleClosed, VMError) as e:
            log.debug("KVM probe failed: %s", str(e).splitlines()[0])
            return False
