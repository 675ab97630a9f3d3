"""The long tool runs of a build (mmdebstrap and the apt and dpkg it drives) with their output in a log
file instead of the terminal: the builder's own step lines stay readable, a progress line shows the
tool is alive, and only a failure prints the log's last lines with its path. `--verbose` shows it all.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from recovery.core.errors import Failed
from recovery.core.run import program_env

PROGRESS_EVERY = 5.0  # seconds between progress lines when the output is no terminal (a serial console, CI)
LIVE_EVERY = 0.25  # a terminal gets one line, rewritten
TAIL = 20


@dataclass(frozen=True)
class ToolLog:
    path: Path | None = None  # None: a temporary file, named when it matters
    verbose: bool = False


_CURRENT: ContextVar[ToolLog] = ContextVar("tool_log", default=ToolLog())


@contextmanager
def tool_log(path: Path | None = None, *, verbose: bool | None = None) -> Iterator[ToolLog]:
    """Send tool output to `path` (and keep the outer choice of `verbose` unless one is given)."""
    outer = _CURRENT.get()
    token = _CURRENT.set(ToolLog(path=path or outer.path, verbose=outer.verbose if verbose is None else verbose))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def run_logged(argv: Sequence[str], *, what: str, env: Mapping[str, str] | None = None) -> None:
    """Run a long tool; its output goes to the current tool log. Failed names the status and the log."""
    settings = _CURRENT.get()
    if settings.verbose:
        _run_through(argv, env)
        return
    path = settings.path
    if path is None:
        path = Path(tempfile.mkstemp(prefix="reflash-build-", suffix=".log")[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL)
    progress = _Progress(what)
    with open(path, "a", encoding="utf-8", errors="replace") as log:
        log.write(f"+ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=program_env(env), text=True, errors="replace")
        except FileNotFoundError:
            raise Failed(f"{argv[0]} not found: install it or check PATH") from None
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip("\n"))
            progress.line(line)
        status = proc.wait()
    progress.done()
    if status:
        print(f"--- the last {len(tail)} lines of {path} ---", *tail, "---", sep="\n", file=sys.stderr, flush=True)
        raise Failed(f"{argv[0]} exited with status {status}; its whole output is in {path}")


def _run_through(argv: Sequence[str], env: Mapping[str, str] | None) -> None:
    status = subprocess.run(argv, stdin=subprocess.DEVNULL, env=program_env(env), check=False).returncode
    if status:
        raise Failed(f"{argv[0]} exited with status {status}")


class _Progress:
    """`  mmdebstrap: 812 lines, last: Unpacking python3.11 …` at most every few seconds (a terminal: one
    line, rewritten in place)."""

    def __init__(self, what: str) -> None:
        self.what, self.lines, self.shown = what, 0, time.monotonic()
        self.live = sys.stderr.isatty()

    def line(self, text: str) -> None:
        self.lines += 1
        now = time.monotonic()
        if now - self.shown < (LIVE_EVERY if self.live else PROGRESS_EVERY):
            return
        self.shown = now
        last = " ".join(text.split())[:60]
        message = f"  {self.what}: {self.lines} lines, last: {last}"
        if self.live:
            print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)
        else:
            print(message, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.live and self.lines:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
