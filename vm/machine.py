"""A QEMU machine: boots a disk (or a kernel) under SeaBIOS or OVMF, with its serial console and QMP on sockets.

QEMU starts paused (`-S`) and connects to sockets we already listen on, so the console is attached
before the first instruction runs and no output is lost; QMP `cont` then starts the guest.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from qemu.qmp.legacy import QEMUMonitorProtocol

from . import VMError
from .accel import Accel, choose
from .console import Console, Pattern
from .disk import DiskImage
from .drive import DiskInterface, Drive
from .network import UserNetwork
from .shell import Shell

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
CONNECT_TIMEOUT = 15.0


class Firmware(StrEnum):
    bios = "bios"  # SeaBIOS, QEMU's default
    uefi = "uefi"  # OVMF: read-only code in pflash 0, the machine's own variable store in pflash 1

    def qemu_args(self, efi_vars: Path | None) -> list[str]:
        match self:
            case Firmware.bios:
                return []
            case Firmware.uefi:
                assert efi_vars is not None
                return [
                    "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={efi_vars}",
                ]


class Machine:
    """One run of QEMU. Use as a context manager; a new Machine on the same disk boots it again.

    `disk` is the boot disk (a path, a DiskImage or a Drive; boot disks in tests are overlays, see
    `DiskImage.overlay`), `drives` more disks. With `kernel` the guest boots that kernel directly
    (`initrd`, `append`), the firmware still runs first. Files go to `workdir`: the console log
    `console-<name>.log`, QEMU's own messages `qemu-<name>.log`, and under UEFI a fresh copy of
    OVMF's variable store (or `efi_vars`, kept if it exists, to carry variables across boots).
    `network`: False for none, True for QEMU's open user-mode network, or a `UserNetwork` (restricted,
    with guestfwd rules to host servers).
    """

    def __init__(
        self,
        disk: Path | DiskImage | Drive | None = None,
        *,
        firmware: Firmware = Firmware.bios,
        interface: DiskInterface = DiskInterface.virtio,
        drives: Sequence[Drive] = (),
        kernel: Path | None = None,
        initrd: Path | None = None,
        append: str | None = None,
        memory: int = 1024,
        cpus: int = 1,
        accel: Accel | None = None,
        probe_kernel: Path | None = None,
        network: bool | UserNetwork = False,
        name: str = "vm",
        workdir: Path | None = None,
        efi_vars: Path | None = None,
        extra_args: Sequence[str] = (),
        on_output: Callable[[bytes], None] | None = None,
    ) -> None:
        if disk is None and kernel is None:
            raise VMError("nothing to boot: give a disk or a kernel")
        self.name = name
        self.firmware = Firmware(firmware)
        self.drives: list[Drive] = []
        self.disk: DiskImage | None = None
        if disk is not None:
            boot = self._drive(disk, interface)
            self.disk = DiskImage(boot.path, boot.format)
            self.drives.append(boot)
        self.drives += drives
        self.kernel, self.initrd, self.append = kernel, initrd, append
        self.memory, self.cpus, self.network = memory, cpus, network
        self._accel, self._probe_kernel = accel, probe_kernel or kernel
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"vm-{name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.workdir / f"console-{name}.log"
        self.qemu_log = self.workdir / f"qemu-{name}.log"
        self.efi_vars = (efi_vars or self.workdir / f"OVMF_VARS-{name}.fd") if self.firmware is Firmware.uefi else None
        self.extra_args = list(extra_args)
        self.on_output = on_output
        self.accel: Accel | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._console: Console | None = None
        self._shell: Shell | None = None
        self._sockdir: Path | None = None

    @staticmethod
    def _drive(disk: Path | DiskImage | Drive, interface: DiskInterface) -> Drive:
        if isinstance(disk, Drive):
            return disk
        image = disk if isinstance(disk, DiskImage) else DiskImage.open(Path(disk))
        return Drive(image.path, image.format, interface)

    # -- life cycle ---------------------------------------------------------------------------------

    def argv(self, qmp_socket: Path, console_socket: Path) -> list[str]:
        assert self.accel is not None
        args = [
            QEMU, "-name", self.name, "-S",
            *self.accel.qemu_args(),
            "-m", str(self.memory), "-smp", str(self.cpus),
            "-display", "none", "-monitor", "none", "-parallel", "none",
            "-chardev", f"socket,id=qmp,path={qmp_socket}", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=console,path={console_socket}", "-serial", "chardev:console",
            *self.firmware.qemu_args(self.efi_vars),
            # A hardware watchdog, as appliances have: systemd arms it on trial boots, and a guest that
            # stops feeding it is reset (QEMU's default action would be the same; said, not assumed).
            "-device", "i6300esb", "-action", "watchdog=reset",
        ]
        if isinstance(self.network, UserNetwork):
            args += self.network.qemu_args()
        else:
            args += ["-nic", "user,model=virtio-net-pci"] if self.network else ["-nic", "none"]
        for i, drive in enumerate(self.drives):
            # with -kernel the firmware boots QEMU's loader ROM, which holds boot index 0
            boot = i == 0 and self.disk is not None and self.kernel is None
            args += drive.qemu_args(f"disk{i}", bootindex=0 if boot else None)
        if self.kernel is not None:
            args += ["-kernel", str(self.kernel)]
            if self.initrd is not None:
                args += ["-initrd", str(self.initrd)]
            if self.append is not None:
                args += ["-append", self.append]
        return args + self.extra_args

    def start(self) -> Machine:
        """Start QEMU paused, attach console and QMP, then let the guest run."""
        if self._proc is not None:
            raise VMError(f"machine {self.name} was already started: make a new Machine to boot again")
        self.accel = self._accel or choose(self._probe_kernel)
        if self.efi_vars is not None and not self.efi_vars.exists():
            shutil.copyfile(OVMF_VARS, self.efi_vars)
        # unix socket paths are limited to 108 bytes: keep them out of deep pytest directories
        self._sockdir = Path(tempfile.mkdtemp(prefix="vm-"))
        qmp_path, console_path = self._sockdir / "qmp", self._sockdir / "console"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(console_path))
        listener.listen(1)
        self._qmp = QEMUMonitorProtocol(str(qmp_path), server=True, nickname=self.name)
        argv = self.argv(qmp_path, console_path)
        log.debug("+ %s", shlex.join(argv))
        try:
            with self.qemu_log.open("ab") as qemu_log:
                # the one long-running child of the project: recovery.run.run() waits for its programs
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT
                )
        except FileNotFoundError:
            listener.close()
            self.close()
            raise VMError(f"{QEMU} not found: install qemu-system-x86 (make setup)") from None
        try:
            conn = self._accept(listener)
            try:
                self._qmp.accept(timeout=CONNECT_TIMEOUT)
            except Exception as e:
                time.sleep(0.5)  # QEMU writes why it quit before it closes the socket; give it a moment to exit
                if self._proc.poll() is not None:
                    raise VMError(f"QEMU exited with status {self._proc.returncode}: {self._qemu_messages()}") from None
                raise VMError(f"QMP connection to {self.name} failed: {e}") from e
            self._qmp.settimeout(30)
            self._console = Console(conn, self.console_log, name=self.name, on_output=self.on_output)
            self._console.start()
            self._shell = Shell(self._console)
            self._qmp.cmd("cont")
        except BaseException:
            self.power_cut()
            self.close()
            raise
        finally:
            listener.close()
        return self

    def _accept(self, listener: socket.socket) -> socket.socket:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        listener.settimeout(0.2)
        assert self._proc is not None
        while True:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                pass
            if self._proc.poll() is not None:
                raise VMError(f"QEMU exited with status {self._proc.returncode}: {self._qemu_messages()}")
            if time.monotonic() > deadline:
                raise VMError(f"QEMU did not connect its console within {CONNECT_TIMEOUT:g} s")

    def _qemu_messages(self) -> str:
        try:
            lines = self.qemu_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no messages"
        return " / ".join(lines[-3:]) or "no messages"

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def power_cut(self) -> None:
        """Pull the plug: SIGKILL QEMU. No flush, no shutdown; what the guest did not write is lost."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        if self._console is not None:
            self._console.wait_closed(5)

    def reset(self) -> None:
        """Press the reset button (QMP `system_reset`): the guest reboots without shutting down."""
        self._command("system_reset")

    def wait_exit(self, timeout: float | None = 60.0) -> int:
        """Wait for QEMU to exit by itself (the guest powered off); its exit status. None waits forever."""
        if self._proc is None:
            raise VMError(f"machine {self.name} was never started")
        try:
            status = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VMError(
                f"{self.name} still running after {timeout} s; last console lines:\n{self.tail()}"
            ) from None
        if self._console is not None:
            self._console.wait_closed(5)
        return status

    def stop(self, timeout: float = 10.0) -> None:
        """End the machine: QMP `quit` (QEMU flushes its disks), SIGKILL if that does not work."""
        if self.running:
            try:
                self._command("quit")
                assert self._proc is not None
                self._proc.wait(timeout)
            except (VMError, subprocess.TimeoutExpired):
                log.debug("%s: QMP quit did not end QEMU, killing it", self.name)
        self.power_cut()
        self.close()

    def close(self) -> None:
        """Release sockets and threads (QEMU must be gone); the console text stays readable."""
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception as e:  # QEMU is gone: the QMP session may end in any state
                log.debug("%s: closing QMP: %s", self.name, e)
            self._qmp = None
        if self._console is not None:
            self._console.close()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def _command(self, name: str, **arguments: object) -> object:
        if self._qmp is None or not self.running:
            raise VMError(f"machine {self.name} is not running, cannot send QMP {name}")
        try:
            return self._qmp.cmd(name, **arguments)
        except Exception as e:
            raise VMError(f"QMP {name} on {self.name} failed: {e}") from e

    def qmp(self, name: str, **arguments: object) -> object:
        """Send any QMP command; its return value."""
        return self._command(name, **arguments)

    # -- console ------------------------------------------------------------------------------------

    @property
    def console(self) -> Console:
        if self._console is None:
            raise VMError(f"machine {self.name} was never started")
        return self._console

    def expect(self, pattern: Pattern, timeout: float = 60.0) -> re.Match[str]:
        """Wait for `pattern` (a regex; str or compiled) on the console, after the previous match."""
        return self.console.expect(pattern, timeout)

    def send(self, text: str | bytes) -> None:
        """Type into the console."""
        self.console.send(text)

    def shell(self, cmd: str, timeout: float = 60.0, *, keep_kernel_messages: bool = False) -> tuple[int, str]:
        """Run `cmd` in the root shell on the console; (exit status, output). See `Shell.run`."""
        if self._shell is None:
            raise VMError(f"machine {self.name} was never started")
        return self._shell.run(cmd, timeout, keep_kernel_messages=keep_kernel_messages)

    def tail(self, lines: int = 40) -> str:
        return self._console.tail(lines) if self._console is not None else ""

    # -- the disk, on the host ----------------------------------------------------------------------

    def _stopped_disk(self) -> DiskImage:
        if self.disk is None:
            raise VMError(f"machine {self.name} has no disk")
        if self.running:
            raise VMError(f"machine {self.name} is running: stop it or cut the power before touching its disk")
        return self.disk

    def read_file(self, partition: str | int, path: str) -> bytes | None:
        """A file from an ext4 partition of the (stopped) machine's boot disk; None if absent."""
        return self._stopped_disk().read_file(partition, path)

    def write_file(self, partition: str | int, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Create or replace a file in an ext4 partition of the (stopped or not yet started) boot disk."""
        self._stopped_disk().write_file(partition, path, data, mode=mode)

    def remove_file(self, partition: str | int, path: str) -> bool:
        return self._stopped_disk().remove_file(partition, path)


def qemu_available() -> str | None:
    """None if QEMU and OVMF are here, else what is missing (for skip reasons)."""
    missing = [p for p in (QEMU, "qemu-img") if shutil.which(p) is None]
    missing += [str(p) for p in (OVMF_CODE, OVMF_VARS) if not p.exists()]
    return ", ".join(missing) + " missing" if missing else None


__all__ = ["Accel", "DiskImage", "DiskInterface", "Drive", "Firmware", "Machine", "qemu_available"]
