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
    # `slow` tests run only when asked for: `-m slow` (or any -m naming it)
    # or RADIXSEG_SLOW=1.
    want_slow = "slow" in (config.getoption("-m") or "") or os.environ.get("RADIXSEG_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow or RADIXSEG_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    cuda = _has_cuda()
    for item in items:
        if "slow" in item.keywords and not want_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
