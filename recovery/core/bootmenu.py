"""The boot menu's decision (bootloader/recovery.cfg and grub.cfg, which a recovery slot's menu.cfg
carries and the ESP's stub.cfg sources) as a function of what GRUB reads on cfg.

`decide` follows the scripts line by line, and `load_env` / `save_env` model GRUB's own environment
block code (grub-core/lib/envblk.c, commands/loadenv.c), not our writer's: GRUB reads more than
`recovery.core.envblock.parse_envblock` accepts, and fails to write in ways of its own.
What differs (DESIGN.md, "Crash states"):

- A block is any file of at least 26 bytes that starts with `# GRUB Environment Block\\n`: shorter or
  longer than 1024 bytes is fine. No signature, or 25 bytes or fewer: `load_env` fails.
- Reading stops quietly at a name without `=` up to the end of the file, or at a value that runs to
  the end without a newline; what was read before stays set and `load_env` succeeds.
- An empty line is not skipped: it becomes the start of the next name. Names may be empty or hold
  newlines. A name set twice: the last one wins. A NUL byte ends a name or a value (C strings).
  Bytes are bytes (no UTF-8 check); here they are read as Latin-1, one character per byte.
- `save_env` fails where `load_env` does, when the last byte before the trailing `#` padding is not a
  newline, and when there is no room; also when the file is sparse or cannot be written, which no
  bytes show: the caller says so with `save_fails`. (`grub-editenv` creates a missing file; GRUB does not.)
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

from recovery.core.envblock import ENVBLK_HEADER

# The files GRUB reads on cfg, by their path on cfg (bootloader/recovery.cfg).
INSTRUCTION = "update-instruction"
GRUBENV = "recovery/grubenv"
TRIAL = "recovery/trial"
SLOT = "recovery/slot"
FILES = (INSTRUCTION, GRUBENV, TRIAL, SLOT)

# GRUB compares counters with literals only (it has no arithmetic): the scripts' chains.
RECOVERY_NEXT = {"": "1", "1": "2", "2": "3"}
TRIAL_NEXT = {str(n): str(n + 1) for n in range(1, 9)}

SYSTEM_WORDS = ("root=PARTLABEL=system", "rw", "quiet", "panic=10")
WATCHDOG = "systemd.watchdog_sec=30"
CONSOLES = ("console=tty0", "console=ttyS0,115200")

_NEWLINE, _BACKSLASH, _HASH = 0x0A, 0x5C, 0x23


class Entry(StrEnum):
    """The menu's entries, by id, in menu order; `number` is what GRUB 2.06's `fallback` takes."""

    system = "system"
    recovery = "recovery"
    rescue = "rescue"
    rollback = "rollback"

    @property
    def number(self) -> int:
        return list(Entry).index(self)


# --- GRUB's environment blocks --------------------------------------------------------------------


def grub_block(data: bytes | None) -> bool:
    """Whether GRUB opens `data` as an environment block at all (grub_envblk_open)."""
    return data is not None and len(data) > len(ENVBLK_HEADER) and data.startswith(ENVBLK_HEADER)


def _next_line(buf: bytes | bytearray, p: int) -> int:
    """Where GRUB's next line starts (find_next_line: a backslash escapes the next byte, even a newline)."""
    end = len(buf)
    while p < end:
        if buf[p] == _BACKSLASH:
            p += 2
        elif buf[p] == _NEWLINE:
            break
        else:
            p += 1
    return p + 1


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


def grub_variables(data: bytes) -> Iterator[tuple[str, str]]:
    """The (name, value) pairs GRUB reads from a block, in file order, repeats included
    (grub_envblk_iterate); `data` must be a block (`grub_block`). Reading stops where GRUB's does."""
    p, end = len(ENVBLK_HEADER), len(data)
    while p < end:
        if data[p] != _HASH:
            name_start = p
            equals = data.find(b"=", p)
            if equals < 0:
                return
            value_start = p = equals + 1
            while p < end and data[p] != _NEWLINE:
                p += 2 if data[p] == _BACKSLASH else 1
            if p >= end:
                return
            raw, value, q = data[value_start:p], bytearray(), 0
            while q < len(raw):
                q += raw[q] == _BACKSLASH
                value.append(raw[q])
                q += 1
            yield _c_string(data[name_start:equals]), _c_string(bytes(value))
        p = _next_line(data, p)


