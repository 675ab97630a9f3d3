"""Hypothesis profiles for the property-based tests: few examples in `make test`, many in `make reliability`.

`RELIABILITY=full` (set by `make reliability`) selects the `full` profile; `HYPOTHESIS_PROFILE` names
any profile explicitly. Tests leave the example count to the profile and set only what is theirs.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("fast", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("full", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("full" if os.environ.get("RELIABILITY") == "full" else "fast")
)
