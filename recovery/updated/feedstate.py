"""What `reflashctl` remembers of the release feeds it accepted: the newest signed `updated` time, on cfg.

A feed that verifies is not yet a current one: an older signed `releases.json` served again (by a
mirror, a cache, someone in the middle) verifies just as well. So a feed older than the newest one
accepted, or past its own `expires`, is rejected; only a feed that passed every check moves the
remembered time forward.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from recovery.core.atomic import atomic_write, fsync_dir, read_if_present
from recovery.core.errors import Rejected
from recovery.core.feed import Feed, parse_time

log = logging.getLogger(__name__)


STATE = Path("reflashctl/feed.json")  # below cfg


@dataclass(frozen=True)
class FeedState:
    """`reflashctl/feed.json` on cfg (schema in DESIGN.md)."""

    updated: str  # the newest `updated` of a feed accepted, as the feed wrote it
    accepted: str  # when this system accepted that feed (its own clock)
    source: str  # where that feed came from, for people reading the file

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: Path) -> FeedState:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or set(doc) != {"updated", "accepted", "source"}:
                raise ValueError("not the expected object")
            if not all(isinstance(v, str) for v in doc.values()):
                raise ValueError("values must be strings")
            state = cls(**doc)
            parse_time(state.updated, "updated")
            parse_time(state.accepted, "accepted")
        except (ValueError, UnicodeDecodeError, Rejected) as e:
            # Failing closed: without the record a replayed feed would pass. The remedy is one rm.
            raise Rejected(f"{where} is unreadable ({e}): remove it to accept any signed feed again") from None
        return state


def read_state(cfg: Path) -> FeedState | None:
    path = cfg / STATE
    raw = read_if_present(path)
    return None if raw is None else FeedState.from_json(raw, path)


def check_fresh(feed: Feed, remembered: FeedState | None, now: datetime) -> None:
    """Rejected with one line when `feed` (verified) is older than the remembered one, or expired."""
    updated = feed.updated_at
    if remembered is not None:
        if updated is None:
            raise Rejected(f"feed has no updated time, and a dated one was accepted on {remembered.accepted} "
                           "(replayed, or from a publisher older than this updater?)")
        if updated < parse_time(remembered.updated, "updated"):
            raise Rejected(f"feed is older than the one accepted on {remembered.accepted} "
                           f"(updated {feed.updated}, that one {remembered.updated}; replayed?)")
    expires = feed.expires_at
    if expires is not None and expires <= now:
        raise Rejected(f"feed expired on {feed.expires}")


def remember(cfg: Path, feed: Feed, remembered: FeedState | None, *, source: str, now: datetime) -> None:
    """Record `feed`'s `updated` when it is newer than the remembered one; call only after check_fresh."""
    updated = feed.updated_at
    if updated is None:
        log.warning("the release feed carries no updated time: it cannot be told from an older one served again")
        return
    if remembered is not None and updated <= parse_time(remembered.updated, "updated"):
        return  # the same feed again (or one of the same second): nothing new to remember
    path = cfg / STATE
    state = FeedState(updated=feed.updated or "", accepted=now.isoformat(timespec="seconds"), source=source)
    try:
        if not path.parent.is_dir():
            path.parent.mkdir()
            fsync_dir(cfg)  # the new directory, too, must survive a power cut
        atomic_write(path, state.to_json())
    except OSError as e:
        # Accepting a feed without remembering it would let the next replay through: refuse instead.
        raise Rejected(f"cannot remember the feed's time in {path}: {e.strerror or e}") from None
