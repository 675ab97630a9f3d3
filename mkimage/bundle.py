"""Making signed bundles: signing keys, the payload tar of a system tree, the manifest and the outer tar.

The payload is a pax tar. From a directory GNU tar writes it (`--xattrs --acls --sparse
--numeric-owner`: the reference implementation for every kind of metadata); from a tar, libarchive
re-encodes each entry as pax, keeping the xattrs, ACLs and sparse maps it read.

ACL entries must carry numbers (recovery/core/acl.py says why). GNU tar writes names where this machine
knows them: such a payload is re-encoded once with the numbers this machine gives those names, which
are the numbers the tree had. A tar given as the source must carry numbers itself.

What the payload gains beyond the tree (the boot menu's links, a recovery given with `recovery`) is
appended in one more libarchive pass, never written into the source.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


from recovery.core.acl import (
    USER,
    AclEntry,
    acl_entries,
    has_acl,
    number_acl,
    without_id,
)
from recovery.core.atomic import fsync_dir
from recovery.core.errors import Rejected
from recovery.core.keys import (
    keyid,
    load_private_key,
    raw_public_key,
)
from recovery.core.libarchive_api import (
    ArchiveError,
    PaxWriter,
    TarReader,
    entry_hardlink,
    entry_pathname,
    entry_size,
    entry_symlink,
    is_regular,
    kind_of,
)
from recovery.core.manifest import (
    BLOCK_SIZE,
    FORMAT,
    MANIFEST_NAME,
    MAX_MANIFEST,
    SIGNATURE_NAME,
    BlockDigests,
    Compression,
    Manifest,
    PayloadInfo,
    Signature,
)
from recovery.core.outertar import CHUNK
from recovery.core.output import step
from recovery.core.run import run
from recovery.core.slots import (
    CONTENT,
    FILES,
    IN_RELEASE,
    MAX_RECORD,
    MENU,
    MENU_SUMS,
    RECORD,
    FileDigest,
    RecoveryImage,
    digest_file,
)

from .bootable import TreeIndex, check_bootable, normal
from .keyring import new_key

log = logging.getLogger(__name__)

NAME_MAX = 255
ZSTD_LEVEL = 9  # between zstd's fast default (3) and its slow maximum (19); multi-threaded

RECOVERY_FILES = (*FILES.values(), RECORD)  # as `reflash recovery` writes them, and a release carries them
_CARRIES_ONE = (f"the tree already carries a recovery at /{IN_RELEASE}: leave out --recovery, or remove it "
                "from the tree")

_GNU_TAR_FILTER = {Compression.zstd: "--zstd", Compression.xz: "--xz", Compression.gzip: "--gzip"}
_LIBARCHIVE_FILTER = {
    Compression.zstd: ("zstd", f"zstd:compression-level={ZSTD_LEVEL},zstd:threads={os.cpu_count() or 1}"),
    Compression.xz: ("xz", f"xz:threads={os.cpu_count() or 1}"),
    Compression.gzip: ("gzip", ""),
}


def generate_keys(directory: Path) -> Path:
    """Write a new Ed25519 key pair: `signing.pem` (private, 0600) and `signing.pub`; return the latter.

    An existing key is never overwritten: losing a signing key strands every device that trusts it.
    """
    return new_key(Path(directory), "signing")[1]


def create_bundle(
    source: Path, output: Path, *, key: Path, product: str, version: str, compression: str = "zstd",
    check_boot: bool = True, recovery: Path | None = None,
) -> Manifest:
    """Make the signed bundle `output` from `source` (a directory or a tar); return its manifest.

    The payload is staged next to `output` and the bundle appears only complete (temp file + rename).
    Unless `check_boot` is False, a tree that cannot boot as `version` is refused (mkimage/bootable.py).
    `recovery` is a directory as `reflash recovery` writes it (vmlinuz, initrd.img, recovery.json): the
    payload carries it at /usr/lib/reflash/recovery, which the tree must not have. A recovery the tree
    carries itself must match its recovery.json.
    """
    source, output = Path(source), Path(output)
    try:
        comp = Compression(compression)
    except ValueError:
        raise Rejected(f"unknown compression {compression!r} (known: {', '.join(Compression)})") from None
    private = load_private_key(Path(key))
    created = _created()
    mtime = int(datetime.fromisoformat(created).timestamp())
    # Construct once with placeholders so a bad product or version fails before the long work.
    Manifest(FORMAT, product, version, created, PayloadInfo(comp.payload_name, 0, None, comp, BlockDigests(BLOCK_SIZE, b"")),
             0, 0)
    if not source.exists():
        raise Rejected(f"source {source} does not exist")
    if not output.parent.is_dir():
        raise Rejected(f"output directory {output.parent} does not exist")
    if recovery is not None:
        _check_recovery_dir(Path(recovery))
        if source.is_dir() and os.path.lexists(source / IN_RELEASE):
            raise Rejected(_CARRIES_ONE)

    with _temp_next_to(output, ".payload") as payload, _temp_next_to(output, ".tmp") as staged:
        with step(f"Packing {source} ({comp})"):
            if source.is_dir():
                _payload_from_directory(source, payload, comp)
            else:
                _payload_from_tar(source, payload, comp)
        with step("Counting and hashing the payload"):
            index, carried = TreeIndex(), _Digests(_in_release)
            files, nbytes = _counted_with_numbered_acls(payload, comp, source, index, carried)
            if files == 0:
                raise Rejected(f"source {source} holds no entries: a bundle of it would install nothing")
            if recovery is None:
                _check_carried(payload, index, carried)
                dirs: list[str] = []
            else:
                dirs = _recovery_dirs(index)
            if (links := index.boot_links()) or recovery is not None:
                more_files, more_bytes = _append(payload, comp, mtime, links, dirs, recovery)
                files, nbytes = files + more_files, nbytes + more_bytes
                for path, target in links:
                    index.add(path, "symlink", target)
            if check_boot:
                check_bootable(index, version)
            size, blocks = _block_digests(payload)
        manifest = Manifest(
            format=FORMAT, product=product, version=version, created=created,
            payload=PayloadInfo(name=comp.payload_name, size=size, sha256=None, compression=comp, blocks=blocks),
            rootfs_files=files, rootfs_bytes=nbytes,
        )
        manifest_bytes = manifest.to_json()
        if len(manifest_bytes) > MAX_MANIFEST:
            raise Rejected(f"payload of {size >> 20} MiB is too large: its block list makes a manifest of "
                           f"{len(manifest_bytes)} bytes, the recovery reads at most {MAX_MANIFEST}")
        signature = Signature(keyid(raw_public_key(private.public_key())), private.sign(manifest_bytes))
        with step(f"Writing {output}"):
            _write_outer(staged, manifest_bytes, signature.to_json(), payload, comp.payload_name, created)
            os.chmod(staged, 0o644)
            os.rename(staged, output)
            fsync_dir(output.parent)
    log.info("%s: %s %s, %d files, %d bytes unpacked, payload %d bytes, signed by %s",
             output, product, version, files, nbytes, size, signature.keyid)
    return manifest


def _created() -> str:
    """Now in UTC, or SOURCE_DATE_EPOCH for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _payload_from_directory(source: Path, payload: Path, comp: Compression) -> None:
    argv: list[str | os.PathLike[str]] = [
        "tar", "--create", "--file", payload, "--format=pax",
        "--xattrs", "--xattrs-include=*",
        # ACLs travel as SCHILY.acl.* (--acls); as raw xattrs too they would be applied twice.
        "--xattrs-exclude=system.posix_acl_access", "--xattrs-exclude=system.posix_acl_default",
        "--acls", "--sparse", "--numeric-owner", "--sort=name",
        # No atime/ctime and no PIDs in header names: the same tree gives the same payload.
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    ]
    if comp in _GNU_TAR_FILTER:
        argv.append(_GNU_TAR_FILTER[comp])
    argv += ["--directory", source, "."]
    env = {"ZSTD_CLEVEL": str(ZSTD_LEVEL), "ZSTD_NBTHREADS": "0", "XZ_OPT": "-T0"}
    run(argv, env=env, error=Rejected)


