"""What every ``bench_*.py`` here shares: timing, tables, versions and JSON.

A timed region pauses the garbage collector (after a collection) so that no
run pays for another's garbage; repeated runs keep the best, since noise on a
shared machine only ever adds time. Tables are right-aligned columns joined
by two spaces. ``versions()`` is the environment a figure was measured in, as
recorded beside it in ``--json`` output.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


# ----- timing --------------------------------------------------------------------------


@dataclass
class Stopwatch:
    """Seconds of the ``with stopwatch()`` block, set when it ends."""

    seconds: float = 0.0


@contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    """Time a block with the garbage collector collected before and paused inside."""
    sw = Stopwatch()
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        yield sw
        sw.seconds = time.perf_counter() - t0
    finally:
        gc.enable()


def best_of(
    repeat: int,
    run: Callable[[], T],
    key: Callable[[T], Any] | None = None,
    same: Callable[[T], Hashable] | None = None,
) -> T:
    """The best (smallest, or smallest ``key``) of ``repeat`` fresh runs, at least one.

    ``same``, where given, names what every run must agree on (a
    deterministic trace gives the same counts however fast it ran).
    """
    results = [run() for _ in range(max(repeat, 1))]
    if same is not None:
        assert len({same(r) for r in results}) == 1, "runs of one trace disagree"
    return min(results, key=key)


def best_interleaved(
    cases: dict[str, Callable[[], Any]], rounds: int, before: Callable[[], Any] | None = None
) -> dict[str, float]:
    """Best seconds per case over ``rounds`` rounds, each round running every case.

    Interleaving spreads a change in the machine's state (frequency, other
    tenants) over all cases alike; ``before`` runs untimed before each call.
    """
    best = {name: float("inf") for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


# ----- tables --------------------------------------------------------------------------


def fmt_row(cols: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Headers, a rule and rows, each column as wide as its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(fmt_row(headers, widths))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt_row(r, widths))


# ----- environment and output ------------------------------------------------------------


def package_version(name: str) -> str | None:
    """The installed distribution's version, None where it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    return platform.processor() or platform.machine()


def versions(*packages: str) -> dict[str, Any]:
    """Python, torch, each of ``packages`` (None if absent), the CPU and thread counts."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: package_version(name) for name in packages},
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (parent folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
