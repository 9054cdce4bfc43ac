"""Every GroupedPrefixCache call, interrupted at any line, leaves nothing half-done.

``KeyboardInterrupt`` is raised at the n-th line the radixseg package executes
(once per run, for every n until a run completes), in a scenario that matches,
prefills, decodes past the window, finishes, reuses the cached end, truncates
and aborts, under a budget small enough that growth evicts and reclaims. After
each interrupt the requests the scenario holds are aborted (one it never got
back aborts itself when dropped) and the accounting must be exact: every page
of every group is held by exactly the tree, the windowed tables and running
requests that name it (``check_invariants(exclusive=True)``), nothing leaks,
and the cache serves the whole scenario again.
"""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from radixseg.capacity.groups import LayerGroup
from radixseg.grouped import GroupedKVPool, GroupedPrefixCache, GroupedRequest
from test_atomicity import _Injector

PS = 2


def _cache(budget: int | None) -> GroupedPrefixCache:
    groups = [
        LayerGroup("full", None, (1,)),
        LayerGroup("sliding", 3, (0,)),
        LayerGroup("chunked", 4, (2,)),
    ]
    pool = GroupedKVPool(
        groups, 1, 4, page_size=PS, dtype="fp32", pages_per_segment=4, budget_bytes=budget
    )
    return GroupedPrefixCache(pool)


def _scenario(cache: GroupedPrefixCache, held: list[GroupedRequest]) -> None:
    pool = cache.pool
    # Cached and never reused: what growth under a budget evicts.
    z = cache.begin([90 + i for i in range(13)])
    held.append(z)
    cache.extend(z, z.uncached)
    cache.finish(z)
    prompt = list(range(1, 12))
    a = cache.begin(prompt)
    held.append(a)
    slots = cache.extend(a, a.uncached)
    for layer in range(3):
        g, _ = pool.locate(layer)
        x = torch.ones(slots[g].numel(), 1, 4)
        pool.write(layer, slots, x, x)
    for t in range(5):
        cache.extend_each([a], [20 + t])
    cache.finish(a)
    b = cache.begin([*prompt, 20, 21, 22, 23, 24, 30, 31])
    held.append(b)
    cache.extend(b, b.uncached)
    c = cache.begin([5, 6, 7, 8, 9, 10])
    held.append(c)
    cache.extend(c, c.uncached)
    cache.extend_each([b, c], [40, 41])
    cache.truncate(b, b.seq_len - 1)
    cache.abort(c)
    cache.finish(b)


def _drop(cache: GroupedPrefixCache, held: list[GroupedRequest]) -> None:
    for r in held:
        if r.state == "running":
            cache.abort(r)
    held.clear()
    gc.collect()  # a request begun but never returned aborts itself


def _interrupt_everywhere(budget: int | None, stride: int) -> None:
    lines = None
    at = 0
    interrupted = 0
    while lines is None or at < lines:
        at += stride
        cache = _cache(budget)
        held: list[GroupedRequest] = []
        inject = _Injector(at)
        sys.settrace(inject)
        try:
            _scenario(cache, held)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        if inject.where is None:
            lines = inject.lines
        try:
            _drop(cache, held)
            cache.check_invariants(exclusive=True)
            assert cache.full.tree.running_requests() == 0
            cache.reset()
            cache.check_invariants(exclusive=True)
            for p in cache.pool.pools:
                assert p.stats()["used_pages"] == 0, p.stats()
            if (at // stride) % 4 == 0:
                _scenario(cache, held)  # everything still works
                _drop(cache, held)
                cache.check_invariants(exclusive=True)
        except Exception as e:
            raise AssertionError(f"after an interrupt at {inject.where}: {e!r}") from e
    assert lines is not None and interrupted >= lines // stride - 1, (lines, interrupted)


def _budget() -> int:
    # Room for 7 segments in all: the scenario's growth evicts the cached
    # prefix it never reuses (6 pages).
    return 7 * max(p.segment_bytes for p in _cache(None).pool.pools)


@pytest.mark.parametrize("budget", [False, True], ids=["unbounded", "budget"])
def test_interrupt_at_every_53rd_line(budget: bool) -> None:
    """Every 53rd line (the default run, ~90 interrupts each)."""
    _interrupt_everywhere(_budget() if budget else None, 53)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [False, True], ids=["unbounded", "budget"])
def test_interrupt_at_every_line(budget: bool) -> None:
    _interrupt_everywhere(_budget() if budget else None, 1)
