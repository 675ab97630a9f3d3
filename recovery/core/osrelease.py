"""os-release(5), parsed once for both sides: the running system reads its own version from it, the
recovery the version of the system it is about to replace (result.json's `from_version`, the downgrade
check). One parser, so that both read `VERSION_ID='2.0'` as `2.0`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# os-release(5): /etc/os-release, and /usr/lib/os-release when /etc has none
PLACES = (Path("etc/os-release"), Path("usr/lib/os-release"))
_ESCAPED = {'"', "\\", "`", "$"}


@dataclass(frozen=True)
class OsRelease:
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def version_id(self) -> str | None:
        return self.fields.get("VERSION_ID") or None

    @classmethod
    def parse(cls, text: str) -> OsRelease:
        """`KEY=value` lines; values unquoted, in single quotes (literal) or double quotes (with \\" \\\\ \\` \\$
        escapes), as a shell would read them. Comments, blank lines and lines that are none of this are skipped."""
        fields: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            key, sep, raw = line.partition("=")
            if not sep or not key or line.startswith("#") or not (key.replace("_", "").isalnum() and key.isascii()):
                continue
            value = _unquote(raw.strip())
            if value is not None:
                fields[key] = value
        return cls(fields)


def _unquote(raw: str) -> str | None:
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        out, i, body = [], 0, raw[1:-1]
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body) and body[i + 1] in _ESCAPED:
                out.append(body[i + 1])
                i += 2
            else:
                out.append(body[i])
                i += 1
        return "".join(out)
    if raw and raw[0] in "'\"":
        return None  # an unterminated quote: not a value
    return raw


def read_os_release(root: Path = Path("/")) -> OsRelease:
    """The os-release of the tree at `root` (empty when there is none). A symlink that points at an
    absolute path is not followed below another root: it would name the reader's own file."""
    for place in PLACES:
        path = root / place
        try:
            if root != Path("/") and path.is_symlink() and os.readlink(path).startswith("/"):
                continue
            return OsRelease.parse(path.read_text(errors="replace"))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            break
    return OsRelease()
