"""The GRUB environment block against the real grub-editenv, in both directions, byte for byte."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recovery.core.errors import Rejected
from recovery.core.envblock import ENVBLK_HEADER, ENVBLK_SIZE, format_envblock, parse_envblock
from recovery.core.instruction import Instruction, clear_try, read_instruction, write_instruction

GRUB_EDITENV = shutil.which("grub-editenv")
pytestmark = pytest.mark.skipif(GRUB_EDITENV is None, reason="needs grub-editenv (Debian package grub-common)")

# Everything grub-editenv treats specially, and some it does not.
SPECIAL = {
    "backslash": "a\\b",
    "newline": "line1\nline2",
    "trailing_backslash": "ends\\",
    "backslash_newline": "x\\\ny",
    "double_backslash": "\\\\",
    "lone_newline": "\n",
    "equals": "x=y=z",
    "hash": "#not a comment",
    "blanks": "  two  spaces ",
    "tab_cr": "tab\there\r",
    "empty": "",
    "unicode": "grüße ✓",
    "quote": "it's \"quoted\" $HOME `x`",
}


def editenv(path: Path, *args: str) -> bytes:
    assert GRUB_EDITENV is not None
    return subprocess.run([GRUB_EDITENV, str(path), *args], check=True, capture_output=True).stdout


def listing(env: Mapping[str, str]) -> bytes:
    """What `grub-editenv list` prints for these variables."""
    return "".join(f"{k}={v}\n" for k, v in env.items()).encode()


def grub_block(tmp_path: Path, *commands: Sequence[str]) -> bytes:
    """A block made by grub-editenv alone: `create`, then each command (`set k=v …`, `unset k`)."""
    path = tmp_path / "grubenv"
    path.unlink(missing_ok=True)
    editenv(path, "create")
    for command in commands:
        editenv(path, *command)
    return path.read_bytes()


def test_our_block_lists_the_same_in_grub_editenv(tmp_path: Path) -> None:
    block = format_envblock(SPECIAL)
    assert len(block) == ENVBLK_SIZE and block.startswith(ENVBLK_HEADER)
    path = tmp_path / "ours"
    path.write_bytes(block)
    assert editenv(path, "list") == listing(SPECIAL)


def test_our_block_equals_grub_editenv_create_and_set(tmp_path: Path) -> None:
    made = grub_block(tmp_path, ["set", *(f"{k}={v}" for k, v in SPECIAL.items())])
    assert format_envblock(SPECIAL) == made


def test_empty_block_equals_grub_editenv_create(tmp_path: Path) -> None:
    made = grub_block(tmp_path)
    assert parse_envblock(made) == {}
    assert format_envblock({}) == made


def test_grub_editenv_blocks_parse_to_the_same_values(tmp_path: Path) -> None:
    # one `set` per variable, as an operator would type them
    made = grub_block(tmp_path, *(["set", f"{k}={v}"] for k, v in SPECIAL.items()))
    assert parse_envblock(made) == SPECIAL
    assert format_envblock(parse_envblock(made)) == made


def test_grub_editenv_rewrites_in_place_parse_and_round_trip(tmp_path: Path) -> None:
    made = grub_block(
        tmp_path,
        ["set", "a=1", "b=short", "c=x\\y"],
        ["set", "b=much longer\nvalue\\"],  # grows in place, moves c
        ["unset", "a"],
        ["set", "recovery_try=1"],
        ["set", "recovery_try=2"],
        ["set", "c=z"],  # shrinks in place
    )
    expected = {"b": "much longer\nvalue\\", "c": "z", "recovery_try": "2"}
    assert parse_envblock(made) == expected
    assert format_envblock(expected) == made


def test_grub_counts_tries_in_our_instruction(tmp_path: Path) -> None:
    path = tmp_path / "update-instruction"
    write_instruction(path, Instruction.create("PARTLABEL=storage", "/bundles/a.bundle", "0" * 64, "2.0.0"))
    for n in (1, 2, 3):
        editenv(path, "set", f"recovery_try={n}")  # the same envblk code GRUB's save_env runs
        assert read_instruction(path).try_count == n
    assert b"recovery_try=3\n" in path.read_bytes()


def test_clear_try_equals_grub_editenv_unset(tmp_path: Path) -> None:
    path = tmp_path / "update-instruction"
    created = "2026-01-01T00:00:00Z"
    write_instruction(path, Instruction.create("LABEL=storage", "/b/a.bundle", "1" * 64, "2.0.0", created))
    editenv(path, "set", "operator_note=kept\\ here")  # an extra key someone added
    editenv(path, "set", "recovery_try=2")
    reference = tmp_path / "reference"
    shutil.copyfile(path, reference)
    editenv(reference, "unset", "recovery_try")

    assert clear_try(path).try_count is None
    assert path.read_bytes() == reference.read_bytes()
    assert read_instruction(path).extra == (("operator_note", "kept\\ here"),)


def test_value_that_does_not_fit_is_rejected(tmp_path: Path) -> None:
    room = ENVBLK_SIZE - len(format_envblock({}).rstrip(b"#"))
    fits = {"k": "v" * (room - len("k=\n"))}
    assert format_envblock(fits).endswith(b"v\n")  # full to the last byte, no padding
    with pytest.raises(Rejected, match=r"environment block: the variables take \d+ bytes, only \d+ fit"):
        format_envblock({"k": "v" * (room - len("k=\n") + 1)})
    with pytest.raises(Rejected, match="only"):
        format_envblock({"k": "\\" * room})  # every backslash doubles
    # grub-editenv agrees about what fits
    path = tmp_path / "full"
    path.write_bytes(format_envblock({}))
    editenv(path, "set", f"k={fits['k']}")
    assert path.read_bytes() == format_envblock(fits)


@pytest.mark.parametrize("key", ["", "a=b", "a\nb", "#comment"])
def test_unusable_names_are_rejected(key: str) -> None:
    with pytest.raises(Rejected, match="not a usable variable name"):
        format_envblock({key: "v"})


def test_nul_in_a_value_is_rejected() -> None:
    with pytest.raises(Rejected, match="NUL"):
        format_envblock({"k": "a\0b"})


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="=\n\0"), min_size=1, max_size=12
).filter(lambda k: not k.startswith(("#", "-")))  # "-x=1" would be an option
values = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env=st.dictionaries(names, values, max_size=6))
def test_any_env_round_trips_through_grub_editenv(tmp_path: Path, env: dict[str, str]) -> None:
    try:
        ours = format_envblock(env)
    except Rejected:
        return  # too long for one block
    path = tmp_path / "ours"
    path.write_bytes(ours)
    assert editenv(path, "list") == listing(env)
    made = grub_block(tmp_path, ["set", *(f"{k}={v}" for k, v in env.items())])
    assert made == ours
    assert parse_envblock(made) == env


def test_blocks_we_refuse_for_broken_free_space_break_grub_too(tmp_path: Path) -> None:
    """Why we reject them: GRUB's save_env could not count tries in these blocks."""
    base = (ENVBLK_HEADER + b"a=1\n").ljust(ENVBLK_SIZE, b"#")
    junk_in_padding = base[:600] + b"x" + base[601:]
    swallowing_comment = (ENVBLK_HEADER + b"a=1\n#\\\n").ljust(ENVBLK_SIZE, b"#")
    for data in (junk_in_padding, swallowing_comment):
        with pytest.raises(Rejected, match="the free space at its end is broken"):
            parse_envblock(data)
    path = tmp_path / "grubenv"
    path.write_bytes(junk_in_padding)
    assert subprocess.run([GRUB_EDITENV or "", str(path), "set", "recovery_try=1"], capture_output=True).returncode != 0
    path.write_bytes(swallowing_comment)
    editenv(path, "set", "recovery_try=1")  # "succeeds", but the line lands inside the comment
    assert editenv(path, "list") == b"a=1\n"


