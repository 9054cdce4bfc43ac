"""The bad-input matrix: every public function of ../shared/API.md, fed wrong input.

Each case must raise a radixseg exception (or ``TypeError``/``ValueError``
where Python convention says so) whose message names the offending value;
afterwards every invariant checker passes and the observable state (free
pages, refcounts of held pages, tree contents, pool bytes) is unchanged.
Nothing reachable from Python may panic or abort the process: a Rust panic
would surface as ``pyo3_runtime.PanicException`` (a BaseException), which
this test does not catch and so reports as a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch

import radixseg
from radixseg import (
    DoubleFree,
    InvalidArgument,
    InvalidHandle,
    KVPool,
    OutOfPages,
    PrefixCache,
    RadixsegError,
    RadixTree,
    SegmentAllocator,
    SegmentBusy,
)

BIG = 2**31
HUGE = 2**40


@dataclass
class World:
    """One of everything, with some state worth protecting."""

    a: SegmentAllocator
    held: torch.Tensor
    freed: int
    t: RadixTree
    node: int
    pool: KVPool
    cache: PrefixCache
    req: Any
    done_req: Any
    slots: torch.Tensor

    def snapshot(self) -> tuple[Any, ...]:
        k, v = self.pool.read(0, self.slots)
        return (
            self.a.free_pages(),
            self.a.segments(),
            self.a.refcount(self.held).tolist(),
            self.t.stats(),
            self.t.match_prefix([1, 2, 3, 4]).page_ids.tolist(),
            self.pool.stats(),
            self.req.page_ids.tolist(),
            self.req.tokens.tolist(),
            k.tolist(),
            v.tolist(),
        )

    def check(self) -> None:
        self.a.check_invariants()
        self.t.check_invariants()
        self.cache.check_invariants()


def make_world() -> World:
    a = SegmentAllocator(page_size=2, pages_per_segment=8)
    a.add_segment()
    a.add_segment()
    held = a.alloc(4)
    gone = a.alloc(1)
    a.release(gone)
    t = RadixTree(a)
    t.insert([1, 2, 3, 4], held[:2])
    m = t.match_prefix([1, 2, 3, 4])
    t.lock(m.node)
    pool = KVPool(2, 2, 4, page_size=2, pages_per_segment=4, budget_bytes=None)
    cache = PrefixCache(pool)
    done = cache.begin([5, 6, 7])
    cache.extend(done, [5, 6, 7])
    cache.finish(done)
    req = cache.begin([5, 6, 7, 8, 9])
    cache.extend(req, req.uncached)
    x = torch.arange(req.seq_len * 8, dtype=torch.float32).reshape(-1, 2, 4)
    pool.write(0, cache.slots(req), x, -x)
    return World(a, held, int(gone[0]), t, m.node, pool, cache, req, done, cache.slots(req))


Case = tuple[
    str, Callable[[World], Any], type[BaseException] | tuple[type[BaseException], ...], str
]

CASES: list[Case] = [
    # --- SegmentAllocator -------------------------------------------------------------
    ("SegmentAllocator page_size 0", lambda w: SegmentAllocator(0, 8), InvalidArgument, "0"),
    (
        "SegmentAllocator page_size 1025",
        lambda w: SegmentAllocator(1025, 8),
        InvalidArgument,
        "1025",
    ),
    ("SegmentAllocator page_size str", lambda w: SegmentAllocator("16", 8), TypeError, "str"),
    ("SegmentAllocator pps 0", lambda w: SegmentAllocator(16, 0), InvalidArgument, "0"),
    ("SegmentAllocator pps huge", lambda w: SegmentAllocator(16, HUGE), InvalidArgument, str(HUGE)),
    (
        "SegmentAllocator max_segments -1",
        lambda w: SegmentAllocator(16, 8, -1),
        InvalidArgument,
        "-1",
    ),
    ("alloc negative", lambda w: w.a.alloc(-1), InvalidArgument, "-1"),
    ("alloc huge", lambda w: w.a.alloc(HUGE), OutOfPages, f"{HUGE}"),
    ("alloc float", lambda w: w.a.alloc(1.5), TypeError, "1.5"),
    ("alloc str", lambda w: w.a.alloc("3"), TypeError, "'3'"),
    ("retain negative id", lambda w: w.a.retain([-1]), InvalidHandle, "-1"),
    ("retain id past int32", lambda w: w.a.retain([BIG]), InvalidHandle, str(BIG)),
    ("retain freed id", lambda w: w.a.retain([w.freed]), InvalidHandle, "{freed}"),
    ("retain float tensor", lambda w: w.a.retain(torch.tensor([1.0])), TypeError, "float"),
    (
        "retain meta tensor",
        lambda w: w.a.retain(torch.tensor([1]).to("meta")),
        InvalidArgument,
        "meta",
    ),
    ("retain strings", lambda w: w.a.retain(["a"]), TypeError, "integers"),
    ("retain past int64", lambda w: w.a.retain([2**70]), InvalidArgument, "2^63"),
    ("release freed id", lambda w: w.a.release([w.freed]), DoubleFree, "{freed}"),
    (
        "release twice in one call",
        lambda w: w.a.release([int(w.held[3])] * 2),
        DoubleFree,
        "{held3}",
    ),
    ("refcount unknown id", lambda w: w.a.refcount([10**9]), InvalidHandle, str(10**9)),
    ("retire unknown segment", lambda w: w.a.retire_segment(99), InvalidArgument, "99"),
    ("retire negative segment", lambda w: w.a.retire_segment(-1), InvalidArgument, "-1"),
    ("retire busy segment", lambda w: w.a.retire_segment(0), SegmentBusy, "0"),
    # --- RadixTree ----------------------------------------------------------------------
    ("RadixTree of non-allocator", lambda w: RadixTree("a"), TypeError, "str"),
    ("match token 2^31", lambda w: w.t.match_prefix([1, BIG]), InvalidArgument, str(BIG)),
    ("match negative token", lambda w: w.t.match_prefix([-5]), InvalidArgument, "-5"),
    ("match namespace -1", lambda w: w.t.match_prefix([1], namespace=-1), InvalidArgument, "-1"),
    (
        "match namespace 2^64",
        lambda w: w.t.match_prefix([1], namespace=2**64),
        InvalidArgument,
        str(2**64),
    ),
    ("match namespace str", lambda w: w.t.match_prefix([1], namespace="x"), TypeError, "'x'"),
    (
        "insert page count",
        lambda w: w.t.insert([1, 2, 3, 4, 5, 6], w.held[:2]),
        InvalidArgument,
        "3",
    ),
    ("insert freed page", lambda w: w.t.insert([9, 9], [w.freed]), InvalidHandle, "{freed}"),
    (
        "insert token 2^31",
        lambda w: w.t.insert([BIG, 1], [int(w.held[2])]),
        InvalidArgument,
        str(BIG),
    ),
    ("lock unknown node", lambda w: w.t.lock(12345678), InvalidHandle, "12345678"),
    ("lock node str", lambda w: w.t.lock("n"), TypeError, "'n'"),
    ("lock node past int64", lambda w: w.t.lock(2**70), InvalidHandle, str(2**70)),
    (
        "unbalanced unlock",
        lambda w: (w.t.unlock(w.node), w.t.unlock(w.node)),
        InvalidArgument,
        "unlock",
    ),
    ("evict negative", lambda w: w.t.evict(-1), InvalidArgument, "-1"),
    ("acquire token 2^31", lambda w: w.t.acquire([BIG]), InvalidArgument, str(BIG)),
    ("finish page count", lambda w: w.t.finish([1, 2, 3], w.held[:1]), InvalidArgument, "2"),
    (
        "finish owned_from -1",
        lambda w: w.t.finish([1, 2], w.held[:1], owned_from=-1),
        InvalidArgument,
        "-1",
    ),
    # --- KVPool -------------------------------------------------------------------------
    ("KVPool page_size 3", lambda w: KVPool(1, 1, 4, page_size=3), InvalidArgument, "3"),
    (
        "KVPool dtype int8",
        lambda w: KVPool(1, 1, 4, dtype=torch.int8),
        InvalidArgument,
        "torch.int8",
    ),
    ("KVPool dtype name", lambda w: KVPool(1, 1, 4, dtype="fp4"), InvalidArgument, "'fp4'"),
    ("KVPool layers 0", lambda w: KVPool(0, 1, 4), InvalidArgument, "0"),
    ("KVPool heads str", lambda w: KVPool(1, "2", 4), TypeError, "'2'"),
    (
        "KVPool budget word",
        lambda w: KVPool(1, 1, 4, budget_bytes="lots"),
        InvalidArgument,
        "'lots'",
    ),
    ("KVPool budget negative", lambda w: KVPool(1, 1, 4, budget_bytes=-1), InvalidArgument, "-1"),
    ("pool.alloc negative", lambda w: w.pool.alloc(-3), InvalidArgument, "-3"),
    ("pool.alloc huge", lambda w: w.pool.alloc(HUGE), OutOfPages, f"{HUGE:,}"),
    ("pool.release freed", lambda w: w.pool.release([10**6]), InvalidHandle, str(10**6)),
    (
        "pool.write layer 2",
        lambda w: w.pool.write(2, w.slots, *kv(w, 5)),
        InvalidArgument,
        "layer 2",
    ),
    (
        "pool.write shape",
        lambda w: w.pool.write(0, w.slots, *kv(w, 4)),
        InvalidArgument,
        "[4, 2, 4]",
    ),
    (
        "pool.write dtype",
        lambda w: w.pool.write(0, w.slots, *[x.int() for x in kv(w, 5)]),
        TypeError,
        "torch.int32",
    ),
    (
        "pool.write device",
        lambda w: w.pool.write(0, w.slots, *[x.to("meta") for x in kv(w, 5)]),
        InvalidArgument,
        "meta",
    ),
    (
        "pool.write slots float",
        lambda w: w.pool.write(0, w.slots.double(), *kv(w, 5)),
        TypeError,
        "torch.float64",
    ),
    (
        "pool.write negative slot",
        lambda w: w.pool.write(0, w.slots - 1000, *kv(w, 5)),
        InvalidArgument,
        "-",
    ),
    (
        "pool.write free page",
        lambda w: w.pool.write(0, free_slots(w), *kv(w, 2)),
        InvalidHandle,
        "refcount 0",
    ),
    (
        "pool.write past segments",
        lambda w: w.pool.write(0, w.slots + 10**6, *kv(w, 5)),
        InvalidHandle,
        "invalid page id",
    ),
    (
        "pool.write inf",
        lambda w: w.pool.write(0, w.slots, *[x * float("inf") for x in kv(w, 5)]),
        InvalidArgument,
        "inf",
    ),
    ("pool.read layer -1", lambda w: w.pool.read(-1, w.slots), InvalidArgument, "-1"),
    ("pool.read free page", lambda w: w.pool.read(0, free_slots(w)), InvalidHandle, "refcount 0"),
    ("pool.shrink keep -1", lambda w: w.pool.shrink(-1), InvalidArgument, "-1"),
    ("pool.segment unknown", lambda w: w.pool.segment(42), InvalidArgument, "42"),
    # --- PrefixCache --------------------------------------------------------------------
    ("PrefixCache of str", lambda w: PrefixCache("pool"), TypeError, "str"),
    ("PrefixCache second", lambda w: PrefixCache(w.pool), InvalidArgument, "already"),
    ("begin token 2^31", lambda w: w.cache.begin([0, BIG]), InvalidArgument, str(BIG)),
    ("begin token -1", lambda w: w.cache.begin([-1]), InvalidArgument, "-1"),
    ("begin floats", lambda w: w.cache.begin([0.5]), TypeError, "float"),
    ("begin namespace -2", lambda w: w.cache.begin([1], namespace=-2), InvalidArgument, "-2"),
    ("extend token 2^31", lambda w: w.cache.extend(w.req, [BIG]), InvalidArgument, str(BIG)),
    ("extend finished", lambda w: w.cache.extend(w.done_req, [1]), InvalidArgument, "finished"),
    ("extend non-request", lambda w: w.cache.extend("r", [1]), TypeError, "str"),
    ("finish finished", lambda w: w.cache.finish(w.done_req), InvalidArgument, "finished"),
    ("abort finished", lambda w: w.cache.abort(w.done_req), InvalidArgument, "finished"),
    (
        "page_table finished",
        lambda w: w.cache.page_table([w.req, w.done_req]),
        InvalidArgument,
        "finished",
    ),
    ("page_table non-request", lambda w: w.cache.page_table([1]), TypeError, "int"),
    ("slots out of range", lambda w: w.cache.slots(w.req, 0, 99), InvalidArgument, "99"),
    ("reset while running", lambda w: w.cache.reset(), InvalidArgument, "1 request"),
    # --- plan ---------------------------------------------------------------------------
    ("plan tp 0", lambda w: radixseg.plan(LLAMA_8B, tp=0), InvalidArgument, "0"),
    ("plan dtype", lambda w: radixseg.plan(LLAMA_8B, kv_dtype="fp4"), InvalidArgument, "fp4"),
    (
        "plan missing field",
        lambda w: radixseg.plan({"hidden_size": 4096}),
        InvalidArgument,
        "num_hidden_layers",
    ),
    # --- issue 16, item 11: inputs that used to be accepted silently ------------------
    (
        "Decimal tokens",
        lambda w: w.cache.begin([Decimal("1.7"), Decimal(2)]),
        TypeError,
        "Decimal Decimal('1.7') at index 0",
    ),
    ("Fraction tokens", lambda w: w.cache.begin([Fraction(7, 2)]), TypeError, "Fraction"),
    ("2-D prompt", lambda w: w.cache.begin([[1, 2], [3, 4]]), InvalidArgument, "(2, 2)"),
    (
        "2-D tensor extend",
        lambda w: w.cache.extend(w.req, torch.ones(2, 2, dtype=torch.int64)),
        InvalidArgument,
        "shape (2, 2)",
    ),
    ("2-D release", lambda w: w.pool.release([[int(w.held[0])]]), InvalidArgument, "(1, 1)"),
    ("alloc bool tensor", lambda w: w.pool.alloc(torch.tensor(True)), TypeError, "Tensor"),
    ("SegmentAllocator bool", lambda w: SegmentAllocator(True, 8), TypeError, "bool"),
    ("slots float start", lambda w: w.cache.slots(w.req, 0.5, 2), TypeError, "start"),
    ("budget_fraction str", lambda w: KVPool(1, 1, 8, budget_fraction="0.5"), TypeError, "str"),
    ("budget_fraction bool", lambda w: KVPool(1, 1, 8, budget_fraction=True), TypeError, "bool"),
    ("budget_fraction None", lambda w: KVPool(1, 1, 8, budget_fraction=None), TypeError, "None"),
    ("KVPool meta", lambda w: KVPool(1, 1, 8, device="meta"), InvalidArgument, "not meta"),
    ("KVPool bad device", lambda w: KVPool(1, 1, 8, device="xyz"), InvalidArgument, "'xyz'"),
    (
        "max_context_len str",
        lambda w: PrefixCache(KVPool(1, 1, 8), max_context_len="10"),
        TypeError,
        "max_context_len",
    ),
    # --- issue 16, item 12: ints past 64 bits name the argument -----------------------
    ("alloc 2^63", lambda w: w.pool.alloc(2**63), InvalidArgument, "n_pages=9223372036854775808"),
    ("evict 2^64", lambda w: w.cache.evict(2**64), InvalidArgument, "n_pages=18446744073709551616"),
    ("retire 2^64", lambda w: w.a.retire_segment(2**64), InvalidArgument, "segment=1844674407"),
    ("is_live 2^64", lambda w: w.a.is_live(2**64), InvalidArgument, "segment=1844674407"),
    ("SegmentAllocator 2^64", lambda w: SegmentAllocator(2**64, 8), InvalidArgument, "page_size"),
    (
        "finish node 2^63",
        lambda w: w.t.finish([1], [0], 0, 2**63, True, 0),
        InvalidHandle,
        "9223372036854775808",
    ),
]

LLAMA_8B = {
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
}


def kv(w: World, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.ones(n, 2, 4)
    return x, x


def free_slots(w: World) -> torch.Tensor:
    ids = w.pool.alloc(1)
    w.pool.release(ids)
    return ids.long() * 2 + torch.arange(2)


@pytest.mark.parametrize(("name", "call", "exc", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    name: str, call: Callable[[World], Any], exc: type[BaseException], needle: str
) -> None:
    w = make_world()
    before = w.snapshot()
    needle = needle.format(freed=w.freed, held3=int(w.held[3]))
    with pytest.raises(exc) as info:
        call(w)
    err = info.value
    assert isinstance(err, (RadixsegError, TypeError, ValueError)), type(err)
    assert needle in str(err), f"{name}: {needle!r} not in {str(err)!r}"
    if name == "unbalanced unlock":  # the first unlock was legitimate
        w.t.lock(w.node)
    w.check()
    assert w.snapshot() == before, name


def test_no_python_input_panics_the_core() -> None:
    """Random junk through every id-taking entry point: typed errors only."""
    w = make_world()
    rng = np.random.default_rng(0)
    entry_points: list[Callable[[Any], Any]] = [
        w.a.retain,
        w.a.release,
        w.a.refcount,
        lambda x: w.t.match_prefix(x),
        lambda x: w.t.insert(x, [0]),
        lambda x: w.t.acquire(x),
        lambda x: w.cache.begin(x),
        lambda x: w.pool.read(0, x),
    ]
    junk: list[Any] = [
        rng.integers(-(2**62), 2**62, 5),
        np.array([2**63 - 1]),
        np.array([-(2**63)]),
        np.array([], dtype=np.int64),
        np.array([1, 2], dtype=np.uint64) * (2**63),
        np.array([[1, 2], [3, 4]]),
        torch.tensor([2**62]),
        [True, False],
        [None],
        object(),
    ]
    for f in entry_points:
        for x in junk:
            try:
                f(x)
            except (RadixsegError, TypeError, ValueError):
                pass
            w.check()


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_copies_are_refused(how: str) -> None:
    """Issue 16, item 10: a copy of anything that owns pages would corrupt the original."""
    import copy
    import pickle

    w = make_world()
    before = w.snapshot()
    do = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": pickle.dumps}[how]
    for obj in (w.a, w.t, w.pool, w.cache, w.req):
        with pytest.raises(TypeError, match=f"a {type(obj).__name__} cannot be (copied|pickled)"):
            do(obj)
    w.check()
    assert w.snapshot() == before


def test_numpy_layer_is_accepted_everywhere() -> None:
    """Issue 16, item 12: ``write`` takes the numpy layer index that ``decode`` takes."""
    w = make_world()
    x = torch.full((w.slots.numel(), 2, 4), 3.0)
    w.pool.write(np.int64(1), w.slots, x, x)
    k, _ = w.pool.read(np.int32(1), w.slots)
    assert torch.equal(k, x)
