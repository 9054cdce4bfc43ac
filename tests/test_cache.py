"""PrefixCache: request lifecycle, prefix reuse, page tables, eviction, bad input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from radixseg import (
    BudgetExhausted,
    InvalidArgument,
    KVPool,
    PrefixCache,
)


def make(page_size: int = 4, pps: int = 8, **kw: object) -> tuple[KVPool, PrefixCache]:
    pool = KVPool(1, 1, 8, page_size=page_size, pages_per_segment=pps, **kw)  # type: ignore[arg-type]
    return pool, PrefixCache(pool)


def test_prefix_reuse_and_refcounts() -> None:
    pool, cache = make()
    a = cache.begin(range(10))
    assert a.cached_len == 0 and a.uncached.tolist() == list(range(10))
    slots = cache.extend(a, a.uncached)
    assert slots.dtype == torch.int64 and slots.numel() == 10 and a.num_pages == 3
    pool.write(0, slots, torch.randn(10, 1, 8), torch.randn(10, 1, 8))
    cache.finish(a)
    assert pool.stats()["cached_tokens"] == 8  # two whole pages; the tail page is freed
    assert pool.allocator.free_pages() == pool.allocator.total_pages() - 2
    b = cache.begin([*list(range(8)), 50, 51])
    assert b.cached_len == 8 and b.page_ids.tolist() == a.page_ids[:2].tolist()
    assert pool.allocator.refcount(b.page_ids).tolist() == [1, 1]  # the tree's; b holds a lock
    assert pool.stats()["locked_pages"] == 2 and pool.stats()["hit_rate"] == pytest.approx(8 / 20)
    cache.abort(b)
    assert pool.allocator.refcount(a.page_ids[:2]).tolist() == [1, 1]
    assert pool.stats()["locked_pages"] == 0
    cache.check_invariants()


def test_leave_last_keeps_one_token_to_compute() -> None:
    _pool, cache = make()
    a = cache.begin(range(8))
    cache.extend(a, a.uncached)
    cache.finish(a)
    full = cache.begin(range(8))  # fully cached prompt: the last page is left out
    assert full.cached_len == 4 and full.uncached.tolist() == [4, 5, 6, 7]
    cache.abort(full)
    every = cache.begin(range(8), leave_last=False)
    assert every.cached_len == 8 and every.uncached.numel() == 0
    cache.abort(every)


def test_partial_last_page_is_filled_before_new_pages() -> None:
    _pool, cache = make()
    r = cache.begin([1, 2, 3])
    s1 = cache.extend(r, [1, 2, 3])
    assert r.num_pages == 1
    s2 = cache.extend(r, [4])  # same page
    assert r.num_pages == 1 and int(s2[0]) == int(s1[-1]) + 1
    s3 = cache.extend(r, [5, 6])  # crosses into a new page
    assert r.num_pages == 2 and s3.tolist()[0] == int(s2[0]) + 1
    assert cache.slots(r).tolist() == torch.cat([s1, s2, s3]).tolist()
    assert r.tokens.tolist() == [1, 2, 3, 4, 5, 6]
    cache.finish(r)


def test_decode_after_cached_prefix_never_writes_into_shared_pages() -> None:
    _pool, cache = make()
    a = cache.begin(range(9))
    cache.extend(a, a.uncached)
    cache.finish(a)
    b = cache.begin(range(9))  # 8 cached tokens, whole pages
    shared = set(b.page_ids.tolist())
    new = cache.extend(b, b.uncached)
    assert not shared & set((new // 4).tolist())
    cache.finish(b)


def test_page_table_is_flashinfer_csr() -> None:
    _pool, cache = make()
    reqs = []
    for n in (1, 4, 9, 0):
        r = cache.begin([7] * n, namespace=n)
        if n:
            cache.extend(r, r.uncached)
        reqs.append(r)
    indptr, indices, last = cache.page_table(reqs)
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    assert indptr.tolist() == [0, 1, 2, 5, 5]
    assert last.tolist() == [1, 4, 1, 0]
    assert indices.tolist() == torch.cat([r.page_ids for r in reqs]).tolist()
    for r in reqs:
        cache.abort(r)


def test_namespaces_never_share() -> None:
    _pool, cache = make()
    a = cache.begin(range(9), namespace=1)
    cache.extend(a, a.uncached)
    cache.finish(a)
    other = cache.begin(range(9), namespace=2)
    assert other.cached_len == 0
    same = cache.begin(range(9), namespace=1)
    assert same.cached_len == 8
    cache.abort(other)
    cache.abort(same)


def test_eviction_runs_under_budget_pressure() -> None:
    probe = KVPool(1, 1, 8, page_size=4, pages_per_segment=8)
    pool, cache = make(budget_bytes=2 * probe.segment_bytes)
    for i in range(4):  # 4 cached prompts of 4 pages each fill both segments
        r = cache.begin([i] * 16)
        cache.extend(r, r.uncached)
        cache.finish(r)
    assert pool.stats()["cached_pages"] == 16 and pool.allocator.free_pages() == 0
    r = cache.begin([9] * 20)
    cache.extend(r, r.uncached)  # needs 5 pages: evicts the two oldest prompts
    s = pool.stats()
    assert s["segments"] == 2 and s["evicted_pages"] == 8 and s["cached_pages"] == 8
    oldest, newest = (
        cache.begin([0] * 16, leave_last=False),
        cache.begin([3] * 16, leave_last=False),
    )
    assert oldest.cached_len == 0 and newest.cached_len == 16  # LRU went first
    cache.abort(oldest)
    cache.abort(newest)
    with pytest.raises(BudgetExhausted, match="raise budget_bytes"):
        cache.extend(r, [1] * 100)  # more than the budget can hold even after eviction
    assert r.seq_len == 20 and r.num_pages == 5
    cache.check_invariants()


def test_locked_prefixes_survive_pressure() -> None:
    probe = KVPool(1, 1, 8, page_size=4, pages_per_segment=8)
    pool, cache = make(budget_bytes=probe.segment_bytes)
    a = cache.begin([1] * 17)
    cache.extend(a, a.uncached)
    cache.finish(a)
    b = cache.begin([1] * 17)  # locks the 4 cached pages
    other = cache.begin([2])
    with pytest.raises(BudgetExhausted):
        cache.extend(other, [2] * 17)  # 5 pages; 4 free and the rest locked
    assert b.cached_len == 16 and pool.stats()["cached_pages"] == 4
    cache.abort(b)
    cache.extend(other, [2] * 17)  # now the prefix is evictable
    cache.finish(other)


def test_reset_is_refused_while_requests_run() -> None:
    pool, cache = make()
    a = cache.begin(range(9))
    cache.extend(a, a.uncached)
    cache.finish(a)
    b = cache.begin(range(9))
    with pytest.raises(InvalidArgument, match="1 request"):
        cache.reset()
    assert pool.stats()["cached_pages"] == 2 and b.cached_len == 8
    cache.finish(b)
    cache.reset()
    assert pool.stats()["cached_pages"] == 0 and pool.allocator.free_pages() == 8
    cache.check_invariants()


def test_long_matched_prefix_takes_no_page_references() -> None:
    pool, cache = make(page_size=1, pps=1024)
    a = cache.begin(range(1000))
    cache.extend(a, a.uncached)
    cache.finish(a)
    b = cache.begin(range(1000))
    assert b.cached_len == 999
    assert (pool.allocator.refcount(b.page_ids) == 1).all()  # the tree's only
    assert pool.stats()["locked_pages"] == 999
    cache.abort(b)


def test_memory_before_the_first_request_is_independent_of_max_context() -> None:
    """SGLang's dense req->token table alone is 2,049 x 10,485,764 x 4 B = 80 GiB."""

    def build(max_context: int) -> tuple[int, int, KVPool, PrefixCache]:
        tracemalloc.start()
        pool = KVPool(32, 8, 128, page_size=16, dtype=torch.float8_e4m3fn)
        cache = PrefixCache(pool, max_context_len=max_context)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        s = pool.stats()
        heap = s["metadata_bytes"] + s["tree_metadata_bytes"]
        return peak, heap + s["reserved_bytes"], pool, cache

    py_small, native_small, _, _ = build(1_000)
    py_big, native_big, pool, cache = build(10_000_000)
    assert native_big == native_small < 64 * 1024
    assert abs(py_big - py_small) < 16 * 1024 and py_big < 1 << 20
    assert pool.stats()["reserved_bytes"] == 0
    r = cache.begin([1, 2, 3])
    cache.extend(r, [1, 2, 3])
    assert r.num_pages == 1 and r.seq_len == 3  # the page list grows with the request
    assert pool.stats()["reserved_bytes"] == pool.segment_bytes  # one segment, not 10M tokens
    with pytest.raises(InvalidArgument, match="exceeds max_context_len=10,000,000"):
        cache.extend(r, torch.zeros(10_000_000, dtype=torch.int32))
    cache.abort(r)


