"""Host-side check that an installed system partition holds exactly a bundle's payload.

The partition is exported from the (stopped) disk and read without mounting: debugfs lists every
inode's type, mode (setuid and sticky bits included), owner and size (`ls -p`, one run per directory
level), device numbers (`stat`) and extended attributes (`ea_list`, `ea_get`); `rdump` copies contents
and symlinks out for hashing (it loses setuid bits and device nodes, which is why metadata never comes
from its copy). The payload is read with libarchive. Every difference is reported, not just the first.

Extended attributes are compared except `system.*`: ext4 keeps POSIX ACLs there in its own on-disk
encoding, which the tar does not carry as xattrs (`acl_entries` reads them for a test to check).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import libarchive
import libarchive.ffi

from recovery.core.bundle import verify_bundle
from recovery.core.keys import Keyring
from recovery.core.run import run
from vm.disk import DiskImage

# made by mkfs, not by the payload
FILESYSTEM_OWN = frozenset({"lost+found"})
# What the demo system writes to its own root when it boots (its root is mounted read-write): the
# machine id systemd commits at the first boot, systemd's and the shell's state under /var, and what
# systemd-tmpfiles makes in /tmp (not a tmpfs there: .X11-unix and its kin). A tree compared after its
# release has run leaves these out; everything else must be the payload's.
RUNNING_WRITES = ("etc/machine-id", "var/lib/systemd", "var/log", "var/tmp", "var/cache", "root/.bash_history", "tmp")


@dataclass(frozen=True)
class Node:
    """One path of a tree: what the check compares."""

    kind: str  # file, dir, symlink, chr, blk, fifo, sock
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    content: str = ""  # sha256 of a file, target of a symlink, "major:minor" of a device
    xattrs: tuple[tuple[str, str], ...] = ()  # (name, value in hex), sorted; no system.* names

    def describe(self) -> str:
        xattrs = "".join(f" {name}={value[:16]}" for name, value in self.xattrs)
        return f"{self.kind} {self.mode:04o} {self.uid}:{self.gid} {self.content[:16]}{xattrs}"


@dataclass(frozen=True)
class Tree:
    nodes: dict[str, Node]
    links: list[frozenset[str]]  # groups of paths that must share one inode (hard links)


_KINDS = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), f"type-{stat.S_IFMT(mode):o}")


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def _compared(xattrs: Iterable[tuple[str, bytes]]) -> tuple[tuple[str, str], ...]:
    # A set: libarchive's pax writer records each xattr twice (LIBARCHIVE.xattr and SCHILY.xattr) and
    # its reader returns both; one name with two values still shows as two pairs.
    return tuple(sorted({(name, value.hex()) for name, value in xattrs if not name.startswith("system.")}))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the bundle's payload ---------------------------------------------------------------------------

_lib = libarchive.ffi.libarchive
_lib.archive_entry_xattr_reset.argtypes = [ctypes.c_void_p]
_lib.archive_entry_xattr_reset.restype = ctypes.c_int
_lib.archive_entry_xattr_next.argtypes = [
    ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
_lib.archive_entry_xattr_next.restype = ctypes.c_int


def _entry_xattrs(entry: libarchive.entry.ArchiveEntry) -> list[tuple[str, bytes]]:
    """The entry's extended attributes (libarchive-c has no API for them)."""
    pointer = entry._entry_p
    found = []
    if _lib.archive_entry_xattr_reset(pointer):
        name, value, size = ctypes.c_char_p(), ctypes.c_void_p(), ctypes.c_size_t()
        while _lib.archive_entry_xattr_next(pointer, ctypes.byref(name), ctypes.byref(value), ctypes.byref(size)) == 0:
            found.append((os.fsdecode(name.value or b""), ctypes.string_at(value, size.value) if value else b""))
    return found



def payload_tree(bundle: Path, keys: Path) -> Tree:
    """The tree a verified bundle's payload describes (the bundle is verified first)."""
    verified = verify_bundle(bundle, Keyring.load(keys))
    with bundle.open("rb") as f:
        f.seek(verified.payload_offset)
        payload = f.read(verified.manifest.payload.size)
    nodes: dict[str, Node] = {}
    hardlinks: dict[str, set[str]] = {}
    with libarchive.memory_reader(payload) as archive:
        for entry in archive:
            path = _norm(entry.pathname)
            if not path:
                continue
            if entry.islnk:
                target = _norm(entry.linkpath)
                nodes[path] = nodes[target]
                hardlinks.setdefault(target, {target}).add(path)
                continue
            mode = entry.mode
            if entry.issym:
                content = entry.linkpath
            elif entry.isreg:
                h = hashlib.sha256()
                for block in entry.get_blocks():
                    h.update(block)
                content = h.hexdigest()
            elif entry.isblk or entry.ischr:
                content = f"{entry.rdevmajor}:{entry.rdevminor}"
            else:
                content = ""
            nodes[path] = Node(_kind(mode), stat.S_IMODE(mode), entry.uid, entry.gid, content,
                               _compared(_entry_xattrs(entry)))
    return Tree(nodes, [frozenset(group) for group in hardlinks.values()])