def load_env(data: bytes | None, *whitelist: str) -> dict[str, str] | None:
    """The variables `load_env --file F --skip-sig NAMES…` sets from a file holding `data`; None when
    the command fails (no file, an unreadable one, not a block). Variables it does not set keep their value."""
    if not grub_block(data):
        return None
    assert data is not None
    found: dict[str, str] = {}
    for name, value in grub_variables(data):
        if not whitelist or name in whitelist:
            found[name] = value
    return found


def _escaped(value: bytes) -> bytes:
    return value.replace(b"\\", b"\\\\").replace(b"\n", b"\\\n")


def save_env(data: bytes | None, name: str, value: str) -> bytes | None:
    """The file as `save_env --file F NAME` leaves it with NAME set to `value` (grub_envblk_set, in
    place: the size never changes), or None when GRUB cannot (not a block, broken free space, no room)."""
    if not grub_block(data):
        return None
    assert data is not None
    buf = bytearray(data)
    key, new = name.encode("latin-1"), _escaped(value.encode("latin-1"))
    end, vl = len(buf), len(new)
    space = end - 1
    while buf[space] == _HASH:  # stops at the signature's newline at the latest
        space -= 1
    if buf[space] != _NEWLINE:
        return None
    space += 1
    p = len(ENVBLK_HEADER)
    while p + len(key) + 1 < space:
        if buf[p : p + len(key)] == key and buf[p + len(key)] == ord("="):
            p += len(key) + 1
            old = 0
            while p + old < end and buf[p + old] != _NEWLINE:
                old += 2 if buf[p + old] == _BACKSLASH else 1
            if p + old >= end or end - space < vl - old:
                return None
            if vl < old:
                tail = bytes(buf[p + old : end])
                buf[p + vl : p + vl + len(tail)] = tail
                buf[space - (old - vl) : space] = b"#" * (old - vl)
            else:
                buf[p + vl : end] = bytes(buf[p + old : end - (vl - old)])
            break
        p = _next_line(buf, p)
    else:
        if end - space < len(key) + 1 + vl + 1:
            return None
        buf[space : space + len(key) + 1] = key + b"="
        p = space + len(key) + 1
    buf[p : p + vl + 1] = new + b"\n"
    return bytes(buf)


# --- the decision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvSave:
    """One `save_env` the menu runs before it boots: `value` into `file`'s `name`; `block` is the file as
    GRUB leaves it, None when the save failed (the menu then boots the rescue entry)."""

    file: str
    name: str
    value: str
    block: bytes | None

    @property
    def ok(self) -> bool:
        return self.block is not None


@dataclass(frozen=True)
class Decision:
    """What the menu does with one state of cfg.

    `entry` is GRUB's default and `fallback` what it boots when that entry cannot be loaded; `save` the
    count it writes first. `recovery_try` is GRUB's variable as the entries see it, `count` the try the
    entry passes (`recovery.try=N`; None for the system, and for the rescue entry without a count),
    `trial_boot` the trial boot counted for the system. `slots` is the order the entry tries the
    recovery's slots (the first is the one it loads when it can), empty for the system. `args` is the
    kernel command line after the kernel's path, as GRUB writes it for the first slot; `why` one line.
    """

    entry: Entry
    fallback: Entry
    save: EnvSave | None
    recovery_try: str | None
    count: int | None
    trial_boot: int | None
    slots: tuple[str, ...]
    args: tuple[str, ...]
    why: str

    @property
    def slot(self) -> str | None:
        return self.slots[0] if self.slots else None


def _count(entry: Entry, recovery_try: str | None) -> int | None:
    """The count the entry passes (its `set recovery_count=` chain)."""
    if entry is Entry.rescue:
        return int(recovery_try) if recovery_try in ("1", "2", "3") else None
    if entry in (Entry.recovery, Entry.rollback):
        return int(recovery_try) if recovery_try in ("2", "3") else 1
    return None


def _command_line(entry: Entry, count: int | None, slot: str | None, trial_counted: bool) -> tuple[str, ...]:
    if entry is Entry.system:
        return (*SYSTEM_WORDS, *((WATCHDOG,) if trial_counted else ()), *CONSOLES)
    words = {
        Entry.recovery: (f"recovery.try={count}",),
        Entry.rescue: ("recovery.mode=rescue", *((f"recovery.try={count}",) if count else ())),
        Entry.rollback: ("recovery.mode=rollback", f"recovery.try={count}"),
    }[entry]
    return (*words, f"recovery.slot={slot}", "panic=10", *CONSOLES)


