"""The native CPU decode kernel (``backend="cpu"``, ``radixseg._core.decode_cpu``).

Compared with a float64 reference written here (dequantize every page with
``gather_kv``, then plain softmax attention), in every storage format, with
every instruction set this CPU has (AVX-512, AVX2, NEON, scalar), over requests
whose pages are shuffled across several segments, with a request longer than
one 4,096-token work chunk; and with sliding windows (``window_left``), chunks
(``chunk_size``) and soft caps against the same reference, masked and capped.
Needs no Triton.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixseg import InvalidArgument, InvalidHandle, KVPool
from radixseg import attention as A
from radixseg._core import decode_cpu
from radixseg.kernels.cpu import ISAS, paged_decode_cpu
from radixseg.kernels.torch_backend import gather_kv

FORMATS = [
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.bfloat16,
    torch.float16,
    torch.float32,
]
LAYER = 1  # not 0, so a wrong layer offset cannot pass
LENS = [17, 97, 1, 0, 4100]  # odd sizes, one token, none, and more than one chunk


def make(
    dtype: torch.dtype,
    page_size: int,
    lens: list[int],
    *,
    kv_heads: int = 2,
    head_dim: int = 32,
    pages_per_segment: int = 64,
    seed: int = 0,
) -> tuple[KVPool, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-layer pool holding ``lens`` tokens per request, pages shuffled over
    segments, one segment retired in between; returns the CSR page table."""
    pool = KVPool(
        2, kv_heads, head_dim, page_size=page_size, dtype=dtype,
        pages_per_segment=pages_per_segment,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // page_size) for n in lens]
    spare = pool.alloc(pages_per_segment)  # segment 0, released below: a hole
    ids = pool.alloc(sum(need))
    pool.release(spare)
    pool.shrink(keep=0)
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    slots = (ids.long()[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    kv = torch.randn(slots.numel(), kv_heads, head_dim, generator=gen)
    for layer in (0, 1):
        pool.write(layer, slots, kv * (layer + 1), kv.flip(-1) * 3)
    indptr = torch.tensor([0, *np.cumsum(need)], dtype=torch.int32)
    last = torch.tensor([(n - 1) % page_size + 1 if n else 0 for n in lens], dtype=torch.int32)
    return pool, indptr, ids, last


def reference(
    q: torch.Tensor,
    pool: KVPool,
    indptr: torch.Tensor,
    ids: torch.Tensor,
    lens: list[int],
    *,
    window_left: int = -1,
    chunk_size: int = 0,
    soft_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention of the query at position ``p = n - 1`` over keys
    ``lo..n``: ``lo = max(0, p - window_left)`` or ``chunk_size * (p // chunk_size)``,
    scores capped to ``soft_cap * tanh(s / soft_cap)``."""
    batch, q_heads, d = q.shape
    group = q_heads // pool.num_kv_heads
    out = torch.zeros(batch, q_heads, d, dtype=torch.float64)
    lse = torch.full((batch, q_heads), -math.inf, dtype=torch.float64)
    for i, n in enumerate(lens):
        if n == 0:
            continue
        p = n - 1
        lo = max(0, p - window_left) if window_left >= 0 else 0
        if chunk_size > 0:
            lo = chunk_size * (p // chunk_size)
        k, v = gather_kv(pool, LAYER, ids[int(indptr[i]) : int(indptr[i + 1])], torch.float64)
        k, v = k[lo:n].repeat_interleave(group, 1), v[lo:n].repeat_interleave(group, 1)
        s = torch.einsum("hd,thd->ht", q[i].double(), k) * d**-0.5
        if soft_cap > 0:
            s = soft_cap * torch.tanh(s / soft_cap)
        lse[i] = torch.logsumexp(s, -1)
        out[i] = torch.einsum("ht,thd->hd", torch.softmax(s, -1), v)
    return out, lse


def close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), what
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    scale = max(1.0, want[finite].abs().max().item() if finite.any() else 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_decode_matches_reference(dtype: torch.dtype, page_size: int, group: int, isa: str) -> None:
    pool, indptr, ids, _last = make(dtype, page_size, LENS, seed=page_size + group)
    segments = {int(p) // pool.pages_per_segment for p in ids}
    assert len(segments) >= 3 and 0 not in segments
    q = torch.randn(len(LENS), 2 * group, 32, generator=torch.Generator().manual_seed(1))
    lens = np.array(LENS)
    out, lse = paged_decode_cpu(
        q, pool, LAYER, indptr.numpy(), ids.numpy(), lens, sm_scale=32**-0.5, isa=isa
    )
    want, want_lse = reference(q, pool, indptr, ids, LENS)
    close(out, want, f"out ({isa})")
    close(lse, want_lse, f"lse ({isa})")
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # the empty request
    assert bool((lse[3] == -math.inf).all())


def test_public_decode_with_backend_cpu() -> None:
    pool, indptr, ids, last = make(torch.float8_e4m3fn, 16, LENS)
    q = torch.randn(len(LENS), 8, 32, dtype=torch.bfloat16)
    out, lse = A.decode(q, pool, LAYER, indptr, ids, last, return_lse=True, backend="cpu")
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want, want_lse = reference(q, pool, indptr, ids, LENS)
    close(out, want, "bf16 out", tol=1e-2)
    close(lse, want_lse, "lse")
    ref = A.decode(q, pool, LAYER, indptr, ids, last, backend="torch")
    close(out, ref, "against the torch backend", tol=1e-2)


def test_threads_do_not_change_a_bit() -> None:
    pool, indptr, ids, _last = make(torch.float8_e4m3fn, 16, [9000, 5, 300])
    q = torch.randn(3, 8, 32)
    args = (q, pool, LAYER, indptr.numpy(), ids.numpy(), np.array([9000, 5, 300]))
    one = paged_decode_cpu(*args, sm_scale=0.2, threads=1)
    for threads in (2, 3, 8):
        many = paged_decode_cpu(*args, sm_scale=0.2, threads=threads)
        assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1]), threads


@pytest.mark.parametrize("head_dim", [40, 36])
def test_head_dims_that_are_not_a_multiple_of_16(head_dim: int) -> None:
    pool, indptr, ids, last = make(torch.bfloat16, 8, [33, 70], head_dim=head_dim)
    q = torch.randn(2, 4, head_dim)
    out, lse = A.decode(q, pool, LAYER, indptr, ids, last, return_lse=True, backend="cpu")
    want, want_lse = reference(q, pool, indptr, ids, [33, 70])
    close(out, want, f"head_dim {head_dim}", tol=1e-5)
    close(lse, want_lse, f"head_dim {head_dim} lse")


def test_auto_picks_the_native_kernel_without_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert A._resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert A._resolve_backend("cpu", torch.device("cpu")) == "cpu"
    with pytest.raises(InvalidArgument, match="backend='cpu' needs CPU tensors, got device meta"):
        A._resolve_backend("cpu", torch.device("meta"))
    with pytest.raises(InvalidArgument, match="'auto', 'triton', 'torch' or 'cpu'"):
        A._resolve_backend("gpu", torch.device("cpu"))


def test_extend_under_backend_cpu_is_the_native_kernel_and_merge_is_torch() -> None:
    """``extend`` runs the native kernel (issue 21): equal to the torch
    reference within rounding, not bit for bit; ``merge_states`` runs torch."""
    pool, indptr, ids, last = make(torch.float8_e4m3fn, 16, [40, 20])
    q = torch.randn(5, 4, 32)
    qo = torch.tensor([0, 3, 5], dtype=torch.int32)
    got = A.extend(q, pool, LAYER, qo, indptr, ids, last, backend="cpu")
    want = A.extend(q, pool, LAYER, qo, indptr, ids, last, backend="torch")
    close(got, want, "native extend against the torch reference")
    v, _s = A.merge_states(q, q[..., 0], q, q[..., 0], backend="cpu")
    close(v, q, "merge of a state with itself")


def test_bad_page_tables_are_refused_and_change_nothing() -> None:
    pool, indptr, ids, last = make(torch.float8_e4m3fn, 16, [40, 20])
    before = [b.copy() for b in pool.host_buffers() if b is not None]
    q = torch.randn(2, 4, 32)
    free = ids.clone()
    free[0] = pool.pages_per_segment - 1  # in retired segment 0
    with pytest.raises(InvalidHandle, match="kv_indices"):
        A.decode(q, pool, LAYER, indptr, free, last, backend="cpu")
    # Past the Python checks (check=False), the kernel validates on its own.
    with pytest.raises(InvalidArgument, match=r"kv_indices\[0\] = 63 is not a page of a live"):
        A.decode(q, pool, LAYER, indptr, free, last, backend="cpu", check=False)
    host = pool.host_buffers()
    args = [host, pool.layout.layer_offsets(LAYER), 16, 64, 2, 32, "float8_e4m3fn"]
    qf = q.reshape(-1).numpy()
    table = (indptr.numpy().astype(np.int64), ids.numpy().astype(np.int64))
    with pytest.raises(
        InvalidArgument, match="request 0: 49 KV tokens need 4 pages of 16, the table gives 3"
    ):
        decode_cpu(*args, qf, 4, *table, np.array([49, 20]), 0.1)
    with pytest.raises(
        InvalidArgument, match="q_heads = 3 must be a positive multiple of kv_heads = 2"
    ):
        decode_cpu(*args, qf, 3, *table, np.array([40, 20]), 0.1)
    with pytest.raises(InvalidArgument, match="q holds 256 values; 2 requests x 2 heads x 32 dims"):
        decode_cpu(*args, qf, 2, *table, np.array([40, 20]), 0.1)
    with pytest.raises(InvalidArgument, match="format must be"):
        decode_cpu(*args[:6], "int8", qf, 4, *table, np.array([40, 20]), 0.1)
    with pytest.raises(InvalidArgument, match="isa must be auto, avx512, avx2, neon or scalar"):
        decode_cpu(*args, qf, 4, *table, np.array([40, 20]), 0.1, 1, "sve")
    missing = next(i for i in ("neon", "avx2", "avx512") if i not in ISAS)
    with pytest.raises(InvalidArgument, match=f"instruction set {missing} is not available"):
        decode_cpu(*args, qf, 4, *table, np.array([40, 20]), 0.1, 1, missing)
    offsets = list(pool.layout.layer_offsets(LAYER))
    offsets[1] = host[1].size  # V past the end of the buffer
    with pytest.raises(InvalidArgument, match="segment 1: v bytes"):
        decode_cpu(host, tuple(offsets), *args[2:], qf, 4, *table, np.array([40, 20]), 0.1)
    after = [b for b in pool.host_buffers() if b is not None]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    pool.check_invariants()


def test_host_views_follow_growth_and_shrink() -> None:
    pool = KVPool(1, 1, 16, page_size=4, pages_per_segment=2, dtype="fp8")
    assert pool.host_buffers() == []
    a = pool.alloc(3)  # two segments
    assert [b is not None for b in pool.host_buffers()] == [True, True]
    pool.release(a[:2])
    pool.shrink(keep=0)
    views = pool.host_buffers()
    assert views[0] is None and views[1] is not None
    assert views[1].ctypes.data == pool.segment(1).k.data_ptr()


@settings(max_examples=200, deadline=None)
@given(
    lens=st.lists(st.integers(0, 40), min_size=0, max_size=4),
    pages=st.lists(st.integers(-2, 30), min_size=0, max_size=12),
    jitter=st.lists(st.sampled_from([0, 0, 0, 0, -1, 1]), min_size=5, max_size=5),
    offset=st.sampled_from([None, None, None, 0, 1, 2, 3]),
    q_heads=st.sampled_from([2, 4, 4, 3]),
)
def test_arbitrary_tables_give_a_result_or_invalid_argument(
    lens: list[int], pages: list[int], jitter: list[int], offset: int | None, q_heads: int
) -> None:
    """The kernel trusts nothing it is given: any page table (ids dead, live
    or past the pool), lengths, head count or layer offset yields outputs or
    InvalidArgument, never a crash or a read outside the segments."""
    pool, _, _, _ = make(torch.float8_e4m3fn, 4, [40], pages_per_segment=8)
    need = [-(-n // 4) for n in lens]
    indptr = np.array([0, *np.cumsum(need)], dtype=np.int64)
    indptr[1:] += np.array(jitter[: len(lens)], dtype=np.int64)
    kv_lens = np.array(lens, dtype=np.int64) + np.array(jitter[1 : len(lens) + 1], dtype=np.int64)
    offsets = list(pool.layout.layer_offsets(LAYER))
    if offset is not None:
        offsets[offset] += pool.segment_bytes // 3
    q = np.zeros(len(lens) * q_heads * 32, dtype=np.float32)
    args = [pool.host_buffers(), tuple(offsets), 4, 8, 2, 32, "float8_e4m3fn", q, q_heads]
    try:
        out, lse, _ = decode_cpu(*args, indptr, np.array(pages, np.int64), kv_lens, 0.1)
    except InvalidArgument:
        return
    assert out.size == len(lens) * q_heads * 32 and lse.size == len(lens) * q_heads


MASK_LENS = [17, 97, 1, 0, 4100]
MASKS: list[dict[str, Any]] = [
    {"window_left": 0},  # the query's own key only
    {"window_left": 5},  # smaller than a page of 16, may start inside one
    {"window_left": 16},  # a page (plus the query)
    {"window_left": 96},  # equal to the 97-token context
    {"window_left": 200},  # larger than every context but one
    {"window_left": 4097},  # spans two 4,096-token work chunks of the long request
    {"chunk_size": 24},  # chunk edges inside pages of 16
    {"chunk_size": 16},
    {"chunk_size": 4096},
    {"soft_cap": 1.5},  # soft cap alone
    {"soft_cap": 50.0, "window_left": 7},  # and with a window
    {"soft_cap": 3.0, "chunk_size": 40},
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float32], ids=str)
def test_windows_chunks_and_soft_caps_match_the_reference(
    dtype: torch.dtype, page_size: int, isa: str
) -> None:
    pool, indptr, ids, _last = make(dtype, page_size, MASK_LENS, seed=7 + page_size)
    q = torch.randn(len(MASK_LENS), 8, 32, generator=torch.Generator().manual_seed(3))  # GQA 4
    table = (indptr.numpy(), ids.numpy(), np.array(MASK_LENS))
    for mask in MASKS:
        out, lse = paged_decode_cpu(q, pool, LAYER, *table, sm_scale=32**-0.5, isa=isa, **mask)
        want, want_lse = reference(q, pool, indptr, ids, MASK_LENS, **mask)
        close(out, want, f"out ({isa}, {mask})")
        close(lse, want_lse, f"lse ({isa}, {mask})")
        assert torch.equal(out[3], torch.zeros_like(out[3]))  # the empty request
        assert bool((lse[3] == -math.inf).all())


def test_signature_for_attention_to_detect() -> None:
    params = inspect.signature(paged_decode_cpu).parameters
    assert [(n, params[n].default) for n in ("window_left", "chunk_size", "soft_cap")] == [
        ("window_left", -1),
        ("chunk_size", 0),
        ("soft_cap", 0.0),
    ]
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in ("window_left", "isa"))


def test_a_window_past_the_context_changes_not_a_bit() -> None:
    pool, indptr, ids, _last = make(torch.float8_e4m3fn, 16, [9000, 5, 300])
    q = torch.randn(3, 8, 32)
    args = (q, pool, LAYER, indptr.numpy(), ids.numpy(), np.array([9000, 5, 300]))
    full = paged_decode_cpu(*args, sm_scale=0.2, threads=2)
    masks: list[dict[str, Any]] = [
        {"window_left": 8999},
        {"window_left": 1 << 62},
        {"chunk_size": 9000},
    ]
    for mask in masks:
        got = paged_decode_cpu(*args, sm_scale=0.2, threads=2, **mask)
        assert torch.equal(full[0], got[0]) and torch.equal(full[1], got[1]), mask


@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_inf_outside_the_window_are_never_read(isa: str) -> None:
    """A NaN key before the window leaves the output finite (its page is not
    read); inside the window it makes the row NaN, as without a window. An
    infinite score is NaN uncapped and ``soft_cap`` with the cap."""
    pool, indptr, ids, _last = make(torch.float32, 16, [40])

    def key(token: int) -> torch.Tensor:  # the pool refuses inf/NaN: write the segment
        page = int(ids[token // 16])
        return pool.segment(page // pool.pages_per_segment).k[LAYER, page % 64, token % 16]

    key(0)[:, 0] = math.nan  # token 0: outside a window of 20
    key(33).zero_()
    key(33)[:, 0] = math.inf  # token 33: score +inf where q[..., 0] > 0
    q = torch.rand(1, 4, 32) + 0.5  # every q . k with token 33 is +inf
    table = (indptr.numpy(), ids.numpy(), np.array([40]))
    out, lse = paged_decode_cpu(q, pool, LAYER, *table, sm_scale=32**-0.5, isa=isa)
    assert bool(out.isnan().all()) and bool(lse.isnan().all())
    out, lse = paged_decode_cpu(q, pool, LAYER, *table, sm_scale=32**-0.5, isa=isa, window_left=20)
    assert bool(out.isnan().all()) and bool(lse.isnan().all())  # +inf score, uncapped: NaN
    out, lse = paged_decode_cpu(
        q, pool, LAYER, *table, sm_scale=32**-0.5, isa=isa, window_left=20, soft_cap=5.0
    )
    want, want_lse = reference(q, pool, indptr, ids, [40], window_left=20, soft_cap=5.0)
    close(out, want, f"capped inf ({isa})")
    close(lse, want_lse, f"capped inf lse ({isa})")
    out, lse = paged_decode_cpu(q, pool, LAYER, *table, sm_scale=32**-0.5, isa=isa, soft_cap=5.0)
    assert bool(out.isnan().all()) and bool(lse.isnan().all())  # the NaN key is in view


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ({"window_left": -2}, "window_left must be -1 .no window. or at least 0, got -2"),
        ({"chunk_size": -1}, "chunk_size must be 0 .no chunks. or at least 1, got -1"),
        ({"window_left": 3, "chunk_size": 8}, "window_left = 3 and chunk_size = 8 cannot both"),
        ({"soft_cap": -1.0}, "soft_cap must be 0 .no cap. or a positive finite number, got -1"),
        ({"soft_cap": math.nan}, "soft_cap must be .* got NaN"),
        ({"soft_cap": math.inf}, "soft_cap must be .* got inf"),
    ],
)
def test_bad_masks_are_refused(mask: dict[str, Any], message: str) -> None:
    pool, indptr, ids, _last = make(torch.bfloat16, 16, [40, 20])
    q = torch.randn(2, 4, 32)
    with pytest.raises(InvalidArgument, match=message):
        paged_decode_cpu(
            q, pool, LAYER, indptr.numpy(), ids.numpy(), np.array([40, 20]), sm_scale=0.1, **mask
        )
