"""The fleet client (reflash-fleet) against a real gooseBit on the loopback (tests/unit/goosebit_support.py),
and against a tiny fake DDI server for what gooseBit does not do (cancelAction, maintenance windows) or
must not do (garbage). Real signed bundles, real instructions on a fake cfg; the reboot is a recorder,
and the recovery's verdict is written by the test as the recovery would write it."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from recovery.core.errors import Failed
from recovery.core.instruction import read_instruction
from recovery.core.result import Outcome, Result, now, write_result
from recovery.core.trial import end_trial, start_trial
from recovery.updated import fleet as fleet_module
from recovery.updated import fleetstate
from recovery.updated.ddi import Garbage, Refused, Unreachable, parse_sleep
from recovery.updated.fleet import Backoff, Fleet
from recovery.updated.fleetstate import Step, Verdict, read_record
from recovery.updated.operations import Operations
from recovery.updated.sysconfig import SystemConfig
from recovery.updated.updater import Updater

from .fake_ddi import BASE, DEVICE, TOKEN, FakeDdi, fake_ddi
from .goosebit_support import Goosebit, goosebit
from .reflashctl_support import PRODUCT, Releases, System, refused_url


class Reboots:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def configure(system: System, server: str, device: str | None, token: str, *, hardware: str = "default") -> SystemConfig:
    """[fleet] in the system's config and the token in its root-only file on cfg (`device` None: no
    controller_id, the id is the one in controller_id_file on cfg, as an image built with [fleet] has)."""
    token_file = system.root / "cfg/reflashctl/fleet-token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    device_line = (f'controller_id = "{device}"' if device is not None
                   else f'controller_id_file = "{system.root / "cfg/reflashctl/fleet-controller-id"}"')
    with open(system.config_path, "a") as f:
        f.write(f'\n[fleet]\nserver = "{server}"\n{device_line}\ntoken_file = "{token_file}"\n'
                f'hardware = "{hardware}"\ntimeout = 5\nprogress_interval = 0.05\nretry_max = 60\n')
    return SystemConfig.load(system.config_path)


def client(config: SystemConfig, tmp_path: Path, reboot: Reboots | None = None) -> Fleet:
    return Fleet(config, reboot=reboot or Reboots(), status_path=tmp_path / "fleet-status.json",
                 rng=random.Random(7))


def recovery_installs(system: System, version: str = "2.0.0", *, on_trial: bool = False) -> None:
    """What the recovery leaves after installing the staged bundle, and the trial after it."""
    system.config.instruction.unlink()
    write_result(system.config.cfg, Result(Outcome.installed, from_version="1.0.0", to_version=version,
                                           finished=now(), seconds={"extracting": 3.0}))
    (system.root / "etc/os-release").write_text(f'NAME="Demo"\nVERSION_ID="{version}"\n')
    if on_trial:
        start_trial(system.config.cfg, 3)
    else:
        end_trial(system.config.cfg)


# --- against gooseBit ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, releases: Releases) -> Iterator[Goosebit]:
    with goosebit(tmp_path_factory.mktemp("goosebit")) as g:
        yield g


@pytest.fixture(scope="module")
def software(server: Goosebit, releases: Releases) -> int:
    return server.upload(releases.bundles["2.0.0"])


def token_for(name: str) -> str:
    return "tok-" + hashlib.sha256(name.encode()).hexdigest()[:24]  # gooseBit keeps at most 32 characters


def device_name(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("test_", "")[:40].replace("_", "-")


def test_registration_and_config_data(server: Goosebit, system: System, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    name = device_name(request)
    server.add_device(name, token_for(name), software="latest")
    fleet = client(configure(system, server.url + "/", name, token_for(name), hardware="rev-a"), tmp_path)
    assert fleet.cycle() == 10.0  # gooseBit's wait while it registers a device
    assert fleet.cycle() == 1.0  # then its GOOSEBIT_POLL_TIME
    device = server.device(name)
    assert device["sw_version"] == "1.0.0"
    assert device["hardware"] == {"id": device["hardware"]["id"], "model": PRODUCT, "revision": "rev-a"}
    assert device["last_state"] == "Registered"
    assert read_record(system.config.cfg) is None  # nothing for rev-a: no deployment


def test_deployment_end_to_end_and_the_verdict_reported_once(
    server: Goosebit, software: int, system: System, tmp_path: Path, releases: Releases,
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = device_name(request)
    server.add_device(name, token_for(name))
    config = configure(system, server.url, name, token_for(name))
    reboot = Reboots()
    fleet = client(config, tmp_path, reboot)
    fleet.cycle()  # registers: configData 1.0.0
    fleet.cycle()  # the deployment: download, verify, stage, reboot
    assert reboot.count == 1
    bundle = releases.bundles["2.0.0"]
    instruction = read_instruction(system.config.instruction)
    assert (instruction.version, str(instruction.file)) == ("2.0.0", f"/bundles/{bundle.name}")
    assert instruction.sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert (system.bundles / bundle.name).read_bytes() == bundle.read_bytes()
    record = read_record(system.config.cfg)
    assert record is not None and (record.action, record.step) == (str(software), Step.staged)
    device = server.device(name)
    assert device["last_state"] == "Running" and device["sw_version"] == "1.0.0"
    lines = server.device_log(name).splitlines()
    assert lines[0] == f"downloading {bundle.name}"
    assert "downloaded and verified 2.0.0" in lines
    assert lines[-1] == "staged 2.0.0: rebooting into the recovery to install it"

    # After the reboot: installed, but on trial. No verdict yet, and the old version stays reported.
    recovery_installs(system, on_trial=True)
    after = client(SystemConfig.load(system.config_path), tmp_path)
    after.cycle()
    assert read_record(system.config.cfg).step == Step.staged  # type: ignore[union-attr]
    assert server.device(name)["last_state"] == "Running"

    # Confirmed. The client reports, then dies before it records that it did (a power cut) ...
    end_trial(system.config.cfg)
    real_write = fleetstate.write_record

    def cut_after_reporting(cfg: Path, record: fleetstate.FleetRecord | None) -> None:
        if record is not None and record.step == Step.closed:
            raise Failed("power cut")
        real_write(cfg, record)

    monkeypatch.setattr(fleet_module, "write_record", cut_after_reporting)
    with pytest.raises(Failed, match="power cut"):
        client(SystemConfig.load(system.config_path), tmp_path).cycle()
    monkeypatch.setattr(fleet_module, "write_record", real_write)
    assert read_record(system.config.cfg).step == Step.closing  # type: ignore[union-attr]

    # ... and its next start sees that the server has the verdict: it is not sent again.
    restarted = client(SystemConfig.load(system.config_path), tmp_path)
    restarted.cycle()
    restarted.cycle()
    record = read_record(system.config.cfg)
    assert record is not None and (record.step, record.verdict) == (Step.closed, Verdict.success)
    device = server.device(name)
    assert (device["last_state"], device["sw_version"], device["progress"]) == ("Finished", "2.0.0", 100)
    finals = [line for line in server.device_log(name).splitlines() if "confirmed" in line]
    assert len(finals) == 1 and finals[0].startswith("installed 1.0.0 -> 2.0.0 in 3 s")


def test_a_rolled_back_release_is_a_failure_with_its_reason(
    server: Goosebit, software: int, system: System, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    name = device_name(request)
    server.add_device(name, token_for(name))
    config = configure(system, server.url, name, token_for(name))
    fleet = client(config, tmp_path)
    fleet.cycle()
    fleet.cycle()
    assert system.config.instruction.exists()
    system.config.instruction.unlink()
    reason = "2.0.0 did not confirm within 3 boots: boot 3: health check 50-app failed (exit status 3): app down"
    write_result(system.config.cfg, Result(Outcome.rolled_back, reason=reason, from_version="2.0.0",
                                           to_version="1.0.0", finished=now()))
    client(SystemConfig.load(system.config_path), tmp_path).cycle()
    device = server.device(name)
    assert (device["last_state"], device["sw_version"]) == ("Error", "1.0.0")
    assert server.device_log(name).splitlines()[-1].startswith(f"rolled back from 2.0.0 to 1.0.0 on ")
    assert server.device_log(name).splitlines()[-1].endswith(reason)


def test_a_corrupt_artifact_is_a_failure_with_the_rejection(
    server: Goosebit, system: System, tmp_path: Path, releases: Releases, request: pytest.FixtureRequest,
) -> None:
    name = device_name(request)
    corrupt = tmp_path / releases.bundles["2.0.0"].name
    data = bytearray(releases.bundles["2.0.0"].read_bytes())
    data[len(data) // 2] ^= 0x01  # in the payload: the signed manifest stays intact
    corrupt.write_bytes(data)
    server.upload(corrupt, hw_revision="corrupt")
    server.add_device(name, token_for(name))
    reboot = Reboots()
    fleet = client(configure(system, server.url, name, token_for(name), hardware="corrupt"), tmp_path, reboot)
    fleet.cycle()
    fleet.cycle()
    assert reboot.count == 0 and not system.config.instruction.exists()
    assert system.leftovers() == ["update-state.json"]  # the failed download's record; no bundle, no partial
    assert server.device(name)["last_state"] == "Error"
    assert server.device_log(name).splitlines()[-1].startswith("rejected: payload sha256 mismatch")
    assert read_record(system.config.cfg).verdict == Verdict.failure  # type: ignore[union-attr]


def test_a_wrong_token_is_one_line_and_a_backoff(
    server: Goosebit, system: System, tmp_path: Path, request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = device_name(request)
    server.add_device(name, token_for(name))
    fleet = client(configure(system, server.url, name, "wrong-secret-token"), tmp_path)
    with caplog.at_level(logging.DEBUG):
        waits = [fleet.cycle() for _ in range(4)]
    assert 5 <= waits[0] <= 10 and 10 <= waits[1] <= 20 and 20 <= waits[2] <= 40 and 30 <= waits[3] <= 60
    status = json.loads((tmp_path / "fleet-status.json").read_text())
    assert "HTTP 401: the server refuses this device's token" in status["problem"]
    assert "wrong-secret-token" not in caplog.text and "wrong-secret-token" not in repr(fleet.controller)
    assert server.device(name)["last_state"] == "Unknown"  # it never got in


# --- against nothing, and against the fake ----------------------------------------------------------


def test_a_server_that_is_down_backs_off_to_the_cap_and_leaves_local_updates_alone(
    system: System, tmp_path: Path, releases: Releases,
) -> None:
    url = refused_url().rsplit("/", 1)[0]
    fleet = client(configure(system, url, DEVICE, TOKEN), tmp_path)
    waits = [fleet.cycle() for _ in range(8)]
    for i, wait in enumerate(waits):  # 10 s, 20 s, 40 s, then retry_max (60 s), each 50-100 % of it
        assert 0.5 * min(60, 10 * 2**i) <= wait <= min(60, 10 * 2**i)
    assert "Connection refused" in json.loads((tmp_path / "fleet-status.json").read_text())["problem"]
    # The operation lock is not held between contacts: a local install goes ahead.
    staged = Updater(fleet.config, progress=False).install(str(releases.bundles["2.0.0"]))
    assert staged.version == "2.0.0"


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(cap=100, rng=random.Random(1))
    waits = [b.failed() for _ in range(12)]
    assert all(w <= 100 for w in waits) and waits[-1] >= 50 and len(set(waits)) == len(waits)
    b.succeeded()
    assert b.failed() <= 10


@pytest.fixture
def fake(system: System, tmp_path: Path) -> Iterator[tuple[FakeDdi, Fleet]]:
    with fake_ddi() as ddi:
        yield ddi, client(configure(system, ddi.url, DEVICE, TOKEN), tmp_path)


def offer(ddi: FakeDdi, bundle: Path, action: str = "7", **kw: object) -> None:
    ddi.files["/artifacts/" + bundle.name] = bundle.read_bytes()
    ddi.deploy(action, "/artifacts/" + bundle.name, bundle.stat().st_size,
               sha256=hashlib.sha256(bundle.read_bytes()).hexdigest(), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("garbage", [b"<html>oops</html>", b"[]", b'{"config": {"polling": {"sleep": "soon"}}}',
                                     b'{"config": {"polling": {"sleep": "00:01:00"}}, "_links": {"deploymentBase": '
                                     b'{"href": "http://elsewhere.example/DEFAULT/controller/v1/dev-fake/x"}}}'])
def test_garbage_is_refused_with_a_backoff(fake: tuple[FakeDdi, Fleet], garbage: bytes) -> None:
    ddi, fleet = fake
    ddi.raw_base = garbage
    assert 5 <= fleet.cycle() <= 10
    assert fleet.backoff.failures == 1
    assert [r for r in ddi.requests if "elsewhere" in r] == []


def test_a_garbage_deployment_document() -> None:
    with pytest.raises(Garbage):
        parse_sleep("1:00")
    assert parse_sleep("00:00:00") == 1.0 and parse_sleep("999:00:00") == 24 * 3600


def test_a_404_artifact_is_a_failure_without_retries(fake: tuple[FakeDdi, Fleet], releases: Releases) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"])
    del ddi.files["/artifacts/" + releases.bundles["2.0.0"].name]
    fleet.cycle()
    assert ddi.executions() == ["proceeding/none", "closed/failure"]
    assert ddi.details()[-1].startswith("rejected: cannot download") and "HTTP 404" in ddi.details()[-1]
    fleet.cycle()  # the fake still offers it: it is not tried again
    assert ddi.executions() == ["proceeding/none", "closed/failure"]


def test_a_sha256_the_server_gives_is_checked(fake: tuple[FakeDdi, Fleet], releases: Releases) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"])
    ddi.deployment["deployment"]["chunks"][0]["artifacts"][0]["hashes"]["sha256"] = "0" * 64  # type: ignore[index]
    fleet.cycle()
    assert ddi.executions()[-1] == "closed/failure" and "sha256" in ddi.details()[-1]
    assert not fleet.config.instruction.exists()


def test_download_only_and_the_maintenance_window(fake: tuple[FakeDdi, Fleet], releases: Releases) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"], update="skip")
    fleet.cycle()
    assert ddi.executions() == ["proceeding/none", "downloaded/none"]
    assert not fleet.config.instruction.exists() and fleet.reboot.count == 0  # type: ignore[attr-defined]
    offer(ddi, releases.bundles["2.0.0"], window="unavailable")
    fleet.cycle()
    fleet.cycle()  # `scheduled` once, not at every poll
    assert ddi.executions() == ["proceeding/none", "downloaded/none", "scheduled/none"]
    assert not fleet.config.instruction.exists()
    offer(ddi, releases.bundles["2.0.0"], window="available")
    fleet.cycle()
    assert fleet.config.instruction.exists() and fleet.reboot.count == 1  # type: ignore[attr-defined]
    assert ddi.executions()[-1] == "proceeding/none"  # not downloaded again: staged, final after the reboot


def test_download_skip_does_nothing(fake: tuple[FakeDdi, Fleet], releases: Releases) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"], download="skip")
    fleet.cycle()
    assert ddi.executions() == [] and ddi.config_data[0]["data"]["sw_version"] == "1.0.0"


def test_cancel_before_the_instruction_takes_the_download_back(fake: tuple[FakeDdi, Fleet], releases: Releases) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"], update="skip")
    fleet.cycle()
    assert (fleet.config.bundle_dir / releases.bundles["2.0.0"].name).exists()
    ddi.cancel = "7"
    fleet.cycle()
    assert ddi.executions("cancelAction") == ["closed/success"]
    assert [p for p, _ in ddi.feedback if "/cancelAction/" in p] == [f"{BASE}/cancelAction/c1/feedback"]
    assert not (fleet.config.bundle_dir / releases.bundles["2.0.0"].name).exists()
    assert read_record(fleet.config.cfg) is None
    assert Operations(Updater(fleet.config)).state().download is None


def test_cancel_after_the_instruction_is_refused(fake: tuple[FakeDdi, Fleet], releases: Releases) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"])
    fleet.cycle()
    assert fleet.config.instruction.exists()
    ddi.cancel = "7"
    fleet.cycle()
    assert ddi.executions("cancelAction") == ["rejected/failure"]
    assert "can no longer be cancelled" in ddi.details()[-1]
    assert fleet.config.instruction.exists()


def test_a_cancel_during_the_download_stops_it(fake: tuple[FakeDdi, Fleet], releases: Releases,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"])
    ticks = iter(range(0, 10**6))
    fleet.clock = lambda: float(next(ticks))  # every chunk is "a while later": the watch looks every time
    real = fleet._while_downloading

    def then_cancel(action: str) -> object:
        ddi.cancel = "7"
        return real(action)

    monkeypatch.setattr(fleet, "_while_downloading", then_cancel)
    fleet.cycle()
    assert ddi.executions("cancelAction") == ["closed/success"]
    assert ddi.executions(progress=True) == ["proceeding/none", "proceeding/none+progress"]
    assert not fleet.config.instruction.exists() and [p for p in fleet.config.bundle_dir.iterdir()
                                                      if p.name.endswith((".bundle", ".partial"))] == []


def test_the_token_file_must_be_root_only(system: System, tmp_path: Path) -> None:
    config = configure(system, "http://127.0.0.1:9", DEVICE, TOKEN)
    assert config.fleet is not None
    config.fleet.token_file.chmod(0o644)
    fleet = client(config, tmp_path)
    with pytest.raises(Exception, match="readable by others"):
        fleet.cycle()


def test_errors_are_the_right_kinds() -> None:
    assert issubclass(Refused, Failed) and issubclass(Unreachable, Failed) and issubclass(Garbage, Failed)


def test_status_command(system: System, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configure(system, "http://127.0.0.1:9", DEVICE, TOKEN)
    assert fleet_module.main(["--config", str(system.config_path), "status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"server: http://127.0.0.1:9 tenant DEFAULT as {DEVICE}\naction: none")
    assert TOKEN not in out


def test_without_a_controller_id_the_client_is_the_device_named_on_cfg(
        system: System, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An image built with [fleet] names no device: each appliance's id is on cfg (provisioned, or made
    once from its first machine id: FleetConfig.device_id), and the client reports as that device."""
    with fake_ddi() as ddi:
        config = configure(system, ddi.url, None, TOKEN)
        id_file = system.root / "cfg/reflashctl/fleet-controller-id"
        assert fleet_module.main(["--config", str(system.config_path), "status"]) == 0
        assert f"as the id it makes in {id_file} at its first contact" in capsys.readouterr().out
        id_file.write_text(DEVICE + "\n")
        client(config, tmp_path).cycle()
        assert ddi.requests == [f"GET {BASE}", f"PUT {BASE}/configData"]
    assert fleet_module.main(["--config", str(system.config_path), "status"]) == 0
    assert capsys.readouterr().out.startswith(f"server: {ddi.url} tenant DEFAULT as {DEVICE}\n")


