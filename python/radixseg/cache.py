"""PrefixCache: the request lifecycle over a KVPool and a RadixTree.

An engine calls, per request::

    req = cache.begin(prompt)             # reuse the longest cached prefix
    slots = cache.extend(req, req.uncached)   # pages for the rest: write KV there
    ...                                   # decode: extend(req, [token]) per step
    cache.finish(req)                     # cache its pages for later requests

and per decode step of a batch, ``cache.extend_each(reqs, next_tokens)`` (one
token per request, one core call) and ``cache.page_table(reqs)`` (FlashInfer's
CSR, one core call).

Page references: a request holds a lock on the node that ends its matched
prefix, which keeps the matched pages cached (no per-page references, so
``begin`` costs the same for a 10-token and a 10M-token prefix), and one
reference to every page ``extend`` allocated for it. ``finish`` inserts the
request's whole pages into the tree (the tree takes its own reference to pages
it did not already cache), unlocks, and drops the request's references:
duplicates of already-cached pages and the partially filled last page go back
to the allocator. ``abort`` does the same without inserting.

Speed: each of these calls is one call into the Rust core, which validates
its input in the pass that uses it. The request's state lives there, and it
keeps no copy of the matched prefix's tokens (they are on the locked path), so
``finish`` compares only the tokens past the prefix. Once the pool's fixed
budget is spent, ``extend`` evicts for its shortfall inside the same call.
``python benchmarks/bench_radix.py`` times this path beside the raw tree and
SGLang's trees; ``benchmarks/bench_request_path.py`` per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from radixseg._convert import Uncopyable, as_count, as_id_array, as_namespace
from radixseg._core import InvalidArgument, RequestRecord
from radixseg.pool import KVPool
from radixseg.tree import RadixTree

__all__ = ["PrefixCache", "Request"]


class Request(Uncopyable):
    """One sequence's place in the cache; made by :meth:`PrefixCache.begin`.

    Its tokens, pages and prefix lock live in the Rust core (a
    ``RequestRecord``), where each change is one call: an exception or a
    thread switch between two of the cache's steps cannot leave pages nobody
    accounts for, and the request ends exactly once. A request dropped while
    running is aborted (its lock and pages go back).

    Attributes
    ----------
    namespace : int
        Its prefixes are shared only within this namespace.
    cached_len : int
        Prompt tokens reused from the cache (a multiple of ``page_size``).
    prompt : torch.Tensor
        ``int32 [prompt_len]``, the tokens given to ``begin``.
    """

    __slots__ = ("_cache", "_prompt", "_record", "cached_len", "namespace")

    def __init__(self, cache: PrefixCache, prompt: npt.NDArray[Any], record: RequestRecord) -> None:
        self._cache = cache
        self._record = record
        self._prompt = prompt
        self.namespace = record.namespace
        self.cached_len = record.matched_len

    @property
    def prompt(self) -> torch.Tensor:
        """``int32 [prompt_len]``: the tokens given to ``begin``."""
        p = self._prompt
        if p.dtype != np.int32:  # validated by begin: every token is below 2^31
            p = self._prompt = p.astype(np.int32)
        return torch.from_numpy(p)

    @property
    def state(self) -> str:
        """``"running"``, ``"finished"`` or ``"aborted"``."""
        return self._record.state

    @property
    def node(self) -> int | None:
        """Handle of the node whose lock the request holds (None once it ended)."""
        return self._record.node

    @property
    def seq_len(self) -> int:
        """Tokens whose KV the request holds (cached prefix + extended)."""
        return self._record.seq_len

    @property
    def num_pages(self) -> int:
        """Pages in the request's page list."""
        return self._record.num_pages

    @property
    def tokens(self) -> torch.Tensor:
        """``int32 [seq_len]``: the tokens whose KV the request holds (a copy):
        the cached prefix it reused and those it was extended with. After it
        ended, the tokens it held then."""
        prefix = self._prompt[: self.cached_len].astype(np.int32)
        return torch.from_numpy(np.concatenate((prefix, self._record.new_tokens())))

    @property
    def page_ids(self) -> torch.Tensor:
        """``int32 [num_pages]``: the request's pages in order (a copy)."""
        return torch.from_numpy(self._record.page_ids())

    @property
    def uncached(self) -> torch.Tensor:
        """``int32``: prompt tokens past the cached prefix (what prefill computes)."""
        return self.prompt[self.cached_len :]

    def __repr__(self) -> str:
        return (
            f"Request(state={self.state}, namespace={self.namespace}, prompt_len="
            f"{self._prompt.size}, cached_len={self.cached_len}, seq_len={self.seq_len}, "
            f"pages={self.num_pages})"
        )


