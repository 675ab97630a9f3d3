"""The running system writes the recovery OS its release carries into the recovery partition's inactive
slot, reads it back from the disk, and only then switches GRUB to it (DESIGN.md, "The running system
writes the new recovery"). Runs at every boot that is not a trial boot; it never stops one.

A power cut at any moment leaves the old slot active and whole, or the new one active and verified:
the inactive slot loses its `recovery.json` before anything in it changes, gets it back only once its
files are complete, and becomes active through one atomic write of `recovery/slot` on cfg.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from recovery.core.atomic import atomic_write, checkpoint_journal, durable_unlink, fsync_dir, write_block
from recovery.core.envblock import format_envblock, parse_envblock
from recovery.core.errors import Failed, Rejected, UpdateError
from recovery.core.instruction import DiskSpec, DiskSpecKind
from recovery.core.run import run
from recovery.core.slots import (
    MENU_SUMS,
    RECORD,
    SLOT_BLOCK,
    SLOT_KEY,
    SLOTS,
    FileDigest,
    RecoveryImage,
    digest_file,
    other,
)
from recovery.updated.sysconfig import SystemConfig

log = logging.getLogger(__name__)

PREFIX = "recovery-slots: "

MOUNT_BASE = Path("/run/reflash")  # the private mount points live below it

CHUNK = 1 << 20

SINGLE = "this image has a single recovery, made before slots: it cannot be updated in the field"

_BY = {DiskSpecKind.partlabel: "by-partlabel", DiskSpecKind.label: "by-label", DiskSpecKind.uuid: "by-uuid",
       DiskSpecKind.partuuid: "by-partuuid"}


class SlotError(UpdateError):
    """Why the recovery was not updated this time, in one line; the active slot is unchanged."""


# --- the partition -------------------------------------------------------------------------------


def find_device(spec: str) -> Path | None:
    """The device node of `PARTLABEL=x`, `LABEL=x`, `UUID=x`, `PARTUUID=x` or `/dev/…`; None when there is none."""
    disk = DiskSpec.parse(spec)
    if disk.kind is DiskSpecKind.path:
        return Path(disk.value) if Path(disk.value).exists() else None
    link = Path("/dev/disk") / _BY[disk.kind] / disk.value
    if link.exists():
        return link.resolve()
    # No udev link (yet): ask blkid, without its cache, which may name a disk that is gone.
    found = run(["blkid", "-c", "/dev/null", "-l", "-o", "device", "-t", str(disk)], check=False)
    node = found.stdout.decode(errors="replace").strip() if found.returncode == 0 else ""
    return Path(node) if node else None


def mount_device(device: Path, target: Path, read_only: bool) -> None:
    options = "nodev,nosuid,noexec," + ("ro" if read_only else "rw")
    try:
        run(["mount", "-t", "ext4", "-o", options, device, target], error=Failed)
    except Failed:
        if not read_only:
            raise
        # Mounted read-write elsewhere: the kernel refuses a read-only mount of the same file system
        # (it would change its state); a read-write one shares it, and nothing here writes to it.
        run(["mount", "-t", "ext4", "-o", "nodev,nosuid,noexec,rw", device, target], error=Failed)


def umount_device(target: Path) -> None:
    run(["umount", target], error=Failed)


@dataclass(frozen=True)
class Partition:
    """How the recovery partition is found and mounted: the system's tools, or a test's."""

    find: Callable[[str], Path | None] = find_device
    mount: Callable[[Path, Path, bool], None] = mount_device  # (device, mount point, read-only)
    umount: Callable[[Path], None] = umount_device
    base: Path = MOUNT_BASE


@contextmanager
def _mounted(partition: Partition, device: Path, *, read_only: bool) -> Iterator[Path]:
    """`device` mounted at a fresh private directory below `partition.base`, unmounted at the end."""
    partition.base.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="recovery-", dir=partition.base))
    try:
        partition.mount(device, target, read_only)
    except Exception as e:
        target.rmdir()
        raise SlotError(f"cannot mount the recovery partition {device}: {e}") from e
    try:
        yield target
    finally:
        try:
            partition.umount(target)
            target.rmdir()
        except (Failed, OSError) as e:
            log.warning("%scannot unmount the recovery partition at %s: %s", PREFIX, target, e)


# --- the active slot, on cfg ---------------------------------------------------------------------


def read_active_slot(cfg: Path) -> str:
    """The slot GRUB boots: `recovery_slot` in cfg's `recovery/slot`. A missing or unreadable block, or
    any other value, means `a`: that is what GRUB does."""
    try:
        slot = parse_envblock((cfg / SLOT_BLOCK).read_bytes()).get(SLOT_KEY)
    except (OSError, Rejected):
        return SLOTS[0]
    return slot if slot in SLOTS else SLOTS[0]


def write_active_slot(cfg: Path, slot: str) -> None:
    """Make `slot` the one GRUB boots, in one write GRUB sees past cfg's journal (over the block's own
    blocks once it exists: `write_block`)."""
    path = cfg / SLOT_BLOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    write_block(path, format_envblock({SLOT_KEY: slot}))
    checkpoint_journal(path.parent)


# --- what a slot holds ---------------------------------------------------------------------------


def _record(directory: Path) -> RecoveryImage | None:
    """A slot's record; None when it has none or one that cannot be read (an incomplete slot)."""
    try:
        return RecoveryImage.read(directory)
    except (OSError, Rejected) as e:
        log.debug("%s%s", PREFIX, e)
        return None


