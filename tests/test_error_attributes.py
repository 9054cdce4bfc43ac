"""Every attribute an exception carries is declared in ``_core.pyi``.

``mypy.stubtest`` cannot see attributes set on instances, so this provokes
each error the binding maps (one match over ``CoreError`` in
``rust/radixseg-py/src/errors.rs``) and ``KVPool``'s budget and device
errors (classes of the binding too), and checks
the attributes set on the raised instance against the stub's declarations
for its class and its bases.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np
import pytest

import radixseg
from radixseg import _core

STUB = pathlib.Path(radixseg.__file__).with_name("_core.pyi")


def declared(cls: type) -> set[str]:
    """Annotated attributes of ``cls`` and its bases in the stub."""
    classes = {
        node.name: {
            s.target.id
            for s in node.body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        }
        for node in ast.parse(STUB.read_text()).body
        if isinstance(node, ast.ClassDef)
    }
    return set().union(*(classes.get(c.__name__, set()) for c in cls.__mro__))


def ids(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


def allocator(segments: int = 1, **kw: int) -> _core.SegmentAllocator:
    a = _core.SegmentAllocator(4, 8, **kw)
    for _ in range(segments):
        a.add_segment()
    return a


def out_of_pages() -> None:
    allocator().alloc(100)


def id_space_full() -> None:
    allocator(max_segments=1).add_segment()


def page_out_of_range() -> None:
    allocator().release(ids(10**6))


def page_of_a_retired_segment() -> None:
    a = allocator(2)
    a.retire_segment(1)
    a.release(ids(9))


def free_page() -> None:
    allocator().retain(ids(0))


def double_free() -> None:
    a = allocator()
    p = a.alloc(1)
    a.release(p)
    a.release(p)


def busy_segment() -> None:
    a = allocator()
    a.alloc(1)
    a.retire_segment(0)


def dead_segment() -> None:
    allocator().retire_segment(99)


def not_reserved() -> None:
    a = allocator()
    a.cancel_segment(a.reserve_segment())
    a.open_segment(1)


def bad_token() -> None:
    a = allocator()
    _core.RadixTree(a).insert(ids(0, 1, 2, 2**31), a.alloc(1))


def bad_node() -> None:
    _core.RadixTree(allocator()).lock(10**9)


def unbalanced_unlock() -> None:
    a = allocator()
    t = _core.RadixTree(a)
    t.insert(ids(0, 1, 2, 3), a.alloc(1))
    _, _, node = t.match_prefix(ids(0, 1, 2, 3))
    t.unlock(node)


def pool(**kw: Any) -> radixseg.KVPool:
    return radixseg.KVPool(
        num_layers=1, num_kv_heads=1, head_dim=8, page_size=4, pages_per_segment=8, **kw
    )


def budget() -> None:
    p = pool(budget_bytes=pool().segment_bytes)
    p.alloc(8)
    p.alloc(1)


def device_out_of_memory() -> None:
    def refuse(nbytes: int, device: object) -> NoReturn:
        raise RuntimeError("CUDA out of memory (simulated)")

    pool(tensor_factory=refuse).alloc(1)


CASES: list[tuple[Callable[[], None], type[Exception], set[str]]] = [
    (out_of_pages, radixseg.OutOfPages, {"requested", "available", "total", "segments"}),
    (id_space_full, radixseg.OutOfPages, {"segments", "limit"}),
    (page_out_of_range, radixseg.InvalidHandle, {"page_id"}),
    (page_of_a_retired_segment, radixseg.InvalidHandle, {"page_id", "segment"}),
    (free_page, radixseg.InvalidHandle, {"page_id"}),
    (double_free, radixseg.DoubleFree, {"page_id"}),
    (busy_segment, radixseg.SegmentBusy, {"segment", "used_pages"}),
    (dead_segment, radixseg.InvalidArgument, {"segment"}),
    (not_reserved, radixseg.InvalidArgument, {"segment"}),
    (bad_token, radixseg.InvalidArgument, {"index", "value"}),
    (bad_node, radixseg.InvalidHandle, {"node"}),
    (unbalanced_unlock, radixseg.InvalidArgument, {"node"}),
    (
        budget,
        radixseg.BudgetExhausted,
        {"requested", "available", "reserved_bytes", "budget_bytes"},
    ),
    (
        device_out_of_memory,
        radixseg.DeviceOutOfMemory,
        {"requested", "available", "reserved_bytes", "budget_bytes"},
    ),
]


@pytest.mark.parametrize(("provoke", "cls", "attrs"), CASES, ids=[c[0].__name__ for c in CASES])
def test_raised_attributes_are_declared_in_the_stub(
    provoke: Callable[[], None], cls: type[Exception], attrs: set[str]
) -> None:
    with pytest.raises(cls) as e:
        provoke()
    got = set(vars(e.value))
    assert got == attrs
    undeclared = got - declared(type(e.value))
    assert not undeclared, f"{type(e.value).__name__} sets {undeclared}, not declared in _core.pyi"
