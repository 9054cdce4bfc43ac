"""The ``radixseg`` command line.

``radixseg demo`` walks a segment allocator through a burst of requests: the
pool grows by segments as demand rises, page ids stay put, and empty segments
are handed back when demand falls. ``radixseg plan`` sizes the KV cache of a
model from its ``config.json``: bytes per token, per context, and what fits.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from radixseg import InvalidArgument, OutOfPages, SegmentAllocator
from radixseg.plan import parse_bytes, parse_count
from radixseg.plan import plan as make_plan

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    a = SegmentAllocator(page_size=args.page_size, pages_per_segment=args.pages_per_segment)
    rng = np.random.default_rng(args.seed)
    live: list[torch.Tensor] = []
    print(
        f"radixseg demo: page_size={a.page_size} tokens, "
        f"pages_per_segment={a.pages_per_segment}, {args.requests} requests"
    )
    print(f"{'phase':<10}{'step':>6}{'segments':>10}{'used pages':>12}{'free pages':>12}")

    def row(phase: str, step: int) -> None:
        s = a.stats()
        print(f"{phase:<10}{step:>6}{s['segments']:>10}{s['used_pages']:>12}{s['free_pages']:>12}")

    grown = 0
    for step in range(args.requests):
        tokens = int(rng.integers(64, args.max_tokens))
        pages = -(-tokens // a.page_size)
        try:
            ids = a.alloc(pages)
        except OutOfPages:
            need = -(-(pages - a.free_pages()) // a.pages_per_segment)
            for _ in range(need):
                a.add_segment()
                grown += 1
            ids = a.alloc(pages)
        live.append(ids)
        if step % max(1, args.requests // 8) == 0:
            row("grow", step)
    row("peak", args.requests)
    first = live.pop(0)
    rng.shuffle(live)
    while live:
        a.release(live.pop())
    retired = 0
    for seg in reversed(a.segments()):
        usage = dict(a.segment_usage())[seg]
        if usage == 0:
            a.retire_segment(seg)
            retired += 1
    row("shrink", args.requests)
    # the oldest request's pages never moved
    assert a.refcount(first).tolist() == [1] * len(first)
    a.check_invariants()
    print(
        f"added {grown} segments under load, retired {retired} once released; "
        f"{len(first)} pages of the first request kept their ids throughout"
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    try:
        if args.config is None and args.layers is None:
            raise InvalidArgument(
                "give --config PATH (an HF config.json) or --layers with "
                "--kv-heads and --head-dim (or --kv-lora-rank and --rope-dim for MLA)"
            )
        p = make_plan(
            args.config,
            kv_dtype=args.kv_dtype,
            device_bytes=None
            if args.device_memory is None
            else parse_bytes(args.device_memory, "--device-memory"),
            weights_bytes=parse_bytes(args.weights, "--weights"),
            tp=args.tp,
            context=parse_count(args.context, "--context"),
            page_size=args.page_size,
            segment_bytes=parse_bytes(args.segment_bytes, "--segment-bytes"),
            memory_fraction=args.memory_fraction,
            num_layers=args.layers,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            kv_lora_rank=args.kv_lora_rank,
            qk_rope_head_dim=args.rope_dim,
        )
    except InvalidArgument as e:
        print(f"radixseg plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p.as_dict(), indent=2) if args.json else p.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``radixseg`` command."""
    p = argparse.ArgumentParser(prog="radixseg", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="grow, use and shrink a segmented page pool")
    d.add_argument("--requests", type=int, default=2000)
    d.add_argument("--max-tokens", type=int, default=8192)
    d.add_argument("--page-size", type=int, default=16)
    d.add_argument("--pages-per-segment", type=int, default=1024)
    d.add_argument("--seed", type=int, default=0)
    q = sub.add_parser(
        "plan",
        help="KV bytes per token and per context, the largest context that fits, devices needed",
        description="Size a model's KV cache from its config.json or named fields. "
        "Sizes take B, KB/MB/GB/TB (10^3 steps) or KiB/MiB/GiB/TiB (2^10 steps).",
    )
    q.add_argument("--config", help="an HF config.json, or the directory holding it")
    q.add_argument("--layers", type=int, help="decoder layers (instead of --config)")
    q.add_argument("--kv-heads", type=int, help="KV heads per layer (GQA)")
    q.add_argument("--head-dim", type=int, help="elements per KV head")
    q.add_argument("--kv-lora-rank", type=int, help="MLA: latent rank (DeepSeek-V2/V3)")
    q.add_argument("--rope-dim", type=int, help="MLA: qk_rope_head_dim")
    q.add_argument(
        "--kv-dtype", default="fp8_e4m3", help="fp8_e4m3 (fp8), fp8_e5m2, bf16, fp16 or fp32"
    )
    q.add_argument("--context", default="10000000", help="tokens, e.g. 10000000 or 10M")
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    q.add_argument("--device-memory", help="memory of one device, e.g. 80GB, 80GiB or bytes")
    q.add_argument("--weights", default="0", help="bytes of model weights, e.g. 140GB")
    q.add_argument(
        "--memory-fraction",
        type=float,
        default=1.0,
        help="share of device memory for weights and KV (default 1.0: all of it)",
    )
    q.add_argument("--page-size", type=int, default=16, help="tokens per page")
    q.add_argument("--segment-bytes", default="64MiB", help="bytes of one segment per device")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        return _demo(args)
    if args.cmd == "plan":
        return _plan(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
