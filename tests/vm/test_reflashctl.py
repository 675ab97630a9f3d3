"""`reflashctl` on the running system under QEMU: the demo's whole cycle over the guest's network, a
corrupt download refused before anything is staged, and `reflashctl status` after a rejected and after
a failed recovery (a real one: the first try meets write errors on the system disk).

The guest's network is QEMU's user mode with `restrict=on`: it reaches the host's HTTP server only
through the guestfwd rule at 10.0.2.100:80.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.vm.staging import INSTRUCTION, read_result, ready, stage
from vm.demo import FEED_HOST, run_demo
from vm.deadlines import BOOT, KERNEL, RECOVERY
from vm.disk import DiskImage
from vm.drive import Drive, blkdebug, inject_error
from vm.machine import Firmware, Machine, qemu_available
from vm.network import StaticServer, UserNetwork

TRANSFER = 900.0  # download and verification of a bundle in the guest
BUNDLE = "demo-appliance-2.0.0.bundle"


@pytest.fixture(scope="module")
def good_bundle(built_image: Any) -> bytes:
    return built_image.bundles["2.0.0"].read_bytes()


@pytest.fixture(scope="module")
def corrupt_bundle(good_bundle: bytes) -> bytes:
    """The 2.0.0 bundle with one bit flipped in its payload: signed manifest intact, payload hash wrong."""
    data = bytearray(good_bundle)
    data[len(data) // 2] ^= 0x01
    return bytes(data)


def status_lines(m: Machine) -> list[str]:
    code, out = m.shell("reflashctl status")
    assert code == 0, out
    return out.strip().splitlines()


@pytest.mark.reliability  # make test runs the same demo from the update page (tests/vm/test_daemon.py)
def test_demo_updates_the_running_system_over_the_network(built_image: Any, tmp_path: Path) -> None:
    if (missing := qemu_available()) is not None:
        pytest.skip(missing)
    said: list[str] = []
    report = run_demo(built_image, tmp_path / "demo", Firmware.bios, say=said.append)
    assert (report.from_version, report.to_version) == ("1.0.0", "2.0.0")
    assert "running: demo-appliance 2.0.0" in report.status.splitlines()
    assert re.search(r"^last update: installed 1\.0\.0 -> 2\.0\.0 in \d+ s", report.status, re.MULTILINE)
    names = [s.name for s in report.stages]
    assert names == ["publish", "boot", "network", "feed", "download", "verify", "staged", "reboot", "recovery",
                     "verifying", "erasing", "extracting", "finishing", "installed", "reboot-system", "ready",
                     "status"]
    assert all(s.took >= 0 for s in report.stages)
    assert [s.at for s in report.stages] == sorted(s.at for s in report.stages)
    assert report.address.startswith("10.0.2.")
    # The guest fetched the feed, its signature and the bundle from the host's server, through the guestfwd.
    assert {"/releases.json", "/releases.json.sig", f"/{BUNDLE}"} <= set(report.fetched)
    assert said and all(s.startswith("demo: ") for s in said)
    timed = [s for s in said if re.match(r"demo: \[ *\d+\.\d s\] .* \(\+\d+\.\d s\)$", s)]
    assert len(timed) == len(report.stages)
    assert any("last update: installed 1.0.0 -> 2.0.0" in s for s in said)
    assert report.console_log.is_file()
    assert "recovery: installed 2.0.0" in report.console_log.read_text(errors="replace")


def test_status_after_a_rejected_recovery_and_a_corrupt_download_refused(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, good_bundle: bytes,
    corrupt_bundle: bytes, tmp_path: Path,
) -> None:
    # The recovery rejects a corrupt staged bundle and boots the old system again ...
    stage(vm_disk, corrupt_bundle, name="staged.bundle")
    site = tmp_path / "site"
    site.mkdir()
    (site / BUNDLE).write_bytes(corrupt_bundle)
    (site / "good.bundle").write_bytes(good_bundle)
    with StaticServer(site) as server:
        m = machine(Firmware.bios, network=UserNetwork((server.forward(FEED_HOST, 80),)))
        m.expect(r"recovery: starting \(try 1\)", KERNEL)
        m.expect(r"recovery: rejected: payload sha256 mismatch", RECOVERY)
        m.expect(ready(built_image, "1.0.0"), BOOT)
        lines = status_lines(m)
        assert lines[:3] == ["running: demo-appliance 1.0.0", "state: idle", "staged: nothing"]
        assert lines[3] == "fallback: 1.0.0 (/bundles/demo-appliance-1.0.0.bundle)"
        assert lines[4] == "recovery: 1.0.0 in slot a (active); slot b: 1.0.0", lines
        assert lines[5].startswith("last update: rejected 2.0.0: payload sha256 mismatch")

        # ... where restrict=on leaves the guest no way to the host but the guestfwd.
        reach = "python3 -c \"import socket; socket.create_connection(('{}', {}), timeout=5)\""
        assert m.shell(reach.format("10.0.2.2", server.port), 60)[0] != 0
        assert m.shell(reach.format(FEED_HOST, 80), 60)[0] == 0

        # ... and reflashctl refuses a corrupt download before anything is staged.
        code, before = m.shell("ls -a /storage/bundles")
        assert code == 0 and "staged.bundle" in before.split()
        url = f"http://{FEED_HOST}/{BUNDLE}"
        code, _ = m.shell(f"reflashctl install {url} >/run/out 2>/run/err", TRANSFER)
        assert code == 1
        _, err = m.shell("cat /run/err")
        assert err.count("\n") == 1 and err.startswith("rejected: payload sha256 mismatch"), err
        _, out = m.shell("cat /run/out")
        # reflashd runs in the image: the command follows its download, then reports the verdict.
        assert out.startswith(f"downloading {url}\n") and "downloading demo-appliance-2.0.0.bundle" in out, out
        assert server.fetched(f"/{BUNDLE}")
        assert m.shell("test -e /cfg/update-instruction")[0] == 1
        # No partial or rejected file left; reflashd keeps its state (the failed download's reason) beside.
        code, after = m.shell("ls -a /storage/bundles")
        assert code == 0 and set(after.split()) - {"update-state.json"} == set(before.split()), after
        assert status_lines(m)[1:3] == ["state: idle", "staged: nothing"]
        m.power_cut()

    # From the host, after the power cut: nothing staged, nothing downloaded left, the old verdict kept.
    assert vm_disk.read_file("cfg", INSTRUCTION) is None
    assert vm_disk.read_file("storage", f"/bundles/{BUNDLE}") is None
    assert vm_disk.read_file("storage", f"/bundles/{BUNDLE}.partial") is None
    result = read_result(vm_disk)
    assert result["outcome"] == "rejected" and result["reason"].startswith("payload sha256 mismatch")


@pytest.mark.reliability  # make reliability: make test must stay under 30 minutes
def test_status_after_a_failed_try_and_the_install_that_followed(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, good_bundle: bytes
) -> None:
    stage(vm_disk, good_bundle, name=BUNDLE)
    # Try 1 meets a disk that fails every write to the system partition's superblock: mkfs fails.
    system = vm_disk.partition("system")
    superblock = system.start // 512 + 2
    faulty = Drive(vm_disk.path, vm_disk.format, filters=(blkdebug(inject_error(sector=superblock)),))
    m = machine(Firmware.bios, disk=faulty, probe_kernel=built_image.recovery / "vmlinuz", name="faulty")
    m.expect(r"recovery: starting \(try 1\)", KERNEL)
    m.expect(r"recovery: erasing\n", RECOVERY)
    reason = m.expect(r"recovery: failed: ([^\r\n]+)\r?\n", RECOVERY).group(1).strip()
    m.expect(r"recovery: rebooting", RECOVERY)
    m.power_cut()
    failed = read_result(vm_disk)
    assert (failed["outcome"], failed["try"], failed["reason"]) == ("failed", 1, reason)
    assert vm_disk.read_file("cfg", INSTRUCTION) is not None  # kept for the next try

    # Try 2 on a sound disk installs; the new system's status tells both.
    m = machine(Firmware.bios)
    m.expect(r"recovery: starting \(try 2\)", KERNEL)
    m.expect(r"recovery: installed 2\.0\.0", RECOVERY)
    m.expect(ready(built_image, "2.0.0"), BOOT)
    lines = status_lines(m)
    assert lines[:3] == ["running: demo-appliance 2.0.0", "state: idle", "staged: nothing"], lines
    assert lines[3] == "fallback: 2.0.0 (/bundles/demo-appliance-2.0.0.bundle)", lines  # 2.0.0 confirmed itself
    assert lines[4] == "recovery: 2.0.0 in slot b (active); slot a: 1.0.0", lines  # and wrote its recovery
    assert re.match(r"last update: installed 1\.0\.0 -> 2\.0\.0 in \d+ s .*, after 1 failed try$", lines[5]), lines
    assert lines[6].startswith(f"  before that: try 1 failed: {reason}"), lines
    code, raw = m.shell("reflashctl status --json")
    assert code == 0
    last = json.loads(raw)["last_result"]
    assert last["previous"] == [{"outcome": "failed", "try": 1, "reason": reason,
                                 "finished": failed["finished"]}]
    m.power_cut()
    result = read_result(vm_disk)
    assert (result["outcome"], result["try"], result["previous"][0]["try"]) == ("installed", 2, 1)


@pytest.mark.reliability  # a power cut: make reliability
def test_power_cut_right_after_staging_still_boots_the_recovery(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, good_bundle: bytes
) -> None:
    """GRUB reads cfg without replaying its journal: an instruction that was only in the journal when the
    power went would be missed for a boot (found by the reliability run). reflashctl writes it out."""
    vm_disk.write_file("storage", f"/bundles/{BUNDLE}", good_bundle)
    m = machine(Firmware.bios)
    m.expect(ready(built_image, "1.0.0"), BOOT)
    code, out = m.shell(f"reflashctl install /storage/bundles/{BUNDLE} --no-reboot", TRANSFER)
    assert code == 0 and "staged" in out, out
    m.power_cut()  # at once: no sync, no unmount, well before the kernel's own writeback
    assert vm_disk.read_file("cfg", INSTRUCTION) is not None

    m = machine(Firmware.bios)
    first = m.expect(r"recovery: starting \(try (?P<try>\d)\)|system \S+ \S+ ready", BOOT)
    assert first.group("try") == "1", f"the boot after the cut did not see the instruction: {first.group(0)!r}"
    m.expect(r"recovery: installed 2\.0\.0", RECOVERY)
    m.expect(ready(built_image, "2.0.0"), BOOT)
    m.power_cut()
    assert read_result(vm_disk)["outcome"] == "installed"
