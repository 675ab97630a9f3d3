"""The update instruction: validation with one-line reasons, disk specs, atomic writes, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path, PurePosixPath

import pytest

import recovery as recovery_package
from recovery.core.errors import Failed, Rejected
from recovery.core.envblock import ENVBLK_HEADER, format_envblock, parse_envblock
from recovery.core.instruction import TRY_ROOM, Action, DiskSpec, DiskSpecKind, Instruction, clear_try, parse_instruction, read_instruction, write_instruction

SHA = "3fa9" + "0123456789abcdef" * 3 + "0123456789ab"
VALID = {
    "recovery_action": "install",
    "recovery_disk": "PARTLABEL=storage",
    "recovery_file": "/bundles/demo-appliance-2.0.0.bundle",
    "recovery_sha256": SHA,
    "recovery_version": "2.0.0",
    "recovery_created": "2026-01-02T03:04:05Z",
}
RECOVERY = [sys.executable, "-m", "recovery.os"]  # the recovery OS's command, as a build host runs it


def block(**changes: str | None) -> bytes:
    """A block of VALID with some keys changed (None drops a key)."""
    env = {**VALID, **changes}
    return format_envblock({k: v for k, v in env.items() if v is not None})


def test_valid_block_parses() -> None:
    i = parse_instruction(block())
    assert i.action is Action.install
    assert i.disk == DiskSpec(DiskSpecKind.partlabel, "storage")
    assert i.file == PurePosixPath("/bundles/demo-appliance-2.0.0.bundle")
    assert (i.sha256, i.version, i.created, i.try_count, i.extra) == (SHA, "2.0.0", "2026-01-02T03:04:05Z", None, ())
    assert i.to_env() == VALID


def test_optional_keys_and_try() -> None:
    i = parse_instruction(block(recovery_created=None, recovery_try="3"))
    assert i.created is None and i.try_count == 3
    assert "recovery_created" not in i.to_env() and i.to_env()["recovery_try"] == "3"


def test_unknown_keys_are_ignored_but_kept() -> None:
    data = format_envblock({"saved_entry": "0", **VALID, "operator": "a\\b\nc"})
    i = parse_instruction(data)
    assert i.extra == (("saved_entry", "0"), ("operator", "a\\b\nc"))
    assert parse_envblock(i.to_block()) == {**VALID, "saved_entry": "0", "operator": "a\\b\nc"}
    assert i.to_dict()["extra"] == {"saved_entry": "0", "operator": "a\\b\nc"}


def test_create_defaults() -> None:
    i = Instruction.create(disk="UUID=1234-ABCD", file="/b/x.bundle", sha256=SHA, version="2.0.0+rc.1~b_2")
    assert i.action is Action.install and i.try_count is None
    assert i.created is not None and len(i.created) == len("2026-01-02T03:04:05Z") and i.created.endswith("Z")
    assert parse_instruction(i.to_block()) == i
    assert set(i.to_env()) == {
        "recovery_action", "recovery_disk", "recovery_file", "recovery_sha256", "recovery_version", "recovery_created",
    }
    d = i.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["disk"] == "UUID=1234-ABCD" and d["file"] == "/b/x.bundle" and d["try_count"] is None


FREE = 1024 - len(block().rstrip(b"#"))  # bytes left after VALID
MALFORMED = [
    # (block, reason)
    (block()[:1000], "instruction: environment block is 1000 bytes, not 1024"),
    (block() + b"#", "instruction: environment block is 1025 bytes, not 1024"),
    (b"", "instruction: environment block is 0 bytes, not 1024"),
    (b"# GRUB Environment Blok\n" + block()[24:], "instruction: not a GRUB environment block (bad header)"),
    (block(recovery_action=None), "instruction: recovery_action is missing"),
    (block(recovery_disk=None), "instruction: recovery_disk is missing"),
    (block(recovery_file=None), "instruction: recovery_file is missing"),
    (block(recovery_sha256=None), "instruction: recovery_sha256 is missing"),
    (block(recovery_version=None), "instruction: recovery_version is missing"),
    (block(recovery_action="remove"), "instruction: unknown recovery_action 'remove'"),
    (block(recovery_action="Install"), "instruction: unknown recovery_action"),
    (block(recovery_sha256=SHA.upper()), "instruction: recovery_sha256 is not 64 lowercase hex digits"),
    (block(recovery_sha256=SHA[:-1]), "instruction: recovery_sha256 is not 64 lowercase hex digits"),
    (block(recovery_sha256=SHA + "0"), "instruction: recovery_sha256 is not 64 lowercase hex digits"),
    (block(recovery_sha256="g" * 64), "instruction: recovery_sha256 is not 64 lowercase hex digits"),
    (block(recovery_sha256=""), "instruction: recovery_sha256 is not 64 lowercase hex digits"),
    (block(recovery_sha256=SHA + "\n"), "instruction: recovery_sha256 is not 64 lowercase hex digits"),
    (block(recovery_file="bundles/x.bundle"), "instruction: recovery_file 'bundles/x.bundle' is not an absolute path"),
    (block(recovery_file="/bundles/../etc/x"), "instruction: recovery_file '/bundles/../etc/x' contains '..'"),
    (block(recovery_file="/.."), "contains '..'"),
    (block(recovery_file="/bundles//x"), "is not a normalized path to a file"),
    (block(recovery_file="/bundles/./x"), "is not a normalized path to a file"),
    (block(recovery_file="/bundles/x/"), "is not a normalized path to a file"),
    (block(recovery_file="//bundles/x"), "is not a normalized path to a file"),
    (block(recovery_file="/"), "is not a normalized path to a file"),
    (block(recovery_file="/a\nb"), "instruction: recovery_file '/a\\nb' contains control characters"),
    (block(recovery_file="/" + "x" * 600), "instruction: recovery_file is longer than 512 characters"),
    (block(recovery_disk="FOO=bar"), "instruction: recovery_disk: unknown disk spec 'FOO=bar'"),
    (block(recovery_disk="storage"), "instruction: recovery_disk: unknown disk spec 'storage'"),
    (block(recovery_disk="partlabel=storage"), "unknown disk spec"),
    (block(recovery_disk=""), "unknown disk spec"),
    (block(recovery_disk="PARTLABEL="), "instruction: recovery_disk: disk spec PARTLABEL has no value"),
    (block(recovery_disk="LABEL= x"), "has leading or trailing blanks"),
    (block(recovery_disk="UUID=not-a-uuid"), "instruction: recovery_disk: disk spec UUID='not-a-uuid' is not a UUID"),
    (block(recovery_disk="PARTUUID=" + "0" * 37), "is not a UUID"),
    (block(recovery_disk="/dev/../etc/passwd"), "is not an absolute, normalized path below /dev/"),
    (block(recovery_disk="/dev/sda/"), "is not an absolute, normalized path below /dev/"),
    (block(recovery_disk="/tmp/disk.img"), "is not an absolute, normalized path below /dev/"),
    (block(recovery_disk="/dev/"), "is not an absolute, normalized path below /dev/"),
    (block(recovery_version=""), "instruction: recovery_version is empty"),
    (block(recovery_version="2.0 beta"), "instruction: recovery_version '2.0 beta' has characters other than"),
    (block(recovery_version="../2"), "has characters other than"),
    (block(recovery_version="2.0/x"), "has characters other than"),
    (block(recovery_version="-2"), "has characters other than"),
    (block(recovery_version="2" * 65), "instruction: recovery_version is longer than 64 characters"),
    (block(recovery_try="0"), "instruction: recovery_try '0' is not 1 to 3"),
    (block(recovery_try="4"), "instruction: recovery_try '4' is not 1 to 3"),
    (block(recovery_try="01"), "is not 1 to 3"),
    (block(recovery_try=""), "is not 1 to 3"),
    (block(recovery_try="x"), "is not 1 to 3"),
    (block(recovery_try=" 1"), "is not 1 to 3"),
    (block(recovery_created="yesterday"), "instruction: recovery_created 'yesterday' is not an ISO 8601 time"),
    (block(recovery_created=""), "is not an ISO 8601 time"),
    (block(recovery_created="2026-01-02 03:04:05"), "is not an ISO 8601 time"),
    (block(filler="x" * (FREE - len("filler=\n") - TRY_ROOM + 1)),
     f"instruction: too long, GRUB needs {TRY_ROOM} free bytes in the block to count tries"),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED, ids=[r for _, r in MALFORMED])
def test_malformed_instruction_is_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_instruction(data)
    message = str(info.value)
    assert reason in message and message.startswith("instruction: ")
    assert "\n" not in message


def raw_block(body: bytes) -> bytes:
    return (ENVBLK_HEADER + body).ljust(1024, b"#")


VALID_BODY = b"".join(f"{k}={v}\n".encode() for k, v in VALID.items())
BROKEN_BLOCKS = [
    (raw_block(b"no equals sign\n" + VALID_BODY), "line at byte 25 has no '='"),
    (raw_block(b"name\nrecovery_x=1\n" + VALID_BODY), "has no '='"),  # GRUB would read a name "name\nrecovery_x"
    (raw_block(b"=value\n" + VALID_BODY), "line at byte 25 has an empty name"),
    (raw_block(b"\n" + VALID_BODY), "empty line at byte 25"),  # GRUB would read a name "\nrecovery_action"
    (raw_block(VALID_BODY + b"\n"), "empty line at byte"),  # GRUB's save_env would append after it, likewise
    (raw_block(VALID_BODY + b"recovery_try=1\nrecovery_try=2\n"), "'recovery_try' is set twice"),
    # padding that does not end in '#': GRUB finds no newline before its free space and cannot append
    ((ENVBLK_HEADER + VALID_BODY).ljust(1023, b"#") + b"x", "the free space at its end is broken"),
    ((ENVBLK_HEADER + VALID_BODY + b"k=unterminated").ljust(1024, b"v"), "value of 'k' is not terminated by a newline"),
    ((ENVBLK_HEADER + VALID_BODY + b"k=v").ljust(1023, b"v") + b"\\", "value of 'k' is not terminated by a newline"),
    (raw_block(VALID_BODY + b"k=a\0b\n"), "value of 'k' at byte"),
    (raw_block(VALID_BODY + b"k=\xff\xfe\n"), "is not UTF-8"),
    (raw_block(VALID_BODY + b"\xff=1\n"), "name at byte"),
    # a comment whose escaped newline swallows the place GRUB's save_env would append to
    (raw_block(VALID_BODY + b"#\\\n"), "the free space at its end is broken"),
]


@pytest.mark.parametrize(("data", "reason"), BROKEN_BLOCKS, ids=[r for _, r in BROKEN_BLOCKS])
def test_broken_block_is_rejected(data: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_instruction(data)
    assert reason in str(info.value) and str(info.value).startswith("instruction: environment block")


def test_comments_are_skipped_like_grub() -> None:
    data = raw_block(b"# a comment with = sign\n" + VALID_BODY + b"# c\\\nhidden=1\n")
    assert parse_envblock(data) == VALID
    assert parse_envblock(raw_block(b"k=a\\xb\n")) == {"k": "axb"}  # GRUB drops any escaping backslash


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("PARTLABEL=storage", DiskSpecKind.partlabel, "storage"),
        ("PARTLABEL=EFI System Partition", DiskSpecKind.partlabel, "EFI System Partition"),
        ("LABEL=cfg", DiskSpecKind.label, "cfg"),
        ("LABEL=a=b", DiskSpecKind.label, "a=b"),
        ("UUID=0f2b8d3e-6c11-4a4e-9d55-3f1d2e8a7b90", DiskSpecKind.uuid, "0f2b8d3e-6c11-4a4e-9d55-3f1d2e8a7b90"),
        ("UUID=1234-ABCD", DiskSpecKind.uuid, "1234-ABCD"),
        ("PARTUUID=0f2b8d3e-01", DiskSpecKind.partuuid, "0f2b8d3e-01"),
        ("/dev/vda6", DiskSpecKind.path, "/dev/vda6"),
        ("/dev/disk/by-partlabel/storage", DiskSpecKind.path, "/dev/disk/by-partlabel/storage"),
    ],
)
def test_disk_spec_forms(text: str, kind: DiskSpecKind, value: str) -> None:
    spec = DiskSpec.parse(text)
    assert (spec.kind, spec.value) == (kind, value)
    assert str(spec) == text
    assert DiskSpec(kind, value) == spec


@pytest.mark.parametrize(
    "text", ["/dev/./vda", "/dev//vda", "//dev/vda", "/dev/vda/..", "/dev/../dev/vda", "/dev", "dev/vda", "LABEL=a\tb"]
)
def test_disk_spec_rejects(text: str) -> None:
    with pytest.raises(Rejected):
        DiskSpec.parse(text)


def test_create_rejects_like_the_parser() -> None:
    with pytest.raises(Rejected, match="^instruction: recovery_sha256 is not 64 lowercase hex digits$"):
        Instruction.create("PARTLABEL=storage", "/b/x", SHA.upper(), "2.0.0")
    with pytest.raises(Rejected, match="^instruction: unknown disk spec 'sda'"):
        Instruction.create("sda", "/b/x", SHA, "2.0.0")
    with pytest.raises(Rejected, match="^instruction: recovery_file 'b/x' is not an absolute path$"):
        Instruction.create("PARTLABEL=storage", "b/x", SHA, "2.0.0")
    with pytest.raises(Rejected, match="^instruction: recovery_created 'now' is not an ISO 8601 time$"):
        Instruction.create("PARTLABEL=storage", "/b/x", SHA, "2.0.0", created="now")
    with pytest.raises(Rejected, match=r"^instruction: environment block: the variables take \d+ bytes, only 930 fit$"):
        Instruction.create("LABEL=" + "x" * 255, "/" + "y" * 500, SHA, "1" * 60)
    # fits in the block, but leaves GRUB no room to add recovery_try=N
    args = ("LABEL=" + "x" * 255, SHA, "1" * 60, "2026-01-02T03:04:05Z")
    free = 1024 - len(Instruction.create(args[0], "/y", *args[1:]).to_block().rstrip(b"#"))
    Instruction.create(args[0], "/" + "y" * (1 + free - TRY_ROOM), *args[1:])
    with pytest.raises(Rejected, match=r"^instruction: too long, GRUB needs 15 free bytes in the block"):
        Instruction.create(args[0], "/" + "y" * (1 + free - TRY_ROOM + 1), *args[1:])


# --- writing ------------------------------------------------------------------------------------------


def test_write_is_atomic_and_leaves_one_file(tmp_path: Path) -> None:
    path = tmp_path / "update-instruction"
    first = Instruction.create("PARTLABEL=storage", "/b/1.bundle", SHA, "1.0.0")
    second = Instruction.create("PARTLABEL=storage", "/b/2.bundle", SHA, "2.0.0")
    write_instruction(path, first)
    assert os.listdir(tmp_path) == ["update-instruction"]
    inode = path.stat().st_ino
    write_instruction(path, second)
    assert os.listdir(tmp_path) == ["update-instruction"]
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert path.read_bytes() == second.to_block() and read_instruction(path) == second
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(Failed, match=r"^cannot write instruction .*/missing/update-instruction: No such file"):
        write_instruction(tmp_path / "missing" / "update-instruction", Instruction.create("LABEL=s", "/x", SHA, "1"))
    assert os.listdir(tmp_path) == []


def test_failing_rename_leaves_no_temp_file(tmp_path: Path) -> None:
    # a directory in the way makes the final rename fail after the temp file was written
    (tmp_path / "update-instruction").mkdir()
    (tmp_path / "update-instruction" / "occupant").touch()
    with pytest.raises(Failed, match="^cannot write instruction"):
        write_instruction(tmp_path / "update-instruction", Instruction.create("LABEL=s", "/x", SHA, "1"))
    assert os.listdir(tmp_path) == ["update-instruction"]


WRITE_AS_NOBODY = """
import sys
from recovery.core.instruction import Instruction, write_instruction
try:
    write_instruction(sys.argv[1] + "/update-instruction", Instruction.create("LABEL=s", "/x", "0" * 64, "1"))
