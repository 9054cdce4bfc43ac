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

With ``ranks=R > 1`` (``radixseg demo --ranks 2``) phases 1-3 run on ``R``
spawned processes joined by gloo (context parallelism, issue 19): each holds a
:class:`radixseg.distributed.ShardedKVPool` with ``1/R`` of the context,
the follow-ups' decode step is one collective call (checked against a dense
fp32 reference over the same stored KV, computed while the context grows),
and the figures are per rank, beside what one process would hold for the same
calls (measured on a pool that allocates without writing). The chat trace
stays in this process.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from radixseg import InvalidArgument, attention
from radixseg._spawn import peak_rss_bytes, run_ranks
from radixseg.cache import PrefixCache, Request
from radixseg.capacity import plan
from radixseg.capacity.geometry import KVGeometry
from radixseg.grouped import GroupedKVPool, GroupedPrefixCache, GroupedRequest
from radixseg.pool import KVPool, dequantize_fp8, quantize_fp8

__all__ = [
    "MODELS",
    "DemoResult",
    "grow_context",
    "grow_grouped",
    "run_demo",
    "scout_tiny_geometry",
]

GB = 1e9
HEAD_DIM = 64  # the demo model: 1 layer x 1 KV head x head_dim 64
Q_HEADS = 8  # query heads of a decode step (grouped-query attention over the one KV head)
MAX_RANKS = 3
# --model: "tiny" (1 layer, the default) or "scout-tiny" (Llama 4 Scout's layer
# pattern at the same size, in a GroupedKVPool: see scout_tiny_geometry).
MODELS = ("tiny", "scout-tiny")
SCOUT_CHUNK = 8_192  # Llama 4 Scout's attention_chunk_size


@dataclass(frozen=True)
class DemoResult:
    """Figures of one demo run (all bytes are KV bytes of the tiny model).

    With ``ranks > 1`` the context's figures (``peak_*``, ``final_reserved_bytes``)
    are summed over the ranks, ``rank_peak_*`` are each rank's, and
    ``one_process_peak_reserved_bytes`` is what one process's pool reserved for
    the same calls; ``decode_max_error`` is the largest difference of the
    checked decode rows from the dense fp32 reference and ``worker_pids`` the
    (joined) rank processes.
    """

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
    ranks: int = 1
    segment_bytes: int = 0
    rank_peak_reserved_bytes: tuple[int, ...] = ()
    rank_peak_used_bytes: tuple[int, ...] = ()
    one_process_peak_reserved_bytes: int = 0
    decode_max_error: float | None = None
    worker_pids: tuple[int, ...] = ()
    model: str = "tiny"
    group_names: tuple[str, ...] = ()
    group_peak_reserved_bytes: tuple[int, ...] = ()
    all_layers_peak_reserved_bytes: int = 0
    peak_host_reserved_bytes: int = 0
    demotions: int = 0


def _kv(chunk_index: int, n: int, head_dim: int) -> torch.Tensor:
    """Deterministic KV ``[n, 1, head_dim]`` of chunk ``chunk_index`` (negative: a suffix)."""
    g = torch.Generator().manual_seed(1000 + chunk_index if chunk_index >= 0 else -chunk_index)
    return torch.randn(n, 1, head_dim, generator=g)


