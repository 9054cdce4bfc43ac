"""Launchers for paged attention (decode and extend) and the LSE merge.

``radixseg.attention`` validates every argument, then calls
:func:`paged_attention` with host copies of the CSR arrays. Planning happens
here: the work tiles (``BLOCK_M`` rows of (token, query head) per request),
the split-K factor that spreads long requests over enough programs, the dtype
the matrix products run in, and whether FP8 is decoded in software (CUDA
before sm_89 has no ``fp8e4nv``; AMD GPUs use another FP8 flavour).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from radixseg.kernels._paged_attention import merge_states_kernel, paged_attention_kernel
from radixseg.kernels.launch import Launch

if TYPE_CHECKING:
    import numpy.typing as npt

    from radixseg.pool import KVPool

__all__ = [
    "needs_fp8_software",
    "paged_attention",
    "plan_merge",
    "plan_paged_attention",
]

_TL_TYPES: dict[torch.dtype, Any] = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float8_e4m3fn: tl.float8e4nv,
    torch.float8_e5m2: tl.float8e5,
}
_FP8_CODES = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
#: Fewest KV tokens one split handles: below this, merging costs more than it saves.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 256


def needs_fp8_software(device: torch.device) -> bool:
    """Whether FP8 KV must be decoded from its bits on ``device``: CUDA below
    sm_89 (Triton offers no ``fp8e4nv`` there) and ROCm. CPU (the interpreter)
    decodes in hardware-style ``fp8`` loads."""
    if device.type != "cuda":
        return False
    if torch.version.hip is not None:
        return True
    return torch.cuda.get_device_capability(device) < (8, 9)


def _dot_dtype(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> torch.dtype:
    """The dtype both matrix products run in (fp32 accumulation).

    FP8 values are exact in fp16 and bf16, so with FP8 storage the products
    run in the query's dtype and lose nothing on K; otherwise the query's
    dtype if the storage matches it, else float32 (IEEE, not TF32).
    """
    if q_dtype == torch.float32:
        return torch.float32
    if kv_dtype in _FP8_CODES or kv_dtype == q_dtype:
        return q_dtype
    return torch.float32


def _interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` was built by Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return not hasattr(kernel, "cache_key")


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 1


def _tiles(
    qo_lens: npt.NDArray[np.int64], group: int, block_m: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """``(tile_req, tile_row)``: each request's rows ``0..qo_len*group`` cut into
    ``block_m``-row tiles, in request order."""
    n_tiles = -(-qo_lens * group // block_m)
    tile_req = np.repeat(np.arange(qo_lens.size, dtype=np.int32), n_tiles)
    first = np.cumsum(n_tiles) - n_tiles
    tile_row = (np.arange(tile_req.size) - np.repeat(first, n_tiles)) * block_m
    return tile_req, tile_row.astype(np.int32)


def _spans(
    qo_lens: npt.NDArray[np.int64],
    kv_lens: npt.NDArray[np.int64],
    window_left: int,
    chunk_size: int,
) -> npt.NDArray[np.int64]:
    """KV tokens each request's splits cover: from the first key its first new
    token sees (a window or chunk start, else 0) to ``kv_len``."""
    p0 = np.maximum(kv_lens - qo_lens, 0)
    if window_left >= 0:
        first = np.maximum(p0 - window_left, 0)
    elif chunk_size > 0:
        first = p0 - p0 % chunk_size
    else:
        return kv_lens
    spans: npt.NDArray[np.int64] = kv_lens - first
    return spans


def plan_paged_attention(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    qo_lens: npt.NDArray[np.int64],
    kv_lens: npt.NDArray[np.int64],
    *,
    causal: bool,
    sm_scale: float,
    num_splits: int | None = None,
    fp8_software: bool | None = None,
    window_left: int = -1,
    chunk_size: int = 0,
    soft_cap: float = 0.0,
) -> tuple[Launch | None, Launch | None, torch.Tensor, torch.Tensor]:
    """Plan the attention launch and, with split-K, the merge launch.

    ``qo_indptr``, ``kv_*`` are int32 on ``q``'s device; ``qo_lens`` and
    ``kv_lens`` their host-side per-request lengths. Returns ``(attention,
    merge, out, lse)``, where ``out [total_q, q_heads, head_dim]`` (q's dtype)
    and ``lse [total_q, q_heads]`` (float32, natural log) are what the
    launches fill; ``attention`` is ``None`` when there is nothing to compute.

    ``window_left >= 0`` (sliding window), ``chunk_size > 0`` (chunked local
    attention) and ``soft_cap > 0`` are :func:`radixseg.attention.decode`'s
    ``window_left``, ``chunk_size`` and ``logits_soft_cap``. With a window or
    chunks, splits cover only the keys from a request's first visible one.
    """
    total_q, q_heads, head_dim = q.shape
    kv_heads = pool.num_kv_heads
    group = q_heads // kv_heads
    device = q.device
    out = torch.empty_like(q)
    lse = torch.empty((total_q, q_heads), dtype=torch.float32, device=device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    max_qo = int(qo_lens.max()) if qo_lens.size else 0
    block_m = min(64, max(16, triton.next_power_of_2(max(1, max_qo * group))))
    block_n = 64 if block_d <= 128 else 32
    tile_req, tile_row = _tiles(qo_lens, group, block_m)
    if tile_req.size == 0:
        return None, None, out, lse

    # Split-K: enough programs to fill the device twice over, but no split
    # shorter than MIN_SPLIT_TOKENS.
    max_kv = int(_spans(qo_lens, kv_lens, window_left, chunk_size)[qo_lens > 0].max())
    if num_splits is None:
        want = -(-2 * _sm_count(device) // (tile_req.size * kv_heads))
        num_splits = max(1, min(want, -(-max_kv // MIN_SPLIT_TOKENS), MAX_SPLITS))
    kv_chunk = max(block_n, -(-max(max_kv, 1) // num_splits))
    kv_chunk = -(-kv_chunk // block_n) * block_n
    num_splits = max(1, -(-max_kv // kv_chunk))

    if num_splits == 1:
        o_buf, l_buf = out, lse
        stride_os = stride_ls = 0
    else:
        o_buf = torch.empty(
            (num_splits, total_q, q_heads, head_dim), dtype=torch.float32, device=device
        )
        l_buf = torch.empty((num_splits, total_q, q_heads), dtype=torch.float32, device=device)
        stride_os, stride_ls = o_buf.stride(0), l_buf.stride(0)

    fp8 = _FP8_CODES.get(pool.dtype, 0)
    if fp8_software is None:
        fp8_software = needs_fp8_software(device)
    software = bool(fp8 and fp8_software)
    dot = _dot_dtype(q.dtype, pool.dtype)
    interpret = _interpreted(paged_attention_kernel)
    # The interpreter's tl.dot cannot take bf16: run it in fp32 on the same
    # (exact) operands, with P rounded to bf16 as the GPU's product would.
    p_bf16 = interpret and dot == torch.bfloat16
    if p_bf16:
        dot = torch.float32
    table = pool.segment_table
    attention = Launch(
        kernel=paged_attention_kernel,
        grid=(int(tile_req.size), kv_heads, num_splits),
        args={
            "Q": q,
            "stride_qt": q.stride(0),
            "stride_qh": q.stride(1),
            "Out": o_buf,
            "stride_os": stride_os,
            "stride_ot": o_buf.stride(-3),
            "stride_oh": o_buf.stride(-2),
            "LSE": l_buf,
            "stride_ls": stride_ls,
            "stride_lt": l_buf.stride(-2),
            "table": table,
            "max_page": min(table.shape[0] * pool.pages_per_segment, 2**31 - 1),
            "qo_indptr": qo_indptr,
            "kv_indptr": kv_indptr,
            "kv_indices": kv_indices,
            "kv_last_page_len": kv_last_page_len,
            "tile_req": torch.from_numpy(tile_req).to(device),
            "tile_row": torch.from_numpy(tile_row).to(device),
            **pool.layout.launch_args(layer),
            "sm_scale_log2": float(sm_scale * math.log2(math.e)),
            "kv_chunk": kv_chunk,
            "window_left": int(window_left),
            "chunk_size": max(1, int(chunk_size)),
            "softcap_in": float(sm_scale / soft_cap) if soft_cap > 0 else 0.0,
            "softcap_out": float(soft_cap * math.log2(math.e)),
        },
        constexprs={
            "GROUP": group,
            "HEAD_DIM": head_dim,
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_D": block_d,
            "PAGE_SIZE": pool.page_size,
            "KV_DTYPE": tl.uint8 if software else _TL_TYPES[pool.dtype],
            "FP8": fp8,
            "FP8_SOFTWARE": software,
            "DOT_DTYPE": _TL_TYPES[dot],
            "DOT_PRECISION": "ieee" if dot == torch.float32 else "tf32",
            "CAUSAL": bool(causal),
            "LOCAL": 1 if window_left >= 0 else 2 if chunk_size > 0 else 0,
            "SOFTCAP": soft_cap > 0,
            "P_BF16": p_bf16,
            "INTERPRET": interpret,
        },
        options={"num_warps": 4, "num_stages": 2, "enable_fp_fusion": True},
    )
    merge = None
    if num_splits > 1:
        merge = plan_merge(
            o_buf.view(num_splits, -1, head_dim),
            l_buf.view(num_splits, -1),
            out.view(-1, head_dim),
            lse.view(-1),
        )
    return attention, merge, out, lse


def plan_merge(v: torch.Tensor, s: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> Launch:
    """Merge ``v [S, N, D]`` / ``s [S, N]`` (last dim of v contiguous) into
    ``out [N, D]`` / ``lse [N]`` (contiguous)."""
    head_dim = v.shape[-1]
    return Launch(
        kernel=merge_states_kernel,
        grid=(v.shape[1],),
        args={
            "V": v,
            "stride_vs": v.stride(0),
            "stride_vn": v.stride(1),
            "S": s,
            "stride_ss": s.stride(0),
            "stride_sn": s.stride(1),
            "Out": out,
            "stride_on": out.stride(0),
            "LSE_OUT": lse,
            "num_states": v.shape[0],
        },
        constexprs={"HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim)},
        options={"num_warps": 4, "enable_fp_fusion": True},
    )


def paged_attention(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    qo_lens: npt.NDArray[np.int64],
    kv_lens: npt.NDArray[np.int64],
    *,
    causal: bool,
    sm_scale: float,
    num_splits: int | None = None,
    fp8_software: bool | None = None,
    window_left: int = -1,
    chunk_size: int = 0,
    soft_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan and run; returns ``(out, lse)``. Rows of requests with no KV get
    output 0 and LSE ``-inf``."""
    attention, merge, out, lse = plan_paged_attention(
        q,
        pool,
        layer,
        qo_indptr,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        qo_lens,
        kv_lens,
        causal=causal,
        sm_scale=sm_scale,
        num_splits=num_splits,
        fp8_software=fp8_software,
        window_left=window_left,
        chunk_size=chunk_size,
        soft_cap=soft_cap,
    )
    if attention is not None:
        attention()
    if merge is not None:
        merge()
    return out, lse
