"""The project inside the images: the `recovery` package on Python's path and its commands."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from recovery.run import run

REPO = Path(__file__).resolve().parent.parent


def install_project(root: Path) -> None:
    """Put the project's `recovery` package on the root's Python path, with its commands."""
    site = root / "usr/lib/python3/dist-packages/recovery"
    if site.exists():
        shutil.rmtree(site)
    shutil.copytree(REPO / "recovery", site, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for command, module in (("updatectl", "recovery.updatectl"), ("recovery", "recovery.cli")):
        _write(
            root / "usr/local/bin" / command,
            f"#!/usr/bin/python3\nimport sys\nfrom {module} import main\nsys.exit(main())\n",
            mode=0o755,
        )
    # The guest runs Debian 12's Python 3.11, like this host: byte-compiling here saves seconds under
    # TCG. -s/-p make tracebacks name the guest's paths, not this build directory's.
    if sys.version_info[:2] == (3, 11):
        run([sys.executable, "-m", "compileall", "-q", "-j", "1", "-s", root, "-p", "/", site])


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
