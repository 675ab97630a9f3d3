"""The recovery OS: a Debian kernel and a trimmed RAM initramfs whose /init is the project's recovery init.

The initrd is two zstd-compressed newc cpio archives, one after the other (the kernel unpacks each in
turn): the trimmed Debian root, cached, and a small overlay made on every build with the project's
`recovery` package, its configuration, the public keys and the kernel modules that are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from recovery.core.errors import Failed
from recovery.core.output import step
from recovery.core.run import run
from recovery.core.slots import write_record

from .config import ImageConfig
from .grub import write_slot_menu
from .keyring import ReleaseKeyring, install_keyring
from .libxml2stub import build_libxml2_stub
from .modules import RECOVERY_MODULES, copy_modules
from .project import install_project
from .rootfs import RootfsSpec, build_rootfs, kernel_version

log = logging.getLogger(__name__)

# Bump when TRIM or the base archive's making changes.
TRIM_RECIPE = 1
ZSTD_LEVEL = 19

# Left out of the initramfs: never used by the recovery, or replaced by the overlay. Patterns match
# paths relative to the root; a directory that matches is left out whole.
TRIM = (
    "boot", "usr/lib/modules", "usr/lib/firmware",
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/i18n",
    "usr/share/zoneinfo", "usr/share/perl", "usr/share/perl5", "usr/share/common-licenses",
    "usr/share/bash-completion", "usr/share/zsh", "usr/share/initramfs-tools", "usr/share/lintian",
    "usr/share/debconf", "usr/share/menu", "usr/share/pixmaps", "usr/share/keyrings",
    "usr/lib/x86_64-linux-gnu/perl", "usr/lib/x86_64-linux-gnu/perl-base",
    "usr/lib/x86_64-linux-gnu/libperl.so*", "usr/bin/perl*",
    "usr/lib/apt", "usr/lib/x86_64-linux-gnu/libapt-*", "usr/bin/apt*", "usr/lib/dpkg",
    "var/cache/*", "var/lib/apt", "var/log/*", "var/lib/dpkg/info",
    # glibc converts between UTF-8 and ASCII without these modules; nothing here needs others.
    "usr/lib/x86_64-linux-gnu/gconv/*.so",
    # udev's hardware database only names vendors and models; labels and partitions need none of it.
    "usr/lib/udev/hwdb.bin", "usr/lib/udev/hwdb.d", "etc/udev/hwdb.bin",
    # libxml2 is only there for libarchive's xar format; the overlay has a stub (libxml2stub.py),
    # which lets the 31 MB ICU data go too.
    "usr/lib/x86_64-linux-gnu/libxml2.so*", "usr/lib/x86_64-linux-gnu/libicu*",
    # The Python standard library's tests, GUI, and tools for developers.
    "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/config-3.11-x86_64-linux-gnu",
    "usr/lib/python3*/**/tests", "usr/lib/python3*/**/test",
)

INIT = """#!/bin/sh
# The recovery OS's PID 1 is the project's recovery init (recovery/os/pid1.py): it never returns.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 -c 'from recovery.os.pid1 import main; main()'
"""


@dataclass(frozen=True)
class RecoveryOS:
    """What the recovery partition holds, and the kernel version it boots."""

    dir: Path
    kernel: Path
    initrd: Path
    kernel_version: str


def recovery_spec(config: ImageConfig) -> RootfsSpec:
    return RootfsSpec(
        name="recovery", suite=config.suite, sources=config.apt_sources, packages=config.recovery_packages,
        # The kernel package builds an initrd nobody uses here: make it the quick kind.
        files=(("etc/initramfs-tools/conf.d/mkimage.conf", "MODULES=list\n", 0o644),),
    )


def recovery_toml(config: ImageConfig, version: str | None = None) -> str:
    """/etc/recovery/recovery.toml: the partitions the recovery may touch, by partition label, and the
    recovery's own version (the release it was built for; the factory's by default)."""
    return (
        f'product = "{config.product}"\n'
        f'version = "{version or config.version}"\n'
        'keys = "/etc/recovery/keys"\n'
        f"device_timeout = {config.device_timeout}\n"
        f"trial_boots = {config.trial.boots}\n"
        "\n[partitions]\n"
        'cfg = "PARTLABEL=cfg"\n'
        'system = "PARTLABEL=system"\n'
        'recovery = "PARTLABEL=recovery"\n'
        'storage = "PARTLABEL=storage"\n'
    )


def build_recovery_os(config: ImageConfig, keys: ReleaseKeyring, dest: Path, work: Path, *,
                      version: str | None = None) -> RecoveryOS:
    """Write `dest`/vmlinuz, `dest`/initrd.img and their `recovery.json` (recovery/core/slots.py);
    `keys` is the keyring the recovery trusts (its *.pub and revoked), `version` its version (default: the factory's)."""
    version = version or config.version
    base = build_rootfs(recovery_spec(config), config.cache)
    kver = kernel_version(base)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / "boot" / f"vmlinuz-{kver}", dest / "vmlinuz")
    base_archive = _base_archive(base, config.cache)
    with step("Making the recovery overlay (project, configuration, keys, kernel modules)"):
        overlay = work / "recovery-overlay"
        if overlay.exists():
            shutil.rmtree(overlay)
        overlay.mkdir(parents=True)
        # The overlay's directories replace the base's modes when unpacked: keep them ordinary.
        overlay.chmod(0o755)
        _fill_overlay(overlay, base, kver, config, keys, version)
        overlay_archive = work / "recovery-overlay.cpio.zst"
        _cpio_zstd(overlay, _file_list(overlay, ()), overlay_archive, level=ZSTD_LEVEL)
    with open(dest / "initrd.img", "wb") as out:
        for part in (base_archive, overlay_archive):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    size = (dest / "initrd.img").stat().st_size
    write_slot_menu(dest)  # the boot menu travels with the recovery (DESIGN.md)
    write_record(dest, version)
    log.info("recovery %s initrd: %.1f MiB compressed (kernel %s)", version, size / 2**20, kver)
    return RecoveryOS(dir=dest, kernel=dest / "vmlinuz", initrd=dest / "initrd.img", kernel_version=kver)


