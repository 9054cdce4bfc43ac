"""Torch implementations of paged attention, the LSE merge and the K/V store.

The CPU backend users get when Triton cannot run (no CUDA device and no
``TRITON_INTERPRET=1``), and what ``backend="torch"`` selects anywhere. Same
semantics as the Triton kernels: KV is dequantized (FP8 code times its
per-(token, head) scale), then plain softmax attention runs in
``compute_dtype`` (float32 by default; float64 for a reference). Long
requests are processed ``chunk_tokens`` KV positions at a time and the chunks
merged by log-sum-exp, so memory stays bounded at any context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import numpy.typing as npt

    from radixseg.pool import KVPool

__all__ = [
    "dense_attention_torch",
    "first_visible",
    "gather_kv",
    "merge_states_torch",
    "paged_attention_torch",
]


def merge_states_torch(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSE merge: ``v [..., D]``, ``s [...]`` (natural log; ``-inf`` = empty).

    Returns ``(v, s)`` with ``v`` in ``v_a``'s dtype and ``s`` in ``s_a``'s
    floating dtype promoted with float32. Empty states contribute nothing,
    whatever their ``v`` holds; merging two empty states gives ``(0, -inf)``.
    """
    work = torch.promote_types(torch.promote_types(s_a.dtype, s_b.dtype), torch.float32)
    sa, sb = s_a.to(work), s_b.to(work)
    m = torch.maximum(sa, sb)
    m_safe = torch.where(m == -math.inf, torch.zeros_like(m), m)
    wa = torch.exp(sa - m_safe)
    wb = torch.exp(sb - m_safe)
    total = wa + wb
    va = v_a.to(torch.promote_types(v_a.dtype, work))
    vb = v_b.to(va.dtype)
    zero = torch.zeros((), dtype=va.dtype, device=va.device)
    num = torch.where(wa.unsqueeze(-1) > 0, wa.unsqueeze(-1) * va, zero) + torch.where(
        wb.unsqueeze(-1) > 0, wb.unsqueeze(-1) * vb, zero
    )
    has = total > 0
    v = num / torch.where(has, total, torch.ones_like(total)).unsqueeze(-1)
    log_total = torch.log(torch.where(has, total, torch.ones_like(total)))
    s = torch.where(has, m_safe + log_total, torch.full_like(m, -math.inf))
    return v.to(v_a.dtype), s


