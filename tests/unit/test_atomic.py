"""Crash-safe writes and the journal checkpoint GRUB depends on (the real ioctl on a loop-mounted ext4 here, and in the VM tests)."""

from __future__ import annotations

import errno
import logging
import os
import struct
import subprocess
from pathlib import Path

import pytest

from recovery.core import instruction
from recovery.core.atomic import (
    EXT4_IOC_CHECKPOINT,
    atomic_write,
    checkpoint_journal,
    durable_unlink,
    read_if_present,
    write_block,
)
from recovery.core.errors import Rejected
from recovery.core.instruction import Instruction, clear_try, read_instruction, write_instruction


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old")
    atomic_write(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    assert durable_unlink(target) and not durable_unlink(target)


def test_checkpoint_asks_ext4_to_write_its_journal_out(tmp_path: Path) -> None:
    calls: list[tuple[int, bytes]] = []

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path))
        calls.append((request, arg))
        return arg

    assert checkpoint_journal(tmp_path, ioctl=ioctl) is True
    assert calls == [(0x4004662B, struct.pack("I", 0))] and EXT4_IOC_CHECKPOINT == 0x4004662B


@pytest.mark.parametrize("code", [errno.ENOTTY, errno.EINVAL, errno.ENODEV])
def test_checkpoint_without_a_journal_is_quietly_nothing(
    tmp_path: Path, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(code, os.strerror(code))

    with caplog.at_level(logging.WARNING):
        assert checkpoint_journal(tmp_path, ioctl=ioctl) is False
    assert caplog.records == []


def test_checkpoint_that_fails_warns_and_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EPERM, "Operation not permitted")

    with caplog.at_level(logging.WARNING):
        assert checkpoint_journal(tmp_path, ioctl=ioctl) is False
    assert len(caplog.records) == 1
    assert "one boot late" in caplog.records[0].getMessage() and "Operation not permitted" in caplog.text


def test_instruction_writes_are_checkpointed_for_grub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Path, bool]] = []
    path = tmp_path / "update-instruction"

    def spy(directory: Path) -> bool:
        seen.append((Path(directory), path.exists()))  # the block is in place before the checkpoint
        return True

    monkeypatch.setattr(instruction, "checkpoint_journal", spy)
    write_instruction(path, Instruction.create(
        disk="PARTLABEL=storage", file="/bundles/a.bundle", sha256="ab" * 32, version="2.0.0"))
    assert seen == [(tmp_path, True)]
    subprocess.run(["grub-editenv", str(path), "set", "recovery_try=1"], check=True)  # a try counted
    clear_try(path)
    assert read_instruction(path).try_count is None and seen == [(tmp_path, True)] * 2


def _names_on_disk(image: Path) -> str:
    """The root directory as GRUB would read it: debugfs on the image, the journal not replayed."""
    return subprocess.run(["debugfs", "-R", "ls -l /", str(image)], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts an ext4 image")
def test_checkpoint_puts_a_durable_change_where_a_reader_without_the_journal_sees_it(tmp_path: Path) -> None:
    """The real ioctl on a real mounted ext4: a file that is fsync'd lives in the journal only, which
    GRUB does not read, until the checkpoint writes it to its final blocks."""
    image = tmp_path / "cfg.img"
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-L", "cfg", str(image)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount an image here: {mounted.stderr.strip()}")
    try:
        atomic_write(mnt / "update-instruction", b"staged")
        assert "update-instruction" not in _names_on_disk(image)  # durable, but in the journal only
        assert checkpoint_journal(mnt)
        assert "update-instruction" in _names_on_disk(image)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_recovery_retry_writes_both_counters_out_for_grub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recovery.os import installer, pid1

    cfg = tmp_path / "cfg"
    (cfg / "recovery").mkdir(parents=True)
    write_instruction(cfg / installer.INSTRUCTION, Instruction.create(
        disk="PARTLABEL=storage", file="/bundles/a.bundle", sha256="ab" * 32, version="2.0.0"))
    seen: list[Path] = []
    monkeypatch.setattr(pid1, "checkpoint_journal", lambda path: seen.append(Path(path)) or True)
    pid1.retry(cfg)
    # no try was counted, so clear_try wrote nothing: the fallback counter's new block still needs it
    assert seen == [cfg] and (cfg / installer.FALLBACK_COUNTER).stat().st_size == 1024


def test_read_if_present(tmp_path: Path) -> None:
    (tmp_path / "record").write_bytes(b"{}")
    assert read_if_present(tmp_path / "record") == b"{}"
    assert read_if_present(tmp_path / "missing") is None
    with pytest.raises(Rejected, match="^cannot read .*/file/below: Not a directory$"):
        (tmp_path / "file").write_bytes(b"")
        read_if_present(tmp_path / "file/below")
    assert read_if_present(tmp_path / "file/below", absent=(FileNotFoundError, NotADirectoryError)) is None
    with pytest.raises(Rejected, match="Is a directory"):
        read_if_present(tmp_path)


def test_write_block_goes_over_an_existing_blocks_own_bytes(tmp_path: Path) -> None:
    """Once a block GRUB reads exists it keeps its inode: the write is GRUB's save_env's, not a rename
    (DESIGN.md "Crash states": a cut in the checkpoint of a rename can show GRUB an unwritten inode)."""
    block = tmp_path / "trial"
    write_block(block, b"a" * 1024)  # missing: made by a rename
    inode = block.stat().st_ino
    write_block(block, b"b" * 1024)
    assert block.read_bytes() == b"b" * 1024 and block.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial"]


def test_write_block_replaces_what_is_no_block_of_that_size(tmp_path: Path) -> None:
    block, elsewhere = tmp_path / "grubenv", tmp_path / "elsewhere"
    block.write_bytes(b"short")
    inode = block.stat().st_ino
    write_block(block, b"x" * 1024)
    assert block.read_bytes() == b"x" * 1024 and block.stat().st_ino != inode
    elsewhere.write_bytes(b"y" * 1024)
    block.unlink()
    block.symlink_to(elsewhere)  # never written through
    write_block(block, b"z" * 1024)
    assert not block.is_symlink() and block.read_bytes() == b"z" * 1024
    assert elsewhere.read_bytes() == b"y" * 1024