def test_bad_input_changes_nothing() -> None:
    pool, cache = make()
    r = cache.begin([1, 2, 3])
    cache.extend(r, [1, 2, 3])
    state = (r.tokens.tolist(), r.page_ids.tolist(), pool.allocator.free_pages())
    for bad, exc, pattern in [
        ([2**31], InvalidArgument, r"invalid token id 2147483648 at position 0"),
        ([-1], InvalidArgument, r"invalid token id -1 at position 0: token ids are in 0..2\^31"),
        ([1.5], TypeError, "integers"),
        ("abc", TypeError, "integers"),
    ]:
        with pytest.raises(exc, match=pattern):
            cache.extend(r, bad)
        assert (r.tokens.tolist(), r.page_ids.tolist(), pool.allocator.free_pages()) == state
    with pytest.raises(InvalidArgument, match=r"invalid token id 2147483648 at position 1"):
        cache.begin([0, 2**31])
    with pytest.raises(InvalidArgument, match=r"invalid token id -5 at position 2"):
        cache.begin(np.array([0, 1, -5], dtype=np.int32))  # read in place as u32
    with pytest.raises(TypeError, match="namespace must be an int"):
        cache.begin([1], namespace="a")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="namespace"):
        cache.begin([1], namespace=-1)
    with pytest.raises(TypeError, match="expected a Request"):
        cache.finish("req")  # type: ignore[arg-type]
    _, other = make()
    with pytest.raises(InvalidArgument, match="different PrefixCache"):
        other.finish(r)
    with pytest.raises(InvalidArgument, match="slot range"):
        cache.slots(r, 2, 9)
    cache.finish(r)
    for call in (cache.finish, cache.abort, lambda q: cache.extend(q, [1])):
        with pytest.raises(InvalidArgument, match="already finished"):
            call(r)
    with pytest.raises(InvalidArgument, match="already has a PrefixCache"):
        PrefixCache(pool)
    cache.check_invariants()


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_extend_each_is_extend_per_request(page_size: int) -> None:
    """A decode step through ``extend_each`` leaves every request, the pool and
    the page table as one ``extend(req, [token])`` per request would."""
    rng = torch.Generator().manual_seed(page_size)
    caches = [make(page_size=page_size, pps=16) for _ in range(2)]
    runs: list[list] = []
    for _pool, cache in caches:
        reqs = []
        for i in range(5):
            prompt = list(range(i * 2 + (i % 3)))  # 0..9 tokens, one empty
            r = cache.begin(prompt, namespace=i % 2)
            cache.extend(r, r.uncached)
            reqs.append(r)
        runs.append(reqs)
    for _step in range(2 * page_size + 3):
        toks = torch.randint(0, 1000, (5,), generator=rng)
        (pa, ca), (pb, cb) = caches
        batched = ca.extend_each(runs[0], toks)
        single = torch.cat([cb.extend(r, toks[i : i + 1]) for i, r in enumerate(runs[1])])
        assert batched.dtype == torch.int64 and batched.tolist() == single.tolist()
        for a, b in zip(*runs, strict=True):
            assert (a.seq_len, a.tokens.tolist(), a.page_ids.tolist()) == (
                b.seq_len,
                b.tokens.tolist(),
                b.page_ids.tolist(),
            )
        assert pa.allocator.free_pages() == pb.allocator.free_pages()
        for x, y in zip(ca.page_table(runs[0]), cb.page_table(runs[1]), strict=True):
            assert x.tolist() == y.tolist()
        ca.check_invariants(exclusive=True)
    for (_pool, cache), reqs in zip(caches, runs, strict=True):
        for r in reqs:
            cache.finish(r)
        cache.check_invariants(exclusive=True)


