"""The disk rebuilt from a write log (vm/writelog.py) as a power cut could leave it: at the start, at
each flush, after the last one, and (for a seeded sample) with a random subset of the writes since a
flush on disk, as a write cache without ordering allows (DESIGN.md, "Crash states"). One working
image is updated in place, state after state; only the states to be booted become whole images.
"""

from __future__ import annotations

import bisect
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Self

from . import VMError
from .disk import DiskImage, Partition
from .drive import ImageFormat
from .writelog import Flag, FlushPoint, LogEntry, WriteLog, copy_sparse

_CHUNK = 4 << 20
_HOLE = 64 << 10


class StateKind(StrEnum):
    start = "start"  # the disk as it was when the recording began
    flush = "flush"  # everything up to a flush
    unordered = "unordered"  # up to a flush, then some of the writes before the next one
    end = "end"  # everything, after writes no flush followed


@dataclass(frozen=True)
class CrashState:
    """One state the disk can be left in. Its bytes are in the replay's one working image, so reading
    them (`read`, `export`, `export_partition`, `materialize`) works only until the next state is made.

    `point` is the flush whose writes are all in; `applied` the entries beyond it (for unordered and end
    states), out of `of` changes the disk was given between that flush and the next; `entries` the log
    prefix this state reaches (a phase the recorder noted at entry N covers the states with N <= entries).
    """

    index: int
    kind: StateKind
    point: FlushPoint
    entries: int
    applied: tuple[int, ...]
    of: int
    bytes: int
    mark: str | None
    replay: Replay = field(repr=False, compare=False)
    generation: int = field(repr=False, compare=False, default=0)

    @property
    def name(self) -> str:
        total = len(self.replay.points) - 1
        match self.kind:
            case StateKind.start:
                text = "start (nothing written)"
            case StateKind.flush:
                text = f"flush {self.point.index}/{total} (entry {self.point.entry})"
            case StateKind.unordered:
                text = (f"flush {self.point.index}/{total} + {len(self.applied)} of {self.of} writes after it "
                        f"(up to entry {self.entries - 1})")
            case StateKind.end:
                text = f"end: flush {self.point.index}/{total} + all {self.of} writes after it"
        return f"state {self.index}: {text}" + (f" [{self.mark}]" if self.mark else "")

    def _live(self) -> Path:
        return self.replay._current(self)

    def read(self, offset: int, size: int) -> bytes:
        with open(self._live(), "rb") as f:
            return os.pread(f.fileno(), size, offset)

    def export(self, offset: int, size: int, dest: Path) -> Path:
        """Bytes [offset, offset+size) of this state into the (sparse) file `dest`."""
        source = self._live()
        with open(source, "rb") as src, open(dest, "wb") as out:
            done = 0
            while done < size:
                chunk = os.pread(src.fileno(), min(_CHUNK, size - done), offset + done)
                if not chunk:
                    break
                for at in range(0, len(chunk), _HOLE):  # zeros stay holes
                    piece = chunk[at : at + _HOLE]
                    if piece.count(0) != len(piece):
                        os.pwrite(out.fileno(), piece, done + at)
                done += len(chunk)
            out.truncate(size)
        return dest

    def export_partition(self, key: str | int, dest: Path) -> Path:
        """One partition (by GPT name or number) of this state into `dest`."""
        part = self.replay.partition(key)
        return self.export(part.start, part.size, dest)

    def materialize(self, dest: Path) -> Path:
        """A whole disk image of this state (sparse, reflinked where it can be): for the few that boot."""
        copy_sparse(self._live(), dest)
        return dest

    def range_key(self, offset: int, size: int) -> tuple[int, tuple[int, ...]]:
        """Equal for two states whose bytes [offset, offset+size) are the same by construction (the
        same log entries touching them applied), so a check of one range can be reused."""
        touching = self.replay._touching(offset, size)
        base = self.point.entries if self.kind in (StateKind.unordered, StateKind.end) else self.entries
        before = bisect.bisect_left(touching, base)
        chosen = set(touching)
        return before, tuple(e for e in self.applied if e in chosen)


