"""The libxml2 stand-in: libarchive loads with it, reads tar, and ICU is never mapped."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mkimage.libxml2stub import SONAME, build_libxml2_stub, imported_symbols

LIBARCHIVE = Path("/usr/lib/x86_64-linux-gnu/libarchive.so.13")
pytestmark = pytest.mark.skipif(
    not LIBARCHIVE.exists() or shutil.which("as") is None or shutil.which("objdump") is None,
    reason="needs Debian's libarchive13 and binutils (as, ld, objdump)",
)


def test_imports_are_found():
    symbols = imported_symbols(LIBARCHIVE)
    names = {n for version in symbols.values() for n in version}
    assert "xmlTextReaderRead" in names and "xmlNewTextWriterMemory" in names
    assert all(v.startswith("LIBXML2_") for v in symbols)


def test_libarchive_reads_tar_with_the_stub_and_without_icu(tmp_path):
    stub_dir = tmp_path / "lib"
    stub = build_libxml2_stub(LIBARCHIVE, stub_dir)
    assert stub.name == SONAME
    tar = tmp_path / "t.tar"
    member = tmp_path / "hello.txt"
    member.write_text("hello\n")
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(member, arcname="hello.txt")
    probe = (
        "import libarchive\n"
        f"with libarchive.file_reader({str(tar)!r}) as a:\n"
        "    print([(e.pathname, e.size) for e in a])\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(sorted({l.split()[-1] for l in maps.splitlines() if 'libxml2' in l or 'libicu' in l}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={"LD_LIBRARY_PATH": str(stub_dir)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[('hello.txt', 6)]", f"[{str(stub)!r}]"]
    assert "no version information" not in r.stderr


def test_stub_functions_return_null(tmp_path):
    # libarchive's xar code checks these results: NULL makes it report the format unusable, not crash.
    stub = ctypes.CDLL(str(build_libxml2_stub(LIBARCHIVE, tmp_path)))
    for name in ("xmlReaderForIO", "xmlNewTextWriterMemory", "xmlBufferCreate", "xmlTextReaderRead"):
        fn = getattr(stub, name)
        fn.restype = ctypes.c_void_p
        assert fn() is None
