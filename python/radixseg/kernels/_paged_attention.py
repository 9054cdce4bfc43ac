# mypy: ignore-errors
# ruff: noqa: ANN001, ANN202
"""Triton kernels: paged attention over a segmented KV pool, and the LSE merge.

``paged_attention_kernel`` serves decode and extend. Grid
``(tiles, kv_heads, splits)``: a tile is ``BLOCK_M`` rows of one request,
where row ``r`` is (new token ``r // GROUP``, query head ``r % GROUP`` of the
KV head), so every query head sharing a KV head reads each K/V block once
(GQA). The KV axis is cut into ``kv_chunk``-token splits (split-K); each
program runs an online softmax over its split and writes a partial output and
its log-sum-exp, which ``merge_states_kernel`` combines. With one split the
program writes the final output directly.

KV position ``n`` of a request is page ``kv_indices[kv_indptr[req] + n //
PAGE_SIZE]``, slot ``n % PAGE_SIZE``; the page id resolves to (segment,
page-in-segment) by division, and the segment's base address is loaded from
the pool's segment table and cast to a pointer. Page ids outside the table,
and pages of retired segments (base 0), are masked, never dereferenced.
"""

import triton
import triton.language as tl

from radixseg.kernels._fp8 import f32_to_bf16_bits, fp8_bits_to_f32

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_kv(
    ptr,
    mask,
    FP8: tl.constexpr,
    FP8_SOFTWARE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    if FP8_SOFTWARE:
        x = fp8_bits_to_f32(tl.load(ptr, mask=mask, other=0), FP8 == 1)
    else:
        x = tl.load(ptr, mask=mask, other=0.0)
        if INTERPRET:
            # The interpreter's e5m2 -> fp16 conversion drops subnormals; via
            # fp32 it is exact (and the same values a GPU produces directly).
            x = x.to(tl.float32)
    return x.to(DOT_DTYPE)


@triton.jit
def _round_to_bf16(x):
    """float32 rounded to bfloat16 precision, kept as float32."""
    return (f32_to_bf16_bits(x).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _tanh(x):
    """tanh from one exp2, exact in sign and saturating at +-1 (Triton has no tanh)."""
    e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def paged_attention_kernel(
    Q,
    stride_qt,
    stride_qh,
    Out,
    stride_os,
    stride_ot,
    stride_oh,
    LSE,
    stride_ls,
    stride_lt,
    table,
    max_page,
    qo_indptr,
    kv_indptr,
    kv_indices,
    kv_last_page_len,
    tile_req,
    tile_row,
    layer_off,
    scale_layer_off,
    stride_page,
    stride_tok,
    stride_head,
    sstride_page,
    sstride_tok,
    pages_per_segment,
    sm_scale_log2,
    kv_chunk,
    window_left,
    chunk_size,
    softcap_in,
    softcap_out,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    KV_DTYPE: tl.constexpr,
    FP8: tl.constexpr,
    FP8_SOFTWARE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr,
    LOCAL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    P_BF16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Attention of one tile of new tokens over one split of its request's KV.

    ``Out``/``LSE`` are ``[splits, total_q, q_heads, head_dim]`` /
    ``[splits, total_q, q_heads]`` (``stride_os = stride_ls = 0`` when the grid
    has one split and they are the final output); ``LSE`` is natural-log.
    ``FP8``: 0 none, 1 e4m3fn, 2 e5m2 (then ``KV_DTYPE`` is the FP8 type, or
    ``uint8`` with ``FP8_SOFTWARE``, and scales are read from the table's
    columns 2 and 3). ``sm_scale_log2 = sm_scale * log2(e)``. ``P_BF16``:
    round the probabilities to bf16 before a float32 P.V product — what a bf16
    product does on a GPU, emulated for the interpreter, whose ``tl.dot``
    multiplies bf16 bit patterns as integers.

    ``LOCAL``: 0 none; 1 a sliding window, where the row at position ``p``
    sees keys from ``p - window_left``; 2 chunks, where it sees keys from
    ``p - p % chunk_size``. Splits then start at the first key the tile's
    first row sees (``kv_chunk`` covers the rest up to ``kv_len``), so pages
    before it are never loaded. ``SOFTCAP``: scores are ``softcap_out *
    tanh(softcap_in * q.k)``, with ``softcap_in = sm_scale / cap`` and
    ``softcap_out = cap * log2(e)``, in place of ``sm_scale_log2 * q.k``.
    """
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    req = tl.load(tile_req + tile)
    row0 = tl.load(tile_row + tile)
    q_start = tl.load(qo_indptr + req)
    q_len = tl.load(qo_indptr + req + 1) - q_start
    p_start = tl.load(kv_indptr + req)
    n_pages = tl.load(kv_indptr + req + 1) - p_start
    last = tl.load(kv_last_page_len + req)
    kv_len = tl.where(n_pages > 0, (n_pages - 1) * PAGE_SIZE + last, 0)

    rows = row0 + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    qh = kvh * GROUP + rows % GROUP
    row_ok = tok < q_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_ptr = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + qh[:, None] * stride_qh
    q = tl.load(q_ptr + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(DOT_DTYPE)
    # Query token i sits at KV position kv_len - q_len + i.
    q_pos = kv_len - q_len + tok

    # The first key any row of the tile sees: its first row's (the lower
    # bound grows with the position).
    p0 = tl.maximum(kv_len - q_len + row0 // GROUP, 0)
    if LOCAL == 1:
        base = tl.maximum(p0 - window_left, 0)
        row_lo = q_pos - window_left
    elif LOCAL == 2:
        base = p0 - p0 % chunk_size
        row_lo = q_pos - q_pos % chunk_size
    else:
        base = 0
    lo = base + split * kv_chunk
    hi = tl.minimum(kv_len, lo + kv_chunk)
    if CAUSAL:
        last_tok = tl.minimum(q_len - 1, (row0 + BLOCK_M - 1) // GROUP)
        hi = tl.minimum(hi, kv_len - q_len + last_tok + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(kv_indices + p_start + n // PAGE_SIZE, mask=n_ok, other=0)
        page_ok = (page >= 0) & (page < max_page)
        page = tl.where(page_ok, page, 0)
        seg = page // pages_per_segment
        pis = page - seg * pages_per_segment
        entry = table + seg * 4
        k_addr = tl.load(entry, mask=n_ok, other=0)
        v_addr = tl.load(entry + 1, mask=n_ok, other=0)
        n_ok = n_ok & page_ok & (k_addr != 0)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        tok_off = layer_off + pis * stride_page + (n % PAGE_SIZE) * stride_tok + kvh * stride_head
        k_base = tl.multiple_of(k_addr.to(tl.pointer_type(KV_DTYPE)), 16)
        v_base = tl.multiple_of(v_addr.to(tl.pointer_type(KV_DTYPE)), 16)
        off = tok_off[:, None] + d[None, :]
        k = _load_kv(k_base[:, None] + off, kv_mask, FP8, FP8_SOFTWARE, DOT_DTYPE, INTERPRET)
        v = _load_kv(v_base[:, None] + off, kv_mask, FP8, FP8_SOFTWARE, DOT_DTYPE, INTERPRET)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if FP8 != 0:
            s_off = scale_layer_off + pis * sstride_page + (n % PAGE_SIZE) * sstride_tok + kvh
            ks_base = tl.load(entry + 2, mask=n_ok, other=0).to(tl.pointer_type(tl.float32))
            vs_base = tl.load(entry + 3, mask=n_ok, other=0).to(tl.pointer_type(tl.float32))
            k_scale = tl.load(ks_base + s_off, mask=n_ok, other=0.0)
            v_scale = tl.load(vs_base + s_off, mask=n_ok, other=0.0)
            qk = qk * k_scale[None, :]
        if SOFTCAP:
            qk = softcap_out * _tanh(qk * softcap_in)
        else:
            qk = qk * sm_scale_log2
        keep = row_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            keep = keep & (n[None, :] <= q_pos[:, None])
        if LOCAL != 0:
            keep = keep & (n[None, :] >= row_lo[:, None])
        qk = tl.where(keep, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 instead so
        # exp2 gives 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP8 != 0:
            p = p * v_scale[None, :]
        if P_BF16:
            p = _round_to_bf16(p)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
    t64 = (q_start + tok).to(tl.int64)
    s64 = split.to(tl.int64)
    o_ptr = Out + s64 * stride_os + t64[:, None] * stride_ot + qh[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + s64 * stride_ls + t64 * stride_lt + qh, lse, mask=row_ok)


@triton.jit
def merge_states_kernel(
    V,
    stride_vs,
    stride_vn,
    S,
    stride_ss,
    stride_sn,
    Out,
    stride_on,
    LSE_OUT,
    num_states,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(N,)``: merge ``num_states`` partial results of row ``n``.

    ``V [num_states, N, HEAD_DIM]`` (float32 or any float), ``S [num_states, N]``
    natural-log LSEs (``-inf``: empty state) -> ``Out [N, HEAD_DIM]`` and
    ``LSE_OUT [N]``: ``Out = sum_i exp(S_i - S) V_i`` with ``S = log sum_i exp(S_i)``.
    """
    n = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # Pointers advance by the state stride (64-bit arithmetic, no overflow).
    s_ptr = S + n * stride_sn
    m = tl.load(s_ptr)
    for _ in range(1, num_states):
        s_ptr += stride_ss
        m = tl.maximum(m, tl.load(s_ptr))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_D], tl.float32)
    total = tl.sum(tl.zeros([BLOCK_D], tl.float32), axis=0)
    s_ptr = S + n * stride_sn
    v_ptr = V + n * stride_vn + d
    for _ in range(0, num_states):
        w = tl.exp(tl.load(s_ptr) - m_safe)
        v = tl.load(v_ptr, mask=d_ok, other=0.0).to(tl.float32)
        # An empty state (w = 0) contributes nothing, even if its V is NaN.
        acc += tl.where(w > 0, w * v, 0.0)
        total += w
        s_ptr += stride_ss
        v_ptr += stride_vs
    has = total > 0
    out = acc / tl.where(has, total, 1.0)
    tl.store(Out + n * stride_on + d, out.to(Out.dtype.element_ty), mask=d_ok)
    tl.store(LSE_OUT + n, tl.where(has, m_safe + tl.log(tl.where(has, total, 1.0)), float("-inf")))
