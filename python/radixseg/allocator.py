"""The segment allocator with torch tensors at its edges.

:class:`SegmentAllocator` is the Rust core's allocator; this subclass only
converts page ids: any array-like goes in, ``torch.int32`` CPU tensors come out.
"""

from __future__ import annotations

from typing import Any

import torch

from radixseg import _core
from radixseg._convert import Uncopyable, as_count, as_id_array, to_tensor

__all__ = ["SegmentAllocator"]


class SegmentAllocator(Uncopyable, _core.SegmentAllocator):
    """Refcounted KV pages grouped in segments; page ids never move.

    Parameters
    ----------
    page_size : int
        Tokens per page id, ``1..=1024`` (the radix tree matches in these
        units; :class:`KVPool` stores power-of-two pages, and a sharded pool's
        virtual page is ``page_size * ranks``).
    pages_per_segment : int
        Pages per segment (the unit of growth and release), ``1..=2**20``.
    max_segments : int, optional
        A hard cap on live segments; at most ``2**31 // pages_per_segment``
        (page ids are int32).

    Starts with no segments: call :meth:`add_segment` before allocating.
    Growth that must prepare a segment's bytes under its id first (as
    :class:`radixseg.KVPool` does) takes two steps: :meth:`reserve_segment`
    hands out an id, closed, then :meth:`open_segment` makes its pages
    allocatable, or :meth:`cancel_segment` gives the id back.
    ``alloc``, ``retain`` and ``release`` are thread-safe and release the GIL
    for batches of 32 or more.

    Examples
    --------
    >>> a = SegmentAllocator(page_size=16, pages_per_segment=1024)
    >>> a.add_segment()
    0
    >>> ids = a.alloc(3)
    >>> ids
    tensor([0, 1, 2], dtype=torch.int32)
    >>> a.retain(ids[:1]); a.refcount(ids)
    tensor([2, 1, 1], dtype=torch.int32)
    >>> a.release(ids); a.free_pages()   # one page still holds a reference
    1023
    """

    def __new__(
        cls, page_size: Any, pages_per_segment: Any, max_segments: Any = None
    ) -> SegmentAllocator:
        return super().__new__(
            cls,
            as_count(page_size, "page_size"),
            as_count(pages_per_segment, "pages_per_segment"),
            None if max_segments is None else as_count(max_segments, "max_segments"),
        )

    def retire_segment(self, segment: Any) -> None:
        """Retire an empty segment (every page free); its id may be reused later.

        Raises :class:`radixseg.SegmentBusy` (with ``used_pages``) while any
        page of it is referenced, :class:`radixseg.InvalidHandle` for a
        segment that is not live.
        """
        super().retire_segment(as_count(segment, "segment"))

    def open_segment(self, segment: Any) -> None:
        """Make a segment id from :meth:`reserve_segment` live, every page free.

        Until then the reserved segment is not live: its pages are neither
        free nor allocatable and count in no page total, but its id is taken
        (``max_segments`` bounds live, retired and reserved ids together), so
        a reservation must end in ``open_segment`` or :meth:`cancel_segment`.
        Raises :class:`radixseg.InvalidArgument` (with ``segment``) for an id
        that is not reserved; nothing changes then.
        """
        super().open_segment(as_count(segment, "segment"))

    def cancel_segment(self, segment: Any) -> None:
        """Give back a segment id from :meth:`reserve_segment` without opening it
        (it becomes a retired id, reused by the next reservation). Raises as
        :meth:`open_segment` does."""
        super().cancel_segment(as_count(segment, "segment"))

    def is_live(self, segment: Any) -> bool:
        """Whether ``segment`` is a live segment id."""
        return super().is_live(as_count(segment, "segment"))

    def alloc(self, n: Any) -> torch.Tensor:  # type: ignore[override]
        """Allocate ``n`` pages, all or none.

        Returns an ``int32`` tensor ``[n]`` of page ids, each with refcount 1.
        Raises :class:`radixseg.OutOfPages` (with ``requested`` and
        ``available``) when fewer than ``n`` pages are free; nothing changes then.
        """
        return to_tensor(super().alloc(as_count(n, "n")))

    def retain(self, ids: Any) -> None:
        """Add one reference to each page in ``ids`` (shape ``[k]``); all or none."""
        super().retain(as_id_array(ids))

    def release(self, ids: Any) -> None:
        """Drop one reference from each page in ``ids``; all or none.

        A page whose refcount reaches 0 is free. Releasing a free page raises
        :class:`radixseg.DoubleFree` and changes nothing.
        """
        super().release(as_id_array(ids))

    def refcount(self, ids: Any) -> torch.Tensor:  # type: ignore[override]
        """Refcounts ``int32 [k]`` of ``ids`` (0 for a free page of a live segment)."""
        return to_tensor(super().refcount(as_id_array(ids)))

    def stats(self) -> dict[str, Any]:
        """A dict of counters: segments, total/free/used pages, metadata bytes."""
        total = self.total_pages()
        free = self.free_pages()
        return {
            "page_size": self.page_size,
            "pages_per_segment": self.pages_per_segment,
            "segments": len(self.segments()),
            "total_pages": total,
            "free_pages": free,
            "used_pages": total - free,
            "metadata_bytes": self.metadata_bytes(),
        }
