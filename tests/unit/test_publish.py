"""`reflash publish`: a servable directory whose feed verifies, whose RSS parses, and that grows by release."""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from mkimage.cli import main as mkimage
from mkimage.publish import publish
from recovery.core.bundle import verify_bundle
from recovery.core.errors import Rejected
from recovery.core.feed import Feed, verify_feed
from recovery.updated.feeds import load_feed
from recovery.core.keys import Keyring

from .reflashctl_support import PRODUCT, Releases, make_releases


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return make_releases(tmp_path_factory.mktemp("releases"))


def test_publish_writes_bundles_a_signed_feed_and_rss(tmp_path: Path, releases: Releases, capsys) -> None:
    out = tmp_path / "site"
    notes = tmp_path / "notes.txt"
    notes.write_text("Faster boot.\n")
    b1, b2 = releases.bundles["1.9.0"], releases.bundles["1.10.0"]
    code = mkimage(["publish", "--key", str(releases.pem), "-o", str(out), str(b1), str(b2),
                    "--notes", str(notes), "--notes-for", "1.9.0=First & <best>",
                    "--base-url", "https://updates.example.com/demo/"])
    assert code == 0, capsys.readouterr().err
    assert "published 1.9.0, 1.10.0" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [b1.name, b2.name, "releases.json", "releases.json.sig", "releases.rss"])

    # The feed verifies with the keyring a device holds, and says what the bundles are.
    ring = Keyring.load(releases.keys)
    raw = (out / "releases.json").read_bytes()
    verify_feed(raw, (out / "releases.json.sig").read_bytes(), ring)
    feed, _ = load_feed(str(out), ring, product=PRODUCT)
    assert feed.newest().version == "1.10.0"
    for bundle in (b1, b2):
        assert (out / bundle.name).read_bytes() == bundle.read_bytes()
        entry = next(r for r in feed.releases if r.file == bundle.name)
        assert entry.size == bundle.stat().st_size
        assert entry.sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
        assert entry.created == verify_bundle(bundle, ring).manifest.created
    assert feed.find("1.10.0").notes == "Faster boot."
    assert feed.find("1.9.0").notes == "First & <best>"

    # RSS 2.0 for people: one item per release, newest first, absolute links, enclosures with sizes.
    rss = ET.fromstring((out / "releases.rss").read_bytes())
    assert rss.tag == "rss" and rss.get("version") == "2.0"
    channel = rss.find("channel")
    assert channel is not None and channel.findtext("title") == f"{PRODUCT} releases"
    items = channel.findall("item")
    assert [i.findtext("title") for i in items] == [f"{PRODUCT} 1.10.0", f"{PRODUCT} 1.9.0"]
    assert items[1].findtext("description") == "First & <best>"
    enclosure = items[0].find("enclosure")
    assert enclosure is not None
    assert enclosure.get("url") == f"https://updates.example.com/demo/{b2.name}"
    assert enclosure.get("length") == str(b2.stat().st_size)
    assert parsedate_to_datetime(items[0].findtext("pubDate") or "").year >= 2024
    assert len({i.findtext("guid") for i in items}) == 2


def test_publishing_again_adds_to_the_feed(tmp_path: Path, releases: Releases) -> None:
    out = tmp_path / "site"
    publish([releases.bundles["1.0.0"]], out, key=releases.pem, notes={"1.0.0": "first"})
    publish([releases.bundles["2.0.0"]], out, key=releases.pem)
    feed = Feed.parse((out / "releases.json").read_bytes())
    assert {r.version: r.notes for r in feed.releases} == {"1.0.0": "first", "2.0.0": ""}
    # A release whose file was removed from the directory leaves the feed at the next publish.
    (out / releases.bundles["1.0.0"].name).unlink()
    publish([releases.bundles["2.0.0"]], out, key=releases.pem, notes={"2.0.0": "second"})
    feed = Feed.parse((out / "releases.json").read_bytes())
    assert [(r.version, r.notes) for r in feed.releases] == [("2.0.0", "second")]


