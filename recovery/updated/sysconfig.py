"""The running system's configuration for `reflashctl`: `/etc/recovery/system.toml` and the running version."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from recovery.core.errors import Rejected
from recovery.core.fleetconfig import FleetConfig
from recovery.core.instruction import DiskSpec
from recovery.core.osrelease import OsRelease, read_os_release
from recovery.core.toml import read_toml

log = logging.getLogger(__name__)


DEFAULT_PATH = Path("/etc/recovery/system.toml")


ENV_VAR = "UPDATECTL_CONFIG"


INSTRUCTION = "update-instruction"  # below cfg; the name GRUB and the recovery look for


DEFAULT_OS_RELEASE = Path("/etc/os-release")


DEFAULT_RECOVERY_SOURCE = Path("/usr/lib/reflash/recovery")  # a release's own recovery OS, in its tree


KNOWN = {"product", "keys", "cfg", "storage", "storage_disk", "bundles", "os_release", "health_dir",
         "trial_time_limit", "health_timeout", "daemon", "fleet", "recovery_source", "recovery_disk", "kexec"}


DEFAULT_SOCKET = Path("/run/reflash/reflashd.sock")


DAEMON_KNOWN = {"socket", "listen", "feed"}


@dataclass(frozen=True)
class DaemonConfig:
    """`[daemon]`: where `reflashd` listens and which release feed its page checks."""

    socket: Path = DEFAULT_SOCKET  # root only; `reflashctl` looks for the daemon here
    listen: tuple[str, int] | None = None  # host and port of the TCP listener; off unless configured
    feed: str | None = None  # the release feed the page checks (a URL or a path)

    @classmethod
    def from_dict(cls, data: object, source: str) -> DaemonConfig:
        if not isinstance(data, dict):
            raise Rejected(f"{source}: [daemon] must be a table")
        unknown = sorted(set(data) - DAEMON_KNOWN)
        if unknown:
            log.warning("%s: ignoring unknown setting daemon.%s", source, ", daemon.".join(unknown))
        socket = data.get("socket", str(DEFAULT_SOCKET))
        if not isinstance(socket, str) or not Path(socket).is_absolute():
            raise Rejected(f"{source}: daemon.socket must be an absolute path")
        feed = data.get("feed")
        if feed is not None and (not isinstance(feed, str) or not feed):
            raise Rejected(f"{source}: daemon.feed must be a non-empty string")
        listen = data.get("listen")
        return cls(socket=Path(socket), listen=None if listen is None else parse_listen(listen, source), feed=feed)


def parse_listen(value: object, source: str) -> tuple[str, int]:
    """`"0.0.0.0:8080"`, `"[::1]:8080"` -> (host, port)."""
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Rejected(f"{source}: daemon.listen must be HOST:PORT, not {value!r}")
    return host, int(port)


@dataclass(frozen=True)
class SystemConfig:
    product: str
    keys: Path
    cfg: Path  # where the cfg partition is mounted
    storage: Path  # where the storage partition is mounted
    storage_disk: str  # how the recovery finds that partition: goes into the instruction
    bundles: PurePosixPath = PurePosixPath("bundles")  # below storage
    os_release: Path = DEFAULT_OS_RELEASE
    health_dir: Path = Path("/etc/recovery/health.d")  # the product's health checks, run before confirming
    trial_time_limit: float = 300.0  # seconds after boot a release on trial has to confirm, else it reboots
    health_timeout: float = 60.0  # seconds each health check may take
    daemon: DaemonConfig = DaemonConfig()
    fleet: FleetConfig | None = None  # no [fleet]: the appliance reports to no fleet server
    recovery_source: Path = DEFAULT_RECOVERY_SOURCE  # none there: the release carries no recovery
    recovery_disk: str = "PARTLABEL=recovery"  # the recovery partition, whose inactive slot gets it
    kexec: bool = True  # into the recovery by kexec, past the firmware and GRUB, when it can (kexec.py)

    @property
    def bundle_dir(self) -> Path:
        return self.storage / self.bundles

    @property
    def instruction(self) -> Path:
        return self.cfg / INSTRUCTION

    @classmethod
    def load(cls, path: Path | None = None) -> SystemConfig:
        """Read `path`, else $UPDATECTL_CONFIG, else /etc/recovery/system.toml."""
        if path is None:
            path = Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)
        return cls.from_dict(read_toml(path, "system configuration"), source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, object], *, source: str = "system configuration") -> SystemConfig:
        def text(key: str, default: str | None = None) -> str:
            value = data.get(key, default)
            if not isinstance(value, str) or not value:
                raise Rejected(f"{source}: {key} must be a non-empty string")
            return value

        def absolute(key: str, default: str | None = None) -> Path:
            value = Path(text(key, default))
            if not value.is_absolute():
                raise Rejected(f"{source}: {key} must be an absolute path, not {value}")
            return value

        def disk(key: str, default: str) -> str:
            try:
                return str(DiskSpec.parse(text(key, default)))
            except Rejected as e:
                raise e.context(f"{source}: {key}") from None

        unknown = sorted(set(data) - KNOWN)
        if unknown:
            # A warning, not a rejection: an image builder may add settings for other tools.
            log.warning("%s: ignoring unknown setting %s", source, ", ".join(unknown))
        # The bundle directory's path goes into the instruction, so it must stay below the storage mount.
        bundles = PurePosixPath(text("bundles", "bundles"))
        if bundles.is_absolute() or ".." in bundles.parts:
            raise Rejected(f"{source}: bundles must be a relative path below storage, not {bundles}")
        def flag(key: str, default: bool) -> bool:
            value = data.get(key, default)
            if not isinstance(value, bool):
                raise Rejected(f"{source}: {key} must be true or false")
            return value

        def seconds(key: str, default: float) -> float:
            value = data.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise Rejected(f"{source}: {key} must be a positive number of seconds")
            return float(value)

        return cls(
            health_dir=absolute("health_dir", "/etc/recovery/health.d"),
            trial_time_limit=seconds("trial_time_limit", 300),
            health_timeout=seconds("health_timeout", 60),
            product=text("product"),
            keys=absolute("keys", "/etc/recovery/keys"),
            cfg=absolute("cfg", "/cfg"),
            storage=absolute("storage", "/storage"),
            storage_disk=text("storage_disk", "PARTLABEL=storage"),
            bundles=bundles,
            os_release=absolute("os_release", str(DEFAULT_OS_RELEASE)),
            daemon=DaemonConfig.from_dict(data.get("daemon", {}), source),
            fleet=FleetConfig.from_dict(data["fleet"], source) if "fleet" in data else None,
            recovery_source=absolute("recovery_source", str(DEFAULT_RECOVERY_SOURCE)),
            recovery_disk=disk("recovery_disk", "PARTLABEL=recovery"),
            kexec=flag("kexec", True),
        )

    def running_version(self) -> str | None:
        """VERSION_ID from os-release; None when the file or the key is missing."""
        if self.os_release == DEFAULT_OS_RELEASE:
            return read_os_release().version_id  # /etc/os-release, else /usr/lib/os-release
        try:
            return OsRelease.parse(self.os_release.read_text(errors="replace")).version_id
        except OSError:
            return None