def _fill_overlay(overlay: Path, base: Path, kver: str, config: ImageConfig, keys: ReleaseKeyring,
                  version: str) -> None:
    (overlay / "init").write_text(INIT)
    (overlay / "init").chmod(0o755)
    etc = overlay / "etc/recovery"
    etc.mkdir(parents=True)
    (etc / "recovery.toml").write_text(recovery_toml(config, version))
    install_keyring(keys, etc / "keys")
    # e2fsck and mount look for mounted file systems in /etc/mtab.
    (overlay / "etc/mtab").symlink_to("../proc/self/mounts")
    install_project(overlay, "os")
    build_libxml2_stub(base / "usr/lib/x86_64-linux-gnu/libarchive.so.13", overlay / "usr/lib/x86_64-linux-gnu")
    n = copy_modules(base / "usr/lib/modules" / kver, kver, RECOVERY_MODULES, overlay)
    log.info("kept %d kernel modules", n)
    for d in [overlay, *overlay.rglob("*")]:
        if d.is_dir() and not d.is_symlink():
            d.chmod(0o755)


def _base_archive(base: Path, cache: Path) -> Path:
    """The trimmed Debian root as a compressed cpio, cached beside the root it was made from."""
    key = hashlib.sha256(json.dumps([base.name, TRIM_RECIPE, TRIM, ZSTD_LEVEL]).encode()).hexdigest()[:16]
    archive = cache / "initramfs" / f"recovery-base-{key}.cpio.zst"
    if archive.exists():
        log.info("reusing cached recovery base archive %s", archive)
        return archive
    with step(f"Compressing the trimmed recovery root (zstd -{ZSTD_LEVEL}, takes a minute)"):
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_name(archive.name + ".partial")
        _cpio_zstd(base, _file_list(base, TRIM), partial, level=ZSTD_LEVEL)
        partial.rename(archive)
    return archive


def _file_list(root: Path, trim: tuple[str, ...]) -> list[str]:
    """Paths below `root`, parents before children, without what `trim` matches."""
    paths = ["."]
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        keep_dirs = []
        for name in sorted(dirnames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if trim and any(fnmatch(rel, p) for p in trim):
                continue
            if os.path.islink(os.path.join(dirpath, name)):
                paths.append(rel)  # a symlink to a directory: archived as the link, not walked
                continue
            keep_dirs.append(name)
            paths.append(rel)
        dirnames[:] = keep_dirs
        for name in sorted(filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not (trim and any(fnmatch(rel, p) for p in trim)):
                paths.append(rel)
    return paths


def _cpio_zstd(root: Path, paths: list[str], output: Path, *, level: int) -> None:
    raw = output.with_name(output.name + ".cpio")
    run(
        ["cpio", "--create", "--format=newc", "--null", "--reproducible", "--quiet", "-O", raw.resolve()],
        input="\0".join(paths).encode() + b"\0",
        cwd=root,
    )
    threads = max(1, min(2, os.cpu_count() or 1))
    argv = ["zstd", "-f", f"-{level}", f"-T{threads}", "--rm", raw, "-o", output]
    if sys.stderr.isatty() and raw.stat().st_size > 16 * 2**20:
        # A minute at -19: let zstd show its own live progress on a terminal.
        run([*argv, "--progress"], capture=False)
    else:
        run([*argv, "-q"])
    # The kernel finds the next archive only at a 4-byte boundary: pad this one with zeros.
    size = output.stat().st_size
    if size % 4:
        with open(output, "ab") as f:
            f.write(b"\0" * (4 - size % 4))
    if output.stat().st_size == 0:
        raise Failed(f"{output} is empty")
