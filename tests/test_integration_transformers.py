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
from radixseg.grouped import GroupedPrefixCache  # noqa: E402

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
        (torch.tensor([[1, -2, 3]]), "invalid token id -2 at position 1"),
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
    cfg = _qwen2_config()
    cfg.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(InvalidArgument, match="linear_attention"):
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


# ----- many architectures, left padding, inference_mode / no_grad (issue 15) -----------------

SMALL_VOCAB = 96
_COMMON = dict(vocab_size=SMALL_VOCAB, pad_token_id=0, eos_token_id=None, bos_token_id=None)
_TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    **_COMMON,
)


def _arch_config(arch: str):
    """Tiny configs: 2 layers, hidden 32, GQA where the architecture has it."""
    t = transformers
    dense = dict(num_hidden_layers=2, **_TINY)
    if arch == "llama":
        return t.LlamaConfig(**dense)
    if arch == "mistral":  # the default sliding_window=4096: contexts here are far shorter
        return t.MistralConfig(**dense)
    if arch == "qwen3":
        return t.Qwen3Config(head_dim=8, **dense)
    if arch == "gemma":
        return t.GemmaConfig(head_dim=8, **dense)
    if arch == "phi3":
        return t.Phi3Config(**dense)
    if arch == "gpt_neox":  # multi-head: no num_key_value_heads
        return t.GPTNeoXConfig(**{k: v for k, v in dense.items() if k != "num_key_value_heads"})
    if arch == "gpt2":
        return t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **_COMMON)
    if arch == "mixtral":
        return t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **dense)
    if arch == "qwen3_moe":
        return t.Qwen3MoeConfig(
            head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **dense
        )
    raise AssertionError(arch)


ARCHS = ["llama", "mistral", "qwen3", "gemma", "phi3", "gpt_neox", "gpt2", "mixtral", "qwen3_moe"]


def _arch_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_arch_config(arch)).eval()


def _left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the given real lengths, left-padded with token 0 to the longest."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros((len(lengths), n), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, m in enumerate(lengths):
        ids[i, n - m :] = torch.randint(1, SMALL_VOCAB, (m,), generator=g)
        mask[i, n - m :] = 1
    return ids, mask


def _gen_masked(model, ids, mask, new, **kw) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kw)


GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
@pytest.mark.parametrize("arch", ARCHS)
def test_architectures_match_dynamic_cache_with_left_padding(arch, grad_mode):
    """fp32 greedy tokens equal DynamicCache's token for token, for a left-padded
    batch of three different lengths, with the radixseg attention and with
    attention="gather" under sdpa; padding is never cached."""
    model = _arch_model(arch)
    ids, mask = _left_padded([13, 7, 4], seed=1)
    new = 6
    with GRAD_MODES[grad_mode]():
        model.set_attn_implementation("sdpa")
        ref = _gen_masked(model, ids, mask, new)
        prefix = rt.prefix_cache_for(model.config, dtype="fp32", page_size=4, segment_bytes=1 << 16)
        model.set_attn_implementation("radixseg")
        seg = rt.RadixsegCache(prefix, ids, attention_mask=mask, backend="torch")
        out_seg = _gen_masked(model, ids, mask, new, cache=seg)
        model.set_attn_implementation("sdpa")
        gat = rt.RadixsegCache(prefix, ids, attention_mask=mask, attention="gather")
        out_gat = _gen_masked(model, ids, mask, new, cache=gat)
    assert torch.equal(out_seg, ref)
    assert torch.equal(out_gat, ref)
    # Each request holds its row's real tokens only: 13 + 5, 7 + 5, 4 + 5.
    assert [r.seq_len for r in seg.requests] == [18, 12, 9]
    seg.finish(out_seg)
    gat.abort()
    prefix.check_invariants()
    # Whole pages of real tokens were cached (4 + 3 + 2 pages), no padding:
    assert prefix.tree.cached_tokens() == 4 * (4 + 3 + 2)
    # ... so the unpadded short row, asked again with more tokens, reuses its
    # two whole pages and gives DynamicCache's answer.
    row = torch.cat([out_seg[2:, -(4 + new) :], _prompts(1, 3, seed=4) % SMALL_VOCAB], 1)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref2 = _generate(model, row, 3)
    model.set_attn_implementation("radixseg")
    again = rt.RadixsegCache(prefix, row, backend="torch")
    assert again.reused_tokens == 8
    with torch.no_grad():
        assert torch.equal(_generate(model, row, 3, cache=again), ref2)
    again.abort()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_left_padding_on_the_decode_kernels_and_bigger_pages(backend):
    model = _llama()
    ids = _prompts(3, 40, seed=2)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([17, 0, 33]):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = _gen_masked(model, ids, mask, 12)
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    model.set_attn_implementation("radixseg")
    cache = rt.RadixsegCache(prefix, ids, attention_mask=mask, backend=backend)
    with torch.no_grad():
        out = _gen_masked(model, ids, mask, 12, cache=cache)
    assert torch.equal(out, ref)
    assert cache.reused_tokens == 0
    assert cache.get_seq_length() == 40 + 11  # positions, as DynamicCache counts them
    cache.finish(out)
    # 23 + 11, 40 + 11, 7 + 11 real tokens -> 2 + 3 + 1 whole 16-token pages.
    assert prefix.tree.cached_tokens() == 16 * 6
    prefix.check_invariants()


