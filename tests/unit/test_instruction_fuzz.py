"""Fuzzing the instruction parser: whatever the bytes, the answer is an Instruction or `Rejected`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from recovery.core.errors import Rejected
from recovery.core.envblock import ENVBLK_HEADER, ENVBLK_SIZE, format_envblock, parse_envblock
from recovery.core.instruction import Instruction, parse_instruction

VALID = Instruction.create(
    "PARTLABEL=storage", "/bundles/demo-appliance-2.0.0.bundle", "ab" * 32, "2.0.0", "2026-01-02T03:04:05Z"
).to_block()
# bytes that mean something to the parser, so mutations hit its branches more often than chance would
SPECIAL_BYTES = b"#=\n\\\0\xff 0123abcdef/.-_recovery_tryPARTLABEL"


def check(data: bytes) -> None:
    """The parser's contract: an Instruction or a one-line `Rejected` saying it is the instruction."""
    try:
        instruction = parse_instruction(data)
    except Rejected as e:
        assert str(e).startswith("instruction: ") and "\n" not in str(e)
        return
    # whatever it accepted, it can write back and read again to the same instruction
    assert parse_instruction(instruction.to_block()) == instruction


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, ENVBLK_SIZE - 1))
        match draw(st.sampled_from(["set", "insert", "delete"])):
            case "set":
                data[pos] = draw(st.sampled_from(SPECIAL_BYTES) | st.integers(0, 255))
            case "insert":  # keep the size, so the deeper checks are reached
                data[pos:pos] = bytes([draw(st.sampled_from(SPECIAL_BYTES))])
                del data[-1]
            case "delete":
                del data[pos]
                data.append(ord("#"))
    return bytes(data)


pieces = st.sampled_from([b"recovery_try=", b"k=", b"#", b"=", b"\n", b"\\", b"a", b"\xc3", b"1\n", b"\\\n"])
bodies = st.lists(pieces | st.binary(max_size=8), max_size=40)


@settings(deadline=None)
@given(st.binary(max_size=1100))
@example(b"")
@example(VALID[:-1])
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@settings(deadline=None)
@given(bodies)
def test_arbitrary_blocks_with_the_right_header_and_size(parts: list[bytes]) -> None:
    check((ENVBLK_HEADER + b"".join(parts))[:ENVBLK_SIZE].ljust(ENVBLK_SIZE, b"#"))


@settings(deadline=None)
@given(mutated())
def test_mutations_of_a_valid_block(data: bytes) -> None:
    check(data)


GRUB_EDITENV = shutil.which("grub-editenv")


# blocks of mostly well-formed lines, so that the differential test below mostly compares accepted blocks
fragments = st.sampled_from([b"a", b"b", b"=", b"#", b" ", b"\\", b"\\\\", b"\\\n", b"\\x", b"\n", b"\xc3\xa9"])
names_ = st.lists(st.sampled_from([b"a", b"b", b"_", b"\\", b"#", b"\n", b" "]), min_size=1, max_size=3).map(b"".join)
lines = st.one_of(
    st.just(b"\n"),
    st.lists(fragments, max_size=4).map(lambda f: b"#" + b"".join(f) + b"\n"),
    st.tuples(names_, st.lists(fragments, max_size=6)).map(lambda t: t[0] + b"=" + b"".join(t[1]) + b"\n"),
    fragments,
)
structured_blocks = st.lists(lines, max_size=8).map(
    lambda parts: (ENVBLK_HEADER + b"".join(parts))[:ENVBLK_SIZE].ljust(ENVBLK_SIZE, b"#")
)


@pytest.mark.skipif(GRUB_EDITENV is None, reason="needs grub-editenv (Debian package grub-common)")
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated() | structured_blocks)
def test_what_we_accept_grub_reads_the_same(tmp_path: Path, data: bytes) -> None:
    """Differential: every block we parse, grub-editenv lists with exactly our names and values."""
    try:
        env = parse_envblock(data)
    except Rejected:
        return
    path = tmp_path / "grubenv"
    path.write_bytes(data)
    assert GRUB_EDITENV is not None
    listed = subprocess.run([GRUB_EDITENV, str(path), "list"], check=True, capture_output=True).stdout
    assert listed == "".join(f"{k}={v}\n" for k, v in env.items()).encode()
    # GRUB counting a try in it (the same envblk code as save_env) gives what we expect to read then
    counted = subprocess.run([GRUB_EDITENV, str(path), "set", "recovery_try=2"], capture_output=True)
    if counted.returncode == 0:
        assert parse_envblock(path.read_bytes()) == {**env, "recovery_try": "2"}
    else:  # only for want of room
        assert len(data) - len(data.rstrip(b"#")) < len(b"recovery_try=2\n")
    # and what we would write back means the same to us
    try:
        again = format_envblock(env)
    except Rejected:
        return
    assert parse_envblock(again) == env
