"""Every public call is atomic (issue 16): threads, interrupts, forks and copies.

Each test pins down one interleaving that used to corrupt the cache. Where a
race needs a thread paused at a chosen line, a ``sys.settrace`` hook holds it
there (see :func:`pause_at`), so the interleaving is forced, not hoped for.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch

from radixseg import KVPool, attention


@contextmanager
def pause_at(function: str, line_text: str) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Trace hook for threads started inside the block: a thread reaching the
    line of ``function`` whose source contains ``line_text`` sets ``reached`` and
    waits for ``go`` (once). Yields ``(reached, go)``."""
    import linecache

    reached, go = threading.Event(), threading.Event()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and not reached.is_set():
            text = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
            if line_text in text:
                reached.set()
                go.wait(10)
        return local

    def hook(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_name == function else None

    threading.settrace(hook)
    try:
        yield reached, go
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
        go.set()


def _decode_one(pool: KVPool, page: int) -> torch.Tensor:
    q = torch.ones(1, 1, pool.head_dim)
    indptr = torch.tensor([0, 1], dtype=torch.int32)
    indices = torch.tensor([page], dtype=torch.int32)
    last = torch.tensor([1], dtype=torch.int32)
    return attention.decode(q, pool, 0, indptr, indices, last, backend="cpu")


def test_cpu_decode_never_publishes_the_buffers_of_a_retired_segment() -> None:
    """Item 2: a decode building its segment list while another thread retires a
    segment and re-adds it under the same id must not leave the old buffer in use."""
    pool = KVPool(1, 1, 16, page_size=1, pages_per_segment=1, dtype="fp32")
    held = pool.alloc(1)  # segment 0: the page the racing decode reads
    pool.write(0, held.long(), torch.ones(1, 1, 16), torch.ones(1, 1, 16))
    old = pool.alloc(1)  # segment 1, about to be retired and re-added
    pool.write(0, old.long(), torch.full((1, 1, 16), 111.0), torch.full((1, 1, 16), 111.0))
    pool.release(old)
    assert pool._host is None  # the growth above cleared the host list

    fresh: list[torch.Tensor] = []

    def retire_and_regrow() -> None:
        pool.shrink(keep=0)  # segment 1 is empty: retired
        page = pool.alloc(1)  # grows again: segment id 1, a new buffer
        assert int(page[0]) == int(old[0])
        value = torch.full((1, 1, 16), 222.0)
        pool.write(0, page.long(), value, value)
        fresh.append(page)

    with pause_at("_host_buffers", "self._host = host") as (reached, go):
        racer = threading.Thread(target=_decode_one, args=(pool, int(held[0])))
        racer.start()
        assert reached.wait(10), "the decode never built its segment list"
        other = threading.Thread(target=retire_and_regrow)
        other.start()
        other.join(0.5)  # the fixed pool makes it wait for the decode's lock
        go.set()
        racer.join(10)
        other.join(10)
    assert not racer.is_alive() and not other.is_alive()
    (page,) = fresh
    k, _ = pool.read(0, page.long())
    assert float(k[0, 0, 0]) == 222.0
    out = _decode_one(pool, int(page[0]))
    assert float(out[0, 0, 0]) == 222.0, "decode read the retired segment's buffer"
    pool.check_invariants()
