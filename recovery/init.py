"""PID 1 of the recovery OS: install the staged update or say why not, then reboot; never exit.

The cycle is planned before it acts: instruction, disks, bundle and target are resolved and checked
while the system partition is still untouched. Only then does the erase begin, and from that point
the instruction stays until the new system is complete, so a power cut leads to another try.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import uuid4

from .atomic import atomic_write, checkpoint_journal, durable_unlink
from .cmdline import Boot, CommandLineRefused
from .config import DEFAULT_PATH, RecoveryConfig
from .errors import Failed, Rejected, UpdateError
from .output import Progress
from .run import run
from .status import Outcome, Result, append_log, log_tail, now, read_result, write_result
from .version import Version

if TYPE_CHECKING:
    from .instruction import Instruction

log = logging.getLogger("recovery")

RUN = Path("/run/recovery")
CFG_MOUNT = RUN / "cfg"
STORAGE_MOUNT = RUN / "storage"
SYSTEM_MOUNT = RUN / "system"
INSTRUCTION = Path("update-instruction")
# Present on cfg from the erase until the new system is complete: a later rejection must then not
# send the machine back to a system that is no longer there.
INCOMPLETE = Path("recovery/system-incomplete")
# GRUB's try counter for an instruction it cannot parse (see bootloader/recovery.cfg).
FALLBACK_COUNTER = Path("recovery/grubenv")
UDEVD = ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")


class Console:
    """Lines for the serial console (DESIGN.md's contract), also kept for `recovery/log`."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.buffer.write(f"{time.strftime('%H:%M:%S')} {line}\n")


class _BufferHandler(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.buffer.write(f"{time.strftime('%H:%M:%S')} {self.format(record)}\n")


# --- the machine ------------------------------------------------------------------------------


def _mount_api_filesystems() -> None:
    for fstype, target, options in (
        ("proc", "/proc", "nosuid,nodev,noexec"),
        ("sysfs", "/sys", "nosuid,nodev,noexec"),
        ("devtmpfs", "/dev", "nosuid,mode=0755"),
        ("tmpfs", "/run", "nosuid,nodev,mode=0755"),
        ("tmpfs", "/tmp", "nosuid,nodev"),
    ):
        os.makedirs(target, exist_ok=True)
        if os.path.ismount(target):
            continue
        run(["mount", "-t", fstype, "-o", options, fstype, target])


def _attach_console() -> None:
    """Make fds 0-2 the console: the kernel may have found no /dev/console in the initramfs."""
    try:
        os.fstat(1)
        return
    except OSError:
        pass
    fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as PID 1
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _start_udev(timeout: float) -> None:
    udevd = next((p for p in UDEVD if os.path.exists(p)), None)
    if udevd is None:
        raise Failed("systemd-udevd not found in the recovery OS")
    run([udevd, "--daemon", "--resolve-names=never"])
    run(["udevadm", "trigger", "--type=subsystems", "--action=add"])
    run(["udevadm", "trigger", "--type=devices", "--action=add"])
    run(["udevadm", "settle", f"--timeout={int(timeout)}"], check=False)


def reap_orphans() -> None:
    """Collect exited children that nobody waits for (daemons' leftovers reparented to PID 1).

    Called only between our own synchronous commands, so it never steals a status run() waits for.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def reboot() -> None:
    """Sync and restart the machine through reboot(2); returns only if the kernel refused."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x01234567)  # LINUX_REBOOT_CMD_RESTART
    log.error("reboot(2) failed: %s", os.strerror(ctypes.get_errno()))


# --- the install ------------------------------------------------------------------------------


@contextmanager
def _stage(console: Console, name: str, seconds: dict[str, float], key: str | None = None) -> Iterator[None]:
    console.say(f"recovery: {name}")
    start = time.monotonic()
    try:
        yield
    finally:
        if key:
            seconds[key] = round(time.monotonic() - start, 2)


def _syncfs(fd: int, device: Path) -> None:
    """Write the file system behind `fd` to disk; Failed if any write to it failed since `fd` was opened."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        raise Failed(f"writing the new system to {device} failed: {os.strerror(ctypes.get_errno())}")


def _read_os_version(root: Path) -> str | None:
    try:
        for line in (root / "etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_ID":
                return value.strip().strip('"')
    except (OSError, UnicodeDecodeError):
        pass
    return None


def _read_marker(cfg: Path) -> dict | None:
    """The record an earlier try left before erasing, or None when the system is whole."""
    try:
        raw = (cfg / INCOMPLETE).read_bytes()
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(raw)
    except ValueError:
        marker = None
    # Even an unreadable marker means the system was being rewritten: never treat it as whole.
    return marker if isinstance(marker, dict) and isinstance(marker.get("uuid"), str) else {"uuid": str(uuid4())}


def _bundle_path(storage: Path, file: Path) -> Path:
    """The bundle's path below the storage mount, refusing symlinks that lead off that disk."""
    path = (storage / os.fspath(file).lstrip("/")).resolve()
    if storage.resolve() not in path.parents:
        raise Rejected(f"bundle {file} lies outside the storage disk")
    return path


class Installer:
    """One run of the install, from the instruction to the written result."""

    def __init__(self, config: RecoveryConfig, boot: Boot, console: Console, cfg: Path = CFG_MOUNT) -> None:
        self.config = config
        self.boot = boot
        self.console = console
        self.cfg = cfg
        self.seconds: dict[str, float] = {}
        self.started = now()
        self.from_version: str | None = None
        self.to_version: str | None = None

    def result(self, outcome: Outcome, reason: str | None = None, *, files: int = 0, nbytes: int = 0) -> Result:
        return Result(
            outcome=outcome,
            reason=reason,
            from_version=self.from_version,
            to_version=self.to_version,
            try_=self.boot.try_count,
            started=self.started,
            finished=now(),
            seconds=dict(self.seconds),
            bytes=nbytes,
            files=files,
        )

    def run(self) -> Result:
        """Install; return installed or rejected, raise for failed (the caller decides what stays)."""
        from .bundle import Keyring, verify_bundle
        from .devices import find_device, mount, partition_info, same_device, umount
        from .install import erase, extract_payload, filesystem_identity
        from .instruction import DiskSpec, DiskSpecKind, read_instruction
        from .mounts import mounted_at

        marker = _read_marker(self.cfg)
        incomplete = marker is not None
        if marker is not None:
            self.from_version = marker.get("from_version")
        try:
            with _stage(self.console, "verifying", self.seconds, "verify"):
                instruction = read_instruction(self.cfg / INSTRUCTION)
                self.to_version = instruction.version
                timeout = self.config.device_timeout
                system = find_device(DiskSpec.parse(self.config.system), timeout=timeout)
                storage = find_device(instruction.disk, timeout=timeout)
                for role in ("cfg", "recovery"):
                    other = find_device(DiskSpec.parse(getattr(self.config, role)), timeout=timeout)
                    if same_device(system, other):
                        raise Rejected(f"system partition {system} is the {role} partition")
                if same_device(system, storage):
                    raise Rejected(f"the bundle's disk {instruction.disk} is the system partition")
                if where := mounted_at(system):
                    raise Rejected(f"system partition {system} is mounted on {', '.join(where)}")
                part = partition_info(system)
                spec = DiskSpec.parse(self.config.system)
                if spec.kind == DiskSpecKind.partlabel and part.name != spec.value:
                    raise Rejected(f"partition {system} is named {part.name!r}, expected {spec.value!r}")
                if not incomplete:
                    self.from_version = self._installed_version(system)
                self._check_downgrade(instruction)
                mount(storage, STORAGE_MOUNT, options="ro,nosuid,nodev,noexec")
                bundle = verify_bundle(
                    _bundle_path(STORAGE_MOUNT, Path(os.fspath(instruction.file))),
                    Keyring.load(self.config.keys),
                    product=self.config.product,
                    version=instruction.version,
                    sha256=instruction.sha256,
                    capacity=part.size,
                )
        except (Rejected, Failed, OSError) as e:
            # Before the erase every problem is a rejection: the system is still whole.
            if not isinstance(e, Rejected):
                e = Rejected(str(e))
            if incomplete:
                # An earlier try erased the system: there is nothing to go back to.
                raise Failed(f"{e}; the system partition is incomplete from an earlier try") from None
            return self.result(Outcome.rejected, str(e))

        # The file system's identity is kept across the erase (fstab and GRUB may name it); it is
        # recorded first, so a try after a power cut mid-mkfs still knows it.
        if marker is None:
            label, uuid = filesystem_identity(system)
            marker = {"since": now(), "from_version": self.from_version, "label": label,
                      "uuid": uuid or str(uuid4())}
        atomic_write(self.cfg / INCOMPLETE, json.dumps({**marker, "try": self.boot.try_count}).encode() + b"\n")
        try:
            with _stage(self.console, "erasing", self.seconds, "erase"):
                erase(system, label=marker.get("label") or None, uuid=marker["uuid"],
                      files=bundle.manifest.rootfs_files)
            with _stage(self.console, "extracting", self.seconds, "extract"):
                mount(system, SYSTEM_MOUNT, options="rw,nosuid,nodev")
                # Opened before the first write: syncfs on it reports every write error since (sync(2)
                # reports none, and the page cache hides them from the extraction's own writes).
                root = os.open(SYSTEM_MOUNT, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    progress = Progress(
                        bundle.manifest.payload.size, "recovery: extracting", stream=sys.stdout, live=False
                    )
                    stats = extract_payload(bundle, SYSTEM_MOUNT, progress=progress)
                    progress.finish()
                    _syncfs(root, system)
                finally:
                    os.close(root)
                umount(SYSTEM_MOUNT)
        except UpdateError as e:
            raise Failed(str(e)) from None
        return self.result(Outcome.installed, files=stats.files, nbytes=stats.bytes)

    def _check_downgrade(self, instruction: Instruction) -> None:
        """A version older than the installed one only when the instruction says so (`updatectl install
        --allow-downgrade`). The same version again is a repair, not a downgrade. With no version to
        compare (no os-release on the system) there is nothing to refuse: the system may be the problem."""
        installed = self.from_version
        if not isinstance(installed, str) or instruction.allow_downgrade:
            return
        if Version(instruction.version) < Version(installed):
            raise Rejected(f"downgrade from {installed} to {instruction.version} not allowed by the instruction")

    def _installed_version(self, system: Path) -> str | None:
        from .devices import mount, umount

        try:
            mount(system, SYSTEM_MOUNT, options="ro,nosuid,nodev,noexec,noload")
        except Failed:
            return None
        try:
            return _read_os_version(SYSTEM_MOUNT)
        finally:
            umount(SYSTEM_MOUNT)

    def record(self, result: Result) -> None:
        """Write the verdict; the instruction goes only when nothing more will be tried."""
        with _stage(self.console, "finishing", self.seconds):
            write_result(self.cfg, result)
            # Marks the moment between the verdict on disk and the instruction's removal (power-cut tests).
            self.console.say(f"recovery: result written: {result.outcome}")
            if result.outcome != Outcome.failed:
                durable_unlink(self.cfg / INCOMPLETE)
                durable_unlink(self.cfg / INSTRUCTION)
                reset_fallback_counter(self.cfg)
            # GRUB reads cfg past its journal: without this a cut now would let it boot us once more.
            checkpoint_journal(self.cfg)


def reset_fallback_counter(cfg: Path) -> None:
    """An empty block for GRUB to count garbage instructions' tries in (made if it is missing)."""
    from .instruction import format_envblock

    (cfg / FALLBACK_COUNTER).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg / FALLBACK_COUNTER, format_envblock({}))


def _verdict(console: Console, result: Result) -> None:
    if result.outcome == Outcome.installed:
        console.say(f"recovery: installed {result.to_version}")
    else:
        console.say(f"recovery: {result.outcome}: {result.reason}")


def _mount_cfg(config: RecoveryConfig) -> Path:
    from .devices import find_device, mount
    from .instruction import DiskSpec

    if os.path.ismount(CFG_MOUNT):
        return CFG_MOUNT
    node = find_device(DiskSpec.parse(config.cfg), timeout=config.device_timeout)
    # A power cut may have left cfg dirty: repair what e2fsck -p repairs safely before mounting rw.
    proc = run(["e2fsck", "-p", node], check=False)
    if proc.returncode >= 4:
        raise Failed(f"cfg file system on {node} needs manual repair (e2fsck exit {proc.returncode})")
    return mount(node, CFG_MOUNT, options="rw,nosuid,nodev,noexec,sync")


def install(config: RecoveryConfig, boot: Boot, console: Console) -> None:
    """The whole install; ends by rebooting (or falls into the rescue shell if it cannot)."""
    cfg = _mount_cfg(config)
    if not (cfg / INSTRUCTION).exists() and not (cfg / INCOMPLETE).exists():
        # Nothing staged. GRUB reads cfg without replaying its journal, so after a power cut just as
        # the instruction was removed it may still see it and boot us: waiting in a shell would strand
        # the appliance. Unmounting cleanly writes the removal where GRUB reads; then boot the system.
        # (The menu's rescue entry still gives the shell.)
        from .devices import umount_all

        last = read_result(cfg)
        console.say("recovery: no update instruction")
        console.say(f"recovery: last result: {last.summary() if last else 'none'}")
        console.say("recovery: rebooting")
        umount_all(RUN)
        return
    if not (cfg / FALLBACK_COUNTER).exists():
        reset_fallback_counter(cfg)
    installer = Installer(config, boot, console, cfg)
    try:
        result = installer.run()
    except Failed as e:
        result = installer.result(Outcome.failed, str(e))
    except Exception as e:  # a crash is a failed try, with the evidence kept
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        console.buffer.write(trace)
        result = installer.result(Outcome.failed, f"crash: {type(e).__name__}: {e}")
    _finish(installer, result)


def _finish(installer: Installer, result: Result) -> None:
    from .devices import umount_all

    console = installer.console
    installer.record(result)
    _verdict(console, result)
    console.say("recovery: rebooting")
    append_log(installer.cfg, console.buffer.getvalue())
    try:
        umount_all(RUN)
    except Failed as e:
        log.error("%s", e)


def rescue(config: RecoveryConfig | None, console: Console) -> None:
    """Show the last result and log, then keep a root shell on the console; leaving it reboots."""
    cfg: Path | None = None
    if config is not None:
        try:
            cfg = _mount_cfg(config)
        except UpdateError as e:
            console.say(f"recovery: cfg partition unavailable: {e}")
    if cfg is not None:
        last = read_result(cfg)
        console.say(f"recovery: last result: {last.summary() if last else 'none'}")
        tail = log_tail(cfg)
        if tail:
            print("recovery: last log lines:\n" + tail, flush=True)
    console.say("recovery: rescue shell; 'recovery retry' clears the try counter, 'exit' reboots")
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "TERM": "vt100", "PS1": "rescue# "}
    # setsid -c gives the shell the console as its controlling terminal, so Ctrl-C works.
    subprocess.run(["setsid", "-c", shell, "-i"], env=env, check=False)
    reap_orphans()
    if cfg is not None:
        try:
            from .devices import umount_all

            umount_all(RUN)
        except Failed as e:
            log.error("%s", e)


def retry(cfg: Path | None = None) -> None:
    """`recovery retry`: clear the try counter so the next boot tries the update again."""
    from .instruction import clear_try

    if cfg is None:
        cfg = CFG_MOUNT if os.path.ismount(CFG_MOUNT) else _mount_cfg(RecoveryConfig.load())
    reset_fallback_counter(cfg)
    clear_try(cfg / INSTRUCTION)
    # Both are files GRUB reads past the journal (clear_try writes its own out only when it changed).
    checkpoint_journal(cfg)
    print("try counter cleared: the next boot tries the update again")


def boot_from(cmdline: str, console: Console) -> Boot:
    """The boot GRUB asked for, announced on the console. A command line Boot.parse refuses gets the
    rescue shell and one line saying why: PID 1 cannot exit, and must not install on words GRUB did
    not write."""
    try:
        boot, refused = Boot.parse(cmdline), None
    except CommandLineRefused as e:
        boot, refused = Boot(rescue=True), str(e)
    console.say(f"recovery: starting (try {boot.try_count})")
    if refused is not None:
        console.say(f"recovery: kernel command line refused: {refused}; rescue shell")
    return boot


def main() -> None:
    """PID 1. Every path ends in reboot(2); if even that fails, a shell, forever."""
    console = Console()
    handler = _BufferHandler(console)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger().addHandler(handler)
    config: RecoveryConfig | None = None
    try:
        _mount_api_filesystems()
        _attach_console()
        # Bytes that are not UTF-8 must end in a refusal, not in a crash that reboots into the same.
        boot = boot_from(Path("/proc/cmdline").read_text(errors="replace"), console)
        config = RecoveryConfig.load(DEFAULT_PATH)
        _start_udev(config.device_timeout)
        if boot.rescue:
            rescue(config, console)
        else:
            install(config, boot, console)
    except BaseException as e:  # noqa: BLE001 - PID 1 must never die
        # A crash outside the install proper: failed, so the instruction stays and GRUB counts a try.
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        console.buffer.write(trace)
        console.say(f"recovery: failed: crash: {type(e).__name__}: {e}")
        if os.path.ismount(CFG_MOUNT):
            try:
                append_log(CFG_MOUNT, console.buffer.getvalue())
            except OSError:
                pass
        console.say("recovery: rebooting")
    reap_orphans()
    while True:
        reboot()
        rescue(config, console)
