"""Where a bundle or a feed comes from: an http(s) URL, a file:// URL or a plain path."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

from recovery.core.errors import Rejected


class Scheme(StrEnum):
    http = "http"
    https = "https"
    file = "file"

    @property
    def remote(self) -> bool:
        return self != Scheme.file


@dataclass(frozen=True)
class Source:
    """Where a bundle or feed comes from: a URL, or a local path (given plainly or as file://)."""

    scheme: Scheme
    url: str  # for a local file: its path, as given
    path: Path | None = None  # local files only
    # Sent with every request to this source's own URL but never after a redirect (a fleet server's
    # device token); kept out of repr so that it is never logged.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)
    filename: str | None = None  # the file's name when the URL does not end in it (a fleet server's artifact)

    @classmethod
    def parse(cls, text: str) -> Source:
        if not text:
            raise Rejected("empty source: give a URL or a file")
        parts = urllib.parse.urlsplit(text)
        # A path that exists wins over a URL reading: `a:b.bundle` is a file name, not a scheme.
        if not parts.scheme or Path(text).exists():
            return cls(Scheme.file, text, Path(text))
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise Rejected(f"file URL {text} names another host: only local files are supported")
            return cls(Scheme.file, text, Path(urllib.parse.unquote(parts.path)))
        if parts.scheme in (Scheme.http, Scheme.https):
            if not parts.hostname:
                raise Rejected(f"URL {text} has no host")
            return cls(Scheme(parts.scheme), text)
        raise Rejected(f"unsupported source {text}: use http://, https://, file:// or a path")

    @property
    def name(self) -> str:
        """The file name the source ends in; it names the staged file, so it must be a plain name."""
        if self.filename is not None:
            name = self.filename
        elif self.path is not None:
            name = self.path.name
        else:
            name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(self.url).path)).name
        if not name or name.startswith(".") or "/" in name or "\0" in name:
            raise Rejected(f"cannot tell a file name from {self.url}")
        return name

    def join(self, reference: str) -> Source:
        """A source relative to this one, as a link in a page at this URL would be."""
        if self.path is not None and not urllib.parse.urlsplit(reference).scheme:
            return Source(Scheme.file, os.fspath(self.path.parent / reference), self.path.parent / reference)
        return Source.parse(urllib.parse.urljoin(self.url, reference))

    def __str__(self) -> str:
        return self.url
