"""Context parallelism behind transformers (issue 19): RadixsegCache over a
ShardedPrefixCache, two ranks on CPU (gloo), each holding half of the KV.

One spawn of two processes (tests/_distributed_harness.py) runs every
scenario in one call: spawning and importing transformers dominate the cost.
Each rank builds the same tiny Llama from a config with the same seed
(nothing is downloaded) and runs the same ``generate``; its tokens must equal
one process's with ``DynamicCache`` (fp32 storage), and both ranks must
return the same tokens.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import radixseg.integrations.transformers as rt  # noqa: E402
from _distributed_harness import Ranks  # noqa: E402
from radixseg import InvalidArgument, PrefixCache  # noqa: E402
from radixseg.distributed import ShardedKVPool, ShardedPrefixCache  # noqa: E402

# The tiny models and helpers of the one-process tests (the spawned ranks
# import both modules by name).
from test_integration_transformers import (  # noqa: E402
    _gen_masked,
    _generate,
    _left_padded,
    _llama,
    _mistral,
    _prompts,
    _reference,
)

RANKS = 2


def _run(model, prefix, ids, new, mask=None) -> tuple[torch.Tensor, rt.RadixsegCache]:
    """Greedy generate through radixseg's attention; returns (tokens, cache)."""
    model.set_attn_implementation("radixseg")
    cache = rt.RadixsegCache(prefix, ids, attention_mask=mask, backend="torch")
    mask = torch.ones_like(ids) if mask is None else mask
    return _gen_masked(model, ids, mask, new, cache=cache), cache


def _long_prompt_and_reuse(group: Any) -> dict[str, Any]:
    """A 150-token prompt over page 16 (virtual page 32: both ranks hold tokens
    of five virtual pages over several segments), then a prompt sharing its
    first 128 tokens, reused, under inference_mode."""
    model = _llama()
    prompt = _prompts(1, 150, seed=21)
    ref = _reference(model, prompt, 20)

    one = rt.prefix_cache_for(model.config, dtype="fp32", pages_per_segment=2)
    single, c1 = _run(model, one, prompt, 20)
    assert torch.equal(single, ref)
    alone = one.pool.stats()
    c1.abort()

    prefix = rt.prefix_cache_for(model.config, dtype="fp32", pages_per_segment=2, group=group)
    assert isinstance(prefix, ShardedPrefixCache) and prefix.page_size == 16 * RANKS
    out, cache = _run(model, prefix, prompt, 20)
    assert torch.equal(out, ref)
    mine = prefix.pool.stats()
    # 169 tokens hold KV: 11 pages of 16 in one process, 6 virtual pages of 32 here.
    assert mine["used_pages"] == 6 and alone["used_pages"] == 11
    assert mine["segments"] >= 3
    assert (
        mine["used_bytes"] <= alone["used_bytes"] / 2 + mine["page_size"] * mine["bytes_per_token"]
    )
    assert mine["reserved_bytes"] <= alone["reserved_bytes"] / 2 + mine["segment_bytes"]
    total = prefix.pool.stats_all()["total"]
    assert total["used_bytes"] <= alone["used_bytes"] + mine["page_size"] * mine["bytes_per_token"]
    cache.finish(out)

    second = torch.cat([prompt[:, :128], _prompts(1, 20, seed=22)], 1)
    ref2 = _reference(model, second, 12)
    with torch.inference_mode():
        out2, c2 = _run(model, prefix, second, 12)
    assert c2.reused_tokens == 128  # four whole virtual pages
    assert c2.computed_tokens == 20 + 11
    assert torch.equal(out2, ref2)
    c2.finish(out2)
    prefix.check_invariants()
    keys = ("used_bytes", "reserved_bytes", "used_pages", "segments")
    return {
        "tokens": [out, out2],
        "one_process": {k: alone[k] for k in keys},
        "this_rank": {k: mine[k] for k in keys},
    }


