"""The recovery partition's two slots, and `recovery.json`, the record of the recovery OS one holds.

Both sides share this: `reflash build` writes the slots and the copy a release carries in its tree, the
running system writes the inactive slot after a confirmed update (recovery/updated/recoveryslots.py),
and GRUB loads the active one (bootloader/recovery.cfg), DESIGN.md "The recovery's two slots".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from recovery.core.errors import Rejected

SLOTS = ("a", "b")
# On cfg: a GRUB environment block, `recovery_slot=a|b`; missing or anything else means `a`.
SLOT_BLOCK = PurePosixPath("recovery/slot")
SLOT_KEY = "recovery_slot"
# Where a release that carries its own recovery OS has it, in its tree.
IN_RELEASE = PurePosixPath("usr/lib/reflash/recovery")
RECORD = "recovery.json"
FILES = {"kernel": "vmlinuz", "initrd": "initrd.img"}
# The boot menu that travels with the recovery (optional in a record): the ESP's stub sources the active
# slot's MENU once `sha256sum -c MENU_SUMS` passes in GRUB (bootloader/stub.cfg).
MENU = "menu.cfg"
MENU_SUMS = "menu.sha256"
MAX_RECORD = 4096
# Everything a slot (or a release's copy of its recovery) holds, the record last.
CONTENT = (*FILES.values(), MENU, MENU_SUMS, RECORD)


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


@dataclass(frozen=True)
class RecoveryImage:
    """`recovery.json`: `{"version", "kernel": {"size", "sha256"}, "initrd": {"size", "sha256"}}`, and
    `"menu": {"size", "sha256"}` when the recovery carries the boot menu (menu.cfg)."""

    version: str
    kernel: FileDigest
    initrd: FileDigest
    menu: FileDigest | None = None

    def to_json(self) -> bytes:
        data = {"version": self.version,
                **{part: {"size": d.size, "sha256": d.sha256} for part, d in self.parts().items()}}
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    def parts(self) -> dict[str, FileDigest]:
        parts = {"kernel": self.kernel, "initrd": self.initrd}
        if self.menu is not None:
            parts["menu"] = self.menu
        return parts

    def files(self) -> dict[str, FileDigest]:
        """File name in the slot -> what it must hold: vmlinuz, initrd.img, and menu.cfg if carried."""
        names = {**FILES, "menu": MENU}
        return {names[part]: digest for part, digest in self.parts().items()}

    def menu_sums(self) -> bytes | None:
        """MENU_SUMS for GRUB's `sha256sum -c`: derived from the record, never trusted on its own."""
        return None if self.menu is None else f"{self.menu.sha256}  {MENU}\n".encode()

    @classmethod
    def from_json(cls, raw: bytes, *, what: str = RECORD) -> RecoveryImage:
        """Strict: exactly these keys, a non-empty version, sizes >= 0, 64 lowercase hex digits."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise Rejected(f"malformed {what}: not JSON ({e})") from None
        if not isinstance(data, dict) or not {"version", "kernel", "initrd"} <= set(data) <= {
                "version", "kernel", "initrd", "menu"}:
            raise Rejected(f"malformed {what}: needs exactly version, kernel and initrd (and menu)")
        version = data["version"]
        if not isinstance(version, str) or not version or len(version) > 64:
            raise Rejected(f"malformed {what}: version must be a short non-empty string")
        parts = {}
        for part in [p for p in ("kernel", "initrd", "menu") if p in data]:
            d = data[part]
            if not isinstance(d, dict) or set(d) != {"size", "sha256"}:
                raise Rejected(f"malformed {what}: {part} needs exactly size and sha256")
            size, digest = d["size"], d["sha256"]
            if type(size) is not int or size < 0:
                raise Rejected(f"malformed {what}: {part}.size must be a whole number of bytes")
            if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
                raise Rejected(f"malformed {what}: {part}.sha256 must be 64 lowercase hex digits")
            parts[part] = FileDigest(size, digest)
        return cls(version, parts["kernel"], parts["initrd"], parts.get("menu"))

    @classmethod
    def read(cls, directory: Path) -> RecoveryImage | None:
        """The record in `directory`, None when there is none; Rejected when it is malformed."""
        path = Path(directory) / RECORD
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_RECORD + 1)
        except FileNotFoundError:
            return None
        if len(raw) > MAX_RECORD:
            raise Rejected(f"malformed {path}: larger than {MAX_RECORD} bytes")
        return cls.from_json(raw, what=str(path))

    @classmethod
    def of(cls, directory: Path, version: str) -> RecoveryImage:
        """The record for the vmlinuz and initrd.img in `directory`, computed from the files."""
        digests = {part: digest_file(Path(directory) / name) for part, name in FILES.items()}
        menu = Path(directory) / MENU
        return cls(version, digests["kernel"], digests["initrd"], digest_file(menu) if menu.exists() else None)


def digest_file(path: Path) -> FileDigest:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return FileDigest(size, h.hexdigest())


def write_record(directory: Path, version: str) -> RecoveryImage:
    """Write `directory`/recovery.json for the vmlinuz, initrd.img (and menu.cfg, with its menu.sha256)
    beside it (a build step)."""
    image = RecoveryImage.of(directory, version)
    if (sums := image.menu_sums()) is not None:
        (Path(directory) / MENU_SUMS).write_bytes(sums)
    (Path(directory) / RECORD).write_bytes(image.to_json())
    return image
