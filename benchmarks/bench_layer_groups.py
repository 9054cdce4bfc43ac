"""Layer groups on a Scout-shaped model: grouped pool vs all-layers pool vs the plan.

The model is ``radixseg.demo.scout_tiny_geometry()``: Llama 4 Scout's layer
pattern (1 full layer per 3 chunked layers, chunk 8,192 tokens) cut to 4
layers of 1 KV head x head_dim 64, FP8 e4m3 with a float32 scale per token
(136 B per token per layer), 16-token pages, 64 MiB segments. One request's
context grows in ``--chunk``-token steps (``GroupedPrefixCache.extend``) to
each of ``--tokens`` (default 1M, then 10M), and the last token of each size
is a decode step (``extend`` of one token, which releases the chunked pages
that fell out of the window), twice in the same run:

* a ``GroupedKVPool`` (one ``KVPool`` per layer group: the full layer keeps
  every token, the chunked layers only the chunk a query sees);
* today's layout, one all-layers ``KVPool`` (4 layers, every token in every
  layer) under a ``PrefixCache`` making the same calls (built and grown to the
  same pages, not computed).

Reserved bytes are read from the pools at each size, next to
``radixseg.plan(geometry, context=N, kv_dtype="fp8").reserved_bytes_grouped``
and its per-group figures, and the all-layers figure. Up to ``--decode-at``
tokens (default 1M) every chunk's K/V is written to every layer of both pools
(the K/V a prefill writes); past it the pools only allocate (the bytes
reserved do not depend on what is written), and the table says so.

At ``--decode-at`` tokens one decode step over all 4 layers (batch 1, 8 query
heads, the native CPU kernel, ``check=False``) is timed, median of
``--repeat`` (the three modes timed in turn, after a warm-up): grouped (the
full layer over every token, each chunked layer over its group's page table
with ``chunk_size``) against the all-layers pool read two ways: with
``chunk_size`` on the chunked layers (what today's pool runs for Scout; the
baseline) and with every layer over the whole context (no window in the
kernel). The grouped outputs are checked against the all-layers
``chunk_size`` outputs (same stored K/V).

    python benchmarks/bench_layer_groups.py                 # 1M and 10M
    python benchmarks/bench_layer_groups.py --quick         # 100k and 300k, seconds
    python benchmarks/bench_layer_groups.py --tokens 1M,4M --decode-at 1M
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from radixseg import KVPool, PrefixCache, attention, plan
from radixseg.capacity import parse_bytes, parse_count
from radixseg.demo import Q_HEADS, _prompt, group_name, grow_grouped, scout_tiny_geometry
from radixseg.grouped import GroupedKVPool, GroupedPrefixCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, versions, write_json

GB = 1e9


def _grow(
    cache: GroupedPrefixCache,
    mirror: PrefixCache,
    state: dict[str, Any],
    prompt: torch.Tensor,
    upto: int,
    chunk: int,
    store: bool,
) -> None:
    """Grow both requests from their length to ``upto - 1`` tokens (in chunks),
    then one decode step of one token: ``upto`` tokens."""
    req, other = state.get("req"), state.get("other")
    if req is None:
        req, other = grow_grouped(
            cache, prompt[: upto - 1], chunk, store=store, mirror=mirror, store_mirror=store
        )
    else:
        for start in range(req.seq_len, upto - 1, chunk):
            part = prompt[start : min(upto - 1, start + chunk)]
            slots = cache.extend(req, part)
            mslots = mirror.extend(other, part)
            if store:  # not reached by the default sizes: past --decode-at, allocate only
                kv = torch.randn(part.numel(), 1, cache.pool.head_dim)
                for layer in range(cache.pool.num_layers):
                    cache.pool.write(layer, slots, kv, -kv, check=False)
                    mirror.pool.write(layer, mslots, kv, -kv, check=False)
    # The decode step: one token; the chunked groups release what left the chunk.
    tok = prompt[upto - 1 : upto]
    slots = cache.extend(req, tok)
    mslots = mirror.extend(other, tok)
    if store:
        kv = torch.randn(1, 1, cache.pool.head_dim, generator=torch.Generator().manual_seed(upto))
        for layer in range(cache.pool.num_layers):
            cache.pool.write(layer, slots, kv, -kv, check=False)
            mirror.pool.write(layer, mslots, kv, -kv, check=False)
    state["req"], state["other"] = req, other


def _medians_ms(repeat: int, runs: list[Any]) -> list[float]:
    """Median milliseconds of each of ``runs``, timed in turn round after round
    (after one warm-up each), so that a busy spell on a shared machine slows
    every mode alike."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for i, run in enumerate(runs):
            t = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e3 for t in times]


