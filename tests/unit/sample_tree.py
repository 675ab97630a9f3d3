"""A small system tree with every kind of metadata an update must carry, for bundle and extraction tests.

`make_sample_tree()` needs root (device nodes, owners, `security.capability`); `SAMPLE_*` describe
what it builds so tests can check fidelity without hard-coding paths twice.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

from recovery.core.run import run

# Everything gets a fixed mtime (with nanoseconds, which pax keeps) so trees can be compared.
SAMPLE_MTIME_NS = 1_700_000_000_123_456_789

SAMPLE_OWNER = (1234, 5678)
SAMPLE_SETUID = "usr/bin/su"
SAMPLE_SETGID = "usr/bin/wall"
SAMPLE_STICKY = "tmp"
SAMPLE_CAPABILITY = "usr/bin/ping"  # cap_net_raw=ep
SAMPLE_USER_XATTR = ("etc/motd", "user.comment", b"greeting for the operator")
SAMPLE_ACL_FILE = "etc/shared.conf"  # user:1234:rwx in its access ACL
SAMPLE_ACL_DIR = "srv/shared"  # a default ACL group:5678:r-x
SAMPLE_HARDLINKS = ("usr/bin/gzip", "usr/bin/gunzip")
SAMPLE_SYMLINKS = {"bin": "usr/bin", "etc/localtime": "/usr/share/zoneinfo/UTC"}
SAMPLE_CHAR_DEVICE = ("dev/null", 1, 3)
SAMPLE_BLOCK_DEVICE = ("dev/loop0", 7, 0)
SAMPLE_FIFO = "run/initctl"
SAMPLE_SPARSE = ("var/lib/disk.img", 8 * 1024 * 1024)  # 4 KiB of data at each end, a hole between
SAMPLE_NON_UTF8 = b"usr/share/caf\xe9-\xff.txt"
SAMPLE_LONG_NAME = "usr/share/doc/" + "a-rather-long-directory-name-for-testing/" * 3 + "n" * 150 + ".txt"


def _pattern(size: int, seed: int) -> bytes:
    """Deterministic bytes that do not compress to nothing (so sizes and hashes mean something)."""
    block = bytes((i * 131 + seed * 17 + (i >> 8) * 7) & 0xFF for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


def make_sample_tree(root: Path, *, variant: str = "1.0.0") -> Path:
    """Build the sample system tree at `root` (created, must not exist or be empty); return `root`.

    `variant` goes into /etc/os-release as VERSION_ID and into some file contents, so two
    variants are two different releases of the same product.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ValueError(f"{root} is not empty")
    old_umask = os.umask(0o022)  # modes must not depend on who runs the tests
    try:
        _build(root, variant)
    finally:
        os.umask(old_umask)
    return root


def _build(root: Path, variant: str) -> None:
    os.chmod(root, 0o755)

    def write(rel: str, data: bytes, mode: int = 0o644) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)
        return path

    for d in ("boot", "dev", "etc", "home", "proc", "root", "run", "srv", "sys", "usr/bin", "usr/lib",
              "usr/share/zoneinfo", "var/empty", "var/lib", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "root", 0o700)

    write("etc/os-release", (
        'PRETTY_NAME="Sample Appliance {v}"\nNAME="Sample Appliance"\nID=sample\n'
        "VERSION_ID={v}\n".format(v=variant)
    ).encode())
    write("etc/hostname", b"appliance\n")
    write("etc/empty.conf", b"")
    write("usr/lib/libsample.so.1", _pattern(100 * 1024, 1), 0o755)
    write("usr/lib/big.bin", _pattern(1024 * 1024 + 123, 2) + variant.encode())
    write("usr/share/zoneinfo/UTC", b"TZif2\0fake zone data\n")
    write("boot/vmlinuz", b"not really a kernel " + variant.encode() + b"\n")

    # Modes with the special bits, which naive copies drop.
    write(SAMPLE_SETUID, _pattern(3000, 3), 0o4755)
    write(SAMPLE_SETGID, _pattern(2000, 4), 0o2755)
    (root / SAMPLE_STICKY).mkdir()
    os.chmod(root / SAMPLE_STICKY, 0o1777)

    write(SAMPLE_CAPABILITY, _pattern(5000, 5), 0o755)
    run(["setcap", "cap_net_raw+ep", root / SAMPLE_CAPABILITY])

    rel, name, value = SAMPLE_USER_XATTR
    write(rel, b"Welcome.\n")
    os.setxattr(root / rel, name, value)

    write(SAMPLE_ACL_FILE, b"shared=yes\n", 0o640)
    run(["setfacl", "-m", "u:1234:rwx", root / SAMPLE_ACL_FILE])
    (root / SAMPLE_ACL_DIR).mkdir(parents=True)
    run(["setfacl", "-d", "-m", "g:5678:rx", root / SAMPLE_ACL_DIR])

    first, second = SAMPLE_HARDLINKS
    write(first, _pattern(7000, 6), 0o755)
    os.link(root / first, root / second)

    for link, target in SAMPLE_SYMLINKS.items():
        os.symlink(target, root / link)

    for (rel, major, minor), kind in ((SAMPLE_CHAR_DEVICE, 0o020000), (SAMPLE_BLOCK_DEVICE, 0o060000)):
        os.mknod(root / rel, kind | 0o660, os.makedev(major, minor))
        os.chmod(root / rel, 0o660)
    os.mkfifo(root / SAMPLE_FIFO, 0o600)

    rel, size = SAMPLE_SPARSE
    with open(root / rel, "wb") as f:
        f.write(_pattern(4096, 7))
        f.seek(size - 4096)
        f.write(_pattern(4096, 8))

    long_path = write(SAMPLE_LONG_NAME, b"long name\n")
    assert len(str(long_path.relative_to(root))) > 100
    raw = os.fsencode(root) + b"/" + SAMPLE_NON_UTF8
    with open(raw, "wb") as f:
        f.write(b"latin-1 name\n")

    # Mixed numeric owners that exist in no passwd file here: they must survive as numbers.
    uid, gid = SAMPLE_OWNER
    (root / "home/user").mkdir()
    write("home/user/notes.txt", b"notes\n", 0o600)
    for rel in ("home/user", "home/user/notes.txt", SAMPLE_ACL_FILE):
        os.chown(root / rel, uid, gid)
    os.chown(root / SAMPLE_SETGID, 0, 5678)
    os.chmod(root / SAMPLE_SETGID, 0o2755)  # chown cleared the setgid bit
    os.chown(root / "bin", uid, gid, follow_symlinks=False)

    # Last, bottom-up, so creating children does not touch the parents' mtimes again.
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root), topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(SAMPLE_MTIME_NS, SAMPLE_MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(SAMPLE_MTIME_NS, SAMPLE_MTIME_NS))



