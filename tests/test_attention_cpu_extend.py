"""The native CPU extend kernel (``backend="cpu"``, ``radixseg._core.extend_cpu``).

Compared with a float64 reference written here (dequantize every page with
``gather_kv``, then causal softmax attention of each request's new rows at
positions ``kv_len - qo_len + r``), in every storage format, with every
instruction set this CPU has, over requests whose pages are shuffled across
several segments (one retired in between), for cached prefix + new tokens
0+1, 0+17, 53+1 and 40+57; with sliding windows, chunks and soft caps; LSE
against the torch backend; a planted off-by-one that the comparison must
catch; and NaN in keys a row does not see. Needs no Triton.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import radixseg.kernels.cpu as cpu_kernels
from radixseg import InvalidArgument, KVPool
from radixseg import attention as A
from radixseg._core import extend_cpu
from radixseg.kernels.cpu import ISAS, paged_extend_cpu
from radixseg.kernels.torch_backend import gather_kv

FORMATS = [
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.bfloat16,
    torch.float16,
    torch.float32,
]
LAYER = 1  # not 0, so a wrong layer offset cannot pass
# (cached prefix, new tokens) per request: one token from nothing, a prompt,
# a decode-like step, chunked prefill over a prefix, and nothing new.
REQS = [(0, 1), (0, 17), (53, 1), (40, 57), (9, 0)]


def make(
    dtype: torch.dtype,
    page_size: int,
    reqs: list[tuple[int, int]],
    *,
    kv_heads: int = 2,
    head_dim: int = 32,
    pages_per_segment: int = 4,
    seed: int = 0,
) -> tuple[KVPool, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """A 2-layer pool holding ``prefix + new`` tokens per request, pages
    shuffled over segments, segment 0 retired; returns the pool, the CSR page
    table (indptr, ids, last page lengths), qo_indptr and the KV lengths."""
    pool = KVPool(
        2, kv_heads, head_dim, page_size=page_size, dtype=dtype,
        pages_per_segment=pages_per_segment,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    lens = [p + n for p, n in reqs]
    need = [-(-n // page_size) for n in lens]
    spare = pool.alloc(pages_per_segment)  # segment 0, released below: a hole
    ids = pool.alloc(max(1, sum(need)))[: sum(need)]
    pool.release(spare)
    pool.shrink(keep=0)
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    slots = (ids.long()[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    kv = torch.randn(slots.numel(), kv_heads, head_dim, generator=gen)
    for layer in (0, 1):
        pool.write(layer, slots, kv * (layer + 1), kv.flip(-1) * 3)
    indptr = torch.tensor([0, *np.cumsum(need)], dtype=torch.int32)
    last = torch.tensor([(n - 1) % page_size + 1 if n else 0 for n in lens], dtype=torch.int32)
    qo = torch.tensor([0, *np.cumsum([n for _, n in reqs])], dtype=torch.int32)
    return pool, indptr, ids, last, qo, np.array(lens, dtype=np.int64)


def reference(
    q: torch.Tensor,
    pool: KVPool,
    indptr: torch.Tensor,
    ids: torch.Tensor,
    qo: torch.Tensor,
    lens: np.ndarray,
    *,
    window_left: int = -1,
    chunk_size: int = 0,
    soft_cap: float = 0.0,
    shift: int = 0,
    layer: int = LAYER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 causal attention: row ``r`` of request ``i`` sits at ``p =
    kv_len - qo_len + r`` and sees keys ``lo..=p`` (``lo = max(0, p -
    window_left)`` or ``chunk_size * (p // chunk_size)``), scores capped to
    ``soft_cap * tanh(s / soft_cap)``. ``shift`` moves every row's position
    (a planted bug)."""
    total, q_heads, d = q.shape
    group = q_heads // pool.num_kv_heads
    out = torch.zeros(total, q_heads, d, dtype=torch.float64)
    lse = torch.full((total, q_heads), -math.inf, dtype=torch.float64)
    for i, n in enumerate(lens.tolist()):
        r0, r1 = int(qo[i]), int(qo[i + 1])
        if r1 == r0:
            continue
        k, v = gather_kv(pool, layer, ids[int(indptr[i]) : int(indptr[i + 1])], torch.float64)
        k = k[:n].repeat_interleave(group, 1)
        v = v[:n].repeat_interleave(group, 1)
        pos = torch.arange(n - (r1 - r0), n) + shift
        lo = torch.zeros_like(pos)
        if window_left >= 0:
            lo = (pos - window_left).clamp_min(0)
        elif chunk_size > 0:
            lo = pos - pos % chunk_size
        t = torch.arange(n)
        visible = (t[None, :] <= pos[:, None]) & (t[None, :] >= lo[:, None])  # [rows, n]
        s = torch.einsum("rhd,thd->rht", q[r0:r1].double(), k) * d**-0.5
        if soft_cap > 0:
            s = soft_cap * torch.tanh(s / soft_cap)
        s = s.masked_fill(~visible[:, None, :], -math.inf)
        lse[r0:r1] = torch.logsumexp(s, -1)
        # Keys out of view contribute nothing, even NaN (0 * NaN would be NaN).
        terms = torch.softmax(s, -1)[..., None] * v.permute(1, 0, 2)[None]  # [rows, h, t, d]
        terms = torch.where(visible[:, None, :, None], terms, 0.0)
        out[r0:r1] = terms.sum(2)
    return out, lse


