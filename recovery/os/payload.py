"""The payload as the extractor reads it: one verified block at a time from the bundle file, decompressed\nin a thread of its own into a pipe, so that no byte reaches libarchive's tar reader unchecked; and the\nlibarchive calls both sides of that pipe make."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable
from ctypes import POINTER, byref, c_char_p, c_int, c_longlong, c_size_t, c_void_p

from recovery.core.bundle import VerifiedBundle
from recovery.core.errors import Failed
from recovery.core.libarchive_api import (
    ARCHIVE_FATAL,
    ARCHIVE_OK,
    entry_filetype,
    entry_hardlink,
    entry_pathname,
    entry_size,
    fn,
)
from recovery.core.output import Progress

# Big reads keep the per-block Python work negligible next to decompression and writing.
BLOCK = 1024 * 1024


READ_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_ssize_t, c_void_p, c_void_p, POINTER(c_void_p))


class A:
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


def reason(archive: int) -> str:
    """libarchive's message, with the OS error it carries ("Write failed: No space left on device")."""
    raw = A.error_string(archive)
    msg = raw.decode(errors="replace") if raw else "unknown libarchive error"
    code = A.errno(archive)
    # libarchive reuses EILSEQ and EINVAL for its own format and usage errors: not OS errors then.
    if code > 0 and code not in (errno.EILSEQ, errno.EINVAL) and os.strerror(code) not in msg:
        msg = f"{msg}: {os.strerror(code)}"
    return show(msg.encode())  # it may quote a name from the archive


def show(name: bytes) -> str:
    """A path for a message: readable even when it is not UTF-8, and on one line (control characters escaped)."""
    text = name.decode("utf-8", "backslashreplace")
    return text if text.isprintable() else "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class PayloadChanged(Exception):
    """A block of the payload read back differs from the one verification checked."""


class BlockSource:
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
        return A.read_open(archive, None, None, self.callback, None)

    def close(self) -> None:
        self.file.close()


class Decompressor(threading.Thread):
    """Decompresses the source with a libarchive filter (raw format) into a pipe, in a thread of its
    own: libarchive runs without the GIL, so reading, hashing and decompressing take one core and
    writing files another, as with GNU tar's `-I zstd` child."""

    def __init__(self, source: BlockSource, filt: str, pipe: int) -> None:
        super().__init__(name="payload-decompressor", daemon=True)
        self.source, self.filt, self.pipe = source, filt, pipe
        self.error: str | None = None

    def run(self) -> None:
        a = A.read_new()
        try:
            A.support_raw(a)
            A.filters[self.filt](a)
            entry = c_void_p()
            if self.source.attach(a) != ARCHIVE_OK or A.next_header(a, byref(entry)) != ARCHIVE_OK:
                self.error = reason(a)
                return
            # The whole stream in one call, in C: no Python (and no GIL) per block.
            if A.data_into_fd(a, self.pipe) != ARCHIVE_OK and A.errno(a) != errno.EPIPE:
                self.error = reason(a)  # (EPIPE: the extraction stopped reading; it reports why)
        finally:
            os.close(self.pipe)
            A.read_free(a)


class PayloadStream:
    """The payload's tar stream for the extractor: read straight from the source when uncompressed,
    else from a pipe that a decompressor thread fills."""

    def __init__(self, bundle: VerifiedBundle, progress: Progress | None) -> None:
        compression = str(bundle.manifest.payload.compression)
        if compression not in ("none", *A.filters):
            raise Failed(f"payload compression {compression!r} is not supported")
        self.source = BlockSource(bundle, progress)
        self.decompressor: Decompressor | None = None
        self._pipe: int | None = None
        if compression != "none":
            try:
                self._pipe, write_end = os.pipe()
            except OSError:
                self.source.close()
                raise
            grow_pipe(self._pipe)
            self.decompressor = Decompressor(self.source, compression, write_end)
            self.decompressor.start()

    def attach(self, archive: int) -> int:
        if self._pipe is None:
            return self.source.attach(archive)
        return A.read_open_fd(archive, self._pipe, BLOCK)

    def close(self, *, complete: bool) -> Failed | None:
        """Stop reading and wait for the decompressor; return its failure, if any.

        After a `complete` tar the rest of the stream is read, so that the decompressor finishes and a
        broken end of the stream is noticed.
        """
        try:
            if self._pipe is not None:
                try:
                    if complete:
                        drain(self._pipe)
                finally:
                    os.close(self._pipe)  # a decompressor still writing gets EPIPE and stops
            if self.decompressor is not None:
                self.decompressor.join()
        finally:
            self.source.close()
        if complete and self.decompressor is not None and self.decompressor.error is not None:
            return Failed(f"Failed to decompress the payload: {self.decompressor.error}")
        return None


def grow_pipe(fd: int) -> None:
    """Fewer, larger reads from the pipe (Linux default is 64 KiB)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, BLOCK)
    except OSError:
        pass


def drain(fd: int) -> None:
    """Read what follows the tar's end marker, so the decompressor can finish."""
    while os.read(fd, BLOCK):
        pass
