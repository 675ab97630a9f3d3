"""Console output: logging set-up, timed steps and progress lines that read well on a serial console."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

log = logging.getLogger("recovery")


_depth = 0


# What a terminal may act on instead of showing: C0 controls but tab and newline, DEL, C1 controls
# (0x9b is CSI on many terminals), and lone surrogates (not text; printing one raises).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def control_characters(text: str) -> list[str]:
    """The characters of `text` that `strip_controls` would remove, as `U+001B` names, each once."""
    return sorted({f"U+{ord(c):04X}" for c in _CONTROL.findall(text)})


def strip_controls(text: str) -> str:
    """`text` safe to print from an untrusted source: control characters other than newline and tab removed."""
    return _CONTROL.sub("", text)


def setup_logging(debug: bool = False, stream: TextIO | None = None) -> None:
    """Plain lines on stderr (or `stream`): no timestamps, a serial console adds its own."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


@contextlib.contextmanager
def step(title: str, logger: logging.Logger = log) -> Iterator[None]:
    """Log `title`, run the block, then log how it ended and how long it took; nested steps indent."""
    global _depth
    indent = "  " * _depth
    logger.info("%s%s", indent, title)
    start = time.monotonic()
    _depth += 1
    try:
        yield
    except BaseException as e:
        _depth -= 1
        logger.info("%s%s failed after %.1f s: %s", indent, title, time.monotonic() - start, e)
        raise
    _depth -= 1
    logger.info("%s%s done in %.1f s", indent, title, time.monotonic() - start)


MiB = 1024 * 1024


class Progress:
    """Reports progress of a long transfer: a live bar on a terminal, else at most one line a second.

    The line form is DESIGN.md's console contract:
    `<prefix> NN% <done>/<total> MiB <rate> MiB/s ETA <s> s`.
    """

    def __init__(
        self,
        total: int,
        prefix: str,
        *,
        stream: TextIO | None = None,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        live: bool | None = None,
    ) -> None:
        self.total = max(total, 0)
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.interval = interval
        self.clock = clock
        self.done = 0
        self.start = clock()
        self._last = self.start
        # A serial console is a tty too, but its readers (people, tests) need whole lines: the
        # caller says live=False there.
        self._tty = self.stream.isatty() if live is None else live

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-6)
        rate = self.done / elapsed
        pct = int(100 * self.done / self.total) if self.total else 100
        eta = int((self.total - self.done) / rate) if rate > 0 and self.total > self.done else 0
        return (
            f"{self.prefix} {pct:d}% {self.done / MiB:.0f}/{self.total / MiB:.0f} MiB "
            f"{rate / MiB:.1f} MiB/s ETA {eta} s"
        )

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        if self._tty:
            self.stream.write("\r\033[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Print the final state once, so the log always shows 100%."""
        self._emit()
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
