"""What a validly signed bundle still must not do to the machine that installs it (issue 10 of the audit):
reach outside the target through a hard link to a symlink, get unverified bytes extracted by changing
the payload after verification, write more than its manifest declares, or hide a changed byte past
4 or 8 GiB.

Every payload here is extracted for real by libarchive (no mock); each test names its scenario in the
reliability table.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from recovery.os import cli
from recovery.core.manifest import BLOCK_SIZE, BlockDigests, Compression, Manifest, PayloadInfo
from recovery.core.bundle import verify_bundle
from recovery.core.errors import Failed, Rejected
from recovery.os.extract import apply_bundle, extract_payload
from recovery.core.keys import Keyring
from tests.reliability import Scenario, scenario  # noqa: F401  (the fixture, also without the plugin)
from tests.unit.sample_tree import assemble_bundle, sign_manifest

from .payloads import Entry, block_digests, raw_bundle, tar, tree_state

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture()
def arena(tmp_path: Path) -> Path:
    """tmp_path/target (empty) next to tmp_path/outside: a file and a directory an attacker would like
    to make setuid and world-writable."""
    (tmp_path / "target").mkdir()
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "dir").chmod(0o755)
    (outside / "file").write_text("do not touch\n")
    (outside / "file").chmod(0o644)
    return tmp_path


def signed_bundle(path: Path, payload: bytes, keys: Path, *, files: int, nbytes: int,
                  compression: Compression = Compression.none) -> Path:
    """A real bundle of `payload`, signed with the test key: it passes `recovery verify`."""
    manifest = Manifest(
        format=2, product="hostile", version="1.0", created="2026-01-01T00:00:00Z",
        payload=PayloadInfo(compression.payload_name, len(payload), None, compression, block_digests(payload)),
        rootfs_files=files, rootfs_bytes=nbytes,
    ).to_json()
    return assemble_bundle(path, [("manifest.json", manifest), ("manifest.json.sig", sign_manifest(manifest, keys / "signing.pem")),
                                  (compression.payload_name, payload)])


# --- 1. a hard link to a symlink --------------------------------------------------------------------

ACL_RECORD = (b"SCHILY.acl.access", b"user::rwx,user:daemon:rwx:1,group::rwx,mask::rwx,other::rwx")


def link_to_symlink(victim: Path, *, acl: bool) -> bytes:
    """The audit's payload: `./s` a symlink to the victim, `./h` a hard link to `./s` with mode 06777
    and one byte of data (pax size record), optionally with an ACL record."""
    pax = ((b"size", b"1"), *((ACL_RECORD,) if acl else ()))
    return tar(
        Entry(b"./", b"5", mode=0o755),
        Entry(b"./s", b"2", link=os.fsencode(victim)),
        Entry(b"./h", b"1", link=b"./s", mode=0o6777, data=b"x", pax=pax),
    )


@pytest.mark.parametrize("acl", [False, True], ids=["mode", "mode+acl"])
@pytest.mark.parametrize("victim", ["file", "dir"])
def test_hard_link_to_a_symlink_changes_nothing_outside(
    arena: Path, keys: Path, victim: str, acl: bool, scenario: Scenario
) -> None:
    scenario.name = "Security: hard link to a symlink that points outside (mode 06777, data, ACL record)"
    scenario.checked = ("`recovery apply` of the signed payload exits 1 with the reason; the outside file or "
                        "directory keeps mode, owner, link count, content and xattrs (ACL); the target is left empty")
    payload = link_to_symlink(arena / "outside" / victim, acl=acl)
    bundle = signed_bundle(arena / "h.bundle", payload, keys, files=3, nbytes=1)
    before = tree_state(arena / "outside")
    keyring = Keyring.load(keys)
    verify_bundle(bundle, keyring)  # a valid signature: only the extractor stands in the way
    code = cli.main(["apply", "--keys", str(keys), str(bundle), "--target", str(arena / "target")])
    assert code == 1
    assert tree_state(arena / "outside") == before
    assert list((arena / "target").iterdir()) == []
    # and the library call, which the recovery OS makes
    with pytest.raises(Failed, match=r"^Failed to extract \./h: hard link to \./s, which is not a regular file "
                                     r"extracted earlier from this payload$"):
        extract_payload(verify_bundle(bundle, keyring), arena / "target")
    assert tree_state(arena / "outside") == before
    scenario.note(f"{victim} victim{' with an ACL record' if acl else ''}: refused, nothing outside changed")


def test_hard_link_that_carries_data_is_refused(arena: Path) -> None:
    payload = tar(Entry(b"a", data=b"first"), Entry(b"b", b"1", link=b"a", data=b"more", pax=((b"size", b"4"),)))
    with pytest.raises(Failed, match="^Failed to extract b: a hard link that carries 4 bytes of data$"):
        extract_payload(raw_bundle(arena / "x.bundle", payload), arena / "target")
    assert (arena / "target/a").read_bytes() == b"first"


def test_symlink_with_an_acl_is_refused(arena: Path) -> None:
    before = tree_state(arena / "outside")
    payload = tar(Entry(b"s", b"2", link=os.fsencode(arena / "outside/file"), mode=0o777, pax=(ACL_RECORD,)))
    with pytest.raises(Failed, match="^Failed to extract s: a symbolic link that carries an ACL$"):
        extract_payload(raw_bundle(arena / "x.bundle", payload), arena / "target")
    assert tree_state(arena / "outside") == before


def test_hard_links_to_files_of_the_payload_still_work(arena: Path) -> None:
    """GNU tar's own hard links (to the first name, or to another link of the same file) extract."""
    payload = tar(Entry(b"./", b"5", mode=0o755), Entry(b"./a", data=b"data", mode=0o4755),
                  Entry(b"./b", b"1", link=b"./a"), Entry(b"c", b"1", link=b"b"))
    extract_payload(raw_bundle(arena / "x.bundle", payload, files=4, nbytes=4), arena / "target")
    a = (arena / "target/a").stat()
    assert a.st_nlink == 3 and stat.S_IMODE(a.st_mode) == 0o4755
    assert (arena / "target/c").stat().st_ino == a.st_ino


