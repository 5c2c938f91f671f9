"""Shared test configuration: Hypothesis profiles and the GPU marker.

Profiles (select with ``HYPOTHESIS_PROFILE`` or ``--hypothesis-profile``):

* ``ci`` (default): few examples per property, no deadline; the whole suite stays
  well under 20 minutes on 2 cores.
* ``thorough``: many examples (run by hand; see docs/testing).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=5000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _has_cuda_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        pass
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("gpu") for item in items) and not _has_cuda_gpu():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)
