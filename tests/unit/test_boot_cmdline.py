"""The recovery's kernel command line, both ends: what GRUB's scripts may put on it, and `Boot.parse`
refusing what they never write (issue 10, item 4: words in the instruction's try counter reached it).
"""

from __future__ import annotations

import re

import pytest

from mkimage.grub import BOOTLOADER
from recovery.os.cmdline import Boot, CommandLineRefused, kernel_parameters
from recovery.os.console import Console
from recovery.os.pid1 import boot_from

CONSOLE = "console=tty0 console=ttyS0,115200"


# --- Boot.parse -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "boot"),
    [
        (f"recovery.try=1 {CONSOLE}\n", Boot(1, False)),
        (f"recovery.try=2 {CONSOLE}", Boot(2, False)),
        (f"recovery.try=3 {CONSOLE}", Boot(3, False)),
        (f"recovery.mode=rescue recovery.try=3 {CONSOLE}", Boot(3, True)),
        (f"recovery.mode=rescue {CONSOLE}", Boot(1, True)),
        (CONSOLE, Boot(1, False)),
        ("", Boot(1, False)),
        # The same word twice says nothing new (an operator appending in GRUB's editor).
        ("recovery.try=2 quiet recovery.try=2", Boot(2, False)),
        ("recovery.mode=rescue recovery.mode=rescue", Boot(1, True)),
        # Parameters that are not ours are the kernel's business, whatever they say.
        ("init=/bin/sh rdinit=/init recoverymode=install x.recovery.try=9 recovery.try=2", Boot(2, False)),
        # Quotes as the kernel reads them.
        ('recovery.try="2"', Boot(2, False)),
        ('"recovery.mode=rescue" recovery.try=1', Boot(1, True)),
        # The slot GRUB loaded the recovery from (bootloader/recovery.cfg: recovery_boot).
        (f"recovery.try=3 recovery.slot=b {CONSOLE}", Boot(3, False, slot="b")),
        ("recovery.mode=rollback recovery.try=1 recovery.slot=a", Boot(1, rollback=True, slot="a")),
    ],
)
def test_grub_command_lines_are_accepted(cmdline: str, boot: Boot) -> None:
    assert Boot.parse(cmdline) == boot


@pytest.mark.parametrize(
    ("cmdline", "reason"),
    [
        # What GRUB's rescue entry put on the command line before the fix (issue 10, item 4).
        (f"recovery.mode=rescue recovery.try=x recovery.mode=install init=/bin/sh {CONSOLE}",
         r"recovery\.try is 'x', not 1, 2 or 3"),
        # Conflicting repeats: whichever counts would be a guess.
        ("recovery.mode=rescue recovery.mode=install", r"recovery\.mode given twice \('rescue', then 'install'\)"),
        ("recovery.mode=rescue recovery.try=3 recovery.mode=", r"recovery\.mode given twice \('rescue', then ''\)"),
        ("recovery.mode=rescue recovery.mode", r"recovery\.mode given twice \('rescue', then no value\)"),
        ("recovery.try=3 recovery.try=1", r"recovery\.try given twice \('3', then '1'\)"),
        ("recovery.try=1 recovery.mode=rescue recovery.try=2", r"recovery\.try given twice \('1', then '2'\)"),
        # Quoted forms are the same parameters to the kernel, so to us.
        ('recovery.mode=rescue "recovery.mode=install"', r"recovery\.mode given twice \('rescue', then 'install'\)"),
        ('recovery.mode=rescue recovery.mode="install init=/bin/sh"',
         r"recovery\.mode given twice \('rescue', then 'install init=/bin/sh'\)"),
        # Modes it does not know: GRUB writes rescue or none; an install is never asked for by name.
        ("recovery.mode=install", r"recovery\.mode is 'install', not rescue or rollback"),
        ("recovery.mode=Rescue", r"recovery\.mode is 'Rescue', not rescue or rollback"),
        ("recovery.mode=rescue2", r"recovery\.mode is 'rescue2', not rescue or rollback"),
        ("recovery.mode=", r"recovery\.mode is '', not rescue or rollback"),
        ("recovery.mode", r"recovery\.mode without a value"),
        # Tries out of range or not a literal 1, 2, 3.
        ("recovery.try=0", r"recovery\.try is '0', not 1, 2 or 3"),
        ("recovery.try=4", r"recovery\.try is '4', not 1, 2 or 3"),
        ("recovery.try=01", r"recovery\.try is '01', not 1, 2 or 3"),
        ("recovery.try=-1", r"recovery\.try is '-1', not 1, 2 or 3"),
        ("recovery.try=x", r"recovery\.try is 'x', not 1, 2 or 3"),
        ("recovery.try=", r"recovery\.try is '', not 1, 2 or 3"),
        ("recovery.try", r"recovery\.try without a value"),
        ("recovery.try=\u0663", r"recovery\.try is '\\u0663', not 1, 2 or 3"),  # str.isdigit() takes it
        # Slots other than the two GRUB names.
        ("recovery.try=1 recovery.slot=c", r"recovery\.slot is 'c', not a or b"),
        ("recovery.slot=a recovery.slot=b", r"recovery\.slot given twice \('a', then 'b'\)"),
        ("recovery.slot=../x", r"recovery\.slot is '\.\./x', not a or b"),
        # Names of ours it does not know (a typo must not fall back to an install).
        ("recovery.mod=rescue", r"unknown parameter 'recovery\.mod'"),
        ("recovery.try=1 recovery.action=install", r"unknown parameter 'recovery\.action'"),
    ],
)
def test_command_lines_grub_never_writes_are_refused(cmdline: str, reason: str) -> None:
    with pytest.raises(CommandLineRefused) as refused:
        Boot.parse(cmdline)
    assert re.fullmatch(reason, str(refused.value)), str(refused.value)


