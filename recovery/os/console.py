"""The recovery's console: its own lines (the contract in DESIGN.md) and a buffer of log records for result.json."""

from __future__ import annotations

import io
import logging
import time





log = logging.getLogger("recovery")


class Console:
    """Lines for the serial console (DESIGN.md's contract), also kept for `recovery/log`."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.buffer.write(f"{time.strftime('%H:%M:%S')} {line}\n")


class _BufferHandler(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.buffer.write(f"{time.strftime('%H:%M:%S')} {self.format(record)}\n")
