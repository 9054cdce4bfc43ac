"""radixseg.attention: paged decode/extend over segments, the LSE merge, the fused store.

Kernels run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it before
any kernel module is imported) and are compared with a float64 reference
written here: dequantize every page straight from the segment views, then
plain softmax attention. Readiness for GPUs is shown by compiling for
sm_80 / sm_89 / sm_90 in a subprocess without the interpreter; ``gpu`` tests
repeat the checks on CUDA where there is one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import radixseg
from radixseg import InvalidArgument, InvalidHandle, KVPool, PrefixCache
from radixseg import attention as A
from radixseg.kernels.torch_backend import (
    fp8_codes_to_float,
    merge_states_torch,
    paged_attention_torch,
)
from radixseg.pool import FP8_MAX

# Triton ships with torch's CUDA wheels; a CPU-only install runs radixseg on its
# torch backend, and these kernel tests skip.
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from radixseg.kernels._fp8 import f32_to_fp8_bits, fp8_bits_to_f32  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
STORAGE = [E4M3, E5M2, torch.bfloat16]
HEAD_DIM = 32
KV_HEADS = 2
LAYER = 1  # not 0, so a wrong layer offset cannot pass
LENS = [17, 53, 97, 1, 0]  # odd sizes, a 1-token and an empty request


def _zeros(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(nbytes, dtype=torch.uint8, device=device)


def make_pool(dtype: torch.dtype, page_size: int, device: str = "cpu", **kw: object) -> KVPool:
    """Small segments, so a request's pages straddle several of them."""
    args: dict[str, object] = dict(
        num_layers=2,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        page_size=page_size,
        pages_per_segment=max(2, 32 // page_size),
        dtype=dtype,
        device=device,
        tensor_factory=_zeros,
    )
    args.update(kw)
    return KVPool(**args)  # type: ignore[arg-type]


@dataclass
class Batch:
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    lens: list[int]
    pages: list[torch.Tensor]


def random_kv(n: int, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """``[n, KV_HEADS, HEAD_DIM]`` with magnitudes varying per token (exercises scales)."""
    x = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)
    x = x * torch.exp(torch.randn(n, 1, 1, generator=gen))
    if n > 5:
        x[5] = 0.0  # an all-zero token: FP8 scale 0
    return x.to(device)


def fill(pool: KVPool, lens: list[int], seed: int = 0, grow_between: bool = False) -> Batch:
    """Pages for each request, scattered over segments with freed holes between
    them; random K/V written on both layers with ``pool.write``."""
    gen = torch.Generator().manual_seed(seed)
    ps = pool.page_size
    need = [-(-n // ps) for n in lens]
    total = sum(need)
    ids = pool.alloc(total + total // 2 + 2)
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    pool.release(ids[total:])  # holes between the requests' pages
    pages = list(torch.split(ids[:total], need))
    for i, (n, p) in enumerate(zip(lens, pages, strict=True)):
        if grow_between and i == len(lens) // 2:
            # Grow the pool (and its segment table) between writes.
            pool.alloc(8 * pool.pages_per_segment)
        if n == 0:
            continue
        slots = (p.long()[:, None] * ps + torch.arange(ps)).reshape(-1)[:n]
        for layer in range(pool.num_layers):
            pool.write(
                layer,
                slots,
                random_kv(n, gen, str(pool.device)),
                random_kv(n, gen, str(pool.device)),
            )
    counts = torch.tensor(need, dtype=torch.int32)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(counts, 0)
    last = torch.tensor([(n - 1) % ps + 1 if n else 0 for n in lens], dtype=torch.int32)
    return Batch(indptr, ids[:total].clone(), last, lens, pages)


# ----- the reference ----------------------------------------------------------------------------


def dequantized_kv(pool: KVPool, layer: int, pages: list[int], n: int) -> tuple[torch.Tensor, ...]:
    """float64 K, V ``[n, kv_heads, head_dim]``, page by page from the segment views."""
    ks, vs = [], []
    for p in pages:
        seg = pool.segment(p // pool.pages_per_segment)
        i = p % pool.pages_per_segment
        for src, scale, out in ((seg.k, seg.k_scale, ks), (seg.v, seg.v_scale, vs)):
            x = src[layer, i].cpu()
            if pool.fp8:
                assert scale is not None
                x = x.view(torch.uint8).view(pool.dtype).double()
                x = x * scale[layer, i].cpu().double()[..., None]
            out.append(x.double())
    empty = torch.zeros(0, pool.num_kv_heads, pool.head_dim, dtype=torch.float64)
    k = torch.cat(ks)[:n] if ks else empty
    v = torch.cat(vs)[:n] if vs else empty
    return k, v


def reference(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    qo_lens: list[int],
    b: Batch,
    causal: bool = True,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(out [T, Hq, D], lse [T, Hq])``; lse natural log, -inf when nothing is seen."""
    q = q.cpu().double()
    sm_scale = 1 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    group = q.shape[1] // pool.num_kv_heads
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    start = 0
    for i, (qo, n) in enumerate(zip(qo_lens, b.lens, strict=True)):
        rows = slice(start, start + qo)
        start += qo
        if qo == 0 or n == 0:
            continue
        k, v = dequantized_kv(pool, layer, b.pages[i].tolist(), n)
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("thd,nhd->htn", q[rows], k) * sm_scale
        if causal:
            visible = torch.arange(n)[None, :] <= torch.arange(n - qo, n)[:, None]
            s = s.masked_fill(~visible, -math.inf)
        out[rows] = torch.einsum("htn,nhd->thd", torch.softmax(s, -1), v)
        lse[rows] = torch.logsumexp(s, -1).T
    return out, lse


def assert_close(
    got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, what: str
) -> None:
    """Elementwise ``|got - want| <= atol + rtol |want|`` (equal infinities pass); on
    failure report the mismatch count, the largest error and the first indices."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    same = got == want
    err = (got - want).abs()
    bad = ~(same | (err <= atol + rtol * want.abs()))
    if bad.any():
        first = bad.nonzero()[:5].tolist()
        worst = err[~same].max().item()
        pairs = [(got[tuple(i)].item(), want[tuple(i)].item()) for i in first]
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off (atol={atol}, rtol={rtol}); "
            f"max error {worst:.3e}; first at {first}: (got, want) = {pairs}"
        )


def rand_q(
    total: int, heads: int, dtype: torch.dtype = torch.float32, seed: int = 1
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(total, heads, HEAD_DIM, generator=g).to(dtype)


# fp32 queries: the kernels accumulate in fp32, so errors are fp32 rounding.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


# ----- decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 8, 16])
@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_decode_matches_reference(dtype: torch.dtype, page_size: int, group: int) -> None:
    pool = make_pool(dtype, page_size)
    b = fill(pool, LENS, seed=page_size)
    q = rand_q(len(LENS), KV_HEADS * group)
    out, lse = A.decode(
        q,
        pool,
        LAYER,
        b.kv_indptr,
        b.kv_indices,
        b.kv_last_page_len,
        return_lse=True,
        backend="triton",
    )
    want, want_lse = reference(q, pool, LAYER, [1] * len(LENS), b)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, want, 1e-5, 1e-5, "decode out")
    assert_close(lse, want_lse, 1e-5, 1e-5, "decode lse")
    assert torch.equal(out[4], torch.zeros_like(out[4]))  # the empty request
    assert bool((lse[4] == -math.inf).all())


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [E4M3, torch.bfloat16], ids=str)
def test_decode_half_precision_queries(dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    pool = make_pool(dtype, 16)
    b = fill(pool, LENS, seed=3)
    q = rand_q(len(LENS), KV_HEADS * 4, q_dtype)
    out = A.decode(q, pool, LAYER, b.kv_indptr, b.kv_indices, b.kv_last_page_len, backend="triton")
    want, _ = reference(q, pool, LAYER, [1] * len(LENS), b)
    assert out.dtype == q_dtype
    atol, rtol = TOL[q_dtype]
    assert_close(out, want, atol, rtol, f"decode out ({q_dtype} q)")


def test_split_k_long_request_over_many_segments() -> None:
    """One 1,000+ token request split into 1, 3, 7 and automatic chunks; every
    split count matches the reference, and the request spans many segments."""
    pool = make_pool(E4M3, 16, num_kv_heads=1)
    lens = [1100, 40]
    gen = torch.Generator().manual_seed(5)
    ps = 16
    need = [-(-n // ps) for n in lens]
    ids = pool.alloc(sum(need) + 10)
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    pool.release(ids[sum(need) :])
    pages = list(torch.split(ids[: sum(need)], need))
    for n, p in zip(lens, pages, strict=True):
        slots = (p.long()[:, None] * ps + torch.arange(ps)).reshape(-1)[:n]
        kv = torch.randn(n, 1, HEAD_DIM, generator=gen)
        pool.write(LAYER, slots, kv, torch.randn(n, 1, HEAD_DIM, generator=gen))
    segments = {int(p) // pool.pages_per_segment for p in pages[0]}
    assert len(segments) >= 3
    b = Batch(
        torch.tensor([0, need[0], sum(need)], dtype=torch.int32),
        ids[: sum(need)].clone(),
        torch.tensor([(n - 1) % ps + 1 for n in lens], dtype=torch.int32),
        lens,
        pages,
    )
    q = rand_q(2, 4)
    want, want_lse = reference(q, pool, LAYER, [1, 1], b)
    for splits in (1, 3, 7, None):
        out, lse = A.decode(
            q,
            pool,
            LAYER,
            b.kv_indptr,
            b.kv_indices,
            b.kv_last_page_len,
            return_lse=True,
            num_splits=splits,
            backend="triton",
        )
        assert_close(out, want, 1e-5, 1e-5, f"split-K out, num_splits={splits}")
        assert_close(lse, want_lse, 1e-5, 1e-5, f"split-K lse, num_splits={splits}")


def test_pool_grown_between_writes() -> None:
    """Segments added (and the segment table reallocated past 16 rows) between
    writes: pages written before and after the growth both read back."""
    pool = make_pool(E4M3, 8, pages_per_segment=2)
    b = fill(pool, LENS, seed=7, grow_between=True)
    assert pool.segment_table.shape[0] > 16
    q = rand_q(len(LENS), KV_HEADS * 2)
    out = A.decode(q, pool, LAYER, b.kv_indptr, b.kv_indices, b.kv_last_page_len, backend="triton")
    want, _ = reference(q, pool, LAYER, [1] * len(LENS), b)
    assert_close(out, want, 1e-5, 1e-5, "decode after growth")


def test_empty_batch_and_all_empty_requests() -> None:
    pool = make_pool(E4M3, 8)
    pool.alloc(1)
    q = torch.zeros(0, KV_HEADS, HEAD_DIM)
    z = torch.zeros(1, dtype=torch.int32)
    out = A.decode(
        q,
        pool,
        0,
        z,
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        backend="triton",
    )
    assert out.shape == (0, KV_HEADS, HEAD_DIM)
    q = rand_q(3, KV_HEADS)
    out, lse = A.decode(
        q,
        pool,
        0,
        torch.zeros(4, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(3, dtype=torch.int32),
        return_lse=True,
        backend="triton",
    )
    assert torch.equal(out, torch.zeros_like(out))
    assert bool((lse == -math.inf).all())


# ----- extend -------------------------------------------------------------------------------

QO = [5, 53, 1, 1, 0]  # partial, prefill (qo == kv), one token, a 1-token prefill, none


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 8, 16])
@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_extend_matches_reference(dtype: torch.dtype, page_size: int, group: int) -> None:
    pool = make_pool(dtype, page_size)
    b = fill(pool, LENS, seed=10 + page_size)
    qo_indptr = torch.tensor([0, *np.cumsum(QO)], dtype=torch.int32)
    q = rand_q(sum(QO), KV_HEADS * group, seed=2)
    out, lse = A.extend(
        q,
        pool,
        LAYER,
        qo_indptr,
        b.kv_indptr,
        b.kv_indices,
        b.kv_last_page_len,
        return_lse=True,
        backend="triton",
    )
    want, want_lse = reference(q, pool, LAYER, QO, b, causal=True)
    assert_close(out, want, 1e-5, 1e-5, "extend out")
    assert_close(lse, want_lse, 1e-5, 1e-5, "extend lse")


@pytest.mark.parametrize("dtype", [E4M3, torch.bfloat16], ids=str)
def test_extend_non_causal_and_split(dtype: torch.dtype) -> None:
    pool = make_pool(dtype, 16)
    b = fill(pool, LENS, seed=4)
    qo_indptr = torch.tensor([0, *np.cumsum(QO)], dtype=torch.int32)
    q = rand_q(sum(QO), KV_HEADS * 2, seed=3)
    for causal in (False, True):
        want, _ = reference(q, pool, LAYER, QO, b, causal=causal, sm_scale=0.3)
        out = A.extend(
            q,
            pool,
            LAYER,
            qo_indptr,
            b.kv_indptr,
            b.kv_indices,
            b.kv_last_page_len,
            causal=causal,
            sm_scale=0.3,
            num_splits=2,
            backend="triton",
        )
        assert_close(out, want, 1e-5, 1e-5, f"extend causal={causal}, 2 splits")


def test_extend_half_precision_queries() -> None:
    pool = make_pool(E4M3, 8)
    b = fill(pool, LENS, seed=6)
    qo_indptr = torch.tensor([0, *np.cumsum(QO)], dtype=torch.int32)
    q = rand_q(sum(QO), KV_HEADS * 4, torch.bfloat16)
    out = A.extend(
        q, pool, LAYER, qo_indptr, b.kv_indptr, b.kv_indices, b.kv_last_page_len, backend="triton"
    )
    want, _ = reference(q, pool, LAYER, QO, b)
    assert_close(out, want, *TOL[torch.bfloat16], "extend out (bf16 q)")


@pytest.mark.parametrize("dtype", [E4M3, torch.bfloat16], ids=str)
def test_extend_with_one_new_token_is_decode(dtype: torch.dtype) -> None:
    pool = make_pool(dtype, 8)
    b = fill(pool, LENS[:4], seed=8)
    q = rand_q(4, KV_HEADS * 4)
    args = (b.kv_indptr, b.kv_indices, b.kv_last_page_len)
    dec, dec_lse = A.decode(q, pool, LAYER, *args, return_lse=True, backend="triton")
    qo_indptr = torch.arange(5, dtype=torch.int32)
    ext, ext_lse = A.extend(q, pool, LAYER, qo_indptr, *args, return_lse=True, backend="triton")
    assert_close(ext, dec, 1e-6, 1e-6, "extend(qo_len=1) vs decode")
    assert_close(ext_lse, dec_lse, 1e-6, 1e-6, "extend(qo_len=1) lse vs decode")


# ----- the software FP8 path (sm_80) ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_fp8_software_path_matches(dtype: torch.dtype) -> None:
    pool = make_pool(dtype, 8)
    b = fill(pool, LENS, seed=9)
    args = (b.kv_indptr, b.kv_indices, b.kv_last_page_len)
    q = rand_q(len(LENS), KV_HEADS * 4)
    hw = A.decode(q, pool, LAYER, *args, fp8_software=False, backend="triton")
    sw = A.decode(q, pool, LAYER, *args, fp8_software=True, backend="triton")
    assert torch.equal(hw, sw)  # the decoded values are identical, so is everything after
    want, _ = reference(q, pool, LAYER, [1] * len(LENS), b)
    assert_close(sw, want, 1e-5, 1e-5, "software FP8 decode")
    qo_indptr = torch.tensor([0, *np.cumsum(QO)], dtype=torch.int32)
    q = rand_q(sum(QO), KV_HEADS * 4, seed=4)
    sw = A.extend(q, pool, LAYER, qo_indptr, *args, fp8_software=True, backend="triton")
    want, _ = reference(q, pool, LAYER, QO, b)
    assert_close(sw, want, 1e-5, 1e-5, "software FP8 extend")


@triton.jit
def _decode_bits(x, o, E4: tl.constexpr, N: tl.constexpr):  # type: ignore[no-untyped-def]
    i = tl.arange(0, N)
    tl.store(o + i, fp8_bits_to_f32(tl.load(x + i), E4))


@triton.jit
def _encode_bits(x, o, E4: tl.constexpr, N: tl.constexpr):  # type: ignore[no-untyped-def]
    i = tl.arange(0, N)
    tl.store(o + i, f32_to_fp8_bits(tl.load(x + i), E4))


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=str)
def test_fp8_bit_codecs_are_exact(dtype: torch.dtype) -> None:
    """Every finite code decodes exactly (subnormals, signed zero); encoding
    rounds to nearest even like torch, at every midpoint and its neighbours."""
    codes = torch.arange(256, dtype=torch.uint8)
    got = torch.empty(256)
    _decode_bits[(1,)](codes, got, dtype == E4M3, 256)
    want = codes.view(dtype).float()
    finite = torch.isfinite(want)
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(want[finite]))

    fmax = FP8_MAX[dtype]
    values = want[finite].unique()
    mids = (values[:-1].double() + values[1:].double()) / 2
    up, down = (
        torch.tensor(math.inf, dtype=torch.float64),
        torch.tensor(-math.inf, dtype=torch.float64),
    )
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            values,
            mids.float(),
            torch.nextafter(mids, up).float(),
            torch.nextafter(mids, down).float(),
            torch.randn(4096, generator=g)
            * torch.exp2(torch.randint(-24, 18, (4096,), generator=g)),
            torch.tensor([0.0, -0.0, fmax, -fmax, 1e-40, -1e-40]),
        ]
    ).clamp(-fmax, fmax)
    n = triton.next_power_of_2(x.numel())
    padded = torch.zeros(n)
    padded[: x.numel()] = x
    bits = torch.empty(n, dtype=torch.uint8)
    _encode_bits[(1,)](padded, bits, dtype == E4M3, n)
    want_bits = x.to(dtype).view(torch.uint8)
    bad = (bits[: x.numel()] != want_bits).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), bits[i].item(), want_bits[i].item()) for i in bad[:5]]


