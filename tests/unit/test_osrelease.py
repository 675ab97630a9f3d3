"""One os-release parser for both sides, on the forms os-release(5) allows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recovery.core.osrelease import OsRelease, read_os_release


@pytest.mark.parametrize(("line", "version"), [
    ("VERSION_ID=2.0", "2.0"),
    ('VERSION_ID="2.0"', "2.0"),
    ("VERSION_ID='2.0'", "2.0"),  # the form the two old parsers read differently
    ('VERSION_ID="2.0\\"beta\\""', '2.0"beta"'),
    ("VERSION_ID='2.0\\n'", "2.0\\n"),  # single quotes are literal
    ("  VERSION_ID=2.0  ", "2.0"),
    ("VERSION_ID=", None),
    ('VERSION_ID="2.0', None),  # unterminated: not a value
    ("# VERSION_ID=2.0", None),
    ("VERSION_IDX=2.0", None),
])
def test_version_id_forms(line: str, version: str | None) -> None:
    assert OsRelease.parse(f"ID=demo\n\n{line}\nNAME='Demo'\n").version_id == version


def test_last_assignment_wins_and_other_keys_are_kept() -> None:
    parsed = OsRelease.parse('NAME="Demo OS"\nVERSION_ID=1\nVERSION_ID=2\n')
    assert parsed.version_id == "2" and parsed.fields["NAME"] == "Demo OS"


def test_usr_lib_when_etc_has_none_and_no_absolute_symlink_below_another_root(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text("VERSION_ID='3.1'\n")
    assert read_os_release(tmp_path).version_id == "3.1"
    (tmp_path / "etc").mkdir()
    os.symlink("/etc/os-release", tmp_path / "etc/os-release")  # would name the reader's own file
    assert read_os_release(tmp_path).version_id == "3.1"
    (tmp_path / "etc/os-release").unlink()
    os.symlink("../usr/lib/os-release", tmp_path / "etc/os-release")  # Debian's relative link
    assert read_os_release(tmp_path).version_id == "3.1"
    assert read_os_release(tmp_path / "nothing").version_id is None


def test_the_running_system_and_the_recovery_agree(tmp_path: Path) -> None:
    """sysconfig (the running system) and the installer (the recovery) read the same file the same way."""
    from recovery.updated.sysconfig import SystemConfig

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text("VERSION_ID='2.0'\n")
    config = SystemConfig.from_dict({"product": "demo", "os_release": str(tmp_path / "etc/os-release")})
    assert config.running_version() == read_os_release(tmp_path).version_id == "2.0"
