"""radixseg.attention decode/extend against a peer, timed in the same run.

GPU (the default): KV lives in a segmented KVPool with each request's pages
shuffled across segments; radixseg's Triton kernels read it through the
segment table. Peers, measured in the same process on the same data:

* FlashInfer (if importable) over one contiguous paged tensor
  ``[num_pages, 2, page_size, kv_heads, head_dim]`` of the same dtype (FP8
  with a per-tensor scale of 1, since FlashInfer has no per-token scales):
  the price of segments;
* otherwise torch SDPA over a gathered contiguous bf16 copy of the KV (the
  gather itself is not timed).

Each case prints milliseconds (``triton.testing.do_bench``), the KV bytes read
per second, that bandwidth as a share of this device's measured copy
bandwidth, the ratio ours / peer (time), and the largest difference between
the two outputs (a broken kernel cannot win quietly).

``--cpu`` instead measures the CPU backends decoding one long request (the
native kernel, ``backend="cpu"``, in each instruction set this CPU has, and
the pure-torch implementation), each against a plain memcpy of the same
bytes (ratio = memcpy time / decode time) and checked against torch's output.
Cases run in interleaved rounds (best round kept), each after the same
untimed read of a buffer 4x the last-level cache, so that no case inherits
another's dirty cache lines.

``--cpu`` also times the native CPU **extend** kernel (``paged_extend_cpu``,
the kernel behind ``attention.extend(backend="cpu")``) on one request of
cached prefix + new tokens (0+1,024, 4K+512, 32K+256; ``--q-heads`` /
``--kv-heads`` / ``--head-dim``, FP8 e4m3 and bf16 storage) against torch
SDPA (``scaled_dot_product_attention``, bottom-right causal mask) over an
already dequantized contiguous copy of the same K/V, in bf16 (the GPU
peer's dtype; FP8 values rounded) and in float32 (exact), in the same run
(best of ``--extend-rounds`` interleaved rounds); ratio = native / SDPA
time, and each one's largest error against a float64 reference over the
exactly dequantized K/V (the native kernel's output in float32).
``--cpu-only decode`` or ``extend`` runs one part.

Without a CUDA device (and without ``--cpu``) it says so and exits 0: no
numbers are invented.

Usage: python benchmarks/bench_attention.py [--long 1000000] [--json out.json]
       python benchmarks/bench_attention.py --cpu [--cpu-tokens 1000000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import radixseg
from radixseg import KVPool
from radixseg import attention as A

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import best_interleaved, print_table, write_json

GB = 1e9
KV_DTYPES = {"e4m3": torch.float8_e4m3fn, "bf16": torch.bfloat16, "f32": torch.float32}


# ----- building a scattered pool ---------------------------------------------------------------


def build(
    kv_dtype: torch.dtype,
    lens: list[int],
    *,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    device: str,
    seed: int = 0,
) -> tuple[KVPool, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 1-layer pool holding ``lens`` tokens per request, pages shuffled over
    segments; returns ``(pool, kv_indptr, kv_indices, kv_last_page_len)`` (CPU int32)."""
    pool = KVPool(1, kv_heads, head_dim, page_size=page_size, dtype=kv_dtype, device=device)
    need = [-(-n // page_size) for n in lens]
    ids = pool.alloc(sum(need))
    gen = torch.Generator().manual_seed(seed)
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    slots_all = (ids.long()[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    chunk = 1 << 18
    for s in range(0, slots_all.numel(), chunk):
        slots = slots_all[s : s + chunk].to(device)
        kv = torch.randn(slots.numel(), kv_heads, head_dim, device=device)
        A.store_kv(pool, 0, slots, kv, kv.flip(-1), check=False)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.tensor(need, dtype=torch.int32), 0)
    last = torch.tensor([(n - 1) % page_size + 1 for n in lens], dtype=torch.int32)
    return pool, indptr, ids, last


def kv_bytes(pool: KVPool, tokens: int) -> int:
    """Bytes one pass over ``tokens`` tokens of one layer reads (K, V and scales)."""
    per = pool.num_kv_heads * (2 * pool.head_dim * pool._elem + (8 if pool.fp8 else 0))
    return tokens * per


def gather_dense(
    pool: KVPool, indptr: torch.Tensor, indices: torch.Tensor, lens: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per request, dequantized bf16 K, V ``[kv_heads, len, head_dim]``."""
    from radixseg.kernels.torch_backend import gather_kv

    out = []
    for i, n in enumerate(lens):
        k, v = gather_kv(pool, 0, indices[indptr[i] : indptr[i + 1]], torch.bfloat16)
        out.append((k[:n].transpose(0, 1).contiguous(), v[:n].transpose(0, 1).contiguous()))
    return out


def contiguous_paged(
    pool: KVPool, indptr: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's NHD cache ``[pages, 2, page_size, kv_heads, head_dim]`` in the
    pool's dtype (FP8 codes copied as they are), and the remapped page ids."""
    n = int(indptr[-1])
    cache = torch.empty(
        (n, 2, pool.page_size, pool.num_kv_heads, pool.head_dim),
        dtype=pool.dtype,
        device=pool.device,
    )
    pps = pool.pages_per_segment
    raw = cache.view(torch.uint8) if pool.fp8 else cache
    ids = indices[:n].long()
    for sid in torch.unique(ids // pps).tolist():
        sel = (ids // pps == sid).nonzero().squeeze(1)
        seg = pool.segment(sid)
        at = (ids[sel] - sid * pps).to(pool.device)
        for j, src in enumerate((seg.k, seg.v)):
            x = src[0].view(torch.uint8) if pool.fp8 else src[0]
            raw[sel.to(pool.device), j] = x.index_select(0, at)
    return cache, torch.arange(n, dtype=torch.int32, device=pool.device)


# ----- timing -------------------------------------------------------------------------------------


def bench_gpu(fn: Callable[[], Any]) -> float:
    """Milliseconds, median of triton.testing.do_bench."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200))


def copy_bandwidth() -> float:
    """This device's device-to-device copy bandwidth, GB/s (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_gpu(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / GB


def decode_case(
    name: str, kv: str, lens: list[int], args: argparse.Namespace, peak: float
) -> dict[str, Any]:
    heads, kv_heads, d, ps = args.q_heads, args.kv_heads, args.head_dim, args.page_size
    pool, indptr, indices, last = build(
        KV_DTYPES[kv], lens, kv_heads=kv_heads, head_dim=d, page_size=ps, device="cuda"
    )
    q = torch.randn(len(lens), heads, d, device="cuda", dtype=torch.bfloat16)
    d_indptr, d_indices, d_last = (t.cuda() for t in (indptr, indices, last))

    def ours() -> torch.Tensor:
        return A.decode(q, pool, 0, d_indptr, d_indices, d_last, check=False)

    out = ours()
    ms = bench_gpu(ours)
    nbytes = kv_bytes(pool, sum(lens))
    rec: dict[str, Any] = {
        "case": name,
        "kv": kv,
        "batch": len(lens),
        "tokens": sum(lens),
        "segments": pool.stats()["segments"],
        "ms": ms,
        "GBps": nbytes / (ms * 1e-3) / GB,
    }
    rec["share_of_copy_bw"] = rec["GBps"] / peak
    peer, peer_name = peer_decode(pool, indptr, indices, last, q, lens)
    if peer is not None:
        ref = peer()
        rec.update(peer=peer_name, peer_ms=bench_gpu(peer))
        rec["ratio_ours_over_peer"] = ms / rec["peer_ms"]
        rec["max_abs_diff"] = _diff(out, ref, pool, peer_name)
    return rec


def peer_decode(
    pool: KVPool,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    last: torch.Tensor,
    q: torch.Tensor,
    lens: list[int],
) -> tuple[Callable[[], torch.Tensor] | None, str]:
    heads, d = q.shape[1], q.shape[2]
    try:
        import flashinfer
    except ImportError:
        flashinfer = None
    if flashinfer is not None:
        try:
            cache, ids = contiguous_paged(pool, indptr, indices)
            ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
            w.plan(
                indptr.cuda(),
                ids,
                last.cuda(),
                heads,
                pool.num_kv_heads,
                d,
                pool.page_size,
                q_data_type=q.dtype,
                kv_data_type=pool.dtype,
            )
            if pool.fp8:
                return (lambda: w.run(q, cache, k_scale=1.0, v_scale=1.0)), "flashinfer"
            return (lambda: w.run(q, cache)), "flashinfer"
        except Exception as e:  # a peer that fails is reported, not fatal
            print(f"  flashinfer decode failed ({type(e).__name__}: {e}); using torch SDPA")
    dense = gather_dense(pool, indptr, indices, lens)
    f = torch.nn.functional.scaled_dot_product_attention

    def sdpa() -> torch.Tensor:
        outs = [
            f(q[i : i + 1, :, None], k[None], v[None], enable_gqa=True)[:, :, 0]
            for i, (k, v) in enumerate(dense)
        ]
        return torch.cat(outs)

    return sdpa, "torch_sdpa(gathered)"


def extend_case(
    name: str, kv: str, prefix: int, new: int, batch: int, args: argparse.Namespace, peak: float
) -> dict[str, Any]:
    heads, kv_heads, d, ps = args.q_heads, args.kv_heads, args.head_dim, args.page_size
    lens = [prefix + new] * batch
    pool, indptr, indices, last = build(
        KV_DTYPES[kv], lens, kv_heads=kv_heads, head_dim=d, page_size=ps, device="cuda"
    )
    q = torch.randn(batch * new, heads, d, device="cuda", dtype=torch.bfloat16)
    qo_indptr = torch.arange(0, batch * new + 1, new, dtype=torch.int32)
    dev = [t.cuda() for t in (qo_indptr, indptr, indices, last)]

    def ours() -> torch.Tensor:
        return A.extend(q, pool, 0, *dev, check=False)

    out = ours()
    ms = bench_gpu(ours)
    rec: dict[str, Any] = {
        "case": name,
        "kv": kv,
        "batch": batch,
        "prefix": prefix,
        "new": new,
        "ms": ms,
    }
    # Causal FLOPs: each new token sees the prefix plus the new tokens before it.
    seen = batch * (new * prefix + new * (new + 1) / 2)
    rec["TFLOPs"] = 4 * seen * heads * d / (ms * 1e-3) / 1e12
    peer, peer_name = None, ""
    try:
        import flashinfer

        cache, ids = contiguous_paged(pool, indptr, indices)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(
            dev[0],
            indptr.cuda(),
            ids,
            last.cuda(),
            heads,
            pool.num_kv_heads,
            d,
            pool.page_size,
            causal=True,
            q_data_type=q.dtype,
            kv_data_type=pool.dtype,
        )
        if pool.fp8:
            peer, peer_name = (lambda: w.run(q, cache, k_scale=1.0, v_scale=1.0)), "flashinfer"
        else:
            peer, peer_name = (lambda: w.run(q, cache)), "flashinfer"
    except Exception as e:
        if not isinstance(e, ImportError):
            print(f"  flashinfer prefill failed ({type(e).__name__}: {e}); using torch SDPA")
        dense = gather_dense(pool, indptr, indices, lens)
        k = torch.stack([x[0] for x in dense])  # [batch, kv_heads, len, d]
        v = torch.stack([x[1] for x in dense])
        qb = q.view(batch, new, heads, d).transpose(1, 2)
        # New token j sits at position prefix + j: a bottom-right aligned causal mask.
        mask = torch.ones(new, prefix + new, dtype=torch.bool, device=q.device).tril(prefix)
        f = torch.nn.functional.scaled_dot_product_attention

        def sdpa() -> torch.Tensor:
            o = f(qb, k, v, attn_mask=mask, enable_gqa=True)
            return o.transpose(1, 2).reshape(batch * new, heads, d)

        peer, peer_name = sdpa, "torch_sdpa(gathered)"
    ref = peer()
    rec.update(peer=peer_name, peer_ms=bench_gpu(peer))
    rec["ratio_ours_over_peer"] = ms / rec["peer_ms"]
    rec["max_abs_diff"] = _diff(out, ref, pool, peer_name)
    return rec


def _diff(out: torch.Tensor, ref: torch.Tensor, pool: KVPool, peer: str) -> float | None:
    """Largest output difference, or None where the peer reads other values: FlashInfer
    reads the FP8 codes with a scale of 1 (it has no per-token scales), so only its
    time is comparable."""
    if pool.fp8 and peer == "flashinfer":
        return None
    return float((out.float() - ref.float()).abs().max())


def run_gpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    name = torch.cuda.get_device_name()
    peak = copy_bandwidth()
    print(f"device: {name}; measured copy bandwidth {peak:,.0f} GB/s")
    print(
        f"heads: q {args.q_heads}, kv {args.kv_heads}, head_dim {args.head_dim}, "
        f"page_size {args.page_size}, bf16 queries"
    )
    records = []
    for kv in args.kv:
        cases = [("decode 64 x 4,096", [4096] * 64), ("decode 1 x long", [args.long])]
        for case, lens in cases:
            rec = decode_case(case, kv, lens, args, peak)
            records.append(rec)
            print(_line(rec))
            torch.cuda.empty_cache()
        rec = extend_case("extend 8 x (2,048 + 512)", kv, 2048, 512, 8, args, peak)
        records.append(rec)
        print(_line(rec))
    return records


def _line(rec: dict[str, Any]) -> str:
    parts = [f"{rec['case']:<26} {rec['kv']:<5} ours {rec['ms']:9.3f} ms"]
    if "GBps" in rec:
        parts.append(f"{rec['GBps']:8,.0f} GB/s ({100 * rec['share_of_copy_bw']:4.1f}% of copy)")
    if "TFLOPs" in rec:
        parts.append(f"{rec['TFLOPs']:7.1f} TFLOP/s")
    if "peer_ms" in rec:
        parts.append(
            f"| {rec['peer']} {rec['peer_ms']:9.3f} ms "
            f"| ours/peer {rec['ratio_ours_over_peer']:5.2f} | max|diff| "
            + ("n/a" if rec["max_abs_diff"] is None else f"{rec['max_abs_diff']:.2e}")
        )
    return " ".join(parts)


# ----- CPU: the torch backend against memcpy ---------------------------------------------------


def _llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs; 32 MiB where it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=32 << 20)


def run_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    recs = []
    if args.cpu_only != "extend":
        recs += _cpu_decode_rows(args)
        recs += [rec for kv in args.kv for rec in _cpu_case(args, kv)]
    if args.cpu_only != "decode":
        recs += _cpu_extend_cases(args)
    return recs


CPU_EXTEND = [(0, 1024), (4096, 512), (32768, 256)]


def _reference_extend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float
) -> torch.Tensor:
    """float64 causal attention of ``q [new, heads, d]`` over ``k``/``v [kv_heads, n, d]``
    (float64), row ``j`` at position ``prefix + j``; one KV head at a time."""
    new, heads, d = q.shape
    kv_heads, n, _ = k.shape
    group = heads // kv_heads
    out = torch.empty(new, heads, d, dtype=torch.float64)
    qd = q.double().view(new, kv_heads, group, d)
    hidden = torch.arange(n)[None, :] > (prefix + torch.arange(new))[:, None]  # [new, n]
    for h in range(kv_heads):
        s = torch.einsum("rgd,td->grt", qd[:, h], k[h]) * scale
        s.masked_fill_(hidden[None], -float("inf"))
        out[:, h * group : (h + 1) * group] = torch.einsum(
            "grt,td->rgd", torch.softmax(s, -1), v[h]
        )
    return out


def _cpu_extend_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    from radixseg.kernels.cpu import paged_extend_cpu
    from radixseg.kernels.torch_backend import gather_kv

    heads, kv_heads, d = args.q_heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    threads = torch.get_num_threads()
    sdpa_fn = torch.nn.functional.scaled_dot_product_attention
    print(
        f"cpu extend: 1 request, {heads} query heads / {kv_heads} KV heads, head_dim {d}, "
        f"page_size {args.page_size} (pages shuffled), {threads} threads; "
        f"SDPA over a dequantized contiguous bf16 (and float32) copy; "
        f"best of {args.extend_rounds} interleaved rounds"
    )
    headers = [
        "kv",
        "prefix+new",
        "native ms",
        "sdpa bf16 ms",
        "native/sdpa",
        "sdpa f32 ms",
        "native/sdpa f32",
        "err native",
        "err sdpa bf16",
        "err sdpa f32",
    ]
    rows, recs = [], []
    for kv in ("e4m3", "bf16"):
        for prefix, new in CPU_EXTEND:
            n = prefix + new
            pool, indptr, indices, _last = build(
                KV_DTYPES[kv], [n], kv_heads=kv_heads, head_dim=d, page_size=args.page_size,
                device="cpu",
            )  # fmt: skip
            gen = torch.Generator().manual_seed(prefix + new)
            # bf16 queries, handed to the native kernel as their exact float32 values.
            qb16 = torch.randn(new, heads, d, generator=gen).to(torch.bfloat16)
            q32 = qb16.float()
            qo = torch.tensor([0, new]).numpy()
            table = (indptr.numpy().astype("int64"), indices.numpy().astype("int64"))
            lens = torch.tensor([n]).numpy()

            def native(q32: torch.Tensor = q32, pool: KVPool = pool, qo: Any = qo,
                       table: Any = table, lens: Any = lens) -> torch.Tensor:  # fmt: skip
                ptr, ids = table
                return paged_extend_cpu(q32, pool, 0, qo, ptr, ids, lens, sm_scale=scale)[0]

            k64, v64 = gather_kv(pool, 0, indices[: int(indptr[1])], torch.float64)
            k64 = k64[:n].transpose(0, 1).contiguous()  # [kv_heads, n, d]
            v64 = v64[:n].transpose(0, 1).contiguous()
            kb, vb = k64.to(torch.bfloat16)[None], v64.to(torch.bfloat16)[None]
            qs = qb16.view(1, new, heads, d).transpose(1, 2)
            mask = None if prefix == 0 else torch.ones(new, n, dtype=torch.bool).tril(prefix)

            def sdpa(qs: torch.Tensor = qs, kb: torch.Tensor = kb, vb: torch.Tensor = vb,
                     mask: torch.Tensor | None = mask, new: int = new) -> torch.Tensor:  # fmt: skip
                o = sdpa_fn(qs, kb, vb, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
                return o.transpose(1, 2).reshape(new, heads, d)

            kf, vf, qf = k64.float()[None], v64.float()[None], qs.float()

            def sdpa32(qf: torch.Tensor = qf, kf: torch.Tensor = kf, vf: torch.Tensor = vf,
                       mask: Any = mask, new: int = new) -> torch.Tensor:  # fmt: skip
                o = sdpa_fn(qf, kf, vf, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
                return o.transpose(1, 2).reshape(new, heads, d)

            cases: dict[str, Callable[[], Any]] = {
                "native": native,
                "sdpa": sdpa,
                "sdpa32": sdpa32,
            }
            best = best_interleaved(cases, args.extend_rounds)
            want = _reference_extend(q32, k64, v64, prefix, scale)
            err_native = float((native().double() - want).abs().max())
            err_sdpa = float((sdpa().double() - want).abs().max())
            err_sdpa32 = float((sdpa32().double() - want).abs().max())
            rec = {
                "op": "extend",
                "kv": kv,
                "prefix": prefix,
                "new": new,
                "q_heads": heads,
                "kv_heads": kv_heads,
                "head_dim": d,
                "native_s": best["native"],
                "sdpa_s": best["sdpa"],
                "ratio_native_over_sdpa": best["native"] / best["sdpa"],
                "sdpa_f32_s": best["sdpa32"],
                "ratio_native_over_sdpa_f32": best["native"] / best["sdpa32"],
                "max_err_native_vs_f64": err_native,
                "max_err_sdpa_vs_f64": err_sdpa,
                "max_err_sdpa_f32_vs_f64": err_sdpa32,
                "threads": threads,
            }
            recs.append(rec)
            rows.append(
                [
                    kv,
                    f"{prefix:,}+{new:,}",
                    f"{best['native'] * 1e3:.1f}",
                    f"{best['sdpa'] * 1e3:.1f}",
                    f"{rec['ratio_native_over_sdpa']:.2f}",
                    f"{best['sdpa32'] * 1e3:.1f}",
                    f"{rec['ratio_native_over_sdpa_f32']:.2f}",
                    f"{err_native:.1e}",
                    f"{err_sdpa:.1e}",
                    f"{err_sdpa32:.1e}",
                ]
            )
            del pool, k64, v64, kb, vb, kf, vf
    print_table(headers, rows)
    return recs


CPU_DECODE = [(1024, 1), (1024, 8), (8192, 1), (8192, 8)]


def _median_per_call(
    cases: dict[str, Callable[[], Any]], rounds: int, budget_s: float = 0.02
) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds of each case's seconds per call,
    each round timing as many back-to-back calls as fill about ``budget_s``
    (calls of 0.1 ms are too short to time one by one)."""
    reps = {}
    for name, fn in cases.items():
        fn()
        t = time.perf_counter()
        fn()
        reps[name] = max(1, min(200, int(budget_s / max(time.perf_counter() - t, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t) / reps[name])
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def _cpu_decode_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode at ordinary sizes: ``attention.decode(backend="cpu", check=False)``
    (the whole public call: validation, table, kernel) against torch SDPA over
    a contiguous, already dequantized copy of the same K/V (bf16 and float32)
    and against a memcpy of the bytes the kernel reads; medians of
    interleaved rounds, warm caches (the KV of the smaller rows fits the LLC,
    as a decode step's does layer after layer in a small model)."""
    sdpa_fn = torch.nn.functional.scaled_dot_product_attention
    hq, hk, d = args.q_heads, args.kv_heads, args.head_dim
    recs: list[dict[str, Any]] = []
    rows = []
    headers = [
        "kv",
        "tokens x batch",
        "KV MB",
        "native ms",
        "sdpa bf16 ms",
        "native/sdpa bf16",
        "sdpa f32 ms",
        "native/sdpa f32",
        "memcpy ms",
        "of memcpy",
        "max |diff| f32",
    ]
    print(
        f"cpu decode: attention.decode(backend='cpu') vs SDPA over a contiguous copy, "
        f"{hq} query / {hk} KV heads, head_dim {d}, page {args.page_size}, "
        f"{torch.get_num_threads()} threads; median of {args.decode_rounds} interleaved rounds"
    )
    for kv in args.kv:
        for tokens, batch in CPU_DECODE:
            pool, indptr, indices, last = build(
                KV_DTYPES[kv],
                [tokens] * batch,
                kv_heads=hk,
                head_dim=d,
                page_size=args.page_size,
                device="cpu",
            )
            q = torch.randn(batch, hq, d)
            from radixseg.kernels.torch_backend import gather_kv

            dense = [
                gather_kv(pool, 0, indices[indptr[i] : indptr[i + 1]], torch.float32)
                for i in range(batch)
            ]  # exact float32 values (FP8 codes times their scales)
            kf = torch.stack([k[:tokens].transpose(0, 1) for k, _ in dense]).contiguous()
            vf = torch.stack([v[:tokens].transpose(0, 1) for _, v in dense]).contiguous()
            kb, vb = kf.to(torch.bfloat16), vf.to(torch.bfloat16)
            qs, qb = q.unsqueeze(2), q.unsqueeze(2).to(torch.bfloat16)
            nbytes = kv_bytes(pool, tokens * batch)
            src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
            dst = torch.empty_like(src)

            def native(
                q: torch.Tensor = q, pool: KVPool = pool, t: Any = (indptr, indices, last)
            ) -> torch.Tensor:
                return A.decode(q, pool, 0, *t, backend="cpu", check=False)

            cases: dict[str, Callable[[], Any]] = {
                "native": native,
                "sdpa_bf16": lambda qb=qb, kb=kb, vb=vb: sdpa_fn(qb, kb, vb, enable_gqa=True),
                "sdpa_f32": lambda qs=qs, kf=kf, vf=vf: sdpa_fn(qs, kf, vf, enable_gqa=True),
                "memcpy": lambda src=src, dst=dst: dst.copy_(src),
            }
            med = _median_per_call(cases, args.decode_rounds)
            diff = float((native() - sdpa_fn(qs, kf, vf, enable_gqa=True)[:, :, 0]).abs().max())
            rec = {
                "kv": kv,
                "tokens": tokens,
                "batch": batch,
                "bytes": nbytes,
                "native_s": med["native"],
                "sdpa_bf16_s": med["sdpa_bf16"],
                "sdpa_f32_s": med["sdpa_f32"],
                "memcpy_s": med["memcpy"],
                "ratio_native_over_sdpa_bf16": med["native"] / med["sdpa_bf16"],
                "ratio_native_over_sdpa_f32": med["native"] / med["sdpa_f32"],
                "ratio_memcpy_over_native": med["memcpy"] / med["native"],
                "max_diff_vs_sdpa_f32": diff,
                "threads": torch.get_num_threads(),
            }
            recs.append(rec)
            rows.append(
                [
                    kv,
                    f"{tokens:,} x {batch}",
                    f"{nbytes / 1e6:.1f}",
                    f"{med['native'] * 1e3:.3f}",
                    f"{med['sdpa_bf16'] * 1e3:.3f}",
                    f"{rec['ratio_native_over_sdpa_bf16']:.2f}",
                    f"{med['sdpa_f32'] * 1e3:.3f}",
                    f"{rec['ratio_native_over_sdpa_f32']:.2f}",
                    f"{med['memcpy'] * 1e3:.3f}",
                    f"{rec['ratio_memcpy_over_native']:.2f}",
                    f"{diff:.1e}",
                ]
            )
            del pool, dense, kf, vf, kb, vb, src, dst
    print_table(headers, rows)
    return recs


def _cpu_case(args: argparse.Namespace, kv: str) -> list[dict[str, Any]]:
    from radixseg.kernels.cpu import ISAS, paged_decode_cpu

    tokens, d, kv_heads = args.cpu_tokens, args.head_dim, 1
    group = args.q_heads // args.kv_heads
    recs = []
    t0 = time.perf_counter()
    pool, indptr, indices, last = build(
        KV_DTYPES[kv],
        [tokens],
        kv_heads=kv_heads,
        head_dim=d,
        page_size=args.page_size,
        device="cpu",
    )
    built = time.perf_counter() - t0
    print(
        f"cpu: 1 request of {tokens:,} tokens, 1 KV head x {group} query heads, "
        f"head_dim {d}, {kv} ({pool.stats()['segments']} segments, pages shuffled, "
        f"built in {built:.1f} s), {torch.get_num_threads()} threads"
    )
    q = torch.randn(1, group, d)
    nbytes = kv_bytes(pool, tokens)
    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    ref = A.decode(q, pool, 0, indptr, indices, last, backend="torch", check=False)
    host = (indptr.numpy().astype("int64"), indices.numpy().astype("int64"))
    lens = torch.tensor([tokens]).numpy()
    scale = d**-0.5

    def native(isa: str) -> Callable[[], torch.Tensor]:
        return lambda: paged_decode_cpu(q, pool, 0, *host, lens, sm_scale=scale, isa=isa)[0]

    def torch_backend() -> torch.Tensor:
        return A.decode(q, pool, 0, indptr, indices, last, backend="torch", check=False)

    cases: dict[str, Callable[[], Any]] = {"memcpy": lambda: dst.copy_(src)}
    cases.update({f"cpu kernel ({isa})": native(isa) for isa in ISAS})
    cases["torch"] = torch_backend
    # Rounds interleave every case, so that a change in the machine's
    # state (frequency, other tenants, page-table warmth) hits all alike;
    # each case keeps its best round. Before each call, an untimed read of
    # a buffer four times the last-level cache leaves every case the same
    # cache: clean lines only, as after an engine's MLP has streamed its
    # weights. (Without it, a case run right after memcpy pays for the
    # dirty lines memcpy left: 21 ms instead of 16 ms for the kernel here.)
    scrub = torch.ones(_llc_bytes() * 4 // 8, dtype=torch.int64)
    best = best_interleaved(cases, args.rounds, before=scrub.sum)
    t_copy = best.pop("memcpy")
    copy_bw = nbytes / t_copy / GB
    print(
        f"  {'memcpy (same bytes)':20s} {t_copy * 1e3:7.1f} ms = {copy_bw:6.2f} GB/s "
        f"(best of {args.rounds} rounds, interleaved, cache scrubbed before each)"
    )
    for name, t in best.items():
        err = (cases[name]().float() - ref.float()).abs().max().item()
        rec = {
            "kv": kv,
            "backend": name,
            "tokens": tokens,
            "bytes": nbytes,
            "decode_s": t,
            "decode_GBps": nbytes / t / GB,
            "memcpy_GBps": copy_bw,
            "ratio": t_copy / t,
            "max_diff_vs_torch": err,
            "threads": torch.get_num_threads(),
        }
        recs.append(rec)
        print(
            f"  {name:20s} {t * 1e3:7.1f} ms = {rec['decode_GBps']:6.2f} GB/s; "
            f"ratio to memcpy {rec['ratio']:.2f}; max |diff| vs torch {err:.1e}"
        )
    return recs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv", action="append", choices=sorted(KV_DTYPES), help="storage dtypes")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--long", type=int, default=1_000_000, help="tokens of the long decode case")
    p.add_argument("--cpu", action="store_true", help="measure the CPU backends against memcpy")
    p.add_argument("--cpu-tokens", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=7, help="CPU: rounds, best kept")
    p.add_argument("--extend-rounds", type=int, default=3, help="CPU extend: rounds, best kept")
    p.add_argument(
        "--decode-rounds", type=int, default=15, help="CPU decode rows: rounds, median kept"
    )
    p.add_argument(
        "--cpu-only", choices=["decode", "extend"], help="CPU: run only the decode or extend part"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--json", help="write the records here")
    args = p.parse_args(argv)
    args.kv = args.kv or (["e4m3"] if args.cpu else ["e4m3", "bf16"])
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"radixseg": radixseg.__version__}
    if args.cpu:
        out["cpu"] = run_cpu(args)
    elif not torch.cuda.is_available():
        print(
            "bench_attention: no CUDA device here, so the GPU benchmark did not run and "
            "reports no numbers (use --cpu to measure the torch backend against memcpy)."
        )
        return 0
    else:
        out["gpu"] = run_gpu(args)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