def gather_kv(
    pool: KVPool, layer: int, pages: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V of ``pages`` (page ids, any integer tensor), each
    ``[len(pages) * page_size, kv_heads, head_dim]`` in ``dtype``, page after page."""
    ps = pool.page_size
    h, d = pool.num_kv_heads, pool.head_dim
    pages = pages.to(device="cpu", dtype=torch.int64)
    k = torch.empty((pages.numel(), ps, h, d), dtype=dtype, device=pool.device)
    v = torch.empty_like(k)
    seg, within = pool.layout.split(pages)
    for sid in torch.unique(seg).tolist():
        sel = (seg == sid).nonzero().squeeze(1)
        views = pool.segment(sid)
        idx = within[sel].to(pool.device)
        sel = sel.to(pool.device)
        for src, scale, dst in ((views.k, views.k_scale, k), (views.v, views.v_scale, v)):
            # index_select has no float8 kernels everywhere: move the bytes.
            raw = src[layer].view(torch.uint8) if pool.fp8 else src[layer]
            x = raw.index_select(0, idx)
            x = (x.view(pool.dtype) if pool.fp8 else x).to(dtype)
            if scale is not None:
                x = x * scale[layer].index_select(0, idx).to(dtype).unsqueeze(-1)
            dst.index_copy_(0, sel, x)
    return k.view(-1, h, d), v.view(-1, h, d)


def first_visible(q_pos: int, window_left: int, chunk_size: int) -> int:
    """The first KV position a query at ``q_pos`` sees: ``q_pos - window_left``
    (clamped at 0) with a window, the start of its chunk with ``chunk_size``,
    else 0. Positions are non-decreasing in ``q_pos``, so a block of rows
    sees nothing before its first row's."""
    if window_left >= 0:
        return max(0, q_pos - window_left)
    if chunk_size > 0:
        return q_pos - q_pos % chunk_size
    return 0


def paged_attention_torch(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    qo_lens: npt.NDArray[np.int64],
    kv_indptr: npt.NDArray[np.int64],
    kv_indices: npt.NDArray[np.int64],
    kv_lens: npt.NDArray[np.int64],
    *,
    causal: bool,
    sm_scale: float,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    chunk_tokens: int = 1 << 15,
    window_left: int = -1,
    chunk_size: int = 0,
    soft_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [total_q, q_heads, head_dim]`` over each request's paged KV.

    Request ``i`` owns the next ``qo_lens[i]`` rows of ``q``: its last
    ``qo_lens[i]`` KV positions, attending (``causal``) to positions up to
    their own. Host arrays: ``kv_indptr [B + 1]``, ``kv_indices`` (page ids),
    ``kv_lens [B]`` tokens. Returns ``(out [total_q, q_heads, head_dim]``
    in ``out_dtype`` (default q's), ``lse [total_q, q_heads]`` float32
    natural log); rows without KV get 0 and ``-inf``.

    ``window_left >= 0`` (a query at ``p`` sees keys ``k >= p - window_left``)
    or ``chunk_size > 0`` (keys in ``p``'s chunk) narrow what a query sees,
    on top of ``causal`` (which a single decode row needs not); ``soft_cap >
    0`` maps scores to ``soft_cap * tanh(score / soft_cap)``. With a window
    or chunks the rows are taken in blocks, and each block reads only the
    pages from its first row's first visible key to its last row: the cost
    per row is the window (or chunk) plus the block, not the context.

    Each chunk of pages is processed one segment at a time, straight from
    that segment's tensors (no gathered copy of the whole KV), and the partial
    results are merged by log-sum-exp. FP8 scales multiply the scores and the
    probabilities rather than the dequantized K and V.
    """
    total_q, q_heads, head_dim = q.shape
    kv_heads = pool.num_kv_heads
    group = q_heads // kv_heads
    ps = pool.page_size
    dev = q.device
    out = torch.zeros((total_q, q_heads, head_dim), dtype=compute_dtype, device=dev)
    lse = torch.full((total_q, q_heads), -math.inf, dtype=compute_dtype, device=dev)
    chunk_pages = max(1, chunk_tokens // ps)
    offsets = torch.arange(ps, device=dev)
    local = window_left >= 0 or chunk_size > 0
    span = window_left + 1 if window_left >= 0 else chunk_size
    q_start = 0
    for i in range(len(qo_lens)):
        qo, kv_len = int(qo_lens[i]), int(kv_lens[i])
        rows0 = q_start
        q_start += qo
        if qo == 0 or kv_len == 0:
            continue
        pages = kv_indices[kv_indptr[i] : kv_indptr[i + 1]]
        step = max(span, 64) if local else qo
        for a in range(0, qo, step):
            b = min(qo, a + step)
            rows = slice(rows0 + a, rows0 + b)
            # [kv_heads, rows * group, head_dim]: one matrix product per KV head.
            qi = q[rows].to(compute_dtype).view(b - a, kv_heads, group, head_dim)
            qi = qi.permute(1, 0, 2, 3).reshape(kv_heads, (b - a) * group, head_dim)
            p0 = kv_len - qo + a
            q_pos = torch.arange(p0, kv_len - qo + b, device=dev).repeat_interleave(group)
            lo = first_visible(p0, window_left, chunk_size)
            hi = kv_len - qo + b if causal else kv_len
            q_lo = None
            if window_left >= 0:
                q_lo = (q_pos - window_left).clamp_min(0)
            elif chunk_size > 0:
                q_lo = q_pos - q_pos % chunk_size
            first_page = lo // ps
            block = _Rows(qi, q_pos, q_lo, offsets, kv_len, causal, sm_scale, soft_cap)
            o_i, s_i = _pages_part(
                pool, layer, pages[first_page : -(-hi // ps)], first_page, chunk_pages, block
            )
            if o_i is None or s_i is None:
                continue
            n = b - a
            o_i = o_i.view(kv_heads, n, group, head_dim).permute(1, 0, 2, 3)
            out[rows] = o_i.reshape(n, q_heads, head_dim)
            lse[rows] = s_i.view(kv_heads, n, group).permute(1, 0, 2).reshape(n, q_heads)
    return out.to(out_dtype or q.dtype), lse.float()


@dataclass(frozen=True)
class _Rows:
    """A block of query rows of one request and what they attend with.

    ``qi [kv_heads, M, D]`` (the compute dtype), ``q_pos [M]`` their KV
    positions, ``q_lo [M]`` the first position each sees (None: 0),
    ``offsets`` ``arange(page_size)``."""

    qi: torch.Tensor
    q_pos: torch.Tensor
    q_lo: torch.Tensor | None
    offsets: torch.Tensor
    kv_len: int
    causal: bool
    sm_scale: float
    soft_cap: float


def _pages_part(
    pool: KVPool,
    layer: int,
    pages: npt.NDArray[np.int64],
    first_page: int,
    chunk_pages: int,
    rows: _Rows,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Attention of ``rows`` over ``pages`` (page positions ``first_page`` on of the
    request), ``chunk_pages`` at a time and one segment at a time, merged by LSE;
    ``(None, None)`` without pages."""
    o_i: torch.Tensor | None = None
    s_i: torch.Tensor | None = None
    for c0 in range(0, pages.size, chunk_pages):
        chunk = pages[c0 : c0 + chunk_pages]
        segs, within = pool.layout.split(chunk)
        for sid in np.unique(segs).tolist():
            sel = np.flatnonzero(segs == sid)
            o_c, s_c = _segment_part(pool, layer, sid, within[sel], first_page + c0 + sel, rows)
            if o_i is None or s_i is None:
                o_i, s_i = o_c, s_c
            else:
                o_i, s_i = merge_states_torch(o_i, s_i, o_c, s_c)
    return o_i, s_i


def dense_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qo_lens: npt.NDArray[np.int64],
    *,
    causal: bool,
    sm_scale: float,
    compute_dtype: torch.dtype = torch.float32,
    max_scores: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each request's new tokens over their own K/V, without a pool.

    ``q [T, q_heads, head_dim]``, ``k``/``v [T, kv_heads, head_dim]``: request
    ``i`` owns the next ``qo_lens[i]`` rows of all three, and with ``causal``
    its row ``j`` sees its keys ``0..=j``. Returns ``(out [T, q_heads,
    head_dim]`` in q's dtype, ``lse [T, q_heads]`` float32 natural log). Query
    rows are processed in chunks of at most ``max_scores`` scores, so memory
    stays bounded for long prompts. (The new part of a sharded extend: those
    keys are on every rank, the cached context is not.)
    """
    total, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    out = torch.zeros((total, q_heads, head_dim), dtype=compute_dtype, device=q.device)
    lse = torch.full((total, q_heads), -math.inf, dtype=compute_dtype, device=q.device)
    start = 0
    for n in (int(x) for x in qo_lens):
        rows = slice(start, start + n)
        start += n
        if n == 0:
            continue
        kt = k[rows].to(compute_dtype).permute(1, 2, 0)  # [kv_heads, D, n]
        vt = v[rows].to(compute_dtype).permute(1, 0, 2)  # [kv_heads, n, D]
        step = max(1, max_scores // (q_heads * n))
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            qi = q[start - n + c0 : start - n + c1].to(compute_dtype)
            qi = qi.view(c1 - c0, kv_heads, group, head_dim).permute(1, 0, 2, 3)
            s = torch.matmul(qi.reshape(kv_heads, -1, head_dim), kt) * sm_scale
            if causal:
                t = torch.arange(c0, c1, device=q.device).repeat_interleave(group)
                hidden = torch.arange(n, device=q.device)[None, :] > t[:, None]
                s.masked_fill_(hidden[None], -math.inf)
            s_max = s.amax(dim=-1, keepdim=True)
            e = torch.exp(s - s_max)
            total_e = e.sum(dim=-1)
            o = torch.matmul(e, vt) / total_e.unsqueeze(-1)
            at = slice(start - n + c0, start - n + c1)
            out[at] = (
                o.view(kv_heads, c1 - c0, group, head_dim)
                .permute(1, 0, 2, 3)
                .reshape(c1 - c0, q_heads, head_dim)
            )
            lse[at] = (
                (s_max.squeeze(-1) + torch.log(total_e))
                .view(kv_heads, c1 - c0, group)
                .permute(1, 0, 2)
                .reshape(c1 - c0, q_heads)
            )
    return out.to(q.dtype), lse.float()


def fp8_codes_to_float(
    codes: torch.Tensor, fmt: torch.dtype, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Values of FP8 codes held as ``uint8`` (any shape), as a new ``dtype`` tensor.

    Every e4m3 and e5m2 value is a float16 value, so the codes are moved into
    float16 bit patterns with integer ops and widened: exact for every finite
    code (subnormals included) and 3-4x faster on the CPU than torch's FP8
    cast, which dominates decode there. e5m2 is float16's top byte (inf and
    NaN kept). e4m3 has no inf; its NaN code (``0x7F``/``0xFF``) reads as
    ``±480``, as in the kernels' software decode for sm_80: a
    :meth:`KVPool.write` stores it only beside a NaN scale, so the result is
    NaN either way.
    """
    i = codes.to(torch.int16)
    if fmt == torch.float8_e5m2:
        return (i << 8).view(torch.float16).to(dtype, copy=True)
    # e4m3 (bias 7) -> float16 (bias 15): exponent and mantissa move up 7
    # bits, the sign 8; the exponent bias then differs by 2^8.
    b = (i & 0x7F) << 7
    b |= (i & 0x80) << 8
    out = b.view(torch.float16).to(dtype)
    return out.mul_(256.0)


def _segment_part(
    pool: KVPool,
    layer: int,
    sid: int,
    within: npt.NDArray[np.int64],
    page_pos: npt.NDArray[np.int64],
    rows: _Rows,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention ``(o [kv_heads, M, D], lse [kv_heads, M])`` of ``rows`` over the
    pages ``within`` segment ``sid`` that sit at page positions ``page_pos`` of the request."""
    qi, q_pos, q_lo, kv_len = rows.qi, rows.q_pos, rows.q_lo, rows.kv_len
    dtype, offsets = qi.dtype, rows.offsets
    dev = qi.device
    views = pool.segment(sid)
    at = torch.from_numpy(within).to(dev)
    pos = (torch.from_numpy(page_pos).to(dev)[:, None] * pool.page_size + offsets).reshape(-1)
    # A run of consecutive pages (the common case: a request's pages are
    # handed out in order) is sliced in place; scattered pages are gathered.
    # Either way exactly one fresh copy in `dtype` is made, which the stale
    # tail below may be zeroed in.
    lo = int(within[0])
    run = bool(within.size == 1 or (np.diff(within) == 1).all())
    kv = []
    for src in (views.k, views.v):
        raw = src[layer].view(torch.uint8) if pool.fp8 else src[layer]
        x = raw.narrow(0, lo, within.size) if run else raw.index_select(0, at)
        x = x.reshape(-1, pool.num_kv_heads, pool.head_dim)
        if pool.fp8:
            kv.append(fp8_codes_to_float(x, pool.dtype, dtype))
        else:
            kv.append(x.to(dtype, copy=True) if run else x.to(dtype))
    k, v = kv
    # Slots past the request's length (the rest of its last page) hold
    # whatever the page held before, possibly inf or NaN codes: zero them, as
    # the kernels' masked loads do, so that a 0 probability never meets NaN.
    # They are a tail of at most one page: written in place, not a full copy.
    valid = pos < kv_len
    if not bool(valid.all()):
        stale = (~valid).nonzero().squeeze(1)
        k.index_fill_(0, stale, 0)
        v.index_fill_(0, stale, 0)
    # [kv_heads, M, n]; K^T and V are strided views the BLAS reads in place.
    s = torch.matmul(qi, k.permute(1, 2, 0))
    scales = None
    if views.k_scale is not None and views.v_scale is not None:
        # [kv_heads, 1, n] per tensor, applied to scores and probabilities.
        scales = [
            x[layer]
            .index_select(0, at)
            .reshape(-1, pool.num_kv_heads)
            .masked_fill(~valid[:, None], 0)
            .T.to(dtype)[:, None, :]
            for x in (views.k_scale, views.v_scale)
        ]
        s *= scales[0]
    s *= rows.sm_scale
    if rows.soft_cap > 0:
        s.div_(rows.soft_cap).tanh_().mul_(rows.soft_cap)
    visible = valid[None, :]
    if rows.causal:
        visible = visible & (pos[None, :] <= q_pos[:, None])
    if q_lo is not None:
        visible = visible & (pos[None, :] >= q_lo[:, None])
    s.masked_fill_(~visible[None], -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    e = torch.exp(s - m)
    total = e.sum(dim=-1)
    if scales is not None:
        e *= scales[1]
    has = total > 0
    o = torch.matmul(e, v.permute(1, 0, 2)) / torch.where(has, total, 1.0).unsqueeze(-1)
    lse = torch.where(has, m.squeeze(-1) + torch.log(torch.where(has, total, 1.0)), -math.inf)
    return o, lse
