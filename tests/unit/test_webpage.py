"""The update page in a real browser: Debian's headless Chromium, driven by selenium through
chromedriver, against reflashd on the host's loopback (its TCP listener, behind the token).

Each state the page reaches is kept as a screenshot under the test's tmp_path; the paths are printed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver

from mkimage.publish import publish
from recovery.core.instruction import read_instruction
from recovery.core.result import Outcome, Result, write_result

from .browser import Page, chromium
from .reflashctl_support import Releases, ServerState, System, http_server
from .reflashd_support import Daemon, running_daemon

NAME = "demo-appliance-2.0.0.bundle"
NOTES = "Faster boot.\nFixes the clock."


@pytest.fixture
def server(releases: Releases, tmp_path: Path) -> Iterator[tuple[ServerState, str]]:
    out = tmp_path / "published"
    publish([releases.bundles["2.0.0"]], out, key=releases.pem, notes={"2.0.0": NOTES})
    state = ServerState(files={f"/updates/{p.name}": p.read_bytes() for p in out.iterdir()})
    with http_server(state) as url:
        yield state, url


@pytest.fixture
def daemon(system: System, server: tuple[ServerState, str]) -> Iterator[Daemon]:
    with running_daemon(system, feed=f"{server[1]}/updates/") as d:
        yield d


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


def page_of(browser: webdriver.Chrome, daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Page:
    def say(line: str) -> None:
        with capsys.disabled():  # in the test's output even when it passes
            print(f"\n{line}", end="")

    return Page(browser, f"http://127.0.0.1:{daemon.port}/", tmp_path / "screenshots", say)


def test_a_wrong_token_shows_the_refusal(browser, daemon: Daemon, tmp_path: Path, capsys) -> None:
    page = page_of(browser, daemon, tmp_path, capsys)
    page.open()
    page.sign_in("not-the-token")
    page.until(lambda: "wrong or missing access token" in page.text("refusal"))
    assert page.el("access").is_displayed()
    assert page.text("running") == "…"  # nothing of the appliance was shown
    page.shot("refused")
    assert daemon.status()["state"] == "idle"


def test_download_install_and_cancel_from_the_page(browser, daemon: Daemon, server, tmp_path: Path, capsys) -> None:
    state, _url = server
    state.pause = 0.06  # about 3 s for the bundle: the bar has time to move
    system = daemon.system
    page = page_of(browser, daemon, tmp_path, capsys)
    page.open()
    page.sign_in(daemon.token)
    page.until(lambda: page.text("newest-version") == "2.0.0")
    assert page.text("running") == "demo-appliance 1.0.0"
    assert page.text("notes") == NOTES
    assert page.el("rss").get_attribute("href").endswith("/updates/releases.rss")
    assert page.state() == "idle"
    page.until(lambda: page.el("download").is_enabled())
    assert not page.el("install").is_enabled()
    page.shot("release-notes")

    page.el("download").click()
    page.until(lambda: page.state() == "downloading"
               and 0 < int(page.el("progress").get_attribute("value")) < 100)
    assert page.el("progress").is_displayed() and "MiB" in page.text("progress-text")
    page.shot("downloading")
    page.until(lambda: page.state() == "downloaded")
    assert page.el("progress").get_attribute("value") == "100"
    assert page.text("state") == "downloaded 2.0.0: ready to install"
    assert (system.bundles / NAME).is_file() and not system.config.instruction.exists()
    assert not page.el("download").is_enabled()  # the newest release is here already
    page.shot("downloaded")

    page.until(lambda: page.el("install").is_enabled())
    page.el("install").click()
    page.until(lambda: page.el("confirm-box").is_displayed())
    assert "reboots the appliance" in page.text("confirm-text")
    assert not system.config.instruction.exists()  # asking is not doing
    page.shot("confirm-install")
    page.el("confirm-install").click()
    page.until(lambda: page.state() == "staged")
    assert "rebooting into the recovery" in page.text("message")
    assert read_instruction(system.config.instruction).version == "2.0.0"
    page.until(lambda: len(daemon.reboots) == 1, timeout=5)
    page.shot("staged")

    page.until(lambda: page.el("cancel").is_enabled())
    page.el("cancel").click()
    page.until(lambda: page.state() == "downloaded")
    assert "cancelled the staged update to 2.0.0" in page.text("message")
    assert not system.config.instruction.exists() and (system.bundles / NAME).is_file()
    page.shot("cancelled")
    assert len(daemon.reboots) == 1


def test_the_page_shows_why_the_last_update_was_rolled_back(browser, daemon: Daemon, tmp_path: Path, capsys) -> None:
    write_result(daemon.system.config.cfg, Result(
        Outcome.rolled_back, from_version="2.0.1", to_version="1.0.0",
        reason="2.0.1 did not confirm within 3 boots: boot 3: health check 50-app failed (exit status 3)",
        finished="2026-01-01T00:00:41+00:00"))
    page = page_of(browser, daemon, tmp_path, capsys)
    page.open()
    page.sign_in(daemon.token)
    page.until(lambda: page.el("last").get_attribute("data-outcome") == "rolled-back")
    assert "health check 50-app failed" in page.text("last") and "rolled back" in page.text("last")
    page.shot("rolled-back")
