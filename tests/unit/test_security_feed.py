"""Security audit, issue 10 items 5 and 6: no silent downgrades, no replayed or expired feeds, no control
characters from a feed on the terminal or in the RSS, no redirects off http(s) or down from https.

Every scenario runs the real code paths: signed bundles and feeds, a real HTTP(S) server on 127.0.0.1,
real instruction files, the recovery's installer with only the device lookup faked (as in
test_init_checks.py). Each test failed on the code before these fixes (see the commit notes).
"""

from __future__ import annotations

import json
import re
import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from mkimage.cli import main as mkimage
from mkimage.publish import publish
from recovery.os import installer
from recovery.core.manifest import Signature
from recovery.updated.source import Source
from recovery.updated.transfer import download
from recovery.core.errors import Rejected
from recovery.core.feed import Feed, Release
from recovery.updated.feedstate import STATE
from recovery.os.cmdline import Boot
from recovery.os.console import Console
from recovery.os.installer import Installer
from recovery.core.instruction import Instruction, read_instruction, write_instruction
from recovery.core.keys import keyid, load_private_key, raw_public_key
from recovery.core.result import Outcome
from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)

from .test_init_checks import CONFIG, machine, run  # noqa: F401  (the fake disk fixture)
from .test_reflashctl import assert_staged, reflashctl
from .reflashctl_support import (
    PRODUCT, Releases, ServerState, System, http_server, make_system, self_signed,
)

DOWNGRADE = "Downgrade refused unless allowed (reflashctl install, install --latest, the recovery's own check)"
REPLAY = "Replayed or expired feed rejected (signed `updated` remembered on cfg, `expires`)"
CONTROLS = "Control characters in release notes and feed fields (reflash publish refuses, reflashctl strips)"
REDIRECT = "Redirect to another scheme, or from https to http, refused"
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
PLENTY = lambda _path: 1 << 40  # noqa: E731


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    return err.strip()


