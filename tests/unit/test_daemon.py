"""reflashd end to end: the real daemon in its own process on a temporary Unix socket and a loopback
TCP port, a real HTTP bundle server, real signed bundles and instruction files; reboots recorded."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mkimage.publish import publish
from recovery.core.instruction import read_instruction
from recovery.core.trial import BundleRef, Installed, start_trial, write_fallback
from recovery.updated.cli import main

from .reflashctl_support import STORAGE_DISK, Releases, ServerState, System, http_server
from .reflashd_support import Daemon, running_daemon

NAME = "demo-appliance-2.0.0.bundle"


@pytest.fixture
def bundle(releases: Releases) -> Path:
    return releases.bundles["2.0.0"]


@pytest.fixture
def server(bundle: Path, releases: Releases, tmp_path: Path) -> Iterator[tuple[ServerState, str]]:
    """The bundles and a published feed (2.0.0 newest, with notes) on a loopback HTTP server."""
    out = tmp_path / "published"
    publish([bundle], out, key=releases.pem, notes={"2.0.0": "Faster boot.\nFixes the clock."})
    files = {f"/updates/{p.name}": p.read_bytes() for p in out.iterdir()}
    files[f"/untrusted/{NAME}"] = releases.bundles["untrusted"].read_bytes()
    state = ServerState(files=files)
    with http_server(state) as url:
        yield state, url


@pytest.fixture
def daemon(system: System, server: tuple[ServerState, str]) -> Iterator[Daemon]:
    with running_daemon(system, feed=f"{server[1]}/updates/") as d:
        yield d


def downloaded(daemon: Daemon, source: str) -> dict:
    answer = daemon.call("POST", "/api/download", {"source": source})
    assert answer.status == 202, answer.body
    status = daemon.wait(lambda s: s["operation"] is None)
    assert status["state"] == "downloaded", status
    return status


def test_the_socket_is_root_only_and_answers_status(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    status = daemon.status()
    assert status["state"] == "idle" and status["version"] == "1.0.0" and status["operation"] is None
    token = daemon.system.config.cfg / "reflashctl/daemon-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(daemon.token) >= 40


def test_check_names_the_newest_release_its_notes_and_the_feed(daemon: Daemon, server) -> None:
    answer = daemon.call("POST", "/api/check", {})
    assert answer.status == 200, answer.body
    assert answer.body["newest"]["version"] == "2.0.0" and answer.body["available"] is True
    assert answer.body["newest"]["notes"] == "Faster boot.\nFixes the clock."
    assert answer.body["rss"] == f"{server[1]}/updates/releases.rss"
    bad = daemon.call("POST", "/api/check", {"feed": f"{server[1]}/nothing/"})
    assert bad.status == 422 and bad.body["error"].startswith("rejected: cannot download ")


def test_download_then_install_reboots_now(daemon: Daemon, server, bundle: Path) -> None:
    status = downloaded(daemon, f"{server[1]}/updates/{NAME}")
    assert status["download"]["version"] == "2.0.0" and status["download"]["percent"] == 100
    assert (daemon.system.bundles / NAME).read_bytes() == bundle.read_bytes()
    assert not daemon.system.config.instruction.exists()  # downloaded is not staged
    assert daemon.reboots == []
    answer = daemon.call("POST", "/api/install", {"reboot": "now"})
    assert answer.status == 200, answer.body
    assert answer.body["reboot"] == "now" and answer.body["staged"]["version"] == "2.0.0"
    instruction = read_instruction(daemon.system.config.instruction)
    assert (str(instruction.disk), str(instruction.file)) == (STORAGE_DISK, f"/bundles/{NAME}")
    assert instruction.sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    deadline = time.monotonic() + 5
    while not daemon.reboots and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(daemon.reboots) == 1
    assert daemon.status()["state"] == "staged"


def test_download_of_the_newest_release_from_the_feed(daemon: Daemon) -> None:
    answer = daemon.call("POST", "/api/download", {"latest": True})
    assert answer.status == 202, answer.body
    status = daemon.wait(lambda s: s["operation"] is None)
    assert status["state"] == "downloaded" and status["download"]["version"] == "2.0.0"


def test_a_scheduled_reboot_survives_a_restart_of_the_daemon(daemon: Daemon, server) -> None:
    downloaded(daemon, f"{server[1]}/updates/{NAME}")
    at = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=4)
    answer = daemon.call("POST", "/api/install", {"reboot": at.isoformat()})
    assert answer.status == 200, answer.body
    assert daemon.status()["reboot_at"] == at.isoformat()
    daemon.stop()
    daemon.start()
    assert daemon.reboots == []
    deadline = time.monotonic() + 15
    while not daemon.reboots and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(daemon.reboots) == 1
    assert float(daemon.reboots[0].split()[-1]) >= at.timestamp() - 0.5


def test_cancel_takes_back_the_install_and_discard_keeps_the_fallback(daemon: Daemon, server, releases) -> None:
    system = daemon.system
    fallback = system.bundles / "demo-appliance-1.0.0.bundle"
    system.bundles.mkdir(parents=True, exist_ok=True)
    fallback.write_bytes(releases.bundles["1.0.0"].read_bytes())
    write_fallback(system.config.cfg, BundleRef("1.0.0", STORAGE_DISK, f"/bundles/{fallback.name}",
                                                hashlib.sha256(fallback.read_bytes()).hexdigest()))
    downloaded(daemon, f"{server[1]}/updates/{NAME}")
    at = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat(timespec="seconds")
    assert daemon.call("POST", "/api/install", {"reboot": at}).status == 200
    answer = daemon.call("POST", "/api/cancel", {})
    assert answer.status == 200, answer.body
    assert answer.body["done"] == ["cancelled the staged update to 2.0.0", f"the reboot scheduled for {at} is off"]
    assert not system.config.instruction.exists()
    assert (system.bundles / NAME).is_file()  # downloaded is kept
    status = daemon.status()
    assert status["state"] == "downloaded" and status["reboot_at"] is None
    answer = daemon.call("POST", "/api/cancel", {"discard": True})
    assert answer.body["done"] == [f"removed {NAME}"]
    assert sorted(p.name for p in system.bundles.glob("*.bundle")) == [fallback.name]
    assert daemon.status()["state"] == "idle"
    assert daemon.call("POST", "/api/cancel", {}).body["done"] == ["nothing to cancel"]


def test_one_operation_at_a_time_and_cancel_stops_a_download(daemon: Daemon, server) -> None:
    state, url = server
    state.pause = 0.05  # about 2.5 s for the bundle
    assert daemon.call("POST", "/api/download", {"source": f"{url}/updates/{NAME}"}).status == 202
    for path, body in (("/api/download", {"source": f"{url}/updates/{NAME}"}), ("/api/install", {}),
                       ("/api/confirm", {})):
        answer = daemon.call("POST", path, body)
        assert answer.status == 409, (path, answer.body)
        assert answer.body["error"] == f"rejected: reflashd is busy: the download of {NAME} is running"
    status = daemon.wait(lambda s: (s["download"] or {}).get("done", 0) > 0)
    assert status["state"] == "downloading" and status["download"]["running"] is True
    assert 0 <= status["download"]["percent"] < 100
    answer = daemon.call("POST", "/api/cancel", {})
    assert answer.status == 200 and answer.body["done"][0] == "stopped the download"
    assert daemon.status()["state"] == "idle"
    assert daemon.system.leftovers() == []


def test_a_rejected_bundle_is_422_and_leaves_nothing(daemon: Daemon, server) -> None:
    assert daemon.call("POST", "/api/download", {"source": f"{server[1]}/untrusted/{NAME}"}).status == 202
    status = daemon.wait(lambda s: s["operation"] is None)
    assert status["download"]["phase"] == "failed"
    assert status["download"]["error"].startswith("rejected: ") and "unknown key" in status["download"]["error"]
    assert [p for p in daemon.system.leftovers() if p.endswith((".bundle", ".partial"))] == []
    answer = daemon.call("POST", "/api/install", {"reboot": "now"})
    assert answer.status == 422
    assert answer.body == {"error": "rejected: nothing downloaded: reflashctl download URL (or --latest FEED) first",
                           "kind": "rejected"}
    assert not daemon.system.config.instruction.exists() and daemon.reboots == []


def test_a_downloaded_bundle_changed_on_storage_is_refused_at_install(daemon: Daemon, server) -> None:
    downloaded(daemon, f"{server[1]}/updates/{NAME}")
    path = daemon.system.bundles / NAME
    data = bytearray(path.read_bytes())
    data[-2000] ^= 1
    path.write_bytes(bytes(data))
    answer = daemon.call("POST", "/api/install", {"reboot": "now"})
    assert answer.status == 422 and answer.body["error"].startswith("rejected: ")
    assert not daemon.system.config.instruction.exists() and daemon.reboots == []
    assert daemon.status()["download"]["phase"] == "failed" and not path.exists()


@pytest.mark.parametrize("path, body, words", [
    ("/api/download", {}, "bad request: give either source"),
    ("/api/download", {"source": 3}, "bad request: source must be a str"),
    ("/api/download", b"not json", "bad request: the request body is not JSON"),
    ("/api/download", [1], "bad request: the request body must be a JSON object"),
    ("/api/install", {"reboot": "tomorrow"}, "bad request: bad reboot time 'tomorrow'"),
    ("/api/install", {"reboot": "2001-01-01T00:00:00Z"}, "bad request: reboot time 2001-01-01T00:00:00Z is in the past"),
    ("/api/install", {"reboot": "2099-01-01T00:00:00"}, "bad request: bad reboot time"),
])
def test_bad_input_is_400_with_one_line(daemon: Daemon, path: str, body: object, words: str) -> None:
    answer = daemon.call("POST", path, body)
    assert answer.status == 400, answer.body
    assert answer.body["error"].startswith(words) and "\n" not in answer.body["error"]
    assert daemon.status()["state"] == "idle"


def test_a_restart_in_the_middle_of_a_download_resumes_it(daemon: Daemon, server, bundle: Path) -> None:
    state, url = server
    state.pause = 0.1  # about 5 s for the bundle
    assert daemon.call("POST", "/api/download", {"source": f"{url}/updates/{NAME}"}).status == 202
    daemon.wait(lambda s: (s["download"] or {}).get("done", 0) > 0)
    time.sleep(1.2)  # the progress written at least once more
    daemon.stop(signal.SIGKILL)  # no chance to tidy up: as a power cut would leave it
    partial = daemon.system.bundles / (NAME + ".partial")
    have = partial.stat().st_size
    recorded = json.loads((daemon.system.bundles / "update-state.json").read_text())["download"]
    assert recorded["phase"] == "downloading" and 0 < recorded["done"] <= have < bundle.stat().st_size
    state.pause = 0.0
    daemon.start()
    status = daemon.wait(lambda s: s["state"] == "downloaded")
    assert (daemon.system.bundles / NAME).read_bytes() == bundle.read_bytes()
    ranges = [r.get("range") for r in state.requests if r["path"] == f"/updates/{NAME}"]
    assert ranges == [None, f"bytes={have}-"]
    assert status["download"]["error"] is None


def test_a_stopped_daemon_leaves_the_download_to_its_next_start(daemon: Daemon, server, bundle: Path) -> None:
    state, url = server
    state.pause = 0.05
    assert daemon.call("POST", "/api/download", {"source": f"{url}/updates/{NAME}"}).status == 202
    daemon.wait(lambda s: (s["download"] or {}).get("done", 0) > 0)
    assert daemon.stop() == 0
    state.pause = 0.0
    daemon.start()
    daemon.wait(lambda s: s["state"] == "downloaded")
    assert (daemon.system.bundles / NAME).read_bytes() == bundle.read_bytes()


def test_confirm_outside_a_trial(daemon: Daemon) -> None:
    answer = daemon.call("POST", "/api/confirm", {})
    assert answer.status == 200 and answer.body["message"] == "not on trial: 1.0.0 is confirmed"


def test_the_event_stream_sends_the_status(daemon: Daemon) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    connection.request("GET", f"/api/events?token={daemon.token}")
    response = connection.getresponse()
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    assert response.readline() == b"event: status\n"
    line = response.readline()
    assert line.startswith(b"data: ") and json.loads(line[6:])["state"] == "idle"
    connection.close()


# --- the TCP listener's door ---------------------------------------------------------------------


def test_the_token_is_needed_on_tcp_and_a_wrong_one_changes_nothing(daemon: Daemon, server) -> None:
    source = {"source": f"{server[1]}/updates/{NAME}"}
    for token in (None, "wrong", daemon.token[:-1]):
        for method, path, body in (("GET", "/api/status", None), ("POST", "/api/download", source),
                                   ("POST", "/api/cancel", {}), ("GET", "/api/events", None),
                                   ("GET", "/api/openapi.json", None)):
            answer = daemon.tcp(method, path, body, token=token)
            assert answer.status == 401, (token, path)
            assert answer.body == {"error": "refused: wrong or missing access token (reflashctl token shows it)",
                                   "kind": "error"}
    wrong = daemon.tcp("GET", "/api/events?token=wrong", token=None)
    assert wrong.status == 401
    assert daemon.status()["state"] == "idle" and daemon.system.leftovers() == []
    assert daemon.tcp("GET", "/api/status").status == 200


def test_the_page_is_served_without_a_token_the_api_is_not(daemon: Daemon) -> None:
    page = daemon.tcp("GET", "/", token=None)
    assert page.status == 200 and b"<title>Software update</title>" in page.body
    assert page.headers["x-frame-options"] == "DENY" and "default-src 'self'" in page.headers["content-security-policy"]
    assert "access-control-allow-origin" not in page.headers
    for name, kind in (("update.js", "text/javascript"), ("update.css", "text/css")):
        answer = daemon.tcp("GET", f"/static/{name}", token=None)
        assert answer.status == 200 and answer.headers["content-type"].startswith(kind)
    assert daemon.tcp("GET", "/static/../api.py", token=None).status == 404
    assert daemon.tcp("GET", "/static/index.html", token=None).status == 404


def test_refusals_on_tcp_even_with_the_token(daemon: Daemon, server) -> None:
    source = {"source": f"{server[1]}/updates/{NAME}"}
    get = daemon.tcp("GET", "/api/install")
    assert get.status == 405 and get.body["error"] == "Method Not Allowed: GET /api/install"
    form = daemon.tcp("POST", "/api/download", b"source=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 415 and form.body["error"] == "refused: a POST must be Content-Type: application/json"
    plain = daemon.tcp("POST", "/api/download", json.dumps(source).encode(), headers={"Content-Type": "text/plain"})
    assert plain.status == 415
    other = daemon.tcp("POST", "/api/download", source, headers={"Origin": "http://evil.example"})
    assert other.status == 403 and other.body["error"] == "refused: a request from another site"
    cross = daemon.tcp("GET", "/api/status", headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status == 403
    missing = daemon.tcp("GET", "/api/nothing")
    assert missing.status == 404 and missing.body["error"] == "Not Found: GET /api/nothing"
    assert daemon.status()["state"] == "idle" and daemon.system.leftovers() == []
    same = daemon.tcp("POST", "/api/cancel", {}, headers={"Origin": f"http://127.0.0.1:{daemon.port}"})
    assert same.status == 200


def test_the_tcp_listener_takes_no_local_files(daemon: Daemon, releases: Releases) -> None:
    bundle = str(releases.bundles["2.0.0"])
    for path, body in (("/api/download", {"source": bundle}), ("/api/download", {"source": f"file://{bundle}"}),
                       ("/api/download", {"latest": True, "feed": "/etc"}), ("/api/check", {"feed": "/etc"})):
        answer = daemon.tcp("POST", path, body)
        assert answer.status == 422, (path, body, answer.body)
        assert answer.body["error"].endswith("is a local file: over the network only http and https sources are taken")
    assert daemon.status()["state"] == "idle" and daemon.system.leftovers() == []
    # The root-only socket takes them, as reflashctl does.
    assert daemon.call("POST", "/api/download", {"source": bundle}).status == 202
    assert daemon.wait(lambda s: s["operation"] is None)["state"] == "downloaded"


# --- reflashctl with the daemon ------------------------------------------------------------------


def reflashctl(system: System, capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", str(system.config_path), *argv], reboot=lambda: pytest.fail("the CLI rebooted"))
    out, err = capsys.readouterr()
    return code, out, err


def test_reflashctl_sends_its_operations_to_the_daemon(daemon: Daemon, server, capsys) -> None:
    system = daemon.system
    code, out, err = reflashctl(system, capsys, "download", f"{server[1]}/updates/{NAME}")
    assert code == 0, err
    assert out.splitlines()[-1] == f"downloaded 2.0.0 ({NAME}): reflashctl install installs it"
    code, out, err = reflashctl(system, capsys, "status")
    assert "state: downloaded 2.0.0" in out.splitlines()
    assert f"download: 2.0.0 downloaded ({NAME}): reflashctl install installs it" in out.splitlines()
    code, out, err = reflashctl(system, capsys, "install", "--no-reboot")
    assert code == 0, err
    assert out == "staged demo-appliance 2.0.0: installed at the next reboot\n"
    assert system.config.instruction.exists() and daemon.reboots == []
    code, out, err = reflashctl(system, capsys, "download", f"{server[1]}/updates/{NAME}")
    assert (code, err) == (1, "rejected: an update is staged: cancel it first (reflashctl cancel) to download another\n")
    code, out, err = reflashctl(system, capsys, "cancel", "--discard")
    assert (code, out) == (0, f"cancelled the staged update to 2.0.0\nremoved {NAME}\n")
    assert not system.config.instruction.exists() and system.leftovers() == []
    code, out, err = reflashctl(system, capsys, "token")
    assert out.strip() == daemon.token


def test_reflashctl_install_with_a_source_through_the_daemon(daemon: Daemon, server, capsys) -> None:
    code, out, err = reflashctl(daemon.system, capsys, "install", "--latest", f"{server[1]}/updates/")
    assert code == 0, err
    assert out.splitlines()[-1] == "staged demo-appliance 2.0.0: rebooting into the recovery to install it"
    deadline = time.monotonic() + 5
    while not daemon.reboots and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(daemon.reboots) == 1


def test_reflashctl_reports_the_daemons_refusal(daemon: Daemon, server, capsys) -> None:
    code, out, err = reflashctl(daemon.system, capsys, "download", f"{server[1]}/untrusted/{NAME}")
    assert code == 1 and err.startswith("rejected: ") and "unknown key" in err and len(err.splitlines()) == 1


# --- reflashctl without the daemon ---------------------------------------------------------------


def test_download_install_cancel_without_the_daemon(system: System, server, capsys) -> None:
    code, out, err = reflashctl(system, capsys, "download", f"{server[1]}/updates/{NAME}")
    assert code == 0, err
    assert out.splitlines()[-1] == f"downloaded demo-appliance 2.0.0 ({NAME}): reflashctl install installs it"
    code, out, err = reflashctl(system, capsys, "install", "--no-reboot")
    assert code == 0, err
    assert read_instruction(system.config.instruction).version == "2.0.0"
    code, out, err = reflashctl(system, capsys, "cancel")
    assert out == "cancelled the staged update to 2.0.0\n" and not system.config.instruction.exists()
    code, out, err = reflashctl(system, capsys, "install", "--no-reboot", "--reboot-at", "2099-01-01T00:00Z")
    assert (code, err) == (1, "rejected: --reboot-at needs reflashd running: it keeps the time and reboots\n")


def test_status_reads_a_broken_off_download_without_the_daemon(system: System, server, capsys) -> None:
    state, url = server
    state.cut_after = 1024 * 1024
    code, out, err = reflashctl(system, capsys, "download", f"{url}/updates/{NAME}")
    assert code == 1 and err.startswith("failed: download of ") and "interrupted" in err
    code, out, err = reflashctl(system, capsys, "status")
    lines = out.splitlines()
    assert lines[1].startswith(f"state: downloading {NAME} 33% (1.0/3.0 MiB), stopped")
    assert any(line.startswith(f"download: {NAME} stopped at 33%") and line.endswith(
        f"reflashctl download {url}/updates/{NAME} resumes it") for line in lines), lines
    code, out, err = reflashctl(system, capsys, "download", f"{url}/updates/{NAME}")
    assert code == 0, err
    assert [r.get("range") for r in state.requests if r["path"].endswith(NAME)] == [None, "bytes=1048576-"]


def test_reflashctl_token_is_made_once_and_root_only(system: System, capsys) -> None:
    first = reflashctl(system, capsys, "token")[1]
    second = reflashctl(system, capsys, "token")[1]
    assert first == second and len(first.strip()) >= 40
    path = system.config.cfg / "reflashctl/daemon-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_status_names_a_trial_and_a_broken_record(system: System, capsys) -> None:
    (system.root / "etc/os-release").write_text('VERSION_ID="2.0.0"\n')
    Installed(BundleRef("2.0.0", STORAGE_DISK, f"/bundles/{NAME}", "0" * 64), from_version="1.0.0").write(system.config.cfg)
    start_trial(system.config.cfg, 3)
    code, out, err = reflashctl(system, capsys, "status")
    assert code == 0, err
    assert out.splitlines()[1] == "state: on trial 2.0.0 (on trial, not booted yet (at most 3 boots))"
    system.bundles.mkdir(parents=True)
    (system.bundles / "update-state.json").write_text('{"download": {"phase": "downloaded"}, "reboot_at": null}')
    code, out, err = reflashctl(system, capsys, "status")
    assert code == 0, err
    assert any(line.startswith("download: unreadable record: ") and "reflashctl cancel --discard" in line
               for line in out.splitlines()), out
    code, out, err = reflashctl(system, capsys, "install", "--no-reboot")
    assert code == 1 and err.startswith("rejected: ") and "is unreadable" in err
    code, out, err = reflashctl(system, capsys, "cancel")
    assert code == 0 and "is unreadable" in out, (out, err)
    code, out, err = reflashctl(system, capsys, "cancel", "--discard")
    assert code == 0, err
    assert not (system.bundles / "update-state.json").exists()


def test_the_daemon_starts_beside_an_unreadable_record(system: System, server) -> None:
    system.bundles.mkdir(parents=True)
    (system.bundles / "update-state.json").write_text("garbage")
    with running_daemon(system) as daemon:
        status = daemon.status()
        assert status["state"] == "idle" and "is unreadable" in status["download_error"]
        assert daemon.call("POST", "/api/cancel", {"discard": True}).status == 200
        assert daemon.status()["download_error"] is None
