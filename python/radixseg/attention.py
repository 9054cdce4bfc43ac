"""Attention that reads KV straight from a :class:`~radixseg.KVPool`'s segments.

Page tables use FlashInfer's CSR format (what :meth:`PrefixCache.page_table`
returns): request ``i`` owns the pages ``kv_indices[kv_indptr[i]:kv_indptr[i +
1]]``, in order, and the last of them holds ``kv_last_page_len[i]`` tokens, so
its KV length is ``(num_pages - 1) * page_size + kv_last_page_len[i]``. A
request's pages may sit in any segments; kernels resolve each page id to
(segment, page) themselves and load the segment's address from
:attr:`KVPool.segment_table`.

Backends: ``"triton"`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"cpu"`` (the native Rust kernels: decode, and
causal extend), ``"torch"`` (anywhere; the reference), ``"auto"`` (Triton on
CUDA, the native kernels on CPU tensors where they apply, else torch). On CUDA GPUs
before sm_89 (A100) and on ROCm, FP8 KV is decoded from its bits in software;
``fp8_software=True`` forces that path anywhere.

Log-sum-exp values (``lse``) are natural logarithms of the sum of
``exp(sm_scale * q.k)`` over the attended keys; a row that attends to nothing
has output 0 and ``lse = -inf``. With ``logits_soft_cap`` the scores summed
are the capped ones; ``window_left`` and ``chunk_size`` narrow the attended
keys (see :func:`decode`). :func:`merge_states` combines partial results
over disjoint KV sets; decode uses it to merge split-K partials, and a
sequence sharded across devices can be merged the same way.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import torch

from radixseg._core import InvalidArgument, InvalidHandle
from radixseg.kernels.torch_backend import merge_states_torch, paged_attention_torch

if TYPE_CHECKING:
    import numpy.typing as npt

    from radixseg.pool import KVPool
    from radixseg.tiers import TierSplit

__all__ = ["decode", "extend", "merge_states", "store_kv"]

Backend = Literal["auto", "triton", "torch", "cpu"]
_Q_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----- backend selection ----------------------------------------------------------------


def _interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET``), without importing Triton."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _resolve_backend(backend: Any, device: torch.device) -> str:
    """``"triton"``, ``"torch"`` or ``"cpu"`` (the native kernels: decode and
    causal extend; other operations run their torch implementation under it)."""
    if backend not in ("auto", "triton", "torch", "cpu"):
        raise InvalidArgument(
            f"backend must be 'auto', 'triton', 'torch' or 'cpu', got {backend!r}"
        )
    if backend == "torch":
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise InvalidArgument(f"backend='cpu' needs CPU tensors, got device {device}")
        return "cpu"
    from radixseg.kernels.launch import triton_available

    runnable = device.type == "cuda" or (device.type == "cpu" and _interpreting())
    if backend == "triton":
        if not triton_available():
            raise InvalidArgument("backend='triton' but Triton is not installed; use 'torch'")
        if not runnable:
            raise InvalidArgument(
                f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"set before radixseg's kernels are imported; got device {device}"
            )
        return "triton"
    if runnable and triton_available():
        return "triton"
    return "cpu" if device.type == "cpu" else "torch"


#: ``qo_indptr`` of a decode (one query row per request), sliced per call.
_ARANGE = np.arange(4097, dtype=np.int64)
_ARANGE.flags.writeable = False

# ----- argument checks ----------------------------------------------------------------------


def _is_sharded(pool: Any) -> bool:
    """Whether ``pool`` is a :class:`radixseg.distributed.ShardedKVPool` (whose
    page tables are virtual and whose attention is collective)."""
    from radixseg.distributed import ShardedKVPool

    return isinstance(pool, ShardedKVPool)


def _check_pool(pool: Any) -> KVPool:
    from radixseg.pool import KVPool

    if not isinstance(pool, KVPool):
        raise TypeError(f"pool must be a radixseg.KVPool, got {type(pool).__name__}")
    return pool


def _same_device(t: torch.Tensor, pool: KVPool, what: str) -> None:
    dev = pool.device
    if t.device.type != dev.type or (dev.index is not None and t.device.index != dev.index):
        raise InvalidArgument(f"{what} is on {t.device}, the pool on {dev}")


def _check_q(q: Any, pool: KVPool, what: str = "q") -> torch.Tensor:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype not in _Q_DTYPES:
        raise TypeError(f"{what} must be float16, bfloat16 or float32, got {q.dtype}")
    if q.dim() != 3:
        raise InvalidArgument(
            f"{what} must be 3-D [tokens, q_heads, head_dim], got shape {list(q.shape)}"
        )
    _, heads, dim = q.shape
    if dim != pool.head_dim:
        raise InvalidArgument(f"{what} has head_dim {dim}, the pool {pool.head_dim}")
    if heads == 0 or heads % pool.num_kv_heads:
        raise InvalidArgument(
            f"{what} has {heads} query heads, not a positive multiple of the pool's "
            f"num_kv_heads={pool.num_kv_heads} (grouped-query attention needs q_heads = "
            f"group * kv_heads)"
        )
    _same_device(q, pool, what)
    return q if q.stride(-1) == 1 else q.contiguous()


def _host_index(x: Any, what: str) -> npt.NDArray[np.int64]:
    """A 1-D int64 host copy of an integer array-like (tensor on any device, numpy, list)."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{what} must have an integer dtype, got {x.dtype}")
        if x.dim() != 1:
            raise InvalidArgument(f"{what} must be 1-D, got shape {list(x.shape)}")
        if x.device.type == "cpu":  # no device round trip: numpy converts (or shares) it
            return x.detach().numpy().astype(np.int64, copy=False)
        return x.detach().to("cpu", torch.int64).numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{what} must be a 1-D integer array: {e}") from None
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must have an integer dtype, got {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidArgument(f"{what} must be 1-D, got shape {list(arr.shape)}")
    return arr.astype(np.int64)


def _check_indptr(indptr: npt.NDArray[np.int64], n: int, what: str, length_of: str) -> None:
    if indptr.size != n + 1:
        raise InvalidArgument(f"{what} must have batch + 1 = {n + 1} entries, got {indptr.size}")
    if indptr[0] != 0:
        raise InvalidArgument(f"{what}[0] must be 0, got {int(indptr[0])}")
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        i = int(np.argmax(steps < 0))
        raise InvalidArgument(
            f"{what} must be non-decreasing: {what}[{i}] = {int(indptr[i])} > "
            f"{what}[{i + 1}] = {int(indptr[i + 1])}"
        )
    if indptr[-1] >= 2**31:
        raise InvalidArgument(f"{what}[-1] = {int(indptr[-1])} does not fit int32 ({length_of})")


class _PageTable:
    """Validated CSR page table: host copies for planning, int32 device copies for
    kernels (none when ``device`` is None). ``page_size``: tokens per page of the
    table, default the pool's (a sharded pool's tables count virtual pages)."""

    def __init__(
        self,
        pool: KVPool,
        batch: int,
        kv_indptr: Any,
        indptr: npt.NDArray[np.int64],
        kv_indices: Any,
        kv_last_page_len: Any,
        device: torch.device | None,
        check: bool,
        page_size: int | None = None,
    ) -> None:
        indices = _host_index(kv_indices, "kv_indices")
        last = _host_index(kv_last_page_len, "kv_last_page_len")
        _check_indptr(indptr, batch, "kv_indptr", "pages")
        if indptr[-1] > indices.size:
            raise InvalidArgument(
                f"kv_indptr[-1] = {int(indptr[-1])} pages, but kv_indices has only {indices.size}"
            )
        if last.size != batch:
            raise InvalidArgument(
                f"kv_last_page_len must have one entry per request ({batch}), got {last.size}"
            )
        n_pages = np.diff(indptr)
        ps = pool.page_size if page_size is None else page_size
        bad = (n_pages > 0) & ((last < 1) | (last > ps))
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidArgument(
                f"kv_last_page_len[{i}] = {int(last[i])} is outside 1..={ps} (page_size) for "
                f"request {i}, which has {int(n_pages[i])} page(s)"
            )
        used = indices[: int(indptr[-1])]
        if used.size:
            lo = int(used.min())
            if lo < 0:
                j = int(np.argmax(used < 0))
                raise InvalidHandle(f"kv_indices[{j}] = {lo} is not a page id (negative)")
            if check:
                try:
                    rc = pool.allocator.refcount(used)
                except InvalidHandle as e:
                    raise InvalidHandle(f"kv_indices: {e}") from None
                free = np.flatnonzero(rc.numpy() == 0)
                if free.size:
                    j = int(free[0])
                    raise InvalidHandle(
                        f"kv_indices[{j}] = page {int(used[j])} is free (refcount 0); attention "
                        f"reads only pages a request or the cache holds"
                    )
        self.kv_lens: npt.NDArray[np.int64] = np.where(n_pages > 0, (n_pages - 1) * ps + last, 0)
        self.indptr, self.indices = indptr, indices
        if device is None:
            return
        self.d_indptr = _device_int32(kv_indptr, indptr, device)
        self.d_indices = _device_int32(kv_indices, indices, device)
        self.d_last = _device_int32(kv_last_page_len, last, device)


def _device_int32(given: Any, host: npt.NDArray[np.int64], device: torch.device) -> torch.Tensor:
    """``given`` itself when it already is a contiguous int32 tensor on ``device``."""
    if (
        isinstance(given, torch.Tensor)
        and given.dtype == torch.int32
        and given.device == device
        and given.is_contiguous()
    ):
        return given
    t = torch.from_numpy(host.astype(np.int32))
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _check_scale(sm_scale: Any, head_dim: int) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"sm_scale must be a float, got {type(sm_scale).__name__}")
    if not math.isfinite(sm_scale):
        raise InvalidArgument(f"sm_scale must be finite, got {sm_scale}")
    return float(sm_scale)


