"""Spawned gloo ranks for the context-parallel tests (tests/test_distributed.py).

Not a test module (no ``test_`` prefix): :class:`Ranks` starts ``R`` processes
with the ``spawn`` start method, joins them in a gloo group through a
``file://`` store in a temporary folder (no ports to race for), and keeps
them alive so that many scenarios share one spawn (each spawn costs seconds
of imports on a small machine). A scenario is a module-level function that
every rank calls with the same arguments; whatever it returns comes back in
rank order, and a rank's exception comes back as its traceback, which
:meth:`Ranks.run` raises as the test's failure.

Bounded whatever happens: every wait has a timeout (gloo's own is 60 s, so a
rank left alone in a collective errors out), a group that failed or timed out
is killed (its ranks may be out of step) and the next scenario starts a fresh
one, and :meth:`Ranks.close` joins every process with a timeout, kills
survivors and asserts the exit codes.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

#: Seconds gloo waits in one collective before raising (PyTorch's default is 30 minutes).
COLLECTIVE_TIMEOUT_S = 60
#: Seconds a scenario may take on every rank together.
SCENARIO_TIMEOUT_S = 120.0
#: Seconds ranks get to exit once told to, before they are killed.
JOIN_TIMEOUT_S = 120.0
#: Seconds the other ranks get to report once one rank has failed.
GRACE_S = 2.0


def _worker(rank: int, ranks: int, store: str, inbox: Any, outbox: Any) -> None:
    """One rank: join the group, then run ``(seq, fn, args)`` messages until ``None``."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=ranks,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
    except BaseException:
        outbox.put((rank, -1, False, traceback.format_exc()))
        raise
    try:
        while (msg := inbox.get()) is not None:
            seq, fn, args = msg
            try:
                result = fn(*args)
                pickle.dumps(result)  # here, not in the queue's feeder thread, where it is lost
                outbox.put((rank, seq, True, result))
            except BaseException:
                outbox.put((rank, seq, False, f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


class Ranks:
    """``ranks`` spawned processes in one gloo group, running scenarios on request."""

    def __init__(self, ranks: int, workdir: Path) -> None:
        if not 1 <= ranks <= 3:
            raise ValueError(f"at most 3 processes on a small CI machine, got {ranks}")
        self.ranks = ranks
        self._workdir = workdir
        self._procs: list[Any] = []
        self._seq = 0
        self._spawns = 0

    @property
    def alive(self) -> bool:
        return bool(self._procs)

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._spawns += 1
        store = self._workdir / f"gloo-store-{self.ranks}-{os.getpid()}-{self._spawns}"
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(self.ranks)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.ranks, str(store), self._inboxes[r], self._outbox),
                name=f"radixseg-rank{r}",
                daemon=True,
            )
            for r in range(self.ranks)
        ]
        for p in self._procs:
            p.start()

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float = SCENARIO_TIMEOUT_S
    ) -> list[Any]:
        """``fn(*args)`` on every rank (a module-level function, pickled by
        name); returns the results in rank order. A rank's exception is raised
        here as an ``AssertionError`` carrying its traceback; the group is then
        killed and the next call starts a new one."""
        if not self._procs:
            self._start()
        self._seq += 1
        for box in self._inboxes:
            box.put((self._seq, fn, args))
        results: dict[int, Any] = {}
        failures: list[str] = []
        deadline = time.monotonic() + timeout
        while len(results) + len(failures) < self.ranks:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, seq, ok, payload = self._outbox.get(timeout=min(1.0, deadline - now))
            except queue.Empty:
                dead = [p for p in self._procs if p.exitcode is not None]
                if dead and not failures:
                    failures.append(f"{dead[0].name} exited with code {dead[0].exitcode}")
                    deadline = min(deadline, time.monotonic() + GRACE_S)
                continue
            if seq not in (self._seq, -1):
                continue
            if ok:
                results[rank] = payload
            else:
                failures.append(payload)
                deadline = min(deadline, time.monotonic() + GRACE_S)
        if failures or len(results) < self.ranks:
            self.close(kill=True)
            if not failures:
                missing = sorted(set(range(self.ranks)) - set(results))
                failures.append(f"ranks {missing} did not finish {fn.__name__} in {timeout:.0f} s")
            raise AssertionError(
                f"{fn.__name__} failed on {self.ranks} ranks:\n" + "\n".join(failures)
            )
        return [results[r] for r in range(self.ranks)]

    def close(self, kill: bool = False) -> None:
        """Stop the ranks: join each with a timeout, kill survivors, and (unless
        ``kill``: a failed group) assert that every one exited with code 0."""
        if not self._procs:
            return
        procs, self._procs = self._procs, []
        if not kill:
            for box in self._inboxes:
                box.put(None)
        deadline = time.monotonic() + (0.0 if kill else JOIN_TIMEOUT_S)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        survivors = [p for p in procs if p.is_alive()]
        for p in survivors:
            p.kill()
            p.join(10.0)
        for box in [*self._inboxes, self._outbox]:
            if kill:
                box.cancel_join_thread()  # a killed rank never reads what is queued
            box.close()
            box.join_thread()
        if not kill:
            assert not survivors, (
                f"{[p.name for p in survivors]} did not exit within {JOIN_TIMEOUT_S} s"
            )
            codes = [p.exitcode for p in procs]
            assert codes == [0] * len(procs), f"rank exit codes {codes}"
