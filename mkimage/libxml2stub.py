"""A stand-in libxml2 for the recovery initramfs, so that libarchive loads without libxml2 and ICU.

libarchive calls libxml2 only for the xar format. The recovery reads tar bundles alone, yet the
dynamic loader (and ctypes' RTLD_NOW) needs every symbol libarchive imports. This stub defines
exactly those, each returning 0 (NULL: libarchive then reports the xar format as unusable), under the
symbol versions libarchive asks for. Dropping libxml2 lets ICU go too: 31 MB of the 40 MiB budget.
"""

from __future__ import annotations

import re
import tempfile
from collections import defaultdict
from pathlib import Path

from recovery.core.errors import Failed
from recovery.core.run import run

SONAME = "libxml2.so.2"
_IMPORT = re.compile(r"\*UND\*\s+\S+\s+\((LIBXML2_[0-9.]+)\)\s+(\w+)\s*$")


def imported_symbols(library: Path) -> dict[str, list[str]]:
    """The libxml2 symbols `library` imports, by symbol version."""
    out = run(["objdump", "-T", library]).stdout.decode()
    found: dict[str, list[str]] = defaultdict(list)
    for line in out.splitlines():
        if m := _IMPORT.search(line):
            found[m.group(1)].append(m.group(2))
    return {version: sorted(names) for version, names in sorted(found.items())}


def build_libxml2_stub(libarchive: Path, dest_dir: Path) -> Path:
    """Write `dest_dir`/libxml2.so.2 defining every libxml2 function `libarchive` imports."""
    symbols = imported_symbols(libarchive)
    if not symbols:
        raise Failed(f"{libarchive} imports nothing from libxml2: the stub is not needed or objdump changed")
    names = [name for version in symbols.values() for name in version]
    asm = ["\t.text"]
    for name in names:
        asm += [f"\t.globl {name}", f"\t.type {name}, @function", f"{name}:", "\txorl %eax, %eax", "\tret"]
    asm.append('\t.section .note.GNU-stack,"",@progbits')
    # Version nodes in the order libxml2 defines them (each inherits the one before).
    script = []
    previous = ""
    for version, version_names in symbols.items():
        body = " ".join(f"{n};" for n in version_names)
        script.append(f"{version} {{ global: {body} }} {previous};")
        previous = version
    script[0] = script[0].replace(" };", " local: *; };", 1)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / SONAME
    with tempfile.TemporaryDirectory(prefix="libxml2stub-") as tmp:
        src, obj, vers = Path(tmp, "stub.s"), Path(tmp, "stub.o"), Path(tmp, "stub.map")
        src.write_text("\n".join(asm) + "\n")
        vers.write_text("\n".join(script) + "\n")
        run(["as", "--64", "-o", obj, src])
        run(["ld", "-shared", "-soname", SONAME, "--version-script", vers, "-z", "noexecstack", "-o", target, obj])
    return target
