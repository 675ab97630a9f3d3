"""Debian root file systems from mmdebstrap, cached under a hash of everything that went into them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from recovery.core.errors import Failed
from recovery.core.output import step

from .toollog import run_logged

log = logging.getLogger(__name__)

# Bump when the way a root is made changes in a way its inputs do not show.
RECIPE = 2
# Roots kept per name (system, recovery): enough for a few configurations side by side.
KEEP = 3

# mmdebstrap's own hook: merged /usr from the start with usr-is-merged, so that apt does not pull
# in usrmerge (and with it perl, 50 MB) to satisfy init-system-helpers.
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")

# Documentation, manuals and translations are never read on an appliance; dpkg leaves them out.
DPKG_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
    "/usr/share/linda/*",
)
# Copyright files are what a distributor must keep; everything else under doc/ goes.
DPKG_INCLUDES = ("/usr/share/doc/*/copyright",)


@dataclass(frozen=True)
class RootfsSpec:
    """What a root is made of: its cache key is a hash of exactly these fields."""

    name: str
    suite: str
    sources: tuple[str, ...]
    packages: tuple[str, ...]
    # Files (path in the root, text, mode) put in place before the packages are installed, so that
    # their maintainer scripts see them (e.g. initramfs-tools settings).
    files: tuple[tuple[str, str, int], ...] = ()
    # Shell snippets mmdebstrap runs with the root as "$1" after installing (its --customize-hook).
    hooks: tuple[str, ...] = ()
    variant: str = "minbase"

    def key(self) -> str:
        blob = json.dumps({"recipe": RECIPE, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def cache_path(spec: RootfsSpec, cache: Path) -> Path:
    return cache / "rootfs" / f"{spec.name}-{spec.key()}"


def build_rootfs(spec: RootfsSpec, cache: Path) -> Path:
    """Return a directory holding the root for `spec`, running mmdebstrap only if the cache lacks it.

    A root is complete only once its `<name>.json` marker beside it exists: an interrupted build is
    redone.
    """
    target = cache_path(spec, cache)
    marker = target.with_name(target.name + ".json")
    if marker.exists() and target.is_dir():
        log.info("reusing cached %s root %s", spec.name, target)
        marker.touch()  # most recently used: kept when the cache is pruned
        return target
    with step(f"Building the {spec.name} root with mmdebstrap ({len(spec.packages)} packages)"):
        partial = target.with_name(target.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.parent.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        seed = partial.with_name(target.name + ".files")
        if seed.exists():
            shutil.rmtree(seed)
        for rel, text, mode in spec.files:
            dest = seed / rel.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
            dest.chmod(mode)
        essential = [f"--essential-hook=sync-in {seed} /"] if spec.files else []
        # As root, mmdebstrap's root mode is simplest; otherwise it needs user namespaces.
        mode = "root" if os.geteuid() == 0 else "unshare"
        argv: list[str] = [
            "mmdebstrap", f"--mode={mode}", f"--variant={spec.variant}", "--format=directory",
            f"--hook-dir={MERGED_USR_HOOKS}",
            "--include=" + ",".join(spec.packages),
            *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
            *(f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDES),
            *essential,
            *(f"--customize-hook={h}" for h in spec.hooks),
            # apt's lists and downloaded packages would only bloat the cache and the images.
            "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin",
            spec.suite, str(partial), *spec.sources,
        ]
        # hundreds of lines of apt and dpkg: into the build log, shown only when it fails
        run_logged(argv, what="mmdebstrap")
        if seed.exists():
            shutil.rmtree(seed)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
        marker.write_text(json.dumps(asdict(spec), indent=1) + "\n")
    prune(cache / "rootfs", spec.name)
    return target


def prune(directory: Path, name: str, keep: int = KEEP) -> None:
    """Delete all but the `keep` most recently used roots called `name` (each is hundreds of MB)."""
    markers = sorted(directory.glob(f"{name}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in markers[keep:]:
        root = old.with_suffix("")
        log.info("pruning the cached %s root %s", name, root)
        old.unlink()
        if root.is_dir():
            shutil.rmtree(root)


def kernel_version(root: Path) -> str:
    """The one kernel installed in `root` (the version of its /usr/lib/modules directory)."""
    versions = sorted(p.name for p in (root / "usr/lib/modules").iterdir() if (p / "modules.dep").exists())
    if len(versions) != 1:
        raise Failed(f"expected one kernel in {root}, found {versions or 'none'}")
    return versions[0]
