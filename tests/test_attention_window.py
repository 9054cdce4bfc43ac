"""Sliding windows, chunked local attention and logit soft-capping (issue 20).

``window_left`` (FlashInfer's inclusive left window), ``chunk_size`` (Llama 4)
and ``logits_soft_cap`` (Gemma 2) on :func:`radixseg.attention.decode` and
:func:`~radixseg.attention.extend`, checked against a float64 reference that
applies exactly the mask and cap of the docs, for the torch backend, the
Triton kernel (``TRITON_INTERPRET=1`` on CPU tensors) and ``backend="cpu"``.
Pages are shuffled across segments (``test_attention.fill``). That pages
outside the window are never read is shown by filling them with NaN: one NaN
V loaded beside a zero probability would poison the output.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from radixseg import InvalidArgument, KVPool
from radixseg import attention as A
from radixseg.distributed import ShardedKVPool
from radixseg.kernels.torch_backend import first_visible

pytest.importorskip("triton")
from test_attention import (
    E4M3,
    KV_HEADS,
    LAYER,
    LENS,
    TOL,
    Batch,
    assert_close,
    dequantized_kv,
    fill,
    make_pool,
    rand_q,
)

QO = [17, 30, 97, 1, 0]  # a prefill, part of 53, a prefill past 64 rows, one token, none

#: (name, options): windows smaller than a page, of one key, equal to the
#: longest context (97 keys) and past it; chunk edges inside pages (7, 5) and on
#: them (16); the cap alone and with a window.
MODES: list[tuple[str, dict[str, Any]]] = [
    ("window1", {"window_left": 0}),
    ("window6", {"window_left": 5}),
    ("window20", {"window_left": 19}),
    ("window97", {"window_left": 96}),
    ("window500", {"window_left": 499}),
    ("chunk7", {"chunk_size": 7}),
    ("chunk16", {"chunk_size": 16}),
    ("chunk40", {"chunk_size": 40}),
    ("cap", {"logits_soft_cap": 2.0}),
    ("window10_cap", {"window_left": 9, "logits_soft_cap": 3.0}),
    ("chunk5_cap", {"chunk_size": 5, "logits_soft_cap": 1.5}),
]
FAST_MODES = [MODES[i] for i in (1, 3, 5, 9, 10)]


def local_reference(
    q: torch.Tensor,
    pool: KVPool,
    qo_lens: list[int],
    b: Batch,
    *,
    window_left: int = -1,
    chunk_size: int | None = None,
    logits_soft_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(out, lse)``: query at ``p`` sees ``k <= p``, ``k >= p - window_left``
    (window) or ``k // chunk_size == p // chunk_size`` (chunks); scores
    ``cap * tanh(s / cap)``."""
    q = q.cpu().double()
    group = q.shape[1] // pool.num_kv_heads
    bounds = np.cumsum([0, *qo_lens])
    outs, lses = [], []
    for i, n in enumerate(b.lens):
        qi = q[bounds[i] : bounds[i + 1]]
        k, v = dequantized_kv(pool, LAYER, b.pages[i].tolist(), n)
        s = torch.einsum("thd,nhd->htn", qi, k.repeat_interleave(group, 1)) / math.sqrt(q.shape[-1])
        if logits_soft_cap is not None:
            s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
        s = s.masked_fill(~_visible(n, qi.shape[0], window_left, chunk_size), -math.inf)
        # Empty requests and rows fall out: logsumexp over no keys is -inf.
        lse = torch.logsumexp(s, -1)
        prob = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        outs.append(torch.einsum("htn,nhd->thd", prob, v.repeat_interleave(group, 1)))
        lses.append(lse.T)
    return torch.cat(outs), torch.cat(lses)


def _visible(n: int, qo: int, window_left: int, chunk_size: int | None) -> torch.Tensor:
    """``[qo, n]``: which keys the last ``qo`` of ``n`` positions see."""
    key = torch.arange(n)[None, :]
    p = torch.arange(n - qo, n)[:, None]
    seen = key <= p
    if window_left >= 0:
        seen &= key >= p - window_left
    if chunk_size is not None:
        seen &= key // chunk_size == p // chunk_size
    return seen


def _qo_indptr(qo: list[int]) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(qo)], dtype=torch.int32)


