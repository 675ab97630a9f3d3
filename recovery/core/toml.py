"""Reading a TOML configuration file with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

from recovery.core.errors import Rejected


def read_toml(path: Path, what: str) -> dict:
    """A TOML file as a dict; missing or unreadable is `Rejected` naming `what` and why."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise Rejected(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise Rejected(f"{what} {path} is unreadable: {e}") from None
