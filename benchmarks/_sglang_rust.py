"""SGLang 0.5.23's Rust tree core, driven through its own ``UnifiedRadixCache``, on
bench_radix.py's traces: a third peer beside radixseg and SGLang's Python RadixCache.

SGLang's default prefix cache is ``UnifiedRadixCache``, whose tree lives in a Rust
extension (``sglang.srt.mem_cache.rust_tree_core``, behind ``RustUnifiedTreeCore``).
That extension links against libtorch and refuses to load outside PyTorch 2.11-2.14,
and ``unified_radix_cache`` imports ``tvm_ffi``. radixseg's own venv has torch 2.15,
so this peer runs in a second venv with torch pinned (``make bench-venv``; the pins are
in ``benchmarks/requirements-bench-venv.txt``), as a separate process:

    ~/.cache/radixseg/bench-venv/bin/python benchmarks/_sglang_rust.py \\
        --workload shared-prompts --page-size 1 --seed 0 --repeat 3 [--quick] [--check]

prints one JSON object on stdout whose keys are bench_radix.py's ``SideResult``
fields (``impl`` is ``"sglang-rust"``). ``--probe`` prints the versions instead.
From radixseg's own venv, :func:`run_in_bench_venv` runs that command and returns the
dict (or None, with :func:`skip_reason` saying why, when the bench venv is missing or
cannot load the tree core); this module imports only the standard library at top
level so that the main venv can import it.

The traces are bench_radix.py's own: ``WORKLOADS`` is imported from it (its top level
needs only numpy, torch and the benchmark helpers; radixseg is imported inside
functions). What is timed is SGLang's unmodified ``UnifiedRadixCache`` built for a
full-attention model (``tree_components=(FULL,)``, ``tree_core_backend="rust"``) over
the same CPU ``TokenToKVPoolAllocator`` / ``PagedTokenToKVPoolAllocator`` the Python
peer uses, with ``w.pool_tokens`` slots. Per request, as bench_radix.py's
``run_sglang`` does and as the scheduler drives this cache in 0.5.23:

1. ``match_prefix`` (the tree walk; the cache applies the walk's cache actions),
   ``lock`` the matched node, its device indices from ``path_device_indices``;
2. allocate the rest of ``prompt + output`` in whole pages; when the pool is short,
   ``evict_for_alloc(EvictParams(num_tokens=shortfall))`` first, which is what
   ``BaseTokenToKVPoolAllocator.evict_to_free_tokens`` calls: the walk stops at the
   first leaf after which the allocator can serve the request;
3. ``insert`` the page-aligned ``prompt + output`` with the matched indices followed
   by the new ones and ``prev_prefix_len`` = the matched length, as
   ``checkpoint_into_tree`` passes ``cache_protected_len``: the cache pumps the Rust
   core's ``begin_insert``/``resume_insert``/``end_insert`` and applies each step's
   ``FreeDeviceKV`` (the indices the insert found already cached go back to the
   allocator inside the insert; the Python RadixCache leaves that to its caller);
4. free the partial last page (``release_kv_cache`` frees the row past
   ``cache_protected_len``) and ``unlock``.

Tokens are prepared outside the timed region as SGLang's ``Req`` builds them
(``RadixKey`` over ``array('q')``; the insert key already page-aligned as
``checkpoint_into_tree`` makes it); the timed region holds only cache and allocator
calls, with the garbage collector paused. Each of ``--repeat`` runs builds a fresh
allocator and cache; the fastest is kept and all must agree on the counts.

Node count and tree tokens come from the Rust core's own ``pretty_print`` walk
(captured from file descriptor 1), cross-checked against ``total_size()`` and
against the allocator (free slots + tree tokens = pool, no leaked or doubly freed
KV). ``metadata_bytes`` is what the tree holds in the C heap: glibc ``mallinfo2``
in-use bytes (arenas + mmapped chunks) before minus after the core's ``reset()``,
which drops every node (Rust nodes, key buffers and the libtorch value tensors they
keep); Python objects are not in it (the core keeps none per node).

Only the import of SGLang's cache modules needs stand-ins (see ``_sglang.py``): on
top of those, three modules the cache imports only for type names
(``memory_pool``, ``observability.metrics_collector``, ``managers.schedule_batch``,
whose real versions pull in transformers, Triton and the model configs) hand out
placeholder classes for any name asked of them. None of them is called here.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IMPL = "sglang-rust"
# Where `make bench-venv` puts the second venv; RADIXSEG_BENCH_VENV overrides it.
BENCH_VENV = Path(
    os.environ.get("RADIXSEG_BENCH_VENV", str(Path.home() / ".cache" / "radixseg" / "bench-venv"))
)
# bench_radix.py's SideResult, field for field, in order.
SIDE_FIELDS = (
    "impl",
    "seconds",
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "evicted_tokens",
    "nodes",
    "tree_tokens",
    "metadata_bytes",
    "metadata_method",
)
# Exit status of this script when the venv cannot load the Rust tree core at all.
EXIT_UNAVAILABLE = 3


# ----- the main venv's side: run this script in the bench venv ---------------------


def bench_python(venv: str | Path | None = None) -> Path:
    """The bench venv's interpreter (it may not exist)."""
    return Path(venv if venv is not None else BENCH_VENV) / "bin" / "python"