# ----- the torch backend ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [E4M3, torch.bfloat16], ids=str)
def test_torch_backend_matches_reference(dtype: torch.dtype) -> None:
    pool = make_pool(dtype, 8)
    b = fill(pool, LENS, seed=11)
    args = (b.kv_indptr, b.kv_indices, b.kv_last_page_len)
    q = rand_q(len(LENS), KV_HEADS * 4)
    out, lse = A.decode(q, pool, LAYER, *args, return_lse=True, backend="torch")
    want, want_lse = reference(q, pool, LAYER, [1] * len(LENS), b)
    assert_close(out, want, 1e-5, 1e-5, "torch decode")
    assert_close(lse, want_lse, 1e-5, 1e-5, "torch decode lse")
    qo_indptr = torch.tensor([0, *np.cumsum(QO)], dtype=torch.int32)
    q = rand_q(sum(QO), KV_HEADS * 4, seed=5)
    want, want_lse = reference(q, pool, LAYER, QO, b)
    out = A.extend(q, pool, LAYER, qo_indptr, *args, backend="torch")
    assert_close(out, want, 1e-5, 1e-5, "torch extend")
    # Chunked over KV (8-token chunks here), merged by log-sum-exp.
    lens = np.array(b.lens)
    out, lse = paged_attention_torch(
        q,
        pool,
        LAYER,
        np.array(QO),
        b.kv_indptr.numpy().astype(np.int64),
        b.kv_indices.numpy().astype(np.int64),
        lens,
        causal=True,
        sm_scale=HEAD_DIM**-0.5,
        compute_dtype=torch.float64,
        chunk_tokens=8,
    )
    assert_close(out, want, 1e-5, 1e-5, "torch extend, 8-token chunks")
    assert_close(lse, want_lse, 1e-5, 1e-5, "torch extend lse, 8-token chunks")


