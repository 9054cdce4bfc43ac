"""A Hypothesis state machine over KVPool + PrefixCache.

The KV of every token is a deterministic function of its namespace and the
tokens up to it, as in a real model. The machine writes that KV whenever a
request extends, and after every step reads back every token of every running
request: matched prefixes must hold exactly what their first writer stored,
through growth, shrinking, eviction, budget exhaustion and injected device
allocation failures (which must change nothing). Tokens come from a tiny
alphabet so prefixes collide.
"""

from __future__ import annotations

import hashlib

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import note
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from radixseg import (
    BudgetExhausted,
    DeviceOutOfMemory,
    InvalidArgument,
    KVPool,
    OutOfPages,
    PrefixCache,
    Request,
)
from radixseg.pool import dequantize_fp8, quantize_fp8

LAYERS, HEADS, DIM = 2, 2, 4
tokens_st = st.lists(st.integers(0, 2), min_size=0, max_size=10)


def token_kv(ns: int, prefix: tuple[int, ...]) -> torch.Tensor:
    """KV ``[2 (k, v), layers, heads, dim]`` of the last token of ``prefix``."""
    seed = int.from_bytes(
        hashlib.blake2b(repr((ns, prefix)).encode(), digest_size=8).digest(), "little"
    )
    g = torch.Generator().manual_seed(seed & (2**63 - 1))
    return torch.randn(2, LAYERS, HEADS, DIM, generator=g) * 3


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the pool reads back for ``x`` written in ``dtype`` storage."""
    if dtype == torch.float8_e4m3fn:
        return dequantize_fp8(*quantize_fp8(x, dtype))
    return x.to(dtype).float()


class FlakyFactory:
    """A segment factory that raises the device's OOM when told to."""

    def __init__(self) -> None:
        self.fail_next = 0
        self.calls = 0

    def __call__(self, nbytes: int, device: torch.device) -> torch.Tensor:
        self.calls += 1
        if self.fail_next:
            self.fail_next -= 1
            raise torch.OutOfMemoryError(f"injected: cannot allocate {nbytes} bytes")
        return torch.empty(nbytes, dtype=torch.uint8, device=device)


