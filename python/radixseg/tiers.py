"""Decode over a pool whose segments sit in two tiers: attention computed where the KV lives.

A :class:`~radixseg.KVPool` with ``host_budget_bytes`` keeps cold segments in
host memory (pinned on CUDA). A decode step does not copy them back: each
request's pages are split by tier, the device backend (Triton, or the torch
reference on a CPU-only machine) runs over the device pages, the native CPU
kernel over the host pages, and the two partial results merge by
log-sum-exp (:func:`radixseg.attention.merge_states`), which is exact: the
softmax over the union of two disjoint key sets. Only the query (host-bound)
and the host part's ``(out, lse)`` (device-bound) cross the bus.

On CUDA the query is copied to the host before the device kernel is queued, so
the CPU part runs while the GPU computes its part; nothing waits for the
whole device (no ``torch.cuda.synchronize``).

Decode over ``n`` keys is a softmax over a set: the order of pages does not
matter, so the split needs no positions. Windows and chunks do depend on
positions; :func:`radixseg.attention.decode` refuses them on split tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    import numpy.typing as npt

    from radixseg.pool import KVPool

__all__ = ["TierSplit", "split_by_tier"]


class Part(NamedTuple):
    """One tier's CSR page table: ``indptr [batch + 1]``, ``indices``,
    ``kv_lens [batch]`` tokens and ``last [batch]`` (tokens in each request's
    last page of this part; 0 for a request with none), all int64 host arrays."""

    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int64]
    kv_lens: npt.NDArray[np.int64]
    last: npt.NDArray[np.int64]


class TierSplit(NamedTuple):
    """A page table split by tier (see :func:`split_by_tier`)."""

    device: Part
    host: Part


def split_by_tier(
    pool: KVPool,
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int64],
    kv_lens: npt.NDArray[np.int64],
) -> TierSplit | None:
    """Split a validated CSR table (host arrays) into its device and host
    pages, each request's pages keeping their order; ``None`` when no page in
    use is in the host tier (the common case: one vectorised lookup).

    A request's last page (partly filled: ``kv_lens`` says how much) counts
    its real tokens in the part that holds it; every other page is full.
    """
    used = indices[: int(indptr[-1])]
    if not pool._host_sids or used.size == 0:
        return None
    on_host = pool.tier_of(used).astype(bool)
    if not on_host.any():
        return None
    batch = indptr.size - 1
    ps = pool.page_size
    n_pages = np.diff(indptr)
    req = np.repeat(np.arange(batch), n_pages)
    has = n_pages > 0
    # Tokens short of a full page in each request's last page.
    short = np.where(has, n_pages * ps - kv_lens, 0)
    last_on_host = np.zeros(batch, dtype=bool)
    last_on_host[has] = on_host[indptr[1:][has] - 1]

    def part(mask: npt.NDArray[np.bool_], holds_last: npt.NDArray[np.bool_]) -> Part:
        counts = np.bincount(req[mask], minlength=batch).astype(np.int64)
        p_indptr = np.zeros(batch + 1, dtype=np.int64)
        np.cumsum(counts, out=p_indptr[1:])
        lens = counts * ps - np.where(holds_last & has, short, 0)
        last = np.where(counts > 0, lens - (counts - 1) * ps, 0)
        return Part(p_indptr, np.ascontiguousarray(used[mask]), lens, last)

    return TierSplit(part(~on_host, ~last_on_host), part(on_host, last_on_host))


def host_part(
    q32: torch.Tensor,
    pool: KVPool,
    layer: int,
    part: Part,
    *,
    sm_scale: float,
    soft_cap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The native CPU kernel over the host pages: ``q32 [batch, q_heads,
    head_dim]`` float32 on the CPU; returns float32 ``(out, lse)`` on the CPU."""
    from radixseg.kernels.cpu import paged_decode_cpu

    return paged_decode_cpu(
        q32,
        pool,
        layer,
        part.indptr,
        part.indices,
        part.kv_lens,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
    )
