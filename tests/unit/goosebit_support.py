"""A real gooseBit (0.2.12, from make setup's .venv-goosebit, with the reflash plugin) on the loopback
with a temporary SQLite database, and the few calls of its REST API the fleet tests need."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv-goosebit/bin/python"
ADMIN, PASSWORD = "admin", "fleet-test-password"
STARTUP = 90.0  # seconds gooseBit may take to answer (imports, schema) on a busy two-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Goosebit:
    url: str
    log: Path
    token: str = ""

    def call(self, method: str, path: str, body: Any = None, *, form: bytes | None = None,
             content_type: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        data = form
        if body is not None:
            data, content_type = json.dumps(body).encode(), "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"gooseBit: {method} {path}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def upload(self, bundle: Path, *, hw_revision: str = "default") -> int:
        """The bundle as gooseBit software, through the plugin's route; returns its id."""
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="hw_revision"\r\n\r\n{hw_revision}\r\n'.encode(),
            (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{bundle.name}"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n").encode() + bundle.read_bytes() + b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]
        answer = self.call("PUT", "/plugins/reflash/software", form=b"".join(parts),
                           content_type=f"multipart/form-data; boundary={boundary}")
        return int(answer["id"])

    def add_device(self, device: str, token: str, software: int | str = "latest") -> None:
        """A device known before it polls (gooseBit's strict mode), with its token and what it gets."""
        self.call("PUT", "/api/v1/devices", {"devices": [device], "auth_token": token})
        self.call("PATCH", "/api/v1/devices", {"devices": [device], "software": str(software)})

    def device(self, device: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/api/v1/devices/{device}"))

    def device_log(self, device: str) -> str:
        return str(self.call("GET", f"/api/v1/devices/{device}/log")["log"] or "")


def _wait(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gooseBit exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/login", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"gooseBit did not answer within {STARTUP:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def goosebit(directory: Path, *, poll_time: str = "00:00:01") -> Iterator[Goosebit]:
    """gooseBit on 127.0.0.1 (a free port) with its database, artifacts and log in `directory`;
    devices authenticate with their TargetToken (strict mode: a device is known before it polls)."""
    if not PYTHON.exists():
        raise AssertionError(f"{PYTHON} is missing: run `make setup` (it makes gooseBit's venv)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GOOSEBIT_")},
        "GOOSEBIT_DB_URI": f"sqlite://{directory / 'db.sqlite3'}",
        "GOOSEBIT_ARTIFACTS_DIR": str(directory / "artifacts"),
        "GOOSEBIT_PLUGINS": '["reflash"]',
        "GOOSEBIT_POLL_TIME": poll_time,
        "GOOSEBIT_DEVICE_AUTH": '{"enable": true, "mode": "strict"}',
        "GOOSEBIT_TRACK_DEVICE_IP": "false",
    }
    log = directory / "goosebit.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([os.fspath(PYTHON), "-m", "goosebit_reflash.serve", "127.0.0.1", str(port)],
                                   cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
    server = Goosebit(f"http://127.0.0.1:{port}", log)
    try:
        _wait(server.url, process, log)
        login = f"username={ADMIN}&password={PASSWORD}".encode()
        server.call("POST", "/setup", form=login, content_type="application/x-www-form-urlencoded")
        server.token = server.call("POST", "/login", form=login,
                                   content_type="application/x-www-form-urlencoded")["access_token"]
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
