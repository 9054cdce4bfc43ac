"""KVPool from 0 to 10,000,000 tokens and back, on this machine's CPU.

One context grows in 65,536-token chunks (1 layer, 1 KV head, head_dim 64,
FP8 e4m3 with a float32 scale per token): each chunk allocates pages, which
adds segments as needed, and writes KV that is a known function of the
position. Every token is read back and compared (exactly) with what was
written, the first segment's address is checked to be unchanged (growth never
copies a live byte), then the chunks are released newest first with a
``shrink()`` after each, back to zero segments. The timeline prints
reserved vs used bytes all along: reserved <= used + one segment.

Peers measured in the same run:
* a fixed pool sized for the maximum context up front (SGLang / vLLM style):
  its bytes before the first request, which radixseg does not spend;
* a contiguous buffer grown by doubling (the alternative that moves pages):
  the bytes it copies and the time it takes, against radixseg's growth.

Also: the cost of adding one segment at 1 and at 1,000 existing segments.

Usage: python benchmarks/bench_pool_growth.py [--tokens 10000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from radixseg import KVPool
from radixseg.pool import dequantize_fp8, quantize_fp8

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_json

GiB = 1 << 30
MB = 1e6


def kv_for(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Known KV ``[T, 1, head_dim]`` for absolute token positions."""
    p = positions.to(torch.float32)[:, None, None]
    d = torch.arange(head_dim, dtype=torch.float32)[None, None, :]
    k = torch.sin(p * 1e-3 + d) * (1 + (p % 97))
    v = torch.cos(p * 7e-4 - d) * (1 + (p % 89))
    return k, v


def stored(x: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8(*quantize_fp8(x))


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:8.3f} GiB"


