"""`[fleet]` of the running system's configuration: the hawkBit DDI server an appliance reports to
(recovery/updated/fleet.py). In the core because the image builder checks an image config's
`[fleet]` with it too (mkimage/config.py)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from recovery.core.atomic import atomic_write
from recovery.core.errors import Rejected

log = logging.getLogger(__name__)


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
