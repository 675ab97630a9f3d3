"""libarchive calls declared afresh on the library libarchive-c loaded.

libarchive-c 2.9 wraps only part of the API, and its wrappers turn ARCHIVE_WARN into a log line (a
lost setuid bit or capability must fail the install instead). `fn` makes new function objects with
plain int results, leaving libarchive-c's own as they are; `TarReader` and `PaxWriter` read and
write archives entry by entry through them (mkimage's bundle step needs the entries themselves).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator


def _load() -> ctypes.CDLL:
    """The library libarchive-c would load (`LIBARCHIVE` names it), opened by its soname: libarchive-c's
    own search runs `ldconfig -p` in a subprocess, a second of the recovery OS's start under emulation."""
    try:
        return ctypes.CDLL(os.environ.get("LIBARCHIVE") or "libarchive.so.13")
    except OSError:
        import libarchive.ffi

        return libarchive.ffi.libarchive


lib = _load()


ARCHIVE_EOF, ARCHIVE_OK, ARCHIVE_WARN, ARCHIVE_FATAL = 1, 0, -20, -30


def fn(name: str, restype: type | None, *argtypes: type) -> ctypes._CFuncPtr:
    """`archive_<name>` with the given signature."""
    f = lib[f"archive_{name}"]
    f.restype = restype
    f.argtypes = argtypes
    return f


class ArchiveError(Exception):
    """libarchive failed; the message is its own."""


READ_BLOCK = 10240
WRITE_CHUNK = 1 << 20


AE_IFMT, AE_IFREG, AE_IFDIR, AE_IFLNK = 0o170000, 0o100000, 0o040000, 0o120000


entry_pathname = fn("entry_pathname", ctypes.c_char_p, ctypes.c_void_p)


entry_hardlink = fn("entry_hardlink", ctypes.c_char_p, ctypes.c_void_p)


entry_filetype = fn("entry_filetype", ctypes.c_int, ctypes.c_void_p)


entry_size = fn("entry_size", ctypes.c_longlong, ctypes.c_void_p)
entry_symlink = fn("entry_symlink", ctypes.c_char_p, ctypes.c_void_p)


_error_string = fn("error_string", ctypes.c_char_p, ctypes.c_void_p)


_read_new = fn("read_new", ctypes.c_void_p)


_read_support_tar = fn("read_support_format_tar", ctypes.c_int, ctypes.c_void_p)


_read_support_filters = fn("read_support_filter_all", ctypes.c_int, ctypes.c_void_p)


_read_open_filename = fn("read_open_filename", ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t)


_read_next_header = fn("read_next_header", ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p))


