"""Finding, checking and mounting block devices: pyudev to find them, pyparted to check the table."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyudev

from recovery.core.errors import Failed, Rejected
from recovery.core.instruction import DiskSpec, DiskSpecKind
from recovery.core.run import run
from recovery.os.mounts import mount_table

log = logging.getLogger(__name__)


# The udev property that carries each kind of spec, with the kernel's uevent name as a fallback for
# partition names (before udev's blkid builtin ran, only PARTNAME is there).
_PROPERTIES: dict[DiskSpecKind, tuple[str, ...]] = {
    DiskSpecKind.partlabel: ("ID_PART_ENTRY_NAME", "PARTNAME"),
    DiskSpecKind.label: ("ID_FS_LABEL",),
    DiskSpecKind.uuid: ("ID_FS_UUID",),
    DiskSpecKind.partuuid: ("ID_PART_ENTRY_UUID",),
}


def matches(device: pyudev.Device, spec: DiskSpec) -> bool:
    """Whether a udev block device is the one `spec` names."""
    if spec.kind == DiskSpecKind.path:
        if device.device_node == spec.value:
            return True
        return spec.value in set(device.device_links)
    for prop in _PROPERTIES[spec.kind]:
        value = device.properties.get(prop)
        if value is None:
            continue
        if spec.kind in (DiskSpecKind.uuid, DiskSpecKind.partuuid):
            return value.lower() == spec.value.lower()
        return value == spec.value
    return False


def _candidates(context: pyudev.Context, spec: DiskSpec) -> list[pyudev.Device]:
    return [d for d in context.list_devices(subsystem="block") if d.device_node and matches(d, spec)]


def find_device(spec: DiskSpec, *, timeout: float = 0.0, context: pyudev.Context | None = None) -> Path:
    """The device node `spec` names, waiting up to `timeout` seconds for one that appears late.

    Waiting listens to udev events (a Monitor opened before the first look, so none is missed) rather
    than polling. Several matches are an error: the instruction must name one disk without doubt.
    """
    context = context or pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by(subsystem="block")
    monitor.start()
    deadline = time.monotonic() + timeout
    while True:
        found = _candidates(context, spec)
        if len(found) > 1:
            nodes = ", ".join(sorted(d.device_node for d in found))
            raise Rejected(f"disk {spec} is ambiguous: {nodes}")
        if found:
            return Path(found[0].device_node)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Rejected(f"disk {spec} not found" + (f" after waiting {timeout:g} s" if timeout else ""))
        # Any new or changed block device may be ours (a partition table read, a label set by udev).
        event = monitor.poll(timeout=remaining)
        if event is not None:
            log.debug("udev: %s %s", event.action, event.device_node)


def device_number(node: Path) -> int:
    return os.stat(node).st_rdev


def same_device(a: Path, b: Path) -> bool:
    return device_number(a) == device_number(b)


@dataclass(frozen=True)
class PartitionInfo:
    node: Path
    disk: Path
    number: int
    name: str
    size: int  # bytes


def partition_info(node: Path, context: pyudev.Context | None = None) -> PartitionInfo:
    """Read the partition's entry from its disk's partition table with pyparted."""
    import parted  # heavy import, only where a partition table is read

    context = context or pyudev.Context()
    device = pyudev.Devices.from_device_file(context, os.fspath(node))
    disk_dev = device.find_parent("block", "disk")
    if disk_dev is None or device.device_type != "partition":
        raise Rejected(f"{node} is not a partition")
    try:
        disk = parted.newDisk(parted.getDevice(disk_dev.device_node))
    except parted.PartedException as e:
        raise Rejected(f"cannot read the partition table of {disk_dev.device_node}: {e}") from None
    number = int(device.attributes.asstring("partition"))
    for part in disk.partitions:
        if part.number == number:
            name = part.name if disk.supportsFeature(parted.DISK_TYPE_PARTITION_NAME) else ""
            return PartitionInfo(
                node=node,
                disk=Path(disk_dev.device_node),
                number=number,
                name=name or "",
                size=part.geometry.length * part.geometry.device.sectorSize,
            )
    raise Rejected(f"partition {number} of {disk_dev.device_node} is not in its partition table")


def mount(node: Path, target: Path, *, options: str, fstype: str | None = None) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    argv: list[str | os.PathLike[str]] = ["mount", "-o", options]
    if fstype:
        argv += ["-t", fstype]
    run([*argv, node, target], error=Failed)
    return target


def umount(target: Path) -> None:
    run(["umount", target], error=Failed)


def mounts_under(prefix: Path) -> Iterator[Path]:
    """Mount points at or below `prefix`, in the order they were mounted."""
    for _device, mountpoint in mount_table():
        mp = Path(mountpoint)
        if mp == prefix or prefix in mp.parents:
            yield mp


def umount_all(prefix: Path) -> None:
    """Unmount everything below `prefix`, newest first; keep going past failures and report them."""
    errors = []
    for mp in reversed(list(mounts_under(prefix))):
        try:
            umount(mp)
        except Failed as e:
            errors.append(str(e))
    if errors:
        raise Failed("unmount failed: " + "; ".join(errors))
