"""A machine's serial console: keeps and logs everything the guest prints, and waits for text with deadlines."""

from __future__ import annotations

import codecs
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from . import VMError

# A regex search over the unread console text costs time proportional to its length; QEMU may hand
# us the guest's output a byte at a time, so searches are spaced at least this far apart.
_SEARCH_INTERVAL = 0.01
TAIL_LINES = 40

Pattern = str | re.Pattern[str]


class ConsoleTimeout(VMError):
    """The guest did not print what was expected before the deadline."""


class ConsoleClosed(VMError):
    """QEMU went away (power cut, exit, crash) before the guest printed what was expected."""


def compile_pattern(pattern: Pattern) -> re.Pattern[str]:
    """A str is a regular expression, as in pexpect and labgrid; use re.escape() for literal text."""
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)


class Console:
    """Reads the guest's serial console from a connected socket in a thread.

    The text is kept whole (carriage returns dropped), written to `log` as it arrives and searched by
    `expect`, which consumes it like pexpect does: each match moves a cursor past the matched text.
    `on_output` receives the raw bytes too, for a terminal that shows the console live.
    """

    def __init__(
        self,
        sock: socket.socket,
        log: Path,
        *,
        name: str = "vm",
        on_output: Callable[[bytes], None] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log
        self._sock = sock
        self._on_output = on_output
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self._text = ""
        self._joined = 0
        self._cursor = 0
        self._closed = False
        self._cond = threading.Condition()
        self._log: TextIO = log.open("a", encoding="utf-8")
        self._thread = threading.Thread(target=self._read, name=f"console-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if self._on_output is not None and data:
                self._on_output(data)
            text = self._decoder.decode(data, final=not data).replace("\r", "")
            with self._cond:
                if text:
                    self._parts.append(text)
                    if not self._log.closed:
                        self._log.write(text)
                        self._log.flush()
                if not data:
                    self._closed = True
                self._cond.notify_all()
            if not data:
                return

    def _current(self) -> str:
        """All text so far; joined lazily because output arrives in many small pieces."""
        if self._joined < len(self._parts):
            self._text += "".join(self._parts[self._joined :])
            self._parts = [self._text]
            self._joined = 1
        return self._text

    @property
    def text(self) -> str:
        """Everything the guest printed, carriage returns removed."""
        with self._cond:
            return self._current()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def cursor(self) -> int:
        """Where the next `expect` starts searching in `text`."""
        return self._cursor

    def skip(self) -> None:
        """Move the cursor to the end: later `expect` calls see only new output."""
        with self._cond:
            self._cursor = len(self._current())

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.text.splitlines()[-lines:])

    def send(self, data: str | bytes) -> None:
        """Type into the console."""
        if isinstance(data, str):
            data = data.encode()
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise ConsoleClosed(f"cannot type into the {self.name} console: {e.strerror or e}") from e

    def expect(self, pattern: Pattern, timeout: float = 60.0) -> re.Match[str]:
        """Wait until the output after the cursor matches `pattern`; return the match, move the cursor past it.

        Raises ConsoleTimeout after `timeout` seconds, ConsoleClosed when QEMU is gone first; both
        carry the last lines of the console.
        """
        regex = compile_pattern(pattern)
        deadline = time.monotonic() + timeout
        searched = -1
        with self._cond:
            while True:
                text = self._current()
                if len(text) != searched:
                    searched = len(text)
                    match = regex.search(text, self._cursor)
                    if match is not None:
                        self._cursor = match.end()
                        return match
                    last_search = time.monotonic()
                if self._closed:
                    raise ConsoleClosed(self._report(f"QEMU exited before {regex.pattern!r} appeared", text))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConsoleTimeout(
                        self._report(f"timed out after {timeout:g} s waiting for {regex.pattern!r}", text)
                    )
                self._cond.wait(left)
                # let more output arrive before searching again (see _SEARCH_INTERVAL)
                while (pause := min(last_search + _SEARCH_INTERVAL, deadline) - time.monotonic()) > 0:
                    self._cond.wait(pause)

    def wait_closed(self, timeout: float) -> bool:
        """Wait until the console reached end of file (QEMU gone); True if it did."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed, timeout)

    def _report(self, what: str, text: str) -> str:
        tail = "\n".join(text.splitlines()[-TAIL_LINES:])
        return f"{self.name} console: {what}; last lines (full log: {self.log_path}):\n{tail}"

    def close(self) -> None:
        """Disconnect and close the log; output already read stays available in `text`."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._sock.close()
        with self._cond:
            self._log.close()
