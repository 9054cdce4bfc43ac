"""Hybrid attention models: each layer group stores only the keys it attends to.

A model whose layers mix full attention with sliding-window or chunked
attention (Llama 4 Scout: 12 full and 36 chunked layers; Gemma 2/3, Qwen2 with
``max_window_layers``) needs every token only in its full layers. Here each
:class:`~radixseg.capacity.groups.LayerGroup` gets a :class:`KVPool` of its own
(its own segments, sized by its layer count), all under one byte budget, and:

* **The full group is the anchor.** Its pages are the radix tree's pages and a
  request's core record, exactly as in :class:`PrefixCache`: matching, locking,
  eviction and the request lifecycle are one core call each.
* **A windowed group holds a window per request.** A request keeps, per
  windowed group, one page for each of its full pages from
  ``group.keep_from(seq_len)`` on; pages that fall out of the window are
  released at the request's next step (when the last step's kernels are done
  with them), so a 10M-token request holds ``ceil((W - 1) / P) + 2`` pages of a
  sliding group (``C / P + 1`` of a chunked one) beside its full pages.
* **Prefix sharing.** A finished request's full pages enter the tree as today;
  its windowed pages for the window before the cached end are recorded in a
  per-group table indexed by the *full* page id they shadow. A match of
  length ``L`` is usable only where every windowed group still holds the pages
  of ``[group.start(L), L)``; :meth:`GroupedPrefixCache.begin` shrinks the
  match to the longest such ``L`` (whole pages), one pass over the matched
  pages.
* **Eviction.** The full group evicts through the tree (least recently used
  prefixes first). A windowed group under pressure first drops table entries
  whose full page has left the tree, then entries no running request holds,
  oldest first; growth goes through the shared budget first, as in
  :class:`KVPool`. When a group has nothing of its own left to evict, the
  budget the other groups hold is reclaimed: their empty segments, the tree's
  least recently used prefixes (for a windowed group), the other windowed
  groups' unheld entries.

Why a pool per group rather than segments tagged by group in one allocator:
a segment's tensors are shaped by its layer count, so a group's segments can
only ever hold its pages; separate pools keep every existing invariant of the
allocator, the tree and the kernels untouched (a windowed group's page table
is an ordinary page table of its pool) and cost one page-id space per group,
which the shared budget makes invisible to the user.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from radixseg._convert import Uncopyable, as_count, as_id_array, as_namespace
from radixseg._core import InvalidArgument
from radixseg.cache import PrefixCache, Request
from radixseg.capacity.geometry import KVGeometry, kv_geometry
from radixseg.capacity.groups import LayerGroup, layer_groups
from radixseg.pool import KVPool

__all__ = ["GroupedKVPool", "GroupedPrefixCache", "GroupedRequest"]

_I32 = np.int32


class _GroupPool(KVPool):
    """One group's pool; the budget is the owner's, less what the other groups hold."""

    _owner: GroupedKVPool

    def resolved_budget(self, reserved: int | None = None) -> int | None:
        total = self._owner.resolved_total_budget()
        if total is None:
            return None
        # The other groups' empty segments (kept by their shrink hysteresis)
        # are this group's to take: _grow retires them first.
        others = sum(
            p.reserved_bytes() - _empty_bytes(p) for p in self._owner.pools if p is not self
        )
        return max(0, total - others)

    def _grow(self, n_segments: int) -> list[int]:
        owner = self._owner
        total = owner.resolved_total_budget()
        if total is not None and owner.reserved_bytes() + n_segments * self.segment_bytes > total:
            for p in owner.pools:
                if p is not self:
                    p.shrink()
        return super()._grow(n_segments)


def _empty_bytes(pool: KVPool) -> int:
    """Bytes of ``pool``'s segments that hold no page."""
    empty = sum(1 for _, used in pool.allocator.segment_usage() if used == 0)
    return empty * pool.segment_bytes


class _FullCache(PrefixCache):
    """The full group's :class:`PrefixCache`. :meth:`GroupedPrefixCache.begin`
    hands the core only the prefix it reuses, so the core's request counters
    miss the rest of each prompt; ``unmatched`` adds it back to
    ``prompt_tokens`` and ``hit_rate``."""

    unmatched = 0
    #: The grouped cache this one anchors (set by it): when the tree has
    #: nothing left to evict, the full pool's growth reclaims budget from the
    #: windowed groups' cached entries through it.
    owner: GroupedPrefixCache | None = None

    def evict(self, n_pages: int) -> int:
        got = self.tree.evict(n_pages)
        if got == 0 and self.owner is not None:
            with self.owner._evicting():
                got = self.owner._reclaim(0)
        return got

    def evictable_pages(self) -> int:
        n = self.tree.evictable_pages()
        if self.owner is not None:
            n += self.owner._reclaimable(0)
        return n

    def cache_stats(self) -> dict[str, Any]:
        out = super().cache_stats()
        requested = int(out["prompt_tokens"]) + self.unmatched
        out["prompt_tokens"] = requested
        out["hit_rate"] = int(out["reused_tokens"]) / requested if requested else 0.0
        return out


