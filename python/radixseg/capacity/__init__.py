"""Capacity planning: how many bytes of KV a model needs per token and per context.

This package does the arithmetic behind ``radixseg plan``. It reads a Hugging
Face ``config.json`` (or fields named directly) into a :class:`KVGeometry` —
layers, KV heads, head dimension, multi-head latent attention (MLA), and which
layers attend only to a window of recent tokens — and turns it, with a KV dtype,
a tensor-parallel (TP) degree and a device size, into a :class:`Plan`: KV bytes
per token for the whole model and per device, the extra bytes radixseg spends
on FP8 scales (always reported apart from the KV), tokens per segment, bytes for
a given context, the largest context that fits on one device and how many
devices a context needs. With context parallelism (``cp`` ranks each holding
1/cp of one sequence's KV, issue 19) it adds the bytes per rank, the largest
context the ranks hold and the ranks a context needs. With host memory for a
host tier (``host_bytes``) it splits the context between device and host and
models a decode step in place vs copy-back (:mod:`radixseg.capacity.tiers`).
All sizes are in bytes; reports print GB (10^9 B) next to GiB (2^30 B).
Nothing here touches a device.

Example: Llama-3.1-70B in FP8 holds 80 layers x 8 KV heads x 128 dims x (K, V)
x 1 B = 163,840 B per token; at TP 8 each device holds one KV head, so a
10,000,000-token context needs 204.8 GB of KV per device, plus 6.4 GB of
radixseg's float32 scales. It needs 2 context-parallel ranks per TP rank on
141 GB devices: 105.6 GB of KV and scales per rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from radixseg._core import InvalidArgument
from radixseg._dtypes import FP8_DTYPES, SHORT_NAMES, kv_dtype_named
from radixseg.capacity.geometry import MAX_LAYERS, ConfigLike, HFConfig, KVGeometry, kv_geometry
from radixseg.capacity.groups import LayerGroup, layer_groups
from radixseg.capacity.report import MAX_PAGE_SIZE, SCALE_BYTES, GroupPlan, Plan
from radixseg.capacity.tiers import (
    DEFAULT_HBM_GBPS,
    DEFAULT_HOST_GBPS,
    DEFAULT_PCIE_GBPS,
    ContextDoesNotFit,
    TierPlan,
    plan_tiers,
)
from radixseg.capacity.units import MAX_VALUE, _check_int, parse_bytes, parse_count
from radixseg.layout import SegmentLayout

__all__ = [
    "MAX_LAYERS",
    "MAX_PAGE_SIZE",
    "MAX_VALUE",
    "SCALE_BYTES",
    "ConfigLike",
    "ContextDoesNotFit",
    "GroupPlan",
    "HFConfig",
    "KVGeometry",
    "Plan",
    "TierPlan",
    "kv_geometry",
    "parse_bytes",
    "parse_count",
    "plan",
    "plan_tiers",
]

_DTYPE_HELP = "fp8_e4m3 (or fp8), fp8_e5m2, bf16, fp16, fp32, or the torch dtype of one of them"


def _dtype(kv_dtype: object) -> tuple[str, int, bool]:
    """(short name, bytes per element, stores FP8 scales) of a KV dtype or its name."""
    dtype = kv_dtype_named(kv_dtype) if isinstance(kv_dtype, str) else kv_dtype
    if not isinstance(dtype, torch.dtype) or dtype not in SHORT_NAMES:
        raise InvalidArgument(f"kv_dtype={kv_dtype!r} is not supported; use {_DTYPE_HELP}")
    return SHORT_NAMES[dtype], dtype.itemsize, dtype in FP8_DTYPES


def plan(
    config: ConfigLike | None = None,
    *,
    kv_dtype: str | torch.dtype = "fp8_e4m3",
    device_bytes: int | str | None = None,
    weights_bytes: int | str = 0,
    tp: int = 1,
    cp: int = 1,
    context: int = 10_000_000,
    page_size: int = 16,
    segment_bytes: int | str = 64 << 20,
    memory_fraction: float = 1.0,
    num_layers: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    kv_lora_rank: int | None = None,
    qk_rope_head_dim: int | None = None,
    sliding_window: int | None = None,
    attention_chunk_size: int | None = None,
    layer_types: Sequence[str] | None = None,
    host_bytes: int | str | None = None,
    hbm_gbps: float = DEFAULT_HBM_GBPS,
    host_gbps: float = DEFAULT_HOST_GBPS,
    pcie_gbps: float = DEFAULT_PCIE_GBPS,
) -> Plan:
    """Plan KV capacity for a model: bytes per token, per context, and what fits.

    Parameters
    ----------
    config : path, dict or KVGeometry, optional
        An HF ``config.json`` (see :func:`kv_geometry`); or ``None`` and name
        the fields (``num_layers``, ``num_kv_heads``, ``head_dim``, MLA's
        ``kv_lora_rank`` and ``qk_rope_head_dim``, windows), which otherwise
        override the config's.
    kv_dtype : str or torch.dtype
        ``"fp8_e4m3"`` (default; ``"fp8"``), ``"fp8_e5m2"``, ``"bf16"``,
        ``"fp16"``, ``"fp32"`` or the matching torch dtype. FP8 adds radixseg's
        float32 scales, reported separately.
    device_bytes : int or str, optional
        Memory of one device in bytes (``"80GB"``, ``"80GiB"`` accepted).
        Without it the plan has no fit figures.
    weights_bytes : int or str
        Bytes of the model weights, split evenly over the ``tp`` ranks.
    tp : int
        Tensor-parallel degree (>= 1); it must divide ``num_kv_heads`` or be a
        multiple of it.
    cp : int
        Context-parallel ranks per TP rank (issue 19), in 1..=1024 with
        ``page_size * cp <= 1024``: a virtual page holds ``page_size * cp``
        tokens and each rank stores ``page_size`` of them under the same page
        id, so a page id costs one page on every rank, even one that holds no
        token of a partly filled virtual page yet. Default 1: no context
        parallelism. The ranks a context needs (``Plan.ranks_needed``) are
        reported whatever ``cp`` is.
    context : int
        Tokens of the context to size (>= 1); default 10,000,000.
    page_size : int
        Tokens per page, a power of two in 1..=1024.
    segment_bytes : int or str
        The most bytes of one segment on one device; default 64 MiB. Pages per
        segment are what ``KVPool(segment_bytes=...)`` makes of it
        (:meth:`radixseg.layout.SegmentLayout.pages_fitting`).
    memory_fraction : float
        Share of ``device_bytes`` the KV cache and the weights may use, in
        (0, 1]. Default 1.0: the whole device, no headroom for activations
        (vLLM's ``gpu_memory_utilization`` defaults to 0.9).
    host_bytes : int or str, optional
        Host memory for one device's host tier (``KVPool(host_budget_bytes=)``).
        With it (and ``device_bytes``), ``Plan.tiers`` splits the context's KV
        and scales per device between what the device holds and the host, with
        a *model* estimate of one decode step: the device part at ``hbm_gbps``
        against the host part read in place by the CPU at 0.55 x ``host_gbps``
        or copied back over PCIe at ``pcie_gbps`` (see
        :mod:`radixseg.capacity.tiers`).
    hbm_gbps, host_gbps, pcie_gbps : float
        GB/s (10^9 B/s) of device memory (4800), host DRAM (200) and PCIe (55).

    Returns
    -------
    Plan
        See :class:`Plan` for every figure.

    Raises
    ------
    radixseg.InvalidArgument
        For an unknown dtype, an out-of-range number, a TP degree that does not
        fit the KV heads, or a missing config field; the message names the
        value and what is allowed.
    radixseg.capacity.ContextDoesNotFit
        (an ``InvalidArgument``) with ``host_bytes``, when the context does not
        fit in the device's usable bytes plus ``host_bytes``.

    Examples
    --------
    Llama-3.1-70B (80 layers, 8 KV heads of 128) in FP8 at TP 8:

    >>> p = plan(num_layers=80, num_kv_heads=8, head_dim=128, kv_dtype="fp8", tp=8)
    >>> p.kv_bytes_per_token, p.kv_bytes_per_token_per_device, p.scale_bytes_per_token
    (163840, 20480, 5120)
    >>> p.context_kv_bytes_per_device / 1e9  # GB of KV per device at 10M tokens
    204.8
    >>> plan(p.geometry, kv_dtype="fp8", tp=8, device_bytes="80GB",
    ...      weights_bytes="140GB").max_context_per_device
    2959280

    The same 10M tokens on 141 GB devices take 2 context-parallel ranks per TP
    rank, each holding 312,500 pages of 16 tokens:

    >>> cp = plan(p.geometry, kv_dtype="fp8", tp=8, cp=2, device_bytes="141GB")
    >>> cp.ranks_needed, cp.pages_per_rank, cp.context_kv_bytes_per_rank / 1e9
    (2, 312500, 102.4)
    """
    name, dtype_bytes, fp8 = _dtype(kv_dtype)
    g = kv_geometry(
        config,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=qk_rope_head_dim,
        sliding_window=sliding_window,
        attention_chunk_size=attention_chunk_size,
        layer_types=layer_types,
    )
    tp = _check_int("tp", tp, 1)
    context = _check_int("context", context, 1)
    page_size = _check_int("page_size", page_size, 1, MAX_PAGE_SIZE)
    if page_size & (page_size - 1):
        raise InvalidArgument(
            f"page_size={page_size} must be a power of two in 1..={MAX_PAGE_SIZE}"
        )
    cp = _check_int("cp", cp, 1, MAX_PAGE_SIZE)
    if page_size * cp > MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"cp={cp} with page_size={page_size} makes virtual pages of {page_size * cp:,} "
            f"tokens, past the largest page the allocator takes ({MAX_PAGE_SIZE:,} tokens): "
            f"use cp <= {MAX_PAGE_SIZE // page_size} or a smaller page_size"
        )
    segment_bytes = _check_int("segment_bytes", parse_bytes(segment_bytes, "segment_bytes"), 1)
    weights_bytes = parse_bytes(weights_bytes, "weights_bytes")
    device = None if device_bytes is None else parse_bytes(device_bytes, "device_bytes")
    if device is not None:
        device = _check_int("device_bytes", device, 1)
    if (
        isinstance(memory_fraction, bool)
        or not isinstance(memory_fraction, (int, float))
        or not 0 < memory_fraction <= 1
    ):
        raise InvalidArgument(f"memory_fraction={memory_fraction!r} must be in (0, 1]")
    heads = g.kv_heads_per_device(tp)

    full, windowed = g.full_layers, g.num_layers - g.full_layers
    kv_layer = g.elements_per_token_per_layer() * dtype_bytes
    kv_layer_dev = g.elements_per_token_per_layer(heads) * dtype_bytes
    sc_layer = g.scales_per_token_per_layer() * SCALE_BYTES if fp8 else 0
    sc_layer_dev = g.scales_per_token_per_layer(heads) * SCALE_BYTES if fp8 else 0

    # A segment holds the same tokens in every layer of the pool that grows with
    # the context: the full-attention layers (the windowed ones when there are none).
    seg_layers = full or windowed
    per_page = page_size * seg_layers * (kv_layer_dev + sc_layer_dev)
    if g.mla:
        # No KVPool layout holds MLA latents (K and V are separate parts there):
        # whole pages of the latent, unaligned.
        pages_per_segment = segment_bytes // per_page
        segment_size = pages_per_segment * per_page
    else:
        # What KVPool(segment_bytes=...) builds for this geometry on one device.
        geometry = (seg_layers, heads, g.head_dim, page_size)
        if SegmentLayout.max_pages(*geometry) < 1:
            raise InvalidArgument(
                f"one page of {page_size} tokens x {seg_layers} layers x {heads} KV heads x "
                f"{g.head_dim} is past the 2**31 - 1 elements a segment's tensor may hold; "
                "lower page_size"
            )
        pages_per_segment = SegmentLayout.pages_fitting(segment_bytes, *geometry, dtype_bytes, fp8)
        segment_size = SegmentLayout(*geometry, pages_per_segment, dtype_bytes, fp8).segment_bytes
    if pages_per_segment < 1:
        raise InvalidArgument(
            f"segment_bytes={segment_bytes:,} is smaller than one page ({per_page:,} B: "
            f"{page_size} tokens x {per_page // page_size:,} B/token per device, each "
            "part of a segment 256-byte aligned); "
            "raise segment_bytes or lower page_size"
        )

    token_layers = g.token_layers(context)
    dev_rate = kv_layer_dev + sc_layer_dev

    usable: int | None = None
    max_ctx: int | None = None
    devices: int | None = None
    if device is not None:
        usable = int(device * memory_fraction) - math.ceil(weights_bytes / tp)
        if usable <= 0:
            max_ctx = 0
        else:
            max_ctx = _largest(lambda c: g.token_layers(c) * dev_rate, usable, full * dev_rate, g)
            if max_ctx is not None:
                max_ctx -= max_ctx % page_size
        if max_ctx is None:
            devices = tp
        elif max_ctx > 0:
            devices = tp * -(-context // max_ctx)

    # Context parallelism: what one of cp ranks holds, in whole pages. The pool
    # that grows with the context (the one `segment` describes) takes whole
    # segments; windowed layers beside full ones add their pages.
    virtual = page_size * cp
    rank_pages = _rank_pages(g, context, virtual)
    pool_pages = -(-min(context, max(g.windows) if full == 0 else context) // virtual)
    segments = -(-pool_pages // pages_per_segment)
    window_pages = rank_pages - full * pool_pages if full else 0
    max_ctx_cp: int | None = None
    ranks: int | None = None
    if usable is not None and usable <= 0:
        max_ctx_cp = 0
    elif usable is not None:
        budget, page_bytes = usable, page_size * dev_rate

        def fits(r: int) -> bool:
            return _rank_pages(g, context, page_size * r) * page_bytes <= budget

        # The most virtual pages per layer that fit (_largest's widest window,
        # read as pages, is past every window's last page).
        n = _largest(
            lambda n: _rank_pages(g, n * virtual, virtual) * page_bytes,
            budget,
            full * page_bytes,
            g,
        )
        max_ctx_cp = None if n is None else n * virtual
        # The fewest ranks whose share fits. With ceil(context / page_size) of
        # them each holds one page per layer, and more ranks hold no less.
        hi = -(-context // page_size)
        if fits(hi):
            lo = 0  # invariant: lo ranks are too few, hi ranks fit
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(mid):
                    hi = mid
                else:
                    lo = mid
            ranks = hi

    # One pool per layer group (GroupedKVPool), on one device: cp == 1 only.
    groups = (
        ()
        if cp > 1 or g.mla
        else _group_plans(g, heads, context, page_size, segment_bytes, dtype_bytes, fp8)
    )

    p = Plan(
        geometry=g,
        kv_dtype=name,
        dtype_bytes=dtype_bytes,
        tp=tp,
        context=context,
        page_size=page_size,
        segment_bytes=segment_bytes,
        device_bytes=device,
        weights_bytes=weights_bytes,
        memory_fraction=float(memory_fraction),
        kv_heads_per_device=heads,
        kv_bytes_per_token=full * kv_layer,
        kv_bytes_per_token_per_device=full * kv_layer_dev,
        window_kv_bytes_per_token=windowed * kv_layer,
        window_kv_bytes_per_token_per_device=windowed * kv_layer_dev,
        scale_bytes_per_token=full * sc_layer,
        scale_bytes_per_token_per_device=full * sc_layer_dev,
        window_scale_bytes_per_token=windowed * sc_layer,
        window_scale_bytes_per_token_per_device=windowed * sc_layer_dev,
        pages_per_segment=pages_per_segment,
        tokens_per_segment=pages_per_segment * page_size,
        context_kv_bytes=token_layers * kv_layer,
        context_kv_bytes_per_device=token_layers * kv_layer_dev,
        context_scale_bytes=token_layers * sc_layer,
        context_scale_bytes_per_device=token_layers * sc_layer_dev,
        usable_bytes_per_device=usable,
        max_context_per_device=max_ctx,
        devices_needed=devices,
        cp=cp,
        pages_per_rank=pool_pages,
        segments_per_rank=segments,
        context_kv_bytes_per_rank=rank_pages * page_size * kv_layer_dev,
        context_scale_bytes_per_rank=rank_pages * page_size * sc_layer_dev,
        reserved_bytes_per_rank=segments * segment_size + window_pages * page_size * dev_rate,
        max_context_with_cp=max_ctx_cp,
        ranks_needed=ranks,
        groups=groups,
        reserved_bytes_grouped=sum(gp.reserved_bytes for gp in groups) if groups else None,
    )
    if host_bytes is None:
        return p
    host = parse_bytes(host_bytes, "host_bytes")
    tiers = plan_tiers(p, host, hbm_gbps=hbm_gbps, host_gbps=host_gbps, pcie_gbps=pcie_gbps)
    return dataclasses.replace(p, tiers=tiers)


def _group_plans(
    g: KVGeometry,
    heads: int,
    context: int,
    page_size: int,
    segment_bytes: int,
    dtype_bytes: int,
    fp8: bool,
) -> tuple[GroupPlan, ...]:
    """Per layer group, what its pool in a ``GroupedKVPool`` reserves on one
    device for one request of ``context`` tokens; empty when some group's page
    does not fit a segment (that pool could not be built)."""
    out = []
    for group in layer_groups(g):
        geometry = (len(group.layers), heads, g.head_dim, page_size)
        if SegmentLayout.max_pages(*geometry) < 1:
            return ()
        pps = SegmentLayout.pages_fitting(segment_bytes, *geometry, dtype_bytes, fp8)
        if pps < 1:
            return ()
        size = SegmentLayout(*geometry, pps, dtype_bytes, fp8).segment_bytes
        pages = _group_pages(group, context, page_size)
        segments = -(-pages // pps)
        out.append(
            GroupPlan(
                kind=group.kind,
                span=group.span,
                layers=len(group.layers),
                pages=pages,
                pages_per_segment=pps,
                segment_bytes=size,
                segments=segments,
                reserved_bytes=segments * size,
            )
        )
    return tuple(out)


def _group_pages(group: LayerGroup, context: int, page_size: int) -> int:
    """Pages one request of ``context`` tokens holds in ``group`` between steps."""
    if not group.windowed:
        return -(-context // page_size)
    return group.pages_held(context, page_size)


def _rank_pages(g: KVGeometry, context: int, virtual: int) -> int:
    """Sum over layers of the pages one rank holds at ``context`` tokens, with
    virtual pages of ``virtual`` tokens (windowed layers capped at their window).

    Every rank allocates every virtual page id, so this is the number of
    virtual pages a layer touches, the same on every rank.
    """
    pages = g.full_layers * -(-context // virtual)
    return pages + sum(n * -(-min(context, w) // virtual) for w, n in g.windows.items())


def _largest(cost: Callable[[int], int], budget: int, slope: int, g: KVGeometry) -> int | None:
    """The largest context ``c`` with ``cost(c) <= budget``; ``None`` when unbounded.

    ``cost`` is non-decreasing and at least ``slope * c``: linear in the
    full-attention layers plus windowed layers that stay flat once full.
    """
    if slope == 0:  # every layer is windowed: the cost stops growing at the widest window
        hi = max(g.windows)
        if cost(hi) <= budget:
            return None
    else:
        hi = budget // slope + 1  # cost(hi) >= slope * hi > budget
    lo = 0  # invariant: cost(lo) <= budget < cost(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
