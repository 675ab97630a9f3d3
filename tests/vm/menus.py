"""A release whose recovery carries a changed boot menu, made from the demo's 2.0.0 tree: its menu.cfg
prints a line of its own before the menu, and its record (recovery.json, menu.sha256) is made again, as
`reflash build` would for a changed bootloader/grub.cfg. Built once per image and kept beside it."""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mkimage.bundle import create_bundle
from recovery.core.slots import IN_RELEASE, MENU, write_record
from tests.vm.releases import _relabel, unpack_payload

VERSION = "2.1.1"
BANNER = f"Boot menu of release {VERSION}"


def menu_release(built: Any) -> Path:
    out = built.disk.parent / "menus"
    out.mkdir(exist_ok=True)
    bundle = out / f"{built.config.product}-{VERSION}.bundle"
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if bundle.exists():
            return bundle
        with tempfile.TemporaryDirectory(dir=out) as t:
            tree = Path(t) / "tree"
            unpack_payload(built.bundles["2.0.0"], tree)
            _relabel(tree, "2.0.0", VERSION)
            carried = tree / IN_RELEASE
            menu = (carried / MENU).read_text()
            (carried / MENU).write_text(f'echo "{BANNER}"\n' + menu)
            write_record(carried, VERSION)
            partial = Path(t) / bundle.name
            create_bundle(tree, partial, key=built.keys / "signing.pem", product=built.config.product,
                          version=VERSION)
            shutil.move(partial, bundle)
    return bundle
