"""`reflashctl`'s side of the daemon: JSON over HTTP on reflashd's Unix socket (stdlib only, so the
command works where aiohttp is not installed). None when no daemon answers: the CLI then works alone."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from recovery.core.errors import Failed, Rejected, UpdateError

TIMEOUT = 3600.0  # an install through the daemon verifies a whole bundle before it answers


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("reflashd", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class DaemonError(UpdateError):
    """An error reflashd answered with: printed as it sent it, the same line the CLI would print."""

    def __init__(self, line: str, kind: str) -> None:
        super().__init__(line.removeprefix(f"{kind}: "))
        self.kind = kind


class Client:
    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    @classmethod
    def connect(cls, path: Path) -> Client | None:
        """A client when a daemon answers on `path`; None when there is no socket or nobody behind it."""
        if not path.is_socket():
            return None
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                s.connect(str(path))
        except OSError:
            return None
        return cls(path)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        connection = _UnixConnection(self.path, self.timeout)
        try:
            data = json.dumps(body or {}).encode() if method == "POST" else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise Failed(f"reflashd on {self.path} did not answer {method} {path}: {e}") from None
        finally:
            connection.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            raise Failed(f"reflashd answered {method} {path} with HTTP {response.status} and no JSON") from None
        if response.status >= 400:
            line, kind = str(doc.get("error", f"HTTP {response.status}")), str(doc.get("kind", "error"))
            if kind in ("rejected", "failed"):
                raise (Rejected if kind == "rejected" else Failed)(line.removeprefix(f"{kind}: "))
            raise DaemonError(line, kind)
        return doc