def test_a_cut_between_the_instruction_and_its_record(fake: tuple[FakeDdi, Fleet], releases: Releases,
                                                      system: System) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"], update="skip")
    fleet.cycle()
    fleet.ops.install()  # the instruction is written, and the client dies before it records it
    assert read_record(system.config.cfg).step == Step.downloaded  # type: ignore[union-attr]
    offer(ddi, releases.bundles["2.0.0"])
    restarted = client(SystemConfig.load(system.config_path), fleet.status_path.parent)
    restarted.cycle()
    assert read_record(system.config.cfg).step == Step.staged  # type: ignore[union-attr]
    assert restarted.reboot.count == 0  # type: ignore[attr-defined]  # (the cut was before the reboot: it is the next boot)
    recovery_installs(system)
    restarted.cycle()
    assert ddi.executions() == ["proceeding/none", "downloaded/none", "closed/success"]


def test_an_instruction_taken_back_on_the_appliance_is_a_failure(fake: tuple[FakeDdi, Fleet], releases: Releases,
                                                                 system: System) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"])
    fleet.cycle()
    assert fleet.config.instruction.exists()
    Operations(Updater(fleet.config)).cancel()  # reflashctl cancel, before the reboot
    fleet.cycle()
    assert ddi.executions()[-1] == "closed/failure"
    assert ddi.details()[-1] == "the staged update to 2.0.0 was cancelled on the appliance"


