"""The rig's commands on the `reflash` command line: `reflash run` boots an image with its console on the
terminal, `reflash demo` runs the whole cycle."""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
import tempfile
import termios
import tty
from pathlib import Path

from mkimage.build import BuildResult, build
from mkimage.config import load_config
from mkimage.toollog import tool_log
from recovery.core.cli import UsageError

from . import VMError
from .demo import Narrator, PersonAtABrowser, run_demo
from .disk import DiskImage
from .drive import DiskInterface
from .machine import Firmware, Machine

QUIT_KEYS = {b"\x1d": "Ctrl-]", b"\x03": "Ctrl-C"}


def cmd_run(args: argparse.Namespace) -> int:
    if args.image is None and args.kernel is None:
        raise UsageError("give an IMAGE to boot, or --kernel")
    for path in (args.image, args.kernel, args.initrd):
        if path is not None and not path.is_file():
            raise VMError(f"{path} not found")
    with tempfile.TemporaryDirectory(prefix="vm-run-") as tmp:
        disk = None
        if args.image is not None:
            disk = DiskImage.open(args.image)
            if not args.write:
                disk = disk.overlay(Path(tmp) / "overlay.qcow2")
        machine = Machine(
            disk, firmware=args.firmware, interface=args.interface, memory=args.memory, kernel=args.kernel,
            initrd=args.initrd, append=args.append, network=args.network, name="run", workdir=Path(tmp),
            on_output=_to_terminal,
        )
        interactive = sys.stdin.isatty()
        if interactive:
            print("[vm: Ctrl-] or Ctrl-C quits]", file=sys.stderr)
        with machine:
            if interactive:
                _terminal(machine)
            else:
                machine.wait_exit(timeout=None)
    return 0


def _to_terminal(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _terminal(machine: Machine) -> None:
    """Forward keys to the console in raw mode until a quit key or the machine ends."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        while machine.running:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, 1024)
            if not data or any(key in data for key in QUIT_KEYS):
                break
            machine.send(data)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        print(file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.debug:
        # qemu.qmp tells at INFO level that QEMU closed its monitor when the demo ends it: not news.
        logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    narrator = Narrator()
    narrator.legend()
    config = load_config(None, output=args.output)
    out = config.output
    if args.no_build:
        bundles = {v: out / f"{config.product}-{v}.bundle" for v in config.releases}
        built = BuildResult(config=config, disk=out / "disk.img", bundles=bundles, keys=out / "keys",
                            recovery=out / "recovery")
        missing = [p for p in (built.disk, *bundles.values()) if not p.is_file()]
        if missing:
            raise VMError(f"{missing[0]} not found: run without --no-build to build the images")
        narrator.mark("build", f"using the images in {out}")
    else:
        narrator.note(f"building the images into {out} (cached Debian roots make this quick after the first time)")
        with tool_log(verbose=args.verbose):
            built = build(config)
        narrator.mark("build", f"images ready in {out}")
    page = None
    if args.page is not None:
        page = (args.page, PersonAtABrowser(narrator, interactive=sys.stdin.isatty()))
    run_demo(built, out / "demo", args.firmware, narrator=narrator, page=page)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The rig's commands, `reflash run` and `reflash demo` (mkimage.cli makes the `reflash` parser)."""
    r = sub.add_parser("run", help="boot an image with its serial console on this terminal")
    r.add_argument("image", type=Path, nargs="?", help="disk image (raw or qcow2); booted through an overlay")
    r.add_argument("--firmware", type=Firmware, choices=list(Firmware), default=Firmware.bios)
    r.add_argument("--memory", type=int, default=1024, metavar="MiB")
    r.add_argument("--interface", type=DiskInterface, choices=list(DiskInterface), default=DiskInterface.virtio)
    r.add_argument("--write", action="store_true", help="boot IMAGE itself and keep the changes")
    r.add_argument("--network", action="store_true", help="give the guest QEMU's user-mode network")
    r.add_argument("--kernel", type=Path, help="boot this kernel directly (the firmware still runs)")
    r.add_argument("--initrd", type=Path)
    r.add_argument("--append", help="kernel command line, e.g. 'console=ttyS0'")
    r.set_defaults(run=cmd_run)

    d = sub.add_parser("demo", help="run the whole update cycle on the demo image")
    d.add_argument("--firmware", type=Firmware, choices=list(Firmware), default=Firmware.bios)
    d.add_argument("-o", "--output", type=Path, help="where the images are (built); default: out/")
    d.add_argument("--no-build", action="store_true", help="use the images already in the output directory")
    d.add_argument("--verbose", action="store_true", help="show the build's tool output (else: in DIR/build.log)")
    d.add_argument("--page", type=int, nargs="?", const=8080, default=None, metavar="PORT",
                   help="update from the appliance's update page instead: forwarded to 127.0.0.1:PORT (8080); "
                        "you press Download and Install in a browser")
    d.set_defaults(run=cmd_demo)