def test_padded_batch_mismatches_are_typed_errors():
    model = _llama()
    ids, mask = _left_padded([9, 5])
    ids = ids % VOCAB
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    model.set_attn_implementation("radixseg")
    # The model is given padding the cache was not told about ...
    cache = rt.RadixsegCache(prefix, ids, backend="torch")
    with pytest.raises(InvalidArgument, match=r"attention_mask=\) the mask generate gets"):
        _gen_masked(model, ids, mask, 2, cache=cache)
    cache.abort()
    # ... or no mask although the cache was made with padding.
    cache = rt.RadixsegCache(prefix, ids, attention_mask=mask, backend="torch")
    with torch.no_grad(), pytest.raises(InvalidArgument, match="no padding"):
        model(ids, cache=cache)
    cache.abort()
    # A prepared 4-D mask is refused rather than ignored.
    cache = rt.RadixsegCache(prefix, ids[1:], backend="torch")
    four_d = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    with torch.no_grad(), pytest.raises(InvalidArgument, match="4-D"):
        model(ids[1:], attention_mask=four_d, cache=cache)
    cache.abort()
    assert prefix.pool.stats()["used_pages"] == 0
    prefix.check_invariants()


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        ([[1, 1, 0], [1, 1, 1]], "row 0 has padding at position 2"),  # right padding
        ([[0, 1, 0], [1, 1, 1]], "row 0 has padding at position 2"),  # a hole
        ([[1, 1, 1], [0, 0, 0]], "row 1 is all padding"),
        ([[1, 1, 2], [1, 1, 1]], r"attention_mask\[0, 2\] = 2"),
        ([[1, 1], [1, 1]], "must match"),
    ],
)
def test_attention_mask_must_be_left_padding(mask, match):
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    with pytest.raises(InvalidArgument, match=match):
        rt.RadixsegCache(prefix, [[5, 6, 7], [8, 9, 10]], attention_mask=mask)
    assert prefix.pool.stats()["running_requests"] == 0


def test_fallback_without_a_radixseg_cache_handles_padding():
    """attn_implementation="radixseg" with DynamicCache or no cache: the mask
    function's info becomes transformers' own SDPA mask."""
    model = _llama()
    ids, mask = _left_padded([11, 6])
    ids = ids % VOCAB
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask, use_cache=False).logits
        ref = _gen_masked(model, ids, mask, 5)
    model.set_attn_implementation("radixseg")
    with torch.no_grad():
        got_logits = model(ids, attention_mask=mask, use_cache=False).logits
        got = _gen_masked(model, ids, mask, 5)  # generate makes a DynamicCache
    real = mask.bool()
    torch.testing.assert_close(got_logits[real], ref_logits[real])
    assert torch.equal(got, ref)


