"""The QEMU rig tested on its own: a Debian kernel with a busybox initramfs and a scratch disk, no appliance image.

The kernel and busybox come from Debian's archive (`apt-get download`), cached in /var/tmp/vm-rig.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from recovery.core.errors import Failed
from recovery.core.run import run
from vm import VMError
from vm.accel import Accel, choose
from vm.console import ConsoleClosed, ConsoleTimeout
from vm.disk import DiskImage
from vm.drive import DiskInterface, Drive, ImageFormat, blkdebug, inject_error
from vm.machine import OVMF_VARS, Firmware, Machine

CACHE = Path(os.environ.get("VM_RIG_CACHE", "/var/tmp/vm-rig"))
KERNEL_PACKAGE = "linux-image-cloud-amd64"  # small and quick to boot; ext4 built in, virtio as modules
MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod")
APPEND = "console=ttyS0 panic=-1"
BOOT = 120.0  # seconds; a boot takes about 4 s under TCG here

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt /tmp
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko; done
echo "rig: ready"
if grep -q rig.poweroff /proc/cmdline; then poweroff -f; fi
while true; do setsid cttyhack sh; done
"""

DATA_START = 1024 * 1024  # the scratch disk's one partition, "data" (ext4)
FREE_SECTOR = 100  # between the GPT and the first partition: raw writes there harm nothing


@dataclass(frozen=True)
class Rig:
    kernel: Path
    initrd: Path
    disk: Path  # raw, GPT, partition 1 "data" (ext4) holding /hello


# -- building the rig -------------------------------------------------------------------------------


def _kernel_package() -> str:
    """The current versioned package behind linux-image-cloud-amd64, updating apt's lists if needed."""
    for attempt in range(2):
        out = run(["apt-cache", "depends", KERNEL_PACKAGE], check=False).stdout.decode()
        if match := re.search(r"Depends: (linux-image-\S+)", out):
            return match.group(1)
        if attempt == 0:
            run(["apt-get", "update", "-q"])
    raise Failed(f"apt knows no {KERNEL_PACKAGE}")