def test_bundles_are_hard_linked_when_they_can_be(tmp_path: Path, releases: Releases) -> None:
    out = tmp_path / "site"
    bundle = releases.bundles["1.0.0"]
    publish([bundle], out, key=releases.pem)
    same_fs = os.stat(bundle).st_dev == os.stat(out).st_dev
    assert os.path.samefile(bundle, out / bundle.name) == same_fs


def test_publish_refuses(tmp_path: Path, releases: Releases) -> None:
    out = tmp_path / "site"
    with pytest.raises(Rejected, match="signed by unknown key"):
        publish([releases.bundles["untrusted"]], out, key=releases.pem)
    with pytest.raises(Rejected, match="one feed is one product"):
        publish([releases.bundles["2.0.0"], releases.bundles["other-product"]], out, key=releases.pem)
    with pytest.raises(Rejected, match="version 2.0.0 given twice"):
        publish([releases.bundles["2.0.0"], releases.bundles["2.0.0"]], out, key=releases.pem)
    with pytest.raises(Rejected, match="release notes for 3.0.0"):
        publish([releases.bundles["2.0.0"]], out, key=releases.pem, notes={"3.0.0": "typo"})
    assert not (out / "releases.json").exists()
    # An existing feed signed with another key is not silently taken over.
    publish([releases.bundles["untrusted"]], out, key=releases.other_keys / "signing.pem")
    with pytest.raises(Rejected, match="was not signed with this key"):
        publish([releases.bundles["1.0.0"]], out, key=releases.pem)


def test_cli_errors_are_one_line(tmp_path: Path, releases: Releases, capsys) -> None:
    code = mkimage(["publish", "--key", str(releases.pem), "-o", str(tmp_path / "o"),
                    str(releases.bundles["1.0.0"]), "--notes-for", "no-equals-sign"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "expected VERSION=TEXT" in err
    assert mkimage(["publish", "--key", str(releases.pem), "-o", str(tmp_path / "o")]) == 2


def test_expires_is_a_duration_after_the_signed_updated_time(tmp_path: Path, releases: Releases, capsys) -> None:
    from datetime import timedelta

    from mkimage.publish import parse_duration

    assert [parse_duration(t) for t in ("30m", "36h", "90d", "2w")] == [
        timedelta(minutes=30), timedelta(hours=36), timedelta(days=90), timedelta(weeks=2)]
    for bad in ("0d", "1y", "d", "-1d", "2026-01-01"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)
    out = tmp_path / "site"
    assert mkimage(["publish", "--key", str(releases.pem), "-o", str(out), str(releases.bundles["1.0.0"]),
                    "--expires", "1y"]) == 2
    assert "is not a duration" in capsys.readouterr().err and not out.exists()
    publish([releases.bundles["1.0.0"]], out, key=releases.pem, expires=timedelta(hours=36))
    feed = Feed.parse((out / "releases.json").read_bytes())
    assert feed.expires_at - feed.updated_at == timedelta(hours=36)
    # A later publish without --expires makes a feed that does not expire: each publish says its own.
    publish([releases.bundles["2.0.0"]], out, key=releases.pem)
    assert Feed.parse((out / "releases.json").read_bytes()).expires is None


def test_publish_refuses_when_the_clock_is_behind_the_existing_feed(
    tmp_path: Path, releases: Releases, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mkimage.publish

    out = tmp_path / "site"
    monkeypatch.setattr(mkimage.publish, "now", lambda: "2030-01-01T00:00:00+00:00")
    publish([releases.bundles["1.0.0"]], out, key=releases.pem)
    before = (out / "releases.json").read_bytes()
    monkeypatch.setattr(mkimage.publish, "now", lambda: "2029-12-31T23:59:59+00:00")
    with pytest.raises(Rejected, match=r"was published at 2030-01-01T00:00:00\+00:00, after this machine's clock"):
        publish([releases.bundles["2.0.0"]], out, key=releases.pem)
    assert (out / "releases.json").read_bytes() == before