@functools.cache
def _probe(python: str) -> tuple[dict[str, Any] | None, str | None]:
    if not Path(python).exists():
        return None, f"no bench venv ({python} is missing; run `make bench-venv`)"
    proc = subprocess.run(
        [python, str(Path(__file__)), "--probe"],
        capture_output=True,
        text=True,
        cwd=HERE,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"the bench venv cannot load SGLang's Rust tree core: {tail}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def skip_reason(venv: str | Path | None = None) -> str | None:
    """Why :func:`run_in_bench_venv` would return None, or None when it can run."""
    return _probe(str(bench_python(venv)))[1]


def bench_venv_versions(venv: str | Path | None = None) -> dict[str, Any] | None:
    """torch, sglang, apache-tvm-ffi and Python versions in the bench venv, or None."""
    return _probe(str(bench_python(venv)))[0]


def run_in_bench_venv(
    workload: str,
    page_size: int,
    seed: int,
    quick: bool,
    repeat: int,
    *,
    check: bool = False,
    torch_threads: int = 1,
    split_prompt: bool = False,
    venv: str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any] | None:
    """Run one (workload, page size) in the bench venv; its ``SideResult`` fields.

    Returns None when the bench venv is missing or cannot load the tree core; the
    reason is printed to stderr and given by :func:`skip_reason`. A run that fails
    in a working venv raises ``RuntimeError`` with the driver's stderr. The dict
    builds bench_radix.py's result as ``SideResult(**d)``.
    """
    python = str(bench_python(venv))
    reason = _probe(python)[1]
    if reason is not None:
        print(f"{IMPL} skipped: {reason}", file=sys.stderr)
        return None
    cmd = [
        python,
        str(Path(__file__)),
        "--workload",
        workload,
        "--page-size",
        str(page_size),
        "--seed",
        str(seed),
        "--repeat",
        str(repeat),
        "--torch-threads",
        str(torch_threads),
    ]
    if quick:
        cmd.append("--quick")
    if check:
        cmd.append("--check")
    if split_prompt:
        cmd.append("--split-prompt")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=HERE, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr.strip()[-4000:]}"
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ----- the bench venv's side: drive UnifiedRadixCache -------------------------------

# Modules the cache imports only for type names; their real versions import
# transformers, Triton and the model configs.
_NAME_ONLY_MODULES = (
    "sglang.srt.mem_cache.memory_pool",
    "sglang.srt.observability.metrics_collector",
    "sglang.srt.managers.schedule_batch",
)


