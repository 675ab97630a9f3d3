"""Everything under tests/vm boots QEMU: the rig's marker, fixtures and failure reports come from its plugin."""

from typing import Any

import pytest

from tests.vm.staging import partition_digest
from vm.disk import DiskImage

from vm.pytest_plugin import (  # noqa: F401  (pytest finds hooks and fixtures by name here)
    machine,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_makereport,
    vm_disk,
)


@pytest.fixture(scope="module")
def system_digest(built_image: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The pristine system partition's hash, from a throw-away overlay of the built image."""
    base = DiskImage.open(built_image.disk).overlay(tmp_path_factory.mktemp("digest") / "d.qcow2")
    return partition_digest(base, "system")
