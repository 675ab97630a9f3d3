"""Shared unit-test fixtures (a signing key pair, the rich sample tree) and the Hypothesis profiles for
the property-based tests: few examples in `make test`, many in `make reliability`.

`RELIABILITY=full` (set by `make reliability`) selects the `full` profile; `HYPOTHESIS_PROFILE` names
any profile explicitly. Tests leave the example count to the profile and set only what is theirs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from mkimage.bundle import generate_keys
from tests.unit.reflashctl_support import Releases, System, make_releases, make_system
from tests.unit.sample_tree import make_sample_tree

settings.register_profile("fast", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("full", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("full" if os.environ.get("RELIABILITY") == "full" else "fast")
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a fresh signing.pem / signing.pub pair."""
    directory = tmp_path_factory.mktemp("keys")
    generate_keys(directory)
    return directory


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rich sample tree (release 2.0.0): device nodes, foreign owners, capabilities, ACLs, …"""
    if os.geteuid() != 0:
        pytest.skip("needs root: the sample tree has device nodes, foreign owners, security.capability")
    return make_sample_tree(tmp_path_factory.mktemp("sample") / "root", variant="2.0.0")


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    """Signed bundles of the test releases and the keys they are signed with (tests/unit/reflashctl_support.py)."""
    return make_releases(tmp_path_factory.mktemp("releases"))


@pytest.fixture
def system(tmp_path: Path, releases: Releases) -> System:
    """A running system's cfg, storage and configuration in a directory, running 1.0.0."""
    return make_system(tmp_path / "system", releases)
