"""Install a verified bundle: erase the system file system, then extract the payload into it with
libarchive, hashing the payload again on the way and refusing every entry that would land outside.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ctypes import POINTER, byref, c_char_p, c_int, c_longlong, c_size_t, c_void_p
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path
from typing import TYPE_CHECKING

from recovery.core.acl import acl_entries, has_acl, without_id
from recovery.core.errors import Failed, Rejected
from recovery.core.libarchive_api import (
    ARCHIVE_EOF,
    ARCHIVE_FATAL,
    ARCHIVE_OK,
    ARCHIVE_WARN,
    entry_filetype,
    entry_hardlink,
    entry_pathname,
    entry_size,
    fn,
)
from recovery.core.output import Progress

if TYPE_CHECKING:
    from recovery.core.bundle import VerifiedBundle




log = logging.getLogger(__name__)


# Big reads keep the per-block Python work negligible next to decompression and writing.
BLOCK = 1024 * 1024


READ_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_ssize_t, c_void_p, c_void_p, POINTER(c_void_p))


AE_IFMT, AE_IFREG, AE_IFDIR, AE_IFLNK = 0o170000, 0o100000, 0o040000, 0o120000


class _A:
    """The libarchive calls extraction makes, with plain int results."""

    read_new = fn("read_new", c_void_p)
    support_tar = fn("read_support_format_tar", c_int, c_void_p)
    support_raw = fn("read_support_format_raw", c_int, c_void_p)
    data_into_fd = fn("read_data_into_fd", c_int, c_void_p, c_int)
    filters = {
        "zstd": fn("read_support_filter_zstd", c_int, c_void_p),
        "xz": fn("read_support_filter_xz", c_int, c_void_p),
        "gzip": fn("read_support_filter_gzip", c_int, c_void_p),
    }
    read_open_fd = fn("read_open_fd", c_int, c_void_p, c_int, c_size_t)
    read_open = fn("read_open", c_int, c_void_p, c_void_p, c_void_p, READ_CALLBACK, c_void_p)
    next_header = fn("read_next_header", c_int, c_void_p, POINTER(c_void_p))
    read_free = fn("read_free", c_int, c_void_p)
    disk_new = fn("write_disk_new", c_void_p)
    disk_options = fn("write_disk_set_options", c_int, c_void_p, c_int)
    extract2 = fn("read_extract2", c_int, c_void_p, c_void_p, c_void_p)
    write_close = fn("write_close", c_int, c_void_p)
    write_free = fn("write_free", c_int, c_void_p)
    error_string = fn("error_string", c_char_p, c_void_p)
    errno = fn("errno", c_int, c_void_p)
    pathname, hardlink, filetype, size = entry_pathname, entry_hardlink, entry_filetype, entry_size
    mtime = fn("entry_mtime", c_longlong, c_void_p)
    mtime_nsec = fn("entry_mtime_nsec", ctypes.c_long, c_void_p)
    atime = fn("entry_atime", c_longlong, c_void_p)
    atime_nsec = fn("entry_atime_nsec", ctypes.c_long, c_void_p)
    atime_is_set = fn("entry_atime_is_set", c_int, c_void_p)


class Extract(IntFlag):
    """archive_write_disk options (archive.h ARCHIVE_EXTRACT_*)."""

    OWNER = 0x0001
    PERM = 0x0002
    TIME = 0x0004
    ACL = 0x0020
    XATTR = 0x0080
    SECURE_SYMLINKS = 0x0100
    SECURE_NODOTDOT = 0x0200
    SECURE_NOABSOLUTEPATHS = 0x10000


# Everything a system tree carries, and libarchive's own confinement checks behind ours. Owners stay
# numeric (no lookup function is set): the payload's passwd is not the recovery OS's. Not
# ARCHIVE_EXTRACT_SPARSE: the holes the archive records come back anyway (libarchive seeks over
# them), while that flag would also punch holes wherever data happens to be zeros, which GNU tar
# does not do and which breaks files that must be dense (swapon refuses a swap file with holes).
EXTRACT_FLAGS = (
    Extract.OWNER | Extract.PERM | Extract.TIME | Extract.ACL | Extract.XATTR
    | Extract.SECURE_SYMLINKS | Extract.SECURE_NODOTDOT | Extract.SECURE_NOABSOLUTEPATHS
)


def _reason(archive: int) -> str:
    """libarchive's message, with the OS error it carries ("Write failed: No space left on device")."""
    raw = _A.error_string(archive)
    msg = raw.decode(errors="replace") if raw else "unknown libarchive error"
    code = _A.errno(archive)
    # libarchive reuses EILSEQ and EINVAL for its own format and usage errors: not OS errors then.
    if code > 0 and code not in (errno.EILSEQ, errno.EINVAL) and os.strerror(code) not in msg:
        msg = f"{msg}: {os.strerror(code)}"
    return _show(msg.encode())  # it may quote a name from the archive