_read_data = fn("read_data", ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


_read_free = fn("read_free", ctypes.c_int, ctypes.c_void_p)


_write_new = fn("write_new", ctypes.c_void_p)


_write_set_format_pax = fn("write_set_format_pax", ctypes.c_int, ctypes.c_void_p)


_write_add_filter_by_name = fn("write_add_filter_by_name", ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)


_write_set_options = fn("write_set_options", ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)


_write_open_filename = fn("write_open_filename", ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)


_write_header = fn("write_header", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


_write_data = fn("write_data", ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


_write_finish_entry = fn("write_finish_entry", ctypes.c_int, ctypes.c_void_p)


_write_close = fn("write_close", ctypes.c_int, ctypes.c_void_p)


_write_free = fn("write_free", ctypes.c_int, ctypes.c_void_p)


_entry_new = fn("entry_new", ctypes.c_void_p)


_entry_free = fn("entry_free", None, ctypes.c_void_p)


_entry_set_pathname = fn("entry_set_pathname", None, ctypes.c_void_p, ctypes.c_char_p)


_entry_set_symlink = fn("entry_set_symlink", None, ctypes.c_void_p, ctypes.c_char_p)


_entry_set_filetype = fn("entry_set_filetype", None, ctypes.c_void_p, ctypes.c_uint)


_entry_set_perm = fn("entry_set_perm", None, ctypes.c_void_p, ctypes.c_uint)


_entry_set_mtime = fn("entry_set_mtime", None, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_long)


_entry_set_size = fn("entry_set_size", None, ctypes.c_void_p, ctypes.c_longlong)


def _check(archive: int, result: int) -> int:
    """A result below ARCHIVE_WARN is a failure (a warning, such as a name that is not UTF-8, is not)."""
    if result < ARCHIVE_WARN:
        raw = _error_string(archive)
        raise ArchiveError(raw.decode(errors="replace") if raw else f"libarchive error {result}")
    return result


def kind_of(entry: int) -> str:
    """`file`, `hardlink`, `dir`, `symlink` or `other`."""
    if entry_hardlink(entry) is not None:
        return "hardlink"
    return {AE_IFREG: "file", AE_IFDIR: "dir", AE_IFLNK: "symlink"}.get(entry_filetype(entry) & AE_IFMT, "other")


def is_regular(entry: int) -> bool:
    """A regular file with data of its own: not a hard link to an earlier entry."""
    return entry_filetype(entry) & AE_IFMT == AE_IFREG and entry_hardlink(entry) is None


class TarReader:
    """A tar archive (any compression) read entry by entry; iterating yields libarchive's entry
    pointer, valid until the next entry."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.archive = _read_new()
        _read_support_tar(self.archive)
        _read_support_filters(self.archive)
        try:
            _check(self.archive, _read_open_filename(self.archive, os.fsencode(path), READ_BLOCK))
        except ArchiveError:
            _read_free(self.archive)
            raise

    def __iter__(self) -> Iterator[int]:
        entry = ctypes.c_void_p()
        while _check(self.archive, _read_next_header(self.archive, ctypes.byref(entry))) != ARCHIVE_EOF:
            assert entry.value is not None
            yield entry.value

    def data(self, chunk: int) -> Iterator[memoryview]:
        """The current entry's data, sparse holes filled with zeros."""
        buffer = ctypes.create_string_buffer(chunk)
        view = memoryview(buffer).cast("B")
        while (n := _check(self.archive, _read_data(self.archive, buffer, chunk))) > 0:
            yield view[:n]

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        _read_free(self.archive)


class PaxWriter:
    """A pax archive written entry by entry, through a libarchive filter (`zstd`, `xz`, …) and options."""

    def __init__(self, path: os.PathLike[str] | str, filter_name: str | None = None, options: str = "") -> None:
        self.archive = _write_new()
        try:
            _check(self.archive, _write_set_format_pax(self.archive))
            if filter_name:
                _check(self.archive, _write_add_filter_by_name(self.archive, filter_name.encode()))
            if options:
                _check(self.archive, _write_set_options(self.archive, options.encode()))
            _check(self.archive, _write_open_filename(self.archive, os.fsencode(path)))
        except ArchiveError:
            _write_free(self.archive)
            raise

    def copy(self, entry: int, data: Iterator[memoryview]) -> None:
        """Write `entry` (a reader's, perhaps changed) with its data."""
        _check(self.archive, _write_header(self.archive, entry))
        for block in data:
            self._data(block)
        _check(self.archive, _write_finish_entry(self.archive))

    def symlink(self, path: str, target: str, mtime: int) -> None:
        """A new symbolic link entry `path` -> `target`, owned by root (uid and gid 0), mode 0777."""
        self._new(path, AE_IFLNK, 0o777, mtime, symlink=target)
        _check(self.archive, _write_finish_entry(self.archive))

    def directory(self, path: str, mtime: int, mode: int = 0o755) -> None:
        """A new directory entry `path`, owned by root (uid and gid 0)."""
        self._new(path, AE_IFDIR, mode, mtime)
        _check(self.archive, _write_finish_entry(self.archive))

    def file(self, path: str, source: os.PathLike[str] | str, mtime: int, mode: int = 0o644) -> int:
        """A new regular file entry `path` holding `source`'s data, owned by root (uid and gid 0); returns
        its size. The size is taken when `source` is opened: a file that shrinks meanwhile fails."""
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._new(path, AE_IFREG, mode, mtime, size=size)
            buffer = bytearray(WRITE_CHUNK)
            view, left = memoryview(buffer), size
            while left:
                n = f.readinto(view[: min(left, WRITE_CHUNK)])
                if not n:
                    raise ArchiveError(f"{source} shrank to {size - left} bytes while it was read")
                self._data(view[:n])
                left -= n
        _check(self.archive, _write_finish_entry(self.archive))
        return size

    def _new(self, path: str, filetype: int, mode: int, mtime: int, *, symlink: str | None = None,
             size: int | None = None) -> None:
        """Write the header of a new entry; libarchive's new entries are owned by uid and gid 0."""
        entry = _entry_new()
        try:
            _entry_set_pathname(entry, os.fsencode(path))
            _entry_set_filetype(entry, filetype)
            _entry_set_perm(entry, mode)
            _entry_set_mtime(entry, mtime, 0)
            if symlink is not None:
                _entry_set_symlink(entry, os.fsencode(symlink))
            if size is not None:
                _entry_set_size(entry, size)
            _check(self.archive, _write_header(self.archive, entry))
        finally:
            _entry_free(entry)

    def _data(self, block: memoryview) -> None:
        if _write_data(self.archive, (ctypes.c_char * len(block)).from_buffer(block), len(block)) < 0:
            _check(self.archive, ARCHIVE_FATAL)

    def __enter__(self) -> PaxWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                _check(self.archive, _write_close(self.archive))
        finally:
            _write_free(self.archive)