# --- 2. only verified bytes reach libarchive --------------------------------------------------------


class RewriteAfterFirstBlock:
    """A progress sink that, once the extractor has taken its first block, overwrites `data` at
    `offset` of the bundle file: the file changes between the verifier's read and the extractor's."""

    def __init__(self, path: Path, offset: int, data: bytes) -> None:
        self.path, self.offset, self.data, self.done = path, offset, data, False

    def update(self, n: int) -> None:
        if not self.done:
            with open(self.path, "r+b") as f:
                f.seek(self.offset)
                f.write(self.data)
            self.done = True

    def finish(self) -> None:
        pass


def late_entry_payload() -> tuple[bytes, int]:
    """An uncompressed payload whose first file fills three blocks, then `./late` in block 3; and the
    offset of `./late`'s header in the payload."""
    early = tar(Entry(b"./", b"5", mode=0o755), Entry(b"./early", data=os.urandom(3 * BLOCK_SIZE)), end=False)
    return early + tar(Entry(b"./late", data=b"signed content\n")), len(early)


def unsigned_entry(like: bytes) -> bytes:
    """A tar entry the signer never saw, the same length as `like` (a header and one block of data)."""
    evil = tar(Entry(b"./pwned", data=b"unsigned!", mode=0o4755), end=False)
    assert len(evil) == len(like)
    return evil


