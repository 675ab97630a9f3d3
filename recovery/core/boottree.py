"""What a system tree must hold to boot, and how its paths resolve: symlinks followed inside the tree,
an absolute target starting again at the tree's root (as on the installed system). Shared by the
build-time check (mkimage/bootable.py, on a payload's index) and the rollback (on a mounted tree)."""

from __future__ import annotations

from collections.abc import Callable

KERNEL, INITRD = "boot/vmlinuz", "boot/initrd.img"  # what bootloader/grub.cfg loads
# Debian's own links to the newest kernel and initrd (linux-update-symlinks, without link_in_boot):
# `reflash bundle` adds KERNEL and INITRD pointing where these lead when a tree has only these.
DEBIAN_LINKS = {KERNEL: "vmlinuz", INITRD: "initrd.img"}
INITS = ("sbin/init", "etc/init", "bin/init")  # where the kernel looks for init, in its order
MAX_LINKS = 40

# path below the root -> ("symlink", target), (any other kind, None), or (None, None) when absent
Lookup = Callable[[str], tuple[str | None, str | None]]


def resolve(path: str, lookup: Lookup) -> str | None:
    """`path` with every symlink on the way followed inside the tree; None if it leads nowhere."""
    todo, done, hops = [p for p in path.split("/") if p not in ("", ".")], [], 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        kind, target = lookup("/".join([*done, part]))
        if kind is None:
            return None
        if kind == "symlink":
            hops += 1
            if hops > MAX_LINKS or not target:
                return None
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            if target.startswith("/"):
                done = []
            continue
        done.append(part)
    return "/".join(done)


def why_not(path: str, lookup: Lookup) -> str:
    """Why `path` leads nowhere (resolve gave None), in words for a one-line refusal."""
    todo, done, hops, via, absolute = [p for p in path.split("/") if p not in ("", ".")], [], 0, False, False
    while todo:
        part = todo.pop(0)
        if part == "..":
            if not done and via:
                return "a link on the way points outside the tree (.. past its root)"
            if done:
                done.pop()
            continue
        here = "/".join([*done, part])
        kind, target = lookup(here)
        if kind is None:
            return f"/{here} is not in the tree" + (" (an absolute link is read from the tree's root, not the "
                                                    "build host's)" if absolute else "")
        if kind == "symlink":
            hops += 1
            if hops > MAX_LINKS:
                return f"more than {MAX_LINKS} links on the way (a loop?)"
            if not target:
                return f"/{here} is an empty link"
            via = True
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            if target.startswith("/"):
                done, absolute = [], True
            continue
        if todo and kind != "dir":
            return f"/{here} is not a directory"
        done.append(part)
    return f"/{'/'.join(done)} is not a file"
