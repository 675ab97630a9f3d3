"""The running system's configuration for `reflashctl`: `/etc/recovery/system.toml` and the running version."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from recovery.core.atomic import atomic_write
from recovery.core.errors import Rejected
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


FLEET_KNOWN = {"server", "tenant", "controller_id", "controller_id_file", "token_file", "gateway_token", "hardware",
               "timeout", "retry_max", "progress_interval", "max_attempts"}


DEFAULT_FLEET_TOKEN = Path("/cfg/reflashctl/fleet-token")
# The device's id when system.toml names none: on cfg, so every release of this appliance keeps it.
DEFAULT_FLEET_ID = Path("/cfg/reflashctl/fleet-controller-id")
MACHINE_ID = Path("/etc/machine-id")


_ONE_WORD = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")  # as fleet.* strings: one printable word


@dataclass(frozen=True)
class FleetConfig:
    """`[fleet]`: the hawkBit DDI server this appliance reports to (reflash-fleet); off unless set.

    The token is not here: it is read from `token_file` (root's alone) when it is used, so that no
    printed or logged configuration can carry it."""

    server: str  # http(s)://host[:port][/prefix]
    controller_id: str | None = None  # None: the one in controller_id_file, made once (device_id)
    controller_id_file: Path = DEFAULT_FLEET_ID
    tenant: str = "DEFAULT"
    token_file: Path = DEFAULT_FLEET_TOKEN
    gateway_token: bool = False  # the file holds the tenant's gateway token, not this device's target token
    hardware: str = "default"  # reported as hw_revision: the server matches software against it
    timeout: float = 30.0  # seconds per request
    retry_max: float = 3600.0  # the longest wait between tries while the server is unusable
    progress_interval: float = 10.0  # seconds between progress feedbacks of a download
    max_attempts: int = 10  # downloads of one action that may break off before the action fails

    @classmethod
    def from_dict(cls, data: object, source: str) -> FleetConfig:
        if not isinstance(data, dict):
            raise Rejected(f"{source}: [fleet] must be a table")
        unknown = sorted(set(data) - FLEET_KNOWN)
        if unknown:
            log.warning("%s: ignoring unknown setting fleet.%s", source, ", fleet.".join(unknown))

        def text(key: str, default: str | None = None) -> str:
            value = data.get(key, default)
            if not isinstance(value, str) or not value or any(c.isspace() or ord(c) < 32 for c in value):
                raise Rejected(f"{source}: fleet.{key} must be a non-empty string without spaces")
            return value

        def number(key: str, default: float) -> float:
            value = data.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise Rejected(f"{source}: fleet.{key} must be a positive number")
            return float(value)

        server = text("server").rstrip("/")
        if not (server.startswith("http://") or server.startswith("https://")) or "?" in server or "#" in server:
            raise Rejected(f"{source}: fleet.server must be an http:// or https:// URL, not {server!r}")
        token_file = Path(text("token_file", str(DEFAULT_FLEET_TOKEN)))
        if not token_file.is_absolute():
            raise Rejected(f"{source}: fleet.token_file must be an absolute path")
        gateway = data.get("gateway_token", False)
        if not isinstance(gateway, bool):
            raise Rejected(f"{source}: fleet.gateway_token must be true or false")
        id_file = Path(text("controller_id_file", str(DEFAULT_FLEET_ID)))
        if not id_file.is_absolute():
            raise Rejected(f"{source}: fleet.controller_id_file must be an absolute path")
        return cls(server=server, controller_id=text("controller_id") if "controller_id" in data else None,
                   controller_id_file=id_file, tenant=text("tenant", "DEFAULT"),
                   token_file=token_file, gateway_token=gateway, hardware=text("hardware", "default"),
                   timeout=number("timeout", 30), retry_max=number("retry_max", 3600),
                   progress_interval=number("progress_interval", 10),
                   max_attempts=int(number("max_attempts", 10)))

    def device_id(self, product: str, *, make: bool = True, machine_id: Path = MACHINE_ID) -> str | None:
        """This device's controller id: `controller_id` when system.toml sets it, else the one word in
        `controller_id_file`. When that file is missing it is made (with `make`) from the machine id the
        first release booted with, as `<product>-<machine id>`, and kept: a system partition is replaced
        by every update, and its machine id with it. None: no id yet and `make` False."""
        if self.controller_id is not None:
            return self.controller_id
        try:
            text = self.controller_id_file.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            if not make:
                return None
            text = ""
        except (OSError, UnicodeDecodeError) as e:
            raise Rejected(f"cannot read the fleet controller id {self.controller_id_file}: {e}") from None
        else:
            if not _ONE_WORD.fullmatch(text):
                raise Rejected(f"the fleet controller id in {self.controller_id_file} is not one printable "
                               "word of at most 256 characters")
            return text
        try:
            machine = machine_id.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise Rejected(f"no fleet controller id: {self.controller_id_file} is missing and the machine "
                           f"id cannot be read ({e})") from None
        if not re.fullmatch(r"[0-9a-f]{32}", machine):
            raise Rejected(f"no fleet controller id: {self.controller_id_file} is missing and {machine_id} "
                           "holds no machine id")
        made = f"{product}-{machine}"
        self.controller_id_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.controller_id_file, (made + "\n").encode())
        return made

    def read_token(self) -> str:
        """The token, from a file no one but its owner may read (else it is refused, not used)."""
        try:
            fd = os.open(self.token_file, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            raise Rejected(f"cannot read the fleet token {self.token_file}: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise Rejected(f"the fleet token {self.token_file} is readable by others: chmod 600 it")
            token = f.read(4097).decode("ascii", errors="replace").strip()
        if not token or len(token) > 4096 or any(not c.isprintable() or c.isspace() for c in token):
            raise Rejected(f"the fleet token {self.token_file} is empty or not one printable word")
        return token


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
