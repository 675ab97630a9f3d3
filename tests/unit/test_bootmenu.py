"""The boot menu's decision (recovery/core/bootmenu.py) against bootloader/recovery.cfg, and its model of
GRUB's environment blocks against real `grub-editenv` (the same lib/envblk.c as GRUB's load_env/save_env)."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mkimage.grub import BOOTLOADER
from recovery.core.bootmenu import (
    GRUBENV,
    INSTRUCTION,
    RECOVERY_NEXT,
    SLOT,
    TRIAL,
    TRIAL_NEXT,
    Entry,
    decide,
    grub_block,
    grub_variables,
    load_env,
    save_env,
)
from recovery.core.envblock import ENVBLK_HEADER, format_envblock, parse_envblock
from recovery.core.errors import Rejected
from recovery.core.instruction import Instruction

needs_editenv = pytest.mark.skipif(shutil.which("grub-editenv") is None,
                                   reason="needs grub-editenv (grub-common): make setup installs it")
SIG = ENVBLK_HEADER
RECOVERY_CFG = (BOOTLOADER / "recovery.cfg").read_text()
GRUB_CFG = (BOOTLOADER / "grub.cfg").read_text()


class EditEnv:
    """Blocks made and changed by the real grub-editenv."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.n = directory, 0

    def _file(self, data: bytes | None = None) -> Path:
        self.n += 1
        path = self.directory / f"block{self.n}"
        if data is not None:
            path.write_bytes(data)
        return path

    def make(self, **variables: str) -> bytes:
        path = self._file()
        subprocess.run(["grub-editenv", str(path), "create"], check=True)
        if variables:
            subprocess.run(["grub-editenv", str(path), "set", *(f"{k}={v}" for k, v in variables.items())],
                           check=True)
        return path.read_bytes()

    def list(self, data: bytes) -> bytes | None:
        proc = subprocess.run(["grub-editenv", str(self._file(data)), "list"], capture_output=True, check=False)
        return proc.stdout if proc.returncode == 0 else None

    def set(self, data: bytes, name: str, value: str) -> bytes | None:
        path = self._file(data)
        proc = subprocess.run(["grub-editenv", str(path), "set", f"{name}={value}"], capture_output=True, check=False)
        return path.read_bytes() if proc.returncode == 0 else None


@pytest.fixture
def editenv(tmp_path: Path) -> EditEnv:
    return EditEnv(tmp_path)


def instruction(**extra: str) -> bytes:
    block = Instruction.create("PARTLABEL=storage", "/bundles/demo-2.0.0.bundle", "ab" * 32, "2.0.0",
                               "2025-01-01T00:00:00Z").to_block()
    if not extra:
        return block
    env = parse_envblock(block)
    env.update(extra)
    return format_envblock(env)


# --- GRUB's reading and writing, byte for byte ------------------------------------------------------

_rng = random.Random(18)
ODD_BLOCKS = {
    "ours": instruction(recovery_try="2"),
    "short": SIG + b"a=1\n" + b"#" * 16,
    "long": (SIG + b"a=1\nrecovery_try=1\n").ljust(2048, b"#"),
    "signature only": SIG,
    "signature and one byte": SIG + b"#",
    "unsigned": b"# GRUB Environment Blocc\n" + b"recovery_try=1\n".ljust(999, b"#"),
    "garbage": bytes(_rng.randrange(256) for _ in range(1024)),
    "empty": b"",
    "zeros": bytes(1024),
    "no final newline": SIG + b"a=1\nb=2",
    "name to the end": SIG + b"a=1\nno equals sign here",
    "empty line": SIG + b"a=1\n\nrecovery_try=2\n" + b"#" * 40,
    "twice": SIG + b"recovery_try=1\nrecovery_try=3\n" + b"#" * 40,
    "nul": SIG + b"recovery_try=2\0tail\nrec\0overy_try=9\n" + b"#" * 40,
    "escapes": SIG + b"a=x\\\ny\nrecovery_try=\\1\nb=c\\\\\n" + b"#" * 40,
    "backslash at the end": SIG + b"a=1\nb=\\",
    "no room": SIG + b"a=" + b"x" * (1024 - len(SIG) - 3) + b"\n",
    "broken free space": SIG + b"a=1" + b"#" * 40,
    "value to set is longer": SIG + b"recovery_try=\nz=1\n" + b"#" * 40,
    "value to set is shorter": SIG + b"recovery_try=1234\nz=1\n" + b"#" * 40,
    "comment with an escaped newline": SIG + b"# x\\\nrecovery_try=3\nrecovery_try=1\n" + b"#" * 40,
    "half a block": instruction()[:600],
}


