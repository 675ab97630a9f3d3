"""The image configuration: the embedded demo `default.toml`, overlaid by an operator's image.toml."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from recovery.core.errors import Rejected
from recovery.core.fleetconfig import FLEET_KNOWN, FleetConfig

MiB = 1024 * 1024

# Partitions in disk order: names are DESIGN.md's GPT names (and fs labels, except the ESP's).
PARTITION_NAMES = ("bios", "esp", "cfg", "recovery", "system", "storage")
# Below these a partition cannot hold what it must (core.img, GRUB, the recovery OS, a system).
MIN_MIB = {"bios": 1, "esp": 33, "cfg": 8, "recovery": 64, "system": 128, "storage": 16}

_NAME = re.compile(r"[a-z0-9][a-z0-9.+_-]*")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+~_-]*")
_SIZE = re.compile(r"(\d+)\s*(MiB|M|GiB|G)?", re.IGNORECASE)


class Firmware(StrEnum):
    """Which firmware the disk image boots under."""

    bios = "bios"
    uefi = "uefi"
    hybrid = "hybrid"

    @property
    def bios_boot(self) -> bool:
        return self in (Firmware.bios, Firmware.hybrid)

    @property
    def uefi_boot(self) -> bool:
        return self in (Firmware.uefi, Firmware.hybrid)


@dataclass(frozen=True)
class Partitions:
    """Partition sizes in bytes, whole MiB each."""

    bios: int
    esp: int
    cfg: int
    recovery: int
    system: int
    storage: int

    def items(self) -> list[tuple[str, int]]:
        return [(name, getattr(self, name)) for name in PARTITION_NAMES]

    @property
    def total(self) -> int:
        return sum(size for _, size in self.items())


@dataclass(frozen=True)
class Trial:
    """`[trial]`: how a newly installed release proves itself (DESIGN.md, "Trial boots and rollback")."""

    boots: int = 3  # boots GRUB gives it to confirm, 1 to 9; then the recovery rolls back
    time_limit: int = 300  # seconds a trial boot may take to confirm before it reboots
    health_timeout: int = 60  # seconds each health check in /etc/recovery/health.d may take


@dataclass(frozen=True)
class Daemon:
    """`[daemon]`: the update service's TCP listener (off when empty) and the feed its page checks."""

    listen: str = ""  # HOST:PORT, e.g. "0.0.0.0:8080"; every request on it needs the access token
    feed: str = ""  # a URL; empty: the page asks for none and `reflashctl check FEED` names one


@dataclass(frozen=True)
class ImageConfig:
    """Everything one `reflash build` needs to know, resolved and checked."""

    product: str
    version: str
    suite: str
    mirror: str
    security_mirror: str
    firmware: Firmware
    partitions: Partitions
    system_packages: tuple[str, ...]
    recovery_packages: tuple[str, ...]
    key_dir: Path | None
    output: Path
    cache: Path
    releases: tuple[str, ...]
    device_timeout: int = 30
    trial: Trial = Trial()
    daemon: Daemon = Daemon()
    signing_key: str = "signing.pem"  # the private key in key_dir that signs (DESIGN.md, "Signing keys")
    bundle_recovery: bool = False  # every release's bundle carries its own recovery OS
    # `[fleet]` for system.toml, as given (checked by FleetConfig); empty: no fleet client configured
    fleet: tuple[tuple[str, str | int | float | bool], ...] = ()

    @property
    def disk_size(self) -> int:
        """The raw image size: the partitions plus 1 MiB in front (GPT, alignment) and behind (backup GPT)."""
        return self.partitions.total + 2 * MiB

    @property
    def apt_sources(self) -> tuple[str, ...]:
        """The one-line sources mmdebstrap is given: the suite, its updates and its security fixes."""
        lines = [f"deb {self.mirror} {self.suite} main", f"deb {self.mirror} {self.suite}-updates main"]
        if self.security_mirror:
            lines.append(f"deb {self.security_mirror} {self.suite}-security main")
        return tuple(lines)


_KEYS = {
    "product", "version", "releases", "suite", "mirror", "security_mirror", "firmware", "key_dir",
    "output", "cache", "device_timeout", "partitions", "packages", "disk_size", "trial", "daemon",
    "signing_key", "bundle_recovery", "fleet",
}
_PACKAGE_KEYS = {"system", "recovery"}
_TRIAL_KEYS = {"boots", "time_limit", "health_timeout"}
_DAEMON_KEYS = {"listen", "feed"}
# Everything of system.toml's [fleet] but the device's own id (DESIGN.md "Fleets").
_FLEET_KEYS = FLEET_KNOWN - {"controller_id"}


def default_toml() -> dict[str, Any]:
    """The embedded demo configuration, parsed."""
    return tomllib.loads(resources.files("mkimage").joinpath("default.toml").read_text())