def _name_only_module(name: str) -> None:
    """Make ``name`` (a stand-in or a new empty module) answer any missing attribute
    with a placeholder class, so ``from name import X`` works for annotations."""
    import types

    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        sys.modules[name] = mod

    def __getattr__(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        placeholder = type(attr, (), {"__module__": name})
        setattr(mod, attr, placeholder)
        return placeholder

    mod.__getattr__ = __getattr__  # type: ignore[method-assign]


@functools.cache
def _unified_radix_cache() -> type:
    """SGLang's ``UnifiedRadixCache`` class, imported with the stand-ins in place."""
    sys.path.insert(0, str(HERE))
    import _sglang

    _sglang.cache_module("base_prefix_cache")  # installs _sglang's stand-ins
    for name in _NAME_ONLY_MODULES:
        _name_only_module(name)
    from sglang.srt.mem_cache.rust_tree_core.extension import bindings  # noqa: F401
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    return UnifiedRadixCache


def _versions() -> dict[str, Any]:
    import platform
    from importlib import metadata

    import torch

    _unified_radix_cache()  # proves the extension loads

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sglang": version("sglang"),
        "apache-tvm-ffi": version("apache-tvm-ffi"),
        "tree_core": "RustUnifiedTreeCore",
    }


def _capture_fd1(fn: Any) -> str:
    """Run ``fn()`` with file descriptor 1 sent to a temporary file; its text."""
    import tempfile

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode()


def _tree_shape(cache: Any) -> tuple[int, int]:
    """(nodes excluding the root, tokens) from the Rust core's pretty_print walk."""
    root = cache.root_node_handle()
    nodes = tokens = 0
    for line in _capture_fd1(cache.pretty_print).splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("["):
            continue
        if int(fields[0].strip("[]")) == root:
            continue
        nodes += 1
        tokens += int(fields[1])
    return nodes, tokens