def test_mask_probe_recognises_causal_windowed_and_chunked_patterns():
    from transformers import masking_utils as mu

    assert rt._mask_kind(mu.causal_mask_function, None) == "causal"
    assert rt._mask_kind(mu.sliding_window_causal_mask_function(5), 5) == "sliding"
    assert rt._mask_kind(mu.sliding_window_causal_mask_function(5), None) is None
    assert rt._mask_kind(mu.bidirectional_mask_function, None) is None
    chunked = mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    assert rt._mask_kind(chunked, 4) == "chunked"
    # Chunks count from the first real token: row 0 left-padded by 3.
    padded = mu.chunked_causal_mask_function(4, torch.tensor([3]))
    assert rt._mask_kind(padded, 4, pad=3) == "chunked"
    assert rt._mask_kind(padded, 4, pad=0) is None
    assert rt._mask_kind(mu.bidirectional_mask_function, 4) is None


# ----- inference_mode and grad mode ---------------------------------------------------------


def _all_pool_tensors(pool):
    for seg in pool._segments:
        if seg is not None:
            yield from (seg.buffer, seg.k_store, seg.v_store)
    yield pool.segment_table


@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_inference_mode_and_normal_mode_in_any_order(first):
    """Generate under one mode, finish under the other, generate again under
    each: the pool and requests hold normal tensors throughout."""
    model = _llama()
    prefix = rt.prefix_cache_for(
        model.config, dtype="fp32", page_size=4, pages_per_segment=4
    )  # small segments: every call grows the pool
    prompt = _prompts(1, 30, seed=11)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = _generate(model, prompt, 6)
    order = [first, "no_grad" if first == "inference_mode" else "inference_mode"]
    model.set_attn_implementation("radixseg")
    for i, mode in enumerate(order + order):
        with GRAD_MODES[mode]():
            cache = rt.RadixsegCache(prefix, prompt, backend="torch")
            out = _generate(model, prompt, 6, cache=cache)
        assert torch.equal(out, ref)
        assert cache.reused_tokens == (0 if i == 0 else 28)
        # finish() outside the mode the generate ran in
        cache.finish(out)
        assert not any(t.is_inference() for t in _all_pool_tensors(prefix.pool))
        assert not any(r.tokens.is_inference() for r in cache.requests)
    prefix.check_invariants()


def test_grad_mode_forward_keeps_the_pool_out_of_autograd():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", page_size=4, pages_per_segment=2)
    model.set_attn_implementation("sdpa")
    prompt = _prompts(1, 20, seed=12)
    ref = model(prompt, use_cache=False).logits.detach()
    model.set_attn_implementation("radixseg")
    for _ in range(2):  # the second time the pool has grown and holds cached pages
        cache = rt.RadixsegCache(prefix, prompt, backend="torch")
        got = model(prompt[:, cache.get_seq_length() :], cache=cache, use_cache=True).logits
        for t in _all_pool_tensors(prefix.pool):
            assert not t.requires_grad and t.grad_fn is None
        torch.testing.assert_close(got[0, -1].detach(), ref[0, -1])
        # decode one more token in grad mode over the grown pool
        nxt = got[:, -1:].argmax(-1)
        model(nxt, cache=cache, use_cache=True)
        cache.finish(torch.cat([prompt, nxt], 1))
    assert prefix.pool.stats()["segments"] >= 2
    prefix.check_invariants()


# ----- errors that point the right way ------------------------------------------------------


