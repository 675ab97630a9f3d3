"""Release feeds: version order, the detached signature, and one-line verdicts on bad feeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from mkimage.bundle import generate_keys
from recovery.core.manifest import Signature
from recovery.core.errors import Rejected
from recovery.core.feed import Feed, Release
from recovery.core.version import Version
from recovery.updated.feeds import feed_source, load_feed
from recovery.core.keys import Keyring, keyid, load_private_key, raw_public_key

from .reflashctl_support import ServerState, http_server

SHA = "ab" * 32


def release(version: str, **kw: object) -> Release:
    return Release(**{"version": version, "file": f"demo-{version}.bundle", "size": 10, "sha256": SHA,
                      "created": "2026-01-02T03:04:05Z", **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("feedkeys")
    generate_keys(base / "trusted")
    generate_keys(base / "other")
    return base / "trusted", base / "other"


def write_feed(directory: Path, raw: bytes, key_dir: Path, *, sign: bytes | None = None) -> Path:
    key = load_private_key(key_dir / "signing.pem")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "releases.json").write_bytes(raw)
    sig = Signature(keyid(raw_public_key(key.public_key())), key.sign(raw if sign is None else sign))
    (directory / "releases.json.sig").write_bytes(sig.to_json())
    return directory / "releases.json"


@pytest.mark.parametrize(
    "older, newer",
    [
        ("1.9.0", "1.10.0"),
        ("1.0.9", "1.0.10"),
        ("2.0.0-rc1", "2.0.0"),
        ("2.0.0-rc2", "2.0.0-rc10"),
        ("1.0", "1.0.1"),
        ("9", "10"),
        ("1.0.beta", "1.0.1"),
    ],
)
def test_versions_compare_by_numeric_parts(older: str, newer: str) -> None:
    assert Version(older) < Version(newer)
    assert Version(newer) > Version(older)
    assert Version(older) != Version(newer)


def test_equal_versions() -> None:
    assert Version("1.0") == Version("1.0.0")
    assert Version("2.0.0+build7") == Version("2.0.0")
    assert max(["1.9.0", "1.10.0", "1.2.0"], key=Version) == "1.10.0"


def test_feed_round_trip_and_newest() -> None:
    feed = Feed("demo", (release("1.9.0"), release("1.10.0", notes="fixes"), release("1.2.0")), "2026-01-01T00:00:00Z")
    parsed = Feed.parse(feed.to_json())
    assert parsed.product == "demo" and set(parsed.releases) == set(feed.releases)
    assert parsed.newest() == release("1.10.0", notes="fixes")
    assert [r.version for r in parsed.releases] == ["1.10.0", "1.9.0", "1.2.0"]  # published newest first


def test_good_feed_from_a_directory_and_from_http(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    trusted, _ = keys
    raw = Feed("demo", (release("1.0.0"), release("2.0.0"))).to_json()
    path = write_feed(tmp_path / "site", raw, trusted)
    feed, source = load_feed(str(tmp_path / "site"), Keyring.load(trusted), product="demo")
    assert feed.newest() == release("2.0.0") and source.path == path
    files = {"/site/releases.json": raw, "/site/releases.json.sig": (tmp_path / "site/releases.json.sig").read_bytes()}
    with http_server(ServerState(files=files)) as url:
        feed, source = load_feed(url + "/site/", Keyring.load(trusted), product="demo")
        assert source.url == url + "/site/releases.json"
        assert source.join(feed.newest().file).url == url + "/site/demo-2.0.0.bundle"


def reject(location: Path | str, keyring: Keyring, product: str = "demo") -> str:
    with pytest.raises(Rejected) as e:
        load_feed(str(location), keyring, product=product)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_feeds(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    trusted, other = keys
    ring = Keyring.load(trusted)
    good = Feed("demo", (release("2.0.0"),)).to_json()

    tampered = write_feed(tmp_path / "tampered", good.replace(b"2.0.0", b"9.0.0"), trusted, sign=good)
    assert reject(tampered, ring).startswith("bad signature: releases.json was not signed by key ")

    foreign = write_feed(tmp_path / "foreign", good, other)
    assert reject(foreign, ring).startswith("release feed signed by unknown key ")

    unsigned = tmp_path / "unsigned/releases.json"
    unsigned.parent.mkdir()
    unsigned.write_bytes(good)
    assert "is unsigned: no such file" in reject(unsigned, ring)

    garbage = write_feed(tmp_path / "garbage", b"<html>not json</html>", trusted)
    assert reject(garbage, ring).startswith("release feed is not JSON")

    wrong = write_feed(tmp_path / "wrong", Feed("toaster", (release("2.0.0"),)).to_json(), trusted)
    assert reject(wrong, ring) == "wrong product: the release feed is for toaster, this system is demo"

    empty = write_feed(tmp_path / "empty", Feed("demo", ()).to_json(), trusted)
    assert reject(empty, ring).endswith("lists no releases")

    bad_sig_file = write_feed(tmp_path / "badsig", good, trusted)
    (tmp_path / "badsig/releases.json.sig").write_bytes(b"{]")
    assert reject(bad_sig_file, ring).startswith("release feed signature is malformed")

    assert reject(tmp_path / "nowhere", ring).startswith("no such file")


@pytest.mark.parametrize(
    "entry, reason",
    [
        ({"version": "1", "file": "x", "size": 0, "sha256": SHA, "created": "2026-01-01"}, "size must be"),
        ({"version": "1", "file": "x", "size": 1, "sha256": "AB" * 32, "created": "2026-01-01"}, "sha256 must be"),
        ({"version": "1", "file": "x", "size": 1, "sha256": SHA, "created": "yesterday"}, "not an ISO 8601"),
        ({"version": "1", "size": 1, "sha256": SHA, "created": "2026-01-01"}, "lacks file"),
        ("1.0.0", "is not an object"),
    ],
)
def test_malformed_releases(entry: object, reason: str) -> None:
    import json

    with pytest.raises(Rejected, match=reason):
        Feed.parse(json.dumps({"format": 1, "product": "demo", "releases": [entry]}).encode())


def test_duplicate_versions_and_formats() -> None:
    import json

    twice = {"format": 1, "product": "d", "releases": [release("1.0.0").__dict__, release("1.0.0").__dict__]}
    with pytest.raises(Rejected, match="lists version 1.0.0 twice"):
        Feed.parse(json.dumps(twice).encode())
    with pytest.raises(Rejected, match="format 2"):
        Feed.parse(b'{"format": 2, "product": "d", "releases": []}')
    with pytest.raises(Rejected, match="not a JSON object"):
        Feed.parse(b"[]")


def test_feed_source_finds_releases_json_in_a_directory(tmp_path: Path) -> None:
    assert feed_source(str(tmp_path)).path == tmp_path / "releases.json"
    assert feed_source("https://h/updates/").url == "https://h/updates/releases.json"
    assert feed_source("https://h/updates/releases.json").url == "https://h/updates/releases.json"


# --- `updated` and `expires` (issue 10, item 5) -----------------------------------------------------


def test_updated_and_expires_round_trip_inside_the_signed_bytes() -> None:
    feed = Feed("demo", (release("1.0.0"),), "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00Z")
    raw = feed.to_json()
    assert b'"expires": "2026-02-01T00:00:00Z"' in raw
    assert Feed.parse(raw) == feed
    assert (Feed.parse(raw).expires_at - Feed.parse(raw).updated_at).days == 31
    assert b"expires" not in Feed("demo", (release("1.0.0"),), "2026-01-01T00:00:00+00:00").to_json()
    assert Feed.parse(Feed("demo", (release("1.0.0"),)).to_json()).updated is None  # an older publisher's


@pytest.mark.parametrize(
    ("times", "reason"),
    [
        ({"updated": 5}, "updated 5 is not an ISO 8601 time"),
        ({"updated": "yesterday"}, "updated 'yesterday' is not an ISO 8601 time"),
        ({"updated": "2026-01-01T00:00:00"}, "has no time zone offset"),
        ({"expires": "2026-01-01T00:00:00+00:00"}, "expires without updated"),
        ({"updated": "2026-01-02T00:00:00+00:00", "expires": "2026-01-01T00:00:00+00:00"}, "is not after updated"),
        ({"updated": "2026-01-02T00:00:00+00:00", "expires": "soon"}, "expires 'soon' is not an ISO 8601 time"),
    ],
)
def test_malformed_times_are_rejected(times: dict[str, object], reason: str) -> None:
    import json

    doc = {"format": 1, "product": "demo", "releases": [release("1.0.0").__dict__], **times}
    with pytest.raises(Rejected, match=reason):
        Feed.parse(json.dumps(doc).encode())


def test_feed_state_is_checked_and_kept(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from recovery.updated.feedstate import STATE, check_fresh, read_state, remember

    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    older = Feed("demo", (release("1.0.0"),), "2026-01-01T00:00:00+00:00")
    newer = Feed("demo", (release("1.0.0"),), "2026-02-01T00:00:00Z", "2026-03-01T00:00:01Z")
    assert read_state(tmp_path) is None
    check_fresh(older, None, now)
    remember(tmp_path, older, None, source="/srv/feed/releases.json", now=now)
    state = read_state(tmp_path)
    assert state is not None and state.updated == older.updated and state.accepted == "2026-03-01T00:00:00+00:00"
    check_fresh(newer, state, now)
    remember(tmp_path, newer, state, source="x", now=now)
    state = read_state(tmp_path)
    assert state is not None and state.updated == "2026-02-01T00:00:00Z"
    assert sorted(p.name for p in (tmp_path / STATE).parent.iterdir()) == ["feed.json"]  # no temp files
    check_fresh(newer, state, now)  # the same feed again
    with pytest.raises(Rejected, match=r"^feed is older than the one accepted on 2026-03-01T00:00:00\+00:00 "):
        check_fresh(older, state, now)
    with pytest.raises(Rejected, match=r"^feed expired on 2026-03-01T00:00:01Z$"):
        check_fresh(newer, state, datetime(2026, 3, 1, 0, 0, 1, tzinfo=timezone.utc))
