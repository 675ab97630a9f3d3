"""What a system tree must hold to boot, and how its paths resolve: symlinks followed inside the tree,
an absolute target starting again at the tree's root (as on the installed system). Shared by the
build-time check (mkimage/bootable.py, on a payload's index) and the rollback (on a mounted tree)."""

from __future__ import annotations

from collections.abc import Callable

KERNEL, INITRD = "boot/vmlinuz", "boot/initrd.img"  # what bootloader/grub.cfg loads
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