class GroupedKVPool(Uncopyable):
    """KV storage for a hybrid model: one :class:`KVPool` per layer group.

    Parameters
    ----------
    groups : sequence of LayerGroup
        From :func:`radixseg.capacity.groups.layer_groups`; the first must be
        the full-attention group (models whose every layer is windowed keep a
        plain :class:`KVPool` with windowed kernels). A chunked group's chunk
        must be a multiple of ``page_size``.
    num_kv_heads, head_dim, page_size, dtype, device, segment_bytes
        As for :class:`KVPool`; every group uses them (a group's segment
        holds ``segment_bytes`` at most, so its pages per segment follow
        from its layer count).
    budget_bytes : int, "auto" or None
        One budget for all groups together (``"auto"``: ``budget_fraction``
        of free device memory plus what the groups hold).

    ``layer`` arguments are the model's layer indices; :meth:`locate` maps
    one to ``(pool, layer within the pool)``.
    """

    def __init__(
        self,
        groups: Sequence[LayerGroup],
        num_kv_heads: int,
        head_dim: int,
        page_size: int = 16,
        dtype: torch.dtype | str = torch.float8_e4m3fn,
        device: str | torch.device = "cpu",
        segment_bytes: int | None = None,
        budget_bytes: int | str | None = None,
        *,
        budget_fraction: float = 0.9,
        pages_per_segment: int | None = None,
        tensor_factory: Any = None,
    ) -> None:
        groups = list(groups)
        if not groups or not all(isinstance(g, LayerGroup) for g in groups):
            raise TypeError("groups must be a non-empty sequence of LayerGroup")
        if groups[0].kind != "full" or any(g.kind == "full" for g in groups[1:]):
            raise InvalidArgument(
                f"a GroupedKVPool needs exactly one full-attention group, first; got "
                f"{[g.describe() for g in groups]} (a model with no full layer keeps a KVPool "
                f"and windowed kernels)"
            )
        layers = sorted(i for g in groups for i in g.layers)
        if layers != list(range(len(layers))):
            raise InvalidArgument(
                f"the groups' layers must be 0..{len(layers) - 1}, each once; got {layers}"
            )
        ps = as_count(page_size, "page_size")
        for g in groups:
            if g.kind == "chunked" and g.span is not None and g.span % max(ps, 1):
                raise InvalidArgument(
                    f"chunk size {g.span} is not a multiple of page_size={ps}: a chunk edge "
                    f"inside a page would keep a chunk's pages past it; use a page size "
                    f"dividing {g.span}"
                )
        # Checked as KVPool checks its own (the group pools see only "auto").
        if isinstance(budget_bytes, str) and budget_bytes != "auto":
            raise InvalidArgument(
                f"budget_bytes must be an int, 'auto' or None, got {budget_bytes!r}"
            )
        if budget_bytes is not None and budget_bytes != "auto":
            budget_bytes = as_count(budget_bytes, "budget_bytes")
        self.groups = groups
        self.num_layers = len(layers)
        self._lock = threading.RLock()
        self._budget = budget_bytes
        self._budget_fraction = budget_fraction
        self.pools: list[KVPool] = []
        for g in groups:
            pool = _GroupPool(
                len(g.layers),
                num_kv_heads,
                head_dim,
                page_size=ps,
                dtype=dtype,
                device=device,
                segment_bytes=segment_bytes if pages_per_segment is None else None,
                pages_per_segment=pages_per_segment,
                # The owner's budget, resolved at each growth (_GroupPool).
                budget_bytes=None if budget_bytes is None else "auto",
                budget_fraction=budget_fraction,
                auto_shrink=True,
                tensor_factory=tensor_factory,
            )
            pool._owner = self
            pool._lock = self._lock  # one growth lock: groups share the budget
            self.pools.append(pool)
        self.budget_bytes = budget_bytes
        full = self.pools[0]
        self.num_kv_heads, self.head_dim = full.num_kv_heads, full.head_dim
        self.page_size, self.dtype, self.device = full.page_size, full.dtype, full.device
        self.fp8 = full.fp8
        self._where: list[tuple[int, int]] = [(0, 0)] * self.num_layers
        for gi, g in enumerate(groups):
            for li, layer in enumerate(g.layers):
                self._where[layer] = (gi, li)

    @classmethod
    def for_geometry(cls, geometry: Any, **kwargs: Any) -> GroupedKVPool:
        """The pool for a :class:`KVGeometry` (or an HF config / dict it reads)."""
        g = geometry if isinstance(geometry, KVGeometry) else kv_geometry(geometry)
        kwargs.setdefault("num_kv_heads", g.num_kv_heads)
        kwargs.setdefault("head_dim", g.head_dim)
        return cls(layer_groups(g), **kwargs)

    # ----- budget -------------------------------------------------------------------

    def resolved_total_budget(self) -> int | None:
        """The budget of all groups together, in bytes, now."""
        if self._budget is None:
            return None
        if self._budget == "auto":
            from radixseg.pool import _device_free_bytes

            free = _device_free_bytes(self.device)
            return int(self._budget_fraction * (free + self.reserved_bytes()))
        return int(self._budget)

    # ----- layers -------------------------------------------------------------------

    def locate(self, layer: int) -> tuple[int, int]:
        """``(group index, layer index within that group's pool)`` of a model layer."""
        i = as_count(layer, "layer")
        if i >= self.num_layers:
            raise InvalidArgument(f"layer {i} is outside 0..{self.num_layers - 1}")
        return self._where[i]

    def pool_of(self, layer: int) -> tuple[KVPool, int]:
        """``(pool, layer within it)`` holding model layer ``layer``."""
        g, li = self.locate(layer)
        return self.pools[g], li

    def write(
        self,
        layer: int,
        slots: Sequence[torch.Tensor],
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        check: bool = True,
    ) -> None:
        """Store ``k``/``v`` (``[N, kv_heads, head_dim]``) of model layer ``layer``
        at its group's ``slots[group]`` (``int64 [N]``, from
        :meth:`GroupedPrefixCache.extend`)."""
        g, li = self.locate(layer)
        self.pools[g].write(li, slots[g], k, v, check=check)

    # ----- memory -------------------------------------------------------------------

    def reserved_bytes(self) -> int:
        """Bytes every group's segments hold."""
        return sum(p.reserved_bytes() for p in self.pools)

    def stats(self) -> dict[str, Any]:
        """The full group's stats (with its cache's) at the top level, summed
        byte counts, and ``groups``: per group its kind, span, layers and its
        pool's stats. JSON-exportable."""
        per = []
        for g, p in zip(self.groups, self.pools, strict=True):
            s = p.stats()
            per.append({"kind": g.kind, "span": g.span, "layers": list(g.layers), **s})
        out = dict(per[0])
        for key in ("reserved_bytes", "used_bytes", "peak_reserved_bytes"):
            if key in out:
                out[key] = sum(int(s.get(key, 0)) for s in per)
        out["segments"] = sum(int(s.get("segments", 0)) for s in per)
        out["groups"] = per
        for drop in ("kind", "span", "layers"):
            out.pop(drop, None)
        return out

    def check_invariants(self) -> None:
        for p in self.pools:
            p.check_invariants()

    def __repr__(self) -> str:
        parts = ", ".join(g.describe() for g in self.groups)
        return f"GroupedKVPool({parts}; {self.reserved_bytes():,} B reserved)"