def snapshot(root: Path) -> dict[bytes, dict[str, object]]:
    """Everything an update must preserve about each entry under `root`, keyed by relative path bytes.

    Two trees are faithful copies when their snapshots are equal: type, mode incl. special bits,
    numeric owner, mtime (ns), size, content hash, device numbers, xattrs, ACLs (via getfacl),
    hardlink groups, and whether a sparse file is still sparse.
    """
    base = os.fsencode(root)
    entries: dict[bytes, dict[str, object]] = {}
    inodes: dict[tuple[int, int], bytes] = {}
    walk = ((dirpath, sorted(dirnames + filenames)) for dirpath, dirnames, filenames in os.walk(base))
    for dirpath, names in [(base, [b"."]), *walk]:
        for name in names:
            path = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            info: dict[str, object] = {
                "mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                "mtime_ns": st.st_mtime_ns,
            }
            if stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            else:
                info["xattrs"] = {
                    k: os.getxattr(path, k) for k in sorted(os.listxattr(path))
                    if not k.startswith("system.posix_acl_")  # compared as ACLs below, not as blobs
                }
                acl = run(["getfacl", "--absolute-names", "--numeric", "--skip-base", "--omit-header",
                           os.fsdecode(path)]).stdout
                info["acl"] = acl.decode() if isinstance(acl, bytes) else acl
            if stat.S_ISREG(st.st_mode):
                info["size"] = st.st_size
                with open(path, "rb") as f:
                    info["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
                info["sparse"] = st.st_blocks * 512 < st.st_size
                if st.st_nlink > 1:
                    # Name the group by its first member so the snapshot does not depend on inode numbers.
                    info["hardlink_group"] = inodes.setdefault((st.st_dev, st.st_ino), rel)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            entries[rel] = info
    return entries


def make_small_tree(root: Path, *, variant: str = "1.0.0") -> Path:
    """A few plain files and a symlink: enough for a bundle, and buildable without root."""
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc/os-release").write_text(f"ID=sample\nVERSION_ID={variant}\n")
    (root / "usr/bin/tool").write_bytes(_pattern(20000, 9) + variant.encode())
    os.chmod(root / "usr/bin/tool", 0o755)
    os.symlink("usr/bin", root / "bin")
    return root


def assemble_bundle(path: Path, members: list[tuple[str, bytes]], *, tar_format: int = tarfile.PAX_FORMAT) -> Path:
    """Write an outer tar of `members` as given: for bundles that are wrong on purpose."""
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def sign_manifest(manifest: bytes, private_pem: Path) -> bytes:
    """The manifest.json.sig a bundle made with `private_pem` carries for these manifest bytes."""
    from recovery.core.manifest import Signature
    from recovery.core.keys import keyid, load_private_key, raw_public_key

    key = load_private_key(private_pem)
    return Signature(keyid(raw_public_key(key.public_key())), key.sign(manifest)).to_json()


def bundle_members(bundle: Path) -> dict[str, bytes]:
    """The outer members of a (small) bundle by name, read with Python's tarfile as an independent reader."""
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