@pytest.mark.parametrize("kw", [{"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}])
def test_beam_search_and_repeated_sequences_say_so(kw):
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    model.set_attn_implementation("radixseg")
    prompt = _prompts(1, 20)
    cache = rt.RadixsegCache(prefix, prompt, backend="torch")
    args = {"max_new_tokens": 3, "do_sample": False, **kw}
    expect = r"beam search.*num_return_sequences.*not support"
    with torch.no_grad(), pytest.raises(InvalidArgument, match=expect):
        model.generate(prompt, cache=cache, **args)
    assert prefix.pool.stats()["used_pages"] == 0  # nothing was stored
    cache.abort()


def test_mla_geometry_is_what_transformers_expands_it_to():
    """transformers' MLA attention hands the cache per-head K and V: usable when
    they have one size (Mistral-4 style), refused by name when not (DeepSeek-V3)."""
    small = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
    )
    cfg = transformers.DeepseekV3Config(
        **small, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, head_dim=8
    )
    assert rt.model_geometry(cfg) == (2, 4, 16)
    cfg = transformers.DeepseekV3Config(
        **small, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8
    )
    with pytest.raises(InvalidArgument, match="K of 24 and V of 16"):
        rt.model_geometry(cfg)


@pytest.mark.parametrize(
    ("falcon", "kv_heads"),
    [
        ({"multi_query": True}, 1),
        ({"multi_query": False}, 4),
        ({"new_decoder_architecture": True, "num_kv_heads": 2}, 4),
    ],
)
def test_falcon_geometry_matches_what_its_attention_stores(falcon, kv_heads):
    cfg = transformers.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        **{"bos_token_id": None, "eos_token_id": None, "pad_token_id": 0},
        **falcon,
    )
    assert rt.model_geometry(cfg) == (2, kv_heads, 8)
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(cfg).eval()
    prompt = _prompts(1, 12)
    ref = _reference(model, prompt, 4)
    prefix = rt.prefix_cache_for(cfg, dtype="fp32", segment_bytes=1 << 16)
    cache = rt.RadixsegCache(prefix, prompt, attention="gather")
    assert torch.equal(_generate(model, prompt, 4, cache=cache), ref)
    cache.abort()


def test_whole_prompt_after_a_reused_prefix_is_refused():
    model = _llama()
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 18)
    prompt = _prompts(1, 40, seed=13)
    model.set_attn_implementation("radixseg")
    out, first = _radixseg(model, prefix, prompt, 2)
    first.finish(out)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(prompt, use_cache=False).logits[:, -1]
    model.set_attn_implementation("radixseg")
    cache = rt.RadixsegCache(prefix, prompt, backend="torch")
    assert cache.reused_tokens == 32
    with torch.no_grad(), pytest.raises(InvalidArgument, match="past the end of the 40-token"):
        model(prompt, cache=cache)
    assert cache.get_seq_length() == 32  # nothing was stored
    with torch.no_grad():
        got = model(prompt[:, cache.get_seq_length() :], cache=cache).logits[:, -1]
    torch.testing.assert_close(got, ref)
    cache.abort()
    prefix.check_invariants()


# ----- sliding windows ----------------------------------------------------------------------


def _mistral(window: int | None) -> torch.nn.Module:
    torch.manual_seed(3)
    cfg = transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=window,
        **_COMMON,
    )
    return transformers.MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("attention", ["segments", "gather"])
def test_sliding_window_smaller_than_the_context_is_exact(attention):
    """sliding_window=8 over a 30-token context (prefill and decode both cross
    the window), a left-padded batch, reused pages on the second call."""
    model = _mistral(8)
    ids, mask = _left_padded([21, 14], seed=5)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = _gen_masked(model, ids, mask, 9)
        no_window = _mistral(None)
        other = _gen_masked(no_window, ids, mask, 9)
    assert not torch.equal(ref, other)  # the window changes the answer: the test can fail
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", page_size=4, segment_bytes=1 << 16)
    model.set_attn_implementation("radixseg" if attention == "segments" else "sdpa")
    cache = rt.RadixsegCache(prefix, ids, attention_mask=mask, attention=attention, backend="torch")
    with torch.no_grad():
        out = _gen_masked(model, ids, mask, 9, cache=cache)
    assert torch.equal(out, ref)
    cache.finish(out)
    # Row 0 (unpadded) again, reusing its cached pages; the window still applies.
    row = out[:1, :26]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref2 = _generate(model, row, 5)
    model.set_attn_implementation("radixseg" if attention == "segments" else "sdpa")
    again = rt.RadixsegCache(prefix, row, attention=attention, backend="torch")
    assert again.reused_tokens == 24
    with torch.no_grad():
        assert torch.equal(_generate(model, row, 5, cache=again), ref2)
    again.abort()
    prefix.check_invariants()


def test_hybrid_sliding_and_full_layers():
    """Qwen2 with layer_types: layer 0 full attention, layer 1 a window of 6."""
    torch.manual_seed(4)
    cfg = _qwen2_config(use_sliding_window=True, sliding_window=6, max_window_layers=1)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    prompt = _prompts(2, 19, seed=6)
    ref = _reference(model, prompt, 8)
    prefix = rt.prefix_cache_for(cfg, dtype="fp32", segment_bytes=1 << 18)
    out, cache = _radixseg(model, prefix, prompt, 8)
    assert torch.equal(out, ref)
    cache.finish(out)


