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
            if re.match(r"\s*(linux|initrd)\s", line)]


def test_kernel_lines_expand_only_quoted_values_grub_made() -> None:
    lines = _kernel_lines()
    assert len(lines) >= 6  # system, recovery and rescue entries: a linux and an initrd line each
    for line in lines:
        for word in _words(line)[1:]:
            names = set(EXPANSION.findall(word))
            if not names:
                continue
            # Unquoted, GRUB would split a value into words, each a kernel argument.
            assert word.startswith('"') and word.endswith('"'), f"unquoted expansion {word} in: {line}"
            assert names <= DEVICES | {"recovery_count"}, f"{names - DEVICES} expanded in: {line}"


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
    with its try; each with panic=10, so a recovery kernel that panics reboots into GRUB's next try."""
    linux = [_words(line) for line in _kernel_lines() if line.startswith("linux") and "recoverydev" in line]
    assert sorted(" ".join(words[2:]) for words in linux) == sorted([
        f'"recovery.try=$recovery_count" panic=10 {CONSOLE}',
        f'recovery.mode=rescue "recovery.try=$recovery_count" panic=10 {CONSOLE}',
        f"recovery.mode=rescue panic=10 {CONSOLE}",
        f'recovery.mode=rollback "recovery.try=$recovery_count" panic=10 {CONSOLE}',
    ])
