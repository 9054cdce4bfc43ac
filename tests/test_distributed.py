"""Context parallelism (issue 19): one sequence's KV sharded over R gloo ranks.

The placement arithmetic (:class:`ShardLayout`) is checked here, in process.
Everything collective runs in R = 2 and R = 3 spawned CPU processes (one gloo
group per R, shared by the scenarios below; see ``_distributed_harness.py``):
every ``_rank_*`` function runs on every rank with the same arguments, makes
the same cache calls there, and asserts on its own rank; what it returns is
checked here across ranks.

The oracle is test_attention's float64 ``reference`` over each sequence's
whole K/V as the sharded pool stores it (``pool.as_stored``, so FP8 rounding
matches), held in a float32 one-process pool. K/V rows are a function of the
token prefix and the layer (as a model's are), so a prefix cached by one
request holds exactly what any request sharing it would compute. Where ``P *
R`` is a power of two the same calls also drive a one-process
:class:`PrefixCache` of that page size: its page tables must equal the
sharded cache's virtual ones and its attention the sharded result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from _distributed_harness import Ranks
from radixseg import DeviceOutOfMemory, InvalidArgument, KVPool, PrefixCache
from radixseg import attention as A
from radixseg.cache import Request
from radixseg.distributed import (
    RankMismatch,
    ShardedKVPool,
    ShardedPrefixCache,
    ShardLayout,
)
from radixseg.distributed import decode as sharded_decode
from test_attention import (
    HEAD_DIM,
    KV_HEADS,
    LAYER,
    TOL,
    Batch,
    assert_close,
    make_pool,
    rand_q,
    reference,
)

E4M3 = torch.float8_e4m3fn
Q_HEADS = 2 * KV_HEADS  # grouped-query attention: two query heads per KV head


# ----- placement, in process -------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_shard_layout_partitions_every_sequence(page_size: int, ranks: int) -> None:
    p, v = page_size, page_size * ranks
    lens = np.array(sorted({0, 1, max(p - 1, 0), p, v - 1, v, v + 1, 17, 53, 97}))
    layouts = [ShardLayout(p, ranks, r) for r in range(ranks)]
    local = np.stack([s.local_lens(lens) for s in layouts])
    assert (local.sum(0) == lens).all(), local
    # One virtual CSR over shuffled page ids, as a tree hands them out.
    counts = -(-lens // v)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = np.random.default_rng(v).permutation(int(indptr[-1]) + 7)[: int(indptr[-1])]
    tables = [s.local_table(indptr, indices, lens) for s in layouts]
    for i, n in enumerate(lens.tolist()):
        pages = indices[indptr[i] : indptr[i + 1]]
        pos = torch.arange(n)
        virtual_slots = torch.from_numpy(pages)[pos // v] * v + pos % v
        owners = layouts[0].owner(pos)
        for r, s in enumerate(layouts):
            slots = s.local_slots(virtual_slots)
            mine = slots >= 0
            assert torch.equal(mine, owners == r), (n, r)
            # Rank r's pages are the first ceil(L_r / P) virtual ids of the request...
            l_ptr, l_idx, l_last = tables[r]
            row = l_idx[l_ptr[i] : l_ptr[i + 1]]
            n_r = int(local[r, i])
            assert row.tolist() == pages[: -(-n_r // p)].tolist(), (n, r)
            assert l_last[i] == (n_r - (row.size - 1) * p if n_r else 0)
            # ...holding its j-th token at slot row[j // P] * P + j % P, which is
            # the global position (j // P) * V + r * P + j % P.
            j = torch.arange(n_r)
            assert torch.equal(slots[mine], torch.from_numpy(row)[j // p] * p + j % p)
            assert torch.equal(pos[mine], (j // p) * v + r * p + j % p)


def test_sharded_pool_needs_a_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("this process already has a default process group")
    with pytest.raises(InvalidArgument, match="init_process_group"):
        ShardedKVPool(1, KV_HEADS, HEAD_DIM, page_size=4, pages_per_segment=2)
    pool = KVPool(1, KV_HEADS, HEAD_DIM, page_size=4, pages_per_segment=2)
    with pytest.raises(TypeError, match="ShardedKVPool"):
        ShardedPrefixCache(pool)  # type: ignore[arg-type]
    q = torch.zeros(1, Q_HEADS, HEAD_DIM)
    with pytest.raises(TypeError, match="ShardedKVPool"):
        sharded_decode(q, pool, 0, [0, 0], [], [0])  # type: ignore[arg-type]


# ----- what every rank computes: tokens, K/V, the oracle ---------------------------------

_KV_ROWS: dict[int, torch.Tensor] = {}


def token_kv(tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 K, V ``[n, KV_HEADS, HEAD_DIM]`` of a sequence: row ``i`` depends on
    ``tokens[:i + 1]`` and ``layer`` only. Magnitudes vary per token and head
    (FP8 scales); token 0 gives all-zero rows (FP8 scale 0)."""
    rows = []
    h = 0x9E3779B9 + layer
    for t in tokens.tolist():
        h = (h * 1_000_003 + t + 1) % (1 << 62)
        row = _KV_ROWS.get(h)
        if row is None:
            g = torch.Generator().manual_seed(h)
            row = torch.randn(2, KV_HEADS, HEAD_DIM, generator=g)
            row *= torch.exp(torch.randn(2, KV_HEADS, 1, generator=g))
            _KV_ROWS[h] = row = row * (t != 0)
        rows.append(row)
    if not rows:
        empty = torch.zeros(0, KV_HEADS, HEAD_DIM)
        return empty, empty
    kv = torch.stack(rows, 1)
    return kv[0], kv[1]