@needs_editenv
@pytest.mark.parametrize("name", sorted(ODD_BLOCKS))
def test_load_env_reads_what_grub_reads(editenv, name):
    data = ODD_BLOCKS[name]
    listed = editenv.list(data)
    assert (load_env(data) is not None) == (listed is not None) == grub_block(data)
    if listed is not None:
        ours = b"".join(f"{k}={v}\n".encode("latin-1") for k, v in grub_variables(data))
        assert ours == listed


@needs_editenv
@pytest.mark.parametrize("value", ["2", "", "3210"])
@pytest.mark.parametrize("name", sorted(ODD_BLOCKS))
def test_save_env_writes_what_grub_writes(editenv, name, value):
    data = ODD_BLOCKS[name]
    assert save_env(data, "recovery_try", value) == editenv.set(data, "recovery_try", value)


def test_a_missing_file_cannot_be_read_or_counted_in():
    # grub-editenv would create it; GRUB's load_env and save_env fail
    assert load_env(None) is None and save_env(None, "recovery_try", "1") is None


def test_where_grub_is_more_lenient_than_our_parser():
    """Every one of these GRUB reads (load_env succeeds); parse_envblock refuses them all."""
    lenient = ["short", "long", "no final newline", "name to the end", "empty line", "twice", "nul",
               "signature and one byte", "broken free space", "half a block"]
    for name in lenient:
        assert load_env(ODD_BLOCKS[name]) is not None, name
        with pytest.raises(Rejected):
            parse_envblock(ODD_BLOCKS[name])
    assert load_env(ODD_BLOCKS["twice"]) == {"recovery_try": "3"}  # the last one wins
    assert load_env(ODD_BLOCKS["nul"], "recovery_try") == {"recovery_try": "2"}  # C strings
    assert load_env(ODD_BLOCKS["empty line"]) == {"a": "1", "\nrecovery_try": "2"}  # no empty lines


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True),
                       st.text(st.characters(blacklist_characters="\0", max_codepoint=0x2FF), max_size=20),
                       max_size=8))
def test_what_our_parser_accepts_grub_reads_alike(env):
    block = format_envblock(env)
    assert {k: v.encode("latin-1").decode("utf-8") for k, v in load_env(block).items()} == parse_envblock(block)


@given(st.integers(0, 1023), st.integers(0, 255))
def test_a_changed_byte_that_our_parser_still_accepts_reads_alike_in_grub(position, byte):
    block = bytearray(instruction(recovery_try="1"))
    block[position] = byte
    try:
        ours = parse_envblock(bytes(block))
    except Rejected:
        return
    grubs = load_env(bytes(block))
    assert grubs is not None
    assert {k: v.encode("latin-1").decode("utf-8") for k, v in grubs.items()} == ours


# --- the decision, branch by branch (bootloader/recovery.cfg) ----------------------------------------


@needs_editenv
def test_an_instruction_is_a_recovery_try_counted_in_it(editenv):
    block = instruction()
    d = decide({INSTRUCTION: block, GRUBENV: editenv.make(), SLOT: editenv.make(recovery_slot="a")})
    assert (d.entry, d.count, d.recovery_try, d.slots, d.fallback) == (Entry.recovery, 1, "1", ("a", "b"), Entry.rescue)
    assert d.save is not None and d.save.file == INSTRUCTION and d.save.block == editenv.set(block, "recovery_try", "1")
    assert d.args == ("recovery.try=1", "recovery.slot=a", "panic=10", "console=tty0", "console=ttyS0,115200")


@pytest.mark.parametrize("before,after,first_slot", [("1", 2, "a"), ("2", 3, "b")])
def test_tries_two_and_three_the_third_from_the_other_slot(before, after, first_slot):
    d = decide({INSTRUCTION: instruction(recovery_try=before)})
    assert (d.entry, d.count, d.save.value, d.slot) == (Entry.recovery, after, str(after), first_slot)
    assert f"recovery.try={after}" in d.args and f"recovery.slot={first_slot}" in d.args


@needs_editenv
def test_past_three_tries_the_rescue_shell_with_the_count(editenv):
    d = decide({INSTRUCTION: instruction(recovery_try="3"), SLOT: editenv.make(recovery_slot="b")})
    assert (d.entry, d.save, d.count, d.slots) == (Entry.rescue, None, 3, ("a", "b"))  # try 3: not the active b
    assert d.args[:2] == ("recovery.mode=rescue", "recovery.try=3")


@pytest.mark.parametrize("garbage", ["7", "x", "0", "01"])
def test_a_garbage_counter_is_the_rescue_shell_without_a_count(garbage):
    d = decide({INSTRUCTION: SIG + f"recovery_try={garbage}\n".encode() + b"#" * 100})
    assert (d.entry, d.count, d.save, d.slot) == (Entry.rescue, None, None, "a")
    assert d.args[:2] == ("recovery.mode=rescue", "recovery.slot=a")