def _raw_name_kept(archive: int) -> bool:
    """Whether a header warning only says a name was not UTF-8: GNU tar stores such names as raw
    bytes without pax's hdrcharset, and libarchive then keeps the raw bytes, as GNU tar does."""
    msg = _A.error_string(archive) or b""
    return b"can't be converted from" in msg


def _show(name: bytes) -> str:
    """A path for a message: readable even when it is not UTF-8, and on one line (control characters escaped)."""
    text = name.decode("utf-8", "backslashreplace")
    return text if text.isprintable() else "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _outside(name: bytes) -> str | None:
    """Why `name` (relative to the target) could point outside the target, or None."""
    if name.startswith(b"/"):
        return "absolute path"
    if b".." in name and b".." in name.split(b"/"):
        return "'..' in path"
    return None


def _symlinked_parent(name: bytes) -> bytes | None:
    """The first parent of `name` that is a symbolic link (relative to the cwd), or None."""
    parts = [p for p in name.split(b"/") if p not in (b"", b".")][:-1]
    for i in range(1, len(parts) + 1):
        prefix = b"/".join(parts[:i])
        try:
            if stat.S_ISLNK(os.lstat(prefix).st_mode):
                return prefix
        except OSError:
            return None
    return None


def _check_entry(name: bytes, hardlink: bytes | None, filetype: int) -> None:
    """Refuse an entry before libarchive touches the disk (libarchive's own checks stay on too).

    A system tree never repeats a name, so an existing path means a duplicate entry: an archive
    replacing a directory by a symlink to write through it later, or hiding what was verified.
    Only a directory over a directory (an implicit parent made earlier) is fine.
    """
    why = _outside(name)
    if why is None and hardlink is not None and (why := _outside(hardlink)) is not None:
        why = f"hard link to {_show(hardlink)}: {why}"
    if why is not None:
        raise Failed(f"Failed to extract {_show(name)}: {why}")
    # access() says "no" without raising: cheaper than lstat's exception for the usual new path.
    if not os.access(name, os.F_OK, follow_symlinks=False):
        return
    try:
        existing = os.lstat(name)
    except OSError:
        return
    if stat.S_ISDIR(existing.st_mode) and filetype == AE_IFDIR:
        return
    if (link := _symlinked_parent(name)) is not None:
        raise Failed(f"Failed to extract {_show(name)}: path goes through the symbolic link {_show(link)}")
    raise Failed(f"Failed to extract {_show(name)}: duplicate entry, the path exists already")


class PayloadChanged(Exception):
    """A block of the payload read back differs from the one verification checked."""


class _Source:
    """The payload for libarchive, one verified block at a time: a block is read whole and checked
    against its verified digest before libarchive sees any of it, so a payload that changes after
    verification (a rewritten file, a disk that answers a second read differently) stops at the first
    changed block with nothing of it extracted."""

    def __init__(self, bundle: VerifiedBundle, progress: Progress | None) -> None:
        self.blocks = bundle.blocks
        self.size = bundle.manifest.payload.size
        self.file = open(bundle.path, "rb", buffering=0)
        try:
            self.file.seek(bundle.payload_offset)
        except OSError:
            self.file.close()
            raise
        self.index = 0  # of the next block
        self.remaining = self.size
        self.progress = progress
        self.error: OSError | PayloadChanged | None = None
        # libarchive is done with a block when it asks for the next, so one buffer serves.
        self._buffer = ctypes.create_string_buffer(self.blocks.block_size)
        self._view = memoryview(self._buffer).cast("B")
        # libarchive keeps the pointer: the callback object must live as long as this source.
        self.callback = READ_CALLBACK(self._read)
        self.test_hook: Callable[[int], None] | None = None  # called before each block is read (tests)

    def _next(self) -> int:
        """Read and check the next block into the buffer; 0 at the end."""
        if not self.remaining:
            return 0
        if self.test_hook is not None:
            self.test_hook(self.index)
        want = min(self.blocks.block_size, self.remaining)
        n = 0
        while n < want and (got := self.file.readinto(self._view[n:want])):
            n += got
        if n < want:
            missing, self.remaining = self.remaining - n, 0
            raise PayloadChanged(f"bundle {self.file.name} now ends {missing} bytes before the end of its payload")
        # hashlib drops the GIL here: extraction goes on meanwhile
        if hashlib.sha256(self._view[:n]).digest() != self.blocks.digest(self.index):
            self.remaining = 0
            raise PayloadChanged(f"payload sha256 mismatch during extraction: {self.blocks.span(self.index, self.size)} "
                                 "changed after verification")
        self.index += 1
        self.remaining -= n
        if self.progress is not None:
            self.progress.update(n)
        return n

    def _read(self, archive: int, context: int, out: ctypes._Pointer) -> int:
        try:
            n = self._next()
        except (OSError, PayloadChanged) as e:
            self.error = e
            return ARCHIVE_FATAL
        out[0] = ctypes.addressof(self._buffer)
        return n

    def attach(self, archive: int) -> int:
        """Make this source the input of `archive`; returns libarchive's result."""
        return _A.read_open(archive, None, None, self.callback, None)

    def close(self) -> None:
        self.file.close()


