"""The fleet client under QEMU: the demo appliance polls a real gooseBit on the host (through the
restricted user-mode network: a guestfwd at 10.0.2.100:80, as the demo's feed), gets 2.0.0, installs it
through the recovery, and reports the verdict after the reboot; gooseBit's device record ends with
2.0.0 and a success. A corrupt artifact ends as a failure with the rejection's reason, nothing staged.

The image needs nothing of its own: reflash-fleet is `python3 -m recovery.updated.fleet` from the
system's recovery.updated; the test writes `[fleet]` into system.toml and the token and the device's
id to cfg in the guest (an image built with `[fleet]` in its config carries the section, and the unit
is enabled), and drives the client with `once` instead of the unit, so that each contact is a step the
test sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.goosebit_support import Goosebit, goosebit
from tests.vm.staging import ready
from vm.deadlines import BOOT, KERNEL, RECOVERY
from vm.demo import FEED_HOST
from vm.machine import Firmware, Machine
from vm.network import GuestForward, UserNetwork

TRANSFER = 900.0  # download and verification of a bundle in the guest, under TCG
TOKEN = "vm-fleet-token-0123456789abcdef"
FLEET = "python3 -m recovery.updated.fleet"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Goosebit]:
    with goosebit(tmp_path_factory.mktemp("goosebit"), poll_time="00:00:05") as g:
        yield g


def network(server: Goosebit) -> UserNetwork:
    port = int(server.url.rsplit(":", 1)[1])
    return UserNetwork((GuestForward(FEED_HOST, 80, port),))


def configure_guest(m: Machine, device: str, hardware: str) -> None:
    """[fleet] in system.toml (the system partition: again after each install; an image built with
    [fleet] in its config carries it) and, on cfg, the token and the device's id (no controller_id in
    system.toml, as an image's: the client reads the id from /cfg/reflashctl/fleet-controller-id)."""
    section = (f'\\n[fleet]\\nserver = "http://{FEED_HOST}"\\n'
               f'hardware = "{hardware}"\\nprogress_interval = 5\\n')
    code, out = m.shell(f"grep -q '^\\[fleet\\]' /etc/recovery/system.toml || printf '{section}' >> /etc/recovery/system.toml")
    assert code == 0, out
    code, out = m.shell(f"umask 077 && mkdir -p /cfg/reflashctl && printf '%s\\n' {TOKEN} > /cfg/reflashctl/fleet-token")
    assert code == 0, out
    code, out = m.shell(f"printf '%s\\n' {device} > /cfg/reflashctl/fleet-controller-id")
    assert code == 0, out


def test_the_appliance_installs_what_goosebit_deploys_and_reports_success(
    machine: Callable[..., Machine], built_image: Any, server: Goosebit,
) -> None:
    server.upload(built_image.bundles["2.0.0"])
    server.add_device("demo-vm", TOKEN)
    m = machine(Firmware.bios, network=network(server))
    m.expect(ready(built_image, "1.0.0"), BOOT)
    configure_guest(m, "demo-vm", "default")
    code, out = m.shell(f"{FLEET} once", 120)  # registration: configData
    assert code == 0, out
    assert server.device("demo-vm")["sw_version"] == "1.0.0"

    m.send(f"{FLEET} once\n")  # the deployment: download, verify, stage, reboot
    m.expect(r"recovery: starting \(try 1\)", TRANSFER + BOOT + KERNEL)
    assert server.device("demo-vm")["last_state"] == "Running"
    assert "staged 2.0.0: rebooting into the recovery to install it" in server.device_log("demo-vm")
    m.expect(r"recovery: installed 2\.0\.0", RECOVERY)
    m.expect(ready(built_image, "2.0.0"), BOOT)  # after reflash-confirm.service: the trial is over

    configure_guest(m, "demo-vm", "default")
    for _ in range(2):  # the verdict; then configData with 2.0.0
        code, out = m.shell(f"{FLEET} once", 120)
        assert code == 0, out
    device = server.device("demo-vm")
    assert (device["sw_version"], device["last_state"], device["progress"]) == ("2.0.0", "Finished", 100)
    finals = [line for line in server.device_log("demo-vm").splitlines() if line.startswith("installed 1.0.0 -> 2.0.0")]
    assert len(finals) == 1 and finals[0].endswith("; confirmed")
    code, out = m.shell(f"{FLEET} status")
    assert code == 0 and "closed 2.0.0, success: installed 1.0.0 -> 2.0.0" in out, out


@pytest.mark.reliability  # make reliability: make test must stay under 30 minutes
def test_a_corrupt_artifact_ends_as_a_failure_with_the_reason(
    machine: Callable[..., Machine], built_image: Any, server: Goosebit, tmp_path: Path,
) -> None:
    corrupt = tmp_path / "demo-appliance-2.0.0.bundle"
    data = bytearray(built_image.bundles["2.0.0"].read_bytes())
    data[len(data) // 2] ^= 0x01  # in the payload: the signed manifest stays intact
    corrupt.write_bytes(data)
    server.upload(corrupt, hw_revision="corrupt")
    server.add_device("demo-vm-corrupt", TOKEN)
    m = machine(Firmware.bios, network=network(server))
    m.expect(ready(built_image, "1.0.0"), BOOT)
    configure_guest(m, "demo-vm-corrupt", "corrupt")
    for _ in range(2):  # registration, then the deployment, refused before anything is staged
        code, out = m.shell(f"{FLEET} once", TRANSFER)
        assert code == 0, out
    assert m.shell("test -e /cfg/update-instruction")[0] == 1
    device = server.device("demo-vm-corrupt")
    assert (device["sw_version"], device["last_state"]) == ("1.0.0", "Error")
    assert server.device_log("demo-vm-corrupt").splitlines()[-1].startswith("rejected: payload sha256 mismatch")
