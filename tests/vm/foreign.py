"""A system tree from another builder: plain mmdebstrap of a stock Debian 12 with a kernel, systemd and
the reflash-appliance package, plus only what README's "What your tree must have" asks for; bundled by
`reflash bundle` from mmdebstrap's tar, as an image builder would.

Built once per image and kept beside it (a few minutes: mmdebstrap downloads and installs the packages).
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkimage.deb import build_deb

VERSION = "3.0.0"
# Debian's kernel for virtual machines: a quarter of linux-image-amd64's modules, and stock initramfs-tools.
KERNEL = "linux-image-cloud-amd64"
PACKAGES = ("systemd-sysv", "udev", "e2fsprogs", "initramfs-tools", KERNEL)
# Nobody reads documentation on an appliance; dpkg's own path filters keep the bundle small.
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
# mmdebstrap's own hooks: merged /usr from the start (no usrmerge, and perl, pulled in), and the local
# .deb made visible inside the chroot, where apt's dpkg looks for it.
HOOKS = ("/usr/share/mmdebstrap/hooks/merged-usr", "/usr/share/mmdebstrap/hooks/file-mirror-automount")
REPO = Path(__file__).resolve().parents[2]

FSTAB = """PARTLABEL=system   /         ext4  rw,noatime         0  1
PARTLABEL=cfg      /cfg      ext4  rw,noatime,nofail  0  2
PARTLABEL=storage  /storage  ext4  rw,noatime,nofail  0  2
"""

# The test rig's need, not the contract's: a root shell on the serial console.
AUTOLOGIN = """[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
"""


def _files(root: Path, product: str, keys: Path) -> None:
    """What the builder adds to the stock tree: os-release, the product's system.toml and key, the mounts."""
    def write(path: str, text: str) -> None:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    write("etc/os-release", f'NAME="Foreign Debian"\nID=debian\nVERSION_ID="{VERSION}"\n'
                            f'PRETTY_NAME="{product} {VERSION} (plain mmdebstrap)"\n')
    write("etc/fstab", FSTAB)
    write("etc/recovery/system.toml", f'product = "{product}"\n')
    write("etc/recovery/keys/signing.pub", (keys / "signing.pub").read_text())
    write("etc/hostname", "foreign\n")
    write("etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf", AUTOLOGIN)
    for mountpoint in ("cfg", "storage"):
        (root / mountpoint).mkdir()


def foreign_bundle(built: Any) -> Path:
    """The signed bundle of the foreign tree, release VERSION of the demo's product, made once per image."""
    out = built.disk.parent / "foreign"
    out.mkdir(exist_ok=True)
    bundle = out / f"{built.config.product}-{VERSION}.bundle"
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if bundle.exists():
            return bundle
        with tempfile.TemporaryDirectory(dir=out) as t:
            work = Path(t)
            deb = build_deb(work / "deb").path
            files = work / "files"
            _files(files, built.config.product, built.keys)
            tree = work / "tree.tar"
            proc = subprocess.run([
                "mmdebstrap", "--variant=minbase", "--format=tar", *(f"--hook-dir={h}" for h in HOOKS),
                "--include=" + ",".join(PACKAGES), f"--include={deb}",
                *(f"--dpkgopt=path-exclude={p}" for p in EXCLUDES),
                # Debian's /etc/os-release is a link to /usr/lib/os-release: the product's replaces it.
                '--customize-hook=rm -f "$1/etc/os-release"',
                f"--customize-hook=sync-in {files} /",
                "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin",
                "bookworm", str(tree), *built.config.apt_sources,
            ], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
            if proc.returncode:
                raise AssertionError(f"mmdebstrap exited with status {proc.returncode}:\n"
                                     + "\n".join(proc.stdout.splitlines()[-40:]))
            partial = work / bundle.name
            # The build host's command, on mmdebstrap's tar as it is (no /boot/vmlinuz in it: Debian's links).
            subprocess.run([sys.executable, "-m", "mkimage", "bundle", "--key", str(built.keys / "signing.pem"),
                            "--product", built.config.product, "--version", VERSION, str(tree), "-o", str(partial)],
                           check=True, cwd=REPO)
            shutil.move(partial, bundle)
    return bundle