def test_comments_and_stray_escapes_read_as_grub_reads_them(tmp_path: Path) -> None:
    body = b"# a comment with = sign\nk=a\\xb\n# c\\\nhidden=1\nlast=\\\\\n"
    data = (ENVBLK_HEADER + body).ljust(ENVBLK_SIZE, b"#")
    path = tmp_path / "grubenv"
    path.write_bytes(data)
    assert parse_envblock(data) == {"k": "axb", "last": "\\"}
    assert editenv(path, "list") == listing(parse_envblock(data))


def test_an_empty_line_is_part_of_the_next_name_for_grub(tmp_path: Path) -> None:
    """Why we reject empty lines: GRUB does not skip them."""
    data = (ENVBLK_HEADER + b"a=1\n\nb=2\n").ljust(ENVBLK_SIZE, b"#")
    path = tmp_path / "grubenv"
    path.write_bytes(data)
    assert editenv(path, "list") == b"a=1\n\nb=2\n"  # a name "\nb", not "b"
    with pytest.raises(Rejected, match="empty line at byte 29"):
        parse_envblock(data)


def test_allow_downgrade_reads_the_same_in_grub_editenv_and_grub_still_counts(tmp_path: Path) -> None:
    path = tmp_path / "update-instruction"
    made = Instruction.create("PARTLABEL=storage", "/bundles/a.bundle", "0" * 64, "0.9.0",
                              "2026-01-01T00:00:00Z", allow_downgrade=True)
    write_instruction(path, made)
    assert b"recovery_allow_downgrade=1\n" in editenv(path, "list")
    reference = grub_block(tmp_path, ["set", *(f"{k}={v}" for k, v in made.to_env().items())])
    assert path.read_bytes() == reference  # byte for byte what grub-editenv writes
    for n in (1, 2, 3):
        editenv(path, "set", f"recovery_try={n}")
        again = read_instruction(path)
        assert (again.try_count, again.allow_downgrade) == (n, True)
    assert clear_try(path).allow_downgrade