def test_an_empty_counter_is_the_first_try():
    d = decide({INSTRUCTION: SIG + b"recovery_try=\n" + b"#" * 100})
    assert (d.entry, d.count) == (Entry.recovery, 1)
    assert d.save.block.startswith(SIG + b"recovery_try=1\n#")


@needs_editenv
@pytest.mark.parametrize("garbage", ["garbage", "unsigned", "empty", "zeros", "signature only"])
def test_an_instruction_grub_cannot_read_is_counted_in_grubenv(editenv, garbage):
    grubenv = editenv.make()
    d = decide({INSTRUCTION: ODD_BLOCKS[garbage], GRUBENV: grubenv})
    assert (d.entry, d.save.file, d.count) == (Entry.recovery, GRUBENV, 1)
    assert d.save.block == editenv.set(grubenv, "recovery_try", "1")
    later = decide({INSTRUCTION: ODD_BLOCKS[garbage], GRUBENV: editenv.make(recovery_try="3")})
    assert (later.entry, later.count, later.save) == (Entry.rescue, 3, None)


def test_a_garbage_instruction_without_grubenv_cannot_be_counted():
    # recovery_try is set to the next count before save_env fails: the rescue entry passes it on
    d = decide({INSTRUCTION: ODD_BLOCKS["garbage"]})
    assert (d.entry, d.save.file, d.save.ok, d.count) == (Entry.rescue, GRUBENV, False, 1)
    assert d.args[:2] == ("recovery.mode=rescue", "recovery.try=1")


def test_an_instruction_without_room_for_the_counter_is_the_rescue_shell():
    d = decide({INSTRUCTION: ODD_BLOCKS["no room"]})
    assert (d.entry, d.save.ok) == (Entry.rescue, False)


def test_a_write_failure_the_bytes_do_not_show_is_the_callers_to_say():
    d = decide({INSTRUCTION: instruction()}, save_fails={INSTRUCTION})
    assert (d.entry, d.save.ok, d.count) == (Entry.rescue, False, 1)


@needs_editenv
def test_no_instruction_no_trial_is_the_system(editenv):
    for files in ({}, {GRUBENV: editenv.make()}, {TRIAL: editenv.make()}, {TRIAL: editenv.make(trial_boot="2")}):
        d = decide(files)
        assert (d.entry, d.fallback, d.save, d.trial_boot, d.slots) == (Entry.system, Entry.rescue, None, None, ())
        assert d.args == ("root=PARTLABEL=system", "rw", "quiet", "panic=10", "console=tty0", "console=ttyS0,115200")


def test_no_menu_in_either_slot_is_the_stubs_rescue_entry():
    stub = (BOOTLOADER / "stub.cfg").read_text()
    d = decide({INSTRUCTION: instruction()}, menu_found=False)
    assert (d.entry, d.save, d.count, d.slots) == (Entry.rescue, None, None, ("a", "b"))
    assert 'for slot in a b; do\n            if linux "($recoverydev)/$slot/vmlinuz" ' \
        'recovery.mode=rescue "recovery.slot=$slot" panic=10 console=tty0 console=ttyS0,115200' in stub
    assert d.args == ("recovery.mode=rescue", "recovery.slot=a", "panic=10", "console=tty0", "console=ttyS0,115200")


def test_no_cfg_at_all_is_the_system():
    d = decide({INSTRUCTION: instruction()}, cfg_found=False)
    assert (d.entry, d.save) == (Entry.system, None)


@needs_editenv
def test_on_trial_grub_counts_the_boot_and_watches_the_system(editenv):
    trial = editenv.make(trial_max="3")
    d = decide({TRIAL: trial})
    assert (d.entry, d.fallback, d.trial_boot, d.save.file) == (Entry.system, Entry.rollback, 1, TRIAL)
    assert d.save.block == editenv.set(trial, "trial_boot", "1")
    assert "systemd.watchdog_sec=30" in d.args


@needs_editenv
@pytest.mark.parametrize("boot", range(1, 9))
def test_the_trial_chain(editenv, boot):
    d = decide({TRIAL: editenv.make(trial_max="9", trial_boot=str(boot))})
    assert (d.entry, d.trial_boot) == (Entry.system, boot + 1)


@needs_editenv
def test_past_the_last_trial_boot_the_rollback_counted_in_grubenv(editenv):
    grubenv = editenv.make()
    for most in ("1", "3", "9"):
        d = decide({TRIAL: editenv.make(trial_max=most, trial_boot=most), GRUBENV: grubenv})
        assert (d.entry, d.count, d.save.file, d.fallback) == (Entry.rollback, 1, GRUBENV, Entry.rescue)
        assert d.save.block == editenv.set(grubenv, "recovery_try", "1")
        assert d.args[:2] == ("recovery.mode=rollback", "recovery.try=1")
    third = decide({TRIAL: editenv.make(trial_max="3", trial_boot="3"), GRUBENV: editenv.make(recovery_try="2")})
    assert (third.entry, third.count, third.slot) == (Entry.rollback, 3, "b")
    done = decide({TRIAL: editenv.make(trial_max="3", trial_boot="3"), GRUBENV: editenv.make(recovery_try="3")})
    assert (done.entry, done.count) == (Entry.rescue, 3)


