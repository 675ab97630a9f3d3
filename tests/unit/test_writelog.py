"""The write log (vm/writelog.py) against real blklogwrites logs: qemu-io writes through the very node
graph `Recording.drive()` gives a machine, and the replay must rebuild the disk at every flush (checked
against copies taken at those moments) and for random subsets of the writes between two flushes."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from vm import VMError
from vm.drive import Drive
from vm.replay import Replay, StateKind
from vm.writelog import MAGIC, Flag, Recording, WriteLog, log_entries_now, logged_drive

pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in ("qemu-io", "qemu-img", "sfdisk", "mkfs.ext4")),
    reason="needs qemu-io, qemu-img (qemu-utils), sfdisk (fdisk) and mkfs.ext4 (e2fsprogs): make setup",
)
MiB = 1 << 20
DISK = 8 * MiB
CFG = (1 * MiB, 4 * MiB)  # the GPT partition "cfg": start, size
OTHER = 6 * MiB  # where the writes go, in partition "other"
STEPS = [
    ["write -P 0xaa 0x600000 4k", "flush", "write -P 0xbb 0x610000 8k"],
    ["write -z 0x620000 8k", "write -P 0xcc 0x630000 4k", "write -P 0xdd 0x640000 4k", "write -P 0xee 0x650000 4k"],
    ["write -P 0x11 0x600000 512"],
]
# (offset, size, byte) of every write above, in order
WRITES = [(0x600000, 4096, 0xAA), (0x610000, 8192, 0xBB), (0x620000, 8192, 0), (0x630000, 4096, 0xCC),
          (0x640000, 4096, 0xDD), (0x650000, 4096, 0xEE), (0x600000, 512, 0x11)]


def make_disk(path: Path) -> Path:
    """A small raw disk with a GPT (cfg, other) and an ext4 in cfg, as mkimage makes them."""
    subprocess.run(["truncate", "-s", str(DISK), str(path)], check=True)
    table = (f"label: gpt\nstart={CFG[0] // 512}, size={CFG[1] // 512}, name=cfg\n"
             f"start={5 * MiB // 512}, size={2 * MiB // 512}, name=other\n")
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True, capture_output=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "cfg", "-E", f"offset={CFG[0]}", str(path), f"{CFG[1] // 1024}k"],
                   check=True)
    return path


def qemu_io(drive: Drive, commands: list[str]) -> None:
    """Run qemu-io on exactly the node graph a machine would get for `drive` (its `-blockdev` JSON).

    With a write cache (`-t writeback`), as a guest's virtio disk has: qemu-io's default,
    writethrough, follows writes with flushes of its own."""
    argv = ["qemu-io", "-t", "writeback"]
    for command in commands:
        argv += ["-c", command]
    argv.append("json:" + json.dumps(drive.blockdev("disk0")))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


@dataclass(frozen=True)
class Recorded:
    rec: Recording
    snapshots: list[bytes]  # the disk after each step (qemu-io flushes when it closes)
    ends: list[int]  # log entries after each step


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    directory = tmp_path_factory.mktemp("recording")
    rec = Recording.prepare(make_disk(directory / "disk.img"), directory / "rec")
    snapshots, ends = [], []
    for step in STEPS:
        qemu_io(rec.drive(), step)  # each run appends to the one log
        snapshots.append(rec.image.read_bytes())
        ends.append(log_entries_now(rec.log))
    return Recorded(rec, snapshots, ends)


def test_the_log_holds_every_request_in_order(recorded):
    log = WriteLog.read(recorded.rec.log)
    assert log.sector_size == 512 and log.nr_entries == len(log.entries) == recorded.ends[-1]
    writes = [e for e in log.entries if e.changes_disk]
    assert [(e.offset, e.size) for e in writes] == [(o, s) for o, s, _ in WRITES]
    assert all(e.flags == Flag(0) for e in writes)  # QEMU logs neither FUA nor marks
    for entry, (_, size, byte) in zip(writes, WRITES):
        assert log.data(entry) == bytes([byte]) * size
    flushes = [e.number for e in log.entries if e.flags & Flag.FLUSH]
    assert all(not log.entries[n].size and not log.data(log.entries[n]) for n in flushes)
    # the explicit flush between the first two writes, and one as each run closes
    assert writes[0].number < flushes[0] < writes[1].number
    assert all(end - 1 in flushes for end in recorded.ends)
    points = log.flush_points()
    assert [p.entry for p in points] == [None, *flushes]
    assert points[1].bytes == 4096 and points[-1].bytes == sum(s for _, s, _ in WRITES)


def test_every_flush_point_is_the_disk_as_it_was_then(recorded, tmp_path):
    base = recorded.rec.base.read_bytes()
    with Replay(recorded.rec.base, recorded.rec.log, tmp_path) as replay:
        states = []
        for state in replay.states():
            states.append(state.kind)
            data = state.read(0, DISK)
            if state.kind is StateKind.start:
                assert data == base
            elif state.entries in recorded.ends:
                assert data == recorded.snapshots[recorded.ends.index(state.entries)], state.name
            elif state.point.index == 1:  # the explicit flush: the first write only
                assert data[OTHER : OTHER + 4096] == b"\xaa" * 4096 and data[0x610000 : 0x612000] == bytes(8192)
                assert data[: OTHER] == base[: OTHER]
        assert states[0] is StateKind.start and set(states[1:]) == {StateKind.flush}  # the log ends with a flush
        last = state.materialize(tmp_path / "final.img")
    assert last.read_bytes() == recorded.rec.image.read_bytes()


def _expected(before: bytes, log: WriteLog, applied: tuple[int, ...]) -> bytes:
    data = bytearray(before)
    for n in applied:
        entry = log.entries[n]
        data[entry.offset : entry.offset + entry.size] = log.data(entry)
    return bytes(data)


def test_unordered_states_are_the_last_flush_and_some_writes_after_it(recorded, tmp_path):
    log = WriteLog.read(recorded.rec.log)
    seen: list[tuple[int, ...]] = []
    with Replay(recorded.rec.base, log, tmp_path) as replay:
        flushed = b""
        for state in replay.states(unordered=6, seed=3):
            if state.kind is StateKind.unordered:
                # only the second run has several writes between two flushes: 4 of them
                assert state.of == 4 and 0 < len(state.applied) < 4
                assert set(state.applied) <= {e.number for e in log.entries if e.changes_disk}
                assert state.read(0, DISK) == _expected(flushed, log, state.applied), state.name
                assert state.bytes == state.point.bytes + sum(log.entries[n].size for n in state.applied)
                assert "writes after it" in state.name
                seen.append(state.applied)
            else:
                flushed = state.read(0, DISK)
        final = state.read(0, DISK)
    assert len(seen) == 6 and len(set(seen)) == 6
    assert final == recorded.rec.image.read_bytes()  # every subset was undone again
    with Replay(recorded.rec.base, log, tmp_path / "again") as replay:
        again = [s.applied for s in replay.states(unordered=6, seed=3) if s.kind is StateKind.unordered]
    assert again == seen


def test_a_state_exports_a_partition_and_a_whole_disk(recorded, tmp_path):
    with Replay(recorded.rec.base, recorded.rec.log, tmp_path) as replay:
        assert (replay.partition("cfg").start, replay.partition("cfg").size) == CFG
        for state in replay.states():
            pass
        cfg = state.export_partition("cfg", tmp_path / "cfg.img")
        other = state.export_partition(2, tmp_path / "other.img")
    disk = recorded.rec.image.read_bytes()
    assert cfg.read_bytes() == disk[CFG[0] : CFG[0] + CFG[1]]
    assert other.read_bytes() == disk[5 * MiB : 7 * MiB]
    assert cfg.stat().st_blocks * 512 < CFG[1]  # sparse
    label = subprocess.run(["e2label", str(cfg)], capture_output=True, text=True, check=True)
    assert label.stdout.strip() == "cfg"


def test_a_state_can_be_read_only_until_the_next(recorded, tmp_path):
    with Replay(recorded.rec.base, recorded.rec.log, tmp_path) as replay:
        states = replay.states()
        first = next(states)
        first.read(0, 512)
        next(states)
        with pytest.raises(VMError, match="moved on"):
            first.read(0, 512)


def test_range_keys_tell_which_states_share_a_range(recorded, tmp_path):
    with Replay(recorded.rec.base, recorded.rec.log, tmp_path) as replay:
        keys = [(s.range_key(*CFG), s.range_key(OTHER, 2 * MiB)) for s in replay.states(unordered=2, seed=1)]
    assert len({cfg for cfg, _ in keys}) == 1  # nothing wrote to cfg
    assert len({other for _, other in keys}) > len(STEPS)


def test_entries_past_the_super_block(recorded, tmp_path):
    """A log whose super block lags behind (a QEMU that has not flushed yet, or was killed)."""
    lagging = tmp_path / "lagging.log"
    data = bytearray(recorded.rec.log.read_bytes())
    struct.pack_into("<Q", data, 16, 2)
    lagging.write_bytes(data)
    assert len(WriteLog.read(lagging).entries) == 2
    assert len(WriteLog.read(lagging, past_super=True).entries) == recorded.ends[-1] == log_entries_now(lagging)
    lagging.write_bytes(data[: len(data) - 512])  # the last entry (a flush) cut off
    assert len(WriteLog.read(lagging, past_super=True).entries) == recorded.ends[-1] - 1


def test_what_is_not_a_log(tmp_path):
    bad = tmp_path / "bad.log"
    for content, message in ((b"", "no super block"), (bytes(512), "magic"),
                             (struct.pack("<QQQI", MAGIC, 2, 0, 512).ljust(512, b"\0"), "version"),
                             (struct.pack("<QQQI", MAGIC, 1, 3, 512).ljust(1024, b"\0"), "entry 0 of 3")):
        bad.write_bytes(content)
        with pytest.raises(VMError, match=message):
            WriteLog.read(bad)
    assert log_entries_now(tmp_path / "bad.log") == 0


def _entry(sector: int, nr: int, flags: int, text: bytes = b"", size: int = 4096) -> bytes:
    return (struct.pack("<QQQQ", sector, nr, flags, len(text)) + text).ljust(size, b"\0")


def test_marks_flushes_with_data_and_discards_as_linux_writes_them(tmp_path):
    """dm-log-writes (Linux) writes marks, FUA and flushes with data, which QEMU never does: a log by
    hand, with 4 KiB sectors."""
    S = 4096
    log = tmp_path / "linux.log"
    log.write_bytes(b"".join([
        struct.pack("<QQQI", MAGIC, 1, 6, S).ljust(S, b"\0"),
        _entry(0, 0, Flag.MARK, b"erasing"),
        _entry(1, 1, 0), b"\x01" * S,
        _entry(2, 2, 0), b"\x02" * 2 * S,
        _entry(3, 1, Flag.FLUSH | Flag.FUA), b"\x03" * S,
        _entry(0, 1, Flag.DISCARD),
        _entry(0, 0, Flag.FLUSH),
    ]))
    parsed = WriteLog.read(log)
    assert [e.mark for e in parsed.entries] == ["erasing", None, None, None, None, None]
    assert parsed.entries[3].offset == 3 * S and parsed.data(parsed.entries[4]) == b""
    points = parsed.flush_points()
    assert [(p.entry, p.bytes, p.mark) for p in points] == [(None, 0, None), (3, 4 * S, "erasing"), (5, 4 * S, "erasing")]
    base = tmp_path / "base.img"
    base.write_bytes(b"\xff" * 5 * S)
    with Replay(base, parsed, tmp_path / "work") as replay:
        images = []
        for state in replay.states(unordered=3, seed=0):
            images.append((state.kind, state.applied, state.read(0, 5 * S)))
            assert state.mark == (None if state.kind is StateKind.start else "erasing"), state.name
    ff, one, two, three = b"\xff" * S, b"\x01" * S, b"\x02" * S, b"\x03" * S
    # the flush with data ends the first interval, its data in; {1} and {2} are its only proper subsets
    assert images == [
        (StateKind.start, (), ff * 5),
        (StateKind.unordered, (1,), ff + one + ff * 3),
        (StateKind.unordered, (2,), ff * 2 + two * 2 + ff),
        (StateKind.flush, (), ff + one + two + three + ff),
        (StateKind.flush, (), bytes(S) + one + two + three + ff),  # the discard zeroes sector 0
    ]


def test_a_fua_write_is_on_disk_in_every_state_that_has_a_later_write(tmp_path):
    S = 512
    log = tmp_path / "fua.log"
    log.write_bytes(b"".join([
        struct.pack("<QQQI", MAGIC, 1, 4, S).ljust(S, b"\0"),
        _entry(0, 1, 0, size=S), b"\x01" * S,
        _entry(1, 1, Flag.FUA, size=S), b"\x02" * S,
        _entry(2, 1, 0, size=S), b"\x03" * S,
        _entry(0, 0, Flag.FLUSH, size=S),
    ]))
    base = tmp_path / "base.img"
    base.write_bytes(bytes(3 * S))
    with Replay(base, log, tmp_path / "work") as replay:
        subsets = {s.applied for s in replay.states(unordered=40, seed=2) if s.kind is StateKind.unordered}
    assert subsets == {(0,), (1,), (0, 1), (1, 2)}  # never (2,) or (0, 2): 2 came after the FUA write 1


def test_the_drive_a_machine_gets(recorded, tmp_path):
    args = recorded.rec.drive().qemu_args("disk0", bootindex=0)
    assert args[0] == "-blockdev" and args[2:] == ["-device", "virtio-blk-pci,drive=disk0,bootindex=0"]
    graph = json.loads(args[1])
    assert graph["driver"] == "blklogwrites" and graph["node-name"] == "disk0"
    assert graph["file"]["driver"] == "raw" and graph["file"]["file"]["filename"] == str(recorded.rec.image)
    assert graph["log"]["filename"] == str(recorded.rec.log.resolve())
    assert graph["log-append"] is True and graph["log-super-update-interval"] == 1
    fresh = logged_drive(recorded.rec.base, tmp_path / "new.log", sector_size=4096)
    assert json.loads(fresh.qemu_args("disk1")[1])["log-sector-size"] == 4096
    assert (tmp_path / "new.log").read_bytes() == b""
    qcow = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    with pytest.raises(VMError, match="not a raw image"):
        logged_drive(qcow, tmp_path / "q.log")
