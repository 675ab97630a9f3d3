"""The recovery OS's own configuration: which partitions it may touch, never taken from an instruction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from recovery.core.errors import Rejected
from recovery.core.instruction import DiskSpec
from recovery.core.toml import read_toml
from recovery.core.trial import MAX_BOOTS

DEFAULT_PATH = Path("/etc/recovery/recovery.toml")


ROLES = ("cfg", "system", "recovery", "storage")


@dataclass(frozen=True)
class RecoveryConfig:
    """`/etc/recovery/recovery.toml` in the recovery OS (written by `reflash build`/`reflash recovery`)."""

    product: str
    keys: Path
    cfg: DiskSpec
    system: DiskSpec
    recovery: DiskSpec
    storage: DiskSpec
    device_timeout: float = 30.0
    trial_boots: int = 3  # boots a new release gets to confirm itself before the rollback
    version: str | None = None  # this recovery OS's own version (`reflash build` gives it the release's)

    @classmethod
    def load(cls, path: Path = DEFAULT_PATH) -> RecoveryConfig:
        return cls.from_dict(read_toml(path, "recovery configuration"), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "recovery configuration") -> RecoveryConfig:
        parts = data.get("partitions", {})
        if not isinstance(parts, dict):
            raise Rejected(f"{source}: [partitions] must be a table")
        missing = [r for r in ROLES if not isinstance(parts.get(r), str) or not parts.get(r)]
        if missing:
            raise Rejected(f"{source}: [partitions] lacks {', '.join(missing)}")
        product = data.get("product")
        if not isinstance(product, str) or not product:
            raise Rejected(f"{source}: product is missing")
        timeout = data.get("device_timeout", 30)
        if not isinstance(timeout, int | float) or timeout < 0:
            raise Rejected(f"{source}: device_timeout must be a number of seconds")
        boots = data.get("trial_boots", 3)
        if type(boots) is not int or not 1 <= boots <= MAX_BOOTS:
            raise Rejected(f"{source}: trial_boots must be 1 to {MAX_BOOTS}")
        version = data.get("version")
        if version is not None and (not isinstance(version, str) or not version):
            raise Rejected(f"{source}: version must be a non-empty string")
        specs = {}
        for role in ROLES:
            try:
                specs[role] = DiskSpec.parse(parts[role])
            except Rejected as e:
                raise Rejected(f"{source}: partitions.{role}: {e}") from None
        return cls(product=product, keys=Path(data.get("keys", "/etc/recovery/keys")), device_timeout=float(timeout),
                   trial_boots=boots, version=version, **specs)

    def to_toml(self) -> str:
        lines = [
            f"product = {json.dumps(self.product)}",
            f"keys = {json.dumps(str(self.keys))}",
            f"device_timeout = {self.device_timeout:g}",
            f"trial_boots = {self.trial_boots}",
            *([f"version = {json.dumps(self.version)}"] if self.version else []),
            "",
            "[partitions]",
            *(f"{r} = {json.dumps(str(getattr(self, r)))}" for r in ROLES),
        ]
        # JSON strings are valid TOML basic strings for everything a config holds.
        return "\n".join(lines) + "\n"
