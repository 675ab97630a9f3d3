"""Power cuts during a trial and during the rollback, under QEMU (`make reliability`).

Each cut is a SIGKILL of QEMU at a point read from the console; the next boots get no help and must end
on a confirmed release: the good release confirmed after a cut in its trial boot or its confirmation,
1.0.0 restored and confirmed after a cut in a failing release's trial or anywhere in the rollback.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.vm.releases import BROKEN, broken_bundle
from tests.vm.staging import INSTRUCTION, read_result, ready, stage
from tests.vm.test_rollback import FALLBACK, TRIAL_BOOTS, _trial_block
from vm.deadlines import BOOT, RECOVERY
from vm.disk import DiskImage
from vm.machine import Machine

pytestmark = pytest.mark.reliability
SEED = int(os.environ.get("RELIABILITY_SEED", "0")) or random.SystemRandom().randrange(1, 1 << 31)


def _ends_confirmed(machine: Callable[..., Machine], built: Any, disk: DiskImage, version: str) -> None:
    """Boot with no help until `version` has confirmed itself and says it is ready."""
    m = machine()
    # A cut that came just after the confirmation leaves nothing to confirm: the next boot says so.
    v = re.escape(version)
    m.expect(rf"trial: confirmed {v} \(boot \d of 3\)|not on trial: {v} is confirmed", TRIAL_BOOTS + 8 * RECOVERY)
    m.expect(ready(built, version), BOOT)
    m.power_cut()
    assert _trial_block(disk) == {}
    assert json.loads(disk.read_file("cfg", FALLBACK) or b"{}")["version"] == version
    assert disk.read_file("cfg", INSTRUCTION) is None


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.5, 1.0])
def test_a_cut_in_the_good_release_s_trial_boot_or_confirmation(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, delay: float, scenario: Scenario,
) -> None:
    scenario.name = "Power cut: in a trial boot and in `reflashctl confirm`"
    scenario.checked = ("ends on 2.0.0 confirmed: trial block empty, fallback.json names 2.0.0, no instruction; "
                        "the cut lands a delay after the trial guard's line, while the confirmation runs")
    rng = random.Random(SEED + int(delay * 10))
    jitter = round(rng.uniform(0, 0.3), 2)
    scenario.note(f"cut {delay + jitter:.2f} s after `trial: 2.0.0 is on trial` (seed {SEED})")
    good = built_image.bundles["2.0.0"]
    stage(vm_disk, good.read_bytes(), name=good.name)
    m = machine()
    m.expect(r"trial: 2\.0\.0 is on trial \(boot 1 of 3\)", 4 * RECOVERY + BOOT)
    time.sleep(delay + jitter)
    m.power_cut()
    _ends_confirmed(machine, built_image, vm_disk, "2.0.0")
    assert read_result(vm_disk)["outcome"] == "installed"


ROLLBACK_POINTS = {
    "trial-boot": r"trial: 2\.0\.3 is on trial \(boot 2 of 3\)",
    "rolling-back": r"recovery: rolling back to 1\.0\.0: ",
    "verifying": r"recovery: rolling back to 1\.0\.0: [^\n]*\n(?:.*\n)*?recovery: verifying\r?\n",
    "erasing": r"recovery: rolling back to 1\.0\.0: [^\n]*\n(?:.*\n)*?recovery: erasing\r?\n",
    "extracting": r"recovery: rolling back to 1\.0\.0: [^\n]*\n(?:.*\n)*?recovery: extracting \d\d% ",
    "after-result": r"recovery: result written: rolled-back\r?\n",
}


@pytest.mark.parametrize("point", list(ROLLBACK_POINTS))
def test_a_cut_in_a_failing_trial_or_in_the_rollback(
    machine: Callable[..., Machine], built_image: Any, vm_disk: DiskImage, point: str, scenario: Scenario,
) -> None:
    scenario.name = "Power cut: in a failing release's trial and at each step of the rollback"
    scenario.checked = ("ends on 1.0.0 restored and confirmed: result.json rolled-back from 2.0.3 with the health "
                        "check's words, trial block empty, fallback 1.0.0, no instruction")
    scenario.note(f"cut at {point}")
    broken = BROKEN["unhealthy"]
    bundle = broken_bundle(built_image, "unhealthy")
    stage(vm_disk, bundle.read_bytes(), name=bundle.name, version=broken.version)
    m = machine()
    m.expect(ROLLBACK_POINTS[point], 4 * RECOVERY + TRIAL_BOOTS)
    m.power_cut()
    _ends_confirmed(machine, built_image, vm_disk, "1.0.0")
    result = read_result(vm_disk)
    assert (result["outcome"], result["from_version"], result["to_version"]) == ("rolled-back", "2.0.3", "1.0.0")
    assert "health check 50-app failed" in result["reason"], result