def close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), what
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    scale = max(1.0, want[finite].abs().max().item() if finite.any() else 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def run(
    q: torch.Tensor,
    pool: KVPool,
    indptr: torch.Tensor,
    ids: torch.Tensor,
    qo: torch.Tensor,
    lens: np.ndarray,
    **kw: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    return paged_extend_cpu(
        q, pool, LAYER, qo.numpy(), indptr.numpy(), ids.numpy(), lens, sm_scale=32**-0.5, **kw
    )


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 8, 16])
@pytest.mark.parametrize("dtype", FORMATS, ids=str)
def test_extend_matches_reference(dtype: torch.dtype, page_size: int, group: int) -> None:
    pool, indptr, ids, _last, qo, lens = make(dtype, page_size, REQS, seed=page_size + group)
    segments = {int(p) // pool.pages_per_segment for p in ids}
    assert len(segments) >= 3 and 0 not in segments
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(int(qo[-1]), 2 * group, 32, generator=gen)
    want, want_lse = reference(q, pool, indptr, ids, qo, lens)
    for isa in ISAS:  # every instruction set this CPU has
        out, lse = run(q, pool, indptr, ids, qo, lens, isa=isa)
        close(out, want, f"out ({isa})")
        close(lse, want_lse, f"lse ({isa})")
        assert bool(lse.isfinite().all())  # every row sees at least its own key


MASKS: list[dict[str, Any]] = [
    {"window_left": 0},  # each row sees its own key only
    {"window_left": 5},  # smaller than a page of 16 (and of 8)
    {"window_left": 16},
    {"window_left": 60},  # reaches into the 40-token prefix from the new rows
    {"chunk_size": 24},  # chunk edges inside pages, and at 48 and 72 inside the new rows
    {"chunk_size": 45},  # a boundary between the prefix (40) and the new rows' ends
    {"chunk_size": 16},
    {"soft_cap": 1.5},
    {"soft_cap": 50.0, "window_left": 7},
    {"soft_cap": 3.0, "chunk_size": 40},
]


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float32], ids=str)
def test_windows_chunks_and_soft_caps_match_the_reference(
    dtype: torch.dtype, page_size: int
) -> None:
    pool, indptr, ids, _last, qo, lens = make(dtype, page_size, REQS, seed=7 + page_size)
    q = torch.randn(int(qo[-1]), 8, 32, generator=torch.Generator().manual_seed(3))  # GQA 4
    for mask in MASKS:
        want, want_lse = reference(q, pool, indptr, ids, qo, lens, **mask)
        for isa in ISAS:
            out, lse = run(q, pool, indptr, ids, qo, lens, isa=isa, **mask)
            close(out, want, f"out ({isa}, {mask})")
            close(lse, want_lse, f"lse ({isa}, {mask})")