def _payload_from_tar(source: Path, payload: Path, comp: Compression) -> None:
    name, options = _LIBARCHIVE_FILTER.get(comp, (None, ""))

    def check(entry: int) -> None:
        _check_entry_path(entry_pathname(entry), source)
        if (link := entry_hardlink(entry)) is not None:
            _check_entry_path(link, source)

    try:
        with TarReader(source) as reader, PaxWriter(payload, name, options) as writer:
            _copy_entries(reader, writer, check)
    except ArchiveError as e:
        raise Rejected(f"cannot read {source} as a tar archive: {e}") from None


def _check_entry_path(name: str | bytes | None, source: Path) -> None:
    """Refuse at build time what the extractor would refuse on the device."""
    if not name:
        raise Rejected(f"{source}: an entry has no name")
    text = os.fsdecode(name) if isinstance(name, bytes) else name
    if text.startswith("/") or ".." in text.split("/"):
        raise Rejected(f"{source}: entry {text!r} points outside the tree (absolute or with ..)")
    # ext4 (every Linux file system) takes at most 255 bytes per name: the extraction would fail
    # there, after the erase.
    if any(len(os.fsencode(part)) > NAME_MAX for part in text.split("/")):
        raise Rejected(f"{source}: entry {text[:80]!r}… has a name longer than {NAME_MAX} bytes")


