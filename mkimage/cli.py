"""The `reflash` command line: the build host's commands (keys, bundles, images, feeds) and the rig's."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from recovery.core.bundle import verify_bundle
from recovery.core.cli import add_debug, run_cli
from recovery.core.errors import Rejected
from recovery.core.keys import Keyring, public_key_files
from vm.cli import add_commands as add_rig_commands

from .build import build, build_recovery_only
from .bundle import create_bundle, generate_keys
from .config import load_config
from .deb import build_deb
from .keyring import DEFAULT_SIGNING_KEY, list_keys, new_key, revoke_key
from .publish import notes_for, parse_duration, publish
from .toollog import tool_log


def cmd_keygen(args: argparse.Namespace) -> int:
    pub = generate_keys(args.dir)
    print(f"wrote {args.dir / 'signing.pem'} (keep it private) and {pub}")
    return 0


def cmd_key_new(args: argparse.Namespace) -> int:
    _, _, kid = new_key(args.dir, args.name)
    print(f"made key {args.name} (keyid {kid}) in {args.dir}: "
          "the next release built with this key directory introduces it")
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    if not revoke_key(args.keys, args.keyid):
        print(f"{args.keyid} is already revoked in {args.keys}")
        return 0
    held = [path.name for path, kid, _ in public_key_files(args.keys) if kid == args.keyid]
    print(f"revoked {args.keyid} ({', '.join(held) if held else 'no *.pub here holds it'}) in {args.keys}: "
          "the next release built with this key directory refuses what it signs")
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    keys, signing = args.keys, args.signing_key
    if args.config is not None:
        config = load_config(args.config)
        keys = keys or config.key_dir or config.output / "keys"
        signing = signing or config.signing_key
    keys, signing = keys or Path("keys"), signing or DEFAULT_SIGNING_KEY
    entries = list_keys(keys, signing)
    width = max((len(e.file or "-") for e in entries), default=1)
    for e in entries:
        print(f"{e.keyid}  {(e.file or '-').ljust(width)}  {e.state}" + ("  signs" if e.signs else ""))
    if not any(e.signs for e in entries):
        print(f"no key signs: {keys / signing} does not exist", file=sys.stderr)
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    manifest = create_bundle(
        args.source, args.output, key=args.key, product=args.product, version=args.version,
        compression=args.compression, check_boot=args.check_boot, recovery=args.recovery,
    )
    print(f"wrote {args.output}: {manifest.product} {manifest.version}, {manifest.rootfs_files} files")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    with tool_log(verbose=args.verbose):
        result = build(load_config(args.config, output=args.output))
    print(f"wrote {result.disk}")
    for version, bundle in result.bundles.items():
        print(f"wrote {bundle} ({version})")
    print(f"wrote {result.keys / 'signing.pub'} and {result.recovery}/")
    return 0


def cmd_recovery(args: argparse.Namespace) -> int:
    with tool_log(verbose=args.verbose):
        recovery = build_recovery_only(load_config(args.config, output=args.output))
    print(f"wrote {recovery}/: vmlinuz, initrd.img, recovery.ext4 (the partition), grub-recovery.cfg")
    return 0


def cmd_deb(args: argparse.Namespace) -> int:
    deb = build_deb(args.output)
    warnings = sum(1 for line in deb.lintian if line.startswith("W: "))
    said = f"{warnings} warnings (above)" if warnings else "no warnings"
    print(f"wrote {deb.path}; lintian: no errors, {said}" + (" (--debug shows its notes)" if deb.lintian else ""))
    return 0


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_publish(args: argparse.Namespace) -> int:
    newest_notes = None
    if args.notes is not None:
        try:
            newest_notes = args.notes.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise Rejected(f"cannot read release notes {args.notes}: {e}") from None
    done = publish(
        args.bundles, args.output, key=args.key, notes=notes_for(args.notes_for), newest_notes=newest_notes,
        base_url=args.base_url, expires=args.expires,
    )
    listed = ", ".join(r.version for r in sorted(done.feed.releases, key=lambda r: r.key, reverse=True))
    print(f"published {', '.join(done.added)} in {done.directory}: {done.feed.product} feed lists {listed}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    bundle = verify_bundle(args.bundle, Keyring.load(args.keys), product=args.product)
    m = bundle.manifest
    print(f"valid: {m.product} {m.version}, signed by {bundle.keyid}, {m.rootfs_files} files, {m.rootfs_bytes} bytes")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reflash", description="Build bundles, the recovery OS and disk images; "
                                "publish releases; boot images under QEMU.")
    add_debug(p)
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("keygen", help="write DIR/signing.pem (private) and DIR/signing.pub")
    k.add_argument("dir", type=Path)
    k.set_defaults(run=cmd_keygen)

    key = sub.add_parser("key", help="make, revoke and list signing keys (rotation: README, DESIGN.md)")
    keys = key.add_subparsers(dest="key_command", required=True)
    kn = keys.add_parser("new", help="write DIR/NAME.pem (private) and DIR/NAME.pub; never overwrites")
    kn.add_argument("name", metavar="NAME")
    kn.add_argument("-o", "--output", dest="dir", type=Path, default=Path("keys"), help="the key directory (default: keys)")
    kn.set_defaults(run=cmd_key_new)
    kr = keys.add_parser("revoke", help="add KEYID to DIR/revoked: releases built from DIR refuse it")
    kr.add_argument("keyid", metavar="KEYID")
    kr.add_argument("--keys", type=Path, default=Path("keys"), help="the key directory (default: keys)")
    kr.set_defaults(run=cmd_key_revoke)
    kl = keys.add_parser("list", help="each key: keyid, file, trusted or revoked, and the one that signs")
    kl.add_argument("--keys", type=Path, help="the key directory (default: keys, or the config's key_dir)")
    kl.add_argument("--signing-key", metavar="NAME",
                    help=f"the private key in DIR that signs (default: {DEFAULT_SIGNING_KEY}, or the config's signing_key)")
    kl.add_argument("-c", "--config", type=Path, help="image.toml to take key_dir and signing_key from")
    kl.set_defaults(run=cmd_key_list)

    b = sub.add_parser("bundle", help="make a signed bundle from a directory or a tar")
    b.add_argument("--key", type=Path, required=True, help="the private signing key (PEM)")
    b.add_argument("--product", required=True)
    b.add_argument("--version", required=True)
    b.add_argument("--compression", choices=["zstd", "xz", "gzip", "none"], default="zstd")
    b.add_argument("-o", "--output", type=Path, required=True)
    b.add_argument("--no-boot-check", dest="check_boot", action="store_false",
                   help="bundle a tree that lacks a kernel, initrd, init or a matching os-release (for tests)")
    b.add_argument("--recovery", type=Path, metavar="DIR",
                   help="carry this recovery OS at /usr/lib/reflash/recovery: the recovery/ that "
                        "`reflash recovery -o OUT` writes (vmlinuz, initrd.img, recovery.json)")
    b.add_argument("source", type=Path, help="a directory or a tar archive of the system tree")
    b.set_defaults(run=cmd_bundle)

    pub = sub.add_parser("publish", help="write a directory for a web server: bundles, signed releases.json, RSS")
    pub.add_argument("--key", type=Path, required=True, help="the private signing key (PEM) the bundles carry")
    pub.add_argument("-o", "--output", type=Path, required=True, help="the directory to publish into")
    pub.add_argument("--notes", type=Path, help="release notes (a text file) for the newest bundle given")
    pub.add_argument("--notes-for", action="append", default=[], metavar="VERSION=TEXT",
                     help="release notes for one version (repeatable)")
    pub.add_argument("--base-url", help="where the directory will be served, for absolute links in the RSS feed")
    pub.add_argument("--expires", type=_duration, metavar="DURATION",
                     help="devices refuse the feed this long after publishing (90d, 36h, 2w); default: never")
    pub.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE")
    pub.set_defaults(run=cmd_publish)

    for name, fn, text in (
        ("build", cmd_build, "build the disk image, bundles and recovery OS"),
        ("recovery", cmd_recovery, "build only the recovery partition, for other image builders"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("-c", "--config", type=Path, help="image.toml (default: the embedded demo config)")
        c.add_argument("-o", "--output", type=Path, help="output directory (default: out/)")
        c.add_argument("--verbose", action="store_true",
                       help="show mmdebstrap's and apt's output as it comes (else: in DIR/build.log)")
        c.set_defaults(run=fn)

    d = sub.add_parser("deb", help="build the appliance side's Debian package (reflash-appliance) and lint it")
    d.add_argument("-o", "--output", type=Path, default=Path("out"), help="output directory (default: out/)")
    d.set_defaults(run=cmd_deb)

    v = sub.add_parser("verify", help="verify a bundle in full against a key directory; writes nothing")
    v.add_argument("--keys", type=Path, required=True, help="a directory of trusted public keys (*.pub)")
    v.add_argument("--product", help="the product the bundle must be for")
    v.add_argument("bundle", type=Path)
    v.set_defaults(run=cmd_verify)

    add_rig_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
