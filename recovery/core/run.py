"""The one way this project runs external programs."""

from __future__ import annotations

import logging
import ctypes
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from recovery.core.errors import Failed

log = logging.getLogger(__name__)


StrPath = str | os.PathLike[str]


def program_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every program runs in: ours, a UTF-8 C locale (messages we can parse), then `env`."""
    return {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **(env or {})}


def run(
    argv: Sequence[StrPath],
    *,
    check: bool = True,
    input: bytes | str | None = None,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    error: type[Exception] = Failed,
) -> subprocess.CompletedProcess[Any]:
    """Run a program (argv list, never a shell) and raise `error` naming it and its stderr on failure.

    stdin is /dev/null unless `input` is given; stdout and stderr are captured unless `capture` is
    False, in which case they go to ours (for long steps that print their own progress).
    """
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    full_env = program_env(env)
    text = isinstance(input, str)
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=full_env,
            cwd=os.fspath(cwd) if cwd is not None else None,
            text=text,
            check=False,
        )
    except FileNotFoundError as e:
        raise error(f"{args[0]} not found: install it or check PATH") from e
    if check and proc.returncode != 0:
        tail = proc.stderr if proc.stderr is not None else ""
        if isinstance(tail, bytes):
            tail = tail.decode(errors="replace")
        last = " / ".join(line.strip() for line in tail.strip().splitlines()[-3:] if line.strip())
        raise error(f"{os.path.basename(args[0])} exited with status {proc.returncode}" + (f": {last}" if last else ""))
    return proc


LINUX_REBOOT_CMD_RESTART = 0x01234567


def reboot_now() -> None:
    """sync(2), then reboot(2) with no shutdown (the recovery OS has none; the running system only when
    systemd is not there). Returns only if the kernel refused; Failed then says why."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(LINUX_REBOOT_CMD_RESTART) != 0:
        raise Failed(f"reboot(2) failed: {os.strerror(ctypes.get_errno())}")
