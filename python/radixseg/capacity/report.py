"""The result of a capacity plan, and the table ``radixseg plan`` prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from radixseg.capacity.geometry import KVGeometry
from radixseg.capacity.tiers import TierPlan

__all__ = ["MAX_PAGE_SIZE", "SCALE_BYTES", "GroupPlan", "Plan"]

#: Bytes of one float32 scale. radixseg stores one per (token, KV head) for K
#: and for V when the KV dtype is FP8 (one per token per layer for MLA).
SCALE_BYTES = 4

#: Tokens of the largest page the core allocator takes (``MAX_PAGE_SIZE`` in
#: ``radixseg-core``); with context parallelism, of the largest virtual page.
MAX_PAGE_SIZE = 1024


@dataclass(frozen=True)
class GroupPlan:
    """What one layer group's pool in a :class:`radixseg.grouped.GroupedKVPool`
    holds for one request of ``Plan.context`` tokens on one device (cp == 1).

    Attributes
    ----------
    kind : str
        ``"full"``, ``"sliding"`` or ``"chunked"`` (see
        :class:`radixseg.capacity.groups.LayerGroup`).
    span : int or None
        The window or chunk in tokens; ``None`` for ``"full"``.
    layers : int
        Layers in the group (its pool's ``num_layers``).
    pages : int
        Pages of ``page_size`` tokens the request holds in the group between
        steps: ``ceil(context / page_size)`` for the full group,
        ``LayerGroup.pages_held(context, page_size)`` for a windowed one.
    pages_per_segment : int
        Pages per segment of the group's pool (``SegmentLayout.pages_fitting``
        for its layers under ``Plan.segment_bytes``).
    segment_bytes : int
        Bytes of one segment of the group's pool.
    segments : int
        Segments the pool reserves for ``pages``: ``ceil(pages / pages_per_segment)``.
    reserved_bytes : int
        ``segments * segment_bytes``: KV and FP8 scales, whole segments.
    """

    kind: str
    span: int | None
    layers: int
    pages: int
    pages_per_segment: int
    segment_bytes: int
    segments: int
    reserved_bytes: int


@dataclass(frozen=True)
class Plan:
    """A KV capacity plan; every size in bytes, every context in tokens.

    Per-token figures are split by kind. ``kv_*`` are the K/V (or MLA latent)
    bytes; ``scale_*`` are the float32 scales radixseg stores beside FP8 KV
    (zero for bf16/fp16/fp32), kept apart so the KV figures compare with other
    engines. ``*_per_token`` counts full-attention layers only: their bytes grow
    with the context. ``window_*_per_token`` is what windowed layers add per
    token until their window fills; after that they stay flat. ``*_per_device``
    is what one of ``tp`` ranks holds (KV heads split, or replicated when
    ``tp > num_kv_heads``; an MLA latent is on every rank); the others are
    for one copy of the whole model.

    The fit (``usable_bytes_per_device``, ``max_context_per_device``,
    ``devices_needed``) counts KV and scales against
    ``device_bytes * memory_fraction - weights_bytes / tp``; it is ``None``
    when ``device_bytes`` is not given. ``max_context_per_device`` is also
    ``None`` when every layer is windowed and the windows fit (no limit), and
    is rounded down to whole pages. ``devices_needed`` is ``tp`` times the
    number of TP groups that split the context between them (context
    parallelism), each group holding the weights once.

    Context parallelism (``cp`` ranks per TP rank, issue 19): a virtual page
    holds ``page_size * cp`` tokens, each rank stores ``page_size`` of them
    under the same page id, so every page id costs one ``page_size``-token page
    on every rank, filled or not. ``pages_per_rank`` is the page ids the
    context takes in the pool that grows with it (the one ``pages_per_segment``
    describes), ``ceil(context / (page_size * cp))``; ``segments_per_rank``
    the segments holding them. ``context_kv_bytes_per_rank`` and
    ``context_scale_bytes_per_rank`` are one rank's KV and scales in whole
    pages (TP split applied; windowed layers capped at their window);
    ``reserved_bytes_per_rank`` is what one rank's pool reserves: whole
    segments, plus the pages of windowed layers beside full ones. At
    ``cp == 1`` the per-rank figures are the per-device ones in whole pages
    and segments. ``max_context_with_cp`` is the largest context ``cp`` ranks
    hold in ``usable_bytes_per_device`` each (KV and scales in whole pages, a
    multiple of ``page_size * cp``; ``None`` without ``device_bytes`` or when
    every layer is windowed and the windows fit). ``ranks_needed`` is the
    fewest ranks that hold ``context`` the same way, whatever ``cp`` is; it
    may be past ``MAX_PAGE_SIZE // page_size``, the most ranks a page size allows;
    ``None`` without ``device_bytes`` or when not even one page per layer
    fits. The fit figures count pages, not whole segments, as the one-device
    fit counts tokens.

    Layer groups (one pool per group of layers of one kind and span, as
    :class:`radixseg.grouped.GroupedKVPool` keeps them): ``groups`` holds a
    :class:`GroupPlan` per group, the full group first, and
    ``reserved_bytes_grouped`` the sum of their ``reserved_bytes``: what a
    grouped pool reserves on one device for one request of ``context``
    tokens, windowed groups holding only the pages their window still needs.
    ``groups`` is empty and ``reserved_bytes_grouped`` ``None`` for ``cp > 1``,
    for MLA, and when one page of some group is past ``segment_bytes`` or
    the elements a segment may hold (the grouped pool would refuse those settings).

    Host tier (``host_bytes``, ``radixseg plan --host-memory``): ``tiers`` is a
    :class:`radixseg.capacity.tiers.TierPlan`, the context's KV and scales per
    device split between the device's usable bytes and the host tier, with the
    model's decode step time in place vs copy-back; ``None`` without ``host_bytes``.
    """

    geometry: KVGeometry
    kv_dtype: str
    dtype_bytes: int
    tp: int
    context: int
    page_size: int
    segment_bytes: int
    device_bytes: int | None
    weights_bytes: int
    memory_fraction: float
    kv_heads_per_device: int
    kv_bytes_per_token: int
    kv_bytes_per_token_per_device: int
    window_kv_bytes_per_token: int
    window_kv_bytes_per_token_per_device: int
    scale_bytes_per_token: int
    scale_bytes_per_token_per_device: int
    window_scale_bytes_per_token: int
    window_scale_bytes_per_token_per_device: int
    pages_per_segment: int
    tokens_per_segment: int
    context_kv_bytes: int
    context_kv_bytes_per_device: int
    context_scale_bytes: int
    context_scale_bytes_per_device: int
    usable_bytes_per_device: int | None
    max_context_per_device: int | None
    devices_needed: int | None
    cp: int = 1
    pages_per_rank: int = 0
    segments_per_rank: int = 0
    context_kv_bytes_per_rank: int = 0
    context_scale_bytes_per_rank: int = 0
    reserved_bytes_per_rank: int = 0
    max_context_with_cp: int | None = None
    ranks_needed: int | None = None
    groups: tuple[GroupPlan, ...] = ()
    reserved_bytes_grouped: int | None = None
    tiers: TierPlan | None = None

    def kv_bytes(self, context: int, per_device: bool = False) -> int:
        """KV bytes (no scales) for ``context`` tokens, windowed layers capped."""
        heads = self.kv_heads_per_device if per_device else None
        g = self.geometry
        return g.token_layers(context) * g.elements_per_token_per_layer(heads) * self.dtype_bytes

    def scale_bytes(self, context: int, per_device: bool = False) -> int:
        """FP8 scale bytes for ``context`` tokens (0 unless the KV dtype is FP8)."""
        if self.scale_bytes_per_token == 0 and self.window_scale_bytes_per_token == 0:
            return 0
        heads = self.kv_heads_per_device if per_device else None
        g = self.geometry
        return g.token_layers(context) * g.scales_per_token_per_layer(heads) * SCALE_BYTES

    def as_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-ready values (the geometry as a nested dict)."""
        d = dataclasses.asdict(self)
        d["geometry"]["layer_windows"] = list(self.geometry.layer_windows)
        d["geometry"]["layer_kinds"] = list(self.geometry.layer_kinds)
        d["groups"] = [dataclasses.asdict(gp) for gp in self.groups]
        return d

    def table(self) -> str:
        """A readable report: thousands separators, GB (10^9 B) with GiB (2^30 B)."""
        g = self.geometry
        tp = self.tp
        scaled = self.scale_bytes_per_token or self.window_scale_bytes_per_token
        rows: list[tuple[str, str]] = [
            ("model", g.describe()),
            ("KV dtype", f"{self.kv_dtype}, {self.dtype_bytes} B per element"),
        ]
        if g.mla:
            shard = "the MLA latent is replicated on every device"
        elif tp > g.num_kv_heads:
            shard = (
                f"1 KV head per device, each of the {g.num_kv_heads} replicated "
                f"on {tp // g.num_kv_heads} devices"
            )
        else:
            shard = f"{self.kv_heads_per_device} of {g.num_kv_heads} KV heads per device"
        rows.append(("tensor parallel", f"tp={tp}: {shard}"))
        rows.append(("", ""))
        rows.append(
            (
                "KV per token",
                f"{self.kv_bytes_per_token:,} B/token whole model, "
                f"{self.kv_bytes_per_token_per_device:,} B/token per device"
                + (f" ({g.full_layers} full-attention layers)" if g.windows else ""),
            )
        )
        if g.windows:
            widest = max(g.windows)
            flat = self.kv_bytes(widest) - self.kv_bytes_per_token * widest
            rows.append(
                (
                    "  windowed",
                    f"+{self.window_kv_bytes_per_token:,} B/token whole model, "
                    f"+{self.window_kv_bytes_per_token_per_device:,} B/token per device "
                    f"until the window fills, then flat at {_gb(flat)} whole model",
                )
            )
        if scaled:
            rows.append(
                (
                    "FP8 scales",
                    f"{self.scale_bytes_per_token:,} B/token whole model, "
                    f"{self.scale_bytes_per_token_per_device:,} B/token per device"
                    + (
                        f" (windowed: +{self.window_scale_bytes_per_token:,} and "
                        f"+{self.window_scale_bytes_per_token_per_device:,})"
                        if g.windows
                        else ""
                    )
                    + (
                        "; float32, one per token per layer"
                        if g.mla
                        else "; float32 per (token, KV head) for K and for V"
                    )
                    + ", radixseg's extra, not in the KV figures",
                )
            )
        else:
            rows.append(("FP8 scales", "none (the KV dtype is not FP8)"))
        rows.append(
            (
                "segment",
                f"{_size(self.segment_bytes)} per device = {self.pages_per_segment:,} pages "
                f"x {self.page_size} tokens = {self.tokens_per_segment:,} tokens",
            )
        )
        rows.append(("", ""))
        ctx = self.context
        rows.append(("context", f"{ctx:,} tokens"))
        rows.append(
            (
                "KV",
                f"{_gb(self.context_kv_bytes_per_device)} per device, "
                f"{_gb(self.context_kv_bytes)} whole model",
            )
        )
        if scaled:
            rows.append(
                (
                    "FP8 scales",
                    f"{_gb(self.context_scale_bytes_per_device)} per device, "
                    f"{_gb(self.context_scale_bytes)} whole model",
                )
            )
            rows.append(
                (
                    "KV + scales",
                    f"{_gb(self.context_kv_bytes_per_device + self.context_scale_bytes_per_device)}"
                    f" per device, {_gb(self.context_kv_bytes + self.context_scale_bytes)}"
                    " whole model",
                )
            )
        rows += self._group_rows()
        rows.append(("", ""))
        if self.device_bytes is None or self.usable_bytes_per_device is None:
            rows.append(
                (
                    "fit",
                    "give device_bytes (--device-memory) to see the largest context "
                    "and the devices needed",
                )
            )
        else:
            rows.append(
                (
                    "device memory",
                    f"{_gb(self.device_bytes)} x memory fraction {self.memory_fraction:.2f}"
                    + (" (the default: all of it)" if self.memory_fraction == 1 else "")
                    + f" - weights {_gb(self.weights_bytes)} / tp {tp}"
                    f" = {_gb(max(0, self.usable_bytes_per_device))} for KV + scales per device",
                )
            )
            if self.usable_bytes_per_device <= 0:
                rows.append(("largest context", "0 tokens: the weights alone fill the device"))
                rows.append(("devices needed", "none fit: raise tp or the device memory"))
            elif self.max_context_per_device is None:
                rows.append(("largest context", "no limit: every layer is windowed"))
                rows.append(("devices needed", f"{self.devices_needed} (one TP group)"))
            else:
                rows.append(
                    (
                        "largest context",
                        f"{self.max_context_per_device:,} tokens "
                        f"(KV + scales, whole pages of {self.page_size})",
                    )
                )
                groups = (self.devices_needed or 0) // tp
                rows.append(
                    (
                        "devices needed",
                        f"{self.devices_needed:,} for {ctx:,} tokens: {groups:,} "
                        f"context-parallel group{'s' if groups != 1 else ''} x tp {tp}",
                    )
                )
        rows += self._cp_rows()
        if self.tiers is not None:
            rows.append(("", ""))
            rows += self.tiers.rows()
        width = max(len(k) for k, _ in rows) + 2
        lines = ["radixseg capacity plan"]
        lines += [f"{k:<{width}}{v}".rstrip() if k or v else "" for k, v in rows]
        return "\n".join(lines)

    def _group_rows(self) -> list[tuple[str, str]]:
        """Layer-group rows, only for geometries with windowed layers: what a
        grouped pool reserves on one device, then one row per group. Keys are
        no wider than the others, so the columns stay where they were."""
        g = self.geometry
        if not g.windows:
            return []
        if not self.groups or self.reserved_bytes_grouped is None:
            if self.cp != 1 or g.mla:
                return []
            return [
                (
                    "grouped pool",
                    "one page of a layer group is past the segment: raise "
                    "--segment-bytes or lower --page-size",
                )
            ]
        rows = [
            (
                "grouped pool",
                f"{_gb(self.reserved_bytes_grouped)} per device reserved: one pool per "
                f"layer group, whole segments",
            )
        ]
        for gp in self.groups:
            what = {
                "full": "every token",
                "sliding": f"last {gp.span or 0:,} tokens",
                "chunked": f"{gp.span or 0:,}-token chunks",
            }[gp.kind]
            rows.append(
                (
                    f"  {gp.kind}",
                    f"{what}, {gp.layers} layers: {gp.pages:,} pages in "
                    f"{gp.segments:,} segment{'s' if gp.segments != 1 else ''} of "
                    f"{gp.pages_per_segment:,} pages = {_gb(gp.reserved_bytes)}",
                )
            )
        return rows

    def _cp_rows(self) -> list[tuple[str, str]]:
        """Context-parallel rows: all of them when ``cp > 1``; one naming the
        ranks needed when the context does not fit one device; else none. Keys
        are no wider than the others, so the columns stay where they were."""
        cp, ps, ctx, need = self.cp, self.page_size, self.context, self.ranks_needed
        limit = ""
        if need is not None and need * ps > MAX_PAGE_SIZE:
            limit = (
                f"; past the {MAX_PAGE_SIZE // ps} ranks page_size {ps} allows "
                f"(virtual pages of at most {MAX_PAGE_SIZE:,} tokens): lower --page-size"
            )
        if cp == 1:
            if need is None or need == 1:
                return []
            return [
                ("", ""),
                (
                    "ranks needed",
                    f"{ctx:,} tokens do not fit one device: they need --cp {need:,} "
                    f"(context-parallel ranks per TP rank, each holding 1/{need:,} "
                    f"of the KV){limit}",
                ),
            ]
        rows = [
            ("", ""),
            (
                "cp ranks",
                f"cp={cp} context-parallel ranks per TP rank: virtual pages of "
                f"{ps * cp:,} tokens, {ps} on each rank under the same page id",
            ),
            (
                "per rank",
                f"{self.pages_per_rank:,} pages of {ps} tokens: KV "
                f"{_gb(self.context_kv_bytes_per_rank)}"
                + (
                    f" + FP8 scales {_gb(self.context_scale_bytes_per_rank)}"
                    if self.context_scale_bytes_per_rank
                    else ""
                ),
            ),
            (
                "reserved",
                f"{_gb(self.reserved_bytes_per_rank)} per rank: {self.segments_per_rank:,} "
                f"segment{'s' if self.segments_per_rank != 1 else ''} of "
                f"{self.pages_per_segment:,} pages"
                + (
                    " plus the windowed layers' pages"
                    if self.geometry.full_layers and self.geometry.windows
                    else ""
                ),
            ),
        ]
        if self.usable_bytes_per_device is None:
            return rows
        if self.max_context_with_cp is None:
            largest = "no limit: every layer is windowed"
        else:
            largest = (
                f"{self.max_context_with_cp:,} tokens over {cp} ranks "
                f"(whole virtual pages of {ps * cp:,})"
            )
        rows.append(("largest at cp", largest))
        if self.usable_bytes_per_device <= 0:
            rows.append(("ranks needed", "none: the weights alone fill the device"))
        elif need is None:
            rows.append(("ranks needed", "none: not one page per layer fits a device"))
        else:
            verdict = "fits" if need <= cp else "does not fit"
            rows.append(
                (
                    "ranks needed",
                    f"{need:,} for {ctx:,} tokens (cp={cp} {verdict}){limit}",
                )
            )
        return rows

    def __str__(self) -> str:
        return self.table()


def _gb(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:,.1f} GB ({n / 2**30:,.1f} GiB)"
    if n >= 10**6:
        return f"{n / 1e6:,.1f} MB ({n / 2**20:,.1f} MiB)"
    return f"{n:,} B"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale:,} {unit}"
    return f"{n:,} B"
