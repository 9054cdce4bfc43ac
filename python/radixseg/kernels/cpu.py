"""Launchers of the native CPU decode and extend kernels
(``radixseg._core.decode_cpu`` and ``radixseg._core.extend_cpu``).

The kernel lives in its own Rust crate (``rust/radixseg-cpu``): it
reads each request's pages straight out of the segment buffers, decodes
FP8/bf16/fp16 with AVX-512 or AVX2 where the CPU has them, with NEON on
AArch64 (a portable scalar path elsewhere), runs an online softmax per chunk
of 4,096 tokens on ``threads`` threads and merges the chunks by log-sum-exp.
A sliding window (``window_left``) or a chunk size (``chunk_size``) limits
each query to the keys its mask reaches, and the kernel reads only their
pages; ``soft_cap`` caps the scores (Gemma 2), with a vector ``tanh``
accurate to 1e-6 relative.
The extend kernel runs several new rows per request (prefill, chunked
prefill over a cached prefix): work items of one (request, tile of query
rows, KV head) share each K/V block decoded among the tile's rows and
GQA heads, read only the pages the tile's causal/window/chunk mask
reaches, and give the same bits with any thread count.
The arguments are validated by :mod:`radixseg.attention` first and again,
cheaply, in Rust.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from radixseg._core import cpu_isas, decode_cpu, extend_cpu

if TYPE_CHECKING:
    import numpy.typing as npt

    from radixseg.pool import KVPool

__all__ = ["ISAS", "paged_decode_cpu", "paged_extend_cpu"]

#: Instruction sets the kernel can use on this CPU, widest first ("scalar" last).
ISAS: tuple[str, ...] = tuple(cpu_isas())

_FORMATS = {
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
}


_PoolAndQ = tuple[
    "list[npt.NDArray[np.uint8] | None]",
    "tuple[int, int, int, int]",
    int,
    int,
    int,
    int,
    str,
    "npt.NDArray[np.float32]",
    int,
]


def _pool_and_q(q: torch.Tensor, pool: KVPool, layer: int) -> _PoolAndQ:
    """The leading arguments both native kernels take: the pool's segments and
    geometry for ``layer``, then ``q`` as flat float32 and its head count."""
    _, q_heads, head_dim = q.shape
    return (
        pool.host_buffers(),
        pool.layout.layer_offsets(layer),
        pool.page_size,
        pool.pages_per_segment,
        pool.num_kv_heads,
        head_dim,
        _FORMATS[pool.dtype],
        q.detach().to(torch.float32).contiguous().reshape(-1).numpy(),
        q_heads,
    )


def paged_decode_cpu(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    kv_indptr: npt.NDArray[np.int64],
    kv_indices: npt.NDArray[np.int64],
    kv_lens: npt.NDArray[np.int64],
    *,
    sm_scale: float,
    threads: int | None = None,
    isa: str = "auto",
    window_left: int = -1,
    chunk_size: int = 0,
    soft_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``q [batch, q_heads, head_dim]`` (CPU) over ``pool``.

    Host arrays: ``kv_indptr [batch + 1]``, ``kv_indices`` page ids,
    ``kv_lens [batch]`` tokens. ``threads`` defaults to
    ``torch.get_num_threads()``. Returns ``(out [batch, q_heads, head_dim]``
    in q's dtype, ``lse [batch, q_heads]`` float32 natural log); requests
    without KV get 0 and ``-inf``.

    Request ``i``'s query sits at position ``p = kv_lens[i] - 1``. With
    ``window_left >= 0`` it sees keys ``>= p - window_left`` only
    (FlashInfer's inclusive left window: pass ``sliding_window - 1``), with
    ``chunk_size > 0`` keys ``>= chunk_size * (p // chunk_size)`` only (not
    both); pages before the first visible key are not read. ``soft_cap > 0``
    turns each score ``s`` (``sm_scale`` included) into
    ``soft_cap * tanh(s / soft_cap)`` before the softmax and the LSE. Bad
    values raise :class:`~radixseg.InvalidArgument`.
    """
    batch, q_heads, head_dim = q.shape
    out, lse, _ = decode_cpu(
        *_pool_and_q(q, pool, layer),
        np.ascontiguousarray(kv_indptr, dtype=np.int64),
        np.ascontiguousarray(kv_indices, dtype=np.int64),
        np.ascontiguousarray(kv_lens, dtype=np.int64),
        float(sm_scale),
        torch.get_num_threads() if threads is None else int(threads),
        isa,
        int(window_left),
        int(chunk_size),
        float(soft_cap),
    )
    o = torch.from_numpy(out).view(batch, q_heads, head_dim)
    return o.to(q.dtype), torch.from_numpy(lse).view(batch, q_heads)


def paged_extend_cpu(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    qo_indptr: npt.NDArray[np.int64],
    kv_indptr: npt.NDArray[np.int64],
    kv_indices: npt.NDArray[np.int64],
    kv_lens: npt.NDArray[np.int64],
    *,
    sm_scale: float,
    causal: bool = True,
    threads: int | None = None,
    isa: str = "auto",
    window_left: int = -1,
    chunk_size: int = 0,
    soft_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend attention of ``q [total_q, q_heads, head_dim]`` (CPU) over ``pool``.

    Host arrays: ``qo_indptr [batch + 1]`` (request ``i``'s new tokens are
    rows ``qo_indptr[i]:qo_indptr[i + 1]`` of ``q``), ``kv_indptr [batch +
    1]``, ``kv_indices`` page ids, ``kv_lens [batch]`` tokens, the new ones
    included (their K/V already in the pool). With ``causal`` row ``r`` of a
    request with ``qo`` new tokens sits at position ``kv_len - qo + r`` and
    sees keys up to its own, narrowed by ``window_left`` / ``chunk_size`` as
    in :func:`paged_decode_cpu`; ``soft_cap`` as there. ``threads``
    defaults to ``torch.get_num_threads()``. Returns ``(out [total_q,
    q_heads, head_dim]`` in q's dtype, ``lse [total_q, q_heads]`` float32
    natural log); rows that see no key get 0 and ``-inf``. Bad values raise
    :class:`~radixseg.InvalidArgument`.
    """
    total_q, q_heads, head_dim = q.shape
    out, lse, _ = extend_cpu(
        *_pool_and_q(q, pool, layer),
        np.ascontiguousarray(qo_indptr, dtype=np.int64),
        np.ascontiguousarray(kv_indptr, dtype=np.int64),
        np.ascontiguousarray(kv_indices, dtype=np.int64),
        np.ascontiguousarray(kv_lens, dtype=np.int64),
        float(sm_scale),
        bool(causal),
        torch.get_num_threads() if threads is None else int(threads),
        isa,
        int(window_left),
        int(chunk_size),
        float(soft_cap),
    )
    o = torch.from_numpy(out).view(total_q, q_heads, head_dim)
    return o.to(q.dtype), torch.from_numpy(lse).view(total_q, q_heads)
