"""The record of the last recovery run on the cfg partition: `recovery/result.json` and `recovery/log`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path

from recovery.core.atomic import atomic_write

RESULT = Path("recovery/result.json")


LOG = Path("recovery/log")


LOG_CAP = 256 * 1024  # bytes of log kept on cfg: the last few runs


EARLIER_CAP = 5  # failed tries of one update kept in the verdict that follows them


class Outcome(StrEnum):
    installed = "installed"
    rejected = "rejected"  # nothing was written: the old system is intact
    failed = "failed"  # writing began: the update will be tried again
    rolled_back = "rolled-back"  # a release failed its trial; the fallback bundle was installed again


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class EarlierTry:
    """A failed try of the same update before this result: why it failed, and when."""

    try_: int
    reason: str | None = None
    finished: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"outcome": str(Outcome.failed), "try": self.try_, "reason": self.reason, "finished": self.finished}

    @classmethod
    def from_dict(cls, data: object) -> EarlierTry:
        if not isinstance(data, dict):
            raise ValueError("not an earlier try")
        return cls(try_=int(data.get("try") or 1), reason=data.get("reason"), finished=data.get("finished"))

    def summary(self) -> str:
        when = f" on {self.finished}" if self.finished else ""
        return f"try {self.try_} failed: {self.reason}{when}"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str | None = None
    from_version: str | None = None
    to_version: str | None = None
    try_: int = 1
    started: str | None = None
    finished: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0
    files: int = 0
    # Failed tries of this same update before this one, oldest first. In result.json only when there
    # are any, as `"previous": [{"outcome": "failed", "try", "reason", "finished"}, …]`.
    previous: tuple[EarlierTry, ...] = ()
    # The recovery OS that wrote this verdict: `{"version": …, "slot": "a"|"b"}` (no slot from a recovery
    # partition without slots). Absent from results of recoveries that did not say.
    recovery: dict[str, str] | None = None

    def to_json(self) -> bytes:
        data = asdict(self)
        data["try"] = data.pop("try_")
        data["outcome"] = str(self.outcome)
        if self.previous:
            data["previous"] = [p.to_dict() for p in self.previous]
        else:
            del data["previous"]
        if self.recovery is None:
            del data["recovery"]
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Result:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("outcome") not in set(Outcome):
            raise ValueError("not a recovery result")
        return cls(
            outcome=Outcome(data["outcome"]),
            reason=data.get("reason"),
            from_version=data.get("from_version"),
            to_version=data.get("to_version"),
            try_=int(data.get("try") or 1),
            started=data.get("started"),
            finished=data.get("finished"),
            seconds={k: float(v) for k, v in (data.get("seconds") or {}).items()},
            bytes=int(data.get("bytes") or 0),
            files=int(data.get("files") or 0),
            previous=tuple(EarlierTry.from_dict(p) for p in data.get("previous") or ()),
            recovery=_recovery_os(data.get("recovery")),
        )

    @property
    def recovery_words(self) -> str | None:
        """`recovery 2.0.0 (slot b)`, or None when the result does not say."""
        if not self.recovery:
            return None
        slot = self.recovery.get("slot")
        return f"recovery {self.recovery.get('version', '?')}" + (f" (slot {slot})" if slot else "")

    def after(self, earlier: Result | None) -> Result:
        """This result, keeping the record of `earlier` when that was a failed try of the same update.

        A failed try keeps the instruction, so the next verdict (another failure, the install, or a
        rejection after `recovery retry`) is about the same update: without this, an install that
        needed a second try would hide why the first one failed.
        """
        if earlier is None or earlier.outcome != Outcome.failed or earlier.to_version != self.to_version:
            return self
        chain = (*earlier.previous, EarlierTry(earlier.try_, earlier.reason, earlier.finished), *self.previous)
        return replace(self, previous=chain[-EARLIER_CAP:])

    def summary(self) -> str:
        """In words, as an operator reads it: `installed 1.0.0 -> 2.0.0 in 41 s on …`."""
        when = f" on {self.finished}" if self.finished else ""
        if self.outcome == Outcome.installed:
            total = sum(self.seconds.values())
            line = f"installed {self.from_version or '?'} -> {self.to_version} in {total:.0f} s{when}"
        elif self.outcome == Outcome.rolled_back:
            line = f"rolled back from {self.from_version or '?'} to {self.to_version}{when}: {self.reason}"
        else:
            line = f"{self.outcome} {self.to_version or '?'}: {self.reason}{when} (try {self.try_})"
        if self.previous:
            n = len(self.previous)
            line += f", after {n} failed {'try' if n == 1 else 'tries'}"
        return line


def _recovery_os(value: object) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if k in ("version", "slot") and isinstance(v, str)} or None


def write_result(cfg: Path, result: Result) -> None:
    """Record `result` atomically; a failed try of the same update before it stays in `previous`."""
    (cfg / RESULT).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg / RESULT, result.after(read_result(cfg)).to_json())


def read_result(cfg: Path) -> Result | None:
    try:
        return Result.from_json((cfg / RESULT).read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, OSError):
        return None


def append_log(cfg: Path, text: str, *, cap: int = LOG_CAP) -> None:
    """Append a run's log, keeping at most `cap` bytes, cut at a line boundary."""
    path = cfg / LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    data = old + text.encode(errors="replace")
    if len(data) > cap:
        data = data[-cap:]
        cut = data.find(b"\n")
        data = data[cut + 1 :] if cut >= 0 else data
    atomic_write(path, data)


def log_tail(cfg: Path, lines: int = 40) -> str:
    try:
        text = (cfg / LOG).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
