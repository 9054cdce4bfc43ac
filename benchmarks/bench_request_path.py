"""Per-call cost of PrefixCache's request path: begin, prefill extend, decode extend, finish.

2,000 requests over 4 shared 512-token system prompts (64 own tokens each),
page size 1, each decoding 32 tokens one ``extend(req, [token])`` at a time,
then finishing. Prints microseconds per call, best of ``--repeat`` runs, the
garbage collector paused. No peer runs here: ``bench_radix.py`` compares the
tree with SGLang's; this isolates what the engine-facing API adds.

    python benchmarks/bench_request_path.py
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from radixseg import KVPool, PrefixCache


def run(cache: PrefixCache, prompts: list[np.ndarray], steps: list[np.ndarray]) -> list[float]:
    """Microseconds per begin, prefill extend, decode extend and finish."""
    t = [0.0, 0.0, 0.0, 0.0]
    for p in prompts:
        a = time.perf_counter()
        r = cache.begin(p)
        b = time.perf_counter()
        cache.extend(r, r.uncached)
        c = time.perf_counter()
        for s in steps:
            cache.extend(r, s)
        d = time.perf_counter()
        cache.finish(r)
        e = time.perf_counter()
        t = [t[0] + b - a, t[1] + c - b, t[2] + d - c, t[3] + e - d]
    n = len(prompts)
    return [t[0] / n * 1e6, t[1] / n * 1e6, t[2] / n / len(steps) * 1e6, t[3] / n * 1e6]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    systems = [rng.integers(0, 30_000, 512).astype(np.int32) for _ in range(4)]
    prompts = [
        np.concatenate([systems[i % 4], rng.integers(0, 30_000, 64).astype(np.int32)])
        for i in range(args.requests)
    ]
    steps = [np.array([t], dtype=np.int32) for t in range(32)]
    pool = KVPool(1, 1, 8, page_size=1, pages_per_segment=1 << 16, dtype="fp32")
    cache = PrefixCache(pool)
    gc.disable()
    try:
        run(cache, prompts[: max(1, args.requests // 10)], steps)  # warm up
        best = min((run(cache, prompts, steps) for _ in range(max(1, args.repeat))), key=sum)
    finally:
        gc.enable()
    print(
        f"us per call: begin {best[0]:.1f}  prefill extend {best[1]:.1f}  "
        f"decode extend {best[2]:.2f}  finish {best[3]:.1f}"
    )


if __name__ == "__main__":
    main()