def _count(
    payload: Path, index: TreeIndex | None = None, digests: _Digests | None = None
) -> tuple[int, int, tuple[str, AclEntry] | None]:
    """Entries of every type, the bytes of regular files that carry data (hardlinks carry none), and
    the first ACL entry that names a user or group without a number (with its path), if any; `index`
    learns every path (for the bootability check), `digests` hashes the files it wants."""
    files = nbytes = 0
    unnumbered: tuple[str, AclEntry] | None = None
    try:
        with TarReader(payload) as reader:
            for entry in reader:
                files += 1
                if is_regular(entry):
                    nbytes += entry_size(entry)
                name = os.fsdecode(entry_pathname(entry) or b"")
                kind = kind_of(entry)
                if index is not None:
                    link = entry_hardlink(entry) if kind == "hardlink" else entry_symlink(entry)
                    index.add(name, kind, os.fsdecode(link) if link is not None else None)
                    if kind == "file" and index.wants_text(name) and entry_size(entry) <= 64 * 1024:
                        index.texts[normal(name)] = b"".join(bytes(b) for b in reader.data(CHUNK))
                if digests is not None and kind == "file" and digests.wanted(normal(name)):
                    digests.take(normal(name), reader.data(CHUNK))
                if unnumbered is None and has_acl(entry) and (bad := without_id(acl_entries(entry))):
                    unnumbered = (name, bad[0])
    except ArchiveError as e:
        raise Rejected(f"the payload just written cannot be read back: {e}") from None
    return files, nbytes, unnumbered


def _counted_with_numbered_acls(
    payload: Path, comp: Compression, source: Path, index: TreeIndex | None = None,
    digests: _Digests | None = None,
) -> tuple[int, int]:
    """The payload's entries and file bytes, once every ACL entry in it carries a number: those GNU tar
    wrote by name are numbered here when the source is a directory; a tar with names only is refused."""
    files, nbytes, unnumbered = _count(payload, index, digests)
    if unnumbered is None:
        return files, nbytes
    where, acl = unnumbered
    if not source.is_dir():
        raise Rejected(f"{source}: the ACL of {where} names {acl.describe()} without a number; the recovery "
                       "cannot resolve names (pack the tar with numeric ACLs, or give the directory)")
    with step("Numbering the ACL entries GNU tar wrote by name"):
        _number_acls(payload, comp, source)
    files, nbytes, unnumbered = _count(payload)
    assert unnumbered is None
    return files, nbytes


@dataclass
class _Digests:
    """Size and sha256 of the payload's regular files that `wanted` picks (by path below the root), and
    their bytes too when they are no larger than a recovery.json may be."""

    wanted: Callable[[str], bool]
    found: dict[str, tuple[FileDigest, bytes | None]] = field(default_factory=dict)

    def take(self, path: str, data: Iterator[memoryview]) -> None:
        h, size, small = hashlib.sha256(), 0, bytearray()
        for block in data:
            h.update(block)
            size += len(block)
            if size <= MAX_RECORD:
                small += block
        self.found[path] = (FileDigest(size, h.hexdigest()), bytes(small) if size <= MAX_RECORD else None)


def _in_release(path: str) -> bool:
    return path.startswith(f"{IN_RELEASE}/")