def decide(
    cfg_files: Mapping[str, bytes | None], *, cfg_found: bool = True, save_fails: Collection[str] = (),
    menu_found: bool = True,
) -> Decision:
    """The entry the menu boots, the count it writes first and the recovery slot it loads.

    `cfg_files` maps `update-instruction`, `recovery/grubenv`, `recovery/trial` and `recovery/slot` to
    their bytes as GRUB reads them: None (or no key) when `[ -f … ]` is false (no such file, or a
    directory); `b""` for a file that is there but cannot be read (GRUB fails on it exactly as on an
    empty one). `cfg_found` False: GRUB's `search --label cfg` found nothing. `save_fails` names the
    files whose `save_env` fails for a reason the bytes do not show (a sparse file, a write error).
    The menu is the one in bootloader/ (a slot's menu.cfg is grub.cfg with recovery.cfg inlined);
    `menu_found` False: the ESP's stub (bootloader/stub.cfg) found no slot's menu whole, and offers
    only its own rescue entry, slot a first.
    """
    if not menu_found:
        return Decision(Entry.rescue, Entry.rescue, None, None, None, None, ("a", "b"),
                        ("recovery.mode=rescue", "recovery.slot=a", "panic=10", *CONSOLES),
                        "the stub finds no boot menu in either recovery slot")

    def file(name: str) -> bytes | None:
        return cfg_files.get(name)

    def saved(name: str, var: str, value: str) -> EnvSave:
        return EnvSave(name, var, value, None if name in save_fails else save_env(file(name), var, value))

    recovery_try: str | None = None
    trial_counted, default, save = False, Entry.system, None
    active, why = "a", "no instruction, not on trial"
    if cfg_found:
        slot_vars = load_env(file(SLOT), "recovery_slot") if file(SLOT) is not None else None
        active = "b" if (slot_vars or {}).get("recovery_slot") == "b" else "a"
        counter, entry = None, Entry.recovery
        if file(INSTRUCTION) is not None:
            found = load_env(file(INSTRUCTION), "recovery_try")
            if found is not None:
                counter, why = INSTRUCTION, "an instruction"
            else:
                counter, why = GRUBENV, f"an instruction GRUB cannot read, counted in {GRUBENV}"
                found = load_env(file(GRUBENV), "recovery_try")
            recovery_try = (found or {}).get("recovery_try", recovery_try)
        elif file(TRIAL) is not None:
            trial = load_env(file(TRIAL), "trial_max", "trial_boot")
            next_boot, past = "", f"a {TRIAL} GRUB cannot read"
            if trial is not None:
                trial_max, trial_boot = trial.get("trial_max", ""), trial.get("trial_boot", "")
                if not trial_max:
                    next_boot, why = "none", "an empty trial block: no trial"
                elif not trial_boot:
                    next_boot = "1"
                elif trial_boot == trial_max:
                    past = f"past the last trial boot ({trial_boot} of {trial_max})"
                else:
                    next_boot = TRIAL_NEXT.get(trial_boot, "")
                    past = f"trial_boot {trial_boot!r} is not in GRUB's chain"
            if next_boot == "none":
                pass
            elif next_boot:
                save = saved(TRIAL, "trial_boot", next_boot)
                if save.ok:
                    trial_counted, why = True, f"on trial: boot {next_boot}"
                else:
                    default, why = Entry.rescue, f"on trial, but GRUB cannot count boot {next_boot} in {TRIAL}"
            else:
                counter, entry = GRUBENV, Entry.rollback
                why = past
                recovery_try = (load_env(file(GRUBENV), "recovery_try") or {}).get("recovery_try", recovery_try)
        if counter is not None:
            following = RECOVERY_NEXT.get(recovery_try or "")
            if following is None:
                default, why = Entry.rescue, f"{why}, and recovery_try is {recovery_try!r}: no tries left"
            else:
                recovery_try = following
                save = saved(counter, "recovery_try", following)
                if save.ok:
                    default, why = entry, f"{why}: try {following}"
                else:
                    default, why = Entry.rescue, f"{why}, but GRUB cannot count try {following} in {counter}"
    else:
        why = "GRUB finds no file system labelled cfg"
    fallback = Entry.rollback if trial_counted else Entry.rescue
    count = _count(default, recovery_try)
    standby = "b" if active == "a" else "a"
    slots = () if default is Entry.system else ((standby, active) if count == 3 else (active, standby))
    return Decision(
        entry=default,
        fallback=fallback,
        save=save,
        recovery_try=recovery_try,
        count=count,
        trial_boot=int(save.value) if trial_counted and save is not None else None,
        slots=slots,
        args=_command_line(default, count, slots[0] if slots else None, trial_counted),
        why=why,
    )