def _slotted(root: Path) -> bool:
    return (root / SLOTS[0]).is_dir()


def _read_back(path: Path) -> FileDigest:
    """Size and sha256 of `path` as the disk holds it: its cached pages are dropped before the read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h, size = hashlib.sha256(), 0
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
            size += len(chunk)
        return FileDigest(size, h.hexdigest())
    finally:
        os.close(fd)


def _mismatch(directory: Path, image: RecoveryImage, *, from_disk: bool) -> str | None:
    """How the files in `directory` differ from `image`, in words; None when they match."""
    files = dict(image.files())
    if (sums := image.menu_sums()) is not None:
        files[MENU_SUMS] = FileDigest(len(sums), hashlib.sha256(sums).hexdigest())
    for name, want in files.items():
        try:
            got = _read_back(directory / name) if from_disk else digest_file(directory / name)
        except OSError as e:
            return f"{name}: {e.strerror or e}"
        if got != want:
            return (f"{name} is {got.size} bytes with sha256 {got.sha256}, "
                    f"recovery.json says {want.size} bytes with sha256 {want.sha256}")
    return None


# --- the update ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the update will do, decided with the partition mounted read-only."""

    image: RecoveryImage  # what the release carries
    active: str  # the slot kept as it is (the active one, unless it is damaged and the other whole)
    inactive: str  # the slot written, and then made active
    keeps: RecoveryImage | None  # what the kept slot holds


def _say(line: str) -> str:
    print(PREFIX + line, flush=True)
    return PREFIX + line


def _warn(line: str) -> str:
    log.warning("%s%s", PREFIX, line)
    return PREFIX + line


def update_recovery(config: SystemConfig, *, partition: Partition = Partition(),
                    before_verify: Callable[[Path], None] | None = None) -> str | None:
    """Bring the recovery up to the one the running release carries: write it into the inactive slot,
    verify it from the disk, switch to it. One line on what was done (or why not); None when there
    is nothing to do. Never raises: it runs at boot. `before_verify` (tests) sees the slot written."""
    try:
        return _update(config, partition, before_verify)
    except SlotError as e:
        return _warn(str(e))
    except Exception as e:  # noqa: BLE001 - a boot or a confirmation must never stop here
        return _warn(f"the recovery was not updated: {e}")


