"""`reflash build` and `reflash recovery`: the whole appliance image, or only its recovery partition."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from recovery.core.envblock import format_envblock
from recovery.core.keys import load_private_key, public_key_pem
from recovery.core.output import step
from recovery.core.slots import CONTENT as SLOT_CONTENT
from recovery.core.slots import IN_RELEASE, SLOT_BLOCK, SLOT_KEY, SLOTS
from recovery.core.trial import BundleRef, write_fallback

from .bundle import create_bundle, generate_keys
from .config import ImageConfig, MiB
from .deb import build_deb
from .disk import Placement, assemble, make_ext4
from .grub import BOOTLOADER, esp_volume_id, install_bios, make_core_images
from .outlock import hold_output
from .keyring import DEFAULT_SIGNING_KEY, ReleaseKeyring, install_keyring, release_keyring
from .recoveryos import build_recovery_os
from .system import build_system_base, prepare_system_tree
from .toollog import tool_log

log = logging.getLogger(__name__)

# What `reflash recovery` writes for other image builders: source it from their grub.cfg.
GRUB_SNIPPET = "grub-recovery.cfg"
# ... or, to take the boot menu from the recovery slots (updated with the recovery), as the ESP's grub.cfg.
GRUB_STUB = "grub-stub.cfg"
RECOVERY_IMAGE = "recovery.ext4"
# The output of mmdebstrap and friends, beside what they built; its tail is shown when a step fails.
BUILD_LOG = "build.log"
# Where reflashctl keeps bundles on the storage partition (its default `bundles`), the factory's too.
STORAGE_BUNDLES = "bundles"


@dataclass(frozen=True)
class BuildResult:
    config: ImageConfig
    disk: Path
    bundles: dict[str, Path]  # version -> bundle
    keys: Path  # holds signing.pub (and signing.pem if generated)
    recovery: Path  # DIR/recovery/


def build(config: ImageConfig) -> BuildResult:
    """Build DIR/disk.img, a bundle per release, DIR/keys/ and DIR/recovery/ (DIR: config.output)."""
    out = config.output
    # Held to the end, taken before anything is written: a second build into `out` would delete this
    # one's work directory under it.
    with hold_output(out), step(f"Building {config.product} {config.version} ({config.firmware}) into {out}"), \
            _recovery_first(config) as (work, keys_dir, keyring, recovery_dir):
        base = build_system_base(config)
        deb = build_deb(work / "deb").path
        bundles: dict[str, Path] = {}
        versions = list(dict.fromkeys([config.version, *config.releases]))
        for version in versions:
            tree = prepare_system_tree(base, config, version, work / f"system-{version}", keyring, deb)
            if config.bundle_recovery:
                _carry_recovery(config, keyring, tree, version, recovery_dir, work)
            if version in config.releases:
                bundle = out / f"{config.product}-{version}.bundle"
                with step(f"Making the bundle {bundle.name}"):
                    create_bundle(tree, bundle, key=keyring.signing, product=config.product, version=version)
                bundles[version] = bundle
            if version != config.version:
                shutil.rmtree(tree)
        disk = _disk_image(config, out, work, recovery_dir, work / f"system-{config.version}",
                           bundles.get(config.version))
    log.info("built %s, %s, keys in %s", disk, ", ".join(str(b) for b in bundles.values()), keys_dir)
    return BuildResult(config=config, disk=disk, bundles=bundles, keys=keys_dir, recovery=recovery_dir)


def build_recovery_only(config: ImageConfig) -> Path:
    """DIR/recovery/: vmlinuz, initrd.img, an ext4 image of the partition and the GRUB snippet."""
    with hold_output(config.output), \
            step(f"Building the recovery partition of {config.product} into {config.output / 'recovery'}"), \
            _recovery_first(config) as (_, _, _, recovery_dir):
        return recovery_dir


@contextmanager
def _recovery_first(config: ImageConfig) -> Iterator[tuple[Path, Path, ReleaseKeyring, Path]]:
    """What both builds start with, in an empty work directory that is removed again at the end:
    (work directory, keys directory, the keyring releases ship and the key that signs, the recovery
    partition's directory)."""
    out = config.output
    work = out / ".work"
    _clean(work)
    (out / BUILD_LOG).unlink(missing_ok=True)
    keys_dir, keyring = _signing_keys(config, out)
    with tool_log(out / BUILD_LOG):
        recovery_dir = _recovery_partition(config, keyring, out / "recovery", work)
        yield work, keys_dir, keyring, recovery_dir
    _clean(work)


def _recovery_partition(config: ImageConfig, keys: ReleaseKeyring, dest: Path, work: Path) -> Path:
    """The recovery OS in `dest`, its partition as an ext4 image and the GRUB snippet beside it."""
    _clean(dest)
    with step("Building the recovery OS"):
        build_recovery_os(config, keys, dest, work)
    contents = work / "recovery-partition"
    _clean(contents)
    # Both slots hold the factory's recovery: a recovery that fails is never the only one.
    for slot in SLOTS:
        (contents / slot).mkdir(parents=True)
        for name in SLOT_CONTENT:
            shutil.copy2(dest / name, contents / slot / name)
    shutil.copy2(BOOTLOADER / "recovery.cfg", dest / GRUB_SNIPPET)
    shutil.copy2(BOOTLOADER / "stub.cfg", dest / GRUB_STUB)
    with step(f"Making the recovery partition image {RECOVERY_IMAGE}"):
        image = dest / RECOVERY_IMAGE
        with open(image, "wb") as f:
            f.truncate(config.partitions.recovery)
        make_ext4(image, Placement(4, "recovery", 0, config.partitions.recovery), label="recovery", root=contents)
    return dest


def _carry_recovery(config: ImageConfig, keys: ReleaseKeyring, tree: Path, version: str, factory: Path,
                    work: Path) -> None:
    """A release's own recovery OS, in its tree where the running system finds it once the release has
    confirmed itself (recovery/updated/recoveryslots.py): built with this release's version and keys.
    The factory release carries the very files of the factory's slots."""
    dest = tree / IN_RELEASE
    dest.mkdir(parents=True, exist_ok=True)
    if version == config.version:
        for name in SLOT_CONTENT:
            shutil.copy2(factory / name, dest / name)
        return
    with step(f"Building the recovery OS {version} that the release {version} carries"):
        build_recovery_os(config, keys, dest, work / f"recovery-{version}", version=version)


def _signing_keys(config: ImageConfig, out: Path) -> tuple[Path, ReleaseKeyring]:
    """DIR/keys/ with the public keys releases trust (and `revoked`), and the keyring with the private key
    to sign with (which never enters an image): from `key_dir`, else a development key in DIR/keys/.
    A keyring without a trusted key, or whose signing key it does not trust, is refused here."""

    keys = out / "keys"
    if config.key_dir is None:
        pem = keys / DEFAULT_SIGNING_KEY
        if pem.exists():
            # Bundles of an earlier build stay installable: never replace a key, at most its public half.
            if not (keys / "signing.pub").exists():
                (keys / "signing.pub").write_bytes(public_key_pem(load_private_key(pem).public_key()))
            log.warning("using the development signing key %s from an earlier build", pem)
        else:
            keys.mkdir(parents=True, exist_ok=True)
            for stale in keys.glob("*.pub"):
                stale.unlink()
            generate_keys(keys)
            log.warning("generated a development signing key in %s: configure key_dir for real releases", keys)
        return keys, release_keyring(keys)
    keyring = release_keyring(config.key_dir, config.signing_key)
    if (keys / DEFAULT_SIGNING_KEY).exists():
        log.warning("%s is a development key from an earlier build: not used, not trusted", keys / DEFAULT_SIGNING_KEY)
    install_keyring(keyring, keys)
    return keys, keyring


def _disk_image(config: ImageConfig, out: Path, work: Path, recovery_dir: Path, system_tree: Path,
                factory: Path | None) -> Path:
    volume_id = esp_volume_id(config.product)
    cores = make_core_images(config.firmware, volume_id, work / "grub")
    # The ESP holds the stub, written once: the menu itself is in the recovery slots (DESIGN.md).
    esp_files = {"grub/grub.cfg": BOOTLOADER / "stub.cfg"}
    if cores.efi is not None:
        esp_files["EFI/BOOT/BOOTX64.EFI"] = cores.efi
    cfg_dir = work / "cfg"
    (cfg_dir / "recovery").mkdir(parents=True)
    # GRUB counts the recovery's tries here when an instruction is garbage it cannot write to.
    (cfg_dir / "recovery/grubenv").write_bytes(format_envblock({}))
    # No trial yet: an empty block, there from the start so that every later write of it goes over its
    # own blocks (recovery.core.atomic.write_block) and none is a rename GRUB could read half-done.
    (cfg_dir / "recovery/trial").write_bytes(format_envblock({}))
    # Which recovery slot GRUB loads (both hold the same recovery at first).
    (cfg_dir / SLOT_BLOCK).write_bytes(format_envblock({SLOT_KEY: SLOTS[0]}))
    storage_dir = _factory_fallback(config, work, cfg_dir, factory)
    recovery_contents = work / "recovery-partition"
    partial = out / "disk.img.partial"
    placements = assemble(
        partial, config, esp_files=esp_files, esp_volume_id=volume_id, recovery_dir=recovery_contents,
        system_dir=system_tree, cfg_dir=cfg_dir, storage_dir=storage_dir,
    )
    if cores.bios is not None:
        with step("Installing GRUB for BIOS (boot.img in the MBR, core.img in the bios partition)"):
            bios = next(p for p in placements if p.name == "bios")
            install_bios(partial, cores.bios, bios.offset)
    disk = out / "disk.img"
    partial.rename(disk)
    log.info("%s: %d MiB (sparse)", disk, config.disk_size // MiB)
    return disk


def _factory_fallback(config: ImageConfig, work: Path, cfg_dir: Path, factory: Path | None) -> Path | None:
    """The factory release's bundle on storage, recorded as the fallback: even the first update can roll
    back. Without a bundle of `version` (not in `releases`) the first update cannot, and we say so."""
    if factory is None:
        log.warning("no bundle of the factory release %s (add it to releases): a first update that fails its "
                    "trial cannot be rolled back", config.version)
        return None
    storage_dir = work / "storage"
    (storage_dir / STORAGE_BUNDLES).mkdir(parents=True)
    shutil.copy2(factory, storage_dir / STORAGE_BUNDLES / factory.name)
    ref = BundleRef(config.version, "PARTLABEL=storage", f"/{STORAGE_BUNDLES}/{factory.name}", _sha256(factory))
    write_fallback(cfg_dir, ref)
    return storage_dir


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _clean(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