def _check_carried(payload: Path, index: TreeIndex, carried: _Digests) -> None:
    """Refuse a tree whose own recovery (at /usr/lib/reflash/recovery) does not match its recovery.json,
    or whose record is malformed: the running system would refuse to install it, long after the release
    shipped. Judged on the payload, links followed inside the tree; no recovery.json, nothing to check."""
    if f"{IN_RELEASE}/{RECORD}" not in index.kinds:
        return
    where = f"the recovery the tree carries at /{IN_RELEASE}"
    paths, hardlinks = {}, {}
    optional = [name for name in (MENU, MENU_SUMS) if index.is_file(f"{IN_RELEASE}/{name}")]
    for name in (*RECOVERY_FILES, *optional):
        path = f"{IN_RELEASE}/{name}"
        if not index.is_file(path):
            raise Rejected(f"{where} has no {name}: {index.why_not_file(path)}")
        found = index.resolve(path)
        assert found is not None
        kind, target = index.lookup(found)
        paths[name] = normal(target or "") if kind == "hardlink" else found
        if kind == "hardlink":
            hardlinks[name] = found
    if elsewhere := {path for path in paths.values() if path not in carried.found}:
        # A link leads out of /usr/lib/reflash/recovery: read the payload once more for those files.
        more = _Digests(elsewhere.__contains__)
        _count(payload, digests=more)
        carried.found.update(more.found)
    for name, path in paths.items():
        if path not in carried.found:  # only a hard link can lead to no file: is_file took its word
            raise Rejected(f"{where} has no {name}: /{hardlinks[name]} is a hard link to /{path}, "
                           "no file of the tree")
    record = f"/{IN_RELEASE}/{RECORD} in the tree"
    raw = carried.found[paths[RECORD]][1]
    if raw is None:
        raise Rejected(f"malformed {record}: larger than {MAX_RECORD} bytes")
    image = RecoveryImage.from_json(raw, what=record)
    if (why := _mismatch(image, {name: carried.found[paths[name]][0] for name in paths})) is not None:
        raise Rejected(f"{where} does not match its recovery.json: {why}")


def _check_recovery_dir(directory: Path) -> None:
    """Refuse, before any packing, a recovery to add that is not whole: vmlinuz, initrd.img and a
    recovery.json that matches them, as `reflash recovery` writes them."""
    what = f"--recovery {directory}"
    if not directory.is_dir():
        raise Rejected(f"{what} is no directory: give the recovery/ that `reflash recovery -o OUT` writes")
    if missing := [name for name in RECOVERY_FILES if not (directory / name).is_file()]:
        raise Rejected(f"{what} has no {', no '.join(missing)}: a recovery is {', '.join(RECOVERY_FILES[:-1])} "
                       f"and {RECORD}, as `reflash recovery` writes them")
    try:
        image = RecoveryImage.read(directory)
        assert image is not None
        got = {name: digest_file(directory / name) for name in _added(directory) if name != RECORD}
    except OSError as e:
        raise Rejected(f"cannot read {what}: {e}") from None
    if (why := _mismatch(image, got)) is not None:
        raise Rejected(f"{what} does not match its recovery.json: {why}")


def _mismatch(image: RecoveryImage, got: dict[str, FileDigest]) -> str | None:
    """How the files (by name) differ from their record, in words; None when they match."""
    wants = dict(image.files())
    if (sums := image.menu_sums()) is not None:
        wants[MENU_SUMS] = FileDigest(len(sums), hashlib.sha256(sums).hexdigest())
    for name, want in wants.items():
        have = got.get(name)
        if have is None:
            return f"there is no {name}, which the record names"
        if have.size != want.size:
            return f"{name} is {have.size} bytes, the record says {want.size}"
        if have.sha256 != want.sha256:
            return f"{name} has sha256 {have.sha256}, the record says {want.sha256}"
    return None


def _recovery_dirs(index: TreeIndex) -> list[str]:
    """The directories to add with a recovery: those on the way to /usr/lib/reflash/recovery that the tree
    lacks, and that one. Rejected when the tree has anything there, or a parent that is no directory (the
    recovery's files would be written through it)."""
    here = str(IN_RELEASE)
    if any(path == here or path.startswith(f"{here}/") for path in index.kinds):
        raise Rejected(_CARRIES_ONE)
    dirs = []
    for path in ("/".join(IN_RELEASE.parts[:n]) for n in range(1, len(IN_RELEASE.parts))):
        kind = index.lookup(path)[0]
        if kind is None:
            dirs.append(path)
        elif kind != "dir":
            raise Rejected(f"cannot add the recovery at /{here}: /{path} is a {kind} in the tree, not a directory")
    return [*dirs, here]


