"""libarchive calls declared afresh on the library libarchive-c loaded.

libarchive-c 2.9 wraps only part of the API, and its wrappers turn ARCHIVE_WARN into a log line (a
lost setuid bit or capability must fail the install instead). `fn` makes new function objects with
plain int results, leaving libarchive-c's own as they are.
"""

from __future__ import annotations

import ctypes

import libarchive.ffi

lib = libarchive.ffi.libarchive
ARCHIVE_EOF, ARCHIVE_OK, ARCHIVE_WARN, ARCHIVE_FATAL = 1, 0, -20, -30


def fn(name: str, restype: type | None, *argtypes: type) -> ctypes._CFuncPtr:
    """`archive_<name>` with the given signature."""
    f = lib[f"archive_{name}"]
    f.restype = restype
    f.argtypes = argtypes
    return f