def test_page_table_matches_the_request_page_lists() -> None:
    _pool, cache = make(page_size=4)
    reqs = [cache.begin([5] * n, namespace=n) for n in (3, 0, 8, 13)]
    for r in reqs:
        cache.extend(r, r.uncached)
    indptr, indices, last = cache.page_table(reqs, device="cpu")
    counts = [r.num_pages for r in reqs]
    assert indptr.tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()]
    assert indices.tolist() == torch.cat([r.page_ids for r in reqs]).tolist()
    assert last.tolist() == [3, 0, 4, 1]
    assert [t.numel() for t in cache.page_table([])] == [1, 0, 0]
    for r in reqs:
        cache.abort(r)


def test_extend_each_is_all_or_nothing() -> None:
    probe = KVPool(1, 1, 8, page_size=2, pages_per_segment=4)
    pool, cache = make(page_size=2, pps=4, budget_bytes=probe.segment_bytes)
    a, b, c = (cache.begin([i], leave_last=False) for i in range(3))
    for r in (a, b, c):
        cache.extend(r, [1, 1])  # one full page each; a 4th page is left free
    before = [(r.seq_len, r.num_pages) for r in (a, b, c)], pool.allocator.free_pages()
    # Each needs a page, one is free and nothing is cached: all or none.
    with pytest.raises(BudgetExhausted):
        cache.extend_each([a, b, c], [3, 3, 3])
    assert ([(r.seq_len, r.num_pages) for r in (a, b, c)], pool.allocator.free_pages()) == before
    _, other = make(page_size=2)
    foreign = other.begin([1])
    for reqs, toks, exc, pattern in [
        ([a, b], [1], InvalidArgument, "one token per request"),
        ([a, a], [1, 1], InvalidArgument, r"requests\[0\] appears more than once"),
        ([a, foreign], [1, 1], InvalidArgument, "different PrefixCache"),
        ([a, b], [1, -1], InvalidArgument, "invalid token id -1 at position 1"),
        ([a, "b"], [1, 1], TypeError, "expected a Request"),
        (a, [1], TypeError, "sequence of Requests"),
    ]:
        with pytest.raises(exc, match=pattern):
            cache.extend_each(reqs, toks)  # type: ignore[arg-type]
        assert [(r.seq_len, r.num_pages) for r in (a, b, c)] == before[0]
    cache.finish(c)
    with pytest.raises(InvalidArgument, match="already finished"):
        cache.extend_each([a, c], [1, 1])
    assert (a.seq_len, pool.allocator.free_pages()) == (2, before[1])
    cache.extend_each([a, b], [4, 4])  # c's page is cached, so evictable: now it fits
    for r in (a, b):
        cache.finish(r)
    other.abort(foreign)
    cache.check_invariants(exclusive=True)


