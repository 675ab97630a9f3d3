"""What the fleet client remembers about the one deployment it works on: `reflashctl/fleet.json` on
cfg (schema in DESIGN.md, "Fleets"), written atomically at every step. It lives on cfg because cfg
outlives the install: the verdict is reported from it after the reboot, exactly once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path

from recovery.core.atomic import atomic_write, durable_unlink, read_if_present
from recovery.core.errors import Failed, Rejected
from recovery.core.result import now

RECORD = Path("reflashctl/fleet.json")  # below cfg


class Step(StrEnum):
    downloading = "downloading"  # fetching (a partial file may be on storage); `proceeding` sent
    downloaded = "downloaded"  # verified and kept; `downloaded` sent; waiting for `update` or the window
    staged = "staged"  # the instruction is on cfg: waiting for the reboot, the recovery and the trial
    closing = "closing"  # the final feedback (verdict, reason) is decided and being sent
    closed = "closed"  # the final feedback was sent (or the server had it already): nothing more to say


class Verdict(StrEnum):
    success = "success"
    failure = "failure"


@dataclass(frozen=True)
class FleetRecord:
    action: str  # the server's action id
    artifact: str  # the artifact's sha256 (else sha1): with the id, tells one deployment from another
    version: str  # the chunk's version: the bundle must carry it
    file: str  # its name in the bundle directory
    step: Step
    attempts: int = 0  # downloads that broke off; past the limit the action fails
    scheduled: bool = False  # `scheduled` was sent (outside the maintenance window)
    result_before: str | None = None  # sha256 of cfg's result.json when the instruction was written
    verdict: Verdict | None = None
    reason: str | None = None
    changed: str = ""

    def is_for(self, action: str, artifact: str) -> bool:
        return self.action == action and self.artifact == artifact

    def to_json(self) -> bytes:
        doc = {**asdict(self), "step": str(self.step), "verdict": str(self.verdict) if self.verdict else None}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: Path) -> FleetRecord:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            verdict = doc.get("verdict")
            record = cls(**{**doc, "step": Step(doc.get("step")),
                            "verdict": None if verdict is None else Verdict(verdict)})
            for name in ("action", "artifact", "version", "file"):
                if not isinstance(getattr(record, name), str):
                    raise ValueError(f"{name} is not a string")
            if "/" in record.file or record.file.startswith(".") or type(record.attempts) is not int:
                raise ValueError("file is not a plain name, or attempts not a number")
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise Rejected(f"{where} is unreadable ({e}): remove it to start over") from None
        return record


def read_record(cfg: Path) -> FleetRecord | None:
    path = cfg / RECORD
    raw = read_if_present(path)
    return None if raw is None else FleetRecord.from_json(raw, path)


def write_record(cfg: Path, record: FleetRecord | None) -> None:
    path = cfg / RECORD
    try:
        if record is None:
            durable_unlink(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, replace(record, changed=now()).to_json(), mode=0o600)
    except OSError as e:
        raise Failed(f"cannot write {path}: {e.strerror or e}") from None
