"""The demo system: a small Debian that boots fast under TCG, runs `reflashctl` and says when it is up.

The project comes in as any image builder adds it: the reflash-appliance package (mkimage/deb.py),
installed with dpkg into the cached Debian root, which already holds the package's dependencies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from recovery.core.errors import Failed
from recovery.core.output import step
from recovery.core.run import run

from .config import ImageConfig
from .deb import PACKAGE, dependencies
from .keyring import ReleaseKeyring, install_keyring
from .modules import SYSTEM_MODULES, trim_modules
from .rootfs import RootfsSpec, build_rootfs, kernel_version
from .toollog import run_logged

# Only what a virtual or plain PC disk needs at boot: initramfs-tools' "most" would make the
# initrd several times bigger and GRUB slower to load it.
INITRAMFS_CONF = "MODULES=list\nCOMPRESS=zstd\nCOMPRESSLEVEL=3\n"
INITRAMFS_HOOK = """#!/bin/sh
# Added by mkimage: the disk and file system drivers the system's root may need.
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk virtio_scsi sd_mod ahci ata_piix nvme ext4 crc32c_generic; do
    manual_add_modules "$m"
done
"""

# Units that only cost boot time on an appliance without network time, package updates or logins.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "apt-daily.service", "apt-daily-upgrade.service",
    "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer", "systemd-firstboot.service",
    "systemd-logind.service", "getty@tty1.service", "systemd-timesyncd.service",
    "systemd-networkd-wait-online.service", "systemd-pstore.service", "console-setup.service",
    "keyboard-setup.service", "systemd-hwdb-update.service", "ldconfig.service",
    # Gettys on tty2-6 for lack of logind, and kernel interfaces nothing here uses.
    "getty-static.service", "dev-hugepages.mount", "dev-mqueue.mount", "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount", "sys-kernel-config.mount", "sys-fs-fuse-connections.mount",
    "modprobe@loop.service", "modprobe@fuse.service", "modprobe@dm_mod.service", "modprobe@configfs.service",
    "modprobe@drm.service", "modprobe@efi_pstore.service", "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    # kexec-tools is there for reflashctl's way into the recovery (recovery/updated/kexec.py), not to
    # turn every reboot into a kexec: that would skip GRUB, which counts the trial boots.
    "kexec-load.service", "kexec.service",
)

SERIAL_AUTOLOGIN = """[Service]
# The test rig and an operator on the serial line get a root shell without a password.
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %I $TERM
"""

NETWORK = """[Match]
Name=en* eth*

