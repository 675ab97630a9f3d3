"""POSIX ACLs of libarchive entries, and the rule that a payload names users and groups by number.

The recovery extracts with no user lookup: owners and ACL entries get the numbers the payload
carries, because the appliance's passwd is not the recovery OS's. GNU tar's `--acls`, however,
writes a named entry as `user:alice:r--` with no number whenever the packing machine knows the name,
and such an entry cannot be applied where the name is unknown: libarchive fails the file, after the
system partition was erased. So bundles are made with numbers (mkimage resolves names on the machine
that packed the tree) and the extractor names the problem if one slips through.
"""

from __future__ import annotations

from collections.abc import Callable
from ctypes import POINTER, byref, c_char_p, c_int, c_void_p
from dataclasses import dataclass

from recovery.core.libarchive_api import ARCHIVE_OK, fn

ACCESS, DEFAULT = 0x100, 0x200  # ARCHIVE_ENTRY_ACL_TYPE_*


POSIX1E = ACCESS | DEFAULT


USER, USER_OBJ, GROUP, GROUP_OBJ, MASK, OTHER = 10001, 10002, 10003, 10004, 10005, 10006


_reset = fn("entry_acl_reset", c_int, c_void_p, c_int)


_next = fn("entry_acl_next", c_int, c_void_p, c_int, POINTER(c_int), POINTER(c_int), POINTER(c_int), POINTER(c_int),
           POINTER(c_char_p))


_clear = fn("entry_acl_clear", None, c_void_p)


_add = fn("entry_acl_add_entry", c_int, c_void_p, c_int, c_int, c_int, c_int, c_char_p)


@dataclass(frozen=True)
class AclEntry:
    type: int  # ACCESS or DEFAULT
    permset: int
    tag: int
    id: int  # -1 when the entry carries only a name (or needs no id: owner, group, mask, other)
    name: bytes | None

    @property
    def needs_id(self) -> bool:
        return self.tag in (USER, GROUP)

    def describe(self) -> str:
        what = "user" if self.tag == USER else "group"
        return f"{what} {(self.name or b'').decode(errors='replace')!r}"


def has_acl(entry: int | c_void_p) -> bool:
    """Cheap: whether the entry has POSIX ACL entries beyond its mode bits (one call into libarchive)."""
    return _reset(entry, POSIX1E) > 0


def acl_entries(entry: int | c_void_p) -> list[AclEntry]:
    found: list[AclEntry] = []
    if _reset(entry, POSIX1E) <= 0:
        return found
    kind, permset, tag, qual, name = c_int(), c_int(), c_int(), c_int(), c_char_p()
    while _next(entry, POSIX1E, byref(kind), byref(permset), byref(tag), byref(qual), byref(name)) == ARCHIVE_OK:
        found.append(AclEntry(kind.value, permset.value, tag.value, qual.value, name.value))
    return found


def without_id(entries: list[AclEntry]) -> list[AclEntry]:
    """The named user and group entries that carry no number."""
    return [e for e in entries if e.needs_id and e.id < 0]


def number_acl(entry: int | c_void_p, resolve: Callable[[AclEntry], int]) -> bool:
    """Give every named entry of the entry's ACL a number from `resolve`; True if anything changed."""
    entries = acl_entries(entry)
    if not without_id(entries):
        return False
    fixed = [AclEntry(e.type, e.permset, e.tag, resolve(e), e.name) if e.needs_id and e.id < 0 else e
             for e in entries]
    _clear(entry)
    for e in fixed:
        if _add(entry, e.type, e.permset, e.tag, e.id, e.name) != ARCHIVE_OK:
            raise ValueError(f"libarchive refused the ACL entry {e}")
    return True
