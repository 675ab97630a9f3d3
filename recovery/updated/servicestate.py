"""What the update service remembers between operations and restarts: the download and a scheduled
reboot, in `update-state.json` in the bundle directory on storage (schema in DESIGN.md).

Nothing lives only in `reflashd`'s memory: the download's progress is written here about once a
second, so `reflashctl status` reads it without the daemon and a restarted daemon resumes from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

from recovery.core.atomic import atomic_write, durable_unlink, read_if_present
from recovery.core.errors import Failed, Rejected

STATE = "update-state.json"  # in the bundle directory


class Phase(StrEnum):
    downloading = "downloading"  # running, or broken off (`error` says why): the same download resumes it
    downloaded = "downloaded"  # verified and kept: `install` stages it
    failed = "failed"  # refused (a bad bundle, a bad source): nothing was kept, `error` says why


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Download:
    """One bundle fetched ahead of its install."""

    phase: Phase
    source: str  # the URL or path it comes from
    file: str  # its name in the bundle directory (`<file>.partial` while downloading)
    version: str | None = None  # the feed's word while downloading, the verified manifest's after
    sha256: str | None = None  # likewise: what the feed promised, then what was verified
    size: int | None = None  # bytes expected, when known
    done: int = 0  # bytes on storage
    force: bool = False  # the operator's --force / --allow-downgrade, for the install that follows
    allow_downgrade: bool = False
    error: str | None = None  # why the last attempt stopped (one line, as the CLI prints it)
    changed: str = ""  # when this record was last written

    @property
    def percent(self) -> int | None:
        if self.phase == Phase.downloaded:
            return 100
        if not self.size:
            return None
        return min(100, self.done * 100 // self.size)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "phase": str(self.phase), "percent": self.percent}


@dataclass(frozen=True)
class ServiceState:
    download: Download | None = None
    reboot_at: str | None = None  # a reboot the operator scheduled for a staged install (ISO 8601, UTC)

    def to_json(self) -> bytes:
        doc = {"download": asdict(self.download) if self.download else None, "reboot_at": self.reboot_at}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: Path) -> ServiceState:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or set(doc) != {"download", "reboot_at"}:
                raise ValueError("not the expected object")
            reboot_at = doc["reboot_at"]
            if reboot_at is not None:
                parse_time(reboot_at)
            download = doc["download"]
            if download is not None:
                if not isinstance(download, dict):
                    raise ValueError("download is not an object")
                fields = {**download, "phase": Phase(download.get("phase"))}
                download = Download(**fields)
                if not isinstance(download.file, str) or "/" in download.file or download.file.startswith("."):
                    raise ValueError("download.file must be a plain file name")
                if not isinstance(download.done, int) or not isinstance(download.source, str):
                    raise ValueError("download.done and download.source have the wrong types")
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            # Nothing in it is acted on unchecked: an install re-verifies the bundle anyway.
            raise Rejected(f"{where} is unreadable ({e}): remove it (reflashctl cancel --discard)") from None
        return cls(download, reboot_at)


def parse_time(text: object) -> datetime:
    """An ISO 8601 time with its zone (a bare time would mean the reader's zone: refused)."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a time")
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"{text} has no time zone (add Z or +01:00)")
    return value


def state_path(bundle_dir: Path) -> Path:
    return bundle_dir / STATE


def read_state(bundle_dir: Path) -> ServiceState:
    path = state_path(bundle_dir)
    raw = read_if_present(path, absent=(FileNotFoundError, NotADirectoryError))
    return ServiceState() if raw is None else ServiceState.from_json(raw, path)


def write_state(bundle_dir: Path, state: ServiceState) -> None:
    path = state_path(bundle_dir)
    try:
        if state == ServiceState():
            durable_unlink(path)
            return
        if state.download is not None:
            state = replace(state, download=replace(state.download, changed=now()))
        atomic_write(path, state.to_json())
    except OSError as e:
        raise Failed(f"cannot write {path}: {e.strerror or e}") from None
