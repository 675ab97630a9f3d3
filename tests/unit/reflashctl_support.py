"""Test support for reflashctl, feeds and publishing: real signed bundles, a running system in a tmp
dir, and a real HTTP server on 127.0.0.1 that can drop connections and records what it was asked.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mkimage.bundle import create_bundle, generate_keys
from recovery.updated.sysconfig import SystemConfig

PRODUCT = "demo-appliance"
STORAGE_DISK = "PARTLABEL=storage"
PAYLOAD_BYTES = 3 * 1024 * 1024 + 17  # incompressible: the bundle is large enough to cut midway


@dataclass(frozen=True)
class Releases:
    """Keys and bundles made once per test session."""

    keys: Path  # holds signing.pem and signing.pub: a keyring directory as well
    other_keys: Path  # a key the system does not trust
    bundles: dict[str, Path]  # "1.0.0", "2.0.0", "1.10.0", "1.9.0", "other-product", "untrusted"

    @property
    def pem(self) -> Path:
        return self.keys / "signing.pem"


def make_tree(root: Path, version: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text(f'NAME="Demo"\nVERSION_ID={version}\n')
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/data.bin").write_bytes(random.Random(version).randbytes(PAYLOAD_BYTES))
    return root


def make_releases(base: Path) -> Releases:
    keys, other = base / "keys", base / "other-keys"
    generate_keys(keys)
    generate_keys(other)
    out = base / "bundles"
    out.mkdir()
    bundles: dict[str, Path] = {}
    for version in ("1.0.0", "2.0.0", "1.9.0", "1.10.0"):
        tree = make_tree(base / f"tree-{version}", version)
        bundles[version] = out / f"{PRODUCT}-{version}.bundle"
        create_bundle(tree, bundles[version], key=keys / "signing.pem", product=PRODUCT, version=version, check_boot=False)
    tree = base / "tree-2.0.0"
    bundles["other-product"] = out / "other-product-2.0.0.bundle"
    create_bundle(tree, bundles["other-product"], key=keys / "signing.pem", product="other-product", version="2.0.0", check_boot=False)
    bundles["untrusted"] = out / "untrusted" / f"{PRODUCT}-2.0.0.bundle"
    bundles["untrusted"].parent.mkdir()
    create_bundle(tree, bundles["untrusted"], key=other / "signing.pem", product=PRODUCT, version="2.0.0", check_boot=False)
    return Releases(keys, other, bundles)


@dataclass(frozen=True)
class System:
    """A running system laid out in a tmp dir: config, keys, cfg and storage 'partitions', os-release."""

    root: Path
    config_path: Path
    config: SystemConfig

    @property
    def bundles(self) -> Path:
        return self.config.bundle_dir

    def leftovers(self) -> list[str]:
        """Everything in the bundle directory."""
        if not self.bundles.exists():
            return []
        return sorted(p.name for p in self.bundles.iterdir())


def make_system(root: Path, releases: Releases, *, running: str = "1.0.0") -> System:
    for d in ("cfg", "storage", "etc"):
        (root / d).mkdir(parents=True)
    (root / "etc/os-release").write_text(f'NAME="Demo"\nVERSION_ID="{running}"\n')
    config_path = root / "etc/system.toml"
    config_path.write_text(
        f'product = "{PRODUCT}"\n'
        f'keys = "{releases.keys}"\n'
        f'cfg = "{root / "cfg"}"\n'
        f'storage = "{root / "storage"}"\n'
        f'storage_disk = "{STORAGE_DISK}"\n'
        'bundles = "bundles"\n'
        f'os_release = "{root / "etc/os-release"}"\n'
    )
    return System(root, config_path, SystemConfig.load(config_path))


@dataclass
class ServerState:
    """What the test server serves and how it misbehaves; what it was asked, for assertions."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: int | None = None  # close the first full-body response after this many bytes
    honour_range: bool = True
    send_length: bool = True
    status_override: int | None = None  # answer every request that finds its file with this error
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location of a 302
    pause: float = 0.0  # seconds between 64 KiB pieces of a body: a slow server, for downloads to watch
    requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures anyway
            pass

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            with state.lock:
                state.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                cut, state.cut_after = state.cut_after, None
            if self.path in state.redirects:
                self.send_response(302)
                self.send_header("Location", state.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            if state.status_override is not None:
                self.send_error(state.status_override)
                return
            start = 0
            status = 200
            wanted = self.headers.get("Range")
            if wanted and state.honour_range:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            part = body[start:]
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            if state.send_length:
                self.send_header("Content-Length", str(len(part)))
            else:
                self.send_header("Connection", "close")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if cut is not None:
                self.wfile.write(part[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            if state.pause:
                import time

                for i in range(0, len(part), 64 * 1024):
                    self.wfile.write(part[i:i + 64 * 1024])
                    self.wfile.flush()
                    time.sleep(state.pause)
            else:
                self.wfile.write(part)
            if not state.send_length:
                self.close_connection = True

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up early (a rejected download) is expected here, not an error to print.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def http_server(state: ServerState, *, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """Serve `state` on 127.0.0.1 (a free port) in a thread; yields the base URL.

    `tls`: (certificate, key) PEM files to serve https with."""
    server = _Server(("127.0.0.1", 0), _handler(state))
    if tls is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def refused_url() -> str:
    """A URL on a port nobody listens on: bound, then closed, so the connection is refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.bundle"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key) that nothing trusts unless told to."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "updates test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