def test_auto_backend_under_the_interpreter_is_triton() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert A._resolve_backend("auto", torch.device("cpu")) == "triton"


# ----- merge_states ---------------------------------------------------------------------------


def _states(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, d, generator=g), torch.randn(n, 3, generator=g) * 5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_with_empty_state_is_identity(backend: str) -> None:
    v, s = _states(4, 24, 0)
    empty_v = torch.full_like(v, math.nan)  # whatever an empty state holds is ignored
    empty_s = torch.full_like(s, -math.inf)
    for args in ((v, s, empty_v, empty_s), (empty_v, empty_s, v, s)):
        mv, ms = A.merge_states(*args, backend=backend)  # type: ignore[arg-type]
        assert torch.equal(mv, v) and torch.equal(ms, s)
    mv, ms = A.merge_states(empty_v, empty_s, empty_v, empty_s, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(mv, torch.zeros_like(v)) and bool((ms == -math.inf).all())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_merge_is_associative_and_commutative(backend: str) -> None:
    (va, sa), (vb, sb), (vc, sc) = (_states(5, 24, i) for i in range(3))
    sb[0, 0] = -math.inf
    ab = A.merge_states(va, sa, vb, sb, backend=backend)  # type: ignore[arg-type]
    ba = A.merge_states(vb, sb, va, sa, backend=backend)  # type: ignore[arg-type]
    assert torch.equal(ab[0], ba[0]) and torch.equal(ab[1], ba[1])
    left = A.merge_states(*ab, vc, sc, backend=backend)  # type: ignore[arg-type]
    right = A.merge_states(
        va, sa, *A.merge_states(vb, sb, vc, sc, backend=backend), backend=backend
    )  # type: ignore[arg-type]
    assert_close(left[0], right[0], 1e-6, 1e-6, "merge associativity (v)")
    assert_close(left[1], right[1], 1e-6, 1e-6, "merge associativity (s)")


def test_merge_triton_matches_torch_and_keeps_dtype() -> None:
    va, sa = _states(6, 40, 3)
    vb, sb = _states(6, 40, 4)
    sa[1] = -math.inf
    for dtype in (torch.float32, torch.bfloat16):
        t = A.merge_states(va.to(dtype), sa, vb.to(dtype), sb, backend="triton")
        r = A.merge_states(va.to(dtype), sa, vb.to(dtype), sb, backend="torch")
        assert t[0].dtype == dtype and t[1].dtype == torch.float32
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert_close(t[0], r[0], tol, tol, f"triton vs torch merge ({dtype})")
        assert_close(t[1], r[1], 1e-6, 1e-6, "triton vs torch merge lse")


@given(
    n_a=st.integers(0, 6),
    n_b=st.integers(0, 6),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 30.0),
)
def test_merging_halves_is_attention_over_the_union(
    n_a: int, n_b: int, seed: int, scale: float
) -> None:
    """Attention over keys A and over keys B, merged, equals attention over A + B."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 8, generator=g, dtype=torch.float64)
    k = torch.randn(n_a + n_b, 8, generator=g, dtype=torch.float64) * scale
    v = torch.randn(n_a + n_b, 8, generator=g, dtype=torch.float64)

    def attend(keys: slice) -> tuple[torch.Tensor, torch.Tensor]:
        s = q @ k[keys].T
        if s.shape[1] == 0:
            return torch.zeros(3, 8, dtype=torch.float64), torch.full(
                (3,), -math.inf, dtype=torch.float64
            )
        return torch.softmax(s, -1) @ v[keys], torch.logsumexp(s, -1)

    va, sa = attend(slice(0, n_a))
    vb, sb = attend(slice(n_a, n_a + n_b))
    vu, su = attend(slice(0, n_a + n_b))
    mv, ms = merge_states_torch(va, sa, vb, sb)
    assert_close(mv, vu, 1e-9, 1e-9, "merged v")
    assert_close(ms, su, 1e-9, 1e-9, "merged lse")


# ----- the fused store ------------------------------------------------------------------------


def _store_inputs(
    n: int, dtype: torch.dtype, seed: int, in_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rows that probe every rounding path: random magnitudes, an all-zero row,
    rows whose scale is exactly 1 holding FP8 boundaries (+-FP8_MAX), midpoints
    (ties to even) and subnormal ties, signed zeros, tiny values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, KV_HEADS, HEAD_DIM, generator=g)
    # fp16 overflows at 65504 (to inf, as torch; the interpreter warns about it).
    lo, hi = (-8, 8) if torch.float16 in (in_dtype, dtype) else (-20, 20)
    x = x * torch.exp2(torch.randint(lo, hi, (n, KV_HEADS, 1), generator=g).float())
    fmax = FP8_MAX.get(dtype, 448.0)
    x[1] = 0.0
    x[2, 0] = torch.linspace(-fmax, fmax, HEAD_DIM)
    x[2, 1, :4] = torch.tensor([fmax, -fmax, -0.0, 0.0])
    x[3, :, 0] = fmax  # scale exactly 1: the rest round as themselves
    ties = torch.tensor([17.0, 19.0, 9.5, 0.6875, 3 * 2.0**-10, 2.0**-10, 5 * 2.0**-17, 2.0**-17])
    x[3, :, 1:9] = ties
    x[3, :, 9:13] = -ties[:4]
    x[4] = 1e-30 * torch.randn(KV_HEADS, HEAD_DIM, generator=g)
    return x.to(in_dtype)


@pytest.mark.parametrize(
    "in_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str
)
@pytest.mark.parametrize(
    "dtype", [E4M3, E5M2, torch.bfloat16, torch.float16, torch.float32], ids=str
)
def test_store_kv_is_bit_identical_to_pool_write(dtype: torch.dtype, in_dtype: torch.dtype) -> None:
    n = 29
    pools = [make_pool(dtype, 4, pages_per_segment=2) for _ in range(2)]
    slots = None
    for pool in pools:
        ids = pool.alloc(10)
        ids = ids[torch.randperm(10, generator=torch.Generator().manual_seed(1))]
        slots = (ids.long()[:, None] * 4 + torch.arange(4)).reshape(-1)[:n]
    assert slots is not None
    k = _store_inputs(n, dtype, 0, in_dtype)
    v = _store_inputs(n, dtype, 1, in_dtype)
    A.store_kv(pools[0], LAYER, slots, k, v, backend="triton")
    pools[1].write(LAYER, slots, k, v)
    for sid in pools[1].allocator.segments():
        for name, got, want in zip(
            ("k", "v", "k_scale", "v_scale"),
            pools[0].segment(sid),
            pools[1].segment(sid),
            strict=True,
        ):
            if want is None:
                continue
            g, w = got.view(torch.uint8), want.view(torch.uint8)
            diff = (g != w).nonzero()
            assert diff.numel() == 0, (
                f"segment {sid} {name}: {diff.shape[0]} bytes differ, first {diff[:3].tolist()}"
            )


def test_store_kv_checks_like_write() -> None:
    pool = make_pool(E4M3, 4)
    ids = pool.alloc(2)
    slots = ids.long()[:1] * 4 + torch.arange(3)
    kv = torch.randn(3, KV_HEADS, HEAD_DIM)
    with pytest.raises(InvalidHandle, match="not allocated"):
        A.store_kv(pool, 0, slots + 5 * 4, kv, kv, backend="triton")
    bad = kv.clone()
    bad[1, 0, 3] = math.inf
    with pytest.raises(InvalidArgument, match="inf or NaN"):
        A.store_kv(pool, 0, slots, bad, kv, backend="triton")
    with pytest.raises(InvalidArgument, match="shape"):
        A.store_kv(pool, 0, slots, kv[:2], kv, backend="triton")
    A.store_kv(pool, 0, slots[:0], kv[:0], kv[:0], backend="triton")  # nothing to do
    # Unchecked, slots outside the table or in a retired segment are skipped,
    # never written: the pool's bytes stay as they were.
    before = [t.clone() for t in pool.segment(0) if t is not None]
    far = torch.tensor([10**7, 40 * 8 * 4 + 1, -5, 8 * 4 + 1])  # the last: segment 1, never made
    A.store_kv(pool, 0, far[:3], kv, kv, backend="triton", check=False)
    A.store_kv(pool, 0, far[1:], kv, kv, backend="triton", check=False)
    after = [t for t in pool.segment(0) if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# ----- argument checks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> tuple[KVPool, Batch]:
    pool = make_pool(E4M3, 8)
    return pool, fill(pool, [9, 3], seed=12)


def test_bad_arguments_raise_typed_errors(small: tuple[KVPool, Batch]) -> None:
    pool, b = small
    q = rand_q(2, 4)
    args = (b.kv_indptr, b.kv_indices, b.kv_last_page_len)
    cases: list[tuple[type[Exception], str, object]] = [
        (TypeError, "float16, bfloat16 or float32", lambda: A.decode(q.double(), pool, 0, *args)),
        (TypeError, "torch.Tensor", lambda: A.decode(q.tolist(), pool, 0, *args)),  # type: ignore[arg-type]
        (TypeError, "KVPool", lambda: A.decode(q, object(), 0, *args)),  # type: ignore[arg-type]
        (InvalidArgument, "3-D", lambda: A.decode(q[0], pool, 0, *args)),
        (
            InvalidArgument,
            "head_dim 16, the pool 32",
            lambda: A.decode(q[..., :16], pool, 0, *args),
        ),
        (InvalidArgument, "3 query heads", lambda: A.decode(q[:, :3], pool, 0, *args)),
        (InvalidArgument, "layer 2 is out of range", lambda: A.decode(q, pool, 2, *args)),
        (TypeError, "layer must be an int", lambda: A.decode(q, pool, 0.0, *args)),  # type: ignore[arg-type]
        (InvalidArgument, "kv_indptr has 3 entries", lambda: A.decode(q[:1], pool, 0, *args)),
        (
            InvalidArgument,
            "non-decreasing",
            lambda: A.decode(q, pool, 0, torch.tensor([0, 3, 2]), b.kv_indices, b.kv_last_page_len),
        ),
        (
            InvalidArgument,
            "kv_indptr\\[0\\] must be 0",
            lambda: A.decode(q, pool, 0, torch.tensor([1, 2, 3]), b.kv_indices, b.kv_last_page_len),
        ),
        (
            InvalidArgument,
            "kv_indices has only 3",
            lambda: A.decode(q, pool, 0, torch.tensor([0, 2, 4]), b.kv_indices, b.kv_last_page_len),
        ),
        (
            InvalidArgument,
            "kv_last_page_len\\[1\\] = 9 is outside 1..=8",
            lambda: A.decode(q, pool, 0, b.kv_indptr, b.kv_indices, torch.tensor([1, 9])),
        ),
        (
            InvalidArgument,
            "one entry per request",
            lambda: A.decode(q, pool, 0, b.kv_indptr, b.kv_indices, torch.tensor([1])),
        ),
        (
            TypeError,
            "integer dtype",
            lambda: A.decode(q, pool, 0, b.kv_indptr.float(), b.kv_indices, b.kv_last_page_len),
        ),
        (
            InvalidHandle,
            "is not a page id",
            lambda: A.decode(q, pool, 0, b.kv_indptr, torch.tensor([0, -1, 2]), b.kv_last_page_len),
        ),
        (
            InvalidHandle,
            "kv_indices",
            lambda: A.decode(
                q, pool, 0, b.kv_indptr, torch.tensor([0, 1, 10**6]), b.kv_last_page_len
            ),
        ),
        (InvalidArgument, "backend", lambda: A.decode(q, pool, 0, *args, backend="cuda")),  # type: ignore[call-overload]
        (InvalidArgument, "num_splits", lambda: A.decode(q, pool, 0, *args, num_splits=0)),
        (InvalidArgument, "sm_scale", lambda: A.decode(q, pool, 0, *args, sm_scale=math.nan)),
        (
            InvalidArgument,
            "qo_indptr\\[-1\\] = 3 must equal q.shape\\[0\\] = 2",
            lambda: A.extend(q, pool, 0, torch.tensor([0, 1, 3]), *args),
        ),
        (
            InvalidArgument,
            "request 1 has 4 new tokens but only 3 KV tokens",
            lambda: A.extend(rand_q(5, 4), pool, 0, torch.tensor([0, 1, 5]), *args),
        ),
        (
            InvalidArgument,
            "qo_indptr has 2",
            lambda: A.extend(q, pool, 0, torch.tensor([0, 2]), *args),
        ),
        (
            InvalidArgument,
            "must match state a",
            lambda: A.merge_states(q, q[..., 0], q[:1], q[:1, :, 0]),
        ),
        (TypeError, "floating", lambda: A.merge_states(q, q[..., 0].int(), q, q[..., 0])),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()  # type: ignore[operator]


def test_free_pages_are_refused_unless_unchecked(small: tuple[KVPool, Batch]) -> None:
    pool, b = small
    q = rand_q(2, 4)
    free = torch.tensor(
        sorted(set(range(pool.allocator.total_pages())) - set(b.kv_indices.tolist()))
    )
    idx = b.kv_indices.clone()
    idx[0] = free[0]
    with pytest.raises(InvalidHandle, match="refcount 0"):
        A.decode(q, pool, 0, b.kv_indptr, idx, b.kv_last_page_len, backend="triton")
    # Unchecked, a bad page id is memory-safe: masked in the kernel, never dereferenced.
    idx[1] = 10**6
    out = A.decode(q, pool, 0, b.kv_indptr, idx, b.kv_last_page_len, backend="triton", check=False)
    assert bool(torch.isfinite(out).all())


def test_csr_from_page_table_and_array_likes(small: tuple[KVPool, Batch]) -> None:
    """PrefixCache.page_table's output goes straight in; lists and numpy work too."""
    pool = make_pool(E4M3, 4, pages_per_segment=2)
    cache = radixseg.PrefixCache(pool)
    gen = torch.Generator().manual_seed(13)
    reqs, lens = [], [7, 12, 1]
    for i, n in enumerate(lens):
        req = cache.begin(list(range(100 * i, 100 * i + n)))
        slots = cache.extend(req, req.uncached)
        A.store_kv(pool, LAYER, slots, random_kv(n, gen), random_kv(n, gen), backend="triton")
        reqs.append(req)
    indptr, indices, last = cache.page_table(reqs)
    pages = list(torch.split(indices, torch.diff(indptr).tolist()))
    b = Batch(indptr, indices, last, lens, pages)
    q = rand_q(3, 8)
    want, _ = reference(q, pool, LAYER, [1, 1, 1], b)
    out = A.decode(
        q, pool, LAYER, indptr.tolist(), indices.numpy(), last.tolist(), backend="triton"
    )
    assert_close(out, want, 1e-5, 1e-5, "decode over PrefixCache.page_table")
    for r in reqs:
        cache.finish(r)


