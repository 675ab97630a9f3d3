"""The update page under QEMU, the whole cycle from a browser: the guest's reflashd port forwarded to
the host's loopback, headless Chromium presses Download, then Install (confirmed), the appliance
reboots through the recovery, and the page, reloaded, shows the new version and "installed".

The guest reaches the published releases only through the guestfwd at 10.0.2.100:80 (restrict=on),
where the demo image's `[daemon] feed` points; the host reaches the page through a hostfwd.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.unit.browser import Page, chromium
from tests.vm.staging import ready
from vm.deadlines import BOOT, KERNEL, RECOVERY
from vm.demo import FEED_HOST, publish_releases
from vm.machine import Firmware, Machine
from vm.network import StaticServer, UserNetwork

TRANSFER = 900.0  # download and verification of a bundle in the guest, under TCG
GUEST_PORT = 8080  # the demo image's [daemon] listen


@dataclass(frozen=True)
class ForwardedNetwork(UserNetwork):
    """The restricted user network plus hostfwd rules: (host loopback port, guest port) pairs."""

    host_ports: tuple[tuple[int, int], ...] = ()

    def qemu_args(self) -> list[str]:
        args = super().qemu_args()
        args[1] += "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in self.host_ports)
        return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_whole_cycle_from_the_update_page(
    machine: Callable[..., Machine], built_image: Any, tmp_path: Path
) -> None:
    newest = publish_releases(built_image, tmp_path / "published")
    assert newest == "2.0.0"
    port = free_port()
    with StaticServer(tmp_path / "published") as server:
        network = ForwardedNetwork((server.forward(FEED_HOST, 80),), host_ports=((port, GUEST_PORT),))
        m = machine(Firmware.bios, network=network)
        m.expect(ready(built_image, "1.0.0"), BOOT)
        code, out = m.shell("systemctl is-active reflashd")
        assert code == 0 and out.strip().endswith("active"), out
        code, out = m.shell("reflashctl token")
        assert code == 0, out
        token = out.strip().splitlines()[-1]

        with chromium() as driver:
            page = Page(driver, f"http://127.0.0.1:{port}/", tmp_path / "screenshots")
            page.open()
            page.sign_in(token)
            page.until(lambda: page.text("newest-version") == newest, timeout=120)
            assert page.text("running") == "demo-appliance 1.0.0"
            page.until(lambda: page.el("download").is_enabled())
            page.shot("1.0.0")

            page.el("download").click()
            page.until(lambda: page.state() == "downloaded", timeout=TRANSFER)
            assert server.fetched("/demo-appliance-2.0.0.bundle")
            page.shot("downloaded")

            page.el("install").click()
            page.until(lambda: page.el("confirm-box").is_displayed())
            assert "reboots the appliance" in page.text("confirm-text")
            page.el("confirm-install").click()
            m.expect(r"recovery: starting \(try 1\)", BOOT + KERNEL)
            m.expect(r"recovery: installed 2\.0\.0", RECOVERY)
            m.expect(ready(built_image, "2.0.0"), BOOT)

            page.open()  # the same tab: the token is still in its sessionStorage
            page.until(lambda: page.text("running") == "demo-appliance 2.0.0", timeout=120)
            page.until(lambda: page.el("last").get_attribute("data-outcome") == "installed")
            assert page.text("last").startswith("installed 1.0.0 -> 2.0.0")
            page.shot("installed")

        code, out = m.shell("reflashctl status")
        assert code == 0 and "running: demo-appliance 2.0.0" in out, out