# --- the installed partition ------------------------------------------------------------------------


def _debugfs(image: Path, requests: list[str]) -> list[tuple[str, str]]:
    """Run requests in one debugfs process; (request, its output) pairs in order."""
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", dir=image.parent, delete=False) as f:
        f.write("\n".join(requests) + "\n")
    try:
        out = run(["debugfs", "-f", f.name, image]).stdout.decode(errors="surrogateescape")
    finally:
        os.unlink(f.name)
    answers: list[tuple[str, str]] = []
    for chunk in re.split(r"^debugfs: ", out, flags=re.MULTILINE)[1:]:
        request, _, body = chunk.partition("\n")
        answers.append((request, body))
    if len(answers) != len(requests):
        raise AssertionError(f"debugfs answered {len(answers)} of {len(requests)} requests on {image}")
    return answers


def _q(path: str) -> str:
    if '"' in path or "\n" in path:
        raise AssertionError(f"path {path!r} cannot be quoted for debugfs")
    return f'"/{path}"'


def filesystem_tree(image: Path, scratch: Path) -> Tree:
    """The tree in an ext4 image file (journal already replayed), read with debugfs."""
    raw: dict[str, tuple[int, int, int, int]] = {}  # path -> inode, mode, uid, gid
    level = [""]
    while level:
        nxt: list[str] = []
        for (_, body), directory in zip(_debugfs(image, [f"ls -p {_q(d)}" for d in level]), level):
            for line in body.splitlines():
                parts = line.split("/")
                if len(parts) < 7 or parts[0] != "":
                    continue
                ino, mode, uid, gid, name = int(parts[1]), int(parts[2], 8), int(parts[3]), int(parts[4]), parts[5]
                if name in (".", ".."):
                    continue
                path = f"{directory}/{name}".lstrip("/")
                raw[path] = (ino, mode, uid, gid)
                if stat.S_ISDIR(mode):
                    nxt.append(path)
        level = nxt
    devices = [p for p, (_, mode, _, _) in raw.items() if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)]
    numbers: dict[str, str] = {}
    if devices:
        for path, (_, body) in zip(devices, _debugfs(image, [f"stat {_q(p)}" for p in devices])):
            m = re.search(r"Device major/minor number: (\d+):(\d+)", body)
            numbers[path] = f"{int(m.group(1))}:{int(m.group(2))}" if m else "?"
    xattrs = _filesystem_xattrs(image, list(raw), scratch)
    dump = scratch / "rdump"
    dump.mkdir()
    # rdump of each top-level entry: `rdump /` would need a name for the root
    tops = [p for p in raw if "/" not in p]
    run(["debugfs", "-R", f"rdump {' '.join(_q(p) for p in tops)} {dump}", image])
    nodes: dict[str, Node] = {}
    by_inode: dict[int, set[str]] = {}
    for path, (ino, mode, uid, gid) in raw.items():
        kind = _kind(mode)
        if kind == "file":
            content = _sha256_file(dump / path)
            by_inode.setdefault(ino, set()).add(path)
        elif kind == "symlink":
            content = os.readlink(dump / path)
        elif kind in ("chr", "blk"):
            content = numbers[path]
        else:
            content = ""
        nodes[path] = Node(kind, stat.S_IMODE(mode), uid, gid, content, _compared(xattrs.get(path, [])))
    return Tree(nodes, [frozenset(g) for g in by_inode.values() if len(g) > 1])