# ----- compiling for GPUs without one ---------------------------------------------------------


COMPILE_CHECK = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "compile_check.py")


def _compile(*args: str) -> list[dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, COMPILE_CHECK, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in records if not r["ok"]]
    assert proc.returncode == 0 and records and not failed, failed or proc.stderr[-3000:]
    return records


def test_kernels_compile_for_sm90_sm89_and_sm80() -> None:
    """FP8 (e4m3) decode and store build for Hopper, Ada and (software FP8)
    Ampere; the PTX shows hardware FP8 conversion on sm_89/90, none on sm_80,
    16-byte K loads, and no flush-to-zero in the store."""
    recs = _compile(
        "--arch",
        "90",
        "--arch",
        "89",
        "--arch",
        "80",
        "--kv",
        "e4m3",
        "--kernel",
        "decode",
        "--kernel",
        "store",
    )
    by = {(r["arch"], r["kernel"]): r for r in recs}
    assert set(by) == {(a, k) for a in (80, 89, 90) for k in ("decode", "store")}
    for arch in (89, 90):
        assert by[(arch, "decode")]["fp8_cvt"] and not by[(arch, "decode")]["fp8_software"]
    assert by[(80, "decode")]["fp8_software"] and by[(80, "decode")]["fp8_cvt"] == 0
    assert by[(90, "decode")]["vec16_loads"]
    assert all(by[(a, "store")]["ftz"] == 0 for a in (80, 89, 90))


