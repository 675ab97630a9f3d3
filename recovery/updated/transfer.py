"""Fetching bundles and feeds for `reflashctl`: http(s) with resume via `Range`, and local files.

A transfer writes `<name>.partial` and never renames it: the caller does, after verification.
"""

from __future__ import annotations

import errno
import http.client
import logging
import math
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from recovery.core.errors import Failed, Rejected, UpdateError
from recovery.core.output import MiB, Progress, strip_controls
from recovery.updated.source import Scheme, Source

log = logging.getLogger(__name__)


CHUNK = 1024 * 1024


TIMEOUT = 30.0  # seconds without progress before a transfer counts as interrupted


USER_AGENT = "reflashctl/1"


PARTIAL = ".partial"


FreeSpace = Callable[[Path], int]


Report = Callable[[int, int | None], None]  # (bytes in the partial file, expected total or None), per chunk


def free_space(path: Path) -> int:
    """Bytes available to us (not to root's reserve) on the file system holding `path`."""
    return int(psutil.disk_usage(os.fspath(path)).free)


def _mib_up(n: int) -> int:
    return math.ceil(n / MiB)


def check_space(directory: Path, need: int, *, where: Path | None = None, free: FreeSpace = free_space) -> None:
    available = free(directory)
    if need > available:
        raise Rejected(
            f"not enough space on {where or directory}: need {_mib_up(need)} MiB, {available // MiB} MiB free"
        )


