"""The `recovery` command line of the recovery OS (on a build host: `python -m recovery.os`).

Each command imports what it needs when it runs: `recovery retry` in the rescue shell and `recovery
init` as PID 1 must start without loading libarchive, cryptography and pyudev they may not need.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from recovery.core.cli import add_debug, run_cli


def cmd_verify(args: argparse.Namespace) -> int:
    from recovery.core.bundle import verify_bundle
    from recovery.core.keys import Keyring

    bundle = verify_bundle(args.bundle, Keyring.load(args.keys), product=args.product)
    m = bundle.manifest
    print(f"valid: {m.product} {m.version}, signed by {bundle.keyid}, {m.rootfs_files} files, {m.rootfs_bytes} bytes")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from recovery.core.bundle import verify_bundle
    from recovery.core.keys import Keyring
    from recovery.core.output import Progress
    from recovery.os.extract import apply_bundle, check_target

    check_target(args.target)  # before reading the whole bundle, not after
    bundle = verify_bundle(args.bundle, Keyring.load(args.keys), product=args.product)
    progress = Progress(bundle.manifest.payload.size, "extracting")
    stats = apply_bundle(bundle, args.target, progress=progress)
    progress.finish()
    print(f"applied {bundle.manifest.product} {bundle.manifest.version}: {stats.files} files, {stats.bytes} bytes")
    return 0


def cmd_instruction_write(args: argparse.Namespace) -> int:
    from recovery.core.instruction import Instruction, write_instruction

    instruction = Instruction.create(
        disk=args.disk, file=args.file, sha256=args.sha256, version=args.version, created=args.created,
        allow_downgrade=args.allow_downgrade,
    )
    write_instruction(args.path, instruction)
    return 0


def cmd_instruction_show(args: argparse.Namespace) -> int:
    from recovery.core.instruction import read_instruction

    instruction = read_instruction(args.path)
    if args.json:
        print(json.dumps(instruction.to_dict(), indent=2, sort_keys=True))
    else:
        for key, value in instruction.to_env().items():
            print(f"{key}={value}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from recovery.os.pid1 import main as init_main

    init_main()
    return 0  # not reached: init never returns


def cmd_retry(args: argparse.Namespace) -> int:
    from recovery.os.pid1 import retry

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


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
