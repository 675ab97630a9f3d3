"""The update instruction: a GRUB environment block on the cfg partition naming the bundle to install,
read and written byte-compatibly with grub-editenv and with GRUB's own `save_env`."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from recovery.core.atomic import atomic_write, checkpoint_journal
from recovery.core.envblock import (
    ENVBLK_SIZE,
    _free_space,
    format_envblock,
    parse_envblock,
    show_value,
)
from recovery.core.errors import Failed, Rejected

KEY_ACTION = "recovery_action"


KEY_DISK = "recovery_disk"


KEY_FILE = "recovery_file"


KEY_SHA256 = "recovery_sha256"


KEY_VERSION = "recovery_version"


KEY_CREATED = "recovery_created"


KEY_ALLOW_DOWNGRADE = "recovery_allow_downgrade"


KEY_TRY = "recovery_try"


# The first five are required; the order is the order of the block's lines.
KEYS = (KEY_ACTION, KEY_DISK, KEY_FILE, KEY_SHA256, KEY_VERSION, KEY_CREATED, KEY_ALLOW_DOWNGRADE, KEY_TRY)


# The one value that allows a downgrade; the key is absent otherwise (never `0`: absent is the default).
ALLOWED = "1"


MAX_TRIES = 3


# GRUB's save_env can only count tries if the block has room for the line it adds.
TRY_ROOM = len(f"{KEY_TRY}={MAX_TRIES}\n")


_SHA256 = re.compile(r"[0-9a-f]{64}")


_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+~-]*")


_MAX_VERSION = 64


_UUID = re.compile(r"[0-9A-Fa-f]+(-[0-9A-Fa-f]+)*")


_MAX_UUID = 36


_MAX_NAME = 255


_MAX_FILE = 512


class DiskSpecKind(StrEnum):
    """How a disk is named: by GPT partition name, file system label or UUID, partition UUID, or node."""

    partlabel = "partlabel"
    label = "label"
    uuid = "uuid"
    partuuid = "partuuid"
    path = "path"

    @property
    def tag(self) -> str:
        """The `TAG=` prefix of the spec form (blkid's names); empty for a path."""
        return "" if self is DiskSpecKind.path else self.name.upper()


_DISK_FORMS = "PARTLABEL=x, LABEL=x, UUID=x, PARTUUID=x or /dev/..."


@dataclass(frozen=True)
class DiskSpec:
    """Where to find a disk, as `PARTLABEL=storage`, `LABEL=x`, `UUID=x`, `PARTUUID=x` or `/dev/...`."""

    kind: DiskSpecKind
    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, DiskSpecKind):
            raise Rejected(f"disk spec kind {self.kind!r} is not one of {', '.join(DiskSpecKind)}")
        value = self.value
        if not isinstance(value, str) or not value:
            raise Rejected(f"disk spec {self.kind.tag or 'path'} has no value")
        if not value.isprintable():
            raise Rejected(f"disk spec {show_value(value)} contains control characters")
        if self.kind is DiskSpecKind.path:
            normal = posixpath.normpath(value)
            if not value.startswith("/dev/") or value.startswith("//") or normal != value or value == "/dev/":
                raise Rejected(f"disk spec {show_value(value)} is not an absolute, normalized path below /dev/")
        elif self.kind in (DiskSpecKind.uuid, DiskSpecKind.partuuid):
            if len(value) > _MAX_UUID or not _UUID.fullmatch(value):
                raise Rejected(f"disk spec {self.kind.tag}={show_value(value)} is not a UUID")
        else:
            if len(value) > _MAX_NAME:
                raise Rejected(f"disk spec {self.kind.tag}= value is longer than {_MAX_NAME} characters")
            if value != value.strip():
                raise Rejected(f"disk spec {self.kind.tag}={show_value(value)} has leading or trailing blanks")

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        """Parse `PARTLABEL=storage`, `LABEL=x`, `UUID=x`, `PARTUUID=x` or `/dev/...`."""
        if text.startswith("/"):
            return cls(DiskSpecKind.path, text)
        tag, sep, value = text.partition("=")
        kinds = {kind.tag: kind for kind in DiskSpecKind if kind.tag}
        if not sep or tag not in kinds:
            raise Rejected(f"unknown disk spec {show_value(text)} (want {_DISK_FORMS})")
        return cls(kinds[tag], value)

    def __str__(self) -> str:
        return self.value if self.kind is DiskSpecKind.path else f"{self.kind.tag}={self.value}"


class Action(StrEnum):
    """What the recovery is told to do."""

    install = "install"
    # Reinstall the fallback bundle after a release failed its trial: an install in every check and
    # every guarantee; only the verdict is reported as `rolled-back` (DESIGN.md, "Trial boots and rollback").
    rollback = "rollback"


