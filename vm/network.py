"""The guest's network: QEMU user-mode networking shut off from the world (`restrict=on`), with
`guestfwd` rules that lead chosen guest addresses to servers on the host's loopback.

A guestfwd to a chardev (`…-tcp:127.0.0.1:PORT`) opens one host connection when QEMU starts and
feeds every guest connection into it, so an HTTP client gets its first answer and nothing after.
The `cmd:` form starts a program per guest connection with the connection on its stdin and stdout:
that program is this file, run as a script, relaying the bytes to the host server.

Run as a script (`python network.py HOST PORT`) it is that relay; it imports only the standard
library and writes nothing to stderr, which QEMU also connects to the guest's socket.
`StaticServer` is the host side: a directory served over HTTP on the loopback.
"""

from __future__ import annotations

import functools
import http.server
import ipaddress
import os
import shlex
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

GUEST_NET = ipaddress.ip_network("10.0.2.0/24")  # slirp's default: gateway .2, DNS .3, DHCP from .15
RELAY_CHUNK = 64 * 1024


def qemu_escape(value: str) -> str:
    """QEMU's option parser ends a value at a comma; a doubled comma stands for one (also for vm.disk:
    this module stays standard-library only, as the relay script it also is)."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class GuestForward:
    """Guest TCP connections to `guest_addr:guest_port` reach `host_addr:host_port` on the host."""

    guest_addr: str
    guest_port: int
    host_port: int
    host_addr: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if ipaddress.ip_address(self.guest_addr) not in GUEST_NET:
            raise ValueError(f"guestfwd address {self.guest_addr} is outside the guest's network {GUEST_NET}")
        for port in (self.guest_port, self.host_port):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")

    def relay_command(self) -> list[str]:
        # -I -S: the relay needs neither the environment's paths nor site-packages, and starts faster.
        return [sys.executable, "-I", "-S", os.path.abspath(__file__), self.host_addr, str(self.host_port)]

    def option(self) -> str:
        command = shlex.join(self.relay_command())  # QEMU splits it like a shell would
        return f"guestfwd=tcp:{self.guest_addr}:{self.guest_port}-cmd:{qemu_escape(command)}"


@dataclass(frozen=True)
class HostForward:
    """Connections to the host's `127.0.0.1:host_port` reach the guest's `guest_port` (a hostfwd: how
    a browser on the host reaches a page the guest serves; restrict=on still lets these in)."""

    host_port: int
    guest_port: int

    def __post_init__(self) -> None:
        for port in (self.host_port, self.guest_port):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")

    def option(self) -> str:
        return f"hostfwd=tcp:127.0.0.1:{self.host_port}-:{self.guest_port}"


@dataclass(frozen=True)
class UserNetwork:
    """One virtio NIC on QEMU's user-mode network. `restrict` cuts the guest off from the host and
    the world; only `forwards` lead out, and only `host_forwards` lead in."""

    forwards: tuple[GuestForward, ...] = ()
    restrict: bool = True
    model: str = "virtio-net-pci"
    id: str = "net0"
    host_forwards: tuple[HostForward, ...] = ()

    def qemu_args(self) -> list[str]:
        options = ["user", f"id={self.id}", f"restrict={'on' if self.restrict else 'off'}"]
        options += [f.option() for f in self.forwards]
        options += [f.option() for f in self.host_forwards]
        return ["-netdev", ",".join(options), "-device", f"{self.model},netdev={self.id}"]


@dataclass(frozen=True)
class Request:
    """One request the server answered, as its log line has it."""

    method: str
    path: str
    status: int


class StaticServer:
    """`directory` over HTTP on 127.0.0.1 at a free port, in a thread; a context manager.

    Every answered request is recorded in `requests`, so a caller can tell what the guest fetched.
    """

    def __init__(self, directory: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.directory = Path(directory)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                status = int(code) if str(code).isdigit() else 0
                with server._lock:
                    server.requests.append(Request(self.command, self.path, status))

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass  # the requests are recorded above; stderr belongs to the caller

        handler = functools.partial(Handler, directory=str(self.directory))
        self._httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    def forward(self, guest_addr: str = "10.0.2.100", guest_port: int = 80) -> GuestForward:
        """The guestfwd rule that leads the guest's `guest_addr:guest_port` here."""
        return GuestForward(guest_addr, guest_port, self.port, self.host)

    def fetched(self, path: str) -> bool:
        """Whether a GET of `path` was answered with 200."""
        with self._lock:
            return any(r.method == "GET" and r.path == path and r.status == 200 for r in self.requests)

    def start(self) -> StaticServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="static-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def relay(fd_in: int, fd_out: int, host: str, port: int) -> None:
    """Copy bytes between a guest connection (`fd_in`, `fd_out`) and a TCP server until both sides end."""
    upstream = socket.create_connection((host, port))

    def guest_to_host() -> None:
        try:
            while data := os.read(fd_in, RELAY_CHUNK):
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    sender = threading.Thread(target=guest_to_host, daemon=True)
    sender.start()
    with upstream:
        try:
            while data := upstream.recv(RELAY_CHUNK):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd_out, view):]
        except OSError:
            pass


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        return 2
    try:
        relay(0, 1, argv[0], int(argv[1]))
    except (OSError, ValueError):
        return 1  # the guest sees its connection closed: that is the message
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
