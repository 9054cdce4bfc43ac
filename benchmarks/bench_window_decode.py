"""Native CPU decode over one long FP8 context: full against windowed, chunked, soft-capped.

Issue 20's kernels read only the pages a sliding window (``window_left``) or a
Llama 4 chunk (``chunk_size``) reaches; this times one decode token over the
whole context each way, in the same run, and prints each mode's time as a
ratio of the full-context decode (the baseline). ``--tokens`` sets the context.

    python benchmarks/bench_window_decode.py --tokens 1M --threads 1
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from radixseg import KVPool
from radixseg import attention as A
from radixseg.capacity.units import parse_count

MODES: list[tuple[str, dict[str, Any]]] = [
    ("full", {}),
    ("window_left=8191", {"window_left": 8191}),
    ("chunk_size=8192", {"chunk_size": 8192}),
    ("full, logits_soft_cap=50", {"logits_soft_cap": 50.0}),
    ("window_left=8191, cap 50", {"window_left": 8191, "logits_soft_cap": 50.0}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1M", help="context length (default 1M)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    n = parse_count(args.tokens)
    n -= n % 16
    torch.set_num_threads(args.threads)
    pool = KVPool(1, 2, 128, page_size=16, dtype="fp8")
    pages = pool.alloc(n // 16)
    g = torch.Generator().manual_seed(0)
    for s in range(0, n, 1 << 16):
        m = min(1 << 16, n - s)
        kv = torch.randn(m, 2, 128, generator=g)
        pool.write(0, pages.long()[s // 16 : (s + m) // 16].repeat_interleave(16) * 16
                   + torch.arange(m) % 16, kv, kv, check=False)  # fmt: skip
    indptr = torch.tensor([0, n // 16], dtype=torch.int32)
    last = torch.tensor([16], dtype=torch.int32)
    q = torch.randn(1, 16, 128, generator=g)
    print(f"one decode token over {n:,} FP8 tokens (2 KV heads x 128, 16 query heads, page 16), "
          f"{args.threads} thread(s), median of {args.repeat}")  # fmt: skip
    base = None
    for name, kw in MODES:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            A.decode(q, pool, 0, indptr, pages, last, backend="cpu", check=False, **kw)
            times.append(time.perf_counter() - t)
        ms = float(np.median(times)) * 1e3
        base = base or ms
        print(f"  {name:28s} {ms:9.2f} ms   {ms / base:7.4f}x full")


if __name__ == "__main__":
    main()
