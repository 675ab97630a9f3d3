"""`PUT /plugins/reflash/software`: a reflash bundle becomes gooseBit software, compatible with the
hardware `(product, hw_revision)` that the appliance reports in its configData.

gooseBit 0.2.12 recognises only SWUpdate and RAUC images when software is uploaded; this route reads
our manifest instead and then creates the same records gooseBit's own upload creates, so rollouts,
assignments, "latest", the download route and the feedback all stay gooseBit's own.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil

from anyio import Path, to_thread
from fastapi import APIRouter, Depends, File, Form, HTTPException, Security, UploadFile
from fastapi.requests import Request
from goosebit.auth import validate_current_user, validate_user_permissions
from goosebit.auth.permissions import GOOSEBIT_PERMISSIONS
from goosebit.db.models import Hardware, Software, SoftwareImageFormat
from goosebit.storage import storage
from goosebit.util.path import validate_filename

from .manifest import NotABundle, read_info

# Signed-in users only, as gooseBit's own /api (its permission check alone would fail on no user at all).
router = APIRouter(tags=["reflash"], dependencies=[Depends(validate_current_user)])

SUFFIX = ".bundle"


def _digest(path: str) -> tuple[str, int]:
    sha1 = hashlib.sha1(usedforsecurity=False)  # the hash gooseBit hands devices (`hashes.sha1`)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha1.update(chunk)
            size += len(chunk)
    return sha1.hexdigest(), size


@router.put(
    "/software",
    dependencies=[Security(validate_user_permissions, scopes=[GOOSEBIT_PERMISSIONS["software"]["write"]()])],
)
async def put_bundle(_: Request, file: UploadFile = File(...), hw_revision: str = Form("default")) -> dict[str, object]:
    temp_dir = await storage.get_temp_dir()
    try:
        name_path = await validate_filename(file.filename or "", temp_dir)
    except ValueError as e:
        raise HTTPException(400, f"Invalid filename: {e}")
    if not name_path.name.endswith(SUFFIX) or "/" in (file.filename or ""):
        raise HTTPException(400, f"a reflash bundle's name ends in {SUFFIX}")
    temp = temp_dir / f"reflash-{secrets.token_hex(8)}.tmp"
    try:
        with open(temp, "wb") as out:
            await to_thread.run_sync(shutil.copyfileobj, file.file, out)
        try:
            info = await to_thread.run_sync(read_info, temp)
        except NotABundle as e:
            raise HTTPException(422, f"not a reflash bundle: {e}")
        sha1, size = await to_thread.run_sync(_digest, str(temp))
        hardware = (await Hardware.get_or_create(model=info.product, revision=hw_revision))[0]
        if await Software.filter(version=info.version, compatibility__id=hardware.id).exists():
            raise HTTPException(409, "Software with same version and overlapping compatibility already exists")
        uri = await storage.store_file(Path(temp), Path(sha1) / name_path.name)
        # gooseBit knows two image formats and shows this one in its UI only; devices never see it.
        software = await Software.create(uri=uri, version=info.version, size=size, hash=sha1,
                                         image_format=SoftwareImageFormat.SWU)
        await software.compatibility.add(hardware)
    finally:
        await temp.unlink(missing_ok=True)
    return {"id": software.id, "product": info.product, "version": info.version, "sha1": sha1, "size": size}
