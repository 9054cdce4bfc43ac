"""One context grown to 10,000,000 tokens over R ranks (context parallelism) vs one process.

The demo's tiny model (1 layer, 1 KV head, head_dim 64, FP8 e4m3 with a
float32 scale per token = 136 B/token, 16-token pages, 64 MiB segments)
grows one request's context in 262,144-token chunks (``radixseg.demo.
grow_context``: every rank is handed every chunk's K/V and keeps its own
tokens), twice:

* over ``--ranks`` spawned CPU processes joined by gloo (``file://`` store,
  one torch thread each), each holding a ``ShardedKVPool`` +
  ``ShardedPrefixCache`` (virtual pages of 16 x R tokens, rank r stores
  tokens [16r, 16(r+1)) of each);
* in this process, in a plain ``KVPool`` + ``PrefixCache`` (the baseline: the
  same pool on one device; there is no external peer for this).

Figures:

* peak reserved bytes per rank vs one process, against the issue's target
  (per rank <= 1/R of one process + one segment);
* decode time per token over the whole context: one ``attention.decode``
  call (one layer, batch 1, 8 query heads, ``check=False``, the native CPU
  kernel) over all the context's tokens, median of ``--repeat`` calls after a
  warm-up. With R ranks a step is the slowest rank's call (barrier before
  each call). One process is timed with 1 thread and with every core
  (``--threads``, default 2), before and after the ranks run, so the ratio
  compares equal CPU: R ranks x 1 thread vs 1 process x R threads;
* bytes per decode step per layer, from the pool's collective counters, vs
  the formula (R-1) x B x H x (D+1) x 4 received per rank (one packed fp32
  all-gather of output and log-sum-exp), and the time of that all-gather
  alone;
* the sharded output against the one-process output (same KV, same query).

The load average is printed with every phase: on a shared machine timings
swing, and the script says how busy it was.

Usage: python benchmarks/bench_sharded.py [--tokens 10M] [--ranks 2] [--repeat 5]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radixseg import KVPool, PrefixCache, attention
from radixseg._spawn import peak_rss_bytes, run_ranks
from radixseg.capacity import parse_bytes, parse_count
from radixseg.demo import HEAD_DIM, Q_HEADS, _Progress, _prompt, grow_context

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, versions, write_json

GB = 1e9


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def query(cfg: dict[str, Any]) -> torch.Tensor:
    """The decode step's query ``[batch, heads, head_dim]``, the same on every rank."""
    g = torch.Generator().manual_seed(cfg["seed"] + 7)
    return torch.randn(cfg["batch"], cfg["heads"], HEAD_DIM, generator=g)


def time_decode(
    pool: KVPool,
    table: tuple[torch.Tensor, ...],
    q: torch.Tensor,
    repeat: int,
    barrier: Any = None,
) -> tuple[list[float], torch.Tensor]:
    """Seconds of ``repeat`` decode calls (after one warm-up) and the output."""
    out = attention.decode(q, pool, 0, *table, check=False)
    times = []
    for _ in range(repeat):
        if barrier is not None:
            barrier()
        t = time.perf_counter()
        out = attention.decode(q, pool, 0, *table, check=False)
        times.append(time.perf_counter() - t)
    return times, out


def grow(cache: PrefixCache, cfg: dict[str, Any], send: Any = None) -> tuple[Any, float]:
    """Grow the context; ``send`` gets ``("grow", tokens, segments, reserved)`` per chunk."""
    _, prompt = _prompt(cfg["seed"], cfg["tokens"])

    def each(i: int, n: int, kv: torch.Tensor | None) -> None:
        if send is not None:
            s = cache.pool.stats()
            send(("grow", n, s["segments"], s["reserved_bytes"]))

    t = time.perf_counter()
    req = grow_context(cache, prompt, cfg["chunk"], each=each)
    return req, time.perf_counter() - t


