"""SGLang's ``TokenToKVPoolAllocator`` / ``PagedTokenToKVPoolAllocator`` over a KVPool.

One class for every page size (SGLang's ``mem_cache/allocator/``), handing out
``int64`` slots of whole pages of a :class:`radixseg.KVPool` that grows by
segments under its budget; what it keeps from SGLang and where it differs is
in the package docstring.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from radixseg._convert import Uncopyable, as_count
from radixseg._core import InvalidArgument, InvalidHandle, OutOfPages
from radixseg.integrations.sglang.types import EvictParams, _as_slots
from radixseg.pool import KVPool

if TYPE_CHECKING:
    from radixseg.integrations.sglang.radix_cache import RadixsegRadixCache


@dataclass(eq=False)
class AllocatorState:
    """An allocator checkpoint from :meth:`RadixsegTokenToKVPoolAllocator.backup_state`.

    Opaque; valid until the allocator is cleared or restored to an earlier state.
    """

    allocator: RadixsegTokenToKVPoolAllocator
    epoch: int
    index: int


class RadixsegTokenToKVPoolAllocator(Uncopyable):
    """SGLang's ``TokenToKVPoolAllocator`` / ``PagedTokenToKVPoolAllocator`` over a KVPool.

    Parameters
    ----------
    pool : KVPool
        Owns the pages; its ``page_size`` is the allocator's. Build on a pool
        whose page 0 is free (a fresh one) or already held: the allocator
        takes page 0 as the padding target.
    size : int, optional
        A cap in tokens, as SGLang's ``size``: the allocator and its cache
        never hold more than ``size // page_size`` pages besides page 0
        (the pool still grows lazily up to that). Default: the pool's budget.

    Slots come out as ``int64`` tensors on the pool's device. See the package
    docstring (:mod:`radixseg.integrations.sglang`) for what differs from SGLang.
    """

    def __init__(self, pool: KVPool, *, size: int | None = None) -> None:
        if not isinstance(pool, KVPool):
            raise TypeError(f"pool must be a radixseg.KVPool, got {type(pool).__name__}")
        self.pool = pool
        self.page_size = pool.page_size
        self.dtype = pool.dtype
        self.device = pool.device
        self.need_sort = False
        #: Frees deferred by ``free_group_begin`` (page ids), or None outside a group.
        self.free_group: list[torch.Tensor] | None = None
        self._cap_pages = None if size is None else as_count(size, "size") // self.page_size
        self._cache: RadixsegRadixCache | None = None
        self._journal: list[tuple[bool, torch.Tensor]] = []
        self._epoch = 0
        self._states: weakref.WeakSet[AllocatorState] = weakref.WeakSet()
        #: (what the room depends on, the room in pages) at its last measurement.
        self._room_memo: tuple[tuple[Any, ...], int] | None = None
        self._reserve_padding_page()

    def _reserve_padding_page(self) -> None:
        a = self.pool.allocator
        if 0 in a.segments() and int(a.refcount([0])[0]) > 0:
            a.retain([0])
            return
        ids = self.pool.alloc(1)
        if int(ids[0]) != 0:
            self.pool.release(ids)
            raise InvalidArgument(
                "page 0 is free but was not the page handed out; build the SGLang "
                "allocator on a fresh KVPool so that page 0 can be the padding page"
            )

    # ----- the radix cache on top --------------------------------------------------------

    @property
    def cache(self) -> RadixsegRadixCache | None:
        """The :class:`RadixsegRadixCache` built on this allocator (at most one), or None."""
        return self._cache

    def attach_cache(self, cache: RadixsegRadixCache) -> None:
        """Record the radix cache caching this allocator's pages (its constructor
        calls this, once): ``alloc`` evicts from its tree when the ``size`` cap is
        reached, and ``clear`` needs it empty."""
        self._cache = cache

    # ----- capacity ---------------------------------------------------------------------

    def _room_stamp(self) -> tuple[Any, ...]:
        """What the room depends on besides free memory: the pool's segments
        (count, and every growth or shrink since it was built) and its budget."""
        pool = self.pool
        return (
            pool.allocator.segment_count(),
            pool.segment_events,
            pool.budget_bytes,
            pool.budget_fraction,
            pool.allocator.max_segments,
        )

    def _measured_room(self) -> int:
        """Pages the pool can still add under its budget (whole segments).

        Under ``budget_bytes="auto"`` or ``None`` the room depends on free
        device memory; it is measured when the pool's segments change (growth,
        shrink, construction) or an allocation fails, and kept in between, so
        two reads in one scheduling step agree.
        """
        stamp = self._room_stamp()
        memo = self._room_memo
        if memo is not None and memo[0] == stamp:
            return memo[1]
        pages = self.pool.room_segments() * self.pool.pages_per_segment
        self._room_memo = (stamp, pages)
        return pages

    def _held_pages(self) -> int:
        """Pages held by the engine and the tree (page 0 not counted)."""
        a = self.pool.allocator
        return a.total_pages() - a.free_pages() - 1

    def _available_pages(self) -> int:
        free = self.pool.allocator.free_pages() + self._measured_room()
        if self._cap_pages is not None:
            free = min(free, self._cap_pages - self._held_pages())
        return max(0, free)

    @property
    def size(self) -> int:
        """Token slots this allocator can reach (page 0 excluded): the ``size``
        cap, else what the pool holds plus what its budget still allows."""
        if self._cap_pages is not None:
            return self._cap_pages * self.page_size
        total = self.pool.allocator.total_pages() - 1 + self._measured_room()
        return total * self.page_size

    @property
    def size_full(self) -> int:
        """``size`` (SGLang's name for the full-attention pool's size)."""
        return self.size

    @property
    def num_pages(self) -> int:
        """``size // page_size``."""
        return self.size // self.page_size

    def available_size(self) -> int:
        """Tokens ``alloc`` can hand out now without evicting: free pages in live
        segments plus pages the budget still allows, times ``page_size``."""
        return self._available_pages() * self.page_size

    # ----- allocation -------------------------------------------------------------------

    def _alloc_pages(self, n: int) -> torch.Tensor | None:
        """``n`` pages (int32 CPU) or None; grows, then evicts, all or none."""
        if n == 0:
            return torch.zeros(0, dtype=torch.int32)
        if self._cap_pages is not None:
            short = n - (self._cap_pages - self._held_pages())
            cache = self._cache
            if (
                short > 0
                and cache is not None
                and cache.evict_on_alloc
                and cache.tree.evictable_pages() >= short
            ):
                cache.tree.evict(short)
            if n > self._cap_pages - self._held_pages():
                return None
        try:
            pages = self.pool.alloc(n)
        except OutOfPages:
            self._room_memo = None  # growth was refused: measure the room again
            return None
        self._note(True, pages)
        return pages

    def slots_of(self, pages: torch.Tensor) -> torch.Tensor:
        """The ``int64`` slots of page ids ``pages`` (each page's ``page_size``
        slots in order) on the allocator's device."""
        ps = self.page_size
        p = pages.to(torch.int64)
        if ps == 1:
            return p.to(self.device)
        return (p[:, None] * ps + torch.arange(ps, dtype=torch.int64)).reshape(-1).to(self.device)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """``need_size`` token slots (``int64 [need_size]``), or None when the pool
        cannot supply them after growing and evicting.

        Paged (``page_size > 1``): ``need_size`` must be a multiple of
        ``page_size``; the slots are whole pages, each page's slots in order.
        """
        n = as_count(need_size, "need_size")
        ps = self.page_size
        if n % ps:
            raise InvalidArgument(
                f"alloc({n}) is not a whole number of pages (page_size={ps}); "
                f"use alloc_extend/alloc_decode to fill a partial page"
            )
        pages = self._alloc_pages(n // ps)
        return None if pages is None else self.slots_of(pages)

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        num_new_pages: int | None = None,
    ) -> torch.Tensor | None:
        """Slots for extending each request from ``prefix_lens`` to ``seq_lens``.

        SGLang's paged ``alloc_extend``: a request's new tokens first fill the
        rest of its last page (slots after ``last_loc``, the slot of its last
        prefix token), then whole new pages. Returns ``int64
        [extend_num_tokens]`` (requests in order) or None when the pages
        cannot be had. ``prefix_lens``/``seq_lens`` (device copies) are not read;
        ``num_new_pages`` is recomputed.
        """
        del prefix_lens, seq_lens, num_new_pages
        ps = self.page_size
        pre = prefix_lens_cpu.to(torch.int64).reshape(-1)
        seq = seq_lens_cpu.to(torch.int64).reshape(-1)
        last = last_loc.to(device="cpu", dtype=torch.int64).reshape(-1)
        if not (pre.numel() == seq.numel() == last.numel()):
            raise InvalidArgument(
                "prefix_lens, seq_lens and last_loc must have one entry per request"
            )
        ext = seq - pre
        if ext.numel() and int(ext.min()) < 0:
            raise InvalidArgument("seq_lens must not be shorter than prefix_lens")
        n = int(ext.sum())
        if n != extend_num_tokens:
            raise InvalidArgument(
                f"extend_num_tokens={extend_num_tokens} but seq_lens - prefix_lens sums to {n}"
            )
        ceil_pre = (pre + ps - 1) // ps * ps
        new_per = (seq + ps - 1) // ps - ceil_pre // ps
        total = int(new_per.sum())
        pages = self._alloc_pages(total)
        if pages is None:
            return None
        owner = torch.repeat_interleave(torch.arange(pre.numel()), ext)
        start = torch.cumsum(ext, 0) - ext
        pos = pre[owner] + torch.arange(n, dtype=torch.int64) - start[owner]
        old = last[owner] + 1 + (pos - pre[owner])
        if total == 0:
            return old.to(self.device)
        base = torch.cumsum(new_per, 0) - new_per
        k = base[owner] + (pos - ceil_pre[owner]).clamp(min=0) // ps
        new = pages.to(torch.int64)[k.clamp(max=total - 1)] * ps + pos % ps
        return torch.where(pos < ceil_pre[owner], old, new).to(self.device)

    def alloc_decode(
        self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor
    ) -> torch.Tensor | None:
        """One slot per request for its next token (``seq_lens`` counts it):
        ``last_loc + 1``, or the first slot of a new page when the token starts
        one. ``int64 [batch]`` or None."""
        del seq_lens
        ps = self.page_size
        seq = seq_lens_cpu.to(torch.int64).reshape(-1)
        last = last_loc.to(device="cpu", dtype=torch.int64).reshape(-1)
        if seq.numel() != last.numel():
            raise InvalidArgument("seq_lens and last_loc must have one entry per request")
        need = (seq - 1) % ps == 0
        pages = self._alloc_pages(int(need.sum()))
        if pages is None:
            return None
        out = last + 1
        out[need] = pages.to(torch.int64) * ps
        return out.to(self.device)

    # ----- freeing ----------------------------------------------------------------------

    def _release(self, pages: torch.Tensor) -> None:
        """Drop the engine's reference to each page (int64 CPU), or defer it to the group."""
        if pages.numel() == 0:
            return
        if int(pages.min()) == 0:
            raise InvalidHandle(
                "page 0 (slots 0..page_size-1) is the reserved padding page; it is never "
                "handed out, so it cannot be freed"
            )
        if self.free_group is not None:
            self.free_group.append(pages.clone())
            return
        self.pool.release(pages)
        self._note(False, pages)

    def free(self, free_index: Any) -> None:
        """Free the pages holding the slots ``free_index`` (any int tensor or sequence).

        Each page touched is freed once per call; freeing a page that is
        already free raises :class:`radixseg.DoubleFree` and frees nothing.
        Inside a free group the pages wait for :meth:`free_group_end`.
        """
        slots = _as_slots(free_index, "free_index")
        if slots.numel() == 0:
            return
        self._release(torch.unique(slots // self.page_size))

    def free_full(self, free_index: Any) -> None:
        """:meth:`free` (SGLang's full-attention side; there is no SWA side here)."""
        self.free(free_index)

    def free_page_ids(self, page_ids: Any) -> None:
        """Free exactly these pages; a page listed twice is a double free."""
        self._release(_as_slots(page_ids, "page_ids"))

    def _segment_pages(self, free_index: Any, start_pos: int) -> torch.Tensor:
        """Page ids (int64) of the kv-row segment starting at ``start_pos``."""
        ps = self.page_size
        if start_pos % ps:
            raise InvalidArgument(f"segment start {start_pos} is not page-aligned ({ps})")
        slots = _as_slots(free_index, "free_index")
        return slots[::ps] // ps if ps > 1 else slots

    def free_segment(self, free_index: Any, *, start_pos: int) -> None:
        """Free a request's kv-row segment ``row[start_pos : start_pos + n]``.

        ``start_pos`` is page-aligned, so the segment's pages are
        ``free_index[::page_size] // page_size`` (the last one may be partly
        filled); each is freed once.
        """
        self._release(self._segment_pages(free_index, start_pos))

    def free_full_segment(self, free_index: Any, *, start_pos: int) -> None:
        """:meth:`free_segment` (the full-attention side)."""
        self.free_segment(free_index, start_pos=start_pos)

    def free_segments(self, segments: Iterable[tuple[Any, int]]) -> None:
        """Free several ``(free_index, start_pos)`` segments of one kv row; their
        page ranges must not overlap. All or nothing, as one :meth:`free`."""
        pages = [self._segment_pages(i, start) for i, start in self._page_disjoint(segments)]
        if pages:
            self._release(torch.cat(pages))

    def free_full_segments(self, segments: Iterable[tuple[Any, int]]) -> None:
        """:meth:`free_segments` (the full-attention side)."""
        self.free_segments(segments)

    def _page_disjoint(self, segments: Iterable[tuple[Any, int]]) -> list[tuple[Any, int]]:
        ps, prev_end, out = self.page_size, None, []
        for free_index, start_pos in segments:
            n = len(free_index)
            if n == 0:
                continue
            if prev_end is not None and start_pos // ps <= (prev_end - 1) // ps:
                raise InvalidArgument(
                    f"segment at {start_pos} shares a page with the one ending at {prev_end}"
                )
            prev_end = start_pos + n
            out.append((free_index, start_pos))
        return out

    def free_group_begin(self) -> None:
        """Defer every free until :meth:`free_group_end`; groups do not nest."""
        if self.free_group is not None:
            raise InvalidArgument("free groups cannot be nested")
        self.free_group = []

    def free_group_end(self) -> None:
        """Free everything deferred since :meth:`free_group_begin`, in one call.

        All or nothing: a page freed twice in the group (or already free)
        raises :class:`radixseg.DoubleFree` and none of the group is freed.
        """
        pending, self.free_group = self.free_group, None
        if pending:
            self._release(torch.cat(pending))

    # ----- rollback ---------------------------------------------------------------------

    def _note(self, is_alloc: bool, pages: torch.Tensor) -> None:
        """Journal an allocation or free while a checkpoint is alive; drop the
        journal once none is."""
        if len(self._states):
            self._journal.append((is_alloc, pages))
        elif self._journal:
            self._journal = []

    def backup_state(self) -> AllocatorState:
        """A checkpoint that :meth:`restore_state` rolls allocations back to.

        While any checkpoint object is alive, allocations and frees are
        journaled (their page ids), so keep it only as long as needed.
        """
        if not len(self._states):
            self._journal = []
            self._epoch += 1
        state = AllocatorState(self, self._epoch, len(self._journal))
        self._states.add(state)
        return state

    def restore_state(self, state: AllocatorState) -> None:
        """Free every page allocated since ``state`` that the engine still holds.

        Pages freed since stay free; pages the tree took since stay cached.
        Raises ``InvalidArgument`` for a state of another allocator, a stale
        state (the allocator was cleared or restored to an earlier one), or
        frees pending in an open free group.
        """
        if not isinstance(state, AllocatorState) or state.allocator is not self:
            raise InvalidArgument("restore_state needs a state from this allocator's backup_state")
        if state.epoch != self._epoch or state.index > len(self._journal):
            raise InvalidArgument("this allocator state is stale (cleared or restored past it)")
        if self.free_group:
            raise InvalidArgument("cannot restore_state with frees pending in a free group")
        held: dict[int, int] = {}
        for is_alloc, pages in self._journal[state.index :]:
            for p in pages.tolist():
                if is_alloc:
                    held[p] = held.get(p, 0) + 1
                elif held.get(p, 0) > 0:
                    held[p] -= 1
        roll = [p for p, c in held.items() for _ in range(c)]
        if roll:
            self.pool.release(roll)
        del self._journal[state.index :]

    def hand_to_tree(self, pages: torch.Tensor) -> None:
        """Drop the engine's reference to ``pages`` (page ids), which the radix
        cache's tree now holds instead (its ``insert`` calls this): released at
        once, also inside a free group, and journaled as a free, so that
        :meth:`restore_state` leaves the pages cached."""
        self.pool.release(pages)
        self._note(False, pages)

    # ----- whole-pool operations ----------------------------------------------------------

    def clear(self) -> None:
        """Free every page the engine holds (everything but page 0), as SGLang's
        ``clear`` resets its free list. The attached cache must be empty
        (``reset()`` it first); pending frees and checkpoints are dropped."""
        if self._cache is not None and self._cache.tree.cached_pages():
            raise InvalidArgument(
                "the radix cache still holds pages; reset() it before clear(), as "
                "SGLang's flush_cache does"
            )
        self.free_group = None
        self._journal = []
        self._epoch += 1
        a, pps = self.pool.allocator, self.pool.pages_per_segment
        held = []
        for seg in a.segments():
            ids = torch.arange(seg * pps, (seg + 1) * pps, dtype=torch.int64)
            rc = a.refcount(ids).to(torch.int64)
            if seg == 0:
                rc[0] -= 1  # keep the padding page's reference
            held.append(torch.repeat_interleave(ids, rc.clamp(min=0)))
        if held:
            self.pool.release(torch.cat(held))

    def get_all_free_pages(self) -> torch.Tensor:
        """Free page ids in live segments (``int64``; a debugging census, O(pages))."""
        a, pps = self.pool.allocator, self.pool.pages_per_segment
        out = [torch.zeros(0, dtype=torch.int64)]
        for seg in a.segments():
            ids = torch.arange(seg * pps, (seg + 1) * pps, dtype=torch.int64)
            out.append(ids[a.refcount(ids) == 0])
        return torch.cat(out)

    def merge_and_sort_free(self) -> None:
        """No-op: there is no staged free list to merge."""

    def get_kvcache(self) -> KVPool:
        """The :class:`KVPool` that holds the bytes (SGLang returns its KVCache)."""
        return self.pool

    def translate_kv_indices_for_transfer(self, kv_indices: torch.Tensor) -> torch.Tensor:
        """Identity: slots name pages directly."""
        return kv_indices

    def debug_print(self) -> str:
        """One line of pool counters."""
        s = self.pool.stats()
        return (
            f"radixseg: {s['segments']} segments, {s['used_pages']}/{s['total_pages']} "
            f"pages used, {self.available_size()} tokens available"
        )

    # ----- SGLang 0.5.23 scheduler hooks ----------------------------------------------------

    def request_slot_reserve(self, *, has_req_pool_slot: bool, prefill_tokens: int = 0) -> int:
        """Extra slots a request needs beyond its prefill: none."""
        return 0

    def max_new_tokens_for_memory(
        self,
        input_tokens: int,
        max_new_tokens: int,
        *,
        token_capacity: int,
        sliding_window_size: int | None = None,
        chunk_size: int | None = None,
    ) -> int | None:
        """SGLang's clip of ``max_new_tokens`` to an empty pool of ``token_capacity``."""
        ps = self.page_size
        paged_input = -(-input_tokens // ps) * ps
        return max(0, min(max_new_tokens, token_capacity - paged_input - ps - 1))

    def evict_to_free_tokens(self, tree_cache: Any, num_tokens: int) -> bool | None:
        """Evict from ``tree_cache`` until ``num_tokens`` are available (or nothing is left)."""
        if tree_cache is None:
            return None
        shortfall = num_tokens - self.available_size()
        if shortfall > 0:
            tree_cache.evict(EvictParams(num_tokens=shortfall))
        return None

    def check_decode_capacity(
        self,
        *,
        num_tokens: int,
        tree_cache: Any,
        requests: Any = None,
        spec_algorithm: Any = None,
    ) -> bool:
        """Whether ``num_tokens`` fit after evicting what the cache can spare."""
        self.evict_to_free_tokens(tree_cache, num_tokens)
        return self.available_size() >= num_tokens

    def __repr__(self) -> str:
        return (
            f"RadixsegTokenToKVPoolAllocator(page_size={self.page_size}, size={self.size}, "
            f"available={self.available_size()})"
        )