[Network]
DHCP=yes
"""

FSTAB = """# <file system>  <mount point>  <type>  <options>  <dump>  <pass>
PARTLABEL=system   /         ext4  rw,noatime                   0  0
PARTLABEL=cfg      /cfg      ext4  rw,noatime,nofail            0  0
PARTLABEL=storage  /storage  ext4  rw,noatime,nofail            0  0
"""

JOURNALD = """[Journal]
# Logs live in RAM: the system partition is replaced wholesale by the next update anyway.
Storage=volatile
"""


def system_spec(config: ImageConfig) -> RootfsSpec:
    return RootfsSpec(
        name="system",
        suite=config.suite,
        sources=config.apt_sources,
        # The package's own dependencies too, whatever the configuration lists: dpkg installs it offline.
        packages=tuple(dict.fromkeys([*config.system_packages, *dependencies()])),
        # In place before the kernel package, whose postinst then makes the small initrd once.
        files=(
            ("etc/initramfs-tools/conf.d/mkimage.conf", INITRAMFS_CONF, 0o644),
            ("etc/initramfs-tools/hooks/mkimage", INITRAMFS_HOOK, 0o755),
        ),
    )


def build_system_base(config: ImageConfig) -> Path:
    """The cached Debian part of the system root, the same for every release."""
    return build_rootfs(system_spec(config), config.cache)


def prepare_system_tree(base: Path, config: ImageConfig, version: str, dest: Path, keys: ReleaseKeyring,
                        deb: Path) -> Path:
    """Copy the cached base to `dest` and make it release `version` of the product.

    `keys` is the keyring `reflashctl` trusts (its *.pub and revoked); `deb` is the reflash-appliance package.
    """
    with step(f"Preparing the system tree {config.product} {version}"):
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        run(["cp", "-a", "--reflink=auto", base, dest])
        kver = kernel_version(dest)
        trim_modules(dest, kver, SYSTEM_MODULES)
        _boot_links(dest, kver)
        _write(dest / "usr/lib/os-release", _os_release(config, version))
        _write(dest / "etc/hostname", config.product + "\n")
        _write(dest / "etc/fstab", FSTAB)
        for mountpoint in ("cfg", "storage"):
            (dest / mountpoint).mkdir(exist_ok=True)
        _write(dest / "etc/profile.d/zz-appliance-ready.sh", _ready_script(config, version))
        _write(dest / "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf", SERIAL_AUTOLOGIN)
        _write(dest / "etc/systemd/network/50-dhcp.network", NETWORK)
        _write(dest / "etc/systemd/journald.conf.d/volatile.conf", JOURNALD)
        for unit in MASKED_UNITS:
            link = dest / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        _enable(dest, "multi-user.target", "/lib/systemd/system/systemd-networkd.service")
        _write(dest / "etc/machine-id", "")
        install_package(dest, deb)
        # The package's skeleton made the product's: dpkg keeps it on upgrades as an edited conffile.
        _write(dest / "etc/recovery/system.toml", _system_toml(config))
        install_keyring(keys, dest / "etc/recovery/keys")
    return dest


def install_package(root: Path, deb: Path) -> None:
    """dpkg -i into `root`: its maintainer scripts run chrooted there, enable the units and byte-compile."""
    with step(f"Installing {deb.name}"):
        run_logged(["dpkg", f"--root={root}", "--force-unsafe-io", "--install", str(deb)], what="dpkg")
        status = run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f=${db:Status-Status}", PACKAGE],
                     check=False)
        if status.returncode or status.stdout.decode() != "installed":
            raise Failed(f"{deb.name} is not installed in the system tree after dpkg --install")


def _enable(root: Path, target: str, unit: str) -> None:
    wants = root / "etc/systemd/system" / f"{target}.wants" / Path(unit).name
    wants.parent.mkdir(parents=True, exist_ok=True)
    wants.unlink(missing_ok=True)
    wants.symlink_to(unit)


def _boot_links(root: Path, kver: str) -> None:
    """/boot/vmlinuz and /boot/initrd.img, the names grub.cfg boots, whatever the kernel version."""
    for name in ("vmlinuz", "initrd.img"):
        link = root / "boot" / name
        target = root / "boot" / f"{name}-{kver}"
        if not target.exists():
            raise Failed(f"system root lacks /boot/{target.name}")
        link.unlink(missing_ok=True)
        link.symlink_to(target.name)
    for stale in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        p = root / stale
        if p.is_symlink():
            p.unlink()


def _os_release(config: ImageConfig, version: str) -> str:
    return (
        f'NAME="{config.product}"\n'
        f"ID={config.product}\n"
        "ID_LIKE=debian\n"
        f'VERSION="{version}"\n'
        f'VERSION_ID="{version}"\n'
        f'PRETTY_NAME="{config.product} {version}"\n'
        f"APPLIANCE_PRODUCT={config.product}\n"
    )


def _system_toml(config: ImageConfig) -> str:
    """reflashctl's configuration (recovery/updated/sysconfig.py): where cfg and storage are mounted."""
    return (
        f'product = "{config.product}"\n'
        'keys = "/etc/recovery/keys"\n'
        'cfg = "/cfg"\n'
        'storage = "/storage"\n'
        'storage_disk = "PARTLABEL=storage"\n'
        'health_dir = "/etc/recovery/health.d"\n'
        f"trial_time_limit = {config.trial.time_limit}\n"
        f"health_timeout = {config.trial.health_timeout}\n"
        + _daemon_toml(config)
        + _fleet_toml(config)
    )


def _fleet_toml(config: ImageConfig) -> str:
    """`[fleet]` for reflash-fleet (recovery/updated/sysconfig.py), when the image config sets it; the
    device's id is not in it (each appliance makes its own on cfg: FleetConfig.device_id)."""
    if not config.fleet:
        return ""
    lines = ["\n[fleet]\n"]
    for key, value in config.fleet:
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a TOML basic string
        else:
            text = repr(value)
        lines.append(f"{key} = {text}\n")
    return "".join(lines)


def _daemon_toml(config: ImageConfig) -> str:
    """`[daemon]` for reflashd (recovery/updated/sysconfig.py), when the image config sets it."""
    daemon = config.daemon
    if not daemon.listen and not daemon.feed:
        return ""
    lines = ["\n[daemon]\n"]
    if daemon.listen:
        lines.append(f'listen = "{daemon.listen}"\n')
    if daemon.feed:
        lines.append(f'feed = "{daemon.feed}"\n')
    return "".join(lines)


def _ready_script(config: ImageConfig, version: str) -> str:
    # Printed by the serial login shell itself: when the line appears, the shell already reads input.
    # It waits for the boot to finish, so the trial's confirmation (and its console line) comes first,
    # and for the update service's socket (reflashd is Type=simple: the boot does not wait for its
    # start), so that the update page answers too. At most a minute: a daemon that does not start
    # must not hide the system.
    return (
        "# Tells the serial console (and the test rig) that the system is up and its shell is ready.\n"
        'if [ "$(tty)" = /dev/ttyS0 ]; then\n'
        "    systemctl is-system-running --wait >/dev/null 2>&1\n"
        "    for _ in $(seq 300); do [ -S /run/reflash/reflashd.sock ] && break; sleep 0.2; done\n"
        f'    echo "system {config.product} {version} ready"\n'
        "fi\n"
    )


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    path.chmod(mode)
