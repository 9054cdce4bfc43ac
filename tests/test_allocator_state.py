"""A Hypothesis state machine over the allocator's Python API.

Checks DESIGN.md invariants 1 (no page id handed out twice while referenced),
2 (add/retire changes no live page id or refcount), 4 (free + referenced =
total), 5 (a failed call changes nothing) and 6 (retire only when every page
is free) against a naive model: a dict page id -> refcount.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import note
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from radixseg import (
    DoubleFree,
    InvalidArgument,
    InvalidHandle,
    OutOfPages,
    SegmentAllocator,
    SegmentBusy,
)

MAX_SEGMENTS = 6


class AllocatorMachine(RuleBasedStateMachine):
    refs = Bundle("refs")  # one held reference to each page of a tuple

    @initialize(pps=st.sampled_from([1, 3, 4, 64, 65]), page_size=st.sampled_from([1, 16]))
    def setup(self, pps: int, page_size: int) -> None:
        self.pps = pps
        self.a = SegmentAllocator(page_size, pps, max_segments=MAX_SEGMENTS)
        self.rc: dict[int, int] = {}  # page id -> refcount, for pages of live segments
        self.live_segments: set[int] = set()

    # --- helpers ---------------------------------------------------------------

    def pages_of(self, seg: int) -> range:
        return range(seg * self.pps, (seg + 1) * self.pps)

    def model_free(self) -> int:
        return sum(1 for r in self.rc.values() if r == 0)

    def snapshot(self) -> tuple:
        ids = sorted(self.rc)
        real = self.a.refcount(ids).tolist() if ids else []
        return (tuple(self.a.segments()), self.a.free_pages(), tuple(real))

    def expect_unchanged(self, before: tuple) -> None:
        assert self.snapshot() == before, "a failed call changed state"

    # --- segments --------------------------------------------------------------

    @rule()
    def add_segment(self) -> None:
        before = self.snapshot()
        if len(self.live_segments) == MAX_SEGMENTS:
            with pytest.raises(OutOfPages):
                self.a.add_segment()
            self.expect_unchanged(before)
            return
        seg = self.a.add_segment()
        assert seg not in self.live_segments
        # retired ids are reused lowest first
        assert seg == min(set(range(MAX_SEGMENTS)) - self.live_segments)
        self.live_segments.add(seg)
        for p in self.pages_of(seg):
            self.rc[p] = 0

    @precondition(lambda self: self.live_segments)
    @rule(data=st.data())
    def retire_segment(self, data: st.DataObject) -> None:
        seg = data.draw(st.sampled_from(sorted(self.live_segments)))
        used = sum(1 for p in self.pages_of(seg) if self.rc[p] > 0)
        before = self.snapshot()
        if used:
            with pytest.raises(SegmentBusy) as e:
                self.a.retire_segment(seg)
            assert e.value.used_pages == used
            self.expect_unchanged(before)
            return
        self.a.retire_segment(seg)
        self.live_segments.discard(seg)
        for p in self.pages_of(seg):
            del self.rc[p]

    @rule(seg=st.integers(-3, MAX_SEGMENTS + 3))
    def retire_invalid_segment(self, seg: int) -> None:
        if seg in self.live_segments:
            return
        before = self.snapshot()
        with pytest.raises(InvalidArgument):
            self.a.retire_segment(seg)
        self.expect_unchanged(before)

    # --- pages -----------------------------------------------------------------

    @rule(target=refs, n=st.integers(0, 140))
    def alloc(self, n: int):
        free = self.model_free()
        before = self.snapshot()
        if n > free:
            with pytest.raises(OutOfPages) as e:
                self.a.alloc(n)
            assert (e.value.requested, e.value.available) == (n, free)
            self.expect_unchanged(before)
            return multiple()
        ids = self.a.alloc(n).tolist()
        assert len(set(ids)) == n
        for p in ids:
            assert self.rc[p] == 0, f"page {p} handed out while referenced"
            self.rc[p] = 1
        note(f"alloc({n}) -> {ids}")
        return tuple(ids)

    @rule(target=refs, ref=refs)
    def retain(self, ref: tuple[int, ...]) -> tuple[int, ...]:
        self.a.retain(list(ref))
        for p in ref:
            self.rc[p] += 1
        return ref

    @rule(ref=consumes(refs))
    def release(self, ref: tuple[int, ...]) -> None:
        self.a.release(list(ref))
        for p in ref:
            self.rc[p] -= 1

    @rule(ref=refs)
    def release_too_often(self, ref: tuple[int, ...]) -> None:
        if not ref:
            return
        p = ref[0]
        before = self.snapshot()
        with pytest.raises(DoubleFree):
            self.a.release([p] * (self.rc[p] + 1))
        self.expect_unchanged(before)

    @precondition(lambda self: any(r == 0 for r in self.rc.values()))
    @rule(data=st.data())
    def touch_free_page(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(sorted(k for k, r in self.rc.items() if r == 0)))
        before = self.snapshot()
        with pytest.raises(DoubleFree):
            self.a.release([p])
        with pytest.raises(InvalidHandle):
            self.a.retain([p])
        self.expect_unchanged(before)

    @rule(p=st.one_of(st.integers(-(2**40), -1), st.integers(0, 2**40)))
    def touch_invalid_id(self, p: int) -> None:
        if p in self.rc:
            return
        before = self.snapshot()
        for fn in (self.a.release, self.a.retain, self.a.refcount):
            with pytest.raises(InvalidHandle):
                fn([p])
        self.expect_unchanged(before)

    # --- invariants --------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "a"):
            return
        self.a.check_invariants()
        assert sorted(self.a.segments()) == sorted(self.live_segments)
        total = self.a.total_pages()
        assert total == len(self.rc)
        referenced = sum(1 for r in self.rc.values() if r > 0)
        assert self.a.free_pages() + referenced == total
        ids = sorted(self.rc)
        if ids:
            assert self.a.refcount(ids).tolist() == [self.rc[p] for p in ids]


TestAllocatorMachine = AllocatorMachine.TestCase