@pytest.mark.slow
def test_every_kernel_and_dtype_compiles_for_every_target() -> None:
    for q in ("bf16", "fp32"):
        recs = _compile(
            "--arch",
            "80",
            "--arch",
            "89",
            "--arch",
            "90",
            "--q",
            q,
            "--kv",
            "e4m3",
            "--kv",
            "e5m2",
            "--kv",
            "bf16",
            "--kv",
            "fp16",
            "--kv",
            "fp32",
        )
        assert len(recs) == 3 * 5 * 4


# ----- slow interpreter cases -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_large_batch_extend_and_decode(dtype: torch.dtype) -> None:
    lens = [1, 17, 53, 97, 300, 1031, 64, 0]
    qo = [1, 17, 20, 3, 128, 50, 64, 0]
    pool = make_pool(dtype, 16, num_kv_heads=KV_HEADS, pages_per_segment=3)
    b = fill(pool, lens, seed=21)
    qo_indptr = torch.tensor([0, *np.cumsum(qo)], dtype=torch.int32)
    q = rand_q(sum(qo), KV_HEADS * 4, seed=8)
    want, _ = reference(q, pool, LAYER, qo, b)
    out = A.extend(
        q,
        pool,
        LAYER,
        qo_indptr,
        b.kv_indptr,
        b.kv_indices,
        b.kv_last_page_len,
        num_splits=3,
        backend="triton",
    )
    assert_close(out, want, 1e-5, 1e-5, "large extend")
    q = rand_q(len(lens), KV_HEADS * 4, seed=9)
    want, _ = reference(q, pool, LAYER, [1] * len(lens), b)
    out = A.decode(q, pool, LAYER, b.kv_indptr, b.kv_indices, b.kv_last_page_len, backend="triton")
    assert_close(out, want, 1e-5, 1e-5, "large decode")