@pytest.mark.parametrize("when", ["after verification", "during extraction"])
def test_payload_rewritten_after_verification_extracts_nothing_of_the_changed_block(
    tmp_path: Path, keys: Path, when: str, scenario: Scenario
) -> None:
    scenario.name = "Security: payload rewritten in place after verification (unsigned entries in its tail)"
    scenario.checked = ("the extraction fails at the first changed block with the block named; nothing from that "
                        "block on is extracted (no unsigned entry); `apply_bundle` removes the partial tree")
    payload, late = late_entry_payload()
    bundle = signed_bundle(tmp_path / "b.bundle", payload, keys, files=3, nbytes=3 * BLOCK_SIZE + 15)
    verified = verify_bundle(bundle, Keyring.load(keys))
    evil = unsigned_entry(payload[late : late + 1024])
    offset = verified.payload_offset + late
    target = tmp_path / "target"
    target.mkdir()
    progress = RewriteAfterFirstBlock(bundle, offset, evil)
    if when == "after verification":
        progress.update(0)  # before the extractor reads anything
    block = late // BLOCK_SIZE
    with pytest.raises(Failed, match=rf"^payload sha256 mismatch during extraction: block {block} \(bytes "
                                     rf"{block * BLOCK_SIZE}-\d+\) changed after verification; removed the "
                                     rf"partial tree from {target}$"):
        apply_bundle(verified, target, progress=progress)  # type: ignore[arg-type]
    assert list(target.iterdir()) == []
    # extract_payload itself leaves what came before the changed block, and nothing after
    with open(bundle, "r+b") as f:
        f.seek(offset)
        f.write(payload[late : late + 1024])
    progress = RewriteAfterFirstBlock(bundle, offset, evil)
    with pytest.raises(Failed, match=rf"block {block} "):
        extract_payload(verified, target, progress=progress)  # type: ignore[arg-type]
    assert not (target / "pwned").exists() and not (target / "late").exists()
    scenario.note(f"rewritten {when}: failed at block {block}, no unsigned entry extracted")


def test_compressed_payload_rewritten_during_extraction(tmp_path: Path, keys: Path) -> None:
    raw, _ = late_entry_payload()
    payload = subprocess.run(["zstd", "-q", "-1", "-c"], input=raw, capture_output=True, check=True).stdout
    assert len(payload) > 2 * BLOCK_SIZE  # random data does not compress: several blocks
    bundle = signed_bundle(tmp_path / "b.bundle", payload, keys, files=3, nbytes=3 * BLOCK_SIZE + 15,
                           compression=Compression.zstd)
    verified = verify_bundle(bundle, Keyring.load(keys))
    offset = verified.payload_offset + 2 * BLOCK_SIZE + 100
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(Failed, match=r"^payload sha256 mismatch during extraction: block 2 "):
        extract_payload(verified, target, progress=RewriteAfterFirstBlock(bundle, offset, b"\xff" * 64))  # type: ignore[arg-type]
    assert not (target / "late").exists()


# Runs `recovery apply` in a process of its own with an audit hook: when the bundle is opened a second
# time (the extractor, after the verifier), the hook first rewrites its payload in place. No code of the
# project is patched: the race is the one an attacker with write access to the storage disk would run.
REWRITE_ON_SECOND_OPEN = """
import sys
bundle, offset, evil = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
opened = []

def hook(event, args):
    if event == "open" and args and str(args[0]) == bundle:
        opened.append(1)
        if len(opened) == 2:
            with open(bundle, "r+b") as f:
                f.seek(offset)
                f.write(evil)

sys.addaudithook(hook)
from recovery.os.cli import main
sys.exit(main(sys.argv[4:]))
"""


