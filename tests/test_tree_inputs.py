"""int32 and int64 inputs to RadixTree give the same results and the same errors.

int32 arrays are read in place by the core (their bits as u32), int64 arrays
by value; a negative int32 must be refused with the value the caller gave, and
a failing call must change nothing on either path. Page sizes need not be
powers of two (a context-parallel pool's virtual page is page_size x ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from radixseg import RadixTree, SegmentAllocator

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


class Twin:
    """Two trees in step: one fed int32 arrays, the other int64 arrays."""

    def __init__(self, page_size: int) -> None:
        self.ps = page_size
        self.sides = []
        for dtype in (np.int32, np.int64):
            a = SegmentAllocator(page_size, 64)
            a.add_segment()
            self.sides.append((dtype, a, RadixTree(a)))

    def state(self, a: SegmentAllocator, t: RadixTree) -> Any:
        seqs = [(ns, k.tolist(), p.tolist()) for ns, k, p in t.cached_sequences()]
        rc = a.refcount(np.arange(64, dtype=np.int64)).tolist()
        return seqs, a.free_pages(), rc, t.locked_pages(), t.node_count()

    def run(self, call: Callable[[RadixTree, Callable[[Any], np.ndarray]], Any]) -> Any:
        """``call(tree, arr)`` on each side, ``arr`` making that side's arrays."""
        outs = []
        for dtype, a, t in self.sides:
            before = self.state(a, t)
            try:
                r = call(t, lambda v, dtype=dtype: np.asarray(v, dtype=dtype))
                out: Any = ("ok", _plain(r))
            except Exception as e:
                out = (
                    "err",
                    type(e).__name__,
                    str(e),
                    getattr(e, "index", None),
                    getattr(e, "value", None),
                    getattr(e, "page_id", None),
                )
                assert self.state(a, t) == before, f"failing call changed the tree: {out}"
            t.check_invariants()
            a.check_invariants()
            outs.append(out)
        assert outs[0] == outs[1]
        assert self.state(*self.sides[0][1:]) == self.state(*self.sides[1][1:])
        return outs[0]

    def alloc(self, n: int) -> list[int]:
        got = [a.alloc(n).tolist() for _, a, _ in self.sides]
        assert got[0] == got[1]
        return got[0]

    def release(self, ids: list[int]) -> None:
        for _, a, _ in self.sides:
            a.release(np.asarray(ids, dtype=np.int64))


def _plain(r: Any) -> Any:
    if hasattr(r, "page_ids"):
        return (r.page_ids.tolist(), r.length, r.node)
    return r


def _err(out: Any, kind: str, **attrs: int) -> bool:
    if out[0] != "err" or out[1] != kind:
        return False
    got = {"index": out[3], "value": out[4], "page_id": out[5]}
    return all(got[k] == v for k, v in attrs.items())


