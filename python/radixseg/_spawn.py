"""Run one function on ``R`` spawned CPU processes joined in a gloo process group.

What ``radixseg demo --ranks R`` and ``benchmarks/bench_sharded.py`` share to
start the ranks of a :class:`radixseg.distributed.ShardedKVPool` on one
machine, the way the distributed tests do (issue 19): the ``spawn`` start
method (no forked torch state), ``init_process_group("gloo")`` through a
``file://`` store in a temporary folder (no ports to race for), one torch
thread per rank by default, a timeout on every collective, results and
tracebacks sent back over a queue, and every process joined before
:func:`run_ranks` returns or raises; survivors are terminated, then killed.

The function runs as ``fn(rank, ranks, send, *args)`` and must be importable
by the children (a module-level function); ``send(payload)`` delivers a
picklable ``payload`` to ``on_message(rank, payload)`` in the parent while
the ranks run (progress, samples). Its return value comes back in the list
:func:`run_ranks` returns, in rank order.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["RankFailed", "peak_rss_bytes", "run_ranks"]

Send = Callable[[Any], None]

# How long a rank that has exited gets for its last message to arrive, and how
# long a process gets to exit after terminate() before it is killed.
_GRACE_S = 5.0
# How long the other ranks get to report once one has failed.
_SETTLE_S = 2.0


def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` on Linux.

    Not ``getrusage().ru_maxrss``: Linux carries it across ``exec``, so a
    spawned rank would report its parent's peak at the time of the spawn
    when that was larger than its own.
    """
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class RankFailed(RuntimeError):
    """A rank raised, died, or the ranks ran past their deadline; every
    process has been joined (or killed and joined) when this is raised."""


class _Sender:
    """``send(payload)`` for rank ``rank`` (picklable: only the queue and the rank)."""

    def __init__(self, q: Any, rank: int) -> None:
        self._q = q
        self._rank = rank

    def __call__(self, payload: Any) -> None:
        self._q.put(("msg", self._rank, payload))


def _worker(
    fn: Callable[..., Any],
    rank: int,
    ranks: int,
    init_file: str,
    args: tuple[Any, ...],
    q: Any,
    collective_timeout_s: float,
    threads: int,
) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=ranks,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        try:
            result = fn(rank, ranks, _Sender(q, rank), *args)
        finally:
            dist.destroy_process_group()
        q.put(("done", rank, result))
    except BaseException:
        q.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1) from None


def run_ranks(
    fn: Callable[..., Any],
    ranks: int,
    *args: Any,
    timeout_s: float = 600.0,
    collective_timeout_s: float = 120.0,
    threads: int = 1,
    on_message: Callable[[int, Any], None] | None = None,
    pids: list[int] | None = None,
) -> list[Any]:
    """Run ``fn(rank, ranks, send, *args)`` on ``ranks`` spawned processes.

    Returns the ranks' return values in rank order once all have returned
    and every process has exited. Raises :class:`RankFailed` (with the
    failing ranks' tracebacks) when a rank raises or dies, or when the ranks
    are not done within ``timeout_s``; the other ranks are then terminated.
    ``collective_timeout_s`` bounds each gloo collective (a rank waiting for
    a peer that died gives up after it). ``pids``, when given, receives the
    children's process ids (to check afterwards that none is left).
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="radixseg-ranks-") as tmp:
        init_file = os.path.join(tmp, "gloo-store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, r, ranks, init_file, args, q, collective_timeout_s, threads),
                name=f"radixseg-rank-{r}",
                daemon=True,
            )
            for r in range(ranks)
        ]
        try:
            for p in procs:
                p.start()
                if pids is not None and p.pid is not None:
                    pids.append(p.pid)
            deadline = time.monotonic() + timeout_s
            exited_at: dict[int, float] = {}
            settle: float | None = None  # once a rank failed: how long the others may report
            while len(results) + len(errors) < ranks:
                now = time.monotonic()
                if errors and settle is None:
                    # The first error may be a peer's "connection closed": give the
                    # others a moment to report theirs (the cause), then stop.
                    settle = now + _SETTLE_S
                if settle is not None and now > settle:
                    break
                if now > deadline:
                    errors[-1] = f"the ranks did not finish within {timeout_s:g} s"
                    break
                try:
                    kind, rank, payload = q.get(timeout=0.1)
                except queue_mod.Empty:
                    # A rank that exited without a word (killed, crashed in C)
                    # gets a grace period for a message still in flight.
                    for r, p in enumerate(procs):
                        if r in results or r in errors or p.exitcode is None:
                            continue
                        since = exited_at.setdefault(r, now)
                        if now - since > _GRACE_S:
                            errors[r] = f"exited with code {p.exitcode} and no result"
                    continue
                if kind == "msg":
                    if on_message is not None:
                        on_message(rank, payload)
                elif kind == "done":
                    results[rank] = payload
                else:
                    errors[rank] = payload
            for p in procs:
                p.join(timeout=_GRACE_S if not errors else 0.5)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=_GRACE_S)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=_GRACE_S)
            q.close()
            q.join_thread()
    if errors:
        failed = [r for r in sorted(errors) if r >= 0]
        head = errors.get(-1) or f"rank(s) {failed} of {ranks} failed"
        detail = "".join(f"\n--- rank {r} ---\n{errors[r]}" for r in failed)
        raise RankFailed(f"{head}; every process was joined{detail}")
    return [results[r] for r in range(ranks)]