def test_extend_each_grows_and_evicts_under_the_budget() -> None:
    probe = KVPool(1, 1, 8, page_size=1, pages_per_segment=4)
    pool, cache = make(page_size=1, pps=4, budget_bytes=2 * probe.segment_bytes)
    old = cache.begin([9] * 7, leave_last=False)
    cache.extend(old, old.uncached)
    cache.finish(old)  # 7 cached pages: both segments grown, one page free
    reqs = [cache.begin([i], leave_last=False) for i in range(3)]
    slots = cache.extend_each(reqs, [1, 2, 3])  # 3 pages: evicts the cached prompt
    assert slots.numel() == 3 and pool.stats()["evicted_pages"] == 7  # whole leaves go
    assert pool.stats()["segments"] == 2
    for r in reqs:
        cache.abort(r)
    cache.check_invariants(exclusive=True)


def test_once_the_budget_is_spent_extend_evicts_in_the_same_call() -> None:
    probe = KVPool(1, 1, 8, page_size=4, pages_per_segment=8)
    pool, cache = make(budget_bytes=probe.segment_bytes)

    def serve(i: int) -> None:
        r = cache.begin([i] * 16, leave_last=False)
        cache.extend(r, r.uncached)  # 4 pages: two prompts fill the segment
        cache.finish(r)

    for i in range(2):
        serve(i)
    assert pool._eviction_point() == -1  # the pool has not been short yet
    serve(2)  # short: the pool finds its budget spent and evicts prompt 0
    assert pool._eviction_point() == 1 and pool.stats()["evicted_pages"] == 4
    serve(3)  # evicted inside the core call: prompt 1 goes, LRU as before
    s = pool.stats()
    assert (s["evicted_pages"], s["cached_pages"], s["segments"]) == (8, 8, 1)
    gone = cache.begin([1] * 16, leave_last=False)
    assert gone.cached_len == 0
    cache.abort(gone)
    # A larger budget: the hint no longer holds, and the pool grows instead.
    pool.budget_bytes = 2 * probe.segment_bytes
    assert pool._eviction_point() == -1
    serve(4)
    s = pool.stats()
    assert (s["evicted_pages"], s["segments"]) == (8, 2)
    cache.check_invariants()


