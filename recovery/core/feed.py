"""Release feeds: `releases.json`, signed like a bundle's manifest (`releases.json.sig`).

`reflash publish` writes a feed; `reflashctl check` and `install --latest` read one. Nothing in a feed
is believed before its signature is checked against the system's keyring. A feed carries the time it
was published (`updated`) and may carry the time it stops being good (`expires`), both signed, so
that an old feed served again can be told from the current one (recovery/updated/feedstate.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime

from recovery.core.errors import Rejected
from recovery.core.keys import Keyring
from recovery.core.manifest import _NAME, Signature
from recovery.core.version import Version

FEED_NAME = "releases.json"


SIGNATURE_SUFFIX = ".sig"


FORMAT = 1


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _show(value: object) -> str:
    """A value from a feed quoted for a one-line message: escaped (repr shows controls as \\x1b), shortened."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def parse_time(text: object, what: str) -> datetime:
    """An ISO 8601 time with its offset (`2026-01-02T03:04:05+00:00`, `…Z`); Rejected otherwise.

    The offset is required: a feed's times are compared with other machines' clocks."""
    try:
        if not isinstance(text, str):
            raise ValueError
        when = datetime.fromisoformat(text)
    except ValueError:
        raise Rejected(f"release feed: {what} {_show(text)} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise Rejected(f"release feed: {what} {_show(text)} has no time zone offset (write it in UTC, +00:00)")
    return when


@dataclass(frozen=True)
class Release:
    version: str
    file: str  # relative to the feed's own URL (or an absolute URL)
    size: int
    sha256: str
    created: str
    notes: str = ""

    @classmethod
    def from_dict(cls, data: object, index: int) -> Release:
        what = f"release feed: release {index + 1}"
        if not isinstance(data, dict):
            raise Rejected(f"{what} is not an object")
        missing = [k for k in ("version", "file", "size", "sha256", "created") if k not in data]
        if missing:
            raise Rejected(f"{what} lacks {', '.join(missing)}")
        version, file, size, sha256 = data["version"], data["file"], data["size"], data["sha256"]
        created, notes = data["created"], data.get("notes", "")
        # The bundle manifest's rule: a version the feed may name is one a bundle can carry, and
        # nothing in it can act on the terminal `reflashctl check` prints it to.
        if not isinstance(version, str) or not _NAME.fullmatch(version):
            raise Rejected(f"{what}: version {_show(version)} must be 1-128 of A-Z a-z 0-9 . _ + ~ : - "
                           "starting with a letter or digit")
        if not isinstance(file, str) or not file:
            raise Rejected(f"{what}: file must be a non-empty string")
        if not file.isprintable():
            raise Rejected(f"{what}: file {_show(file)} contains control characters")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise Rejected(f"{what}: size must be a positive number of bytes")
        if not isinstance(sha256, str) or not _HEX64.fullmatch(sha256):
            raise Rejected(f"{what}: sha256 must be 64 lowercase hex digits")
        if not isinstance(created, str):
            raise Rejected(f"{what}: created must be an ISO 8601 time stamp")
        try:
            datetime.fromisoformat(created)
        except ValueError:
            raise Rejected(f"{what}: created {created!r} is not an ISO 8601 time stamp") from None
        if not isinstance(notes, str):
            raise Rejected(f"{what}: notes must be a string")
        return cls(version, file, size, sha256, created, notes)

    @property
    def key(self) -> Version:
        return Version(self.version)


@dataclass(frozen=True)
class Feed:
    product: str
    releases: tuple[Release, ...]
    updated: str | None = None  # when it was published; None only in feeds of older publishers
    expires: str | None = None  # when it stops being good; None: never

    def newest(self) -> Release | None:
        return max(self.releases, key=lambda r: r.key, default=None)

    def find(self, version: str) -> Release | None:
        return next((r for r in self.releases if r.version == version), None)

    def to_json(self) -> bytes:
        """The exact bytes that get published and signed; releases newest first, for people reading it."""
        doc: dict[str, object] = {"format": FORMAT, "product": self.product, "updated": self.updated}
        if self.expires is not None:
            doc["expires"] = self.expires
        doc["releases"] = [asdict(r) for r in sorted(self.releases, key=lambda r: r.key, reverse=True)]
        return (json.dumps(doc, indent=2) + "\n").encode()

    @property
    def updated_at(self) -> datetime | None:
        return None if self.updated is None else parse_time(self.updated, "updated")

    @property
    def expires_at(self) -> datetime | None:
        return None if self.expires is None else parse_time(self.expires, "expires")

    @classmethod
    def parse(cls, raw: bytes) -> Feed:
        """Parse a feed's bytes (already verified); Rejected with the reason when it is not a feed."""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Rejected(f"release feed is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise Rejected("release feed is not a JSON object")
        if doc.get("format") != FORMAT:
            raise Rejected(f"release feed has format {doc.get('format')!r}; this updater reads format {FORMAT}")
        product = doc.get("product")
        if not isinstance(product, str) or not product:
            raise Rejected("release feed names no product")
        if not _NAME.fullmatch(product):
            raise Rejected(f"release feed: product {_show(product)} must be 1-128 of A-Z a-z 0-9 . _ + ~ : - "
                           "starting with a letter or digit")
        releases = doc.get("releases")
        if not isinstance(releases, list):
            raise Rejected("release feed has no releases list")
        # Absent (or null) only in feeds of publishers older than `updated`; what that means for a
        # system that has seen dated feeds is feedstate's decision, not the parser's.
        updated, expires = doc.get("updated"), doc.get("expires")
        updated_at = None if updated is None else parse_time(updated, "updated")
        if expires is not None:
            if updated_at is None:
                raise Rejected("release feed: expires without updated")
            if parse_time(expires, "expires") <= updated_at:
                raise Rejected(f"release feed: expires {expires} is not after updated {updated}")
        parsed = tuple(Release.from_dict(r, i) for i, r in enumerate(releases))
        seen: set[str] = set()
        for r in parsed:
            if r.version in seen:
                raise Rejected(f"release feed lists version {r.version} twice")
            seen.add(r.version)
        return cls(product, parsed, updated, expires)


def verify_feed(raw: bytes, signature: bytes, keyring: Keyring) -> str:
    """Check the detached signature over the feed's exact bytes; returns the keyid, Rejected otherwise."""
    try:
        sig = Signature.parse(signature)
    except Rejected as e:
        raise Rejected(f"release feed signature is malformed: {e}") from None
    if sig.keyid in keyring.revoked:
        raise Rejected(f"release feed signed by revoked key {sig.keyid}")
    if sig.keyid not in keyring:
        raise Rejected(f"release feed signed by unknown key {sig.keyid}")
    try:
        keyring.verify(sig.keyid, sig.signature, raw)
    except Rejected:
        raise Rejected(f"bad signature: {FEED_NAME} was not signed by key {sig.keyid}") from None
    return sig.keyid
