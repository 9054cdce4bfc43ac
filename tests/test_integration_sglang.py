"""radixseg.integrations.sglang: SGLang's allocator and RadixCache contract over radixseg.

The comparison tests drive one request scenario (shared system prompts,
prefill, decode with partial pages, chunked prefill with checkpoints,
multi-turn chat, concurrent locked requests under memory pressure, a failed
allocation, namespaces) through SGLang 0.5.23's own ``RadixCache`` over its
CPU allocator and through the adapter, with the same engine code, and compare
every observation: matched lengths, evictable/protected/total sizes, available
tokens, evicted tokens, allocation failures. SGLang is loaded with
``benchmarks/_sglang.py`` (its cache modules only, no server); those tests are
skipped when SGLang is not installed. The other tests need no SGLang.
"""

from __future__ import annotations

import sys
from array import array
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from radixseg import DoubleFree, InvalidArgument, InvalidHandle, KVPool
from radixseg.integrations import sglang as rs


@pytest.fixture(scope="module")
def sg(sglang_loader: ModuleType) -> SimpleNamespace:
    """SGLang's cache classes, or a clean skip when SGLang cannot be loaded."""
    loader = sglang_loader
    try:
        radix = loader.cache_module("radix_cache")
        base = loader.cache_module("base_prefix_cache")
        paged = loader.cache_module("allocator.paged")
    except ImportError as e:  # pragma: no cover - depends on the install
        pytest.skip(f"SGLang's cache modules cannot be loaded on CPU: {e}")
    return SimpleNamespace(
        loader=loader,
        RadixCache=radix.RadixCache,
        RadixKey=radix.RadixKey,
        MatchPrefixParams=base.MatchPrefixParams,
        InsertParams=base.InsertParams,
        EvictParams=base.EvictParams,
        alloc_extend_naive=paged.alloc_extend_naive,
        alloc_decode_naive=paged.alloc_decode_naive,
    )


# ----- helpers -------------------------------------------------------------------------


def _pool(page_size: int, pps: int = 8, segments: int | None = 64) -> KVPool:
    """A pool with an integer budget of ``segments`` segments (None: unbounded),
    so that no test depends on how much memory the machine has free."""
    pool = KVPool(1, 1, 8, page_size=page_size, pages_per_segment=pps, dtype="fp32")
    if segments is not None:
        pool.budget_bytes = segments * pool.segment_bytes
    return pool


def _ours(page_size: int, segments: int | None = None, **kw: Any):
    pool = _pool(page_size, segments=segments)
    alloc = rs.RadixsegTokenToKVPoolAllocator(pool, size=kw.pop("size", None))
    cache = rs.RadixsegRadixCache(alloc, rs.ReqToTokenTable(8, 256), **kw)
    return pool, alloc, cache


def _key(tokens: list[int], extra_key: str | None = None, **kw: Any) -> rs.RadixKey:
    return rs.RadixKey(array("q", tokens), extra_key, **kw)


def _insert(cache: rs.RadixsegRadixCache, tokens: list[int], slots: torch.Tensor, **kw: Any):
    return cache.insert(rs.InsertParams(key=_key(tokens, **kw), value=slots))


def _match(cache: rs.RadixsegRadixCache, tokens: list[int], **kw: Any) -> rs.MatchResult:
    return cache.match_prefix(rs.MatchPrefixParams(key=_key(tokens, **kw)))


# ----- the engine both caches are driven by ------------------------------------------------


class _KV:
    """SGLang 0.5.23's per-request KV record (the fields its RadixCache reads)."""

    def __init__(self, row: int, protected: int) -> None:
        self.req_pool_idx: int | None = row
        self.cache_protected_len = protected
        self.cache_inserted_len = 0
        self.swa_evict_floor = 0


class _Req:
    """SGLang 0.5.23's ``Req``, reduced to what the radix cache reads."""

    def __init__(self, prompt: list[int], extra_key: str | None) -> None:
        self.origin_input_ids = array("q", prompt)
        self.output_ids = array("q")
        self.extra_key = extra_key
        self.cache_salt = None
        self.priority = 0
        self.kv: _KV | None = None
        self.lock: Any = None
        self.last_node: Any = None
        self.prefix_len = 0
        self.seq = 0  # tokens whose KV is in the row

    @property
    def full_untruncated_fill_ids(self) -> array:
        return self.origin_input_ids + self.output_ids


class _LegacyReq:
    """A pre-0.5.23 ``Req``: ``req_pool_idx``, ``fill_ids``, ``prefix_indices``, no lock object."""

    def __init__(self, prompt: list[int], extra_key: str | None) -> None:
        self.origin_input_ids = array("q", prompt)
        self.output_ids = array("q")
        self.extra_key = extra_key
        self.req_pool_idx: int | None = None
        self.prefix_indices = torch.zeros(0, dtype=torch.int64)
        self.last_node: Any = None
        self.prefix_len = 0
        self.seq = 0

    @property
    def fill_ids(self) -> array:
        return (self.origin_input_ids + self.output_ids)[: self.seq]