@pytest.mark.parametrize("attention", ["segments", "gather"])
def test_chunked_prefill_over_padding(attention):
    """prefill_chunk_size=4 over rows padded by 9 and 3: some chunks hold no
    real token of a row (an empty row in the step's CSR); window 6 < context."""
    model = _mistral(6)
    ids, mask = _left_padded([6, 15, 12], seed=8)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = _gen_masked(model, ids, mask, 8)
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", page_size=4, segment_bytes=1 << 16)
    model.set_attn_implementation("radixseg" if attention == "segments" else "sdpa")
    cache = rt.RadixsegCache(prefix, ids, attention_mask=mask, attention=attention, backend="torch")
    with torch.no_grad():
        out = _gen_masked(model, ids, mask, 8, cache=cache, prefill_chunk_size=4)
    assert torch.equal(out, ref)
    assert [r.seq_len for r in cache.requests] == [13, 22, 19]
    cache.finish(out)
    prefix.check_invariants()


# ----- hybrid models: soft-capping (Gemma 2), sliding patterns (Gemma 3), chunks (Llama 4) ---


def _hybrid(arch: str) -> torch.nn.Module:
    t = transformers
    small = dict(head_dim=8, **_TINY)
    if arch == "gemma2":  # layer 0 slides (window 6), layer 1 full
        cfg = t.Gemma2Config(
            num_hidden_layers=2, sliding_window=6, query_pre_attn_scalar=1, **small
        )
        cfg.attn_logit_softcapping = 0.3  # a cap tiny random scores reach: the test can fail
    elif arch == "gemma3":
        cfg = t.Gemma3TextConfig(num_hidden_layers=3, sliding_window=5, **small)
        cfg.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    elif arch == "llama4":  # layers 0-2 chunked (chunks of 8), layer 3 full (NoPE)
        cfg = t.Llama4TextConfig(
            num_hidden_layers=4,
            attention_chunk_size=8,
            intermediate_size_mlp=64,
            num_local_experts=2,
            num_experts_per_tok=1,
            **small,
        )
    elif arch == "qwen2":  # layer 0 full, layer 1 a window of 6
        cfg = _qwen2_config(use_sliding_window=True, sliding_window=6, max_window_layers=1)
        cfg.layer_types = ["full_attention", "sliding_attention"]
    elif arch == "gpt_oss":  # attention sinks; layer 0 a window of 6, layer 1 full
        cfg = t.GptOssConfig(
            num_hidden_layers=2,
            sliding_window=6,
            num_local_experts=2,
            num_experts_per_tok=1,
            layer_types=["sliding_attention", "full_attention"],
            **small,
        )
    else:
        raise AssertionError(arch)
    torch.manual_seed(7)
    model = t.AutoModelForCausalLM.from_config(cfg).eval()
    for mod in model.modules():
        if isinstance(getattr(mod, "sinks", None), torch.nn.Parameter):
            # Sinks large enough to move the softmax (the test can fail).
            mod.sinks.data = torch.randn_like(mod.sinks) * 2
    return model


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "llama4", "qwen2", "gpt_oss"])
def test_hybrid_models_match_dynamic_cache(arch):
    """fp32 greedy tokens equal eager attention + DynamicCache for a left-padded
    batch whose contexts cross the window or several chunk edges, then for a
    prompt reusing a cached prefix longer than the window or chunk."""
    model = _hybrid(arch)
    ids, mask = _left_padded([23, 11], seed=8)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = _gen_masked(model, ids, mask, 9)
        ref_logits = model(ids, attention_mask=mask, use_cache=False).logits
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", page_size=4, segment_bytes=1 << 16)
    # Full layers beside windowed ones: each group in its own pool.
    assert isinstance(prefix, GroupedPrefixCache)
    model.set_attn_implementation("radixseg")
    # Prefill logits too: random tiny models' greedy tokens barely depend on
    # attention, their logits do (the mutation check: drop the cap, the chunk
    # or the window and this fails).
    real = mask.bool()
    with torch.no_grad(), rt.RadixsegCache(prefix, ids, attention_mask=mask) as pre:
        got_logits = model(ids, attention_mask=mask, cache=pre).logits
    torch.testing.assert_close(got_logits[real], ref_logits[real])
    cache = rt.RadixsegCache(prefix, ids, attention_mask=mask, backend="torch")
    with torch.no_grad():
        out = _gen_masked(model, ids, mask, 9, cache=cache)
    assert torch.equal(out, ref)
    cache.finish(out)
    row = torch.cat([out[:1, :30], _prompts(1, 3, seed=9) % SMALL_VOCAB], 1)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref2 = _generate(model, row, 6)
    model.set_attn_implementation("radixseg")
    for backend in ("torch", "cpu"):
        again = rt.RadixsegCache(prefix, row, backend=backend)
        assert again.reused_tokens == 28  # past the window (6, 5) and 3 chunk edges (8)
        with torch.no_grad():
            assert torch.equal(_generate(model, row, 6, cache=again), ref2), backend
        again.abort()
    prefix.check_invariants()


