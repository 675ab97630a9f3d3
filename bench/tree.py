"""Deterministic system-like trees for the benchmarks: many small files, some big ones, mixed content.

Content is cut from a corpus of three kinds of data (incompressible, text-like, low-entropy binary),
so zstd compresses the tree about as well as a real root file system, neither to nothing nor not at all.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE = Path(os.environ.get("RECOVERY_BENCH_CACHE", "/var/tmp/recovery-bench"))
KiB, MiB = 1024, 1024 * 1024
# Bump when the generator changes, so cached trees are rebuilt rather than silently reused.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class TreeSpec:
    """What to generate: `files` small-to-medium files (log-uniform sizes up to `max_small`), plus
    `big` files of `big_size` bytes each; `random_share` of the corpus is incompressible."""

    name: str
    files: int
    max_small: int
    big: int
    big_size: int
    random_share: float = 0.3
    seed: int = 1


@dataclass(frozen=True)
class Tree:
    path: Path
    files: int  # entries of every kind, as in a payload archive (the root included)
    bytes: int  # regular-file data bytes


SPECS = {
    # issue 2: at least 300 MB in at least 10,000 files
    "standard": TreeSpec("standard", files=11_000, max_small=256 * KiB, big=8, big_size=8 * MiB, random_share=0.2),
    # ~100 MB and ~1 GB bundles for the memory measurements (mostly incompressible so the bundle is big)
    "100m": TreeSpec("100m", files=2_000, max_small=64 * KiB, big=10, big_size=10 * MiB, random_share=0.9, seed=2),
    "1g": TreeSpec("1g", files=4_000, max_small=64 * KiB, big=64, big_size=16 * MiB, random_share=0.9, seed=3),
    # for the smoke test: seconds, not minutes
    "quick": TreeSpec("quick", files=300, max_small=32 * KiB, big=2, big_size=1 * MiB, seed=4),
}


def _corpus(rng: random.Random, size: int, random_share: float) -> bytes:
    """`size` bytes in 64 KiB segments of the three kinds of data."""
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(3000)]
    low_entropy = bytes.maketrans(bytes(range(256)), bytes((i % 16) * 9 for i in range(256)))
    seg = 64 * KiB
    parts = []
    for _ in range(size // seg):
        kind = rng.random()
        if kind < random_share:
            parts.append(rng.randbytes(seg))
        elif kind < random_share + (1 - random_share) / 2:
            text = b" ".join(rng.choices(words, k=seg // 5))
            parts.append((text * 2)[:seg])
        else:
            parts.append(rng.randbytes(seg).translate(low_entropy))
    return b"".join(parts)


def _write(path: Path, corpus: bytes, size: int, rng: random.Random, index: int) -> None:
    start = rng.randrange(len(corpus))
    header = f"file {index}\n".encode()
    with open(path, "wb") as f:
        f.write(header[:size])
        left = size - min(size, len(header))
        while left:
            chunk = corpus[start : start + left]
            f.write(chunk)
            left -= len(chunk)
            start = 0


def generate(spec: TreeSpec, root: Path) -> Tree:
    """Build the tree for `spec` at `root` (replaced if it exists)."""
    if root.exists():
        shutil.rmtree(root)
    rng = random.Random(spec.seed)
    corpus = _corpus(rng, 16 * MiB, spec.random_share)
    dirs = [root]
    for top in ("usr/bin", "usr/lib", "usr/share", "etc", "var/lib", "opt"):
        dirs.append(root / top)
    for i in range(max(spec.files // 30, 4)):
        parent = rng.choice(dirs)
        dirs.append(parent / f"d{i:04d}")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    data = 0
    lo, hi = math.log(64), math.log(spec.max_small)
    regular: list[Path] = []
    for i in range(spec.files):
        size = int(math.exp(rng.uniform(lo, hi)))
        path = rng.choice(dirs) / f"f{i:05d}"
        _write(path, corpus, size, rng, i)
        regular.append(path)
        data += size
    for i in range(spec.big):
        path = root / "opt" / f"big{i:02d}.bin"
        _write(path, corpus, spec.big_size, rng, spec.files + i)
        regular.append(path)
        data += spec.big_size
    for i in range(spec.files // 50):  # a few symlinks and hard links, as in a real tree
        target = rng.choice(regular)
        if i % 2:
            os.symlink(os.path.relpath(target, root / "usr/bin"), root / "usr/bin" / f"sym{i:04d}")
        else:
            os.link(target, root / "usr/lib" / f"hard{i:04d}")
    entries = 1 + sum(len(dirnames) + len(filenames) for _, dirnames, filenames in os.walk(root))
    return Tree(path=root, files=entries, bytes=data)


def cached_tree(name: str) -> Tree:
    """The tree for SPECS[name] under CACHE, generated the first time (and when the generator changed)."""
    spec = SPECS[name]
    root = CACHE / f"tree-{name}"
    stamp = CACHE / f"tree-{name}.json"
    want = {"generator": GENERATOR_VERSION, "spec": asdict(spec)}
    if stamp.exists() and root.is_dir():
        saved = json.loads(stamp.read_text())
        if saved.get("key") == want:
            return Tree(path=root, files=saved["files"], bytes=saved["bytes"])
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    tree = generate(spec, root)
    stamp.write_text(json.dumps({"key": want, "files": tree.files, "bytes": tree.bytes}))
    return tree
