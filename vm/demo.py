"""`reflash demo`: the whole update cycle on the demo image, narrated stage by stage with the host's clock.

The published releases are served from the host's loopback; the guest reaches them only through
QEMU's restricted user-mode network and one guestfwd (10.0.2.100:80). In the guest `reflashctl
install --latest` downloads, verifies, stages and reboots; the recovery installs; the new release
boots and `reflashctl status` must say what happened. Everything is read off the serial console.

With a page port (`reflash demo --page`), the guest's update page is forwarded to the host's loopback
and an operator presses Download and Install on it instead: a person at a browser (the demo prints
the address and the access token, then waits), or a test's browser (`PageOperator`).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mkimage.publish import publish
from recovery.core.feed import FEED_NAME
from recovery.core.version import Version

from . import VMError, deadlines
from .deadlines import BOOT, KERNEL, RECOVERY
from .disk import DiskImage
from .machine import Firmware, Machine
from .network import HostForward, StaticServer, UserNetwork

if TYPE_CHECKING:
    from mkimage.build import BuildResult

FEED_HOST = "10.0.2.100"  # where the guest finds the published directory (a guestfwd, not a real host)
FEED_URL = f"http://{FEED_HOST}/{FEED_NAME}"

# Generous limits for TCG on a shared machine, beside the boot's own (vm.deadlines).
TRANSFER = 900.0  # download and verification of a bundle
COMMAND = 120.0  # a quick command in the guest
OPERATOR = 3600.0  # a person reading the release notes before pressing Install
MiB = 1024 * 1024

Say = Callable[[str], None]


class DemoFailed(VMError):
    """The cycle stopped short of a running new release that reports its install."""

    kind = "demo failed"


@dataclass(frozen=True)
class Stage:
    name: str
    at: float  # seconds since the demo began
    took: float  # seconds since the stage before


@dataclass(frozen=True)
class DemoReport:
    firmware: Firmware
    from_version: str
    to_version: str
    stages: tuple[Stage, ...]
    address: str  # the guest's address from DHCP
    status: str  # `reflashctl status` as the new release printed it
    console_log: Path
    fetched: tuple[str, ...]  # what the guest got from the host's server (HTTP 200), in order

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def seconds(self) -> float:
        return self.stages[-1].at if self.stages else 0.0


@dataclass
class Narrator:
    """Prints `demo: [ 12.3 s] …` lines and keeps the stages for the report."""

    say: Say = print
    started: float | None = None  # clock() at the start unless given
    clock: Callable[[], float] = time.monotonic
    stages: list[Stage] = field(default_factory=list)
    last: float | None = None  # the unrounded time of the last stage, so that a stage never takes -0.0 s

    def __post_init__(self) -> None:
        if self.started is None:
            self.started = self.clock()

    def _now(self) -> float:
        assert self.started is not None
        return self.clock() - self.started

    def note(self, text: str) -> None:
        """A line with the time but no stage of its own."""
        self.say(line(self._now(), text))

    def legend(self) -> None:
        self.note("times are host seconds since the start; (+N s) is the time since the line before")

    def mark(self, name: str, text: str) -> Stage:
        at = self._now()
        took = max(0.0, at - (self.last if self.last is not None else 0.0))
        self.last = at
        stage = Stage(name, round(at, 1), round(took, 1))
        self.stages.append(stage)
        self.say(line(at, f"{text} (+{took:.1f} s)"))
        return stage


def line(at: float, text: str) -> str:
    return f"demo: [{at:6.1f} s] {text}"


def signing_key(built: BuildResult) -> Path:
    """The private key the build signed with: the development key in keys/, else the configured key_dir's."""
    development = built.keys / "signing.pem"
    if development.is_file() and built.config.key_dir is None:
        return development
    if built.config.key_dir is not None:
        return built.config.key_dir / "signing.pem"
    raise DemoFailed(f"no signing key: {development} is missing")