def _filesystem_xattrs(image: Path, paths: list[str], scratch: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Every path's extended attributes: names from `ea_list`, exact values from `ea_get -f`."""
    names: list[tuple[str, str]] = []
    for path, (_, body) in zip(paths, _debugfs(image, [f"ea_list {_q(p)}" for p in paths])):
        names += [(path, m.group(1)) for m in re.finditer(r"^  (\S+) \(\d+\)", body, re.MULTILINE)]
    found: dict[str, list[tuple[str, bytes]]] = {}
    if not names:
        return found
    values = scratch / "xattrs"
    values.mkdir()
    _debugfs(image, [f"ea_get -f {values / str(i)} {_q(path)} {name}" for i, (path, name) in enumerate(names)])
    for i, (path, name) in enumerate(names):
        found.setdefault(path, []).append((name, (values / str(i)).read_bytes()))
    return found


def acl_entries(disk: DiskImage, path: str, partition: str = "system") -> list[tuple[int, int, int | None]]:
    """The access ACL of `path` as ext4 stores it: (tag, permissions, id or None) per entry."""
    part = disk.partition(partition)
    with tempfile.TemporaryDirectory(prefix=".treecheck-", dir=disk.path.parent) as tmp:
        image = Path(tmp) / "partition"
        disk.export_range(part.start, part.size, image)
        raw = _filesystem_xattrs(image, [_norm(path)], Path(tmp)).get(_norm(path), [])
    value = dict(raw).get("system.posix_acl_access")
    if value is None:
        return []
    # ext4_acl_header (version 1), then entries of 8 bytes (tag, perm, id) or 4 (no id: owner, group, mask, other)
    entries, at = [], 4
    while at < len(value):
        tag, perm = int.from_bytes(value[at:at + 2], "little"), int.from_bytes(value[at + 2:at + 4], "little")
        if tag in (0x02, 0x08):  # ACL_USER, ACL_GROUP carry an id
            entries.append((tag, perm, int.from_bytes(value[at + 4:at + 8], "little")))
            at += 8
        else:
            entries.append((tag, perm, None))
            at += 4
    return entries


def installed_tree(disk: DiskImage, partition: str = "system") -> Tree:
    """The tree on a partition of a stopped disk, as the next mount would see it."""
    part = disk.partition(partition)
    with tempfile.TemporaryDirectory(prefix=".treecheck-", dir=disk.path.parent) as tmp:
        image = Path(tmp) / "partition"
        disk.export_range(part.start, part.size, image)
        return partition_tree(image, Path(tmp), what=f"partition {partition}")


def partition_tree(image: Path, scratch: Path, *, what: str = "the partition") -> Tree:
    """The tree in the ext4 image file `image` as the next mount would see it: its journal replayed
    first (`image` is changed), then read with debugfs, using `scratch` for the contents."""
    status = run(["e2fsck", "-p", "-E", "journal_only", image], check=False).returncode
    if status & ~1:
        raise AssertionError(f"{what} is no usable ext4 file system (e2fsck exit {status})")
    return filesystem_tree(image, scratch)


# --- comparison -------------------------------------------------------------------------------------


def differences(
    expected: Tree, actual: Tree, *, ignore: Iterable[str] = FILESYSTEM_OWN, running: Iterable[str] = (),
) -> list[str]:
    """Every way `actual` differs from `expected`; empty when they are the same tree. `ignore`: top-level
    names left out; `running`: paths left out with all below them (what a booted system writes, e.g.
    RUNNING_WRITES)."""
    skip, below = set(ignore), tuple(running)

    def kept(path: str) -> bool:
        return path.split("/", 1)[0] not in skip and not any(
            path == p or path.startswith(p + "/") for p in below)

    problems = []
    for path in sorted(set(expected.nodes) | set(actual.nodes)):
        if not kept(path):
            continue
        want, got = expected.nodes.get(path), actual.nodes.get(path)
        if got is None:
            problems.append(f"missing: {path}")
        elif want is None:
            problems.append(f"extra: {path}")
        elif want != got:
            problems.append(f"differs: {path}: expected {want.describe()}, found {got.describe()}")
    linked = {path: group for group in actual.links for path in group}
    for group in expected.links:
        first = min(group)
        if any(linked.get(path) != linked.get(first) or first not in linked for path in group):
            problems.append(f"hard links not kept: {', '.join(sorted(group))}")
    return problems


def check_installed(disk: DiskImage, bundle: Path, keys: Path) -> int:
    """Assert the system partition holds exactly the bundle's payload; returns how many paths were checked."""
    expected = payload_tree(bundle, keys)
    problems = differences(expected, installed_tree(disk))
    shown = "\n  ".join(problems[:30]) + (f"\n  ... {len(problems) - 30} more" if len(problems) > 30 else "")
    assert not problems, f"the installed tree differs from {bundle.name}'s payload:\n  {shown}"
    return len(expected.nodes)