@contextmanager
def _one_writer(base: Path) -> Iterator[None]:
    base.mkdir(parents=True, exist_ok=True)
    with open(base / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


LOCK = "recovery-slots.lock"


def _update(config: SystemConfig, partition: Partition, before_verify: Callable[[Path], None] | None) -> str | None:
    source = config.recovery_source
    try:
        image = RecoveryImage.read(source)
    except Rejected as e:
        raise SlotError(f"the release's recovery is not used: {e}") from None
    except OSError as e:
        raise SlotError(f"cannot read the release's recovery in {source}: {e.strerror or e}") from None
    if image is None:
        return None  # a release without a recovery of its own
    # The guard (at boot) and confirm (after multi-user) both settle outside a trial: one at a time.
    with _one_writer(partition.base):
        return _update_with(config, partition, image, before_verify)


def _update_with(config: SystemConfig, partition: Partition, image: RecoveryImage,
                 before_verify: Callable[[Path], None] | None) -> str | None:
    source = config.recovery_source
    device = partition.find(config.recovery_disk)
    if device is None:
        raise SlotError(f"no recovery partition {config.recovery_disk}: the recovery is not updated")
    with _mounted(partition, device, read_only=True) as root:
        if not _slotted(root):
            return _say(SINGLE)
        active = read_active_slot(config.cfg)
        if _record(root / active) == image:
            return None  # the usual boot: the active slot holds this release's recovery
        plan = _choose(root, image, active)
    # Every check of the source before a slot is touched: the slot written may be GRUB's second chance.
    problem = _mismatch(source, image, from_disk=False)
    if problem is not None:
        raise SlotError(f"the release's recovery in {source} is damaged: {problem}")
    with _mounted(partition, device, read_only=False) as root:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            raise SlotError(f"the recovery partition {device} is read-only (mounted read-only elsewhere?)")
        _apply(plan, source, root, before_verify)
    try:
        write_active_slot(config.cfg, plan.inactive)
    except (OSError, Rejected) as e:
        raise SlotError(f"slot {plan.inactive} is verified, but cannot switch to it: {e}") from None
    held = plan.keeps.version if plan.keeps else "nothing"
    return _say(f"recovery {image.version} in slot {plan.inactive} is active; slot {plan.active} keeps {held}")


def _whole(directory: Path) -> RecoveryImage | None:
    """The slot's record when its files match it (read through the page cache); else None."""
    record = _record(directory)
    return record if record is not None and _mismatch(directory, record, from_disk=False) is None else None


def _choose(root: Path, image: RecoveryImage, active: str) -> Plan:
    """Which slot to write: the inactive one, unless that is the only whole recovery on the partition
    (the active one is damaged: GRUB's tries 1 and 2 failed there, and try 3 got here through the other
    one). Then the damaged active slot is written, and the whole one is kept for a failing new one."""
    inactive = other(active)
    kept, spare = _whole(root / active), _whole(root / inactive)
    if kept is None and spare is not None:
        _say(f"slot {active} is damaged: its recovery is replaced, slot {inactive} (recovery {spare.version}) is kept")
        return Plan(image, active=inactive, inactive=active, keeps=spare)
    return Plan(image, active=active, inactive=inactive, keeps=kept or _record(root / active))


def _apply(plan: Plan, source: Path, root: Path, before_verify: Callable[[Path], None] | None) -> None:
    """Make the inactive slot hold `plan.image`, verified from the disk (or leave it without a record)."""
    slot = root / plan.inactive
    image = plan.image
    if _record(slot) == image and _mismatch(slot, image, from_disk=True) is None:
        log.info("%sslot %s already holds recovery %s (written before a cut)", PREFIX, plan.inactive, image.version)
    else:
        _say(f"writing recovery {image.version} into slot {plan.inactive}")
        try:
            _write(slot, source, image)
        except OSError as e:
            raise SlotError(f"cannot write slot {plan.inactive}: {e.strerror or e}"
                            + (f" ({e.filename})" if e.filename else "")) from None
        if before_verify is not None:
            before_verify(slot)
        problem = _mismatch(slot, image, from_disk=True)
        if problem is not None:
            durable_unlink(slot / RECORD)
            checkpoint_journal(root)
            raise SlotError(f"slot {plan.inactive} does not read back as written: {problem}; "
                            f"slot {plan.active} stays active")
    _say(f"slot {plan.inactive} verified (recovery {image.version})")


def _write(slot: Path, source: Path, image: RecoveryImage) -> None:
    if not slot.is_dir():
        slot.mkdir()
        fsync_dir(slot.parent)
    # Without its record the slot is incomplete, whatever its files hold, until the record comes back;
    # without its menu sums GRUB's stub takes the other slot's menu.
    durable_unlink(slot / RECORD)
    durable_unlink(slot / MENU_SUMS)
    for name, want in image.files().items():
        _copy(source / name, slot / name, want)
    if (sums := image.menu_sums()) is not None:
        atomic_write(slot / MENU_SUMS, sums)
    atomic_write(slot / RECORD, image.to_json())
    fsync_dir(slot)
    os.sync()
    # GRUB reads ext4 without replaying the journal: the new files must be where it looks.
    checkpoint_journal(slot)


def _copy(src: Path, dest: Path, want: FileDigest) -> None:
    """Copy `src` to `dest` through a temp name, hashing as it goes; refuse what is not `want`."""
    tmp = dest.with_name(f".{dest.name}.new")
    h, size = hashlib.sha256(), 0
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        got = FileDigest(size, h.hexdigest())
        if got != want:
            raise SlotError(f"the release's recovery in {src.parent} changed while it was copied: {src.name} is "
                            f"{got.size} bytes with sha256 {got.sha256}, recovery.json says {want.size} bytes "
                            f"with sha256 {want.sha256}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


# --- status --------------------------------------------------------------------------------------


def slots_status(config: SystemConfig, *, partition: Partition = Partition()) -> dict[str, object] | None:
    """`{"active": "a", "slots": {"a": {"version": …} | None, "b": …}}`, `{"layout": "single"}` for an
    image made before slots, or None when there is no recovery partition. Errors (mount) raise."""
    device = partition.find(config.recovery_disk)
    if device is None:
        return None
    with _mounted(partition, device, read_only=True) as root:
        if not _slotted(root):
            return {"layout": "single"}
        records = {slot: _record(root / slot) for slot in SLOTS}
    return {"active": read_active_slot(config.cfg),
            "slots": {slot: {"version": r.version} if r else None for slot, r in records.items()}}


def status_line(status: dict[str, object]) -> str:
    """`recovery: 2.0.0 in slot b (active); slot a: 1.0.0` for `slots_status`'s answer."""
    if status.get("layout") == "single":
        return "recovery: a single recovery (" + SINGLE.removeprefix("this image has a single recovery, ") + ")"
    active = str(status["active"])
    slots = status["slots"]
    assert isinstance(slots, dict)

    def held(slot: str) -> str:
        return slots[slot]["version"] if slots.get(slot) else "nothing"

    return f"recovery: {held(active)} in slot {active} (active); slot {other(active)}: {held(other(active))}"