def rank_main(rank: int, ranks: int, send: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank: grow its share, time the collective decode and a bare all-gather."""
    import torch.distributed as dist

    from radixseg.distributed import ShardedKVPool, ShardedPrefixCache

    pool = ShardedKVPool(
        1, 1, HEAD_DIM, page_size=cfg["page_size"], segment_bytes=cfg["segment_bytes"]
    )
    cache = ShardedPrefixCache(pool)
    req, grow_s = grow(cache, cfg, send if rank == 0 else None)
    table = cache.page_table([req])
    before = pool.stats()
    times, out = time_decode(pool, table, query(cfg), cfg["repeat"], dist.barrier)
    after = pool.stats()
    calls = cfg["repeat"] + 1
    # The merge's collective alone: one all-gather of the packed [B, H, D + 1] fp32.
    packed = torch.zeros(cfg["batch"], cfg["heads"], HEAD_DIM + 1)
    parts = [torch.empty_like(packed) for _ in range(ranks)]
    gather_s = []
    for _ in range(cfg["repeat"] * 4):
        dist.barrier()
        t = time.perf_counter()
        dist.all_gather(parts, packed)
        gather_s.append(time.perf_counter() - t)
    return {
        "rank": rank,
        "grow_seconds": grow_s,
        "peak_reserved_bytes": after["peak_reserved_bytes"],
        "reserved_bytes": after["reserved_bytes"],
        "used_bytes": after["used_bytes"],
        "segments": after["segments"],
        "tokens_held": int(pool.shard.local_lens(np.array([cfg["tokens"]]))[0]),
        "decode_seconds": times,
        "gather_seconds": gather_s,
        "collectives_per_call": (after["collectives"] - before["collectives"]) / calls,
        "bytes_sent_per_call": (after["collective_bytes_sent"] - before["collective_bytes_sent"])
        / calls,
        "bytes_received_per_call": (
            after["collective_bytes_received"] - before["collective_bytes_received"]
        )
        / calls,
        "out": out.numpy(),
        "max_rss_bytes": peak_rss_bytes(),
    }


def one_process(cfg: dict[str, Any], bar: _Progress) -> tuple[PrefixCache, Any, float]:
    """The baseline's cache and its running request (keep both: a dropped
    request gives its pages back), grown on 1 thread."""
    torch.set_num_threads(1)
    pool = KVPool(1, 1, HEAD_DIM, page_size=cfg["page_size"], segment_bytes=cfg["segment_bytes"])
    cache = PrefixCache(pool)
    with bar.phase(f"1 process: grow to {cfg['tokens']:,}", cfg["tokens"], "tok") as b:
        req, grow_s = grow(cache, cfg, lambda m: b.advance(*m[1:]))
    return cache, req, grow_s


def time_one(
    pool: KVPool, table: Any, cfg: dict[str, Any], threads: list[int], into: dict[int, list[float]]
) -> torch.Tensor:
    out = torch.empty(0)
    for n in threads:
        torch.set_num_threads(n)
        times, out = time_decode(pool, table, query(cfg), cfg["repeat"])
        into.setdefault(n, []).extend(times)
    return out


def halves(times: list[float], n: int) -> str:
    """Median ms of the first ``n`` (before the ranks ran) and of the rest (after)."""
    return f"{statistics.median(times[:n]) * 1e3:.1f} / {statistics.median(times[n:]) * 1e3:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", default="10M", help="context length (default 10M)")
    p.add_argument("--ranks", type=int, default=2, help="context-parallel ranks (default 2)")
    p.add_argument("--chunk", type=int, default=262_144, help="tokens per growth step")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--segment-bytes", default="64MiB")
    p.add_argument("--batch", type=int, default=1, help="decode rows (default 1: one sequence)")
    p.add_argument("--heads", type=int, default=Q_HEADS, help="query heads (default 8)")
    p.add_argument("--repeat", type=int, default=5, help="timed decode calls per case")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads of the one-process comparison (besides 1; default: every CPU)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds the ranks may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    ranks = args.ranks
    if ranks < 2:
        p.error("--ranks must be >= 2")
    if args.batch != 1:
        p.error("--batch: the context is one sequence; batch 1 only")
    cfg = {
        "tokens": parse_count(args.tokens, "--tokens"),
        "chunk": args.chunk,
        "page_size": args.page_size,
        "segment_bytes": parse_bytes(args.segment_bytes, "--segment-bytes"),
        "batch": args.batch,
        "heads": args.heads,
        "repeat": args.repeat,
        "seed": args.seed,
    }
    tokens = cfg["tokens"]
    threads = sorted({1, max(1, args.threads)})
    bar = _Progress(args.progress)
    print(
        f"one context of {tokens:,} tokens: 1 layer x 1 KV head x head_dim {HEAD_DIM}, FP8 e4m3 "
        f"+ fp32 scale; page {cfg['page_size']}, segment {cfg['segment_bytes']:,} B; "
        f"decode: batch {cfg['batch']} x {cfg['heads']} query heads, median of {cfg['repeat']}; "
        f"{ranks} ranks (1 thread each) vs one process ({' and '.join(map(str, threads))} "
        f"thread(s))\n{load()}",
        flush=True,
    )

    # 1. One process: the baseline.
    cache, req, one_grow_s = one_process(cfg, bar)
    pool, table = cache.pool, cache.page_table([req])
    one_times: dict[int, list[float]] = {}
    one_out = time_one(pool, table, cfg, threads, one_times)
    one = pool.stats()
    print(
        f"one process: grown in {one_grow_s:.1f} s (1 thread), {one['segments']} segments = "
        f"{one['reserved_bytes'] / GB:.3f} GB reserved; {load()}",
        flush=True,
    )

    # 2. R ranks.
    t0 = time.perf_counter()
    with bar.phase(f"{ranks} ranks: grow to {tokens:,}", tokens, "tok") as b:
        res = run_ranks(
            rank_main,
            ranks,
            cfg,
            timeout_s=args.timeout,
            collective_timeout_s=600,
            on_message=lambda r, m: b.advance(*m[1:]),
        )
    ranks_wall = time.perf_counter() - t0
    print(f"{ranks} ranks: done in {ranks_wall:.1f} s (spawn to join); {load()}", flush=True)

    # 3. One process again, so that a change in load shows.
    time_one(pool, table, cfg, threads, one_times)
    assert req.seq_len == tokens and pool.stats()["used_bytes"] == one["used_bytes"]
    print(f"one process timed again; {load()}\n", flush=True)

    # Memory.
    one_peak = one["peak_reserved_bytes"]
    seg = pool.segment_bytes
    target = one_peak / ranks + seg
    rows = []
    for r in res:
        rows.append(
            [
                f"rank {r['rank']}",
                f"{r['tokens_held']:,}",
                f"{r['segments']:,}",
                f"{r['peak_reserved_bytes']:,}",
                f"{r['used_bytes']:,}",
                f"{r['peak_reserved_bytes'] / one_peak:.3f}",
                f"{r['grow_seconds']:.1f}",
                f"{r['max_rss_bytes'] / GB:.2f}",
            ]
        )
    rows.append(
        [
            "one process",
            f"{tokens:,}",
            f"{one['segments']:,}",
            f"{one_peak:,}",
            f"{one['used_bytes']:,}",
            "1.000",
            f"{one_grow_s:.1f}",
            "-",
        ]
    )
    print_table(
        [
            "",
            "tokens held",
            "segments",
            "peak reserved B",
            "used B",
            "vs 1 proc",
            "grow s",
            "RSS GB",
        ],
        rows,
    )
    worst = max(r["peak_reserved_bytes"] for r in res)
    met = worst <= target
    print(
        f"peak reserved per rank / one process: {worst / one_peak:.3f} (worst rank); target "
        f"<= 1/{ranks} + one segment = {target / one_peak:.3f} ({target:,.0f} B): "
        f"{'met' if met else 'NOT met'}\n"
    )

    # Decode.
    steps = [max(ts) for ts in zip(*(r["decode_seconds"] for r in res), strict=True)]
    sharded_s = statistics.median(steps)
    gather_s = statistics.median(
        max(ts) for ts in zip(*(r["gather_seconds"] for r in res), strict=True)
    )
    one_s = {n: statistics.median(ts) for n, ts in one_times.items()}
    kv_bytes = tokens * pool.bytes_per_token
    rows = [
        [
            f"{ranks} ranks x 1 thread",
            f"{sharded_s * 1e3:.1f}",
            f"{kv_bytes / sharded_s / GB:.2f}",
            "1.00",
        ]
    ]
    for n, s in one_s.items():
        rows.append(
            [
                f"1 process x {n} thread(s)",
                f"{s * 1e3:.1f}",
                f"{kv_bytes / s / GB:.2f}",
                f"{s / sharded_s:.2f}",
            ]
        )
    print(f"decode, one token over all {tokens:,} tokens (1 layer):")
    print_table(
        ["", "ms per token", "GB/s of KV", f"time / {ranks} ranks'", "before / after ranks ms"],
        [
            [*row, "-" if i == 0 else halves(one_times[n], cfg["repeat"])]
            for i, (row, n) in enumerate(zip(rows, [0, *one_s], strict=True))
        ],
    )
    diff = max(float(np.abs(r["out"] - one_out.numpy()).max()) for r in res)
    same = all(np.array_equal(r["out"], res[0]["out"]) for r in res)
    print(
        f"speed-up of {ranks} ranks: {one_s[1] / sharded_s:.2f}x vs one process on 1 thread, "
        f"{one_s[threads[-1]] / sharded_s:.2f}x vs one process on {threads[-1]} threads (equal "
        f"CPUs); the all-gather alone: {gather_s * 1e3:.2f} ms median; outputs: "
        f"{'the same bits on every rank' if same else 'ranks DIFFER'}, max |sharded - one "
        f"process| = {diff:.1e}"
    )

    # Bytes.
    b, h = cfg["batch"], cfg["heads"]
    formula = (ranks - 1) * b * h * (HEAD_DIM + 1) * 4
    recv = res[0]["bytes_received_per_call"]
    sent = res[0]["bytes_sent_per_call"]
    calls = res[0]["collectives_per_call"]
    print(
        f"bytes per decode step per layer (rank 0's counters, check=False): {calls:g} "
        f"collective(s), {sent:,.0f} B sent (its own packed buffer), {recv:,.0f} B received; "
        f"formula (R-1) x B x H x (D+1) x 4 = {ranks - 1} x {b} x {h} x {HEAD_DIM + 1} x 4 = "
        f"{formula:,} B received per rank: {'equal' if recv == formula else 'DIFFERENT'}"
    )
    if args.json:
        write_json(
            args.json,
            {
                "config": cfg | {"ranks": ranks, "threads": threads},
                "versions": versions(),
                "one_process": {
                    "peak_reserved_bytes": one_peak,
                    "segments": one["segments"],
                    "used_bytes": one["used_bytes"],
                    "grow_seconds": one_grow_s,
                    "decode_seconds": {str(n): ts for n, ts in one_times.items()},
                    "decode_median_seconds": {str(n): s for n, s in one_s.items()},
                },
                "ranks": [{k: v for k, v in r.items() if k != "out"} for r in res],
                "segment_bytes": seg,
                "per_rank_over_one_process": worst / one_peak,
                "target": target / one_peak,
                "target_met": met,
                "sharded_decode_median_seconds": sharded_s,
                "gather_median_seconds": gather_s,
                "bytes_received_per_call": recv,
                "bytes_sent_per_call": sent,
                "bytes_formula": formula,
                "max_abs_diff_vs_one_process": diff,
                "load_average_end": os.getloadavg(),
            },
        )
    return 0 if met and same else 1


if __name__ == "__main__":
    sys.exit(main())
