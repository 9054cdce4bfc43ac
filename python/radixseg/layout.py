"""SegmentLayout: where every byte of a segment lives, written down once.

A segment is one ``uint8`` buffer holding, in this order and each part
256-byte aligned: K ``[layers, pages, page_size, kv_heads, head_dim]``, V (the
same), and for FP8 storage the float32 scales of K and of V
``[layers, pages, page_size, kv_heads]``. :class:`~radixseg.KVPool` computes
one layout and builds its tensor views from it; the Triton launchers take its
element strides, the native CPU kernel its byte offsets, as plain values; the
capacity planner (``radixseg plan``) sizes segments with
:meth:`SegmentLayout.pages_fitting`, as the pool does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch

__all__ = ["ALIGN", "ELEMENT_LIMIT", "MAX_PAGES_PER_SEGMENT", "SegmentLayout"]

#: Byte alignment of each part of a segment.
ALIGN = 256
#: Most elements of one K or V tensor of a segment: kernels index inside a
#: segment with 32-bit offsets.
ELEMENT_LIMIT = 2**31 - 1
#: Most pages of one segment (the core allocator's limit).
MAX_PAGES_PER_SEGMENT = 1 << 20

#: A page id or slot: a Python int, or elementwise for an integer array.
_Index = TypeVar("_Index", int, "torch.Tensor", "npt.NDArray[np.int64]")


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


@dataclass(frozen=True)
class SegmentLayout:
    """The byte layout of one segment (the same for every segment of a pool).

    Attributes
    ----------
    num_layers, num_kv_heads, head_dim, page_size, pages_per_segment : int
        The pool's geometry.
    elem_bytes : int
        Bytes of one stored K/V element (1 for FP8).
    scales : bool
        Whether float32 scales per (token, KV head) follow K and V (FP8).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    pages_per_segment: int
    elem_bytes: int
    scales: bool

    @staticmethod
    def max_pages(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int) -> int:
        """The most pages a segment of this geometry may hold: at most
        :data:`MAX_PAGES_PER_SEGMENT`, and K (and V) under :data:`ELEMENT_LIMIT`
        elements. 0 when a single page is past the element limit."""
        elems_per_page = num_layers * page_size * num_kv_heads * head_dim
        return min(MAX_PAGES_PER_SEGMENT, ELEMENT_LIMIT // elems_per_page)

    @classmethod
    def pages_fitting(
        cls,
        segment_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        elem_bytes: int,
        scales: bool,
    ) -> int:
        """The largest ``pages_per_segment`` whose segment, every part aligned,
        takes at most ``segment_bytes`` (within :meth:`max_pages`); 0 when not
        even one page fits. How :class:`~radixseg.KVPool` and ``radixseg plan``
        turn a segment size in bytes into pages.

        >>> SegmentLayout.pages_fitting(64 << 20, 32, 8, 128, 16, 1, True)
        62
        """

        def size(pages: int) -> int:
            geometry = (num_layers, num_kv_heads, head_dim, page_size)
            return cls(*geometry, pages, elem_bytes, scales).segment_bytes

        # Alignment only adds bytes, so the unaligned count bounds the answer.
        per_token = num_kv_heads * (2 * head_dim * elem_bytes + (8 if scales else 0))
        lo = 0  # size(lo) <= segment_bytes < size(hi + 1)
        hi = min(
            cls.max_pages(num_layers, num_kv_heads, head_dim, page_size),
            segment_bytes // (num_layers * page_size * per_token),
        )
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if size(mid) <= segment_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @property
    def tokens(self) -> int:
        """Token slots in a segment."""
        return self.pages_per_segment * self.page_size

    @property
    def kv_bytes(self) -> int:
        """Bytes of K (and of V) in a segment, all layers."""
        return self.num_layers * self.tokens * self.num_kv_heads * self.head_dim * self.elem_bytes

    @property
    def scale_bytes(self) -> int:
        """Bytes of K's (and of V's) scales in a segment, all layers (0 without scales)."""
        return self.num_layers * self.tokens * self.num_kv_heads * 4 if self.scales else 0

    @property
    def offsets(self) -> tuple[int, int, int, int]:
        """Byte offsets of K, V, K scales and V scales in the buffer."""
        kv = _round_up(self.kv_bytes, ALIGN)
        sc = _round_up(self.scale_bytes, ALIGN)
        return (0, kv, 2 * kv, 2 * kv + sc)

    @property
    def segment_bytes(self) -> int:
        """Bytes of one segment buffer."""
        return 2 * _round_up(self.kv_bytes, ALIGN) + 2 * _round_up(self.scale_bytes, ALIGN)

    def layer_offsets(self, layer: int) -> tuple[int, int, int, int]:
        """Byte offsets of ``layer``'s K, V, K scales and V scales in the buffer."""
        kv = self.kv_bytes // self.num_layers * layer
        sc = self.scale_bytes // self.num_layers * layer
        k, v, ks, vs = self.offsets
        return (k + kv, v + kv, ks + sc, vs + sc)

    @property
    def strides(self) -> dict[str, int]:
        """Element strides of K/V (``layer``, ``page``, ``token``, ``head``) and of
        the scales (``scale_layer``, ``scale_page``, ``scale_token``; head stride 1)."""
        h, d, ps = self.num_kv_heads, self.head_dim, self.page_size
        return {
            "layer": self.tokens * h * d,
            "page": ps * h * d,
            "token": h * d,
            "head": d,
            "scale_layer": self.tokens * h,
            "scale_page": ps * h,
            "scale_token": h,
        }

    def launch_args(self, layer: int) -> dict[str, int]:
        """The layout arguments every Triton kernel over segments takes for ``layer``."""
        st = self.strides
        return {
            "layer_off": layer * st["layer"],
            "scale_layer_off": layer * st["scale_layer"],
            "stride_page": st["page"],
            "stride_tok": st["token"],
            "stride_head": st["head"],
            "sstride_page": st["scale_page"],
            "sstride_tok": st["scale_token"],
            "pages_per_segment": self.pages_per_segment,
        }

    def split(self, page_id: _Index) -> tuple[_Index, _Index]:
        """``(segment, page in segment)`` of a page id, or elementwise of an
        integer tensor or array of them.

        >>> SegmentLayout(1, 1, 8, 4, 16, 4, False).split(35)
        (2, 3)
        """
        segment = page_id // self.pages_per_segment
        return segment, page_id - segment * self.pages_per_segment

    def split_slot(self, slot: _Index) -> tuple[_Index, _Index]:
        """``(segment, token slot in segment)`` of a slot (``page_id * page_size +
        offset``), or elementwise of an integer tensor or array of them."""
        segment = slot // self.tokens
        return segment, slot - segment * self.tokens
