"""How far bf16 radixseg logits are from DynamicCache's, next to eager vs sdpa.

For each tiny architecture (random weights from a config, bf16, nothing
downloaded) the same token sequence is fed to every variant, teacher-forced:
prefill of the prompts, then one decode step per reference token. Logits of
every step are compared with transformers' default (sdpa attention,
DynamicCache):

* ``eager``: transformers' eager attention with DynamicCache (the spread
  between transformers' own implementations);
* ``radixseg``: attn_implementation="radixseg" over a bf16 KVPool
  (attention="segments", torch backend);
* ``gather``: sdpa over a bf16 KVPool with attention="gather".

Printed per architecture: the largest |logit difference| over all steps and
rows, and how many greedy tokens (argmax) differ from the reference's.

Run: python benchmarks/bf16_deviation.py [--prompt 48] [--steps 32] [--batch 2]
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers

import radixseg.integrations.transformers as rt

VOCAB = 128


def configs() -> dict[str, transformers.PretrainedConfig]:
    t = transformers
    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    dense = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **common,
    )
    return {
        "llama": t.LlamaConfig(**dense),
        "mistral": t.MistralConfig(**dense),
        "qwen2": t.Qwen2Config(**dense),
        "qwen3": t.Qwen3Config(head_dim=16, **dense),
        "gemma": t.GemmaConfig(head_dim=16, **dense),
        "phi3": t.Phi3Config(**dense),
        "gpt_neox": t.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            **common,
        ),
        "gpt2": t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common),
        "mixtral": t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **dense),
        "qwen3_moe": t.Qwen3MoeConfig(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, **dense
        ),
    }


@torch.no_grad()
def teacher_forced(model, seq: torch.Tensor, prompt: int, cache) -> torch.Tensor:
    """Logits ``[batch, steps + 1, vocab]`` (float32): prefill, then one token per step."""
    out = [model(seq[:, :prompt], cache=cache, use_cache=True).logits[:, -1:].float()]
    for i in range(prompt, seq.shape[1] - 1):
        out.append(model(seq[:, i : i + 1], cache=cache, use_cache=True).logits.float())
    return torch.cat(out, 1)


def variant(model, cfg, seq, prompt, impl: str, kind: str) -> torch.Tensor:
    model.set_attn_implementation(impl)
    if kind == "dynamic":
        return teacher_forced(model, seq, prompt, transformers.DynamicCache(config=cfg))
    prefix = rt.prefix_cache_for(cfg, dtype="bf16", segment_bytes=1 << 20)
    attention = "segments" if impl == "radixseg" else "gather"
    cache = rt.RadixsegCache(prefix, seq[:, :prompt], attention=attention, backend="torch")
    try:
        return teacher_forced(model, seq, prompt, cache)
    finally:
        cache.abort()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3, help="models (weight seeds) per architecture")
    ap.add_argument("--json", action="store_true", help="one JSON line per architecture")
    args = ap.parse_args()
    print(
        f"bf16, {args.seeds} random models per architecture, {args.batch} rows x "
        f"({args.prompt} prompt + {args.steps} decode steps); reference: sdpa + DynamicCache"
    )
    header = f"{'arch':<10} {'|ref|max':>8} {'eager':>16} {'radixseg':>16} {'gather':>16}"
    if not args.json:
        print(header + "\n" + " " * 19 + "max|dlogit| / argmax flips, per variant")
    for name, cfg in configs().items():
        row: dict[str, list[float]] = {"eager": [0.0, 0], "radixseg": [0.0, 0], "gather": [0.0, 0]}
        scale = 0.0
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
            g = torch.Generator().manual_seed(100 + seed)
            seq = torch.randint(1, VOCAB, (args.batch, args.prompt + args.steps), generator=g)
            ref = variant(model, cfg, seq, args.prompt, "sdpa", "dynamic")
            scale = max(scale, float(ref.abs().max()))
            runs = {
                "eager": variant(model, cfg, seq, args.prompt, "eager", "dynamic"),
                "radixseg": variant(model, cfg, seq, args.prompt, "radixseg", "pool"),
                "gather": variant(model, cfg, seq, args.prompt, "sdpa", "pool"),
            }
            for key, got in runs.items():
                row[key][0] = max(row[key][0], float((got - ref).abs().max()))
                row[key][1] += int((got.argmax(-1) != ref.argmax(-1)).sum())
        if args.json:
            print(json.dumps({"arch": name, "ref_abs_max": scale, **row}))
        else:
            cells = " ".join(f"{d:>9.4f} / {int(f):<4}" for d, f in row.values())
            print(f"{name:<10} {scale:>8.3f} {cells}")
    tokens = args.seeds * args.batch * (args.steps + 1)
    if not args.json:
        print(f"(flips counted over {tokens} greedy tokens per architecture)")


if __name__ == "__main__":
    main()
