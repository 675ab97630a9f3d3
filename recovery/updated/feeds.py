"""Fetching a release feed: from a URL or a directory, its signature checked before anything in it is believed."""

from __future__ import annotations

from recovery.core.errors import Rejected
from recovery.core.feed import FEED_NAME, SIGNATURE_SUFFIX, Feed, verify_feed
from recovery.core.keys import Keyring
from recovery.updated.source import Source
from recovery.updated.transfer import fetch


def feed_source(location: str) -> Source:
    """`releases.json` at `location`, or below it when it names a directory (a path, or a URL ending in /)."""
    source = Source.parse(location)
    if source.path is not None and source.path.is_dir():
        return Source.parse(str(source.path / FEED_NAME))
    if source.path is None and source.url.endswith("/"):
        return source.join(FEED_NAME)
    return source


def load_feed(location: str, keyring: Keyring, *, product: str) -> tuple[Feed, Source]:
    """Fetch, verify and parse the feed at `location` for `product`; returns it and where it came from."""
    source = feed_source(location)
    raw = fetch(source)
    try:
        signature = fetch(Source.parse(source.url + SIGNATURE_SUFFIX), limit=64 * 1024)
    except Rejected as e:
        raise Rejected(f"release feed {source} is unsigned: {e}") from None
    verify_feed(raw, signature, keyring)
    feed = Feed.parse(raw)
    if feed.product != product:
        raise Rejected(f"wrong product: the release feed is for {feed.product}, this system is {product}")
    if not feed.releases:
        raise Rejected(f"release feed {source} lists no releases")
    return feed, source
