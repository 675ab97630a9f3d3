"""The recovery's checks of its target before anything is erased (DESIGN.md: the system partition comes
from the configuration, never from the instruction).

udev and real partitions exist only in the recovery OS, so device lookup, mount table and partition
table are small fakes here; the VM tests run the real lookups on the happy path and the
`PARTLABEL=system` rejection (tests/vm/test_install.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from recovery.os import installer
from recovery.os.config import RecoveryConfig
from recovery.os.devices import PartitionInfo
from recovery.os.installer import INCOMPLETE, INSTRUCTION, Installer, Parts
from recovery.os.cmdline import Boot
from recovery.os.console import Console
from recovery.core.instruction import DiskSpec, Instruction, write_instruction
from recovery.core.result import Outcome

NODES = {"PARTLABEL=cfg": "/dev/vda3", "PARTLABEL=system": "/dev/vda2", "PARTLABEL=recovery": "/dev/vda5",
         "PARTLABEL=storage": "/dev/vda4"}
CONFIG = RecoveryConfig(product="demo-appliance", keys=Path("/nonexistent"), cfg=DiskSpec.parse("PARTLABEL=cfg"),
                        system=DiskSpec.parse("PARTLABEL=system"), recovery=DiskSpec.parse("PARTLABEL=recovery"),
                        storage=DiskSpec.parse("PARTLABEL=storage"))


@pytest.fixture
def machine(tmp_path: Path) -> dict[str, Any]:
    """A fake disk: spec -> node, the mount table and the system partition's GPT name."""
    state: dict[str, Any] = {"nodes": dict(NODES), "mounted": {}, "name": "system", "touched": []}

    def find_device(spec: Any, *, timeout: float = 0.0, **_: Any) -> Path:
        return Path(state["nodes"][str(spec)])

    def partition_info(node: Path, context: Any = None) -> PartitionInfo:
        return PartitionInfo(node=node, disk=Path("/dev/vda"), number=2, name=state["name"], size=1 << 30)

    def forbidden(*args: Any, **kwargs: Any) -> None:
        state["touched"].append(args)
        raise AssertionError(f"the target was touched: {args}")

    # every part that would act on the machine is forbidden: the checks must decide before any of them
    state["parts"] = Parts(
        find_device=find_device, same_device=lambda a, b: Path(a) == Path(b), partition_info=partition_info,
        mounted_at=lambda node: state["mounted"].get(str(node), []), mount=forbidden, umount=forbidden,
        erase=forbidden, filesystem_identity=forbidden, extract_payload=forbidden, write_marker=forbidden,
    )
    cfg = tmp_path / "cfg"
    (cfg / "recovery").mkdir(parents=True)
    write_instruction(cfg / INSTRUCTION, Instruction.create(
        disk="PARTLABEL=storage", file="/bundles/a.bundle", sha256="ab" * 32, version="2.0.0"))
    state["cfg"] = cfg
    return state


def run(state: dict[str, Any], config: RecoveryConfig = CONFIG) -> Any:
    result = Installer(config, Boot(try_count=1), Console(), state["cfg"], parts=state["parts"]).run()
    assert state["touched"] == [] and not (state["cfg"] / INCOMPLETE).exists()
    return result


def test_the_fakes_reach_the_bundle_check(machine: dict[str, Any]) -> None:
    # With every check passed the installer goes on to mount storage: the one step the fakes forbid.
    with pytest.raises(AssertionError, match="the target was touched"):
        Installer(CONFIG, Boot(), Console(), machine["cfg"], parts=machine["parts"]).run()


@pytest.mark.parametrize("role", ["cfg", "recovery"])
def test_system_that_is_another_role_is_rejected(machine: dict[str, Any], role: str) -> None:
    machine["nodes"][f"PARTLABEL={role}"] = NODES["PARTLABEL=system"]
    result = run(machine)
    assert (result.outcome, result.reason) == (Outcome.rejected, f"system partition /dev/vda2 is the {role} partition")


def test_bundle_disk_that_is_the_system_is_rejected(machine: dict[str, Any]) -> None:
    machine["nodes"]["PARTLABEL=storage"] = NODES["PARTLABEL=system"]
    result = run(machine)
    assert result.outcome == Outcome.rejected
    assert result.reason == "the bundle's disk PARTLABEL=storage is the system partition"


def test_mounted_system_is_rejected(machine: dict[str, Any]) -> None:
    machine["mounted"]["/dev/vda2"] = ["/mnt/old"]
    result = run(machine)
    assert (result.outcome, result.reason) == (Outcome.rejected, "system partition /dev/vda2 is mounted on /mnt/old")


def test_system_partition_with_another_name_is_rejected(machine: dict[str, Any]) -> None:
    machine["name"] = "data"
    result = run(machine)
    assert result.outcome == Outcome.rejected
    assert result.reason == "partition /dev/vda2 is named 'data', expected 'system'"


def test_system_named_by_uuid_skips_the_name_check(machine: dict[str, Any]) -> None:
    machine["nodes"]["UUID=0b1c0b6e-6a34-4b8e-9a38-7c8c3f1e2d4a"] = NODES["PARTLABEL=system"]
    machine["name"] = "anything"
    config = replace(CONFIG, system=DiskSpec.parse("UUID=0b1c0b6e-6a34-4b8e-9a38-7c8c3f1e2d4a"))
    with pytest.raises(AssertionError, match="the target was touched"):
        Installer(config, Boot(), Console(), machine["cfg"], parts=machine["parts"]).run()


def test_after_an_earlier_erase_a_refusal_is_a_failure(machine: dict[str, Any]) -> None:
    # The system was erased by an earlier try: refusing now cannot give the old system back.
    (machine["cfg"] / INCOMPLETE).write_text('{"label": "system", "uuid": "0b1c0b6e-6a34-4b8e-9a38-7c8c3f1e2d4a"}\n')
    machine["mounted"]["/dev/vda2"] = ["/mnt/old"]
    with pytest.raises(installer.Failed, match="mounted on /mnt/old; the system partition is incomplete"):
        Installer(CONFIG, Boot(try_count=2), Console(), machine["cfg"], parts=machine["parts"]).run()
    assert machine["touched"] == []