@pytest.mark.parametrize("arch", ["gemma3", "llama4"])
def test_windowed_groups_hold_only_their_window(arch):
    """A 48-token greedy generation (window 5, chunks of 8, page 4): tokens equal
    DynamicCache's and the one-pool cache's, and after every step each windowed
    group holds at most ceil((W - 1) / P) + 2 pages (C / P + 1 for chunks) while
    the full group holds every page; finishing caches the window before the end,
    which the next turn reuses."""
    model = _hybrid(arch)
    prompt = _prompts(1, 12, seed=3) % SMALL_VOCAB
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = _generate(model, prompt, 36)
    model.set_attn_implementation("radixseg")
    one = rt.prefix_cache_for(model.config, dtype="fp32", page_size=4, layer_groups=False)
    assert not isinstance(one, GroupedPrefixCache)
    with torch.no_grad(), rt.RadixsegCache(one, prompt) as c1:
        assert torch.equal(_generate(model, prompt, 36, cache=c1), ref)
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", page_size=4, segment_bytes=1 << 16)
    assert isinstance(prefix, GroupedPrefixCache)
    bound = {"sliding": -(-4 // 4) + 2, "chunked": 8 // 4 + 1}
    held: list[list[int]] = []

    class Watch(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            req = cache.requests[0]
            held.append(req.window_pages())
            assert req.full.num_pages == -(-req.seq_len // 4)
            return scores

    cache = rt.RadixsegCache(prefix, prompt)
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=36,
            do_sample=False,
            cache=cache,
            logits_processor=[Watch()],
            pad_token_id=0,
        )
    assert torch.equal(out, ref)
    kinds = [g.kind for g in prefix.windowed]
    # The prefill step holds every page; each later step only the window.
    for pages in held[1:]:
        for kind, n in zip(kinds, pages, strict=True):
            assert n <= bound[kind], (kind, pages)
    cache.finish(out)
    prefix.check_invariants(exclusive=True)
    for g, pool in zip(prefix.windowed, prefix.pool.pools[1:], strict=True):
        assert 0 < pool.stats()["used_bytes"] <= bound[g.kind] * pool.page_bytes
    # The next turn continues from the cached end: the window there is kept.
    turn = torch.cat([out, _prompts(1, 3, seed=4) % SMALL_VOCAB], 1)
    again = rt.RadixsegCache(prefix, turn)
    assert again.reused_tokens == 4 * ((out.shape[1] - 1) // 4)
    again.abort()


def test_the_sinks_change_gpt_oss_logits():
    """The gpt-oss case above can fail: without its sinks the logits move."""
    model = _hybrid("gpt_oss")
    ids = _prompts(1, 12, seed=5) % SMALL_VOCAB
    model.set_attn_implementation("eager")
    with torch.no_grad():
        sunk = model(ids, use_cache=False).logits
        for mod in model.modules():
            if isinstance(getattr(mod, "sinks", None), torch.nn.Parameter):
                mod.sinks.data.fill_(-1e4)
        plain = model(ids, use_cache=False).logits
    assert (sunk - plain).abs().max() > 1e-3


def test_the_soft_cap_changes_gemma2_logits():
    """The Gemma 2 case above can fail: without its cap the logits move."""
    model = _hybrid("gemma2")
    ids, mask = _left_padded([23, 11], seed=8)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        capped = model(ids, attention_mask=mask, use_cache=False).logits
        for mod in model.modules():
            if getattr(mod, "attn_logit_softcapping", None):
                mod.attn_logit_softcapping = None
        plain = model(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert (capped[real] - plain[real]).abs().max() > 1e-3
