"""`reflashd`, the appliance's update service: one process, the API and the update page on a root-only
Unix socket and, when `[daemon] listen` is set, on TCP behind the access token."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from recovery.core.cli import add_debug, boundary
from recovery.core.errors import Failed
from recovery.updated import apitoken
from recovery.updated.api import Service, make_app
from recovery.updated.operations import Operations, Stopped
from recovery.updated.sysconfig import SystemConfig
from recovery.updated.updater import Reboot, Updater, reboot_system

log = logging.getLogger(__name__)


SHUTDOWN_TIMEOUT = 2.0  # seconds open requests (an event stream) get when the daemon stops


async def serve(config: SystemConfig, *, reboot: Reboot, ready: asyncio.Event | None = None) -> None:
    token = apitoken.read_or_create(config.cfg)  # made on the first start, so `reflashctl token` has one
    service = Service(Operations(Updater(config, reboot=reboot, progress=False)), reboot=reboot)
    runners = [web.AppRunner(make_app(service, token=None), access_log=None)]
    if config.daemon.listen is not None:
        runners.append(web.AppRunner(make_app(service, token=token), access_log=None))
    for runner in runners:
        await runner.setup()
    socket = config.daemon.socket
    try:
        socket.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        socket.unlink(missing_ok=True)  # left by a daemon that was killed
    except OSError as e:
        raise Failed(f"cannot prepare {socket}: {e.strerror or e}") from None
    # Bound with a umask that leaves the socket root's alone from its first moment, then checked.
    umask = os.umask(0o177)
    try:
        await web.UnixSite(runners[0], os.fspath(socket), shutdown_timeout=SHUTDOWN_TIMEOUT).start()
    finally:
        os.umask(umask)
    os.chmod(socket, 0o600)
    log.info("reflashd: listening on %s", socket)
    if config.daemon.listen is not None:
        host, port = config.daemon.listen
        await web.TCPSite(runners[1], host, port, shutdown_timeout=SHUTDOWN_TIMEOUT).start()
        log.info("reflashd: listening on %s:%d (the access token is required)", host, port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    service.restore()
    if ready is not None:
        ready.set()
    try:
        await stopping.wait()
    finally:
        log.info("reflashd: stopping")
        service.closing.set()
        service.cancel_reboot()  # the state file keeps a scheduled reboot for the next start
        await service.stop_download(Stopped("reflashd is stopping; its next start resumes the download"))
        for runner in reversed(runners):
            await runner.cleanup()
        socket.unlink(missing_ok=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reflashd", description="The update service: API and update page.")
    add_debug(p)
    p.add_argument("--config", type=Path, default=None,
                   help="system configuration (default: $UPDATECTL_CONFIG or /etc/recovery/system.toml)")
    return p


def main(argv: Sequence[str] | None = None, *, reboot: Reboot | None = None) -> int:
    """The console script; `reboot` is what a test replaces so that it never reboots its host."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    reboot_fn = reboot if reboot is not None else lambda: reboot_system()

    def run(args: argparse.Namespace) -> int:
        config = SystemConfig.load(args.config)
        asyncio.run(serve(config, reboot=reboot_fn))
        return 0

    return boundary(run, args)


if __name__ == "__main__":
    sys.exit(main())