@pytest.mark.parametrize("cmdline", ["recovery.try=" + "1" * 500, 'recovery.try="1\n\x1b[2J\u2028"'])
def test_a_refusal_is_one_short_line_of_ascii(cmdline: str) -> None:
    with pytest.raises(CommandLineRefused) as refused:
        Boot.parse(cmdline)
    message = str(refused.value)
    assert message.isascii() and message.isprintable() and len(message) < 100, message


@pytest.mark.parametrize(
    ("cmdline", "params"),
    [
        ("a b=c\n", [("a", None), ("b", "c")]),
        ("  a\t\tb  ", [("a", None), ("b", None)]),
        ('a="b c" d', [("a", "b c"), ("d", None)]),
        ('"a=b c" d', [("a", "b c"), ("d", None)]),
        ('"a b" c', [("a b", None), ("c", None)]),
        ("a=b=c", [("a", "b=c")]),
        ('a=""', [("a", "")]),
        ("a=", [("a", "")]),
    ],
)
def test_parameters_split_as_the_kernel_splits_them(cmdline: str, params: list[tuple[str, str | None]]) -> None:
    assert kernel_parameters(cmdline) == params


# --- PID 1's answer ------------------------------------------------------------------------------


def test_pid1_answers_a_refused_command_line_with_the_rescue_shell_and_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    boot = boot_from(f"recovery.mode=rescue recovery.try=3 recovery.mode=install {CONSOLE}\n", Console())
    assert boot.rescue
    assert capsys.readouterr().out.splitlines() == [
        "recovery: starting (try 1)",
        "recovery: kernel command line refused: recovery.mode given twice ('rescue', then 'install'); rescue shell",
    ]


def test_pid1_follows_a_command_line_grub_wrote(capsys: pytest.CaptureFixture[str]) -> None:
    assert boot_from(f"recovery.try=2 {CONSOLE}\n", Console()) == Boot(2, False)
    assert capsys.readouterr().out.splitlines() == ["recovery: starting (try 2)"]


# --- GRUB's side ---------------------------------------------------------------------------------

SCRIPTS = {p.name: p.read_text() for p in sorted(BOOTLOADER.glob("*.cfg"))}
# Device names GRUB's `search` found (or `$root` from the early config): never text from a file.
DEVICES = {"recoverydev", "systemdev"}
EXPANSION = re.compile(r"\$\{?(\w+)\}?")


def _words(line: str) -> list[str]:
    """A GRUB command's words, double quotes kept: enough for the plain lines of our scripts."""
    return re.findall(r'(?:"[^"]*"|[^\s"])+', line)


def _kernel_lines() -> list[str]:
    return [line.strip() for text in SCRIPTS.values() for line in text.splitlines()
            if re.match(r"\s*(if )?(linux|initrd)\s", line)]


def _command(line: str) -> list[str]:
    """The linux/initrd command's words, without an `if` before it or `; then` after it."""
    words = _words(re.sub(r";\s*then$", "", line))
    return words[1:] if words[0] == "if" else words