def test_finish_with_tokens_keeps_the_cached_prefix() -> None:
    _pool, cache = make(page_size=2)
    a = cache.begin([1, 2, 3, 4, 5], leave_last=False)
    cache.extend(a, a.uncached)
    cache.finish(a)
    b = cache.begin([1, 2, 3, 4, 9], leave_last=False)
    assert b.cached_len == 4
    cache.extend(b, [0, 0, 0])  # placeholders for what is sampled later
    before = (b.tokens.tolist(), b.page_ids.tolist(), b.state)
    with pytest.raises(InvalidArgument, match="token 2 is 7 but the request's cached prefix"):
        cache.finish(b, tokens=[1, 2, 7, 4, 9, 8, 6])
    assert (b.tokens.tolist(), b.page_ids.tolist(), b.state) == before
    cache.finish(b, tokens=[1, 2, 3, 4, 9, 8, 6])
    assert b.state == "finished" and b.tokens.tolist() == [1, 2, 3, 4, 9, 8, 6]
    c = cache.begin([1, 2, 3, 4, 9, 8, 6], leave_last=False)
    assert c.cached_len == 6  # the replaced tokens were cached
    cache.abort(c)
    cache.check_invariants(exclusive=True)


def test_page_table_into_a_reused_buffer() -> None:
    _pool, cache = make(page_size=2)
    reqs = [cache.begin([n] * n, namespace=n) for n in (3, 5, 1)]
    for r in reqs:
        cache.extend(r, r.uncached)
    want = [t.tolist() for t in cache.page_table(reqs)]
    buf = torch.full((16,), -1, dtype=torch.int32)
    indptr, indices, last = cache.page_table(reqs, out=buf)
    assert [indptr.tolist(), indices.tolist(), last.tolist()] == want
    assert indices.data_ptr() == buf.data_ptr() and buf[len(want[1]) :].eq(-1).all()
    with pytest.raises(InvalidArgument, match="buffer must hold every page"):
        cache.page_table(reqs, out=torch.zeros(2, dtype=torch.int32))
    for bad in (torch.zeros(16, dtype=torch.int64), torch.zeros(4, 4, dtype=torch.int32)):
        with pytest.raises(InvalidArgument, match="contiguous 1-D int32 CPU tensor"):
            cache.page_table(reqs, out=bad)
    for r in reqs:
        cache.abort(r)
