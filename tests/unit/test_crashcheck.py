"""The offline checks of a crash state's cfg (vm/crashcheck.py) on hand-made cfg file systems, built with
mkfs.ext4 -d as mkimage builds cfg, some with changes that are only in the journal (as a power cut
leaves them, and as GRUB, which does not replay it, does not see them)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from recovery.core.bootmenu import GRUBENV, INSTRUCTION, SLOT, TRIAL, Entry
from recovery.core.envblock import format_envblock
from recovery.core.instruction import Instruction
from recovery.core.slots import write_record
from vm.crashcheck import (
    INCOMPLETE,
    Checker,
    check_cfg,
    check_replay,
    grub_view,
    judge,
    phase_of,
    recovery_view,
    slots_view,
    spread,
)
from vm.replay import Replay, StateKind
from vm.writelog import Recording, log_entries_now

pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in ("debugfs", "e2fsck", "mkfs.ext4", "qemu-io", "sfdisk")),
    reason="needs e2fsprogs, qemu-utils and fdisk: make setup",
)
BLOCK = Instruction.create("PARTLABEL=storage", "/bundles/demo-2.0.0.bundle", "cd" * 32, "2.0.0",
                           "2025-01-01T00:00:00Z").to_block()
MARKER = json.dumps({"since": "2025-01-01T00:00:00Z", "from_version": "1.0.0", "label": "system",
                     "uuid": "0b7d4a52-5d4e-4b2a-9c55-0a3f0e6b8e11", "try": 1}).encode() + b"\n"
IDLE = {GRUBENV: format_envblock({}), SLOT: format_envblock({"recovery_slot": "a"})}
STAGED = {**IDLE, INSTRUCTION: BLOCK}
ERASING = {**STAGED, INSTRUCTION: format_envblock({**Instruction.create(
    "PARTLABEL=storage", "/bundles/demo-2.0.0.bundle", "cd" * 32, "2.0.0", "2025-01-01T00:00:00Z").to_env(),
    "recovery_try": "1"}), INCOMPLETE: MARKER}


def make_cfg(path: Path, files: dict[str, bytes]) -> Path:
    """A cfg file system as mkimage makes one (mkfs.ext4 -d), holding `files`."""
    root = path.parent / (path.name + ".d")
    (root / "recovery").mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "cfg", "-O", "^metadata_csum_seed", "-d", str(root), str(path), "8M"],
                   check=True)
    shutil.rmtree(root)
    return path


def debugfs_w(image: Path, requests: list[str]) -> None:
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(requests) + "\n", text=True,
                   check=True, capture_output=True)


def edit(image: Path, changes: dict[str, bytes | None]) -> None:
    """Write (or with None remove) files in a cfg image, as a mounted cfg would, but with debugfs."""
    requests = []
    for i, (name, data) in enumerate(changes.items()):
        requests.append(f'rm "/{name}"')
        if data is not None:
            source = image.parent / f"{image.name}.{i}"
            source.write_bytes(data)
            requests.append(f'write "{source}" "/{name}"')
    debugfs_w(image, requests)


def in_journal_only(image: Path, changes: dict[str, bytes | None]) -> Path:
    """`image` with `changes` committed to its journal and nowhere else: what a power cut leaves after
    an fsync and before the journal is written out to the blocks (checkpointed)."""
    after = image.parent / (image.name + ".after")
    shutil.copyfile(image, after)
    edit(after, changes)
    size = 1024  # mkfs.ext4's block size for a file system this small
    old, new = image.read_bytes(), after.read_bytes()
    changed = [n for n in range(len(old) // size) if old[n * size : (n + 1) * size] != new[n * size : (n + 1) * size]]
    blocks = image.parent / (image.name + ".blocks")
    blocks.write_bytes(b"".join(new[n * size : (n + 1) * size] for n in changed))
    debugfs_w(image, ["jo", f"jw -b {','.join(map(str, changed))} {blocks}", "jc"])
    return image


def rules(check) -> list[str]:
    return sorted(f.rule for f in check.findings)


def test_an_idle_cfg_and_a_staged_instruction_hold(tmp_path):
    idle = check_cfg(make_cfg(tmp_path / "idle.img", IDLE), state="idle")
    assert idle.ok and idle.decision.entry is Entry.system
    staged = check_cfg(make_cfg(tmp_path / "staged.img", STAGED), state="staged")
    assert staged.ok, [str(f) for f in staged.findings]
    assert (staged.decision.entry, staged.decision.count) == (Entry.recovery, 1)
    assert staged.grub.files[INSTRUCTION] == staged.recovery.files[INSTRUCTION] == BLOCK
    erasing = check_cfg(make_cfg(tmp_path / "erasing.img", ERASING), state="erasing", phase="erasing")
    assert erasing.ok and erasing.decision.count == 2


def test_a_half_written_instruction(tmp_path):
    check = check_cfg(make_cfg(tmp_path / "half.img", {**IDLE, INSTRUCTION: BLOCK[:600]}), state="state 7")
    assert rules(check) == ["instruction", "instruction"]
    assert str(check.findings[0]).startswith("state 7: instruction: GRUB reads an update-instruction of 600 bytes")
    assert "the recovery reads an instruction it rejects" in str(check.findings[1])


def test_a_garbage_instruction(tmp_path):
    garbage = bytes(random.Random(18).randrange(256) for _ in range(1024))
    check = check_cfg(make_cfg(tmp_path / "garbage.img", {**IDLE, INSTRUCTION: garbage}), state="s")
    # GRUB's reading is the garbage path by design (a try counted in recovery/grubenv); the recovery,
    # which reads the same garbage after the journal, is the one that must refuse it
    assert rules(check) == ["instruction"]
    assert (check.decision.entry, check.decision.save.file) == (Entry.recovery, GRUBENV)  # still a try


def test_a_marker_without_an_instruction(tmp_path):
    check = check_cfg(make_cfg(tmp_path / "marker.img", {**IDLE, INCOMPLETE: MARKER}), state="s")
    assert rules(check) == ["boot", "marker"]
    assert check.decision.entry is Entry.system


def test_an_instruction_and_marker_only_in_the_journal_boot_the_half_written_system(tmp_path):
    """The writer's fsync put them in the journal, a cut came before the checkpoint: GRUB boots the
    system the recovery was erasing."""
    image = in_journal_only(make_cfg(tmp_path / "j.img", IDLE), {INSTRUCTION: BLOCK, INCOMPLETE: MARKER})
    check = check_cfg(image, state="s")
    assert check.grub.files[INSTRUCTION] is None and check.grub.files[INCOMPLETE] is None
    assert check.recovery.files[INSTRUCTION] == BLOCK and check.recovery.files[INCOMPLETE] == MARKER
    assert check.recovery.fsck in (0, 1)
    assert rules(check) == ["boot"] and check.decision.entry is Entry.system


def test_a_removal_only_in_the_journal_is_one_more_recovery_boot(tmp_path):
    # GRUB still sees the instruction and boots the recovery, which finds nothing staged: no finding
    image = in_journal_only(make_cfg(tmp_path / "r.img", ERASING), {INCOMPLETE: None, INSTRUCTION: None})
    check = check_cfg(image, state="s")
    assert check.ok, [str(f) for f in check.findings]
    assert check.decision.entry is Entry.recovery and check.recovery.files[INSTRUCTION] is None


def test_trial_counters(tmp_path):
    bad = check_cfg(make_cfg(tmp_path / "t.img", {**IDLE, TRIAL: format_envblock({"trial_max": "3", "trial_boot": "4"})}),
                    state="s")
    assert rules(bad) == ["trial", "trial"]
    for variables in ({"trial_max": "0"}, {"trial_boot": "1"}, {"trial_max": "3", "trial_boot": "x"}):
        image = make_cfg(tmp_path / f"t{len(variables)}{variables.get('trial_max')}.img",
                         {**IDLE, TRIAL: format_envblock(variables)})
        assert "trial" in rules(check_cfg(image, state="s")), variables
    good = make_cfg(tmp_path / "ok.img", {**IDLE, TRIAL: format_envblock({"trial_max": "3", "trial_boot": "3"})})
    assert check_cfg(good, state="s").ok
    # the recovery started the trial (in the journal only) and removed the instruction: unwatched
    started = in_journal_only(make_cfg(tmp_path / "u.img", {**IDLE, TRIAL: format_envblock({})}),
                              {TRIAL: format_envblock({"trial_max": "3"})})
    assert rules(check_cfg(started, state="s")) == ["unwatched"]


def test_an_ended_trial_torn_for_grub_is_one_boot_more(tmp_path):
    """The third recording's finding: confirm ended the trial, its checkpoint was cut with the writes
    reordered. GRUB reads no block and boots the rollback entry; the recovery reads the ended trial."""
    torn = in_journal_only(make_cfg(tmp_path / "torn.img", {**IDLE, TRIAL: b"x" * 1024}), {TRIAL: format_envblock({})})
    check = check_cfg(torn, state="s")
    assert check.decision.entry is Entry.rollback and check.recovery.files[TRIAL] == format_envblock({})
    assert check.ok, [str(f) for f in check.findings]
    # still on trial after the journal: GRUB's reading is a finding (it rolls back with boots left)
    on_trial = in_journal_only(make_cfg(tmp_path / "on.img", {**IDLE, TRIAL: b"x" * 1024}),
                               {TRIAL: format_envblock({"trial_max": "3", "trial_boot": "1"})})
    assert rules(check_cfg(on_trial, state="s")) == ["trial"]


def test_a_trial_torn_for_grub_while_an_instruction_is_there_is_never_read(tmp_path):
    """The rollback recording's finding: the recovery's start of a trial was cut in its checkpoint, and
    GRUB reads a trial block that is no block; with the instruction there it boots the recovery and
    reads no trial block. Without the instruction the same tear is a finding."""
    trial = {TRIAL: format_envblock({"trial_max": "3"})}
    torn = in_journal_only(make_cfg(tmp_path / "torn.img", {**STAGED, TRIAL: b"{\n  not a block" + b" " * 1000}), trial)
    check = check_cfg(torn, state="s", phase="finishing")
    assert check.decision.entry is Entry.recovery and check.grub.files[TRIAL][:1] == b"{"
    assert check.ok, [str(f) for f in check.findings]
    alone = in_journal_only(make_cfg(tmp_path / "alone.img", {**IDLE, TRIAL: b"{\n  not a block" + b" " * 1000}), trial)
    assert rules(check_cfg(alone, state="s")) == ["trial"]


def test_the_phase_of_a_state(tmp_path):
    image = make_cfg(tmp_path / "idle.img", IDLE)
    assert rules(check_cfg(image, state="s", phase="extracting")) == ["boot"]
    assert check_cfg(image, state="s", phase="verifying").ok
    phases = [(10, "verifying"), (25, "erasing"), (40, "extracting"), (90, "finishing")]
    assert [phase_of(n, phases) for n in (0, 10, 24, 25, 60, 100)] == \
        [None, "verifying", "verifying", "erasing", "extracting", "finishing"]


def test_slots_and_counters(tmp_path):
    slot = check_cfg(make_cfg(tmp_path / "s.img", {**IDLE, SLOT: format_envblock({"recovery_slot": "c"})}), state="s")
    # refused after the replay (our writer writes no such block); GRUB's reading takes it as `a`, by design
    assert rules(slot) == ["slot"]
    torn = check_cfg(make_cfg(tmp_path / "t.img", {**IDLE, SLOT: b"\0" * 1024}), state="s")
    assert rules(torn) == ["slot"] and torn.decision.slot in (None, "a")
    counted = {**IDLE, GRUBENV: format_envblock({"recovery_try": "7"}), INSTRUCTION: b"garbage\n"}
    check = check_cfg(make_cfg(tmp_path / "c.img", counted), state="s")
    assert rules(check) == ["instruction", "instruction", "rescue", "try", "try"]


def test_a_cfg_nobody_can_read(tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(1 << 20)))
    check = check_cfg(junk, state="s")
    assert "cfg" in rules(check) and check.decision.entry is Entry.system and not check.grub.opened
    broken = make_cfg(tmp_path / "b.img", STAGED)
    debugfs_w(broken, ["clri <2>", "ssv state 0"])  # no root directory, and marked for a check
    check = check_cfg(broken, state="s")
    assert "fsck" in rules(check) and check.recovery.fsck == 4


def test_the_checker_over_a_recorded_replay(tmp_path):
    """A disk whose cfg goes from idle to staged (its changed blocks written, then a flush), then a write
    elsewhere: the checker reads cfg once per distinct content and the flush points hold."""
    size = 1024
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "16M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\nstart=2048, size=16384, name=cfg\n"
                   "start=18432, size=8192, name=other\n", text=True, check=True, capture_output=True)
    idle = make_cfg(tmp_path / "idle.img", IDLE)
    with open(disk, "r+b") as f:
        f.seek(1 << 20)
        f.write(idle.read_bytes())
    staged = tmp_path / "staged.img"
    shutil.copyfile(idle, staged)
    edit(staged, {INSTRUCTION: BLOCK})
    old, new = idle.read_bytes(), staged.read_bytes()
    changed = [n for n in range(len(old) // size) if old[n * size : (n + 1) * size] != new[n * size : (n + 1) * size]]
    commands = []
    for n in changed:
        (tmp_path / f"b{n}").write_bytes(new[n * size : (n + 1) * size])
        commands += ["-c", f"write -s {tmp_path / f'b{n}'} {(1 << 20) + n * size} {size}"]
    rec = Recording.prepare(disk, tmp_path / "rec")
    for step in (commands, ["-c", f"write -P 0x77 {9 << 20} 4k"]):
        argv = ["qemu-io", "-t", "writeback", *step, "json:" + json.dumps(rec.drive().blockdev("disk0"))]
        subprocess.run(argv, check=True, capture_output=True)
    after_staging = log_entries_now(rec.log) - 2  # the second run: a write and its flush
    checker = Checker(tmp_path / "check", phases=[(after_staging, "erasing")], slots=None)
    keys = []
    with Replay(rec.base, rec.log, tmp_path / "replay") as replay:
        def boot(state):
            keys.append(state.range_key(1 << 20, 8 << 20))
            return state.kind is StateKind.flush and state.point.index == 1

        summary = check_replay(replay, checker, unordered=3, seed=5, boot=boot, images=tmp_path / "boot")
        seen = []

        def system(state, check):  # the second pass: the state is there again, as the first pass saw it
            seen.append((state.name, check.decision.entry, state.read((9 << 20), 1)))
            return ["not a release"]

        again = check_replay(replay, checker, unordered=3, seed=5, system=system, system_states=5,
                             system_partition="other")
        sampled = check_replay(replay, checker, unordered=3, seed=5, only=lambda state: state.kind is StateKind.flush)
    assert [c.state for c in sampled.checks] == [c.state for c in summary.checks if c.state.split(": ")[1].startswith(
        "flush") and "writes after it" not in c.state]
    assert seen and {entry for _, entry, _ in seen} == {Entry.system}
    assert [name for name, _, _ in seen] == list(again.system_checked)
    assert [f.state for f in again.findings if f.rule == "system"] == [name for name, _, _ in seen]
    assert len(again.findings) == len(summary.findings) + len(seen)
    assert summary.flush_points == len(replay.points) - 1 >= 2
    flushes = [c for c in summary.checks if "writes after it" not in c.state]
    assert flushes[0].decision.entry is Entry.system and flushes[0].ok
    assert flushes[-1].decision.entry is Entry.recovery and flushes[-1].phase == "erasing"
    assert all(c.ok for c in flushes), [str(f) for c in flushes for f in c.findings]
    assert checker.exported == len(set(keys)) < len(summary.checks)
    [(name, image)] = summary.images.items()
    assert "flush 1/" in name and image.stat().st_size == 16 << 20
    assert image.read_bytes()[1 << 20 : 9 << 20] == staged.read_bytes()


def test_grub_reads_past_a_bad_metadata_checksum(tmp_path):
    """GRUB's ext2 driver checks no metadata checksums (nor reads bitmaps): neither does its view."""
    image = make_cfg(tmp_path / "csum.img", STAGED)
    root = int(subprocess.run(["debugfs", "-R", "blocks /", str(image)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    with open(image, "r+b") as f:
        f.seek(root * 1024 + 1020)  # the directory block's checksum, in its last 4 bytes
        tail = f.read(4)
        f.seek(root * 1024 + 1020)
        f.write(bytes(b ^ 0xFF for b in tail))
    check = check_cfg(image, state="s")
    assert check.grub.files[INSTRUCTION] == BLOCK and check.decision.entry is Entry.recovery


def test_a_spread_sample_takes_one_from_each_run_and_the_first_of_each_phase():
    chosen = sorted(spread(range(1, 271), 20, 18))
    assert len(chosen) == 20
    assert all(i * 270 // 20 < c <= (i + 1) * 270 // 20 for i, c in enumerate(chosen))
    assert sorted(spread(range(1, 271), 20, 18)) == chosen != sorted(spread(range(1, 271), 20, 19))
    assert spread(range(1, 4), 20, 18) == {1, 2, 3} and spread([], 5, 1) == set() and spread([1, 2], 0, 1) == set()
    phases = ["a"] * 5 + ["b"] * 5
    assert {0, 5} <= spread(range(10), 1, 3, phases) and len(spread(range(10), 1, 3, phases)) <= 3


def make_recovery(path: Path, torn: dict[str, str] | None = None) -> Path:
    """A recovery partition with slots a and b as the build makes it (small stand-ins for the kernel and
    initrd, the menu and its sums, the record); `torn` maps a slot to a file of it cut short afterwards."""
    root = path.parent / (path.name + ".d")
    for slot in ("a", "b"):
        (root / slot).mkdir(parents=True)
        (root / slot / "vmlinuz").write_bytes(b"kernel " + slot.encode() * 3000)
        (root / slot / "initrd.img").write_bytes(b"initrd " + slot.encode() * 9000)
        (root / slot / "menu.cfg").write_text(f"menuentry {slot} {{ true }}\n")
        write_record(root / slot, "1.0.0")
    for slot, name in (torn or {}).items():
        data = (root / slot / name).read_bytes()
        (root / slot / name).write_bytes(data[: len(data) // 2])
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "recovery", "-d", str(root), str(path), "8M"], check=True)
    shutil.rmtree(root)
    return path


def slot_rules(tmp_path, name: str, active: str, torn: dict[str, str] | None = None) -> list[str]:
    cfg = make_cfg(tmp_path / f"{name}.cfg", {**STAGED, SLOT: format_envblock({"recovery_slot": active})})
    slots = slots_view(make_recovery(tmp_path / f"{name}.rec", torn))
    check = judge(name, None, grub_view(cfg), recovery_view(cfg, tmp_path), slots=slots)
    return rules(check)


def test_the_slot_grub_loads_must_be_whole(tmp_path):
    assert slot_rules(tmp_path, "whole", "a") == []
    assert slot_rules(tmp_path, "standby-torn", "a", {"b": "initrd.img"}) == []
    assert slot_rules(tmp_path, "active-torn", "b", {"b": "initrd.img"}) == ["slot"]
    assert slot_rules(tmp_path, "menu-torn", "a", {"a": "menu.cfg"}) == ["slot"]
    assert slot_rules(tmp_path, "both-torn", "a", {"a": "vmlinuz", "b": "recovery.json"}) == ["slots"]
    view = slots_view(make_recovery(tmp_path / "why.rec", {"b": "initrd.img"}))
    assert view.whole == ("a",) and "b/initrd.img" in view.broken["b"]
    assert not slots_view(make_cfg(tmp_path / "notrec.img", IDLE)).opened
