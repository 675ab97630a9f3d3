"""What GRUB told the recovery on the kernel command line, read strictly: anything it did not say is refused.

GRUB passes `recovery.try=1|2|3` (install), `recovery.mode=rescue`, optionally with the try, or
`recovery.mode=rollback` with the try (bootloader/recovery.cfg). A command line with other `recovery.*` words, or one of ours twice with
different values, was not made by our GRUB scripts; PID 1 answers it with the rescue shell, never
an install.
"""

from __future__ import annotations

from dataclasses import dataclass

from recovery.core.errors import UpdateError

# Every value GRUB writes, by name; `recovery.` is ours, other names are the kernel's business.
KNOWN: dict[str, tuple[str, ...]] = {
    "recovery.try": ("1", "2", "3"),
    "recovery.mode": ("rescue", "rollback"),
    "recovery.slot": ("a", "b"),  # the recovery slot GRUB loaded this recovery OS from
}


PREFIX = "recovery."


# The kernel's isspace(): lib/ctype.c.
_SPACE = " \t\n\v\f\r"


class CommandLineRefused(UpdateError):
    """The kernel command line carries recovery arguments GRUB would not have written."""

    kind = "refused"


def kernel_parameters(cmdline: str) -> list[tuple[str, str | None]]:
    """(name, value) for each parameter, split as the kernel splits them (lib/cmdline.c `next_arg`).

    Whitespace separates parameters except inside double quotes; the first `=` ends the name; a
    value in quotes (`a="b c"`) and a parameter in quotes (`"a=b c"`) lose them. A plain `split()`
    would see `recovery.mode="install"` as an unknown value and `"recovery.mode=install"` as no
    parameter of ours, where the kernel sees `recovery.mode` with the value `install`.
    """
    params: list[tuple[str, str | None]] = []
    rest = cmdline.lstrip(_SPACE)
    while rest:
        quoted = rest.startswith('"')
        if quoted:
            rest = rest[1:]
        in_quote, equals, end = quoted, None, 0
        while end < len(rest) and (in_quote or rest[end] not in _SPACE):
            if equals is None and rest[end] == "=":
                equals = end
            if rest[end] == '"':
                in_quote = not in_quote
            end += 1
        word, rest = rest[:end], rest[end + 1:].lstrip(_SPACE)
        if equals is None:
            params.append((word[:-1] if quoted and word.endswith('"') else word, None))
            continue
        name, value = word[:equals], word[equals + 1:]
        if value.startswith('"'):
            value = value[1:]
            if value.endswith('"'):
                value = value[:-1]
        elif quoted and value.endswith('"'):
            value = value[:-1]
        params.append((name, value))
    return params


def _show(value: str | None) -> str:
    """A value for a one-line console message: quoted, ASCII with escapes, cut short."""
    if value is None:
        return "no value"
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _choices(known: tuple[str, ...]) -> str:
    return known[0] if len(known) == 1 else f"{', '.join(known[:-1])} or {known[-1]}"


@dataclass(frozen=True)
class Boot:
    """What GRUB told us on the kernel command line."""

    try_count: int = 1
    rescue: bool = False
    rollback: bool = False  # the release on trial did not confirm: reinstall the fallback bundle
    slot: str | None = None  # `a` or `b`; None from a recovery partition without slots

    @classmethod
    def parse(cls, cmdline: str) -> Boot:
        """The boot GRUB asked for; CommandLineRefused for anything our GRUB scripts never write.

        Refused: a `recovery.*` name other than `recovery.try`, `recovery.mode` and `recovery.slot`, a
        value other than 1, 2, 3, rescue, rollback, a and b, and any name twice with different values (the kernel keeps
        them all, and which one counts would be ours to guess). The same word twice is harmless.
        Without `recovery.try` the try is 1; without `recovery.mode` the recovery installs.
        """
        seen: dict[str, str | None] = {}
        for name, value in kernel_parameters(cmdline):
            if not name.startswith(PREFIX):
                continue
            known = KNOWN.get(name)
            if known is None:
                raise CommandLineRefused(f"unknown parameter {_show(name)}")
            if name in seen and seen[name] != value:
                raise CommandLineRefused(f"{name} given twice ({_show(seen[name])}, then {_show(value)})")
            if value is None:
                raise CommandLineRefused(f"{name} without a value")
            if value not in known:
                raise CommandLineRefused(f"{name} is {_show(value)}, not {_choices(known)}")
            seen[name] = value
        mode = seen.get("recovery.mode")
        return cls(try_count=int(seen.get("recovery.try") or 1), rescue=mode == "rescue", rollback=mode == "rollback",
                   slot=seen.get("recovery.slot"))
