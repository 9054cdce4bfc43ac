"""Shared pytest setup: Hypothesis profiles and the ``gpu`` marker.

``HYPOTHESIS_PROFILE`` picks a profile: ``ci`` (default, hundreds of examples),
``dev`` (quick), ``slow`` (thousands, for long local runs).
"""

from __future__ import annotations

import os

# Triton reads this when its decorators run: it must be set before any kernel
# module is imported by a test.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=30, stateful_step_count=20, deadline=None)
settings.register_profile(
    "slow",
    max_examples=3000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