class GroupedRequest(Uncopyable):
    """One sequence in a :class:`GroupedPrefixCache`.

    ``full`` is its :class:`Request` over the full group (tokens, full pages,
    prefix lock); ``windows[j]`` the ``int32`` page ids it holds in windowed
    group ``j + 1``, for its full pages ``first[j]`` onward.
    """

    __slots__ = ("__weakref__", "_cache", "first", "full", "windows")

    def __init__(self, cache: GroupedPrefixCache, full: Request) -> None:
        self._cache = cache
        self.full = full
        n = len(cache.pool.groups) - 1
        self.windows: list[npt.NDArray[np.int32]] = [np.zeros(0, dtype=_I32)] * n
        self.first: list[int] = [0] * n

    @property
    def seq_len(self) -> int:
        return self.full.seq_len

    @property
    def cached_len(self) -> int:
        return self.full.cached_len

    @property
    def state(self) -> str:
        return self.full.state

    @property
    def namespace(self) -> int:
        return self.full.namespace

    @property
    def prompt(self) -> torch.Tensor:
        return self.full.prompt

    @property
    def uncached(self) -> torch.Tensor:
        return self.full.uncached

    @property
    def tokens(self) -> torch.Tensor:
        return self.full.tokens

    def __del__(self) -> None:
        # The full request aborts itself when dropped while running; its
        # windowed pages go back here.
        try:
            if self.full.state == "running":
                self._cache.abort(self)
        except Exception:
            pass

    def window_pages(self) -> list[int]:
        """Pages this request holds per windowed group."""
        return [w.size for w in self.windows]

    def __repr__(self) -> str:
        return (
            f"GroupedRequest(seq_len={self.seq_len}, cached_len={self.cached_len}, "
            f"window_pages={self.window_pages()}, state={self.state!r})"
        )


class _WindowEvictor:
    """The evictor a windowed group's pool calls under pressure."""

    def __init__(self, cache: GroupedPrefixCache, j: int) -> None:
        self.cache, self.j = cache, j

    def evict(self, n_pages: int) -> int:
        with self.cache._evicting():
            return self.cache._evict_window(self.j, n_pages)

    def evictable_pages(self) -> int:
        return self.cache._evictable_window(self.j)

    def cache_stats(self) -> dict[str, Any]:
        return {"cached_window_pages": len(self.cache._order[self.j])}


