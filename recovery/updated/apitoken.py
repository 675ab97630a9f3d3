"""The update service's access token: a random secret on cfg, root only, that every request to the
TCP listener carries (`X-Reflash-Token`); `reflashctl token` prints it."""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from recovery.core.atomic import atomic_write, fsync_dir
from recovery.core.errors import Failed

TOKEN = Path("reflashctl/daemon-token")  # below cfg


def read_or_create(cfg: Path) -> str:
    """The token, made on first use (32 random bytes, URL-safe) and kept across updates on cfg."""
    path = cfg / TOKEN
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    except OSError as e:
        raise Failed(f"cannot read the access token {path}: {e.strerror or e}") from None
    token = secrets.token_urlsafe(32)
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o755)
            fsync_dir(cfg)
        atomic_write(path, (token + "\n").encode(), mode=0o600)
    except OSError as e:
        raise Failed(f"cannot write the access token {path}: {e.strerror or e}") from None
    return token


def matches(given: str | None, token: str) -> bool:
    """Constant-time comparison: how much of a guess was right must not show in the time taken."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())