def test_kernel_lines_expand_only_quoted_values_grub_made() -> None:
    lines = _kernel_lines()
    assert len(lines) >= 6  # the system's two, and the recovery's from a slot and from the top
    for line in lines:
        for word in _command(line)[1:]:
            names = set(EXPANSION.findall(word))
            if not names:
                continue
            # Unquoted, GRUB would split a value into words, each a kernel argument.
            assert word.startswith('"') and word.endswith('"'), f"unquoted expansion {word} in: {line}"
            # `slot` and the function's words ($@) are held to literals by the tests below.
            assert names <= DEVICES | {"recovery_count", "slot", "@"}, f"{names - DEVICES} expanded in: {line}"


def test_the_recovery_slot_on_a_kernel_line_is_only_ever_a_literal() -> None:
    """cfg's recovery/slot block is only compared with `b`: the slot names GRUB passes come from
    literals, and the loop runs over those two names only."""
    text = SCRIPTS["recovery.cfg"]
    sets = re.findall(r"^\s*set (recovery_active|recovery_standby)=(.*)$", text, re.MULTILINE)
    assert sets and {value for _, value in sets} == {"a", "b"}, sets
    assert re.findall(r"^\s*for slot in (.*); do$", text, re.MULTILINE) == ["$recovery_order"]
    orders = set(re.findall(r"^\s*set recovery_order=(.*)$", text, re.MULTILINE))
    assert orders == {'"$recovery_standby $recovery_active"', '"$recovery_active $recovery_standby"'}
    for line in text.splitlines():
        if "$recovery_slot" in line:
            assert re.fullmatch(r'\s*if \[ "\$recovery_slot" = b \]; then', line), line.strip()


def test_the_recovery_is_loaded_only_with_literal_words() -> None:
    """Every call of recovery_boot passes literals and the entry's own count: what "$@" expands to."""
    calls = re.findall(r"^\s*recovery_boot\b(.*)$", SCRIPTS["recovery.cfg"], re.MULTILINE)
    assert len(calls) == 4, calls  # recovery, rescue (with and without a count), rollback
    for args in calls:
        for word in _words(args):
            assert word in {"recovery.mode=rescue", "recovery.mode=rollback", '"recovery.try=$recovery_count"'}, word


def test_the_try_count_on_a_kernel_line_is_only_ever_a_literal() -> None:
    text = SCRIPTS["recovery.cfg"]
    sets = re.findall(r"^\s*set recovery_count=(.*)$", text, re.MULTILINE)
    assert sets and set(sets) <= {"", "1", "2", "3"}, sets
    # recovery_try comes from the instruction on cfg: GRUB may compare it, never pass it on.
    for text in SCRIPTS.values():
        for line in text.splitlines():
            if "$recovery_try" in line or "${recovery_try}" in line:
                assert re.fullmatch(
                    r'\s*(if|elif) \[ ("\$recovery_try" = [123]|-z "\$recovery_try") \]; then', line
                ), f"recovery_try used beyond a comparison: {line.strip()}"


def test_the_recovery_command_lines_are_these_four() -> None:
    """DESIGN.md's list: an install with its try, a rescue with its try, a rescue without one, a rollback
    with its try; each with panic=10, so a recovery kernel that panics reboots into GRUB's next try.
    The entries pass their words to recovery_boot, which adds the slot it loads from."""
    text = SCRIPTS["recovery.cfg"]
    calls = [" ".join(_words(args)) for args in re.findall(r"^\s*recovery_boot (.*)$", text, re.MULTILINE)]
    assert sorted(calls) == sorted([
        '"recovery.try=$recovery_count"',
        'recovery.mode=rescue "recovery.try=$recovery_count"',
        "recovery.mode=rescue",
        'recovery.mode=rollback "recovery.try=$recovery_count"',
    ])
    linux = [_command(line) for line in _kernel_lines() if "linux" in line and "recoverydev" in line]
    assert sorted(" ".join(words[2:]) for words in linux) == sorted([
        f'"$@" "recovery.slot=$slot" panic=10 {CONSOLE}',  # from slot a or b
        f'"$@" panic=10 {CONSOLE}',  # a partition without slots
        # stub.cfg when neither slot has a boot menu it can check: the rescue shell of either slot
        f'recovery.mode=rescue "recovery.slot=$slot" panic=10 {CONSOLE}',
    ])