# ----- on a GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [E4M3, E5M2, torch.bfloat16], ids=str)
def test_gpu_decode_and_extend(dtype: torch.dtype, q_dtype: torch.dtype) -> None:
    for page_size in (1, 16):
        pool = make_pool(dtype, page_size, device="cuda")
        b = fill(pool, LENS, seed=30)
        q = rand_q(len(LENS), KV_HEADS * 4, q_dtype).cuda()
        want, want_lse = reference(q, pool, LAYER, [1] * len(LENS), b)
        for software in (False, True):
            out, lse = A.decode(
                q,
                pool,
                LAYER,
                b.kv_indptr,
                b.kv_indices,
                b.kv_last_page_len,
                return_lse=True,
                fp8_software=software,
            )
            assert out.is_cuda
            assert_close(out, want, *TOL[q_dtype], f"gpu decode sw={software}")
            assert_close(lse, want_lse, 1e-3, 1e-3, f"gpu decode lse sw={software}")
        qo_indptr = torch.tensor([0, *np.cumsum(QO)], dtype=torch.int32)
        q = rand_q(sum(QO), KV_HEADS * 4, q_dtype, seed=2).cuda()
        want, _ = reference(q, pool, LAYER, QO, b)
        out = A.extend(q, pool, LAYER, qo_indptr, b.kv_indptr, b.kv_indices, b.kv_last_page_len)
        assert_close(out, want, *TOL[q_dtype], "gpu extend")