@pytest.mark.parametrize(
    "mask", [{}, {"window_left": 5}, {"chunk_size": 24}, {"soft_cap": 2.0}], ids=str
)
def test_public_extend_and_lse_match_the_torch_backend(mask: dict[str, Any]) -> None:
    pool, indptr, ids, last, qo, lens = make(torch.float8_e4m3fn, 16, REQS, seed=11)
    q = torch.randn(int(qo[-1]), 8, 32, dtype=torch.bfloat16)
    kw: dict[str, Any] = {
        "window_left": mask.get("window_left", -1),
        "chunk_size": mask.get("chunk_size"),
        "logits_soft_cap": mask.get("soft_cap"),
    }
    out, lse = A.extend(q, pool, LAYER, qo, indptr, ids, last, return_lse=True, backend="cpu", **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    ref, ref_lse = A.extend(
        q, pool, LAYER, qo, indptr, ids, last, return_lse=True, backend="torch", **kw
    )
    close(out, ref, "out against the torch backend", tol=1e-2)
    close(lse, ref_lse, "lse against the torch backend", tol=1e-5)
    _want, want_lse = reference(q, pool, indptr, ids, qo, lens, **mask)
    close(lse, want_lse, "lse against float64")


def test_auto_on_cpu_runs_the_native_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pool, indptr, ids, last, qo, _lens = make(torch.bfloat16, 8, REQS)
    q = torch.randn(int(qo[-1]), 4, 32)
    calls: list[bool] = []
    native = cpu_kernels.paged_extend_cpu

    def spy(*args: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(True)
        return native(*args, **kw)

    monkeypatch.setattr(cpu_kernels, "paged_extend_cpu", spy)
    got = A.extend(q, pool, LAYER, qo, indptr, ids, last)  # backend="auto"
    assert calls == [True]
    want = A.extend(q, pool, LAYER, qo, indptr, ids, last, backend="torch")
    close(got, want, "auto against torch")
    # Without a causal mask (a sharded extend's local part) torch runs.
    A.extend(q, pool, LAYER, qo, indptr, ids, last, causal=False, backend="cpu")
    assert calls == [True]


def test_a_planted_off_by_one_is_caught() -> None:
    """The comparison is sharp enough to see a row attend one key too many
    or too few, or read the wrong layer."""
    pool, indptr, ids, _last, qo, lens = make(torch.float8_e4m3fn, 16, REQS, seed=5)
    q = torch.randn(int(qo[-1]), 8, 32, generator=torch.Generator().manual_seed(9))
    out, _ = run(q, pool, indptr, ids, qo, lens)
    for bug in ({"shift": 1}, {"shift": -1}, {"layer": 0}, {"window_left": 90}):
        want, _ = reference(q, pool, indptr, ids, qo, lens, **bug)
        with pytest.raises(AssertionError):
            close(out, want, f"planted {bug}")


def test_threads_do_not_change_a_bit() -> None:
    reqs = [(300, 200), (0, 5), (1000, 64)]
    pool, indptr, ids, _last, qo, lens = make(torch.float8_e4m3fn, 16, reqs, pages_per_segment=32)
    q = torch.randn(int(qo[-1]), 8, 32)
    one = run(q, pool, indptr, ids, qo, lens, threads=1)
    for threads in (2, 3, 8):
        many = run(q, pool, indptr, ids, qo, lens, threads=threads)
        assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1]), threads