class _Decompressor(threading.Thread):
    """Decompresses the source with a libarchive filter (raw format) into a pipe, in a thread of its
    own: libarchive runs without the GIL, so reading, hashing and decompressing take one core and
    writing files another, as with GNU tar's `-I zstd` child."""

    def __init__(self, source: _Source, filt: str, pipe: int) -> None:
        super().__init__(name="payload-decompressor", daemon=True)
        self.source, self.filt, self.pipe = source, filt, pipe
        self.error: str | None = None

    def run(self) -> None:
        a = _A.read_new()
        try:
            _A.support_raw(a)
            _A.filters[self.filt](a)
            entry = c_void_p()
            if self.source.attach(a) != ARCHIVE_OK or _A.next_header(a, byref(entry)) != ARCHIVE_OK:
                self.error = _reason(a)
                return
            # The whole stream in one call, in C: no Python (and no GIL) per block.
            if _A.data_into_fd(a, self.pipe) != ARCHIVE_OK and _A.errno(a) != errno.EPIPE:
                self.error = _reason(a)  # (EPIPE: the extraction stopped reading; it reports why)
        finally:
            os.close(self.pipe)
            _A.read_free(a)


class _PayloadStream:
    """The payload's tar stream for the extractor: read straight from the source when uncompressed,
    else from a pipe that a decompressor thread fills."""

    def __init__(self, bundle: VerifiedBundle, progress: Progress | None) -> None:
        compression = str(bundle.manifest.payload.compression)
        if compression not in ("none", *_A.filters):
            raise Failed(f"payload compression {compression!r} is not supported")
        self.source = _Source(bundle, progress)
        self.decompressor: _Decompressor | None = None
        self._pipe: int | None = None
        if compression != "none":
            try:
                self._pipe, write_end = os.pipe()
            except OSError:
                self.source.close()
                raise
            _grow_pipe(self._pipe)
            self.decompressor = _Decompressor(self.source, compression, write_end)
            self.decompressor.start()

    def attach(self, archive: int) -> int:
        if self._pipe is None:
            return self.source.attach(archive)
        return _A.read_open_fd(archive, self._pipe, BLOCK)

    def close(self, *, complete: bool) -> Failed | None:
        """Stop reading and wait for the decompressor; return its failure, if any.

        After a `complete` tar the rest of the stream is read, so that the decompressor finishes and a
        broken end of the stream is noticed.
        """
        try:
            if self._pipe is not None:
                try:
                    if complete:
                        _drain(self._pipe)
                finally:
                    os.close(self._pipe)  # a decompressor still writing gets EPIPE and stops
            if self.decompressor is not None:
                self.decompressor.join()
        finally:
            self.source.close()
        if complete and self.decompressor is not None and self.decompressor.error is not None:
            return Failed(f"Failed to decompress the payload: {self.decompressor.error}")
        return None


def _grow_pipe(fd: int) -> None:
    """Fewer, larger reads from the pipe (Linux default is 64 KiB)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, BLOCK)
    except OSError:
        pass


def _drain(fd: int) -> None:
    """Read what follows the tar's end marker, so the decompressor can finish."""
    while os.read(fd, BLOCK):
        pass