def tree_cache_stats(tree: RadixTree) -> dict[str, Any]:
    """The counters of ``tree`` that ``pool.stats()`` reports for any cache
    attached to the pool: cached tokens and pages, evictable and locked pages,
    ``tree_nodes`` and ``tree_metadata_bytes``."""
    s = tree.stats()
    return {
        "cached_tokens": s["cached_tokens"],
        "cached_pages": s["cached_pages"],
        "evictable_pages": s["evictable_pages"],
        "locked_pages": s["locked_pages"],
        "tree_nodes": s["nodes"],
        "tree_metadata_bytes": s["metadata_bytes"],
    }


class PrefixCache(Uncopyable):
    """Requests over a :class:`KVPool`, sharing prefixes through a :class:`RadixTree`.

    Parameters
    ----------
    pool : KVPool
        Owns the pages; the cache attaches itself so that ``pool.alloc``
        evicts least-recently-used cached prefixes under budget pressure.
    max_context_len : int, optional
        Longest sequence a request may reach; only checked, never used to size
        anything (per-request page lists grow with the request).

    Examples
    --------
    >>> import torch
    >>> from radixseg import KVPool
    >>> pool = KVPool(1, 1, 8, page_size=4, pages_per_segment=64)
    >>> cache = PrefixCache(pool)
    >>> a = cache.begin(list(range(10)))
    >>> slots = cache.extend(a, a.uncached)      # 10 tokens -> 3 pages
    >>> slots.tolist()[:5]
    [0, 1, 2, 3, 4]
    >>> cache.finish(a)                          # caches 2 whole pages
    >>> b = cache.begin(list(range(9)) + [99])
    >>> b.cached_len, b.page_ids.tolist()
    (8, [0, 1])
    >>> cache.abort(b); pool.stats()["cached_tokens"]
    8
    """

    def __init__(self, pool: KVPool, *, max_context_len: int | None = None) -> None:
        if not isinstance(pool, KVPool):
            raise TypeError(f"pool must be a KVPool, got {type(pool).__name__}")
        ids = pool.allocator.page_size
        if ids != pool.page_size and type(self) is PrefixCache:
            raise TypeError(
                f"this pool's page ids name virtual pages of {ids} tokens, {pool.page_size} of "
                f"them stored here (a radixseg.distributed.ShardedKVPool); use "
                f"radixseg.distributed.ShardedPrefixCache, which returns this rank's slots"
            )
        self.pool = pool
        #: Tokens per page id (what the tree matches in; a sharded pool's virtual page).
        self.page_size = ids
        self.tree = RadixTree(pool.allocator)
        self.max_context_len = (
            None if max_context_len is None else as_count(max_context_len, "max_context_len")
        )
        pool.attach_cache(self)

    # ----- lifecycle ---------------------------------------------------------------

    def begin(self, tokens: Any, namespace: int = 0, *, leave_last: bool = True) -> Request:
        """Match and lock the longest cached prefix of ``tokens`` (``[n]`` ints).

        With ``leave_last`` (default) at most ``n - 1`` tokens are matched, so
        that the last prompt token is always computed and yields logits, as
        SGLang does. The returned request locks the matched prefix;
        ``req.cached_len`` tokens need no prefill.
        """
        prompt = as_id_array(tokens, "tokens")
        if self.max_context_len is not None:
            self._check_len(prompt.size)
        ns = as_namespace(namespace)
        # One core call validates the tokens, matches, locks and records the
        # request; if anything interrupts us after it, the dropped record
        # aborts itself.
        return Request(self, prompt, self.tree.begin_request(prompt, ns, leave_last))

    def extend(self, req: Request, new_tokens: Any) -> torch.Tensor:
        """Append ``new_tokens`` to ``req``; returns their ``int64 [T]`` slots.

        Fills the request's partially filled last page first, then allocates
        pages (growing the pool, evicting under pressure). All or none: when
        the pool cannot supply the pages the request is unchanged.
        """
        if req.__class__ is not Request or req._cache is not self:
            self._check_req(req)
        new = as_id_array(new_tokens, "new_tokens")
        record = req._record
        if self.max_context_len is not None:
            self._check_len(record.seq_len + new.size)
        # Validation, the pages the tokens need and their slots: one core
        # call, all or nothing, so there is nothing to undo if interrupted.
        # Once the pool's budget is spent, the core evicts for the shortfall in
        # the same call (evict_at); otherwise the pool decides: grow or evict.
        got = record.extend(new, True, self.pool._eviction_point())
        if got.__class__ is int:  # the pages it needs are not free
            # Grow the pool (or evict) until the allocation fits, then take it.
            got = self.pool._alloc_with(got, lambda: record.extend(new), tried=True)
        return torch.from_numpy(got)

    def extend_each(self, reqs: Sequence[Request], tokens: Any) -> torch.Tensor:
        """A decode step: append ``tokens[i]`` to ``reqs[i]``; returns the
        ``int64 [N]`` slots of the new tokens.

        One core call takes the pages the requests whose last page is full
        need (growing the pool, evicting under pressure) and records them:
        all or none, so when the pool cannot supply them no request changes.
        A request may appear once.
        """
        records = self._records(reqs)
        toks = as_id_array(tokens, "tokens")
        if self.max_context_len is not None:
            for r in records:
                self._check_len(r.seq_len + 1)
        extend_each = self.tree.extend_each
        got = extend_each(records, toks, True, self.pool._eviction_point())
        if got.__class__ is int:
            got = self.pool._alloc_with(got, lambda: extend_each(records, toks), tried=True)
        return torch.from_numpy(got)

    def truncate(self, req: Request, seq_len: int) -> None:
        """Undo :meth:`extend` calls: keep the first ``seq_len`` tokens and release
        the pages past them. The reused prefix (``cached_len``) cannot be dropped."""
        self._check_req(req)
        n = as_count(seq_len, "seq_len")
        pool = self.pool
        if pool._host_sids and n % self.page_size and req.cached_len <= n < req.seq_len:
            # The page that becomes the request's partly filled last page is
            # written next: it must be on the device (new KV is never written
            # to the host tier). Promoted first, so a refusal changes nothing.
            page = int(req.page_ids[(n - 1) // self.page_size])
            sid = page // pool.pages_per_segment
            if sid in pool._host_sids:
                pool.promote([sid])
        req._record.truncate(n)

    def slots(self, req: Request, start: int = 0, end: int | None = None) -> torch.Tensor:
        """``int64`` slots of the request's tokens ``start..end`` (default: all)."""
        start = as_count(start, "start")
        end = req.seq_len if end is None else as_count(end, "end")
        if not start <= end <= req.seq_len:
            raise InvalidArgument(f"slot range {start}..{end} is outside 0..{req.seq_len}")
        pos = torch.arange(start, end, dtype=torch.int64)
        ps = self.page_size
        return req.page_ids.index_select(0, pos // ps).to(torch.int64) * ps + pos % ps

    def finish(self, req: Request, tokens: Any = None) -> None:
        """Cache the request's whole pages, unlock, and drop its references.

        ``tokens`` (``[seq_len]`` ints, optional) replaces the tokens the
        request was extended with, for callers that extend with placeholders
        before the sampled tokens are known; its first ``cached_len`` must be
        the reused prefix (the cached KV is that prefix's), else
        :class:`InvalidArgument`. A request ends exactly once: a
        second ``finish`` or ``abort`` raises :class:`InvalidArgument` and
        changes nothing, whatever thread or copy calls it.
        """
        if req.__class__ is not Request or req._cache is not self:
            self._check_req(req)
        # One core call: the tokens are replaced and the request ends, or neither.
        req._record.end(True, None if tokens is None else as_id_array(tokens, "tokens"))

    def abort(self, req: Request) -> None:
        """Drop the request's references and lock without caching anything."""
        self._check_req(req)
        req._record.end(False)

    # ----- page tables -------------------------------------------------------------

    def page_table(
        self,
        reqs: list[Request],
        device: str | torch.device | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FlashInfer's paged-KV CSR for ``reqs``, all ``int32``.

        Returns ``kv_indptr [B + 1]``, ``kv_indices [kv_indptr[-1]]`` (page
        ids, request after request) and ``kv_last_page_len [B]`` (tokens in
        each request's last page, ``1..=page_size``; 0 for an empty request),
        on ``device`` (default CPU). With ``out`` (a contiguous 1-D ``int32``
        CPU tensor of at least ``kv_indptr[-1]`` elements, reused across decode
        steps), ``kv_indices`` is written into its front and returned as a
        view of it: at page size 1 the table has one entry per token, and a
        fresh one per step costs page faults on top of the copy.
        """
        records = self._records(reqs)
        if out is None:
            arrays = self.tree.page_table(records)
            indptr, indices, last = (torch.from_numpy(a) for a in arrays)
        else:
            if (
                not isinstance(out, torch.Tensor)
                or out.dtype != torch.int32
                or out.device.type != "cpu"
                or out.dim() != 1
                or not out.is_contiguous()
            ):
                raise InvalidArgument(
                    "out must be a contiguous 1-D int32 CPU tensor, got "
                    + (
                        f"{out.dtype} {tuple(out.shape)} on {out.device}"
                        if isinstance(out, torch.Tensor)
                        else type(out).__name__
                    )
                )
            ptr, _, lst = self.tree.page_table(records, out.detach().numpy())
            indptr, last = torch.from_numpy(ptr), torch.from_numpy(lst)
            indices = out[: int(ptr[-1])]
        if device is not None:
            indptr, indices, last = (x.to(device) for x in (indptr, indices, last))
        return indptr, indices, last

    # ----- cache management -----------------------------------------------------------

    def evict(self, n_pages: int) -> int:
        """Evict least-recently-used unlocked prefixes; returns pages the tree released."""
        return self.tree.evict(n_pages)

    def running_pages(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``(pages, indptr)``: request ``i``'s pages at ``pages[indptr[i]:indptr[i+1]]``,
        for every running request (the pool's tier placement reads it)."""
        return self.tree.running_pages()

    def evictable_pages(self) -> int:
        """Cached pages no running request locks (what :meth:`evict` can release)."""
        return self.tree.evictable_pages()

    def reset(self) -> None:
        """Forget every cached prefix. Refused while requests are running
        (their matched pages are held by the tree), as SGLang's flush_cache is."""
        running = self.tree.running_requests()
        if running:
            raise InvalidArgument(
                f"cannot reset with {running} request(s) running; finish or abort them first"
            )
        self.tree.reset()

    def cache_stats(self) -> dict[str, Any]:
        """Tree and hit-rate counters (merged into ``pool.stats()``)."""
        begun, requested, reused = self.tree.request_counters()
        return {
            **tree_cache_stats(self.tree),
            "evicted_pages": self.tree.evicted_pages(),
            "requests": begun,
            "running_requests": self.tree.running_requests(),
            "prompt_tokens": requested,
            "reused_tokens": reused,
            "hit_rate": reused / requested if requested else 0.0,
        }

    def stats(self) -> dict[str, Any]:
        """``pool.stats()``, which includes :meth:`cache_stats`."""
        return self.pool.stats()

    def check_invariants(self, *, exclusive: bool = False) -> None:
        """The tree's, the allocator's and the pool's invariant checks, and the
        page accounting: every page the tree or a running request holds has
        the references they account for. With ``exclusive`` (this cache is the
        pool's only user: nobody calls ``pool.alloc`` directly) every
        referenced page must be accounted for, so leaked pages are reported."""
        self.tree.check_invariants()
        self.tree.check_requests(exclusive)
        self.pool.check_invariants()

    # ----- validation ---------------------------------------------------------------

    def _check_req(self, req: Any) -> None:
        """A :class:`Request` of this cache, else a typed error. Whether it is
        still running is checked by the core, in the call that changes it."""
        if not isinstance(req, Request):
            raise TypeError(f"expected a Request from PrefixCache.begin, got {type(req).__name__}")
        if req._cache is not self:
            raise InvalidArgument("this request was begun on a different PrefixCache")

    def _records(self, reqs: Any) -> list[RequestRecord]:
        """The core records of ``reqs`` (a sequence of this cache's requests)."""
        if isinstance(reqs, Request) or not isinstance(reqs, Sequence):
            raise TypeError(f"reqs must be a sequence of Requests, got {type(reqs).__name__}")
        out = []
        for r in reqs:
            if r.__class__ is not Request or r._cache is not self:
                self._check_req(r)
            out.append(r._record)
        return out

    def _check_len(self, n: int) -> None:
        if self.max_context_len is not None and n > self.max_context_len:
            raise InvalidArgument(
                f"sequence of {n:,} tokens exceeds max_context_len={self.max_context_len:,}"
            )
