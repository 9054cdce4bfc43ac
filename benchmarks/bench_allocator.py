"""Allocator throughput: radixseg's SegmentAllocator beside SGLang's KV allocators.

Three measurements, each printed as a table and written to ``--json``:

1. **Trace** (the issue's workload). A seeded trace of 100,000 ``alloc(k)``
   with ``k`` uniform in 1..512 tokens (rounded up to whole pages when paged);
   once 64 allocations are live, each alloc is followed by freeing a random
   live one. Pools of 65,536 and 1,048,576 tokens at page_size 1 and 16. SGLang
   gets ``TokenToKVPoolAllocator`` (page_size 1) or
   ``PagedTokenToKVPoolAllocator`` on CPU; radixseg gets a
   ``SegmentAllocator`` holding the same number of pages. An op is one alloc
   or one free call; ops/s = trace length / driving time.
2. **Python micro**: ``alloc(b)`` + ``release`` of 1 page and of 512-page
   batches, 1 and 2 threads (radixseg releases the GIL for batches).
3. **Rust micro**: the same loop in Rust, through the example binary
   ``rust/radixseg-core/examples/alloc_throughput.rs``.

Traces are generated before timing; timed regions hold only the driving
loop, with the garbage collector paused. torch runs one intra-op thread by
default (``--torch-threads``), which is SGLang's fastest setting for these
small CPU tensor ops. radixseg's trace pools use segments of
``--pages-per-segment`` (1024) pages. Run::

    python benchmarks/bench_allocator.py                 # full run, about 2 minutes
    python benchmarks/bench_allocator.py --quick         # smoke run
    python benchmarks/bench_allocator.py --skip-sglang --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import best_of, print_table, stopwatch, versions, write_json

REPO = Path(__file__).resolve().parent.parent

ALLOC = 0
FREE = 1
TRACE_OPS = 100_000
LIVE_CAP = 64
MAX_TOKENS = 512
POOLS = (65_536, 1_048_576)
PAGE_SIZES = (1, 16)
RUST_TARGET_1P = 20e6  # ops/s, single-page alloc+release on one core


# ----- trace ---------------------------------------------------------------------


def make_trace(n_allocs: int, seed: int) -> list[tuple[int, int]]:
    """``(ALLOC, tokens)`` / ``(FREE, index into the live list)`` ops.

    A free removes ``live[index]`` by swapping the last live entry into its
    place, so the driver's live list stays in step with the trace.
    """
    rng = random.Random(seed)
    trace: list[tuple[int, int]] = []
    live = 0
    for _ in range(n_allocs):
        trace.append((ALLOC, rng.randint(1, MAX_TOKENS)))
        live += 1
        if live > LIVE_CAP:
            trace.append((FREE, rng.randrange(live)))
            live -= 1
    return trace


def in_units(
    trace: Sequence[tuple[int, int]], page_size: int, *, pages: bool
) -> list[tuple[int, int]]:
    """The trace with alloc sizes rounded up to whole pages, as pages or as tokens."""
    out = []
    for op, arg in trace:
        if op == ALLOC:
            n = -(-arg // page_size)
            out.append((op, n if pages else n * page_size))
        else:
            out.append((op, arg))
    return out


def drive(
    alloc: Callable[[int], Any], free: Callable[[Any], None], trace: Sequence[tuple[int, int]]
) -> tuple[float, list[Any]]:
    """Run ``trace``; returns (seconds, allocations still live)."""
    live: list[Any] = []
    push = live.append
    pop = live.pop
    with stopwatch() as sw:
        for op, arg in trace:
            if op == ALLOC:
                push(alloc(arg))
            else:
                x = live[arg]
                live[arg] = live[-1]
                pop()
                free(x)
    return sw.seconds, live


@dataclass
class TraceRow:
    pool_tokens: int
    page_size: int
    ops: int
    sglang_ops_s: float | None = None
    radixseg_ops_s: float | None = None
    ratio: float | None = None
    radixseg_pages_per_segment: int = 0
    radixseg_segments: int = 0


def sglang_trace(pool: int, page_size: int, trace: Sequence[tuple[int, int]], repeat: int) -> float:
    import _sglang

    tok = in_units(trace, page_size, pages=False)

    def once() -> float:
        a = _sglang.allocator(pool, page_size)
        full = a.available_size()

        # Driven through its own bound methods, no wrapper: the trace never
        # holds more than 65 x 512 tokens, so alloc cannot return None (a None
        # would fail in free() or in the count check below).
        dt, live = drive(a.alloc, a.free, tok)
        for x in live:
            a.free(x)
        if a.available_size() != full:
            raise RuntimeError(f"SGLang: {a.available_size()} of {full} slots free after the trace")
        return dt

    return len(tok) / best_of(repeat, once)


def radixseg_allocator(pool: int, page_size: int, pages_per_segment: int) -> tuple[Any, int, int]:
    from radixseg import SegmentAllocator

    pages = pool // page_size
    pps = min(pages_per_segment, pages)
    a = SegmentAllocator(page_size=page_size, pages_per_segment=pps)
    segments = -(-pages // pps)
    for _ in range(segments):
        a.add_segment()
    return a, pps, segments


def radixseg_trace(
    pool: int, page_size: int, trace: Sequence[tuple[int, int]], repeat: int, pages_per_segment: int
) -> tuple[float, int, int]:
    pg = in_units(trace, page_size, pages=True)

    def once() -> tuple[float, int, int]:
        a, pps, segments = radixseg_allocator(pool, page_size, pages_per_segment)
        full = a.free_pages()
        dt, live = drive(a.alloc, a.release, pg)
        for x in live:
            a.release(x)
        a.check_invariants()
        if a.free_pages() != full:
            raise RuntimeError(f"radixseg: {a.free_pages()} of {full} pages free after the trace")
        return dt, pps, segments

    best, pps, segments = best_of(repeat, once, key=lambda r: r[0])
    return len(pg) / best, pps, segments


# ----- Python micro ----------------------------------------------------------------


@dataclass
class MicroRow:
    impl: str
    threads: int
    batch_pages: int
    iterations: int
    ops_s: float
    pages_s: float
    note: str = ""


def _threaded(threads: int, body: Callable[[], None]) -> float:
    """Run ``body`` on ``threads`` threads started together; returns wall seconds."""
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start.wait()
            body()
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    with stopwatch() as sw:
        start.wait()
        for t in ts:
            t.join()
    if errors:
        raise errors[0]
    return sw.seconds


def radixseg_micro(threads: int, batch: int, iterations: int, repeat: int) -> MicroRow:
    from radixseg import SegmentAllocator

    pps = 1024

    def once() -> float:
        a = SegmentAllocator(page_size=16, pages_per_segment=pps)
        for _ in range(max(1, -(-4 * threads * batch // pps))):
            a.add_segment()
        full = a.free_pages()
        a.release(a.alloc(batch))  # warm-up

        def body(a: Any = a) -> None:
            alloc, release = a.alloc, a.release
            for _ in range(iterations):
                release(alloc(batch))

        dt = _threaded(threads, body)
        if a.free_pages() != full:
            raise RuntimeError("radixseg micro: pages leaked")
        return dt

    ops = threads * iterations / best_of(repeat, once)
    return MicroRow("radixseg (Python)", threads, batch, iterations, ops, ops * batch)


def sglang_micro(batch: int, iterations: int, repeat: int, pool: int) -> MicroRow:
    import _sglang

    page_size = 16

    def once() -> float:
        a = _sglang.paged_allocator(pool, page_size)
        need = batch * page_size

        def body(a: Any = a, need: int = need) -> None:
            alloc, free = a.alloc, a.free
            for _ in range(iterations):
                free(alloc(need))

        return _threaded(1, body)

    ops = iterations / best_of(repeat, once)
    return MicroRow(
        "SGLang paged (Python)",
        1,
        batch,
        iterations,
        ops,
        ops * batch,
        note=f"{pool:,}-token pool, page 16; not thread-safe",
    )


# ----- Rust micro --------------------------------------------------------------------


def build_rust_example() -> Path:
    """Build the example with cargo and return its executable's path."""
    cmd = [
        "cargo",
        "build",
        "--release",
        "-p",
        "radixseg-core",
        "--example",
        "alloc_throughput",
        "--message-format=json",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    exe = None
    for line in res.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == (
            "alloc_throughput"
        ):
            exe = msg.get("executable")
    if not exe:
        raise RuntimeError("cargo built no alloc_throughput executable")
    return Path(exe)


def rust_micro(exe: Path, threads: int, batch: int, iterations: int, repeat: int) -> MicroRow:
    def once() -> dict[str, Any]:
        res = subprocess.run(
            [str(exe), str(threads), str(batch), str(iterations)],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"{exe.name} {threads} {batch} {iterations}: {res.stderr}")
        out: dict[str, Any] = json.loads(res.stdout)
        return out

    best = best_of(repeat, once, key=lambda out: -out["ops_per_s"])
    return MicroRow(
        "radixseg (Rust)", threads, batch, iterations, best["ops_per_s"], best["pages_per_s"]
    )


# ----- report --------------------------------------------------------------------------


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    trace: list[TraceRow] = field(default_factory=list)
    micro: list[MicroRow] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3,000-alloc trace, short loops")
    p.add_argument("--skip-sglang", action="store_true", help="run without sglang installed")
    p.add_argument("--skip-rust", action="store_true", help="skip the cargo-built Rust micro")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allocs", type=int, help=f"allocs in the trace (default {TRACE_OPS:,})")
    p.add_argument("--repeat", type=int, default=1, help="trace runs per cell; best is kept")
    p.add_argument(
        "--pages-per-segment",
        type=int,
        default=1024,
        help="radixseg segment size for the trace pools (default 1024)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: SGLang's small CPU tensor ops run fastest "
        "without waking a thread pool; this reproduces the issue's SGLang figures)",
    )
    p.add_argument("--pools", type=int, nargs="+", default=list(POOLS))
    p.add_argument("--page-sizes", type=int, nargs="+", default=list(PAGE_SIZES))
    args = p.parse_args(argv)

    torch.set_num_threads(args.torch_threads)
    n_allocs = args.allocs or (3_000 if args.quick else TRACE_OPS)
    micro_iters = {1: 20_000, 512: 2_000} if args.quick else {1: 300_000, 512: 30_000}
    rust_iters = {1: 2_000_000, 512: 20_000} if args.quick else {1: 20_000_000, 512: 200_000}
    micro_repeat = 1 if args.quick else 3
    with_sglang = not args.skip_sglang
    if with_sglang:
        import _sglang

        if not _sglang.available():
            p.error(
                "sglang is not installed (see benchmarks/requirements-bench.txt) "
                "or pass --skip-sglang"
            )

    res = Results()
    res.meta = {
        "command": " ".join([sys.executable, *sys.argv]),
        "seed": args.seed,
        "trace_allocs": n_allocs,
        "live_cap": LIVE_CAP,
        "max_tokens": MAX_TOKENS,
        "gc": "collected before, disabled during timed regions",
        **versions("radixseg", "sglang"),
    }
    print(f"# radixseg allocator benchmark  ({json.dumps(versions('radixseg', 'sglang'))})")

    # 1. trace
    trace = make_trace(n_allocs, args.seed)
    print(
        f"\n## Trace: {n_allocs:,} allocs of 1..{MAX_TOKENS} tokens, random free once "
        f"{LIVE_CAP} live; {len(trace):,} ops (alloc or free)"
    )
    for pool in args.pools:
        for ps in args.page_sizes:
            row = TraceRow(pool, ps, len(trace))
            if with_sglang:
                row.sglang_ops_s = sglang_trace(pool, ps, trace, args.repeat)
            row.radixseg_ops_s, row.radixseg_pages_per_segment, row.radixseg_segments = (
                radixseg_trace(pool, ps, trace, args.repeat, args.pages_per_segment)
            )
            if row.sglang_ops_s:
                row.ratio = row.radixseg_ops_s / row.sglang_ops_s
            res.trace.append(row)
            print(
                f"  pool {pool:>9,} page {ps:>2}: SGLang {fmt_rate(row.sglang_ops_s):>9}  "
                f"radixseg {fmt_rate(row.radixseg_ops_s):>9}",
                flush=True,
            )

    # 2. Python micro
    print("\n## Python micro: alloc + release loop", flush=True)
    for batch in (1, 512):
        for threads in (1, 2):
            res.micro.append(radixseg_micro(threads, batch, micro_iters[batch], micro_repeat))
        if with_sglang:
            res.micro.append(sglang_micro(batch, micro_iters[batch], micro_repeat, POOLS[0]))

    # 3. Rust micro
    if not args.skip_rust:
        print("## Rust micro: building the example ...", flush=True)
        exe = build_rust_example()
        for batch in (1, 512):
            for threads in (1, 2):
                res.micro.append(rust_micro(exe, threads, batch, rust_iters[batch], micro_repeat))

    # tables
    print("\n### Trace (ops/s; an op is one alloc or one free call)")
    print_table(
        ["pool tokens", "page_size", "SGLang ops/s", "radixseg ops/s", "ratio", "rs segments"],
        [
            [
                f"{r.pool_tokens:,}",
                str(r.page_size),
                fmt_rate(r.sglang_ops_s),
                fmt_rate(r.radixseg_ops_s),
                f"{r.ratio:.2f}x" if r.ratio else "-",
                f"{r.radixseg_segments} x {r.radixseg_pages_per_segment}",
            ]
            for r in res.trace
        ],
    )
    print("\n### Micro (an op is one alloc call plus one release call)")
    print_table(
        ["impl", "threads", "batch pages", "ops/s", "pages/s", "note"],
        [
            [
                m.impl,
                str(m.threads),
                str(m.batch_pages),
                fmt_rate(m.ops_s),
                fmt_rate(m.pages_s),
                m.note,
            ]
            for m in res.micro
        ],
    )

    # targets from the issue
    for r in res.trace:
        if r.ratio is None:
            continue
        if r.pool_tokens >= 1_048_576:
            res.targets.append(
                {
                    "target": f">= 5x SGLang at {r.pool_tokens:,} tokens, page {r.page_size}",
                    "value": r.ratio,
                    "met": r.ratio >= 5,
                }
            )
        elif r.pool_tokens == 65_536:
            res.targets.append(
                {
                    "target": f"not slower than SGLang at 65,536 tokens, page {r.page_size}",
                    "value": r.ratio,
                    "met": r.ratio >= 1,
                }
            )
    for m in res.micro:
        if m.impl == "radixseg (Rust)" and m.threads == 1 and m.batch_pages == 1:
            res.targets.append(
                {
                    "target": "Rust single-page alloc+release >= 20M ops/s, 1 core",
                    "value": m.ops_s,
                    "met": m.ops_s >= RUST_TARGET_1P,
                }
            )
    if res.targets:
        print("\n### Issue targets")
        for t in res.targets:
            v = f"{t['value']:.2f}x" if t["value"] < 1000 else fmt_rate(t["value"]) + " ops/s"
            print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {v}")

    if args.json:
        write_json(
            args.json,
            {
                "meta": res.meta,
                "trace": [asdict(r) for r in res.trace],
                "micro": [asdict(m) for m in res.micro],
                "targets": res.targets,
            },
        )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