@dataclass(frozen=True)
class ExtractStats:
    files: int
    bytes: int


def _is_root(name: bytes) -> bool:
    return all(part in (b"", b".") for part in name.split(b"/"))


def _times(entry: c_void_p) -> tuple[int, int]:
    """(atime, mtime) of an entry in nanoseconds; a missing atime is taken to be the mtime."""
    mtime = _A.mtime(entry) * 1_000_000_000 + _A.mtime_nsec(entry)
    if not _A.atime_is_set(entry):
        return mtime, mtime
    return _A.atime(entry) * 1_000_000_000 + _A.atime_nsec(entry), mtime


def _normal(name: bytes) -> bytes:
    """An entry name as a key: `./usr//bin/` and `usr/bin` are the same path."""
    return b"/".join(p for p in name.split(b"/") if p not in (b"", b"."))


class _Admission:
    """What the manifest and the entries extracted so far allow the next entry to be.

    Counts are checked before an entry is written, so a payload that holds more than its signed
    manifest declares stops at the first entry past it, not after filling the disk. A hard link may
    only join a regular file this payload made (libarchive links a symlink itself and then calls
    chmod() and acl_set_file() by path, which follow it out of the target), and carries no data.
    """

    def __init__(self, files: int, nbytes: int) -> None:
        self.max_files, self.max_bytes = files, nbytes
        self.files = self.bytes = 0
        self.regular: set[bytes] = set()

    def admit(self, name: bytes, hardlink: bytes | None, filetype: int, size: int, acl: bool) -> None:
        if self.files == self.max_files:
            raise Failed(f"Failed to extract {_show(name)}: the payload holds more than the {self.max_files} "
                         "entries its manifest declares")
        if hardlink is not None:
            if _normal(hardlink) not in self.regular:
                raise Failed(f"Failed to extract {_show(name)}: hard link to {_show(hardlink)}, which is not a "
                             "regular file extracted earlier from this payload")
            if size:
                raise Failed(f"Failed to extract {_show(name)}: a hard link that carries {size} bytes of data")
        elif filetype == AE_IFREG:
            if size > self.max_bytes - self.bytes:
                raise Failed(f"Failed to extract {_show(name)}: its {size} bytes would pass the {self.max_bytes} "
                             f"file bytes its manifest declares ({self.bytes} extracted)")
            self.bytes += size
        elif acl and filetype == AE_IFLNK:
            # acl_set_file() follows a symlink; Linux keeps no ACL on one anyway.
            raise Failed(f"Failed to extract {_show(name)}: a symbolic link that carries an ACL")
        if hardlink is not None or filetype == AE_IFREG:
            self.regular.add(_normal(name))
        self.files += 1


def _extract_stream(stream: _PayloadStream, admission: _Admission) -> ExtractStats:
    """Extract the payload's tar stream into the current directory; count entries and file bytes."""
    a = _A.read_new()
    d = _A.disk_new()
    if not a or not d:
        raise Failed("libarchive: out of memory")
    entry = c_void_p()
    name = previous = b""
    root_times: tuple[int, int] | None = None
    try:
        _A.support_tar(a)
        _A.disk_options(d, int(EXTRACT_FLAGS))
        if stream.attach(a) != ARCHIVE_OK:
            raise Failed(f"Failed to read the payload: {_reason(a)}")
        # The loop runs once per entry, tens of thousands of times: libarchive's functions as locals.
        next_header, pathname, filetype_of, hardlink_of, size_of, extract2, admit = (
            _A.next_header, _A.pathname, _A.filetype, _A.hardlink, _A.size, _A.extract2, admission.admit)
        entry_ref = byref(entry)
        while True:
            r = next_header(a, entry_ref)
            if r == ARCHIVE_EOF:
                break
            name = pathname(entry) or b""
            if r != ARCHIVE_OK and not (r == ARCHIVE_WARN and _raw_name_kept(a)):
                raise Failed(f"Failed to extract {_show(name) or 'the entry after ' + _show(previous)}: {_reason(a)}")
            previous = name
            filetype = filetype_of(entry) & AE_IFMT
            hardlink = hardlink_of(entry)
            _check_entry(name, hardlink, filetype)
            acl = has_acl(entry)
            if acl and (unnumbered := without_id(acl_entries(entry))):
                raise Failed(f"Failed to extract {_show(name)}: its ACL names {unnumbered[0].describe()} without "
                             "a number, which the recovery cannot resolve (make the bundle with mkimage)")
            admit(name, hardlink, filetype, size_of(entry), acl)
            # Header, data and metadata in one call into libarchive. It reports any failure, the
            # disk writer's included, on the reading archive.
            if extract2(a, entry, d) != ARCHIVE_OK:
                raise Failed(f"Failed to extract {_show(name)}: {_reason(a)}")
            if filetype == AE_IFDIR and _is_root(name):
                root_times = _times(entry)
        # Directory modes and times are set last, here: a read-only directory must not stop its
        # children from being written.
        if _A.write_close(d) != ARCHIVE_OK:
            raise Failed(f"Failed to extract {_show(name)}: {_reason(d)}")
        # libarchive sets an existing directory's times at once, so for the target itself (which
        # exists) extracting its children undoes them: set them again at the end, as GNU tar does.
        if root_times is not None:
            os.utime(".", ns=root_times, follow_symlinks=False)
    finally:
        _A.write_free(d)
        _A.read_free(a)
    return ExtractStats(files=admission.files, bytes=admission.bytes)


@contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """libarchive writes relative to the process's cwd, and its confinement checks are relative to it."""
    old = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(path)
        yield
    finally:
        os.fchdir(old)
        os.close(old)


def extract_payload(bundle: VerifiedBundle, target: Path, *, progress: Progress | None = None) -> ExtractStats:
    """Extract the verified bundle's payload into `target`, checking every block on the way.

    Raises Failed if an entry is refused, libarchive fails, a block of the payload no longer has its
    verified sha256 (nothing of it or after it is extracted), or the entries do not add up to the
    manifest's counts.
    """
    manifest = bundle.manifest
    target = Path(os.path.abspath(target))
    stats: ExtractStats | None = None
    failure: Failed | None = None
    try:
        stream = _PayloadStream(bundle, progress)
    except OSError as e:
        raise Failed(f"Failed to read the payload from {bundle.path}: {e.strerror or e}") from None
    try:
        with _working_directory(target):
            stats = _extract_stream(stream, _Admission(manifest.rootfs_files, manifest.rootfs_bytes))
    except Failed as e:
        failure = e
    except OSError as e:
        failure = Failed(f"Failed to extract into {target}: {e.strerror or e}")
    except BaseException:
        stream.close(complete=False)
        raise
    failure = stream.close(complete=stats is not None) or failure
    # The payload's own failure first: whatever broke in the extraction broke because of it.
    match stream.source.error:
        case PayloadChanged() as changed:
            raise Failed(str(changed)) from failure
        case OSError() as e:
            raise Failed(f"Failed to read the payload from {bundle.path}: {e.strerror or e}") from failure
    if failure is not None:
        raise failure
    assert stats is not None
    if (stats.files, stats.bytes) != (manifest.rootfs_files, manifest.rootfs_bytes):
        raise Failed(
            f"payload has {stats.files} entries with {stats.bytes} file bytes, "
            f"the manifest says {manifest.rootfs_files} entries with {manifest.rootfs_bytes} bytes"
        )
    return stats


def apply_bundle(bundle: VerifiedBundle, target: Path, *, progress: Progress | None = None) -> ExtractStats:
    """Extract a verified bundle into `target`, which must be an existing empty directory.

    On a failure what was extracted is removed again, so the target is empty as it was found (it
    was empty, so everything in it is this extraction's), and the error says so.
    """
    check_target(target)
    try:
        return extract_payload(bundle, target, progress=progress)
    except Failed as e:
        try:
            _empty(target)
        except OSError as cleanup:
            raise Failed(f"{e}; the partial tree is left in {target} ({cleanup.strerror or cleanup})") from None
        raise Failed(f"{e}; removed the partial tree from {target}") from None


def _empty(directory: Path) -> None:
    """Remove everything in `directory` (not the directory), never following a symbolic link."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for entry in os.scandir(fd):
            if entry.is_dir(follow_symlinks=False):
                # rmtree works through directory fds on Linux: a symlink swapped in is not followed.
                shutil.rmtree(entry.name, dir_fd=fd)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)


def check_target(target: Path) -> None:
    """Reject a target that is not an existing, empty directory."""
    try:
        if not target.is_dir():
            raise Rejected(f"target {target} is not a directory" if target.exists() else f"target {target} does not exist")
        if any(target.iterdir()):
            raise Rejected(f"target {target} is not empty")
    except OSError as e:
        raise Rejected(f"target {target} is unusable: {e.strerror or e}") from None
