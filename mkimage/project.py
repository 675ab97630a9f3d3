"""The project inside the recovery OS: the shared core and `recovery.os`, with its command `recovery`.
(The system gets the core and `recovery.updated` as the reflash-appliance package: mkimage/deb.py.)"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from recovery.core.run import run

REPO = Path(__file__).resolve().parent.parent


# program -> (its command, the module whose main() it runs)
PROGRAMS = {"os": ("recovery", "recovery.os.cli")}


def install_project(root: Path, program: str) -> None:
    """Put `recovery.core` and `recovery.<program>` on the root's Python path, with the program's command."""
    command, module = PROGRAMS[program]
    site = root / "usr/lib/python3/dist-packages/recovery"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    shutil.copy2(REPO / "recovery/__init__.py", site / "__init__.py")
    for package in ("core", program):
        shutil.copytree(REPO / "recovery" / package, site / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _write(root / "usr/local/bin" / command, f"#!/usr/bin/python3\nimport sys\nfrom {module} import main\nsys.exit(main())\n",
           mode=0o755)
    # The guest runs Debian 12's Python 3.11, like this host: byte-compiling here saves seconds under
    # TCG. -s/-p make tracebacks name the guest's paths, not this build directory's.
    if sys.version_info[:2] == (3, 11):
        run([sys.executable, "-m", "compileall", "-q", "-j", "1", "-s", root, "-p", "/", site])


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
