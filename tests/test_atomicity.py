"""Every public call is atomic (issue 16): threads, interrupts, forks and copies.

Each test pins down one interleaving that used to corrupt the cache. Where a
race needs a thread paused at a chosen line, a ``sys.settrace`` hook holds it
there (see :func:`pause_at`), so the interleaving is forced, not hoped for.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest
import torch

import radixseg
from radixseg import InvalidArgument, InvariantViolation, KVPool, PrefixCache, attention
from radixseg.cache import Request


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

    with pause_at("host_buffers", "self._host = host") as (reached, go):
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


# ----- a request ends exactly once, extend and abort never leak -------------------------


def _cache(page_size: int = 2, pps: int = 4) -> tuple[KVPool, PrefixCache]:
    pool = KVPool(1, 1, 8, page_size=page_size, pages_per_segment=pps, dtype="fp32")
    return pool, PrefixCache(pool)


def _run_pair(first: Any, second: Any) -> list[BaseException | None]:
    """Run two callables on two threads released together; their outcomes."""
    out: list[BaseException | None] = [None, None]
    start = threading.Barrier(2)

    def run(i: int, f: Any) -> None:
        start.wait()
        try:
            f()
        except BaseException as e:  # recorded for the test to judge
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    return out


def test_a_request_ends_exactly_once_across_threads() -> None:
    """Item 1: two threads ending one request (a running request shares its
    prefix): one succeeds, the other is told the request already ended."""
    _pool, cache = _cache()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for trial in range(150):
            shared = [7, 7, 7, 7, trial, trial + 1]
            first = cache.begin(shared)
            cache.extend(first, first.uncached)
            cache.finish(first)
            other = cache.begin(shared)  # holds the prefix's lock too
            req = cache.begin(shared)
            cache.extend(req, req.uncached)
            second = cache.finish if trial % 2 else cache.abort
            outcomes = _run_pair(partial(cache.finish, req), partial(second, req))
            assert sum(o is None for o in outcomes) == 1, outcomes
            (err,) = [o for o in outcomes if o is not None]
            assert isinstance(err, InvalidArgument) and "already" in str(err), err
            cache.check_invariants(exclusive=True)
            cache.abort(other)
    finally:
        sys.setswitchinterval(interval)
    cache.check_invariants(exclusive=True)


def test_abort_racing_extend_leaks_nothing() -> None:
    """Item 3: an engine thread aborts while the scheduler extends: whichever
    wins, every page is accounted for afterwards."""
    pool, cache = _cache(page_size=1, pps=8)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for trial in range(50):
            req = cache.begin([1, 2, 3, trial])
            outcomes = _run_pair(
                lambda r=req: [cache.extend(r, [5] * 9) for _ in range(6)],
                lambda r=req: cache.abort(r),
            )
            for o in outcomes:
                assert o is None or isinstance(o, InvalidArgument), o
            if req.state == "running":
                cache.abort(req)
            cache.check_invariants(exclusive=True)
    finally:
        sys.setswitchinterval(interval)
    cache.reset()
    pool.shrink(keep=0)
    assert pool.stats()["segments"] == 0


def test_the_invariant_check_sees_leaked_pages() -> None:
    """Item 3: pages nobody accounts for are reported (when the cache is the
    pool's only user)."""
    pool, cache = _cache()
    req = cache.begin([1, 2, 3])
    cache.extend(req, req.uncached)
    cache.check_invariants(exclusive=True)
    stray = pool.alloc(1)  # what an interrupted call used to leave behind
    cache.check_invariants()  # a caller may hold pages of its own ...
    with pytest.raises(InvariantViolation, match="account for"):
        cache.check_invariants(exclusive=True)  # ... unless the cache is the only user
    pool.release(stray)
    cache.abort(req)
    cache.check_invariants(exclusive=True)


def test_a_dropped_running_request_gives_its_pages_back() -> None:
    _pool, cache = _cache()
    done = cache.begin([1, 2, 3, 4, 5])
    cache.extend(done, done.uncached)
    cache.finish(done)
    req = cache.begin([1, 2, 3, 4, 9])
    cache.extend(req, req.uncached)
    assert cache.stats()["running_requests"] == 1 and cache.stats()["locked_pages"] == 2
    del req
    assert cache.stats()["running_requests"] == 0 and cache.stats()["locked_pages"] == 0
    cache.check_invariants(exclusive=True)


# ----- interrupts between any two lines --------------------------------------------------

_PACKAGE = str(Path(radixseg.__file__).resolve().parent)


class _Injector:
    """``sys.settrace`` hook raising ``KeyboardInterrupt`` at the ``at``-th line
    executed inside the radixseg package (``at=None``: count only)."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.lines = 0
        self.where: str | None = None

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        if not frame.f_code.co_filename.startswith(_PACKAGE):
            return None
        return self.local

    def local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines += 1
            if self.lines == self.at:
                self.where = self.label(frame)
                raise KeyboardInterrupt(self.where)
        return self.local

    def label(self, frame: FrameType) -> str:
        """Where an interrupt landed, as ``where`` records it."""
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def _lifecycle(pool: KVPool, cache: PrefixCache, seed: int, running: list[Request]) -> None:
    """What a serving loop does with one request: match, prefill, decode, finish."""
    prompt = [1, 2, 3, 4, 5, 6, seed % 3, seed % 5, 9]
    req = cache.begin(prompt)
    running.append(req)
    slots = cache.extend(req, req.uncached)
    kv = torch.full((slots.numel(), 1, 8), float(seed))
    pool.write(0, slots, kv, kv)
    for token in (seed % 7, 3, 4):
        slot = cache.extend(req, [token])
        pool.write(0, slot, kv[:1], kv[:1])
    cache.finish(req)


def _drain(pool: KVPool, cache: PrefixCache, running: list[Request]) -> None:
    for r in running:
        if r.state == "running":
            cache.abort(r)
    running.clear()
    cache.check_invariants(exclusive=True)


def test_keyboard_interrupt_at_every_line_of_the_lifecycle() -> None:
    """Items 5-7: a KeyboardInterrupt between any two lines of begin, extend
    (growth included), write and finish leaves nothing stuck: every running
    request can still be aborted, every page is accounted for, and the pool
    drains to zero segments."""
    pool = KVPool(1, 1, 8, page_size=2, pages_per_segment=2, dtype="fp32")
    cache = PrefixCache(pool)
    running: list[Request] = []
    counter = _Injector(None)
    sys.settrace(counter)
    try:
        _lifecycle(pool, cache, 0, running)
    finally:
        sys.settrace(None)
    _drain(pool, cache, running)
    assert counter.lines > 50
    interrupted = 0
    for at in range(1, counter.lines + 1):
        if at % 3 == 0:
            pool.shrink(keep=0)  # so that later lifecycles grow the pool again
        inject = _Injector(at)
        sys.settrace(inject)
        try:
            _lifecycle(pool, cache, at, running)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        try:
            _drain(pool, cache, running)
        except Exception as e:
            raise AssertionError(f"after an interrupt at {inject.where}: {e}") from e
    assert interrupted > 50
    cache.reset()
    pool.shrink(keep=0)
    s = pool.stats()
    assert (s["segments"], s["used_pages"], s["running_requests"]) == (0, 0, 0), s
    cache.check_invariants(exclusive=True)


def test_keyboard_interrupt_at_every_line_of_a_growth() -> None:
    """Issue 17, point 7: an ``alloc`` that grows the pool by three segments
    (reserve an id, install its tensors, open it; three times), interrupted at
    any line, grows by all three or changes nothing: no tensors under an id
    that is not live, no live segment without tensors, no id left reserved.
    The pool's cap is exactly three segments, so a leaked reservation or a
    segment left behind would also make the next growth fail."""
    pool = KVPool(1, 1, 8, page_size=1, pages_per_segment=2, dtype="fp32", max_segments=3)
    lines = None
    at = interrupted = 0
    while lines is None or at < lines:
        at += 1
        inject = _Injector(at)
        got = None
        sys.settrace(inject)
        try:
            got = pool.alloc(5)
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            sys.settrace(None)
        if inject.where is None:
            lines = inject.lines  # ran to the end: every line has been tried
        try:
            pool.check_invariants()
            assert pool.allocator.reserved_segments() == []
            s = pool.stats()
            if got is None and s["used_pages"] == 0:
                assert s["segments"] == 0, s  # changed nothing
            else:
                # Completed (an interrupt after the allocation only drops the
                # ids on their way back, as a caller dropping them would).
                assert (s["segments"], s["used_pages"]) == (3, 5), s
                assert got is None or sorted(got.tolist()) == [0, 1, 2, 3, 4]
                pool.release(range(5))
            pool.release(pool.alloc(6))  # the whole cap is still there
            pool.shrink(keep=0)
            assert pool.stats()["segments"] == 0
        except Exception as e:
            raise AssertionError(f"after an interrupt at {inject.where}: {e}") from e
    assert lines is not None and interrupted > 10, (lines, interrupted)


class _Alarm(Exception):
    """Raised by the SIGALRM handler: an exception that can land between any
    two bytecodes of the main thread."""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer (POSIX)")
# An alarm that lands in a finalizer (a weakref callback of an unrelated object
# being freed) is reported by Python as "ignored": that is Python's rule for
# exceptions in finalizers, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_signal_storm_leaves_nothing_stuck() -> None:
    """Item 7: a real SIGALRM at a random point of each lifecycle (bounded: 3 s
    or 4,000 lifecycles), its handler raising: afterwards every running
    request aborts, every page is accounted for and the pool drains to zero
    segments."""
    pool = KVPool(1, 1, 8, page_size=2, pages_per_segment=2, dtype="fp32")
    cache = PrefixCache(pool)
    running: list[Request] = []
    fired, window = [0], [False]

    def on_alarm(signum: int, frame: Any) -> None:
        fired[0] += 1
        if window[0]:  # only inside the serving work; disarmed until re-opened
            window[0] = False
            raise _Alarm

    previous = signal.signal(signal.SIGALRM, on_alarm)
    interrupted = completed = 0
    deadline = time.monotonic() + 3.0
    rng = random.Random(0)
    gc.collect()  # fewer unrelated finalizers for an alarm to land in
    try:
        for seed in range(4000):
            if time.monotonic() > deadline:
                break
            try:
                # One alarm at a random point of this lifecycle (or after it).
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(2e-5, 2e-3))
                window[0] = True
                _lifecycle(pool, cache, seed, running)
                if seed % 5 == 0:
                    pool.shrink(keep=0)
                window[0] = False
                completed += 1
            except _Alarm:
                interrupted += 1
    finally:
        window[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    print(f"signal storm: {interrupted} lifecycles interrupted, {completed} completed")
    assert interrupted > 20 and completed > 20, (interrupted, completed, fired[0])
    _drain(pool, cache, running)
    cache.reset()
    pool.shrink(keep=0)
    s = pool.stats()
    assert (s["segments"], s["used_pages"], s["running_requests"]) == (0, 0, 0), s
    cache.check_invariants(exclusive=True)


def test_numpy_api_is_loaded_at_import_not_at_first_use() -> None:
    """Item 8: an exception while the extension first reached numpy's C API
    made it panic (``PanicException: Failed to access NumPy array API
    capsule``, seen under the signal storm). The API is now loaded when
    ``radixseg._core`` is imported, so a later failure there cannot reach it."""
    code = """
import sys, types
import radixseg
from radixseg import SegmentAllocator

class Trap(types.ModuleType):
    def __getattr__(self, attr):
        raise KeyboardInterrupt("a signal while numpy's C API is looked up")

for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
    sys.modules[name] = Trap(name)
a = SegmentAllocator(1, 8)
a.add_segment()
print(a.alloc(3).tolist())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[0, 1, 2]"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_is_refused_instead_of_hanging() -> None:
    """Item 9: ``fork()`` while another thread is inside a long tree call left
    the child hanging on the tree's lock for good. Objects made before the
    fork now refuse use in the child with a typed error; new ones work."""
    pool = KVPool(1, 1, 8, page_size=1, pages_per_segment=1 << 16, dtype="fp32")
    cache = PrefixCache(pool)
    tokens = np.arange(1 << 20, dtype=np.int64) % 30_000
    pages = pool.alloc(1 << 20)
    busy = threading.Event()

    def long_tree_call() -> None:
        busy.set()
        for _ in range(4):
            cache.tree.insert(tokens, pages)  # holds the tree's mutex, GIL released

    worker = threading.Thread(target=long_tree_call)
    worker.start()
    assert busy.wait(10)
    time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            cache.begin([1, 2, 3])
        except InvalidArgument as e:
            code = 0 if "before os.fork()" in str(e) else 2
        except BaseException:
            code = 3
        try:
            for obj in (pool.stats, lambda: pool.alloc(1 << 17), cache.tree.evictable_pages):
                try:
                    obj()
                    code = code or 5
                except InvalidArgument:
                    pass
            fresh = PrefixCache(KVPool(1, 1, 8, page_size=1, pages_per_segment=8, dtype="fp32"))
            r = fresh.begin([1, 2])
            fresh.extend(r, [1, 2])
            fresh.finish(r)
            fresh.check_invariants(exclusive=True)
        except BaseException:
            code = code or 4
        os._exit(code)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on a lock held by a parent thread")
        assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
    finally:
        worker.join(60)
    assert not worker.is_alive()
    pool.release(pages)
    cache.check_invariants()


def test_finish_with_tokens_is_all_or_nothing_under_interrupts() -> None:
    """``finish(req, tokens=...)`` replaces the placeholder tokens and ends the
    request in one core call: interrupted at any line, the request is either
    finished with the new tokens or still running with the old ones."""
    _pool, cache = _cache(page_size=2, pps=4)
    lines = None
    at = 0
    while lines is None or at < lines:
        at += 1
        req = cache.begin([1, 2, 3, 4])
        cache.extend(req, [1, 2, 3, 4, 0, 0])  # two placeholders
        inject = _Injector(at)
        sys.settrace(inject)
        try:
            cache.finish(req, tokens=[1, 2, 3, 4, 7, 8])
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if inject.where is None:
            lines = inject.lines  # ran to the end: every line has been tried
        if req.state == "running":
            assert req.tokens.tolist() == [1, 2, 3, 4, 0, 0], inject.where
            cache.abort(req)
        else:
            assert req.state == "finished", inject.where
            assert req.tokens.tolist() == [1, 2, 3, 4, 7, 8], inject.where
        cache.check_invariants(exclusive=True)
    assert lines is not None and lines > 5


def _decode_step(cache: PrefixCache, reqs: list[Request], buf: torch.Tensor) -> None:
    """One decode step of a batch: a token each, then the page table."""
    cache.extend_each(reqs, [5] * len(reqs))
    cache.page_table(reqs, out=buf)


def test_keyboard_interrupt_at_every_line_of_a_decode_step() -> None:
    """A KeyboardInterrupt between any two lines of extend_each (pool growth,
    eviction by the pool, then eviction inside the core call once the budget
    is spent) and page_table leaves the batch all stepped or not stepped at
    all, and every page accounted for."""
    probe = KVPool(1, 1, 8, page_size=1, pages_per_segment=4, dtype="fp32")
    budget = 4 * probe.segment_bytes
    pool = KVPool(1, 1, 8, page_size=1, pages_per_segment=4, dtype="fp32", budget_bytes=budget)
    cache = PrefixCache(pool)
    buf = torch.zeros(32, dtype=torch.int32)
    steps = 6  # 10 of 12 pages used; then growth, pool eviction, core eviction

    def setup() -> list[Request]:
        pool.shrink(keep=0)
        for t in (8, 9):  # two evictable cached prompts
            cached = cache.begin([t] * 3, leave_last=False)
            cache.extend(cached, cached.uncached)
            cache.finish(cached)
        reqs = [cache.begin([i], leave_last=False) for i in range(2)]
        for r in reqs:
            cache.extend(r, [1, 2])
        return reqs

    reqs = setup()
    counter = _Injector(None)
    sys.settrace(counter)
    try:
        for _ in range(steps):
            _decode_step(cache, reqs, buf)
    finally:
        sys.settrace(None)
    assert pool.stats()["evicted_pages"] == 6 and pool.stats()["segments"] == 4
    # The pool evicted the first prompt; the second went inside the core call.
    assert pool._eviction_point() == 4 and pool._counters["evicted_pages"] == 3
    _drain(pool, cache, list(reqs))
    cache.reset()
    assert counter.lines > 20
    for at in range(1, counter.lines + 1):
        reqs = setup()
        inject = _Injector(at)
        before = [r.seq_len for r in reqs]
        sys.settrace(inject)
        try:
            for _ in range(steps):
                before = [r.seq_len for r in reqs]
                _decode_step(cache, reqs, buf)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        after = [r.seq_len for r in reqs]
        stepped = [b + 1 for b in before]
        assert after in (before, stepped), (inject.where, before, after)
        try:
            _drain(pool, cache, list(reqs))
        except Exception as e:
            raise AssertionError(f"after an interrupt at {inject.where}: {e}") from e
        cache.reset()
    pool.shrink(keep=0)
    assert pool.stats()["segments"] == 0


def test_a_decode_step_racing_an_abort_is_all_or_nothing() -> None:
    """One thread steps a batch while another aborts one of its requests:
    either the step saw the request running (every request stepped) or it is
    refused and no request changed."""
    pool, cache = _cache(page_size=1, pps=8)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for trial in range(60):
            reqs = [cache.begin([trial, i], leave_last=False) for i in range(3)]
            for r in reqs:
                cache.extend(r, r.uncached)
            outcomes = _run_pair(
                partial(cache.extend_each, reqs, [1, 2, 3]),
                partial(cache.abort, reqs[1]),
            )
            assert outcomes[1] is None, outcomes
            step = outcomes[0]
            lens = [r.seq_len for i, r in enumerate(reqs) if i != 1]
            if step is None:
                assert lens == [3, 3], lens
            else:
                assert isinstance(step, InvalidArgument) and "already" in str(step), step
                assert lens == [2, 2], lens
            for i in (0, 2):
                cache.abort(reqs[i])
            cache.check_invariants(exclusive=True)
    finally:
        sys.setswitchinterval(interval)
    cache.reset()
    pool.shrink(keep=0)
    assert pool.stats()["segments"] == 0