def publish_releases(built: BuildResult, directory: Path) -> str:
    """`reflash publish` of every built bundle into `directory` (made afresh); the newest version."""

    if directory.exists():
        shutil.rmtree(directory)
    versions = sorted(built.bundles, key=Version)
    done = publish([built.bundles[v] for v in versions], directory, key=signing_key(built))
    return max(done.added, key=Version)


class PageOperator(Protocol):
    """Who presses the update page's buttons in `reflash demo --page`."""

    def update(self, url: str, token: str) -> None:
        """Download and Install on the page at `url`; may return before the reboot (a person)."""

    def updated(self, url: str, version: str) -> None:
        """The new release is up: the page, reloaded, shows what happened."""


@dataclass(frozen=True)
class PersonAtABrowser:
    """The demo's own operator: tells the person what to open and press, and waits for them."""

    narrator: Narrator
    interactive: bool = True  # wait for Enter at the end, so the page can be looked at

    def update(self, url: str, token: str) -> None:
        self.narrator.note(f"open {url} in a browser on this machine and sign in with the access token {token}")
        self.narrator.note("press Download, wait for 'downloaded', then Install (the demo waits for the reboot)")

    def updated(self, url: str, version: str) -> None:
        self.narrator.note(f"reload {url}: it shows {version} running and the install's result")
        if self.interactive:
            input("demo: press Enter to power the appliance off ")


def page_port(built: BuildResult) -> int:
    """The port of the image's `[daemon] listen`, where the guest serves the update page."""
    listen = built.config.daemon.listen
    if not listen:
        raise DemoFailed("the image has no update page: [daemon] listen is empty in its config")
    return int(listen.rsplit(":", 1)[1])


