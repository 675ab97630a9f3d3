"""`reflashctl install/check/status` end to end on a system laid out in a tmp dir: real signed bundles,
a real HTTP server, real instruction files; the reboot is a recorder, never the host's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mkimage.publish import publish
from recovery.core.errors import Rejected
from recovery.core.instruction import read_instruction
from recovery.core.result import Outcome, Result, write_result
from recovery.updated.updater import Updater
from recovery.updated.cli import main

from .reflashctl_support import (
    PRODUCT, STORAGE_DISK, Releases, ServerState, System, http_server, make_system, refused_url,
)


class Reboots:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def reflashctl(system: System, capsys: pytest.CaptureFixture[str], *argv: str,
              reboot: Reboots | None = None) -> tuple[int, str, str]:
    reboot = reboot or Reboots()
    code = main(["--config", str(system.config_path), *argv], reboot=reboot)
    out, err = capsys.readouterr()
    return code, out, err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_staged(system: System, source: Path, version: str = "2.0.0") -> None:
    name = source.name
    staged = system.bundles / name
    assert staged.read_bytes() == source.read_bytes()
    instruction = read_instruction(system.config.instruction)
    assert str(instruction.disk) == STORAGE_DISK
    assert str(instruction.file) == f"/bundles/{name}"
    assert instruction.sha256 == sha256(source)
    assert instruction.version == version
    assert instruction.created is not None
    assert system.leftovers() == [name]  # no partial file


def test_install_from_a_file_without_reboot(system: System, releases: Releases, capsys) -> None:
    reboot = Reboots()
    bundle = releases.bundles["2.0.0"]
    code, out, err = reflashctl(system, capsys, "install", str(bundle), "--no-reboot", reboot=reboot)
    assert code == 0, err
    assert_staged(system, bundle)
    assert reboot.count == 0
    assert "staged demo-appliance 2.0.0" in out and "not rebooting (--no-reboot)" in out


def test_install_from_http_reboots_once(system: System, releases: Releases, capsys) -> None:
    bundle = releases.bundles["2.0.0"]
    state = ServerState(files={"/rel/" + bundle.name: bundle.read_bytes()})
    reboot = Reboots()
    with http_server(state) as url:
        code, out, err = reflashctl(system, capsys, "install", f"{url}/rel/{bundle.name}", reboot=reboot)
    assert code == 0, err
    assert_staged(system, bundle)
    assert reboot.count == 1
    assert "rebooting into the recovery" in out


def test_install_from_a_file_url(system: System, releases: Releases, capsys) -> None:
    bundle = releases.bundles["2.0.0"]
    code, _, err = reflashctl(system, capsys, "install", f"file://{bundle}", "--no-reboot")
    assert code == 0, err
    assert_staged(system, bundle)


def test_a_bundle_already_on_storage_is_staged_in_place(system: System, releases: Releases, capsys) -> None:
    placed = system.config.storage / "manual" / "mine.bundle"
    placed.parent.mkdir()
    placed.write_bytes(releases.bundles["2.0.0"].read_bytes())
    code, _, err = reflashctl(system, capsys, "install", str(placed), "--no-reboot")
    assert code == 0, err
    instruction = read_instruction(system.config.instruction)
    assert str(instruction.file) == "/manual/mine.bundle" and instruction.sha256 == sha256(placed)
    assert system.leftovers() == []  # not copied


def test_resume_after_a_dropped_connection(system: System, releases: Releases, capsys) -> None:
    bundle = releases.bundles["2.0.0"]
    cut = 1_000_003
    state = ServerState(files={"/" + bundle.name: bundle.read_bytes()}, cut_after=cut)
    with http_server(state) as url:
        code, _, err = reflashctl(system, capsys, "install", f"{url}/{bundle.name}", "--no-reboot")
        assert code == 1
        assert err.count("\n") == 1 and err.startswith("failed: download of ") and "run the same command again" in err
        assert not system.config.instruction.exists()
        assert system.leftovers() == [bundle.name + ".partial"]
        assert (system.bundles / (bundle.name + ".partial")).stat().st_size == cut
        code, _, err = reflashctl(system, capsys, "install", f"{url}/{bundle.name}", "--no-reboot")
    assert code == 0, err
    assert [r.get("range") for r in state.requests] == [None, f"bytes={cut}-"]
    assert_staged(system, bundle)


def serve_and_install(system: System, capsys, files: dict[str, bytes], path: str) -> tuple[int, str, str]:
    with http_server(ServerState(files=files)) as url:
        return reflashctl(system, capsys, "install", url + path, "--no-reboot")


def corrupt(data: bytes) -> bytes:
    middle = len(data) // 2  # inside the payload: the signature still verifies, the hash does not
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("404", r"^rejected: cannot download http://127\.0\.0\.1:\d+/gone\.bundle: HTTP 404 Not Found$"),
        ("refused", r"^rejected: cannot download http://127\.0\.0\.1:\d+/x\.bundle: Connection refused$"),
        ("not a bundle", r"^rejected: not a bundle: not a tar file"),
        ("wrong product", r"^rejected: wrong product: the bundle is for other-product, this system is demo-appliance$"),
        ("corrupt", r"^rejected: payload sha256 mismatch"),
        ("untrusted", r"^rejected: signed by unknown key [0-9a-f]{16}"),
        ("missing file", r"^rejected: no such file: "),
        ("same version", r"^rejected: 1\.0\.0 is already running \(use --force to install it again\)$"),
    ],
)
def test_bad_sources_leave_nothing_behind(
    case: str, expected: str, system: System, releases: Releases, capsys, tmp_path: Path
) -> None:
    good = releases.bundles["2.0.0"].read_bytes()
    if case == "404":
        code, _, err = serve_and_install(system, capsys, {}, "/gone.bundle")
    elif case == "refused":
        code, _, err = reflashctl(system, capsys, "install", refused_url(), "--no-reboot")
    elif case == "not a bundle":
        code, _, err = serve_and_install(system, capsys, {"/x.bundle": b"<html>hello</html>\n" * 100}, "/x.bundle")
    elif case == "wrong product":
        code, _, err = serve_and_install(
            system, capsys, {"/x.bundle": releases.bundles["other-product"].read_bytes()}, "/x.bundle")
    elif case == "corrupt":
        code, _, err = serve_and_install(system, capsys, {"/x.bundle": corrupt(good)}, "/x.bundle")
    elif case == "untrusted":
        code, _, err = reflashctl(system, capsys, "install", str(releases.bundles["untrusted"]), "--no-reboot")
    elif case == "missing file":
        code, _, err = reflashctl(system, capsys, "install", str(tmp_path / "nope.bundle"), "--no-reboot")
    else:
        code, _, err = reflashctl(system, capsys, "install", str(releases.bundles["1.0.0"]), "--no-reboot")
    assert code == 1
    assert err.count("\n") == 1, err
    assert re.match(expected, err.strip()), err
    assert not system.config.instruction.exists()
    assert system.leftovers() == []


def test_force_installs_the_running_version(system: System, releases: Releases, capsys) -> None:
    code, _, err = reflashctl(system, capsys, "install", "--force", str(releases.bundles["1.0.0"]), "--no-reboot")
    assert code == 0, err
    assert_staged(system, releases.bundles["1.0.0"], "1.0.0")


def test_a_failed_install_keeps_an_earlier_staged_update(system: System, releases: Releases, capsys) -> None:
    assert reflashctl(system, capsys, "install", str(releases.bundles["2.0.0"]), "--no-reboot")[0] == 0
    before = system.config.instruction.read_bytes()
    code, _, _ = reflashctl(system, capsys, "install", str(releases.bundles["other-product"]), "--no-reboot")
    assert code == 1
    assert system.config.instruction.read_bytes() == before
    assert system.leftovers() == [releases.bundles["2.0.0"].name]


def test_staging_replaces_older_bundles_and_stale_partials(system: System, releases: Releases, capsys) -> None:
    system.bundles.mkdir(parents=True)
    (system.bundles / "demo-appliance-1.5.0.bundle").write_bytes(b"old")
    (system.bundles / "something.bundle.partial").write_bytes(b"half")
    (system.bundles / "notes.txt").write_bytes(b"not ours")
    assert reflashctl(system, capsys, "install", str(releases.bundles["2.0.0"]), "--no-reboot")[0] == 0
    assert system.leftovers() == ["demo-appliance-2.0.0.bundle", "notes.txt"]


@pytest.fixture
def small_storage(tmp_path: Path, releases: Releases) -> Iterator[System]:
    system = make_system(tmp_path / "small", releases)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", system.config.storage],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield system
    subprocess.run(["umount", system.config.storage], check=True)


def test_not_enough_space_on_storage(small_storage: System, releases: Releases, capsys) -> None:
    bundle = releases.bundles["2.0.0"]
    size_mib = -(-bundle.stat().st_size // (1024 * 1024))
    for source in ("http", "file"):
        if source == "http":
            code, _, err = serve_and_install(small_storage, capsys, {"/x.bundle": bundle.read_bytes()}, "/x.bundle")
        else:
            code, _, err = reflashctl(small_storage, capsys, "install", str(bundle), "--no-reboot")
        assert code == 1
        assert err == f"rejected: not enough space on {small_storage.config.storage}: need {size_mib} MiB, 1 MiB free\n"
        assert small_storage.leftovers() == []
        assert not small_storage.config.instruction.exists()


def test_free_space_is_asked_through_the_injected_function(system: System, releases: Releases) -> None:
    asked: list[Path] = []

    def free(path: Path) -> int:
        asked.append(path)
        return 1000

    with pytest.raises(Rejected, match=r"not enough space on .*/storage: need 4 MiB, 0 MiB free"):
        Updater(system.config, reboot=Reboots(), free=free, progress=False).install(str(releases.bundles["2.0.0"]))
    assert asked == [system.bundles]
    assert system.leftovers() == []


# --- feeds ---------------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, releases: Releases) -> dict[str, bytes]:
    """A published feed with 1.9.0 and 1.10.0 (where string order would pick the wrong one), as served."""
    out = tmp_path / "site"
    publish([releases.bundles["1.9.0"], releases.bundles["1.10.0"]], out, key=releases.pem,
            notes={"1.10.0": "Faster boot.\nFixes the clock."})
    return {f"/updates/{p.name}": p.read_bytes() for p in out.iterdir()}


def test_check_and_install_latest(system: System, releases: Releases, site: dict[str, bytes], capsys) -> None:
    state = ServerState(files=site)
    reboot = Reboots()
    with http_server(state) as url:
        code, out, err = reflashctl(system, capsys, "check", url + "/updates/releases.json")
        assert code == 0, err
        assert out.splitlines() == ["update available: 1.10.0 (running 1.0.0)", "  Faster boot.", "  Fixes the clock."]
        code, out, err = reflashctl(system, capsys, "install", "--latest", url + "/updates/", reboot=reboot)
        assert code == 0, err
    assert_staged(system, releases.bundles["1.10.0"], "1.10.0")
    assert reboot.count == 1
    assert state.requests[-1]["path"] == "/updates/demo-appliance-1.10.0.bundle"


def test_up_to_date(tmp_path: Path, releases: Releases, site: dict[str, bytes], capsys) -> None:
    system = make_system(tmp_path / "newer", releases, running="1.10.0")
    with http_server(ServerState(files=site)) as url:
        code, out, _ = reflashctl(system, capsys, "check", url + "/updates/releases.json")
        assert (code, out) == (0, "up to date: 1.10.0 is running, the newest release is 1.10.0\n")
        code, out, _ = reflashctl(system, capsys, "install", "--latest", url + "/updates/releases.json")
        assert code == 0 and out.startswith("up to date")
    assert not system.config.instruction.exists()


def test_a_bundle_that_differs_from_its_feed_entry_is_rejected(
    system: System, releases: Releases, site: dict[str, bytes], capsys
) -> None:
    site["/updates/demo-appliance-1.10.0.bundle"] = releases.bundles["1.9.0"].read_bytes()
    with http_server(ServerState(files=site)) as url:
        code, _, err = reflashctl(system, capsys, "install", "--latest", url + "/updates/releases.json")
    assert code == 1 and err.startswith("rejected: wrong version: the bundle carries 1.9.0, expected 1.10.0")
    assert system.leftovers() == [] and not system.config.instruction.exists()


def test_bad_feed_is_one_line(system: System, site: dict[str, bytes], capsys) -> None:
    site["/updates/releases.json"] = site["/updates/releases.json"].replace(b"1.10.0", b"1.11.0")
    with http_server(ServerState(files=site)) as url:
        code, _, err = reflashctl(system, capsys, "check", url + "/updates/releases.json")
    assert code == 1 and err.startswith("rejected: bad signature: releases.json") and err.count("\n") == 1


# --- status --------------------------------------------------------------------------------------


def status(system: System, capsys) -> tuple[list[str], dict]:
    code, out, err = reflashctl(system, capsys, "status")
    assert code == 0, err
    code, raw, err = reflashctl(system, capsys, "status", "--json")
    assert code == 0, err
    return out.splitlines(), json.loads(raw)


def test_status_with_nothing_staged(system: System, capsys) -> None:
    lines, data = status(system, capsys)
    assert lines == ["running: demo-appliance 1.0.0", "state: idle", "staged: nothing",
                     "fallback: none (a failed trial cannot be rolled back)", "last update: none recorded"]
    assert data == {"product": PRODUCT, "version": "1.0.0", "staged": None, "staged_error": None, "last_result": None,
                    "trial": None, "trial_error": None, "fallback": None, "rolled_back": {}, "state": "idle",
                    "download": None, "download_error": None, "reboot_at": None, "busy": False}


def test_status_with_an_update_staged(system: System, releases: Releases, capsys) -> None:
    assert reflashctl(system, capsys, "install", str(releases.bundles["2.0.0"]), "--no-reboot")[0] == 0
    lines, data = status(system, capsys)
    assert lines[1] == "state: staged 2.0.0"
    assert lines[2] == ("staged: 2.0.0 from /bundles/demo-appliance-2.0.0.bundle on PARTLABEL=storage; "
                        "installed at the next reboot")
    assert data["staged"]["version"] == "2.0.0"
    assert data["staged"]["file"] == "/bundles/demo-appliance-2.0.0.bundle"
    assert data["staged"]["sha256"] == sha256(releases.bundles["2.0.0"])


def test_status_with_an_unreadable_instruction(system: System, capsys) -> None:
    system.config.instruction.write_bytes(b"garbage")
    lines, data = status(system, capsys)
    assert lines[2].startswith("staged: unreadable instruction: ")
    assert data["staged"] is None and data["staged_error"]


@pytest.mark.parametrize(
    "result, words",
    [
        (Result(Outcome.installed, from_version="1.0.0", to_version="2.0.0", seconds={"verify": 1, "extract": 40},
                finished="2026-01-01T00:00:41+00:00"),
         "last update: installed 1.0.0 -> 2.0.0 in 41 s on 2026-01-01T00:00:41+00:00"),
        (Result(Outcome.rejected, reason="payload sha256 mismatch", to_version="2.0.1"),
         "last update: rejected 2.0.1: payload sha256 mismatch (try 1)"),
        (Result(Outcome.failed, reason="mkfs.ext4 exited with status 1", to_version="2.0.0", try_=2),
         "last update: failed 2.0.0: mkfs.ext4 exited with status 1 (try 2)"),
    ],
)
def test_status_tells_the_last_result(system: System, capsys, result: Result, words: str) -> None:
    write_result(system.config.cfg, result)
    lines, data = status(system, capsys)
    assert [line for line in lines if line.startswith("last update:")] == [words]
    last = data["last_result"]
    assert last["outcome"] == str(result.outcome) and last["summary"] == words.removeprefix("last update: ")
    assert last["reason"] == result.reason and last["to_version"] == result.to_version and last["try"] == result.try_


# --- configuration and command line --------------------------------------------------------------


def test_config_from_the_environment(system: System, capsys, monkeypatch) -> None:
    monkeypatch.setenv("UPDATECTL_CONFIG", str(system.config_path))
    assert main(["status"], reboot=Reboots()) == 0
    assert capsys.readouterr().out.startswith("running: demo-appliance 1.0.0")


@pytest.mark.parametrize(
    "text, reason",
    [
        (None, "is missing"),
        ("product = ", "is unreadable"),
        ('keys = "/k"', "product must be a non-empty string"),
        ('product = "p"\ncfg = "relative"', "cfg must be an absolute path"),
        ('product = "p"\nbundles = "../escape"', "bundles must be a relative path below storage"),
    ],
)
def test_bad_config_is_one_line(tmp_path: Path, capsys, text: str | None, reason: str) -> None:
    path = tmp_path / "system.toml"
    if text is not None:
        path.write_text(text)
    assert main(["--config", str(path), "status"], reboot=Reboots()) == 1
    err = capsys.readouterr().err
    assert err.startswith("rejected: ") and reason in err and err.count("\n") == 1


def test_patching_reboot_system_is_enough(system: System, releases: Releases, capsys, monkeypatch) -> None:
    import recovery.updated.cli

    reboot = Reboots()
    monkeypatch.setattr(recovery.updated.cli, "reboot_system", reboot)
    assert main(["--config", str(system.config_path), "install", str(releases.bundles["2.0.0"])]) == 0
    assert reboot.count == 1


def test_one_install_at_a_time(system: System, releases: Releases, capsys) -> None:
    import fcntl

    system.bundles.mkdir(parents=True)
    fd = os.open(system.bundles, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, _, err = reflashctl(system, capsys, "install", str(releases.bundles["2.0.0"]), "--no-reboot")
    finally:
        os.close(fd)
    assert (code, err) == (1, "rejected: another update operation is running (reflashctl or reflashd)\n")
    assert system.leftovers() == [] and not system.config.instruction.exists()


def test_storage_must_be_there(system: System, releases: Releases, capsys) -> None:
    system.config.storage.rmdir()
    code, _, err = reflashctl(system, capsys, "install", str(releases.bundles["2.0.0"]), "--no-reboot")
    assert (code, err) == (1, f"rejected: the storage partition is not mounted at {system.config.storage}\n")
    assert not system.config.storage.exists()


def test_a_downgrade_needs_allow_downgrade_and_is_said(tmp_path: Path, releases: Releases, capsys) -> None:
    # Refusing without the flag: tests/unit/test_security_feed.py.
    system = make_system(tmp_path / "newer", releases, running="2.0.0")
    code, out, err = reflashctl(system, capsys, "install", str(releases.bundles["1.0.0"]), "--no-reboot",
                               "--allow-downgrade")
    assert code == 0, err
    assert "this is a downgrade: 2.0.0 is running, the bundle carries 1.0.0" in out
    assert_staged(system, releases.bundles["1.0.0"], "1.0.0")
    assert read_instruction(system.config.instruction).allow_downgrade


def test_an_upgrade_writes_no_allow_downgrade(system: System, releases: Releases, capsys) -> None:
    assert reflashctl(system, capsys, "install", str(releases.bundles["2.0.0"]), "--no-reboot")[0] == 0
    assert b"recovery_allow_downgrade" not in system.config.instruction.read_bytes()


def test_usage_errors_exit_2(capsys) -> None:
    assert main([], reboot=Reboots()) == 2
    assert main(["download"], reboot=Reboots()) == 2
    assert main(["install", "--no-such-option"], reboot=Reboots()) == 2


def test_console_script_runs(system: System) -> None:
    env = {**os.environ, "UPDATECTL_CONFIG": str(system.config_path)}
    proc = subprocess.run([str(Path(__file__).parents[2] / ".venv/bin/reflashctl"), "status", "--json"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == "1.0.0"


def test_config_defaults_and_running_version(tmp_path: Path) -> None:
    from recovery.updated.sysconfig import SystemConfig

    config = SystemConfig.from_dict({"product": "p", "os_release": str(tmp_path / "os-release")})
    assert (config.keys, config.cfg, config.storage) == (Path("/etc/recovery/keys"), Path("/cfg"), Path("/storage"))
    assert config.storage_disk == "PARTLABEL=storage" and config.bundle_dir == Path("/storage/bundles")
    assert config.instruction == Path("/cfg/update-instruction")
    assert config.running_version() is None
    for text, version in (('VERSION_ID="2.0.0"\n', "2.0.0"), ("NAME=x\nVERSION_ID='1.2'\n", "1.2"),
                          ("VERSION_ID=3\n", "3"), ("NAME=x\n", None)):
        (tmp_path / "os-release").write_text(text)
        assert config.running_version() == version


def test_status_without_a_version(system: System, capsys) -> None:
    system.config.os_release.unlink()
    lines, data = status(system, capsys)
    assert lines[0] == "running: demo-appliance (unknown version)" and data["version"] is None
