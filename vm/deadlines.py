"""How long the rig waits for each stage of a boot or an update, and the console line that says a
system is up: one place for the demo and the tests.

Generous limits for TCG on a shared machine; a stage that takes longer is a failure, not a wait.
"""

from __future__ import annotations

import re

KERNEL = 120.0  # power-on or reboot to the kernel's command line (or the recovery's first line)
RECOVERY = 300.0  # each stage of the recovery, up to its verdict
BOOT = 600.0  # power-on to a ready system


def ready(product: str, version: str) -> str:
    """A regex for the line the system prints once it is up (DESIGN.md, "Console lines")."""
    return re.escape(f"system {product} {version} ready")
