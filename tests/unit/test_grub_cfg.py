"""The GRUB scripts in bootloader/: syntax, the instruction whitelist, and the env block GRUB counts in."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mkimage.grub import BOOTLOADER, early_config, esp_volume_id, grub_volume_uuid

needs = pytest.mark.skipif(
    shutil.which("grub-script-check") is None or shutil.which("grub-editenv") is None,
    reason="needs grub-common (grub-script-check, grub-editenv): make setup installs it",
)
SCRIPTS = sorted(BOOTLOADER.glob("*.cfg"))


def script_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["grub-script-check", str(path)], capture_output=True, text=True)


def test_all_scripts_are_there():
    assert {p.name for p in SCRIPTS} >= {"grub.cfg", "recovery.cfg", "early.cfg"}


@needs
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_check(script):
    r = script_check(script)
    assert r.returncode == 0, r.stdout + r.stderr


@needs
def test_script_check_catches_errors(tmp_path):
    # The check above is worth something only if grub-script-check fails on a broken script.
    bad = tmp_path / "bad.cfg"
    bad.write_text((BOOTLOADER / "recovery.cfg").read_text().replace("fi\nfi", "fi", 1) + "\nif true; then\n")
    assert script_check(bad).returncode != 0


@needs
def test_rendered_early_config(tmp_path):
    volume_id = esp_volume_id("demo-appliance")
    assert re.fullmatch(r"[0-9A-F]{8}", volume_id)
    text = early_config(volume_id)
    assert f"--fs-uuid --set=root {grub_volume_uuid(volume_id)}" in text
    assert "@" not in text
    # the core image runs this before normal mode, which alone knows comments: none may reach it
    assert "#" in (BOOTLOADER / "early.cfg").read_text() and "#" not in text
    assert text.splitlines() == [line for line in text.splitlines() if line.strip()]
    path = tmp_path / "early.cfg"
    path.write_text(text)
    assert script_check(path).returncode == 0


def test_instruction_is_read_through_a_whitelist():
    text = (BOOTLOADER / "recovery.cfg").read_text()
    loads = re.findall(r"^\s*(?:if )?load_env .*$", text, re.MULTILINE)
    saves = re.findall(r"save_env .*$", text, re.MULTILINE)
    # From the instruction (and cfg's own block) only the try count; from the trial block only its two.
    whitelists = {line.split("--skip-sig")[1].split(";")[0].strip() for line in loads}
    assert len(loads) == 5 and all("--skip-sig" in line for line in loads)
    # and from cfg's recovery/slot block only which slot is active
    assert whitelists == {"recovery_try", "trial_max trial_boot", "recovery_slot"}, whitelists
    assert len(saves) == 2
    assert all(re.search(r'(\$recovery_counter" recovery_try|/recovery/trial" trial_boot)(; then)?$', line)
               for line in saves), saves
    # The counter lives in the instruction, or (for garbage GRUB cannot parse, and for a rollback before it
    # has staged its instruction) in cfg's recovery/grubenv.
    assert re.findall(r'set recovery_counter="(.*)"', text) == [
        "($cfgdev)/update-instruction", "($cfgdev)/recovery/grubenv", "($cfgdev)/recovery/grubenv"]
    # Variables the menu entries use must be exported, or GRUB's entry context does not see them.
    assert "export cfgdev recoverydev recovery_try trial_counted recovery_active recovery_standby" in text


def test_trial_boots_are_counted_with_literals_only():
    """GRUB has no arithmetic: the next trial boot comes from a chain of literals up to MAX_BOOTS, and
    nothing read from cfg is ever assigned except a literal."""
    from recovery.core.trial import MAX_BOOTS

    text = (BOOTLOADER / "recovery.cfg").read_text()
    chain = re.findall(r'elif \[ "\$trial_boot" = (\d) \]; then\n\s*set trial_next=(\d)', text)
    assert chain == [(str(n), str(n + 1)) for n in range(1, MAX_BOOTS)]
    for value in re.findall(r"^\s*set \w+=(.*)$", text, re.MULTILINE):
        assert value in {"", "1", "2", "3", "none", "rescue", "rollback", "recovery", '"$recovery_next"',
                         '"$trial_next"', '"$recovery_entry"', "a", "b", '"$recovery_active $recovery_standby"',
                         '"$recovery_standby $recovery_active"'} or value.startswith('"($cfgdev)/') \
            or value.isdigit(), value


def test_kernel_command_lines():
    recovery = (BOOTLOADER / "recovery.cfg").read_text()
    system = (BOOTLOADER / "grub.cfg").read_text()
    linux = [re.sub(r"; then$", "", line)
             for line in re.findall(r"^\s*(?:if )?linux (.*)$", recovery + system, re.MULTILINE)]
    # the recovery's from a slot and from the top of a partition without slots; the system one on trial, one not
    assert len(linux) == 4
    for line in linux:
        assert line.endswith("console=tty0 console=ttyS0,115200"), line  # serial last: /dev/console
    calls = re.findall(r"^\s*recovery_boot (.*)$", recovery, re.MULTILINE)
    assert any('"recovery.try=$recovery_count"' in line for line in calls)  # tests/unit/test_boot_cmdline.py
    assert any("recovery.mode=rescue" in line for line in calls)
    assert any("root=PARTLABEL=system" in line for line in linux)
    assert any("recovery.mode=rollback" in line for line in calls)
    assert all("panic=10" in line for line in linux)  # a panic reboots, so GRUB counts the next try
    watched = [line for line in linux if "systemd.watchdog_sec=" in line]
    assert len(watched) == 1 and "root=PARTLABEL=system" in watched[0]


@needs
def test_grub_counts_tries_in_a_block_grub_editenv_reads(tmp_path):
    """GRUB's save_env rewrites the instruction in place: the block keeps its size and other keys.

    grub-editenv stands in for save_env here (same code in GRUB's lib/envblk.c); booting the
    counting itself is the VM tests' job.
    """
    block = tmp_path / "update-instruction"
    subprocess.run(["grub-editenv", str(block), "create"], check=True)
    subprocess.run(["grub-editenv", str(block), "set", "recovery_action=install", "recovery_version=2.0.0"],
                   check=True)
    for n in ("1", "2", "3"):
        subprocess.run(["grub-editenv", str(block), "set", f"recovery_try={n}"], check=True)
        data = block.read_bytes()
        assert len(data) == 1024 and data.startswith(b"# GRUB Environment Block\n")
        listed = subprocess.run(["grub-editenv", str(block), "list"], capture_output=True, text=True, check=True)
        assert listed.stdout.splitlines() == ["recovery_action=install", "recovery_version=2.0.0", f"recovery_try={n}"]


def test_the_fallbacks_are_the_rescue_and_rollback_entries():
    """GRUB 2.06 reads `fallback` as an entry number: it must point at the rescue entry (on trial: the
    rollback), counted in the order the menu defines entries (grub.cfg's, then those of the
    recovery.cfg it sources after its own)."""
    menu = (BOOTLOADER / "grub.cfg").read_text()
    own, after = menu.split('source "$prefix/recovery.cfg"')
    assert "menuentry" not in after
    ids = re.findall(r"^menuentry .* --id (\S+) \{", own + (BOOTLOADER / "recovery.cfg").read_text(), re.MULTILINE)
    assert re.findall(r"^set fallback=(\d+)$", own, re.MULTILINE) == ["2"] and ids[2] == "rescue", ids
    assert re.findall(r"^    set fallback=(\d+)$", after, re.MULTILINE) == ["3"] and ids[3] == "rollback", ids


# --- the ESP's stub and the menu a recovery slot carries (DESIGN.md "The boot menu travels with the recovery")


def test_the_stub_reads_only_the_slot_and_sources_a_menu_only_after_grub_checked_it():
    text = (BOOTLOADER / "stub.cfg").read_text()
    loads = re.findall(r"^\s*load_env .*$", text, re.MULTILINE)
    assert loads == ['        load_env --file "($cfgdev)/recovery/slot" --skip-sig recovery_slot']
    # recovery_slot is only compared with b; the slots it walks are literals
    uses = [line.strip() for line in text.splitlines() if "$recovery_slot" in line]
    assert uses == ['if [ "$recovery_slot" = b ]; then']
    assert set(re.findall(r'set reflash_menu_slots="(.*)"', text)) == {"a b", "b a"}
    # every source of a menu.cfg sits right under the sha256sum check of its slot's menu.sha256
    lines = [line.strip() for line in text.splitlines()]
    sources = [i for i, line in enumerate(lines) if line.startswith("source ")]
    assert sources and all(lines[i] == 'source "($recoverydev)/$slot/menu.cfg"' for i in sources)
    for i in sources:
        checks = [line for line in lines[:i] if line.startswith("if sha256sum")]
        assert checks[-1] == ('if sha256sum --check "($recoverydev)/$slot/menu.sha256" --prefix '
                              '"($recoverydev)/$slot"; then')
    assert "export cfgdev recoverydev" in text  # the rescue entry's context sees them


@needs
def test_the_slot_menu_is_grub_cfg_with_recovery_cfg_inlined_and_the_end_marked(tmp_path):
    from mkimage.grub import MENU_LOADED, RECOVERY_SOURCE, slot_menu, write_slot_menu

    menu = slot_menu()
    # nothing in it uses the ESP's $prefix: it is read from a recovery slot
    assert RECOVERY_SOURCE not in menu
    assert not [line for line in menu.splitlines() if "$prefix" in line and not line.lstrip().startswith("#")]
    assert (BOOTLOADER / "recovery.cfg").read_text() in menu
    assert menu.rstrip().splitlines()[-1] == MENU_LOADED
    path = write_slot_menu(tmp_path)
    assert path.read_text() == menu and script_check(path).returncode == 0
    # and the stub reads the marker it sets
    assert "reflash_menu_loaded" in (BOOTLOADER / "stub.cfg").read_text()


def test_the_core_images_can_check_a_menu():
    from mkimage.grub import COMMON_MODULES

    assert {"hashsum", "gcry_sha256", "crypto"} <= set(COMMON_MODULES)