def grow_and_shrink(args: argparse.Namespace, out: dict[str, Any]) -> None:
    pool = KVPool(1, 1, 64, page_size=args.page_size, segment_bytes=args.segment_bytes)
    ps, chunk = pool.page_size, args.chunk
    print(
        f"\n== grow one context to {args.tokens:,} tokens in {chunk:,}-token chunks ==\n"
        f"pool: 1 layer, 1 KV head, head_dim 64, FP8 e4m3 + fp32 scales = "
        f"{pool.bytes_per_token} B/token; page_size {ps}; segment {pool.segment_bytes:,} B "
        f"= {pool.tokens_per_segment:,} tokens"
    )
    print(
        f"{'tokens':>12} {'segments':>9} {'reserved':>13} {'used':>13} "
        f"{'slack':>10} {'ok':>3} {'s':>7}"
    )
    timeline: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def row(tokens: int) -> None:
        s = pool.stats()
        slack = s["reserved_bytes"] - s["used_bytes"]
        ok = slack <= pool.segment_bytes
        timeline.append(
            {
                "tokens": tokens,
                "segments": s["segments"],
                "reserved_bytes": s["reserved_bytes"],
                "used_bytes": s["used_bytes"],
                "seconds": time.perf_counter() - t0,
                "reserved_le_used_plus_segment": ok,
            }
        )
        print(
            f"{tokens:>12,} {s['segments']:>9,} {fmt_bytes(s['reserved_bytes'])} "
            f"{fmt_bytes(s['used_bytes'])} {slack / MB:8.2f}MB {'yes' if ok else 'NO':>3} "
            f"{time.perf_counter() - t0:7.2f}"
        )
        if not ok:
            raise SystemExit("reserved > used + one segment")

    row(0)
    chunks: list[torch.Tensor] = []
    sizes: list[int] = []
    first_ptr = None
    written = 0
    grow_s = 0.0
    step = max(1, args.tokens // chunk // 10)
    while written < args.tokens:
        n = min(chunk, args.tokens - written)
        g0 = time.perf_counter()
        ids = pool.alloc(-(-n // ps))
        grow_s += time.perf_counter() - g0
        chunks.append(ids)
        sizes.append(n)
        if first_ptr is None:
            first_ptr = pool.segment(0).k.data_ptr()
        pos = torch.arange(written, written + n)
        slots = (ids.long()[:, None] * ps + torch.arange(ps)).reshape(-1)[:n]
        k, v = kv_for(pos, 64)
        pool.write(0, slots, k, v, check=False)
        written += n
        if len(chunks) % step == 0 or written == args.tokens:
            row(written)
    write_s = time.perf_counter() - t0

    # Read every token back.
    r0 = time.perf_counter()
    mismatches = 0
    start = 0
    for ids, n in zip(chunks, sizes, strict=True):
        slots = (ids.long()[:, None] * ps + torch.arange(ps)).reshape(-1)[:n]
        k, v = pool.read(0, slots, check=False)
        wk, wv = kv_for(torch.arange(start, start + n), 64)
        mismatches += int(
            (k != stored(wk)).any(dim=(1, 2)).sum() + (v != stored(wv)).any(dim=(1, 2)).sum()
        )
        start += n
    read_s = time.perf_counter() - r0
    moved = pool.segment(0).k.data_ptr() != first_ptr
    print(
        f"read back {args.tokens:,} tokens in {read_s:.2f} s: {mismatches} mismatches; "
        f"segment 0 {'MOVED' if moved else 'never moved'}"
    )
    if mismatches or moved:
        raise SystemExit("read-back failed")
    peak = pool.stats()

    # Release newest first, shrinking after each chunk.
    print("\n== release chunks newest first, shrink() after each ==")
    s0 = time.perf_counter()
    freed = 0
    remaining = args.tokens
    for i in reversed(range(len(chunks))):
        pool.release(chunks[i])
        remaining -= sizes[i]
        freed += pool.shrink()
        if i % step == 0:
            row(remaining)
    shrink_s = time.perf_counter() - s0
    end = pool.stats()
    print(f"freed {freed:,} B; {end['segments']} segments and {end['reserved_bytes']} B left")
    out["growth"] = {
        "tokens": args.tokens,
        "bytes_per_token": pool.bytes_per_token,
        "segment_bytes": pool.segment_bytes,
        "peak_segments": peak["segments"],
        "peak_reserved_bytes": peak["reserved_bytes"],
        "alloc_seconds_total": grow_s,
        "write_seconds": write_s,
        "read_seconds": read_s,
        "release_shrink_seconds": shrink_s,
        "mismatches": mismatches,
        "moved": moved,
        "timeline": timeline,
    }

    # Peers.
    fixed = args.tokens * pool.bytes_per_token
    print(
        f"\n== peers ==\nfixed pool sized for a {args.tokens:,}-token max context: "
        f"{fixed:,} B reserved before the first request; radixseg: 0 B"
    )
    d0 = time.perf_counter()
    copied = 0
    cap = 65_536
    buf = torch.empty(cap * pool.bytes_per_token, dtype=torch.uint8)
    have = 0
    while have < args.tokens:
        n = min(chunk, args.tokens - have)
        while have + n > cap:
            cap *= 2
            bigger = torch.empty(cap * pool.bytes_per_token, dtype=torch.uint8)
            bigger[: have * pool.bytes_per_token] = buf[: have * pool.bytes_per_token]
            copied += have * pool.bytes_per_token
            buf = bigger
        buf[have * pool.bytes_per_token : (have + n) * pool.bytes_per_token] = 1
        have += n
    doubling_s = time.perf_counter() - d0
    del buf
    print(
        f"contiguous doubling buffer: copied {copied:,} B of live KV while growing "
        f"({doubling_s:.2f} s incl. touching the new bytes); radixseg copied 0 B "
        f"(alloc incl. growth: {grow_s:.2f} s total)"
    )
    out["peers"] = {
        "fixed_pool_bytes_before_first_request": fixed,
        "doubling_bytes_copied": copied,
        "doubling_seconds": doubling_s,
    }


def add_segment_cost(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Time alloc() calls that each add exactly one segment."""
    pool = KVPool(1, 1, 64, page_size=args.page_size, segment_bytes=args.small_segment_bytes)
    pps = pool.pages_per_segment
    times: list[float] = []
    for _ in range(args.segments + 20):
        t = time.perf_counter()
        pool.alloc(pps)  # the pool is full: this adds one segment
        times.append(time.perf_counter() - t)
    at1 = statistics.median(times[1:21])
    atn = statistics.median(times[args.segments : args.segments + 20])
    print(
        f"\n== adding one segment ({pool.segment_bytes:,} B, alloc of {pps} pages that grows) ==\n"
        f"at 1 existing segment: {at1 * 1e6:8.1f} us (median of 20)\n"
        f"at {args.segments:,} existing segments: {atn * 1e6:8.1f} us (median of 20)\n"
        f"ratio {atn / at1:.2f}x"
    )
    out["add_segment"] = {
        "segment_bytes": pool.segment_bytes,
        "us_at_1": at1 * 1e6,
        f"us_at_{args.segments}": atn * 1e6,
        "ratio": atn / at1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=10_000_000)
    p.add_argument("--chunk", type=int, default=65_536)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--segment-bytes", type=int, default=64 << 20)
    p.add_argument("--small-segment-bytes", type=int, default=256 << 10)
    p.add_argument("--segments", type=int, default=1000)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    grow_and_shrink(args, out)
    add_segment_cost(args, out)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
