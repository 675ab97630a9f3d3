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
MAX_RECORD = 4096


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


@dataclass(frozen=True)
class RecoveryImage:
    """`recovery.json`: `{"version", "kernel": {"size", "sha256"}, "initrd": {"size", "sha256"}}`."""

    version: str
    kernel: FileDigest
    initrd: FileDigest

    def to_json(self) -> bytes:
        data = {"version": self.version,
                **{part: {"size": d.size, "sha256": d.sha256} for part, d in self.parts().items()}}
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    def parts(self) -> dict[str, FileDigest]:
        return {"kernel": self.kernel, "initrd": self.initrd}

    @classmethod
    def from_json(cls, raw: bytes, *, what: str = RECORD) -> RecoveryImage:
        """Strict: exactly these keys, a non-empty version, sizes >= 0, 64 lowercase hex digits."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise Rejected(f"malformed {what}: not JSON ({e})") from None
        if not isinstance(data, dict) or set(data) != {"version", "kernel", "initrd"}:
            raise Rejected(f"malformed {what}: needs exactly version, kernel and initrd")
        version = data["version"]
        if not isinstance(version, str) or not version or len(version) > 64:
            raise Rejected(f"malformed {what}: version must be a short non-empty string")
        parts = {}
        for part in ("kernel", "initrd"):
            d = data[part]
            if not isinstance(d, dict) or set(d) != {"size", "sha256"}:
                raise Rejected(f"malformed {what}: {part} needs exactly size and sha256")
            size, digest = d["size"], d["sha256"]
            if type(size) is not int or size < 0:
                raise Rejected(f"malformed {what}: {part}.size must be a whole number of bytes")
            if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
                raise Rejected(f"malformed {what}: {part}.sha256 must be 64 lowercase hex digits")
            parts[part] = FileDigest(size, digest)
        return cls(version, parts["kernel"], parts["initrd"])

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
        return cls(version, digests["kernel"], digests["initrd"])


def digest_file(path: Path) -> FileDigest:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return FileDigest(size, h.hexdigest())


def write_record(directory: Path, version: str) -> RecoveryImage:
    """Write `directory`/recovery.json for the vmlinuz and initrd.img beside it (a build step)."""
    image = RecoveryImage.of(directory, version)
    (Path(directory) / RECORD).write_bytes(image.to_json())
    return image
