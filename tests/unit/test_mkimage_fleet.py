"""The image config's `[fleet]` (everything but the device's own id) and the id each appliance makes
for itself on cfg (FleetConfig.device_id)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mkimage.config import load_config
from mkimage.system import _system_toml
from recovery.core.errors import Rejected
from recovery.core.fleetconfig import FleetConfig
from recovery.updated.sysconfig import SystemConfig

MACHINE = "0123456789abcdef0123456789abcdef"


def _image(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "image.toml"
    path.write_text(f"[fleet]\n{table}\n")
    return path


def test_the_fleet_table_goes_into_the_systems_config_as_given(tmp_path: Path) -> None:
    config = load_config(_image(tmp_path, 'server = "https://fleet.example/api/"\ntenant = "plant-7"\n'
                                          'gateway_token = true\nretry_max = 600\nhardware = "rev-\\"b\\""'))
    text = _system_toml(config)
    fleet = SystemConfig.from_dict(tomllib.loads(text)).fleet
    assert fleet is not None
    assert (fleet.server, fleet.tenant, fleet.gateway_token, fleet.retry_max, fleet.hardware) == (
        "https://fleet.example/api", "plant-7", True, 600.0, 'rev-"b"')
    assert fleet.controller_id is None and str(fleet.controller_id_file) == "/cfg/reflashctl/fleet-controller-id"


def test_the_demo_has_no_fleet() -> None:
    text = _system_toml(load_config(None))
    assert "[fleet]" not in text and SystemConfig.from_dict(tomllib.loads(text)).fleet is None


@pytest.mark.parametrize("table, words", [
    ('server = "https://f"\ncontroller_id = "box-1"', "fleet.controller_id is one device's"),
    ('server = "ftp://f"', "fleet.server must be an http:// or https:// URL"),
    ('tenant = "x"', "fleet.server must be a non-empty string"),
    ('server = "https://f"\ntimeout = 0', "fleet.timeout must be a positive number"),
    ('server = "https://f"\ncolour = "red"', "unknown key fleet.colour"),
    ('server = "https://f"\ntoken_file = "fleet-token"', "fleet.token_file must be an absolute path"),
])
def test_a_bad_fleet_table_is_one_line(tmp_path: Path, table: str, words: str) -> None:
    with pytest.raises(Rejected, match=words) as e:
        load_config(_image(tmp_path, table))
    assert "\n" not in str(e.value)


def _fleet(tmp_path: Path, **more: object) -> FleetConfig:
    return FleetConfig.from_dict({"server": "https://f", "controller_id_file": str(tmp_path / "cfg/id"), **more}, "t")


def test_the_device_id_is_made_once_from_the_machine_id_and_kept_on_cfg(tmp_path: Path) -> None:
    machine = tmp_path / "machine-id"
    machine.write_text(MACHINE + "\n")
    fleet = _fleet(tmp_path)
    assert fleet.device_id("box", make=False, machine_id=machine) is None  # status makes nothing
    assert fleet.device_id("box", machine_id=machine) == f"box-{MACHINE}"
    assert (tmp_path / "cfg/id").read_text() == f"box-{MACHINE}\n"
    machine.write_text("f" * 32 + "\n")  # the next release boots with a new machine id
    assert fleet.device_id("box", machine_id=machine) == f"box-{MACHINE}"


def test_an_id_in_the_systems_config_wins(tmp_path: Path) -> None:
    assert _fleet(tmp_path, controller_id="box-1").device_id("box", machine_id=tmp_path / "none") == "box-1"
    assert not (tmp_path / "cfg/id").exists()


@pytest.mark.parametrize("content, machine, words", [
    ("two words\n", MACHINE, "is not one printable word"),
    (None, "not-a-machine-id", "holds no machine id"),
    (None, None, "the machine id cannot be read"),
])
def test_no_usable_device_id_is_one_line(tmp_path: Path, content: str | None, machine: str | None, words: str) -> None:
    fleet = _fleet(tmp_path)
    if content is not None:
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg/id").write_text(content)
    machine_id = tmp_path / "machine-id"
    if machine is not None:
        machine_id.write_text(machine)
    with pytest.raises(Rejected, match=words) as e:
        fleet.device_id("box", machine_id=machine_id)
    assert "\n" not in str(e.value)