def _decode(
    cache: GroupedPrefixCache, mirror: PrefixCache, state: dict[str, Any], repeat: int
) -> tuple[list[list[str]], dict[str, Any]]:
    pool, flat = cache.pool, mirror.pool
    req, other = state["req"], state["other"]
    tables = cache.page_table([req])
    mtable = mirror.page_table([other])
    q = torch.randn(1, Q_HEADS, pool.head_dim, generator=torch.Generator().manual_seed(7))

    def grouped() -> list[torch.Tensor]:
        out = []
        for layer in range(pool.num_layers):
            g, li = pool.locate(layer)
            grp = pool.groups[g]
            kw: dict[str, Any] = {} if grp.kind == "full" else {"chunk_size": grp.span}
            out.append(
                attention.decode(q, pool.pools[g], li, *tables[g], backend="cpu", check=False, **kw)
            )
        return out

    def all_layers(windowed: bool) -> list[torch.Tensor]:
        out = []
        for layer in range(flat.num_layers):
            grp = pool.groups[pool.locate(layer)[0]]
            kw: dict[str, Any] = (
                {"chunk_size": grp.span} if windowed and grp.kind == "chunked" else {}
            )
            out.append(attention.decode(q, flat, layer, *mtable, backend="cpu", check=False, **kw))
        return out

    a, b = grouped(), all_layers(True)
    err = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    base, full, grp_ms = _medians_ms(
        repeat, [lambda: all_layers(True), lambda: all_layers(False), grouped]
    )
    rows = [
        ["all-layers KVPool, chunk_size on chunked layers", f"{base:.2f}", "1.000"],
        ["all-layers KVPool, every layer over the context", f"{full:.2f}", f"{full / base:.3f}"],
        ["GroupedKVPool (full + chunked groups)", f"{grp_ms:.2f}", f"{grp_ms / base:.3f}"],
    ]
    figs = {"all_layers_ms": base, "all_layers_no_window_ms": full, "grouped_ms": grp_ms}
    figs["max_abs_diff_grouped_vs_all_layers"] = err
    return rows, figs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1M,10M", help="context sizes, ascending (default 1M,10M)")
    ap.add_argument("--decode-at", help="size to write K/V up to and time decode at (default 1M)")
    ap.add_argument("--chunk", type=int, default=262_144, help="tokens per extend (default 256Ki)")
    ap.add_argument("--segment-bytes", default="64MiB")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="100k and 300k tokens, decode at 100k")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.decode_at = "100k,300k", args.decode_at or "100k"
    sizes = [parse_count(t, "--tokens") for t in args.tokens.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 2:
        raise SystemExit("--tokens: sizes must be ascending and at least 2")
    decode_at = parse_count(args.decode_at or "1M", "--decode-at")
    if decode_at not in sizes:
        decode_at = max([n for n in sizes if n <= decode_at], default=0)
    seg = parse_bytes(args.segment_bytes, "--segment-bytes")
    torch.set_num_threads(args.threads)

    geom = scout_tiny_geometry()
    pool = GroupedKVPool.for_geometry(geom, page_size=16, dtype="fp8", segment_bytes=seg)
    flat = KVPool(geom.num_layers, 1, geom.head_dim, page_size=16, dtype="fp8", segment_bytes=seg)
    cache, mirror = GroupedPrefixCache(pool), PrefixCache(flat)
    names = [group_name(pool, g) for g in range(len(pool.groups))]
    print(
        f"model: Scout-shaped, {geom.num_layers} layers ({', '.join(names)}), 1 KV head x "
        f"head_dim {geom.head_dim}, FP8 e4m3 + fp32 scale = {flat.bytes_per_token // 4} B per "
        f"token per layer; page 16; segment {seg / 2**20:g} MiB; extend chunk "
        f"{args.chunk:,}; {args.threads} thread(s)"
    )
    _, prompt = _prompt(0, sizes[-1])
    state: dict[str, Any] = {}
    rows: list[list[str]] = []
    figures: dict[str, Any] = {"sizes": {}, "versions": versions()}
    decode_rows: list[list[str]] = []
    for n in sizes:
        t0 = time.perf_counter()
        _grow(cache, mirror, state, prompt, n, args.chunk, store=n <= decode_at)
        grow_s = time.perf_counter() - t0
        st = pool.stats()["groups"]
        got = [int(s["reserved_bytes"]) for s in st]
        p = plan(geom, context=n, kv_dtype="fp8", page_size=16, segment_bytes=seg)
        want = [gp.reserved_bytes for gp in p.groups]
        all_b = flat.reserved_bytes()
        written = "K/V written" if n <= decode_at else "allocated only"
        for g, name in enumerate(names):
            rows.append(
                [
                    f"{n:,}",
                    f"group {name}",
                    f"{got[g] / GB:.4f}",
                    f"{want[g] / GB:.4f}",
                    f"{got[g] / all_b:.4f}",
                    "",
                ]
            )
        total = sum(got)
        assert p.reserved_bytes_grouped is not None
        rows.append(
            [
                f"{n:,}",
                "GroupedKVPool (sum)",
                f"{total / GB:.4f}",
                f"{p.reserved_bytes_grouped / GB:.4f}",
                f"{total / all_b:.4f}",
                written,
            ]
        )
        # A group's pool keeps one empty segment past what it uses (auto_shrink's
        # hysteresis); shrink() hands it back, which is what the plan counts.
        for gp_ in pool.pools:
            gp_.shrink()
        shrunk = pool.reserved_bytes()
        rows.append(
            [
                f"{n:,}",
                "GroupedKVPool after shrink()",
                f"{shrunk / GB:.4f}",
                f"{p.reserved_bytes_grouped / GB:.4f}",
                f"{shrunk / all_b:.4f}",
                "plan " + ("matched" if shrunk == p.reserved_bytes_grouped else "DIFFERS"),
            ]
        )
        rows.append(
            [
                f"{n:,}",
                "all-layers KVPool",
                f"{all_b / GB:.4f}",
                "",
                "1.0000",
                f"grown in {grow_s:.1f} s",
            ]
        )
        figures["sizes"][n] = {
            "groups": dict(zip(names, got, strict=True)),
            "plan_groups": dict(zip(names, want, strict=True)),
            "grouped": total,
            "grouped_after_shrink": shrunk,
            "plan_grouped": p.reserved_bytes_grouped,
            "all_layers": all_b,
            "written": n <= decode_at,
            "grow_seconds": grow_s,
        }
        if n == decode_at:
            decode_rows, figures["decode"] = _decode(cache, mirror, state, args.repeat)
            figures["decode"]["tokens"] = n
    print(
        "\nreserved bytes after the decode step at each size (GB = 10^9 B; x all-layers = "
        "share of the all-layers pool at that size)"
    )
    print_table(["tokens", "pool", "reserved GB", "plan GB", "x all-layers", "note"], rows)
    if decode_rows:
        d = figures["decode"]
        print(
            f"\none decode step over all {geom.num_layers} layers at {d['tokens']:,} tokens "
            f"(batch 1, {Q_HEADS} query heads, native CPU kernel, median of {args.repeat}); "
            f"grouped vs all-layers outputs: max |diff| "
            f"{d['max_abs_diff_grouped_vs_all_layers']:.2e}"
        )
        print_table(["pool / kernel", "ms / token", "x baseline"], decode_rows)
    if args.json:
        print(f"wrote {write_json(args.json, figures)}")


if __name__ == "__main__":
    main()