def stamp(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


NOW = datetime.now(timezone.utc).replace(microsecond=0)


def entry(releases: Releases, version: str, **kw: Any) -> Release:
    import hashlib

    bundle = releases.bundles[version]
    return Release(version, bundle.name, bundle.stat().st_size, hashlib.sha256(bundle.read_bytes()).hexdigest(),
                   "2026-01-02T03:04:05+00:00", **kw)


def signed_site(directory: Path, releases: Releases, feed: Feed, *, raw: bytes | None = None) -> Path:
    """A directory with `feed` (or `raw` bytes) as releases.json, signed by the trusted key, and its bundles."""
    directory.mkdir(parents=True, exist_ok=True)
    data = feed.to_json() if raw is None else raw
    key = load_private_key(releases.pem)
    (directory / "releases.json").write_bytes(data)
    (directory / "releases.json.sig").write_bytes(
        Signature(keyid(raw_public_key(key.public_key())), key.sign(data)).to_json())
    for r in feed.releases:
        if (directory / r.file).exists() or r.version not in releases.bundles:
            continue
        (directory / r.file).write_bytes(releases.bundles[r.version].read_bytes())
    return directory


# --- 5a. Downgrades -----------------------------------------------------------------------------


def test_reflashctl_install_refuses_a_downgrade_without_the_flag(
    tmp_path: Path, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = DOWNGRADE
    scenario.checked = (
        "reflashctl: a verified bundle older than the running version is refused with one line and nothing "
        "staged or left on storage; `--allow-downgrade` stages it with `recovery_allow_downgrade=1`; the "
        "recovery rejects (before any mount of storage or erase) an older version the instruction does not "
        "allow, and installs the same version or an allowed downgrade"
    )
    system = make_system(tmp_path / "newer", releases, running="2.0.0")
    code, _, err = reflashctl(system, capsys, "install", str(releases.bundles["1.0.0"]), "--no-reboot")
    assert code == 1
    assert one_line(err) == "rejected: downgrade from 2.0.0 to 1.0.0 refused (use --allow-downgrade to install it)"
    assert not system.config.instruction.exists() and system.leftovers() == []
    # The version that counts is the verified manifest's: a bundle named like an upgrade is still refused.
    disguised = tmp_path / "demo-appliance-9.0.0.bundle"
    disguised.write_bytes(releases.bundles["1.9.0"].read_bytes())
    code, _, err = reflashctl(system, capsys, "install", str(disguised), "--no-reboot")
    assert code == 1 and "downgrade from 2.0.0 to 1.9.0 refused" in one_line(err)

    code, out, err = reflashctl(system, capsys, "install", str(releases.bundles["1.0.0"]), "--no-reboot",
                               "--allow-downgrade")
    assert code == 0, err
    assert_staged(system, releases.bundles["1.0.0"], "1.0.0")
    assert b"\nrecovery_allow_downgrade=1\n" in system.config.instruction.read_bytes()


def test_install_latest_downgrades_only_when_allowed(
    tmp_path: Path, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = DOWNGRADE
    # 3.0.0 was withdrawn: the feed's newest is 2.0.0 now.
    system = make_system(tmp_path / "withdrawn", releases, running="3.0.0")
    site = signed_site(tmp_path / "site", releases, Feed(PRODUCT, (entry(releases, "2.0.0"),), stamp(NOW)))
    code, out, err = reflashctl(system, capsys, "install", "--latest", str(site), "--no-reboot")
    assert (code, out) == (0, "up to date: 3.0.0 is running, the newest release is 2.0.0 "
                              "(older: --allow-downgrade installs it)\n"), err
    code, _, err = reflashctl(system, capsys, "install", "--latest", str(site), "--no-reboot", "--force")
    assert code == 0 and not system.config.instruction.exists(), err  # --force is no downgrade licence
    code, out, err = reflashctl(system, capsys, "install", "--latest", str(site), "--no-reboot", "--allow-downgrade")
    assert code == 0, err
    assert_staged(system, releases.bundles["2.0.0"], "2.0.0")
    assert read_instruction(system.config.instruction).allow_downgrade


def test_reinstalling_the_running_version_is_no_downgrade(
    system: System, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = DOWNGRADE
    code, _, err = reflashctl(system, capsys, "install", "--force", str(releases.bundles["1.0.0"]), "--no-reboot")
    assert code == 0, err
    assert not read_instruction(system.config.instruction).allow_downgrade


def stage_for_recovery(state: dict[str, Any], version: str, *, allow: bool = False) -> None:
    extra = {"allow_downgrade": True} if allow else {}  # without the key: any instruction ever written
    write_instruction(state["cfg"] / installer.INSTRUCTION, Instruction.create(
        disk="PARTLABEL=storage", file="/bundles/a.bundle", sha256="ab" * 32, version=version, **extra))


def test_the_recovery_rejects_a_downgrade_the_instruction_does_not_allow(
    machine: dict[str, Any], monkeypatch: pytest.MonkeyPatch, scenario: Scenario  # noqa: F811
) -> None:
    scenario.name = DOWNGRADE
    monkeypatch.setattr(Installer, "_installed_version", lambda self, system: "3.0.0")
    stage_for_recovery(machine, "1.0.0")
    result = run(machine)  # also checks that nothing was mounted, erased or marked incomplete
    assert (result.outcome, result.reason) == (
        Outcome.rejected, "downgrade from 3.0.0 to 1.0.0 not allowed by the instruction")
    assert (result.from_version, result.to_version) == ("3.0.0", "1.0.0")
    for version in ("2.10.0", "3.0.0-rc1"):  # ordered as people read versions, not as strings
        stage_for_recovery(machine, version)
        assert run(machine).reason == f"downgrade from 3.0.0 to {version} not allowed by the instruction"


@pytest.mark.parametrize(("version", "allow"), [("1.0.0", True), ("3.0.0", False), ("3.0", False),
                                                 ("3.0.1", False)])
def test_the_recovery_goes_on_for_an_allowed_downgrade_a_repair_or_an_upgrade(
    machine: dict[str, Any], monkeypatch: pytest.MonkeyPatch, scenario: Scenario,  # noqa: F811
    version: str, allow: bool,
) -> None:
    scenario.name = DOWNGRADE
    monkeypatch.setattr(Installer, "_installed_version", lambda self, system: "3.0.0")
    stage_for_recovery(machine, version, allow=allow)
    # Past every check the installer mounts storage to verify the bundle: the step the fakes forbid.
    with pytest.raises(AssertionError, match="the target was touched"):
        Installer(CONFIG, Boot(), Console(), machine["cfg"], parts=machine["parts"]).run()


# --- 5b. Replayed and expired feeds -------------------------------------------------------------


def remembered(system: System) -> dict[str, str] | None:
    path = system.config.cfg / STATE
    return json.loads(path.read_bytes()) if path.exists() else None


def test_a_replayed_older_feed_is_rejected(
    tmp_path: Path, system: System, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = REPLAY
    scenario.checked = (
        "a feed older than the newest accepted one, past its `expires`, or undated once a dated one was "
        "accepted is rejected with one line by `check` and `install --latest`, nothing staged; the same feed "
        "again is accepted; the remembered time moves only after a good signature"
    )
    old = signed_site(tmp_path / "old", releases,
                      Feed(PRODUCT, (entry(releases, "1.9.0"),), stamp(NOW - timedelta(days=30))))
    new = signed_site(tmp_path / "new", releases,
                      Feed(PRODUCT, (entry(releases, "1.9.0"), entry(releases, "1.10.0")), stamp(NOW)))
    files = {f"/u/{p.name}": p.read_bytes() for p in old.iterdir()}
    state = ServerState(files=files)
    with http_server(state) as url:
        code, out, err = reflashctl(system, capsys, "check", url + "/u/")
        assert code == 0 and out.startswith("update available: 1.9.0"), err
        assert remembered(system)["updated"] == stamp(NOW - timedelta(days=30))
        state.files = {f"/u/{p.name}": p.read_bytes() for p in new.iterdir()}
        code, out, err = reflashctl(system, capsys, "check", url + "/u/")
        assert code == 0 and out.startswith("update available: 1.10.0"), err
        code, _, err = reflashctl(system, capsys, "check", url + "/u/")  # the same feed twice: fine
        assert code == 0, err
        accepted = remembered(system)
        assert accepted is not None and accepted["updated"] == stamp(NOW)
        assert accepted["source"] == url + "/u/releases.json"

        state.files = files  # the older signed feed, served again
        for argv in (["check", url + "/u/"], ["install", "--latest", url + "/u/", "--no-reboot"]):
            code, _, err = reflashctl(system, capsys, *argv)
            assert code == 1
            assert one_line(err) == (
                f"rejected: feed is older than the one accepted on {accepted['accepted']} "
                f"(updated {stamp(NOW - timedelta(days=30))}, that one {stamp(NOW)}; replayed?)")
    assert remembered(system) == accepted
    assert not system.config.instruction.exists() and system.leftovers() == []


def test_an_expired_feed_is_rejected(
    tmp_path: Path, system: System, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = REPLAY
    expired = NOW - timedelta(hours=1)
    doc = json.loads(Feed(PRODUCT, (entry(releases, "2.0.0"),), stamp(NOW - timedelta(days=8))).to_json())
    doc["expires"] = stamp(expired)  # inside the signed bytes
    site = signed_site(tmp_path / "expired", releases, Feed(PRODUCT, (entry(releases, "2.0.0"),)),
                       raw=json.dumps(doc).encode())
    for argv in (["check", str(site)], ["install", "--latest", str(site), "--no-reboot"]):
        code, _, err = reflashctl(system, capsys, *argv)
        assert (code, one_line(err)) == (1, f"rejected: feed expired on {stamp(expired)}")
    assert remembered(system) is None and not system.config.instruction.exists()
    # The publisher's answer: publish again, with a new expiry.
    out = tmp_path / "published"
    assert mkimage(["publish", "--key", str(releases.pem), "-o", str(out), str(releases.bundles["2.0.0"]),
                    "--expires", "7d"]) == 0
    feed = Feed.parse((out / "releases.json").read_bytes())
    assert feed.expires_at - feed.updated_at == timedelta(days=7)
    code, out_text, err = reflashctl(system, capsys, "install", "--latest", str(out), "--no-reboot")
    assert code == 0, err
    assert_staged(system, releases.bundles["2.0.0"])


def test_an_undated_feed_is_rejected_once_a_dated_one_was_accepted(
    tmp_path: Path, system: System, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = REPLAY
    undated = signed_site(tmp_path / "undated", releases, Feed(PRODUCT, (entry(releases, "2.0.0"),)))
    code, out, err = reflashctl(system, capsys, "check", str(undated))
    assert code == 0 and "carries no updated time" in out, err  # an old publisher, on a system that saw no dated feed
    assert remembered(system) is None
    dated = signed_site(tmp_path / "dated", releases, Feed(PRODUCT, (entry(releases, "2.0.0"),), stamp(NOW)))
    assert reflashctl(system, capsys, "check", str(dated))[0] == 0
    code, _, err = reflashctl(system, capsys, "check", str(undated))
    assert code == 1 and one_line(err).startswith(
        f"rejected: feed has no updated time, and a dated one was accepted on {remembered(system)['accepted']}")


def test_a_forged_newer_feed_moves_nothing(
    tmp_path: Path, system: System, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = REPLAY
    good = signed_site(tmp_path / "good", releases, Feed(PRODUCT, (entry(releases, "2.0.0"),), stamp(NOW)))
    assert reflashctl(system, capsys, "check", str(good))[0] == 0
    before = (system.config.cfg / STATE).read_bytes()
    # Dated far ahead but signed by nobody we trust: were it remembered, every genuine feed would look old.
    forged = Feed(PRODUCT, (entry(releases, "2.0.0"),), "2099-01-01T00:00:00+00:00").to_json()
    (good / "releases.json").write_bytes(forged)
    code, _, err = reflashctl(system, capsys, "check", str(good))
    assert code == 1 and one_line(err).startswith("rejected: bad signature")
    assert (system.config.cfg / STATE).read_bytes() == before
    # An unreadable record fails closed, and says how to recover.
    (system.config.cfg / STATE).write_bytes(b"{not json")
    signed_site(good, releases, Feed(PRODUCT, (entry(releases, "2.0.0"),), stamp(NOW)))
    code, _, err = reflashctl(system, capsys, "check", str(good))
    assert code == 1 and one_line(err).endswith("remove it to accept any signed feed again")


# --- 6a. Control characters ---------------------------------------------------------------------


def test_publish_refuses_control_characters_in_release_notes(
    tmp_path: Path, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = CONTROLS
    scenario.checked = (
        "`reflash publish` refuses notes with controls other than newline and tab (one line naming the "
        "release, nothing written) and its RSS stays well-formed XML; `reflashctl check` prints no C0/C1/DEL "
        "from a signed feed's notes; a feed version, product or file with controls is rejected in one line "
        "that carries none"
    )
    out = tmp_path / "site"
    notes = tmp_path / "notes.txt"
    notes.write_text("Fixes \x1b[2J\x1b]0;pwned\x07 the clock.\n")
    code = mkimage(["publish", "--key", str(releases.pem), "-o", str(out), str(releases.bundles["2.0.0"]),
                    "--notes", str(notes)])
    err = capsys.readouterr().err
    assert code == 1
    assert one_line(err) == ("rejected: release notes of 2.0.0 contain control characters (U+0007, U+001B): "
                             "only newline and tab are allowed")
    assert not out.exists() or list(out.iterdir()) == []  # not even the bundle was placed
    for bad in ("C1 \x9b31m", "DEL \x7f", "CR \r", "NUL \x00"):
        with pytest.raises(Rejected, match="release notes of 1.0.0 contain control characters"):
            publish([releases.bundles["1.0.0"]], out, key=releases.pem, notes={"1.0.0": bad})
    # Newlines and tabs are what notes are made of; the RSS parses.
    publish([releases.bundles["1.0.0"]], out, key=releases.pem, notes={"1.0.0": "Line one\n\tindented & <ok>"})
    item = ET.fromstring((out / "releases.rss").read_bytes()).find("channel/item")
    assert item is not None and item.findtext("description") == "Line one\n\tindented & <ok>"


def test_reflashctl_check_strips_control_characters_from_a_signed_feed(
    tmp_path: Path, system: System, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = CONTROLS
    # An older publisher (or a compromised build host) signed these notes: the signature makes them the
    # publisher's, not safe to hand to a terminal.
    notes = "Faster\x1b[31m boot\x07.\n\tFixes\x9b2J the\x7f clock.\x1b]0;title\x07"
    site = signed_site(tmp_path / "site", releases,
                       Feed(PRODUCT, (entry(releases, "2.0.0", notes=notes),), stamp(NOW)))
    code, out, err = reflashctl(system, capsys, "check", str(site))
    assert code == 0, err
    assert not CONTROL_CHARS.search(out), repr(out)
    assert out.splitlines() == ["update available: 2.0.0 (running 1.0.0)", "  Faster[31m boot.",
                                "  \tFixes2J the clock.]0;title"]


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("version", "9.9.9\x1b]0;pwned\x07", r"release feed: release 1: version '9\.9\.9\\x1b\]0;pwned\\x07' must be"),
    ("file", "x\x1b[2J.bundle", r"release feed: release 1: file 'x\\x1b\[2J\.bundle' contains control characters"),
    ("product", "demo-appliance\x1b[2J", r"release feed: product 'demo-appliance\\x1b\[2J' must be"),
])
def test_feed_fields_with_control_characters_are_rejected_in_one_clean_line(
    tmp_path: Path, system: System, releases: Releases, capsys: pytest.CaptureFixture[str], scenario: Scenario,
    field: str, value: str, reason: str,
) -> None:
    scenario.name = CONTROLS
    doc = json.loads(Feed(PRODUCT, (entry(releases, "2.0.0"),), stamp(NOW)).to_json())
    if field == "product":
        doc["product"] = value
    else:
        doc["releases"][0][field] = value
    site = signed_site(tmp_path / "site", releases, Feed(PRODUCT, ()), raw=json.dumps(doc).encode())
    code, out, err = reflashctl(system, capsys, "check", str(site))
    assert code == 1 and out == ""
    assert re.match(f"rejected: {reason}", one_line(err)), err
    assert not CONTROL_CHARS.search(err)


# --- 6b. Redirects ------------------------------------------------------------------------------


class Listener:
    """A TCP port that records whether anyone connected (the ftp server a redirect points at)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]

    def connected(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except (TimeoutError, socket.timeout):
            return False
        conn.close()
        return True

    def close(self) -> None:
        self.sock.close()


def test_a_redirect_to_ftp_is_refused(tmp_path: Path, scenario: Scenario) -> None:
    scenario.name = REDIRECT
    scenario.checked = (
        "a 302 to ftp:// (or file://) is refused with one line and nothing is fetched from there; a 302 from "
        "https to http is refused before the http server is asked; http->https, http->http and "
        "https->https redirects are still followed; through `reflashctl install` nothing is left behind"
    )
    ftp = Listener()
    try:
        state = ServerState(redirects={"/b.bundle": f"ftp://127.0.0.1:{ftp.port}/b.bundle"})
        partial = tmp_path / "b.bundle.partial"
        with http_server(state) as url, pytest.raises(Rejected) as caught:
            download(Source.parse(url + "/b.bundle"), partial, free=PLENTY, progress=False)
        assert str(caught.value) == (f"cannot download {url}/b.bundle: HTTP 302 redirect to "
                                     f"ftp://127.0.0.1:{ftp.port}/b.bundle refused: only http and https are followed")
        assert not ftp.connected() and not partial.exists()
    finally:
        ftp.close()
    state = ServerState(redirects={"/b.bundle": "file:///etc/passwd"})
    with http_server(state) as url, pytest.raises(Rejected, match="not allowed"):
        download(Source.parse(url + "/b.bundle"), tmp_path / "f.partial", free=PLENTY, progress=False)


def test_a_redirect_from_https_to_http_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: Scenario
) -> None:
    scenario.name = REDIRECT
    tls = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    plain = ServerState(files={"/b.bundle": b"bundle bytes"})
    with http_server(plain) as http_url:
        secure = ServerState(redirects={"/b.bundle": http_url + "/b.bundle"})
        with http_server(secure, tls=tls) as https_url, pytest.raises(Rejected) as caught:
            download(Source.parse(https_url + "/b.bundle"), tmp_path / "b.partial", free=PLENTY, progress=False)
    assert str(caught.value) == (f"cannot download {https_url}/b.bundle: HTTP 302 redirect to {http_url}/b.bundle "
                                 "refused: never from https to http")
    assert plain.requests == [] and secure.requests != []
    assert not (tmp_path / "b.partial").exists()


def test_redirects_within_http_and_up_to_https_are_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: Scenario
) -> None:
    scenario.name = REDIRECT
    tls = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    body = b"the bundle" * 1000
    secure = ServerState(files={"/real.bundle": body}, redirects={"/moved.bundle": "/real.bundle"})
    with http_server(secure, tls=tls) as https_url:
        plain = ServerState(files={"/real.bundle": body},
                            redirects={"/up.bundle": https_url + "/moved.bundle", "/here.bundle": "/real.bundle"})
        with http_server(plain) as http_url:
            for name in ("up", "here"):
                t = download(Source.parse(f"{http_url}/{name}.bundle"), tmp_path / f"{name}.partial",
                             free=PLENTY, progress=False)
                assert t.path.read_bytes() == body
    assert [r["path"] for r in secure.requests] == ["/moved.bundle", "/real.bundle"]


def test_reflashctl_install_through_a_bad_redirect_is_one_line_and_leaves_nothing(
    system: System, capsys: pytest.CaptureFixture[str], scenario: Scenario
) -> None:
    scenario.name = REDIRECT
    ftp = Listener()
    try:
        state = ServerState(redirects={"/x.bundle": f"ftp://127.0.0.1:{ftp.port}/x.bundle",
                                       "/feed/releases.json": f"ftp://127.0.0.1:{ftp.port}/releases.json"})
        with http_server(state) as url:
            code, _, err = reflashctl(system, capsys, "install", url + "/x.bundle", "--no-reboot")
            assert code == 1 and one_line(err).endswith("refused: only http and https are followed")
            code, _, err = reflashctl(system, capsys, "check", url + "/feed/")
            assert code == 1 and one_line(err).endswith("refused: only http and https are followed")
        assert not ftp.connected()
    finally:
        ftp.close()
    assert system.leftovers() == [] and not system.config.instruction.exists()
