"""Release versions in the order people read them; shared by the feed, reflashctl and the recovery's
downgrade check."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering
from typing import Any

_PART = re.compile(r"\d+|[A-Za-z]+")


@total_ordering
@dataclass(frozen=True)
class Version:
    """A release version compared the way people read them: `1.10.0 > 1.9.0`, `2.0.0 > 2.0.0-rc1`.

    The release part (before `-` or `+`) compares by its dotted parts, numbers as numbers; a version
    with a pre-release suffix sorts before the same version without one; `+build` data is ignored.
    """

    text: str

    @staticmethod
    def _parts(text: str) -> tuple[tuple[int, int | str], ...]:
        # A word sorts before a number at the same position: `1.0.beta` < `1.0.1`, as people read it.
        return tuple((1, int(p)) if p.isdigit() else (0, p.lower()) for p in _PART.findall(text))

    def _key(self) -> tuple[Any, ...]:
        core, _, _build = self.text.partition("+")
        release, dash, pre = core.partition("-")
        parts = list(self._parts(release))
        while parts and parts[-1] == (1, 0):  # 1.0 == 1.0.0
            parts.pop()
        return (tuple(parts), (0, self._parts(pre)) if dash else (1, ()))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text
