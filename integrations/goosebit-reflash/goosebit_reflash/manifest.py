"""What gooseBit needs to know of a reflash bundle: its product and version, from `manifest.json`.

Standard library only, and no import of reflash itself: this runs in gooseBit's environment, which does
not carry the appliance's code. Nothing here is trusted by a device: the appliance verifies the
bundle's signature and every check itself before installing anything.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"  # the bundle's first member (docs/DESIGN.md, "The bundle")
MANIFEST_CAP = 8 * 1024 * 1024
# What gooseBit's own version parser takes and our versions are: dotted numbers with an optional suffix.
VERSION = re.compile(r"[0-9]+(\.[0-9]+){0,3}([-+][0-9A-Za-z.+-]{1,64})?")
PRODUCT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class NotABundle(ValueError):
    """The file is not a reflash bundle gooseBit can offer (the reason is the message)."""


@dataclass(frozen=True)
class BundleInfo:
    product: str
    version: str


def read_info(path: Path) -> BundleInfo:
    """Product and version of the bundle at `path`; NotABundle when its first member is no manifest."""
    try:
        with tarfile.open(path, mode="r|") as archive:  # streaming: only the first member is read
            member = archive.next()
            if member is None or member.name != MANIFEST or not member.isfile():
                raise NotABundle(f"the first member is not {MANIFEST}")
            if member.size > MANIFEST_CAP:
                raise NotABundle(f"{MANIFEST} is larger than {MANIFEST_CAP // (1 << 20)} MiB")
            stream = archive.extractfile(member)
            assert stream is not None  # a regular file
            raw = stream.read(MANIFEST_CAP + 1)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise NotABundle(f"not a tar archive: {e}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise NotABundle(f"{MANIFEST} is not JSON") from None
    if not isinstance(doc, dict):
        raise NotABundle(f"{MANIFEST} is not an object")
    product, version = doc.get("product"), doc.get("version")
    if not isinstance(product, str) or not PRODUCT.fullmatch(product):
        raise NotABundle(f"{MANIFEST} has no usable product")
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise NotABundle(f"{MANIFEST} has no usable version")
    return BundleInfo(product, version)
