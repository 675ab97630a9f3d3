"""Disks attached to a machine: the block node graph (`-blockdev`) and the guest device (`-device`).

Each drive is a format node over a file node; filter nodes such as `blkdebug` can be stacked on top,
so a test can make the guest's writes to a chosen sector fail:

    Drive(overlay, filters=(blkdebug(inject_error(sector=4096, iotype="write")),))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class ImageFormat(StrEnum):
    raw = "raw"
    qcow2 = "qcow2"


class DiskInterface(StrEnum):
    """How the guest sees the disk."""

    virtio = "virtio"  # /dev/vda
    scsi = "scsi"  # virtio-scsi, /dev/sda
    nvme = "nvme"  # /dev/nvme0n1
    ide = "ide"  # /dev/sda on the PC machine's IDE bus

    def devices(self, node: str, serial: str | None, bootindex: int | None, extra: Mapping[str, str]) -> list[str]:
        """`-device` arguments for a drive whose top block node is `node`."""
        props: dict[str, str] = {"drive": node}
        if bootindex is not None:
            props["bootindex"] = str(bootindex)
        if serial is not None:
            props["serial"] = serial
        args: list[str] = []
        match self:
            case DiskInterface.virtio:
                model = "virtio-blk-pci"
            case DiskInterface.scsi:
                args += ["-device", f"virtio-scsi-pci,id=scsi-{node}"]
                model = "scsi-hd"
                props["bus"] = f"scsi-{node}.0"
            case DiskInterface.nvme:
                model = "nvme"
                props.setdefault("serial", node)  # NVMe requires one
            case DiskInterface.ide:
                model = "ide-hd"
        props.update(extra)
        args += ["-device", ",".join([model, *(f"{k}={v}" for k, v in props.items())])]
        return args


def inject_error(
    *,
    sector: int | None = None,
    iotype: str | None = "write",
    errno: int = 5,
    once: bool = False,
    event: str = "none",
    immediately: bool = True,
) -> dict[str, Any]:
    """One blkdebug error rule: by default every write touching `sector` (512-byte units) fails with EIO.

    `event="none"` arms the rule when the node opens; other events (`write_aio`, `flush_to_disk`, ...)
    arm it when that happens inside QEMU's block layer.
    """
    rule: dict[str, Any] = {"event": event, "errno": errno, "once": once, "immediately": immediately}
    if sector is not None:
        rule["sector"] = sector
    if iotype is not None:
        rule["iotype"] = iotype
    return rule


def blkdebug(*rules: Mapping[str, Any], config: Path | None = None) -> dict[str, Any]:
    """A blkdebug filter node (error injection) for `Drive.filters`; rules from `inject_error`."""
    node: dict[str, Any] = {"driver": "blkdebug", "inject-error": [dict(r) for r in rules]}
    if config is not None:
        node["config"] = str(config)
    return node


# The option that names a filter's child node differs between drivers.
_CHILD_KEY = {"blkdebug": "image", "blkverify": "test"}


@dataclass(frozen=True)
class Drive:
    """A disk image attached to the guest.

    `filters` wrap the format node, innermost first, so their offsets are the guest's; `device`
    adds `-device` properties (e.g. `{"werror": "stop"}`). Writes go through the host's page cache
    (they survive a killed QEMU) unless `direct`.
    """

    path: Path
    format: ImageFormat = ImageFormat.qcow2
    interface: DiskInterface = DiskInterface.virtio
    readonly: bool = False
    serial: str | None = None
    direct: bool = False
    filters: tuple[Mapping[str, Any], ...] = ()
    device: Mapping[str, str] = field(default_factory=dict)

    def blockdev(self, node: str) -> dict[str, Any]:
        """The node graph as `-blockdev` JSON; the top node is called `node`."""
        graph: dict[str, Any] = {
            "driver": str(self.format),
            "read-only": self.readonly,
            "file": {
                "driver": "file",
                "filename": str(self.path),
                "read-only": self.readonly,
                "cache": {"direct": self.direct},
            },
        }
        for i, spec in enumerate(self.filters):
            driver = str(spec["driver"])
            graph["node-name"] = f"{node}-layer{i}"
            graph = {**spec, _CHILD_KEY.get(driver, "file"): graph}
        graph["node-name"] = node
        return graph

    def qemu_args(self, node: str, *, bootindex: int | None = None) -> list[str]:
        return [
            "-blockdev",
            json.dumps(self.blockdev(node)),
            *self.interface.devices(node, self.serial, bootindex, self.device),
        ]
