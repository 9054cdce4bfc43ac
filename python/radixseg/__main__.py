"""The ``radixseg`` command line.

``radixseg demo`` walks a segment allocator through a burst of requests: the
pool grows by segments as demand rises, page ids stay put, and empty segments
are handed back when demand falls.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from radixseg import OutOfPages, SegmentAllocator

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
    args = p.parse_args(argv)
    if args.cmd == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
