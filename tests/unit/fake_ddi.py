"""A tiny DDI server for what a real one will not do on request: answer garbage, cancel an action,
keep a maintenance window closed, 404 an artifact. Documents are set by the test; every feedback,
configData and request is recorded."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TENANT, DEVICE, TOKEN = "DEFAULT", "dev-fake", "fake-token"
BASE = f"/{TENANT}/controller/v1/{DEVICE}"


@dataclass
class FakeDdi:
    url: str = ""
    sleep: str = "00:00:01"
    deployment: dict[str, Any] | None = None  # served at BASE/deploymentBase/<id>
    cancel: str | None = None  # an action id the server wants cancelled
    raw_base: bytes | None = None  # garbage instead of the controller base
    files: dict[str, bytes] = field(default_factory=dict)  # path -> artifact
    feedback: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (path, body)
    config_data: list[dict[str, Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def executions(self, kind: str = "deploymentBase", *, progress: bool = False) -> list[str]:
        """`execution/finished` of each feedback, in order; progress reports (as many as the timing
        makes) only with `progress`, marked `+progress`."""
        with self.lock:
            return [body["status"]["execution"] + "/" + body["status"]["result"]["finished"]
                    + ("+progress" if "progress" in body["status"]["result"] else "")
                    for path, body in self.feedback
                    if f"/{kind}/" in path and (progress or "progress" not in body["status"]["result"])]

    def details(self) -> list[str]:
        with self.lock:
            return [d for _path, body in self.feedback for d in body["status"].get("details", [])]

    def deploy(self, action: str, artifact: str, size: int, *, sha256: str | None = None, sha1: str | None = None,
               version: str = "2.0.0", download: str = "forced", update: str = "forced",
               window: str | None = None, filename: str = "demo-appliance-2.0.0.bundle") -> None:
        hashes = {k: v for k, v in (("sha256", sha256), ("sha1", sha1)) if v}
        body: dict[str, Any] = {"download": download, "update": update, "chunks": [{
            "part": "os", "version": version, "name": "system", "artifacts": [{
                "filename": filename, "hashes": hashes, "size": size,
                "_links": {"download": {"href": self.url + artifact}}}]}]}
        if window is not None:
            body["maintenanceWindow"] = window
        self.deployment = {"id": action, "deployment": body}

    def base(self) -> dict[str, Any]:
        links: dict[str, Any] = {}
        if self.cancel is not None:
            links["cancelAction"] = {"href": f"{self.url}{BASE}/cancelAction/c1"}
        elif self.deployment is not None:
            links["deploymentBase"] = {"href": f"{self.url}{BASE}/deploymentBase/{self.deployment['id']}?c=1"}
        return {"config": {"polling": {"sleep": self.sleep}}, "_links": links}


def _handler(state: FakeDdi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"TargetToken {TOKEN}":
                return True
            self._send(401, b'{"error": "unauthorized"}')
            return False

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            with state.lock:
                state.requests.append(f"GET {path}")
            if not self._authorized():
                return
            if path == BASE:
                self._send(200, state.raw_base if state.raw_base is not None else json.dumps(state.base()).encode())
            elif path.startswith(f"{BASE}/deploymentBase/") and state.deployment is not None:
                self._send(200, json.dumps(state.deployment).encode())
            elif path.startswith(f"{BASE}/cancelAction/") and state.cancel is not None:
                self._send(200, json.dumps({"id": "c1", "cancelAction": {"stopId": state.cancel}}).encode())
            elif path in state.files:
                self._send(200, state.files[path], "application/octet-stream")
            else:
                self._send(404, b'{"error": "not found"}')

        def _body(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            with state.lock:
                state.requests.append(f"{self.command} {self.path}")
                if self.path.endswith("/configData"):
                    state.config_data.append(body)
                else:
                    state.feedback.append((self.path, body))
            if self._authorized():
                self._send(200, b"{}")

        do_POST = do_PUT = _body  # noqa: N815

    return Handler


@contextmanager
def fake_ddi() -> Iterator[FakeDdi]:
    state = FakeDdi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
