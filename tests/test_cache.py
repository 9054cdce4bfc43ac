"""PrefixCache: request lifecycle, prefix reuse, page tables, eviction, bad input."""

from __future__ import annotations

import tracemalloc

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
        ([2**31], InvalidArgument, r"new_tokens\[0\] = 2147483648 is outside"),
        ([-1], InvalidArgument, "outside the token range"),
        ([1.5], TypeError, "integers"),
        ("abc", TypeError, "integers"),
    ]:
        with pytest.raises(exc, match=pattern):
            cache.extend(r, bad)
        assert (r.tokens.tolist(), r.page_ids.tolist(), pool.allocator.free_pages()) == state
    with pytest.raises(InvalidArgument, match=r"tokens\[1\] = 2147483648"):
        cache.begin([0, 2**31])
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
