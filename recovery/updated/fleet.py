"""`reflash-fleet`, the appliance as a client of a fleet server (hawkBit's DDI API, ddi.py): poll, take a
deployment through the same operations as `reflashctl` and `reflashd` (download, verify, stage), reboot
into the recovery, and after the reboot report the recovery's verdict, once.

One cycle reads in the order of a deployment: a verdict owed from before the reboot, then the server's
wishes (configData, cancelAction, deploymentBase), then download -> downloaded -> (window) -> install.
Every step is in `fleet.json` on cfg before the feedback that announces it (fleetstate.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from recovery.core.atomic import atomic_write
from recovery.core.cli import add_debug, boundary
from recovery.core.errors import Rejected, UpdateError
from recovery.core.feed import Release
from recovery.core.instruction import read_instruction
from recovery.core.result import RESULT, Outcome, read_result
from recovery.core.trial import TrialCounter
from recovery.updated.ddi import (
    Controller, Deployment, Execution, Finished, Handling, Poll, ServerError, action_of, one_line,
)
from recovery.updated.fleetstate import FleetRecord, Step, Verdict, read_record, write_record
from recovery.updated.operations import Cancelled, Operations, Stop
from recovery.updated.servicestate import Phase
from recovery.core.fleetconfig import FleetConfig
from recovery.updated.sysconfig import SystemConfig
from recovery.updated.transfer import Interrupted, Unreachable
from recovery.updated.updater import BUNDLE_SUFFIX, Busy, Reboot, Updater, reboot_system

log = logging.getLogger(__name__)


STATUS = Path("/run/reflash/fleet-status.json")  # the last contact and problem: memory, not cfg
RETRY_BASE = 10.0  # seconds before the first retry after a failed contact


@dataclass
class Backoff:
    """Exponential backoff with jitter: base * 2^(failures-1), capped, then 50-100 % of it, so that a
    fleet of appliances that lost their server does not come back in step."""

    cap: float
    base: float = RETRY_BASE
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def failed(self) -> float:
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** min(self.failures - 1, 30))
        return delay * self.rng.uniform(0.5, 1.0)

    def succeeded(self) -> None:
        self.failures = 0


def result_digest(cfg: Path) -> str | None:
    try:
        return hashlib.sha256((cfg / RESULT).read_bytes()).hexdigest()
    except OSError:
        return None


class _Watch(Stop):
    """The running download's stop, asked at every chunk: now and then it sends the progress and
    looks whether the server cancelled the action meanwhile."""

    def __init__(self, fleet: Fleet, action: str) -> None:
        self.fleet, self.action = fleet, action
        self.last = fleet.clock()
        self._reason: UpdateError | None = None

    @property  # type: ignore[override]
    def reason(self) -> UpdateError | None:
        if self._reason is None and self.fleet.clock() - self.last >= self.fleet.fleet.progress_interval:
            self.last = self.fleet.clock()
            self._reason = self.fleet._while_downloading(self.action)
        return self._reason

    def set(self, reason: UpdateError) -> None:
        self._reason = reason


@dataclass
class Fleet:
    """The client on one configuration; the reboot, the clock and the sleep are fields for the tests."""

    config: SystemConfig
    reboot: Reboot = reboot_system
    clock: Callable[[], float] = time.monotonic
    status_path: Path = STATUS
    rng: random.Random = field(default_factory=random.Random)
    sent_attributes: dict[str, str] | None = None  # what configData last said in this process

    def __post_init__(self) -> None:
        if self.config.fleet is None:
            raise Rejected("no [fleet] in the system configuration: this appliance reports to no fleet server")
        self.fleet: FleetConfig = self.config.fleet
        self.ops = Operations(Updater(self.config, reboot=self.reboot, progress=False))
        self.backoff = Backoff(self.fleet.retry_max, rng=self.rng)
        self._controller: Controller | None = None

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            device = self.fleet.device_id(self.config.product)
            assert device is not None
            self._controller = Controller(self.fleet.server, self.fleet.tenant, device,
                                          self.fleet.read_token(), gateway=self.fleet.gateway_token,
                                          timeout=self.fleet.timeout)
        return self._controller

    @property
    def cfg(self) -> Path:
        return self.config.cfg

    # --- the loop --------------------------------------------------------------------------------

    def run(self, *, cycles: int | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        """Cycle for ever (or `cycles` times), sleeping what the server asks, or the backoff after a failure."""
        done = 0
        while cycles is None or done < cycles:
            wait = self.cycle()
            done += 1
            if cycles is None or done < cycles:
                sleep(wait)

    def cycle(self) -> float:
        """One contact with the server; returns the seconds to wait before the next."""
        try:
            wait = self._cycle()
        except ServerError as e:
            wait = self.backoff.failed()
            self._note(problem=str(e))
            log.warning("fleet: %s; trying again in %.0f s", e, wait)
            return wait
        except (Busy, Interrupted, Unreachable) as e:
            # Nothing is lost: the next cycle resumes the download or retries the step.
            wait = self.backoff.failed()
            self._note(problem=f"{e.kind}: {one_line(e)}")
            log.warning("fleet: %s; trying again in %.0f s", one_line(e), wait)
            return wait
        self.backoff.succeeded()
        self._note(problem=None)
        return wait

    def _cycle(self) -> float:
        record = self._settle(read_record(self.cfg))
        if record is not None and record.step == Step.closing:
            record = self._close(record)
        poll = self.controller.poll()
        # While a verdict is owed the old attributes stay: a server that saw the new version first
        # (gooseBit) would stop offering the action, and the verdict would look delivered when it is not.
        if record is None or record.step not in (Step.staged, Step.closing):
            self._report_attributes(poll)
        if poll.cancel is not None:
            self._cancel(poll.cancel, record)
        elif poll.deployment is not None:
            self._deploy(poll.deployment, record)
        return poll.sleep

    # --- after the reboot: the verdict -----------------------------------------------------------

    def _settle(self, record: FleetRecord | None) -> FleetRecord | None:
        """Move a record on to what cfg shows happened since it was written (a cut, a reboot)."""
        if record is None:
            return None
        if record.step == Step.downloaded and self._staged_is(record):
            # Cut between the instruction and the record of it: the instruction is the truth.
            record = replace(record, step=Step.staged)
            write_record(self.cfg, record)
        if record.step == Step.staged:
            decided = self.verdict(record)
            if decided is not None:
                record = replace(record, step=Step.closing, verdict=decided[0], reason=decided[1])
                write_record(self.cfg, record)
                log.info("fleet: action %s: %s: %s", record.action, decided[0], decided[1])
        return record

    def _staged_is(self, record: FleetRecord) -> bool:
        try:
            staged = read_instruction(self.config.instruction)
        except (UpdateError, OSError):
            return False
        return Path(str(staged.file)).name == record.file and staged.version == record.version

    def verdict(self, record: FleetRecord) -> tuple[Verdict, str] | None:
        """The recovery's result for the install `record` staged; None while it is still to come
        (the instruction is still on cfg, or the new release is on trial)."""
        if self.config.instruction.exists():
            return None
        if result_digest(self.cfg) == record.result_before:
            return Verdict.failure, f"the staged update to {record.version} was cancelled on the appliance"
        result = read_result(self.cfg)
        if result is None:
            return Verdict.failure, "the recovery left no result"
        if result.outcome == Outcome.installed and result.to_version == record.version:
            try:
                on_trial = TrialCounter.read(self.cfg).on_trial
            except UpdateError:
                on_trial = True  # GRUB rolls back on a counter it cannot read: wait for that verdict
            if on_trial:
                return None
            running = self.config.running_version()
            if running != record.version:
                return Verdict.failure, f"{record.version} was installed, but {running} is running"
            return Verdict.success, f"{result.summary()}; confirmed"
        if result.outcome == Outcome.rolled_back and result.from_version == record.version:
            return Verdict.failure, result.summary()
        if result.outcome in (Outcome.rejected, Outcome.failed):
            return Verdict.failure, result.summary()
        return Verdict.failure, f"the recovery's last result is not about {record.version}: {result.summary()}"

    def _close(self, record: FleetRecord) -> FleetRecord:
        """Send the final feedback, unless the server has it already (a cut between sending and
        recording): an action the server no longer offers has been closed, and is not told twice."""
        poll = self.controller.poll()
        if poll.offers(record.action):
            assert record.verdict is not None
            finished = Finished.success if record.verdict == Verdict.success else Finished.failure
            self.controller.feedback(record.action, Execution.closed, finished, details=[record.reason or ""])
            log.info("fleet: reported action %s: %s", record.action, record.verdict)
        else:
            log.info("fleet: action %s is closed on the server already: not reporting it again", record.action)
        record = replace(record, step=Step.closed)
        write_record(self.cfg, record)
        return record

    # --- what the server asks --------------------------------------------------------------------

    def attributes(self) -> dict[str, str]:
        return {"product": self.config.product, "sw_version": self.config.running_version() or "unknown",
                "hw_boardname": self.config.product, "hw_revision": self.fleet.hardware}

    def _report_attributes(self, poll: Poll) -> None:
        attributes = self.attributes()
        if poll.config_data is not None or attributes != self.sent_attributes:
            self.controller.put_config(attributes)
            self.sent_attributes = attributes
            log.info("fleet: reported %s", ", ".join(f"{k}={v}" for k, v in attributes.items()))

    def _cancel(self, href: str, record: FleetRecord | None) -> None:
        stop = self.controller.cancel_action(href)
        cancel = action_of(href)  # the cancel action's own id: its feedback goes there
        if record is not None and record.action == stop and record.step in (Step.staged, Step.closing, Step.closed):
            log.info("fleet: the server cancels action %s, but its instruction is written: refused", stop)
            self.controller.cancel_feedback(cancel, Execution.rejected, Finished.failure,
                                            ["the update is staged for the recovery: it can no longer be cancelled"])
            return
        if record is not None and record.action == stop:
            self._take_back(record)
        log.info("fleet: cancelled action %s", stop)
        self.controller.cancel_feedback(cancel, Execution.closed, Finished.success, ["cancelled; the download is removed"])

    def _take_back(self, record: FleetRecord) -> None:
        state = self.ops.state().download
        if state is not None and state.file == record.file:
            self.ops.cancel(discard=True)  # the bundle and its partial file go; a kept fallback stays
        write_record(self.cfg, None)

    def _deploy(self, href: str, record: FleetRecord | None) -> None:
        deployment = self.controller.deployment(href)
        problem, artifact = self._one_bundle(deployment)
        key = (artifact.sha256 or artifact.sha1 or "") if artifact else ""
        if record is not None and record.is_for(deployment.id, key) and record.step in (
                Step.staged, Step.closing, Step.closed):
            return  # waiting for the reboot, or told already
        if record is not None and record.step == Step.staged:
            log.info("fleet: action %s waits: action %s is staged", deployment.id, record.action)
            return
        if problem is not None or artifact is None:
            self._fail(deployment.id, key, deployment, problem or "no artifact")
            return
        if deployment.download == Handling.skip:
            return
        if self.config.instruction.exists():
            # Someone staged an update on the appliance itself: theirs goes first, this one waits.
            log.info("fleet: action %s waits: an update is staged on the appliance", deployment.id)
            return
        if record is None or not record.is_for(deployment.id, key) or record.step == Step.closed:
            record = FleetRecord(deployment.id, key, self._version(deployment), artifact.filename, Step.downloading)
        elif record.step == Step.downloaded and not self._still_downloaded(record):
            record = replace(record, step=Step.downloading)  # replaced or removed locally meanwhile: again
        if record.step == Step.downloading:
            record = self._download(deployment, record)
            if record is None:
                return
        if deployment.update == Handling.skip:
            return
        if deployment.maintenance is False:
            if not record.scheduled:
                record = replace(record, scheduled=True)
                write_record(self.cfg, record)
                self.controller.feedback(deployment.id, Execution.scheduled, details=[
                    f"{record.version} is downloaded; it is installed in the maintenance window"])
            return
        self._install(deployment, record)

    def _still_downloaded(self, record: FleetRecord) -> bool:
        """Whether the operations' downloaded bundle is still this record's (an operator may have
        downloaded another since): `install` stages whatever that is."""
        state = self.ops.state().download
        return (state is not None and state.phase == Phase.downloaded and state.file == record.file
                and (self.config.bundle_dir / record.file).is_file())

    def _version(self, deployment: Deployment) -> str:
        return deployment.chunks[0].version

    def _one_bundle(self, deployment: Deployment) -> tuple[str | None, Any]:
        """The deployment's one bundle artifact, or why it is not one this appliance can take."""
        artifacts = [a for c in deployment.chunks for a in c.artifacts]
        if len(deployment.chunks) != 1 or len(artifacts) != 1:
            return f"a deployment must carry one chunk with one bundle, not {len(artifacts)} artifacts", None
        artifact = artifacts[0]
        name = artifact.filename
        if (not name.endswith(BUNDLE_SUFFIX) or name.startswith(".") or len(name) > 128
                or not all(c.isalnum() or c in "._+-" for c in name)):
            return f"the artifact {one_line(name, 80)!r} is not a plain *{BUNDLE_SUFFIX} file name", artifact
        if not (artifact.sha256 or artifact.sha1):
            return "the artifact comes without a sha256 or sha1", artifact
        if not deployment.chunks[0].version:
            return "the chunk has no version", artifact
        return None, artifact

    def _download(self, deployment: Deployment, record: FleetRecord) -> FleetRecord | None:
        _problem, artifact = self._one_bundle(deployment)
        write_record(self.cfg, record)
        self.controller.feedback(deployment.id, Execution.proceeding, details=[f"downloading {artifact.filename}"])
        # The chunk's version and the server's sha256 become what the verified bundle must match.
        release = Release(record.version, artifact.filename, artifact.size, artifact.sha256, created="")  # type: ignore[arg-type]
        try:
            done = self.ops.download(self.controller.artifact_source(artifact), release=release,
                                     stop=_Watch(self, deployment.id))
        except Cancelled:
            # The server cancelled it while it ran: answer the cancellation now.
            poll = self.controller.poll()
            if poll.cancel is not None:
                self._cancel(poll.cancel, record)
            return None
        except Busy:
            raise  # a local operation runs: not this download's fault
        except (Interrupted, Unreachable):
            attempts = record.attempts + 1
            if attempts >= self.fleet.max_attempts:
                self._fail(deployment.id, record.artifact, deployment,
                           f"the download broke off {attempts} times; giving up")
                self.ops.cancel(discard=True)
                return None
            write_record(self.cfg, replace(record, attempts=attempts))
            raise
        except UpdateError as e:
            self._fail(deployment.id, record.artifact, deployment, f"{e.kind}: {one_line(e)}")
            return None
        path = self.config.bundle_dir / done.file
        for name, want in (("sha1", artifact.sha1), ("md5", artifact.md5)):
            if want is not None and hashlib.new(name, path.read_bytes(), usedforsecurity=False).hexdigest() != want:
                self.ops.cancel(discard=True)
                self._fail(deployment.id, record.artifact, deployment, f"rejected: artifact {name} mismatch")
                return None
        record = replace(record, step=Step.downloaded, file=done.file)
        write_record(self.cfg, record)
        self.controller.feedback(deployment.id, Execution.downloaded, Finished.none,
                                 details=[f"downloaded and verified {record.version}"])
        return record

    def _while_downloading(self, action: str) -> UpdateError | None:
        """From inside the download: its progress to the server, and a cancellation back from it."""
        try:
            state = self.ops.state().download
            if state is not None and state.phase == Phase.downloading and state.size:
                self.controller.feedback(action, Execution.proceeding, progress=(state.percent or 0, 100),
                                         details=[f"downloading: {state.percent or 0}%"])
            if self.controller.poll().cancel is not None:
                return Cancelled("cancelled by the fleet server")
        except (ServerError, UpdateError) as e:
            log.debug("fleet: during the download: %s", e)
        return None

    def _install(self, deployment: Deployment, record: FleetRecord) -> None:
        # The result before the instruction, recorded first: a cut right after the instruction still
        # tells the recovery's new verdict from an old one.
        record = replace(record, result_before=result_digest(self.cfg))
        write_record(self.cfg, record)
        try:
            staged = self.ops.install()
        except Busy:
            raise
        except UpdateError as e:
            self._fail(deployment.id, record.artifact, deployment, f"{e.kind}: {one_line(e)}")
            return
        write_record(self.cfg, replace(record, step=Step.staged))
        self.controller.feedback(deployment.id, Execution.proceeding, details=[
            f"staged {staged.version}: rebooting into the recovery to install it"])
        log.info("fleet: staged %s %s; rebooting into the recovery", staged.product, staged.version)
        self.reboot()

    def _fail(self, action: str, artifact: str, deployment: Deployment, reason: str) -> None:
        """A deployment that ends before any instruction: the final feedback now, recorded once."""
        version = deployment.chunks[0].version if deployment.chunks else ""
        record = FleetRecord(action, artifact, version, "none", Step.closing, verdict=Verdict.failure, reason=reason)
        write_record(self.cfg, record)
        log.warning("fleet: action %s failed: %s", action, reason)
        self._close(record)

    # --- status ----------------------------------------------------------------------------------

    def _note(self, *, problem: str | None) -> None:
        doc = {"contact": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "problem": problem,
               "failures": self.backoff.failures}
        try:
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.status_path, (json.dumps(doc) + "\n").encode())
        except OSError as e:
            log.debug("fleet: cannot write %s: %s", self.status_path, e)


