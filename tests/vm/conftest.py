"""Everything under tests/vm boots QEMU: the rig's marker, fixtures and failure reports come from its plugin."""

from vm.pytest_plugin import (  # noqa: F401  (pytest finds hooks and fixtures by name here)
    machine,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_runtest_makereport,
    vm_disk,
)
