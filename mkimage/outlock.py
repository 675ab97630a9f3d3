"""One build at a time per output directory: a second `reflash build` (or `reflash recovery`) into the
same directory would remove the first one's work directory and overwrite its images, so it stops at once
with a line naming the build that holds the directory."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from recovery.core.errors import Rejected

LOCK = ".lock"  # in the output directory; kept there, only its flock(2) matters


@contextmanager
def hold_output(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on `out/.lock` for the body; Rejected at once if another process holds it.

    The lock dies with the process that holds it, so a killed build never leaves the directory locked.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise Rejected(f"cannot lock the output directory {out}: {e.strerror}") from None
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise Rejected(f"another build is writing into {out} ({holder}): wait for it to finish, "
                           "or build into another directory with -o") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n".encode(), 0)
        yield
    finally:
        os.close(fd)