def prompt(rng: np.random.Generator, n: int) -> np.ndarray:
    t = rng.integers(1, 30_000, n)
    t[3::17] = 0
    return t


def oracle(
    q: torch.Tensor,
    pool: ShardedKVPool,
    seqs: list[torch.Tensor],
    qo_lens: list[int],
    *,
    causal: bool = True,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """test_attention's float64 ``reference`` over each sequence's whole K/V at
    LAYER as ``pool`` stores it, written exactly into a float32 one-process pool."""
    ps = 16
    lens = [len(s) for s in seqs]
    need = [-(-n // ps) for n in lens]
    one = make_pool(torch.float32, ps, pages_per_segment=max(1, sum(need)))
    pages = list(torch.split(one.alloc(sum(need)), need))
    for toks, page in zip(seqs, pages, strict=True):
        k, v = token_kv(toks, LAYER)
        slots = (page.long()[:, None] * ps + torch.arange(ps)).reshape(-1)[: len(toks)]
        one.write(LAYER, slots, pool.as_stored(k), pool.as_stored(v))
    none = torch.zeros(0)  # reference reads lens and pages only
    batch = Batch(none, none, none, lens, pages)
    return reference(q, one, LAYER, qo_lens, batch, causal, sm_scale)


def sharded_pool(page_size: int = 4, dtype: Any = E4M3, **kw: Any) -> ShardedKVPool:
    """Two layers, two pages per segment: requests straddle many segments."""
    args: dict[str, Any] = dict(
        num_layers=2,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        page_size=page_size,
        dtype=dtype,
        pages_per_segment=2,
    )
    args.update(kw)
    return ShardedKVPool(**args)


def same_on_every_rank(*tensors: torch.Tensor, group: Any = None) -> None:
    """Every rank of ``group`` holds the same bits."""
    for t in tensors:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        assert all(torch.equal(p, t) for p in parts), "ranks computed different results"


# ----- one flow of cache calls, for a sharded cache and a one-process one ----------------


def new_kv(reqs: list[Request], starts: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of each request's tokens from ``starts[i]`` on, request after request."""
    kv = [token_kv(r.tokens, layer) for r in reqs]
    k, v = (torch.cat([x[i][s:] for x, s in zip(kv, starts, strict=True)]) for i in (0, 1))
    return k, v


def write_kv(
    cache: PrefixCache, reqs: list[Request], starts: list[int], slots: Any, backend: str
) -> None:
    """Store those K/V at ``slots`` on every layer (a sharded pool keeps its own rows)."""
    for layer in range(cache.pool.num_layers):
        A.store_kv(cache.pool, layer, slots, *new_kv(reqs, starts, layer), backend=backend)


def grow(cache: PrefixCache, req: Request, tokens: Any) -> None:
    """Extend ``req`` and store the new tokens' K/V (with ``pool.write``: the
    Triton store kernel is slow under the interpreter; decode_step runs it)."""
    if len(tokens) == 0:
        return
    start = req.seq_len
    write_kv(cache, [req], [start], cache.extend(req, tokens), "cpu")


def decode_lens(page_size: int, ranks: int) -> list[int]:
    """Sequence lengths after a decode step: short ones no rank but 0 holds any
    of, and remainders past whole virtual pages that leave each rank 0, some
    or all of the last virtual page."""
    p, v = page_size, page_size * ranks
    rems = [1, p, min(v - 1, p + max(1, p // 2)), v - 1, 0]
    return [1, max(1, p - 1)] + [m * v + r for m, r in zip((2, 1, 3, 1, 2), rems, strict=True)]


def prefill(cache: PrefixCache, page_size: int, ranks: int) -> list[Request]:
    """A cached system prompt, then ``decode_lens - 1``-token prompts (the even ones
    reusing its pages), prefilled in interleaved chunks beside a request that
    is aborted midway: pages shuffled over many segments, with holes."""
    v = page_size * ranks
    rng = np.random.default_rng(5)
    system = prompt(rng, 2 * v + 3)
    grow(cache, head := cache.begin(system), head.uncached)
    cache.finish(head)
    prompts = [prompt(rng, n - 1) for n in decode_lens(page_size, ranks)]
    for p in prompts[::2]:
        shared = min(2, (p.size - 1) // v) * v if p.size else 0
        p[:shared] = system[:shared]
    reqs = [cache.begin(p) for p in prompts]
    todo = [r.uncached for r in reqs]
    filler = cache.begin(prompt(rng, 3 * v))
    for rnd in range(max(map(len, todo)) // 7 + 1):
        for r, t in zip(reqs, todo, strict=True):
            grow(cache, r, t[rnd * 7 : rnd * 7 + 7])
        if rnd == 0:
            grow(cache, filler, filler.uncached)
        elif rnd == 1:
            cache.abort(filler)
    if filler.state == "running":
        cache.abort(filler)
    return reqs


def decode_step(cache: PrefixCache, reqs: list[Request], backend: str) -> None:
    tokens = np.random.default_rng(6).integers(1, 30_000, len(reqs))
    starts = [r.seq_len for r in reqs]
    write_kv(cache, reqs, starts, cache.extend_each(reqs, tokens), backend)


def extend_step(
    cache: PrefixCache, reqs: list[Request], page_size: int, ranks: int
) -> tuple[list[Request], list[int]]:
    """New tokens for every request (one gets none) and a fresh request (no cached
    context): returns the batch and its new-token counts."""
    p, v = page_size, page_size * ranks
    rng = np.random.default_rng(8)
    fresh = cache.begin(prompt(rng, p + 3))
    assert fresh.cached_len == 0
    qo = [(2, v + 1, 1, 0, p + 2, 3, v)[i % 7] for i in range(len(reqs))] + [p + 3]
    batch = [*reqs, fresh]
    starts = [r.seq_len for r in batch]
    news = [prompt(rng, n) for n in qo[:-1]] + [fresh.uncached]
    slots = torch.cat([cache.extend(r, t) for r, t in zip(batch, news, strict=True)])
    write_kv(cache, batch, starts, slots, "cpu")
    return batch, qo


def check_placement(cache: ShardedPrefixCache, reqs: list[Request]) -> None:
    """This rank stores exactly the tokens it owns, as ``as_stored`` has them."""
    pool = cache.pool
    for r in reqs:
        slots = cache.slots(r)
        mine = slots >= 0
        assert torch.equal(mine, pool.shard.owner(torch.arange(r.seq_len)) == pool.rank)
        assert int(mine.sum()) == int(pool.shard.local_lens(np.array([r.seq_len]))[0])
        got = pool.read(LAYER, slots[mine])
        want = token_kv(r.tokens, LAYER)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, pool.as_stored(w[mine]))


def check_decode(
    cache: ShardedPrefixCache,
    reqs: list[Request],
    backend: str,
    q_dtype: torch.dtype = torch.float32,
    one: tuple[PrefixCache, list[Request]] | None = None,
    **kw: Any,
) -> None:
    """Decode over ``reqs`` equals the oracle (and the one-process cache's decode),
    with the same bits on every rank."""
    pool = cache.pool
    q = rand_q(len(reqs), Q_HEADS, q_dtype, seed=7)
    out, lse = A.decode(
        q, pool, LAYER, *cache.page_table(reqs), return_lse=True, backend=backend, **kw
    )
    want, want_lse = oracle(q, pool, [r.tokens for r in reqs], [1] * len(reqs))
    tol = TOL[q_dtype]
    assert_close(out, want, *tol, f"decode out ({backend}, {pool.dtype})")
    assert_close(lse, want_lse, *tol, f"decode lse ({backend}, {pool.dtype})")
    if one is not None:
        ref = A.decode(q, one[0].pool, LAYER, *one[0].page_table(one[1]), backend="cpu")
        assert_close(out, ref, *tol, "decode vs one process")
    same_on_every_rank(out, lse, group=pool.comm.group)


def check_extend(
    cache: ShardedPrefixCache,
    reqs: list[Request],
    qo: list[int],
    backend: str,
    q_dtype: torch.dtype = torch.float32,
    one: tuple[PrefixCache, list[Request]] | None = None,
    **kw: Any,
) -> None:
    """Extend (causal, and unmasked with a scale) over ``reqs`` whose last
    ``qo[i]`` tokens are new equals the oracle, with the same bits on every rank."""
    pool = cache.pool
    qo_indptr = torch.tensor([0, *np.cumsum(qo)], dtype=torch.int32)
    table = cache.page_table(reqs)
    q = rand_q(sum(qo), Q_HEADS, q_dtype, seed=9)
    k, v = new_kv(reqs, [r.seq_len - n for r, n in zip(reqs, qo, strict=True)], LAYER)
    tol = TOL[q_dtype]
    outs = []
    for causal, scale in ((True, None), (False, 0.3)):
        out, lse = A.extend(
            q, pool, LAYER, qo_indptr, *table, k=k, v=v, causal=causal, sm_scale=scale,
            return_lse=True, backend=backend, **kw,
        )  # fmt: skip
        seqs = [r.tokens for r in reqs]
        want, want_lse = oracle(q, pool, seqs, qo, causal=causal, sm_scale=scale)
        what = f"extend causal={causal} ({backend}, {pool.dtype})"
        assert_close(out, want, *tol, what + " out")
        assert_close(lse, want_lse, *tol, what + " lse")
        same_on_every_rank(out, lse, group=pool.comm.group)
        outs.append(out)
    if one is not None:
        one_table = one[0].page_table(one[1])
        ref = A.extend(q, one[0].pool, LAYER, qo_indptr, *one_table, backend="torch")
        assert_close(outs[0], ref, *tol, "extend (causal) vs one process")


# ----- scenarios (run on every rank) -----------------------------------------------------


def _rank_attention(
    page_size: int, dtype: torch.dtype, backend: str, q_dtype: torch.dtype
) -> dict[str, Any]:
    pool = sharded_pool(page_size, dtype)
    cache = ShardedPrefixCache(pool)
    ranks, v = pool.ranks, pool.virtual_page_size
    reqs = prefill(cache, page_size, ranks)
    decode_step(cache, reqs, backend)
    one = None
    if v & (v - 1) == 0:  # a one-process pool of page size P * R exists: the same calls
        one_cache = PrefixCache(make_pool(dtype, v, pages_per_segment=pool.pages_per_segment))
        one_reqs = prefill(one_cache, page_size, ranks)
        decode_step(one_cache, one_reqs, backend)
        one = (one_cache, one_reqs)
        for got, want in zip(cache.page_table(reqs), one_cache.page_table(one_reqs), strict=True):
            assert torch.equal(got, want), "virtual page ids differ from one process's"
    # The batch is what the issue asks for: prefixes shared (pages in several
    # rows), pages out of order, over many segments.
    assert any(r.cached_len > 0 for r in reqs)
    pages = cache.page_table(reqs)[1]
    assert pages.unique().numel() < pages.numel()
    assert any(r.page_ids.diff().ne(1).any() for r in reqs)
    assert len(set((pages // pool.pages_per_segment).tolist())) > 3
    check_placement(cache, reqs)
    check_decode(cache, reqs, backend, q_dtype, one)
    empty = cache.begin([])  # no tokens anywhere: out 0, lse -inf, whatever a kernel says
    check_decode(cache, [empty, reqs[0]], backend, q_dtype)
    cache.abort(empty)
    context = [r.seq_len for r in reqs]

    batch, qo = extend_step(cache, reqs, page_size, ranks)
    if one is not None:
        one = (one[0], extend_step(one[0], one[1], page_size, ranks)[0])
    check_placement(cache, batch)
    check_extend(cache, batch, qo, backend, q_dtype, one)

    for r in batch:
        cache.finish(r)
    cache.check_invariants(exclusive=True)
    if one is not None:
        # Memory per rank is 1/R of one device's, page for page.
        assert pool.page_bytes * ranks == one[0].pool.page_bytes
        assert pool.stats()["segments"] == one[0].pool.stats()["segments"]
    return {"context": context, "qo": qo}


def _rank_prefix_reuse_and_eviction() -> dict[str, Any]:
    pool = sharded_pool()
    cache = ShardedPrefixCache(pool)
    ranks, v = pool.ranks, pool.virtual_page_size
    rng = np.random.default_rng(11)
    first = prompt(rng, 3 * v + 5)
    grow(cache, a := cache.begin(first), a.uncached)
    a_pages = a.page_ids
    cache.finish(a)
    b = cache.begin(np.concatenate([first[: 3 * v + 2], prompt(rng, 6)]))
    assert b.cached_len == 3 * v and torch.equal(b.page_ids, a_pages[:3])
    same_on_every_rank(b.page_ids)
    grow(cache, b, b.uncached)
    check_placement(cache, [b])
    check_decode(cache, [b], "cpu")
    stats = pool.stats()
    assert stats["reused_tokens"] == 3 * v
    assert (stats["rank"], stats["ranks"]) == (dist.get_rank(), ranks)
    assert stats["virtual_page_size"] == v == ranks * stats["page_size"]
    cache.finish(b)

    # Eviction and shrink free memory on every rank.
    held = pool.stats_all()
    assert [s["rank"] for s in held["per_rank"]] == list(range(ranks))
    evicted = cache.evict(cache.evictable_pages())
    after = pool.stats_all()
    assert evicted > 0
    for h, e in zip(held["per_rank"], after["per_rank"], strict=True):
        assert e["free_pages"] == h["free_pages"] + evicted and e["cached_pages"] == 0
        assert e["reserved_bytes"] == h["reserved_bytes"] > 0
    assert pool.shrink() > 0
    shrunk = pool.stats_all()
    assert [s["reserved_bytes"] for s in shrunk["per_rank"]] == [0] * ranks
    assert held["total"]["reserved_bytes"] == ranks * held["per_rank"][0]["reserved_bytes"]
    assert shrunk["total"]["reserved_bytes"] == 0
    assert held["total"]["ranks"] == ranks and held["total"]["page_size"] == pool.page_size
    again = cache.begin(first)
    assert again.cached_len == 0
    cache.abort(again)
    cache.check_invariants(exclusive=True)

    # Under a fixed budget the pool evicts (least recently used first), in step on every rank.
    budget = 3 * pool.segment_bytes
    tight = ShardedPrefixCache(sharded_pool(budget_bytes=budget))
    prompts = [prompt(rng, 2 * v + 1) for _ in range(6)]
    for p in prompts:
        grow(tight, r := tight.begin(p), r.uncached)
        tight.finish(r)
        assert tight.pool.reserved_bytes() <= budget
    stats = tight.pool.stats_all()
    evictions = [s["evicted_pages"] for s in stats["per_rank"]]
    assert evictions[0] > 0 and evictions == [evictions[0]] * ranks
    assert stats["total"]["reserved_bytes"] == ranks * budget
    hits = []
    for p in (prompts[0], prompts[-1]):
        hits.append((r := tight.begin(p)).cached_len)
        tight.abort(r)
    assert hits == [0, 2 * v]
    tight.check_invariants(exclusive=True)
    return {"evicted": evicted, "budget_evictions": evictions[0]}


class FlakyFactory:
    """A ``tensor_factory`` whose ``nth`` call after :meth:`arm` raises ``error`` (once)."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_at: int | None = None
        self.error: BaseException | None = None

    def arm(self, nth: int, error: BaseException) -> None:
        self.fail_at, self.error = self.calls + nth, error

    def __call__(self, nbytes: int, device: torch.device) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            self.fail_at = None
            assert self.error is not None
            raise self.error
        return torch.zeros(nbytes, dtype=torch.uint8, device=device)


def snapshot(cache: PrefixCache, reqs: list[Request]) -> tuple[Any, ...]:
    """What a refused call must leave as it was: pool, tree and requests."""
    stats = cache.pool.stats()
    keys = (
        "segments", "total_pages", "free_pages", "reserved_bytes", "cached_pages",
        "cached_tokens", "evictable_pages", "locked_pages", "tree_nodes", "running_requests",
        "requests", "prompt_tokens",
    )  # fmt: skip
    reqs_state = [(r.state, r.seq_len, r.cached_len, r.page_ids.tolist()) for r in reqs]
    return {k: stats[k] for k in keys}, list(cache.pool.allocator.segments()), reqs_state


def refused(
    error: type[Exception], cache: PrefixCache, reqs: list[Request], call: Callable[[], Any]
) -> Exception:
    """``call`` raises ``error`` and changes nothing; returns the error."""
    before = snapshot(cache, reqs)
    with pytest.raises(error) as info:
        call()
    assert snapshot(cache, reqs) == before
    cache.check_invariants(exclusive=False)
    return info.value


def _rank_growth_failure(bad: int, nth: int, torch_oom: bool) -> dict[str, Any]:
    factory = FlakyFactory()
    pool = sharded_pool(tensor_factory=factory)
    cache = ShardedPrefixCache(pool)
    rank, v = pool.rank, pool.virtual_page_size
    rng = np.random.default_rng(12)
    grow(cache, x := cache.begin(prompt(rng, 2 * v + 3)), x.uncached)
    grow(cache, y := cache.begin(prompt(rng, v + 1)), y.uncached)
    reqs = [x, y]
    assert cache.evictable_pages() == 0  # nothing to evict: a refused growth is final

    def fails(call: Callable[[], Any], nth: int) -> None:
        if rank == bad:
            why = "CUDA out of memory (injected)"
            factory.arm(nth, torch.OutOfMemoryError(why) if torch_oom else RuntimeError(why))
        err = refused(DeviceOutOfMemory, cache, reqs, call)
        assert factory.fail_at is None  # the injected failure was hit
        if rank != bad:
            assert f"rank(s) [{bad}] of {pool.ranks}" in str(err), err

    more = prompt(rng, 5 * v)  # three segments or more
    fails(lambda: cache.extend(x, more), nth)
    # An interrupt on one rank while it grows: that rank gets it, the others
    # leave the call with RankMismatch instead of waiting for it in the next
    # collective; nothing changes anywhere.
    if rank == bad:
        factory.arm(nth, KeyboardInterrupt())
        refused(KeyboardInterrupt, cache, reqs, lambda: cache.extend(x, more))  # type: ignore[arg-type]
    else:
        err = refused(RankMismatch, cache, reqs, lambda: cache.extend(x, more))
        assert f"rank(s) [{bad}] of {pool.ranks} raised" in str(err), err
    fails(lambda: pool.alloc(3 * pool.pages_per_segment), nth)
    # A decode step that needs one page, with none free: y's last page is full.
    grow(cache, y, prompt(rng, v - 1))
    hold = pool.alloc(pool.allocator.free_pages())
    fails(lambda: cache.extend_each(reqs, [1, 2]), 1)
    pool.release(hold)

    # The device recovered: the same calls succeed, and the KV is intact.
    grow(cache, x, more)
    decode_step(cache, reqs, "cpu")
    check_placement(cache, reqs)
    check_decode(cache, reqs, "cpu")
    for r in reqs:
        cache.abort(r)
    cache.check_invariants(exclusive=True)
    return {"growth_failures": pool.stats()["growth_failures"]}


def _rank_mismatch() -> None:
    pool = sharded_pool()
    cache = ShardedPrefixCache(pool)
    rank, ranks, v = pool.rank, pool.ranks, pool.virtual_page_size
    rng = np.random.default_rng(13)
    base = prompt(rng, 2 * v + 3)
    grow(cache, x := cache.begin(base), x.uncached)
    grow(cache, y := cache.begin(prompt(rng, v + 1)), y.uncached)  # a page left free
    reqs = [x, y]

    def differs(call: Callable[[], Any], what: str) -> None:
        err = refused(RankMismatch, cache, reqs, call)
        assert what in str(err) and "Nothing was changed" in str(err), err

    other = base.copy()
    other[-1] += rank  # the same length, the last token differs
    differs(lambda: cache.begin(other), "ShardedPrefixCache.begin")
    differs(lambda: cache.begin(base[: v + rank]), "ShardedPrefixCache.begin")
    differs(lambda: cache.extend(x, [7 + rank, 8]), "ShardedPrefixCache.extend")
    differs(lambda: cache.extend_each(reqs, [5, 6 + rank]), "ShardedPrefixCache.extend_each")
    differs(lambda: cache.extend_each(reqs[:: 1 - 2 * (rank % 2)], [5, 6]), "extend_each")
    differs(lambda: cache.truncate(x, x.seq_len - 1 - rank), "ShardedPrefixCache.truncate")
    changed = y.tokens.clone()
    changed[-1] += rank
    differs(lambda: cache.finish(y, changed), "ShardedPrefixCache.finish")
    differs(lambda: cache.abort(reqs[rank % 2]), "ShardedPrefixCache.abort")

    # Attention over different page tables or flags.
    q = rand_q(2, Q_HEADS, seed=3)
    swapped = cache.page_table(reqs[:: 1 - 2 * (rank % 2)])
    differs(lambda: A.decode(q, pool, LAYER, *swapped, backend="cpu"), "decode")
    qo_indptr = torch.arange(3, dtype=torch.int32)
    k, v_new = new_kv(reqs, [r.seq_len - 1 for r in reqs], LAYER)
    table = cache.page_table(reqs)

    def extend(causal: bool) -> Any:
        return A.extend(q, pool, LAYER, qo_indptr, *table, k=k, v=v_new, causal=causal)

    differs(lambda: extend(rank == 0), "extend")
    with pytest.raises(InvalidArgument, match="k= and v="):  # local: no collective
        A.extend(q, pool, LAYER, qo_indptr, *table)

    # A cache one rank changed behind the others' backs.
    extra = None
    if rank == ranks - 1:
        assert pool.allocator.free_pages() > 0  # no growth, so no collective
        extra = pool.alloc(1)
    differs(lambda: cache.begin(base), "ShardedPrefixCache.begin")
    if extra is not None:
        pool.release(extra)

    # Back in step: the same calls go through and compute right.
    extend(True)
    check_decode(cache, reqs, "cpu")
    again = cache.begin(base)
    cache.abort(again)
    for r in reqs:
        cache.finish(r)
    cache.check_invariants(exclusive=True)

    # Pools of different geometry on one rank.
    for kw in (
        {"head_dim": HEAD_DIM * (1 + rank)},
        {"page_size": 4 << rank},
        {"pages_per_segment": 2 + rank},
        {"dtype": E4M3 if rank == 0 else torch.bfloat16},
    ):
        with pytest.raises(RankMismatch, match=r"ShardedKVPool\(\.\.\.\)"):
            sharded_pool(**kw)
    # Arguments one rank refuses: it raises its own error, the others do not
    # wait for it in the geometry check but raise RankMismatch.
    with pytest.raises(InvalidArgument) as bad:
        sharded_pool(page_size=3 if rank == ranks - 1 else 4)
    assert isinstance(bad.value, RankMismatch) == (rank != ranks - 1), bad.value


def _rank_attention_options_differ() -> list[str]:
    """Attention calls that differ between ranks only in ``sm_scale`` or the
    query's dtype; returns what happened to each."""
    pool = sharded_pool()
    cache = ShardedPrefixCache(pool)
    rank = pool.rank
    grow(cache, x := cache.begin(prompt(np.random.default_rng(14), 9)), x.uncached)
    table = cache.page_table([x])
    q = rand_q(1, Q_HEADS, seed=3)
    k, v = new_kv([x], [x.seq_len - 1], LAYER)
    qo_indptr = torch.tensor([0, 1], dtype=torch.int32)
    scale = 0.1 * (1 + rank)
    calls: dict[str, Callable[[], Any]] = {
        "decode sm_scale": lambda: A.decode(q, pool, LAYER, *table, sm_scale=scale),
        "extend sm_scale": lambda: A.extend(
            q, pool, LAYER, qo_indptr, *table, k=k, v=v, sm_scale=scale
        ),
        "decode q dtype": lambda: A.decode(q.to([torch.float32, torch.bfloat16][rank % 2]),
                                           pool, LAYER, *table),
    }  # fmt: skip
    outcomes = []
    for name, call in calls.items():
        try:
            call()
            outcomes.append(f"{name}: computed")
        except RankMismatch:
            outcomes.append(f"{name}: refused")
    cache.abort(x)
    return outcomes


def _rank_unverified() -> None:
    pool = sharded_pool(8, torch.bfloat16, verify=False)
    cache = ShardedPrefixCache(pool)
    reqs = prefill(cache, pool.page_size, pool.ranks)
    decode_step(cache, reqs, "torch")
    calls = pool.stats()["collectives"]
    extra = cache.begin(prompt(np.random.default_rng(3), 5))
    cache.abort(extra)
    assert pool.stats()["collectives"] == calls  # nothing compared
    sent = pool.stats()["collective_bytes_sent"]
    check_decode(cache, reqs, "torch", check=False)
    # One all-gather of [batch, q_heads, head_dim + 1] fp32 per rank (and the
    # test's own gathers of out and lse, which go around the pool).
    stats = pool.stats()
    assert stats["collectives"] == calls + 1
    assert stats["collective_bytes_sent"] - sent == len(reqs) * Q_HEADS * (HEAD_DIM + 1) * 4
    # A batch of no requests still joins the collective (gloo refuses empty tensors).
    q = torch.zeros(0, Q_HEADS, HEAD_DIM)
    out, lse = A.decode(q, pool, LAYER, *cache.page_table([]), return_lse=True, check=False)
    assert out.shape == (0, Q_HEADS, HEAD_DIM) and lse.shape == (0, Q_HEADS)
    batch, qo = extend_step(cache, reqs, pool.page_size, pool.ranks)
    check_extend(cache, batch, qo, "torch", check=False)


def _rank_subgroups() -> None:
    """``group=``: rank 0 alone (R = 1, bit-identical to a KVPool), the other
    ranks as one sharded group, numbered from 0 within it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    solo = dist.new_group([0])
    rest = dist.new_group(list(range(1, world)))
    pool = sharded_pool(4, E4M3, group=solo if rank == 0 else rest)
    cache = ShardedPrefixCache(pool)
    assert (pool.rank, pool.ranks) == ((0, 1) if rank == 0 else (rank - 1, world - 1))
    reqs = prefill(cache, 4, pool.ranks)
    decode_step(cache, reqs, "cpu")
    check_placement(cache, reqs)
    check_decode(cache, reqs, "cpu")
    if rank == 0:
        one = PrefixCache(make_pool(E4M3, 4, pages_per_segment=2))
        one_reqs = prefill(one, 4, 1)
        decode_step(one, one_reqs, "cpu")
        q = rand_q(len(reqs), Q_HEADS, seed=7)
        got = A.decode(q, pool, LAYER, *cache.page_table(reqs), backend="cpu")
        want = A.decode(q, one.pool, LAYER, *one.page_table(one_reqs), backend="cpu")
        assert torch.equal(got, want)


# ----- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=lambda r: f"{r}ranks")
def spawned(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ranks]:
    """One spawned gloo group per R, shared by this module's tests (pytest runs all
    the tests of one R, then closes its group, before starting the next)."""
    group = Ranks(request.param, tmp_path_factory.mktemp(f"gloo{request.param}"))
    yield group
    group.close()


def last_page_shares(n: int, page_size: int, ranks: int) -> list[str]:
    """What each rank holds of the last virtual page of an ``n``-token sequence."""
    v = page_size * ranks
    rem = n % v or v
    held = [min(max(rem - r * page_size, 0), page_size) for r in range(ranks)]
    return ["none" if h == 0 else "all" if h == page_size else "some" for h in held]


# (page size, storage, backend, query dtype): each backend and both storage types
# at both page sizes; "triton" runs the kernels under TRITON_INTERPRET.
ATTENTION_CASES = [
    (1, E4M3, "cpu", torch.float32),
    (1, torch.bfloat16, "triton", torch.float32),
    (16, E4M3, "triton", torch.float32),
    (16, torch.bfloat16, "cpu", torch.bfloat16),
    # More page sizes, storage types and query types, for long runs.
    *(
        pytest.param(*case, marks=pytest.mark.slow)
        for case in [
            (2, torch.float8_e5m2, "torch", torch.float32),
            (4, torch.float32, "cpu", torch.float32),
            (8, torch.float16, "triton", torch.float16),
            (8, E4M3, "cpu", torch.float16),
            (16, E4M3, "torch", torch.bfloat16),
        ]
    ),
]


@pytest.mark.parametrize(("page_size", "dtype", "backend", "q_dtype"), ATTENTION_CASES, ids=str)
def test_decode_and_extend_match_one_process(
    spawned: Ranks, page_size: int, dtype: torch.dtype, backend: str, q_dtype: torch.dtype
) -> None:
    results = spawned.run(_rank_attention, page_size, dtype, backend, q_dtype)
    assert all(r == results[0] for r in results)
    seen = {
        (r, share)
        for n in results[0]["context"]
        for r, share in enumerate(last_page_shares(n, page_size, spawned.ranks))
    }
    shares = ["none", "all"] + (["some"] if page_size > 1 else [])
    want = {(r, s) for r in range(spawned.ranks) for s in shares} - {(0, "none")}
    assert want <= seen, f"lengths leave no rank holding {sorted(want - seen)}"
    assert 0 in results[0]["qo"]


def test_prefix_reuse_eviction_and_shrink_on_every_rank(spawned: Ranks) -> None:
    results = spawned.run(_rank_prefix_reuse_and_eviction)
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize(
    ("nth", "torch_oom"),
    [(2, True), (1, False)],
    ids=["OutOfMemoryError-2nd-segment", "RuntimeError-1st-segment"],
)
def test_growth_failure_on_one_rank_fails_every_rank(
    spawned: Ranks, nth: int, torch_oom: bool
) -> None:
    bad = spawned.ranks - nth  # the last rank, or the one before it
    results = spawned.run(_rank_growth_failure, bad, nth, torch_oom)
    failures = [r["growth_failures"] for r in results]
    assert failures == [3 if r == bad else 0 for r in range(spawned.ranks)]


def test_rank_mismatch_is_raised_on_every_rank(spawned: Ranks) -> None:
    spawned.run(_rank_mismatch)


def test_attention_options_that_differ_are_refused(spawned: Ranks) -> None:
    results = spawned.run(_rank_attention_options_differ)
    assert all(r == results[0] for r in results)  # refused or not, then on every rank
    assert results[0] == [
        "decode sm_scale: refused",
        "extend sm_scale: refused",
        "decode q dtype: refused",
    ]


def test_unverified_pool_computes_the_same(spawned: Ranks) -> None:
    spawned.run(_rank_unverified)


def test_process_subgroups(spawned: Ranks) -> None:
    spawned.run(_rank_subgroups)


def test_a_failing_rank_fails_the_test_with_its_traceback(spawned: Ranks) -> None:
    """Last in the file: the group it breaks is not needed again."""
    with pytest.raises(AssertionError, match=r"(?s)rank 1:.*ZeroDivisionError"):
        spawned.run(_rank_fails_on, 1)
    assert not spawned.alive  # killed; the next run would start a fresh group


def _rank_fails_on(bad: int) -> None:
    if dist.get_rank() == bad:
        raise ZeroDivisionError("on purpose")
    # The others wait in a collective the failing rank never joins: killed, not hung.
    dist.barrier()