@needs_editenv
@pytest.mark.parametrize("variables", [{"trial_max": "3", "trial_boot": "x"}, {"trial_max": "9", "trial_boot": "9"},
                                       {"trial_max": "3", "trial_boot": "10"}])
def test_a_counter_outside_the_chain_is_the_rollback(editenv, variables):
    assert decide({TRIAL: editenv.make(**variables), GRUBENV: editenv.make()}).entry is Entry.rollback


@needs_editenv
def test_past_trial_max_but_in_the_chain_grub_counts_on(editenv):
    # GRUB compares with trial_max only for equality: 4 of 3 counts a fifth boot (the checker flags such a block)
    d = decide({TRIAL: editenv.make(trial_max="3", trial_boot="4")})
    assert (d.entry, d.trial_boot) == (Entry.system, 5)


@pytest.mark.parametrize("trial", ["garbage", "empty", "unsigned"])
def test_a_trial_block_grub_cannot_read_is_the_rollback(trial):
    d = decide({TRIAL: ODD_BLOCKS[trial], GRUBENV: format_envblock({})})
    assert (d.entry, d.count) == (Entry.rollback, 1)


def test_a_trial_boot_grub_cannot_count_is_the_rescue_shell():
    full = SIG + b"trial_max=3\n" + b"x=" + b"y" * (1024 - len(SIG) - 12 - 3) + b"\n"
    assert len(full) == 1024
    d = decide({TRIAL: full})
    assert (d.entry, d.save.ok, d.count, d.trial_boot, d.fallback) == (Entry.rescue, False, None, None, Entry.rescue)
    assert decide({TRIAL: format_envblock({"trial_max": "3"})}, save_fails={TRIAL}).entry is Entry.rescue


@needs_editenv
def test_an_instruction_comes_before_the_trial(editenv):
    d = decide({INSTRUCTION: instruction(), TRIAL: editenv.make(trial_max="3", trial_boot="3")})
    assert (d.entry, d.save.file) == (Entry.recovery, INSTRUCTION)


@needs_editenv
def test_the_active_slot(editenv):
    cases = {None: "a", b"": "a", ODD_BLOCKS["garbage"]: "a", editenv.make(recovery_slot="b"): "b",
             editenv.make(recovery_slot="c"): "a", SIG + b"recovery_slot=b\nrecovery_slot=a\n#": "a",
             SIG + b"recovery_slot=a\nrecovery_slot=b\n#": "b"}
    for block, active in cases.items():
        assert decide({INSTRUCTION: instruction(), SLOT: block}).slots == (active, "b" if active == "a" else "a")


# --- the model follows the scripts ------------------------------------------------------------------


def test_the_model_has_the_scripts_chains_and_entries():
    chain = dict(re.findall(r'\[ "\$recovery_try" = (\d) \]; then\n\s*set recovery_next=(\d)', RECOVERY_CFG))
    assert re.search(r'\[ -z "\$recovery_try" \]; then\n\s*set recovery_next=1\n', RECOVERY_CFG)
    assert {"": "1", **chain} == RECOVERY_NEXT
    assert dict(re.findall(r'\[ "\$trial_boot" = (\d) \]; then\n\s*set trial_next=(\d)', RECOVERY_CFG)) == TRIAL_NEXT
    ids = re.findall(r"^menuentry .* --id (\S+) \{", GRUB_CFG + RECOVERY_CFG, re.MULTILINE)
    assert ids == [e.value for e in Entry]
    assert re.findall(r"^set fallback=(\d)$", GRUB_CFG, re.MULTILINE) == [str(Entry.rescue.number)]
    assert re.findall(r"^    set fallback=(\d)$", GRUB_CFG, re.MULTILINE) == [str(Entry.rollback.number)]
    for files in ({}, {TRIAL: format_envblock({"trial_max": "3"})}):
        assert f'"($systemdev)/boot/vmlinuz" {" ".join(decide(files).args)}\n' in GRUB_CFG
    assert '"$@" "recovery.slot=$slot" panic=10 console=tty0 console=ttyS0,115200' in RECOVERY_CFG
    assert 'recovery_boot recovery.mode=rollback "recovery.try=$recovery_count"' in RECOVERY_CFG
    assert 'recovery_boot recovery.mode=rescue "recovery.try=$recovery_count"' in RECOVERY_CFG
    assert 'if [ "$recovery_count" = 3 ]; then\n        set recovery_order="$recovery_standby $recovery_active"' \
        in RECOVERY_CFG
