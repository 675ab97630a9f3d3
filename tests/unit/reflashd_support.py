"""Test support for reflashd: the real daemon in a process of its own (so a test can kill it mid-way),
on a short-named Unix socket and a loopback TCP port, its reboots recorded in a file instead of done.

`python -m tests.unit.reflashd_support CONFIG RECORD` is that process.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recovery.updated.client import _UnixConnection

from .reflashctl_support import System

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


class Daemon:
    """A running reflashd and ways to talk to it: `call` on the Unix socket, `tcp` on the listener."""

    def __init__(self, system: System, socket_path: Path, port: int, record: Path, log: Path) -> None:
        self.system, self.socket, self.port, self.record, self.log = system, socket_path, port, record, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def token(self) -> str:
        return (self.system.config.cfg / "reflashctl/daemon-token").read_text().strip()

    @property
    def reboots(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def start(self) -> None:
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.reflashd_support", str(self.system.config_path), str(self.record)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"reflashd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.call("GET", "/api/status").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"reflashd did not answer within 20 s:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def request(self, connection: http.client.HTTPConnection, method: str, path: str, body: object = None,
                headers: dict[str, str] | None = None) -> Answer:
        data = None
        headers = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        kind = response.headers.get("Content-Type", "")
        return Answer(response.status, json.loads(raw) if kind.startswith("application/json") else raw,
                      {k.lower(): v for k, v in response.headers.items()})

    def call(self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None) -> Answer:
        return self.request(_UnixConnection(self.socket, 10), method, path, body, headers)

    def tcp(self, method: str, path: str, body: object = None, *, token: str | None = "",
            headers: dict[str, str] | None = None) -> Answer:
        """On the TCP listener, with the right token unless `token` says otherwise (None: none)."""
        headers = dict(headers or {})
        if token is not None:
            headers["X-Reflash-Token"] = token or self.token
        return self.request(http.client.HTTPConnection("127.0.0.1", self.port, timeout=10), method, path, body,
                            headers)

    def status(self) -> dict[str, Any]:
        answer = self.call("GET", "/api/status")
        assert answer.status == 200, answer.body
        return answer.body

    def wait(self, until: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if until(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"reflashd never got there; status: {json.dumps(status, indent=1)}\n"
                                     f"log:\n{self.log.read_text()}")
            time.sleep(0.05)


def configure(system: System, socket_path: Path, port: int, *, feed: str | None = None) -> None:
    """`[daemon]` in the system's configuration: the socket, the TCP listener, the page's feed."""
    text = system.config_path.read_text().split("\n[daemon]\n")[0]
    text += f'\n[daemon]\nsocket = "{socket_path}"\nlisten = "127.0.0.1:{port}"\n'
    if feed is not None:
        text += f'feed = "{feed}"\n'
    system.config_path.write_text(text)


@contextmanager
def running_daemon(system: System, *, feed: str | None = None) -> Iterator[Daemon]:
    """reflashd on `system`, stopped (and its log shown on a failure) at the end."""
    short = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # a socket's path has 107 bytes at most
    port = free_port()
    configure(system, short / "reflashd.sock", port, feed=feed)
    daemon = Daemon(system, short / "reflashd.sock", port, system.root / "reboots", system.root / "reflashd.log")
    daemon.start()
    try:
        yield daemon
    except BaseException:
        print(f"reflashd's log ({daemon.log}):\n{daemon.log.read_text()}")
        raise
    finally:
        if daemon.proc is not None:
            daemon.stop()
        shutil.rmtree(short, ignore_errors=True)


def _main(config: str, record: str) -> int:
    from recovery.updated.daemon import main

    def reboot() -> None:
        with open(record, "a") as f:
            f.write(f"reboot at {time.time():.1f}\n")

    return main(["--config", config], reboot=reboot)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_main(sys.argv[1], sys.argv[2]))
