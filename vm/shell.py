"""Run shell commands over a serial console: output framed by unique markers, the exit status read back.

The typed line is echoed by the guest's tty, so every marker is typed split by an empty quote pair
(`ab''cd`) and only the shell's output can contain it whole (labgrid's ShellDriver does the same).
"""

from __future__ import annotations

import base64
import re
import secrets
import shlex
import time

from . import VMError
from .console import Console, ConsoleTimeout

# A line typed into a tty in canonical mode is cut at 4095 bytes.
MAX_LINE = 4000
# Kernel messages land on the same serial port, between the lines of a command's output.
KERNEL_LINE = re.compile(r"^\[ *\d+\.\d+\] .*\n?", re.MULTILINE)


def _split(token: str) -> str:
    return f"{token[:4]}''{token[4:]}"


def _command_text(cmd: str) -> str:
    """The command as typed: quoted as is when plain, else base64 (tabs would trigger completion, etc.)."""
    if cmd.isascii() and cmd.isprintable():
        return f"eval {shlex.quote(cmd)}"
    encoded = base64.b64encode(cmd.encode()).decode()
    return f'eval "$(echo {encoded} | base64 -d)"'


class Shell:
    """A root shell on a console: `run(cmd)` returns the exit status and the output (stdout and stderr)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def sync(self, timeout: float) -> None:
        """Wait until a shell answers on the console: type a marker echo until its output comes back.

        Lines typed while no shell reads are either dropped (a getty flushes input) or run later, and
        both are harmless, so the probe is repeated with growing pauses.
        """
        token = secrets.token_hex(6)
        answer = re.compile(re.escape(token) + "R")
        deadline = time.monotonic() + timeout
        pause = 0.5
        while True:
            self.console.send(f"echo {_split(token)}R\n")
            left = deadline - time.monotonic()
            try:
                self.console.expect(answer, timeout=max(min(pause, left), 0))
                return
            except ConsoleTimeout as e:
                if time.monotonic() >= deadline:
                    raise ConsoleTimeout(f"no shell answered within {timeout:g} s; {e}") from None
            pause = min(pause * 2, 8.0)

    def run(self, cmd: str, timeout: float = 60.0, *, keep_kernel_messages: bool = False) -> tuple[int, str]:
        """Run `cmd` in the shell; return (exit status, output).

        Output is stdout and stderr as the terminal shows them, carriage returns removed. Lines that
        look like kernel messages (`[   12.345678] ...`) are removed unless `keep_kernel_messages`
        (set it for `dmesg`). On timeout the command is interrupted with Ctrl-C.
        """
        deadline = time.monotonic() + timeout
        self.sync(timeout)
        token = secrets.token_hex(6)
        line = f"echo {_split(token)}B; {_command_text(cmd)} 2>&1; echo {_split(token)}E$?\n"
        if len(line.encode()) > MAX_LINE:
            raise VMError(
                f"command too long for a console line ({len(line)} bytes): copy a script to the guest instead"
            )
        framed = re.compile(re.escape(token) + r"B\n(.*?)" + re.escape(token) + r"E(\d+)\n", re.DOTALL)
        self.console.send(line)
        try:
            match = self.console.expect(framed, timeout=max(deadline - time.monotonic(), 0))
        except ConsoleTimeout as e:
            self.console.send("\x03")  # so the next command does not land in this one's input
            raise ConsoleTimeout(f"command {cmd!r} did not finish within {timeout:g} s; {e}") from None
        output = match.group(1)
        if not keep_kernel_messages:
            output = KERNEL_LINE.sub("", output)
        return int(match.group(2)), output
