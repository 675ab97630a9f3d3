"""ACL entries travel as numbers: the recovery OS cannot resolve the appliance's user names.

GNU tar writes `user:daemon:r--` without the number when the packing machine knows the name; before
mkimage numbered such entries, a bundle like that passed verification and then failed in the
recovery after the erase ("Failed to set acl on fd"), found by the VM fidelity test.
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import subprocess
import tarfile
from pathlib import Path

import libarchive
import pytest

from mkimage.bundle import create_bundle
from recovery.core.acl import ACCESS, DEFAULT, GROUP, USER, acl_entries
from recovery.core.bundle import verify_bundle
from recovery.core.errors import Failed, Rejected
from recovery.os.extract import apply_bundle, extract_payload
from recovery.core.keys import Keyring

from .payloads import raw_bundle

UNKNOWN = "no-such-user-anywhere"


def named_user() -> tuple[str, int]:
    """A user this machine names (Debian always has daemon, uid 1)."""
    entry = pwd.getpwnam("daemon")
    return entry.pw_name, entry.pw_uid


def named_group() -> tuple[str, int]:
    entry = grp.getgrnam("adm")
    return entry.gr_name, entry.gr_gid


def payload_acls(bundle: Path, keys: Path) -> dict[str, list[tuple[int, int, int, bytes | None]]]:
    verified = verify_bundle(bundle, Keyring.load(keys))
    with bundle.open("rb") as f:
        f.seek(verified.payload_offset)
        payload = f.read(verified.manifest.payload.size)
    found = {}
    with libarchive.memory_reader(payload) as archive:
        for entry in archive:
            entries = [(e.type, e.tag, e.id, e.name) for e in acl_entries(entry._entry_p) if e.tag in (USER, GROUP)]
            if entries:
                found[entry.pathname.strip("./")] = entries
    return found


def test_named_acl_entries_of_a_directory_get_their_numbers(tmp_path: Path, keys: Path) -> None:
    user, uid = named_user()
    group, gid = named_group()
    tree = tmp_path / "tree"
    (tree / "shared").mkdir(parents=True)
    (tree / "shared/file").write_text("x\n")
    subprocess.run(["setfacl", "-m", f"u:{user}:r,g:{group}:rw", tree / "shared/file"], check=True)
    subprocess.run(["setfacl", "-d", "-m", f"u:{user}:rx", tree / "shared"], check=True)
    bundle = tmp_path / "b.bundle"
    create_bundle(tree, bundle, key=keys / "signing.pem", product="p", version="1", check_boot=False)
    acls = payload_acls(bundle, keys)
    # GNU tar wrote the names; the payload now carries the numbers beside them.
    assert sorted(acls["shared/file"]) == sorted([(ACCESS, USER, uid, user.encode()), (ACCESS, GROUP, gid, group.encode())])
    assert acls["shared"] == [(DEFAULT, USER, uid, user.encode())]

    target = tmp_path / "target"
    target.mkdir()
    apply_bundle(verify_bundle(bundle, Keyring.load(keys)), target)
    shown = subprocess.run(["getfacl", "--numeric", "--omit-header", target / "shared/file"],
                           check=True, capture_output=True, text=True).stdout.split()
    assert f"user:{uid}:r--" in shown and f"group:{gid}:rw-" in shown


def unnumbered_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("./shared")
        info.size, info.mode = 2, 0o640
        info.pax_headers = {"SCHILY.acl.access": f"user::rw-,user:{UNKNOWN}:r--,group::r--,mask::r--,other::---"}
        tar.addfile(info, io.BytesIO(b"x\n"))
    return out.getvalue()


def test_a_tar_with_acl_names_and_no_numbers_is_refused(tmp_path: Path, keys: Path) -> None:
    source = tmp_path / "source.tar"
    source.write_bytes(unnumbered_tar())
    with pytest.raises(Rejected, match=f"the ACL of ./shared names user '{UNKNOWN}' without a number"):
        create_bundle(source, tmp_path / "b.bundle", key=keys / "signing.pem", product="p", version="1", check_boot=False)
    assert not (tmp_path / "b.bundle").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.tar"]  # no staged payload left


def test_a_directory_acl_with_a_name_unknown_here_is_refused(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("x\n")
    user, _ = named_user()
    subprocess.run(["setfacl", "-m", f"u:{user}:r", tree / "file"], check=True)

    def unknown(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr(pwd, "getpwnam", unknown)  # the name went away between tar's lookup and ours
    with pytest.raises(Rejected, match=f"an ACL names user '{user}', which this machine does not know"):
        create_bundle(tree, tmp_path / "b.bundle", key=keys / "signing.pem", product="p", version="1", check_boot=False)


def test_extraction_names_an_unnumbered_acl_entry(tmp_path: Path) -> None:
    bundle = raw_bundle(tmp_path / "raw.bundle", unnumbered_tar(), files=1, nbytes=2)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(Failed) as caught:
        extract_payload(bundle, target)
    assert str(caught.value) == (
        f"Failed to extract ./shared: its ACL names user '{UNKNOWN}' without a number, which the recovery "
        "cannot resolve (make the bundle with mkimage)")
    assert "\n" not in str(caught.value)
    assert not os.path.exists(target / "shared")
