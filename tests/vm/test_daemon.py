"""The update page under QEMU, the whole cycle from a browser, through `reflash demo --page`'s path:
the guest's reflashd port forwarded to the host's loopback, headless Chromium presses Download, then
Install (confirmed), the appliance reboots through the recovery, and the page, reloaded, shows the new
version and "installed".

The guest reaches the published releases only through the guestfwd at 10.0.2.100:80 (restrict=on),
where the demo image's `[daemon] feed` points; the host reaches the page through a hostfwd.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selenium import webdriver

from tests.unit.browser import Page, chromium
from vm.demo import run_demo

TRANSFER = 900.0  # download and verification of a bundle in the guest, under TCG
AFTER_REBOOT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Browser:
    """The demo's PageOperator, played by headless Chromium; what it saw is kept for the asserts."""

    driver: webdriver.Chrome
    shots: Path
    seen: dict[str, str] = field(default_factory=dict)
    page: Page | None = None

    def update(self, url: str, token: str) -> None:
        page = self.page = Page(self.driver, url, self.shots)
        page.open()
        page.sign_in(token)
        page.until(lambda: page.text("newest-version") == "2.0.0", timeout=120)
        self.seen["running before"] = page.text("running")
        page.until(lambda: page.el("download").is_enabled())
        page.shot("1.0.0")
        page.el("download").click()
        page.until(lambda: page.state() == "downloaded", timeout=TRANSFER)
        page.shot("downloaded")
        page.el("install").click()
        page.until(lambda: page.el("confirm-box").is_displayed())
        self.seen["confirm"] = page.text("confirm-text")
        page.el("confirm-install").click()  # the appliance reboots at once: the demo waits for it

    def updated(self, url: str, version: str) -> None:
        page = self.page
        assert page is not None
        page.open()  # the same tab: the token is still in its sessionStorage
        page.until(lambda: page.text("running") == f"demo-appliance {version}", timeout=AFTER_REBOOT)
        page.until(lambda: page.el("last").get_attribute("data-outcome") == "installed", timeout=AFTER_REBOOT)
        self.seen["last after"] = page.text("last")
        page.shot("installed")


def test_the_whole_cycle_from_the_update_page(built_image: Any, tmp_path: Path) -> None:
    with chromium() as driver:
        browser = Browser(driver, tmp_path / "screenshots")
        report = run_demo(built_image, tmp_path / "demo", page=(free_port(), browser))
    assert browser.seen["running before"] == "demo-appliance 1.0.0"
    assert "reboots the appliance" in browser.seen["confirm"]
    assert browser.seen["last after"].startswith("installed 1.0.0 -> 2.0.0"), browser.seen
    # The guest fetched the newest bundle through the page's Download, and the cycle ended on 2.0.0.
    assert "/demo-appliance-2.0.0.bundle" in report.fetched, report.fetched
    assert report.to_version == "2.0.0" and "running: demo-appliance 2.0.0" in report.status
    assert [s.name for s in report.stages][-4:] == ["installed", "reboot-system", "ready", "status"]
    # Both reboots of the update skipped the firmware and GRUB (recovery/updated/kexec.py, recovery/os/kexec.py):
    # GRUB ran once, for the first boot of 1.0.0.
    log = report.console_log.read_text(errors="replace")
    assert "kexec into the recovery in slot a (the firmware and GRUB are skipped)" in log
    assert "recovery: 2.0.0 is loaded for kexec (trial boot 1 counted)" in log
    assert "Loading the system (by kexec from the recovery: no firmware, no GRUB)" in log
    assert log.count("GNU GRUB") == 1 and "Loading the recovery OS" not in log