class GroupedPrefixCache(Uncopyable):
    """:class:`PrefixCache`'s request lifecycle over a :class:`GroupedKVPool`.

    The same calls (``begin``, ``extend``, ``extend_each``, ``truncate``,
    ``finish``, ``abort``, ``page_table``), returning per-group slots and page
    tables: ``slots[g]`` and ``tables[g]`` belong to ``pool.pools[g]``, whose
    layer ``li`` is model layer ``pool.groups[g].layers[li]``. Each call
    completes or leaves every structure as it was (multi-step calls hold one
    lock and undo their earlier steps when a later one raises).

    A windowed group's page table starts at the request's first kept page: the
    kernels then see positions shifted by a whole number of pages (of chunks,
    for a chunked group), which the window and chunk masks do not notice.
    Pass each group's ``window_left`` / ``chunk_size`` to the kernels.

    Examples
    --------
    >>> from radixseg.capacity.groups import LayerGroup
    >>> groups = [LayerGroup("full", None, (1,)), LayerGroup("sliding", 8, (0,))]
    >>> pool = GroupedKVPool(groups, num_kv_heads=1, head_dim=8, page_size=4,
    ...                      pages_per_segment=8, dtype="fp32")
    >>> cache = GroupedPrefixCache(pool)
    >>> req = cache.begin(list(range(40)))
    >>> slots = cache.extend(req, req.uncached)     # prefill: every page, each group
    >>> [len(s) for s in slots]
    [40, 40]
    >>> _ = cache.extend(req, [7])                  # next step: the window is trimmed
    >>> req.full.num_pages, req.window_pages()
    (11, [4])
    >>> cache.finish(req)
    """

    def __init__(self, pool: GroupedKVPool) -> None:
        if not isinstance(pool, GroupedKVPool):
            raise TypeError(f"pool must be a GroupedKVPool, got {type(pool).__name__}")
        self.pool = pool
        self.full = _FullCache(pool.pools[0])
        self.full.owner = self
        self.tree = self.full.tree
        self.page_size = self.full.page_size
        self.windowed = pool.groups[1:]
        self._lock = pool._lock
        n = len(self.windowed)
        # Per windowed group: full page id -> the group's page for it (-1: none),
        # and the full ids with an entry, oldest first (the eviction order).
        self._table: list[npt.NDArray[np.int32]] = [np.full(0, -1, dtype=_I32)] * n
        self._order: list[dict[int, None]] = [{} for _ in range(n)]
        self._requests: weakref.WeakSet[GroupedRequest] = weakref.WeakSet()
        # > 0 while a pool's growth asks an evictor for pages (see _release).
        self._evict_depth = 0
        # An exception escaped a call: _reconcile before the next one.
        self._dirty = False
        for j in range(n):
            pool.pools[j + 1].attach_cache(_WindowEvictor(self, j))

    # ----- lifecycle ---------------------------------------------------------------

    def begin(self, tokens: Any, namespace: int = 0, *, leave_last: bool = True) -> GroupedRequest:
        """Match and lock the longest cached prefix of ``tokens`` that every
        windowed group can continue from (see the module docstring)."""
        prompt = as_id_array(tokens, "tokens")
        ns = as_namespace(namespace)
        upto = max(0, prompt.size - 1) if leave_last else prompt.size
        with self._step():
            m = self.tree.match_prefix(prompt[:upto], ns)
            ids = m.page_ids.numpy()
            length = self._usable(ids, m.length)
            held = self._held_for(ids, length)
            # Interrupted from here on, the record (full lock) aborts itself when
            # dropped, and the request's windowed pages go back with it.
            record = self.tree.begin_request(prompt[:length], ns, False)
            req = GroupedRequest(self, Request(self.full, prompt, record))
            try:
                self._requests.add(req)
                if record.matched_len != length:  # never under the lock; be safe
                    raise InvalidArgument(
                        f"the cached prefix changed while matching ({record.matched_len} of "
                        f"{length} tokens); retry"
                    )
                for j, w in enumerate(held):
                    if w.size:
                        self.pool.pools[j + 1].allocator.retain(w)
                    # Taken, then recorded (see _reconcile).
                    first = self.windowed[j].start(length) // self.page_size
                    req.windows[j], req.first[j] = w, first
                # The core counted ``length`` prompt tokens; the hit rate is over
                # whole prompts, as PrefixCache's.
                self.full.unmatched += prompt.size - length
            except BaseException:
                self._end(req, cache=False)
                raise
        return req

    def extend(self, req: GroupedRequest, new_tokens: Any) -> list[torch.Tensor]:
        """Append ``new_tokens`` (``[T]``); returns per group the ``int64 [T]``
        slots to write their K/V at. First releases the windowed pages the
        request no longer needs (its previous step is over). All or nothing."""
        self._check_req(req)
        new = as_id_array(new_tokens, "new_tokens")
        with self._step():
            self._trim(req)
            n0, pages0 = req.full.seq_len, req.full.num_pages
            full_slots = self.full.extend(req.full, new)
            try:
                self._grow_windows([req], [pages0])
            except BaseException:
                self._cut(req, n0)
                raise
            return [full_slots, *self._window_slots(req, n0, req.full.seq_len)]

    def extend_each(self, reqs: Sequence[GroupedRequest], tokens: Any) -> list[torch.Tensor]:
        """A decode step: one token per request; per group ``int64 [N]`` slots."""
        reqs = list(reqs)
        for r in reqs:
            self._check_req(r)
        with self._step():
            for r in reqs:
                self._trim(r)
            n0 = [r.full.seq_len for r in reqs]
            pages0 = [r.full.num_pages for r in reqs]
            full_slots = self.full.extend_each([r.full for r in reqs], tokens)
            try:
                self._grow_windows(reqs, pages0)
            except BaseException:
                for r, n in zip(reqs, n0, strict=True):
                    self._cut(r, n)
                raise
            per = [self._window_slots(r, n, n + 1) for r, n in zip(reqs, n0, strict=True)]
            return [full_slots] + [
                torch.cat([p[j] for p in per]) if per else torch.zeros(0, dtype=torch.int64)
                for j in range(len(self.windowed))
            ]

    def truncate(self, req: GroupedRequest, seq_len: int) -> None:
        """Undo :meth:`extend` calls back to ``seq_len`` tokens; refused below
        the point whose windows this request has already released."""
        self._check_req(req)
        n = as_count(seq_len, "seq_len")
        with self._step():
            for j, g in enumerate(self.windowed):
                # The next query (at n) sees keys from start(n) on: refused only
                # when the request no longer holds that page. (Not keep_from(n):
                # a request begun from the cache at L holds from start(L), which
                # keep_from(L) may precede, and must be able to return to L.)
                if n < req.seq_len and g.start(n) // self.page_size < req.first[j]:
                    raise InvalidArgument(
                        f"cannot truncate to {n} tokens: a query there sees the {g.describe()} "
                        f"group's keys from token {g.start(n)}, but this request holds its pages "
                        f"from page {req.first[j]} (token {req.first[j] * self.page_size}) on"
                    )
            self._cut(req, n)

    def finish(self, req: GroupedRequest, tokens: Any = None) -> None:
        """Cache the request's whole pages (full group) and the window before
        its cached end (windowed groups); release the rest."""
        self._check_req(req)
        with self._step():
            toks = req.full.tokens.numpy() if tokens is None else as_id_array(tokens, "tokens")
            self._end(req, cache=True, tokens=tokens, toks=toks)

    def abort(self, req: GroupedRequest) -> None:
        """Drop everything the request holds without caching anything."""
        self._check_req(req)
        with self._step():
            self._end(req, cache=False)

    # ----- page tables ---------------------------------------------------------------

    def page_table(
        self, reqs: Sequence[GroupedRequest], device: str | torch.device | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group, FlashInfer's CSR (``kv_indptr [B + 1]``, ``kv_indices``,
        ``kv_last_page_len [B]``, all ``int32``) over that group's pool. A
        windowed group's rows start at each request's first kept page."""
        reqs = list(reqs)
        for r in reqs:
            self._check_req(r)
        full = self.full.page_table([r.full for r in reqs])
        out = [full]
        last = full[2]
        for j in range(len(self.windowed)):
            ws = [r.windows[j] for r in reqs]
            ptr = np.zeros(len(ws) + 1, dtype=_I32)
            np.cumsum([w.size for w in ws], out=ptr[1:])
            idx = np.concatenate(ws) if ws else np.zeros(0, dtype=_I32)
            out.append((torch.from_numpy(ptr), torch.from_numpy(idx.astype(_I32)), last))
        if device is not None:
            out = [tuple(x.to(device) for x in t) for t in out]  # type: ignore[misc]
        return out

    def window_offsets(self, reqs: Sequence[GroupedRequest]) -> list[list[int]]:
        """Per windowed group, per request: tokens before its first kept page
        (what the group's page table leaves out)."""
        return [[r.first[j] * self.page_size for r in reqs] for j in range(len(self.windowed))]

    # ----- cache management ----------------------------------------------------------

    def evict(self, n_pages: int) -> int:
        """Evict least-recently-used prefixes of the full group (their windowed
        entries go with them); returns full pages released."""
        with self._step():
            got = self.tree.evict(n_pages)
            for j in range(len(self.windowed)):
                self._sweep(j)
            return got

    def reset(self) -> None:
        """Forget every cached prefix (refused while requests run)."""
        with self._step():
            self.full.reset()
            for j in range(len(self.windowed)):
                self._sweep(j)

    def stats(self) -> dict[str, Any]:
        """The pool's stats (per group under ``groups``) and the cache's."""
        return self.pool.stats()

    def check_invariants(self, *, exclusive: bool = False) -> None:
        """The full cache's checks, each group pool's, and the windowed
        accounting: every windowed page's refcount is the number of table
        entries and running requests holding it; a request holds exactly the
        pages ``first .. num_pages`` of each windowed group; with
        ``exclusive`` no other windowed page is allocated."""
        with self._lock:
            self.full.check_invariants(exclusive=exclusive)
            self.pool.check_invariants()
            for j, g in enumerate(self.windowed):
                pool = self.pool.pools[j + 1]
                count: dict[int, int] = {}
                for fid in self._order[j]:
                    w = int(self._table[j][fid])
                    if w < 0:
                        raise AssertionError(f"group {g.describe()}: ordered entry {fid} unmapped")
                    count[w] = count.get(w, 0) + 1
                mapped = int((self._table[j] >= 0).sum())
                if mapped != len(self._order[j]):
                    raise AssertionError(
                        f"group {g.describe()}: {mapped} table entries, "
                        f"{len(self._order[j])} ordered"
                    )
                for r in self._running():
                    if r.windows[j].size != max(0, r.full.num_pages - r.first[j]):
                        raise AssertionError(
                            f"group {g.describe()}: a request holds {r.windows[j].size} pages for "
                            f"full pages {r.first[j]}..{r.full.num_pages}"
                        )
                    for w in r.windows[j].tolist():
                        count[w] = count.get(w, 0) + 1
                if count:
                    ids = np.fromiter(count, dtype=_I32)
                    rcn = pool.allocator.refcount(ids).numpy()
                    want = np.fromiter(count.values(), dtype=_I32)
                    bad = np.nonzero(rcn != want)[0]
                    if bad.size:
                        i = int(bad[0])
                        raise AssertionError(
                            f"group {g.describe()}: page {int(ids[i])} has refcount {int(rcn[i])}, "
                            f"{int(want[i])} holders"
                        )
                if exclusive:
                    used = pool.allocator.total_pages() - pool.allocator.free_pages()
                    if used != len(count):
                        raise AssertionError(
                            f"group {g.describe()}: {used} pages allocated, {len(count)} accounted"
                        )

    # ----- internals -----------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        """One public call: under the lock, after repairing what an earlier
        interrupted call left (:meth:`_reconcile`), and repairing again when
        this one raises, so every call completes or leaves nothing half-done."""
        with self._lock:
            if self._dirty:
                self._reconcile()
            try:
                yield
            except BaseException:
                self._dirty = True
                self._reconcile()
                raise

    def _end(
        self, req: GroupedRequest, *, cache: bool, tokens: Any = None, toks: Any = None
    ) -> None:
        """Finish (``cache``) or abort ``req``: the full request in one core call,
        then its windowed pages (the window before its end into the tables)."""
        if cache:
            self.full.finish(req.full, tokens)
        else:
            self.full.abort(req.full)
        try:
            if cache:
                self._cache_windows(req, toks)
        finally:
            self._drop_windows(req)

    def _cut(self, req: GroupedRequest, n: int) -> None:
        """Truncate ``req`` to ``n`` tokens: the full request (one core call),
        then each windowed group's pages past it (unrecorded, then released)."""
        self.full.truncate(req.full, n)
        keep = -(-n // self.page_size)
        for j in range(len(self.windowed)):
            w = req.windows[j]
            cut = max(0, keep - req.first[j])
            if cut < w.size:
                req.windows[j] = w[:cut]
                self._release(j, w[cut:])

    def _reconcile(self) -> None:
        """Repair what an interrupted call left half-done.

        Every multi-step change is ordered so that an interruption can only
        leave a windowed page with more references than holders (taken before
        it is recorded; unrecorded before it is released), a request's page
        list longer than its full pages (the full truncate is one core call,
        before the windowed one), or the eviction order out of step with the
        tables. The windowed pools are this cache's own, so their holders are
        exactly the tables and the running requests: release the excess,
        trim the lists, rebuild the order.
        """
        for r in self._running():
            for j in range(len(self.windowed)):
                keep = max(0, r.full.num_pages - r.first[j])
                w = r.windows[j]
                if w.size > keep:
                    r.windows[j] = w[:keep]
                elif w.size < keep:
                    # A request whose begin was interrupted before it held its
                    # window (never returned to the caller): end it.
                    self.full.abort(r.full)
                    self._drop_windows(r)
                    break
        running = self._running()
        for j in range(len(self.windowed)):
            t, order = self._table[j], self._order[j]
            mapped = np.nonzero(t >= 0)[0]
            known = [f for f in order if t[f] >= 0] if len(order) else []
            seen = set(known)
            self._order[j] = dict.fromkeys(known + [int(f) for f in mapped if int(f) not in seen])
            pool = self.pool.pools[j + 1]
            pps = pool.pages_per_segment
            live = [
                np.arange(sid * pps, (sid + 1) * pps, dtype=_I32)
                for sid in pool.allocator.segments()
            ]
            if not live:
                continue
            ids = np.concatenate(live)
            holders = np.zeros(ids.size, dtype=np.int64)
            held = [t[mapped]] + [r.windows[j] for r in running]
            flat = np.concatenate(held) if held else np.zeros(0, dtype=_I32)
            # A page id indexes ids by its position among the live segments.
            where = np.searchsorted(ids, flat)
            np.add.at(holders, where, 1)
            extra = pool.allocator.refcount(ids).numpy().astype(np.int64) - holders
            while (extra > 0).any():
                pool.allocator.release(ids[extra > 0])
                extra -= extra > 0
        self._dirty = False

    def _running(self) -> list[GroupedRequest]:
        return [r for r in list(self._requests) if r.state == "running"]

    def _check_req(self, req: Any) -> None:
        if not isinstance(req, GroupedRequest):
            raise TypeError(
                f"expected a GroupedRequest from GroupedPrefixCache.begin, got {type(req).__name__}"
            )
        if req._cache is not self:
            raise InvalidArgument("this request was begun on a different GroupedPrefixCache")

    def _lookup(self, j: int, ids: npt.NDArray[Any]) -> npt.NDArray[np.int32]:
        t = self._table[j]
        out = np.full(ids.shape, -1, dtype=_I32)
        ok = ids < t.size
        out[ok] = t[ids[ok]]
        return out

    def _usable(self, ids: npt.NDArray[Any], length: int) -> int:
        """The longest page boundary ``L <= length`` at which every windowed group
        holds the pages of ``[start(L), L)`` for the matched full pages ``ids``."""
        ps = self.page_size
        n = length // ps
        if n == 0 or not self.windowed:
            return n * ps
        ok = np.ones(n, dtype=bool)
        pos = np.arange(n)
        ends = (pos + 1) * ps
        for j, g in enumerate(self.windowed):
            have = self._lookup(j, ids[:n]) >= 0
            last_gap = np.maximum.accumulate(np.where(have, -1, pos))
            run = pos - last_gap
            ok &= run * ps >= ends - self._starts(g, ends)
        good = np.nonzero(ok)[0]
        return int(good[-1] + 1) * ps if good.size else 0

    @staticmethod
    def _starts(g: LayerGroup, ends: npt.NDArray[Any]) -> npt.NDArray[Any]:
        assert g.span is not None
        out: npt.NDArray[Any] = (
            np.maximum(0, ends - g.span + 1) if g.kind == "sliding" else g.span * (ends // g.span)
        )
        return out

    def _held_for(self, ids: npt.NDArray[Any], length: int) -> list[npt.NDArray[np.int32]]:
        """Per windowed group, the pages a request resuming at ``length`` holds."""
        n = length // self.page_size
        out = []
        for j, g in enumerate(self.windowed):
            # What _usable checked is held: [start(length), length).
            first = g.start(length) // self.page_size
            out.append(self._lookup(j, ids[first:n]))
        return out

    def _trim(self, req: GroupedRequest) -> None:
        """Release the windowed pages before ``keep_from(seq_len)``."""
        n = req.full.seq_len
        for j, g in enumerate(self.windowed):
            k = g.keep_from(n, self.page_size)
            drop = k - req.first[j]
            if drop > 0:
                w = req.windows[j]
                # Publish the shorter list before releasing: an interrupt then
                # leaks at most these pages' memory, never a page held twice.
                req.windows[j], req.first[j] = w[drop:], k
                self._release(j, w[:drop])

    def _grow_windows(self, reqs: list[GroupedRequest], pages0: list[int]) -> None:
        """Give each windowed group a page for every full page the requests got
        since ``pages0``; all or none."""
        new = []
        for r, p0 in zip(reqs, pages0, strict=True):
            new.append(r.full._record.page_ids()[p0:])
        fresh = np.concatenate(new) if new else np.zeros(0, dtype=_I32)
        if fresh.size == 0:
            return
        taken: list[npt.NDArray[np.int32]] = []
        try:
            for j in range(len(self.windowed)):
                # These full pages were just allocated: any entry under their
                # ids belongs to the pages' previous life (evicted meanwhile).
                self._unmap(j, fresh)
                taken.append(self.pool.pools[j + 1].alloc(fresh.size).numpy())
        except BaseException:
            for j, w in enumerate(taken):
                self.pool.pools[j + 1].release(w)
            raise
        for j, w in enumerate(taken):
            at = 0
            for r, ids in zip(reqs, new, strict=True):
                if ids.size:
                    r.windows[j] = np.concatenate((r.windows[j], w[at : at + ids.size]))
                    at += ids.size

    def _window_slots(self, req: GroupedRequest, lo: int, hi: int) -> list[torch.Tensor]:
        ps = self.page_size
        pos = np.arange(lo, hi, dtype=np.int64)
        out = []
        for j in range(len(self.windowed)):
            page = req.windows[j][pos // ps - req.first[j]].astype(np.int64)
            out.append(torch.from_numpy(page * ps + pos % ps))
        return out

    def _cache_windows(self, req: GroupedRequest, toks: npt.NDArray[Any]) -> None:
        """After the full finish: record the windowed pages of the window before
        the cached end under the tree's page ids, taking the request's reference."""
        ps = self.page_size
        whole = toks.size // ps
        m = self.tree.match_prefix(toks[: whole * ps], req.namespace)
        ids = m.page_ids.numpy()
        end = m.length
        for j, g in enumerate(self.windowed):
            first = max(req.first[j], g.keep_from(end, ps))
            lo, hi = first, end // ps
            if hi <= lo:
                continue
            w = req.windows[j][lo - req.first[j] : hi - req.first[j]]
            fids = ids[lo:hi]
            self._ensure(j, int(fids.max()) + 1)
            t = self._table[j]
            free = t[fids] < 0
            take_f, take_w = fids[free], w[free]
            if take_f.size == 0:
                continue
            # Move the request's references into the table: unrecorded from the
            # request first, so an interruption leaves a surplus (_reconcile).
            keep = np.ones(req.windows[j].size, dtype=bool)
            keep[np.nonzero(free)[0] + (lo - req.first[j])] = False
            req.windows[j] = req.windows[j][keep]
            t[take_f] = take_w
            self._order[j].update(dict.fromkeys(take_f.tolist()))

    def _drop_windows(self, req: GroupedRequest) -> None:
        for j in range(len(self.windowed)):
            w = req.windows[j]
            req.windows[j] = np.zeros(0, dtype=_I32)
            if w.size:
                self.pool.pools[j + 1].release(w)

    @contextlib.contextmanager
    def _evicting(self) -> Iterator[None]:
        self._evict_depth += 1
        try:
            yield
        finally:
            self._evict_depth -= 1

    def _release(self, j: int, ids: npt.NDArray[np.int32]) -> None:
        """Release windowed pages of group ``j``. Inside an evictor (a pool is
        growing, its segments added so far recorded to retire on failure) the
        pool must not auto-shrink: that would retire a segment it just added,
        which its failure path then retires again (InvalidArgument). The
        evictor retires the other pools' empty segments itself (_reclaim)."""
        pool = self.pool.pools[j + 1]
        if self._evict_depth:
            pool.allocator.release(ids)
        else:
            pool.release(ids)

    def _ensure(self, j: int, size: int) -> None:
        t = self._table[j]
        if t.size < size:
            grown = np.full(max(size, 2 * t.size, 1024), -1, dtype=_I32)
            grown[: t.size] = t
            self._table[j] = grown

    def _unmap(self, j: int, fids: npt.NDArray[Any]) -> int:
        """Drop the entries of full pages ``fids``; returns pages released."""
        t = self._table[j]
        fids = fids[fids < t.size]
        hit = fids[t[fids] >= 0]
        if hit.size == 0:
            return 0
        w = t[hit].copy()
        t[hit] = -1
        order = self._order[j]
        for f in hit.tolist():
            order.pop(f, None)
        self._release(j, w)
        return int(hit.size)

    def _sweep(self, j: int) -> int:
        """Drop entries whose full page left the tree (refcount 0)."""
        if not self._order[j]:
            return 0
        fids = np.fromiter(self._order[j], dtype=_I32)
        full = self.pool.pools[0]
        # A freed full page's segment may have been retired since (the full
        # pool shrinks to give other groups budget): such an id is stale too,
        # and refcount() refuses it.
        live = np.isin(fids // full.pages_per_segment, full.allocator.segments())
        stale = ~live
        stale[live] = full.allocator.refcount(fids[live]).numpy() == 0
        return self._unmap(j, fids[stale])

    def _evict_window(self, j: int, n: int) -> int:
        """Free ``n`` pages of windowed group ``j``: stale entries, then entries
        no running request holds, oldest first; with none left, budget the
        other groups' caches hold (:meth:`_reclaim`). Returns pages released."""
        freed = self._evict_unheld(j, n)
        if freed == 0:
            freed = self._reclaim(j + 1)
        return freed

    def _evictable_window(self, j: int) -> int:
        return self._unheld_entries(j) + self._reclaimable(j + 1)

    def _unheld_entries(self, j: int) -> int:
        if not self._order[j]:
            return 0
        fids = np.fromiter(self._order[j], dtype=_I32)
        rcn = self.pool.pools[j + 1].allocator.refcount(self._table[j][fids]).numpy()
        return int((rcn == 1).sum())

    def _page_bytes(self, gi: int) -> float:
        p = self.pool.pools[gi]
        return p.segment_bytes / p.pages_per_segment

    def _reclaimable(self, gi: int) -> int:
        """Pages of group ``gi`` the budget the other groups' caches hold could
        pay for (an upper bound: their segments must empty to give it back);
        0 without a budget, where their memory does not limit ``gi``."""
        if self.pool._budget is None:
            return 0
        nbytes = 0.0
        if gi != 0:
            nbytes += self.tree.evictable_pages() * self._page_bytes(0)
        for j in range(len(self.windowed)):
            if j + 1 != gi:
                nbytes += self._unheld_entries(j) * self._page_bytes(j + 1)
        return int(nbytes // self._page_bytes(gi))

    def _reclaim(self, gi: int) -> int:
        """One step of freeing the budget the other groups' caches hold, for
        group ``gi``'s growth: a segment's worth of the full tree's least
        recently used pages (their windowed entries go with them), else of
        each other windowed group's unheld entries; then those groups' empty
        segments are retired. Returns pages released (0: nothing left)."""
        if self.pool._budget is None:
            return 0
        got = 0
        if gi != 0:
            got = self.tree.evict(self.pool.pools[0].pages_per_segment)
            for j in range(len(self.windowed)):
                got += self._sweep(j)
        if got == 0:
            for j in range(len(self.windowed)):
                if j + 1 != gi:
                    got += self._evict_unheld(j, self.pool.pools[j + 1].pages_per_segment)
        if got:
            for k, p in enumerate(self.pool.pools):
                if k != gi:
                    p.shrink()
        return got

    def _evict_unheld(self, j: int, n: int) -> int:
        """Drop up to ``n`` entries of windowed group ``j`` no running request
        holds (stale ones first, then oldest first)."""
        freed = self._sweep(j)
        if freed >= n or not self._order[j]:
            return freed
        fids = np.fromiter(self._order[j], dtype=_I32)
        rcn = self.pool.pools[j + 1].allocator.refcount(self._table[j][fids]).numpy()
        return freed + self._unmap(j, fids[rcn == 1][: n - freed])