class _Cycle:
    """One run of the demo on one machine; each method waits for one stage on the console."""

    def __init__(self, machine: Machine, narrator: Narrator, product: str) -> None:
        self.m = machine
        self.narrator = narrator
        self.product = product
        self.where = "boot"

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for `pattern`; a recovery verdict other than the one awaited ends the demo."""
        verdict = r"recovery: (?P<bad>rejected|failed): (?P<why>[^\r\n]*)\r?\n"  # the whole line
        match = self.m.expect(f"(?:{pattern})|{verdict}", timeout)
        if match.group("bad"):
            raise DemoFailed(f"the recovery {match.group('bad')} the update: {match.group('why').strip()}")
        return match

    def ready(self, version: str, name: str) -> None:
        self.where = f"waiting for {self.product} {version}"
        self.expect(deadlines.ready(self.product, version), BOOT)
        self.narrator.mark(name, f"{self.product} {version} ready")

    def network(self) -> str:
        self.where = "waiting for the guest's DHCP lease"
        # systemd-networkd keeps its DHCP lease in a file; iproute2 is not in the image.
        status, out = self.m.shell(
            "(for i in $(seq 60); do a=$(sed -n 's/^ADDRESS=//p' /run/systemd/netif/leases/* 2>/dev/null); "
            '[ -n "$a" ] && { echo "$a"; exit 0; }; sleep 1; done; exit 1)',
            COMMAND,
        )
        address = out.strip().splitlines()[-1] if out.strip() else ""
        if status != 0 or not address:
            raise DemoFailed("the guest got no address from QEMU's DHCP server within 60 s")
        self.narrator.mark("network", f"network up: guest {address}, releases at {FEED_URL}")
        return address

    def install(self, size: int) -> str:
        """`reflashctl install --latest` up to the reboot it starts; the version it staged.

        `size` is the newest bundle's, for the download's rate."""
        m, say = self.m, self.narrator
        self.where = "reflashctl install"
        m.shell("rm -f /run/reflashctl.err /run/reflashctl.out", COMMAND)  # also: the shell is at its prompt
        # The exit status comes back as `demo-exit=N`; typed as `demo-''exit` so the echo does not match.
        # Through tee, stdout is no terminal: progress comes as whole lines, as on any serial console.
        m.send(f"reflashctl install --latest {FEED_URL} 2>/run/reflashctl.err | tee /run/reflashctl.out; "
               "echo demo-''exit=${PIPESTATUS[0]}\n")
        done = r"demo-exit=(?P<code>\d+)\r?\n"

        def until(pattern: str, timeout: float) -> re.Match[str]:
            match = self.expect(f"(?:{pattern})|{done}", timeout)
            if match.group("code") is not None:
                if match.group("code") == "0":
                    said = self._last_line("/run/reflashctl.out")
                    raise DemoFailed(f"reflashctl exited 0 without staging an update: {said}")
                raise DemoFailed(f"reflashctl install: {self._last_line('/run/reflashctl.err')}")
            return match

        self.where = "downloading"
        match = until(r"Downloading (?P<url>\S+) to \S+\n", COMMAND)
        say.mark("feed", f"feed verified, downloading {match.group('url')}")
        until(r"Downloading \S+ to \S+ done in [\d.]+ s", TRANSFER)
        took = say.mark("download", "download done").took
        say.note(f"  {size / MiB:.1f} MiB, {size / MiB / max(took, 0.1):.1f} MiB/s over the guestfwd")
        self.where = "verifying"
        until(r"Verifying \S+ done in [\d.]+ s", TRANSFER)
        say.mark("verify", "bundle verified (signature, sha256, product, version)")
        # "staged P V (FILE on DISK)" when reflashctl works alone, "staged P V: rebooting …" through reflashd
        match = until(r"staged \S+ (?P<version>[^\s:]+)(?: \(|:)", COMMAND)
        version = match.group("version")
        say.mark("staged", f"{version} staged: instruction written to /cfg")
        until(r"rebooting into the recovery", COMMAND)
        self.where = "rebooting into the recovery"
        self._into_recovery(BOOT)
        return version

    def from_page(self, operator: PageOperator, url: str) -> None:
        """The operator presses Download and Install on the page; up to the reboot that follows."""
        self.where = "reflashctl token"
        code, out = self.m.shell("reflashctl token", COMMAND)
        if code != 0 or not out.strip():
            raise DemoFailed(f"reflashctl token exited {code}: {out.strip()}")
        self.where = "the update page"
        operator.update(url, out.strip().splitlines()[-1])
        self.narrator.mark("page", "the operator pressed Install on the update page")
        self.where = "waiting for Install on the update page and the reboot"
        self._into_recovery(OPERATOR)

    def _into_recovery(self, timeout: float) -> None:
        """The reboot into the recovery: by kexec, past the firmware and GRUB (recovery/updated/kexec.py),
        or through them when the system cannot kexec."""
        way = self.expect(r"Loading the recovery OS \(try 1\)|kexec into the recovery in slot [ab]", timeout)
        if way.group(0).startswith("kexec"):
            self.narrator.mark("reboot", "kexec into the recovery (the firmware and GRUB skipped; try 1 counted)")
        else:
            self.narrator.mark("reboot", "rebooted: GRUB found the instruction and boots the recovery (try 1)")

    def _last_line(self, path: str) -> str:
        try:
            _, out = self.m.shell(f"cat {path}", COMMAND)
        except VMError as e:
            return f"its message could not be read: {str(e).splitlines()[0]}"
        lines = [ln for ln in out.splitlines() if ln.strip()]
        return lines[-1] if lines else "no message"

    def recovery(self, version: str) -> None:
        say = self.narrator
        self.where = "the recovery"
        self.expect(r"recovery: starting \(try 1\)", KERNEL)
        say.mark("recovery", "recovery started (try 1)")
        for step in ("verifying", "erasing", "extracting", "finishing"):
            self.where = f"recovery {step}"
            self.expect(rf"recovery: {step}\n", RECOVERY)
            say.mark(step, f"recovery {step}")
        self.expect(rf"recovery: installed {re.escape(version)}", RECOVERY)
        say.mark("installed", f"recovery installed {version}")
        self.where = f"rebooting into {version}"
        self.expect(r"Loading the system", KERNEL)
        say.mark("reboot-system", f"rebooted: GRUB boots the system ({version})")

    def status(self, from_version: str, version: str) -> str:
        self.where = "reflashctl status"
        code, out = self.m.shell("reflashctl status", COMMAND)
        text = out.strip()
        self.narrator.mark("status", "reflashctl status:")
        for status_line in text.splitlines():
            self.narrator.say(f"demo:            {status_line}")
        if code != 0:
            raise DemoFailed(f"reflashctl status exited {code}: {text.splitlines()[-1] if text else ''}")
        want = (f"running: {self.product} {version}", f"last update: installed {from_version} -> {version}")
        lines = text.splitlines()
        if want[0] not in lines or not any(ln.startswith(want[1]) for ln in lines):
            raise DemoFailed(f"reflashctl status does not say {want[1]!r}")
        return text


def run_demo(
    built: BuildResult,
    workdir: Path,
    firmware: Firmware = Firmware.bios,
    *,
    say: Say = print,
    narrator: Narrator | None = None,
    page: tuple[int, PageOperator] | None = None,
) -> DemoReport:
    """Boot `built`'s image (through an overlay in `workdir`) and update it to the newest release;
    with `page` (a host port and an operator), from the update page forwarded to that port.

    Raises DemoFailed with one line that says at which stage and why, and names the console log.
    """
    if narrator is None:
        narrator = Narrator(say)
        narrator.legend()
    workdir.mkdir(parents=True, exist_ok=True)
    product, from_version = built.config.product, built.config.version
    to_version = publish_releases(built, workdir / "published")
    narrator.mark("publish", f"published {', '.join(sorted(built.bundles, key=Version))} "
                             f"(newest {to_version}) in {workdir / 'published'}")
    overlay = workdir / "disk.qcow2"
    overlay.unlink(missing_ok=True)
    disk = DiskImage.open(built.disk).overlay(overlay)
    inward = (HostForward(page[0], page_port(built)),) if page is not None else ()
    url = f"http://127.0.0.1:{page[0]}/" if page is not None else ""
    with StaticServer(workdir / "published") as server:
        network = UserNetwork((server.forward(FEED_HOST, 80),), host_forwards=inward)
        machine = Machine(
            disk, firmware=firmware, network=network, name="demo",
            workdir=workdir, probe_kernel=built.recovery / "vmlinuz",
        )
        narrator.note(f"booting {product} {from_version} ({firmware}); serving {server.directory} "
                      f"on {server.host}:{server.port}, guest sees it at {FEED_HOST}:80")
        cycle = _Cycle(machine, narrator, product)
        try:
            with machine:
                cycle.ready(from_version, "boot")
                address = cycle.network()
                if page is not None:
                    cycle.from_page(page[1], url)
                else:
                    staged = cycle.install(built.bundles[to_version].stat().st_size)
                    if staged != to_version:
                        raise DemoFailed(f"reflashctl staged {staged}, expected the newest release {to_version}")
                cycle.recovery(to_version)
                cycle.ready(to_version, "ready")
                status = cycle.status(from_version, to_version)
                if page is not None:
                    cycle.where = "the update page after the update"
                    page[1].updated(url, to_version)
        except VMError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DemoFailed(f"{cycle.where}: {first} (console log: {machine.console_log})") from e
    narrator.note(f"done: {product} {from_version} -> {to_version}; console log {machine.console_log}")
    return DemoReport(
        firmware=Firmware(firmware), from_version=from_version, to_version=to_version,
        stages=tuple(narrator.stages), address=address, status=status, console_log=machine.console_log,
        fetched=tuple(r.path for r in server.requests if r.status == 200),
    )
