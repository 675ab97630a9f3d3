"""A QEMU rig that boots real disk images from pytest, under BIOS and UEFI, and cuts power on purpose."""
