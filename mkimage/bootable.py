"""Refuse at build time a tree that cannot boot: a bundle of it would install, erase the working system
and leave one that never comes up. Checked on the payload itself, so a directory and a tar from
another builder are judged by exactly what the recovery will write.

What the boot menu and the kernel need (bootloader/grub.cfg, DESIGN.md "Bootable trees"): a kernel and
an initrd where GRUB loads them, an init where the kernel looks for one, and an os-release whose
VERSION_ID is the version the bundle is signed as. A stock Debian tree has its kernel and initrd only
behind the links /vmlinuz and /initrd.img: `boot_links` names the links the bundle step adds for GRUB.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from recovery.core.boottree import DEBIAN_LINKS, INITRD, INITS, KERNEL, resolve, why_not
from recovery.core.errors import Rejected
from recovery.core.osrelease import OsRelease

OS_RELEASE = ("etc/os-release", "usr/lib/os-release")  # os-release(5)


def normal(name: str) -> str:
    """A tar entry's name as a path below the root: `./usr//bin/` is `usr/bin`."""
    return "/".join(p for p in name.split("/") if p not in ("", "."))


@dataclass
class TreeIndex:
    """What the payload holds, by path: the entry's kind and its link target; the os-release files' text."""

    kinds: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    texts: dict[str, bytes] = field(default_factory=dict)

    def add(self, name: str, kind: str, target: str | None = None) -> None:
        self.kinds[normal(name)] = (kind, target)

    def wants_text(self, name: str) -> bool:
        return normal(name) in OS_RELEASE

    def resolve(self, path: str) -> str | None:
        """`path` with every symlink on the way followed inside the tree; None if it leads nowhere."""
        return resolve(path, lambda here: self.kinds.get(here, (None, None)))

    def lookup(self, here: str) -> tuple[str | None, str | None]:
        return self.kinds.get(here, (None, None))

    def why_not_file(self, path: str) -> str:
        """Why `path` is no file of the tree, in words."""
        found = self.resolve(path)
        if found is not None:
            return f"/{path} leads to /{found}, which is a {self.kinds[found][0]}, not a file"
        return why_not(path, self.lookup)

    def boot_links(self) -> list[tuple[str, str]]:
        """(path, relative target) of the links the boot menu needs and a Debian tree has only at its
        root: /boot/vmlinuz -> vmlinuz-6.1.0-18-amd64 where /vmlinuz leads to /boot/vmlinuz-6.1.0-18-amd64.
        Only where nothing is at the boot menu's path yet and /boot is a directory of the tree."""
        if self.kinds.get("boot", (None, None))[0] != "dir":
            return []
        links = []
        for path, debian in DEBIAN_LINKS.items():
            if path not in self.kinds and self.is_file(debian):
                found = self.resolve(debian)
                assert found is not None
                links.append((path, posixpath.relpath(found, posixpath.dirname(path))))
        return links

    def is_file(self, path: str) -> bool:
        found = self.resolve(path)
        return found is not None and self.kinds[found][0] in ("file", "hardlink")

    def os_release(self) -> OsRelease | None:
        for place in OS_RELEASE:
            found = self.resolve(place)
            if found is not None and found in self.texts:
                return OsRelease.parse(self.texts[found].decode(errors="replace"))
        return None


def check_bootable(index: TreeIndex, version: str) -> None:
    """Rejected, in one line naming every miss, unless the tree can boot as release `version`."""
    missing = []
    for path, what in ((KERNEL, "kernel"), (INITRD, "initrd")):
        if index.is_file(path):
            continue
        miss = f"no {what} at /{path}, which the boot menu loads"
        debian = DEBIAN_LINKS[path]
        if path in index.kinds:
            missing.append(f"{miss} ({index.why_not_file(path)})")
        elif index.is_file(debian):  # boot_links adds no link below a /boot that is not a directory
            missing.append(f"{miss}; Debian's link /{debian} leads to /{index.resolve(debian)}, but /boot is no "
                           f"directory of the tree to add /{path} to")
        elif debian in index.kinds:
            missing.append(f"{miss}, and Debian's link /{debian} leads to no file ({index.why_not_file(debian)})")
        else:
            missing.append(f"{miss}, nor Debian's link /{debian}")
    if not any(index.is_file(path) for path in INITS):
        missing.append(f"no init at {', '.join('/' + p for p in INITS)}, where the kernel looks")
    release = index.os_release()
    if release is None:
        missing.append(f"no os-release at {' or '.join('/' + p for p in OS_RELEASE)}")
    elif release.version_id != version:
        missing.append(f"os-release says VERSION_ID={release.version_id or '(none)'}, the bundle is {version}")
    if missing:
        raise Rejected(f"not bootable: {'; '.join(missing)} (--no-boot-check bundles it anyway)")