def _number_acls(payload: Path, comp: Compression, source: Path) -> None:
    """Re-encode `payload` in place with numbered ACL entries, resolving names as GNU tar did: here."""

    def resolve(acl: AclEntry) -> int:
        name = (acl.name or b"").decode(errors="surrogateescape")
        try:
            return pwd.getpwnam(name).pw_uid if acl.tag == USER else grp.getgrnam(name).gr_gid
        except KeyError:
            raise Rejected(f"{source}: an ACL names {acl.describe()}, which this machine does not know") from None

    name, options = _LIBARCHIVE_FILTER.get(comp, (None, ""))
    numbered = payload.with_name(payload.name + ".numbered")
    try:
        with TarReader(payload) as reader, PaxWriter(numbered, name, options) as writer:
            _copy_entries(reader, writer, lambda entry: number_acl(entry, resolve))
        os.replace(numbered, payload)
    finally:
        with contextlib.suppress(FileNotFoundError):
            numbered.unlink()


def _copy_entries(reader: TarReader, writer: PaxWriter, each: Callable[[int], object]) -> None:
    """Every entry of `reader` into `writer` as pax, after `each(entry)` (which may change it)."""
    for entry in reader:
        each(entry)
        # read_data fills sparse holes with zeros; the pax writer skips them again by the entry's map.
        writer.copy(entry, reader.data(CHUNK))


def _append(
    payload: Path, comp: Compression, mtime: int, links: list[tuple[str, str]], dirs: list[str],
    recovery: Path | None,
) -> tuple[int, int]:
    """The payload again with entries at its end: `links` (path, target), the boot menu's /boot/vmlinuz
    and /boot/initrd.img in a tree that has only Debian's /vmlinuz and /initrd.img; then `dirs` and the
    files of `recovery` at /usr/lib/reflash/recovery, owned by root and dated `mtime`. Returns the
    entries and file bytes added, for the manifest's counts."""
    what = []
    if links:
        what.append(f"{', '.join(f'/{path} -> {target}' for path, target in links)} for the boot menu "
                    "(where Debian's links at the root lead)")
    if recovery is not None:
        what.append(f"the recovery {recovery} at /{IN_RELEASE}")
    nbytes = 0
    with step(f"Adding {' and '.join(what)}"):
        name, options = _LIBARCHIVE_FILTER.get(comp, (None, ""))
        with _temp_next_to(payload, ".more") as fresh:
            try:
                with TarReader(payload) as reader, PaxWriter(fresh, name, options) as writer:
                    _copy_entries(reader, writer, lambda entry: None)
                    for path, target in links:
                        writer.symlink(path, target, mtime)
                    for path in dirs:
                        writer.directory(path, mtime)
                    if recovery is not None:
                        for file in _added(recovery):
                            nbytes += writer.file(f"{IN_RELEASE}/{file}", recovery / file, mtime)
            except (ArchiveError, OSError) as e:
                raise Rejected(f"cannot add {' and '.join(what)} to the payload: {e}") from None
            os.replace(fresh, payload)
    return len(links) + len(dirs) + (len(_added(recovery)) if recovery is not None else 0), nbytes


def _added(recovery: Path) -> list[str]:
    """The files of a recovery directory that go into the tree: the three always, the menu when it has one."""
    return [name for name in CONTENT if name in RECOVERY_FILES or (recovery / name).is_file()]


def _block_digests(path: Path) -> tuple[int, BlockDigests]:
    """The file's size and the sha256 of each of its BLOCK_SIZE blocks, for the manifest."""
    digests = bytearray()
    buf = bytearray(BLOCK_SIZE)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = 0
            while n < BLOCK_SIZE and (got := f.readinto(view[n:])):
                n += got
            if not n:
                break
            digests += hashlib.sha256(view[:n]).digest()
            size += n
    return size, BlockDigests(BLOCK_SIZE, bytes(digests))


def _write_outer(
    path: Path, manifest: bytes, signature: bytes, payload: Path, payload_name: str, created: str
) -> None:
    """The outer pax tar: manifest, signature, payload, streamed from the staged payload file."""
    mtime = int(datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp())

    def info(name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime, ti.type = size, 0o644, mtime, tarfile.REGTYPE
        return ti

    with open(path, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:
            for name, data in ((MANIFEST_NAME, manifest), (SIGNATURE_NAME, signature)):
                tar.addfile(info(name, len(data)), _BytesReader(data))
            with open(payload, "rb") as f:
                tar.addfile(info(payload_name, os.fstat(f.fileno()).st_size), f)
        raw.flush()
        os.fsync(raw.fileno())


class _BytesReader:
    """The minimal file object tarfile.addfile reads from."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return chunk


@contextlib.contextmanager
def _temp_next_to(output: Path, suffix: str) -> Iterator[Path]:
    """A temporary file in the output's directory (same file system: rename is atomic), always removed."""
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=suffix, dir=output.parent)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