def test_an_update_staged_on_the_appliance_goes_first(fake: tuple[FakeDdi, Fleet], releases: Releases) -> None:
    ddi, fleet = fake
    Updater(fleet.config, progress=False).install(str(releases.bundles["1.10.0"]))
    offer(ddi, releases.bundles["2.0.0"])
    fleet.cycle()
    assert ddi.executions() == [] and read_instruction(fleet.config.instruction).version == "1.10.0"


def test_a_download_replaced_locally_is_fetched_again(fake: tuple[FakeDdi, Fleet], releases: Releases) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"], update="skip")
    fleet.cycle()
    fleet.ops.download(str(releases.bundles["1.10.0"]))  # the operator downloads another release
    offer(ddi, releases.bundles["2.0.0"])
    fleet.cycle()
    assert read_instruction(fleet.config.instruction).version == "2.0.0"
    assert ddi.executions() == ["proceeding/none", "downloaded/none", "proceeding/none", "downloaded/none",
                                "proceeding/none"]


def test_hostile_ids_and_links_are_garbage_and_never_printed_raw(fake: tuple[FakeDdi, Fleet]) -> None:
    ddi, fleet = fake
    ddi.cancel = "7/../../x\x1b[2J"
    assert 5 <= fleet.cycle() <= 10
    assert ddi.executions("cancelAction") == []
    assert "not a plain name" in json.loads(fleet.status_path.read_text())["problem"]
    ddi.cancel = None
    ddi.raw_base = json.dumps({"config": {"polling": {"sleep": "00:00:01"}}, "_links": {"deploymentBase": {
        "href": f"{ddi.url}/DEFAULT/controller/v1/{DEVICE}/deploymentBase/\x1b[2J"}}}).encode()
    fleet.cycle()
    assert "a link with spaces, control or non-ASCII characters refused" in json.loads(
        fleet.status_path.read_text())["problem"]


def test_the_command_once_and_without_fleet(fake: tuple[FakeDdi, Fleet], releases: Releases, system: System,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ddi, fleet = fake
    offer(ddi, releases.bundles["2.0.0"])
    reboot = Reboots()
    assert fleet_module.main(["--config", str(system.config_path), "once"], reboot=reboot) == 0
    assert reboot.count == 1 and fleet.config.instruction.exists()
    assert fleet_module.main(["--config", str(system.config_path), "status"]) == 0
    assert "action 7: staged 2.0.0" in capsys.readouterr().out
    bare = system.root / "etc/bare.toml"
    bare.write_text(system.config_path.read_text().split("\n[fleet]")[0])
    assert fleet_module.main(["--config", str(bare), "run"]) == 0
    assert "no [fleet] in the system configuration: nothing to do" in capsys.readouterr().out
