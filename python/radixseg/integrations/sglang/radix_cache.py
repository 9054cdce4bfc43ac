"""SGLang's ``RadixCache`` (the ``BasePrefixCache`` contract) over a radixseg RadixTree.

The tree shares the allocator's pool page refcounts: it holds one reference per
cached page and evicts whole least-recently-used leaves. The request-level calls
(``checkpoint``, ``release_kv_cache``, ``cache_*_req``) take SGLang's ``Req``
duck-typed and are all or nothing; the package docstring lists what is read and
written back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt
import torch

from radixseg._convert import Uncopyable, as_count
from radixseg._core import InvalidArgument
from radixseg.cache import tree_cache_stats
from radixseg.integrations.sglang.allocator import RadixsegTokenToKVPoolAllocator
from radixseg.integrations.sglang.namespaces import namespace_of
from radixseg.integrations.sglang.req_to_token import _record
from radixseg.integrations.sglang.types import (
    ROOT_NODE,
    DecLockRefResult,
    EvictResult,
    IncLockRefResult,
    InsertResult,
    MatchResult,
    RadixKey,
    TreeLock,
    _as_slots,
    _token_array,
)
from radixseg.tree import RadixTree

# Paths (page ids) remembered for unlocked nodes, for path_device_indices.
_PATH_MEMO = 4096


@dataclass
class _Checkpoint:
    """A checkpoint validated by ``_plan_checkpoint``, for ``_commit_checkpoint``."""

    rec: Any  #: the request's KV record (``req.kv`` or ``req``)
    toks: npt.NDArray[Any]  #: the page-aligned tokens to cache
    ns: int  #: their namespace
    protected: int  #: ``cache_protected_len`` before the checkpoint
    slots: torch.Tensor  #: the row's ``int64`` slots of ``toks``
    pages: torch.Tensor  #: their page ids
    cut: int  #: the prompt boundary to split the leaf at (0: none)


class _PoolEvictor:
    """What the KVPool calls to evict under budget pressure."""

    def __init__(self, tree: RadixTree) -> None:
        self.tree = tree

    def evict(self, n_pages: int) -> int:
        return self.tree.evict(n_pages)

    def evictable_pages(self) -> int:
        return self.tree.evictable_pages()

    def cache_stats(self) -> dict[str, Any]:
        return tree_cache_stats(self.tree)


class RadixsegRadixCache(Uncopyable):
    """SGLang's ``RadixCache`` (``BasePrefixCache``) over a radixseg RadixTree.

    Parameters
    ----------
    token_to_kv_pool_allocator : RadixsegTokenToKVPoolAllocator
        Whose pool's pages the tree caches; one cache per allocator.
    req_to_token_pool : optional
        SGLang's ``ReqToTokenPool`` or a :class:`ReqToTokenTable`; needed only
        by the request-level calls (``checkpoint``, ``cache_*_req``).
    evict_on_alloc : bool
        Let the allocator evict least-recently-used prefixes when it runs out
        (default); without it, ``alloc`` returns None and the engine evicts.

    Use :meth:`from_init_params` to build from SGLang's ``CacheInitParams``.
    Sizes are in tokens, as SGLang's. See the package docstring for the
    request duck type and for what differs from SGLang.
    """

    def __init__(
        self,
        token_to_kv_pool_allocator: RadixsegTokenToKVPoolAllocator,
        req_to_token_pool: Any = None,
        *,
        evict_on_alloc: bool = True,
    ) -> None:
        alloc = token_to_kv_pool_allocator
        if not isinstance(alloc, RadixsegTokenToKVPoolAllocator):
            raise TypeError(
                "token_to_kv_pool_allocator must be a RadixsegTokenToKVPoolAllocator, "
                f"got {type(alloc).__name__}"
            )
        if alloc.cache is not None:
            raise InvalidArgument("this allocator already serves a radix cache")
        self.token_to_kv_pool_allocator = alloc
        self.req_to_token_pool = req_to_token_pool
        self.page_size = alloc.page_size
        self.device = alloc.device
        self.disable = False
        self.is_eagle = False
        self.eviction_policy = "lru"
        self.root_node = ROOT_NODE
        self.evict_on_alloc = bool(evict_on_alloc)
        self.tree = RadixTree(alloc.pool.allocator)
        self._evictor = _PoolEvictor(self.tree)
        if self.evict_on_alloc:
            alloc.pool.attach_cache(self._evictor)
        alloc.attach_cache(self)
        self._namespaces: dict[tuple[str | None, str | None], int] = {(None, None): 0}
        self._namespace_keys: dict[int, tuple[str | None, str | None]] = {0: (None, None)}
        self._paths: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._pinned: dict[int, tuple[int, torch.Tensor | None]] = {}

    @classmethod
    def from_init_params(cls, params: Any, *, evict_on_alloc: bool = True) -> RadixsegRadixCache:
        """Build from SGLang's ``CacheInitParams`` (its allocator must be ours)."""
        if getattr(params, "disable", False):
            raise InvalidArgument("disable=True is not supported; run without a radix cache")
        cache = cls(
            params.token_to_kv_pool_allocator,
            params.req_to_token_pool,
            evict_on_alloc=evict_on_alloc,
        )
        if params.page_size != cache.page_size:
            raise InvalidArgument(
                f"page_size={params.page_size} but the allocator's pool has {cache.page_size}"
            )
        policy = str(getattr(params, "eviction_policy", "lru")).lower()
        if policy != "lru":
            raise InvalidArgument(f"eviction_policy={policy!r}: only 'lru' is supported")
        return cache

    # ----- keys and paths ---------------------------------------------------------------------

    def _namespace(self, extra_key: Any, cache_salt: Any) -> int:
        pair = (extra_key, cache_salt or None)
        ns = self._namespaces.get(pair)
        if ns is not None:
            return ns
        ns = namespace_of(*pair)
        seen = self._namespace_keys.get(ns)
        if seen is not None and seen != pair:
            raise InvalidArgument(
                f"(extra_key, cache_salt) {pair!r} and {seen!r} hash to the same radixseg "
                f"namespace {ns:#x}; they would share prefixes, so the request is refused"
            )
        self._namespaces[pair] = ns
        self._namespace_keys[ns] = pair
        return ns

    def _key(self, key: Any) -> tuple[npt.NDArray[Any], int]:
        """(page-aligned tokens, namespace) of a key."""
        toks = _token_array(key)
        ps = self.page_size
        toks = toks[: len(toks) // ps * ps]
        ns = self._namespace(getattr(key, "extra_key", None), getattr(key, "cache_salt", None))
        return toks, ns

    def _remember(self, node: int, pages: torch.Tensor) -> None:
        if node == ROOT_NODE:
            return
        if node in self._pinned:
            count, _ = self._pinned[node]
            self._pinned[node] = (count, pages)
            return
        self._paths[node] = pages
        self._paths.move_to_end(node)
        while len(self._paths) > _PATH_MEMO:
            self._paths.popitem(last=False)

    def _slots(self, pages: torch.Tensor) -> torch.Tensor:
        return self.token_to_kv_pool_allocator.slots_of(pages)

    def _pages_of_slots(self, slots: torch.Tensor, what: str) -> torch.Tensor:
        """Page ids (int64) of page-aligned, page-contiguous slots."""
        ps = self.page_size
        if ps == 1:
            return slots
        pages = slots[::ps] // ps
        want = (pages[:, None] * ps + torch.arange(ps, dtype=torch.int64)).reshape(-1)
        if not torch.equal(want, slots):
            raise InvalidArgument(
                f"{what} must be whole pages, each page's {ps} slots in order "
                f"(page * {ps} + 0..{ps - 1})"
            )
        return pages

    def _match(self, toks: npt.NDArray[Any], ns: int) -> tuple[int, int, torch.Tensor]:
        if len(toks) == 0:
            return 0, ROOT_NODE, torch.zeros(0, dtype=torch.int32)
        pages, length, node = self.tree.match_prefix(toks, ns)
        if length == 0:
            return 0, ROOT_NODE, pages
        self._remember(node, pages)
        return length, node, pages

    def _insert(
        self, toks: npt.NDArray[Any], pages: torch.Tensor, ns: int
    ) -> tuple[int, torch.Tensor]:
        """Insert; the tree takes over the caller's reference to the pages it newly
        caches. Returns (tokens already cached, the new pages)."""
        if len(toks) == 0:
            return 0, pages[:0]
        prefix = self.tree.insert(toks, pages, ns)
        fresh = pages[prefix // self.page_size :]
        if fresh.numel():
            self.token_to_kv_pool_allocator.hand_to_tree(fresh)
        return prefix, fresh

    # ----- BasePrefixCache: matching and inserting ------------------------------------------

    def match_prefix(self, params: Any) -> MatchResult:
        """Longest cached prefix of ``params.key`` (a ``MatchPrefixParams``; a bare
        key works too), in whole pages, within its namespace.

        Refreshes the path's recency and splits the node where the match ends
        inside it, as SGLang does. Lock ``last_device_node`` to keep the pages.
        """
        key = getattr(params, "key", params)
        toks, ns = self._key(key)
        length, node, pages = self._match(toks, ns)
        return MatchResult(
            device_prefix_len=length,
            last_device_node=node,
            last_host_node=node,
            best_match_node=node,
            full_kv_hit_length=length,
            device_indices=self._slots(pages),
        )

    def touch_prefix(self, key: Any) -> None:
        """Refresh the recency of ``key``'s cached path."""
        toks, ns = self._key(key)
        self._match(toks, ns)

    def insert(self, params: Any) -> InsertResult:
        """Cache ``params.key`` (whole pages) with ``params.value`` (its ``int64`` slots).

        Returns ``prefix_len``, the tokens that were already cached: their
        slots in ``value`` stay the caller's (free the duplicates past the
        protected prefix). The tree takes over the caller's reference to the
        rest. ``last_device_node`` is the node ending the key. A slot of the
        padding page 0 in ``value``, or no ``value`` at all, raises
        ``InvalidArgument`` and changes nothing.
        """
        key, value = params.key, params.value
        toks, ns = self._key(key)
        if value is None:
            raise InvalidArgument(
                f"insert needs params.value, the int64 slots holding the KV of the key's "
                f"{len(toks)} page-aligned tokens; SGLang's debug fallback of using the token "
                f"ids as slots would hand the tree pages nobody allocated"
            )
        slots = _as_slots(value, "value")
        if slots.numel() < len(toks):
            raise InvalidArgument(f"value holds {slots.numel()} slots for {len(toks)} tokens")
        slots = slots[: len(toks)]
        self._reject_padding(slots, "value")
        pages = self._pages_of_slots(slots, "value")
        prefix, _ = self._insert(toks, pages, ns)
        length, node, _ = self._match(toks, ns)
        return InsertResult(prefix_len=prefix, total_len=length, last_device_node=node)

    # ----- eviction and locks ------------------------------------------------------------------

    def evict(self, params: Any) -> EvictResult:
        """Evict least-recently-used unlocked leaves, whole, until at least
        ``params.num_tokens`` (an ``EvictParams`` or an int) are freed."""
        n = as_count(getattr(params, "num_tokens", params), "num_tokens")
        ps = self.page_size
        released = self.tree.evict(-(-n // ps))
        return EvictResult(num_tokens_evicted=released * ps)

    def evict_for_alloc(self, params: Any, **kwargs: Any) -> EvictResult:
        """:meth:`evict` (SGLang's allocation-driven entry point)."""
        if kwargs.get("allocation_reclaim_satisfied") is not None:
            raise NotImplementedError("joint reclaim is not supported")
        return self.evict(params)

    def inc_lock_ref(self, node: Any) -> IncLockRefResult:
        """Lock ``node`` and its ancestors; ``delta`` is minus the tokens that
        moved from evictable to protected (nodes whose count went 0 -> 1)."""
        if node == ROOT_NODE:
            return IncLockRefResult(delta=0)
        before = self.tree.evictable_pages()
        self.tree.lock(node)
        count, pages = self._pinned.get(node, (0, None))
        if count == 0:
            pages = self._paths.pop(node, None)
        self._pinned[node] = (count + 1, pages)
        return IncLockRefResult(delta=(self.tree.evictable_pages() - before) * self.page_size)

    def dec_lock_ref(self, node: Any, params: Any = None) -> DecLockRefResult:
        """Undo one :meth:`inc_lock_ref`; ``delta`` is the tokens that became
        evictable. Unlocking a node with no lock of its own raises."""
        if node == ROOT_NODE:
            return DecLockRefResult(delta=0)
        before = self.tree.evictable_pages()
        self.tree.unlock(node)
        count, pages = self._pinned.pop(node, (1, None))
        if count > 1:
            self._pinned[node] = (count - 1, pages)
        elif pages is not None:
            self._remember(node, pages)
        return DecLockRefResult(delta=(self.tree.evictable_pages() - before) * self.page_size)

    def lock(self, node: Any) -> TreeLock:
        """``inc_lock_ref`` for one holder; :meth:`unlock` releases it."""
        self.inc_lock_ref(node)
        return TreeLock(node)

    def unlock(self, lock: TreeLock | None) -> None:
        """Release a :meth:`lock` (None is ignored)."""
        if lock is not None:
            self.dec_lock_ref(lock.node)

    def is_root(self, node: Any) -> bool:
        """Whether ``node`` is the root handle."""
        return bool(node == ROOT_NODE)

    def root_node_handle(self, extra_key: str | None = None) -> int:
        """The root handle (one sentinel for every namespace)."""
        return ROOT_NODE

    def resolve_node_handle(self, node_handle: Any) -> Any:
        """Node handles are the nodes."""
        return node_handle

    def path_device_indices(self, node: Any) -> torch.Tensor:
        """``int64`` slots of the path from the root to ``node``.

        Known for nodes this cache returned from a match, an insert or a
        checkpoint (every locked one, and the most recent others).
        """
        if node == ROOT_NODE:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        pages = self._pinned[node][1] if node in self._pinned else self._paths.get(node)
        if pages is None:
            raise InvalidArgument(
                f"node {node} was not returned by this cache recently; match its prefix again"
            )
        self.tree.lock_count(node)  # raises InvalidHandle for a stale (evicted) node
        return self._slots(pages)

    def prefix_device_indices(self, req: Any) -> torch.Tensor:
        """Slots of ``req``'s matched prefix: ``req.prefix_len`` slots of its node's path."""
        path = self.path_device_indices(req.last_node)
        return path[: req.prefix_len]

    # ----- sizes --------------------------------------------------------------------------------

    def evictable_size(self) -> int:
        """Tokens cached in unlocked nodes."""
        return self.tree.evictable_pages() * self.page_size

    def protected_size(self) -> int:
        """Tokens cached in locked nodes (a node is locked while it or a descendant is)."""
        return self.tree.locked_pages() * self.page_size

    def full_evictable_size(self) -> int:
        """:meth:`evictable_size`."""
        return self.evictable_size()

    def full_protected_size(self) -> int:
        """:meth:`protected_size`."""
        return self.protected_size()

    def swa_evictable_size(self) -> int:
        """0: no sliding-window pool."""
        return 0

    def swa_protected_size(self) -> int:
        """0: no sliding-window pool."""
        return 0

    def total_size(self) -> int:
        """Tokens cached."""
        return self.tree.cached_tokens()

    def supports_prefix_sharing(self) -> bool:
        """True."""
        return True

    def supports_swa(self) -> bool:
        """False."""
        return False

    def supports_mamba(self) -> bool:
        """False."""
        return False

    def take_events(self) -> list[Any]:
        """No KV events are recorded."""
        return []

    def available_and_evictable_str(self) -> str:
        """SGLang's one-line summary of available and evictable tokens."""
        available_size = self.token_to_kv_pool_allocator.available_size()
        evictable_size = self.evictable_size()
        return (
            f"Available tokens: {available_size + evictable_size} "
            f"({available_size=} + {evictable_size=})\n"
        )

    def reset(self) -> None:
        """Drop every cached prefix and release the tree's page references.

        Refused while a node is locked (finish the running requests first).
        """
        if self.tree.locked_pages():
            raise InvalidArgument(
                f"cannot reset with {self.protected_size()} tokens locked by running requests"
            )
        self.tree.reset()
        self._paths.clear()
        self._pinned.clear()

    def all_values_flatten(self) -> torch.Tensor:
        """``int64`` slots of every cached page, each page once (SGLang's census
        of the tree's values), every namespace included.

        Pages come in a preorder walk of each namespace's tree (children in
        token order; SGLang's order is its children's insertion order). An
        empty tree gives an empty tensor (SGLang's raises). For tests and
        debugging: O(total path length), recency is not refreshed.
        """
        seen: dict[int, None] = {}
        for _ns, _tokens, pages in self.tree.cached_sequences():
            seen.update(dict.fromkeys(pages.tolist()))
        return self._slots(torch.tensor(list(seen), dtype=torch.int64))

    def pretty_print(self) -> None:
        """Print the tree's counters (the tree is not walked node by node)."""
        s = self.tree.stats()
        print(
            f"radixseg tree: {s['nodes']} nodes, evictable={self.evictable_size()}, "
            f"protected={self.protected_size()}"
        )
        print(f"#tokens: {self.total_size()}")

    def sanity_check(self) -> None:
        """The tree's and the allocator's invariant checks."""
        self.tree.check_invariants()

    # ----- requests (SGLang's Req, duck-typed) ------------------------------------------

    def _row(self, req: Any) -> tuple[Any, torch.Tensor]:
        pool = self.req_to_token_pool
        if pool is None:
            raise InvalidArgument("request-level calls need a req_to_token_pool")
        rec = _record(req)
        if rec.req_pool_idx is None:
            raise InvalidArgument("request holds no row (req_pool_idx is None)")
        return rec, pool.req_to_token[rec.req_pool_idx]

    @staticmethod
    def _protected_len(req: Any, rec: Any) -> int:
        n = getattr(rec, "cache_protected_len", None)
        if n is None:
            n = len(getattr(req, "prefix_indices", ()))
        return int(n)

    @staticmethod
    def _fill_ids(req: Any) -> Any:
        for name in ("full_untruncated_fill_ids", "fill_ids"):
            ids = getattr(req, name, None)
            if ids is not None:
                return ids
        return list(req.origin_input_ids) + list(req.output_ids)

    def _committed_len(self, req: Any, rec: Any, protected: int) -> int:
        """Tokens of ``req`` whose KV is computed: what a release caches and frees up to.

        SGLang 0.5.23's ``req.owned_kv_len()``; else ``kv_committed_len`` (on
        ``req.kv`` or, in SGLang 0.5.0-0.5.22, on ``req``); else, for older
        SGLang and duck types, the longest of ``len(fill_ids)``,
        ``len(origin_input_ids) + len(output_ids) - 1`` (the newest output
        token has no KV yet) and ``cache_protected_len`` (the tree holds that
        KV, so it was computed).
        """
        owned = getattr(req, "owned_kv_len", None)
        if callable(owned):
            return as_count(owned(), "req.owned_kv_len()")
        for holder in (rec, req):
            n = getattr(holder, "kv_committed_len", None)
            if n is not None:
                return as_count(n, "kv_committed_len")
        n = protected
        fill = getattr(req, "fill_ids", None)
        if fill is not None:
            n = max(n, len(fill))
        origin, output = getattr(req, "origin_input_ids", None), getattr(req, "output_ids", None)
        if origin is not None and output is not None:
            n = max(n, len(origin) + max(len(output) - 1, 0))
        elif fill is None:
            n = max(n, len(self._fill_ids(req)))
        return n

    def _reject_padding(self, slots: torch.Tensor, what: str, first_pos: int = 0) -> None:
        """Raise ``InvalidArgument`` naming the first of ``slots`` in the padding page 0.

        No slot of page 0 is ever handed out, so one there was never allocated:
        caching or freeing it would give the padding page away.
        """
        ps = self.page_size
        bad = (slots < ps).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise InvalidArgument(
                f"{what} holds slot {int(slots[i])} at position {first_pos + i}, in the "
                f"reserved padding page 0 (slots 0..{ps - 1}), which is never handed out: "
                f"that KV was never allocated"
            )

    def _check_owned(self, pages: torch.Tensor, what: str, first_pos: int) -> None:
        """The request's own pages (int64 ids): distinct and referenced, so that
        freeing each once cannot fail halfway."""
        if pages.numel() == 0:
            return
        uniq, counts = torch.unique(pages, return_counts=True)
        if int(counts.max()) > 1:
            dup = int(uniq[counts > 1][0])
            raise InvalidArgument(f"{what} from position {first_pos} lists page {dup} twice")
        rc = self.token_to_kv_pool_allocator.pool.allocator.refcount(pages)
        free = (torch.as_tensor(rc) == 0).nonzero()
        if free.numel():
            i = int(free[0, 0])
            raise InvalidArgument(
                f"{what} holds page {int(pages[i])} at position {first_pos + i * self.page_size},"
                f" which is free: the request does not hold it (freed already?)"
            )

    def _lock_node(self, req: Any) -> Any:
        """The node the request's lock holds (None or the root: nothing held)."""
        if hasattr(req, "lock"):
            return None if req.lock is None else req.lock.node
        return getattr(req, "last_node", None)

    def _check_unlockable(self, req: Any) -> None:
        """The request's lock can be released (so a release cannot fail after changes)."""
        node = self._lock_node(req)
        if node is None or node == ROOT_NODE:
            return
        self.tree.lock_count(node)  # raises InvalidHandle for a stale or foreign handle
        if self._pinned.get(node, (0, None))[0] < 1:
            raise InvalidArgument(
                f"the request's lock on node {node} is not held (unlocked already?)"
            )

    def _relock(self, req: Any, node: int) -> None:
        if hasattr(req, "lock"):
            new = self.lock(node)
            self.unlock(req.lock)
            req.lock = new
        else:
            self.inc_lock_ref(node)
            old = getattr(req, "last_node", None)
            if old is not None:
                self.dec_lock_ref(old)
        req.last_node = node

    def _unlock_req(self, req: Any) -> None:
        if hasattr(req, "lock"):
            self.unlock(req.lock)
            req.lock = None
        elif getattr(req, "last_node", None) is not None:
            self.dec_lock_ref(req.last_node)

    def _plan_checkpoint(self, req: Any, up_to: int) -> _Checkpoint:
        """Validate a checkpoint of ``req`` up to ``up_to``; changes nothing."""
        rec, row = self._row(req)
        ps = self.page_size
        up_to = as_count(up_to, "up_to")
        if up_to > row.numel():
            raise InvalidArgument(
                f"up_to={up_to} is past the request's req_to_token row of {row.numel()} slots"
            )
        ids = self._fill_ids(req)
        protected = self._protected_len(req, rec)
        key = RadixKey(
            ids,
            getattr(req, "extra_key", None),
            limit=up_to,
            cache_salt=getattr(req, "cache_salt", None),
        )
        toks, ns = self._key(key)
        n = len(toks)
        if protected % ps or protected > n:
            raise InvalidArgument(
                f"cache_protected_len={protected} must be page-aligned and at most the "
                f"{n} page-aligned tokens up to {up_to}"
            )
        slots = _as_slots(row[:n], "req_to_token row")
        self._reject_padding(slots, "the request's req_to_token row")
        pages = self._pages_of_slots(slots, "req_to_token row")
        self._check_owned(pages[protected // ps :], "the request's req_to_token row", protected)
        self._check_unlockable(req)
        origin = getattr(req, "origin_input_ids", None)
        cut = 0 if origin is None else len(origin) // ps * ps
        return _Checkpoint(rec, toks, ns, protected, slots, pages, cut if 0 < cut < n else 0)

    def _commit_checkpoint(self, req: Any, plan: _Checkpoint) -> None:
        """Carry out a validated checkpoint."""
        rec, toks, ns, protected = plan.rec, plan.toks, plan.ns, plan.protected
        slots, pages = plan.slots, plan.pages
        n = len(toks)
        prefix, _ = self._insert(toks, pages, ns)
        if plan.cut:
            # As SGLang: split the leaf at the prompt so the output can go alone.
            self.tree.insert(toks[: plan.cut], pages[: plan.cut // self.page_size], ns)
        if prefix > protected:
            self.token_to_kv_pool_allocator.free_segment(
                slots[protected:prefix], start_pos=protected
            )
        length, node, path = self._match(toks, ns)
        if length != n:  # pragma: no cover - the insert above cached all n
            raise InvalidArgument(f"checkpoint cached {length} of {n} tokens")
        new_slots = self._slots(path).to(torch.int64)
        if n > protected:
            row = self.req_to_token_pool.req_to_token[rec.req_pool_idx]
            where = (rec.req_pool_idx, slice(protected, n))
            values = new_slots[protected:].to(row.device)
            write = getattr(self.req_to_token_pool, "write", None)
            if write is not None:
                write(where, values)
            else:
                self.req_to_token_pool.req_to_token[where] = values
        if hasattr(rec, "cache_protected_len"):
            rec.cache_protected_len = n
        if hasattr(rec, "cache_inserted_len"):
            rec.cache_inserted_len = max(rec.cache_inserted_len, n)
        if hasattr(req, "prefix_indices"):
            req.prefix_indices = new_slots
        self._relock(req, node)

    def checkpoint(self, req: Any, *, up_to: int) -> None:
        """Cache the request's KV up to row position ``up_to`` (SGLang 0.5.23).

        Inserts the page-aligned part of its tokens with the slots of its row,
        frees the row's duplicates of pages that were already cached, points
        the row at the tree's pages, advances ``cache_protected_len`` to the
        cached length, and moves the request's lock to the node ending it.
        The partial last page stays the request's. All or nothing: the row,
        the protected length and the lock are checked before anything changes.
        """
        self._commit_checkpoint(req, self._plan_checkpoint(req, up_to))

    def cache_unfinished_req(self, req: Any, chunked: bool = False) -> None:
        """Cache a running request's KV so far: ``checkpoint(req,
        up_to=len(req.fill_ids))`` (the tokens computed so far; without
        ``fill_ids``, all of the request's tokens). Older SGLang's name; 0.5.23
        calls ``checkpoint``."""
        ids = getattr(req, "fill_ids", None)
        self.checkpoint(req, up_to=len(ids if ids is not None else self._fill_ids(req)))

    def release_kv_cache(
        self, req: Any, *, checkpoint: bool = True, kv_len: int | None = None
    ) -> None:
        """SGLang 0.5.23's ``release_kv_cache(req, tree_cache, checkpoint=...)``.

        ``kv_len`` (the request's computed KV; default as SGLang 0.5.23:
        ``req.owned_kv_len()``, else ``kv_committed_len``, else for older
        requests the longest of ``len(fill_ids)``, ``len(origin_input_ids) +
        len(output_ids) - 1`` and ``cache_protected_len``) is never taken
        below ``cache_protected_len``. With ``checkpoint`` the first
        ``kv_len`` tokens are cached first. Then the row's slots from
        ``cache_protected_len`` up to ``kv_len`` (the unaligned tail, or the
        whole uncached part) are freed, and so are the pages over-allocated
        past ``kv_len`` up to ``kv_allocated_len`` (when the request has one),
        the request's lock is dropped and its row is freed.

        All or nothing: every check (row, lengths, slots, held pages, lock)
        runs before anything changes, so a refused release leaves the tree,
        the lock and the row as they were.
        """
        self._release_request(req, checkpoint=checkpoint, kv_len=kv_len, overallocated=True)

    def cache_finished_req(self, req: Any, is_insert: bool = True) -> None:
        """Cache a finished request, free its duplicates and unaligned tail,
        unlock, and free its row (older SGLang's name; 0.5.23 calls
        ``release_kv_cache``): :meth:`release_kv_cache` with ``checkpoint=is_insert``,
        except that over-allocated slots past ``kv_committed_len`` are left
        to the caller, whose scheduler frees them after this call in the SGLang
        versions that use this name; ``req.pop_committed_kv_cache()`` is
        called when the request has it, as those versions do.
        """
        self._release_request(req, checkpoint=is_insert, kv_len=None, overallocated=False)

    def free_kv_row(self, kv: Any, ranges: Iterable[tuple[int, int]]) -> None:
        """Free ascending, disjoint, half-open position ranges of the row of the
        KV record ``kv`` (``req.kv``), all or nothing (SGLang 0.5.23's hook, which
        its ``common.release_kv_cache`` calls). Adjacent ranges are merged first,
        so a page split between them is freed once; empty ranges are skipped."""
        pool = self.req_to_token_pool
        if pool is None:
            raise InvalidArgument("free_kv_row needs a req_to_token_pool")
        if kv.req_pool_idx is None:
            raise InvalidArgument("the KV record holds no row (req_pool_idx is None)")
        row = pool.req_to_token[kv.req_pool_idx]
        merged: list[list[int]] = []
        for start, end in ranges:
            start, end = int(start), int(end)
            if end <= start:
                continue
            if end > row.numel():
                raise InvalidArgument(
                    f"range [{start}, {end}) runs past the row's {row.numel()} slots"
                )
            if merged and start == merged[-1][1]:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        self.token_to_kv_pool_allocator.free_segments(
            [(row[start:end], start) for start, end in merged]
        )

    def claim_kv_row(self, req: Any) -> bool:
        """SGLang 0.5.23's hook for streaming sessions that keep a row: never here."""
        return False

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        """SGLang 0.5.23's hook after a release: this cache keeps no per-request state."""

    def _release_request(
        self, req: Any, *, checkpoint: bool, kv_len: int | None, overallocated: bool
    ) -> None:
        rec, row = self._row(req)
        ps = self.page_size
        protected = self._protected_len(req, rec)
        if protected % ps:
            raise InvalidArgument(
                f"cache_protected_len={protected} is not page-aligned (page_size={ps})"
            )
        pop = getattr(req, "pop_committed_kv_cache", None)
        if kv_len is not None:
            kv_len = as_count(kv_len, "kv_len")
        elif callable(pop) and not callable(getattr(req, "owned_kv_len", None)):
            has_len = any(getattr(h, "kv_committed_len", None) is not None for h in (rec, req))
            if not has_len:  # nothing to read it from: pop it now
                kv_len, pop = as_count(pop(), "req.pop_committed_kv_cache()"), None
        if kv_len is None:
            kv_len = self._committed_len(req, rec, protected)
        kv_len = max(kv_len, protected)
        end = kv_len
        if overallocated:
            end = max(end, int(getattr(rec, "kv_allocated_len", 0) or 0))
        if end > row.numel():
            raise InvalidArgument(
                f"the request's KV runs to position {end} but its req_to_token row holds "
                f"{row.numel()} slots"
            )
        plan = self._plan_checkpoint(req, kv_len) if checkpoint else None
        own = _as_slots(row[protected:end], "req_to_token row")
        self._reject_padding(own, "the request's req_to_token row", protected)
        self._check_owned(own[::ps] // ps, "the request's req_to_token row", protected)
        self._check_unlockable(req)
        # Everything is checked: from here on nothing fails halfway.
        if callable(pop):
            pop()
        start = protected
        if plan is not None:
            self._commit_checkpoint(req, plan)
            start = len(plan.toks)
        over = -(-kv_len // ps) * ps  # over-allocated pages start past kv_len's page
        self.token_to_kv_pool_allocator.free_segments(
            [(row[start:kv_len], start), (row[over:end], over)]
        )
        self._unlock_req(req)
        free = getattr(self.req_to_token_pool, "free", None)
        if free is not None:
            free(req)

    def __repr__(self) -> str:
        return (
            f"RadixsegRadixCache(page_size={self.page_size}, total={self.total_size()}, "
            f"evictable={self.evictable_size()}, protected={self.protected_size()})"
        )