def test_cli_apply_refuses_a_payload_rewritten_between_verify_and_extract(tmp_path: Path, keys: Path) -> None:
    """`recovery apply` verifies and then extracts in one process: the rewrite lands in between."""
    payload, late = late_entry_payload()
    bundle = signed_bundle(tmp_path / "b.bundle", payload, keys, files=3, nbytes=3 * BLOCK_SIZE + 15)
    offset = verify_bundle(bundle, Keyring.load(keys)).payload_offset + late
    evil = unsigned_entry(payload[late : late + 1024])
    target = tmp_path / "target"
    target.mkdir()
    proc = subprocess.run([sys.executable, "-c", REWRITE_ON_SECOND_OPEN, str(bundle), str(offset), evil.hex(),
                           "apply", "--keys", str(keys), str(bundle), "--target", str(target)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 1, proc.stderr
    assert bundle.read_bytes()[offset : offset + len(evil)] == evil  # the rewrite did happen
    err = proc.stderr
    assert err.startswith("failed: payload sha256 mismatch during extraction: block 3 ") and err.count("\n") == 1, err
    assert "removed the partial tree" in err
    assert list(target.iterdir()) == []


def test_format_1_bundle_gets_the_same_guarantee(tmp_path: Path, keys: Path) -> None:
    """A bundle of the first format signs one sha256; the blocks verification read are what the
    extractor holds the second read to."""
    payload, late = late_entry_payload()
    manifest = Manifest(
        format=1, product="old", version="1.0", created="2025-01-01T00:00:00Z",
        payload=PayloadInfo("rootfs.tar", len(payload), hashlib.sha256(payload).hexdigest(), Compression.none),
        rootfs_files=3, rootfs_bytes=3 * BLOCK_SIZE + 15,
    ).to_json()
    bundle = assemble_bundle(tmp_path / "old.bundle", [("manifest.json", manifest),
                             ("manifest.json.sig", sign_manifest(manifest, keys / "signing.pem")), ("rootfs.tar", payload)])
    verified = verify_bundle(bundle, Keyring.load(keys))
    assert verified.manifest.format == 1 and verified.blocks == block_digests(payload)
    target = tmp_path / "target"
    target.mkdir()
    apply_bundle(verified, target)
    assert (target / "late").read_bytes() == b"signed content\n"
    (other := tmp_path / "other").mkdir()
    with pytest.raises(Failed, match=r"^payload sha256 mismatch during extraction: block 3 "):
        extract_payload(verified, other, progress=RewriteAfterFirstBlock(  # type: ignore[arg-type]
            bundle, verified.payload_offset + late, unsigned_entry(payload[late : late + 1024])))
    assert not (other / "pwned").exists()


# --- 3. the manifest's counts hold while extracting -------------------------------------------------


def zeros_payload(path: Path, size: int) -> bytes:
    """A zstd payload of one file `./zeros` of `size` zero bytes (a 1 GiB file packs to about 33 KB)."""
    header = tar(Entry(b"./zeros", size=size), end=False)
    with open(path, "wb") as out:
        zstd = subprocess.Popen(["zstd", "-q", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert zstd.stdin is not None
        zstd.stdin.write(header)
        chunk = bytes(MiB)
        for _ in range(size // MiB):
            zstd.stdin.write(chunk)
        zstd.stdin.write(bytes(size % MiB + 1024))  # the rest, then the end-of-archive marker
        zstd.stdin.close()
        assert zstd.wait() == 0
    return path.read_bytes()


def used(root: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*"))


def test_file_larger_than_the_manifest_says_is_not_written(tmp_path: Path, scenario: Scenario) -> None:
    scenario.name = "Security: payload that holds more than its manifest declares (1 GiB of zeros, manifest 5 bytes)"
    scenario.checked = ("the extraction stops before the entry that passes the declared bytes or entries; far less "
                        "than 1 GiB is written")
    payload = zeros_payload(tmp_path / "zeros.tar.zst", GiB)
    assert len(payload) < MiB
    bundle = raw_bundle(tmp_path / "z.bundle", payload, compression=Compression.zstd, files=1, nbytes=5)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(Failed, match=r"^Failed to extract \./zeros: its 1073741824 bytes would pass the 5 file bytes "
                                     r"its manifest declares \(0 extracted\)$"):
        extract_payload(bundle, target)
    assert used(target) < MiB
    scenario.note(f"1 GiB file in a {len(payload)}-byte payload: {used(target)} bytes written")


def test_more_entries_than_the_manifest_says_stop_at_the_first_extra(tmp_path: Path) -> None:
    payload = tar(*(Entry(b"f%d" % i, data=b"x") for i in range(100)))
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(Failed, match="^Failed to extract f2: the payload holds more than the 2 entries its manifest declares$"):
        extract_payload(raw_bundle(tmp_path / "n.bundle", payload, files=2, nbytes=100), target)
    assert sorted(p.name for p in target.iterdir()) == ["f0", "f1"]


def test_bytes_over_several_files_stop_before_the_file_that_passes(tmp_path: Path) -> None:
    payload = tar(Entry(b"a", data=b"12345678"), Entry(b"b", data=b"12345678"))
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(Failed, match=r"^Failed to extract b: its 8 bytes would pass the 10 file bytes its manifest "
                                     r"declares \(8 extracted\)$"):
        extract_payload(raw_bundle(tmp_path / "n.bundle", payload, files=2, nbytes=10), target)
    assert not (target / "b").exists()


# --- 7. bundles over 4 and 8 GiB ----------------------------------------------------------------------


def big_bundle(path: Path, keys: Path, size: int, *, fmt: int) -> tuple[Path, int]:
    """A signed bundle whose payload is `size` zero bytes, as a hole in a sparse file (nothing is
    written but the headers); returns it and the payload's offset. The payload's size travels in a
    pax record, as Python's tarfile writes it past 8 GiB."""
    zero_block = hashlib.sha256(bytes(BLOCK_SIZE)).digest()
    if fmt == 2:
        tail = size % BLOCK_SIZE
        digests = zero_block * (size // BLOCK_SIZE) + (hashlib.sha256(bytes(tail)).digest() if tail else b"")
        info = PayloadInfo("rootfs.tar", size, None, Compression.none, BlockDigests(BLOCK_SIZE, digests))
    else:
        whole = hashlib.sha256()
        chunk = bytes(64 * MiB)
        for _ in range(size // len(chunk)):
            whole.update(chunk)
        whole.update(bytes(size % len(chunk)))
        info = PayloadInfo("rootfs.tar", size, whole.hexdigest(), Compression.none)
    manifest = Manifest(format=fmt, product="big", version="1.0", created="2026-01-01T00:00:00Z",
                        payload=info, rootfs_files=1, rootfs_bytes=size).to_json()
    signature = sign_manifest(manifest, keys / "signing.pem")
    with open(path, "wb") as f:
        for name, data in (("manifest.json", manifest), ("manifest.json.sig", signature)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            f.write(ti.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512))
        ti = tarfile.TarInfo("rootfs.tar")
        ti.size, ti.mode = size, 0o644
        f.write(ti.tobuf(tarfile.PAX_FORMAT))
        offset = f.tell()
        f.seek(offset + size + -size % 512)
        f.write(bytes(1024))
    return path, offset


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0x01]))


BIG = 8 * GiB + 3 * MiB + 5  # past 8 GiB, and not a whole number of blocks


@pytest.mark.parametrize("fmt", [2, pytest.param(1, marks=pytest.mark.reliability)])
def test_bundle_over_8_gib_verifies_and_a_flipped_byte_past_4_or_8_gib_is_rejected(
    tmp_path: Path, keys: Path, fmt: int, scenario: Scenario
) -> None:
    scenario.name = f"Security: bundle of format {fmt} with a payload over 8 GiB (pax size), one byte flipped past 4 and 8 GiB"
    scenario.checked = "the whole bundle verifies; a byte flipped past 4 GiB and one past 8 GiB are each rejected"
    bundle, offset = big_bundle(tmp_path / "big.bundle", keys, BIG, fmt=fmt)
    assert bundle.stat().st_size > BIG and bundle.stat().st_blocks * 512 < MiB  # sparse: nothing but headers
    keyring = Keyring.load(keys)
    verified = verify_bundle(bundle, keyring)
    assert verified.manifest.payload.size == BIG and len(verified.blocks) == -(-BIG // BLOCK_SIZE)
    for at in (4 * GiB + 12345, 8 * GiB + 2 * MiB + 7):
        flip(bundle, offset + at)
        with pytest.raises(Rejected, match="^payload sha256 mismatch: ") as info:
            verify_bundle(bundle, keyring)
        if fmt == 2:  # the block is named
            assert f"block {at // BLOCK_SIZE} " in str(info.value)
        flip(bundle, offset + at)
        scenario.note(f"byte at payload offset {at} flipped: {info.value}")