def load_config(path: Path | None, *, output: Path | None = None) -> ImageConfig:
    """Load `path` over the embedded defaults (None: the demo config); `output` overrides the file's.

    Paths in a file are relative to its directory. Raises Rejected with one line naming the file
    and the key for anything wrong.
    """
    data = default_toml()
    base = Path.cwd()
    where = "embedded default.toml"
    if path is not None:
        where = str(path)
        try:
            user = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise Rejected(f"config {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise Rejected(f"config {path}: cannot read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise Rejected(f"config {path}: not valid TOML: {e}") from None
        base = Path(path).resolve().parent
        data = _overlay(data, user, where)
        if "disk_size" in user and "storage" not in user.get("partitions", {}):
            data["partitions"].pop("storage", None)  # disk_size given: storage takes the rest
    try:
        return _parse(data, base, output)
    except (ValueError, TypeError, KeyError) as e:
        raise Rejected(f"config {where}: {e}") from None


def _overlay(defaults: dict[str, Any], user: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(user) - _KEYS)
    if unknown:
        raise Rejected(f"config {where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    merged = dict(defaults)
    for key, value in user.items():
        if key == "fleet" and isinstance(value, dict) and "controller_id" in value:
            raise Rejected(f"config {where}: fleet.controller_id is one device's: leave it out (each appliance "
                           "makes its own on cfg, or set controller_id_file)")
        if key in ("partitions", "packages", "trial", "daemon", "fleet"):
            if not isinstance(value, dict):
                raise Rejected(f"config {where}: [{key}] must be a table")
            known = {"partitions": set(PARTITION_NAMES), "packages": _PACKAGE_KEYS, "trial": _TRIAL_KEYS,
                     "daemon": _DAEMON_KEYS, "fleet": _FLEET_KEYS}[key]
            bad = sorted(set(value) - known)
            if bad:
                raise Rejected(f"config {where}: unknown key {key}.{bad[0]} (known: {', '.join(sorted(known))})")
            merged[key] = {**defaults.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def _parse(data: dict[str, Any], base: Path, output: Path | None) -> ImageConfig:
    product = _string(data, "product")
    if not _NAME.fullmatch(product):
        raise ValueError(f"product {product!r}: use lower-case letters, digits, '.', '+', '_', '-'")
    version = _version(_string(data, "version"), "version")
    releases = data.get("releases", [version])
    if not isinstance(releases, list) or not releases or not all(isinstance(r, str) for r in releases):
        raise ValueError("releases must be a non-empty list of version strings")
    releases_t = tuple(_version(r, "releases") for r in releases)
    if len(set(releases_t)) != len(releases_t):
        raise ValueError(f"releases list a version twice: {list(releases_t)}")
    try:
        firmware = Firmware(_string(data, "firmware"))
    except ValueError:
        raise ValueError(f"firmware {data['firmware']!r}: use one of {', '.join(Firmware)}") from None
    timeout = data.get("device_timeout", 30)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 600:
        raise ValueError(f"device_timeout {timeout!r}: seconds, 1 to 600")
    bundle_recovery = data.get("bundle_recovery", False)
    if not isinstance(bundle_recovery, bool):
        raise ValueError(f"bundle_recovery {bundle_recovery!r}: true or false")
    packages = data.get("packages", {})
    system_packages = _packages(packages, "system")
    recovery_packages = _packages(packages, "recovery")
    return ImageConfig(
        product=product,
        version=version,
        suite=_string(data, "suite"),
        mirror=_string(data, "mirror"),
        security_mirror=_optional_string(data, "security_mirror"),
        firmware=firmware,
        partitions=_partitions(data),
        system_packages=system_packages,
        recovery_packages=recovery_packages,
        key_dir=_path(data["key_dir"], base) if data.get("key_dir") else None,
        output=Path(output) if output is not None else _path(data.get("output", "out"), base if "output" in data else Path.cwd()),
        cache=_cache(data, base),
        releases=releases_t,
        device_timeout=timeout,
        trial=_trial(data.get("trial", {})),
        daemon=_daemon(data.get("daemon", {})),
        signing_key=_signing_key(data.get("signing_key", "signing.pem")),
        bundle_recovery=bundle_recovery,
        fleet=_fleet(data.get("fleet")),
    )


def _fleet(table: Any) -> tuple[tuple[str, str | int | float | bool], ...]:
    """`[fleet]`, checked as the appliance will read it, kept in the order given."""
    if table is None:
        return ()
    try:
        FleetConfig.from_dict(table, "[fleet]")
    except Rejected as e:
        raise ValueError(str(e).removeprefix("[fleet]: ")) from None
    for key, value in table.items():
        if not isinstance(value, str | int | float | bool):
            raise ValueError(f"fleet.{key} must be a string, a number or true/false")
    return tuple(table.items())


def _signing_key(value: Any) -> str:
    if not isinstance(value, str) or not value or "/" in value or value in (".", "..") or "\0" in value:
        raise ValueError(f"signing_key {value!r}: the name of a private key file in key_dir, e.g. \"signing.pem\"")
    return value


def _daemon(table: Any) -> Daemon:
    if not isinstance(table, dict):
        raise ValueError("[daemon] must be a table")
    listen, feed = table.get("listen", ""), table.get("feed", "")
    if not isinstance(listen, str) or not isinstance(feed, str):
        raise ValueError("daemon.listen and daemon.feed must be strings")
    host, _, port = listen.rpartition(":")
    if listen and (not host or not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"daemon.listen {listen!r}: HOST:PORT, e.g. \"0.0.0.0:8080\"")
    if any(c in listen + feed for c in '"\\\n'):
        raise ValueError("daemon.listen and daemon.feed must not contain quotes, backslashes or newlines")
    return Daemon(listen=listen, feed=feed)


def _trial(table: Any) -> Trial:
    if not isinstance(table, dict):
        raise ValueError("[trial] must be a table")
    limits = {"boots": (1, 9), "time_limit": (30, 86400), "health_timeout": (1, 3600)}
    values = {}
    for key, (low, high) in limits.items():
        value = table.get(key, getattr(Trial, key))
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"trial.{key} {value!r}: a whole number, {low} to {high}")
        values[key] = value
    if values["health_timeout"] >= values["time_limit"]:
        raise ValueError("trial.health_timeout must be shorter than trial.time_limit")
    return Trial(**values)


def _string(data: dict[str, Any], key: str) -> str:
    if key not in data:
        raise ValueError(f"{key} is missing")
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string, not {value!r}")
    return value


def _optional_string(data: dict[str, Any], key: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {value!r}")
    return value


def _version(value: str, key: str) -> str:
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise ValueError(f"{key}: {value!r} is not a version (letters, digits, '.', '+', '~', '_', '-')")
    return value


def _packages(packages: Any, key: str) -> tuple[str, ...]:
    if not isinstance(packages, dict):
        raise ValueError("[packages] must be a table")
    value = packages.get(key)
    if not isinstance(value, list) or not all(isinstance(p, str) and _NAME.fullmatch(p) for p in value):
        raise ValueError(f"packages.{key} must be a list of Debian package names, not {value!r}")
    if not any(p.startswith("linux-image-") for p in value):
        raise ValueError(f"packages.{key} needs a kernel (a linux-image-* package)")
    return tuple(value)


def parse_size(value: Any, key: str) -> int:
    """A size in bytes from an integer (MiB) or a string like "64MiB" or "1GiB"; whole MiB only."""
    if isinstance(value, int) and not isinstance(value, bool):
        mib = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        mib = int(m.group(1)) * (1024 if (m.group(2) or "M").upper().startswith("G") else 1)
    else:
        raise ValueError(f"{key} {value!r}: a size in MiB (64) or with a unit (\"64MiB\", \"1GiB\")")
    return mib * MiB


def _partitions(data: dict[str, Any]) -> Partitions:
    table = data.get("partitions")
    if not isinstance(table, dict):
        raise ValueError("[partitions] must be a table")
    sizes: dict[str, int] = {}
    for name in PARTITION_NAMES:
        if name == "storage" and name not in table:
            continue
        if name not in table:
            raise ValueError(f"partitions.{name} is missing")
        sizes[name] = parse_size(table[name], f"partitions.{name}")
    if "disk_size" in data:
        disk = parse_size(data["disk_size"], "disk_size")
        rest = disk - 2 * MiB - sum(sizes[n] for n in PARTITION_NAMES if n != "storage")
        if "storage" in sizes:
            raise ValueError("give either disk_size or partitions.storage, not both")
        sizes["storage"] = rest
    elif "storage" not in sizes:
        raise ValueError("partitions.storage is missing (or give disk_size)")
    for name in PARTITION_NAMES:
        if sizes[name] < MIN_MIB[name] * MiB:
            raise ValueError(
                f"partitions.{name} is {sizes[name] // MiB} MiB, it needs at least {MIN_MIB[name]} MiB"
                + (" (disk_size too small for the other partitions)" if name == "storage" and "disk_size" in data else "")
            )
    return Partitions(**sizes)


def _path(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a path")
    return base / Path(value).expanduser()


def _cache(data: dict[str, Any], base: Path) -> Path:
    env = os.environ.get("MKIMAGE_CACHE")
    if env:
        return Path(env).expanduser()
    if data.get("cache"):
        return _path(data["cache"], base)
    return Path("~/.cache/mkimage").expanduser()
