"""Straight into the recovery by kexec (recovery/updated/kexec.py): the slot GRUB would boot, its files
checked against recovery.json, the command line GRUB's entry writes, the try counted in the instruction
as GRUB's save_env would; anything else an ordinary reboot with the instruction untouched. `kexec` and
`systemctl` are stand-in scripts on PATH here (the real ones would replace this host's kernel); the
real path is booted in tests/vm/test_kexec.py."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from recovery.core.bootmenu import decide
from recovery.core.envblock import format_envblock, parse_envblock
from recovery.core.instruction import Instruction
from recovery.core.slots import RecoveryImage
from recovery.updated import kexec
from recovery.updated.kexec import NoKexec, load_recovery, reboot_into_recovery
from recovery.updated.recoveryslots import Partition
from recovery.updated.sysconfig import SystemConfig

STAGED = Instruction.create("PARTLABEL=storage", "/bundles/demo-2.0.0.bundle", "cd" * 32, "2.0.0",
                            "2025-01-01T00:00:00Z")
LINE = "recovery.try=1 recovery.slot={slot} panic=10 console=tty0 console=ttyS0,115200"


def _tool(bin_dir: Path, name: str, log: Path, fail_on: str = "") -> None:
    """A stand-in that appends its arguments to `log` and fails when they contain `fail_on`."""
    script = bin_dir / name
    test = f'case " $* " in *" {fail_on} "*) echo "{name}: refused" >&2; exit 1;; esac\n' if fail_on else ""
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n{test}exit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def make(kexec_fails_on: str = "", systemctl_fails_on: str = "") -> Path:
        _tool(bin_dir, "kexec", log, kexec_fails_on)
        _tool(bin_dir, "systemctl", log, systemctl_fails_on)
        return log

    return make


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The recovery partition's files: 1.0.0 in slot a, 2.0.0 in slot b."""
    tree = tmp_path / "partition"
    for slot, version in (("a", "1.0.0"), ("b", "2.0.0")):
        d = tree / slot
        d.mkdir(parents=True)
        (d / "vmlinuz").write_bytes(version.encode() * 1000)
        (d / "initrd.img").write_bytes(version.encode() * 5000)
        (d / "recovery.json").write_bytes(RecoveryImage.of(d, version).to_json())
    return tree


@pytest.fixture
def partition(tmp_path: Path, tree: Path) -> Partition:
    """The recovery partition, 'mounted' by copying its tree (no loop device needed)."""

    def mount(device: Path, target: Path, read_only: bool) -> None:
        assert read_only
        shutil.copytree(tree, target, dirs_exist_ok=True)

    def umount(target: Path) -> None:
        for child in target.iterdir():
            shutil.rmtree(child)

    return Partition(find=lambda spec: Path("/dev/fake-recovery"), mount=mount, umount=umount, base=tmp_path / "run")


@pytest.fixture
def config(tmp_path: Path) -> SystemConfig:
    cfg = tmp_path / "cfg"
    (cfg / "recovery").mkdir(parents=True)
    (cfg / "update-instruction").write_bytes(STAGED.to_block())
    (cfg / "recovery/grubenv").write_bytes(format_envblock({}))
    return SystemConfig(product="demo", keys=tmp_path / "keys", cfg=cfg, storage=tmp_path / "storage",
                        storage_disk="PARTLABEL=storage")


def test_the_first_try_is_loaded_from_the_active_slot_and_counted_as_grub_would(
        config: SystemConfig, partition: Partition, tools) -> None:
    log = tools()
    before = {n: (config.cfg / n).read_bytes() for n in ("update-instruction", "recovery/grubenv")}
    grub = decide({n: b for n, b in before.items()})  # what GRUB itself would do with this cfg
    assert load_recovery(config, partition=partition) == "a"
    [call] = calls(log)
    assert call.startswith("kexec -s -l ") and call.endswith(f"--command-line={LINE.format(slot='a')}")
    assert "/a/vmlinuz --initrd=" in call and call.split("--initrd=")[1].split()[0].endswith("/a/initrd.img")
    assert " ".join(grub.args) == LINE.format(slot="a")
    after = (config.cfg / "update-instruction").read_bytes()
    assert after == grub.save.block  # byte for byte what GRUB's save_env writes
    assert parse_envblock(after) == {**parse_envblock(before["update-instruction"]), "recovery_try": "1"}
    assert not list((partition.base).iterdir())  # unmounted, its directory gone


def test_the_active_slot_is_read_as_grub_reads_it(config: SystemConfig, partition: Partition, tools) -> None:
    log = tools()
    (config.cfg / "recovery/slot").write_bytes(format_envblock({"recovery_slot": "b"}))
    assert load_recovery(config, partition=partition) == "b"
    assert calls(log)[0].endswith(LINE.format(slot="b"))


def test_a_kernel_that_refuses_kexec_file_load_gets_kexec_load(
        config: SystemConfig, partition: Partition, tools) -> None:
    log = tools(kexec_fails_on="-s")
    assert load_recovery(config, partition=partition) == "a"
    assert [c.split()[1] for c in calls(log)] == ["-s", "-c"]