def _stored(pool: KVPool, x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 after a round trip through the pool's storage type."""
    if pool.fp8:
        return dequantize_fp8(*quantize_fp8(x, pool.dtype))
    return x.to(pool.dtype).float()


def grow_context(
    cache: PrefixCache,
    prompt: torch.Tensor,
    chunk: int,
    *,
    store: bool = True,
    each: Callable[[int, int, torch.Tensor | None], None] | None = None,
) -> Request:
    """Grow one request over ``prompt`` in ``chunk``-token steps; returns it, running.

    Chunk ``i``'s K is ``_kv(i)`` (deterministic) and its V is ``-K``, written
    to layer 0 (a :class:`radixseg.distributed.ShardedKVPool` keeps its own
    rows); ``store=False`` only allocates (what one process would reserve,
    without touching the bytes). ``each(i, n, kv)`` runs after every chunk
    (``kv`` is ``None`` without ``store``). Used by the demo, on one process or
    on every rank, and by ``benchmarks/bench_sharded.py``.
    """
    pool = cache.pool
    req = cache.begin(prompt[:1])
    for i, start in enumerate(range(0, prompt.numel(), chunk)):
        part = prompt[start : start + chunk]
        slots = cache.extend(req, part)
        kv = None
        if store:
            kv = _kv(i, part.numel(), pool.head_dim).to(pool.device)
            own, mine = kv, slots >= 0  # -1: a token another rank of a sharded pool stores
            if not bool(mine.all()):
                slots, own = slots[mine], kv[mine]  # select first: negate only this rank's rows
            pool.write(0, slots, own, -own, check=False)
        if each is not None:
            each(i, part.numel(), kv)
    return req


def scout_tiny_geometry(chunk: int = SCOUT_CHUNK) -> KVGeometry:
    """Llama 4 Scout's layer pattern at the demo's size: 4 layers of 1 KV head x
    head_dim 64, layers 0-2 chunked (``chunk`` tokens, Scout's 8,192) and layer
    3 full (every 4th layer, as ``no_rope_layer_interval=4``): Scout's 1 full
    per 3 chunked, its 48 layers cut to 4."""
    return KVGeometry(
        num_layers=4,
        num_kv_heads=1,
        head_dim=HEAD_DIM,
        layer_windows=(chunk, chunk, chunk, None),
        layer_kinds=("chunked", "chunked", "chunked", "full"),
        source="scout-tiny",
        model_type="llama4",
    )


def group_name(pool: GroupedKVPool, g: int) -> str:
    """A short label of group ``g``: ``full x1``, ``chunked 8,192 x3``."""
    grp = pool.groups[g]
    span = "" if grp.span is None else f" {grp.span:,}"
    return f"{grp.kind}{span} x{len(grp.layers)}"


def grow_grouped(
    cache: GroupedPrefixCache,
    prompt: torch.Tensor,
    chunk: int,
    *,
    store: bool = True,
    mirror: PrefixCache | None = None,
    store_mirror: bool = False,
    each: Callable[[int, int, torch.Tensor | None], None] | None = None,
) -> tuple[GroupedRequest, Request | None]:
    """:func:`grow_context` over a :class:`GroupedKVPool`: one request grows over
    ``prompt`` in ``chunk``-token steps; returns it (running) and ``mirror``'s.

    Chunk ``i``'s K is ``_kv(i)`` and its V ``-K``, written to every layer of
    every group at the slots :meth:`GroupedPrefixCache.extend` returns (the
    K/V a prefill writes; a windowed group's pages past its window go back at
    the next step). ``store=False`` only allocates. ``mirror``, a
    :class:`PrefixCache` over an all-layers :class:`KVPool` (every layer keeps
    every token, today's layout), makes the same calls; with ``store_mirror``
    (and ``store``) it is written the same K/V, layer for layer, else it only
    allocates.
    ``each(i, n, kv)`` runs after every chunk. Used by the demo's
    ``--model scout-tiny`` and ``benchmarks/bench_layer_groups.py``.
    """
    pool = cache.pool
    req = cache.begin(prompt[:1])
    other = None if mirror is None else mirror.begin(prompt[:1])
    write_mirror = store_mirror and mirror is not None
    for i, start in enumerate(range(0, prompt.numel(), chunk)):
        part = prompt[start : start + chunk]
        slots = cache.extend(req, part)
        mslots = None if mirror is None or other is None else mirror.extend(other, part)
        kv = None
        if store:
            kv = _kv(i, part.numel(), pool.head_dim).to(pool.device)
            for layer in range(pool.num_layers):
                pool.write(layer, slots, kv, -kv, check=False)
                if write_mirror and mirror is not None and mslots is not None:
                    mirror.pool.write(layer, mslots, kv, -kv, check=False)
        if each is not None:
            each(i, part.numel(), kv)
    return req, other


Sample = tuple[float, int, int, str]  # seconds, reserved bytes, used bytes, phase

HEADER = (
    f"{'phase':<10}{'tokens':>13}{'segments':>10}{'reserved GB':>12}{'used GB':>11}"
    f"{'cached tok':>13}{'hit':>7}{'grown':>7}{'s':>7}"
)
# With --ranks: one row per rank ("main" is this process's chat-trace pool,
# "all" the ranks' sum, "1 proc" one process's pool making the same calls).
HEADER_RANKS = f"{'phase':<10}{'rank':>7}" + HEADER[10:]


def _fmt_row(
    label: str, s: dict[str, Any], tokens: int, now: float | None, rank: str | None
) -> str:
    who = "" if rank is None else f"{rank:>7}"
    when = f"{'-':>7}" if now is None else f"{now:>7.1f}"
    return (
        f"{label:<10}{who}{tokens:>13,}{s['segments']:>10,}{s['reserved_bytes'] / GB:>12.3f}"
        f"{s['used_bytes'] / GB:>11.3f}{s['cached_tokens']:>13,}{s['hit_rate']:>7.1%}"
        f"{s['segments_added']:>7,}{when}"
    )


def _row(
    label: str,
    pool: KVPool,
    tokens: int,
    t0: float,
    out: list[str],
    samples: list[Sample],
    rank: str | None = None,
    host: list[tuple[float, int]] | None = None,
) -> None:
    """Sample memory now; phases with a label also become a row of the final
    table. ``host``: also sample the host tier's reserved bytes there."""
    s = pool.stats()
    now = time.perf_counter() - t0
    samples.append((now, s["reserved_bytes"], s["used_bytes"], label))
    if host is not None:
        host.append((now, s["tiers"]["host"]["reserved_bytes"]))
    if label:
        out.append(_fmt_row(label, s, tokens, now, rank))


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
            self.advance(n, s["segments"], s["reserved_bytes"])

    def advance(self, n: int, segments: int, reserved: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix(
                segments=segments, reserved=f"{reserved / GB:.2f}GB", refresh=False
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


# A line of the plot: legend label, seconds, bytes, and matplotlib keywords
# (``step=True`` draws a step function).
Line = tuple[str, list[float], list[int], dict[str, Any]]
_MARKS = ("chats", "cached", "shrunk")


def _plot(
    lines: list[Line],
    marks: list[tuple[float, str]],
    fixed: int,
    tokens: int,
    path: str,
    fixed_what: str = "fixed pool",
) -> str | None:
    """Write memory over time as a PNG; ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.axhline(fixed / GB, color="tab:red", ls="--", label=f"{fixed_what} for {tokens:,} tokens")
    for label, t, y, style in lines:
        kw = dict(style)
        gb = [b / GB for b in y]
        if kw.pop("step", False):
            ax.step(t, gb, where="post", label=label, **kw)
        else:
            ax.plot(t, gb, label=label, **kw)
    for when, label in marks:
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


def _prompt(seed: int, tokens: int) -> tuple[torch.Generator, torch.Tensor]:
    """The demo's generator and the long context's tokens (its first draw): the
    same on every rank and in this process."""
    rng = torch.Generator().manual_seed(seed)
    return rng, torch.randint(0, 128_000, (tokens,), generator=rng, dtype=torch.int32)


def _read_back(
    pool: KVPool, cache: PrefixCache, req: Request, tokens: int, chunk: int
) -> tuple[int, int]:
    """Compare the first, a middle and the last chunk of the grown context, read
    through ``req``'s pages, with what :func:`grow_context` wrote: ``(exact,
    compared)`` tokens. Only the prefix ``req`` found cached is compared (a
    tail past the last whole page was prefilled again, with other KV); on a
    sharded pool, only the tokens this rank stores."""
    n_chunks = -(-tokens // chunk)
    ok = expected = 0
    for i in sorted({0, n_chunks // 2, n_chunks - 1}):
        lo, end = i * chunk, min(tokens, (i + 1) * chunk)
        hi = min(end, req.cached_len)
        if hi <= lo:
            continue
        slots = cache.slots(req, lo, hi)
        mine = slots >= 0  # a sharded pool's slots are -1 where another rank stores the token
        k, v = pool.read(0, slots[mine])
        written = _kv(i, end - lo, pool.head_dim)[: hi - lo][mine].to(pool.device)
        want = _stored(pool, written)
        ok += int(((k == want) & (v == -want)).all(dim=2).sum())
        expected += int(mine.sum())
    return ok, expected


# ----- the long context over R ranks (--ranks) ---------------------------------------------

_ROW_KEYS = (
    "segments",
    "reserved_bytes",
    "used_bytes",
    "cached_tokens",
    "hit_rate",
    "segments_added",
)
Row = tuple[str, int, dict[str, Any], float]  # phase, tokens, stats, seconds
_REF_BLOCK = 16_384  # rows of KV per step of the dense reference


@dataclass(frozen=True)
class _LongContext:
    """What every rank needs to run phases 1-3 (picklable)."""

    tokens: int
    chunk: int
    followups: int
    suffix: int
    page_size: int
    segment_bytes: int
    dtype: str
    budget_bytes: int | str | None
    seed: int
    t0: float  # this process's time.perf_counter() at the start (a system-wide clock)
    check: bool = True  # compute the dense reference for the decode check


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax attention of ``q [F, H, D]`` over ``k``, ``v`` ``[N, 1, D]``:
    the partial ``(o [F, H, D], lse [F, H])``."""
    s = torch.einsum("fhd,nd->fhn", q, k[:, 0]) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("fhn,nd->fhd", torch.exp(s - lse.unsqueeze(-1)), v[:, 0]), lse


def _merge(
    a: tuple[torch.Tensor, torch.Tensor] | None, b: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    from radixseg.kernels.torch_backend import merge_states_torch

    if a is None or b is None:
        return a if b is None else b
    return merge_states_torch(a[0], a[1], b[0], b[1])


def _reference(
    ref: tuple[torch.Tensor, torch.Tensor] | None,
    pool: KVPool,
    q: torch.Tensor,
    kv: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``ref`` merged with the dense fp32 attention of ``q [F, H, D]`` over
    ``kv`` (K; V is ``-K``) as ``pool`` stores it, in blocks of
    ``_REF_BLOCK`` rows: temporaries of a few MB stay off mmap, 3x faster on
    a CPU."""
    for at in range(0, kv.shape[0], _REF_BLOCK):
        k = _stored(pool, kv[at : at + _REF_BLOCK]).cpu()
        ref = _merge(ref, _dense(q, k, -k))
    return ref


def _context_phases(
    cache: PrefixCache,
    cfg: _LongContext,
    *,
    rank: int = 0,
    ranks: int = 1,
    store: bool = True,
    send: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Phases 1-3 on one pool: grow the context, cache it, share it with the
    follow-ups (decode over it, read it back), hand everything back.

    Run by every rank of a sharded pool (the same calls in the same order), and
    with ``store=False`` by one process's pool that only allocates (what it
    would reserve). With ``cfg.check`` a rank also computes a dense fp32
    reference of the decode step for one query head of each follow-up, over
    the chunks ``i % ranks == rank`` as the pool stores them (the ranks'
    partials merge into the reference over the whole context).
    """
    pool = cache.pool
    _, prompt = _prompt(cfg.seed, cfg.tokens)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    questions = [
        torch.randint(0, 128_000, (cfg.suffix,), generator=g, dtype=torch.int32)
        for _ in range(cfg.followups)
    ]
    q = torch.randn(cfg.followups, Q_HEADS, HEAD_DIM, generator=g)
    cut = cfg.tokens // cache.page_size * cache.page_size  # what a follow-up finds cached
    samples: list[Sample] = []
    rows: list[Row] = []

    def sample(label: str, tokens: int) -> dict[str, Any]:
        s = pool.stats()
        now = time.perf_counter() - cfg.t0
        samples.append((now, s["reserved_bytes"], s["used_bytes"], label))
        if label:
            rows.append((label, tokens, {k: s[k] for k in _ROW_KEYS}, now))
        return s

    ref: tuple[torch.Tensor, torch.Tensor] | None = None
    first_ptr: int | None = None
    done = 0

    def each(i: int, n: int, kv: torch.Tensor | None) -> None:
        nonlocal ref, first_ptr, done
        if kv is not None and first_ptr is None:
            first_ptr = pool.segment(0).k.data_ptr()
        keep = min(n, max(0, cut - done))
        if kv is not None and cfg.check and i % ranks == rank:
            ref = _reference(ref, pool, q[:, :1], kv[:keep])
        done += n
        s = sample("", done)
        if send is not None and rank == 0:
            send(("grow", n, s["segments"], s["reserved_bytes"]))

    sample("", 0)
    req = grow_context(cache, prompt, cfg.chunk, store=store, each=each)
    sample("grown", done)
    cache.finish(req)
    sample("cached", done)

    followers: list[Request] = []
    followups: list[tuple[int, float, int]] = []  # cached, seconds to match, prefilled
    suffix_ref: list[tuple[torch.Tensor, torch.Tensor]] = []
    for f, question in enumerate(questions):
        b0 = time.perf_counter()
        r = cache.begin(torch.cat([prompt, question]))
        began = time.perf_counter() - b0
        own = cache.extend(r, r.uncached)  # prefill: only the uncached suffix
        if r.cached_len != cut:
            raise AssertionError(f"follow-up {f} found {r.cached_len:,} tokens cached, not {cut:,}")
        if store:
            kv = _kv(-1 - f, own.numel(), HEAD_DIM).to(pool.device)
            pool.write(0, own, kv, -kv, check=False)
            if cfg.check and rank == 0:
                got = _reference(None, pool, q[f : f + 1, :1], kv)
                assert got is not None  # the suffix holds the question's tokens
                suffix_ref.append(got)
        followers.append(r)
        followups.append((r.cached_len, began, own.numel()))

    out: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "followups": followups}
    if store:
        # One decode step per follow-up over its whole context: a collective
        # call on a sharded pool (one all-gather of [F, H, D + 1] fp32).
        table = cache.page_table(followers, device=pool.device)
        before = pool.stats()
        d0 = time.perf_counter()
        o, lse = attention.decode(q, pool, 0, *table, return_lse=True)
        out["decode_seconds"] = time.perf_counter() - d0
        after = pool.stats()
        for key in ("collectives", "collective_bytes_sent", "collective_bytes_received"):
            out[key] = after.get(key, 0) - before.get(key, 0)
        out["decode"] = (o.cpu().numpy(), lse.cpu().numpy())
        if ref is not None:
            out["ref"] = (ref[0].numpy(), ref[1].numpy())
        if suffix_ref:
            out["suffix_ref"] = (
                torch.cat([x[0] for x in suffix_ref]).numpy(),
                torch.cat([x[1] for x in suffix_ref]).numpy(),
            )
    other = cache.begin(prompt[: min(cfg.tokens, 1 << 16)], namespace=1)
    out["other_cached"] = other.cached_len
    cache.abort(other)
    if store:
        out["read_back"] = _read_back(pool, cache, followers[0], cfg.tokens, cfg.chunk)
        out["moved"] = pool.segment(0).k.data_ptr() != first_ptr
    sample("shared", done + cfg.followups * cfg.suffix)

    for r in followers:
        cache.finish(r)
    sample("finished", 0)
    cache.evict(pool.stats()["cached_pages"])
    sample("evicted", 0)
    out["freed"] = pool.shrink()
    final = sample("shrunk", 0)
    cache.check_invariants()
    out.update(
        samples=samples,
        rows=rows,
        peak_reserved=final["peak_reserved_bytes"],
        peak_used=max(x[2] for x in samples),
        peak_segments=max(x[1] for x in samples) // pool.segment_bytes,
        final_reserved=final["reserved_bytes"],
        rss=peak_rss_bytes(),
    )
    return out


def _rank_main(
    rank: int, ranks: int, send: Callable[[Any], None], cfg: _LongContext
) -> dict[str, Any]:
    """One rank of ``--ranks``: its share of the context in a ShardedKVPool."""
    import numpy as np

    from radixseg.distributed import ShardedKVPool, ShardedPrefixCache

    pool = ShardedKVPool(
        1,
        1,
        HEAD_DIM,
        page_size=cfg.page_size,
        dtype=cfg.dtype,
        device="cpu",
        segment_bytes=cfg.segment_bytes,
        budget_bytes=cfg.budget_bytes,
    )
    out = _context_phases(ShardedPrefixCache(pool), cfg, rank=rank, ranks=ranks, send=send)
    out["held"] = int(pool.shard.local_lens(np.array([cfg.tokens]))[0])
    return out


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
    ranks: int = 1,
    model: str = "tiny",
    host_budget_bytes: int = 0,
) -> DemoResult:
    """Run the demo, print what happens and a table of memory by phase.

    ``chats`` conversations of ``turns`` turns over ``system_prompts`` shared
    system prompts of ``system_len`` tokens (``reply`` decoded tokens per
    turn) come first; then one context of ``tokens`` tokens grows in
    ``chunk``-token steps and ``followups`` requests share it. ``progress``:
    a tqdm bar on stderr (``None``: only on a terminal). ``ranks`` (1 to 3):
    run the long context on that many spawned CPU processes, each holding
    ``1/ranks`` of it (``budget_bytes`` then applies to each rank's pool).
    Returns the figures (see the module doc); raises ``AssertionError`` if a
    read-back or decode check fails, :class:`radixseg._spawn.RankFailed` if a
    rank fails. ``model="scout-tiny"``: the long context in a
    :class:`GroupedKVPool` of :func:`scout_tiny_geometry` (see
    :func:`_grouped_demo`; no chat trace, one process). ``host_budget_bytes``:
    a host-memory tier (one process, ``model="tiny"``): segments the device
    ``budget_bytes`` cannot hold move there, and the decode step, which then
    reads both tiers, is checked against a dense fp32 reference.
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
        ("ranks", ranks, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidArgument(f"demo: {name} must be an integer >= {least}, got {value!r}")
    if ranks > MAX_RANKS:
        raise InvalidArgument(f"demo: ranks must be in 1..={MAX_RANKS}, got {ranks}")
    if model not in MODELS:
        raise InvalidArgument(f"demo: model must be one of {', '.join(MODELS)}, got {model!r}")
    if host_budget_bytes and (ranks > 1 or model != "tiny"):
        raise InvalidArgument(
            f"demo: --host-budget runs the tiny model in one process (got --ranks {ranks}, "
            f"--model {model})"
        )
    if model == "scout-tiny":
        if ranks > 1:
            raise InvalidArgument("demo: --model scout-tiny runs in one process (--ranks 1)")
        return _grouped_demo(
            tokens=tokens,
            chunk=chunk,
            followups=followups,
            suffix=suffix,
            page_size=page_size,
            segment_bytes=segment_bytes,
            seed=seed,
            device=device,
            dtype=dtype,
            budget_bytes=budget_bytes,
            plot=plot,
            progress=progress,
        )
    head_dim = HEAD_DIM
    pool = KVPool(
        1,
        1,
        head_dim,
        page_size=page_size,
        dtype=dtype,
        device=device,
        segment_bytes=segment_bytes,
        budget_bytes=budget_bytes,
        host_budget_bytes=host_budget_bytes,
    )
    tiered = pool.host_budget_bytes > 0
    host_samples: list[tuple[float, int]] | None = [] if tiered else None
    if ranks > 1 and pool.device.type != "cpu":
        raise InvalidArgument(
            f"demo: --ranks runs its ranks on the CPU (gloo); device {pool.device} is for one "
            f"process (several GPUs need NCCL, one per rank)"
        )
    if page_size * ranks > 1024:
        raise InvalidArgument(
            f"demo: page_size x ranks = {page_size * ranks} tokens per virtual page, past 1024"
        )
    cache = PrefixCache(pool)
    rng, prompt = _prompt(seed, tokens)
    fixed = tokens * pool.bytes_per_token
    backend: Literal["triton", "cpu"] = "triton" if pool.device.type == "cuda" else "cpu"
    bar = _Progress(progress)
    t0 = time.perf_counter()
    lines: list[str] = []
    samples: list[Sample] = []
    who = "main" if ranks > 1 else None  # the rank column of this process's rows
    storage = "FP8 e4m3 + fp32 scale" if pool.fp8 else str(pool.dtype).removeprefix("torch.")
    sharded = (
        f" sharded over {ranks} ranks (spawned CPU processes, gloo; the chat trace stays in "
        f"this process)"
        if ranks > 1
        else ""
    )
    virtual = (
        f" (virtual page {page_size * ranks} = {page_size} x {ranks} ranks)" if ranks > 1 else ""
    )
    print(
        f"radixseg demo: {chats} chats x {turns} turns over {system_prompts} shared system "
        f"prompts, then one context to {tokens:,} tokens{sharded}, {followups} follow-ups "
        f"sharing it, a second tenant, and everything handed back\n"
        f"model: 1 layer x 1 KV head x head_dim {head_dim}, {storage} = "
        f"{pool.bytes_per_token} B/token; page {page_size} tokens{virtual}; segment "
        f"{pool.segment_bytes / 2**20:g} MiB = {pool.tokens_per_segment:,} tokens; "
        f"device {pool.device}\n"
        f"a fixed pool sized for {tokens:,} tokens reserves {fixed / GB:.3f} GB before the "
        f"first request; this pool starts with {pool.stats()['reserved_bytes']} B\n",
        flush=True,
    )
    _row("start", pool, 0, t0, lines, samples, who)

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
    _row("chats", pool, trace_prompt, t0, lines, samples, who)
    if ranks > 1:
        del prompt  # each rank draws it again
        cfg = _LongContext(
            tokens,
            chunk,
            followups,
            suffix,
            page_size,
            pool.segment_bytes,
            dtype,
            budget_bytes,
            seed,
            t0,
        )
        return _sharded_phases(
            cfg, ranks, cache, bar, lines, samples, fixed, served, trace_hit, plot
        )

    # 1. Grow one context chunk by chunk.
    first_ptr: int | None = None
    done = 0
    # With a host tier the decode step reads both tiers: check it against a
    # dense fp32 reference (one query head per follow-up) built as KV is stored.
    q = torch.randn(followups, Q_HEADS, head_dim, generator=torch.Generator().manual_seed(seed + 2))
    cut = tokens // page_size * page_size  # what a follow-up finds cached
    ref: tuple[torch.Tensor, torch.Tensor] | None = None
    with bar.phase(f"grow to {tokens:,}", tokens, "tok") as b:

        def each(i: int, n: int, kv: torch.Tensor | None) -> None:
            nonlocal first_ptr, done, ref
            if first_ptr is None:
                first_ptr = pool.segment(0).k.data_ptr()
            keep = min(n, max(0, cut - done))
            if tiered and kv is not None:
                ref = _reference(ref, pool, q[:, :1], kv[:keep])
            done += n
            _row("", pool, done, t0, lines, samples, host=host_samples)
            b.update(n, pool)

        req = grow_context(cache, prompt, chunk, each=each)
    _row("grown", pool, done, t0, lines, samples, host=host_samples)
    peak = pool.stats()
    cache.finish(req)
    _row("cached", pool, done, t0, lines, samples, host=host_samples)

    # 2. Follow-ups share the whole cached prefix; a second tenant shares nothing.
    followers: list[Request] = []
    reused = 0
    suffix_ref: list[tuple[torch.Tensor, torch.Tensor]] = []
    for f in range(followups):
        question = torch.randint(0, 128_000, (suffix,), generator=rng, dtype=torch.int32)
        full = torch.cat([prompt, question])
        b0 = time.perf_counter()
        r = cache.begin(full, namespace=0)
        began = time.perf_counter() - b0
        own = cache.extend(r, r.uncached)  # prefill: only the uncached suffix
        kv = _kv(-1 - f, own.numel(), head_dim).to(pool.device)
        pool.write(0, own, kv, -kv, check=False)
        if tiered:
            got = _reference(None, pool, q[f : f + 1, :1], kv)
            assert got is not None  # the suffix holds the question's tokens
            suffix_ref.append(got)
        reused += r.cached_len
        followers.append(r)
        print(
            f"follow-up {f + 1}: reuses {r.cached_len:,} cached tokens (matched in "
            f"{began * 1e3:.1f} ms), prefills {r.uncached.numel():,}",
            flush=True,
        )
    # One decode step per follow-up, attending over its whole context straight
    # from the segments (Triton on a GPU, the native kernel on a CPU).
    d0 = time.perf_counter()
    table = cache.page_table(followers, device=pool.device)
    out = attention.decode(q.to(pool.device), pool, 0, *table, backend=backend)
    decode_s = time.perf_counter() - d0
    if not bool(torch.isfinite(out).all()):
        raise AssertionError("decode produced non-finite values")
    ctx = sum(r.seq_len for r in followers)
    print(
        f"decode ({backend}): {len(followers)} requests x {Q_HEADS} query heads over {ctx:,} "
        f"tokens of KV in {decode_s:.2f} s "
        f"({ctx * pool.bytes_per_token / decode_s / GB:.2f} GB/s of KV read)"
    )
    decode_error: float | None = None
    if tiered:
        on_host = pool.tier_of(table[1][: int(table[0][-1])]).mean()
        parts = [
            _merge(None if ref is None else (ref[0][f : f + 1], ref[1][f : f + 1]), sr)
            for f, sr in enumerate(suffix_ref)
        ]
        want = torch.cat([p[0] for p in parts if p is not None])
        decode_error = float((out[:, :1].float().cpu() - want).abs().max() / want.abs().max())
        t = pool.stats()
        print(
            f"host tier: {on_host:.0%} of the follow-ups' pages were read in place from host "
            f"segments ({t['tiers']['host']['reserved_bytes'] / GB:.3f} GB host, "
            f"{t['tiers']['device']['reserved_bytes'] / GB:.3f} GB device); {t['demotions']} "
            f"segments demoted ({t['demoted_bytes'] / GB:.3f} GB copied), none evicted "
            f"({t['evicted_pages']} pages); decode vs the dense fp32 reference: max relative "
            f"error {decode_error:.1e}"
        )
        if not decode_error < 2e-2:
            raise AssertionError(f"decode over both tiers is off by {decode_error:.3g}")
    other = cache.begin(prompt[: min(tokens, 1 << 16)], namespace=1)
    print(f"tenant 2, same prompt start: reuses {other.cached_len} tokens (namespaces never share)")
    cache.abort(other)

    # The shared prefix reads back exactly what the first request wrote: the
    # first, a middle and the last chunk, in full, through a follow-up's pages.
    ok, expected = _read_back(pool, cache, followers[0], tokens, chunk)
    moved = pool.segment(0).k.data_ptr() != first_ptr
    where = "never moved"
    if moved and tiered:
        where, moved = "moved tier (its page ids did not change)", False
    elif moved:
        where = "MOVED"
    print(
        f"read back {ok:,} of {expected:,} prefix tokens (whole chunks: first, middle, "
        f"last) exactly; segment 0 {where} while the pool grew",
        flush=True,
    )
    _row("shared", pool, done + followups * suffix, t0, lines, samples, host=host_samples)

    # 3. Everything ends: evict the cache, shrink to zero.
    for r in followers:
        cache.finish(r)
    _row("finished", pool, 0, t0, lines, samples, host=host_samples)
    cache.evict(pool.stats()["cached_pages"])
    _row("evicted", pool, 0, t0, lines, samples, host=host_samples)
    freed = pool.shrink()
    _row("shrunk", pool, 0, t0, lines, samples, host=host_samples)
    final = pool.stats()
    cache.check_invariants()
    seconds = time.perf_counter() - t0

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print("\n" + HEADER)
    print("\n".join(lines))
    print(
        f"\npeak {peak['segments']:,} segments = {peak['reserved_bytes'] / GB:.3f} GB for "
        f"{tokens:,} tokens (a fixed pool: {fixed / GB:.3f} GB from the start); "
        f"shrink() returned {freed / GB:.3f} GB, {final['reserved_bytes']} B left; "
        f"hit rate {final['hit_rate']:.1%} over all requests ({trace_hit:.1%} in the chat "
        f"trace); {final['segments_added']} growth events; peak RSS {rss / GB:.2f} GB; "
        f"{seconds:.1f} s\n" + _llama_line(tokens)
    )
    if plot:
        lines_: list[Line] = [
            (
                "radixseg reserved",
                [x[0] for x in samples],
                [x[1] for x in samples],
                {"color": "tab:blue", "step": True},
            ),
            (
                "radixseg used",
                [x[0] for x in samples],
                [x[2] for x in samples],
                {"color": "tab:green"},
            ),
        ]
        if host_samples is not None:
            lines_.append(
                (
                    "host tier reserved",
                    [x[0] for x in host_samples],
                    [x[1] for x in host_samples],
                    {"color": "tab:purple", "step": True},
                )
            )
            lines_[0] = ("radixseg reserved (both tiers)", *lines_[0][1:])
        marks = [(x[0], x[3]) for x in samples if x[3] in _MARKS]
        _print_plot(_plot(lines_, marks, fixed, tokens, plot))
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
        segment_bytes=pool.segment_bytes,
        rank_peak_reserved_bytes=(peak["reserved_bytes"],),
        rank_peak_used_bytes=(peak["used_bytes"],),
        one_process_peak_reserved_bytes=peak["reserved_bytes"],
        decode_max_error=decode_error,
        peak_host_reserved_bytes=max((h for _, h in host_samples or []), default=0),
        demotions=final["demotions"],
    )


def _llama_line(tokens: int) -> str:
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
    return (
        f"the same run with Llama-3.1-8B in FP8 ({llama.kv_bytes_per_token:,} B/token): "
        f"{llama.kv_bytes_per_token * tokens / GB:,.0f} GB of KV at its peak, 0 at rest "
        f"(`radixseg plan` sizes any model)"
    )


def _print_plot(written_to: str | None) -> None:
    print(
        f"plot: {written_to}"
        if written_to
        else "plot: skipped (pip install matplotlib to get the PNG)"
    )


def _sharded_phases(
    cfg: _LongContext,
    ranks: int,
    cache: PrefixCache,
    bar: _Progress,
    lines: list[str],
    samples: list[Sample],
    fixed: int,
    served: int,
    trace_hit: float,
    plot: str | None,
) -> DemoResult:
    """Phases 1-3 on ``ranks`` spawned processes; this process keeps the chat
    trace's pool (``cache``) and hands it back at the end."""
    import numpy as np

    pool, t0, tokens = cache.pool, cfg.t0, cfg.tokens
    # What one process would reserve: a pool making the same calls, only allocating.
    one = KVPool(
        1, 1, HEAD_DIM, page_size=cfg.page_size, dtype=cfg.dtype, segment_bytes=cfg.segment_bytes
    )
    mirror = _context_phases(PrefixCache(one), cfg, store=False)
    pids: list[int] = []

    with bar.phase(f"grow to {tokens:,} over {ranks} ranks", tokens, "tok") as b:

        def on_message(rank: int, m: Any) -> None:
            if m[0] == "grow":
                b.advance(*m[1:])

        res = run_ranks(
            _rank_main,
            ranks,
            cfg,
            timeout_s=120 + tokens / 10_000,
            on_message=on_message,
            pids=pids,
        )
    lead = res[0]
    print(f"long context: {ranks} ranks (pids {', '.join(map(str, pids))}), all joined")
    for f, (cached, began, prefilled) in enumerate(lead["followups"]):
        print(
            f"follow-up {f + 1}: reuses {cached:,} cached tokens (matched in {began * 1e3:.1f} "
            f"ms on rank 0), prefills {prefilled:,}",
            flush=True,
        )

    # The decode step: the same bits on every rank, and equal to the dense fp32
    # reference (one query head per follow-up) over the KV as stored.
    o, lse = (torch.from_numpy(x) for x in lead["decode"])
    same = all(
        all(np.array_equal(a, b) for a, b in zip(r["decode"], lead["decode"], strict=True))
        for r in res
    )
    ref = None
    for r in res:
        if "ref" in r:
            ref = _merge(ref, tuple(torch.from_numpy(x) for x in r["ref"]))  # type: ignore[arg-type]
    ref = _merge(ref, tuple(torch.from_numpy(x) for x in lead["suffix_ref"]))  # type: ignore[arg-type]
    assert ref is not None
    err = float((o[:, :1] - ref[0]).abs().max() / ref[0].abs().max().clamp_min(1e-30))
    lse_err = float((lse[:, :1] - ref[1]).abs().max())
    ok_decode = same and bool(torch.isfinite(o).all()) and err < 1e-3 and lse_err < 1e-3
    ctx = sum(c + p for c, _, p in lead["followups"])
    packed = (ranks - 1) * len(lead["followups"]) * Q_HEADS * (HEAD_DIM + 1) * 4
    bits = "the same bits on every rank" if same else "ranks DIFFER"
    seconds = max(r["decode_seconds"] for r in res)
    print(
        f"decode (cpu, {ranks} ranks): {len(lead['followups'])} requests x {Q_HEADS} query heads "
        f"over {ctx:,} tokens of KV in {seconds:.2f} s, each rank over its share; "
        f"{lead['collectives']} all-gathers, {lead['collective_bytes_received']:,} B received "
        f"per rank ({packed:,} B = (R-1) x B x H x (D+1) x 4 for the packed fp32 partials, "
        f"the rest the page-table check); {bits}; vs a dense "
        f"fp32 reference over the stored KV ({len(lead['followups'])} query rows): max relative "
        f"error {err:.1e}, log-sum-exp {lse_err:.1e}"
    )
    print(
        f"tenant 2, same prompt start: reuses {lead['other_cached']} tokens (namespaces never "
        f"share)"
    )
    ok = sum(r["read_back"][0] for r in res)
    expected = sum(r["read_back"][1] for r in res)
    moved = any(r["moved"] for r in res)
    each_rank = ", ".join(f"rank {r['rank']}: {r['read_back'][1]:,}" for r in res)
    print(
        f"read back {ok:,} of {expected:,} prefix tokens (whole chunks: first, middle, last; "
        f"{each_rank}) exactly; segment 0 {'MOVED' if moved else 'never moved'} on any rank "
        f"while the pools grew",
        flush=True,
    )

    # This process's chat-trace pool is handed back too.
    cache.evict(pool.stats()["cached_pages"])
    main_freed = pool.shrink()
    _row("shrunk", pool, 0, t0, lines, samples, "main")
    seconds_all = time.perf_counter() - t0

    table = list(lines[:-1])  # this process's rows, its "shrunk" last
    for i, (label, n, _, _) in enumerate(lead["rows"]):
        per = [r["rows"][i][2] for r in res]
        for r in res:
            table.append(_fmt_row(label, r["rows"][i][2], n, r["rows"][i][3], str(r["rank"])))
        total = {k: sum(s[k] for s in per) for k in ("segments", "reserved_bytes", "used_bytes")}
        total.update(
            cached_tokens=per[0]["cached_tokens"],
            hit_rate=per[0]["hit_rate"],
            segments_added=sum(s["segments_added"] for s in per),
        )
        table.append(_fmt_row(label, total, n, max(r["rows"][i][3] for r in res), "all"))
        table.append(_fmt_row(label, mirror["rows"][i][2], n, None, "1 proc"))
    table.append(lines[-1])
    print("\n" + HEADER_RANKS)
    print("\n".join(table))

    one_peak = mirror["peak_reserved"]
    seg = cfg.segment_bytes
    target = one_peak / ranks + seg
    worst = max(r["peak_reserved"] for r in res)
    held = ", ".join(
        f"rank {r['rank']} {r['peak_segments']} segments = {r['peak_reserved'] / GB:.3f} GB "
        f"reserved, {r['peak_used'] / GB:.3f} GB used, {r['held']:,} tokens"
        for r in res
    )
    rss = max(r["rss"] for r in res)
    print(
        f"\npeak per rank: {held}; one process making the same calls: "
        f"{one_peak // seg} segments = {one_peak / GB:.3f} GB; worst rank / one process = "
        f"{worst / one_peak:.3f} (target <= 1/{ranks} + one segment = {target / one_peak:.3f}: "
        f"{'met' if worst <= target else 'NOT met'}); shrink() returned every segment on every "
        f"rank ({sum(r['final_reserved'] for r in res)} B left) and {main_freed / GB:.3f} GB "
        f"here ({pool.stats()['reserved_bytes']} B left); peak RSS per rank {rss / GB:.2f} GB; "
        f"{seconds_all:.1f} s\n" + _llama_line(tokens)
    )
    if plot:
        per_rank = [r["samples"] for r in res]
        t = [x[0] for x in per_rank[0]]
        lines_: list[Line] = [
            (
                "this process (chat trace)",
                [x[0] for x in samples],
                [x[1] for x in samples],
                {"color": "tab:gray", "step": True},
            ),
        ]
        for r, s in enumerate(per_rank):
            lines_.append(
                (
                    f"rank {r} reserved",
                    [x[0] for x in s],
                    [x[1] for x in s],
                    {
                        "step": True,
                        "lw": 1.2,
                        "ls": ("-", "--", ":")[r % 3],
                        "color": ("tab:orange", "tab:purple", "tab:brown")[r % 3],
                    },
                )
            )
        sums: list[tuple[int, str, dict[str, Any]]] = [
            (1, "reserved", {"color": "tab:blue", "step": True, "lw": 2.0}),
            (2, "used", {"color": "tab:green"}),
        ]
        for at, what, style in sums:
            summed: list[int] = [sum(x[at] for x in xs) for xs in zip(*per_rank, strict=True)]
            lines_.append((f"ranks' sum {what}", t, summed, style))
        marks = [(x[0], x[3]) for x in samples if x[3] == "chats"]
        marks += [(x[0], x[3]) for x in per_rank[0] if x[3] in _MARKS]
        _print_plot(_plot(lines_, marks, fixed, tokens, plot))
    if ok != expected or moved:
        raise AssertionError("the demo's read-back check failed")
    if not ok_decode:
        raise AssertionError("the demo's sharded decode check failed")
    peaks = tuple(r["peak_reserved"] for r in res)
    left = sum(r["final_reserved"] for r in res) + pool.stats()["reserved_bytes"]
    return DemoResult(
        tokens=tokens,
        trace_requests=served,
        trace_hit_rate=trace_hit,
        peak_segments=sum(p // seg for p in peaks),
        peak_reserved_bytes=sum(peaks),
        fixed_pool_bytes=fixed,
        reused_tokens=sum(c for c, _, _ in lead["followups"]),
        verified_tokens=ok,
        final_reserved_bytes=left,
        peak_rss_bytes=rss,
        seconds=seconds_all,
        ranks=ranks,
        segment_bytes=seg,
        rank_peak_reserved_bytes=peaks,
        rank_peak_used_bytes=tuple(r["peak_used"] for r in res),
        one_process_peak_reserved_bytes=one_peak,
        decode_max_error=err,
        worker_pids=tuple(pids),
    )


# ----- --model scout-tiny: layer groups ----------------------------------------------------


def _grouped_demo(
    *,
    tokens: int,
    chunk: int,
    followups: int,
    suffix: int,
    page_size: int,
    segment_bytes: int,
    seed: int,
    device: str,
    dtype: str,
    budget_bytes: int | str | None,
    plot: str | None,
    progress: bool | None,
) -> DemoResult:
    """The long context of a Scout-shaped model in a :class:`GroupedKVPool`.

    One context grows to ``tokens`` (every layer of every group written), is
    cached, shared by ``followups`` requests (one decode step over all layers,
    each chunked layer with ``chunk_size``) and handed back. Beside it an
    all-layers :class:`KVPool` (today's layout: every layer keeps every token)
    makes the same cache calls, only allocating: the table and the plot show
    each group's reserved bytes, their sum and the all-layers figure, and the
    plan's (``radixseg.plan(...).reserved_bytes_grouped``) at the end.
    """
    geom = scout_tiny_geometry()
    pool = GroupedKVPool.for_geometry(
        geom,
        page_size=page_size,
        dtype=dtype,
        device=device,
        segment_bytes=segment_bytes,
        budget_bytes=budget_bytes,
    )
    flat = KVPool(
        geom.num_layers,
        1,
        HEAD_DIM,
        page_size=page_size,
        dtype=dtype,
        device="cpu",  # allocates only: its pages are never touched
        segment_bytes=segment_bytes,
    )
    cache, mirror = GroupedPrefixCache(pool), PrefixCache(flat)
    names = [group_name(pool, g) for g in range(len(pool.groups))]
    backend: Literal["triton", "cpu"] = "triton" if pool.device.type == "cuda" else "cpu"
    rng, prompt = _prompt(seed, tokens)
    fixed = tokens * flat.bytes_per_token
    storage = "FP8 e4m3 + fp32 scale" if pool.fp8 else str(pool.dtype).removeprefix("torch.")
    print(
        f"radixseg demo --model scout-tiny: one context to {tokens:,} tokens in a GroupedKVPool "
        f"(one pool per layer group), {followups} follow-ups sharing it, everything handed "
        f"back; no chat trace in this mode\n"
        f"model: Scout-shaped, {geom.num_layers} layers ({', '.join(names)}; Llama 4 Scout: 12 "
        f"full + 36 chunked 8,192) x 1 KV head x head_dim {HEAD_DIM}, {storage} = "
        f"{flat.bytes_per_token // geom.num_layers} B/token/layer; page {page_size}; segment "
        f"{pool.pools[0].segment_bytes / 2**20:g} MiB per group pool; device {pool.device}\n"
        f"beside it, an all-layers KVPool (every layer keeps every token) makes the same calls, "
        f"allocating only; a fixed all-layers pool for {tokens:,} tokens: {fixed / GB:.3f} GB\n",
        flush=True,
    )
    header = (
        f"{'phase':<10}{'tokens':>13}"
        + "".join(f"{n + ' GB':>{max(13, len(n) + 5)}}" for n in names)
        + f"{'grouped GB':>12}{'all-layers GB':>15}{'grouped/all':>13}{'s':>7}"
    )
    rows: list[str] = []
    t0 = time.perf_counter()
    # seconds, per-group reserved, all-layers reserved, phase
    samples: list[tuple[float, list[int], int, str]] = []

    def row(label: str, n: int) -> None:
        per = [int(s["reserved_bytes"]) for s in pool.stats()["groups"]]
        all_b = flat.reserved_bytes()
        now = time.perf_counter() - t0
        samples.append((now, per, all_b, label))
        if label:
            ratio = f"{sum(per) / all_b:>13.3f}" if all_b else f"{'-':>13}"
            rows.append(
                f"{label:<10}{n:>13,}"
                + "".join(
                    f"{b / GB:>{max(13, len(nm) + 5)}.3f}" for nm, b in zip(names, per, strict=True)
                )
                + f"{sum(per) / GB:>12.3f}{all_b / GB:>15.3f}{ratio}{now:>7.1f}"
            )

    bar = _Progress(progress)
    row("start", 0)
    done = 0
    with bar.phase(f"grow to {tokens:,}", tokens, "tok") as b:

        def each(i: int, n: int, kv: torch.Tensor | None) -> None:
            nonlocal done
            done += n
            row("", done)
            s = pool.stats()
            b.advance(n, s["segments"], s["reserved_bytes"])

        req, other = grow_grouped(cache, prompt, chunk, mirror=mirror, each=each)
    row("grown", done)
    peak = [int(s["reserved_bytes"]) for s in pool.stats()["groups"]]
    peak_all = flat.reserved_bytes()
    peak_segments = int(pool.stats()["segments"])
    cache.finish(req)
    if other is not None:
        mirror.finish(other)
    row("cached", done)

    followers, mfollowers = [], []
    reused = 0
    for f in range(followups):
        question = torch.randint(0, 128_000, (suffix,), generator=rng, dtype=torch.int32)
        full = torch.cat([prompt, question])
        r, m = cache.begin(full), mirror.begin(full)
        slots = cache.extend(r, r.uncached)
        mirror.extend(m, m.uncached)
        kv = _kv(-1 - f, r.uncached.numel(), HEAD_DIM).to(pool.device)
        for layer in range(pool.num_layers):
            pool.write(layer, slots, kv, -kv, check=False)
        reused += r.cached_len
        followers.append(r)
        mfollowers.append(m)
        print(
            f"follow-up {f + 1}: reuses {r.cached_len:,} cached tokens (full and chunked groups), "
            f"prefills {r.uncached.numel():,}; holds {r.window_pages()} chunked pages",
            flush=True,
        )
    # One decode step over all layers: the full layer over every token, each
    # chunked layer over its group's pages (chunk_size).
    q = torch.randn(len(followers), Q_HEADS, HEAD_DIM, generator=rng).to(pool.device)
    tables = cache.page_table(followers, device=pool.device)
    d0 = time.perf_counter()
    for layer in range(pool.num_layers):
        g, li = pool.locate(layer)
        grp = pool.groups[g]
        kw: dict[str, Any] = {} if grp.span is None else {"chunk_size": grp.span}
        out = attention.decode(q, pool.pools[g], li, *tables[g], backend=backend, **kw)
        if not bool(torch.isfinite(out).all()):
            raise AssertionError("decode produced non-finite values")
    decode_s = time.perf_counter() - d0
    read = [int(t[0][-1]) for t in tables]
    print(
        f"decode ({backend}): {len(followers)} requests x {Q_HEADS} query heads, all "
        f"{geom.num_layers} layers, in {decode_s:.2f} s; pages per layer read (all requests): "
        + ", ".join(f"{n} {k:,}" for n, k in zip(names, read, strict=True))
    )
    row("shared", done + followups * suffix)

    for r in followers:
        cache.finish(r)
    for m in mfollowers:
        mirror.finish(m)
    row("finished", 0)
    cache.evict(pool.pools[0].stats()["cached_pages"])
    mirror.evict(flat.stats()["cached_pages"])
    row("evicted", 0)
    freed = sum(p.shrink() for p in pool.pools)
    flat.shrink()
    row("shrunk", 0)
    cache.check_invariants()
    seconds = time.perf_counter() - t0
    final = pool.reserved_bytes()
    p = plan(
        geom,
        kv_dtype=dtype,
        context=tokens,
        page_size=page_size,
        segment_bytes=pool.pools[0].segment_bytes,
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print("\n" + header)
    print("\n".join(rows))
    planned = ", ".join(
        f"{n} {gp.reserved_bytes / GB:.3f} GB" for n, gp in zip(names, p.groups, strict=True)
    )
    print(
        f"\ngrouped at {tokens:,} tokens: "
        + ", ".join(f"{n} {b / GB:.3f} GB" for n, b in zip(names, peak, strict=True))
        + f" = {sum(peak) / GB:.3f} GB; all layers: {peak_all / GB:.3f} GB "
        f"({sum(peak) / peak_all:.3f} of it); plan (between steps): {planned} = "
        f"{(p.reserved_bytes_grouped or 0) / GB:.3f} GB; shrink() returned {freed / GB:.3f} GB, "
        f"{final} B left; peak RSS {rss / GB:.2f} GB; {seconds:.1f} s"
    )
    if plot:
        colors = ("tab:blue", "tab:orange", "tab:purple", "tab:brown")
        t = [x[0] for x in samples]
        lines_: list[Line] = [
            (
                f"group {n} reserved",
                t,
                [x[1][g] for x in samples],
                {"color": colors[g % len(colors)], "step": True, "lw": 1.2},
            )
            for g, n in enumerate(names)
        ]
        lines_.append(
            (
                "grouped reserved (sum)",
                t,
                [sum(x[1]) for x in samples],
                {"color": "tab:green", "step": True, "lw": 2.0},
            )
        )
        lines_.append(
            (
                "all-layers KVPool reserved",
                t,
                [x[2] for x in samples],
                {"color": "tab:gray", "step": True, "ls": "--"},
            )
        )
        marks = [(x[0], x[3]) for x in samples if x[3] in _MARKS]
        _print_plot(_plot(lines_, marks, fixed, tokens, plot, "fixed all-layers pool"))
    return DemoResult(
        tokens=tokens,
        trace_requests=0,
        trace_hit_rate=0.0,
        peak_segments=peak_segments,
        peak_reserved_bytes=sum(peak),
        fixed_pool_bytes=fixed,
        reused_tokens=reused,
        verified_tokens=0,
        final_reserved_bytes=final,
        peak_rss_bytes=rss,
        seconds=seconds,
        segment_bytes=pool.pools[0].segment_bytes,
        model="scout-tiny",
        group_names=tuple(names),
        group_peak_reserved_bytes=tuple(peak),
        all_layers_peak_reserved_bytes=peak_all,
    )
