"""`reflashctl`, the appliance's update command: download, install, cancel, check, status; one line per verdict.

Download, install and cancel go to `reflashd` when its socket answers (one operation at a time for
the whole appliance); without the daemon the command does them itself, under the same lock.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recovery.core.cli import UsageError, add_debug, boundary
from recovery.core.errors import Failed, Rejected
from recovery.core.output import MiB, strip_controls
from recovery.core.run import reboot_now
from recovery.updated.sysconfig import SystemConfig

if TYPE_CHECKING:
    from recovery.updated.client import Client
    from recovery.updated.updater import Reboot, Staged, Updater

# The update machinery (feeds, transfers, the daemon's client) is imported by the commands that use it:
# `guard` and `confirm` run at every boot, and under emulation every module imported costs boot time.

log = logging.getLogger(__name__)


def reboot_system() -> None:
    from recovery.updated.updater import reboot_system as reboot

    reboot()


def _updater(args: argparse.Namespace) -> Updater:
    from recovery.updated.updater import Updater

    return Updater(SystemConfig.load(args.config), reboot=args.reboot_fn)


def _finish(args: argparse.Namespace, updater: Updater, staged: Staged) -> int:
    print(f"staged {staged.product} {staged.version} ({staged.file} on {updater.config.storage_disk})")
    if args.no_reboot:
        print("not rebooting (--no-reboot): the update is installed at the next reboot")
        return 0
    print("rebooting into the recovery to install it")
    sys.stdout.flush()
    updater.reboot()
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from recovery.updated.client import Client
    from recovery.updated.operations import Operations

    updater = _updater(args)
    if args.latest and args.source is None:
        raise UsageError("install --latest needs the feed: reflashctl install --latest FEED")
    client = Client.connect(updater.config.daemon.socket)
    if client is not None:
        return _install_through(client, args)
    if args.reboot_at:
        raise Rejected("--reboot-at needs reflashd running: it keeps the time and reboots")
    ops = Operations(updater)
    if args.source is None:
        staged = ops.install()
    elif args.latest:
        found = ops.latest(args.source, force=args.force, allow_downgrade=args.allow_downgrade)
        if found.source is None:
            print(found.message)
            return 0
        staged = updater.install(found.source, release=found.release, force=args.force,
                                 allow_downgrade=args.allow_downgrade)
    else:
        staged = updater.install(args.source, force=args.force, allow_downgrade=args.allow_downgrade)
    return _finish(args, updater, staged)


def _install_through(client: Client, args: argparse.Namespace) -> int:
    """The same install by reflashd: a source is downloaded first, then the downloaded bundle staged."""
    if args.source is not None and _download_through(client, args) != "downloaded":
        return 0
    reboot = None if args.no_reboot else (args.reboot_at or "now")
    answer = client.call("POST", "/api/install", {"reboot": reboot})
    print(answer["message"])
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from recovery.updated.client import Client
    from recovery.updated.operations import Operations

    updater = _updater(args)
    client = Client.connect(updater.config.daemon.socket)
    if client is not None:
        _download_through(client, args)
        return 0
    ops = Operations(updater)
    if args.latest:
        found = ops.latest(args.source, force=args.force, allow_downgrade=args.allow_downgrade)
        if found.source is None:
            print(found.message)
            return 0
        record = ops.download(found.source, release=found.release, force=args.force,
                              allow_downgrade=args.allow_downgrade)
    else:
        record = ops.download(args.source, force=args.force, allow_downgrade=args.allow_downgrade)
    print(f"downloaded {updater.config.product} {record.version} ({record.file}): reflashctl install installs it")
    return 0


def _download_through(client: Client, args: argparse.Namespace) -> str:
    """Start the download in reflashd and follow it to its end; "downloaded", or "nothing" when the
    feed has nothing newer. Ctrl-C stops following, not the download."""
    from recovery.updated.servicestate import Phase

    request: dict[str, Any] = {"force": args.force, "allow_downgrade": args.allow_downgrade}
    if args.latest:
        request.update(latest=True, feed=args.source)
    else:
        request["source"] = args.source
    answer = client.call("POST", "/api/download", request)
    print(answer["message"], flush=True)
    if not answer["started"]:
        return "nothing"
    last = 0.0
    try:
        while True:
            progress = client.call("GET", "/api/download")
            record = progress["download"]
            if progress["operation"] is None:
                break
            if record and time.monotonic() - last >= 1.0:
                last = time.monotonic()
                print(f"downloading {record['file']} {_done(record)}", flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("reflashd goes on with the download: reflashctl status shows it, reflashctl cancel stops it")
        return "nothing"
    if record is None:
        raise Rejected("the download was cancelled")
    if record["phase"] != Phase.downloaded:
        kind, _, why = (record["error"] or "failed: the download stopped").partition(": ")
        raise (Rejected if kind == "rejected" else Failed)(why)
    print(f"downloaded {record['version']} ({record['file']}): reflashctl install installs it")
    return "downloaded"


def _done(record: dict[str, Any]) -> str:
    size = f"/{record['size'] / MiB:.1f}" if record.get("size") else ""
    percent = f"{record['percent']}% " if record.get("percent") is not None else ""
    return f"{percent}({record['done'] / MiB:.1f}{size} MiB)"


def cmd_cancel(args: argparse.Namespace) -> int:
    from recovery.updated.client import Client
    from recovery.updated.operations import Operations

    updater = _updater(args)
    client = Client.connect(updater.config.daemon.socket)
    if client is not None:
        done = client.call("POST", "/api/cancel", {"discard": args.discard})["done"]
    else:
        done = Operations(updater).cancel(discard=args.discard)
    for line in done:
        print(line)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from recovery.updated import apitoken

    print(apitoken.read_or_create(SystemConfig.load(args.config).cfg))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from recovery.core.trial import read_failed
    from recovery.updated.operations import up_to_date
    from recovery.updated.updater import newer

    _feed, _source, newest, running = _updater(args).check(args.feed)
    # Everything printed from the feed goes through strip_controls: a signed feed is the publisher's
    # word on releases, not a licence to drive this terminal.
    failed = read_failed(_updater(args).config.cfg).get(newest.version)
    if newer(newest, running) and failed is not None:
        print(f"{strip_controls(newest.version)} is the newest release, but it was rolled back on {failed.at} "
              f"({failed.reason}): install --latest skips it")
    elif newer(newest, running):
        print(f"update available: {strip_controls(newest.version)} (running {running or 'an unknown version'})")
        if newest.notes:
            for line in strip_controls(newest.notes).strip().splitlines():
                print(f"  {line}")
    else:
        print(up_to_date(running, newest))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from recovery.updated import recoveryslots
    from recovery.updated.operations import Operations

    ops = Operations(_updater(args))
    state = ops.status()
    recovery = _recovery_status(ops.config)
    if recovery is not None:
        state["recovery"] = recovery
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
        return 0
    print(f"running: {state['product']} {state['version'] or '(unknown version)'}")
    print(f"state: {_headline(state)}")
    staged = state["staged"]
    if staged is not None:
        tries = f", tried {staged['try_count']} time(s)" if staged.get("try_count") else ""
        downgrade = " (a downgrade, allowed)" if staged.get("allow_downgrade") else ""
        print(f"staged: {staged['version']}{downgrade} from {staged['file']} on {staged['disk']}{tries}; "
              "installed at the next reboot")
    elif state["staged_error"]:
        print(f"staged: unreadable instruction: {state['staged_error']}")
    else:
        print("staged: nothing")
    on_trial = state["trial"]
    if on_trial is not None:
        print(f"trial: {on_trial['version']} {on_trial['summary']}; it confirms itself once healthy")
    elif state["trial_error"]:
        print(f"trial: unreadable record: {state['trial_error']}")
    fallback = state["fallback"]
    print(f"fallback: {fallback['version']} ({fallback['file']})" if fallback else "fallback: none (a failed trial cannot be rolled back)")
    download = state["download"]
    if state["download_error"]:
        print(f"download: unreadable record: {state['download_error']}")
    elif download is not None:
        print(f"download: {_download_line(download)}")
    if recovery is not None:
        print(f"recovery: unknown ({recovery['error']})" if "error" in recovery else recoveryslots.status_line(recovery))
    last = state["last_result"]
    print(f"last update: {last['summary'] if last else 'none recorded'}")
    for earlier in (last or {}).get("previous", ()):
        when = f" on {earlier['finished']}" if earlier.get("finished") else ""
        print(f"  before that: try {earlier['try']} failed: {earlier['reason']}{when}")
    return 0


def _recovery_status(config: SystemConfig) -> dict[str, Any] | None:
    """The recovery partition's slots; None without one (no line then); `{"error"}` when unreadable, which
    the status shows as its warning (a log line would break `--json`: the log goes to stdout)."""
    from recovery.updated import recoveryslots

    try:
        return recoveryslots.slots_status(config)
    except Exception as e:  # noqa: BLE001 - status shows what it can, whatever this says
        log.debug("cannot read the recovery slots", exc_info=True)
        return {"error": str(e)}


def _headline(state: dict[str, Any]) -> str:
    name = state["state"]
    download = state["download"]
    if name == "staged":
        version = state["staged"]["version"] if state["staged"] else "an unreadable instruction"
        when = f", reboot scheduled at {state['reboot_at']}" if state["reboot_at"] else ""
        return f"staged {version}{when}"
    if name == "downloading":
        return f"downloading {download['file']} {_done(download)}" + ("" if download["running"] else ", stopped")
    if name == "on-trial":
        return f"on trial {state['trial']['version']} ({state['trial']['summary']})"
    if name == "downloaded":
        return f"downloaded {download['version']}"
    return "idle"


def _download_line(download: dict[str, Any]) -> str:
    from recovery.updated.servicestate import Phase

    if download["phase"] == Phase.downloaded:
        return f"{download['version']} downloaded ({download['file']}): reflashctl install installs it"
    if download["phase"] == Phase.failed:
        return f"{download['file']} refused: {download['error']}"
    if download["running"]:
        return f"{download['file']} from {download['source']}: {_done(download)}"
    why = f": {download['error']}" if download["error"] else ""
    return f"{download['file']} stopped at {_done(download)}{why}; reflashctl download {download['source']} resumes it"


def cmd_confirm(args: argparse.Namespace) -> int:
    from recovery.updated import trial

    config = SystemConfig.load(args.config)
    said: list[str] = []

    def announce(line: str) -> None:
        print(line, flush=True)
        said.append(line)

    result = trial.confirm(config, check=args.check, reboot=args.reboot_fn, announce=announce)
    if result not in said:
        print(result)
    return 0


def cmd_guard(args: argparse.Namespace) -> int:
    from recovery.updated import trial

    config = SystemConfig.load(args.config)
    # Forced: a release stuck in its boot may never finish a clean shutdown either.
    print(trial.guard(config, reboot=args.force_reboot_fn))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reflashctl", description="Stage updates for the recovery to install.")
    add_debug(p)
    p.add_argument("--config", type=Path, default=None,
                   help="system configuration (default: $UPDATECTL_CONFIG or /etc/recovery/system.toml)")
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("install", help="stage a bundle (without SOURCE: the downloaded one), then reboot to install it")
    i.add_argument("source", metavar="URL|FILE", nargs="?",
                   help="a bundle (http, https, file:// or a path); with --latest, a feed; none: the downloaded bundle")
    i.add_argument("--latest", action="store_true", help="SOURCE is a release feed: install its newest release")
    i.add_argument("--no-reboot", action="store_true", help="stop after staging; install at the next reboot")
    i.add_argument("--reboot-at", metavar="TIME",
                   help="reboot at TIME (ISO 8601 with zone, e.g. 2026-12-04T03:00+01:00); needs reflashd")
    i.add_argument("--force", action="store_true", help="install even the version that is running")
    i.add_argument("--allow-downgrade", action="store_true",
                   help="install a version older than the running one (the instruction records it)")
    i.set_defaults(run=cmd_install)

    d = sub.add_parser("download", help="download and verify a bundle to storage, to install later")
    d.add_argument("source", metavar="URL|FILE", help="a bundle (http, https, file:// or a path); with --latest, a feed")
    d.add_argument("--latest", action="store_true", help="SOURCE is a release feed: download its newest release")
    d.add_argument("--force", action="store_true", help="even the version that is running")
    d.add_argument("--allow-downgrade", action="store_true", help="a version older than the running one")
    d.set_defaults(run=cmd_download)

    x = sub.add_parser("cancel", help="take back a staged update before the reboot (a running download stops)")
    x.add_argument("--discard", action="store_true", help="remove the downloaded bundle too (never the fallback)")
    x.set_defaults(run=cmd_cancel)

    t = sub.add_parser("token", help="print the access token of reflashd's TCP listener (made on first use)")
    t.set_defaults(run=cmd_token)

    c = sub.add_parser("check", help="say whether a release feed has a newer release")
    c.add_argument("feed", metavar="FEED", help="releases.json (URL or path), or the directory holding it")
    c.set_defaults(run=cmd_check)

    s = sub.add_parser("status", help="the running version, a staged update, the last recovery result")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_status)

    f = sub.add_parser("confirm", help="end the running release's trial: it works, keep it (and its bundle as the fallback)")
    f.add_argument("--check", action="store_true",
                   help="run the health checks first; a failure is noted and reboots into the next trial boot")
    f.set_defaults(run=cmd_confirm)

    g = sub.add_parser("guard", help="at boot (reflash-trial-guard.service): reboot a trial boot that does not "
                       "confirm within the time limit")
    g.set_defaults(run=cmd_guard)
    return p


def main(argv: Sequence[str] | None = None, *, reboot: Reboot | None = None) -> int:
    """The console script; `reboot` (or this module's `reboot_system`) is what a test replaces so that
    it never reboots its host."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    # Looked up when called, not when defined, so that patching `reboot_system` is enough.
    args.reboot_fn = reboot if reboot is not None else lambda: reboot_system()
    args.force_reboot_fn = reboot if reboot is not None else lambda: reboot_now()
    return boundary(_on_stdout, args)


def _on_stdout(args: argparse.Namespace) -> int | None:
    """Run the command with its log and progress on stdout, so stderr carries only the verdict of a failure."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stdout)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
