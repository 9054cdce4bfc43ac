"""The host tier: segments demoted to host memory and promoted back.

A Hypothesis state machine drives a budgeted KVPool + PrefixCache through
begin/extend/finish/abort, explicit and automatic demotions, promotions,
shrinking and eviction, with host memory refusals injected, and after every
step reads back every token of every running request, checks that no move
changed a page id, that new pages land on the device only, that both budgets
hold and that the pool's and the cache's invariants hold. Then: decode and
extend over a pool split across the tiers against the single-tier result
and the float64 reference, bad configurations and refused moves (each must
change nothing), ``KeyboardInterrupt`` at every line of a move, and
demotion-before-eviction under pressure.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import event, note, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from radixseg import BudgetExhausted, InvalidArgument, KVPool, PrefixCache, Request
from radixseg import attention as A
from radixseg.attention import Backend
from radixseg.pool import DEVICE, HOST, HostMemoryRefused
from test_atomicity import _PACKAGE, _Injector
from test_attention_cpu import LAYER, close, reference
from test_pool_state import DIM, HEADS, LAYERS, stored, token_kv

tokens_st = st.lists(st.integers(0, 2), min_size=0, max_size=12)


class HostFactory:
    """A host-tier factory that refuses memory (``RuntimeError``) when told to."""

    def __init__(self) -> None:
        self.fail = False
        self.calls = 0

    def __call__(self, nbytes: int, device: torch.device) -> torch.Tensor:
        self.calls += 1
        if self.fail:
            raise RuntimeError(f"injected: no host memory for {nbytes} bytes")
        return torch.empty(nbytes, dtype=torch.uint8)


def segment_bytes(
    page_size: int, pps: int, dtype: Any, layers: int = LAYERS, dim: int = DIM
) -> int:
    return KVPool(layers, HEADS, dim, page_size, dtype, pages_per_segment=pps).segment_bytes


def tiers_of_segments(pool: KVPool) -> dict[int, int]:
    """Live segment id -> tier."""
    segs = pool.allocator.segments()
    pps = pool.pages_per_segment
    tiers: list[int] = pool.tier_of(np.asarray(segs, dtype=np.int64) * pps).tolist() if segs else []
    return dict(zip(segs, tiers, strict=True))


def pool_state(pool: KVPool) -> tuple[object, ...]:
    """What a refused call must not change."""
    s = pool.stats()
    return (
        tiers_of_segments(pool),
        s["free_pages"],
        s["used_pages"],
        s["demotions"],
        s["promotions"],
        s["demoted_bytes"],
        s["promoted_bytes"],
        pool.device_reserved_bytes(),
        pool.host_reserved_bytes(),
        s["tiers"],
    )


# ----- 1. the state machine -----------------------------------------------------------


class TierMachine(RuleBasedStateMachine):
    running = Bundle("running")

    @initialize(
        page_size=st.sampled_from([1, 4]),
        pps=st.sampled_from([1, 2, 3]),
        dtype=st.sampled_from([torch.float8_e4m3fn, torch.bfloat16]),
        device_segments=st.integers(2, 4),
        host_segments=st.integers(1, 3),
    )
    def setup(
        self, page_size: int, pps: int, dtype: torch.dtype, device_segments: int, host_segments: int
    ) -> None:
        sb = segment_bytes(page_size, pps, dtype)
        self.budget = device_segments * sb
        self.host_budget = host_segments * sb
        self.factory = HostFactory()
        self.pool = KVPool(
            LAYERS,
            HEADS,
            DIM,
            page_size,
            dtype,
            pages_per_segment=pps,
            budget_bytes=self.budget,
            host_budget_bytes=self.host_budget,
            host_tensor_factory=self.factory,
        )
        self.cache = PrefixCache(self.pool)
        self.dtype = dtype
        self.live: list[Request] = []
        # The page ids each running request had after the last call that changed it.
        self.pages: dict[int, list[int]] = {}
        self.finished: list[tuple[int, list[int]]] = []

    # --- helpers ------------------------------------------------------------------

    def expected_kv(self, ns: int, toks: list[int], start: int, end: int) -> torch.Tensor:
        """``[2 (k, v), layers, T, heads, dim]`` of tokens ``start..end``."""
        return torch.stack([token_kv(ns, tuple(toks[: p + 1])) for p in range(start, end)], dim=2)

    def check_request(self, req: Request) -> None:
        if req.seq_len == 0:
            return
        slots = self.cache.slots(req)
        want = stored(
            self.expected_kv(req.namespace, req.tokens.tolist(), 0, req.seq_len), self.dtype
        )
        for layer in range(LAYERS):
            k, v = self.pool.read(layer, slots)
            assert torch.equal(k, want[0, layer]), f"layer {layer} K differs for {req}"
            assert torch.equal(v, want[1, layer]), f"layer {layer} V differs for {req}"

    def writing(self) -> set[int]:
        """Segments holding a running request's last page."""
        pps = self.pool.pages_per_segment
        return {int(r.page_ids[-1]) // pps for r in self.live if r.num_pages}

    def host_room(self) -> int:
        return self.host_budget // self.pool.segment_bytes - len(self.pool.host_segments)

    def host_spares(self) -> int:
        sb = self.pool.segment_bytes
        return self.pool.host_reserved_bytes() // sb - len(self.pool.host_segments)

    def expect_unchanged(self, before: tuple[object, ...], what: str) -> None:
        after = pool_state(self.pool)
        assert after == before, f"{what} changed the pool:\n{before}\n{after}"

    # --- rules ---------------------------------------------------------------------

    @rule(target=running, tokens=tokens_st, ns=st.sampled_from([0, 1]), prefill=st.booleans())
    def begin(self, tokens: list[int], ns: int, prefill: bool) -> Request:
        req = self.cache.begin(tokens, ns)
        assert req.tokens.tolist() == tokens[: req.cached_len]
        self.check_request(req)  # the matched pages, wherever they live, hold this prefix
        self.live.append(req)
        self.pages[id(req)] = req.page_ids.tolist()
        if prefill and req.uncached.numel():
            self.extend(req, req.uncached.numel(), [], False)
        return req

    @rule(req=running, n=st.integers(1, 12), more=tokens_st, refuse=st.booleans())
    def extend(self, req: Request, n: int, more: list[int], refuse: bool) -> None:
        if req.state != "running":
            return
        new = (req.uncached.tolist() + more)[:n] or [0]
        before_pages = req.page_ids.tolist()
        before_len = req.seq_len
        ps = self.pool.page_size
        if before_len % ps:
            # The partly filled last page is written in place: on the device.
            assert self.pool.tier_of(before_pages[-1:]).tolist() == [DEVICE]
        self.factory.fail = refuse
        try:
            slots = self.cache.extend(req, new)
        except BudgetExhausted as e:
            # A host refusal falls back to eviction (it never escapes), and the
            # id space (2**31 segments) is never the limit here: the message
            # names the device budget.
            note(f"extend refused: {e!r}")
            event("extend refused: BudgetExhausted")
            assert f"device budget {self.budget:,} B" in str(e), e
            assert req.page_ids.tolist() == before_pages and req.seq_len == before_len
            return
        finally:
            self.factory.fail = False
        after_pages = req.page_ids.tolist()
        event(f"extend ok, demotions so far: {min(self.pool.stats()['demotions'], 3)}")
        assert after_pages[: len(before_pages)] == before_pages
        fresh = after_pages[len(before_pages) :]
        # New pages are handed out in device segments only (host ones are sealed).
        assert (self.pool.tier_of(fresh) == DEVICE).all(), (fresh, self.pool.host_segments)
        assert slots.numel() == len(new)
        assert (self.pool.tier_of(slots // ps) == DEVICE).all()
        kv = self.expected_kv(req.namespace, req.tokens.tolist(), before_len, req.seq_len)
        for layer in range(LAYERS):
            self.pool.write(layer, slots, kv[0, layer], kv[1, layer])
        self.pages[id(req)] = after_pages

    @rule(req=consumes(running))
    def finish(self, req: Request) -> None:
        if req.state == "running":
            toks = req.tokens.tolist()
            self.cache.finish(req)
            self.live.remove(req)
            del self.pages[id(req)]
            self.finished.append((req.namespace, toks))

    @rule(req=consumes(running))
    def abort(self, req: Request) -> None:
        if req.state == "running":
            self.cache.abort(req)
            self.live.remove(req)
            del self.pages[id(req)]

    @rule(
        kind=st.sampled_from(["device", "device", "device", "host", "writing", "dead"]),
        pick=st.integers(0, 20),
        refuse=st.booleans(),
    )
    def demote_one(self, kind: str, pick: int, refuse: bool) -> None:
        tiers = tiers_of_segments(self.pool)
        writing = self.writing()
        pool_of = {
            "device": [s for s, t in tiers.items() if t == DEVICE and s not in writing],
            "host": [s for s, t in tiers.items() if t == HOST],
            "writing": sorted(writing),
            "dead": [max(tiers, default=0) + 1 + pick],
        }[kind]
        if not pool_of:
            return
        sid = pool_of[pick % len(pool_of)]
        before = pool_state(self.pool)
        self.factory.fail = refuse
        try:
            if kind != "device":
                event(f"demote refused: {kind} segment")
                with pytest.raises(InvalidArgument, match=rf"\b{sid}\b"):
                    self.pool.demote([sid])
                self.expect_unchanged(before, f"demote of a {kind} segment {sid}")
            elif self.host_room() == 0:
                event("demote refused: host budget")
                with pytest.raises(BudgetExhausted, match=f"{self.host_budget:,} B budget"):
                    self.pool.demote([sid])
                self.expect_unchanged(before, "demote past the host budget")
            elif refuse and self.host_spares() == 0:
                event("demote refused: host memory")
                with pytest.raises(HostMemoryRefused, match="stays on the device"):
                    self.pool.demote([sid])
                self.expect_unchanged(before, "demote the host refused")
            else:
                event("demote ok")
                assert self.pool.demote([sid]) == [sid]
                assert tiers_of_segments(self.pool)[sid] == HOST
                assert self.pool.allocator.is_sealed(sid)
                assert self.pool.stats()["demotions"] == before[3] + 1  # type: ignore[operator]
        finally:
            self.factory.fail = False

    @rule(n=st.integers(1, 3))
    def demote_coldest(self, n: int) -> None:
        before = pool_state(self.pool)
        try:
            moved = self.pool.demote(n=n)
        except (InvalidArgument, BudgetExhausted) as e:
            note(f"demote(n={n}) refused: {e!r}")
            self.expect_unchanged(before, f"demote(n={n}) (refused)")
            return
        event("demote(n) ok")
        assert len(moved) == n
        assert not set(moved) & self.writing()
        assert all(tiers_of_segments(self.pool)[s] == HOST for s in moved)

    @rule(which=st.sampled_from(["all", "one", "device"]))
    def promote(self, which: str) -> None:
        host = self.pool.host_segments
        before = pool_state(self.pool)
        room = (self.budget - self.pool.device_reserved_bytes()) // self.pool.segment_bytes
        if which == "all":
            # Only the host segments running requests read, as many as fit.
            pps = self.pool.pages_per_segment
            read = {int(p) // pps for r in self.live for p in r.page_ids.tolist()}
            moved = self.pool.promote()
            event(f"promote read: {min(len(moved), 2)} moved")
            assert len(moved) == min(room, len(read & set(host)))
            assert set(moved) <= read & set(host)
        elif which == "one" and host:
            sid = host[-1]
            event(f"promote one, room {min(room, 1)}")
            if room == 0:
                with pytest.raises(BudgetExhausted, match=f"{self.budget}"):
                    self.pool.promote([sid])
                self.expect_unchanged(before, "promote past the device budget")
                return
            assert self.pool.promote([sid]) == [sid]
            moved = [sid]
        else:
            segs = [s for s, t in tiers_of_segments(self.pool).items() if t == DEVICE]
            if not segs:
                return
            with pytest.raises(InvalidArgument, match="device tier"):
                self.pool.promote([segs[0]])
            self.expect_unchanged(before, "promote of a device segment")
            return
        tiers = tiers_of_segments(self.pool)
        for sid in moved:
            assert tiers[sid] == DEVICE and not self.pool.allocator.is_sealed(sid)

    @rule(keep=st.sampled_from([None, 0]))
    def shrink(self, keep: int | None) -> None:
        self.pool.shrink(keep)
        assert self.pool.host_reserved_bytes() == len(self.pool.host_segments) * (
            self.pool.segment_bytes
        )

    @rule(n=st.integers(0, 8))
    def evict(self, n: int) -> None:
        before = self.pool.stats()["cached_pages"]
        released = self.cache.evict(n)
        assert before - self.pool.stats()["cached_pages"] == released

    @rule(pick=st.integers(0, 50))
    def probe_cached(self, pick: int) -> None:
        """A finished prompt again: whatever of it is still cached, in either
        tier, holds what its first writer stored."""
        if not self.finished:
            return
        ns, toks = self.finished[pick % len(self.finished)]
        req = self.cache.begin(toks, ns)
        try:
            self.check_request(req)
        finally:
            self.cache.abort(req)

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def structures_hold(self) -> None:
        self.cache.check_invariants()
        pool = self.pool
        assert pool.device_reserved_bytes() <= self.budget
        assert pool.host_reserved_bytes() <= self.host_budget
        tiers = tiers_of_segments(pool)
        host = sorted(s for s, t in tiers.items() if t == HOST)
        assert pool.host_segments == host
        for sid, t in tiers.items():
            assert pool.allocator.is_sealed(sid) == (t == HOST), sid
        s = pool.stats()
        assert s["tiers"]["host"]["segments"] == len(host)
        assert s["tiers"]["device"]["segments"] + len(host) == s["segments"]
        assert s["tiers"]["device"]["reserved_bytes"] == pool.device_reserved_bytes()
        assert s["tiers"]["host"]["reserved_bytes"] == pool.host_reserved_bytes()
        used = s["tiers"]["device"]["used_pages"] + s["tiers"]["host"]["used_pages"]
        assert used == s["used_pages"]

    @invariant()
    def running_requests_read_back(self) -> None:
        ps = self.pool.page_size
        for req in self.live:
            ids = req.page_ids.tolist()
            assert ids == self.pages[id(req)], f"a move changed the page ids of {req}"
            if req.seq_len % ps:
                assert self.pool.tier_of(ids[-1:]).tolist() == [DEVICE], req
            self.check_request(req)


_PROFILE = settings.default
assert _PROFILE is not None
_CI = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci"
TestTierMachine = TierMachine.TestCase
TestTierMachine.settings = settings(
    _PROFILE,
    max_examples=min(_PROFILE.max_examples, 100) if _CI else _PROFILE.max_examples,
)


@pytest.mark.slow
def test_tier_machine_long() -> None:
    run_state_machine_as_test(
        TierMachine, settings=settings(_PROFILE, max_examples=1000, stateful_step_count=60)
    )


# ----- 2. decode and extend over both tiers ---------------------------------------------

PPS = 4
HOST_SEGS = [1, 3, 4]  # of segments 0..5; 0, 2 and 5 stay on the device
ROWS = {
    "mixed, last page on the host": [0, 5, 9, 13, 2, 6, 7],
    "mixed, last page on the device": [14, 1, 15, 10, 20],
    "all on the host": [4, 12, 16, 17, 18],
    "all on the device": [3, 8, 11, 21],
    "no pages": [],
    "the host pages of row 2 again": [4, 12, 16, 17, 18],
    "row 2's host pages, own device page": [4, 12, 16, 22],
}


def two_tier_pool(
    dtype: str, page_size: int, host_segments: int = len(HOST_SEGS)
) -> tuple[KVPool, torch.Tensor, torch.Tensor, list[int]]:
    """A 2-layer pool of 6 segments of random KV, none demoted yet; returns it
    with the ``ROWS`` page table (indptr, page ids) and each row's length
    (a partly filled last page where the page size allows)."""
    sb = segment_bytes(page_size, PPS, dtype, layers=2, dim=32)
    pool = KVPool(
        2, 2, 32, page_size=page_size, dtype=dtype, pages_per_segment=PPS,
        host_budget_bytes=host_segments * sb,
    )  # fmt: skip
    ids = pool.alloc(6 * PPS)
    assert ids.tolist() == list(range(6 * PPS))
    gen = torch.Generator().manual_seed(page_size)
    slots = torch.arange(6 * PPS * page_size)
    for layer in (0, 1):
        kv = torch.randn(2, slots.numel(), 2, 32, generator=gen)
        pool.write(layer, slots, kv[0], kv[1] * 2)
    rows = list(ROWS.values())
    indptr = torch.tensor([0, *np.cumsum([len(r) for r in rows])], dtype=torch.int32)
    table = torch.tensor([p for r in rows for p in r], dtype=torch.int32)
    lens = [len(r) * page_size - (i % 3) * page_size // 4 if r else 0 for i, r in enumerate(rows)]
    return pool, indptr, table, lens


def last_page_lens(lens: list[int], page_size: int) -> torch.Tensor:
    return torch.tensor([(n - 1) % page_size + 1 if n else 0 for n in lens], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_decode_over_both_tiers_equals_one_tier(
    dtype: str, page_size: int, group: int, backend: Backend
) -> None:
    pool, indptr, table, lens = two_tier_pool(dtype, page_size)
    last = last_page_lens(lens, page_size)
    q = torch.randn(len(lens), 2 * group, 32, generator=torch.Generator().manual_seed(7))
    q[5] = q[2]  # row 5 reads row 2's pages: the same query gives the same answer
    assert lens[5] == lens[2]
    args = (q, pool, LAYER, indptr, table, last)
    one_out, one_lse = A.decode(*args, return_lse=True, backend=backend)
    want, want_lse = reference(q, pool, indptr, table, lens)

    assert pool.demote(HOST_SEGS) == HOST_SEGS
    tiers = pool.tier_of(table)
    on_host = [bool(pool.tier_of(r).all()) if r else False for r in ROWS.values()]
    assert tiers.any() and not tiers.all() and on_host[2] and not any(on_host[3:5])
    out, lse = A.decode(*args, return_lse=True, backend=backend)
    assert pool.host_segments == HOST_SEGS  # decode reads the host in place: no move
    assert pool.stats()["promotions"] == 0
    for i, name in enumerate(ROWS):
        close(out[i], one_out[i], f"{name}: out against one tier")
        close(lse[i], one_lse[i], f"{name}: lse against one tier")
        close(out[i], want[i], f"{name}: out against the float64 reference")
        close(lse[i], want_lse[i], f"{name}: lse against the float64 reference")
    assert torch.equal(out[4], torch.zeros_like(out[4])) and bool(torch.isinf(lse[4]).all())
    # Rows sharing host pages read the same KV.
    close(out[5], out[2], "rows sharing host pages", tol=0.0)

    # Host segments exist but no page of this table is on the host: one tier.
    pick = [3, 4]
    sub_indptr = torch.tensor([0, len(ROWS["all on the device"]), len(ROWS["all on the device"])])
    sub = A.decode(
        q[pick], pool, LAYER, sub_indptr, torch.tensor(ROWS["all on the device"]), last[pick],
        return_lse=True, backend=backend,
    )  # fmt: skip
    close(sub[0], one_out[pick], "no host part: out")
    close(sub[1], one_lse[pick], "no host part: lse")

    # Promoted back, the same again.
    assert pool.promote() == []  # no running request reads them (no cache attached)
    assert sorted(pool.promote(HOST_SEGS)) == HOST_SEGS
    back, back_lse = A.decode(*args, return_lse=True, backend=backend)
    close(back, one_out, "after promotion")
    close(back_lse, one_lse, "after promotion: lse")
    pool.check_invariants()


@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_all_pages_on_the_host(dtype: str, page_size: int) -> None:
    """Every segment demoted: the device part of every row is empty."""
    pool, indptr, table, lens = two_tier_pool(dtype, page_size, host_segments=6)
    last = last_page_lens(lens, page_size)
    q = torch.randn(len(lens), 4, 32, generator=torch.Generator().manual_seed(3))
    one = A.decode(q, pool, LAYER, indptr, table, last, return_lse=True, backend="cpu")
    pool.demote(list(range(6)))
    assert pool.tier_of(table).all()
    for backend in ("torch", "cpu"):
        out, lse = A.decode(q, pool, LAYER, indptr, table, last, return_lse=True, backend=backend)
        close(out, one[0], f"all on the host ({backend})")
        close(lse, one[1], f"all on the host, lse ({backend})")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_extend_over_both_tiers_equals_one_tier(
    dtype: str, page_size: int, backend: Backend
) -> None:
    """On the CPU extend reads both tiers in place: the same bits as before the move."""
    pool, indptr, table, lens = two_tier_pool(dtype, page_size)
    last = last_page_lens(lens, page_size)
    new = [min(n, k) for n, k in zip(lens, [1, 17, 5, 9, 0, 3, 30], strict=True)]
    qo = torch.tensor([0, *np.cumsum(new)], dtype=torch.int32)
    q = torch.randn(int(qo[-1]), 8, 32, generator=torch.Generator().manual_seed(5))
    args = (q, pool, LAYER, qo, indptr, table, last)
    one, one_lse = A.extend(*args, return_lse=True, backend=backend)
    pool.demote(HOST_SEGS)
    assert pool.tier_of(table).any()
    out, lse = A.extend(*args, return_lse=True, backend=backend)
    assert torch.equal(out, one) and torch.equal(lse, one_lse)
    # And what it computes is attention: its last row per request is the decode.
    ends = (qo[1:] - 1)[torch.tensor(new) > 0]
    rows = [i for i, k in enumerate(new) if k]
    dec = A.decode(
        q[ends], pool, LAYER,
        torch.tensor([0, *np.cumsum([len(list(ROWS.values())[i]) for i in rows])]),
        torch.cat([torch.tensor(list(ROWS.values())[i], dtype=torch.int32) for i in rows]),
        last[rows], backend=backend,
    )  # fmt: skip
    close(out[ends], dec, "the last new row of each request against decode")


@pytest.mark.parametrize("window", [0, 5])
def test_windowed_decode_over_a_split_table_is_refused(window: int) -> None:
    pool, indptr, table, lens = two_tier_pool("bf16", 16)
    last = last_page_lens(lens, 16)
    q = torch.randn(len(lens), 2, 32)
    A.decode(q, pool, LAYER, indptr, table, last, window_left=window, backend="cpu")
    pool.demote(HOST_SEGS)
    with pytest.raises(InvalidArgument, match=f"window_left={window}.*promote"):
        A.decode(q, pool, LAYER, indptr, table, last, window_left=window, backend="cpu")
    # A table with no host page still decodes with a window.
    dev = torch.tensor(ROWS["all on the device"], dtype=torch.int32)
    A.decode(q[:1], pool, LAYER, torch.tensor([0, 4]), dev, last[3:4], window_left=window)


# ----- 3. bad configurations and refused moves ------------------------------------------


def small_pool(**kw: Any) -> KVPool:
    kw.setdefault("host_budget_bytes", 2 * segment_bytes(4, 2, "bf16"))
    return KVPool(LAYERS, HEADS, DIM, 4, "bf16", pages_per_segment=2, **kw)


def fill(pool: KVPool, n_pages: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate ``n_pages`` and write random KV to all their slots (both
    layers); returns the slots and the KV ``[layers, 2, T, heads, dim]``
    as stored."""
    ids = pool.alloc(n_pages)
    ps = pool.page_size
    slots = (ids.long()[:, None] * ps + torch.arange(ps)).reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(pool.num_layers, 2, slots.numel(), HEADS, DIM, generator=gen)
    for layer in range(pool.num_layers):
        pool.write(layer, slots, kv[layer, 0], kv[layer, 1])
    return slots, stored(kv, pool.dtype)


def reads_back(pool: KVPool, slots: torch.Tensor, kv: torch.Tensor) -> None:
    for layer in range(pool.num_layers):
        k, v = pool.read(layer, slots)
        assert torch.equal(k, kv[layer, 0]) and torch.equal(v, kv[layer, 1]), layer


def test_host_budget_smaller_than_a_segment() -> None:
    sb = segment_bytes(4, 2, "bf16")
    with pytest.raises(InvalidArgument, match=rf"host_budget_bytes={sb - 1:,}.*\({sb:,} B\)"):
        small_pool(host_budget_bytes=sb - 1)
    small_pool(host_budget_bytes=sb)  # one segment is enough
    assert small_pool(host_budget_bytes=0).host_budget_bytes == 0


def test_no_host_tier_refuses_demotion() -> None:
    pool = small_pool(host_budget_bytes=0)
    slots, kv = fill(pool, 4)
    before = pool_state(pool)
    with pytest.raises(BudgetExhausted, match="0 B budget"):
        pool.demote([0])
    assert pool_state(pool) == before
    reads_back(pool, slots, kv)


def test_host_refusing_memory_keeps_the_segment_on_the_device() -> None:
    factory = HostFactory()
    factory.fail = True
    pool = small_pool(host_tensor_factory=factory)
    slots, kv = fill(pool, 4)
    before = pool_state(pool)
    with pytest.raises(HostMemoryRefused, match=r"1,?\d* ?B?.*injected: no host memory") as e:
        pool.demote([0])
    assert isinstance(e.value.__cause__, RuntimeError)
    assert pool_state(pool) == before and factory.calls == 1
    assert not pool.allocator.is_sealed(0) and pool.host_segments == []
    pool.check_invariants()
    reads_back(pool, slots, kv)
    # The segment still takes new pages (it was not left sealed).
    pool.release(pool.alloc(0))
    factory.fail = False
    assert pool.demote([0]) == [0]
    reads_back(pool, slots, kv)
    pool.check_invariants()


def test_refused_demotions_and_promotions_change_nothing() -> None:
    sb = segment_bytes(4, 2, "bf16")
    pool = small_pool(budget_bytes=3 * sb, host_budget_bytes=1 * sb)
    slots, kv = fill(pool, 6)  # three segments: the whole device budget
    assert pool.allocator.segments() == [0, 1, 2]
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: pool.demote([7]), InvalidArgument, r"segment 7: it is not live"),
        (lambda: pool.demote([0, 1]), BudgetExhausted, rf"2 segment\(s\).*{sb:,} B budget"),
        (lambda: pool.promote([0]), InvalidArgument, "already in the device tier"),
        (lambda: pool.demote([-1]), InvalidArgument, "non-negative, got -1"),
    ]
    for call, err, match in cases:
        before = pool_state(pool)
        with pytest.raises(err, match=match):
            call()
        assert pool_state(pool) == before, match
    assert pool.demote([1]) == [1]
    cases = [
        (lambda: pool.demote([1]), InvalidArgument, "segment 1: it is already in the host tier"),
        (lambda: pool.demote([0]), BudgetExhausted, r"0 segment\(s\) of room"),
        (lambda: pool.demote(n=1), BudgetExhausted, "host"),
    ]
    for call, err, match in cases:
        before = pool_state(pool)
        with pytest.raises(err, match=match):
            call()
        assert pool_state(pool) == before, match
    # The freed device room is taken by a new segment: no room to promote into.
    more, more_kv = fill(pool, 2, seed=1)
    assert pool.device_reserved_bytes() == 3 * sb
    before = pool_state(pool)
    with pytest.raises(BudgetExhausted, match=f"device budget {3 * sb} B has room for 0"):
        pool.promote([1])
    assert pool_state(pool) == before
    assert pool.promote() == []  # as many as fit: none
    assert pool_state(pool) == before
    pool.check_invariants()
    reads_back(pool, slots, kv)
    reads_back(pool, more, more_kv)


def test_demoting_a_segment_being_written_is_refused() -> None:
    sb = segment_bytes(4, 2, "bf16")
    pool = small_pool(host_budget_bytes=4 * sb)
    cache = PrefixCache(pool)
    req = cache.begin(list(range(10)))  # 3 pages: segments 0 and 1
    slots = cache.extend(req, req.uncached)
    assert pool.allocator.segments() == [0, 1]
    before = pool_state(pool)
    with pytest.raises(InvalidArgument, match=r"segments \[1\] hold a running request's last"):
        pool.demote([0, 1])
    assert pool_state(pool) == before
    with pytest.raises(InvalidArgument, match="only 1 device segment"):
        pool.demote(n=2)
    assert pool_state(pool) == before
    assert pool.demote(n=1) == [0]
    assert pool.tier_of(req.page_ids).tolist() == [HOST, HOST, DEVICE]
    cache.finish(req)
    assert pool.demote([1]) == [1]  # nobody writes it any more
    cache.check_invariants()
    assert slots.numel() == 10


def test_host_refusing_the_second_of_two_demotions() -> None:
    """Each move is all or nothing: the refused segment stays on the device,
    unsealed, every byte readable (the first may have moved: see the report)."""

    class SecondRefused(HostFactory):
        def __call__(self, nbytes: int, device: torch.device) -> torch.Tensor:
            self.fail = self.calls == 1
            return super().__call__(nbytes, device)

    factory = SecondRefused()
    pool = small_pool(
        host_budget_bytes=4 * segment_bytes(4, 2, "bf16"), host_tensor_factory=factory
    )
    slots, kv = fill(pool, 6)
    with pytest.raises(HostMemoryRefused):
        pool.demote([0, 1])
    tiers = tiers_of_segments(pool)
    assert tiers[1] == DEVICE and not pool.allocator.is_sealed(1) and tiers[2] == DEVICE
    assert pool.stats()["demotions"] == len(pool.host_segments)
    pool.check_invariants()
    reads_back(pool, slots, kv)


def test_a_host_segment_never_takes_a_new_page() -> None:
    pool = small_pool(host_budget_bytes=4 * segment_bytes(4, 2, "bf16"))
    ids = pool.alloc(3)  # segment 0 full, segment 1 half
    pool.demote([1])
    pool.release(ids[:2])  # segment 0 empty (on the device), 1 has a free page (on the host)
    got = pool.alloc(3)
    assert (pool.tier_of(got) == DEVICE).all(), (got, pool.host_segments)
    assert 3 not in got.tolist()  # segment 1's free page
    pool.check_invariants()


# ----- 4. a move interrupted at any line ------------------------------------------------

_MOVE = KVPool._move.__code__


def _line_of(text: str) -> int | None:
    """The line of ``KVPool._move`` that holds ``text``, if any."""
    lines, start = inspect.getsourcelines(KVPool._move)
    hits = [start + i for i, line in enumerate(lines) if line.strip() == text]
    return hits[0] if len(hits) == 1 else None


# The first line after sealing a segment for a demotion (an interrupt there
# once left a device segment sealed: test_interrupt_after_sealing_...).
_SEAL_GAP = _line_of("seg = self._make_segment(buf, tier)")


class MoveInjector(_Injector):
    """``sys.settrace`` hook raising ``KeyboardInterrupt`` at the ``at``-th
    line the radixseg package executes inside ``KVPool._move`` (its own lines
    and those of what it calls); ``at=None``: count only. ``where`` is
    ``function:line``."""

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.startswith(_PACKAGE):
            return None
        f: FrameType | None = frame
        while f is not None and f.f_code is not _MOVE:
            f = f.f_back
        return None if f is None else self.local

    def label(self, frame: FrameType) -> str:
        return f"{frame.f_code.co_name}:{frame.f_lineno}"


def _interrupted(pool: KVPool, move: Any, at: int | None) -> MoveInjector:
    inject = MoveInjector(at)
    sys.settrace(inject)
    try:
        move()
    except KeyboardInterrupt:
        assert inject.where is not None
    finally:
        sys.settrace(None)
    return inject


@pytest.mark.parametrize("spare", [False, True], ids=["fresh host buffer", "spare host buffer"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_keyboard_interrupt_at_every_line_of_a_move(dtype: str, spare: bool) -> None:
    sb = segment_bytes(4, 2, dtype)

    def setup() -> tuple[KVPool, torch.Tensor, torch.Tensor]:
        pool = KVPool(
            LAYERS, HEADS, DIM, 4, dtype, pages_per_segment=2, budget_bytes=3 * sb,
            host_budget_bytes=2 * sb,
        )  # fmt: skip
        slots, kv = fill(pool, 6)
        if spare:  # a demotion that reuses a host buffer, a promotion that returns one
            pool.demote([2])
            pool.promote([2])
            assert pool.host_reserved_bytes() == sb and pool.host_segments == []
        return pool, slots, kv

    def check(pool: KVPool, slots: torch.Tensor, kv: torch.Tensor, where: str | None) -> int:
        try:
            pool.check_invariants()
            tiers = tiers_of_segments(pool)
            assert set(tiers) == {0, 1, 2}
            for sid, tier in tiers.items():
                assert pool.allocator.is_sealed(sid) == (tier == HOST)
            assert pool.host_reserved_bytes() <= 2 * sb
            assert pool.device_reserved_bytes() <= 3 * sb
            reads_back(pool, slots, kv)
            return tiers[1]
        except Exception as e:
            raise AssertionError(f"after an interrupt at {where}: {e!r}") from e

    for direction in ("demote", "promote"):
        lines: int | None = None
        at = 0
        interrupted = 0
        while lines is None or at <= lines:
            pool, slots, kv = setup()
            if direction == "promote":
                pool.demote([1])
            move = pool.demote if direction == "demote" else pool.promote
            inject = _interrupted(pool, lambda move=move: move([1]), at or None)
            if at == 0:
                lines = inject.lines
                assert lines > 5, lines
            elif inject.where is not None:
                interrupted += 1
            tier = check(pool, slots, kv, inject.where)
            want = HOST if direction == "demote" else DEVICE
            if tier != want:  # not moved: a retry moves it
                assert move([1]) == [1]
                assert check(pool, slots, kv, inject.where) == want
            # And back again, untouched by the interrupt.
            if want == HOST:
                assert pool.promote([1]) == [1]
            else:
                assert pool.demote([1]) == [1]
            check(pool, slots, kv, inject.where)
            at += 1
        assert lines is not None and interrupted == lines, (direction, lines, interrupted)


# ----- 5. demotion before eviction ------------------------------------------------------


class EvictionLog(PrefixCache):
    """A PrefixCache noting the host tier's room whenever the pool evicts."""

    def __init__(self, pool: KVPool) -> None:
        super().__init__(pool)
        self.host_room_at_evict: list[int] = []

    def evict(self, n_pages: int) -> int:
        pool = self.pool
        room = pool.host_budget_bytes // pool.segment_bytes - len(pool.host_segments)
        self.host_room_at_evict.append(room)
        return super().evict(n_pages)


def test_pressure_demotes_before_it_evicts() -> None:
    ps, pps = 4, 2
    sb = segment_bytes(ps, pps, "bf16")
    B, H = 3 * sb, 2 * sb
    pool = KVPool(
        LAYERS, HEADS, DIM, ps, "bf16", pages_per_segment=pps, budget_bytes=B,
        host_budget_bytes=H,
    )  # fmt: skip
    cache = EvictionLog(pool)
    done: list[tuple[list[int], torch.Tensor]] = []
    first_eviction = None
    for i in range(12):
        prompt = [i + 10] * (2 * pps * ps)  # two segments' worth, distinct prompts
        req = cache.begin(prompt)
        slots = cache.extend(req, req.uncached)
        assert (pool.tier_of(req.page_ids) == DEVICE).all()
        kv = stored(torch.randn(LAYERS, 2, slots.numel(), HEADS, DIM), pool.dtype)
        for layer in range(LAYERS):
            pool.write(layer, slots, kv[layer, 0], kv[layer, 1])
        reads_back(pool, slots, kv)
        cache.finish(req)
        s = pool.stats()
        if s["evicted_pages"] and first_eviction is None:
            first_eviction = i
            # Before the first eviction the host tier filled up.
            assert s["demotions"] >= H // sb, s
        assert pool.device_reserved_bytes() <= B and pool.host_reserved_bytes() <= H
        cache.check_invariants()
        done.append((prompt, kv))
    # Every eviction came when the host tier had no room left.
    assert cache.host_room_at_evict and set(cache.host_room_at_evict) == {0}
    assert first_eviction is not None and first_eviction >= 2  # request 1 fit by demotion
    # Everything still cached reads back, wherever it is.
    hits = 0
    for prompt, kv in done:
        req = cache.begin(prompt)
        n = req.cached_len
        hits += bool(n)
        if n:
            got = [torch.stack(pool.read(la, cache.slots(req))) for la in range(LAYERS)]
            assert torch.equal(torch.stack(got), kv[:, :, :n])
        cache.abort(req)
    assert hits >= 2


def test_both_budgets_full_names_both_in_the_error() -> None:
    ps, pps = 4, 2
    sb = segment_bytes(ps, pps, "bf16")
    B, H = 2 * sb, 2 * sb
    pool = KVPool(
        LAYERS, HEADS, DIM, ps, "bf16", pages_per_segment=pps, budget_bytes=B,
        host_budget_bytes=H,
    )  # fmt: skip
    cache = PrefixCache(pool)
    running = [cache.begin([]), cache.begin([])]
    steps = 0
    with pytest.raises(BudgetExhausted) as e:
        for steps in range(100):  # two requests growing a page at a time: nothing to evict
            req = running[steps % 2]
            before = req.page_ids.tolist()
            cache.extend(req, [steps] * ps)
            assert (pool.tier_of(req.page_ids[len(before) :]) == DEVICE).all()
            assert pool.stats()["evicted_pages"] == 0
    msg = str(e.value)
    assert f"device budget {B:,} B" in msg and f"holds {H:,} B of its {H:,} B budget" in msg, msg
    assert "budget_bytes or host_budget_bytes" in msg
    assert pool.host_reserved_bytes() == H and pool.device_reserved_bytes() == B
    assert pool.stats()["demotions"] == H // sb and pool.stats()["evicted_pages"] == 0
    # Both budgets' pages, and the refused step took nothing.
    assert sum(r.num_pages for r in running) == (B + H) // sb * pps
    assert steps == (B + H) // sb * pps
    cache.check_invariants()


# ----- bugs these tests found (fixed) -------------------------------------------------------


def test_interrupt_after_sealing_leaves_the_segment_usable() -> None:
    assert _SEAL_GAP is not None
    sb = segment_bytes(4, 2, "bf16")
    pool = small_pool(host_budget_bytes=2 * sb)
    slots, kv = fill(pool, 3)  # segment 1 has a free page
    at = None
    probe = small_pool(host_budget_bytes=2 * sb)
    fill(probe, 3)
    lines = _interrupted(probe, lambda: probe.demote([1]), None).lines
    for n in range(1, lines + 1):
        trial = small_pool(host_budget_bytes=2 * sb)
        fill(trial, 3)
        where = _interrupted(trial, lambda t=trial: t.demote([1]), n).where
        if where == f"_move:{_SEAL_GAP}":
            at = n
            break
    assert at is not None
    inject = _interrupted(pool, lambda: pool.demote([1]), at)
    assert inject.where == f"_move:{_SEAL_GAP}"
    assert pool.host_segments == []
    reads_back(pool, slots, kv)
    pool.check_invariants()  # was: InvariantViolation, segment 1 on the device but sealed
    assert pool.alloc(1).tolist() == [3]


def test_host_refusal_under_pressure_falls_back_to_eviction() -> None:
    factory = HostFactory()
    sb = segment_bytes(1, 2, "bf16")
    pool = KVPool(
        LAYERS, HEADS, DIM, 1, "bf16", pages_per_segment=2, budget_bytes=2 * sb,
        host_budget_bytes=2 * sb, host_tensor_factory=factory,
    )  # fmt: skip
    cache = PrefixCache(pool)
    done = cache.begin([1, 2, 3, 4])
    cache.extend(done, done.uncached)
    cache.finish(done)  # 4 cached pages fill the device budget
    assert pool.stats()["evictable_pages"] == 4
    factory.fail = True  # the host has no memory: evict instead
    req = cache.begin([5, 6, 7])
    try:
        cache.extend(req, req.uncached)
    finally:
        cache.check_invariants()
    assert pool.stats()["evicted_pages"] >= 3 and pool.host_segments == []


def test_a_request_past_the_whole_budget_names_the_budget() -> None:
    sb = segment_bytes(1, 1, "bf16")
    pool = KVPool(
        LAYERS, HEADS, DIM, 1, "bf16", pages_per_segment=1, budget_bytes=2 * sb,
        host_budget_bytes=sb,
    )  # fmt: skip
    cache = PrefixCache(pool)
    done = cache.begin([])
    cache.extend(done, [9])
    cache.finish(done)  # one cached page (demotable, evictable)
    req = cache.begin([])
    with pytest.raises(BudgetExhausted) as e:
        cache.extend(req, [1, 2, 3])  # 3 pages: past the device budget's 2
    assert req.seq_len == 0
    cache.check_invariants()
    # "... the allocator's id space allows 2 more segments of the 1 needed
    # (max_segments=2,147,483,648); raise max_segments or pages_per_segment"
    assert "max_segments" not in str(e.value), str(e.value)
    assert f"device budget {2 * sb:,} B" in str(e.value), str(e.value)


def test_truncate_into_a_host_page_keeps_the_write_target_on_the_device() -> None:
    pool = KVPool(
        LAYERS, HEADS, DIM, 4, "bf16", pages_per_segment=1,
        host_budget_bytes=4 * segment_bytes(4, 1, "bf16"),
    )  # fmt: skip
    cache = PrefixCache(pool)
    req = cache.begin([])
    cache.extend(req, list(range(12)))  # 3 pages in segments 0, 1, 2
    assert pool.demote([0, 1]) == [0, 1]  # segment 2 holds the last page: stays
    cache.truncate(req, 6)  # the last page is now page 1, half full, on the host
    slot = cache.extend(req, [7])
    cache.check_invariants()
    assert pool.tier_of(slot // 4).tolist() == [DEVICE], pool.host_segments


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_cuda_pool_with_pinned_host_tier(dtype: str) -> None:
    """On CUDA: demoted segments live in pinned host memory, read back exactly,
    decode over both tiers (Triton + native CPU kernel, LSE merge) equals the
    all-device decode, writes to a moved page land, and promotion restores it."""
    pool = KVPool(
        2, 2, 64, 16, dtype, device="cuda", pages_per_segment=4, host_budget_bytes=1 << 30
    )
    ids = pool.alloc(12)  # three full segments
    slots = (ids.long()[:, None] * 16 + torch.arange(16)).reshape(-1).cuda()
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, slots.numel(), 2, 64, generator=g).cuda()
    A.store_kv(pool, 1, slots, kv[0], kv[1])
    before = pool.read(1, slots)
    q = torch.randn(2, 8, 64, generator=g).cuda()
    table = (
        torch.tensor([0, 12, 18], dtype=torch.int32).cuda(),
        torch.cat([ids, ids[:6]]).cuda(),
        torch.tensor([16, 16], dtype=torch.int32).cuda(),
    )
    want, want_lse = A.decode(q, pool, 1, *table, return_lse=True)
    assert pool.demote([0, 2]) == [0, 2]
    assert pool.segment(0).k.device.type == "cpu" and pool.segment(0).k.is_pinned()
    after = pool.read(1, slots)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    out, lse = A.decode(q, pool, 1, *table, return_lse=True)
    close(out.float().cpu(), want.float().cpu(), "out over both tiers", 1e-2)
    close(lse.cpu(), want_lse.cpu(), "lse over both tiers", 1e-4)
    pool.write(1, slots[:16], kv[0, :16], kv[1, :16])  # a page of a host segment
    assert pool.promote([0, 2]) == [0, 2] and pool.host_segments == []
    again = pool.read(1, slots)
    assert all(torch.equal(a, b) for a, b in zip(before, again, strict=True))
    pool.check_invariants()


def test_demotion_order_is_fewest_readers_first() -> None:
    """``demote(n=...)`` takes segments no running request reads (cached
    prefixes) first, then those read by fewer requests; never a segment
    holding a running request's last page."""
    pool = KVPool(LAYERS, HEADS, DIM, 1, "bf16", pages_per_segment=2, host_budget_bytes=1 << 30)
    cache = PrefixCache(pool)
    done = cache.begin([])
    cache.extend(done, [1, 2])  # segment 0
    cache.finish(done)  # cached, read by nobody
    shared = [5, 6, 7, 8]  # segments 1 and 2
    a = cache.begin(shared)
    cache.extend(a, a.uncached)
    cache.finish(a)
    b = cache.begin([*shared, 9, 10, 11])  # reads 1, 2 (cached) and its own 3, 4
    cache.extend(b, b.uncached)
    c = cache.begin([*shared[:2], 12, 13, 14])  # reads segment 1 and its own 4, 5, 5
    cache.extend(c, c.uncached)
    assert [p // 2 for p in b.page_ids.tolist()] == [1, 1, 2, 2, 3, 3, 4]
    assert [p // 2 for p in c.page_ids.tolist()] == [1, 1, 4, 5, 5]
    # Readers: 0 -> 0, 1 -> 2 (b, c), 2 -> 1 (b), 3 -> 1 (b), 4 -> 2 (b, c) but
    # holds b's last page, 5 holds c's last page.
    assert pool.demote(n=1) == [0]
    assert sorted(pool.demote(n=2)) == [2, 3]
    assert pool.demote(n=1) == [1]
    with pytest.raises(InvalidArgument, match="only 0 device segment"):
        pool.demote(n=1)  # 4 and 5 hold last pages
    assert pool.host_segments == [0, 1, 2, 3]
    assert sorted(pool.promote()) == [1, 2, 3]  # what running requests read
    cache.check_invariants()
    pool.check_invariants()


def test_a_write_beside_a_move_is_never_lost() -> None:
    """Another thread writes a page of a segment while it is being demoted:
    the write waits until the move has switched to the copy, then lands in
    it (a write into the old buffer after the copy would be lost)."""
    from test_atomicity import pause_at

    pool = small_pool()
    slots, kv = fill(pool, 4)  # segments 0 and 1
    page = slots[8:12]  # page 2: segment 1
    new = torch.randn(LAYERS, 2, 4, HEADS, DIM, generator=torch.Generator().manual_seed(7))
    with pause_at("_move", "self._install(sid, seg)") as (reached, go):
        mover = threading.Thread(target=lambda: pool.demote([1]))
        mover.start()
        assert reached.wait(10)  # copied, not yet switched
        writer = threading.Thread(
            target=lambda: [pool.write(la, page, new[la, 0], new[la, 1]) for la in range(LAYERS)]
        )
        writer.start()
        writer.join(0.2)
        assert writer.is_alive()  # it waits for the move
        go.set()
        mover.join(10)
        writer.join(10)
    assert not mover.is_alive() and not writer.is_alive()
    assert pool.host_segments == [1]
    kv[:, :, 8:12] = stored(new, pool.dtype)
    reads_back(pool, slots, kv)
    pool.check_invariants()
