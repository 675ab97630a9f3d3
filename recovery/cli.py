"""The `recovery` command line, and the CLI boundary every command of this project shares."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import UpdateError
from .output import setup_logging


class UsageError(Exception):
    """A command line that makes no sense: exit 2."""


def boundary(run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command: exit 0, 1 with one line on stderr for an UpdateError, 2 for a usage error.

    Tracebacks are shown only with --debug; anything unexpected is still one line without it.
    """
    debug = getattr(args, "debug", False)
    setup_logging(debug)
    try:
        return run(args) or 0
    except UpdateError as e:
        if debug:
            raise
        print(f"{e.kind}: {e}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"usage error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the boundary: one line, not a traceback, unless asked
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
        return 1


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show debug output and tracebacks")


def cmd_verify(args: argparse.Namespace) -> int:
    from .bundle import Keyring, verify_bundle

    bundle = verify_bundle(args.bundle, Keyring.load(args.keys), product=args.product)
    m = bundle.manifest
    print(f"valid: {m.product} {m.version}, signed by {bundle.keyid}, {m.rootfs_files} files, {m.rootfs_bytes} bytes")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from .bundle import Keyring, verify_bundle
    from .install import apply_bundle, check_target
    from .output import Progress

    check_target(args.target)  # before reading the whole bundle, not after
    bundle = verify_bundle(args.bundle, Keyring.load(args.keys), product=args.product)
    progress = Progress(bundle.manifest.payload.size, "extracting")
    stats = apply_bundle(bundle, args.target, progress=progress)
    progress.finish()
    print(f"applied {bundle.manifest.product} {bundle.manifest.version}: {stats.files} files, {stats.bytes} bytes")
    return 0


def cmd_instruction_write(args: argparse.Namespace) -> int:
    from .instruction import Instruction, write_instruction

    instruction = Instruction.create(
        disk=args.disk, file=args.file, sha256=args.sha256, version=args.version, created=args.created,
        allow_downgrade=args.allow_downgrade,
    )
    write_instruction(args.path, instruction)
    return 0


def cmd_instruction_show(args: argparse.Namespace) -> int:
    from .instruction import read_instruction

    instruction = read_instruction(args.path)
    if args.json:
        print(json.dumps(instruction.to_dict(), indent=2, sort_keys=True))
    else:
        for key, value in instruction.to_env().items():
            print(f"{key}={value}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from .init import main as init_main

    init_main()
    return 0  # not reached: init never returns


def cmd_retry(args: argparse.Namespace) -> int:
    from .init import retry

    retry()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recovery", description="Verify, apply and stage appliance updates.")
    add_debug(p)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="verify a bundle in full; nothing is written")
    v.add_argument("--keys", type=Path, required=True, help="directory of trusted *.pub keys")
    v.add_argument("--product", help="the product the bundle must be for")
    v.add_argument("bundle", type=Path)
    v.set_defaults(run=cmd_verify)

    a = sub.add_parser("apply", help="verify a bundle, then extract it into an empty directory")
    a.add_argument("--keys", type=Path, required=True)
    a.add_argument("--product")
    a.add_argument("--target", type=Path, required=True)
    a.add_argument("bundle", type=Path)
    a.set_defaults(run=cmd_apply)

    i = sub.add_parser("instruction", help="write or show an update instruction")
    isub = i.add_subparsers(dest="action", required=True)
    w = isub.add_parser("write", help="write an instruction file atomically")
    w.add_argument("path", type=Path)
    w.add_argument("--disk", required=True, help="PARTLABEL=x, LABEL=x, UUID=x, PARTUUID=x or /dev/...")
    w.add_argument("--file", required=True, help="absolute path of the bundle on that disk")
    w.add_argument("--sha256", required=True)
    w.add_argument("--version", required=True)
    w.add_argument("--created", help="ISO 8601 time stamp (default: now)")
    w.add_argument("--allow-downgrade", action="store_true",
                   help="let the recovery install a version older than the installed one")
    w.set_defaults(run=cmd_instruction_write)
    s = isub.add_parser("show", help="parse and print an instruction file")
    s.add_argument("path", type=Path)
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_instruction_show)

    n = sub.add_parser("init", help="the recovery OS's PID 1 program (never returns)")
    n.set_defaults(run=cmd_init)
    r = sub.add_parser("retry", help="in rescue mode: clear the try counter so the next boot tries again")
    r.set_defaults(run=cmd_retry)
    return p


def run_cli(
    p: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """Parse `argv` (usage errors exit 2, as argparse prints them), then run the chosen command."""
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if prepare is not None:
        prepare(args)
    return boundary(args.run, args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