def _reason(e: BaseException) -> str:
    """The words of a network error without the layers of wrapping urllib adds."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {strip_controls(str(e.reason))}"  # the reason phrase is the server's
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
        if not isinstance(e, BaseException):
            return str(e)
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


@dataclass(frozen=True)
class Transfer:
    """What a download did: where the bytes are and how many came over the network this time."""

    path: Path
    size: int
    received: int
    resumed_at: int = 0


class _Target:
    """The `.partial` file being written; its disk-full errors become one clear rejection."""

    def __init__(self, path: Path, where: Path) -> None:
        self.path = path
        self.where = where
        try:
            self.file = open(path, "ab")
        except OSError as e:
            raise Rejected(f"cannot write {path}: {e.strerror or e}") from None

    @property
    def size(self) -> int:
        return self.file.tell()

    def truncate(self) -> None:
        self.file.seek(0)
        self.file.truncate()

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Rejected(f"not enough space on {self.where}: the disk filled up while downloading") from None
            raise Failed(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self, *, sync: bool) -> None:
        try:
            self.file.flush()
            if sync:
                os.fsync(self.file.fileno())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Rejected(f"not enough space on {self.where}: the disk filled up while downloading") from None
            raise Failed(f"cannot write {self.path}: {e.strerror or e}") from None
        finally:
            self.file.close()


class Interrupted(Failed):
    """A good transfer broke off: the partial file stays, and the same command resumes it."""


class _Unreachable(Rejected):
    """The server could not be reached at all: says nothing against a partial file from an earlier try."""


Unreachable = _Unreachable  # for callers that tell a server that is down from a bad source (reflashd: 502)


class _RangeNotSatisfiable(Exception):
    def __init__(self, total: int | None) -> None:
        super().__init__(f"range not satisfiable (size {total})")
        self.total = total


def download(
    source: Source,
    partial: Path,
    *,
    where: Path | None = None,
    size: int | None = None,
    free: FreeSpace = free_space,
    timeout: float = TIMEOUT,
    progress: bool = True,
    report: Report | None = None,
) -> Transfer:
    """Fetch `source` into `partial`, resuming a remote transfer from the bytes already there.

    `size` is the expected size when the caller knows it (from a feed) and the server does not say.
    Errors: `Rejected` when the source is bad or the disk too small (the partial file is removed),
    `Interrupted` when a good transfer broke off (the partial file stays, to be resumed).
    `report` is called after every chunk; an exception it raises stops the transfer (a `Rejected`
    one removes the partial file, an `Interrupted` one keeps it).
    """
    where = where or partial.parent
    existed = partial.exists()
    target = _Target(partial, where)
    try:
        if source.scheme.remote:
            received, resumed_at = _http(source, target, size=size, free=free, timeout=timeout, progress=progress,
                                         report=report)
        else:
            received, resumed_at = _copy(source, target, free=free, progress=progress, report=report), 0
        total = target.size
        target.close(sync=True)
        return Transfer(partial, total, received, resumed_at)
    except BaseException as e:
        target.file.close()
        # What a later run can resume stays: a broken-off transfer, an older partial file while the
        # server is merely unreachable, a download the operator stopped. A bad source or a full disk
        # leaves nothing behind.
        keep = (
            isinstance(e, Interrupted)
            or (isinstance(e, _Unreachable) and existed)
            or (isinstance(e, KeyboardInterrupt) and source.scheme.remote)
        )
        if not keep:
            partial.unlink(missing_ok=True)
        raise


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to http or https, and never from https down to http.

    urllib alone follows one to ftp:// too, and from https to plain http: the transfer would then leave
    the transport the operator chose. Refused with one line, before anything is fetched from there."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def redirect_request(
        self, req: urllib.request.Request, fp: object, code: int, msg: str, headers: object, newurl: str
    ) -> urllib.request.Request | None:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        came_from = urllib.parse.urlsplit(req.full_url).scheme.lower()
        why = None
        if scheme not in (Scheme.http, Scheme.https):
            why = "only http and https are followed"
        elif came_from == Scheme.https and scheme == Scheme.http:
            why = "never from https to http"
        if why is not None:
            close = getattr(fp, "close", None)
            if close is not None:
                close()
            target = strip_controls(newurl)
            raise Rejected(f"cannot download {self.source}: HTTP {code} redirect to {target} refused: {why}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # type: ignore[arg-type]


def _open(source: Source, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(source.url, headers=headers)
    for key, value in source.headers:
        request.add_unredirected_header(key, value)  # a redirect elsewhere does not get the token
    opener = urllib.request.build_opener(_Redirects(source))
    try:
        return opener.open(request, timeout=timeout)  # the scheme is checked in Source.parse, redirects above
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and offset:
                span = _content_range(e.headers.get("Content-Range"))
                raise _RangeNotSatisfiable(span[1] if span else None) from None
            if e.code >= 500 or e.code in (408, 429):
                # The server is struggling, the source may be fine: like an unreachable server.
                raise _Unreachable(f"cannot download {source}: {_reason(e)}") from None
            raise Rejected(f"cannot download {source}: {_reason(e)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Unreachable(f"cannot download {source}: {_reason(e)}") from None


def _content_range(value: str | None) -> tuple[int | None, int | None] | None:
    """`bytes 100-199/200` -> (100, 200), `bytes */200` -> (None, 200), `…/*` -> (…, None); else None."""
    if not value:
        return None
    unit, _, spec = value.strip().partition(" ")
    span, _, total = spec.partition("/")
    first, _, _last = span.partition("-")
    if unit.lower() != "bytes" or not (first.isdigit() or span == "*"):
        return None
    return int(first) if first.isdigit() else None, int(total) if total.isdigit() else None


def _http(
    source: Source, target: _Target, *, size: int | None, free: FreeSpace, timeout: float, progress: bool,
    report: Report | None = None,
) -> tuple[int, int]:
    """Returns (bytes received, offset resumed at)."""
    offset = target.size
    try:
        response = _open(source, offset, timeout)
    except _RangeNotSatisfiable as e:
        if e.total == offset:
            log.info("%s was downloaded completely before", source.name)
            return 0, offset
        # What we have is not a prefix of what the server has now.
        log.info("the server cannot resume at %d MiB: starting over", offset // MiB)
        target.truncate()
        offset = 0
        response = _open(source, 0, timeout)
    with response:
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        if offset and response.status == 206:
            span = _content_range(response.headers.get("Content-Range"))
            if span is None or span[0] != offset:
                # A range other than the one asked for: do not guess, fetch it whole.
                log.info("the server sent an unexpected range: starting over")
                response.close()
                target.truncate()
                return _http(source, target, size=size, free=free, timeout=timeout, progress=progress,
                             report=report)
            log.info("resuming %s at %d MiB", source.name, offset // MiB)
        elif offset:
            log.info("the server does not resume (HTTP %d): starting over", response.status)
            target.truncate()
            offset = 0
        if response.status not in (200, 206):
            raise Rejected(f"cannot download {source}: unexpected HTTP {response.status} {response.reason}")
        if remaining is None and size is not None:
            remaining = max(size - offset, 0)
        if remaining is not None:
            check_space(target.path.parent, remaining, where=target.where, free=free)
        return _pump(response, target, remaining, source, progress=progress, offset=offset, report=report), offset


def _pump(
    response: http.client.HTTPResponse,
    target: _Target,
    remaining: int | None,
    source: Source,
    *,
    progress: bool,
    offset: int,
    report: Report | None = None,
) -> int:
    total = offset + remaining if remaining is not None else None
    # http.client returns a short body without complaint: the length is ours to check.
    # read1: whatever one read brings (up to CHUNK), so that progress and a stop come at a slow
    # server's pace too, not once per full chunk.
    return _move(response.read1, target, remaining, f"downloading {source.name}", progress=progress,
                 failed=lambda have, why: _interrupted(source, offset + have, total, why), report=report,
                 report_total=total)


def _move(
    read: Callable[[int], bytes], target: _Target, length: int | None, label: str, *, progress: bool,
    failed: Callable[[int, str], UpdateError], bar_total: int | None = None,
    report: Report | None = None, report_total: int | None = None,
) -> int:
    """Copy `length` bytes (None: to the end) from `read` into `target`, CHUNK by CHUNK, with a progress
    bar; a read that fails, or ends before `length`, raises `failed(bytes so far, why)`."""
    bar_total = length if bar_total is None else bar_total
    bar = Progress(bar_total, label, stream=sys.stdout) if progress and bar_total else None
    moved = 0
    while length is None or moved < length:
        try:
            data = read(CHUNK if length is None else min(CHUNK, length - moved))
        except (OSError, http.client.HTTPException) as e:
            raise failed(moved, _reason(e)) from None
        if not data:
            if length is None:
                break
            raise failed(moved, "connection closed early")
        target.write(data)
        moved += len(data)
        if bar:
            bar.update(len(data))
        if report is not None:
            report(target.size, report_total)
    if bar:
        bar.finish()
    return moved


def _interrupted(source: Source, have: int, total: int | None, why: str) -> Interrupted:
    of = f" of {total / MiB:.1f}" if total is not None else ""
    return Interrupted(
        f"download of {source} interrupted after {have / MiB:.1f}{of} MiB: {why}; "
        "run the same command again to resume"
    )


def _copy(source: Source, target: _Target, *, free: FreeSpace, progress: bool, report: Report | None = None) -> int:
    assert source.path is not None
    try:
        f = open(source.path, "rb")
    except FileNotFoundError:
        raise Rejected(f"no such file: {source.path}") from None
    except IsADirectoryError:
        raise Rejected(f"{source.path} is a directory, not a bundle") from None
    except OSError as e:
        raise Rejected(f"cannot read {source.path}: {e.strerror or e}") from None
    with f:
        # A local copy is quick: always start over rather than trust an older partial file.
        target.truncate()
        size = os.fstat(f.fileno()).st_size
        check_space(target.path.parent, size, where=target.where, free=free)
        return _move(f.read, target, None, f"copying {source.name}", progress=progress, bar_total=size,
                     failed=lambda have, why: Rejected(f"cannot read {source.path}: {why}"), report=report,
                     report_total=size)


def fetch(source: Source, *, limit: int = 4 * MiB, timeout: float = TIMEOUT) -> bytes:
    """A small document (a feed, its signature) in memory; `Rejected` with the reason when it cannot be had."""
    if source.path is not None:
        try:
            with open(source.path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise Rejected(f"no such file: {source.path}") from None
        except OSError as e:
            raise Rejected(f"cannot read {source.path}: {e.strerror or e}") from None
    else:
        with _open(source, 0, timeout) as response:
            try:
                data = response.read(limit + 1)
            except (OSError, http.client.HTTPException) as e:
                raise Rejected(f"cannot download {source}: {_reason(e)}") from None
    if len(data) > limit:
        raise Rejected(f"{source} is larger than {limit // MiB} MiB: not a release feed")
    return data