class Replay:
    """Rebuilds the disk, state after state, in one working image `workdir/state.img` copied from
    `base` (the raw disk the recording started from): each write is applied once, in log order, and an
    unordered state is undone again from a spool before the replay goes on. Use as a context manager."""

    def __init__(self, base: Path, log: WriteLog | Path, workdir: Path, *, discard_zeroes: bool = True) -> None:
        self.base = base
        self.log = log if isinstance(log, WriteLog) else WriteLog.read(log)
        self.workdir = workdir
        self.image = workdir / "state.img"
        self.discard_zeroes = discard_zeroes
        self.points = self.log.flush_points()
        self._generation = 0
        self._partitions: list[Partition] | None = None
        self._touch_cache: dict[tuple[int, int], list[int]] = {}
        self._fds: dict[str, int] = {}
        self._marks = [(e.number, e.mark) for e in self.log.entries if e.flags & Flag.MARK]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- the disk's layout ---------------------------------------------------------------------------

    def partition(self, key: str | int) -> Partition:
        """A partition of the disk, from the base's GPT (an update never rewrites the table)."""
        if self._partitions is None:
            self._partitions = DiskImage(self.base, ImageFormat.raw).partitions()
        for part in self._partitions:
            if part.number == key or part.name == key:
                return part
        raise VMError(f"{self.base} has no partition {key!r}")

    def _touching(self, offset: int, size: int) -> list[int]:
        key = (offset, size)
        if key not in self._touch_cache:
            self._touch_cache[key] = [e.number for e in self.log.entries if e.changes_disk
                                      and e.offset < offset + size and offset < e.offset + e.size]
        return self._touch_cache[key]

    # -- the states ----------------------------------------------------------------------------------

    def states(self, *, unordered: int = 0, seed: int = 0) -> Iterator[CrashState]:
        """The start, every flush point, the end (writes after the last flush) and `unordered` states
        with random subsets of the writes between two flushes, spread over the log by `seed`."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        copy_sparse(self.base, self.image)
        self.close()
        self._fds["work"] = os.open(self.image, os.O_RDWR)
        self._fds["log"] = os.open(self.log.path, os.O_RDONLY)
        intervals = self._intervals()
        fua = frozenset(e.number for e in self.log.entries if e.flags & Flag.FUA)
        samples = _sample(intervals, unordered, random.Random(seed), fua)
        index, written = 0, 0
        point = self.points[0]
        yield self._state(index, StateKind.start, point, 0, (), len(intervals[0]), written)
        for i, writes in enumerate(intervals):
            for subset in samples.get(i, ()):
                index += 1
                spool = self._apply_undoably(subset)
                extra = sum(self.log.entries[n].size for n in subset
                            if not self.log.entries[n].flags & Flag.DISCARD)
                yield self._state(index, StateKind.unordered, point, subset[-1] + 1, tuple(subset), len(writes),
                                  written + extra)
                self._undo(spool)
            end = self.points[i + 1].entries if i + 1 < len(self.points) else len(self.log.entries)
            for entry in self.log.entries[point.entries : end]:
                self._apply(entry)
                if entry.size and not entry.flags & (Flag.DISCARD | Flag.MARK):
                    written += entry.size
            index += 1
            if i + 1 < len(self.points):
                point = self.points[i + 1]
                following = len(intervals[i + 1]) if i + 1 < len(intervals) else 0
                yield self._state(index, StateKind.flush, point, point.entries, (), following, written)
            elif writes:
                yield self._state(index, StateKind.end, point, len(self.log.entries), tuple(writes), len(writes),
                                  written)
        self.close()  # the last state stays readable: the image holds it

    def _intervals(self) -> list[list[int]]:
        """The entries that change the disk between each flush point and the next (the last: after
        the last flush), flushes with data counted with the writes they end."""
        bounds = [p.entries for p in self.points] + [len(self.log.entries)]
        return [[e.number for e in self.log.entries[bounds[i] : bounds[i + 1]] if e.changes_disk
                 and not (e.flags & Flag.FLUSH)] for i in range(len(self.points))]

    def _state(self, index: int, kind: StateKind, point: FlushPoint, entries: int, applied: tuple[int, ...],
               of: int, written: int) -> CrashState:
        self._generation += 1
        at = bisect.bisect_left(self._marks, entries, key=lambda m: m[0])  # the last mark before `entries`
        mark = self._marks[at - 1][1] if at else None
        return CrashState(index, kind, point, entries, applied, of, written, mark, self, self._generation)

    def _current(self, state: CrashState) -> Path:
        if state.replay is not self or state.generation != self._generation:
            raise VMError(f"{state.name} is gone: the replay has moved on (read a state before taking the next)")
        return self.image

    # -- writing -------------------------------------------------------------------------------------

    def _apply(self, entry: LogEntry) -> None:
        work = self._fds["work"]
        if not entry.changes_disk:
            return
        if entry.flags & Flag.DISCARD:
            if self.discard_zeroes:
                _zero(work, entry.offset, entry.size)
            return
        _copy(self._fds["log"], entry.data_at, work, entry.offset, entry.size)

    def _apply_undoably(self, numbers: list[int]) -> list[tuple[int, int, int]]:
        """Apply some entries, keeping what they overwrite in a spool: (disk offset, size, spool offset)."""
        spool_path = self.workdir / "undo.spool"
        self._fds["spool"] = os.open(spool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        saved: list[tuple[int, int, int]] = []
        at = 0
        for n in numbers:
            entry = self.log.entries[n]
            _copy(self._fds["work"], entry.offset, self._fds["spool"], at, entry.size)
            saved.append((entry.offset, entry.size, at))
            at += entry.size
            self._apply(entry)
        return saved

    def _undo(self, saved: list[tuple[int, int, int]]) -> None:
        for offset, size, at in reversed(saved):
            _copy(self._fds["spool"], at, self._fds["work"], offset, size)
        os.close(self._fds.pop("spool"))
        (self.workdir / "undo.spool").unlink()


def _sample(
    intervals: list[list[int]], count: int, rng: random.Random, durable: frozenset[int] = frozenset()
) -> Mapping[int, list[list[int]]]:
    """`count` random subsets, each of one interval's writes: a random cut, then each write before it
    in or out (a FUA write, `durable`, always in: it was on disk when it completed), never none and
    never all (those are the flush points themselves). Intervals are drawn without repeats while there
    are enough; only intervals of at least two writes have such subsets."""
    eligible = [i for i, w in enumerate(intervals) if len(w) >= 2]
    chosen: dict[int, list[list[int]]] = {}
    if not eligible or count <= 0:
        return chosen
    picks: list[int] = []
    while len(picks) < count:
        picks += rng.sample(eligible, min(len(eligible), count - len(picks)))
    for i in sorted(picks):
        writes = intervals[i]
        for _ in range(100):
            cut = rng.randint(1, len(writes))
            subset = [n for n in writes[:cut] if rng.random() < 0.5 or n in durable]
            if subset and len(subset) < len(writes) and subset not in chosen.get(i, []):
                chosen.setdefault(i, []).append(subset)
                break
    for subsets in chosen.values():
        subsets.sort()
    return chosen


def _copy(src: int, src_at: int, dst: int, dst_at: int, size: int) -> None:
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, min(_CHUNK, size - done), src_at + done, dst_at + done)
        except OSError:
            n = 0
        if n <= 0:  # no copy_file_range here (or a short source): read and write
            chunk = os.pread(src, min(_CHUNK, size - done), src_at + done)
            if not chunk:
                raise VMError(f"write log: {size - done} bytes missing at byte {src_at + done}")
            n = os.pwrite(dst, chunk, dst_at + done)
        done += n


def _zero(fd: int, offset: int, size: int) -> None:
    zeros = bytes(min(_CHUNK, size))
    done = 0
    while done < size:
        done += os.pwrite(fd, zeros[: min(len(zeros), size - done)], offset + done)


__all__ = ["CrashState", "Replay", "StateKind"]
