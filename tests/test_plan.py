"""The capacity planner against published per-token KV sizes.

Configs are the fields of the published Hugging Face ``config.json`` files that
matter for KV sizing, written here so the tests need no network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import radixseg
from radixseg import InvalidArgument, Plan, plan
from radixseg.__main__ import main
from radixseg.capacity import kv_geometry, parse_bytes, parse_count

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
LLAMA_31_70B = {
    **LLAMA_31_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "max_window_layers": 28,
    "torch_dtype": "bfloat16",
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "num_hidden_layers": 61,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "torch_dtype": "bfloat16",
}
LLAMA4_SCOUT = {
    "architectures": ["Llama4ForConditionalGeneration"],
    "model_type": "llama4",
    "text_config": {
        "model_type": "llama4_text",
        "attention_chunk_size": 8192,
        "head_dim": 128,
        "hidden_size": 5120,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "num_hidden_layers": 48,
        "num_local_experts": 16,
        "max_position_embeddings": 10485760,
        "rope_theta": 500000.0,
    },
    "vision_config": {"num_hidden_layers": 34, "hidden_size": 1408, "num_attention_heads": 16},
}
GEMMA3_27B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "head_dim": 128,
        "hidden_size": 5376,
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "sliding_window": 1024,
        "sliding_window_pattern": 6,
    },
}
MISTRAL_7B_V01 = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "sliding_window": 4096,
}


def write(tmp_path: Path, cfg: dict[str, Any], name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    ("cfg", "dtype", "per_token"),
    [
        (LLAMA_31_8B, "bf16", 131_072),  # 32 layers x 8 heads x 128 x (K, V) x 2 B
        (LLAMA_31_8B, "fp8", 65_536),
        (LLAMA_31_8B, torch.float8_e4m3fn, 65_536),
        (LLAMA_31_70B, "bf16", 327_680),  # 80 x 8 x 128 x 2 x 2
        (LLAMA_31_70B, torch.bfloat16, 327_680),
        (QWEN25_7B, "bf16", 57_344),  # 28 x 4 x 128 x 2 x 2; its window is off
        (DEEPSEEK_V3, "bf16", 70_272),  # MLA: 61 x (512 + 64) x 2 B
        (DEEPSEEK_V3, "fp8", 35_136),
        (LLAMA_31_8B, "fp32", 262_144),
    ],
)
def test_published_bytes_per_token(tmp_path, cfg, dtype, per_token):
    p = plan(write(tmp_path, cfg), kv_dtype=dtype)
    assert p.kv_bytes_per_token == per_token
    assert p.window_kv_bytes_per_token == 0
    assert p.context_kv_bytes == per_token * 10_000_000


def test_config_as_dict_or_directory(tmp_path):
    write(tmp_path, LLAMA_31_8B)
    assert plan(tmp_path, kv_dtype="bf16").kv_bytes_per_token == 131_072
    assert plan(LLAMA_31_8B, kv_dtype="bf16").kv_bytes_per_token == 131_072


def test_fp8_scales_are_reported_separately(tmp_path):
    p = plan(write(tmp_path, LLAMA_31_70B), kv_dtype="fp8", tp=8)
    assert p.kv_bytes_per_token == 163_840
    assert p.scale_bytes_per_token == 80 * 8 * 2 * 4 == 5_120
    assert p.scale_bytes_per_token_per_device == 640
    assert p.context_scale_bytes_per_device == 640 * 10_000_000
    assert plan(LLAMA_31_70B, kv_dtype="bf16").scale_bytes_per_token == 0
    mla = plan(DEEPSEEK_V3, kv_dtype="fp8", tp=8)
    assert mla.scale_bytes_per_token == mla.scale_bytes_per_token_per_device == 61 * 4


def test_tp_splits_then_replicates_kv_heads():
    per_tp = {
        tp: plan(LLAMA_31_8B, kv_dtype="bf16", tp=tp).kv_bytes_per_token_per_device
        for tp in (1, 2, 4, 8, 16, 32)
    }
    # 8 KV heads: split up to tp=8, then each device keeps one (replicated) head.
    assert per_tp == {1: 131_072, 2: 65_536, 4: 32_768, 8: 16_384, 16: 16_384, 32: 16_384}
    p16 = plan(LLAMA_31_8B, tp=16)
    assert p16.kv_heads_per_device == 1
    assert "replicated on 2 devices" in p16.table()
    # The MLA latent is on every rank.
    assert plan(DEEPSEEK_V3, kv_dtype="bf16", tp=8).kv_bytes_per_token_per_device == 70_272


@pytest.mark.parametrize("tp", [3, 12])
def test_tp_must_fit_kv_heads(tp):
    with pytest.raises(InvalidArgument, match=rf"tp={tp}\b.*num_kv_heads=8"):
        plan(LLAMA_31_8B, tp=tp)


def scout_expected_bytes(context: int) -> int:
    # 48 layers; NoPE layers 3, 7, ..., 47 (12) attend globally, the other 36
    # attend within 8,192-token chunks. 8 KV heads x 128 x (K, V) x 2 B = 4,096 B
    # per token per layer.
    return 12 * 4_096 * context + 36 * 4_096 * min(context, 8_192)


def test_llama4_scout_chunked_layers_stop_at_their_window(tmp_path):
    p = plan(write(tmp_path, LLAMA4_SCOUT), kv_dtype="bf16", context=1_000_000)
    g = p.geometry
    assert (g.num_layers, g.full_layers, g.windows) == (48, 12, {8192: 36})
    assert [i for i, w in enumerate(g.layer_windows) if w is None] == list(range(3, 48, 4))
    assert p.kv_bytes_per_token == 12 * 4_096 == 49_152
    assert p.window_kv_bytes_per_token == 36 * 4_096
    assert p.context_kv_bytes == scout_expected_bytes(1_000_000) == 50_359_959_552
    assert p.context_kv_bytes < 48 * 4_096 * 1_000_000
    # below the window every layer holds every token
    assert p.kv_bytes(5_000) == 48 * 4_096 * 5_000


def test_llama4_explicit_layer_lists_agree(tmp_path):
    text = LLAMA4_SCOUT["text_config"]
    assert isinstance(text, dict)
    flags = [int((i + 1) % 4 != 0) for i in range(48)]
    types = ["chunked_attention" if f else "full_attention" for f in flags]
    want = plan(LLAMA4_SCOUT, kv_dtype="bf16", context=1_000_000).context_kv_bytes
    for extra in ({"no_rope_layers": flags}, {"layer_types": types}):
        cfg = {**LLAMA4_SCOUT, "text_config": {**text, **extra}}
        assert plan(cfg, kv_dtype="bf16", context=1_000_000).context_kv_bytes == want


def test_sliding_window_models():
    g = kv_geometry(GEMMA3_27B)  # every 6th layer global
    assert (g.full_layers, g.windows) == (10, {1024: 52})
    per_layer = 2 * 16 * 128 * 2
    assert plan(GEMMA3_27B, kv_dtype="bf16", context=100_000).context_kv_bytes == (
        per_layer * (10 * 100_000 + 52 * 1_024)
    )
    gemma2 = {**MISTRAL_7B_V01, "model_type": "gemma2", "num_hidden_layers": 4}
    assert kv_geometry(gemma2).layer_windows == (4096, None, 4096, None)
    qwen_on = {**QWEN25_7B, "use_sliding_window": True, "max_window_layers": 20}
    assert kv_geometry(qwen_on).windows == {131072: 8}
    # Mistral-7B-v0.1 slides on every layer: KV stops growing at 4,096 tokens.
    p = plan(MISTRAL_7B_V01, kv_dtype="bf16", device_bytes="80GB", weights_bytes="14.5GB")
    assert p.kv_bytes_per_token == 0 and p.window_kv_bytes_per_token == 131_072
    assert p.context_kv_bytes == 131_072 * 4_096
    assert p.max_context_per_device is None and p.devices_needed == 1
    assert "no limit" in str(p)


def test_multi_query_configs_hold_one_kv_head():
    falcon_7b = {
        "model_type": "falcon",
        "hidden_size": 4544,
        "num_attention_heads": 71,
        "num_hidden_layers": 32,
        "multi_query": True,
        "new_decoder_architecture": False,
    }
    g = kv_geometry(falcon_7b)
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (32, 1, 64)
    assert kv_geometry({**falcon_7b, "multi_query": False}).num_kv_heads == 71
    assert kv_geometry(falcon_7b, num_kv_heads=71).num_kv_heads == 71  # a named field wins
    falcon_40b = {**falcon_7b, "new_decoder_architecture": True, "num_kv_heads": 8}
    assert kv_geometry(falcon_40b).num_kv_heads == 8
    starcoder = {"model_type": "gpt_bigcode", "n_layer": 40, "n_head": 48, "n_embd": 6144}
    g = kv_geometry({**starcoder, "multi_query": True})
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (40, 1, 128)
    assert kv_geometry(starcoder).num_kv_heads == 48


def test_transformers_config_objects_read_like_their_json():
    transformers = pytest.importorskip("transformers")
    fields = ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads")
    cfg = transformers.LlamaConfig(**{k: LLAMA_31_8B[k] for k in fields})
    g, want = kv_geometry(cfg), kv_geometry(LLAMA_31_8B)
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.layer_windows) == (
        want.num_layers,
        want.num_kv_heads,
        want.head_dim,
        want.layer_windows,
    )
    assert plan(cfg, kv_dtype="bf16").kv_bytes_per_token == 131_072
    assert kv_geometry(cfg).source == "LlamaConfig"
    bigcode = transformers.GPTBigCodeConfig(n_layer=2, n_head=4, n_embd=32)  # n_layer via to_dict
    g = kv_geometry(bigcode)
    assert (g.num_layers, g.num_kv_heads, g.head_dim) == (2, 1, 8)
    with pytest.raises(InvalidArgument, match="not a path, a dict"):
        kv_geometry(object())  # type: ignore[arg-type]


def test_named_fields_match_the_config(tmp_path):
    by_fields = plan(num_layers=80, num_kv_heads=8, head_dim=128, kv_dtype="fp8", tp=8)
    by_config = plan(write(tmp_path, LLAMA_31_70B), kv_dtype="fp8", tp=8)
    assert by_fields.kv_bytes_per_token == by_config.kv_bytes_per_token == 163_840
    assert by_fields.context_kv_bytes_per_device == by_config.context_kv_bytes_per_device
    mla = plan(num_layers=61, kv_lora_rank=512, qk_rope_head_dim=64, kv_dtype="bf16")
    assert mla.kv_bytes_per_token == 70_272
    # fields override a config's
    assert plan(LLAMA_31_8B, num_layers=16, kv_dtype="bf16").kv_bytes_per_token == 65_536


def test_fit_and_devices_needed():
    p = plan(LLAMA_31_70B, kv_dtype="fp8", tp=8, device_bytes="80GB", weights_bytes="140GB")
    # 80e9 - 140e9 / 8 = 62.5e9 B for KV + scales; 20,480 + 640 B per token per device
    assert p.usable_bytes_per_device == 62_500_000_000
    assert p.max_context_per_device == 62_500_000_000 // 21_120 // 16 * 16 == 2_959_280
    assert p.devices_needed == 8 * 4  # 10M tokens over 4 TP groups of 8
    tight = plan(LLAMA_31_70B, kv_dtype="fp8", tp=8, device_bytes="80GB", memory_fraction=0.5)
    assert tight.usable_bytes_per_device == 40_000_000_000
    full = plan(LLAMA_31_70B, tp=1, device_bytes="80GB", weights_bytes="140GB")
    assert full.max_context_per_device == 0 and full.devices_needed is None
    assert "weights alone" in full.table()
    assert plan(LLAMA_31_70B).max_context_per_device is None  # no device size given
    # tokens per segment: 64 MiB over 21,120 B/token in whole pages of 16
    assert p.pages_per_segment == (64 << 20) // (16 * 21_120) == 198
    assert p.tokens_per_segment == 198 * 16


@pytest.mark.parametrize(
    ("layers", "kv_heads", "tp", "head_dim", "page_size", "dtype", "segment_bytes"),
    [
        (80, 8, 8, 128, 16, "fp8", 64 << 20),  # Llama-3.1-70B at TP 8
        (32, 8, 1, 128, 16, "bf16", 64 << 20),
        (1, 2, 1, 8, 4, "fp8", 5000),  # the parts' 256-byte alignment decides
        (3, 3, 1, 24, 1, "fp32", 10_000),
        (2, 4, 2, 64, 8, "fp8_e5m2", 1 << 20),
        (4, 2, 1, 16, 2, "fp16", 777_777),
        (1, 1, 1, 8, 1, "fp32", 1 << 30),  # capped at 2**20 pages
    ],
)
def test_pages_per_segment_is_what_the_pool_builds(
    layers: int,
    kv_heads: int,
    tp: int,
    head_dim: int,
    page_size: int,
    dtype: str,
    segment_bytes: int,
) -> None:
    """Issue 17, point 2: the planner and KVPool size segments with one formula
    (SegmentLayout.pages_fitting), so a plan's tokens per segment are the pool's."""
    p = plan(
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        tp=tp,
        kv_dtype=dtype,
        page_size=page_size,
        segment_bytes=segment_bytes,
    )
    pool = radixseg.KVPool(
        layers,
        kv_heads // tp,
        head_dim,
        page_size=page_size,
        dtype=dtype,
        segment_bytes=segment_bytes,
    )
    assert p.pages_per_segment == pool.pages_per_segment
    assert p.tokens_per_segment == pool.tokens_per_segment
    assert pool.segment_bytes <= segment_bytes
    if pool.pages_per_segment < 1 << 20:  # one page more would not fit
        bigger = radixseg.KVPool(
            layers,
            kv_heads // tp,
            head_dim,
            page_size=page_size,
            dtype=dtype,
            pages_per_segment=pool.pages_per_segment + 1,
        )
        assert bigger.segment_bytes > segment_bytes


def test_report_and_export():
    p = plan(LLAMA_31_70B, kv_dtype="fp8", tp=8, device_bytes="80GiB")
    text = str(p)
    assert text == p.table()
    for s in ("163,840 B/token", "20,480 B/token per device", "204.8 GB", "GiB", "5,120"):
        assert s in text
    d = p.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["kv_bytes_per_token"] == 163_840
    assert d["device_bytes"] == 80 * 2**30
    assert d["geometry"]["num_layers"] == 80
    assert isinstance(p, Plan) and radixseg.plan is plan


def test_old_module_path_still_imports():
    """``radixseg.plan`` is the function; the module it once also named is
    ``radixseg.capacity``, and imports written against the old path resolve there."""
    from radixseg.plan import Plan as OldPlan
    from radixseg.plan import parse_bytes as old_parse_bytes

    import radixseg.capacity

    assert callable(radixseg.plan) and radixseg.plan is radixseg.capacity.plan
    assert OldPlan is Plan and old_parse_bytes is parse_bytes


def test_cli_llama_70b(tmp_path, capsys):
    path = write(tmp_path, LLAMA_31_70B)
    argv = ["plan", "--config", str(path), "--kv-dtype", "fp8", "--context", "10000000"]
    assert main([*argv, "--tp", "8"]) == 0
    out = capsys.readouterr().out
    assert "163,840 B/token" in out
    assert "204.8 GB (190.7 GiB) per device" in out  # 163,840 x 10M / 8 = 204.8e9 B
    assert main([*argv, "--tp", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["context_kv_bytes_per_device"] == 204_800_000_000


def test_cli_fields_and_sizes(capsys):
    argv = ["plan", "--layers", "80", "--kv-heads", "8", "--head-dim", "128", "--tp", "8"]
    assert main([*argv, "--device-memory", "80GB", "--weights", "140GB", "--context", "10M"]) == 0
    out = capsys.readouterr().out
    assert "2,959,280 tokens" in out and "32 for 10,000,000 tokens" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--kv-dtype", "int4"], "int4"),
        (["--tp", "0"], "tp=0"),
        (["--device-memory", "80 gigs"], "80 gigs"),
        (["--context", "-5"], "-5"),
        (["--context", "1e5000"], "2^63 - 1"),
        (["--device-memory", "1e5000"], "--device-memory='1e5000' is past the limit"),
        (["--weights", "1e5000"], "--weights='1e5000' is past the limit"),
    ],
)
def test_cli_bad_input(capsys, argv, needle):
    base = ["plan", "--layers", "32", "--kv-heads", "8", "--head-dim", "128"]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radixseg plan: error:") and needle in err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\xff\xfe{", "not UTF-8"),
        (b"[" * 10_000 + b"]" * 10_000, "nests JSON too deeply"),
        (
            b'{"num_hidden_layers": 1000000000000, "num_attention_heads": 8, "hidden_size": 64}',
            "layers=1000000000000 is out of range: it must be an integer in 1..=65,536",
        ),
    ],
)
def test_cli_bad_config_files(tmp_path, capsys, content, needle):
    """A config that is not text, too deep or absurdly large ends in ``error:`` (exit 2)."""
    path = tmp_path / "config.json"
    path.write_bytes(content)
    assert main(["plan", "--config", str(path), "--device-memory", "80GB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radixseg plan: error:") and needle in err and "Traceback" not in err


def test_huge_values_are_refused_by_name():
    with pytest.raises(InvalidArgument, match=r"layers=1000000000000 is out of range.*65,536"):
        plan(num_layers=10**12, num_kv_heads=8, head_dim=128)
    with pytest.raises(InvalidArgument, match="device_bytes='1e5000' is past the limit"):
        plan(num_layers=2, num_kv_heads=8, head_dim=128, device_bytes="1e5000")
    with pytest.raises(InvalidArgument, match=r"context=~2\^16609 is out of range"):
        plan(num_layers=2, num_kv_heads=8, head_dim=128, context=10**5000)


def test_cli_needs_a_model(capsys):
    assert main(["plan"]) == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kv_dtype": "int4"}, "'int4'"),
        ({"kv_dtype": torch.int8}, "torch.int8"),
        ({"tp": 0}, "tp=0"),
        ({"context": 0}, "context=0"),
        ({"page_size": 24}, "page_size=24"),
        ({"page_size": 2048}, "page_size=2048"),
        ({"memory_fraction": 1.5}, "memory_fraction=1.5"),
        ({"device_bytes": "80 gigs"}, "'80 gigs'"),
        ({"segment_bytes": 1024}, "segment_bytes=1,024"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, needle):
    with pytest.raises(InvalidArgument) as e:
        plan(LLAMA_31_8B, **kwargs)
    assert needle in str(e.value)


def test_bad_configs_name_field_and_file(tmp_path):
    bad = {k: v for k, v in LLAMA_31_8B.items() if k != "num_hidden_layers"}
    path = write(tmp_path, bad)
    with pytest.raises(InvalidArgument, match="num_hidden_layers") as e:
        plan(path)
    assert str(path) in str(e.value)
    no_hidden = {k: v for k, v in LLAMA_31_8B.items() if k != "hidden_size"}
    with pytest.raises(InvalidArgument, match=r"hidden_size.*head_dim"):
        plan(write(tmp_path, no_hidden, "b.json"))
    with pytest.raises(InvalidArgument, match="kv_lora_rank=-1"):
        plan({**DEEPSEEK_V3, "kv_lora_rank": -1})
    with pytest.raises(InvalidArgument, match="qk_rope_head_dim"):
        plan({k: v for k, v in DEEPSEEK_V3.items() if k != "qk_rope_head_dim"})
    with pytest.raises(InvalidArgument, match="'linear_attention'"):
        plan({**LLAMA_31_8B, "num_hidden_layers": 2, "layer_types": ["linear_attention"] * 2})
    with pytest.raises(InvalidArgument, match=r"missing\.json"):
        plan(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        plan(tmp_path / "broken.json")
    with pytest.raises(InvalidArgument, match="num_kv_heads=0"):
        plan(num_layers=2, num_kv_heads=0, head_dim=64)


def test_parse_sizes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5 TB") == 1_500_000_000_000
    assert parse_bytes("85_899_345_920") == parse_bytes(85_899_345_920) == 80 * 2**30
    assert parse_count("10M") == parse_count("10,000,000") == 10_000_000
    with pytest.raises(InvalidArgument, match=r"0\.5"):
        parse_bytes("0.5")
    with pytest.raises(InvalidArgument, match="80XB"):
        parse_bytes("80XB")


# Context parallelism (issue 19): cp ranks per TP rank, virtual pages of
# page_size * cp tokens, page_size of them on each rank under the same page id.
H200 = "141GB"
LLAMA_70B_TP8 = {"kv_dtype": "fp8", "tp": 8}
RATE_70B_TP8 = 20_480 + 640  # KV + FP8 scales per token per device at TP 8


def test_cp_halves_the_bytes_per_rank():
    one = plan(LLAMA_31_70B, **LLAMA_70B_TP8, context=10_000_001)
    two = plan(LLAMA_31_70B, **LLAMA_70B_TP8, context=10_000_001, cp=2)
    page = 16 * 20_480  # one 16-token page of KV on one device
    assert one.pages_per_rank == 625_001 and two.pages_per_rank == 312_501  # ceil(L / (P R))
    assert one.context_kv_bytes_per_rank == 625_001 * page
    assert abs(2 * two.context_kv_bytes_per_rank - one.context_kv_bytes_per_rank) <= 2 * page
    assert two.context_scale_bytes_per_rank == 312_501 * 16 * 640
    # Whole segments of 198 pages on each rank: half, within one segment.
    seg = one.reserved_bytes_per_rank // one.segments_per_rank
    assert (one.segments_per_rank, two.segments_per_rank) == (
        -(-625_001 // 198),
        -(-312_501 // 198),
    )
    assert abs(2 * two.reserved_bytes_per_rank - one.reserved_bytes_per_rank) <= 2 * seg
    # the segment is what KVPool builds for one device: 64 MiB at most
    assert seg == radixseg.KVPool(80, 1, 128, page_size=16, dtype="fp8").segment_bytes <= 64 << 20
    # The one-rank figures are the per-device ones, rounded up to whole pages.
    assert one.cp == 1 and 0 <= one.context_kv_bytes_per_rank - one.context_kv_bytes_per_device
    assert one.context_kv_bytes_per_rank - one.context_kv_bytes_per_device < page


@pytest.mark.parametrize(("page_size", "cp"), [(16, 2), (16, 3), (1, 4), (8, 5)])
def test_a_partly_filled_virtual_page_costs_a_page_on_every_rank(page_size, cp):
    """L = P R + 1 tokens: the second virtual page holds one token, on rank 0
    alone, yet its page id takes a page on every rank."""
    kw = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "kv_dtype": "bf16"}
    per_page = page_size * 2 * (2 * 2 * 8 * 2)  # P tokens x 2 layers x (K, V) bytes
    p = plan(**kw, page_size=page_size, cp=cp, context=page_size * cp + 1)
    assert p.pages_per_rank == 2
    assert p.context_kv_bytes_per_rank == 2 * per_page
    full = plan(**kw, page_size=page_size, cp=cp, context=2 * page_size * cp)
    assert full.context_kv_bytes_per_rank == p.context_kv_bytes_per_rank
    exact = plan(**kw, page_size=page_size, cp=cp, context=page_size * cp)
    assert exact.pages_per_rank == 1 and exact.context_kv_bytes_per_rank == per_page


def test_ranks_needed_for_llama_70b_at_10m_tokens():
    """DESIGN.md: 10M tokens of Llama-3.1-70B FP8 are 204.8 GB of KV per device
    at TP 8 (211.2 GB with radixseg's scales), past an H200's 141 GB."""
    p = plan(LLAMA_31_70B, **LLAMA_70B_TP8, device_bytes=H200)
    assert p.context_kv_bytes_per_device == 204_800_000_000
    assert p.usable_bytes_per_device == 141_000_000_000
    # The fewest R with ceil(L / (16 R)) pages of 16 tokens within the budget.
    need = min(
        r
        for r in range(1, 65)
        if -(-10_000_000 // (16 * r)) * 16 * RATE_70B_TP8 <= p.usable_bytes_per_device
    )
    assert need == p.ranks_needed == 2
    assert p.devices_needed == 8 * p.ranks_needed  # the existing whole-group count agrees
    # Two ranks hold twice what one device holds, both in whole pages.
    assert p.max_context_with_cp == p.max_context_per_device == 6_676_128
    two = plan(LLAMA_31_70B, **LLAMA_70B_TP8, device_bytes=H200, cp=2)
    assert two.ranks_needed == 2
    assert two.max_context_with_cp == 141_000_000_000 // (16 * RATE_70B_TP8) * 32 == 13_352_256
    assert two.context_kv_bytes_per_rank + two.context_scale_bytes_per_rank <= 141_000_000_000
    # Weights (70 GB in FP8, 8.75 GB per TP rank) leave less, still 2 ranks.
    heavy = plan(LLAMA_31_70B, **LLAMA_70B_TP8, device_bytes=H200, weights_bytes="70GB")
    assert heavy.ranks_needed == 2
    # At TP 1 the whole model's 1.69 TB of KV + scales need 12 ranks.
    tp1 = plan(LLAMA_31_70B, kv_dtype="fp8", device_bytes=H200)
    assert tp1.ranks_needed == -(-10_000_000 * 168_960 // 141_000_000_000) == 12


def test_ranks_needed_edges():
    assert plan(LLAMA_31_8B, context=100_000, device_bytes="80GB").ranks_needed == 1
    assert plan(LLAMA_31_8B).ranks_needed is None  # no device size: no fit figures
    filled = plan(LLAMA_31_70B, device_bytes="80GB", weights_bytes="140GB", cp=2)
    assert filled.ranks_needed is None and filled.max_context_with_cp == 0
    assert "the weights alone fill the device" in filled.table()
    # Windowed layers stop growing: Mistral-7B-v0.1 (every layer slides) fits anything.
    p = plan(MISTRAL_7B_V01, kv_dtype="bf16", device_bytes="80GB", cp=2)
    assert p.max_context_with_cp is None and p.ranks_needed == 1
    # 4,096-token windows over virtual pages of 32 tokens: 128 pages per layer per rank.
    assert p.pages_per_rank == 128
    assert p.context_kv_bytes_per_rank == 128 * 16 * 131_072  # pages x tokens x B/token
    # Scout: 12 full layers grow, 36 chunked layers stop at 8,192 tokens.
    s = plan(LLAMA4_SCOUT, kv_dtype="bf16", context=1_000_000, cp=4)
    assert s.context_kv_bytes_per_rank == 16 * 4_096 * (12 * 15_625 + 36 * 128)
    assert s.reserved_bytes_per_rank > s.context_kv_bytes_per_rank


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"cp": 0}, "cp=0 is out of range: it must be an integer in 1..=1,024"),
        ({"cp": 1025, "page_size": 1}, "cp=1025 is out of range"),
        ({"cp": 2.0}, "cp=2.0"),
        ({"cp": True}, "cp=True"),
        ({"cp": "2"}, "cp='2'"),
        ({"cp": 65}, "cp=65 with page_size=16 makes virtual pages of 1,040 tokens"),
        ({"cp": 2, "page_size": 1024}, "use cp <= 1 or a smaller page_size"),
    ],
)
def test_bad_cp_names_the_limits(kwargs, needle):
    with pytest.raises(InvalidArgument) as e:
        plan(LLAMA_31_8B, **kwargs)
    assert needle in str(e.value)
    # the largest allowed: page_size * cp == 1024
    assert plan(LLAMA_31_8B, cp=64).cp == 64
    assert plan(LLAMA_31_8B, cp=1024, page_size=1).cp == 1024


def test_cli_cp(tmp_path, capsys):
    path = write(tmp_path, LLAMA_31_70B)
    argv = ["plan", "--config", str(path), "--kv-dtype", "fp8", "--context", "10M", "--tp", "8"]
    argv += ["--device-memory", H200]
    assert main(argv) == 0
    one = capsys.readouterr().out
    # cp=1: the per-rank rows stay out; the context does not fit, so the R it needs is named
    assert "per rank" not in one
    assert "\nranks needed     10,000,000 tokens do not fit one device: they need --cp 2" in one
    assert main([*argv, "--cp", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(one.split("\nranks needed")[0])  # the rest is as at cp=1
    for s in (
        "cp=2 context-parallel ranks per TP rank: virtual pages of 32 tokens",
        "312,500 pages of 16 tokens: KV 102.4 GB (95.4 GiB) + FP8 scales 3.2 GB (3.0 GiB)",
        "105.6 GB (98.4 GiB) per rank: 1,579 segments of 198 pages",
        "13,352,256 tokens over 2 ranks",
        "2 for 10,000,000 tokens (cp=2 fits)",
    ):
        assert s in out
    assert main([*argv, "--cp", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cp"] == 2 and d["ranks_needed"] == 2 and d["pages_per_rank"] == 312_500
    assert d["context_kv_bytes_per_rank"] == 102_400_000_000
    assert d["context_scale_bytes_per_rank"] == 3_200_000_000
    assert d["reserved_bytes_per_rank"] == 1_579 * 198 * 16 * RATE_70B_TP8
    assert d["max_context_with_cp"] == 13_352_256
    assert main([*argv, "--cp", "1", "--context", "1M"]) == 0
    fits = capsys.readouterr().out
    assert "ranks needed" not in fits and "cp ranks" not in fits  # today's table
    assert main([*argv, "--cp", "0"]) == 2
    assert "cp=0 is out of range" in capsys.readouterr().err
    assert main([*argv, "--cp", "128"]) == 2
    assert "use cp <= 64" in capsys.readouterr().err


def test_cli_cp_past_the_page_limit(capsys):
    """A context needing more ranks than page_size allows says so."""
    argv = ["plan", "--layers", "80", "--kv-heads", "8", "--head-dim", "128", "--context", "10M"]
    assert main([*argv, "--device-memory", "1GB", "--page-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "past the 16 ranks page_size 64 allows" in out


# Layer groups: one pool per group of layers of one kind and span (GroupedKVPool).
def test_scout_groups_at_10m_tokens_fp8():
    """Scout in FP8 at 10M tokens: the 12 full layers keep every page, the 36
    chunked layers only the pages of the chunk a resuming request needs."""
    from radixseg.capacity.groups import layer_groups

    p = plan(LLAMA4_SCOUT, kv_dtype="fp8", context=10_000_000)
    full, chunked = p.groups
    assert (full.kind, full.span, full.layers) == ("full", None, 12)
    assert (chunked.kind, chunked.span, chunked.layers) == ("chunked", 8192, 36)
    assert full.pages == 625_000 == p.pages_per_rank
    held = layer_groups(p.geometry)[1].pages_held(10_000_000, 16)
    # 10M - 1 is in the chunk starting at 8,192 x 1,220; the page boundary below
    # it (9,999,984) is in the same chunk: pages 624,640.. are kept.
    assert chunked.pages == held == 625_000 - 8_192 * 1_220 // 16 == 360
    for gp in p.groups:  # each group's pool is a KVPool of its layers
        pool = radixseg.KVPool(gp.layers, 8, 128, page_size=16, dtype="fp8")
        assert (gp.pages_per_segment, gp.segment_bytes) == (
            pool.pages_per_segment,
            pool.segment_bytes,
        )
        assert gp.segments == -(-gp.pages // gp.pages_per_segment)
        assert gp.reserved_bytes == gp.segments * gp.segment_bytes
    # the full group is the single pool the plan already describes
    assert (full.pages_per_segment, full.segments) == (p.pages_per_segment, p.segments_per_rank)
    assert p.reserved_bytes_grouped == full.reserved_bytes + chunked.reserved_bytes
    # The single-pool figure counts whole 8,192-token windows of the chunked
    # layers' pages (512 each); the grouped pool holds 360 pages of them, in
    # whole segments: within a fraction of a percent of each other.
    window_pages_bytes = 36 * 512 * 16 * (2 * 8 * 128 + 2 * 8 * 4)  # KV + scales
    assert p.reserved_bytes_per_rank - full.reserved_bytes == window_pages_bytes
    assert chunked.reserved_bytes < window_pages_bytes
    assert p.reserved_bytes_grouped <= p.reserved_bytes_per_rank
    assert p.reserved_bytes_per_rank - p.reserved_bytes_grouped < p.reserved_bytes_per_rank / 1000
    # every layer full would reserve about four times as much
    every = plan(num_layers=48, num_kv_heads=8, head_dim=128, kv_dtype="fp8", context=10_000_000)
    assert every.groups[0].layers == 48 and p.reserved_bytes_grouped * 3.9 < (
        every.reserved_bytes_grouped or 0
    )
    print(
        f"\nScout 10M FP8: full {full.reserved_bytes:,} B + chunked {chunked.reserved_bytes:,} B"
        f" = grouped {p.reserved_bytes_grouped:,} B; reserved_bytes_per_rank"
        f" {p.reserved_bytes_per_rank:,} B; all 48 layers full {every.reserved_bytes_grouped:,} B"
    )


def test_gemma2_sliding_groups():
    """Gemma-2-9B-like: 42 layers alternating sliding 4,096 and full."""
    gemma2 = {
        "model_type": "gemma2",
        "hidden_size": 3584,
        "head_dim": 256,
        "num_attention_heads": 16,
        "num_hidden_layers": 42,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
    }
    p = plan(gemma2, kv_dtype="bf16", context=100_000, tp=2)
    full, sliding = p.groups
    assert (full.kind, full.span, full.layers, full.pages) == ("full", None, 21, 6_250)
    # the last page boundary below 100,000 is 99,984; its window starts at 95,889
    assert (sliding.kind, sliding.span, sliding.layers) == ("sliding", 4096, 21)
    assert sliding.pages == 6_250 - (99_984 - 4_095) // 16 == 257
    pool = radixseg.KVPool(21, 4, 256, page_size=16, dtype="bf16")
    assert full.segment_bytes == sliding.segment_bytes == pool.segment_bytes
    assert full.segments == -(-6_250 // pool.pages_per_segment)
    assert sliding.segments == -(-257 // pool.pages_per_segment)
    assert p.reserved_bytes_grouped == (full.segments + sliding.segments) * pool.segment_bytes
    # Below the window a sliding group holds every page.
    short = plan(gemma2, kv_dtype="bf16", context=1_000, tp=2)
    assert [gp.pages for gp in short.groups] == [63, 63]
    # Every layer sliding (Mistral-7B-v0.1): one windowed group, flat past its window.
    m = plan(MISTRAL_7B_V01, kv_dtype="bf16", context=1_000_000)
    (only,) = m.groups
    assert (only.kind, only.layers, only.pages) == ("sliding", 32, 257)


def test_all_full_model_has_one_group():
    p = plan(LLAMA_31_70B, **LLAMA_70B_TP8)
    (only,) = p.groups
    assert (only.kind, only.span, only.layers, only.pages) == ("full", None, 80, 625_000)
    seg = radixseg.KVPool(80, 1, 128, page_size=16, dtype="fp8").segment_bytes
    assert (only.pages_per_segment, only.segments) == (p.pages_per_segment, p.segments_per_rank)
    assert p.reserved_bytes_grouped == p.segments_per_rank * seg == p.reserved_bytes_per_rank
    assert "grouped pool" not in p.table()  # no windowed layers: no group rows


def test_groups_left_out():
    """No groups with context parallelism, for MLA, or when a group's page is
    past the segment (the single pool of the 12 full layers still fits)."""
    assert plan(LLAMA4_SCOUT, kv_dtype="fp8", cp=2).groups == ()
    assert plan(LLAMA4_SCOUT, kv_dtype="fp8", cp=2).reserved_bytes_grouped is None
    assert plan(DEEPSEEK_V3).groups == () and plan(DEEPSEEK_V3).reserved_bytes_grouped is None
    big = plan(LLAMA4_SCOUT, kv_dtype="fp8", page_size=1024)  # 36 layers x 1,024: 75.5 MB
    assert big.pages_per_segment >= 1 and big.groups == () and big.reserved_bytes_grouped is None
    assert "one page of a layer group is past the segment" in big.table()


def test_cli_groups(tmp_path, capsys):
    path = write(tmp_path, LLAMA4_SCOUT)
    argv = ["plan", "--config", str(path), "--kv-dtype", "fp8", "--context", "10M"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for s in (
        "\ngrouped pool     253.9 GB (236.5 GiB) per device reserved",
        "\n  full           every token, 12 layers: 625,000 pages in 3,788 segments of 165 pages",
        "\n  chunked        8,192-token chunks, 36 layers: 360 pages in 7 segments of 55 pages",
    ):
        assert s in out
    assert main([*argv, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [g["layers"] for g in d["groups"]] == [12, 36]
    assert d["groups"][1]["span"] == 8192 and d["groups"][0]["span"] is None
    assert d["reserved_bytes_grouped"] == sum(g["reserved_bytes"] for g in d["groups"])
    assert d["geometry"]["layer_kinds"].count("chunked") == 36
