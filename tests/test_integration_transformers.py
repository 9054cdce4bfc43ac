"""radixseg behind Hugging Face transformers: RadixsegCache + attn_implementation="radixseg".

Tiny models are built from a config with seeded random weights (nothing is
downloaded). The reference is transformers' own default cache (DynamicCache)
with SDPA attention, on the same model.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import radixseg.integrations.transformers as rt  # noqa: E402
from radixseg import BudgetExhausted, InvalidArgument  # noqa: E402

VOCAB = 256


def _llama(dtype: torch.dtype = torch.float32, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA 2:1
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _qwen2_config(**overrides: object) -> transformers.Qwen2Config:
    args: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,  # GQA 4:1, biased q/k/v projections
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    args.update(overrides)
    return transformers.Qwen2Config(**args)


def _qwen2(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(1)
    return transformers.Qwen2ForCausalLM(_qwen2_config()).to(dtype).eval()


MODELS = {"llama": _llama, "qwen2": _qwen2}


def _prompts(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, n), generator=g)


def _generate(model, prompt, new, **kw) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        do_sample=False,
        **kw,
    )


def _reference(model, prompt, new) -> torch.Tensor:
    model.set_attn_implementation("sdpa")
    return _generate(model, prompt, new)


def _radixseg(
    model, prefix, prompt, new, backend="torch", **cache_kw
) -> tuple[torch.Tensor, rt.RadixsegCache]:
    model.set_attn_implementation("radixseg")
    cache = rt.RadixsegCache(prefix, prompt, backend=backend, **cache_kw)
    out = _generate(model, prompt, new, cache=cache)
    return out, cache


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_tokens_equal_default_cache(arch, dtype, backend):
    """Decode steps on the torch backend and on the native CPU kernel."""
    model = MODELS[arch](dtype)
    prompt = _prompts(2, 45)
    ref = _reference(model, prompt, 24)
    prefix = rt.prefix_cache_for(model.config, dtype=dtype, segment_bytes=1 << 18)
    out, cache = _radixseg(model, prefix, prompt, 24, backend=backend)
    assert torch.equal(out, ref)
    assert cache.computed_tokens == 45 + 23  # the last generated token is never fed back
    cache.finish(out)
    prefix.check_invariants()
    # Whole pages of prompt + answer (68 tokens -> 4 pages) are cached per row.
    assert prefix.tree.cached_tokens() == 2 * 64


def test_fp8_storage_agreement_is_bounded_and_beats_per_tensor_fp8(capsys):
    """FP8 KV with per-(token, head) scales against transformers' Fp8QuantizedLayer
    (one frozen per-tensor scale), both scored by agreement with the fp32 cache."""
    model = _llama(torch.float32)
    prompt = _prompts(4, 64, seed=3)
    new = 32
    ref = _reference(model, prompt, new)
    prefix = rt.prefix_cache_for(model.config, dtype="fp8", segment_bytes=1 << 18)
    ours, cache = _radixseg(model, prefix, prompt, new)
    used = prefix.pool.stats()["used_bytes"]
    cache.abort()

    model.set_attn_implementation("sdpa")
    hf_cache = transformers.QuantizedCache(backend="fp8", config=model.config)
    theirs = _generate(model, prompt, new, cache=hf_cache)
    hf_bytes = sum(
        layer._quantized_keys[0].nbytes + layer._quantized_values[0].nbytes
        for layer in hf_cache.layers
    )

    def agreement(out: torch.Tensor) -> float:
        return float((out[:, 64:] == ref[:, 64:]).float().mean())

    a_ours, a_hf = agreement(ours), agreement(theirs)
    with capsys.disabled():
        print(
            f"\nFP8 greedy agreement with the fp32 cache over {4 * new} tokens: radixseg "
            f"{a_ours:.3f}, transformers Fp8QuantizedLayer {a_hf:.3f}; KV bytes: radixseg "
            f"{used:,} (whole 16-token pages, scales included), Fp8QuantizedLayer {hf_bytes:,}"
        )
    assert a_ours >= 0.85
    assert a_ours >= a_hf
    # Per-token scales cost 8 B per token and head over 2 x 16 B of FP8 K/V, and
    # pages round each row up to 16 tokens (96 -> 96 here).
    assert used <= 1.3 * hf_bytes


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_is_reused_and_gives_the_same_tokens(arch):
    model = MODELS[arch](torch.float32)
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    shared = _prompts(1, 256, seed=5)
    first = torch.cat([shared, _prompts(1, 30, seed=6)], 1)
    second = torch.cat([shared, _prompts(1, 20, seed=7)], 1)

    out1, c1 = _radixseg(model, prefix, first, 8)
    assert c1.reused_tokens == 0
    c1.finish(out1)

    ref = _reference(model, second, 16)
    out2, c2 = _radixseg(model, prefix, second, 16)
    assert c2.reused_tokens == 256  # the shared prefix, 16 whole pages
    assert c2.computed_tokens == 20 + 15  # only the suffix was prefilled
    assert torch.equal(out2, ref)
    c2.finish(out2)
    assert prefix.pool.stats()["reused_tokens"] == 256
    prefix.check_invariants()


def test_follow_up_turn_reuses_the_previous_answer():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    out1, c1 = _radixseg(model, prefix, _prompts(1, 40), 25)
    c1.finish(out1)  # 64 tokens hold KV -> 4 whole pages cached
    turn2 = torch.cat([out1, _prompts(1, 10, seed=9)], 1)
    ref = _reference(model, turn2, 6)
    out2, c2 = _radixseg(model, prefix, turn2, 6)
    assert c2.reused_tokens == 64
    assert torch.equal(out2, ref)
    c2.finish(out2)


def test_namespaces_do_not_share_prefixes():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    prompt = _prompts(1, 50)
    out, c = _radixseg(model, prefix, prompt, 4, namespace=1)
    c.finish(out)
    _, other = _radixseg(model, prefix, prompt, 2, namespace=2)
    assert other.reused_tokens == 0
    other.abort()
    _, same = _radixseg(model, prefix, prompt, 2, namespace=1)
    assert same.reused_tokens == 48
    same.abort()


def test_batch_reuses_the_common_prefix_only():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    a = _prompts(1, 70, seed=1)
    out, c = _radixseg(model, prefix, a, 2)
    c.finish(out)
    b = torch.cat([a[:, :40], _prompts(1, 30, seed=2)], 1)  # shares 32 tokens (2 pages) with a
    batch = torch.cat([a, b])
    ref = _reference(model, batch, 5)
    out2, c2 = _radixseg(model, prefix, batch, 5)
    assert c2.reused_tokens == 32
    assert torch.equal(out2, ref)
    c2.finish(out2)
    prefix.check_invariants()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gather_mode_serves_other_attention_implementations(impl):
    model = _llama()
    prompt = _prompts(2, 33)
    ref = _reference(model, prompt, 10)
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    model.set_attn_implementation(impl)
    cache = rt.RadixsegCache(prefix, prompt, attention="gather")
    out = _generate(model, prompt, 10, cache=cache)
    assert torch.equal(out, ref)
    cache.finish(out)


def test_triton_kernels_under_the_model():
    """The same generation through the Triton kernels (interpreter on CPU) and torch."""
    model = _llama(layers=1)
    prompt = _prompts(1, 9)
    outs = []
    for backend in ("torch", "triton"):
        prefix = rt.prefix_cache_for(model.config, dtype="fp8", page_size=4, segment_bytes=1 << 16)
        model.set_attn_implementation("radixseg")
        cache = rt.RadixsegCache(prefix, prompt, backend=backend)
        outs.append(_generate(model, prompt, 3, cache=cache))
        cache.abort()
    assert torch.equal(outs[0], outs[1])


def test_forward_without_a_cache_falls_back_to_sdpa():
    model = _llama()
    x = _prompts(1, 20)
    model.set_attn_implementation("sdpa")
    ref = model(x, use_cache=False).logits
    model.set_attn_implementation("radixseg")
    got = model(x, use_cache=False).logits
    torch.testing.assert_close(got, ref)


# ----- misuse and failures ------------------------------------------------------------------


def test_segments_mode_refuses_another_attention_implementation():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    model.set_attn_implementation("sdpa")
    cache = rt.RadixsegCache(prefix, _prompts(1, 20))
    with pytest.raises(InvalidArgument, match="attn_implementation='radixseg'"):
        _generate(model, _prompts(1, 20), 3, cache=cache)
    cache.abort()
    prefix.check_invariants()
    assert prefix.pool.stats()["used_pages"] == 0


def test_finish_refuses_sequences_that_do_not_continue_the_prompt():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    prompt = _prompts(1, 20)
    out, cache = _radixseg(model, prefix, prompt, 4)
    before = prefix.pool.stats()
    with pytest.raises(InvalidArgument, match="does not start with its prompt"):
        cache.finish(out.flip(1))
    with pytest.raises(InvalidArgument, match="has 5 tokens"):
        cache.finish(out[:, :5])
    with pytest.raises(InvalidArgument, match="2 rows"):
        cache.finish(torch.cat([out, out]))
    assert prefix.pool.stats() == before
    cache.finish(out)
    with pytest.raises(InvalidArgument, match="already finished"):
        cache.finish(out)
    cache.abort()  # a no-op once finished
    prefix.check_invariants()


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.zeros(1, 2, 3, dtype=torch.int64), "batch, seq"),
        (torch.zeros(1, 4), "integers"),
        (torch.zeros(1, 0, dtype=torch.int64), "non-empty"),
        ([[1, 2, 3], [1, 2]], "different lengths"),
        (torch.tensor([[1, -2, 3]]), "outside the token range"),
    ],
)
def test_bad_input_ids_are_typed_errors(ids, match):
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    with pytest.raises(InvalidArgument, match=match):
        rt.RadixsegCache(prefix, ids)
    prefix.check_invariants()
    assert prefix.pool.stats()["running_requests"] == 0


def test_bad_options_are_typed_errors():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    with pytest.raises(InvalidArgument, match="'segments' or 'gather'"):
        rt.RadixsegCache(prefix, [1, 2], attention="copy")
    with pytest.raises(InvalidArgument, match="backend"):
        rt.RadixsegCache(prefix, [1, 2], backend="cuda")
    with pytest.raises(TypeError, match="PrefixCache"):
        rt.RadixsegCache(prefix.pool, [1, 2])


def test_unsupported_layer_types_are_refused():
    cfg = _qwen2_config(use_sliding_window=True, sliding_window=32, max_window_layers=1)
    with pytest.raises(InvalidArgument, match="sliding_attention"):
        rt.prefix_cache_for(cfg)


def test_beam_search_and_batch_expansion_are_refused():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    cache = rt.RadixsegCache(prefix, _prompts(1, 10))
    with pytest.raises(InvalidArgument, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(InvalidArgument, match="cropping"):
        cache.crop(-1)
    with pytest.raises(InvalidArgument, match="repeat"):
        cache.batch_repeat_interleave(2)
    cache.abort()


def test_pool_exhaustion_mid_generation_leaves_everything_consistent():
    """A budget too small for the whole answer: the step that cannot get pages
    raises BudgetExhausted, the requests keep what they had, abort frees it all."""
    model = _llama()
    prefix = rt.prefix_cache_for(
        model.config, dtype="fp32", page_size=4, pages_per_segment=8, budget_bytes=1
    )
    pool = prefix.pool
    pool.budget_bytes = pool.segment_bytes  # one segment: 8 pages = 32 tokens per pool
    prompt = _prompts(2, 12)  # 2 rows x 3 pages; decode runs out at row 1's 5th page
    model.set_attn_implementation("radixseg")
    cache = rt.RadixsegCache(prefix, prompt, backend="torch")
    with pytest.raises(BudgetExhausted):
        _generate(model, prompt, 40, cache=cache)
    prefix.check_invariants()
    held = {r.seq_len for r in cache.requests}
    assert held == {cache.get_seq_length()}
    assert sum(r.num_pages for r in cache.requests) == pool.stats()["used_pages"]
    cache.abort()
    assert pool.stats()["used_pages"] == 0
    prefix.check_invariants()


def test_context_manager_aborts():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    model.set_attn_implementation("radixseg")
    with rt.RadixsegCache(prefix, _prompts(1, 30), backend="torch") as cache:
        _generate(model, _prompts(1, 30), 3, cache=cache)
        assert prefix.pool.stats()["used_pages"] > 0
    assert prefix.pool.stats()["used_pages"] == 0
    assert "state" in cache.stats()