class PoolMachine(RuleBasedStateMachine):
    running = Bundle("running")

    @initialize(
        page_size=st.sampled_from([1, 2, 4]),
        pps=st.sampled_from([2, 3]),
        dtype=st.sampled_from([torch.float8_e4m3fn, torch.bfloat16, torch.float32]),
        budget_segments=st.sampled_from([None, 2, 4, 6]),
        reserve=st.sampled_from([0, 1]),
    )
    def setup(
        self,
        page_size: int,
        pps: int,
        dtype: torch.dtype,
        budget_segments: int | None,
        reserve: int,
    ) -> None:
        self.factory = FlakyFactory()
        probe = KVPool(LAYERS, HEADS, DIM, page_size, dtype, pages_per_segment=pps)
        budget = None if budget_segments is None else budget_segments * probe.segment_bytes
        self.pool = KVPool(
            LAYERS,
            HEADS,
            DIM,
            page_size,
            dtype,
            pages_per_segment=pps,
            budget_bytes=budget,
            reserve_segments=reserve,
            tensor_factory=self.factory,
        )
        self.cache = PrefixCache(self.pool)
        self.dtype = dtype
        self.budget = budget
        self.live: list[Request] = []

    # --- helpers ------------------------------------------------------------------

    def expected_kv(self, req: Request, start: int, end: int) -> torch.Tensor:
        toks = tuple(req.tokens.tolist())
        return torch.stack(
            [token_kv(req.namespace, toks[: p + 1]) for p in range(start, end)], dim=2
        )

    def check_request(self, req: Request) -> None:
        if req.seq_len == 0:
            return
        slots = self.cache.slots(req)
        want = stored(self.expected_kv(req, 0, req.seq_len), self.dtype)  # [2, L, T, H, D]
        for layer in range(LAYERS):
            k, v = self.pool.read(layer, slots)
            assert torch.equal(k, want[0, layer]), f"layer {layer} K differs for {req}"
            assert torch.equal(v, want[1, layer]), f"layer {layer} V differs for {req}"

    def snapshot(self) -> tuple[object, ...]:
        s = self.pool.stats()
        return (
            s["segments"],
            s["free_pages"],
            s["total_pages"],
            tuple(self.pool.allocator.segments()),
        )

    # --- rules ---------------------------------------------------------------------

    @rule(target=running, tokens=tokens_st, ns=st.sampled_from([0, 1]))
    def begin(self, tokens: list[int], ns: int) -> Request:
        req = self.cache.begin(tokens, ns)
        assert req.cached_len % self.pool.page_size == 0
        assert req.cached_len <= max(0, len(tokens) - 1)
        assert req.tokens.tolist() == tokens[: req.cached_len]
        self.check_request(req)  # the matched pages hold this prefix's KV
        self.live.append(req)
        return req

    @rule(req=running, n=st.integers(1, 6), more=tokens_st, fail=st.sampled_from([0, 0, 1, 2]))
    def extend(self, req: Request, n: int, more: list[int], fail: int) -> None:
        if req.state != "running":
            return
        new = (req.uncached.tolist() + more)[: max(n, 1)] or [0]
        before_pages = req.page_ids.tolist()
        before_len = req.seq_len
        self.factory.fail_next = fail
        try:
            slots = self.cache.extend(req, new)
        except (BudgetExhausted, DeviceOutOfMemory) as e:
            note(f"extend failed: {e}")
            if isinstance(e, BudgetExhausted):
                assert self.budget is not None or "max_segments" in str(e)
            assert req.page_ids.tolist() == before_pages and req.seq_len == before_len
            self.factory.fail_next = 0
            return
        finally:
            self.factory.fail_next = 0
        assert slots.dtype == torch.int64 and slots.numel() == len(new)
        kv = self.expected_kv(req, before_len, req.seq_len)
        for layer in range(LAYERS):
            self.pool.write(layer, slots, kv[0, layer], kv[1, layer])

    @rule(req=running, n=st.integers(1, 3))
    def decode(self, req: Request, n: int) -> None:
        """Decode steps: one token at a time (fills the last page, then takes new ones)."""
        for _ in range(n):
            self.extend(req, 1, [], 0)

    @rule(req=consumes(running))
    def finish(self, req: Request) -> None:
        if req.state == "running":
            self.cache.finish(req)
            self.live.remove(req)

    @rule(req=consumes(running))
    def abort(self, req: Request) -> None:
        if req.state == "running":
            self.cache.abort(req)
            self.live.remove(req)

    @rule(n=st.integers(0, 8))
    def evict(self, n: int) -> None:
        before = self.pool.stats()["cached_pages"]
        released = self.cache.evict(n)
        after = self.pool.stats()["cached_pages"]
        assert before - after == released
        assert released >= min(n, self.pool.stats()["evictable_pages"] + released) or released >= n

    @rule(keep=st.sampled_from([None, 0]))
    def shrink(self, keep: int | None) -> None:
        before = self.pool.stats()["segments"]
        freed = self.pool.shrink(keep)
        after = self.pool.stats()
        assert freed == (before - after["segments"]) * self.pool.segment_bytes
        empty = sum(1 for _, used in self.pool.allocator.segment_usage() if used == 0)
        assert empty <= (self.pool.reserve_segments if keep is None else keep)

    @rule(n=st.integers(1, 12), fail=st.sampled_from([0, 1, 3]))
    def raw_alloc(self, n: int, fail: int) -> None:
        """Direct pool.alloc/release (as an engine's scratch pages), with failures injected."""
        before = self.snapshot()
        self.factory.fail_next = fail
        try:
            ids = self.pool.alloc(n)
        except OutOfPages as e:
            assert isinstance(e, (BudgetExhausted, DeviceOutOfMemory)), type(e)
            assert e.requested == n  # type: ignore[attr-defined]
            # Eviction may have freed pages; nothing else changed.
            after = self.snapshot()
            assert after[0] == before[0] and after[3] == before[3], (before, after)
            return
        finally:
            self.factory.fail_next = 0
        assert ids.numel() == n
        assert (self.pool.allocator.refcount(ids) == 1).all()
        self.pool.release(ids)

    @precondition(lambda self: self.live)
    @rule()
    def page_table(self) -> None:
        indptr, indices, last = self.cache.page_table(self.live)
        ps = self.pool.page_size
        for i, r in enumerate(self.live):
            lo, hi = int(indptr[i]), int(indptr[i + 1])
            assert indices[lo:hi].tolist() == r.page_ids.tolist()
            if r.num_pages:
                assert (hi - lo - 1) * ps + int(last[i]) == r.seq_len
                assert 1 <= int(last[i]) <= ps

    @rule(roll=st.integers(0, 9))
    def reset(self, roll: int) -> None:
        if roll:  # rare: a reset empties the cache the other rules exercise
            return
        if self.live:
            before = self.pool.stats()["cached_pages"]
            with pytest.raises(InvalidArgument, match="running"):
                self.cache.reset()
            assert self.pool.stats()["cached_pages"] == before
            return
        self.cache.reset()
        assert self.pool.stats()["cached_pages"] == 0

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def structures_hold(self) -> None:
        self.cache.check_invariants()
        s = self.pool.stats()
        assert s["reserved_bytes"] == s["segments"] * self.pool.segment_bytes
        if self.budget is not None:
            assert s["reserved_bytes"] <= self.budget
        # Every page is held by a running request, by the tree, or free.
        held = sum(r.num_pages for r in self.live)
        assert s["used_pages"] <= held + s["cached_pages"]

    @invariant()
    def live_pages_read_back(self) -> None:
        for req in self.live:
            assert (self.pool.allocator.refcount(req.page_ids) >= 1).all()
            self.check_request(req)


TestPoolMachine = PoolMachine.TestCase
