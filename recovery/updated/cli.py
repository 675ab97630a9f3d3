"""`reflashctl`, the appliance's update command: install, check, status; one line per verdict."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from recovery.core.cli import add_debug, boundary
from recovery.core.feed import Release
from recovery.core.output import strip_controls
from recovery.core.run import reboot_now
from recovery.core.trial import read_failed
from recovery.core.version import Version
from recovery.updated import trial
from recovery.updated.sysconfig import SystemConfig
from recovery.updated.updater import Reboot, Staged, Updater, newer, reboot_system

log = logging.getLogger(__name__)


def _updater(args: argparse.Namespace) -> Updater:
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


def _up_to_date(running: str | None, newest: Release) -> str:
    older = running is not None and Version(newest.version) < Version(running)
    hint = " (older: --allow-downgrade installs it)" if older else ""
    return f"up to date: {running} is running, the newest release is {strip_controls(newest.version)}{hint}"


def cmd_install(args: argparse.Namespace) -> int:
    updater = _updater(args)
    if args.latest:
        feed, source, newest, running = updater.check(args.source)
        # The newest release is installed when it is newer; the same one again only with --force, an
        # older one (a withdrawn release) only with --allow-downgrade.
        same = running is not None and Version(newest.version) == Version(running)
        if not (newer(newest, running) or (same and args.force) or (not same and args.allow_downgrade)):
            print(_up_to_date(running, newest))
            return 0
        failed = read_failed(updater.config.cfg).get(newest.version)
        if failed is not None and not args.force:
            # Rolled back once already: the same bundle would fail the same way.
            print(f"skipping {strip_controls(newest.version)}: it was rolled back on {failed.at} ({failed.reason}); "
                  "--force installs it anyway")
            return 0
        staged = updater.install(source.join(newest.file), release=newest, force=args.force,
                                 allow_downgrade=args.allow_downgrade)
    else:
        staged = updater.install(args.source, force=args.force, allow_downgrade=args.allow_downgrade)
    return _finish(args, updater, staged)


def cmd_check(args: argparse.Namespace) -> int:
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
        print(_up_to_date(running, newest))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = _updater(args).status()
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
        return 0
    print(f"running: {state['product']} {state['version'] or '(unknown version)'}")
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
    last = state["last_result"]
    print(f"last update: {last['summary'] if last else 'none recorded'}")
    for earlier in (last or {}).get("previous", ()):
        when = f" on {earlier['finished']}" if earlier.get("finished") else ""
        print(f"  before that: try {earlier['try']} failed: {earlier['reason']}{when}")
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    config = SystemConfig.load(args.config)
    print(trial.confirm(config, check=args.check, reboot=args.reboot_fn))
    return 0


def cmd_guard(args: argparse.Namespace) -> int:
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

    i = sub.add_parser("install", help="download, verify and stage a bundle, then reboot to install it")
    i.add_argument("source", metavar="URL|FILE", help="a bundle (http, https, file:// or a path); with --latest, a feed")
    i.add_argument("--latest", action="store_true", help="SOURCE is a release feed: install its newest release")
    i.add_argument("--no-reboot", action="store_true", help="stop after staging; install at the next reboot")
    i.add_argument("--force", action="store_true", help="install even the version that is running")
    i.add_argument("--allow-downgrade", action="store_true",
                   help="install a version older than the running one (the instruction records it)")
    i.set_defaults(run=cmd_install)

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
