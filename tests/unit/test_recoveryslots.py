"""The running system writes the release's recovery into the inactive slot, verifies it and switches
(recovery/updated/recoveryslots.py): on a real ext4 image behind a loop device, read back the way GRUB
reads it (debugfs on the image, the journal not replayed)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from recovery.core.envblock import format_envblock, parse_envblock
from recovery.core.errors import Failed, Rejected
from recovery.core.slots import RecoveryImage
from recovery.core.trial import start_trial
from recovery.updated import recoveryslots, trial
from recovery.updated.cli import main
from recovery.updated.recoveryslots import (
    LOCK,
    SINGLE,
    Partition,
    mount_device,
    read_active_slot,
    slots_status,
    status_line,
    update_recovery,
)
from recovery.updated.sysconfig import SystemConfig

SLOT = "recovery/slot"


def make_recovery(directory: Path, version: str) -> RecoveryImage:
    """A recovery OS as a release carries it: two files of random bytes and their record."""
    directory.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(version)
    (directory / "vmlinuz").write_bytes(rnd.randbytes(200_000 + rnd.randrange(1000)))
    (directory / "initrd.img").write_bytes(rnd.randbytes(700_000 + rnd.randrange(1000)))
    image = RecoveryImage.of(directory, version)
    (directory / "recovery.json").write_bytes(image.to_json())
    return image


def debugfs(image: Path, request: str) -> bytes:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, check=True).stdout


def names(image: Path, directory: str = "") -> set[str]:
    """The names in a directory as GRUB would see them: debugfs on the image, the journal not replayed."""
    out = debugfs(image, f"ls -p /{directory}").decode()
    return {line.split("/")[5] for line in out.splitlines() if line.count("/") >= 6} - {".", ".."}


def on_disk(image: Path, path: str) -> bytes:
    return debugfs(image, f"cat /{path}")


@dataclass
class Disk:
    """A recovery partition: an ext4 image behind a loop device, and how the code under test reaches it."""

    image: Path
    device: Path
    base: Path  # the code's private mount points go below it
    mounts: list[bool] = field(default_factory=list)  # read_only of every mount the code made

    @property
    def partition(self) -> Partition:
        def mount(device: Path, target: Path, read_only: bool) -> None:
            self.mounts.append(read_only)
            mount_device(device, target, read_only)

        return Partition(find=lambda spec: self.device, mount=mount, base=self.base)

    def slot(self, slot: str) -> dict[str, bytes]:
        return {name: on_disk(self.image, f"{slot}/{name}") for name in sorted(names(self.image, slot))}


@pytest.fixture
def make_disk(tmp_path: Path) -> Iterator[Callable[[Path], Disk]]:
    devices: list[str] = []

    def make(tree: Path) -> Disk:
        if os.geteuid() != 0:
            pytest.skip("needs root: loop-mounts an ext4 image")
        image = tmp_path / f"recovery-{len(devices)}.img"
        subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "recovery", "-d", str(tree), str(image)], check=True)
        attached = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True)
        if attached.returncode:
            pytest.skip(f"cannot attach a loop device here: {attached.stderr.strip()}")
        devices.append(attached.stdout.strip())
        return Disk(image, Path(devices[-1]), tmp_path / "run")

    yield make
    for device in devices:
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """The partition's tree as an image with slots has it: 1.0.0 in slot a, slot b empty."""
    tree = tmp_path / "tree"
    make_recovery(tree / "a", "1.0.0")
    (tree / "b").mkdir()
    return tree


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """The release's recovery, 2.0.0, where its tree has it."""
    make_recovery(tmp_path / "release/usr/lib/reflash/recovery", "2.0.0")
    return tmp_path / "release/usr/lib/reflash/recovery"


def config_for(tmp_path: Path, source: Path, disk: str = "PARTLABEL=recovery") -> SystemConfig:
    (tmp_path / "cfg").mkdir(exist_ok=True)
    return SystemConfig(product="demo-appliance", keys=tmp_path / "keys", cfg=tmp_path / "cfg",
                        storage=tmp_path / "storage", storage_disk="PARTLABEL=storage",
                        recovery_source=source, recovery_disk=disk)


