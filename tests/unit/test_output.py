"""Progress lines: DESIGN.md's console contract, at most one a second, whole lines on a serial console."""

from __future__ import annotations

import io
import re

from recovery.core.output import MiB, Progress

LINE = re.compile(r"^recovery: extracting (\d+)% (\d+)/(\d+) MiB ([\d.]+) MiB/s ETA (\d+) s$")


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_follow_the_contract_at_most_once_a_second() -> None:
    now = [0.0]
    out = io.StringIO()
    p = Progress(100 * MiB, "recovery: extracting", stream=out, clock=lambda: now[0])
    for _ in range(100):  # 1 MiB every 0.25 s: 25 s in all
        now[0] += 0.25
        p.update(MiB)
    p.finish()
    lines = out.getvalue().splitlines()
    assert 24 <= len(lines) <= 27
    assert all(LINE.match(line) for line in lines), lines[:3]
    first, last = LINE.match(lines[0]), LINE.match(lines[-1])
    assert first and first.group(1) == "4" and first.group(4) == "4.0" and first.group(5) == "24"
    assert last and last.groups()[:3] == ("100", "100", "100") and last.group(5) == "0"


def test_serial_console_gets_whole_lines_even_though_it_is_a_tty() -> None:
    now = [0.0]
    console = TtyBuffer()
    p = Progress(10 * MiB, "recovery: extracting", stream=console, clock=lambda: now[0], live=False)
    for _ in range(10):
        now[0] += 1.0
        p.update(MiB)
    assert "\r" not in console.getvalue()
    live = TtyBuffer()
    q = Progress(10 * MiB, "recovery: extracting", stream=live, clock=lambda: now[0])
    now[0] += 2
    q.update(MiB)
    assert live.getvalue().startswith("\r")
