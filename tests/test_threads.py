"""Eight Python threads over one KVPool + PrefixCache (allocator, tree and pool).

Each thread runs request lifecycles over a small set of shared prompts (so the
tree is contended), writes KV that identifies the request into the pages it
owns, and checks, before finishing, that its own pages still hold its stamp
and its matched prefix holds what the prefix's writer stored. One more thread
shrinks the pool now and then. At the end every page is either cached or
free, and every checker passes. ``RADIXSEG_THREAD_ROUNDS`` scales the run
(the ``slow`` test runs 20x more).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from radixseg import BudgetExhausted, KVPool, PrefixCache

THREADS = 8
PROMPTS = [[p] * 3 + [7] * (5 + 3 * p) for p in range(6)]  # shared first pages


def prefix_value(token_index: int, prompt_id: int) -> float:
    return float(1000 * prompt_id + token_index)


def run(rounds: int, seed: int) -> dict[str, int]:
    pool = KVPool(1, 1, 4, page_size=2, pages_per_segment=16, dtype=torch.float32)
    cache = PrefixCache(pool)
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS + 1)
    done = threading.Event()
    counts = {"requests": 0, "reused_tokens": 0}
    lock = threading.Lock()

    def worker(tid: int) -> None:
        rng = np.random.default_rng(seed + tid)
        try:
            start.wait()
            for _ in range(rounds):
                pid = int(rng.integers(len(PROMPTS)))
                prompt = PROMPTS[pid]
                req = cache.begin(prompt)
                # Matched prefix: what any earlier writer of this prompt stored.
                if req.cached_len:
                    k, _ = pool.read(0, cache.slots(req, 0, req.cached_len))
                    want = torch.tensor([prefix_value(i, pid) for i in range(req.cached_len)])
                    assert torch.equal(k[:, 0, 0], want), f"prefix of prompt {pid} changed"
                try:
                    slots = cache.extend(req, req.uncached)
                except BudgetExhausted:
                    cache.abort(req)
                    continue
                vals = torch.tensor(
                    [prefix_value(i, pid) for i in range(req.cached_len, len(prompt))]
                )
                kv = vals[:, None, None].expand(-1, 1, 4).contiguous()
                pool.write(0, slots, kv, kv)
                # Decode a few tokens into pages only this request owns.
                stamp = float(-(tid * 100_000 + counts["requests"] % 1000 + 1))
                n_dec = int(rng.integers(1, 6))
                dec = cache.extend(req, [int(x) for x in rng.integers(0, 3, n_dec)])
                pool.write(
                    0, dec, torch.full((n_dec, 1, 4), stamp), torch.full((n_dec, 1, 4), stamp)
                )
                k, _ = pool.read(0, dec)
                assert bool((k == stamp).all()), "a page this request owns was overwritten"
                k, _ = pool.read(0, cache.slots(req, 0, len(prompt)))
                assert torch.equal(
                    k[:, 0, 0], torch.tensor([prefix_value(i, pid) for i in range(len(prompt))])
                )
                if rng.random() < 0.2:
                    cache.abort(req)
                else:
                    cache.finish(req)
                with lock:
                    counts["requests"] += 1
                    counts["reused_tokens"] += req.cached_len
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    def shrinker() -> None:
        start.wait()
        while not done.is_set():
            pool.shrink()
            done.wait(0.001)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    side = threading.Thread(target=shrinker)
    for t in (*threads, side):
        t.start()
    for t in threads:
        t.join()
    done.set()
    side.join()
    if errors:
        raise errors[0]
    cache.check_invariants()
    s = pool.stats()
    assert s["running_requests"] == 0 and s["locked_pages"] == 0
    # Every page is cached by the tree or free: nothing leaked, nothing lost.
    assert s["used_pages"] == s["cached_pages"], s
    cache.evict(s["cached_pages"])
    assert pool.allocator.free_pages() == pool.allocator.total_pages()
    pool.shrink(keep=0)
    assert pool.stats()["segments"] == 0
    return counts


def test_eight_threads_pool_tree_allocator() -> None:
    rounds = int(os.environ.get("RADIXSEG_THREAD_ROUNDS", "60"))
    counts = run(rounds, seed=0)
    assert counts["requests"] == THREADS * rounds
    assert counts["reused_tokens"] > 0


@pytest.mark.slow
def test_eight_threads_long() -> None:
    run(5000, seed=1)
