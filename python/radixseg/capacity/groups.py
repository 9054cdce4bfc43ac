"""Layer groups: layers that attend to the same span of the context.

A hybrid model (Llama 4, Gemma 2/3, Qwen2 with ``max_window_layers``, gpt-oss)
mixes full-attention layers with sliding-window or chunked layers. Layers of
one kind and span form a :class:`LayerGroup`; a windowed group needs only the
keys its queries can see, so it keeps a few pages per request where a full
group keeps them all. This module is the arithmetic both the planner and
:class:`radixseg.grouped.GroupedPrefixCache` use, so that the plan and the
pool agree page for page. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixseg._core import InvalidArgument
from radixseg.capacity.geometry import KVGeometry

__all__ = ["KINDS", "LayerGroup", "layer_groups"]

KINDS = ("full", "sliding", "chunked")


@dataclass(frozen=True)
class LayerGroup:
    """Layers that see the same keys.

    Attributes
    ----------
    kind : str
        ``"full"`` (every earlier key), ``"sliding"`` (the last ``span`` keys,
        the query's own included, as transformers' ``sliding_window``) or
        ``"chunked"`` (keys of the query's own ``span``-token chunk, chunks
        counted from the sequence's first token, as Llama 4).
    span : int or None
        The window ``W`` or chunk ``C`` in tokens; ``None`` for ``"full"``.
    layers : tuple of int
        The model's layer indices in this group, ascending.
    """

    kind: str
    span: int | None
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"layer group kind {self.kind!r} is not one of {KINDS}")
        if (self.kind == "full") != (self.span is None) or (
            self.span is not None and self.span < 1
        ):
            raise InvalidArgument(
                f"a {self.kind!r} layer group has span {self.span!r}: full groups have none, "
                f"sliding and chunked groups a positive window or chunk"
            )
        if not self.layers:
            raise InvalidArgument("a layer group needs at least one layer")

    @property
    def windowed(self) -> bool:
        """Whether the group keeps only part of the context."""
        return self.kind != "full"

    def start(self, pos: int) -> int:
        """The first key position a query at ``pos`` sees (also: the first token a
        request resuming at ``pos`` needs this group to hold)."""
        if self.span is None:
            return 0
        if self.kind == "sliding":
            return max(0, pos - self.span + 1)
        return self.span * (pos // self.span)

    def keep_from(self, n: int, page_size: int) -> int:
        """The first page a request holding ``n`` tokens still needs.

        Its next query is at ``n`` or later; the page-aligned boundary just
        below it, ``page_size * ((n - 1) // page_size)``, is where a later
        request that shares these tokens resumes, so the window before that
        boundary is kept too (one page more than the query alone needs).
        """
        if self.span is None or n == 0:
            return 0
        return self.start(page_size * ((n - 1) // page_size)) // page_size

    def pages_held(self, n: int, page_size: int) -> int:
        """Pages a request of ``n`` tokens holds in this group between steps."""
        return -(-n // page_size) - self.keep_from(n, page_size)

    def describe(self) -> str:
        what = "full" if self.span is None else f"{self.kind} {self.span:,}"
        return f"{what}: {len(self.layers)} layers"


def layer_groups(geometry: KVGeometry) -> list[LayerGroup]:
    """The layer groups of ``geometry``: the full group first, then windowed
    groups by ascending span (sliding before chunked at equal span)."""
    by_key: dict[tuple[str, int | None], list[int]] = {}
    for i, (kind, span) in enumerate(
        zip(geometry.layer_kinds, geometry.layer_windows, strict=True)
    ):
        by_key.setdefault((kind, span), []).append(i)

    def order(key: tuple[str, int | None]) -> tuple[int, int, int]:
        kind, span = key
        return (0 if span is None else 1, span or 0, KINDS.index(kind))

    return [LayerGroup(k, s, tuple(by_key[(k, s)])) for k, s in sorted(by_key, key=order)]