@pytest.mark.parametrize("case", ["no kexec", "kexec refuses", "counted", "no instruction", "on trial",
                                  "damaged slot", "no record", "no slots", "no partition"])
def test_anything_but_the_plain_case_goes_through_grub_and_counts_nothing(
        config: SystemConfig, partition: Partition, tree: Path, tools, case: str, tmp_path: Path) -> None:
    log = tools(kexec_fails_on="-l" if case == "kexec refuses" else "")
    instruction = config.cfg / "update-instruction"
    if case == "no kexec":
        os.unlink(tmp_path / "bin/kexec")
        os.environ["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}/nonexistent"
    elif case == "counted":
        instruction.write_bytes(format_envblock({**STAGED.to_env(), "recovery_try": "1"}))
    elif case == "no instruction":
        instruction.unlink()
    elif case == "on trial":
        instruction.unlink()
        (config.cfg / "recovery/trial").write_bytes(format_envblock({"trial_max": "3"}))
    elif case == "damaged slot":
        (tree / "a/initrd.img").write_bytes(b"truncated")
    elif case == "no record":
        (tree / "a/recovery.json").unlink()
    elif case == "no slots":
        shutil.rmtree(tree / "a")
        shutil.rmtree(tree / "b")
    elif case == "no partition":
        partition = Partition(find=lambda spec: None)
    before = instruction.read_bytes() if instruction.exists() else None
    with pytest.raises(NoKexec) as e:
        load_recovery(config, partition=partition)
    assert "\n" not in str(e.value)
    assert (instruction.read_bytes() if instruction.exists() else None) == before
    assert [c for c in calls(log) if " -l " in c and "refuses" not in case] == []
    expected = {"no kexec": "kexec-tools is not installed", "kexec refuses": "kexec cannot load recovery slot a",
                "counted": "not the first try of a staged update", "no instruction": "not the first try",
                "on trial": "not the first try", "damaged slot": "recovery slot a does not match its recovery.json",
                "no record": "recovery slot a has no readable recovery.json",
                "no slots": "has no slots", "no partition": "no recovery partition"}[case]
    assert expected in str(e.value)


def test_the_reboot_kexecs_when_loaded_and_reboots_through_grub_otherwise(
        config: SystemConfig, partition: Partition, tools, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tools()
    monkeypatch.setattr(kexec.load_recovery, "__kwdefaults__", {"partition": partition, "kexec": "kexec"})
    reboot_into_recovery(config)
    assert calls(log)[-1] == "systemctl kexec"
    log.unlink()
    reboot_into_recovery(config)  # the try is counted now: GRUB decides, through an ordinary reboot
    assert calls(log) == ["systemctl reboot"]


def test_a_failed_kexec_still_reboots(config: SystemConfig, partition: Partition, tools,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    log = tools(systemctl_fails_on="kexec")
    monkeypatch.setattr(kexec.load_recovery, "__kwdefaults__", {"partition": partition, "kexec": "kexec"})
    reboot_into_recovery(config)
    assert [c for c in calls(log) if c.startswith("systemctl")] == ["systemctl kexec", "systemctl reboot"]


def test_the_setting_is_a_boolean_on_by_default(tmp_path: Path) -> None:
    from recovery.core.errors import Rejected

    base = {"product": "demo"}
    assert SystemConfig.from_dict(base).kexec is True
    assert SystemConfig.from_dict({**base, "kexec": False}).kexec is False
    with pytest.raises(Rejected, match="kexec must be true or false"):
        SystemConfig.from_dict({**base, "kexec": "yes"})


# --- the recovery, into the release it installed (recovery/os/kexec.py) -----------------------------


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Path, Path]:
    """cfg as the recovery leaves it after an install (the trial started, the instruction gone) and the
    installed tree, its kernel and initrd behind Debian-style links."""
    from recovery.core.trial import start_trial

    cfg, root = tmp_path / "cfg", tmp_path / "system"
    (cfg / "recovery").mkdir(parents=True)
    (cfg / "recovery/grubenv").write_bytes(format_envblock({}))
    start_trial(cfg, 3)
    (root / "boot").mkdir(parents=True)
    (root / "boot/vmlinuz-6.1.0-57-amd64").write_bytes(b"kernel")
    (root / "boot/initrd.img-6.1.0-57-amd64").write_bytes(b"initrd")
    (root / "boot/vmlinuz").symlink_to("vmlinuz-6.1.0-57-amd64")
    (root / "boot/initrd.img").symlink_to("/boot/initrd.img-6.1.0-57-amd64")  # absolute: inside the tree
    return cfg, root


def _mounts(root: Path) -> tuple[list[str], object, object]:
    seen: list[str] = []
    return seen, lambda: (seen.append("mount"), root)[1], lambda: seen.append("umount")


class Loader:
    """kexec_file_load as the recovery calls it (recovery.core.kexec.load_file), recorded; `refuse` says
    why the kernel refuses, as it would for an image it cannot boot. The real call would load a kernel
    into this host: tests/vm/test_kexec.py makes it."""

    def __init__(self, refuse: str = "") -> None:
        self.calls: list[tuple[Path, Path, str]] = []
        self.refuse = refuse

    def __call__(self, kernel: Path, initrd: Path, cmdline: str, *, what: str) -> None:
        if self.refuse:
            raise NoKexec(f"the kernel does not load {what}: {self.refuse}")
        self.calls.append((kernel, initrd, cmdline))


def test_the_recovery_loads_the_installed_release_with_grubs_trial_command_line(installed) -> None:
    from recovery.os.kexec import load_system

    cfg, root = installed
    loader = Loader()
    grub = decide({n: (cfg / n).read_bytes() if (cfg / n).exists() else None
                   for n in ("update-instruction", "recovery/grubenv", "recovery/trial", "recovery/slot")})
    seen, mount, umount = _mounts(root)
    assert load_system(cfg, mount, umount, loader=loader) == 1
    assert seen == ["mount", "umount"]
    assert loader.calls == [(root / "boot/vmlinuz-6.1.0-57-amd64", root / "boot/initrd.img-6.1.0-57-amd64",
                             "root=PARTLABEL=system rw quiet panic=10 systemd.watchdog_sec=30 "
                             "console=tty0 console=ttyS0,115200")]
    assert (cfg / "recovery/trial").read_bytes() == grub.save.block
    assert parse_envblock((cfg / "recovery/trial").read_bytes()) == {"trial_max": "3", "trial_boot": "1"}


@pytest.mark.parametrize("case", ["instruction left", "trial counted", "no trial", "no kernel", "kexec refuses"])
def test_the_recovery_reboots_through_grub_otherwise(installed, case: str) -> None:
    from recovery.os.kexec import load_system

    cfg, root = installed
    loader = Loader(refuse="Exec format error" if case == "kexec refuses" else "")
    trial = cfg / "recovery/trial"
    if case == "instruction left":  # a failed try: GRUB boots the recovery again
        (cfg / "update-instruction").write_bytes(STAGED.to_block())
    elif case == "trial counted":
        trial.write_bytes(format_envblock({"trial_max": "3", "trial_boot": "1"}))
    elif case == "no trial":
        trial.write_bytes(format_envblock({}))
    elif case == "no kernel":
        (root / "boot/vmlinuz-6.1.0-57-amd64").unlink()
    before = trial.read_bytes()
    seen, mount, umount = _mounts(root)
    with pytest.raises(NoKexec) as e:
        load_system(cfg, mount, umount, loader=loader)
    assert trial.read_bytes() == before and seen.count("mount") == seen.count("umount")
    assert {"instruction left": "not the first trial boot", "trial counted": "not the first trial boot",
            "no trial": "not the first trial boot", "no kernel": "has no boot/vmlinuz",
            "kexec refuses": "the kernel does not load the installed release's /boot/vmlinuz: Exec format error",
            }[case] in str(e.value)
    assert loader.calls == []


def test_the_kernel_refuses_to_load_what_is_no_kernel(tmp_path: Path) -> None:
    """The real kexec_file_load(2), on files that are no kernel image: refused, with the kernel's reason
    (no permission, an unsupported image), and nothing loaded."""
    from recovery.core.kexec import load_file

    (tmp_path / "k").write_bytes(b"no kernel" * 100)
    (tmp_path / "i").write_bytes(b"no initrd")
    with pytest.raises(NoKexec, match=r"^the kernel does not load a test file: \S"):
        load_file(tmp_path / "k", tmp_path / "i", "quiet", what="a test file")
    loaded = Path("/sys/kernel/kexec_loaded")
    assert not loaded.exists() or loaded.read_text().strip() == "0"


def test_the_count_is_written_over_the_files_own_blocks_as_grubs_save_env(tmp_path: Path) -> None:
    """No new inode (a renamed file can show GRUB, which reads past the journal, a directory entry whose
    inode a power cut left unwritten); a file of another size is not a block GRUB counts in."""
    from recovery.core.kexec import count_as_grub

    cfg = tmp_path / "cfg"
    (cfg / "recovery").mkdir(parents=True)
    trial = cfg / "recovery/trial"
    trial.write_bytes(format_envblock({"trial_max": "3"}))
    inode = trial.stat().st_ino
    decision = decide({"recovery/trial": trial.read_bytes()})
    unloaded = []
    count_as_grub(cfg, decision, unload=lambda: unloaded.append(1))
    assert trial.stat().st_ino == inode and trial.read_bytes() == decision.save.block and not unloaded
    assert parse_envblock(trial.read_bytes()) == {"trial_max": "3", "trial_boot": "1"}
    trial.write_bytes(trial.read_bytes()[:1000])
    with pytest.raises(NoKexec, match=r"cannot count trial_boot in recovery/trial: .* is 1000 bytes, not the 1024"):
        count_as_grub(cfg, decision, unload=lambda: unloaded.append(1))
    assert unloaded == [1] and len(trial.read_bytes()) == 1000
