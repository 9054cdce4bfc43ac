"""transformers generation: radixseg's cache against transformers' own caches.

One seeded random Llama (GQA 4:1; no download), greedy generation of a batch
of prompts, with:

* ``DynamicCache`` + SDPA (the reference: full-precision KV),
* ``QuantizedCache(backend="fp8")`` + SDPA (transformers' ``Fp8QuantizedLayer``:
  one frozen per-tensor scale, the whole cache dequantized every step),
* ``RadixsegCache`` with FP8 (per-token, per-head scales) and with the
  model's own dtype, under ``attn_implementation="radixseg"`` (K/V read in
  place from the segments).

Printed per cache: KV bytes held at the end (tensor bytes for transformers;
used pages for radixseg, scales included), wall time per generated token, and
agreement with the reference, two ways: free-running (the fraction of
generated tokens before each row's first divergence: one flip on a random
model's flat logits ends a row) and teacher-forced (the reference sequence fed
through each cache: top-1 agreement per position and the largest logit error
relative to the largest logit). A second phase runs a follow-up prompt sharing a long
prefix and prints the prefill time with and without prefix reuse. The last
lines print, as ratios measured in the same run, ``RadixsegCache`` (storage
in the model's dtype) against ``DynamicCache`` + sdpa: ms/token of the
generation above (its prefill included, as the table's column), ms/token of
decode steps alone (``--decode-steps`` forward passes after the prompt,
median per step), and one ``--prefill``-token prompt's prefill (best of
``--prefill-rounds`` interleaved rounds). CPU by default. Run::

    python benchmarks/bench_transformers.py            # ~1 min on 2 cores
    python benchmarks/bench_transformers.py --quick
    python benchmarks/bench_transformers.py --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import radixseg.integrations.transformers as rt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_name, write_json


def build_model(args: argparse.Namespace) -> Any:
    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        max_position_embeddings=max(args.prompt + args.new, args.prefill) + 64,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).to(args.dtype).eval()


def generate(model: Any, prompt: torch.Tensor, new: int, **kw: Any) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        **kw,
    )
    return out, time.perf_counter() - t0


@torch.no_grad()
def teacher_forced(model: Any, seq: torch.Tensor, start: int, cache: Any) -> torch.Tensor:
    """Logits ``[batch, len - start, vocab]`` for positions ``start..``: the prompt
    ``seq[:, :start]`` prefilled, then ``seq``'s own tokens fed one per step."""
    logits = [model(seq[:, :start], cache=cache, use_cache=True).logits[:, -1:]]
    for i in range(start, seq.shape[1] - 1):
        logits.append(model(seq[:, i : i + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, 1).float()


@torch.no_grad()
def decode_steps(model: Any, prompt: torch.Tensor, steps: int, cache: Any) -> float:
    """Median seconds of one greedy decode step (a forward pass of one token
    per row) after prefilling ``prompt`` into ``cache``."""
    tok = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def prefill_time(model: Any, prompt: torch.Tensor, cache: Any) -> float:
    """Seconds of one forward pass over ``prompt`` into an empty ``cache``."""
    t0 = time.perf_counter()
    model(prompt, cache=cache, use_cache=True)
    return time.perf_counter() - t0


def head_to_head(model: Any, args: argparse.Namespace, g: torch.Generator) -> dict[str, float]:
    """RadixsegCache (model dtype) against DynamicCache + sdpa, interleaved
    rounds: median decode step over the benchmark's prompt, and the best
    prefill of one ``args.prefill``-token prompt."""
    prompt = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=g)
    long = torch.randint(1, args.vocab, (1, args.prefill), generator=g)
    got: dict[str, list[float]] = {k: [] for k in ("dyn_step", "rs_step", "dyn_pre", "rs_pre")}
    for _ in range(args.prefill_rounds):
        model.set_attn_implementation("sdpa")
        got["dyn_step"].append(
            decode_steps(
                model, prompt, args.decode_steps, transformers.DynamicCache(config=model.config)
            )
        )
        got["dyn_pre"].append(
            prefill_time(model, long, transformers.DynamicCache(config=model.config))
        )
        model.set_attn_implementation("radixseg")
        for key, p, steps in (("rs_step", prompt, args.decode_steps), ("rs_pre", long, 0)):
            prefix = rt.prefix_cache_for(model.config, dtype=args.dtype, segment_bytes=16 << 20)
            cache = rt.RadixsegCache(prefix, p)
            if steps:
                got[key].append(decode_steps(model, p, steps, cache))
            else:
                got[key].append(prefill_time(model, p, cache))
            cache.abort()
    return {
        "dyn_step": sorted(got["dyn_step"])[len(got["dyn_step"]) // 2],
        "rs_step": sorted(got["rs_step"])[len(got["rs_step"]) // 2],
        "dyn_prefill": min(got["dyn_pre"]),
        "rs_prefill": min(got["rs_pre"]),
    }


def logit_error(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, max |logit error| / max |logit|) of teacher-forced logits."""
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return top1, float((got - ref).abs().max() / ref.abs().max())


def agreement(out: torch.Tensor, ref: torch.Tensor, start: int) -> float:
    """Mean fraction of each row's generated tokens before its first divergence."""
    fractions = []
    for a, b in zip(out[:, start:], ref[:, start:], strict=True):
        diff = (a != b).nonzero()
        fractions.append((int(diff[0]) if diff.numel() else a.numel()) / a.numel())
    return sum(fractions) / len(fractions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared machine)")
    ap.add_argument("--prefill", type=int, default=8192, help="tokens of the prefill comparison")
    ap.add_argument("--prefill-rounds", type=int, default=3, help="rounds of the head-to-head")
    ap.add_argument("--decode-steps", type=int, default=16, help="steps per head-to-head round")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.prompt, args.new = 2, 256, 256, 16
        args.prefill, args.prefill_rounds, args.decode_steps = 1024, 2, 8
    args.dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    model = build_model(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=g)
    n = args.prompt
    rows: list[dict[str, Any]] = []

    model.set_attn_implementation("sdpa")
    ref, t_ref = generate(model, prompt, args.new)
    dyn = transformers.DynamicCache(config=model.config)
    _, t_dyn = generate(model, prompt, args.new, cache=dyn)
    dyn_bytes = sum(lay.keys.nbytes + lay.values.nbytes for lay in dyn.layers)
    ref_logits = teacher_forced(model, ref, n, transformers.DynamicCache(config=model.config))
    rows.append(
        dict(
            cache="DynamicCache + sdpa",
            kv_bytes=dyn_bytes,
            seconds=t_dyn,
            agree=1.0,
            tf_top1=1.0,
            tf_err=0.0,
        )
    )

    q8 = transformers.QuantizedCache(backend="fp8", config=model.config)
    out, t = generate(model, prompt, args.new, cache=q8)
    q8_bytes = sum(
        lay._quantized_keys[0].nbytes + lay._quantized_values[0].nbytes for lay in q8.layers
    )
    tf = logit_error(
        teacher_forced(
            model, ref, n, transformers.QuantizedCache(backend="fp8", config=model.config)
        ),
        ref_logits,
    )
    rows.append(
        dict(
            cache="QuantizedCache(fp8) + sdpa",
            kv_bytes=q8_bytes,
            seconds=t,
            agree=agreement(out, ref, n),
            tf_top1=tf[0],
            tf_err=tf[1],
        )
    )

    model.set_attn_implementation("radixseg")
    for dtype in ("fp8", args.dtype):
        prefix = rt.prefix_cache_for(model.config, dtype=dtype, segment_bytes=16 << 20)
        cache = rt.RadixsegCache(prefix, prompt)
        out, t = generate(model, prompt, args.new, cache=cache)
        used = prefix.pool.stats()["used_bytes"]
        name = "fp8" if dtype == "fp8" else str(args.dtype).removeprefix("torch.")
        tf_prefix = rt.prefix_cache_for(model.config, dtype=dtype, segment_bytes=16 << 20)
        tf_cache = rt.RadixsegCache(tf_prefix, ref[:, :n])
        tf = logit_error(teacher_forced(model, ref, n, tf_cache), ref_logits)
        tf_cache.abort()
        rows.append(
            dict(
                cache=f"RadixsegCache({name}) + radixseg",
                kv_bytes=used,
                reserved_bytes=prefix.pool.stats()["reserved_bytes"],
                seconds=t,
                agree=agreement(out, ref, n),
                tf_top1=tf[0],
                tf_err=tf[1],
            )
        )
        cache.finish(out)
        if dtype == "fp8":
            # Follow-up: the same prompts with a new 64-token tail: only the tail is prefilled.
            tail = torch.randint(1, args.vocab, (args.batch, 64), generator=g)
            follow = torch.cat([prompt, tail], 1)
            c2 = rt.RadixsegCache(prefix, follow)
            _, t_reuse = generate(model, follow, 1, cache=c2)
            reused = c2.reused_tokens
            c2.abort()
            model.set_attn_implementation("sdpa")
            _, t_full = generate(model, follow, 1)
            model.set_attn_implementation("radixseg")

    print(
        f"# transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    )
    print(
        f"# Llama: {args.layers} layers, hidden {args.hidden}, GQA "
        f"{model.config.num_attention_heads}:{model.config.num_key_value_heads}, head_dim 64, "
        f"{args.dtype}; batch {args.batch} x prompt {args.prompt} + {args.new} new tokens"
    )
    h2h = head_to_head(model, args, g)
    name = str(args.dtype).removeprefix("torch.")
    per_tok = {r["cache"]: 1e3 * r["seconds"] / args.new for r in rows}
    gen_ratio = per_tok[f"RadixsegCache({name}) + radixseg"] / per_tok["DynamicCache + sdpa"]

    print(
        f"{'cache':34} {'KV bytes':>11} {'vs Dynamic':>10} {'ms/token':>9} {'free-run':>8} "
        f"{'TF top-1':>8} {'TF logit err':>12}"
    )
    for r in rows:
        per_tok = 1e3 * r["seconds"] / args.new
        print(
            f"{r['cache']:34} {r['kv_bytes']:>11,} {r['kv_bytes'] / dyn_bytes:>10.3f} "
            f"{per_tok:>9.2f} {r['agree']:>8.3f} {r['tf_top1']:>8.3f} {r['tf_err']:>12.2e}"
        )
    print(
        f"follow-up prompt ({args.prompt} shared + 64 new tokens, 1 generated): radixseg reused "
        f"{reused} tokens per row, {1e3 * t_reuse:.1f} ms; without reuse (sdpa, DynamicCache) "
        f"{1e3 * t_full:.1f} ms; ratio {t_full / t_reuse:.1f}x"
    )
    print(f"(reference generate without an explicit cache: {t_ref:.2f} s)")
    print(
        f"RadixsegCache({name}) / DynamicCache + sdpa ({name} KV), same run: "
        f"generate ms/token {gen_ratio:.2f}x (target <= 1.2x; prefill included); "
        f"decode step {1e3 * h2h['rs_step']:.2f} / {1e3 * h2h['dyn_step']:.2f} ms = "
        f"{h2h['rs_step'] / h2h['dyn_step']:.2f}x (median of {args.prefill_rounds} x "
        f"{args.decode_steps} steps at batch {args.batch} x {args.prompt}); "
        f"{args.prefill}-token prefill {h2h['rs_prefill']:.2f} / {h2h['dyn_prefill']:.2f} s = "
        f"{h2h['rs_prefill'] / h2h['dyn_prefill']:.2f}x (target <= 1.5x; best of "
        f"{args.prefill_rounds})"
    )
    if args.json:
        write_json(
            args.json,
            dict(
                rows=rows,
                follow_up=dict(reused=reused, seconds_reuse=t_reuse, seconds_full=t_full),
                head_to_head=dict(h2h, generate_ms_per_token_ratio=gen_ratio),
                args={k: str(v) for k, v in vars(args).items()},
            ),
        )


if __name__ == "__main__":
    main()
