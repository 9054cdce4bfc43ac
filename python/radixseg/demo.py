"""``radixseg demo``: a serving trace, one context grown to 10M tokens, shared, handed back.

What a fixed pool cannot do, in one run on a CPU:

0. **Serve a trace from an empty pool.** Chats that share a few system
   prompts run turn after turn: each turn matches its history in the radix
   tree, prefills only what is new, decodes a short reply (one batched decode
   attention step per token, straight over the segments) and caches the
   conversation for the next turn. The hit rate is the share of prompt tokens
   that needed no prefill.
1. **Grow from zero.** A single request's context grows to ``--tokens`` in
   chunks; the pool adds segments only as pages are needed (a fixed pool
   sized for that context reserves all of it before the first request).
2. **Share without moving.** The context is cached in the radix tree; follow-up
   requests that extend it reuse every cached page and prefill only their own
   suffix, while their pages live in whatever segments are free. A second
   tenant sending the same prompt shares nothing (namespaces).
3. **Hand back.** Once the requests end and the cache is evicted, ``shrink()``
   returns every segment: reserved bytes go back to zero.

The model is tiny (1 layer, 1 KV head, head_dim 64, FP8 e4m3 with a float32
scale per token) so that 10M tokens fit in ~1.4 GB of host memory; every
byte count scales linearly with a real model's (see ``radixseg plan``).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from radixseg import InvalidArgument, attention
from radixseg.cache import PrefixCache, Request
from radixseg.capacity import plan
from radixseg.pool import KVPool, dequantize_fp8, quantize_fp8

__all__ = ["DemoResult", "run_demo"]

GB = 1e9


@dataclass(frozen=True)
class DemoResult:
    """Figures of one demo run (all bytes are KV bytes of the tiny model)."""

    tokens: int
    trace_requests: int
    trace_hit_rate: float
    peak_segments: int
    peak_reserved_bytes: int
    fixed_pool_bytes: int
    reused_tokens: int
    verified_tokens: int
    final_reserved_bytes: int
    peak_rss_bytes: int
    seconds: float


def _kv(chunk_index: int, n: int, head_dim: int) -> torch.Tensor:
    """Deterministic KV ``[n, 1, head_dim]`` of chunk ``chunk_index`` (negative: a suffix)."""
    g = torch.Generator().manual_seed(1000 + chunk_index if chunk_index >= 0 else -chunk_index)
    return torch.randn(n, 1, head_dim, generator=g)


Sample = tuple[float, int, int, str]  # seconds, reserved bytes, used bytes, phase

HEADER = (
    f"{'phase':<10}{'tokens':>13}{'segments':>10}{'reserved GB':>12}{'used GB':>11}"
    f"{'cached tok':>13}{'hit':>7}{'grown':>7}{'s':>7}"
)


def _row(
    label: str, pool: KVPool, tokens: int, t0: float, out: list[str], samples: list[Sample]
) -> None:
    """Sample memory now; phases with a label also become a row of the final table."""
    s = pool.stats()
    now = time.perf_counter() - t0
    samples.append((now, s["reserved_bytes"], s["used_bytes"], label))
    if label:
        out.append(
            f"{label:<10}{tokens:>13,}{s['segments']:>10,}{s['reserved_bytes'] / GB:>12.3f}"
            f"{s['used_bytes'] / GB:>11.3f}{s['cached_tokens']:>13,}{s['hit_rate']:>7.1%}"
            f"{s['segments_added']:>7,}{now:>7.1f}"
        )


class _Progress:
    """A tqdm bar on stderr (a no-op without tqdm or when disabled)."""

    def __init__(self, enabled: bool | None) -> None:
        self._bar: Any = None
        self._tqdm: Any = None
        self._enabled = enabled
        if enabled is False:
            return
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]
        except ImportError:
            return
        self._tqdm = tqdm

    @contextmanager
    def phase(self, desc: str, total: int, unit: str) -> Iterator[_Progress]:
        if self._tqdm is None:
            yield self
            return
        # disable=None: draw only on a terminal unless asked for explicitly.
        with self._tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=True,
            file=sys.stderr,
            leave=False,
            disable=None if self._enabled is None else not self._enabled,
            dynamic_ncols=True,
        ) as bar:
            self._bar = bar
            try:
                yield self
            finally:
                self._bar = None

    def update(self, n: int, pool: KVPool) -> None:
        if self._bar is not None:
            s = pool.stats()
            self._bar.set_postfix(
                segments=s["segments"], reserved=f"{s['reserved_bytes'] / GB:.2f}GB", refresh=False
            )
            self._bar.update(n)


def _serve_trace(
    cache: PrefixCache,
    rng: torch.Generator,
    progress: _Progress,
    *,
    chats: int,
    turns: int,
    system_prompts: int,
    system_len: int,
    reply: int,
    head_dim: int,
    backend: Literal["triton", "cpu"],
    t0: float,
    lines: list[str],
    samples: list[Sample],
) -> tuple[int, int, int]:
    """Multi-turn chats over shared system prompts; returns (requests, prompt tokens, reused)."""
    pool = cache.pool
    if chats == 0 or turns == 0:
        return 0, 0, 0  # no trace asked for
    systems = [
        torch.randint(0, 128_000, (system_len,), generator=rng, dtype=torch.int32)
        for _ in range(system_prompts)
    ]
    history = [systems[c % system_prompts] for c in range(chats)]
    # Arrivals are staggered the way a scheduler with in-batch prefix caching
    # orders them: the first chat on each system prompt runs its first turn
    # alone, the others join one round later and find the prompt cached.
    first_round = [0 if c < system_prompts else 1 for c in range(chats)]
    rounds = turns + (1 if chats > system_prompts else 0)
    before = cache.cache_stats()
    served = 0
    with progress.phase("serve trace", rounds * (1 + reply), "step") as bar:
        for rnd in range(rounds):
            active = [c for c in range(chats) if first_round[c] <= rnd < first_round[c] + turns]
            reqs: list[Request] = []
            for c in active:
                n = int(torch.randint(32, 129, (1,), generator=rng))
                user = torch.randint(0, 128_000, (n,), generator=rng, dtype=torch.int32)
                r = cache.begin(torch.cat([history[c], user]))
                own = cache.extend(r, r.uncached)  # prefill only what is not cached
                kv = torch.randn(own.numel(), 1, head_dim, generator=rng).to(pool.device)
                pool.write(0, own, kv, -kv, check=False)
                reqs.append(r)
            bar.update(1, pool)
            for _ in range(reply):  # batched decode: one new token per chat per step
                new = torch.randint(0, 128_000, (len(reqs), 1), generator=rng, dtype=torch.int32)
                slots = torch.cat([cache.extend(r, new[i]) for i, r in enumerate(reqs)])
                kv = torch.randn(len(reqs), 1, head_dim, generator=rng).to(pool.device)
                pool.write(0, slots, kv, -kv, check=False)
                q = torch.randn(len(reqs), 8, head_dim, generator=rng).to(pool.device)
                table = cache.page_table(reqs, device=pool.device)
                out = attention.decode(q, pool, 0, *table, backend=backend)
                if not bool(torch.isfinite(out).all()):
                    raise AssertionError("decode produced non-finite values")
                bar.update(1, pool)
            for c, r in zip(active, reqs, strict=True):
                history[c] = r.tokens.clone()
                cache.finish(r)  # the whole conversation so far is cached for the next turn
            served += len(reqs)
            _row("", pool, 0, t0, lines, samples)
    after = cache.cache_stats()
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    reused = after["reused_tokens"] - before["reused_tokens"]
    return served, prompt, reused


def _plot(samples: list[Sample], fixed: int, tokens: int, path: str) -> str | None:
    """Write memory over time as a PNG; ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t = [x[0] for x in samples]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.axhline(fixed / GB, color="tab:red", ls="--", label=f"fixed pool for {tokens:,} tokens")
    ax.step(
        t, [x[1] / GB for x in samples], where="post", color="tab:blue", label="radixseg reserved"
    )
    ax.plot(t, [x[2] / GB for x in samples], color="tab:green", label="radixseg used")
    for when, label in ((x[0], x[3]) for x in samples if x[3] in ("chats", "cached", "shrunk")):
        ax.axvline(when, color="grey", lw=0.6)
        ax.annotate(label, (when, fixed / GB * 0.5), rotation=90, fontsize=8, color="grey")
    ax.set_xlabel("seconds")
    ax.set_ylabel("KV bytes (GB)")
    ax.set_title("radixseg demo: KV memory over time")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_demo(
    tokens: int = 10_000_000,
    chunk: int = 262_144,
    followups: int = 3,
    suffix: int = 1_000,
    page_size: int = 16,
    segment_bytes: int = 64 << 20,
    seed: int = 0,
    *,
    chats: int = 64,
    turns: int = 6,
    system_prompts: int = 4,
    system_len: int = 2_048,
    reply: int = 8,
    device: str = "cpu",
    dtype: str = "fp8_e4m3",
    budget_bytes: int | str | None = None,
    plot: str | None = None,
    progress: bool | None = None,
) -> DemoResult:
    """Run the demo, print what happens and a table of memory by phase.

    ``chats`` conversations of ``turns`` turns over ``system_prompts`` shared
    system prompts of ``system_len`` tokens (``reply`` decoded tokens per
    turn) come first; then one context of ``tokens`` tokens grows in
    ``chunk``-token steps and ``followups`` requests share it. ``progress``:
    a tqdm bar on stderr (``None``: only on a terminal). Returns the figures
    (see the module doc); raises ``AssertionError`` if a read-back check fails.
    """
    for name, value, least in (
        ("tokens", tokens, 1),
        ("chunk", chunk, 1),
        ("followups", followups, 1),
        ("suffix", suffix, 1),
        ("chats", chats, 0),
        ("turns", turns, 0),
        ("system_prompts", system_prompts, 1),
        ("system_len", system_len, 1),
        ("reply", reply, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidArgument(f"demo: {name} must be an integer >= {least}, got {value!r}")
    head_dim = 64
    pool = KVPool(
        1,
        1,
        head_dim,
        page_size=page_size,
        dtype=dtype,
        device=device,
        segment_bytes=segment_bytes,
        budget_bytes=budget_bytes,
    )
    cache = PrefixCache(pool)
    rng = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 128_000, (tokens,), generator=rng, dtype=torch.int32)
    fixed = tokens * pool.bytes_per_token
    backend: Literal["triton", "cpu"] = "triton" if pool.device.type == "cuda" else "cpu"
    bar = _Progress(progress)
    t0 = time.perf_counter()
    lines: list[str] = []
    samples: list[Sample] = []
    storage = "FP8 e4m3 + fp32 scale" if pool.fp8 else str(pool.dtype).removeprefix("torch.")
    print(
        f"radixseg demo: {chats} chats x {turns} turns over {system_prompts} shared system "
        f"prompts, then one context to {tokens:,} tokens, {followups} follow-ups sharing it, "
        f"a second tenant, and everything handed back\n"
        f"model: 1 layer x 1 KV head x head_dim {head_dim}, {storage} = "
        f"{pool.bytes_per_token} B/token; page {page_size} tokens; segment "
        f"{pool.segment_bytes / 2**20:g} MiB = {pool.tokens_per_segment:,} tokens; "
        f"device {pool.device}\n"
        f"a fixed pool sized for {tokens:,} tokens reserves {fixed / GB:.3f} GB before the "
        f"first request; this pool starts with {pool.stats()['reserved_bytes']} B\n",
        flush=True,
    )
    _row("start", pool, 0, t0, lines, samples)

    # 0. A serving trace: shared system prompts and multi-turn chats.
    served, trace_prompt, trace_reused = _serve_trace(
        cache,
        rng,
        bar,
        chats=chats,
        turns=turns,
        system_prompts=system_prompts,
        system_len=system_len,
        reply=reply,
        head_dim=head_dim,
        backend=backend,
        t0=t0,
        lines=lines,
        samples=samples,
    )
    trace_hit = trace_reused / trace_prompt if trace_prompt else 0.0
    print(
        f"serve trace: {served:,} requests, {trace_prompt:,} prompt tokens, {trace_reused:,} "
        f"reused from the radix tree (hit rate {trace_hit:.1%}), {reply} decode steps per turn "
        f"over the segments ({backend})",
        flush=True,
    )
    _row("chats", pool, trace_prompt, t0, lines, samples)

    # 1. Grow one context chunk by chunk.
    req = cache.begin(prompt[:1])
    first_ptr: int | None = None
    done = 0
    with bar.phase(f"grow to {tokens:,}", tokens, "tok") as b:
        for i, start in enumerate(range(0, tokens, chunk)):
            part = prompt[start : start + chunk]
            slots = cache.extend(req, part)
            kv = _kv(i, part.numel(), head_dim).to(pool.device)
            pool.write(0, slots, kv, -kv, check=False)
            if first_ptr is None:
                first_ptr = pool.segment(0).k.data_ptr()
            done += part.numel()
            _row("", pool, done, t0, lines, samples)
            b.update(part.numel(), pool)
    _row("grown", pool, done, t0, lines, samples)
    peak = pool.stats()
    cache.finish(req)
    _row("cached", pool, done, t0, lines, samples)

    # 2. Follow-ups share the whole cached prefix; a second tenant shares nothing.
    followers: list[Request] = []
    reused = 0
    for f in range(followups):
        question = torch.randint(0, 128_000, (suffix,), generator=rng, dtype=torch.int32)
        full = torch.cat([prompt, question])
        b0 = time.perf_counter()
        r = cache.begin(full, namespace=0)
        began = time.perf_counter() - b0
        own = cache.extend(r, r.uncached)  # prefill: only the uncached suffix
        kv = _kv(-1 - f, own.numel(), head_dim).to(pool.device)
        pool.write(0, own, kv, -kv, check=False)
        reused += r.cached_len
        followers.append(r)
        print(
            f"follow-up {f + 1}: reuses {r.cached_len:,} cached tokens (matched in "
            f"{began * 1e3:.1f} ms), prefills {r.uncached.numel():,}",
            flush=True,
        )
    # One decode step per follow-up, attending over its whole context straight
    # from the segments (Triton on a GPU, the native kernel on a CPU).
    q = torch.randn(len(followers), 8, head_dim, generator=rng).to(pool.device)
    d0 = time.perf_counter()
    table = cache.page_table(followers, device=pool.device)
    out = attention.decode(q, pool, 0, *table, backend=backend)
    decode_s = time.perf_counter() - d0
    if not bool(torch.isfinite(out).all()):
        raise AssertionError("decode produced non-finite values")
    ctx = sum(r.seq_len for r in followers)
    print(
        f"decode ({backend}): {len(followers)} requests x 8 query heads over {ctx:,} tokens "
        f"of KV in {decode_s:.2f} s "
        f"({ctx * pool.bytes_per_token / decode_s / GB:.2f} GB/s of KV read)"
    )
    other = cache.begin(prompt[: min(tokens, 1 << 16)], namespace=1)
    print(f"tenant 2, same prompt start: reuses {other.cached_len} tokens (namespaces never share)")
    cache.abort(other)

    # The shared prefix reads back exactly what the first request wrote: the
    # first, a middle and the last chunk, in full, through a follow-up's pages.
    n_chunks = -(-tokens // chunk)
    ok = expected = 0
    for i in sorted({0, n_chunks // 2, n_chunks - 1}):
        lo, hi = i * chunk, min(tokens, (i + 1) * chunk)
        k, v = pool.read(0, cache.slots(followers[0], lo, hi))
        written = _kv(i, hi - lo, head_dim).to(pool.device)
        want = (
            dequantize_fp8(*quantize_fp8(written, pool.dtype))
            if pool.fp8
            else written.to(pool.dtype).float()
        )
        ok += int(((k == want) & (v == -want)).all(dim=2).sum())
        expected += hi - lo
    moved = pool.segment(0).k.data_ptr() != first_ptr
    print(
        f"read back {ok:,} of {expected:,} prefix tokens (whole chunks: first, middle, "
        f"last) exactly; segment 0 {'MOVED' if moved else 'never moved'} while the "
        f"pool grew",
        flush=True,
    )
    _row("shared", pool, done + followups * suffix, t0, lines, samples)

    # 3. Everything ends: evict the cache, shrink to zero.
    for r in followers:
        cache.finish(r)
    _row("finished", pool, 0, t0, lines, samples)
    cache.evict(pool.stats()["cached_pages"])
    _row("evicted", pool, 0, t0, lines, samples)
    freed = pool.shrink()
    _row("shrunk", pool, 0, t0, lines, samples)
    final = pool.stats()
    cache.check_invariants()
    seconds = time.perf_counter() - t0

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    llama = plan(
        {
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_size": 4096,
            "model_type": "llama",
        },
        kv_dtype="fp8_e4m3",
        context=tokens,
    )
    print("\n" + HEADER)
    print("\n".join(lines))
    print(
        f"\npeak {peak['segments']:,} segments = {peak['reserved_bytes'] / GB:.3f} GB for "
        f"{tokens:,} tokens (a fixed pool: {fixed / GB:.3f} GB from the start); "
        f"shrink() returned {freed / GB:.3f} GB, {final['reserved_bytes']} B left; "
        f"hit rate {final['hit_rate']:.1%} over all requests ({trace_hit:.1%} in the chat "
        f"trace); {final['segments_added']} growth events; peak RSS {rss / GB:.2f} GB; "
        f"{seconds:.1f} s\n"
        f"the same run with Llama-3.1-8B in FP8 ({llama.kv_bytes_per_token:,} B/token): "
        f"{llama.kv_bytes_per_token * tokens / GB:,.0f} GB of KV at its peak, 0 at rest "
        f"(`radixseg plan` sizes any model)"
    )
    if plot:
        written_to = _plot(samples, fixed, tokens, plot)
        print(
            f"plot: {written_to}"
            if written_to
            else "plot: skipped (pip install matplotlib to get the PNG)"
        )
    if ok != expected or moved:
        raise AssertionError("the demo's read-back check failed")
    return DemoResult(
        tokens=tokens,
        trace_requests=served,
        trace_hit_rate=trace_hit,
        peak_segments=peak["segments"],
        peak_reserved_bytes=peak["reserved_bytes"],
        fixed_pool_bytes=fixed,
        reused_tokens=reused,
        verified_tokens=ok,
        final_reserved_bytes=final["reserved_bytes"],
        peak_rss_bytes=rss,
        seconds=seconds,
    )