class _Engine:
    """A scheduler's cache calls, written once against SGLang 0.5.23's API.

    ``api="0.5.23"`` uses ``lock``/``prefix_device_indices``/``checkpoint`` and
    releases as ``common.release_kv_cache`` does (free the row past
    ``cache_protected_len``, unlock, free the row); ``api="legacy"`` (radixseg
    only) uses ``inc_lock_ref``, ``MatchResult.device_indices``,
    ``cache_unfinished_req`` and ``cache_finished_req``. Every observation goes
    to ``log``; ``content`` maps each slot to the token whose KV it holds.
    """

    def __init__(self, cache: Any, alloc: Any, keys: Any, api: str = "0.5.23") -> None:
        self.cache, self.alloc, self.keys, self.api = cache, alloc, keys, api
        self.table = cache.req_to_token_pool
        self.ps = alloc.page_size
        self.log: list[tuple[Any, ...]] = []
        self.content: dict[int, tuple[str | None, int, int]] = {}

    def observe(self, what: str, *values: Any) -> None:
        c = self.cache
        self.log.append(
            (
                what,
                *values,
                c.evictable_size(),
                c.protected_size(),
                c.total_size(),
                self.alloc.available_size(),
            )
        )

    def _check_slots(self, req: Any, tokens: Any, slots: torch.Tensor) -> None:
        """The KV at ``slots`` belongs to ``tokens`` in ``req``'s namespace."""
        for pos, slot in enumerate(slots.tolist()):
            assert slot >= self.ps, "a slot of the padding page was handed out"
            assert self.content[slot] == (req.extra_key, pos, tokens[pos])

    def start(self, prompt: list[int], extra_key: str | None = None) -> Any:
        legacy = self.api == "legacy"
        req = (_LegacyReq if legacy else _Req)(prompt, extra_key)
        key = self.keys.RadixKey(array("q", prompt), extra_key, limit=len(prompt) - 1)
        m = self.cache.match_prefix(self.keys.MatchPrefixParams(key=key))
        req.prefix_len, req.last_node = m.device_prefix_len, m.last_device_node
        (row,) = self.table.alloc_rows(1)
        if legacy:
            self.cache.inc_lock_ref(req.last_node)
            req.req_pool_idx = row
            prefix = m.device_indices
            req.prefix_indices = prefix
        else:
            req.lock = self.cache.lock(req.last_node)
            req.kv = _KV(row, req.prefix_len)
            prefix = self.cache.prefix_device_indices(req)
        assert len(prefix) == req.prefix_len
        self._check_slots(req, prompt, prefix)
        self.table.write((row, slice(0, req.prefix_len)), prefix)
        req.seq = req.prefix_len
        self.observe("match", req.prefix_len)
        return req

    def _row(self, req: Any) -> torch.Tensor:
        row = req.req_pool_idx if self.api == "legacy" else req.kv.req_pool_idx
        return self.table.req_to_token[row]

    def extend(self, req: Any, upto: int) -> bool:
        """Compute KV for tokens ``req.seq .. upto`` (evicting first, as the scheduler)."""
        ps, seq = self.ps, req.seq
        need = (-(-upto // ps) - -(-seq // ps)) * ps
        available = self.alloc.available_size()
        if available < need:
            evicted = self.cache.evict(self.keys.EvictParams(num_tokens=need - available))
            self.observe("evict", evicted.num_tokens_evicted)
        new = self.alloc.alloc(need)
        if new is None:
            self.observe("alloc failed", need)
            return False
        row = self._row(req)
        in_page = min(upto, -(-seq // ps) * ps) - seq
        first = int(row[seq - 1]) + 1 if in_page else 0
        slots = torch.cat(
            [torch.arange(first, first + in_page, dtype=torch.int64), new[: upto - seq - in_page]]
        )
        row[seq:upto] = slots.to(row.dtype)
        tokens = req.origin_input_ids + req.output_ids
        for pos, slot in zip(range(seq, upto), slots.tolist(), strict=True):
            self.content[slot] = (req.extra_key, pos, tokens[pos])
        req.seq = upto
        self.observe("extend", upto)
        return True

    def prefill(self, req: Any) -> bool:
        return self.extend(req, len(req.origin_input_ids))

    def decode(self, req: Any, tokens: list[int]) -> None:
        """Generate ``tokens``; the KV of all but the newest one is computed."""
        for t in tokens:
            req.output_ids.append(t)
            assert self.extend(req, len(req.origin_input_ids) + len(req.output_ids) - 1)

    def chunk(self, req: Any) -> None:
        """Chunked prefill / multi-step: cache what the request has computed so far."""
        if self.api == "legacy":
            self.cache.cache_unfinished_req(req)
        else:
            self.cache.checkpoint(req, up_to=req.seq)
        self._check_slots(req, req.origin_input_ids + req.output_ids, self._row(req)[: req.seq])
        self.observe("checkpoint", req.seq)

    def finish(self, req: Any, cache: bool = True) -> None:
        kv_len = req.seq
        if self.api == "legacy":
            if cache:
                self.cache.cache_finished_req(req)
            else:
                self.cache.release_kv_cache(req, checkpoint=False, kv_len=kv_len)
        else:
            if cache:
                self.cache.checkpoint(req, up_to=kv_len)
            protected = req.kv.cache_protected_len
            row = self._row(req)
            self.alloc.free_segment(row[protected:kv_len], start_pos=protected)
            self.cache.unlock(req.lock)
            req.lock = None
            self.table.free(req)
        self.observe("finish" if cache else "abort", kv_len)


# Capacity of both sides: 160 tokens of pages, one page of which is padding.
_POOL_TOKENS = 160


def _capacity(ps: int) -> int:
    return _POOL_TOKENS - ps


def _scenario(e: _Engine, rng: torch.Generator) -> None:
    """The request trace, in units of 4 tokens (a page, or 4 pages at page_size 1)."""
    u = 4

    def toks(n: int) -> list[int]:
        return torch.randint(1, 30_000, (n,), generator=rng).tolist()

    system = toks(5 * u // 2 + 1)
    # Two requests on one system prompt; decode crosses page boundaries.
    a = e.start(system + toks(2 * u - 1))
    assert e.prefill(a)
    e.decode(a, toks(u + 2))
    e.finish(a)
    b = e.start(system + toks(3 * u))
    assert e.prefill(b)
    e.decode(b, toks(2))
    e.finish(b)
    # Multi-turn: the next turn repeats the conversation so far.
    turn2 = list(a.origin_input_ids) + list(a.output_ids) + toks(u + 1)
    a2 = e.start(turn2)
    assert e.prefill(a2)
    e.decode(a2, toks(3))
    e.finish(a2)
    # Chunked prefill: checkpoint after each chunk, then decode and finish.
    long = toks(7 * u + 3)
    c = e.start(long)
    for end in (2 * u + 1, 5 * u - 1, len(long)):
        assert e.extend(c, end)
        e.chunk(c)
    e.decode(c, toks(u))
    e.chunk(c)  # a decode-time checkpoint (multi-step)
    e.decode(c, toks(2))
    e.finish(c)
    # Namespaces: the same tokens under an extra_key share nothing with None.
    f = e.start(system + toks(u), extra_key="lora-1")
    assert e.prefill(f)
    e.finish(f)
    g = e.start(system + toks(2), extra_key="lora-1")
    assert e.prefill(g)
    e.finish(g)
    # Pressure: two long requests run at once, locking what they matched;
    # eviction takes unlocked leaves until nothing unlocked is left.
    d = e.start(system + toks(14 * u))
    assert e.prefill(d)
    h = e.start(turn2 + toks(3 * u))
    assert e.prefill(h)
    big = e.start(toks(30 * u))
    assert not e.prefill(big)  # everything else is locked: alloc fails
    e.finish(big, cache=False)
    e.finish(h)
    e.decode(d, toks(u + 1))
    e.finish(d)
    # Retry after the others released their locks.
    again = e.start(big.origin_input_ids.tolist()[: 20 * u])
    assert e.prefill(again)
    e.finish(again)
    for prompt in (system + toks(3), turn2 + toks(1), long[: 6 * u] + toks(u)):
        r = e.start(prompt)
        assert e.prefill(r)
        e.finish(r)
    # Evict everything: every page comes back.
    evicted = e.cache.evict(e.keys.EvictParams(num_tokens=10**6)).num_tokens_evicted
    e.observe("evict all", evicted)


def _sglang_side(sg: SimpleNamespace, ps: int) -> _Engine:
    alloc = sg.loader.allocator(_capacity(ps), ps)
    cache = sg.RadixCache(
        sg.loader.cache_init_params(
            disable=False,
            req_to_token_pool=rs.ReqToTokenTable(8, 512),
            token_to_kv_pool_allocator=alloc,
            page_size=ps,
        )
    )
    return _Engine(cache, alloc, sg)


def _radixseg_side(sg: Any, ps: int, capacity: str, api: str) -> _Engine:
    if capacity == "budget":  # whole segments of 8 pages: page 0 + SGLang's size
        pool = _pool(ps, pps=8, segments=_POOL_TOKENS // ps // 8)
        alloc = rs.RadixsegTokenToKVPoolAllocator(pool)
    else:  # a larger pool capped at SGLang's size
        pool = _pool(ps, pps=8)
        alloc = rs.RadixsegTokenToKVPoolAllocator(pool, size=_capacity(ps))
    cache = rs.RadixsegRadixCache(alloc, rs.ReqToTokenTable(8, 512))
    return _Engine(cache, alloc, sg, api=api)


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize(
    ("capacity", "api"), [("budget", "0.5.23"), ("size", "0.5.23"), ("budget", "legacy")]
)
def test_same_scenario_as_sglang_radix_cache(sg, page_size, capacity, api):
    theirs = _sglang_side(sg, page_size)
    ours = _radixseg_side(sg, page_size, capacity, api)
    assert ours.alloc.size == theirs.alloc.size == _capacity(page_size)
    for e in (theirs, ours):
        e.observe("start")
        _scenario(e, torch.Generator().manual_seed(7))
    for i, (t, o) in enumerate(zip(theirs.log, ours.log, strict=True)):
        assert t == o, f"step {i}: SGLang {t} != radixseg {o}\n{theirs.log[max(0, i - 3) : i]}"
    # The scenario exercised what it claims to.
    kinds = {entry[0] for entry in ours.log}
    assert {"evict", "alloc failed", "checkpoint", "abort", "evict all"} <= kinds
    assert max(entry[1] for entry in ours.log if entry[0] == "match") >= 28
    # Nothing leaked: everything but the padding page is available again.
    assert ours.alloc.available_size() == theirs.alloc.available_size() == _capacity(page_size)
    assert ours.cache.total_size() == 0
    ours.alloc.pool.check_invariants()
    ours.cache.sanity_check()
    assert ours.alloc.pool.allocator.refcount([0]).tolist() == [1]


@pytest.mark.parametrize("page_size", [1, 4])
def test_lock_deltas_match_sglang(sg, page_size):
    """inc/dec_lock_ref deltas and sizes on a split path, root locks, eviction."""
    ps = page_size
    sgl = _sglang_side(sg, ps)
    ours = _radixseg_side(sg, ps, "budget", "0.5.23")
    out = []
    for e in (sgl, ours):
        c, a, k = e.cache, e.alloc, e.keys
        log: list[Any] = []
        first, second = list(range(1, 1 + 6 * ps)), list(range(1, 1 + 3 * ps)) + [99] * 2 * ps
        for tokens in (first, second):
            slots = a.alloc(len(tokens))
            params = rs.InsertParams if c is ours.cache else k.InsertParams
            r = c.insert(params(key=k.RadixKey(array("q", tokens)), value=slots))
            a.free(slots[: r.prefix_len])  # the engine frees its duplicates
            log.append((r.prefix_len, c.evictable_size(), c.protected_size()))
        m1 = c.match_prefix(k.MatchPrefixParams(key=k.RadixKey(array("q", first))))
        m2 = c.match_prefix(k.MatchPrefixParams(key=k.RadixKey(array("q", second))))
        root = c.match_prefix(k.MatchPrefixParams(key=k.RadixKey(array("q", [7] * ps))))
        log.append((m1.device_prefix_len, m2.device_prefix_len, root.device_prefix_len))
        for op, node in (
            ("inc", m1.last_device_node),
            ("inc", m2.last_device_node),
            ("inc", m1.last_device_node),
            ("inc", root.last_device_node),
            ("dec", root.last_device_node),
            ("dec", m1.last_device_node),
            ("dec", m1.last_device_node),
        ):
            r = c.inc_lock_ref(node) if op == "inc" else c.dec_lock_ref(node)
            log.append((op, r.delta, c.evictable_size(), c.protected_size()))
        log.append(("evict", c.evict(k.EvictParams(num_tokens=1)).num_tokens_evicted))
        log.append((c.evictable_size(), c.protected_size(), c.total_size()))
        c.dec_lock_ref(m2.last_device_node)
        log.append(("evict", c.evict(k.EvictParams(num_tokens=10**6)).num_tokens_evicted))
        log.append((c.evictable_size(), c.protected_size(), a.available_size()))
        out.append(log)
    assert out[0] == out[1]
    assert out[1][-1] == (0, 0, _capacity(ps))  # nothing leaked


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_alloc_extend_and_decode_match_sglang(sg, page_size):
    """The paged fill rule (rest of the last page, then new pages) is SGLang's,
    checked against its own reference implementation with our pages."""
    ps = page_size
    pool = _pool(ps, pps=64)
    alloc = rs.RadixsegTokenToKVPoolAllocator(pool)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        bs = 5
        # Every request holds its prefix in pages of its own.
        prefix = torch.randint(0, 3 * ps + 1, (bs,), generator=g)
        extend = torch.randint(0, 3 * ps + 2, (bs,), generator=g)
        seq = prefix + extend
        last = torch.empty(bs, dtype=torch.int64)
        for i, p in enumerate(prefix.tolist()):
            held = alloc.alloc(-(-p // ps) * ps)
            last[i] = held[p - 1] if p else -1
        n = int(extend.sum())
        out = alloc.alloc_extend(prefix, prefix, seq, seq, last, n)
        assert out is not None and out.dtype == torch.int64 and out.numel() == n
        assert n == 0 or int(out.min()) >= ps
        # Our new pages, in the order the rule takes them.
        fresh = [s // ps for s in out.tolist() if s // ps not in {int(x) // ps for x in last}]
        order = list(dict.fromkeys(fresh))
        want = torch.empty(n, dtype=torch.int64)
        sg.alloc_extend_naive(
            prefix, seq, last, torch.tensor(order, dtype=torch.int64), want, ps, "cpu"
        )
        assert torch.equal(out, want)
        # One decode step for every request.
        seq2 = seq + 1
        last2 = torch.tensor(
            [
                int(out[int(extend[: i + 1].sum()) - 1]) if extend[i] else int(last[i])
                for i in range(bs)
            ]
        )
        got = alloc.alloc_decode(seq2, seq2, last2)
        need = ((seq2 - 1) % ps == 0).nonzero().flatten()
        pages = torch.tensor([int(got[i]) // ps for i in need.tolist()], dtype=torch.int64)
        want = torch.empty(bs, dtype=torch.int64)
        sg.alloc_decode_naive(seq2, last2, pages, want, ps, pages.numel())
        assert torch.equal(got, want)


# ----- the allocator contract (no SGLang needed) ----------------------------------------------


@pytest.mark.parametrize("page_size", [1, 4])
def test_slot_zero_is_never_handed_out(page_size):
    ps = page_size
    pool, alloc, _ = _ours(ps, segments=3)  # 24 pages: page 0 + 23
    assert alloc.size == alloc.available_size() == 23 * ps
    got = [alloc.alloc(ps) for _ in range(23)]
    assert alloc.alloc(ps) is None
    slots = torch.cat(got)
    assert slots.dtype == torch.int64 and int(slots.min()) == ps
    assert sorted(slots.tolist()) == list(range(ps, 24 * ps))
    with pytest.raises(InvalidHandle, match="padding"):
        alloc.free(torch.tensor([0]))
    for s in got:
        alloc.free(s)
    alloc.clear()
    assert alloc.available_size() == 23 * ps
    assert int(alloc.alloc(23 * ps).min()) == ps
    assert pool.allocator.refcount([0]).tolist() == [1]
    pool.shrink()
    assert 0 in pool.allocator.segments()  # segment 0 stays: it holds page 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_alloc_returns_none_when_exhausted(page_size):
    ps = page_size
    pool, alloc, cache = _ours(ps, segments=2)  # 16 pages: page 0 + 15
    assert alloc.alloc(16 * ps) is None
    assert alloc.available_size() == 15 * ps
    if ps > 1:
        with pytest.raises(InvalidArgument, match="whole number of pages"):
            alloc.alloc(ps + 1)
    a = alloc.alloc(10 * ps)
    assert a is not None and pool.stats()["segments"] == 2
    before = pool.stats()
    assert alloc.alloc(6 * ps) is None  # growth refused by the budget, nothing cached
    assert pool.stats() == before and alloc.available_size() == 5 * ps
    # Cache 10 pages; a new allocation then evicts them on its own.
    _insert(cache, list(range(10 * ps)), a)
    assert cache.evictable_size() == 10 * ps and alloc.available_size() == 5 * ps
    b = alloc.alloc(8 * ps)
    assert b is not None and cache.evictable_size() < 10 * ps
    alloc.free(b)
    # Locked cache pages are not evicted: alloc fails and changes nothing.
    c = alloc.alloc(7 * ps)
    _insert(cache, list(range(100, 100 + 7 * ps)), c)
    m = _match(cache, list(range(100, 100 + 7 * ps)))
    cache.inc_lock_ref(m.last_device_node)
    assert alloc.alloc(15 * ps) is None
    assert cache.protected_size() == 7 * ps and alloc.available_size() == 8 * ps
    cache.dec_lock_ref(m.last_device_node)
    assert alloc.alloc(15 * ps) is not None and cache.total_size() == 0


def test_size_cap_evicts_within_the_cap():
    ps = 2
    _, alloc, cache = _ours(ps, size=6 * ps)  # unbounded pool, 6 pages allowed
    assert alloc.size == 6 * ps and alloc.available_size() == 6 * ps
    a = alloc.alloc(6 * ps)
    _insert(cache, list(range(6 * ps)), a)
    assert alloc.available_size() == 0
    b = alloc.alloc(2 * ps)  # evicts the cached leaf to stay within the cap
    assert b is not None and cache.total_size() == 0
    assert alloc.alloc(5 * ps) is None
    alloc.free(b)
    c = alloc.alloc(3 * ps)
    _insert(cache, list(range(50, 50 + 3 * ps)), c)
    assert alloc.alloc(7 * ps) is None  # more than the cap even after eviction:
    assert cache.total_size() == 3 * ps  # nothing was evicted for nothing


def test_without_evict_on_alloc_the_engine_evicts():
    ps = 2
    pool, alloc, cache = _ours(ps, segments=1, evict_on_alloc=False)  # 7 usable pages
    a = alloc.alloc(7 * ps)
    _insert(cache, list(range(7 * ps)), a)
    assert alloc.alloc(ps) is None and cache.evictable_size() == 7 * ps  # as SGLang's
    assert alloc.check_decode_capacity(num_tokens=ps, tree_cache=cache)  # evicts a leaf
    assert alloc.alloc(ps) is not None and cache.total_size() == 0
    assert pool.stats()["segments"] == 1


@pytest.mark.parametrize("page_size", [1, 4])
def test_double_free_is_detected(page_size):
    ps = page_size
    pool, alloc, cache = _ours(ps)
    a, b = alloc.alloc(2 * ps), alloc.alloc(2 * ps)
    alloc.free(a)
    free_before = pool.allocator.free_pages()
    with pytest.raises(DoubleFree):
        alloc.free(a)
    with pytest.raises(DoubleFree):  # all or nothing: b is not freed either
        alloc.free(torch.cat([b, a]))
    assert pool.allocator.free_pages() == free_before
    # Within one call a page is freed once (SGLang's paged free dedups).
    alloc.free(torch.cat([b, b]))
    # Twice across the calls of one group: detected at the end, nothing freed.
    c = alloc.alloc(2 * ps)
    alloc.free_group_begin()
    alloc.free(c)
    alloc.free(c[:1])
    with pytest.raises(DoubleFree):
        alloc.free_group_end()
    assert alloc.free_group is None and pool.allocator.free_pages() == free_before
    alloc.free(c)
    with pytest.raises(DoubleFree):
        alloc.free_page_ids(c[:1] // ps)
    # A page the tree owns goes back when it is evicted, not twice.
    d = alloc.alloc(ps)
    _insert(cache, list(range(ps)), d)
    alloc.free_group_begin()
    with pytest.raises(InvalidArgument, match="nested"):
        alloc.free_group_begin()
    alloc.free_group_end()
    assert cache.evict(rs.EvictParams(num_tokens=1)).num_tokens_evicted == ps
    with pytest.raises(DoubleFree):
        alloc.free(d)


@pytest.mark.parametrize("page_size", [1, 4])
def test_free_group_defers_until_end(page_size):
    ps = page_size
    _, alloc, _ = _ours(ps, segments=4)  # an integer budget: no free-memory dependence
    xs = [alloc.alloc(ps) for _ in range(3)]
    avail = alloc.available_size()
    alloc.free_group_begin()
    for x in xs:
        alloc.free(x)
    x0 = xs[0].clone()
    xs[0].fill_(123456)  # the group kept its own copy
    assert alloc.available_size() == avail and len(alloc.free_group) == 3
    alloc.free_group_end()
    assert alloc.available_size() == avail + 3 * ps
    alloc.free_group_end()  # no group open: nothing to do
    assert int(x0[0]) >= ps


@pytest.mark.parametrize("page_size", [1, 4])
def test_backup_restore_rolls_back(page_size):
    ps = page_size
    pool, alloc, cache = _ours(ps)
    before = alloc.alloc(2 * ps)
    avail = alloc.available_size()
    state = alloc.backup_state()
    a = alloc.alloc(3 * ps)
    b = alloc.alloc(ps)
    alloc.free(b)  # allocated and freed since the backup: not freed again
    c = alloc.alloc(2 * ps)
    _insert(cache, list(range(2 * ps)), c)  # handed to the tree: stays cached
    alloc.free(before[:ps])  # allocated before, freed since: stays free
    alloc.restore_state(state)
    assert alloc.available_size() == avail + ps - 2 * ps  # `before`'s page back, c cached
    assert cache.total_size() == 2 * ps
    with pytest.raises(DoubleFree):
        alloc.free(a)
    alloc.restore_state(state)  # again: nothing left to roll back
    d = alloc.alloc(ps)
    inner = alloc.backup_state()
    alloc.restore_state(state)  # restoring past `inner` makes it stale
    with pytest.raises(InvalidArgument, match="stale"):
        alloc.restore_state(inner)
    assert int(pool.allocator.refcount(d[:1] // ps)[0]) == 0
    other = rs.RadixsegTokenToKVPoolAllocator(_pool(ps))
    with pytest.raises(InvalidArgument):
        other.restore_state(state)
    alloc.free_group_begin()
    alloc.free(before[ps:])
    with pytest.raises(InvalidArgument, match="free group"):
        alloc.restore_state(state)
    alloc.free_group_end()
    del state, inner
    alloc.alloc(ps)
    assert alloc._journal == []  # no live state: nothing is journaled


def test_extra_key_isolates_namespaces(monkeypatch):
    ps = 2
    _, alloc, cache = _ours(ps)
    tokens = list(range(8))
    for extra_key, salt in ((None, None), ("lora-1", None), ("lora-1", "user-9")):
        slots = alloc.alloc(8)
        key = _key(tokens, extra_key, cache_salt=salt)
        assert cache.insert(rs.InsertParams(key=key, value=slots)).prefix_len == 0
    for extra_key, salt in ((None, None), ("lora-1", None), ("lora-1", "user-9")):
        m = _match(cache, tokens, extra_key=extra_key, cache_salt=salt)
        assert m.device_prefix_len == 8
    assert _match(cache, tokens, extra_key="lora-2").device_prefix_len == 0
    assert _match(cache, tokens, cache_salt="user-9").device_prefix_len == 0
    # Distinct pages per namespace; the mapping is stable across processes.
    got = {
        tuple(_match(cache, tokens, extra_key=k).device_indices.tolist()) for k in (None, "lora-1")
    }
    assert len(got) == 2
    assert rs.namespace_of(None, None) == rs.namespace_of(None, "") == 0
    assert rs.namespace_of("lora-1") == 0xDC41465A9DD9D54F
    # A hash collision is refused, not shared.
    monkeypatch.setattr(rs.namespaces, "_hash64", lambda data: 0x1234)
    cache2 = rs.RadixsegRadixCache(rs.RadixsegTokenToKVPoolAllocator(_pool(ps)))
    assert _match(cache2, tokens, extra_key="x").device_prefix_len == 0
    with pytest.raises(InvalidArgument, match="same radixseg namespace"):
        _match(cache2, tokens, extra_key="y")


def test_insert_transfers_ownership_and_duplicates_stay_with_caller():
    ps = 4
    pool, alloc, cache = _ours(ps)
    tokens = list(range(3 * ps + 2))  # 3 whole pages and a partial one
    a = alloc.alloc(4 * ps)
    r = _insert(cache, tokens, a[: len(tokens)])
    assert r.prefix_len == 0 and cache.total_size() == 3 * ps
    assert pool.allocator.refcount(a[::ps][:3] // ps).tolist() == [1, 1, 1]
    alloc.free(a[3 * ps :])  # the partial page stays the caller's to free
    b = alloc.alloc(4 * ps)
    r = _insert(cache, tokens + [7] * ps, b)
    assert r.prefix_len == 3 * ps  # b's first 3 pages duplicate cached ones
    alloc.free_segment(b[: 3 * ps], start_pos=0)
    m = _match(cache, tokens + [7] * ps)
    assert m.device_prefix_len == 4 * ps
    assert torch.equal(m.device_indices, torch.cat([a[: 3 * ps], b[3 * ps :]]))
    assert torch.equal(cache.path_device_indices(m.last_device_node), m.device_indices)
    assert r.last_device_node == m.last_device_node
    with pytest.raises(InvalidArgument, match="whole pages"):
        _insert(cache, list(range(50, 50 + ps)), torch.arange(ps, 2 * ps).flip(0))
    with pytest.raises(InvalidArgument, match="value"):
        cache.insert(rs.InsertParams(key=_key(tokens)))
    assert cache.evict(10**6).num_tokens_evicted == 4 * ps
    assert alloc.available_size() == alloc.size
    pool.check_invariants()


def test_locks_roots_and_stale_nodes():
    ps = 2
    _, alloc, cache = _ours(ps)
    slots = alloc.alloc(6 * ps)
    _insert(cache, list(range(6 * ps)), slots)
    m = _match(cache, [*range(3 * ps), 99, 99])
    assert cache.inc_lock_ref(m.last_device_node).delta == -3 * ps
    assert cache.inc_lock_ref(m.last_device_node).delta == 0
    assert (cache.evictable_size(), cache.protected_size()) == (3 * ps, 3 * ps)
    root = _match(cache, [5] * ps)
    assert root.last_device_node == cache.root_node == rs.ROOT_NODE
    assert cache.is_root(root.last_device_node)
    assert cache.inc_lock_ref(cache.root_node).delta == 0
    assert cache.dec_lock_ref(cache.root_node).delta == 0
    assert cache.path_device_indices(cache.root_node).numel() == 0
    assert cache.dec_lock_ref(m.last_device_node).delta == 0
    assert cache.dec_lock_ref(m.last_device_node).delta == 3 * ps
    with pytest.raises(InvalidArgument):
        cache.dec_lock_ref(m.last_device_node)  # SGLang would go negative
    lock = cache.lock(m.last_device_node)
    with pytest.raises(InvalidArgument, match="locked"):
        cache.reset()  # SGLang's scheduler flushes only when idle
    cache.unlock(lock)
    assert cache.evict(rs.EvictParams(num_tokens=10**6)).num_tokens_evicted == 6 * ps
    with pytest.raises(InvalidHandle):
        cache.inc_lock_ref(m.last_device_node)  # evicted: the handle is stale
    with pytest.raises(InvalidHandle):
        cache.path_device_indices(m.last_device_node)
    with pytest.raises(InvalidArgument, match="not returned"):
        cache.path_device_indices(12345)
    # reset releases the tree's pages; clear needs an empty cache.
    s2 = alloc.alloc(4 * ps)
    _insert(cache, list(range(4 * ps)), s2)
    with pytest.raises(InvalidArgument, match="reset"):
        alloc.clear()
    cache.reset()
    assert cache.total_size() == 0 and alloc.available_size() == alloc.size
    with pytest.raises(InvalidArgument, match="already serves"):
        rs.RadixsegRadixCache(alloc)
    with pytest.raises(InvalidArgument, match="bigram"):
        _match(cache, [1, 2, 3], is_bigram=True)
    cache.pretty_print()
    assert "evictable_size=0" in cache.available_and_evictable_str()


def test_request_calls_without_sglang(capsys):
    """cache_unfinished_req / cache_finished_req on a minimal duck-typed request."""
    ps = 4
    _, alloc, cache = _ours(ps)
    table = cache.req_to_token_pool
    req = SimpleNamespace(
        req_pool_idx=table.alloc_rows(1)[0],
        fill_ids=list(range(10)),
        origin_input_ids=list(range(10)),
        output_ids=[],
        prefix_indices=torch.zeros(0, dtype=torch.int64),
        last_node=cache.root_node,
        extra_key=None,
    )
    slots = alloc.alloc(3 * ps)[:10]
    table.req_to_token[req.req_pool_idx, :10] = slots.to(torch.int32)
    cache.cache_unfinished_req(req)
    assert len(req.prefix_indices) == 8 and cache.protected_size() == 8
    req.output_ids = [10, 11]
    alloc_next = alloc.alloc_decode(torch.tensor([11]), torch.tensor([11]), slots[9:10])
    assert int(alloc_next[0]) == int(slots[9]) + 1  # same page
    table.req_to_token[req.req_pool_idx, 10] = int(alloc_next[0])
    req.fill_ids = list(range(11))
    cache.cache_finished_req(req)  # kv_len = 10 + 2 - 1
    assert (cache.total_size(), cache.protected_size()) == (8, 0)
    assert alloc.available_size() == alloc.size - 8  # the partial page went back
    assert req.req_pool_idx is None
    cache.pretty_print()
    assert "#tokens: 8" in capsys.readouterr().out


def test_from_init_params_and_bad_arguments():
    ps = 2
    pool = _pool(ps)
    alloc = rs.RadixsegTokenToKVPoolAllocator(pool)
    params = SimpleNamespace(
        disable=False,
        req_to_token_pool=None,
        token_to_kv_pool_allocator=alloc,
        page_size=ps,
        eviction_policy="LRU",
    )
    cache = rs.RadixsegRadixCache.from_init_params(params)
    assert cache.page_size == ps and pool.stats()["cached_tokens"] == 0
    with pytest.raises(InvalidArgument, match="req_to_token_pool"):
        cache.checkpoint(SimpleNamespace(req_pool_idx=1), up_to=0)
    for bad in ({"disable": True}, {"page_size": 4}, {"eviction_policy": "lfu"}):
        fresh = rs.RadixsegTokenToKVPoolAllocator(_pool(ps))
        p = SimpleNamespace(**{**vars(params), "token_to_kv_pool_allocator": fresh, **bad})
        with pytest.raises(InvalidArgument):
            rs.RadixsegRadixCache.from_init_params(p)
    with pytest.raises(TypeError):
        rs.RadixsegTokenToKVPoolAllocator(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rs.RadixsegRadixCache(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="aligned"):
        alloc.free_segment(torch.tensor([5]), start_pos=1)
    with pytest.raises(InvalidArgument, match="shares a page"):
        alloc.free_segments([(torch.tensor([2, 3, 4]), 0), (torch.tensor([5]), 3)])
    with pytest.raises(InvalidArgument, match="negative"):
        alloc.free([-1])
    assert "pages used" in alloc.debug_print()
    assert alloc.get_all_free_pages().numel() == pool.allocator.free_pages()
    assert alloc.evict_to_free_tokens(cache, 2) is None
    assert alloc.check_decode_capacity(num_tokens=2, tree_cache=cache)


# ----- a request through chunked prefill and release (issue 15, items 1 and 2) ----------------


class _KVRecord(_KV):
    """SGLang 0.5.23's ``ReqKvInfo`` as ``common.release_kv_cache`` reads it."""

    def __init__(self, row: int, protected: int, committed: int) -> None:
        super().__init__(row, protected)
        self.kv_committed_len = committed
        self.kv_allocated_len = committed

    @property
    def holds_kv(self) -> bool:
        return self.req_pool_idx is not None

    @property
    def is_kv_released(self) -> bool:
        return self.kv_allocated_len == 0

    def get_evicted_seqlen(self, component: Any) -> int:
        return 0

    def swa_dead_lo(self, page_size: int) -> int:
        return self.cache_protected_len

    def mark_kv_released(self) -> None:
        self.kv_allocated_len = 0


class _FinishedReq(_Req):
    """SGLang 0.5.23's finished ``Req``, as its ``checkpoint`` and
    ``common.release_kv_cache`` read it: every token's KV is committed."""

    def __init__(self, prompt: list[int], output: list[int], kv: _KVRecord) -> None:
        super().__init__(prompt, None)
        self.output_ids = array("q", output)
        self.kv = kv
        self.rid = "r0"
        self.finished_len: int | None = len(output)
        self.skip_radix_cache_insert = False

    def finished(self) -> bool:
        return True

    def refresh_fill_ids(self) -> None:
        pass

    def owned_kv_len(self) -> int:
        assert self.kv is not None and self.finished_len is not None
        return min(self.kv.kv_committed_len, len(self.origin_input_ids) + self.finished_len)


def _release_kv_cache(sg: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> Any:
    """SGLang 0.5.23's own ``common.release_kv_cache``, with the scheduler's
    runtime config (no speculative decoding, no thinking-strip) stubbed."""
    common = sg.loader.cache_module("common")
    monkeypatch.setattr(common, "get_spec", lambda: SimpleNamespace(speculative_algorithm=None))
    monkeypatch.setattr(common, "get_serving", lambda: SimpleNamespace(strip_thinking_cache=False))
    return common.release_kv_cache


def _finish_after_chunk(
    cache: Any,
    alloc: Any,
    route: str,
    prompt: list[int],
    output: list[int],
    *,
    chunked: bool,
    insert: bool,
    release: Any = None,
) -> list[tuple[Any, ...]]:
    """One request whose KV covers all of ``prompt + output``: optionally
    checkpointed (chunked prefill), then released, caching it or not.

    ``route`` is how the engine calls the cache: ``"0.5.23"`` (``checkpoint``,
    then SGLang 0.5.23's ``common.release_kv_cache``), ``"release"`` (the
    adapter's ``release_kv_cache``) or ``"legacy"`` (older SGLang's
    ``cache_unfinished_req`` / ``cache_finished_req`` on a bare request that
    has no committed length). Returns what the engine observes.
    """
    ps, table = alloc.page_size, cache.req_to_token_pool
    tokens = prompt + output
    n = len(tokens)
    log: list[tuple[Any, ...]] = []

    def observe(what: str) -> None:
        log.append(
            (
                what,
                cache.evictable_size(),
                cache.protected_size(),
                cache.total_size(),
                alloc.available_size(),
                table.available_size(),
            )
        )

    observe("start")
    (row,) = table.alloc_rows(1)
    slots = alloc.alloc(-(-n // ps) * ps)
    table.req_to_token[row, :n] = slots[:n].to(table.req_to_token.dtype)
    req: Any
    if route == "legacy":
        req = SimpleNamespace(
            req_pool_idx=row,
            fill_ids=tokens,
            origin_input_ids=prompt,
            output_ids=output,
            prefix_indices=torch.zeros(0, dtype=torch.int64),
            last_node=cache.root_node,
            extra_key=None,
        )
    else:
        req = _FinishedReq(prompt, output, _KVRecord(row, 0, n))
        req.lock = cache.lock(cache.root_node)
    observe("extended")
    if chunked:
        if route == "legacy":
            cache.cache_unfinished_req(req)
        else:
            cache.checkpoint(req, up_to=n)
        observe("checkpoint")
    if route == "legacy":
        cache.cache_finished_req(req, is_insert=insert)
        assert req.req_pool_idx is None
    elif route == "release":
        cache.release_kv_cache(req, checkpoint=insert)
        assert req.lock is None and req.kv.req_pool_idx is None
    else:
        release(req, cache, checkpoint=insert)
        assert req.lock is None and req.kv.req_pool_idx is None
    observe("released")
    m = cache.match_prefix(_key_for(cache, tokens))
    log.append(("match", m.device_prefix_len))
    if cache.total_size():  # SGLang's census of an empty tree raises
        log.append(("census", sorted(cache.all_values_flatten().tolist())))
    evicted = cache.evict(_evict_params(cache, 10**6)).num_tokens_evicted
    log.append(("evict all", evicted))
    observe("end")
    return log


def _key_for(cache: Any, tokens: list[int]) -> Any:
    """A ``MatchPrefixParams`` of the cache's own kind."""
    if isinstance(cache, rs.RadixsegRadixCache):
        return rs.MatchPrefixParams(key=rs.RadixKey(array("q", tokens)))
    mod = sys.modules[type(cache).__module__]
    base = sys.modules["sglang.srt.mem_cache.base_prefix_cache"]
    return base.MatchPrefixParams(key=mod.RadixKey(array("q", tokens)))


def _evict_params(cache: Any, n: int) -> Any:
    if isinstance(cache, rs.RadixsegRadixCache):
        return rs.EvictParams(num_tokens=n)
    return sys.modules["sglang.srt.mem_cache.base_prefix_cache"].EvictParams(num_tokens=n)


@pytest.mark.parametrize("page_size", [1, 2, 4])
@pytest.mark.parametrize(("n_prompt", "n_output"), [(2, 1), (4, 1), (3, 2), (5, 3), (8, 1)])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("insert", [True, False])
def test_chunk_then_release_matches_sglang(
    sg, monkeypatch, page_size, n_prompt, n_output, chunked, insert
):
    """Issue 15 items 1 and 2: a checkpoint (chunked prefill) then a release,
    cached or not, leaves the same sizes, cached slots and free memory as
    SGLang 0.5.23's own RadixCache and release_kv_cache, by every route; and
    every slot comes back (nothing leaks, nothing stays locked)."""
    ps = page_size
    release = _release_kv_cache(sg, monkeypatch)
    prompt = list(range(7, 7 + n_prompt))
    output = list(range(100, 100 + n_output))
    theirs = _sglang_side(sg, ps)
    runs: dict[str, list[tuple[Any, ...]]] = {}
    runs["sglang"] = _finish_after_chunk(
        theirs.cache,
        theirs.alloc,
        "0.5.23",
        prompt,
        output,
        chunked=chunked,
        insert=insert,
        release=release,
    )
    for route in ("0.5.23", "release", "legacy"):
        ours = _radixseg_side(sg, ps, "budget", "0.5.23")
        runs[route] = _finish_after_chunk(
            ours.cache,
            ours.alloc,
            route,
            prompt,
            output,
            chunked=chunked,
            insert=insert,
            release=release,
        )
        ours.alloc.pool.check_invariants()
        ours.cache.sanity_check()
        assert ours.alloc.pool.allocator.refcount([0]).tolist() == [1]
    for route, log in runs.items():
        assert log == runs["sglang"], f"{route}: {log}\n!= SGLang {runs['sglang']}"
    log = runs["sglang"]
    n = n_prompt + n_output
    cached = n // ps * ps if (chunked or insert) else 0
    assert ("match", cached) in log
    assert log[-1][1:] == (0, 0, 0, _capacity(ps), 8)  # every slot and row came back


def _bare_req(cache: rs.RadixsegRadixCache, tokens: list[int], n_prompt: int) -> SimpleNamespace:
    """An older SGLang ``Req`` as the issue built it: a row, ids, no committed length."""
    (row,) = cache.req_to_token_pool.alloc_rows(1)
    return SimpleNamespace(
        req_pool_idx=row,
        fill_ids=list(tokens),
        origin_input_ids=list(tokens[:n_prompt]),
        output_ids=list(tokens[n_prompt:]),
        prefix_indices=torch.zeros(0, dtype=torch.int64),
        last_node=cache.root_node,
        extra_key=None,
    )


@pytest.mark.parametrize(("page_size", "n_prompt", "n_output"), [(1, 2, 1), (1, 4, 1), (2, 3, 2)])
def test_unfinished_then_finished_req(page_size, n_prompt, n_output):
    """Issue 15 item 1, as reported: fill_ids=[7, 8, 9], origin_input_ids=[7, 8],
    output_ids=[9] and three slots; cache_unfinished_req then cache_finished_req
    cached the output token's KV first and then refused (the KV was taken to end
    one token short), leaving the node locked and the row held."""
    ps = page_size
    pool, alloc, cache = _ours(ps)
    table = cache.req_to_token_pool
    start, rows = alloc.available_size(), table.available_size()
    tokens = list(range(7, 7 + n_prompt + n_output))
    n = len(tokens)
    req = _bare_req(cache, tokens, n_prompt)
    slots = alloc.alloc(-(-n // ps) * ps)
    table.req_to_token[req.req_pool_idx, :n] = slots[:n].to(torch.int32)
    cache.cache_unfinished_req(req)
    assert cache.protected_size() == n // ps * ps
    cache.cache_finished_req(req)
    assert (cache.total_size(), cache.protected_size()) == (n // ps * ps, 0)
    assert req.req_pool_idx is None and table.available_size() == rows
    assert alloc.available_size() == start - n // ps * ps  # only the cached pages are held
    assert _match(cache, tokens).device_prefix_len == n // ps * ps
    cache.evict(10**6)
    assert alloc.available_size() == start
    pool.check_invariants()


@pytest.mark.parametrize("page_size", [1, 2])
def test_finished_req_without_insert_frees_every_slot(page_size):
    """Issue 15 item 2: cache_finished_req(req, is_insert=False) freed one of two slots."""
    ps = page_size
    _, alloc, cache = _ours(ps)
    start = alloc.available_size()
    for tokens, n_prompt in (([7, 9], 1), ([7, 8, 9], 2), (list(range(5)), 4)):
        req = _bare_req(cache, tokens, n_prompt)
        n = len(tokens)
        slots = alloc.alloc(-(-n // ps) * ps)
        cache.req_to_token_pool.req_to_token[req.req_pool_idx, :n] = slots[:n].to(torch.int32)
        cache.cache_finished_req(req, is_insert=False)
        assert alloc.available_size() == start, tokens
        assert cache.total_size() == 0 and req.req_pool_idx is None


def test_refused_release_changes_nothing():
    """Issue 15 item 1: a release that must be refused is refused before it
    changes anything: no insert, no free, the lock and the row stay."""
    ps = 2
    pool, alloc, cache = _ours(ps)
    table = cache.req_to_token_pool
    tokens = list(range(7, 14))  # 7 tokens: 3 whole pages and a partial one
    req = _bare_req(cache, tokens[:4], 4)
    slots = alloc.alloc(2 * ps)
    table.req_to_token[req.req_pool_idx, :4] = slots.to(torch.int32)
    cache.cache_unfinished_req(req)  # 2 pages cached, the request locks them

    def state() -> tuple[Any, ...]:
        return (
            cache.total_size(),
            cache.protected_size(),
            alloc.available_size(),
            table.available_size(),
            req.req_pool_idx,
            req.last_node,
            table.req_to_token[req.req_pool_idx].clone().tolist(),
            pool.allocator.free_pages(),
        )

    # The request claims KV for 7 tokens, but slots 4..6 were never allocated.
    req.fill_ids, req.output_ids = tokens, tokens[4:]
    before = state()
    with pytest.raises(InvalidArgument, match="slot 0 at position 4"):
        cache.cache_finished_req(req)
    assert state() == before
    # They are allocated now, but the engine freed the last page already.
    more = alloc.alloc(2 * ps)
    table.req_to_token[req.req_pool_idx, 4:7] = more[:3].to(torch.int32)
    alloc.free(more[ps:])
    before = state()
    with pytest.raises(InvalidArgument, match=f"page {int(more[ps]) // ps} at position 6"):
        cache.cache_finished_req(req)
    with pytest.raises(InvalidArgument, match="free"):
        cache.release_kv_cache(req, checkpoint=False)
    assert state() == before
    # A lock that is not held (released twice) is refused before the insert.
    table.req_to_token[req.req_pool_idx, 6] = int(alloc.alloc(ps)[0])
    cache.dec_lock_ref(req.last_node)
    before = state()
    with pytest.raises(InvalidArgument, match="not held"):
        cache.cache_finished_req(req)
    assert state() == before
    cache.inc_lock_ref(req.last_node)
    cache.cache_finished_req(req)  # all in order now
    assert (cache.total_size(), cache.protected_size()) == (6, 0)
    cache.evict(10**6)
    assert alloc.available_size() == alloc.size
    pool.check_invariants()


# ----- insert and the padding page (issue 15, item 3) -----------------------------------------


@pytest.mark.parametrize("page_size", [1, 4])
def test_insert_refuses_padding_slots(page_size):
    """Slot 0 (page 0) is the padding target: insert refuses any slot of page 0,
    naming it, and changes nothing; page 0 is never freed or handed out."""
    ps = page_size
    pool, alloc, cache = _ours(ps, segments=1)  # 8 pages: page 0 + 7
    held = alloc.alloc(ps)  # page 1
    for value, pos in (
        (torch.arange(0, 2 * ps), 0),  # the case: key [0, 1], value [0, 1] at ps 1
        (torch.cat([held, torch.arange(0, ps)]), ps),  # page 0 after a real page
    ):
        tokens = list(range(value.numel()))
        with pytest.raises(InvalidArgument, match=rf"slot 0 at position {pos}.*padding page 0"):
            _insert(cache, tokens, value)
        assert cache.total_size() == 0 and pool.allocator.refcount([0]).tolist() == [1]
    _insert(cache, list(range(ps)), held)  # a real page is cached
    assert cache.evict(10**6).num_tokens_evicted == ps
    assert pool.allocator.refcount([0]).tolist() == [1]
    got = alloc.alloc(7 * ps)
    assert got is not None and int(got.min()) == ps  # slot 0 is never handed out
    assert alloc.alloc(ps) is None
    pool.check_invariants()


def test_checkpoint_and_insert_share_the_padding_check():
    """The same check guards the request row in checkpoint: a row position
    never allocated (still slot 0) is named and nothing changes."""
    ps = 2
    _, alloc, cache = _ours(ps)
    req = _bare_req(cache, [5, 6, 7, 8], 4)
    row = cache.req_to_token_pool.req_to_token[req.req_pool_idx]
    row[:2] = alloc.alloc(ps).to(torch.int32)  # positions 2..3 never allocated
    with pytest.raises(InvalidArgument, match=r"slot 0 at position 2.*padding page 0"):
        cache.cache_unfinished_req(req)
    assert cache.total_size() == 0 and req.last_node == cache.root_node


# ----- the look-alike types (issue 15, item 4) ----------------------------------------------


def _key_view(key: Any) -> tuple[Any, ...]:
    """What an engine can observe of a RadixKey."""
    return (len(key), list(key), key.extra_key, key.cache_salt, key.is_bigram)


@pytest.mark.parametrize("container", [list, lambda t: array("q", t)])
@pytest.mark.parametrize("limit", [None, 0, 3, 9])
@pytest.mark.parametrize("is_bigram", [False, True])
def test_radix_key_matches_sglang(sg, container, limit, is_bigram):
    """len, iteration, int indexing (a one-token key; IndexError out of range),
    slicing (a key of the same tags; step 1 only), limit, page_aligned: as
    SGLang 0.5.23's own RadixKey."""
    tokens = [11, 12, 13, 14, 15, 16]
    keys = [
        cls(container(tokens), "lora-1", is_bigram=is_bigram, limit=limit, cache_salt="s")
        for cls in (sg.RadixKey, rs.RadixKey)
    ]
    views = [_key_view(k) for k in keys]
    assert views[0] == views[1]
    n = len(keys[0])
    assert n == (max(min(6, 9 if limit is None else limit) - is_bigram, 0))
    for i in range(-n - 2, n + 2):
        outcomes = []
        for k in keys:
            try:
                sub = k[i]
                outcomes.append((_key_view(sub), sub.token_ids))
            except IndexError:
                outcomes.append("IndexError")
        assert outcomes[0] == outcomes[1], i
        assert (outcomes[1] == "IndexError") == (not -n <= i < n)
    for start in (None, -2, 0, 1, 3, 7):
        for stop in (None, -1, 0, 2, 5, 8):
            subs = [k[start:stop] for k in keys]
            assert isinstance(subs[1], rs.RadixKey)
            assert _key_view(subs[0]) == _key_view(subs[1]), (start, stop)
            assert list(subs[0].token_ids) == list(subs[1].token_ids)
            if not is_bigram:  # a slice of the same container (SGLang's empty bigram
                assert type(subs[0].token_ids) is type(subs[1].token_ids)  # is an array)
    for k in keys:
        with pytest.raises(ValueError):
            k[::2]
    for ps in (1, 2, 4):
        assert _key_view(keys[0].page_aligned(ps)) == _key_view(keys[1].page_aligned(ps))


def test_radix_key_over_tensors():
    """Token ids in a tensor or a numpy array iterate as ints and slice to the same type."""
    import numpy as np

    for ids in (torch.arange(3, 9), np.arange(3, 9)):
        key = rs.RadixKey(ids, limit=4)
        assert list(key) == [3, 4, 5, 6] and len(key) == 4
        assert type(key[1:3].token_ids) is type(ids) and key[1:3].token_ids.tolist() == [4, 5]
        with pytest.raises(IndexError, match="index 4 is out of range for a key of 4"):
            key[4]


def test_insert_without_value_is_refused():
    """SGLang's debug fallback (value=None: the token ids become the values)
    would cache pages nobody allocated; the adapter refuses it (a documented
    difference) and changes nothing."""
    pool, alloc, cache = _ours(1)
    with pytest.raises(InvalidArgument, match=r"needs params\.value.*3 page-aligned tokens"):
        cache.insert(rs.InsertParams(key=_key([1, 2, 3]), value=None))
    assert cache.total_size() == 0 and alloc.available_size() == alloc.size
    assert "insert needs its slots" in rs.__doc__
    pool.check_invariants()


@pytest.mark.parametrize("page_size", [1, 4])
def test_all_values_flatten_matches_sglang(sg, page_size):
    """The census of cached slots, as SGLang's: every slot on every cached
    path (shared prefixes, a split, two namespaces), each once, and after a
    partial eviction too. The two allocators reuse freed slots in different
    orders, so each side is checked against its own paths, and the sizes
    against each other."""
    ps = page_size
    theirs = _sglang_side(sg, ps)
    ours = _radixseg_side(sg, ps, "budget", "0.5.23")
    base = list(range(1, 1 + 4 * ps))
    seqs = [
        (base, None),
        (base[: 2 * ps] + [99] * 3 * ps, None),  # splits the first path
        (base + [7] * ps, None),
        (base[:ps] + [5] * ps, "lora-1"),
    ]
    got = []
    for e in (theirs, ours):
        c, a, k = e.cache, e.alloc, e.keys
        params = rs.InsertParams if e is ours else k.InsertParams
        for tokens, extra in seqs:
            slots = a.alloc(len(tokens))
            r = c.insert(params(key=k.RadixKey(array("q", tokens), extra), value=slots))
            a.free(slots[: r.prefix_len])  # the duplicates stay the engine's
        sizes = []
        for evict in (0, 1):
            c.evict(k.EvictParams(num_tokens=evict))
            census = c.all_values_flatten()
            assert census.dtype == torch.int64 and census.numel() == c.total_size()
            paths: set[int] = set()
            for tokens, extra in seqs:
                key = k.RadixKey(array("q", tokens), extra)
                m = c.match_prefix(k.MatchPrefixParams(key=key))
                paths.update(c.path_device_indices(m.last_device_node).tolist())
            assert sorted(census.tolist()) == sorted(paths)  # each slot once
            sizes.append(census.numel())
        got.append(sizes)
    assert got[0] == got[1]
    assert got[1][0] == 4 * ps + 3 * ps + ps + 2 * ps


# ----- capacity under budget_bytes="auto" (issue 15, item 13) ----------------------------------


@pytest.mark.parametrize("budget", ["auto", None])
def test_available_size_moves_only_at_events(monkeypatch, budget):
    """Under a budget that follows free memory, available_size() and size are
    measured at construction, growth, shrink and a failed allocation, and do
    not move by themselves in between while other processes take or return
    memory (the probe is faked here, so the test does not depend on the host)."""
    import radixseg.pool

    free = {"bytes": 0}

    def probe(device: torch.device) -> int:
        return free["bytes"]

    monkeypatch.setattr(radixseg.pool, "_device_free_bytes", probe)
    ps, pps = 2, 8
    pool = _pool(ps, pps=pps, segments=None)
    pool.budget_bytes = budget
    seg = pool.segment_bytes

    def expected(live: int) -> tuple[int, int]:
        """(available, size) in tokens with `live` segments, all pages but page 0 free."""
        if budget == "auto":
            room = (int(pool.budget_fraction * (free["bytes"] + live * seg)) - live * seg) // seg
        else:
            room = free["bytes"] // seg
        total = live * pps - 1 + room * pps
        return total * ps, total * ps

    free["bytes"] = 10 * seg
    alloc = rs.RadixsegTokenToKVPoolAllocator(pool)  # builds segment 0 for page 0
    start = expected(1)
    assert (alloc.available_size(), alloc.size) == start
    for now in (3 * seg, 50 * seg, 0):  # other processes take and return memory
        free["bytes"] = now
        assert (alloc.available_size(), alloc.size) == start
    free["bytes"] = 10 * seg
    x = alloc.alloc(3 * ps)  # within segment 0: exactly what was taken
    free["bytes"] = 2 * seg
    assert (alloc.available_size(), alloc.size) == (start[0] - 3 * ps, start[1])
    y = alloc.alloc(6 * ps)  # grows a segment: measured again, with 2 segments free now
    assert y is not None and pool.stats()["segments"] == 2
    avail, size = expected(2)
    assert (alloc.available_size(), alloc.size) == (avail - 9 * ps, size)
    free["bytes"] = 40 * seg
    assert (alloc.available_size(), alloc.size) == (avail - 9 * ps, size)
    alloc.free(y)
    pool.shrink(keep=0)  # retires segment 1: measured again
    assert pool.stats()["segments"] == 1
    avail, size = expected(1)
    assert (alloc.available_size(), alloc.size) == (avail - 3 * ps, size)
    free["bytes"] = 0
    assert alloc.available_size() == avail - 3 * ps  # still the figure of the shrink
    if budget == "auto":  # (an unbounded pool checks free memory only for big growth)
        assert alloc.alloc(6 * ps) is None  # the pool's growth is refused ...
        # ... and the failure measured again: only segment 0's 4 free pages are left.
        assert (alloc.available_size(), alloc.size) == (4 * ps, 7 * ps)
        alloc.free(x)
        assert alloc.available_size() == 7 * ps


def test_adapter_objects_refuse_copies() -> None:
    """A copy of the allocator or the cache would share pages it believes it owns."""
    import copy
    import pickle

    _pool, alloc, cache = _ours(4)
    for obj in (alloc, cache):
        for how in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=r"cannot be (copied|pickled)"):
                how(obj)
