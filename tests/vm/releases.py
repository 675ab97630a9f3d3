"""Releases that are signed and install fine but do not work, made from the demo's 2.0.0 tree.

Each is the real 2.0.0 system with one thing broken and its version changed (os-release and the ready
line), signed with the build's key and `check_boot=False` where the build-time check would refuse it.
They are built once per image and kept beside it (building one takes about half a minute).
"""

from __future__ import annotations

import fcntl
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkimage.bundle import create_bundle
from recovery.core.run import run


@dataclass(frozen=True)
class Broken:
    """One way a release can fail its trial, and what the rollback's reason must say (a regex)."""

    version: str
    reason: str
    breaks: Callable[[Path], None]


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.write_text(text)
    target.chmod(mode)


def _init_exits(root: Path) -> None:
    # The kernel panics when init exits ("Attempted to kill init"); panic=10 reboots.
    _write(root, "sbin/init", "#!/bin/sh\necho 'broken init: exiting at once'\nexit 1\n", 0o755)


def _no_kernel(root: Path) -> None:
    (root / "boot/vmlinuz").unlink()


def _unhealthy(root: Path) -> None:
    _write(root, "etc/recovery/health.d/50-app", "#!/bin/sh\necho 'app: database unreachable' >&2\nexit 3\n", 0o755)


def _never_multi_user(root: Path) -> None:
    # A unit multi-user.target waits for that never finishes: the target is never reached, so the
    # confirmation never runs; only the trial's time limit (short in this release's config) reboots.
    _write(root, "etc/systemd/system/stuck.service",
           "[Unit]\nDescription=A start job that never ends\nBefore=multi-user.target\n\n"
           "[Service]\nType=oneshot\nExecStart=/bin/sleep infinity\nTimeoutStartSec=infinity\n\n"
           "[Install]\nWantedBy=multi-user.target\n")
    wants = root / "etc/systemd/system/multi-user.target.wants/stuck.service"
    wants.symlink_to("/etc/systemd/system/stuck.service")
    toml = root / "etc/recovery/system.toml"
    toml.write_text(toml.read_text().replace("trial_time_limit = 300", "trial_time_limit = 45"))
    assert "trial_time_limit = 45" in toml.read_text()


def _hangs(root: Path) -> None:
    # The kernel stops dead once services run: a panic that does not reboot (kernel.panic=0). Only the
    # hardware watchdog systemd armed for the trial boot gets the machine out. It waits for the guard's
    # line, which comes after the guard noted the boot on cfg: the guard is Type=simple, so ordering
    # after it only waits for its start, and Python under TCG takes seconds to get to the note.
    _write(root, "etc/systemd/system/hang.service",
           "[Unit]\nDescription=Hang the machine\nAfter=reflash-trial-guard.service\n\n"
           "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'until journalctl -b -u reflash-trial-guard.service "
           "| grep -q \"is on trial\"; do sleep 1; done; sleep 2; echo 0 > /proc/sys/kernel/panic; "
           "echo c > /proc/sysrq-trigger'\n\n[Install]\nWantedBy=multi-user.target\n")
    (root / "etc/systemd/system/multi-user.target.wants/hang.service").symlink_to("/etc/systemd/system/hang.service")


BROKEN: dict[str, Broken] = {
    "init-exits": Broken("2.0.1", r"2\.0\.1 did not confirm within 3 boots: no boot got as far as starting its services",
                         _init_exits),
    "no-kernel": Broken("2.0.2", r"2\.0\.2 could not be booted on trial boot 1 of 3: no kernel at /boot/vmlinuz",
                        _no_kernel),
    "unhealthy": Broken("2.0.3", r"2\.0\.3 did not confirm within 3 boots: boot 3: health check 50-app failed "
                        r"\(exit status 3\): app: database unreachable", _unhealthy),
    "never-multi-user": Broken("2.0.4", r"2\.0\.4 did not confirm within 3 boots: boot 3: not confirmed within 45 s of boot",
                               _never_multi_user),
    "hangs": Broken("2.0.5", r"2\.0\.5 did not confirm within 3 boots: boot 3 started its services, then stopped "
                    r"before confirming", _hangs),
}


def _relabel(root: Path, old: str, new: str) -> None:
    for path in ("usr/lib/os-release", "etc/profile.d/zz-appliance-ready.sh"):
        text = (root / path).read_text()
        assert old in text, path
        (root / path).write_text(text.replace(f'"{old}"', f'"{new}"').replace(f" {old} ready", f" {new} ready"))


def unpack_payload(bundle: Path, dest: Path) -> None:
    """The bundle's system tree in `dest`, with owners, modes, xattrs and ACLs (GNU tar, as root)."""
    with tarfile.open(bundle) as outer:
        names = outer.getnames()
        payload = outer.extractfile(names[2])
        assert payload is not None
        data = payload.read()
    dest.mkdir(parents=True)
    archive = dest.parent / "payload.tar.zst"
    archive.write_bytes(data)
    run(["tar", "--extract", "--zstd", "--file", archive, "--directory", dest, "--numeric-owner",
         "--same-permissions", "--xattrs", "--xattrs-include=*", "--acls"])
    archive.unlink()


def variant_bundle(built: Any, kind: str, version: str, change: Callable[[Path], None], *,
                   check_boot: bool = True) -> Path:
    """A bundle of built 2.0.0's tree relabelled `version` and changed by `change`, signed with the build's
    key; made once and kept beside the image in `kind`/ (two sessions may ask at once: one makes it)."""
    out = built.disk.parent / kind
    out.mkdir(exist_ok=True)
    bundle = out / f"{built.config.product}-{version}.bundle"
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if bundle.exists():
            return bundle
        with tempfile.TemporaryDirectory(dir=out) as t:
            tree = Path(t) / "tree"
            unpack_payload(built.bundles["2.0.0"], tree)
            _relabel(tree, "2.0.0", version)
            change(tree)
            partial = Path(t) / bundle.name
            create_bundle(tree, partial, key=built.keys / "signing.pem", product=built.config.product,
                          version=version, check_boot=check_boot)
            shutil.move(partial, bundle)
    return bundle


def broken_bundle(built: Any, kind: str) -> Path:
    """The bundle of BROKEN[kind], made from built 2.0.0 once and kept beside the image."""
    spec = BROKEN[kind]
    return variant_bundle(built, "broken", spec.version, spec.breaks, check_boot=False)
