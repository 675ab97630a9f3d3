"""A system tree from another builder installs through the recovery: plain mmdebstrap of a stock Debian 12
(a kernel, systemd, the reflash-appliance package; tests/vm/foreign.py), bundled by `reflash bundle` from
mmdebstrap's tar with Debian's /vmlinuz and /initrd.img links as they are, staged on the demo image. The
new system boots, confirms itself on its first trial boot and reports its version with `reflashctl`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from recovery.core.envblock import parse_envblock
from tests.vm.foreign import KERNEL, VERSION, foreign_bundle
from tests.vm.staging import INSTRUCTION, read_result, stage
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.machine import Machine


def _shell(m: Machine, cmd: str) -> str:
    code, out = m.shell(cmd)
    assert code == 0, out
    return out


@pytest.mark.timeout(2400)  # mmdebstrap's first run for this image, then an install and a stock boot
def test_a_tree_from_plain_mmdebstrap_installs_boots_and_confirms_itself(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage,
) -> None:
    bundle = foreign_bundle(built_image)
    stage(vm_disk, bundle.read_bytes(), name=bundle.name, version=VERSION)
    m = machine()
    m.expect(rf"recovery: installed {re.escape(VERSION)}\r?\n", 4 * RECOVERY)
    m.expect(rf"trial: {re.escape(VERSION)} is on trial \(boot 1 of 3\)", BOOT)
    m.expect(rf"trial: confirmed {re.escape(VERSION)} \(boot 1 of 3\): its bundle is the fallback now", BOOT)
    status = _shell(m, "reflashctl status")
    assert f"running: {built_image.config.product} {VERSION}" in status, status
    assert f"fallback: {VERSION} (/bundles/{bundle.name})" in status, status
    assert re.search(rf"^last update: installed 1\.0\.0 -> {re.escape(VERSION)}", status, re.MULTILINE), status
    assert "trial:" not in status, status
    # The stock tree's own kernel and the package, not anything of mkimage's system tree.
    assert _shell(m, "uname -r").strip().endswith("-cloud-amd64"), KERNEL
    assert _shell(m, "dpkg-query -W -f '${db:Status-Status} ${Version}' reflash-appliance").strip().startswith("installed ")
    assert _shell(m, "systemctl is-enabled reflash-confirm.service reflash-trial-guard.service").split() == ["enabled"] * 2
    assert _shell(m, "readlink /boot/vmlinuz").strip().startswith("vmlinuz-")  # added by reflash bundle
    m.power_cut()

    result = read_result(vm_disk)
    assert (result["outcome"], result["from_version"], result["to_version"]) == ("installed", "1.0.0", VERSION)
    assert vm_disk.read_file("cfg", INSTRUCTION) is None
    assert parse_envblock(vm_disk.read_file("cfg", "/recovery/trial") or b"") == {}
