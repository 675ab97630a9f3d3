"""`reflash publish`: a directory any static web server can serve, with the bundles, a signed
`releases.json` (what `reflashctl check` reads) and `releases.rss` (for people).

Publishing into a directory that already holds a feed adds to it: earlier releases whose files are
still there stay listed, with their notes. Every publish signs a new `updated` time (and `expires`,
when given), which is how a device tells the current feed from an older one served again.
"""

from __future__ import annotations

import email.utils
import errno
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from recovery.core.atomic import atomic_write, fsync_dir
from recovery.core.manifest import Signature
from recovery.core.bundle import verify_bundle
from recovery.core.errors import Failed, Rejected
from recovery.core.feed import FEED_NAME, SIGNATURE_SUFFIX, Feed, Release, verify_feed
from recovery.core.keys import Keyring, keyid, load_private_key, raw_public_key
from recovery.core.output import control_characters
from recovery.core.result import now
from recovery.core.version import Version

log = logging.getLogger(__name__)

RSS_NAME = "releases.rss"
_DURATION = re.compile(r"([1-9][0-9]*)([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class Published:
    feed: Feed
    directory: Path
    added: tuple[str, ...]  # versions published by this run


def publish(
    bundles: Sequence[Path],
    output: Path,
    *,
    key: Path,
    notes: Mapping[str, str] | None = None,
    newest_notes: str | None = None,
    base_url: str | None = None,
    expires: timedelta | None = None,
) -> Published:
    """Verify `bundles` with `key`'s own public key, place them in `output`, write the signed feed and RSS.

    `notes` maps versions to release notes, `newest_notes` are those of the newest bundle given (what
    `--notes FILE` means); a version neither published now nor in the feed is an error, since a typo
    would otherwise vanish without a word. Notes with control characters other than newline and tab
    are refused: they would break the RSS and act on the terminals the notes are printed to.
    `expires`: how long the feed stays good after this publish (never, when None).

    Longer than 60 lines for a reason: every check runs before the first file is written, and they read
    best in that one order (bundles, then notes, then the existing feed, then the writes).
    """
    if not bundles:
        raise Rejected("nothing to publish: give at least one bundle")
    private = load_private_key(key)
    public = private.public_key()
    kid = keyid(raw_public_key(public))
    keyring = Keyring({kid: public})

    new: list[tuple[Path, Release]] = []
    product: str | None = None
    for path in bundles:
        verified = verify_bundle(path, keyring, compute_sha256=True)
        m = verified.manifest
        if product is not None and m.product != product:
            raise Rejected(f"{path} is for {m.product}, the other bundles for {product}: one feed is one product")
        product = m.product
        assert verified.sha256 is not None
        new.append((Path(path), Release(m.version, Path(path).name, Path(path).stat().st_size, verified.sha256,
                                        m.created)))
    assert product is not None
    _no_duplicates([r for _, r in new])

    output.mkdir(parents=True, exist_ok=True)
    kept, previous = _existing(output, keyring, product, taken={r.version for _, r in new} | {r.file for _, r in new})
    notes = dict(notes or {})
    if newest_notes is not None:
        notes.setdefault(max((r.version for _, r in new), key=Version), newest_notes.strip())
    known = {r.version for _, r in new} | {r.version for r in kept}
    unknown = sorted(set(notes) - known, key=Version)
    if unknown:
        raise Rejected(f"release notes for {', '.join(unknown)}, which is neither published now nor in the feed")

    releases = [replace(r, notes=notes.get(r.version, r.notes)) for r in kept]
    releases += [replace(r, notes=notes.get(r.version, "")) for _, r in new]
    _plain_notes(releases)
    updated = now()
    before = previous.updated_at if previous is not None else None
    if before is not None and before > datetime.fromisoformat(updated):
        # Devices that saw the earlier feed would reject this one as a replay.
        raise Rejected(f"{output / FEED_NAME} was published at {before.isoformat()}, after this machine's clock "
                       f"({updated}): fix the clock before publishing")
    until = None if expires is None else (datetime.fromisoformat(updated) + expires).isoformat(timespec="seconds")
    feed = Feed(product, tuple(releases), updated=updated, expires=until)

    raw = feed.to_json()
    signature = Signature(kid, private.sign(raw)).to_json()
    # What we publish must be what a client accepts: signature and content, checked before anything is placed.
    verify_feed(raw, signature, keyring)
    Feed.parse(raw)
    for path, release in new:
        _place(path, output / release.file)
    atomic_write(output / FEED_NAME, raw)
    atomic_write(output / (FEED_NAME + SIGNATURE_SUFFIX), signature)
    atomic_write(output / RSS_NAME, rss(feed, base_url=base_url))
    return Published(feed, output, tuple(r.version for _, r in new))


def _no_duplicates(releases: Sequence[Release]) -> None:
    versions: dict[str, str] = {}
    files: dict[str, str] = {}
    for r in releases:
        if r.version in versions:
            raise Rejected(f"version {r.version} given twice ({versions[r.version]} and {r.file})")
        if r.file in files:
            raise Rejected(f"two bundles named {r.file} ({files[r.file]} and {r.version}): rename one")
        versions[r.version] = r.file
        files[r.file] = r.version


def _plain_notes(releases: Sequence[Release]) -> None:
    for r in sorted(releases, key=lambda r: r.key):
        if found := control_characters(r.notes):
            raise Rejected(f"release notes of {r.version} contain control characters ({', '.join(found)}): "
                           "only newline and tab are allowed")


def parse_duration(text: str) -> timedelta:
    """`90d`, `36h`, `2w`, `30m`: how long a published feed stays good."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: a number and m, h, d or w (90d, 36h, 2w)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _existing(
    output: Path, keyring: Keyring, product: str, *, taken: set[str]
) -> tuple[list[Release], Feed | None]:
    """The releases an earlier publish listed that stay (their files are still there, not replaced now),
    and that earlier feed."""
    path = output / FEED_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], None
    try:
        signature = (output / (FEED_NAME + SIGNATURE_SUFFIX)).read_bytes()
    except FileNotFoundError:
        raise Rejected(f"{path} exists but is unsigned: remove it or publish into another directory") from None
    try:
        verify_feed(raw, signature, keyring)
    except Rejected as e:
        raise Rejected(f"{path} was not signed with this key ({e}): publish into another directory") from None
    feed = Feed.parse(raw)
    if feed.product != product:
        raise Rejected(f"{path} is the feed of {feed.product}, these bundles are for {product}")
    kept = []
    for r in feed.releases:
        if r.version in taken or r.file in taken:
            continue  # republished now: the new entry replaces it
        if not (output / r.file).is_file():
            log.info("dropping %s from the feed: %s is gone", r.version, r.file)
            continue
        kept.append(r)
    return kept, feed


def _place(source: Path, target: Path) -> None:
    """A hard link where possible (bundles are large and never change), else a copy; replaced atomically."""
    try:
        if target.exists() and os.path.samefile(source, target):
            return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(source, tmp)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise Failed(f"cannot place {source} in {target.parent}: {e.strerror or e}") from None
    fsync_dir(target.parent)


def _rfc822(stamp: str) -> str:
    when = datetime.fromisoformat(stamp)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return email.utils.format_datetime(when.astimezone(timezone.utc), usegmt=True)


def rss(feed: Feed, *, base_url: str | None = None) -> bytes:
    """An RSS 2.0 document with one item per release, newest first; links absolute when `base_url` is known."""
    def link(name: str) -> str:
        return urllib.parse.urljoin(base_url, name) if base_url else name

    root = ET.Element("rss", version="2.0")
    channel = ET.SubElement(root, "channel")
    ET.SubElement(channel, "title").text = f"{feed.product} releases"
    ET.SubElement(channel, "link").text = link(RSS_NAME)
    ET.SubElement(channel, "description").text = (
        f"Signed releases of {feed.product}; reflashctl reads {FEED_NAME}."
    )
    if feed.updated:
        ET.SubElement(channel, "lastBuildDate").text = _rfc822(feed.updated)
    ET.SubElement(channel, "generator").text = "reflash publish"
    for release in sorted(feed.releases, key=lambda r: r.key, reverse=True):
        item = ET.SubElement(channel, "item")
        ET.SubElement(item, "title").text = f"{feed.product} {release.version}"
        ET.SubElement(item, "link").text = link(release.file)
        ET.SubElement(item, "description").text = release.notes or f"{feed.product} {release.version}"
        ET.SubElement(item, "pubDate").text = _rfc822(release.created)
        guid = ET.SubElement(item, "guid", isPermaLink="false")
        guid.text = f"{feed.product}-{release.version}-{release.sha256[:16]}"
        ET.SubElement(item, "enclosure", url=link(release.file), length=str(release.size),
                      type="application/octet-stream")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def notes_for(items: Sequence[str]) -> dict[str, str]:
    """`--notes-for VERSION=TEXT` arguments as a mapping."""
    notes: dict[str, str] = {}
    for item in items:
        version, sep, text = item.partition("=")
        if not sep or not version:
            raise Rejected(f"--notes-for {item!r}: expected VERSION=TEXT")
        notes[version] = text
    return notes
