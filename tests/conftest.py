"""Shared test set-up: capability markers that explain a skip instead of passing silently."""


# --- The built demo image (reflash build), shared by the mkimage unit tests and the VM rig -------------

import hashlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TEST_IMAGES = Path(os.environ.get("RECOVERY_TEST_IMAGES", "/var/tmp/recovery-test-images"))
KEEP_IMAGES = 10  # several worktrees may test at once; about 1 GiB each
_REPO = Path(__file__).resolve().parent.parent


def image_inputs_hash() -> str:
    """A hash of everything in the repository a built image depends on: reuse the image while it holds."""
    h = hashlib.sha256()
    for top in ("recovery", "mkimage", "bootloader", "packaging"):
        for path in sorted((_REPO / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                h.update(str(path.relative_to(_REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    # The package's version and commands (mkimage/deb.py) come from pyproject.toml.
    h.update((_REPO / "pyproject.toml").read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def built_image():
    """`build(load_config(None, output=…))` once per session, reused across sessions while the inputs hold.

    Returns mkimage.build.BuildResult. Tests must not modify the image: boot copy-on-write overlays.
    """
    missing = [tool for tool in ("mmdebstrap", "mkfs.ext4", "mkfs.fat", "mcopy", "grub-mkimage", "depmod")
               if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building an image needs {', '.join(missing)} (make setup installs them)")
    if os.geteuid() != 0:
        pytest.skip("building an image needs root (mmdebstrap --mode=root, device nodes in the trees)")
    from mkimage.build import BuildResult, build
    from mkimage.config import load_config

    import fcntl

    key = image_inputs_hash()
    out = TEST_IMAGES / key
    config = load_config(None, output=out)
    stamp = out / ".complete"
    TEST_IMAGES.mkdir(parents=True, exist_ok=True)
    # Two pytest sessions (unit tests, VM tests) may want the image at once: one builds, one waits.
    with open(TEST_IMAGES / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return BuildResult(
                config=config, disk=out / "disk.img", keys=out / "keys", recovery=out / "recovery",
                bundles={v: out / f"{config.product}-{v}.bundle" for v in config.releases},
            )
        # Earlier inputs: keep the few newest (other sessions may still boot them), drop the rest.
        older = sorted((d for d in TEST_IMAGES.iterdir() if d.is_dir() and d.name != key),
                       key=lambda d: d.stat().st_mtime, reverse=True)
        for old in older[KEEP_IMAGES - 1:]:
            shutil.rmtree(old, ignore_errors=True)
        result = build(config)
        stamp.write_text(key + "\n")
        return result