def _padded_batch(group: Any) -> list[torch.Tensor]:
    """Rows of 45 and 9 real tokens, left-padded: rank 1 holds nothing of row 1
    at prefill (an empty shard) and its first tokens during decode."""
    model = _llama()
    ids, mask = _left_padded([45, 9], seed=23)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = _gen_masked(model, ids, mask, 10)
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", segment_bytes=1 << 16, group=group)
    with torch.no_grad():
        out, cache = _run(model, prefix, ids, 10, mask)
    assert torch.equal(out, ref)
    assert [r.seq_len for r in cache.requests] == [54, 18]
    cache.finish(out)
    prefix.check_invariants()
    return [out]


def _page_size_one(group: Any) -> list[torch.Tensor]:
    """Page 1: tokens alternate between the ranks (virtual page 2)."""
    model = _llama()
    prompt = _prompts(1, 23, seed=24)
    ref = _reference(model, prompt, 6)
    prefix = rt.prefix_cache_for(
        model.config, dtype="fp32", page_size=1, segment_bytes=1 << 14, group=group
    )
    out, cache = _run(model, prefix, prompt, 6)
    assert torch.equal(out, ref)
    assert prefix.pool.stats()["used_pages"] == 14  # ceil(28 / 2) on each rank
    cache.abort()
    assert prefix.pool.stats()["used_pages"] == 0
    return [out]


def _refusals(group: Any) -> None:
    """Windowed layers and attention='gather' read every token locally."""
    windowed = _mistral(8)
    with pytest.raises(InvalidArgument, match="soft-capped layers; sliding-window, chunked"):
        rt.prefix_cache_for(windowed.config, dtype="fp32", group=group)
    pool = ShardedKVPool(*rt.model_geometry(windowed.config), dtype="fp32", group=group)
    prefix = ShardedPrefixCache(pool)  # built by hand: refused at the first forward
    ids = _prompts(1, 12, seed=25) % 96
    with pytest.raises(InvalidArgument, match="attention='gather' is not supported"):
        rt.RadixsegCache(prefix, ids, attention="gather")
    other = ShardedKVPool(*rt.model_geometry(windowed.config), dtype="fp32", group=group)
    with pytest.raises(TypeError, match=r"use radixseg\.distributed\.ShardedPrefixCache"):
        PrefixCache(other)  # its slots would be in virtual units
    windowed.set_attn_implementation("radixseg")
    cache = rt.RadixsegCache(prefix, ids, backend="torch")
    refusal = r"uses window_left=\[7\]; .*issue 20"
    with torch.no_grad(), pytest.raises(InvalidArgument, match=refusal):
        _generate(windowed, ids, 2, cache=cache)
    cache.abort()
    assert pool.stats()["used_pages"] == 0
    prefix.check_invariants()


def _scenarios() -> dict[str, Any]:
    """Every scenario, in one call on every rank of the harness's gloo group."""
    import torch.distributed as dist

    group = dist.group.WORLD
    t0 = time.perf_counter()
    got = _long_prompt_and_reuse(group)
    got["tokens"] += _padded_batch(group) + _page_size_one(group)
    _refusals(group)
    got["seconds"] = time.perf_counter() - t0
    got["tokens"] = [t.tolist() for t in got["tokens"]]  # plain data through the queue
    return got


def test_context_parallel_generate_matches_dynamic_cache(tmp_path, capsys):
    ranks = Ranks(RANKS, tmp_path)
    try:
        got = ranks.run(_scenarios)
    finally:
        ranks.close()  # joins, kills survivors, asserts exit codes 0
    assert got[0]["tokens"] == got[1]["tokens"]  # every rank generated the same tokens
    with capsys.disabled():
        print(
            f"\ncontext parallel, {RANKS} ranks: one process {got[0]['one_process']}; "
            + "; ".join(f"rank {r} {got[r]['this_rank']}" for r in range(RANKS))
            + f"; scenarios {max(g['seconds'] for g in got):.1f} s"
        )
