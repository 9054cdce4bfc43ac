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

__all__ = ["TierSplit", "merge_host", "split_by_tier", "stacked"]


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


def stacked(
    a: Part, b: Part
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(indptr, indices, kv_lens)`` of one table whose rows are ``a``'s
    requests then ``b``'s (``2 x batch`` rows)."""
    indptr = np.concatenate([a.indptr, a.indptr[-1] + b.indptr[1:]])
    return indptr, np.concatenate([a.indices, b.indices]), np.concatenate([a.kv_lens, b.kv_lens])


def shared_groups(part: Part) -> list[list[int]]:
    """Requests whose host pages are the same list (same pages, same order,
    same token count), in groups of two or more; ``[]`` when none share.

    Candidates are found in one vectorised pass over ``(pages, first page,
    last page, tokens)``; each candidate's list is then compared in full."""
    n = np.diff(part.indptr)
    live = np.flatnonzero(n > 0)
    if live.size < 2:
        return []
    starts = part.indptr[live]
    keys = np.stack(
        [n[live], part.indices[starts], part.indices[starts + n[live] - 1], part.kv_lens[live]],
        axis=1,
    )
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        return []
    groups: list[list[int]] = []
    for k in np.flatnonzero(counts > 1).tolist():
        members = live[inverse.reshape(-1) == k].tolist()
        while len(members) > 1:
            lead = members[0]
            pages = part.indices[part.indptr[lead] : part.indptr[lead + 1]]
            same = [
                r
                for r in members
                if np.array_equal(part.indices[part.indptr[r] : part.indptr[r + 1]], pages)
            ]
            if len(same) > 1:
                groups.append(same)
            members = [r for r in members if r not in same]
    return groups


def host_part(
    q32: torch.Tensor,
    pool: KVPool,
    layer: int,
    part: Part,
    *,
    sm_scale: float,
    soft_cap: float,
    groups: list[list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The native CPU kernel over the host pages: ``q32 [batch, q_heads,
    head_dim]`` float32 on the CPU; returns float32 ``(out, lse)`` on the CPU.

    Requests reading the same host pages (:func:`shared_groups`: follow-ups
    of one cached context) are one kernel row whose query heads are all of
    theirs, so each shared host page is read once per step for all of them,
    not once per request: a KV head's query heads become ``[requests x
    group]`` (the kernel's GQA tile reads each K/V block once for them all).
    ``groups``: :func:`shared_groups` of ``part`` if the caller has it.
    """
    from radixseg.kernels.cpu import paged_decode_cpu

    if groups is None:
        groups = shared_groups(part)
    if not groups:
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
    batch, q_heads, d = q32.shape
    kvh = pool.num_kv_heads
    g = q_heads // kvh
    out = torch.zeros(batch, q_heads, d, dtype=torch.float32)
    lse = torch.full((batch, q_heads), -torch.inf, dtype=torch.float32)
    grouped = {r for rows in groups for r in rows}
    alone = [r for r in range(batch) if r not in grouped and part.indptr[r + 1] > part.indptr[r]]
    # Each call takes rows of one query-head count: groups of equal size together.
    by_size: dict[int, list[list[int]]] = {}
    for rows in groups:
        by_size.setdefault(len(rows), []).append(rows)
    calls = [[[r] for r in alone]] if alone else []
    calls += list(by_size.values())
    for call in calls:
        m = len(call[0])
        lead = [rows[0] for rows in call]
        idx = torch.tensor([r for rows in call for r in rows])
        # [calls, m, kvh, g, d] -> [calls, kvh, m, g, d]: each KV head's
        # query heads are its g heads of every request of the group.
        q = q32[idx].view(len(call), m, kvh, g, d).transpose(1, 2)
        pages = [part.indices[part.indptr[r] : part.indptr[r + 1]] for r in lead]
        indptr = np.zeros(len(call) + 1, dtype=np.int64)
        np.cumsum([p.size for p in pages], out=indptr[1:])
        o, s = paged_decode_cpu(
            q.reshape(len(call), kvh * m * g, d),
            pool,
            layer,
            indptr,
            np.concatenate(pages),
            part.kv_lens[lead],
            sm_scale=sm_scale,
            soft_cap=soft_cap,
        )
        out[idx] = o.view(len(call), kvh, m, g, d).transpose(1, 2).reshape(-1, q_heads, d)
        lse[idx] = s.view(len(call), kvh, m, g).transpose(1, 2).reshape(-1, q_heads)
    return out, lse


def merge_host(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`radixseg.attention.merge_states` for two CPU partials, ``v
    [..., D]`` and ``s [...]``, in float32 numpy (a few µs at decode sizes,
    where the torch version's ~20 small ops cost ~100 µs). An empty state
    (``s = -inf``) contributes nothing whatever its ``v`` holds."""
    a = s_a.detach().float().numpy()
    b = s_b.detach().float().numpy()
    va = v_a.detach().float().numpy()
    vb = v_b.detach().float().numpy()
    m = np.maximum(a, b)
    m = np.where(np.isneginf(m), np.float32(0), m)
    with np.errstate(invalid="ignore"):
        wa = np.exp(a - m)
        wb = np.exp(b - m)
        total = wa + wb
        has = total > 0
        safe = np.where(has, total, np.float32(1))
        num = np.where(wa[..., None] > 0, wa[..., None] * va, np.float32(0))
        num += np.where(wb[..., None] > 0, wb[..., None] * vb, np.float32(0))
        v = num / safe[..., None]
        s = np.where(has, m + np.log(safe), np.float32(-np.inf))
    return torch.from_numpy(v.astype(np.float32, copy=False)), torch.from_numpy(
        s.astype(np.float32, copy=False)
    )
