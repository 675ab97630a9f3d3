"""Trial boots and rollback without a VM: the records on cfg (read back by grub-editenv, the code GRUB's
save_env shares), the recovery's decision to roll back and its verdict, and the running system's
confirm, health checks, time limit and status. tests/vm/test_rollback.py boots all of it for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from mkimage.publish import publish
from recovery.core.envblock import format_envblock, parse_envblock
from recovery.core.errors import Failed, Rejected
from recovery.core.instruction import Action, Instruction, read_instruction, write_instruction
from recovery.core.result import Outcome, read_result
from recovery.core.trial import (
    FAILED,
    FALLBACK,
    INSTALLED,
    NOTES,
    TRIAL,
    BundleRef,
    Installed,
    Note,
    TrialCounter,
    TrialError,
    add_note,
    end_trial,
    failure_reason,
    read_failed,
    read_fallback,
    read_notes,
    remember_failed,
    start_trial,
    write_fallback,
)
from recovery.os.cmdline import Boot
from recovery.os.console import Console
from recovery.os.installer import FALLBACK_COUNTER, INSTRUCTION, Installer, ensure_counters
from recovery.os.rollback import NoRollback, NotOnTrial, plan_rollback, tree_problem
from recovery.updated import trial
from recovery.updated.cli import main

from .reflashctl_support import STORAGE_DISK, Releases, System
from .test_init_checks import CONFIG

needs_editenv = pytest.mark.skipif(shutil.which("grub-editenv") is None, reason="needs grub-editenv (make setup)")
SHA = "ab" * 32
OLD = BundleRef("1.0.0", "PARTLABEL=storage", "/bundles/demo-1.0.0.bundle", "cd" * 32)
NEW = BundleRef("2.0.0", "PARTLABEL=storage", "/bundles/demo-2.0.0.bundle", SHA)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    (tmp_path / "cfg/recovery").mkdir(parents=True)
    return tmp_path / "cfg"


def grub_counts(cfg: Path) -> None:
    """What GRUB does before a trial boot, done by grub-editenv (GRUB's lib/envblk.c): the next count."""
    counter = TrialCounter.read(cfg)
    subprocess.run(["grub-editenv", str(cfg / TRIAL), "set", f"trial_boot={(counter.boot or 0) + 1}"], check=True)


# --- the counter ---------------------------------------------------------------------------------


@needs_editenv
def test_a_trial_counts_up_in_a_block_grub_editenv_reads_and_ends_empty(cfg: Path) -> None:
    assert not TrialCounter.read(cfg).on_trial  # no file: no trial
    start_trial(cfg, 3)
    listed = subprocess.run(["grub-editenv", str(cfg / TRIAL), "list"], capture_output=True, text=True, check=True)
    assert listed.stdout == "trial_max=3\n"
    for boot in (1, 2, 3):
        grub_counts(cfg)
        counter = TrialCounter.read(cfg)
        assert (counter.on_trial, counter.boot, counter.exhausted) == (True, boot, boot == 3)
        assert counter.summary() == f"on trial, boot {boot} of 3"
    end_trial(cfg)
    assert (cfg / TRIAL).stat().st_size == 1024 and parse_envblock((cfg / TRIAL).read_bytes()) == {}
    assert TrialCounter.read(cfg) == TrialCounter()


@pytest.mark.parametrize("block", [b"garbage", b"# GRUB Environment Block\ntrial_max=3\n".ljust(1024, b"#")[:-1] + b"x"])
def test_a_trial_block_grub_cannot_read_is_an_error(cfg: Path, block: bytes) -> None:
    (cfg / TRIAL).write_bytes(block)
    with pytest.raises(TrialError, match="trial counter"):
        TrialCounter.read(cfg)


@pytest.mark.parametrize("env, what", [("trial_max=0", "trial_max is '0'"), ("trial_max=3\ntrial_boot=x", "trial_boot is 'x'"),
                                       ("trial_max=10", "trial_max is '10'")])
def test_counts_outside_one_to_nine_are_errors(cfg: Path, env: str, what: str) -> None:
    (cfg / TRIAL).write_bytes(f"# GRUB Environment Block\n{env}\n".encode().ljust(1024, b"#"))
    with pytest.raises(TrialError, match=what):
        TrialCounter.read(cfg)


def test_start_trial_refuses_counts_grub_cannot_make(cfg: Path) -> None:
    for boots in (0, 10):
        with pytest.raises(Rejected, match="trial boots must be 1 to 9"):
            start_trial(cfg, boots)


def test_records_round_trip_and_a_bad_one_is_refused(cfg: Path) -> None:
    Installed(NEW, from_version="1.0.0", restored=True).write(cfg)
    got = Installed.read(cfg)
    assert got is not None and (got.bundle, got.from_version, got.restored) == (NEW, "1.0.0", True)
    write_fallback(cfg, OLD)
    assert read_fallback(cfg) == OLD
    (cfg / FALLBACK).write_text(json.dumps({**OLD.to_dict(), "file": "../etc/shadow"}))
    with pytest.raises(TrialError, match="not an absolute path"):
        read_fallback(cfg)
    (cfg / INSTALLED).write_text("{")
    with pytest.raises(TrialError, match="not JSON"):
        Installed.read(cfg)


def test_notes_are_kept_per_version(cfg: Path) -> None:
    add_note(cfg, "2.0.0", 1, "started")
    add_note(cfg, "2.0.0", 1, "health check x failed (exit status 1)")
    assert [n.seen for n in read_notes(cfg, "2.0.0")] == ["started", "health check x failed (exit status 1)"]
    assert read_notes(cfg, "2.0.1") == ()
    add_note(cfg, "2.0.1", 2, "started")  # another release's trial: the old notes are stale
    assert [n.boot for n in read_notes(cfg, "2.0.1")] == [2] and read_notes(cfg, "2.0.0") == ()


# --- why, and whether, to roll back --------------------------------------------------------------


@pytest.mark.parametrize("notes, tree, words", [
    ((), None, "2.0.0 did not confirm within 3 boots: no boot got as far as starting its services"),
    ((Note(3, "started", ""),), None, "2.0.0 did not confirm within 3 boots: boot 3 started its services, then stopped"),
    ((Note(2, "started", ""), Note(2, "health check app failed (exit status 3)", "")), None,
     "2.0.0 did not confirm within 3 boots: boot 2: health check app failed (exit status 3)"),
    ((), "no kernel at /boot/vmlinuz", "2.0.0 did not confirm within 3 boots: no kernel at /boot/vmlinuz"),
])
def test_failure_reasons_name_what_was_seen(notes: tuple[Note, ...], tree: str | None, words: str) -> None:
    assert failure_reason("2.0.0", TrialCounter(3, 3), notes, tree).startswith(words)


def test_a_boot_grub_could_not_load_is_named_as_such() -> None:
    assert failure_reason("2.0.0", TrialCounter(3, 1), (), "no kernel at /boot/vmlinuz") == \
        "2.0.0 could not be booted on trial boot 1 of 3: no kernel at /boot/vmlinuz"


def _on_trial(cfg: Path, *, boot: int = 3, restored: bool = False) -> None:
    Installed(NEW, from_version="1.0.0", restored=restored).write(cfg)
    start_trial(cfg, 3)
    (cfg / TRIAL).write_bytes(f"# GRUB Environment Block\ntrial_max=3\ntrial_boot={boot}\n".encode().ljust(1024, b"#"))


def plan(cfg: Path, problem: str | None = None) -> object:
    return plan_rollback(cfg, installed_version=lambda: "2.0.0", problem=lambda: problem)


def test_the_rollback_reinstalls_the_fallback_as_an_allowed_downgrade(cfg: Path) -> None:
    _on_trial(cfg)
    write_fallback(cfg, OLD)
    add_note(cfg, "2.0.0", 3, "started")
    p = plan(cfg)
    assert (p.instruction.action, p.instruction.version, str(p.instruction.file), p.instruction.sha256) == (
        Action.rollback, "1.0.0", OLD.file, OLD.sha256)
    assert p.instruction.allow_downgrade and p.failed_version == "2.0.0"
    assert p.reason.startswith("2.0.0 did not confirm within 3 boots: boot 3 started its services")


def test_no_fallback_no_rollback(cfg: Path) -> None:
    _on_trial(cfg)
    with pytest.raises(NoRollback, match="2.0.0 did not confirm within 3 boots.*; no fallback bundle is recorded on cfg"):
        plan(cfg)


def test_a_restored_release_that_fails_is_not_rolled_back_again(cfg: Path) -> None:
    _on_trial(cfg, restored=True)
    write_fallback(cfg, NEW)
    with pytest.raises(NoRollback, match="was itself restored by a rollback and did not confirm either"):
        plan(cfg)


def test_outside_a_trial_the_confirmed_release_is_not_rolled_back(cfg: Path) -> None:
    """The rollback entry with the trial ended (chosen by hand, or GRUB reading a trial block torn by a
    cut in confirm's checkpoint before settle updated the fallback): 2.0.0 confirmed itself and stays."""
    Installed(NEW).write(cfg)
    end_trial(cfg)
    write_fallback(cfg, OLD)
    with pytest.raises(NotOnTrial, match=r"^2\.0\.0 is not on trial: it confirmed itself$"):
        plan(cfg)
    assert not (cfg / FAILED).exists()


def test_outside_a_trial_a_system_that_cannot_boot_is_reinstalled_from_the_fallback(cfg: Path) -> None:
    Installed(NEW).write(cfg)
    end_trial(cfg)
    write_fallback(cfg, NEW)
    p = plan(cfg, problem="no kernel at /boot/vmlinuz")
    assert p.instruction.version == "2.0.0"
    assert p.reason == "2.0.0 is not on trial, but its system cannot boot: no kernel at /boot/vmlinuz"


def test_an_unreadable_counter_still_rolls_back(cfg: Path) -> None:
    Installed(NEW).write(cfg)
    write_fallback(cfg, OLD)
    (cfg / TRIAL).write_bytes(b"garbage")
    assert "2.0.0 is rolled back: trial counter" in plan(cfg).reason


def test_tree_problems(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "boot").mkdir(parents=True)
    (root / "sbin").mkdir()
    (root / "lib/systemd").mkdir(parents=True)
    (root / "boot/vmlinuz-6.1").write_bytes(b"MZ")
    (root / "boot/vmlinuz").symlink_to("vmlinuz-6.1")
    (root / "boot/initrd.img").symlink_to("/boot/initrd.img-6.1")  # absolute: from the tree's root
    (root / "boot/initrd.img-6.1").write_bytes(b"x")
    (root / "lib/systemd/systemd").write_bytes(b"\x7fELF")
    (root / "sbin/init").symlink_to("/lib/systemd/systemd")
    assert tree_problem(root) is None
    (root / "boot/vmlinuz").unlink()
    (root / "boot/vmlinuz").symlink_to("/../../../../bin/sh")  # leads off the tree: not a kernel of this one
    assert tree_problem(root) == "no kernel at /boot/vmlinuz"
    (root / "sbin/init").unlink()
    assert tree_problem(root) == "no kernel at /boot/vmlinuz; no init at /sbin/init, /etc/init or /bin/init"


# --- the recovery's verdict ----------------------------------------------------------------------


def _installer(cfg: Path, action: Action, from_version: str = "2.0.0") -> Installer:
    instruction = Instruction.create(OLD.disk, OLD.file, OLD.sha256, OLD.version, action=action, allow_downgrade=True)
    write_instruction(cfg / INSTRUCTION, instruction)
    installer = Installer(CONFIG, Boot(), Console(), cfg)
    installer.instruction, installer.from_version, installer.to_version = instruction, from_version, OLD.version
    return installer


@pytest.mark.parametrize("action", [Action.install, Action.rollback])
def test_a_completed_install_starts_a_trial_before_the_instruction_goes(cfg: Path, action: Action) -> None:
    add_note(cfg, "1.0.0", 1, "started")  # from an earlier trial of the same version: stale now
    remember_failed(cfg, "2.0.0", "2.0.0 did not confirm within 3 boots: boot 3: health check app failed")
    installer = _installer(cfg, action)
    result = installer.record(installer.result(Outcome.installed))
    assert not (cfg / INSTRUCTION).exists() and not (cfg / NOTES).exists()
    assert parse_envblock((cfg / TRIAL).read_bytes()) == {"trial_max": str(CONFIG.trial_boots)}
    installed = Installed.read(cfg)
    assert installed is not None and installed.bundle == OLD and installed.restored is (action == Action.rollback)
    if action == Action.rollback:
        assert (result.outcome, result.reason) == (
            Outcome.rolled_back, "2.0.0 did not confirm within 3 boots: boot 3: health check app failed")
        assert result.summary().startswith("rolled back from 2.0.0 to 1.0.0")
    else:
        assert result.outcome == Outcome.installed
    assert read_result(cfg) == result


def test_the_recovery_makes_the_counters_it_finds_missing_once(cfg: Path) -> None:
    """An image builder's cfg may lack GRUB's blocks: made empty at the install's start (while the
    instruction is there and GRUB reads neither); blocks that are there are left as they are."""
    ensure_counters(cfg)
    assert parse_envblock((cfg / FALLBACK_COUNTER).read_bytes()) == {}
    assert parse_envblock((cfg / TRIAL).read_bytes()) == {} and not TrialCounter.read(cfg).on_trial
    (cfg / FALLBACK_COUNTER).write_bytes(format_envblock({"recovery_try": "2"}))
    ensure_counters(cfg)
    assert parse_envblock((cfg / FALLBACK_COUNTER).read_bytes()) == {"recovery_try": "2"}


@pytest.mark.parametrize("action", [Action.install, Action.rollback])
def test_finishing_an_install_renames_no_block_grub_reads(cfg: Path, action: Action) -> None:
    """Found by the crash-state replay (the rollback recording): the trial's start and the fallback
    counter's reset were renames, and a cut in the checkpoint that follows them, the disk reordering
    its writes, could show GRUB a directory entry whose inode was not yet written. Now both blocks keep
    their inodes, written over their own bytes as GRUB's save_env writes them."""
    ensure_counters(cfg)
    (cfg / FALLBACK_COUNTER).write_bytes(format_envblock({"recovery_try": "1"}))
    inodes = {name: (cfg / name).stat().st_ino for name in (TRIAL, FALLBACK_COUNTER)}
    installer = _installer(cfg, action)
    installer.record(installer.result(Outcome.installed))
    assert {name: (cfg / name).stat().st_ino for name in inodes} == inodes
    assert parse_envblock((cfg / TRIAL).read_bytes()) == {"trial_max": str(CONFIG.trial_boots)}
    assert parse_envblock((cfg / FALLBACK_COUNTER).read_bytes()) == {}


def test_a_rejected_rollback_says_it_could_not_roll_back(cfg: Path) -> None:
    installer = _installer(cfg, Action.rollback)
    result = installer.record(installer.result(Outcome.rejected, "payload sha256 mismatch"))
    assert result.reason == "cannot roll back to 1.0.0: payload sha256 mismatch"
    assert not (cfg / TRIAL).exists()  # no trial started: nothing was installed


def test_a_failed_try_starts_no_trial_and_keeps_the_instruction(cfg: Path) -> None:
    installer = _installer(cfg, Action.rollback)
    installer.record(installer.result(Outcome.failed, "mkfs.ext4 exited with status 1"))
    assert read_instruction(cfg / INSTRUCTION).action == Action.rollback
    assert not (cfg / TRIAL).exists()


# --- the running system --------------------------------------------------------------------------


class Reboots:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _installed_on_trial(system: System, releases: Releases, *, fallback: str = "1.0.0", running: str = "2.0.0") -> None:
    """The state the recovery leaves after installing 2.0.0: both bundles on storage, 2.0.0 on trial."""
    system.bundles.mkdir(parents=True, exist_ok=True)
    refs = {}
    for version in ("1.0.0", "2.0.0"):
        source = releases.bundles[version]
        shutil.copy2(source, system.bundles / source.name)
        refs[version] = BundleRef(version, STORAGE_DISK, f"/bundles/{source.name}",
                                  hashlib.sha256(source.read_bytes()).hexdigest())
    write_fallback(system.config.cfg, refs[fallback])
    Installed(refs["2.0.0"], from_version="1.0.0").write(system.config.cfg)
    start_trial(system.config.cfg, 3)
    (system.config.cfg / TRIAL).write_bytes(b"# GRUB Environment Block\ntrial_max=3\ntrial_boot=1\n".ljust(1024, b"#"))
    system.config.os_release.write_text(f'VERSION_ID="{running}"\n')


def _with_checks(system: System, tmp_path: Path, *checks: tuple[str, str], timeout: float = 10) -> System:
    health = tmp_path / "health.d"
    health.mkdir()
    for name, body in checks:
        (health / name).write_text(f"#!/bin/sh\n{body}\n")
        (health / name).chmod(0o755)
    (health / "README").write_text("not executable: not a check\n")
    return replace(system, config=replace(system.config, health_dir=health, health_timeout=timeout))


def test_confirm_ends_the_trial_and_makes_the_bundle_the_fallback(system: System, releases: Releases,
                                                                  tmp_path: Path) -> None:
    _installed_on_trial(system, releases)
    system = _with_checks(system, tmp_path, ("10-ok", "exit 0"))
    reboot = Reboots()
    said = trial.confirm(system.config, check=True, reboot=reboot)
    assert said == "trial: confirmed 2.0.0 (boot 1 of 3): its bundle is the fallback now"
    assert reboot.count == 0 and not TrialCounter.read(system.config.cfg).on_trial
    assert read_fallback(system.config.cfg).version == "2.0.0"
    assert system.leftovers() == ["demo-appliance-2.0.0.bundle"]  # the old fallback is gone
    assert trial.confirm(system.config, check=True, reboot=reboot) == "not on trial: 2.0.0 is confirmed"


def test_confirm_says_so_before_the_recovery_update_and_after_the_fallback(
        system: System, releases: Releases, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recovery update takes seconds: the confirmation is announced (the release is confirmed and its
    bundle the fallback) before it starts, so a cut during it leaves a confirmed release, as printed."""
    from recovery.updated import recoveryslots

    _installed_on_trial(system, releases)
    events: list[str] = []
    monkeypatch.setattr(recoveryslots, "update_recovery", lambda config: events.append(
        f"recovery update, fallback {read_fallback(config.cfg).version}"))
    said = trial.confirm(system.config, check=False, reboot=Reboots(), announce=events.append)
    assert events == [said, "recovery update, fallback 2.0.0"]


@pytest.mark.parametrize("body, words", [
    ("echo 'app: database unreachable' >&2; exit 3", "health check 50-app failed (exit status 3): app: database unreachable"),
    ("sleep 30", "health check 50-app did not finish within 0.5 s"),
    ("kill -TERM $$", "health check 50-app failed (signal 15)"),
])
def test_a_failed_health_check_is_noted_and_reboots(system: System, releases: Releases, tmp_path: Path,
                                                     body: str, words: str) -> None:
    _installed_on_trial(system, releases)
    system = _with_checks(system, tmp_path, ("10-ok", "exit 0"), ("50-app", body), timeout=0.5)
    reboot = Reboots()
    with pytest.raises(Failed, match="2.0.0 is not healthy"):
        trial.confirm(system.config, check=True, reboot=reboot)
    assert reboot.count == 1 and TrialCounter.read(system.config.cfg).on_trial
    assert [n.seen for n in read_notes(system.config.cfg, "2.0.0")] == [words]
    assert read_fallback(system.config.cfg).version == "1.0.0"
    assert "demo-appliance-1.0.0.bundle" in system.leftovers()


def test_confirm_refuses_a_trial_of_another_release(system: System, releases: Releases) -> None:
    _installed_on_trial(system, releases, running="1.0.0")
    with pytest.raises(Rejected, match="the trial is of 2.0.0, but 1.0.0 is running"):
        trial.confirm(system.config, check=False, reboot=Reboots())
    assert TrialCounter.read(system.config.cfg).on_trial


def test_a_confirmation_cut_after_the_trial_ended_is_completed_at_the_next_boot(system: System,
                                                                               releases: Releases) -> None:
    _installed_on_trial(system, releases)
    end_trial(system.config.cfg)  # the cut: the trial is over, the fallback record still the old one
    assert read_fallback(system.config.cfg).version == "1.0.0"
    assert trial.guard(system.config, reboot=Reboots()) == "not on trial"
    assert read_fallback(system.config.cfg).version == "2.0.0"
    assert system.leftovers() == ["demo-appliance-2.0.0.bundle"]


def test_the_old_fallback_stays_while_a_staged_update_names_it(system: System, releases: Releases) -> None:
    _installed_on_trial(system, releases)
    write_instruction(system.config.instruction, Instruction.create(
        STORAGE_DISK, "/bundles/demo-appliance-1.0.0.bundle", SHA, "1.0.0"))
    trial.confirm(system.config, check=False, reboot=Reboots())
    assert "demo-appliance-1.0.0.bundle" in system.leftovers()


def test_the_guard_reboots_a_boot_that_does_not_confirm_in_time(system: System, releases: Releases) -> None:
    _installed_on_trial(system, releases)
    clock = iter([10.0, 200.0, 301.0, 302.0])
    reboot = Reboots()
    config = replace(system.config, trial_time_limit=300)
    said = trial.guard(config, reboot=reboot, clock=lambda: next(clock), sleep=lambda s: None)
    assert said == "not confirmed within 300 s of boot" and reboot.count == 1
    assert [n.seen for n in read_notes(config.cfg, "2.0.0")] == ["started", "not confirmed within 300 s of boot"]


def test_the_guard_stands_down_once_confirmed(system: System, releases: Releases) -> None:
    _installed_on_trial(system, releases)
    reboot = Reboots()
    ticks = iter(range(0, 1000, 5))

    def sleep(_: float) -> None:
        if next(ticks) >= 20:
            trial.confirm(system.config, check=False, reboot=reboot)

    assert trial.guard(system.config, reboot=reboot, clock=lambda: 1.0, sleep=sleep) == "2.0.0 confirmed"
    assert reboot.count == 0


def test_status_tells_the_trial_and_the_fallback(system: System, releases: Releases, capsys) -> None:
    _installed_on_trial(system, releases)
    assert main(["--config", str(system.config_path), "status"], reboot=Reboots()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "trial: 2.0.0 on trial, boot 1 of 3; it confirms itself once healthy" in lines
    assert "fallback: 1.0.0 (/bundles/demo-appliance-1.0.0.bundle)" in lines
    assert main(["--config", str(system.config_path), "status", "--json"], reboot=Reboots()) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trial"] == {"version": "2.0.0", "boot": 1, "max_boots": 3, "summary": "on trial, boot 1 of 3"}


def test_install_latest_skips_a_release_that_was_rolled_back(system: System, releases: Releases, tmp_path: Path,
                                                             capsys) -> None:
    publish([releases.bundles["2.0.0"]], tmp_path / "feed", key=releases.pem)
    remember_failed(system.config.cfg, "2.0.0", "2.0.0 did not confirm within 3 boots: boot 3: health check app failed")
    assert read_failed(system.config.cfg)["2.0.0"].reason.endswith("health check app failed")
    reboot = Reboots()
    code = main(["--config", str(system.config_path), "install", "--latest", str(tmp_path / "feed")], reboot=reboot)
    out = capsys.readouterr().out
    assert code == 0 and "skipping 2.0.0: it was rolled back on " in out and "--force installs it anyway" in out
    assert not system.config.instruction.exists() and reboot.count == 0
    assert main(["--config", str(system.config_path), "check", str(tmp_path / "feed")], reboot=reboot) == 0
    assert "install --latest skips it" in capsys.readouterr().out
    code = main(["--config", str(system.config_path), "install", "--latest", "--force", "--no-reboot",
                 str(tmp_path / "feed")], reboot=reboot)
    assert code == 0 and read_instruction(system.config.instruction).version == "2.0.0"


def test_staging_keeps_the_fallback_and_the_installed_bundle(system: System, releases: Releases) -> None:
    _installed_on_trial(system, releases)
    (system.bundles / "stale-0.9.bundle").write_bytes(b"old")
    assert main(["--config", str(system.config_path), "install", "--no-reboot", "--allow-downgrade",
                 str(releases.bundles["1.10.0"])], reboot=Reboots()) == 0
    assert system.leftovers() == ["demo-appliance-1.0.0.bundle", "demo-appliance-1.10.0.bundle",
                                  "demo-appliance-2.0.0.bundle"]


def test_no_space_names_the_bundles_kept_for_a_rollback(system: System, releases: Releases) -> None:
    from recovery.updated.updater import Updater

    _installed_on_trial(system, releases)
    with pytest.raises(Rejected, match=r"not enough space .*; kept for a rollback: demo-appliance-1.0.0.bundle \(4 MiB\)"):
        Updater(system.config, reboot=Reboots(), free=lambda p: 0, progress=False).install(str(releases.bundles["1.10.0"]))
    assert os.path.exists(system.bundles / "demo-appliance-1.0.0.bundle")