def _malloc_in_use() -> int:
    """glibc's in-use heap bytes over all arenas, mmapped chunks included."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def run_sglang_rust(
    w: Any, page_size: int, check: bool, split_prompt: bool = False
) -> dict[str, Any]:
    """One fresh run of ``w`` through ``UnifiedRadixCache``; SideResult fields.

    ``split_prompt`` adds what ``checkpoint_into_tree`` does for a request with
    output and bench_radix.py's peers do not: a second insert of the page-aligned
    prompt, which splits the new leaf at the prompt boundary.
    """
    import gc
    from array import array

    import numpy as np
    import torch

    import _sglang
    from _common import stopwatch

    unified_radix_cache = _unified_radix_cache()
    from sglang.srt.mem_cache.base_prefix_cache import (
        EvictParams,
        InsertParams,
        MatchPrefixParams,
    )
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType

    ps = page_size
    kv_alloc = _sglang.allocator(w.pool_tokens, ps)
    cache = unified_radix_cache(
        _sglang.cache_init_params(
            disable=False,
            req_to_token_pool=None,
            token_to_kv_pool_allocator=kv_alloc,
            page_size=ps,
            tree_components=(ComponentType.FULL,),
            tree_core_backend="rust",
        )
    )
    # No silent fallback to the Python TreeCore (SGLang falls back on some setups).
    assert type(cache.tree_core).__name__ == "RustUnifiedTreeCore", type(cache.tree_core)

    # Preferred input form: RadixKey over array('q'), as Req builds it; the insert
    # key page-aligned, as checkpoint_into_tree passes it.
    prepared = []
    for p, o in w.requests:
        full = np.concatenate((p, o)) if len(o) else p
        prepared.append(
            (
                RadixKey(array("q", p.astype(np.int64).tobytes())),
                RadixKey(array("q", full.astype(np.int64).tobytes())).page_aligned(ps),
                len(full),
                RadixKey(array("q", p.astype(np.int64).tobytes())).page_aligned(ps)
                if split_prompt and len(o)
                else None,
            )
        )
    prompt_tokens = sum(len(p) for p, _ in w.requests)
    cached = evicted = 0
    cat = torch.cat
    match_prefix, lock, unlock = cache.match_prefix, cache.lock, cache.unlock
    path_device_indices, evict_for_alloc, insert = (
        cache.path_device_indices,
        cache.evict_for_alloc,
        cache.insert,
    )
    available_size, alloc, free_segment = (
        kv_alloc.available_size,
        kv_alloc.alloc,
        kv_alloc.free_segment,
    )
    with stopwatch() as sw:
        for pkey, fkey, total, prompt_key in prepared:
            r = match_prefix(MatchPrefixParams(key=pkey))
            plen = r.device_prefix_len
            tree_lock = lock(r.last_device_node)
            prefix = path_device_indices(r.last_device_node)[:plen]
            need = (total - plen + ps - 1) // ps * ps
            avail = available_size()
            if avail < need:
                evicted += evict_for_alloc(EvictParams(num_tokens=need - avail)).num_tokens_evicted
            new = alloc(need)
            kv = cat((prefix, new[: total - plen])) if plen else new[:total]
            aligned = len(fkey)
            # The cache applies the insert's FreeDeviceKV (duplicates past plen).
            insert(InsertParams(key=fkey, value=kv[:aligned], prev_prefix_len=plen))
            if prompt_key is not None and 0 < len(prompt_key) < aligned:
                n = len(prompt_key)
                insert(
                    InsertParams(
                        key=prompt_key, value=kv[:n], prev_prefix_len=n, inserted_len=n, priority=1
                    )
                )
            if aligned < total:  # the partial last page, outside the tree
                free_segment(kv[aligned:], start_pos=aligned)
            unlock(tree_lock)
            cached += plen

    nodes, tokens = _tree_shape(cache)
    full_size = cache.total_size()[0]
    assert tokens == full_size, (tokens, cache.total_size())
    assert cache.protected_size() == 0 and cache.evictable_size() == tokens
    # Every slot is either free or in the tree: nothing leaked, nothing freed twice.
    assert available_size() + tokens == w.pool_tokens, (available_size(), tokens)
    if check:
        cache.sanity_check()

    gc.collect()
    before = _malloc_in_use()
    cache.tree_core.reset()
    gc.collect()
    metadata_bytes = before - _malloc_in_use()

    return {
        "impl": IMPL,
        "seconds": sw.seconds,
        "requests": len(prepared),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "evicted_tokens": evicted,
        "nodes": nodes,
        "tree_tokens": tokens,
        "metadata_bytes": metadata_bytes,
        "metadata_method": "glibc mallinfo2 in-use bytes freed by the Rust core's reset()",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", help="a bench_radix.py workload name")
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="bench_radix.py's small traces")
    ap.add_argument("--repeat", type=int, default=3, help="fresh runs; the fastest is kept")
    ap.add_argument("--check", action="store_true", help="the core's sanity_check() after a run")
    ap.add_argument(
        "--split-prompt",
        action="store_true",
        help="also insert the prompt, as checkpoint_into_tree does (not bench_radix.py's trace)",
    )
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--probe", action="store_true", help="print versions once the core loads")
    args = ap.parse_args(argv)

    try:
        import torch

        torch.set_num_threads(args.torch_threads)
        if args.probe:
            print(json.dumps(_versions()))
            return 0
        _unified_radix_cache()
    except (ImportError, RuntimeError, OSError) as e:  # no torch 2.11-2.14, tvm_ffi, sglang
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    sys.path.insert(0, str(HERE))
    from _common import best_of
    from bench_radix import WORKLOADS

    if args.workload not in WORKLOADS:
        ap.error(f"--workload must be one of {', '.join(WORKLOADS)}")
    w = WORKLOADS[args.workload](args.seed, args.quick)
    best = best_of(
        args.repeat,
        lambda: run_sglang_rust(w, args.page_size, args.check, args.split_prompt),
        key=lambda r: r["seconds"],
        same=lambda r: (r["cached_tokens"], r["evicted_tokens"], r["nodes"], r["tree_tokens"]),
    )
    assert tuple(best) == SIDE_FIELDS
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
