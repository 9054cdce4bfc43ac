"""Shared pytest setup: Hypothesis profiles, the ``gpu`` marker, SGLang's loader.

``HYPOTHESIS_PROFILE`` picks a profile: ``ci`` (default, hundreds of examples),
``dev`` (quick), ``slow`` (thousands, for long local runs).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

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


_SGLANG_LOADER = Path(__file__).resolve().parents[1] / "benchmarks" / "_sglang.py"


@pytest.fixture(scope="session")
def sglang_loader() -> ModuleType:
    """``benchmarks/_sglang.py`` (SGLang 0.5.23's cache modules on CPU, as the
    benchmarks load them), imported once; a clean skip without SGLang."""
    if not _SGLANG_LOADER.exists():
        pytest.skip("benchmarks/_sglang.py (the SGLang loader) is not in this checkout")
    mod = sys.modules.get("_sglang")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_sglang", _SGLANG_LOADER)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_sglang"] = mod
        spec.loader.exec_module(mod)
    if not mod.available():
        pytest.skip(
            f"sglang is not installed: pip install --no-deps sglang=={mod.SGLANG_VERSION} "
            "and -r benchmarks/requirements-bench.txt"
        )
    return mod
