"""Trial boots and the rollback under QEMU, with real GRUB, real reboots and no help from the test.

A good release confirms itself on its first boot and becomes the fallback. A signed release that does
not work (its init exits, it has no kernel, its health check fails, it never reaches multi-user, it
hangs) is installed, fails its trial boots and is replaced by the factory release 1.0.0, which
confirms itself; the operator's files on cfg and storage keep their bytes, and `install --latest`
skips the failed version afterwards.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mkimage.publish import publish
from recovery.core.envblock import format_envblock, parse_envblock
from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.releases import BROKEN, broken_bundle
from tests.vm.staging import INSTRUCTION, read_result, ready, stage
from tests.vm.treecheck import check_installed
from vm.crashcheck import grub_view
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.machine import Firmware, Machine

TRIAL = "/recovery/trial"
FALLBACK = "/recovery/fallback.json"
FACTORY = "/bundles/demo-appliance-1.0.0.bundle"
MARKERS = (("cfg", "/keep.conf", b"setting=1\n"), ("storage", "/keep/data.txt", b"operator data\n"))
TRIAL_BOOTS = 3 * BOOT  # every trial boot of a broken release, up to the rollback
CHECKED = ("ends with no help on 1.0.0 booted and confirmed; result.json rolled-back from the broken version to 1.0.0 "
           "with a reason naming what was seen; the operator's files on cfg and storage unchanged; the restored "
           "tree equal to 1.0.0's payload; install --latest skips the failed version")


def _trial_block(disk: DiskImage) -> dict[str, str]:
    raw = disk.read_file("cfg", TRIAL)
    assert raw is not None, "no trial block on cfg"
    return parse_envblock(raw)


def _shell(m: Machine, cmd: str) -> str:
    code, out = m.shell(cmd)
    assert code == 0, out
    return out


@pytest.mark.reliability  # make test has its core in test_recovery_update.py's first test
def test_a_good_release_confirms_on_its_first_boot_and_becomes_the_fallback(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage,
) -> None:
    good = built_image.bundles["2.0.0"]
    stage(vm_disk, good.read_bytes(), name=good.name)
    m = machine()
    m.expect(r"recovery: installed 2\.0\.0\r?\n", 4 * RECOVERY)
    m.expect(r"trial: 2\.0\.0 is on trial \(boot 1 of 3\)", BOOT)
    m.expect(r"trial: confirmed 2\.0\.0 \(boot 1 of 3\)", BOOT)
    m.expect(ready(built_image, "2.0.0"), BOOT)
    status = _shell(m, "reflashctl status")
    assert "fallback: 2.0.0 (/bundles/demo-appliance-2.0.0.bundle)" in status, status
    assert "trial:" not in status, status
    # The trial boot armed the hardware watchdog (systemd.watchdog_sec on its command line only).
    assert _shell(m, "cat /proc/cmdline").count("systemd.watchdog_sec=30") == 1
    assert _shell(m, "systemctl show -p RuntimeWatchdogUSec --value").strip() == "30s"
    m.power_cut()

    assert _trial_block(vm_disk) == {}
    fallback = json.loads(vm_disk.read_file("cfg", FALLBACK) or b"{}")
    assert (fallback["version"], fallback["file"]) == ("2.0.0", f"/bundles/{good.name}")
    # Replaced only now that the newer release confirmed: the factory bundle is gone, 2.0.0's is kept.
    assert vm_disk.read_file("storage", FACTORY) is None
    assert vm_disk.read_file("storage", f"/bundles/{good.name}") == good.read_bytes()

    # The next boot is an ordinary one: no trial, no count.
    m = machine()
    m.expect(ready(built_image, "2.0.0"), BOOT)
    assert "systemd.watchdog_sec" not in _shell(m, "cat /proc/cmdline")
    m.power_cut()
    assert _trial_block(vm_disk) == {}


def _feed_on_storage(built: Any, disk: DiskImage, bundle: Path, tmp: Path) -> None:
    """A signed feed whose newest release is `bundle`, in /storage/feed (its bundle need not be there)."""
    published = publish([bundle], tmp / "feed", key=built.keys / "signing.pem")
    for name in ("releases.json", "releases.json.sig"):
        disk.write_file("storage", f"/feed/{name}", (published.directory / name).read_bytes())


def _params() -> list[Any]:
    quick = {"init-exits"}  # make test (three quick trial boots); the rest with make reliability
    return [pytest.param(kind, marks=() if kind in quick else pytest.mark.reliability, id=kind) for kind in BROKEN]


@pytest.mark.timeout(2400)  # three trial boots that end only by the watchdog or the time limit
@pytest.mark.parametrize("kind", _params())
def test_a_release_that_does_not_work_is_rolled_back(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, kind: str, tmp_path: Path,
    scenario: Scenario,
) -> None:
    broken = BROKEN[kind]
    scenario.name = f"Rollback: a signed release that does not work ({kind})"
    scenario.checked = CHECKED
    bundle = broken_bundle(built_image, kind)
    for part, path, data in MARKERS:
        vm_disk.write_file(part, path, data)
    _feed_on_storage(built_image, vm_disk, bundle, tmp_path)
    stage(vm_disk, bundle.read_bytes(), name=bundle.name, version=broken.version)

    m = machine(Firmware.bios)
    m.expect(rf"recovery: installed {re.escape(broken.version)}\r?\n", 4 * RECOVERY)
    m.expect(rf"recovery: rolling back to 1\.0\.0: {broken.reason}", TRIAL_BOOTS)
    m.expect(rf"recovery: rolled back to 1\.0\.0: {broken.reason}.*\r?\n", 4 * RECOVERY)
    # Cut before the restored system mounts its root (which writes to it): the tree is 1.0.0's payload.
    m.expect(r"Loading the system", BOOT)
    m.power_cut()
    check_installed(vm_disk, built_image.bundles["1.0.0"], built_image.keys)

    m = machine(Firmware.bios)
    m.expect(r"trial: confirmed 1\.0\.0 \(boot \d of 3\)", BOOT)
    m.expect(ready(built_image, "1.0.0"), BOOT)
    status = _shell(m, "reflashctl status")
    assert re.search(rf"^last update: rolled back from {re.escape(broken.version)} to 1\.0\.0 on .*: {broken.reason}",
                     status, re.MULTILINE), status
    assert "fallback: 1.0.0 (/bundles/demo-appliance-1.0.0.bundle)" in status, status
    latest = _shell(m, "reflashctl install --latest /storage/feed --no-reboot")
    assert re.search(rf"skipping {re.escape(broken.version)}: it was rolled back on .*; --force installs it", latest), latest
    m.power_cut()

    result = read_result(vm_disk)
    assert (result["outcome"], result["from_version"], result["to_version"]) == ("rolled-back", broken.version, "1.0.0")
    assert re.match(broken.reason, result["reason"]), result
    assert vm_disk.read_file("cfg", INSTRUCTION) is None
    assert _trial_block(vm_disk) == {}
    for part, path, data in MARKERS:
        assert vm_disk.read_file(part, path) == data, (part, path)
    failed = json.loads(vm_disk.read_file("cfg", "/recovery/failed.json") or b"{}")
    assert [r["version"] for r in failed["releases"]] == [broken.version]


def test_the_rollback_entry_outside_a_trial_boots_the_confirmed_release_again(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, scenario: Scenario,
) -> None:
    """Issue 18's third finding, made by hand: `confirm` emptied the trial block and a cut inside the
    checkpoint after it (the disk reordering its writes) left GRUB, which reads past no journal, a
    trial block that is no block, while the journal holds the empty one. GRUB boots the rollback entry;
    the recovery reads the ended trial after the journal and boots the confirmed release again."""
    scenario.name = "Rollback entry outside a trial (a trial block torn for GRUB after confirm)"
    scenario.checked = ("GRUB boots the rollback entry; the recovery says there is nothing to roll back and reboots "
                        "without erasing; 1.0.0 boots; result.json and failed.json untouched; GRUB's view of the "
                        "trial block whole and empty afterwards")
    empty = format_envblock({})
    vm_disk.write_file("cfg", TRIAL, empty)
    vm_disk.tear_file("cfg", TRIAL, on_disk=b"x" * len(empty), in_journal=empty)
    assert vm_disk.read_file("cfg", "/recovery/result.json") is None
    m = machine()
    m.expect(r"Loading the recovery OS \(rollback, try 1\)", BOOT)
    m.expect(r"recovery: nothing to roll back: 1\.0\.0 is not on trial: it confirmed itself\r?\n", RECOVERY)
    m.expect(r"recovery: rebooting", RECOVERY)
    start = m.console.cursor
    m.expect(ready(built_image, "1.0.0"), BOOT)
    m.power_cut()
    text = m.console.text
    assert "recovery: erasing" not in text and "rolling back" not in text, m.tail()
    assert "Loading the recovery OS" not in text[start:], "GRUB chose the recovery again after the checkpoint"
    assert vm_disk.read_file("cfg", "/recovery/result.json") is None
    assert vm_disk.read_file("cfg", "/recovery/failed.json") is None
    assert parse_envblock(vm_disk.read_file("cfg", "/recovery/grubenv") or b"") == {}
    part = vm_disk.partition("cfg")
    with tempfile.TemporaryDirectory(dir=vm_disk.path.parent) as tmp:
        exported = Path(tmp) / "cfg.img"
        vm_disk.export_range(part.start, part.size, exported)
        assert grub_view(exported).files["recovery/trial"] == empty