def _check_file(text: str) -> PurePosixPath:
    if not text.startswith("/"):
        raise Rejected(f"{KEY_FILE} {show_value(text)} is not an absolute path")
    if len(text) > _MAX_FILE:
        raise Rejected(f"{KEY_FILE} is longer than {_MAX_FILE} characters")
    if not text.isprintable():
        raise Rejected(f"{KEY_FILE} {show_value(text)} contains control characters")
    if ".." in text.split("/"):
        raise Rejected(f"{KEY_FILE} {show_value(text)} contains '..'")
    if text == "/" or text.startswith("//") or posixpath.normpath(text) != text:
        raise Rejected(f"{KEY_FILE} {show_value(text)} is not a normalized path to a file")
    return PurePosixPath(text)


def _check_created(text: str) -> str:
    # fromisoformat (3.11) takes most of ISO 8601; blanks it also takes are not ISO and would not
    # survive a round trip through an operator's shell.
    try:
        if not text or any(c.isspace() or not c.isprintable() for c in text):
            raise ValueError
        datetime.fromisoformat(text)
    except ValueError:
        raise Rejected(f"{KEY_CREATED} {show_value(text)} is not an ISO 8601 time") from None
    return text


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Instruction:
    """A validated update instruction: install the bundle `file` on `disk`, which must carry `version`
    and hash to `sha256`; a `version` older than the installed one only if `allow_downgrade`.
    `try_count` is GRUB's counter; `extra` keeps variables others added."""

    action: Action
    disk: DiskSpec
    file: PurePosixPath
    sha256: str
    version: str
    created: str | None
    try_count: int | None
    extra: tuple[tuple[str, str], ...] = ()
    allow_downgrade: bool = False

    def __post_init__(self) -> None:
        try:
            if not isinstance(self.action, Action):
                raise Rejected(f"unknown {KEY_ACTION} {show_value(str(self.action))}")
            if not isinstance(self.disk, DiskSpec):
                raise Rejected(f"{KEY_DISK} is not a DiskSpec")
            _check_file(str(self.file))
            if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
                raise Rejected(f"{KEY_SHA256} is not 64 lowercase hex digits")
            if not isinstance(self.version, str) or not self.version:
                raise Rejected(f"{KEY_VERSION} is empty")
            if len(self.version) > _MAX_VERSION:
                raise Rejected(f"{KEY_VERSION} is longer than {_MAX_VERSION} characters")
            if not _VERSION.fullmatch(self.version):
                raise Rejected(f"{KEY_VERSION} {show_value(self.version)} has characters other than A-Z a-z 0-9 . _ + ~ -")
            if self.created is not None:
                _check_created(self.created)
            if type(self.allow_downgrade) is not bool:
                raise Rejected(f"{KEY_ALLOW_DOWNGRADE} {self.allow_downgrade!r} is not a bool")
            if self.try_count is not None and (
                type(self.try_count) is not int or not 1 <= self.try_count <= MAX_TRIES
            ):
                raise Rejected(f"{KEY_TRY} {self.try_count!r} is not 1 to {MAX_TRIES}")
            for key, _ in self.extra:
                if key in KEYS:
                    raise Rejected(f"extra variable {key} is one of the instruction's own")
        except Rejected as e:
            raise e.context("instruction") from None

    @classmethod
    def create(
        cls, disk: str, file: str, sha256: str, version: str, created: str | None = None, *,
        allow_downgrade: bool = False, action: Action = Action.install,
    ) -> Instruction:
        """A new instruction (`install` unless told), validated; `created` defaults to now (UTC, seconds)."""
        try:
            spec = DiskSpec.parse(disk)
            path = _check_file(file)
        except Rejected as e:
            raise e.context("instruction") from None
        instruction = cls(Action(action), spec, path, sha256, version, _now() if created is None else created, None,
                          allow_downgrade=allow_downgrade)
        instruction.to_block()  # fail now, not when writing, if it does not fit
        return instruction

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Instruction:
        """The instruction in a block's variables; every key checked, unknown ones kept in `extra`."""
        try:
            missing = [key for key in KEYS[:5] if key not in env]
            if missing:
                raise Rejected(f"{missing[0]} is missing")
            try:
                action = Action(env[KEY_ACTION])
            except ValueError:
                raise Rejected(f"unknown {KEY_ACTION} {show_value(env[KEY_ACTION])}") from None
            try:
                disk = DiskSpec.parse(env[KEY_DISK])
            except Rejected as e:
                raise e.context(KEY_DISK) from None
            file = _check_file(env[KEY_FILE])
            try_count: int | None = None
            if KEY_TRY in env:
                text = env[KEY_TRY]
                if text not in {str(n) for n in range(1, MAX_TRIES + 1)}:
                    raise Rejected(f"{KEY_TRY} {show_value(text)} is not 1 to {MAX_TRIES}")
                try_count = int(text)
            allow_downgrade = KEY_ALLOW_DOWNGRADE in env
            if allow_downgrade and env[KEY_ALLOW_DOWNGRADE] != ALLOWED:
                raise Rejected(f"{KEY_ALLOW_DOWNGRADE} {show_value(env[KEY_ALLOW_DOWNGRADE])} is not {ALLOWED}")
        except Rejected as e:
            raise e.context("instruction") from None
        extra = tuple((key, value) for key, value in env.items() if key not in KEYS)
        return cls(
            action=action,
            disk=disk,
            file=file,
            sha256=env[KEY_SHA256],
            version=env[KEY_VERSION],
            created=env.get(KEY_CREATED),
            try_count=try_count,
            extra=extra,
            allow_downgrade=allow_downgrade,
        )

    def to_env(self) -> dict[str, str]:
        """The block's variables: ours in a fixed order, `recovery_try` only if set, then the extras."""
        env = {
            KEY_ACTION: str(self.action),
            KEY_DISK: str(self.disk),
            KEY_FILE: str(self.file),
            KEY_SHA256: self.sha256,
            KEY_VERSION: self.version,
        }
        if self.created is not None:
            env[KEY_CREATED] = self.created
        if self.allow_downgrade:
            env[KEY_ALLOW_DOWNGRADE] = ALLOWED
        if self.try_count is not None:
            env[KEY_TRY] = str(self.try_count)
        env.update(self.extra)
        return env

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view; `allow_downgrade` and `extra` appear only when set."""
        d: dict[str, Any] = {
            "action": str(self.action),
            "disk": str(self.disk),
            "file": str(self.file),
            "sha256": self.sha256,
            "version": self.version,
            "created": self.created,
            "try_count": self.try_count,
        }
        if self.allow_downgrade:
            d["allow_downgrade"] = True
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    def to_block(self) -> bytes:
        """The 1024-byte block, with room left for GRUB to count tries."""
        try:
            block = format_envblock(self.to_env())
        except Rejected as e:
            raise e.context("instruction") from None
        _check_room(block, self.try_count)
        return block


def _check_room(block: bytes, try_count: int | None) -> None:
    if try_count is None and _free_space(block) < TRY_ROOM:
        raise Rejected(f"instruction: too long, GRUB needs {TRY_ROOM} free bytes in the block to count tries")


def parse_instruction(data: bytes) -> Instruction:
    """Validate a block as an instruction; anything malformed is `Rejected` with the reason."""
    try:
        env = parse_envblock(data)
    except Rejected as e:
        raise e.context("instruction") from None
    instruction = Instruction.from_env(env)
    _check_room(data, instruction.try_count)
    return instruction


def _read_block(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(ENVBLK_SIZE + 1)
    except FileNotFoundError:
        raise Rejected(f"no update instruction at {path}") from None
    except OSError as e:
        raise Rejected(f"cannot read instruction {path}: {e.strerror}") from None
    if len(data) > ENVBLK_SIZE:
        raise Rejected(f"instruction: {path} is larger than {ENVBLK_SIZE} bytes")
    return data


def read_instruction(path: str | Path) -> Instruction:
    """Read and validate the instruction at `path`; missing or malformed is `Rejected`."""
    return parse_instruction(_read_block(Path(path)))


def _replace(path: Path, block: bytes) -> None:
    try:
        atomic_write(path, block)
    except OSError as e:
        raise Failed(f"cannot write instruction {path}: {e.strerror or e}") from e
    # Durable now, but GRUB reads past the journal: write it out so the very next boot sees the new block.
    checkpoint_journal(path.parent)


def write_instruction(path: str | Path, instruction: Instruction) -> None:
    """Replace the instruction at `path` atomically: a power cut leaves the old one or the new one."""
    _replace(Path(path), instruction.to_block())


def clear_try(path: str | Path) -> Instruction:
    """Drop GRUB's `recovery_try` so the next boot tries the update again; everything else in the
    block, extra variables included, stays as it was. Returns the instruction as it now stands."""
    path = Path(path)
    data = _read_block(path)
    try:
        env = parse_envblock(data)
    except Rejected as e:
        raise e.context("instruction") from None
    if KEY_TRY not in env:
        return parse_instruction(data)
    # A counter GRUB cannot read (garbage, out of range) is what this command exists to clear; the
    # rest of the block must still be a valid instruction, or there is nothing to retry.
    del env[KEY_TRY]
    instruction = Instruction.from_env(env)
    try:
        block = format_envblock(env)
    except Rejected as e:
        raise e.context("instruction") from None
    _check_room(block, None)
    _replace(path, block)
    return instruction
