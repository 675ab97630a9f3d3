"""A QEMU rig that boots real disk images from pytest, under BIOS and UEFI, and cuts power on purpose."""

from __future__ import annotations

from recovery.core.errors import UpdateError


class VMError(UpdateError):
    """The rig could not do what was asked: QEMU failed, the guest did not answer in time, a disk is odd."""

    kind = "vm"