def _module_closure(tree: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for `wanted` and what they depend on (read from .modinfo), dependencies first."""
    files = {ko.stem.replace("-", "_"): ko for ko in tree.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str) -> None:
        ko = files.get(name)
        if ko is None or ko in order:
            return  # built into the kernel, or already placed
        if match := re.search(rb"depends=([\w,-]*)", ko.read_bytes()):
            for dep in filter(None, match.group(1).decode().split(",")):
                visit(dep.replace("-", "_"))
        order.append(ko)

    for name in wanted:
        visit(name)
    return order


def _fetch() -> Path:
    """CACHE/<kernel package>/ with vmlinuz, busybox and modules/ (in load order, listed in modules.order)."""
    try:
        package = _kernel_package()
    except Failed as e:
        cached = sorted(CACHE.glob("linux-image-*/complete"))
        if not cached:
            pytest.skip(f"no kernel for the rig: {e}")
        return cached[-1].parent
    dest = CACHE / package
    CACHE.mkdir(parents=True, exist_ok=True)
    # Both xdist workers open this session fixture at once: one fetches, the other waits for it.
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "complete").exists():
            _fetch_into(package, dest)
    return dest


def _fetch_into(package: str, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    work = dest / "work"
    work.mkdir(parents=True)
    run(["apt-get", "download", package, "busybox-static"], cwd=work)
    for deb in work.glob("*.deb"):
        run(["dpkg-deb", "-x", deb, work / "tree"])
    shutil.copy(next((work / "tree/boot").glob("vmlinuz-*")), dest / "vmlinuz")
    shutil.copy(work / "tree/bin/busybox", dest / "busybox")
    (dest / "modules").mkdir()
    modules = _module_closure(work / "tree/lib/modules", MODULES)
    for ko in modules:
        shutil.copy(ko, dest / "modules" / ko.name)
    (dest / "modules.order").write_text("".join(f"{ko.stem}\n" for ko in modules))
    shutil.rmtree(work)
    (dest / "complete").write_text(package + "\n")


def _initramfs(fetched: Path, dest: Path) -> Path:
    root = dest / "root"
    for d in ("bin", "etc", "proc", "sys", "dev", "lib/modules"):
        (root / d).mkdir(parents=True)
    shutil.copy(fetched / "busybox", root / "bin/busybox")
    for ko in (fetched / "modules").iterdir():
        shutil.copy(ko, root / "lib/modules" / ko.name)
    shutil.copy(fetched / "modules.order", root / "etc/modules")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], input="\n".join(names).encode(), cwd=root)
    initrd = dest / "initrd.cpio"
    initrd.write_bytes(archive.stdout)
    return initrd


def _scratch_disk(dest: Path) -> Path:
    disk = dest / "scratch.img"
    with disk.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    run(["parted", "-s", disk, "mklabel", "gpt", "mkpart", "data", "ext4", "1MiB", "63MiB"])
    seed = dest / "seed"
    seed.mkdir()
    (seed / "hello").write_text("hello from the host\n")
    (seed / "etc").mkdir()
    (seed / "etc/hello-link").symlink_to("../hello")  # a fast symlink: the target lives in the inode
    (seed / "dangling").symlink_to("nowhere")
    deep = seed / ("d" * 70)
    deep.mkdir()
    (deep / "f").write_text("slow\n")
    (seed / "slow-link").symlink_to(f"{deep.name}/f")  # too long for the inode: a data block holds it
    run(["mkfs.ext4", "-q", "-F", "-L", "data", "-d", seed, "-E", f"offset={DATA_START}", disk, "62M"])
    return disk


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    for tool in ("apt-get", "dpkg-deb", "cpio", "parted", "mkfs.ext4", "debugfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"the rig needs {tool} (make setup installs it)")
    fetched = _fetch()
    dest = tmp_path_factory.mktemp("rig")
    return Rig(kernel=fetched / "vmlinuz", initrd=_initramfs(fetched, dest), disk=_scratch_disk(dest))


@pytest.fixture
def boot(machine: Callable[..., Machine], rig: Rig) -> Callable[..., Machine]:
    """Start a machine on the rig kernel and wait for its shell; keyword arguments go to Machine."""

    def start(firmware: Firmware = Firmware.bios, **kwargs: object) -> Machine:
        kwargs.setdefault("append", APPEND)
        m = machine(firmware, kernel=rig.kernel, initrd=rig.initrd, **kwargs)
        m.expect("rig: ready", BOOT)
        return m

    return start


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the console --------------------------------------------------------------------------------------


def test_shell_returns_output_and_exit_status(boot: Callable[..., Machine]) -> None:
    m = boot()
    assert m.shell("echo hello") == (0, "hello\n")
    assert m.shell("false") == (1, "")
    assert m.shell("sh -c 'echo out; echo err >&2; exit 7'") == (7, "out\nerr\n")
    assert m.shell("printf no-newline") == (0, "no-newline")
    special = "quotes ' \" `tick` $HOME \\ ; | & > < * ? ! # {} ()"
    assert m.shell(f"printf '%s\\n' {_sh_quote(special)}") == (0, special + "\n")
    # tabs, newlines and non-ASCII take the base64 path (a tab typed into a shell would complete)
    assert m.shell("printf 'a\\tb\\n'\necho 'grüße ✓'") == (0, "a\tb\ngrüße ✓\n")
    status, out = m.shell("seq 1 3000")
    assert status == 0 and out.split() == [str(i) for i in range(1, 3001)]
    # a kernel message in the middle of the output is not part of it
    assert m.shell("echo before; echo '<2>rig: kernel noise' > /dev/kmsg; echo after") == (0, "before\nafter\n")
    assert "rig: kernel noise" in m.shell("dmesg", keep_kernel_messages=True)[1]


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def test_timeouts_interrupt_and_show_the_last_console_lines(boot: Callable[..., Machine]) -> None:
    m = boot()
    with pytest.raises(ConsoleTimeout, match=r"command 'sleep 600' did not finish within 2 s"):
        m.shell("sleep 600", timeout=2)
    assert m.shell("echo still here", timeout=30) == (0, "still here\n")

    m.shell("for i in $(seq 1 60); do echo line-$i; done")
    with pytest.raises(ConsoleTimeout) as failure:
        m.expect("never printed", timeout=1)
    message = str(failure.value)
    assert "timed out after 1 s waiting for 'never printed'" in message
    assert str(m.console_log) in message
    assert "line-60" in message and "line-1\n" not in message  # the tail: about 40 lines, not all


def test_reset_reboots_and_the_log_keeps_everything(boot: Callable[..., Machine]) -> None:
    m = boot()
    m.shell("echo before-reset")
    m.reset()
    m.expect("Linux version", BOOT)
    m.expect("rig: ready", BOOT)
    assert m.shell("echo after-reset") == (0, "after-reset\n")
    m.stop()
    log = m.console_log.read_text()
    assert m.console_log.name == f"console-{m.name}.log"
    assert log.count("rig: ready") == 2 and log.count("Linux version") == 2
    assert log.index("before-reset") < log.rindex("Linux version") < log.index("after-reset")
    assert "\r" not in log


def test_power_cut_keeps_synced_writes_and_boots_again(
    boot: Callable[..., Machine], rig: Rig, tmp_path: Path
) -> None:
    base_before = sha256(rig.disk)
    overlay = DiskImage.open(rig.disk).overlay(tmp_path / "overlay.qcow2")
    m = boot(disk=overlay)
    script = (
        "mount /dev/vda1 /mnt && cat /mnt/hello && echo written-in-guest > /mnt/guest && sync && "
        f"printf rig-marker | dd of=/dev/vda bs=512 seek={FREE_SECTOR} conv=fsync 2>/dev/null"
    )
    assert m.shell(script) == (0, "hello from the host\n")
    m.power_cut()
    assert not m.running
    with pytest.raises(ConsoleClosed):
        m.expect("anything more", timeout=5)

    # the host sees what the guest synced, through the overlay; the base image is untouched
    assert overlay.read(FREE_SECTOR * 512, 10) == b"rig-marker"
    assert m.read_file("data", "/guest") == b"written-in-guest\n"  # needs the journal replayed
    assert m.read_file(1, "/hello") == b"hello from the host\n"
    assert m.read_file("data", "/missing") is None
    m.write_file("data", "/etc/from-host", b"placed by the host\n", mode=0o600)
    assert sha256(rig.disk) == base_before
    assert DiskImage.open(rig.disk).read(FREE_SECTOR * 512, 10) == bytes(10)

    again = boot(disk=overlay)
    assert again.console_log != m.console_log
    assert again.shell("mount /dev/vda1 /mnt && cat /mnt/guest /mnt/etc/from-host && stat -c %a /mnt/etc/from-host") == (
        0, "written-in-guest\nplaced by the host\n600\n",
    )
    assert again.shell(f"dd if=/dev/vda bs=512 skip={FREE_SECTOR} count=1 2>/dev/null | head -c 10") == (0, "rig-marker")
    again.shell("umount /mnt")
    again.send("poweroff -f\n")
    assert again.wait_exit(BOOT) == 0
    assert sha256(rig.disk) == base_before


def test_host_edits_overlay_files_without_touching_the_base(rig: Rig, tmp_path: Path) -> None:
    base_before = sha256(rig.disk)
    disk = DiskImage.open(rig.disk).overlay(tmp_path / "o.qcow2")
    assert disk.format is ImageFormat.qcow2
    [part] = disk.partitions()
    assert (part.number, part.name, part.start, part.size) == (1, "data", DATA_START, 62 * 1024 * 1024)
    disk.write_file("data", "/a/b/c", b"one")
    disk.write_file("data", "/a/b/c", b"two\x00bytes")
    assert disk.read_file("data", "/a/b/c") == b"two\x00bytes"
    assert disk.remove_file("data", "/a/b/c") and not disk.remove_file("data", "/a/b/c")
    assert disk.read_file("data", "/a/b/c") is None
    assert disk.read_file("data", "/etc/hello-link") == b"hello from the host\n"
    assert disk.read_file("data", "/slow-link") == b"slow\n"
    assert disk.read_file("data", "/dangling") is None
    with pytest.raises(VMError, match="/etc in partition data is a directory, not a file"):
        disk.read_file("data", "/etc")
    part_copy = tmp_path / "part.img"
    disk.export_range(part.start, part.size, part_copy)
    fsck = run(["e2fsck", "-fn", part_copy], check=False)
    assert fsck.returncode == 0, fsck.stdout.decode()
    with pytest.raises(VMError, match=r"has no partition 'cfg' \(has 1:data\)"):
        disk.read_file("cfg", "/x")
    with pytest.raises(VMError, match="not a plain absolute path"):
        disk.read_file("data", "relative/path")
    assert sha256(rig.disk) == base_before


# -- firmware, drives, accelerator --------------------------------------------------------------------


def test_uefi_boots_with_a_copy_of_the_variable_store_per_machine(
    boot: Callable[..., Machine], machine: Callable[..., Machine], rig: Rig
) -> None:
    pristine = sha256(OVMF_VARS)
    m = boot(Firmware.uefi)
    assert "efi: EFI v" in m.console.text  # the kernel saw UEFI firmware
    other = machine(Firmware.uefi, kernel=rig.kernel, start=False)
    assert m.efi_vars is not None and other.efi_vars is not None
    assert m.efi_vars != other.efi_vars and m.efi_vars.parent == m.workdir
    assert f"file={m.efi_vars}" in " ".join(m.argv(Path("q"), Path("c")))
    m.stop()
    assert sha256(OVMF_VARS) == pristine


def test_blkdebug_makes_chosen_writes_fail(boot: Callable[..., Machine], rig: Rig, tmp_path: Path) -> None:
    overlay = DiskImage.open(rig.disk).overlay(tmp_path / "overlay.qcow2")
    bad = 4096
    drive = Drive(overlay.path, overlay.format, filters=(blkdebug(inject_error(sector=bad, iotype="write")),))
    m = boot(disk=drive)
    write = "dd if=/dev/zero of=/dev/vda bs=512 seek={} count=1 conv=fsync 2>/dev/null"
    assert m.shell(write.format(bad - 8)) == (0, "")
    assert m.shell(write.format(bad))[0] != 0
    assert f"I/O error, dev vda, sector {bad}" in m.console.text
    assert m.shell(f"dd if=/dev/vda of=/dev/null bs=512 skip={bad} count=1 2>/dev/null") == (0, "")


def test_drive_graph_and_devices() -> None:
    drive = Drive(Path("/d.qcow2"), filters=(blkdebug(inject_error(sector=8)),), interface=DiskInterface.scsi)
    node = drive.blockdev("disk0")
    assert node["driver"] == "blkdebug" and node["node-name"] == "disk0"
    assert node["inject-error"] == [{"event": "none", "errno": 5, "once": False, "immediately": True,
                                     "sector": 8, "iotype": "write"}]
    assert node["image"]["driver"] == "qcow2" and node["image"]["file"]["filename"] == "/d.qcow2"
    args = drive.qemu_args("disk0", bootindex=0)
    assert json.loads(args[1]) == node
    assert args[2:] == ["-device", "virtio-scsi-pci,id=scsi-disk0", "-device",
                        "scsi-hd,drive=disk0,bootindex=0,bus=scsi-disk0.0"]
    assert Drive(Path("/r"), ImageFormat.raw, DiskInterface.nvme).qemu_args("d")[2:] == [
        "-device", "nvme,drive=d,serial=d"]


def test_scsi_disk_is_seen_by_the_guest(boot: Callable[..., Machine], rig: Rig, tmp_path: Path) -> None:
    overlay = DiskImage.open(rig.disk).overlay(tmp_path / "overlay.qcow2")
    m = boot(disk=overlay, interface=DiskInterface.scsi)
    assert m.shell("mount /dev/sda1 /mnt && cat /mnt/hello") == (0, "hello from the host\n")


def test_accelerator_choice_leaves_no_qemu_behind(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VM_ACCEL", "tcg")
    assert choose(rig.kernel) is Accel.tcg
    monkeypatch.setenv("VM_ACCEL", "warp")
    with pytest.raises(VMError, match="VM_ACCEL='warp' is not one of tcg, kvm, auto"):
        choose(rig.kernel)
    monkeypatch.delenv("VM_ACCEL")
    assert choose(rig.kernel) in (Accel.tcg, Accel.kvm)  # probes at most once per process
    qemus = [p for p in psutil.Process().children(recursive=True) if "qemu" in p.name()]
    assert qemus == []


# -- the command line and the pytest plugin -----------------------------------------------------------


def test_reflash_run_shows_the_console_until_the_guest_powers_off(rig: Rig) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkimage", "run", "--kernel", rig.kernel, "--initrd", rig.initrd,
         "--append", f"{APPEND} rig.poweroff", "--memory", "256"],
        stdin=subprocess.DEVNULL, capture_output=True, check=False, env={**os.environ, "VM_ACCEL": "tcg"}, timeout=BOOT,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"rig: ready" in proc.stdout


def test_reflash_rig_command_errors() -> None:
    demo = subprocess.run([sys.executable, "-m", "mkimage", "demo", "--firmware", "coreboot"], capture_output=True,
                          text=True, check=False)
    assert demo.returncode == 2 and "'coreboot'" in demo.stderr
    missing = subprocess.run([sys.executable, "-m", "mkimage", "run", "/nonexistent.img"], capture_output=True, text=True, check=False)
    assert (missing.returncode, missing.stderr) == (1, "vm: /nonexistent.img not found\n")


INNER_TEST = """
from pathlib import Path

def test_fails_after_boot(machine):
    m = machine(kernel=Path({kernel!r}), initrd=Path({initrd!r}), append="console=ttyS0")
    m.expect("rig: ready", 120)
    assert False, "deliberately failing"
"""


def test_failing_test_reports_its_console_log(rig: Rig, tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("from vm.pytest_plugin import machine, pytest_runtest_makereport\n")
    (tmp_path / "test_inner.py").write_text(INNER_TEST.format(kernel=str(rig.kernel), initrd=str(rig.initrd)))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}",
         "test_inner.py"],
        cwd=tmp_path, capture_output=True, text=True, check=False, env={**os.environ, "VM_ACCEL": "tcg"}, timeout=BOOT,
    )
    assert proc.returncode == 1, proc.stdout
    match = re.search(r"console bios-1: (\S+console-bios-1\.log)", proc.stdout)
    assert match, proc.stdout
    assert Path(match.group(1)).is_file()
    assert "rig: ready" in proc.stdout.split(match.group(0), 1)[1]
