"""A Hypothesis state machine over RadixTree + SegmentAllocator with growth.

The property the project exists for: every page id a match returns is exactly
the page first inserted for that prefix, before and after the allocator grows
or shrinks. Tokens come from a tiny alphabet so prefixes collide.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from radixseg import (
    InvalidArgument,
    InvalidHandle,
    OutOfPages,
    RadixTree,
    SegmentAllocator,
    SegmentBusy,
)

tokens_st = st.lists(st.integers(0, 3), min_size=0, max_size=12)
namespace_st = st.sampled_from([0, 7])


class TreeMachine(RuleBasedStateMachine):
    locked = Bundle("locked")  # (node handle, namespace, matched prefix)

    @initialize(page_size=st.sampled_from([1, 2]), pps=st.sampled_from([2, 5]))
    def setup(self, page_size: int, pps: int) -> None:
        self.ps = page_size
        self.a = SegmentAllocator(page_size, pps, max_segments=16)
        self.t = RadixTree(self.a)
        # (namespace, page-aligned prefix) -> page id of its last page
        self.model: dict[tuple[int, tuple[int, ...]], int] = {}

    # --- model helpers ---------------------------------------------------------

    def expected(self, tokens: list[int], ns: int) -> list[int]:
        pages = []
        for k in range(1, len(tokens) // self.ps + 1):
            key = (ns, tuple(tokens[: k * self.ps]))
            if key not in self.model:
                break
            pages.append(self.model[key])
        return pages

    def check_all_prefixes(self) -> None:
        for (ns, prefix), _ in list(self.model.items()):
            m = self.t.match_prefix(list(prefix), ns)
            assert m.page_ids.tolist() == self.expected(list(prefix), ns), (ns, prefix)
            assert m.length == len(prefix)

    # --- rules -----------------------------------------------------------------

    @rule(tokens=tokens_st, ns=namespace_st)
    def insert(self, tokens: list[int], ns: int) -> None:
        n = len(tokens) // self.ps
        try:
            pages = self.a.alloc(n)
        except OutOfPages:
            try:
                self.a.add_segment()  # grow, as a pool would
            except OutOfPages:
                return
            self.check_all_prefixes()
            return
        cached = self.t.insert(tokens, pages, ns)
        exp = self.expected(tokens, ns)
        assert cached == len(exp) * self.ps
        for k in range(len(exp), n):
            self.model[(ns, tuple(tokens[: (k + 1) * self.ps]))] = int(pages[k])
        self.a.release(pages)  # the caller's references, duplicates included

    @rule(tokens=tokens_st, ns=namespace_st)
    def match(self, tokens: list[int], ns: int) -> None:
        m = self.t.match_prefix(tokens, ns)
        exp = self.expected(tokens, ns)
        assert m.page_ids.tolist() == exp
        assert m.length == len(exp) * self.ps
        other = 7 - ns  # never crosses namespaces
        if m.length and (other, tuple(tokens[: m.length])) not in self.model:
            assert self.t.match_prefix(tokens, other).length < m.length

    @rule(target=locked, tokens=tokens_st, ns=namespace_st)
    def match_and_lock(self, tokens: list[int], ns: int) -> tuple[int, int, tuple[int, ...]]:
        m = self.t.match_prefix(tokens, ns)
        self.t.lock(m.node)
        return (m.node, ns, tuple(tokens[: m.length]))

    @rule(entry=consumes(locked))
    def unlock(self, entry: tuple[int, int, tuple[int, ...]]) -> None:
        self.t.unlock(entry[0])

    @rule(n=st.integers(0, 12))
    def evict(self, n: int) -> None:
        before = self.t.evictable_pages()
        released = self.t.evict(n)
        assert released >= min(n, before) or released == before
        # forget what was evicted: a prefix that no longer matches in full
        for ns, prefix in list(self.model):
            if self.t.match_prefix(list(prefix), ns).length < len(prefix):
                del self.model[(ns, prefix)]

    @rule()
    def grow(self) -> None:
        try:
            self.a.add_segment()
        except OutOfPages:
            return
        self.check_all_prefixes()

    @rule(data=st.data())
    def shrink(self, data: st.DataObject) -> None:
        segs = self.a.segments()
        if not segs:
            return
        seg = data.draw(st.sampled_from(segs))
        try:
            self.a.retire_segment(seg)
        except SegmentBusy:
            pass
        self.check_all_prefixes()

    @rule(tokens=st.lists(st.integers(0, 3), min_size=2, max_size=6))
    def bad_inserts_change_nothing(self, tokens: list[int]) -> None:
        before = (self.t.cached_tokens(), self.t.node_count(), self.a.free_pages())
        with pytest.raises(InvalidArgument):
            self.t.insert(tokens + [2**31], [0] * ((len(tokens) + 1) // self.ps))  # noqa: RUF005
        with pytest.raises(InvalidArgument):  # wrong number of page ids
            self.t.insert(tokens, [0] * (len(tokens) // self.ps + 1))
        with pytest.raises(InvalidHandle):
            self.t.unlock(2**40 + 12345)
        assert (self.t.cached_tokens(), self.t.node_count(), self.a.free_pages()) == before

    # --- invariants --------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "t"):
            return
        self.t.check_invariants()
        self.a.check_invariants()
        assert self.t.cached_pages() == len(self.model)
        assert self.t.evictable_pages() + self.t.locked_pages() == self.t.cached_pages()
        # the tree is the only holder of cached pages: used == cached
        assert self.a.total_pages() - self.a.free_pages() == self.t.cached_pages()


TestTreeMachine = TreeMachine.TestCase


def test_locked_prefix_survives_eviction_and_growth():
    a = SegmentAllocator(page_size=1, pages_per_segment=4)
    a.add_segment()
    t = RadixTree(a)
    pages = a.alloc(3)
    t.insert([1, 2, 3], pages)
    a.release(pages)
    m = t.match_prefix([1, 2, 3, 4])
    t.lock(m.node)
    assert t.evict(10) == 0
    a.add_segment()
    again = t.match_prefix([1, 2, 3])
    assert again.page_ids.tolist() == pages.tolist()
    t.unlock(m.node)
    with pytest.raises(InvalidArgument):
        t.unlock(m.node)
    assert t.evict(10) == 3
    assert a.free_pages() == 8
    t.check_invariants()
    a.check_invariants()