def _check_splits(num_splits: Any) -> int | None:
    if num_splits is None:
        return None
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int or None, got {type(num_splits).__name__}")
    if not 1 <= num_splits <= 4096:
        raise InvalidArgument(f"num_splits must be in 1..=4096, got {num_splits}")
    return num_splits


def _check_local(
    window_left: Any, chunk_size: Any, logits_soft_cap: Any, *, decode: bool, causal: bool
) -> tuple[int, int, float]:
    """``(window_left, chunk_size, soft_cap)`` with ``-1``, ``0`` and ``0.0`` for "off"."""
    if isinstance(window_left, bool) or not isinstance(window_left, int):
        raise TypeError(f"window_left must be an int, got {type(window_left).__name__}")
    if window_left < -1:
        raise InvalidArgument(
            f"window_left must be >= -1 (-1: no window; W - 1 for a sliding window of W "
            f"keys), got {window_left}"
        )
    chunk = 0
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise InvalidArgument(f"chunk_size must be >= 1 (or None: no chunks), got {chunk_size}")
        chunk = chunk_size
    cap = 0.0
    if logits_soft_cap is not None:
        if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, (int, float)):
            raise TypeError(
                f"logits_soft_cap must be a float or None, got {type(logits_soft_cap).__name__}"
            )
        if not (math.isfinite(logits_soft_cap) and logits_soft_cap > 0):
            raise InvalidArgument(
                f"logits_soft_cap must be finite and > 0 (or None: no cap), got {logits_soft_cap}"
            )
        cap = float(logits_soft_cap)
    if window_left >= 0 and chunk:
        raise InvalidArgument(
            f"window_left={window_left} and chunk_size={chunk} both given; a layer has a "
            f"sliding window or chunks, not both"
        )
    if (window_left >= 0 or chunk) and not decode and not causal:
        raise InvalidArgument(
            "window_left and chunk_size need causal=True (they bound how far back a query "
            "looks from its own position)"
        )
    return window_left, chunk, cap