def _device(fleet: FleetConfig, config: SystemConfig) -> str:
    try:
        device = fleet.device_id(config.product, make=False)
    except Rejected as e:
        return f"no id ({e})"
    return device or f"the id it makes in {fleet.controller_id_file} at its first contact"


def status(config: SystemConfig, status_path: Path = STATUS) -> dict[str, Any]:
    """What `reflash-fleet status` prints: the server, the action's record and the last contact."""
    fleet = config.fleet
    record = read_record(config.cfg)
    try:
        contact = json.loads(status_path.read_bytes())
    except (OSError, ValueError):
        contact = None
    return {
        "server": None if fleet is None else f"{fleet.server} tenant {fleet.tenant} as {_device(fleet, config)}",
        "action": None if record is None else json.loads(record.to_json()),
        "contact": contact,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reflash-fleet", description="Report to a hawkBit (DDI) fleet server "
                                "and install what it deploys.")
    add_debug(p)
    p.add_argument("--config", type=Path, default=None,
                   help="system configuration (default: $UPDATECTL_CONFIG or /etc/recovery/system.toml)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="poll the server for ever (reflash-fleet.service)")
    sub.add_parser("once", help="one contact with the server, then exit")
    s = sub.add_parser("status", help="the server, the current action's record, the last contact")
    s.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None, *, reboot: Reboot | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    reboot_fn = reboot if reboot is not None else reboot_system

    def run(args: argparse.Namespace) -> int:
        config = SystemConfig.load(args.config)
        if args.command == "status":
            return _print_status(status(config), as_json=args.json)
        if config.fleet is None:
            print("reflash-fleet: no [fleet] in the system configuration: nothing to do")
            return 0
        fleet = Fleet(config, reboot=reboot_fn)
        if args.command == "once":
            fleet.cycle()
        else:
            log.info("fleet: reporting to %s", fleet.controller.base)
            fleet.run()
        return 0

    return boundary(run, args)


def _print_status(doc: dict[str, Any], *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"server: {one_line(doc['server']) if doc['server'] else 'none ([fleet] is not configured)'}")
    action = doc["action"]
    if action is None:
        print("action: none")
    else:
        line = f"action {one_line(action['action'], 64)}: {action['step']} {one_line(action['version'], 64)}"
        if action.get("verdict"):
            line += f", {action['verdict']}: {one_line(action.get('reason') or '')}"
        print(line)
    contact = doc["contact"]
    if contact:
        problem = contact.get("problem")
        print(f"last contact: {one_line(contact.get('contact'), 40)}" + (f", {one_line(problem)}" if problem else ", ok"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
