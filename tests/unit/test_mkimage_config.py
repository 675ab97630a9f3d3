"""mkimage's image configuration: the embedded demo defaults, an operator's overrides, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from mkimage.cli import main as mkimage_main
from mkimage.config import MiB, Firmware, load_config, parse_size
from recovery.core.errors import Rejected


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "image.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_demo(monkeypatch, tmp_path):
    monkeypatch.delenv("MKIMAGE_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    c = load_config(None)
    assert c.product == "demo-appliance"
    assert c.version == "1.0.0"
    assert c.releases == ("1.0.0", "2.0.0")
    assert c.firmware is Firmware.hybrid and c.firmware.bios_boot and c.firmware.uefi_boot
    assert [name for name, _ in c.partitions.items()] == ["bios", "esp", "cfg", "recovery", "system", "storage"]
    assert c.partitions.bios == 1 * MiB and c.partitions.esp == 64 * MiB and c.partitions.system == 1024 * MiB
    assert c.key_dir is None
    assert c.output == tmp_path / "out"
    assert c.cache == Path.home() / ".cache/mkimage"
    assert c.disk_size == c.partitions.total + 2 * MiB
    assert any(p.startswith("linux-image-") for p in c.recovery_packages)


def test_output_argument_wins(tmp_path):
    assert load_config(None, output=tmp_path / "x").output == tmp_path / "x"


def test_cache_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MKIMAGE_CACHE", str(tmp_path / "c"))
    assert load_config(None).cache == tmp_path / "c"


def test_operator_file_overrides_some_keys(monkeypatch, tmp_path):
    monkeypatch.delenv("MKIMAGE_CACHE", raising=False)
    path = write(tmp_path, """
product = "kiosk"
version = "3.1"
releases = ["3.1"]
firmware = "uefi"
key_dir = "keys"
output = "build"
cache = "cache"
[partitions]
system = "2GiB"
recovery = "300MiB"
[packages]
system = ["linux-image-cloud-amd64", "systemd-sysv", "python3"]
""")
    c = load_config(path)
    assert (c.product, c.version, c.releases, c.firmware) == ("kiosk", "3.1", ("3.1",), Firmware.uefi)
    assert not c.firmware.bios_boot
    assert c.partitions.system == 2048 * MiB and c.partitions.recovery == 300 * MiB
    assert c.partitions.esp == 64 * MiB  # not given: the default stays
    assert c.system_packages == ("linux-image-cloud-amd64", "systemd-sysv", "python3")
    assert c.recovery_packages == load_config(None).recovery_packages
    # Paths in a file are relative to the file.
    assert c.key_dir == tmp_path / "keys" and c.output == tmp_path / "build" and c.cache == tmp_path / "cache"


def test_disk_size_gives_storage_the_rest(tmp_path):
    c = load_config(write(tmp_path, 'disk_size = "4GiB"\n'))
    assert c.disk_size == 4096 * MiB
    assert c.partitions.storage == 4096 * MiB - 2 * MiB - (1 + 64 + 64 + 256 + 1024) * MiB


@pytest.mark.parametrize(
    "text, reason",
    [
        ('colour = "red"\n', "unknown key 'colour'"),
        ("[partitions]\nswap = 10\n", "unknown key partitions.swap"),
        ('firmware = "coreboot"\n', "firmware 'coreboot': use one of bios, uefi, hybrid"),
        ("[partitions]\nsystem = 10\n", "partitions.system is 10 MiB, it needs at least 128 MiB"),
        ('[partitions]\nsystem = "lots"\n', "partitions.system 'lots'"),
        ('disk_size = "1GiB"\n', "disk_size too small"),
        ('disk_size = "4GiB"\n[partitions]\nstorage = 100\n', "either disk_size or partitions.storage"),
        ('product = "My Box"\n', "product 'My Box'"),
        ('version = "1 0"\n', "version: '1 0' is not a version"),
        ("releases = []\n", "releases must be a non-empty list"),
        ('[packages]\nrecovery = ["python3"]\n', "packages.recovery needs a kernel"),
        ("device_timeout = 0\n", "device_timeout 0"),
        ("product = \n", "not valid TOML"),
    ],
)
def test_invalid_config_is_one_line(tmp_path, text, reason):
    with pytest.raises(Rejected) as e:
        load_config(write(tmp_path, text))
    message = str(e.value)
    assert reason in message
    assert str(tmp_path / "image.toml") in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(Rejected, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    assert mkimage_main(["build", "-c", str(write(tmp_path, 'firmware = "x"\n')), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rejected: config ") and "firmware 'x'" in err[0]


def test_parse_size():
    assert parse_size(64, "x") == 64 * MiB
    assert parse_size("64MiB", "x") == parse_size("64M", "x") == 64 * MiB
    assert parse_size("2GiB", "x") == parse_size("2g", "x") == 2048 * MiB
    with pytest.raises(ValueError):
        parse_size("1.5G", "x")
    with pytest.raises(ValueError):
        parse_size(True, "x")
