"""Load SGLang's KV-cache allocators and radix cache on CPU, without SGLang's server.

The benchmarks drive SGLang's own classes side by side with radixseg's, and
``tests/test_integration_sglang.py`` compares ``radixseg.integrations.sglang``
with them step by step. The package is installed with ``--no-deps`` (its full
dependency set is a GPU serving stack), so this module imports only the cache
modules: ``sglang`` and the ``sglang.kernels`` package chain become empty
package objects whose ``__path__`` points at the installed directories (their
``__init__.py`` files pull in transformers, FlashInfer and the kernel
registry), and two modules the cache code needs only for a type hint and for
disabled metrics are replaced by stand-ins. Everything timed is SGLang's
unmodified code.

Install (the benchmark-only extra; see ``benchmarks/requirements-bench.txt``)::

    /root/.cache/radixseg/venv/bin/pip install --no-deps sglang==0.5.23
    /root/.cache/radixseg/venv/bin/pip install numpy orjson psutil pybase64 requests \
        packaging pillow starlette msgspec pydantic pyzmq tqdm
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Any

import torch

__all__ = [
    "SGLANG_VERSION",
    "allocator",
    "available",
    "cache_init_params",
    "cache_module",
    "installed_version",
    "paged_allocator",
    "radix_cache_class",
    "token_allocator",
]

# The version these stand-ins were written against (and the issue measured).
SGLANG_VERSION = "0.5.23"

# Packages whose __init__ must not run: `sglang` imports the whole frontend and
# HF patches; `sglang.kernels(.ops(.memory))` populate a kernel registry.
_STUB_PACKAGES = ("sglang", "sglang.kernels", "sglang.kernels.ops", "sglang.kernels.ops.memory")

_loaded = False


def available() -> bool:
    """Whether the ``sglang`` distribution is installed (nothing is imported)."""
    if "sglang" in sys.modules:
        # Loaded already (maybe as this module's stand-in package, whose
        # __spec__ is None: find_spec would raise ValueError on it).
        return True
    return importlib.util.find_spec("sglang") is not None


def installed_version() -> str | None:
    """The installed sglang version from its metadata, or None."""
    from importlib import metadata

    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def _stub_package(name: str, path: str) -> None:
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    mod.__package__ = name
    sys.modules[name] = mod


def _stand_in_memory_pool() -> None:
    """`sglang.srt.mem_cache.memory_pool` builds GPU pools and imports model configs
    (transformers); the cache modules import only names from it for annotations."""
    mod = types.ModuleType("sglang.srt.mem_cache.memory_pool")

    class ReqToTokenPool:  # annotation only
        pass

    class KVCache:  # annotation only
        pass

    mod.ReqToTokenPool = ReqToTokenPool  # type: ignore[attr-defined]
    mod.KVCache = KVCache  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod


def _stand_in_metrics_collector() -> None:
    """`sglang.srt.observability.metrics_collector` imports the scheduler and
    server args; with ``enable_metrics=False`` the cache never builds a collector."""
    mod = types.ModuleType("sglang.srt.observability.metrics_collector")

    class RadixCacheMetricsCollector:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("metrics are disabled in the benchmark stand-in")

    def radix_cache_metric_labels(*args: Any, **kwargs: Any) -> dict[str, str]:
        return {}

    def resolve_collector_class(role: str, default: type) -> type:
        return default

    mod.STAT_LOGGER_ROLE_RADIX_CACHE = "radix_cache"  # type: ignore[attr-defined]
    mod.RadixCacheMetricsCollector = RadixCacheMetricsCollector  # type: ignore[attr-defined]
    mod.radix_cache_metric_labels = radix_cache_metric_labels  # type: ignore[attr-defined]
    mod.resolve_collector_class = resolve_collector_class  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod


def _load() -> None:
    global _loaded
    if _loaded:
        return
    spec = importlib.util.find_spec("sglang")
    if spec is None or spec.origin is None:
        raise ImportError(
            "sglang is not installed; run "
            f"`pip install --no-deps sglang=={SGLANG_VERSION}` and "
            "`pip install -r benchmarks/requirements-bench.txt`, or pass --skip-sglang"
        )
    if "sglang" in sys.modules and getattr(sys.modules["sglang"], "__file__", None):
        # The real package is already imported (someone ran its __init__);
        # its submodules load normally then.
        _loaded = True
        return
    root = os.path.dirname(spec.origin)
    for name in _STUB_PACKAGES:
        _stub_package(name, os.path.join(root, *name.split(".")[1:]))
    _stand_in_memory_pool()
    _stand_in_metrics_collector()
    _loaded = True


def cache_module(name: str) -> types.ModuleType:
    """``sglang.srt.mem_cache.<name>`` (e.g. ``radix_cache``, ``base_prefix_cache``,
    ``allocator.paged``), imported with the stand-ins above in place."""
    _load()
    return importlib.import_module(f"sglang.srt.mem_cache.{name}")


def _allocator_module() -> types.ModuleType:
    return cache_module("allocator")


def token_allocator(size: int) -> Any:
    """SGLang's ``TokenToKVPoolAllocator`` (page_size 1) over ``size`` token slots on CPU.

    ``need_sort=False`` is what SGLang's scheduler passes outside PD
    disaggregation: ``free`` concatenates onto the free list.
    """
    mod = _allocator_module()
    return mod.TokenToKVPoolAllocator(
        size=size, dtype=torch.bfloat16, device="cpu", kvcache=None, need_sort=False
    )


def paged_allocator(size: int, page_size: int) -> Any:
    """SGLang's ``PagedTokenToKVPoolAllocator`` over ``size`` token slots on CPU."""
    mod = _allocator_module()
    return mod.PagedTokenToKVPoolAllocator(
        size=size,
        page_size=page_size,
        dtype=torch.bfloat16,
        device="cpu",
        kvcache=None,
        need_sort=False,
    )


def allocator(size: int, page_size: int) -> Any:
    """The allocator SGLang would build for this page size."""
    return token_allocator(size) if page_size == 1 else paged_allocator(size, page_size)


def radix_cache_class() -> type:
    """SGLang's ``RadixCache`` class (build it with :func:`cache_init_params`)."""
    _load()
    return importlib.import_module("sglang.srt.mem_cache.radix_cache").RadixCache  # type: ignore[no-any-return]


def cache_init_params(**kwargs: Any) -> Any:
    """SGLang's ``CacheInitParams`` dataclass, built from keyword arguments."""
    _load()
    mod = importlib.import_module("sglang.srt.mem_cache.cache_init_params")
    return mod.CacheInitParams(**kwargs)
