"""The running system's configuration for `reflashctl`: `/etc/recovery/system.toml` and the running version."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from recovery.core.errors import Rejected
from recovery.core.toml import read_toml

log = logging.getLogger(__name__)


DEFAULT_PATH = Path("/etc/recovery/system.toml")


ENV_VAR = "UPDATECTL_CONFIG"


INSTRUCTION = "update-instruction"  # below cfg; the name GRUB and the recovery look for


DEFAULT_OS_RELEASE = Path("/etc/os-release")


FALLBACK_OS_RELEASE = Path("/usr/lib/os-release")


KNOWN = {"product", "keys", "cfg", "storage", "storage_disk", "bundles", "os_release"}


@dataclass(frozen=True)
class SystemConfig:
    product: str
    keys: Path
    cfg: Path  # where the cfg partition is mounted
    storage: Path  # where the storage partition is mounted
    storage_disk: str  # how the recovery finds that partition: goes into the instruction
    bundles: PurePosixPath = PurePosixPath("bundles")  # below storage
    os_release: Path = DEFAULT_OS_RELEASE

    @property
    def bundle_dir(self) -> Path:
        return self.storage / self.bundles

    @property
    def instruction(self) -> Path:
        return self.cfg / INSTRUCTION

    @classmethod
    def load(cls, path: Path | None = None) -> SystemConfig:
        """Read `path`, else $UPDATECTL_CONFIG, else /etc/recovery/system.toml."""
        if path is None:
            path = Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)
        return cls.from_dict(read_toml(path, "system configuration"), source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, object], *, source: str = "system configuration") -> SystemConfig:
        def text(key: str, default: str | None = None) -> str:
            value = data.get(key, default)
            if not isinstance(value, str) or not value:
                raise Rejected(f"{source}: {key} must be a non-empty string")
            return value

        def absolute(key: str, default: str | None = None) -> Path:
            value = Path(text(key, default))
            if not value.is_absolute():
                raise Rejected(f"{source}: {key} must be an absolute path, not {value}")
            return value

        unknown = sorted(set(data) - KNOWN)
        if unknown:
            # A warning, not a rejection: an image builder may add settings for other tools.
            log.warning("%s: ignoring unknown setting %s", source, ", ".join(unknown))
        # The bundle directory's path goes into the instruction, so it must stay below the storage mount.
        bundles = PurePosixPath(text("bundles", "bundles"))
        if bundles.is_absolute() or ".." in bundles.parts:
            raise Rejected(f"{source}: bundles must be a relative path below storage, not {bundles}")
        return cls(
            product=text("product"),
            keys=absolute("keys", "/etc/recovery/keys"),
            cfg=absolute("cfg", "/cfg"),
            storage=absolute("storage", "/storage"),
            storage_disk=text("storage_disk", "PARTLABEL=storage"),
            bundles=bundles,
            os_release=absolute("os_release", str(DEFAULT_OS_RELEASE)),
        )

    def running_version(self) -> str | None:
        """VERSION_ID from os-release; None when the file or the key is missing."""
        candidates = [self.os_release]
        if self.os_release == DEFAULT_OS_RELEASE:
            candidates.append(FALLBACK_OS_RELEASE)  # os-release(5): read this when /etc has none
        for path in candidates:
            try:
                return _version_id(path.read_text(errors="replace").splitlines())
            except FileNotFoundError:
                continue
            except OSError:
                return None
        return None


def _version_id(lines: list[str]) -> str | None:
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key == "VERSION_ID":
            value = value.strip()
            # os-release allows shell-style quoting; versions never contain quotes themselves.
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            return value or None
    return None