except Exception as e:
    print(type(e).__name__, e)
"""


def test_write_into_read_only_directory_fails_cleanly(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        tmp_path.chmod(0o500)
        try:
            with pytest.raises(Failed, match="^cannot write instruction .*: Permission denied$"):
                write_instruction(tmp_path / "update-instruction", Instruction.create("LABEL=s", "/x", SHA, "1"))
            assert os.listdir(tmp_path) == []
        finally:
            tmp_path.chmod(0o700)
        return
    # root writes anywhere: let an unprivileged child try, in a directory it may enter but not write
    directory = Path(tempfile.mkdtemp(prefix="instruction-ro-"))
    try:
        directory.chmod(0o755)
        env = {**os.environ, "PYTHONPATH": str(Path(recovery_package.__file__).parents[1])}
        r = subprocess.run([sys.executable, "-c", WRITE_AS_NOBODY, directory], user=65534, group=65534,
                           extra_groups=[], cwd="/", env=env, capture_output=True, text=True)
        assert r.stdout.startswith("Failed cannot write instruction ") and r.stdout.endswith(": Permission denied\n"), r
        assert os.listdir(directory) == []
    finally:
        shutil.rmtree(directory)


def test_read_missing_or_oversized(tmp_path: Path) -> None:
    with pytest.raises(Rejected, match=r"^no update instruction at .*/nothing$"):
        read_instruction(tmp_path / "nothing")
    (tmp_path / "big").write_bytes(block() * 2)
    with pytest.raises(Rejected, match="is larger than 1024 bytes"):
        read_instruction(tmp_path / "big")
    with pytest.raises(Rejected, match="^cannot read instruction"):
        read_instruction(tmp_path)


def test_clear_try(tmp_path: Path) -> None:
    path = tmp_path / "update-instruction"
    with pytest.raises(Rejected, match="^no update instruction at"):
        clear_try(path)
    path.write_bytes(block(recovery_try="3"))
    assert clear_try(path) == parse_instruction(block())
    assert path.read_bytes() == block()
    assert os.listdir(tmp_path) == ["update-instruction"]
    inode = path.stat().st_ino
    clear_try(path)  # nothing to clear: the file is left alone
    assert path.stat().st_ino == inode


@pytest.mark.parametrize("garbage", ["x", "0", "4", "99999999999999999999", ""])
def test_clear_try_clears_a_counter_grub_cannot_read(tmp_path: Path, garbage: str) -> None:
    path = tmp_path / "update-instruction"
    path.write_bytes(block(recovery_try=garbage))
    with pytest.raises(Rejected, match="recovery_try"):
        parse_instruction(path.read_bytes())
    assert clear_try(path) == parse_instruction(block())
    assert path.read_bytes() == block()


def test_clear_try_refuses_a_malformed_instruction(tmp_path: Path) -> None:
    path = tmp_path / "update-instruction"
    path.write_bytes(block(recovery_try="2", recovery_sha256="bad"))
    with pytest.raises(Rejected, match="recovery_sha256"):
        clear_try(path)
    assert path.read_bytes() == block(recovery_try="2", recovery_sha256="bad")


# --- the CLI ------------------------------------------------------------------------------------------


def recovery(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RECOVERY, *map(str, args)], capture_output=True, text=True)


def test_cli_write_then_show(tmp_path: Path) -> None:
    path = tmp_path / "update-instruction"
    r = recovery("instruction", "write", path, "--disk", "PARTLABEL=storage", "--file", "/bundles/a.bundle",
                 "--sha256", SHA, "--version", "2.0.0", "--created", "2026-01-02T03:04:05Z")
    assert r.returncode == 0, r.stderr
    r = recovery("instruction", "show", path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "recovery_action=install",
        "recovery_disk=PARTLABEL=storage",
        "recovery_file=/bundles/a.bundle",
        f"recovery_sha256={SHA}",
        "recovery_version=2.0.0",
        "recovery_created=2026-01-02T03:04:05Z",
    ]
    r = recovery("instruction", "show", path, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "action": "install", "disk": "PARTLABEL=storage", "file": "/bundles/a.bundle", "sha256": SHA,
        "version": "2.0.0", "created": "2026-01-02T03:04:05Z", "try_count": None,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--disk", "PARTLABEL=storage", "--file", "/a", "--sha256", "ABC", "--version", "1"],
         "rejected: instruction: recovery_sha256 is not 64 lowercase hex digits"),
        (["--disk", "sdb1", "--file", "/a", "--sha256", SHA, "--version", "1"],
         "rejected: instruction: unknown disk spec"),
        (["--disk", "LABEL=s", "--file", "/a/../b", "--sha256", SHA, "--version", "1"],
         "rejected: instruction: recovery_file"),
    ],
)
def test_cli_write_rejects_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    r = recovery("instruction", "write", tmp_path / "i", *args)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(message)
    assert os.listdir(tmp_path) == []


def test_cli_show_malformed_and_missing(tmp_path: Path) -> None:
    (tmp_path / "i").write_bytes(block(recovery_try="9"))
    r = recovery("instruction", "show", tmp_path / "i")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == ["rejected: instruction: recovery_try '9' is not 1 to 3"]
    r = recovery("instruction", "show", tmp_path / "none", "--json")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"rejected: no update instruction at {tmp_path / 'none'}"]


def test_cli_usage_error(tmp_path: Path) -> None:
    r = recovery("instruction", "write", tmp_path / "i", "--disk", "LABEL=s", "--file", "/a", "--version", "1")
    assert r.returncode == 2 and "--sha256" in r.stderr
    assert os.listdir(tmp_path) == []


# --- recovery_allow_downgrade (issue 10, item 5) ----------------------------------------------------


def test_allow_downgrade_round_trips_and_is_absent_by_default() -> None:
    plain = parse_instruction(block())
    assert plain.allow_downgrade is False and "allow_downgrade" not in plain.to_dict()
    i = parse_instruction(block(recovery_allow_downgrade="1"))
    assert i.allow_downgrade is True and i.extra == ()
    assert i.to_env()["recovery_allow_downgrade"] == "1" and i.to_dict()["allow_downgrade"] is True
    made = Instruction.create(disk="PARTLABEL=storage", file="/b/x.bundle", sha256=SHA, version="1.0.0",
                              allow_downgrade=True)
    assert parse_instruction(made.to_block()) == made
    assert b"\nrecovery_allow_downgrade=1\n" in made.to_block()


@pytest.mark.parametrize("value", ["0", "yes", "true", "", " 1", "11"])
def test_allow_downgrade_takes_only_1(value: str) -> None:
    with pytest.raises(Rejected, match=r"^instruction: recovery_allow_downgrade '.*' is not 1$"):
        parse_instruction(block(recovery_allow_downgrade=value))


def test_allow_downgrade_is_not_an_extra_key() -> None:
    with pytest.raises(Rejected, match="is one of the instruction's own"):
        Instruction(Action.install, DiskSpec.parse("PARTLABEL=storage"), PurePosixPath("/b/x.bundle"), SHA, "1.0.0",
                    None, None, extra=(("recovery_allow_downgrade", "1"),))


def test_allow_downgrade_leaves_room_for_grub_to_count() -> None:
    # The key's line takes 27 bytes: an instruction with 26 bytes to spare beyond GRUB's room
    # leaves GRUB too little with it, and is refused rather than written.
    file = "/" + "f" * 511
    key_line = len("recovery_allow_downgrade=1\n")

    def used(label: str) -> int:
        i = Instruction(Action.install, DiskSpec.parse(f"LABEL={label}"), PurePosixPath(file), SHA, "2.0.0", None, None)
        return len(format_envblock(i.to_env()).rstrip(b"#"))
    label = "d" * (1024 - TRY_ROOM - (key_line - 1) - used("d") + 1)
    assert used(label) == 1024 - TRY_ROOM - (key_line - 1)
    exact = Instruction(Action.install, DiskSpec.parse(f"LABEL={label}"), PurePosixPath(file), SHA, "2.0.0", None, None)
    assert parse_instruction(exact.to_block()) == exact
    with pytest.raises(Rejected, match=f"GRUB needs {TRY_ROOM} free bytes"):
        replace(exact, allow_downgrade=True).to_block()


def test_cli_write_allow_downgrade(tmp_path: Path) -> None:
    path = tmp_path / "update-instruction"
    r = recovery("instruction", "write", path, "--disk", "PARTLABEL=storage", "--file", "/bundles/a.bundle",
                 "--sha256", SHA, "--version", "0.9.0", "--allow-downgrade")
    assert r.returncode == 0, r.stderr
    assert read_instruction(path).allow_downgrade
    r = recovery("instruction", "show", path, "--json")
    assert json.loads(r.stdout)["allow_downgrade"] is True
