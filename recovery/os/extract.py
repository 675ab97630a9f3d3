"""Extract a verified bundle's payload into a directory with libarchive: every block checked before it
is read (recovery/os/payload.py), every entry admitted against the manifest's counts and refused if it
would land outside the target, before libarchive writes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from ctypes import byref, c_void_p
from dataclasses import dataclass
from enum import IntFlag
from pathlib import Path
from typing import TYPE_CHECKING

from recovery.core.acl import acl_entries, has_acl, without_id
from recovery.core.errors import Failed, Rejected
from recovery.core.libarchive_api import (
    ARCHIVE_EOF,
    ARCHIVE_OK,
    ARCHIVE_WARN,
)
from recovery.core.output import Progress
from recovery.os.payload import A, PayloadChanged, PayloadStream, reason, show

if TYPE_CHECKING:
    from recovery.core.bundle import VerifiedBundle


log = logging.getLogger(__name__)


AE_IFMT, AE_IFREG, AE_IFDIR, AE_IFLNK = 0o170000, 0o100000, 0o040000, 0o120000


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


def _raw_name_kept(archive: int) -> bool:
    """Whether a header warning only says a name was not UTF-8: GNU tar stores such names as raw
    bytes without pax's hdrcharset, and libarchive then keeps the raw bytes, as GNU tar does."""
    msg = A.error_string(archive) or b""
    return b"can't be converted from" in msg


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
        why = f"hard link to {show(hardlink)}: {why}"
    if why is not None:
        raise Failed(f"Failed to extract {show(name)}: {why}")
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
        raise Failed(f"Failed to extract {show(name)}: path goes through the symbolic link {show(link)}")
    raise Failed(f"Failed to extract {show(name)}: duplicate entry, the path exists already")


@dataclass(frozen=True)
class ExtractStats:
    files: int
    bytes: int


def _is_root(name: bytes) -> bool:
    return all(part in (b"", b".") for part in name.split(b"/"))


def _times(entry: c_void_p) -> tuple[int, int]:
    """(atime, mtime) of an entry in nanoseconds; a missing atime is taken to be the mtime."""
    mtime = A.mtime(entry) * 1_000_000_000 + A.mtime_nsec(entry)
    if not A.atime_is_set(entry):
        return mtime, mtime
    return A.atime(entry) * 1_000_000_000 + A.atime_nsec(entry), mtime


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
            raise Failed(f"Failed to extract {show(name)}: the payload holds more than the {self.max_files} "
                         "entries its manifest declares")
        if hardlink is not None:
            if _normal(hardlink) not in self.regular:
                raise Failed(f"Failed to extract {show(name)}: hard link to {show(hardlink)}, which is not a "
                             "regular file extracted earlier from this payload")
            if size:
                raise Failed(f"Failed to extract {show(name)}: a hard link that carries {size} bytes of data")
        elif filetype == AE_IFREG:
            if size > self.max_bytes - self.bytes:
                raise Failed(f"Failed to extract {show(name)}: its {size} bytes would pass the {self.max_bytes} "
                             f"file bytes its manifest declares ({self.bytes} extracted)")
            self.bytes += size
        elif acl and filetype == AE_IFLNK:
            # acl_set_file() follows a symlink; Linux keeps no ACL on one anyway.
            raise Failed(f"Failed to extract {show(name)}: a symbolic link that carries an ACL")
        if hardlink is not None or filetype == AE_IFREG:
            self.regular.add(_normal(name))
        self.files += 1


def _extract_stream(stream: PayloadStream, admission: _Admission) -> ExtractStats:
    """Extract the payload's tar stream into the current directory; count entries and file bytes."""
    a = A.read_new()
    d = A.disk_new()
    if not a or not d:
        raise Failed("libarchive: out of memory")
    entry = c_void_p()
    name = previous = b""
    root_times: tuple[int, int] | None = None
    try:
        A.support_tar(a)
        A.disk_options(d, int(EXTRACT_FLAGS))
        if stream.attach(a) != ARCHIVE_OK:
            raise Failed(f"Failed to read the payload: {reason(a)}")
        # The loop runs once per entry, tens of thousands of times: libarchive's functions as locals.
        next_header, pathname, filetype_of, hardlink_of, size_of, extract2, admit = (
            A.next_header, A.pathname, A.filetype, A.hardlink, A.size, A.extract2, admission.admit)
        entry_ref = byref(entry)
        while True:
            r = next_header(a, entry_ref)
            if r == ARCHIVE_EOF:
                break
            name = pathname(entry) or b""
            if r != ARCHIVE_OK and not (r == ARCHIVE_WARN and _raw_name_kept(a)):
                raise Failed(f"Failed to extract {show(name) or 'the entry after ' + show(previous)}: {reason(a)}")
            previous = name
            filetype = filetype_of(entry) & AE_IFMT
            hardlink = hardlink_of(entry)
            _check_entry(name, hardlink, filetype)
            acl = has_acl(entry)
            if acl and (unnumbered := without_id(acl_entries(entry))):
                raise Failed(f"Failed to extract {show(name)}: its ACL names {unnumbered[0].describe()} without "
                             "a number, which the recovery cannot resolve (make the bundle with mkimage)")
            admit(name, hardlink, filetype, size_of(entry), acl)
            # Header, data and metadata in one call into libarchive. It reports any failure, the
            # disk writer's included, on the reading archive.
            if extract2(a, entry, d) != ARCHIVE_OK:
                raise Failed(f"Failed to extract {show(name)}: {reason(a)}")
            if filetype == AE_IFDIR and _is_root(name):
                root_times = _times(entry)
        # Directory modes and times are set last, here: a read-only directory must not stop its
        # children from being written.
        if A.write_close(d) != ARCHIVE_OK:
            raise Failed(f"Failed to extract {show(name)}: {reason(d)}")
        # libarchive sets an existing directory's times at once, so for the target itself (which
        # exists) extracting its children undoes them: set them again at the end, as GNU tar does.
        if root_times is not None:
            os.utime(".", ns=root_times, follow_symlinks=False)
    finally:
        A.write_free(d)
        A.read_free(a)
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
        stream = PayloadStream(bundle, progress)
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
