"""A release whose recovery carries a changed boot menu, made from the demo's 2.0.0 tree: its menu.cfg
prints a line of its own before the menu, and its record (recovery.json, menu.sha256) is made again, as
`reflash build` would for a changed bootloader/grub.cfg. Built once per image and kept beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recovery.core.slots import IN_RELEASE, MENU, write_record
from tests.vm.releases import variant_bundle

VERSION = "2.1.1"
BANNER = f"Boot menu of release {VERSION}"


def menu_release(built: Any) -> Path:
    def change(tree: Path) -> None:
        carried = tree / IN_RELEASE
        menu = (carried / MENU).read_text()
        (carried / MENU).write_text(f'echo "{BANNER}"\n' + menu)
        write_record(carried, VERSION)

    return variant_bundle(built, "menus", VERSION, change)