def _refuse_local_sharded(window_left: Any, chunk_size: Any, logits_soft_cap: Any) -> None:
    if window_left != -1 or chunk_size is not None or logits_soft_cap is not None:
        raise InvalidArgument(
            "windowed attention under context parallelism is not supported: window_left, "
            "chunk_size and logits_soft_cap need a KVPool, not a ShardedKVPool"
        )


# ----- attention -----------------------------------------------------------------------------


def _attention(
    q: Any,
    pool: Any,
    layer: Any,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    *,
    decode: bool,
    causal: bool,
    sm_scale: Any,
    num_splits: Any,
    fp8_software: bool | None,
    backend: Any,
    check: bool,
    window_left: Any = -1,
    chunk_size: Any = None,
    logits_soft_cap: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    pool = _check_pool(pool)
    q = _check_q(q, pool)
    layer = pool.check_layer(layer)
    scale = _check_scale(sm_scale, pool.head_dim)
    splits = _check_splits(num_splits)
    window, chunk, cap = _check_local(
        window_left, chunk_size, logits_soft_cap, decode=decode, causal=causal
    )
    local: dict[str, Any] = {"window_left": window, "chunk_size": chunk, "soft_cap": cap}
    chosen = _resolve_backend(backend, q.device)
    total_q = q.shape[0]
    if decode:
        batch = total_q
        qo_host = _ARANGE[: batch + 1] if batch < _ARANGE.size else np.arange(batch + 1)
    else:
        qo_host = _host_index(qo_indptr, "qo_indptr")
        batch = qo_host.size - 1
        if batch < 0:
            raise InvalidArgument("qo_indptr must have batch + 1 >= 1 entries, got 0")
    kv_host = _host_index(kv_indptr, "kv_indptr")
    if kv_host.size - 1 != batch:
        what = f"q has {batch} rows (one per request)" if decode else f"qo_indptr has {batch + 1}"
        raise InvalidArgument(
            f"kv_indptr has {kv_host.size} entries, but {what}: it needs batch + 1 = {batch + 1}"
        )
    if not decode:  # a decode's qo_indptr is 0..batch by construction
        _check_indptr(qo_host, batch, "qo_indptr", "query tokens")
        if qo_host[-1] != total_q:
            raise InvalidArgument(
                f"qo_indptr[-1] = {int(qo_host[-1])} must equal q.shape[0] = {total_q} "
                f"(the total of new tokens)"
            )
    # Only the Triton path reads int32 device copies of the table.
    table = _PageTable(
        pool,
        batch,
        kv_indptr,
        kv_host,
        kv_indices,
        kv_last_page_len,
        None if chosen in ("cpu", "torch") else q.device,
        check,
    )
    if decode and pool._host_sids:
        from radixseg.tiers import split_by_tier

        split = split_by_tier(pool, table.indptr, table.indices, table.kv_lens)
        if split is not None:
            if window >= 0 or chunk:
                raise InvalidArgument(
                    f"window_left={window} / chunk_size={chunk or None}: a decode whose pages "
                    f"span the device and host tiers runs without windows or chunks (they need "
                    f"positions the split does not keep); promote the segments first"
                )
            return _decode_tiers(
                q, pool, layer, split, scale, cap, splits, fp8_software, backend, chosen
            )
    if chosen == "cpu" and decode:
        from radixseg.kernels.cpu import paged_decode_cpu

        return paged_decode_cpu(
            q, pool, layer, table.indptr, table.indices, table.kv_lens, sm_scale=scale, **local
        )
    qo_lens = np.diff(qo_host)
    over = qo_lens > table.kv_lens
    # Only causal extend places the new tokens at the end of the KV; without a
    # mask, queries may outnumber keys (a sharded context's local part).
    if not decode and causal and over.any():
        i = int(np.argmax(over))
        raise InvalidArgument(
            f"request {i} has {int(qo_lens[i])} new tokens but only {int(table.kv_lens[i])} KV "
            f"tokens; store the new tokens' K/V in the pool (and count them in the page "
            f"table) before calling extend"
        )
    if chosen == "cpu" and causal:
        # Causal extend runs the native kernel; the non-causal local part of a
        # sharded (context-parallel) extend keeps its torch implementation.
        from radixseg.kernels.cpu import paged_extend_cpu

        return paged_extend_cpu(
            q,
            pool,
            layer,
            qo_host,
            table.indptr,
            table.indices,
            table.kv_lens,
            sm_scale=scale,
            **local,
        )
    if chosen in ("torch", "cpu"):
        return paged_attention_torch(
            q,
            pool,
            layer,
            qo_lens,
            table.indptr,
            table.indices,
            table.kv_lens,
            causal=causal,
            sm_scale=scale,
            **local,
        )
    from radixseg.kernels.paged_attention import paged_attention

    if decode:
        d_qo = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    else:
        d_qo = _device_int32(qo_indptr, qo_host, q.device)
    return paged_attention(
        q,
        pool,
        layer,
        d_qo,
        table.d_indptr,
        table.d_indices,
        table.d_last,
        qo_lens,
        table.kv_lens,
        causal=causal,
        sm_scale=scale,
        num_splits=splits,
        fp8_software=fp8_software,
        **local,
    )


def _decode_tiers(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    split: TierSplit,
    scale: float,
    cap: float,
    splits: int | None,
    fp8_software: bool | None,
    backend: Any,
    chosen: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode over pages in both tiers: the device backend over the device
    part, the native CPU kernel over the host part, merged by log-sum-exp in
    float32 (see :mod:`radixseg.tiers`)."""
    from radixseg.tiers import host_part, merge_host, shared_groups, stacked

    q32 = q.detach().float()
    # The query reaches the host before the device part is queued, so the
    # CPU part overlaps the device kernel (the copy waits only for q).
    q_host = q32 if q32.device.type == "cpu" else q32.to("cpu")
    dev = split.device
    groups = shared_groups(split.host)
    if chosen == "cpu" and not groups:
        # Both parts on the native kernel: one launch over the two parts as
        # 2 x batch rows, so the threads share out all their chunks (two
        # launches would each get half the items).
        from radixseg.kernels.cpu import paged_decode_cpu

        indptr, indices, kv_lens = stacked(dev, split.host)
        o, s = paged_decode_cpu(
            torch.cat([q32, q32]), pool, layer, indptr, indices, kv_lens, sm_scale=scale,
            soft_cap=cap,
        )  # fmt: skip
        n = q32.shape[0]
        out, lse = merge_host(o[:n], s[:n], o[n:], s[n:])
        return out.to(q.dtype), lse
    if chosen == "cpu":
        # The native kernel over the device part too: the split's tables are
        # already validated host arrays (no second _PageTable).
        from radixseg.kernels.cpu import paged_decode_cpu

        out_d, lse_d = paged_decode_cpu(
            q32, pool, layer, dev.indptr, dev.indices, dev.kv_lens, sm_scale=scale, soft_cap=cap
        )
    else:
        out_d, lse_d = _attention(
            q32,
            pool,
            layer,
            None,
            dev.indptr,
            dev.indices,
            dev.last,
            decode=True,
            causal=False,
            sm_scale=scale,
            num_splits=splits,
            fp8_software=fp8_software,
            backend=backend,
            check=False,
            logits_soft_cap=cap or None,
        )
    out_h, lse_h = host_part(
        q_host, pool, layer, split.host, sm_scale=scale, soft_cap=cap, groups=groups
    )
    if q.device.type == "cpu":
        out, lse = merge_host(out_d, lse_d, out_h, lse_h)
    else:
        out_h = out_h.to(q.device, non_blocking=True)
        lse_h = lse_h.to(q.device, non_blocking=True)
        out, lse = merge_states(out_d.float(), lse_d, out_h, lse_h)
    return out.to(q.dtype), lse


@overload
def decode(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    sm_scale: float | None = ...,
    return_lse: Literal[False] = ...,
    *,
    num_splits: int | None = ...,
    fp8_software: bool | None = ...,
    backend: Backend = ...,
    check: bool = ...,
    window_left: int = ...,
    chunk_size: int | None = ...,
    logits_soft_cap: float | None = ...,
) -> torch.Tensor: ...
@overload
def decode(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    sm_scale: float | None = ...,
    *,
    return_lse: Literal[True],
    num_splits: int | None = ...,
    fp8_software: bool | None = ...,
    backend: Backend = ...,
    check: bool = ...,
    window_left: int = ...,
    chunk_size: int | None = ...,
    logits_soft_cap: float | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def decode(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    sm_scale: float | None = None,
    return_lse: bool = False,
    *,
    num_splits: int | None = None,
    fp8_software: bool | None = None,
    backend: Backend = "auto",
    check: bool = True,
    window_left: int = -1,
    chunk_size: int | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One query token per request attending to all of the request's KV.

    Parameters
    ----------
    q : Tensor ``[batch, q_heads, head_dim]``
        float16, bfloat16 or float32, on the pool's device; ``q_heads`` a
        multiple of ``pool.num_kv_heads`` (query head ``h`` reads KV head
        ``h // (q_heads // num_kv_heads)``).
    pool : KVPool
    layer : int
    kv_indptr : int ``[batch + 1]``
        Request ``i``'s pages are ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]``.
    kv_indices : int ``[>= kv_indptr[-1]]``
        Page ids, allocated in ``pool``, in any segments.
    kv_last_page_len : int ``[batch]``
        Tokens in each request's last page, ``1..=page_size`` (ignored, and 0
        by convention, for a request with no pages).
    sm_scale : float, optional
        Softmax scale, default ``1 / sqrt(head_dim)``.
    return_lse : bool
        Also return the log-sum-exp.
    num_splits : int, optional
        Split-K factor (KV chunks per request, each its own program, merged by
        log-sum-exp). Default: enough programs to fill the GPU twice, at least
        256 tokens per split.
    fp8_software : bool, optional
        Decode FP8 KV from its bits (the sm_80 path). Default: by device.
    backend : "auto", "triton", "torch" or "cpu"
        ``"auto"``: Triton on CUDA tensors (or on CPU tensors under
        ``TRITON_INTERPRET=1``), else the native CPU kernel ``"cpu"`` (Rust,
        AVX-512 / AVX2 / NEON / scalar, ``torch.get_num_threads()`` threads, FP8
        decoded exactly). ``"torch"`` is the pure-torch implementation.
    check : bool
        Verify that every page is allocated (a refcount lookup per page).
        Bounds and CSR shapes are always checked; the CSR arrays are always
        read on the host to plan the launch.
    window_left : int
        Sliding window (FlashInfer's inclusive left window): the query at
        position ``p`` sees keys ``p - window_left <= k <= p``, so a window of
        ``W`` keys is ``window_left = W - 1``. ``-1`` (default): no window.
    chunk_size : int, optional
        Chunked local attention (Llama 4): the query at ``p`` sees keys ``k <=
        p`` with ``k // chunk_size == p // chunk_size``, chunks counted from
        position 0. Not together with ``window_left``.
    logits_soft_cap : float, optional
        Soft-capping (Gemma 2): scores become ``cap * tanh(sm_scale * q.k /
        cap)`` before the softmax; ``lse`` is over the capped scores.

        Pages wholly before the first key a query sees are not read: the cost
        of a windowed or chunked query is its window or chunk, not its context.
        None of the three works with a ``ShardedKVPool`` (``InvalidArgument``).

    Returns
    -------
    out : Tensor ``[batch, q_heads, head_dim]`` in q's dtype
    lse : Tensor ``[batch, q_heads]`` float32, natural log (with ``return_lse``)

    Examples
    --------
    Two requests in a pool with 4-token pages; the second request's 6 tokens
    fill page 1 and 2 tokens of page 2, so its ``kv_last_page_len`` is 2:

    >>> import torch, radixseg
    >>> pool = radixseg.KVPool(num_layers=1, num_kv_heads=1, head_dim=16, page_size=4,
    ...                        pages_per_segment=8)
    >>> pages = pool.alloc(3)                       # page ids 0, 1, 2
    >>> slots = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9])  # slot = page * 4 + offset
    >>> kv = torch.randn(9, 1, 16)
    >>> radixseg.attention.store_kv(pool, 0, slots, kv, kv)
    >>> kv_indptr = torch.tensor([0, 1, 3], dtype=torch.int32)
    >>> kv_indices = pages                          # [0, 1, 2]: request 0 -> [0], 1 -> [1, 2]
    >>> kv_last_page_len = torch.tensor([3, 2], dtype=torch.int32)
    >>> q = torch.randn(2, 4, 16)                   # 4 query heads share the KV head
    >>> out, lse = radixseg.attention.decode(q, pool, 0, kv_indptr, kv_indices,
    ...                                      kv_last_page_len, return_lse=True)
    >>> out.shape, lse.shape
    (torch.Size([2, 4, 16]), torch.Size([2, 4]))

    With a :class:`radixseg.distributed.ShardedKVPool` this is the collective
    :func:`radixseg.distributed.decode` (the page table is the virtual one).
    """
    if _is_sharded(pool):
        _refuse_local_sharded(window_left, chunk_size, logits_soft_cap)
        from radixseg.distributed import decode as sharded_decode

        return sharded_decode(
            q,
            pool,  # type: ignore[arg-type]
            layer,
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            sm_scale,
            return_lse,
            num_splits=num_splits,
            fp8_software=fp8_software,
            backend=backend,
            check=check,
        )
    out, lse = _attention(
        q,
        pool,
        layer,
        None,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        decode=True,
        causal=False,
        sm_scale=sm_scale,
        num_splits=num_splits,
        fp8_software=fp8_software,
        backend=backend,
        check=check,
        window_left=window_left,
        chunk_size=chunk_size,
        logits_soft_cap=logits_soft_cap,
    )
    return (out, lse) if return_lse else out


@overload
def extend(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    causal: bool = ...,
    sm_scale: float | None = ...,
    *,
    return_lse: Literal[False] = ...,
    num_splits: int | None = ...,
    fp8_software: bool | None = ...,
    backend: Backend = ...,
    check: bool = ...,
    window_left: int = ...,
    chunk_size: int | None = ...,
    logits_soft_cap: float | None = ...,
    k: torch.Tensor | None = ...,
    v: torch.Tensor | None = ...,
) -> torch.Tensor: ...
@overload
def extend(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    causal: bool = ...,
    sm_scale: float | None = ...,
    *,
    return_lse: Literal[True],
    num_splits: int | None = ...,
    fp8_software: bool | None = ...,
    backend: Backend = ...,
    check: bool = ...,
    window_left: int = ...,
    chunk_size: int | None = ...,
    logits_soft_cap: float | None = ...,
    k: torch.Tensor | None = ...,
    v: torch.Tensor | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def extend(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    causal: bool = True,
    sm_scale: float | None = None,
    *,
    return_lse: bool = False,
    num_splits: int | None = None,
    fp8_software: bool | None = None,
    backend: Backend = "auto",
    check: bool = True,
    window_left: int = -1,
    chunk_size: int | None = None,
    logits_soft_cap: float | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """New tokens of each request attending to its cached prefix and to each other.

    The new tokens of request ``i`` are rows ``qo_indptr[i]:qo_indptr[i + 1]``
    of ``q`` and are the **last** ``qo_len_i`` tokens of the request's KV: their
    K/V must already be stored in the pool (:func:`store_kv` or
    :meth:`KVPool.write`) and counted in the page table. New token ``j`` sits
    at KV position ``kv_len_i - qo_len_i + j`` and, with ``causal``, attends to
    positions up to its own. Prefill is the case ``qo_len_i == kv_len_i``;
    :func:`decode` is the case ``qo_len_i == 1``.

    Parameters
    ----------
    q : Tensor ``[total_q, q_heads, head_dim]``
        float16, bfloat16 or float32; ``total_q = qo_indptr[-1]``.
    qo_indptr : int ``[batch + 1]``
        Row offsets of each request's new tokens in ``q`` (starts at 0).
    kv_indptr, kv_indices, kv_last_page_len
        The page table covering prefix and new tokens, as in :func:`decode`.
    causal : bool
        Mask each new token's view of later new tokens. ``window_left`` and
        ``chunk_size`` need it.
    k, v : Tensor ``[total_q, kv_heads, head_dim]``, optional
        The new tokens' K/V. Only for a
        :class:`radixseg.distributed.ShardedKVPool`, where they are required:
        the call is then the collective :func:`radixseg.distributed.extend`
        (virtual page table; each rank stores only its share of the new tokens).

    Other parameters are those of :func:`decode`.

    Returns
    -------
    out : Tensor ``[total_q, q_heads, head_dim]`` in q's dtype
    lse : Tensor ``[total_q, q_heads]`` float32, natural log (with ``return_lse``)

    Examples
    --------
    A request with a 4-token cached prefix (page 0) gets 3 new tokens (page 1),
    whose K/V are stored first; row ``j`` of ``q`` is KV position ``4 + j``:

    >>> import torch, radixseg
    >>> pool = radixseg.KVPool(num_layers=1, num_kv_heads=1, head_dim=16, page_size=4,
    ...                        pages_per_segment=8)
    >>> pages = pool.alloc(2)
    >>> kv = torch.randn(7, 1, 16)
    >>> radixseg.attention.store_kv(pool, 0, torch.tensor([0, 1, 2, 3, 4, 5, 6]), kv, kv)
    >>> qo_indptr = torch.tensor([0, 3], dtype=torch.int32)
    >>> out = radixseg.attention.extend(torch.randn(3, 2, 16), pool, 0, qo_indptr,
    ...                                 torch.tensor([0, 2]), pages, torch.tensor([3]))
    >>> out.shape
    torch.Size([3, 2, 16])
    """
    if _is_sharded(pool):
        _refuse_local_sharded(window_left, chunk_size, logits_soft_cap)
        if k is None or v is None:
            raise InvalidArgument(
                "extend over a ShardedKVPool needs the new tokens' K/V: pass k= and v= "
                "([total_q, kv_heads, head_dim], the same on every rank)"
            )
        from radixseg.distributed import extend as sharded_extend

        return sharded_extend(
            q,
            pool,  # type: ignore[arg-type]
            layer,
            qo_indptr,
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            k,
            v,
            causal,
            sm_scale,
            return_lse=return_lse,
            num_splits=num_splits,
            fp8_software=fp8_software,
            backend=backend,
            check=check,
        )
    if k is not None or v is not None:
        raise InvalidArgument(
            "k/v are for a ShardedKVPool's extend; with a KVPool store the new tokens' K/V "
            "in the pool first (store_kv) and leave k and v unset"
        )
    out, lse = _attention(
        q,
        pool,
        layer,
        qo_indptr,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        decode=False,
        causal=causal,
        sm_scale=sm_scale,
        num_splits=num_splits,
        fp8_software=fp8_software,
        backend=backend,
        check=check,
        window_left=window_left,
        chunk_size=chunk_size,
        logits_soft_cap=logits_soft_cap,
    )
    return (out, lse) if return_lse else out


# ----- merge ---------------------------------------------------------------------------------


def merge_states(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results over disjoint KV sets by log-sum-exp.

    ``v_a``, ``v_b``: ``[..., head_dim]`` (same shape and device, any float
    dtype); ``s_a``, ``s_b``: ``[...]`` natural-log LSEs, ``-inf`` for an empty
    state. Returns ``(v [..., head_dim]`` in ``v_a``'s dtype, ``s [...]``
    float32): ``s = log(exp(s_a) + exp(s_b))`` and ``v = exp(s_a - s) v_a +
    exp(s_b - s) v_b`` — the attention over the union. Commutative and
    associative (up to rounding); an empty state is the identity.

    >>> import torch, math
    >>> v, s = merge_states(torch.ones(1, 2), torch.tensor([0.0]),
    ...                     torch.zeros(1, 2), torch.tensor([-math.inf]), backend="torch")
    >>> v, s
    (tensor([[1., 1.]]), tensor([0.]))
    """
    for name, t in (("v_a", v_a), ("s_a", s_a), ("v_b", v_b), ("s_b", s_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if v_a.dim() < 1 or tuple(v_a.shape[:-1]) != tuple(s_a.shape):
        raise InvalidArgument(
            f"v_a must be [..., head_dim] and s_a [...]: got {list(v_a.shape)} and "
            f"{list(s_a.shape)}"
        )
    if v_b.shape != v_a.shape or s_b.shape != s_a.shape:
        raise InvalidArgument(
            f"state b ({list(v_b.shape)}, {list(s_b.shape)}) must match state a "
            f"({list(v_a.shape)}, {list(s_a.shape)})"
        )
    devices = {t.device for t in (v_a, s_a, v_b, s_b)}
    if len(devices) > 1:
        raise InvalidArgument(f"states are on different devices: {sorted(map(str, devices))}")
    chosen = _resolve_backend(backend, v_a.device)
    if chosen in ("torch", "cpu") or v_a.numel() == 0:
        v, s = merge_states_torch(v_a, s_a, v_b, s_b)
        return v, s.float()
    from radixseg.kernels.paged_attention import plan_merge

    d = v_a.shape[-1]
    vs = torch.stack([v_a.reshape(-1, d), v_b.reshape(-1, d)])
    ss = torch.stack([s_a.reshape(-1), s_b.reshape(-1)]).float()
    if vs.stride(-1) != 1:
        vs = vs.contiguous()
    out = torch.empty((vs.shape[1], d), dtype=v_a.dtype, device=v_a.device)
    lse = torch.empty(vs.shape[1], dtype=torch.float32, device=v_a.device)
    plan_merge(vs, ss, out, lse)()
    return out.view(v_a.shape), lse.view(s_a.shape)


# ----- store ----------------------------------------------------------------------------------


def store_kv(
    pool: KVPool,
    layer: int,
    slots: Any,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    check: bool = True,
    backend: Backend = "auto",
) -> None:
    """Write ``k``, ``v`` at ``slots`` in one kernel, quantizing for FP8 pools.

    Same contract and same bytes as :meth:`KVPool.write`: ``slots`` int64
    ``[T]`` (``page_id * page_size + offset``, allocated pages only), ``k``,
    ``v`` ``[T, num_kv_heads, head_dim]`` of any float dtype. FP8 pools store
    :func:`radixseg.pool.quantize_fp8`'s codes and float32 scales bit for bit
    (NaN payloads aside); other pools store ``k.to(pool.dtype)``. ``check``
    validates slots and, for FP8, finiteness (host syncs). Slots must be
    distinct (as for ``KVPool.write``, which of two writes to one slot wins
    is unspecified). With a :class:`radixseg.distributed.ShardedKVPool`, rows
    whose slot is ``-1`` (tokens another rank stores) are skipped.
    """
    pool = _check_pool(pool)
    layer = pool.check_layer(layer)
    if _is_sharded(pool):
        # Slots of tokens another rank stores are -1: keep this rank's rows.
        slots, k, v = pool.owned(slots, k, v)  # type: ignore[attr-defined]
    slots_t = pool.check_slots(slots, check)
    k = pool.check_kv(k, slots_t.numel(), "k")
    v = pool.check_kv(v, slots_t.numel(), "v")
    chosen = _resolve_backend(backend, pool.device)
    if chosen in ("torch", "cpu") or slots_t.numel() == 0:
        pool.write(layer, slots_t, k, v, check=check)
        return
    if pool.fp8 and check and not bool(torch.isfinite(k).all() & torch.isfinite(v).all()):
        raise InvalidArgument("k/v hold inf or NaN, which FP8 with a scale cannot store")
    # Inputs the kernel does not load directly are converted as the torch path
    # would: FP8 pools quantize from float32, other pools convert straight.
    if pool.fp8:
        k = k if k.dtype in _Q_DTYPES else k.float()
        v = v if v.dtype in _Q_DTYPES else v.float()
    elif k.dtype != v.dtype or k.dtype not in _Q_DTYPES:
        k, v = k.to(pool.dtype), v.to(pool.dtype)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    from radixseg.kernels.store import plan_store

    plan_store(pool, layer, slots_t.to(pool.device).contiguous(), k, v)()