@pytest.mark.gpu
def test_gpu_split_k_long_request() -> None:
    pool = make_pool(E4M3, 16, device="cuda", pages_per_segment=64)
    b = fill(pool, [20_000, 3], seed=31)
    q = rand_q(2, KV_HEADS * 4).cuda()
    want, want_lse = reference(q, pool, LAYER, [1, 1], b)
    out, lse = A.decode(
        q, pool, LAYER, b.kv_indptr, b.kv_indices, b.kv_last_page_len, return_lse=True
    )
    assert_close(out, want, 1e-5, 1e-5, "gpu split-K decode")
    assert_close(lse, want_lse, 1e-5, 1e-5, "gpu split-K lse")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [E4M3, E5M2, torch.bfloat16], ids=str)
def test_gpu_store_and_quantize_match_the_cpu(dtype: torch.dtype) -> None:
    n = 29
    cpu, gpu = make_pool(dtype, 4), make_pool(dtype, 4, device="cuda")
    ids = [p.alloc(8) for p in (cpu, gpu)]
    assert torch.equal(ids[0], ids[1])
    slots = (ids[0].long()[:, None] * 4 + torch.arange(4)).reshape(-1)[:n]
    k, v = _store_inputs(n, dtype, 0), _store_inputs(n, dtype, 1)
    cpu.write(LAYER, slots, k, v)
    A.store_kv(gpu, LAYER, slots.cuda(), k.cuda(), v.cuda())
    for sid in cpu.allocator.segments():
        for got, want in zip(gpu.segment(sid), cpu.segment(sid), strict=True):
            if want is not None:
                assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
    if dtype in FP8_MAX:
        from radixseg.pool import quantize_fp8

        qc, sc = quantize_fp8(k, dtype)
        qg, sg = quantize_fp8(k.cuda(), dtype)
        assert torch.equal(sg.cpu(), sc)
        assert torch.equal(qg.cpu().view(torch.uint8), qc.view(torch.uint8))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stale_bytes_past_the_last_token_are_never_read(backend: str) -> None:
    """The rest of a request's last page holds whatever it held before (here NaN
    codes and NaN scales): neither backend may let it reach the output."""
    pool = KVPool(1, 1, 16, page_size=8, pages_per_segment=4)
    cache = PrefixCache(pool)
    r = cache.begin([1])
    slots = cache.extend(r, list(range(13)))  # 2 pages, the second 5/8 full
    seg = pool.segment(0)
    for t in (seg.k, seg.v):
        t.view(torch.uint8).fill_(0x7F)  # NaN in e4m3fn
    for t in (seg.k_scale, seg.v_scale):
        assert t is not None
        t.fill_(float("nan"))
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(13, 1, 16, generator=g)
    pool.write(0, slots, kv, -kv)
    q = torch.randn(1, 2, 16, generator=g)
    table = cache.page_table([r])
    out = radixseg.attention.decode(q, pool, 0, *table, backend=backend)
    k, v = pool.read(0, slots)
    p = torch.softmax((q[0] @ k[:, 0].T) / 4.0, dim=-1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], p @ v[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_torch_backend_fp8_decode_is_exact_for_every_code(
    fmt: torch.dtype, dtype: torch.dtype
) -> None:
    """The torch backend's bit-arithmetic FP8 decode equals torch's cast on all 256
    codes; e4m3's NaN code reads +-480 (never stored beside a finite scale)."""
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    want = codes.view(fmt).to(dtype)
    got = fp8_codes_to_float(codes, fmt, dtype)
    assert got.dtype == dtype and got.shape == codes.shape
    assert got.data_ptr() != codes.data_ptr()
    nan = want.isnan()
    assert torch.equal(got[~nan], want[~nan])
    if fmt == torch.float8_e4m3fn:
        assert got[nan].tolist() == [480.0, -480.0]
    else:
        assert bool(got[nan].isnan().all())
