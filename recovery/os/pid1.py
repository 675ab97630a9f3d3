"""PID 1 of the recovery OS: install the staged update or say why not, then reboot; never exit.

The cycle is planned before it acts: instruction, disks, bundle and target are resolved and checked
while the system partition is still untouched. Only then does the erase begin, and from that point
the instruction stays until the new system is complete, so a power cut leads to another try.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from recovery.core.atomic import checkpoint_journal
from recovery.core.errors import Failed, UpdateError
from recovery.core.instruction import clear_try, write_instruction
from recovery.core.kexec import NoKexec
from recovery.core.osrelease import read_os_release
from recovery.core.result import Outcome, Result, append_log, log_tail, now, read_result, write_result
from recovery.core.trial import remember_failed
from recovery.core.run import reboot_now, run
from recovery.os.cmdline import Boot, CommandLineRefused
from recovery.os.config import DEFAULT_PATH, RecoveryConfig
from recovery.os.console import Console, _BufferHandler
from recovery.os.devices import find_device, mount, umount, umount_all
from recovery.os.installer import (
    CFG_MOUNT,
    INCOMPLETE,
    INSTRUCTION,
    RUN,
    SYSTEM_MOUNT,
    Installer,
    ensure_counters,
    recovery_identity,
    reset_fallback_counter,
)
from recovery.os.kexec import jump, load_system
from recovery.os.rollback import NoRollback, NotOnTrial, plan_rollback, tree_problem

log = logging.getLogger("recovery")


UDEVD = ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")


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
    """Restart the machine (into the release kexec loaded, if one is); returns only if the kernel refused
    (PID 1 then goes on to the rescue path)."""
    global _kexec_loaded
    if _kexec_loaded:
        _kexec_loaded = False
        # Where GRUB would say the same: everything is unmounted, the trial boot is counted.
        print(f"{LOADING_THE_SYSTEM} (by kexec from the recovery: no firmware, no GRUB)", flush=True)
        jump()
    try:
        reboot_now()
    except Failed as e:
        log.error("%s", e)


def _crash(console: Console, e: BaseException) -> str:
    """Put the traceback on the console and in the log to keep; the one-line reason for the verdict."""
    trace = traceback.format_exc()
    print(trace, file=sys.stderr, flush=True)
    console.buffer.write(trace)
    return f"crash: {type(e).__name__}: {e}"


def _verdict(console: Console, result: Result) -> None:
    if result.outcome == Outcome.installed:
        console.say(f"recovery: installed {result.to_version}")
    elif result.outcome == Outcome.rolled_back:
        console.say(f"recovery: rolled back to {result.to_version}: {result.reason}")
    else:
        console.say(f"recovery: {result.outcome}: {result.reason}")


def _mount_cfg(config: RecoveryConfig) -> Path:
    if os.path.ismount(CFG_MOUNT):
        return CFG_MOUNT
    node = find_device(config.cfg, timeout=config.device_timeout)
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
        from recovery.os.devices import umount_all

        last = read_result(cfg)
        console.say("recovery: no update instruction")
        console.say(f"recovery: last result: {last.summary() if last else 'none'}")
        console.say("recovery: rebooting")
        umount_all(RUN)
        return
    ensure_counters(cfg)
    installer = Installer(config, boot, console, cfg)
    try:
        result = installer.run()
    except Failed as e:
        result = installer.result(Outcome.failed, str(e))
    except Exception as e:  # a crash is a failed try, with the evidence kept
        result = installer.result(Outcome.failed, _crash(console, e))
    result = installer.record(result)
    _verdict(console, result)
    if result.outcome == Outcome.rejected and installer.rollback:
        # The system on the disk is the release that failed its trial: rebooting into it would only
        # come back here. A person has to look.
        append_log(cfg, console.buffer.getvalue())
        rescue(config, console)
        return
    done = result.outcome in (Outcome.installed, Outcome.rolled_back)
    _finish(installer.cfg, console, into=(config, result.to_version) if done else None)


_kexec_loaded = False  # the installed release is loaded: reboot() jumps into it instead
LOADING_THE_SYSTEM = "Loading the system"  # GRUB's line (bootloader/grub.cfg) at the same moment


def _finish(cfg: Path, console: Console, into: tuple[RecoveryConfig, str | None] | None = None) -> None:
    """Reboot: after an install (`into`: the configuration and the version installed) by kexec into
    that release when GRUB would boot it next (recovery/os/kexec.py), else through the firmware."""
    global _kexec_loaded
    if into is not None:
        config, version = into

        def mount_system() -> Path:
            node = find_device(config.system, timeout=config.device_timeout)
            return mount(node, SYSTEM_MOUNT, options="ro,nosuid,nodev,noexec")

        try:
            load_system(cfg, mount_system, lambda: umount(SYSTEM_MOUNT))
        except (NoKexec, UpdateError) as e:
            console.say(f"recovery: no kexec: {e}")
        else:
            _kexec_loaded = True
            console.say(f"recovery: {version or 'the installed release'} is loaded for kexec (trial boot 1 counted)")
    console.say("recovery: rebooting")
    append_log(cfg, console.buffer.getvalue())
    try:
        umount_all(RUN)
    except Failed as e:
        log.error("%s", e)


def rollback(config: RecoveryConfig, boot: Boot, console: Console) -> None:
    """Rollback mode (GRUB, past the last trial boot): stage the fallback bundle as a rollback
    instruction and install it. With nothing to go back to, the rescue shell and the reason."""
    cfg = _mount_cfg(config)
    if not (cfg / INSTRUCTION).exists() and not (cfg / INCOMPLETE).exists():
        try:
            plan = plan_rollback(cfg, installed_version=lambda: _system_look(config, read_version),
                                 problem=lambda: _system_look(config, tree_problem, unusable=UNMOUNTABLE))
        except NotOnTrial as e:
            # Nothing failed: the release confirmed itself. The try GRUB counted goes, and the journal
            # is written out so GRUB reads the whole (empty) trial block and boots the system.
            console.say(f"recovery: nothing to roll back: {e}")
            reset_fallback_counter(cfg)
            checkpoint_journal(cfg)
            _finish(cfg, console)
            return
        except NoRollback as e:
            result = Result(Outcome.failed, f"cannot roll back: {e}", try_=boot.try_count, started=now(),
                            finished=now(), recovery=recovery_identity(config, boot))
            write_result(cfg, result)
            checkpoint_journal(cfg)
            _verdict(console, result)
            append_log(cfg, console.buffer.getvalue())
            rescue(config, console)
            return
        console.say(f"recovery: rolling back to {plan.instruction.version}: {plan.reason}")
        remember_failed(cfg, plan.failed_version, plan.reason)
        # From here on it is an install: a cut leaves this instruction, and GRUB counts its tries.
        write_instruction(cfg / INSTRUCTION, plan.instruction)
    install(config, boot, console)


UNMOUNTABLE = "the system partition cannot be mounted"


def _system_look(config: RecoveryConfig, look: Callable[[Path], str | None],
                 unusable: str | None = None) -> str | None:
    """`look` at the system partition mounted read-only (without replaying its journal); `unusable` if it
    cannot be."""
    try:
        node = find_device(config.system, timeout=config.device_timeout)
        mount(node, SYSTEM_MOUNT, options="ro,nosuid,nodev,noexec,noload")
    except UpdateError:
        return unusable
    try:
        return look(SYSTEM_MOUNT)
    finally:
        umount(SYSTEM_MOUNT)


def read_version(root: Path) -> str | None:
    return read_os_release(root).version_id


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
            from recovery.os.devices import umount_all

            umount_all(RUN)
        except Failed as e:
            log.error("%s", e)


def retry(cfg: Path | None = None) -> None:
    """`recovery retry`: clear the try counter so the next boot tries the update again."""

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
        console.say(f"recovery: version {config.version or 'unknown'}" + (f" (slot {boot.slot})" if boot.slot else ""))
        _start_udev(config.device_timeout)
        if boot.rescue:
            rescue(config, console)
        elif boot.rollback:
            rollback(config, boot, console)
        else:
            install(config, boot, console)
    except BaseException as e:  # noqa: BLE001 - PID 1 must never die
        # A crash outside the install proper: failed, so the instruction stays and GRUB counts a try.
        console.say(f"recovery: failed: {_crash(console, e)}")
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
