"""Fetching bundles: sources, resume with Range against a real HTTP server, and what a failure leaves."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from recovery.updated.source import Scheme, Source
from recovery.updated.transfer import Interrupted, download, fetch
from recovery.core.errors import Rejected

from .reflashctl_support import ServerState, http_server, refused_url, self_signed

BODY = os.urandom(2 * 1024 * 1024 + 5)
PLENTY = lambda _path: 1 << 40  # noqa: E731 - a free-space function for tests that are not about space


def test_source_forms() -> None:
    s = Source.parse("https://updates.example.com/demo/demo-2.0.0.bundle?x=1")
    assert s.scheme == Scheme.https and s.path is None and s.name == "demo-2.0.0.bundle"
    assert Source.parse("http://h/a%20b.bundle").name == "a b.bundle"
    f = Source.parse("file:///srv/x.bundle")
    assert f.scheme == Scheme.file and f.path == Path("/srv/x.bundle") and f.name == "x.bundle"
    assert Source.parse("relative/y.bundle").path == Path("relative/y.bundle")
    assert Source.parse("http://h/dir/releases.json").join("z.bundle").url == "http://h/dir/z.bundle"
    assert Source.parse("/srv/feed/releases.json").join("z.bundle").path == Path("/srv/feed/z.bundle")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("ftp://h/x.bundle", "unsupported source"),
        ("file://otherhost/x.bundle", "names another host"),
        ("http:///x.bundle", "has no host"),
        ("", "empty source"),
    ],
)
def test_bad_sources_are_rejected(text: str, reason: str) -> None:
    with pytest.raises(Rejected, match=reason):
        Source.parse(text)


@pytest.mark.parametrize("url", ["http://h/", "http://h/dir/.hidden"])
def test_a_source_must_end_in_a_plain_file_name(url: str) -> None:
    with pytest.raises(Rejected, match="cannot tell a file name"):
        _ = Source.parse(url).name


def test_download_whole(tmp_path: Path) -> None:
    state = ServerState(files={"/b.bundle": BODY})
    with http_server(state) as url:
        t = download(Source.parse(url + "/b.bundle"), tmp_path / "b.bundle.partial", free=PLENTY, progress=False)
    assert t.path.read_bytes() == BODY and t.size == len(BODY) and t.received == len(BODY)
    assert "range" not in state.requests[0]


def test_download_over_https_with_a_trusted_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))  # the system's trust store, as an operator would extend it
    state = ServerState(files={"/b.bundle": BODY})
    with http_server(state, tls=tls) as url:
        assert url.startswith("https://")
        t = download(Source.parse(url + "/b.bundle"), tmp_path / "b.bundle.partial", free=PLENTY, progress=False)
    assert t.path.read_bytes() == BODY


def test_https_with_an_untrusted_certificate_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "nothing-trusted.pem"))
    state = ServerState(files={"/b.bundle": BODY})
    with http_server(state, tls=tls) as url, pytest.raises(Rejected) as caught:
        download(Source.parse(url + "/b.bundle"), tmp_path / "b.bundle.partial", free=PLENTY, progress=False)
    assert "certificate verify failed" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "b.bundle.partial").exists() and state.requests == []


def test_resume_after_a_dropped_connection(tmp_path: Path) -> None:
    cut = 700_001
    state = ServerState(files={"/b.bundle": BODY}, cut_after=cut)
    partial = tmp_path / "b.bundle.partial"
    with http_server(state) as url:
        source = Source.parse(url + "/b.bundle")
        with pytest.raises(Interrupted, match=r"interrupted after 0.7 of 2.0 MiB: connection closed early; run the same command again to resume"):
            download(source, partial, free=PLENTY, progress=False)
        assert partial.stat().st_size == cut  # kept, to resume
        t = download(source, partial, free=PLENTY, progress=False)
    assert [r.get("range") for r in state.requests] == [None, f"bytes={cut}-"]
    assert t.resumed_at == cut and t.received == len(BODY) - cut
    assert partial.read_bytes() == BODY


def test_a_server_that_ignores_range_is_read_from_the_start(tmp_path: Path) -> None:
    partial = tmp_path / "b.bundle.partial"
    partial.write_bytes(b"stale bytes of something else")
    state = ServerState(files={"/b.bundle": BODY}, honour_range=False)
    with http_server(state) as url:
        t = download(Source.parse(url + "/b.bundle"), partial, free=PLENTY, progress=False)
    assert state.requests[0]["range"] == f"bytes={len(b'stale bytes of something else')}-"
    assert t.resumed_at == 0 and partial.read_bytes() == BODY


def test_a_complete_partial_file_is_not_fetched_again(tmp_path: Path) -> None:
    partial = tmp_path / "b.bundle.partial"
    partial.write_bytes(BODY)
    state = ServerState(files={"/b.bundle": BODY})
    with http_server(state) as url:
        t = download(Source.parse(url + "/b.bundle"), partial, free=PLENTY, progress=False)
    assert t.received == 0 and partial.read_bytes() == BODY


def test_a_partial_file_longer_than_the_source_starts_over(tmp_path: Path) -> None:
    partial = tmp_path / "b.bundle.partial"
    partial.write_bytes(BODY + b"more")
    state = ServerState(files={"/b.bundle": BODY})
    with http_server(state) as url:
        download(Source.parse(url + "/b.bundle"), partial, free=PLENTY, progress=False)
    assert [r.get("range") for r in state.requests] == [f"bytes={len(BODY) + 4}-", None]
    assert partial.read_bytes() == BODY


def test_not_found_leaves_nothing_even_an_older_partial(tmp_path: Path) -> None:
    partial = tmp_path / "b.bundle.partial"
    partial.write_bytes(b"from an earlier try")
    with http_server(ServerState()) as url:
        with pytest.raises(Rejected, match=r"cannot download http://127.0.0.1:\d+/b.bundle: HTTP 404 Not Found"):
            download(Source.parse(url + "/b.bundle"), partial, free=PLENTY, progress=False)
    assert not partial.exists()


def test_connection_refused_keeps_only_an_older_partial(tmp_path: Path) -> None:
    url = refused_url()
    fresh = tmp_path / "fresh.partial"
    with pytest.raises(Rejected, match="Connection refused"):
        download(Source.parse(url), fresh, free=PLENTY, progress=False)
    assert not fresh.exists()
    older = tmp_path / "older.partial"
    older.write_bytes(b"resumable")
    with pytest.raises(Rejected, match="Connection refused"):
        download(Source.parse(url), older, free=PLENTY, progress=False)
    assert older.read_bytes() == b"resumable"  # the server is down, the bytes are still good


def test_a_server_error_keeps_an_older_partial(tmp_path: Path) -> None:
    partial = tmp_path / "b.bundle.partial"
    partial.write_bytes(BODY[:1000])
    state = ServerState(files={"/b.bundle": BODY}, status_override=503)
    with http_server(state) as url:
        with pytest.raises(Rejected, match="HTTP 503 Service Unavailable"):
            download(Source.parse(url + "/b.bundle"), partial, free=PLENTY, progress=False)
        assert partial.read_bytes() == BODY[:1000]
        state.status_override = None
        download(Source.parse(url + "/b.bundle"), partial, free=PLENTY, progress=False)
    assert partial.read_bytes() == BODY
    assert state.requests[-1]["range"] == "bytes=1000-"


def test_not_enough_space_is_checked_before_downloading(tmp_path: Path) -> None:
    state = ServerState(files={"/b.bundle": BODY})
    partial = tmp_path / "b.bundle.partial"
    with http_server(state) as url:
        with pytest.raises(Rejected, match=r"^not enough space on /storage: need 3 MiB, 1 MiB free$"):
            download(Source.parse(url + "/b.bundle"), partial, where=Path("/storage"),
                     free=lambda _p: 1024 * 1024 + 10, progress=False)
    assert not partial.exists()


def test_resume_needs_space_only_for_the_rest(tmp_path: Path) -> None:
    partial = tmp_path / "b.bundle.partial"
    partial.write_bytes(BODY[: len(BODY) - 1000])
    state = ServerState(files={"/b.bundle": BODY})
    with http_server(state) as url:
        download(Source.parse(url + "/b.bundle"), partial, free=lambda _p: 1000, progress=False)
    assert partial.read_bytes() == BODY


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", mnt], check=True)


def test_a_disk_that_fills_up_midway_leaves_no_partial(tiny_tmpfs: Path) -> None:
    # No Content-Length: the space cannot be checked ahead, so the write itself must fail cleanly.
    state = ServerState(files={"/b.bundle": BODY}, send_length=False)
    partial = tiny_tmpfs / "b.bundle.partial"
    with http_server(state) as url:
        with pytest.raises(Rejected, match=r"^not enough space on /storage: the disk filled up"):
            download(Source.parse(url + "/b.bundle"), partial, where=Path("/storage"), progress=False)
    assert list(tiny_tmpfs.iterdir()) == []


def test_without_content_length_the_stream_is_read_to_its_end(tmp_path: Path) -> None:
    state = ServerState(files={"/b.bundle": BODY}, send_length=False)
    with http_server(state) as url:
        t = download(Source.parse(url + "/b.bundle"), tmp_path / "p", free=PLENTY, progress=False)
    assert t.path.read_bytes() == BODY


def test_copy_a_local_file(tmp_path: Path) -> None:
    src = tmp_path / "x.bundle"
    src.write_bytes(BODY)
    partial = tmp_path / "out" / "x.bundle.partial"
    partial.parent.mkdir()
    partial.write_bytes(b"old junk that must not stay in front")
    download(Source.parse(f"file://{src}"), partial, free=PLENTY, progress=False)
    assert partial.read_bytes() == BODY
    with pytest.raises(Rejected, match="no such file"):
        download(Source.parse(str(tmp_path / "missing.bundle")), tmp_path / "m.partial", free=PLENTY)
    assert not (tmp_path / "m.partial").exists()


def test_fetch_small_documents(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_bytes(b"{}")
    assert fetch(Source.parse(str(tmp_path / "f.json"))) == b"{}"
    with pytest.raises(Rejected, match="larger than"):
        fetch(Source.parse(str(tmp_path / "f.json")), limit=1)
    with http_server(ServerState(files={"/f.json": b"[1]"})) as url:
        assert fetch(Source.parse(url + "/f.json")) == b"[1]"
        with pytest.raises(Rejected, match="HTTP 404"):
            fetch(Source.parse(url + "/g.json"))


def test_a_servers_reason_phrase_reaches_the_message_without_control_characters(tmp_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler

    from .reflashctl_support import _Server

    class Hostile(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(404, "Not\x1b[2J Found")
            self.send_header("Content-Length", "0")
            self.end_headers()

    import threading

    server = _Server(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/b.bundle"
        with pytest.raises(Rejected, match=r"HTTP 404 Not\[2J Found$"):
            download(Source.parse(url), tmp_path / "b.partial", free=PLENTY, progress=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