def active_block(config: SystemConfig) -> dict[str, str] | None:
    path = config.cfg / SLOT
    return parse_envblock(path.read_bytes()) if path.exists() else None


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_the_first_update_writes_slot_b_verifies_it_and_switches(
        tmp_path: Path, make_disk, layout: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    slot_a = disk.slot("a")
    said = update_recovery(config, partition=disk.partition)
    assert said == "recovery-slots: recovery 2.0.0 in slot b is active; slot a keeps 1.0.0"
    assert lines(capsys) == ["recovery-slots: writing recovery 2.0.0 into slot b",
                             "recovery-slots: slot b verified (recovery 2.0.0)", said]
    assert active_block(config) == {"recovery_slot": "b"}
    assert disk.slot("b") == files_of(source)  # no temp names left, the record last of all
    assert disk.slot("a") == slot_a
    assert [p.name for p in disk.base.iterdir()] == [LOCK]  # unmounted, the private mount point removed
    assert subprocess.run(["findmnt", "--source", str(disk.device)], capture_output=True).returncode != 0
    assert disk.mounts == [True, False]  # looked read-only, wrote read-write


def test_grub_sees_the_written_slot_before_the_switch(tmp_path: Path, make_disk, layout: Path, source: Path) -> None:
    """Still mounted, at the verify: the files are past the journal, where GRUB reads them, and the
    journal is empty (checkpointed): nothing in it that a reader which does not replay it would miss."""
    disk = make_disk(layout)
    seen: dict[str, bytes] = {}

    def look(slot: Path) -> None:
        seen.update(disk.slot("b"))
        header = subprocess.run(["dumpe2fs", "-h", str(disk.image)], capture_output=True, text=True).stdout
        seen["journal start"] = next(line.split(":")[1].strip() for line in header.splitlines()
                                     if line.startswith("Journal start:")).encode()

    update_recovery(config_for(tmp_path, source), partition=disk.partition, before_verify=look)
    assert seen == {**files_of(source), "journal start": b"0"}


def test_nothing_to_do_when_the_active_slot_holds_the_releases_recovery(
        tmp_path: Path, make_disk, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(source, tree / "a")
    (tree / "b").mkdir()
    disk = make_disk(tree)
    config = config_for(tmp_path, source)
    assert update_recovery(config, partition=disk.partition) is None
    assert capsys.readouterr().out == ""
    assert active_block(config) is None and names(disk.image, "b") == set()
    assert disk.mounts == [True]  # a look, read-only: this runs at every boot


def test_nothing_to_do_in_slot_b_once_it_is_active(
        tmp_path: Path, make_disk, layout: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    update_recovery(config, partition=disk.partition)
    capsys.readouterr()
    assert update_recovery(config, partition=disk.partition) is None
    assert capsys.readouterr().out == "" and active_block(config) == {"recovery_slot": "b"}


def test_the_next_release_goes_into_slot_a(
        tmp_path: Path, make_disk, layout: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    update_recovery(config, partition=disk.partition)
    newer = tmp_path / "release-3/usr/lib/reflash/recovery"
    make_recovery(newer, "3.0.0")
    said = update_recovery(replace(config, recovery_source=newer), partition=disk.partition)
    assert said == "recovery-slots: recovery 3.0.0 in slot a is active; slot b keeps 2.0.0"
    assert active_block(config) == {"recovery_slot": "a"}
    assert disk.slot("a") == files_of(newer) and disk.slot("b") == files_of(source)


def test_a_damaged_active_slot_is_the_one_written_when_the_other_is_the_only_whole_recovery(
        tmp_path: Path, make_disk, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Slot a (active) truncated, slot b whole: GRUB's third try ran b. Writing b would leave, until the
    switch, no whole recovery at all; the damaged a is written instead and b is kept."""
    tree = tmp_path / "tree"
    make_recovery(tree / "a", "1.0.0")
    make_recovery(tree / "b", "1.0.0")
    with open(tree / "a/initrd.img", "r+b") as f:
        f.truncate(3)
    disk = make_disk(tree)
    config = config_for(tmp_path, source)
    slot_b = disk.slot("b")
    said = update_recovery(config, partition=disk.partition)
    assert said == "recovery-slots: recovery 2.0.0 in slot a is active; slot b keeps 1.0.0"
    assert lines(capsys) == [
        "recovery-slots: slot a is damaged: its recovery is replaced, slot b (recovery 1.0.0) is kept",
        "recovery-slots: writing recovery 2.0.0 into slot a", "recovery-slots: slot a verified (recovery 2.0.0)", said]
    assert disk.slot("a") == files_of(source) and disk.slot("b") == slot_b
    assert active_block(config) == {"recovery_slot": "a"}


def test_the_boot_menu_goes_with_the_recovery_and_grub_can_check_it(
        tmp_path: Path, make_disk, layout: Path) -> None:
    """menu.cfg is copied with the kernel and the initrd, and menu.sha256 is made from the record, in the
    format GRUB's `sha256sum --check` reads (coreutils' own, checked here with coreutils)."""
    from recovery.core.slots import write_record

    source = tmp_path / "release/usr/lib/reflash/recovery"
    make_recovery(source, "2.0.0")
    (source / "menu.cfg").write_text('echo "menu of 2.0.0"\nset reflash_menu_loaded=1\n')
    image = write_record(source, "2.0.0")
    assert image.menu is not None and (source / "menu.sha256").exists()
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    update_recovery(config, partition=disk.partition)
    slot = disk.slot("b")
    assert slot["menu.cfg"] == (source / "menu.cfg").read_bytes()
    assert slot["menu.sha256"] == image.menu_sums() == (source / "menu.sha256").read_bytes()
    copy = tmp_path / "slot-b"
    copy.mkdir()
    for name, data in slot.items():
        (copy / name).write_bytes(data)
    assert subprocess.run(["sha256sum", "--check", "--status", "menu.sha256"], cwd=copy).returncode == 0
    (copy / "menu.cfg").write_bytes(b'echo "menu of 2.0.0"\n')  # truncated
    assert subprocess.run(["sha256sum", "--check", "--status", "menu.sha256"], cwd=copy).returncode != 0


def test_a_release_without_a_recovery_touches_nothing(tmp_path: Path) -> None:
    def find(spec: str) -> Path:
        raise AssertionError("looked for the recovery partition")

    config = config_for(tmp_path, tmp_path / "no/such/dir")
    assert update_recovery(config, partition=Partition(find=find)) is None


def test_a_cut_after_the_write_only_switches(
        tmp_path: Path, make_disk, layout: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(source, layout / "b", dirs_exist_ok=True)  # written and verified, then the power went
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    said = update_recovery(config, partition=disk.partition)
    assert lines(capsys) == ["recovery-slots: slot b verified (recovery 2.0.0)", said]
    assert said == "recovery-slots: recovery 2.0.0 in slot b is active; slot a keeps 1.0.0"
    assert active_block(config) == {"recovery_slot": "b"}


@pytest.mark.parametrize("cut", ["no record", "record, damaged file"])
def test_a_cut_during_the_write_writes_the_slot_again(
        tmp_path: Path, make_disk, layout: Path, source: Path, capsys: pytest.CaptureFixture[str], cut: str) -> None:
    shutil.copy(source / "vmlinuz", layout / "b/vmlinuz")
    (layout / "b/.initrd.img.new").write_bytes((source / "initrd.img").read_bytes()[:5000])
    if cut == "record, damaged file":
        (layout / "b/initrd.img").write_bytes((source / "initrd.img").read_bytes()[:-1] + b"!")
        shutil.copy(source / "recovery.json", layout / "b/recovery.json")
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    said = update_recovery(config, partition=disk.partition)
    assert "recovery-slots: writing recovery 2.0.0 into slot b" in lines(capsys)
    assert said == "recovery-slots: recovery 2.0.0 in slot b is active; slot a keeps 1.0.0"
    assert disk.slot("b") == files_of(source)


def test_a_damaged_release_recovery_is_refused(
        tmp_path: Path, make_disk, layout: Path, source: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_recovery(layout / "b", "0.9.0")
    disk = make_disk(layout)
    before = disk.slot("b")
    (source / "initrd.img").write_bytes(b"not the initrd")
    config = config_for(tmp_path, source)
    said = update_recovery(config, partition=disk.partition)
    want = RecoveryImage.read(source).initrd
    assert said == (f"recovery-slots: the release's recovery in {source} is damaged: initrd.img is 14 bytes with "
                    f"sha256 {RecoveryImage.of(source, 'x').initrd.sha256}, recovery.json says {want.size} bytes "
                    f"with sha256 {want.sha256}")
    assert caplog.messages == [said]
    assert disk.slot("b") == before and active_block(config) is None
    assert disk.mounts == [True]  # never mounted for writing


def test_a_malformed_release_record_is_refused(tmp_path: Path, source: Path) -> None:
    (source / "recovery.json").write_text(json.dumps({"version": "2.0.0"}))

    def find(spec: str) -> Path:
        raise AssertionError("looked for the recovery partition")

    said = update_recovery(config_for(tmp_path, source), partition=Partition(find=find))
    assert said == (f"recovery-slots: the release's recovery is not used: malformed {source}/recovery.json: "
                    "needs exactly version, kernel and initrd (and menu)")


def test_what_does_not_read_back_as_written_is_not_switched_to(
        tmp_path: Path, make_disk, layout: Path, source: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = make_disk(layout)
    config = config_for(tmp_path, source)

    def corrupt(slot: Path) -> None:
        with open(slot / "initrd.img", "r+b") as f:
            f.seek(1000)
            f.write(b"\xff" * 16)

    said = update_recovery(config, partition=disk.partition, before_verify=corrupt)
    want = RecoveryImage.read(source).initrd
    data = bytearray((source / "initrd.img").read_bytes())
    data[1000:1016] = b"\xff" * 16
    got = hashlib.sha256(data).hexdigest()
    assert said == (f"recovery-slots: slot b does not read back as written: initrd.img is {want.size} bytes with "
                    f"sha256 {got}, recovery.json says {want.size} bytes with sha256 {want.sha256}; "
                    "slot a stays active")
    assert said in caplog.messages
    assert active_block(config) is None
    assert "recovery.json" not in names(disk.image, "b")  # incomplete: the next boot writes it again


def test_an_image_made_before_slots_is_never_written(
        tmp_path: Path, make_disk, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "tree"
    make_recovery(tree, "1.0.0")
    (tree / "recovery.json").unlink()
    disk = make_disk(tree)
    config = config_for(tmp_path, source)
    said = update_recovery(config, partition=disk.partition)
    assert said == "recovery-slots: " + SINGLE
    assert lines(capsys) == [said]
    assert names(disk.image) == {"vmlinuz", "initrd.img", "lost+found"}
    assert active_block(config) is None and disk.mounts == [True]


@pytest.mark.parametrize("block", [b"garbage", format_envblock({"recovery_slot": "c"}), format_envblock({}),
                                   format_envblock({"recovery_slot": "a"})])
def test_a_slot_record_grub_would_not_read_as_b_means_a(
        tmp_path: Path, make_disk, layout: Path, source: Path, block: bytes) -> None:
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    (config.cfg / "recovery").mkdir()
    (config.cfg / SLOT).write_bytes(block)
    assert read_active_slot(config.cfg) == "a"
    said = update_recovery(config, partition=disk.partition)
    assert said == "recovery-slots: recovery 2.0.0 in slot b is active; slot a keeps 1.0.0"
    assert active_block(config) == {"recovery_slot": "b"}


def test_read_active_slot(tmp_path: Path) -> None:
    assert read_active_slot(tmp_path) == "a"
    (tmp_path / "recovery").mkdir()
    (tmp_path / SLOT).write_bytes(format_envblock({"recovery_slot": "b"}))
    assert read_active_slot(tmp_path) == "b"


def test_a_partition_mounted_elsewhere_is_updated_all_the_same(
        tmp_path: Path, make_disk, layout: Path, source: Path) -> None:
    disk = make_disk(layout)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", str(disk.device), str(elsewhere)], check=True)
    try:
        said = update_recovery(config_for(tmp_path, source), partition=disk.partition)
        assert said == "recovery-slots: recovery 2.0.0 in slot b is active; slot a keeps 1.0.0"
        assert files_of(elsewhere / "b") == files_of(source)
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)


def test_failures_are_one_line_and_never_raise(tmp_path: Path, source: Path) -> None:
    config = config_for(tmp_path, source)
    assert update_recovery(config, partition=Partition(find=lambda spec: None, base=tmp_path / "run")) == (
        "recovery-slots: no recovery partition PARTLABEL=recovery: the recovery is not updated")

    def refuse(device: Path, target: Path, read_only: bool) -> None:
        raise Failed("mount exited with status 32: mount: wrong fs type")

    said = update_recovery(config, partition=Partition(find=lambda spec: Path("/dev/sdz4"), mount=refuse,
                                                       base=tmp_path / "run"))
    assert said == ("recovery-slots: cannot mount the recovery partition /dev/sdz4: mount exited with status 32: "
                    "mount: wrong fs type")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK]

    def broken(spec: str) -> Path:
        raise OSError(5, "Input/output error")

    assert update_recovery(config, partition=Partition(find=broken, base=tmp_path / "run")) == (
        "recovery-slots: the recovery was not updated: [Errno 5] Input/output error")


# --- status --------------------------------------------------------------------------------------


def test_slots_status(tmp_path: Path, make_disk, layout: Path, source: Path) -> None:
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    assert slots_status(config, partition=disk.partition) == {
        "active": "a", "slots": {"a": {"version": "1.0.0"}, "b": None}}
    update_recovery(config, partition=disk.partition)
    status = slots_status(config, partition=disk.partition)
    assert status == {"active": "b", "slots": {"a": {"version": "1.0.0"}, "b": {"version": "2.0.0"}}}
    assert status_line(status) == "recovery: 2.0.0 in slot b (active); slot a: 1.0.0"
    assert disk.mounts[-1] is True
    assert slots_status(config, partition=Partition(find=lambda spec: None)) is None


def test_slots_status_of_an_image_made_before_slots(tmp_path: Path, make_disk, source: Path) -> None:
    tree = tmp_path / "tree"
    make_recovery(tree, "1.0.0")
    status = slots_status(config_for(tmp_path, source), partition=make_disk(tree).partition)
    assert status == {"layout": "single"}
    assert status_line(status) == ("recovery: a single recovery (made before slots: it cannot be updated in "
                                   "the field)")
    assert status_line({"active": "a", "slots": {"a": {"version": "1.0.0"}, "b": None}}) == (
        "recovery: 1.0.0 in slot a (active); slot b: nothing")


def write_system_toml(tmp_path: Path, disk: str, source: Path) -> Path:
    for d in ("cfg", "storage", "keys"):
        (tmp_path / d).mkdir(exist_ok=True)
    (tmp_path / "os-release").write_text('VERSION_ID="2.0.0"\n')
    path = tmp_path / "system.toml"
    path.write_text(f'product = "demo-appliance"\nkeys = "{tmp_path / "keys"}"\ncfg = "{tmp_path / "cfg"}"\n'
                    f'storage = "{tmp_path / "storage"}"\nos_release = "{tmp_path / "os-release"}"\n'
                    f'recovery_disk = "{disk}"\nrecovery_source = "{source}"\n')
    return path


def test_reflashctl_status_shows_the_slots(
        tmp_path: Path, make_disk, layout: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = make_disk(layout)
    path = write_system_toml(tmp_path, str(disk.device), source)
    update_recovery(SystemConfig.load(path), partition=disk.partition)
    capsys.readouterr()
    assert main(["--config", str(path), "status"]) == 0
    out = lines(capsys)
    assert "recovery: 2.0.0 in slot b (active); slot a: 1.0.0" in out
    assert out[-1].startswith("last update:")
    assert main(["--config", str(path), "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recovery"] == {
        "active": "b", "slots": {"a": {"version": "1.0.0"}, "b": {"version": "2.0.0"}}}


def test_reflashctl_status_survives_an_unreadable_recovery(
        tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_system_toml(tmp_path, "/dev/null", source)  # there, but no file system
    assert main(["--config", str(path), "status"]) == 0
    out = lines(capsys)
    [line] = [line for line in out if line.startswith("recovery:")]
    assert line.startswith("recovery: unknown (cannot mount the recovery partition /dev/null: mount exited")
    assert main(["--config", str(path), "status", "--json"]) == 0
    assert "error" in json.loads(capsys.readouterr().out)["recovery"]


def test_reflashctl_status_without_a_recovery_partition_has_no_recovery_line(
        tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_system_toml(tmp_path, "/dev/no-such-recovery", source)
    assert main(["--config", str(path), "status"]) == 0
    assert not [line for line in lines(capsys) if line.startswith("recovery:")]


# --- the hook in settle, and the configuration ---------------------------------------------------


def test_settle_updates_the_recovery_outside_a_trial_only(
        tmp_path: Path, make_disk, layout: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    disk = make_disk(layout)
    config = config_for(tmp_path, source, str(disk.device))
    start_trial(config.cfg, 3)
    trial.settle(config)
    assert active_block(config) is None and names(disk.image, "b") == set()
    (config.cfg / "recovery/trial").unlink()
    trial.settle(config)
    assert active_block(config) == {"recovery_slot": "b"}
    assert disk.slot("b") == files_of(source)
    assert "recovery-slots: recovery 2.0.0 in slot b is active; slot a keeps 1.0.0" in lines(capsys)


def test_settle_goes_on_whatever_the_recovery_update_does(
        tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def fail(config: SystemConfig) -> None:
        raise RuntimeError("surprise")

    monkeypatch.setattr(recoveryslots, "update_recovery", fail)
    trial.settle(config_for(tmp_path, source))
    assert "recovery-slots: the recovery was not updated: surprise" in caplog.messages


def test_the_configuration_names_the_recovery(tmp_path: Path) -> None:
    base = {"product": "demo-appliance"}
    config = SystemConfig.from_dict(base)
    assert config.recovery_source == Path("/usr/lib/reflash/recovery")
    assert config.recovery_disk == "PARTLABEL=recovery"
    config = SystemConfig.from_dict({**base, "recovery_source": "/opt/recovery", "recovery_disk": "LABEL=rec"})
    assert (config.recovery_source, config.recovery_disk) == (Path("/opt/recovery"), "LABEL=rec")
    with pytest.raises(Rejected, match="recovery_source must be an absolute path"):
        SystemConfig.from_dict({**base, "recovery_source": "recovery"})
    with pytest.raises(Rejected, match="recovery_disk: unknown disk spec"):
        SystemConfig.from_dict({**base, "recovery_disk": "recovery"})


def test_a_write_that_fails_leaves_the_slot_without_its_record(
        tmp_path: Path, make_disk, layout: Path, source: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The record goes first: a slot half overwritten never claims to hold a recovery."""
    make_recovery(layout / "b", "0.9.0")
    disk = make_disk(layout)
    (source / "initrd.img").write_bytes(random.Random(1).randbytes(40 << 20))  # more than the partition holds
    (source / "recovery.json").write_bytes(RecoveryImage.of(source, "2.0.0").to_json())
    config = config_for(tmp_path, source)
    said = update_recovery(config, partition=disk.partition)
    assert said == "recovery-slots: cannot write slot b: No space left on device"
    assert said in caplog.messages
    assert "recovery.json" not in names(disk.image, "b") and active_block(config) is None
    assert not {".vmlinuz.new", ".initrd.img.new"} & names(disk.image, "b")


def test_the_switch_is_written_past_cfgs_journal(
        tmp_path: Path, make_disk, layout: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    seen: list[tuple[Path, dict[str, str] | None]] = []
    real = recoveryslots.checkpoint_journal
    monkeypatch.setattr(recoveryslots, "checkpoint_journal",
                        lambda path: seen.append((Path(path), active_block(config))) or real(path))
    update_recovery(config, partition=disk.partition)
    assert [where.parent.parent for where, _ in seen[:-1]] == [disk.base]  # the recovery's, while mounted
    assert seen[-1] == (config.cfg / "recovery", {"recovery_slot": "b"})


def test_the_switch_keeps_the_slot_blocks_inode(tmp_path: Path, make_disk, layout: Path, source: Path) -> None:
    """The block naming the active slot is written over its own bytes (GRUB's save_env's way), not
    renamed: no cut in the checkpoint can show GRUB a directory entry whose inode is not yet written."""
    disk = make_disk(layout)
    config = config_for(tmp_path, source)
    (config.cfg / SLOT).parent.mkdir(parents=True, exist_ok=True)
    (config.cfg / SLOT).write_bytes(format_envblock({"recovery_slot": "a"}))  # as reflash build makes it
    inode = (config.cfg / SLOT).stat().st_ino
    update_recovery(config, partition=disk.partition)
    assert active_block(config) == {"recovery_slot": "b"} and (config.cfg / SLOT).stat().st_ino == inode
