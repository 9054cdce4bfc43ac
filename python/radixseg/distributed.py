"""Context parallelism: one sequence's KV sharded over the ranks of a ``torch.distributed`` group.

A context longer than one device's memory is stored on ``R`` ranks, each
holding ``1/R`` of it, and attention over it equals the single-device result.
The distributed engine is ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Placement (vLLM's decode context parallelism with an interleave of one page):
the prefix tree and the allocator count **virtual pages** of ``V = P * R``
tokens (``P`` = ``page_size``); rank ``r`` stores the tokens ``[r*P,
(r+1)*P)`` of every virtual page in its own :class:`ShardedKVPool` of page
size ``P``, under the **same page id**. So:

* page ids stay global: every rank allocates the same ids, the tree, its
  namespaces, eviction and the page tables are those of one device, and a
  page table (``PrefixCache.page_table``) means the same on every rank;
* rank ``r`` holds ``L_r = (L // V) * P + clamp(L % V - r*P, 0, P)`` of a
  sequence's ``L`` tokens, always in the first ``ceil(L_r / P)`` of its pages;
  a rank may hold none of a short sequence (an empty partial, ``lse = -inf``);
* a page id costs one ``P``-token page on every rank, even where a partly
  filled virtual page has no token for that rank yet.

What is replicated: the scheduler's decisions. Every rank runs its own
:class:`ShardedPrefixCache` (tree + allocator) and must make the same calls
in the same order with the same arguments; both are deterministic (the tree's
LRU runs on a logical clock), so they stay identical. Growth is collective (a
segment is added on every rank or on none, and a device that refuses memory
on one rank fails the growth on all), and with ``verify=True`` (default)
every state-changing call first compares a digest of its arguments and of the
cache's state across ranks: different prompts on two ranks raise
:class:`RankMismatch` on all of them, before anything changes.

Attention: every rank holds the whole query; :func:`decode` runs the existing
kernel over the rank's pages, all-gathers one packed fp32 ``[T, H, D + 1]``
buffer (output and log-sum-exp) and merges the partials in rank order, so
every rank gets the same bits. :func:`extend` does the same for the cached
context (no mask needed: every context key precedes every new query) and
computes the new tokens' causal part locally from their K/V, which every rank
has (it computed them), then merges the two.

Usage, one process per rank::

    dist.init_process_group("gloo")            # or "nccl", one GPU per rank
    pool = ShardedKVPool(layers, kv_heads, head_dim, page_size=16)
    cache = ShardedPrefixCache(pool)           # the same calls on every rank
    req = cache.begin(prompt); slots = cache.extend(req, req.uncached)
    attention.store_kv(pool, layer, slots, k, v)       # keeps this rank's tokens
    out = attention.decode(q, pool, layer, *cache.page_table([req]))
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radixseg._convert import as_id_array
from radixseg._core import InvalidArgument
from radixseg.cache import PrefixCache, Request
from radixseg.kernels.torch_backend import dense_attention_torch, merge_states_torch
from radixseg.pool import KVPool, _GrowthFailed, dequantize_fp8, quantize_fp8

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "RankMismatch",
    "ShardLayout",
    "ShardedKVPool",
    "ShardedPrefixCache",
    "decode",
    "extend",
]


class RankMismatch(InvalidArgument):
    """The ranks of a sharded pool were given different calls or arguments, or
    their caches diverged; raised on every rank, before anything changed."""


# ----- placement -------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardLayout:
    """Where rank ``rank`` of ``ranks`` keeps its tokens (pure arithmetic).

    >>> s = ShardLayout(page_size=4, ranks=2, rank=1)
    >>> s.local_lens(np.array([3, 4, 5, 8, 9, 13])).tolist()  # rank 1: tokens 4..7, 12..15, ...
    [0, 0, 1, 4, 4, 5]
    """

    page_size: int
    ranks: int
    rank: int

    @property
    def virtual_page_size(self) -> int:
        """Tokens of one page id: ``page_size * ranks``."""
        return self.page_size * self.ranks

    def local_lens(self, seq_lens: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Tokens this rank holds of sequences of ``seq_lens`` tokens."""
        p, v = self.page_size, self.virtual_page_size
        lens = np.asarray(seq_lens, dtype=np.int64)
        return np.asarray((lens // v) * p + np.clip(lens % v - self.rank * p, 0, p))

    def owner(self, positions: torch.Tensor) -> torch.Tensor:
        """Rank that stores each token position."""
        return (positions % self.virtual_page_size) // self.page_size

    def local_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Virtual slots (``page_id * V + offset``, what the tree's requests
        return) -> this rank's slots (``page_id * P + offset % P``), ``-1``
        where another rank owns the token (vLLM's pad-slot convention)."""
        v, p = self.virtual_page_size, self.page_size
        off = slots % v
        local = (slots // v) * p + off % p
        return torch.where(off // p == self.rank, local, torch.full_like(local, -1))

    def local_table(
        self,
        indptr: npt.NDArray[np.int64],
        indices: npt.NDArray[np.int64],
        seq_lens: npt.NDArray[np.int64],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """This rank's CSR for requests of ``seq_lens`` tokens over the virtual
        CSR ``indptr``/``indices``: ``(indptr, indices, last_page_len)``."""
        lens = self.local_lens(seq_lens)
        n = -(-lens // self.page_size)
        counts = np.diff(indptr)
        at = np.arange(int(indptr[-1]), dtype=np.int64) - np.repeat(indptr[:-1], counts)
        keep = at < np.repeat(n, counts)
        local_indptr = np.zeros(lens.size + 1, dtype=np.int64)
        np.cumsum(n, out=local_indptr[1:])
        last = np.where(n > 0, lens - (n - 1) * self.page_size, 0)
        return local_indptr, indices[: int(indptr[-1])][keep], last


# ----- the process group -------------------------------------------------------------------


class _Group:
    """The collectives radixseg issues, with the bytes they move counted."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidArgument(
                "ShardedKVPool needs torch.distributed: call "
                "torch.distributed.init_process_group(...) on every rank first"
            )
        self.dist = dist
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise InvalidArgument("this process is not a member of the given process group")
        backend = str(dist.get_backend(self.group)).lower()
        #: Where collective buffers live: NCCL moves CUDA tensors only.
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend
            else torch.device("cpu")
        )
        self.calls = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """All-gather ``t`` (same shape on every rank) -> one tensor per rank, in rank order."""
        # gloo aborts on zero-element tensors: send one padding element.
        empty = t.numel() == 0
        send = (torch.zeros(1, dtype=t.dtype) if empty else t.contiguous()).to(self.device)
        parts = [torch.empty_like(send) for _ in range(self.size)]
        self.dist.all_gather(parts, send, group=self.group)
        nbytes = send.numel() * send.element_size()
        self.calls += 1
        self.bytes_sent += nbytes
        self.bytes_received += nbytes * (self.size - 1)
        if empty:
            return [t.new_empty(t.shape) for _ in parts]
        return [p.to(t.device) for p in parts]

    def gather_ints(self, values: Sequence[int]) -> npt.NDArray[np.int64]:
        """``[ranks, len(values)]`` int64: every rank's ``values``."""
        t = torch.tensor(list(values), dtype=torch.int64)
        return torch.stack(self.gather(t)).cpu().numpy()


def _digest(*parts: Any) -> int:
    """A signed 64-bit digest of ints, strings, arrays and tensors."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().numpy()
        if isinstance(p, np.ndarray):
            if p.dtype.kind in "iub":
                p = p.astype(np.int64)  # int32 on one rank, int64 on another: equal
            h.update(str(p.dtype).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little", signed=True)


# ----- the pool ----------------------------------------------------------------------------


class ShardedKVPool(KVPool):
    """A :class:`KVPool` holding rank ``r``'s share of every virtual page.

    Parameters are :class:`KVPool`'s (``page_size`` is the stored page,
    ``P``), plus:

    group : ``torch.distributed`` process group, optional
        The ranks that share each sequence (default: the whole world). Every
        rank builds its pool with the same arguments (checked).
    verify : bool
        Compare a digest of every state-changing cache call across ranks
        before it runs (one all-gather of 8 bytes per rank and call); raise
        :class:`RankMismatch` on all ranks when they differ.

    The allocator and the tree count virtual pages of ``page_size * ranks``
    tokens (``virtual_page_size``, at most 1024). A growth is collective: a
    segment is added on every rank or on none, so ``alloc``, ``shrink``, and
    every call of a :class:`ShardedPrefixCache` over this pool must be made on
    every rank in the same order. Memory per rank is ``1/R`` of one device's
    for the same tokens, plus at most one partly filled page per request.
    ``stats()`` is this rank's; :meth:`stats_all` gathers every rank's and
    their sums.
    """

    def __init__(self, *args: Any, group: Any = None, verify: bool = True, **kwargs: Any) -> None:
        self.comm = _Group(group)
        self.rank = self.comm.rank
        self.ranks = self.comm.size
        self.verify = bool(verify)
        try:
            super().__init__(*args, **kwargs)
        except BaseException as e:
            # The other ranks are about to compare geometries: join them with a
            # digest none of them can have, so they raise instead of waiting.
            with contextlib.suppress(RankMismatch):
                self.check_agreement("ShardedKVPool(...)", "failed on this rank", repr(e))
            raise
        self.shard = ShardLayout(self.page_size, self.ranks, self.rank)
        self.virtual_page_size = self.shard.virtual_page_size
        # Every rank must agree on the geometry, or page ids mean different bytes.
        self.check_agreement(
            "ShardedKVPool(...)",
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.page_size,
            str(self.dtype),
            self.pages_per_segment,
            self.allocator.max_segments,
        )

    def _tokens_per_page_id(self, page_size: int) -> int:
        v = page_size * self.ranks
        if v > 1024:
            raise InvalidArgument(
                f"page_size * ranks = {page_size} * {self.ranks} = {v} tokens per virtual page, "
                f"past the allocator's 1024; lower page_size to at most "
                f"{max(1, 1024 // self.ranks)}"
            )
        return v

    # ----- agreement ---------------------------------------------------------------

    def check_agreement(self, what: str, *parts: Any) -> None:
        """Collective: raise :class:`RankMismatch` on every rank unless every rank
        passed equal ``parts`` (ints, strings, arrays, tensors) for ``what``."""
        digests = self.comm.gather_ints([_digest(what, *parts)])[:, 0]
        if (digests != digests[0]).any():
            odd = [r for r in range(self.ranks) if digests[r] != digests[0]]
            raise RankMismatch(
                f"{what}: ranks {odd} were given different arguments or hold a different cache "
                f"state than rank 0 (digests {[f'{int(d) & (2**64 - 1):016x}' for d in digests]}); "
                f"every rank of a sharded pool must make the same calls with the same arguments "
                f"in the same order. Nothing was changed."
            )

    def _state(self) -> tuple[int, int]:
        """What a state-changing call's digest covers of the pool."""
        return self.allocator.segment_count(), self.allocator.free_pages()

    # ----- collective growth ---------------------------------------------------------

    def room_segments(self, need: int | None = None) -> int:
        """Collective: the fewest segments any rank's budget (or device) allows."""
        room = super().room_segments(need)
        return int(self.comm.gather_ints([room]).min())

    def _grow(self, n_segments: int) -> list[int]:
        failure: _GrowthFailed | None = None
        other: BaseException | None = None
        added: list[int] = []
        try:
            added = super()._grow(n_segments)
        except _GrowthFailed as e:
            failure = e
        except BaseException as e:
            # An interrupt or a bad buffer: still join the agreement (as a
            # failure), so the other ranks fail this growth instead of waiting.
            other = e
        # 0: grew, 1: the device refused, 2: anything else (interrupt, bug).
        code = 2 if other is not None else int(failure is not None)
        try:
            codes = self.comm.gather_ints([code])[:, 0]
        except BaseException:
            self._abandon_growth(added)  # interrupted in the collective: all or none here
            raise
        if other is not None:
            raise other
        if not codes.any():
            return added
        # Some rank failed: this growth fails on every rank, and the ranks that
        # grew give their new segments back.
        self._abandon_growth(added)
        gone = [r for r in range(self.ranks) if codes[r] == 2]
        if gone:
            # Those ranks left the call; going on to evict or to report would
            # wait for them in collectives they never join. Leave now.
            raise RankMismatch(
                f"rank(s) {gone} of {self.ranks} raised while adding segments (an interrupt or "
                f"an error other than the device refusing memory) and left the call; this "
                f"rank's growth was undone and nothing was changed"
            )
        if failure is not None:
            raise failure
        bad = [r for r in range(self.ranks) if codes[r]]
        cause = RuntimeError(
            f"rank(s) {bad} of {self.ranks} failed to add a {self.segment_bytes:,}-byte segment"
        )
        raise _GrowthFailed(0, cause) from cause

    # ----- storage ---------------------------------------------------------------------

    def owned(
        self, slots: Any, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows of ``slots``, ``k``, ``v`` this rank stores (slot ``>= 0``)."""
        s = torch.as_tensor(slots)
        if s.dim() != 1:
            raise InvalidArgument(f"slots must be 1-D [T], got shape {tuple(s.shape)}")
        keep = s >= 0
        if bool(keep.all()):
            return s, k, v
        rows = keep.nonzero().squeeze(1)
        return s.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows)

    def write(
        self, layer: int, slots: Any, k: torch.Tensor, v: torch.Tensor, *, check: bool = True
    ) -> None:
        """:meth:`KVPool.write` of the tokens this rank owns: rows whose slot is
        ``-1`` (another rank's, as :class:`ShardedPrefixCache` returns them) are
        skipped, so every rank may be handed all new tokens' K/V."""
        slots_t = torch.as_tensor(slots)
        if slots_t.dim() == 1 and k.dim() == 3 and k.shape[0] == slots_t.numel():
            slots_t, k, v = self.owned(slots_t, k, v)
        super().write(layer, slots_t, k, v, check=check)

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (``[T, kv_heads, head_dim]``) as float32 values after a round trip
        through this pool's storage type (FP8 codes times scales, or a cast)."""
        if self.fp8:
            return dequantize_fp8(*quantize_fp8(x, self.dtype)).float()
        return x.to(self.dtype).float()

    # ----- stats -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """This rank's :meth:`KVPool.stats`, plus ``rank``, ``ranks``,
        ``virtual_page_size`` and the collectives' counters."""
        out = super().stats()
        out.update(
            rank=self.rank,
            ranks=self.ranks,
            virtual_page_size=self.virtual_page_size,
            collectives=self.comm.calls,
            collective_bytes_sent=self.comm.bytes_sent,
            collective_bytes_received=self.comm.bytes_received,
        )
        return out

    def stats_all(self) -> dict[str, Any]:
        """Collective: ``{"per_rank": [stats of rank 0, ...], "total": {...}}``.

        Every numeric value of ``per_rank[r]`` is rank ``r``'s own (others,
        such as ``None`` budgets, are the same on every rank); ``total`` sums
        the integer counters over ranks and keeps the configuration keys
        (``page_size``, ``segment_bytes``, ...) as they are.
        """
        mine = self.stats()
        ints = sorted(k for k, x in mine.items() if type(x) is int)
        floats = sorted(k for k, x in mine.items() if type(x) is float)
        got_i = self.comm.gather_ints([int(mine[k]) for k in ints])
        got_f = torch.stack(
            self.comm.gather(torch.tensor([float(mine[k]) for k in floats], dtype=torch.float64))
        ).numpy()
        per_rank = []
        for r in range(self.ranks):
            d = dict(mine)
            d.update({k: int(got_i[r, i]) for i, k in enumerate(ints)})
            d.update({k: float(got_f[r, i]) for i, k in enumerate(floats)})
            per_rank.append(d)
        fixed = {"page_size", "pages_per_segment", "segment_bytes", "ranks", "virtual_page_size"}
        fixed |= {"bytes_per_token", "budget_bytes"}
        total = {k: (mine[k] if k in fixed else int(got_i[:, i].sum())) for i, k in enumerate(ints)}
        total.pop("rank", None)
        return {"per_rank": per_rank, "total": total}

    def __repr__(self) -> str:
        return (
            super()
            .__repr__()
            .replace("KVPool(", f"ShardedKVPool(rank={self.rank}/{self.ranks}, ", 1)
        )


# ----- the cache ---------------------------------------------------------------------------


class ShardedPrefixCache(PrefixCache):
    """A :class:`PrefixCache` over a :class:`ShardedKVPool`: one per rank, driven
    by the same calls on every rank.

    The tree works in virtual pages (``page_size = pool.virtual_page_size``);
    :meth:`page_table` is the virtual CSR, the same on every rank, which
    :func:`decode`/:func:`extend` (and :mod:`radixseg.attention` given this
    pool) turn into this rank's. :meth:`extend`, :meth:`extend_each` and
    :meth:`slots` return **this rank's** slots, ``-1`` for tokens another rank
    stores, which :meth:`ShardedKVPool.write` and
    :func:`radixseg.attention.store_kv` skip. With ``pool.verify``,
    ``begin``, ``extend``, ``extend_each``, ``truncate``, ``finish``,
    ``abort`` and ``reset`` first check that every rank made the same call on
    the same state (:class:`RankMismatch` otherwise); ``evict`` is not checked
    (the pool's eviction under pressure runs inside those calls, in step).
    """

    pool: ShardedKVPool

    def __init__(self, pool: ShardedKVPool, *, max_context_len: int | None = None) -> None:
        if not isinstance(pool, ShardedKVPool):
            raise TypeError(f"pool must be a ShardedKVPool, got {type(pool).__name__}")
        super().__init__(pool, max_context_len=max_context_len)
        self.shard = pool.shard

    def _agree(self, what: str, *parts: Any) -> None:
        if self.pool.verify:
            tree = self.tree
            self.pool.check_agreement(
                what,
                *parts,
                *self.pool._state(),
                tree.running_requests(),
                tree.evictable_pages(),
            )

    @staticmethod
    def _req_key(req: Request) -> tuple[int, int, int]:
        return (req.seq_len, req.cached_len, req.namespace)

    def begin(self, tokens: Any, namespace: int = 0, *, leave_last: bool = True) -> Request:
        if self.pool.verify:
            tokens = as_id_array(tokens, "tokens")
            self._agree("ShardedPrefixCache.begin", tokens, namespace, leave_last)
        return super().begin(tokens, namespace, leave_last=leave_last)

    def extend(self, req: Request, new_tokens: Any) -> torch.Tensor:
        """:meth:`PrefixCache.extend`; returns this rank's ``int64 [T]`` slots
        (``-1`` for the tokens other ranks store)."""
        if self.pool.verify:
            self._check_req(req)
            new_tokens = as_id_array(new_tokens, "new_tokens")
            self._agree("ShardedPrefixCache.extend", self._req_key(req), new_tokens)
        return self.shard.local_slots(super().extend(req, new_tokens))

    def extend_each(self, reqs: Sequence[Request], tokens: Any) -> torch.Tensor:
        """:meth:`PrefixCache.extend_each`; returns this rank's slots (``-1`` elsewhere)."""
        if self.pool.verify:
            self._records(reqs)
            tokens = as_id_array(tokens, "tokens")
            self._agree("ShardedPrefixCache.extend_each", [self._req_key(r) for r in reqs], tokens)
        return self.shard.local_slots(super().extend_each(reqs, tokens))

    def slots(self, req: Request, start: int = 0, end: int | None = None) -> torch.Tensor:
        """This rank's slots of the request's tokens ``start..end`` (``-1`` elsewhere)."""
        return self.shard.local_slots(super().slots(req, start, end))

    def truncate(self, req: Request, seq_len: int) -> None:
        self._check_req(req)
        self._agree("ShardedPrefixCache.truncate", self._req_key(req), seq_len)
        super().truncate(req, seq_len)

    def finish(self, req: Request, tokens: Any = None) -> None:
        if self.pool.verify:
            self._check_req(req)
            if tokens is not None:
                tokens = as_id_array(tokens, "tokens")
            self._agree("ShardedPrefixCache.finish", self._req_key(req), tokens)
        super().finish(req, tokens)

    def abort(self, req: Request) -> None:
        self._check_req(req)
        self._agree("ShardedPrefixCache.abort", self._req_key(req))
        super().abort(req)

    def reset(self) -> None:
        self._agree("ShardedPrefixCache.reset")
        super().reset()


# ----- attention ---------------------------------------------------------------------------


def _sharded(pool: Any) -> ShardedKVPool:
    if not isinstance(pool, ShardedKVPool):
        raise TypeError(
            f"pool must be a radixseg.distributed.ShardedKVPool, got {type(pool).__name__}"
        )
    return pool


def _virtual_lens(
    pool: ShardedKVPool,
    batch: int,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Validated virtual CSR -> host ``(indptr, indices, seq_lens)``."""
    from radixseg.attention import _host_index, _PageTable

    indptr = _host_index(kv_indptr, "kv_indptr")
    if indptr.size - 1 != batch:
        raise InvalidArgument(
            f"kv_indptr has {indptr.size} entries for {batch} requests; it needs batch + 1"
        )
    table = _PageTable(
        pool,
        batch,
        kv_indptr,
        indptr,
        kv_indices,
        kv_last_page_len,
        None,
        False,
        page_size=pool.virtual_page_size,
    )
    return table.indptr, table.indices, table.kv_lens


def _merge_over_ranks(
    pool: ShardedKVPool, o: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather every rank's partial ``(o [T, H, D], lse [T, H])`` as one
    packed fp32 buffer and merge in rank order (the same bits on every rank);
    returns float32 ``(o, lse)``."""
    d = o.shape[-1]
    packed = torch.cat([o.float(), lse.float().unsqueeze(-1)], dim=-1)
    parts = pool.comm.gather(packed)
    out, s = parts[0][..., :d], parts[0][..., d]
    for p in parts[1:]:
        out, s = merge_states_torch(out, s, p[..., :d], p[..., d])
    return out, s


def _shard_attention(
    q: torch.Tensor,
    pool: ShardedKVPool,
    layer: int,
    qo_indptr: Any,
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int64],
    lens: npt.NDArray[np.int64],
    rows_per_request: npt.NDArray[np.int64],
    *,
    decode: bool,
    opts: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partial over the first ``lens[i]`` tokens of each request,
    merged over ranks; rows of requests this rank holds nothing of are masked
    to the empty state (whatever a kernel returns for an empty row)."""
    from radixseg.attention import _attention

    l_ptr, l_idx, l_last = pool.shard.local_table(indptr, indices, lens)
    o, s = _attention(
        q,
        pool,
        layer,
        qo_indptr,
        l_ptr,
        l_idx,
        l_last,
        decode=decode,
        causal=False,
        **opts,
    )
    empty = np.repeat(pool.shard.local_lens(lens) == 0, rows_per_request)
    if empty.any():
        rows = torch.from_numpy(np.flatnonzero(empty)).to(o.device)
        o = o.index_fill(0, rows, 0.0)
        s = s.index_fill(0, rows, -math.inf)
    return _merge_over_ranks(pool, o, s)


def decode(
    q: torch.Tensor,
    pool: ShardedKVPool,
    layer: int,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    sm_scale: float | None = None,
    return_lse: bool = False,
    *,
    num_splits: int | None = None,
    fp8_software: bool | None = None,
    backend: str = "auto",
    check: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Collective :func:`radixseg.attention.decode` over a sequence sharded on every rank.

    ``q [batch, q_heads, head_dim]`` is the same on every rank; the page table
    is the **virtual** CSR (:meth:`ShardedPrefixCache.page_table`, pages of
    ``virtual_page_size`` tokens, ``kv_last_page_len`` in ``1..=V``), the same
    on every rank, covering the new token (already stored by its owner). Each
    rank attends over the tokens it holds; one all-gather of ``[batch,
    q_heads, head_dim + 1]`` fp32 per rank merges them. Returns what
    :func:`radixseg.attention.decode` returns, identical on every rank. With
    ``check``, the ranks first compare the table, the layer, the scale and
    q's shape and dtype (:class:`RankMismatch`); the values of ``q`` (and of
    extend's ``k``/``v``) are not compared (hashing them costs what the
    attention does).
    """
    from radixseg.attention import _check_q, _check_scale

    pool = _sharded(pool)
    q = _check_q(q, pool)
    indptr, indices, lens = _virtual_lens(pool, q.shape[0], kv_indptr, kv_indices, kv_last_page_len)
    scale = _check_scale(sm_scale, pool.head_dim)
    if check:
        pool.check_agreement(
            "decode", layer, tuple(q.shape), str(q.dtype), scale, indices[: int(indptr[-1])], lens
        )
    opts = {
        "sm_scale": scale,
        "num_splits": num_splits,
        "fp8_software": fp8_software,
        "backend": backend,
        "check": check,
    }
    ones = np.ones(lens.size, dtype=np.int64)
    out, lse = _shard_attention(
        q, pool, layer, None, indptr, indices, lens, ones, decode=True, opts=opts
    )
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def extend(
    q: torch.Tensor,
    pool: ShardedKVPool,
    layer: int,
    qo_indptr: Any,
    kv_indptr: Any,
    kv_indices: Any,
    kv_last_page_len: Any,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sm_scale: float | None = None,
    *,
    return_lse: bool = False,
    num_splits: int | None = None,
    fp8_software: bool | None = None,
    backend: str = "auto",
    check: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Collective :func:`radixseg.attention.extend` over a sequence sharded on every rank.

    As :func:`radixseg.attention.extend` (virtual page table covering the
    cached context and the new tokens, ``q [total_q, q_heads, head_dim]`` the
    same on every rank), plus ``k``, ``v`` ``[total_q, kv_heads, head_dim]``:
    the new tokens' K/V, which every rank computed and stored where it owns
    them. The cached context (``kv_len - qo_len`` tokens per request) is
    attended shard by shard and merged over ranks; the new tokens attend to
    each other (causally) from ``k``/``v`` as the pool stores them (FP8
    rounded exactly as the pool rounds), locally; the two parts are merged.
    """
    from radixseg.attention import _check_indptr, _check_q, _check_scale, _host_index

    pool = _sharded(pool)
    q = _check_q(q, pool)
    qo = _host_index(qo_indptr, "qo_indptr")
    batch = qo.size - 1
    if batch < 0:
        raise InvalidArgument("qo_indptr must have batch + 1 >= 1 entries, got 0")
    _check_indptr(qo, batch, "qo_indptr", "query tokens")
    if qo[-1] != q.shape[0]:
        raise InvalidArgument(
            f"qo_indptr[-1] = {int(qo[-1])} must equal q.shape[0] = {q.shape[0]} "
            f"(the total of new tokens)"
        )
    k = pool.check_kv(k, q.shape[0], "k")
    v = pool.check_kv(v, q.shape[0], "v")
    indptr, indices, lens = _virtual_lens(pool, batch, kv_indptr, kv_indices, kv_last_page_len)
    qo_lens = np.diff(qo)
    context = lens - qo_lens
    if (context < 0).any():
        i = int(np.argmax(context < 0))
        raise InvalidArgument(
            f"request {i} has {int(qo_lens[i])} new tokens but only {int(lens[i])} KV tokens; "
            f"the page table must count the new tokens"
        )
    scale = _check_scale(sm_scale, pool.head_dim)
    if check:
        pool.check_agreement(
            "extend",
            layer,
            tuple(q.shape),
            str(q.dtype),
            scale,
            qo,
            indices[: int(indptr[-1])],
            lens,
            causal,
        )
    opts = {
        "sm_scale": scale,
        "num_splits": num_splits,
        "fp8_software": fp8_software,
        "backend": backend,
        "check": check,
    }
    o_c, s_c = _shard_attention(
        q, pool, layer, qo, indptr, indices, context, qo_lens, decode=False, opts=opts
    )
    o_n, s_n = dense_attention_torch(
        q.float(), pool.as_stored(k), pool.as_stored(v), qo_lens, causal=causal, sm_scale=scale
    )
    out, lse = merge_states_torch(o_c, s_c, o_n, s_n)
    out = out.to(q.dtype)
    return (out, lse.float()) if return_lse else out