@pytest.mark.parametrize("ps", [1, 2, 4, 3, 48])
def test_match_insert_acquire_finish_agree(ps: int) -> None:
    tw = Twin(ps)
    base = list(range(1, 4 * ps + 1))
    ids = tw.alloc(4)
    assert tw.run(lambda t, arr: t.insert(arr(base), arr(ids))) == ("ok", 0)
    tw.release(ids)

    # Matches and acquires: hits, misses, and bad tokens anywhere.
    assert tw.run(lambda t, arr: t.match_prefix(arr([*base[: 3 * ps], 9])))[1][1] == 3 * ps
    assert tw.run(lambda t, arr: t.match_prefix(arr([7] * 5)))[1][1] == 0
    for toks, at, bad in [
        ([-5, *base], 0, -5),
        ([*base[: 2 * ps], -1], 2 * ps, -1),
        (base + [8] * ps + [I32_MIN], 5 * ps, I32_MIN),
        (base[:ps] + [8] * ps + [3, -7], 2 * ps + 1, -7),
    ]:
        for op in ("match_prefix", "acquire"):
            out = tw.run(lambda t, arr, op=op, toks=toks: getattr(t, op)(arr(toks)))
            assert _err(out, "InvalidArgument", index=at, value=bad), out

    # Inserts that fail: length, tokens, page ids; then one that works.
    tail = [1] if ps > 1 else []
    more = base[: 2 * ps] + [6] * (2 * ps) + tail
    new = tw.alloc(4)
    assert tw.run(lambda t, arr: t.insert(arr(more), arr(new[:3])))[1] == "InvalidArgument"
    bad_tok = list(more)
    bad_tok[3 * ps] = -2
    out = tw.run(lambda t, arr: t.insert(arr(bad_tok), arr(new)))
    assert _err(out, "InvalidArgument", index=3 * ps, value=-2)
    for bad in (-1, I32_MAX, I32_MIN):
        for at in (1, 3):
            bad_ids = list(new)
            bad_ids[at] = bad
            out = tw.run(lambda t, arr, b=bad_ids: t.insert(arr(more), arr(b)))
            assert _err(out, "InvalidHandle", page_id=bad), out
    assert tw.run(lambda t, arr: t.insert(arr(more), arr(new))) == ("ok", 2 * ps)
    tw.release(new)

    # A request: acquire, finish with bad input (nothing changes), then finish.
    prompt = base[: 3 * ps] + [5] * ps
    out = tw.run(lambda t, arr: t.acquire(arr(prompt)))
    matched, length, node = out[1]
    assert length == 3 * ps
    full = prompt + [4] * ps + [2]
    pages = matched + tw.alloc(3)

    def finish(toks: list[int], ids: list[int], **kw: Any) -> Any:
        args = {"node": node, "cache": True, "owned_from": 3} | kw
        return tw.run(lambda t, arr: t.finish(arr(toks), arr(ids), 0, **args))

    assert finish(full, pages[:5])[1] == "InvalidArgument"
    assert finish(full, pages, owned_from=7)[1] == "InvalidArgument"
    for cache in (True, False):
        for at, v in ((5 * ps, -4), (4 * ps, -6)):
            bad_full = list(full)
            bad_full[at] = v
            assert _err(finish(bad_full, pages, cache=cache), "InvalidArgument", index=at, value=v)
        for at, v in ((4, -1), (5, I32_MAX), (1, -9)):
            if at < 3 and not cache:
                continue  # the matched pages are not read then
            bad_ids = list(pages)
            bad_ids[at] = v
            assert _err(finish(full, bad_ids, cache=cache), "InvalidHandle", page_id=v)
    assert finish(full, pages, node=node + (2 << 32))[1] == "InvalidHandle"
    assert finish(full, pages) == ("ok", 3 * ps)
    assert finish(full, pages)[1] == "InvalidArgument"  # unbalanced unlock
    assert tw.run(lambda t, arr: t.match_prefix(arr(full)))[1][1] == len(full) // ps * ps


@pytest.mark.parametrize("ps", [1, 2, 3])
def test_random_sequences_agree(ps: int) -> None:
    """Seeded random requests (with a bad token or id now and then) through both paths."""
    rng = np.random.default_rng(ps)
    tw = Twin(ps)
    for step in range(200):
        toks = rng.integers(0, 3, size=int(rng.integers(0, 12))).tolist()
        if step % 7 == 3 and toks:
            toks[int(rng.integers(0, len(toks)))] = int(rng.choice([-1, I32_MIN]))
        out = tw.run(lambda t, arr, toks=toks: t.acquire(arr(toks)))
        if out[0] == "err":
            continue
        matched, length, node = out[1]
        need = -(-len(toks) // ps) - length // ps
        if tw.sides[0][1].free_pages() < need:
            for _, _, t in tw.sides:
                t.unlock(node)
                t.evict(need)
            continue
        ids = matched + tw.alloc(need)
        if step % 11 == 5 and need:
            ids[-1] = -3
        cache = bool(step % 5)
        out = tw.run(
            lambda t, arr, toks=toks, ids=ids, cache=cache, length=length, node=node: t.finish(
                arr(toks), arr(ids), 0, node, cache, length // ps
            )
        )
        if out[0] == "err":
            # Undo the request by hand, the same on both sides.
            own = [p for p in ids[length // ps :] if p >= 0]
            for _, a, t in tw.sides:
                t.unlock(node)
                a.release(np.asarray(own, dtype=np.int64))
        if step % 13 == 0:
            for _, _, t in tw.sides:
                t.evict(2)
        assert tw.state(*tw.sides[0][1:]) == tw.state(*tw.sides[1][1:])


@pytest.mark.parametrize("ps", [3, 12, 48])
def test_page_size_need_not_be_a_power_of_two(ps: int) -> None:
    """Whole pages of ``ps`` tokens are cached and matched, the trailing
    partial page never, as at power-of-two sizes."""
    a = SegmentAllocator(ps, 64)
    a.add_segment()
    t = RadixTree(a)
    n = 3 * ps + ps // 2
    toks = np.arange(n, dtype=np.int64)
    pages = a.alloc(-(-n // ps))
    t.insert(toks, pages[:3])
    m = t.match_prefix(np.concatenate([toks[: 2 * ps + 1], [10**6]]))
    assert (m.length, m.page_ids.tolist()) == (2 * ps, pages[:2].tolist())
    assert t.match_prefix(toks).length == 3 * ps
    a.release(pages)
    assert t.evict(10) == 3 and a.free_pages() == 64
    t.check_invariants()