@pytest.mark.parametrize("isa", ISAS)
def test_nan_in_a_masked_key_does_not_leak(isa: str) -> None:
    """NaN in the K and V of a key that a row does not see (a later new token,
    or a key before its window) leaves that row finite; the rows that do see
    it read NaN, as decode's do."""
    pool, indptr, ids, _last, qo, lens = make(torch.float32, 8, [(10, 14)], pages_per_segment=8)

    def kv(which: str, token: int) -> torch.Tensor:  # the pool refuses NaN: write the segment
        page = int(ids[token // 8])
        seg = pool.segment(page // pool.pages_per_segment)
        t: torch.Tensor = getattr(seg, which)[LAYER, page % 8, token % 8]
        return t

    for which in ("k", "v"):
        kv(which, 17)[:] = math.nan  # new token 7 (of 14, at positions 10..23)
        kv(which, 1)[:] = math.nan  # in the prefix
    q = torch.randn(14, 4, 32)
    out, lse = run(q, pool, indptr, ids, qo, lens, isa=isa, window_left=12)
    pos = torch.arange(10, 24)
    sees = (pos >= 17) | (pos - 12 <= 1)
    assert bool(out[sees].isnan().all()) and bool(lse[sees].isnan().all())
    assert bool(out[~sees].isfinite().all()) and bool(lse[~sees].isfinite().all())
    # The finite rows are what the reference gives with the NaN keys out of view.
    want, want_lse = reference(q, pool, indptr, ids, qo, lens, window_left=12)
    close(out[~sees], want[~sees], f"rows before the NaN key ({isa})")
    close(lse[~sees], want_lse[~sees], f"lse before the NaN key ({isa})")


def test_bad_calls_are_refused() -> None:
    pool, indptr, ids, _last, qo, lens = make(torch.bfloat16, 16, [(40, 8)])
    q = torch.randn(8, 4, 32)
    with pytest.raises(InvalidArgument, match="request 0 has 8 new tokens but only 5 KV tokens"):
        paged_extend_cpu(
            q, pool, LAYER, qo.numpy(), np.array([0, 1]), ids.numpy()[:1], np.array([5]),
            sm_scale=0.1,
        )  # fmt: skip
    with pytest.raises(InvalidArgument, match="qo_indptr has 3 entries, kv_indptr 2"):
        paged_extend_cpu(
            q, pool, LAYER, np.array([0, 8, 8]), indptr.numpy(), ids.numpy(), lens, sm_scale=0.1
        )
    with pytest.raises(InvalidArgument, match="need causal attention"):
        paged_extend_cpu(
            q, pool, LAYER, qo.numpy(), indptr.numpy(), ids.numpy(), lens, sm_scale=0.1,
            causal=False, window_left=3,
        )  # fmt: skip
    with pytest.raises(InvalidArgument, match="window_left must be -1"):
        paged_extend_cpu(
            q, pool, LAYER, qo.numpy(), indptr.numpy(), ids.numpy(), lens, sm_scale=0.1,
            window_left=-2,
        )  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 12)), min_size=0, max_size=4),
    pages=st.lists(st.integers(-2, 40), min_size=0, max_size=14),
    jitter=st.lists(st.sampled_from([0, 0, 0, 0, -1, 1]), min_size=10, max_size=10),
    q_heads=st.sampled_from([2, 4, 4, 3]),
    causal=st.booleans(),
)
def test_arbitrary_tables_give_a_result_or_invalid_argument(
    reqs: list[tuple[int, int]],
    pages: list[int],
    jitter: list[int],
    q_heads: int,
    causal: bool,
) -> None:
    """Any page table, query offsets, lengths or head count yields outputs or
    InvalidArgument, never a crash or a read outside the segments."""
    pool, _, _, _, _, _ = make(torch.float8_e4m3fn, 4, [(30, 10)], pages_per_segment=8)
    lens = [p + n for p, n in reqs]
    need = [-(-n // 4) for n in lens]
    indptr = np.array([0, *np.cumsum(need)], dtype=np.int64)
    indptr[1:] += np.array(jitter[: len(reqs)], dtype=np.int64)
    qo = np.array([0, *np.cumsum([n for _, n in reqs])], dtype=np.int64)
    qo[1:] += np.array(jitter[5 : 5 + len(reqs)], dtype=np.int64)
    kv_lens = np.array(lens, dtype=np.int64) + np.array(jitter[1 : len(reqs) + 1], np.int64)
    total = max(0, int(qo[-1]))
    q = np.zeros(total * q_heads * 32, dtype=np.float32)
    host, offsets = pool.host_buffers(), pool.layout.layer_offsets(LAYER)
    ids = np.array(pages, np.int64)
    try:
        out, lse, _ = extend_cpu(
            host, offsets, 4, 8, 2, 32, "float8_e4m3fn", q, q_heads, qo, indptr, ids, kv_lens,
            0.1, causal,
        )  # fmt: skip
    except InvalidArgument:
        return
    assert out.size == total * q_heads * 32 and lse.size == total * q_heads
