"""Every public call is atomic (issue 16): threads, interrupts, forks and copies.

Each test pins down one interleaving that used to corrupt the cache. Where a
race needs a thread paused at a chosen line, a ``sys.settrace`` hook holds it
there (see :func:`pause_at`), so the interleaving is forced, not hoped for.
"""

from __future__ import annotations

import sys
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


def test_stats_is_one_snapshot_while_another_thread_grows() -> None:
    """Item 14: ``stats()`` paused between its reads while another thread grows
    the pool still reports one consistent snapshot."""
    pool = KVPool(1, 1, 8, page_size=1, pages_per_segment=4, dtype="fp32")
    pool.release(pool.alloc(1))
    got: list[dict[str, Any]] = []
    with pause_at("stats", "free = self.allocator.free_pages()") as (reached, go):
        reader = threading.Thread(target=lambda: got.append(pool.stats()))
        reader.start()
        assert reached.wait(10)
        grower = threading.Thread(target=pool.alloc, args=(12,))  # two more segments
        grower.start()
        grower.join(0.5)
        go.set()
        reader.join(10)
        grower.join(10)
    assert not reader.is_alive() and not grower.is_alive()
    (s,) = got
    assert s["total_pages"] == s["segments"] * s["pages_per_segment"], s
    assert 0 <= s["used_pages"] <= s["total_pages"], s
    assert s["reserved_bytes"] == s["segments"] * s["segment_bytes"], s


def test_stats_stays_consistent_under_churn() -> None:
    """The same under real thread switching (bounded: 2,000 snapshots)."""
    pool = KVPool(1, 1, 8, page_size=1, pages_per_segment=4, dtype="fp32")
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            ids = pool.alloc(12)  # three segments
            pool.release(ids)
            pool.shrink(keep=0)

    worker = threading.Thread(target=churn)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    worker.start()
    bad: list[dict[str, Any]] = []
    try:
        for _ in range(2000):
            s = pool.stats()
            if (
                s["total_pages"] != s["segments"] * s["pages_per_segment"]
                or not 0 <= s["used_pages"] <= s["total_pages"]
                or s["reserved_bytes"] != s["segments"] * s["segment_bytes"]
            ):
                bad.append(s)
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        worker.join(10)
    assert not worker.is_alive()
    assert not bad, f"{len(bad)} inconsistent snapshots, first: {bad[0]}"
