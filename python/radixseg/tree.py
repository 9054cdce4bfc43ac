"""The radix prefix tree with torch tensors at its edges.

:class:`RadixTree` is the Rust core's tree over a :class:`SegmentAllocator`'s
pages; this subclass converts tokens and page ids and returns a
:class:`MatchResult`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from radixseg import _core
from radixseg._convert import Uncopyable, as_count, as_id_array, as_namespace, to_tensor
from radixseg._core import InvalidHandle

__all__ = ["MatchResult", "RadixTree"]


class MatchResult(NamedTuple):
    """The longest cached prefix of a query.

    Attributes
    ----------
    page_ids : torch.Tensor
        ``int32 [length // page_size]``: the cached pages, in order.
    length : int
        Tokens matched, a multiple of ``page_size``.
    node : int
        Handle of the node that ends the match; pass it to ``lock``/``unlock``.
    """

    page_ids: torch.Tensor
    length: int
    node: int


class RadixTree(Uncopyable, _core.RadixTree):
    """Page-aligned prefix sharing over refcounted pages.

    Parameters
    ----------
    allocator : SegmentAllocator
        Whose pages the tree stores; the tree holds one reference to each page
        it caches and drops it on eviction, so a page a running request still
        references stays allocated.

    With ``page_size > 1`` only whole pages are cached and matched. Prefixes
    are never shared across namespaces (any ``int`` in ``0..2**64``: tenant,
    LoRA adapter, cache salt). Thread-safe; long calls release the GIL.

    Examples
    --------
    >>> from radixseg import SegmentAllocator
    >>> a = SegmentAllocator(page_size=2, pages_per_segment=64); a.add_segment()
    0
    >>> t = RadixTree(a)
    >>> pages = a.alloc(2)
    >>> t.insert([1, 2, 3, 4, 5], pages)   # the odd last token is not cached
    0
    >>> a.release(pages)                   # the tree keeps its own references
    >>> m = t.match_prefix([1, 2, 3, 9])
    >>> m.page_ids.tolist(), m.length
    ([0], 2)
    """

    def match_prefix(self, tokens: Any, namespace: int = 0) -> MatchResult:  # type: ignore[override]
        """Longest cached prefix of ``tokens`` (``[n]`` ints in ``0..2**31``).

        Refreshes the recency of the matched path. Lock ``result.node`` before
        anything can evict if the pages must survive.
        """
        ids, length, node = super().match_prefix(
            as_id_array(tokens, "tokens"), as_namespace(namespace)
        )
        return MatchResult(to_tensor(ids), length, node)

    def insert(self, tokens: Any, page_ids: Any, namespace: int = 0) -> int:
        """Cache ``tokens`` with ``page_ids`` (``[len(tokens) // page_size]``).

        Returns how many leading tokens were already cached. For that part the
        tree keeps its own pages: the caller still owns its references to the
        duplicates in ``page_ids`` and releases them. For the new part the
        tree retains the caller's pages (+1); the caller keeps its own
        reference too. All or none: bad input raises and changes nothing.
        """
        return super().insert(
            as_id_array(tokens, "tokens"),
            as_id_array(page_ids, "page ids"),
            as_namespace(namespace),
        )

    def acquire(self, tokens: Any, namespace: int = 0) -> MatchResult:  # type: ignore[override]
        """Start a request: match and lock ``result.node`` in one call.

        Nothing can evict between the match and the lock. The lock keeps the
        matched pages cached (and allocated) until :meth:`finish`; the caller
        takes no page references for them. Don't :meth:`reset` while requests
        are running: it drops locked nodes too.
        """
        ids, length, node = super().acquire(as_id_array(tokens, "tokens"), as_namespace(namespace))
        return MatchResult(to_tensor(ids), length, node)

    def finish(
        self,
        tokens: Any,
        page_ids: Any,
        namespace: int = 0,
        node: int | None = None,
        cache: bool = True,
        owned_from: int = 0,
    ) -> int:
        """End a request begun with :meth:`acquire`, all or nothing.

        ``page_ids`` holds one page per ``page_size`` tokens, the partial last
        page included; the first ``owned_from`` are the matched pages (held by
        the lock), the rest carry one reference of the caller's. With
        ``cache`` the whole pages are inserted (the tree retains those it did
        not cache yet); then ``node`` is unlocked (when given) and each page
        in ``page_ids[owned_from:]`` loses the caller's reference, so
        duplicates of cached pages and the partial last page are freed.
        Returns the tokens that were already cached (0 without ``cache``).
        """
        return super().finish(
            as_id_array(tokens, "tokens"),
            as_id_array(page_ids, "page ids"),
            as_namespace(namespace),
            None if node is None else _node(node),
            bool(cache),
            as_count(owned_from, "owned_from"),
        )

    def lock(self, node: Any) -> None:
        """Protect ``node`` and its ancestors from eviction until :meth:`unlock`."""
        super().lock(_node(node))

    def unlock(self, node: Any) -> None:
        """Undo one :meth:`lock`; unlocking an unlocked node raises ``InvalidArgument``."""
        super().unlock(_node(node))

    def lock_count(self, node: Any) -> int:
        """Locks held on ``node`` (its own and its descendants')."""
        return super().lock_count(_node(node))

    def evict(self, n_pages: Any) -> int:
        """Evict least-recently-used unlocked leaves until ``n_pages`` are released.

        Whole leaves go, so more may be released; returns the number released.
        """
        return super().evict(as_count(n_pages, "n_pages"))

    def stats(self) -> dict[str, int]:
        """Counters: cached tokens and pages, evictable and locked pages, nodes, bytes."""
        return {
            "cached_tokens": self.cached_tokens(),
            "cached_pages": self.cached_pages(),
            "evictable_pages": self.evictable_pages(),
            "locked_pages": self.locked_pages(),
            "nodes": self.node_count(),
            "metadata_bytes": self.metadata_bytes(),
        }


def _node(node: Any) -> int:
    """A node handle as the core takes it (an int64), else a typed error."""
    if isinstance(node, bool) or not isinstance(node, int):
        raise TypeError(f"node must be an int handle from match_prefix/acquire, got {node!r}")
    if not -(2**63) <= node < 2**63:
        raise InvalidHandle(f"node handle {node} is not a handle this tree issued")
    return node