def _run(
    kind: str,
    q: torch.Tensor,
    pool: KVPool,
    b: Batch,
    qo: list[int],
    backend: str,
    **opts: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    table = (b.kv_indptr, b.kv_indices, b.kv_last_page_len)
    if kind == "decode":
        return A.decode(q, pool, LAYER, *table, return_lse=True, backend=backend, **opts)  # type: ignore[arg-type]
    return A.extend(
        q,
        pool,
        LAYER,
        _qo_indptr(qo),
        *table,
        return_lse=True,
        backend=backend,  # type: ignore[arg-type]
        **opts,
    )


def _check_modes(
    kind: str,
    backend: str,
    dtype: torch.dtype,
    page_size: int,
    group: int,
    modes: list[tuple[str, dict[str, Any]]],
) -> None:
    pool = make_pool(dtype, page_size)
    b = fill(pool, LENS, seed=20 + page_size)
    qo = [1] * len(LENS) if kind == "decode" else QO
    q = rand_q(sum(qo), KV_HEADS * group, seed=page_size + group)
    for name, opts in modes:
        out, lse = _run(kind, q, pool, b, qo, backend, **opts)
        want, want_lse = local_reference(q, pool, qo, b, **opts)
        what = f"{kind} {backend} {name}"
        assert out.dtype == q.dtype and lse.dtype == torch.float32
        assert_close(out, want, 1e-5, 1e-5, f"{what} out")
        assert_close(lse, want_lse, 1e-5, 1e-5, f"{what} lse")


# ----- against the reference ---------------------------------------------------------------------

# A covering subset of (page size, GQA group, storage): every page size, both
# groups and both storages appear; the full product is `slow`.
COVER = [(1, 4, torch.bfloat16), (8, 1, E4M3), (16, 4, E4M3), (16, 1, torch.bfloat16)]


@pytest.mark.parametrize("kind", ["decode", "extend"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("page_size", "group", "dtype"), COVER, ids=str)
def test_matches_reference(
    kind: str, backend: str, page_size: int, group: int, dtype: torch.dtype
) -> None:
    modes = MODES if (page_size, kind) in ((8, "decode"), (16, "extend")) else FAST_MODES
    _check_modes(kind, backend, dtype, page_size, group, modes)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["decode", "extend"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 8, 16])
@pytest.mark.parametrize("dtype", [E4M3, torch.bfloat16], ids=str)
def test_matches_reference_every_combination(
    dtype: torch.dtype, page_size: int, group: int, backend: str, kind: str
) -> None:
    _check_modes(kind, backend, dtype, page_size, group, MODES)


def test_cpu_backend_decode() -> None:
    """``backend="cpu"``: the native kernel when it takes the options, else torch."""
    _check_modes("decode", "cpu", E4M3, 8, 4, MODES)


def test_half_precision_queries() -> None:
    pool = make_pool(E4M3, 8)
    b = fill(pool, LENS, seed=31)
    q = rand_q(sum(QO), KV_HEADS * 4, torch.bfloat16)
    opts: dict[str, Any] = {"window_left": 12, "logits_soft_cap": 4.0}
    want, want_lse = local_reference(q, pool, QO, b, **opts)
    for backend in ("torch", "triton"):
        out, lse = _run("extend", q, pool, b, QO, backend, **opts)
        assert out.dtype == torch.bfloat16
        assert_close(out, want, *TOL[torch.bfloat16], f"{backend} bf16 q out")
        assert_close(lse, want_lse, *TOL[torch.bfloat16], f"{backend} bf16 q lse")


def test_no_op_options_equal_plain_attention() -> None:
    """A window or chunk reaching past every context changes nothing."""
    pool = make_pool(torch.bfloat16, 8)
    b = fill(pool, LENS, seed=32)
    q = rand_q(sum(QO), KV_HEADS * 2)
    for backend in ("torch", "triton"):
        plain = _run("extend", q, pool, b, QO, backend)
        for opts in ({"window_left": 96}, {"window_left": 10**6}, {"chunk_size": 97}):
            got = _run("extend", q, pool, b, QO, backend, **opts)
            assert_close(got[0], plain[0], 1e-6, 1e-6, f"{backend} {opts}")
            assert_close(got[1], plain[1], 1e-6, 1e-6, f"{backend} {opts} lse")


# ----- pages outside the window are never read -------------------------------------------------


def _poison_before(pool: KVPool, b: Batch, first: list[int]) -> None:
    """NaN K and V in request ``i``'s pages wholly before position ``first[i]``."""
    ps = pool.page_size
    for pages, lo in zip(b.pages, first, strict=True):
        for p in pages[: lo // ps].tolist():
            seg = pool.segment(p // pool.pages_per_segment)
            seg.k[LAYER, p % pool.pages_per_segment] = math.nan
            seg.v[LAYER, p % pool.pages_per_segment] = math.nan


@pytest.mark.parametrize("kind", ["decode", "extend"])
@pytest.mark.parametrize("opts", [{"window_left": 5}, {"chunk_size": 24}], ids=str)
def test_pages_outside_the_window_are_never_read(kind: str, opts: dict[str, Any]) -> None:
    lens = [300, 97, 53]
    qo = [1, 1, 1] if kind == "decode" else [40, 97, 3]
    pool = make_pool(torch.bfloat16, 8)
    b = fill(pool, lens, seed=33)
    q = rand_q(sum(qo), KV_HEADS * 4)
    want, want_lse = local_reference(q, pool, qo, b, **opts)
    wl, cs = opts.get("window_left", -1), opts.get("chunk_size", 0)
    _poison_before(pool, b, [first_visible(n - m, wl, cs) for n, m in zip(lens, qo, strict=True)])
    for backend in ("torch", "triton"):
        for splits in (None, 3) if (backend, kind) == ("triton", "decode") else (None,):
            out, lse = _run(kind, q, pool, b, qo, backend, num_splits=splits, **opts)
            assert_close(out, want, 1e-5, 1e-5, f"{kind} {backend} splits={splits} {opts}")
            assert_close(lse, want_lse, 1e-5, 1e-5, f"{kind} {backend} lse {opts}")


def test_split_k_covers_only_the_window() -> None:
    """Decode of a long request: splits start at the window, every count agrees."""
    pool = make_pool(E4M3, 16)
    b = fill(pool, [1100, 40], seed=34)
    q = rand_q(2, 4)
    for opts in ({"window_left": 299}, {"chunk_size": 512, "logits_soft_cap": 5.0}):
        want, want_lse = local_reference(q, pool, [1, 1], b, **opts)
        for splits in (1, 2, 7, None):
            out, lse = _run("decode", q, pool, b, [1, 1], "triton", num_splits=splits, **opts)
            assert_close(out, want, 1e-5, 1e-5, f"{opts} splits={splits}")
            assert_close(lse, want_lse, 1e-5, 1e-5, f"{opts} splits={splits} lse")
    # The plan: 7 splits of the 300-key window are 5 of 64 keys (the block),
    # where the whole 1,100-token context would take 6 of 192.
    from radixseg.kernels.paged_attention import plan_paged_attention

    for opts, want_grid in (({"window_left": 299}, (5, 64)), ({}, (6, 192))):
        attention, _, _, _ = plan_paged_attention(
            q,
            pool,
            LAYER,
            torch.arange(3, dtype=torch.int32),
            b.kv_indptr,
            b.kv_indices,
            b.kv_last_page_len,
            np.array([1, 1]),
            np.array(b.lens),
            causal=False,
            sm_scale=0.1,
            num_splits=7,
            **opts,
        )
        assert attention is not None
        assert (attention.grid[2], attention.args["kv_chunk"]) == want_grid


# ----- bad arguments -----------------------------------------------------------------------------


BAD: list[tuple[type[Exception], str, str, dict[str, Any]]] = [
    (InvalidArgument, "window_left must be >= -1", "decode", {"window_left": -2}),
    (TypeError, "window_left must be an int", "decode", {"window_left": 1.5}),
    (TypeError, "window_left must be an int", "decode", {"window_left": True}),
    (TypeError, "window_left must be an int", "extend", {"window_left": None}),
    (InvalidArgument, "chunk_size must be >= 1", "decode", {"chunk_size": 0}),
    (InvalidArgument, "chunk_size must be >= 1", "extend", {"chunk_size": -8}),
    (TypeError, "chunk_size must be an int", "decode", {"chunk_size": 8.0}),
    (InvalidArgument, "finite and > 0", "decode", {"logits_soft_cap": 0.0}),
    (InvalidArgument, "finite and > 0", "decode", {"logits_soft_cap": -1.0}),
    (InvalidArgument, "finite and > 0", "extend", {"logits_soft_cap": math.inf}),
    (InvalidArgument, "finite and > 0", "decode", {"logits_soft_cap": math.nan}),
    (TypeError, "logits_soft_cap must be a float", "decode", {"logits_soft_cap": "50"}),
    (InvalidArgument, "not both", "decode", {"window_left": 4, "chunk_size": 8}),
    (InvalidArgument, "not both", "extend", {"window_left": 0, "chunk_size": 1}),
    (InvalidArgument, "causal=True", "extend", {"causal": False, "window_left": 4}),
    (InvalidArgument, "causal=True", "extend", {"causal": False, "chunk_size": 4}),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_bad_arguments_raise_typed_errors(backend: str) -> None:
    pool = make_pool(E4M3, 8)
    b = fill(pool, [9, 3], seed=35)
    table = (b.kv_indptr, b.kv_indices, b.kv_last_page_len)
    q = rand_q(2, 4)
    qo = _qo_indptr([1, 1])
    for exc, msg, kind, kw in BAD:
        with pytest.raises(exc, match=msg):
            if kind == "decode":
                A.decode(q, pool, LAYER, *table, backend=backend, **kw)  # type: ignore[arg-type]
            else:
                A.extend(q, pool, LAYER, qo, *table, backend=backend, **kw)  # type: ignore[arg-type]
    # The cap alone needs no mask: a non-causal extend takes it.
    out = A.extend(q, pool, LAYER, qo, *table, causal=False, logits_soft_cap=3.0, backend="torch")
    assert bool(torch.isfinite(out).all())


def test_sharded_pool_refuses_the_options() -> None:
    """Refused in radixseg.attention, before the collective is entered."""
    pool = ShardedKVPool.__new__(ShardedKVPool)  # never initialized: nothing else may run
    q = rand_q(1, 2)
    t = torch.tensor([0, 1])
    for kw in ({"window_left": 3}, {"chunk_size": 8}, {"logits_soft_cap": 30.0}):
        with pytest.raises(InvalidArgument, match="context parallelism is not supported"):
            A.decode(q, pool, 0, t, t[:1], t[1:], **kw)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="context parallelism is not supported"):
            A.extend(q, pool, 0, t, t, t[:1], t[1:], k=q, v=q, **kw)  # type: ignore[arg-type]


# ----- GPU readiness without a GPU ---------------------------------------------------------------

_COMPILE = """
import json, sys
import numpy as np, torch
from radixseg import KVPool
from radixseg.kernels.paged_attention import plan_paged_attention

for arch, kv, kind, opts in json.loads(sys.argv[1]):
    pool = KVPool(num_layers=2, num_kv_heads=2, head_dim=128, page_size=16,
                  pages_per_segment=4, dtype=getattr(torch, kv))
    ids = pool.alloc(8)
    qo = [1, 1] if kind == "decode" else [20, 28]
    q = torch.zeros((sum(qo), 8, 128), dtype=torch.bfloat16)
    launch, _, _, _ = plan_paged_attention(
        q, pool, 1, torch.tensor([0, qo[0], sum(qo)], dtype=torch.int32),
        torch.tensor([0, 7, 8], dtype=torch.int32), ids,
        torch.tensor([4, 12], dtype=torch.int32), np.array(qo), np.array([100, 28]),
        causal=kind == "extend", sm_scale=0.1, num_splits=2,
        fp8_software=arch < 89 and kv.startswith("float8"), **opts)
    ptx = launch.compile_for(arch).asm["ptx"]
    print(json.dumps({"arch": arch, "kind": kind, "ptx_bytes": len(ptx)}), flush=True)
"""


def test_windowed_kernels_compile_for_sm90_and_sm80() -> None:
    """The window, chunk and soft-cap specializations build for Hopper and (with
    software FP8) Ampere: what the interpreter cannot show."""
    jobs = [
        (90, "float8_e4m3fn", "decode", {"window_left": 127, "soft_cap": 50.0}),
        (90, "bfloat16", "extend", {"chunk_size": 24}),
        (80, "float8_e4m3fn", "extend", {"window_left": 4095, "soft_cap": 30.0}),
    ]
    # Triton's JIT, not the interpreter: a child process without TRITON_INTERPRET
    # (a failed build raises CalledProcessError, its traceback on stderr).
    env = dict(os.environ, TRITON_INTERPRET="0")
    stdout = subprocess.check_output(
        [sys.executable, "-c", _COMPILE, json.dumps(jobs)], env=env, text=True, timeout=600
    )
    recs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(recs) == len(jobs), stdout
    assert all(r["ptx_bytes"] > 0 for r in recs)
