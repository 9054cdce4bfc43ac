"""The CPU decode path without fixed overhead: what it skips must not change results.

* ``decode_cpu`` runs small calls on the calling thread and large ones on
  parked helper threads (``radixseg-cpu``'s ``pool``): the same bits with any
  ``threads``, also with several Python threads calling at once (the GIL
  released, the helpers shared).
* ``attention.decode`` on the CPU skips the qo_indptr checks and int32 device
  copies the CPU path never reads; a batch past its cached ``qo_indptr`` still
  works.
* The transformers integration validates a step's page table once per step
  (per layer group), not per layer, and its layers call the native kernels
  with those host arrays: logits equal the torch backend's.

No timings are asserted here (the benchmarks measure them).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from radixseg import KVPool
from radixseg import attention as A
from radixseg.kernels.cpu import paged_decode_cpu

transformers = pytest.importorskip("transformers")

import radixseg.integrations.transformers as rt  # noqa: E402
from radixseg.grouped import GroupedPrefixCache  # noqa: E402


def _pool(lens: list[int], dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """One-layer pool with ``lens`` tokens per request, pages shuffled."""
    ps, kvh, d = 16, 2, 64
    pool = KVPool(1, kvh, d, page_size=ps, dtype=dtype, pages_per_segment=256)
    need = [-(-n // ps) for n in lens]
    gen = torch.Generator().manual_seed(seed)
    ids = pool.alloc(sum(need))
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    slots = (ids.long()[:, None] * ps + torch.arange(ps)).reshape(-1)
    kv = torch.randn(slots.numel(), kvh, d, generator=gen)
    pool.write(0, slots, kv, kv.flip(-1) * 0.5, check=False)
    indptr = np.zeros(len(lens) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(need)
    last = torch.tensor([(n - 1) % ps + 1 for n in lens], dtype=torch.int32)
    return pool, torch.from_numpy(indptr), ids, last


def test_threads_give_the_same_bits_small_and_large():
    """2 MiB (one thread's worth) and 24 MiB (several) of f32 KV."""
    for lens in ([1024, 1024], [9000, 5003, 17, 12_000]):
        pool, indptr, ids, last = _pool(lens)
        q = torch.randn(len(lens), 8, 64)
        host = (indptr.numpy(), ids.numpy().astype(np.int64), np.array(lens, dtype=np.int64))
        one = paged_decode_cpu(q, pool, 0, *host, sm_scale=0.125, threads=1)
        ref = A.decode(q, pool, 0, indptr, ids, last, sm_scale=0.125, backend="torch")
        torch.testing.assert_close(one[0], ref, rtol=2e-5, atol=2e-5)
        for threads in (2, 3, 8):
            got = paged_decode_cpu(q, pool, 0, *host, sm_scale=0.125, threads=threads)
            assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1]), threads


def test_concurrent_callers_share_the_helpers():
    """Four Python threads decode at once (GIL released), each on its own
    queries, with helper threads: each gets its own single-thread answer."""
    lens = [9000, 7000]
    pool, indptr, ids, _ = _pool(lens, torch.bfloat16, seed=1)
    host = (indptr.numpy(), ids.numpy().astype(np.int64), np.array(lens, dtype=np.int64))
    qs = [torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [paged_decode_cpu(q, pool, 0, *host, sm_scale=0.1, threads=1)[0] for q in qs]
    got: list[Any] = [None] * 4
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                out = paged_decode_cpu(qs[i], pool, 0, *host, sm_scale=0.1, threads=4)[0]
                assert torch.equal(out, want[i])
            got[i] = out
        except BaseException as e:  # reported below, on the main thread
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert all(g is not None for g in got)


def test_decode_batch_past_the_cached_qo_indptr():
    """4,100 one-token requests: more rows than the cached 0..4096 qo_indptr."""
    n = 4100
    pool = KVPool(1, 1, 16, page_size=1, dtype=torch.float32, pages_per_segment=8192)
    ids = pool.alloc(n)
    kv = torch.randn(n, 1, 16)
    pool.write(0, ids.long(), kv, kv * 2, check=False)
    indptr = torch.arange(n + 1, dtype=torch.int32)
    last = torch.ones(n, dtype=torch.int32)
    q = torch.randn(n, 2, 16)
    got = A.decode(q, pool, 0, indptr, ids, last, backend="cpu")
    # One key each: the output is that key's value.
    torch.testing.assert_close(got, (kv * 2).expand(n, 2, 16))


class _Counting(A._PageTable):
    made = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        type(self).made += 1
        super().__init__(*args, **kwargs)


def _llama(layers: int = 3) -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _qwen2_hybrid() -> Any:
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    cfg.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _steps(model: Any, backend: str, monkeypatch: Any, grouped: bool) -> tuple[Any, list[int]]:
    """Prefill a padded batch, then 4 decode steps: logits of each, and how many
    page tables were validated in each decode step."""
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # row 1 left-padded
    prefix = rt.prefix_cache_for(model.config, dtype="fp32", page_size=4, segment_bytes=1 << 16)
    assert isinstance(prefix, GroupedPrefixCache) == grouped
    model.set_attn_implementation("radixseg")
    logits, made = [], []
    monkeypatch.setattr(A, "_PageTable", _Counting)
    with torch.no_grad(), rt.RadixsegCache(prefix, ids, attention_mask=mask, backend=backend) as c:
        out = model(ids, attention_mask=mask, cache=c, use_cache=True)
        logits.append(out.logits[:, -1])
        for _ in range(4):
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            _Counting.made = 0
            out = model(tok, attention_mask=mask, cache=c, use_cache=True)
            made.append(_Counting.made)
            logits.append(out.logits[:, -1])
    return torch.stack(logits), made


@pytest.mark.parametrize("arch", ["llama", "qwen2_hybrid"])
def test_a_step_validates_its_table_once_and_matches_the_torch_backend(arch, monkeypatch):
    grouped = arch == "qwen2_hybrid"
    model = _qwen2_hybrid() if grouped else _llama()
    groups = 2 if grouped else 1
    ref, made_torch = _steps(model, "torch", monkeypatch, grouped)
    got, made_cpu = _steps(model, "cpu", monkeypatch, grouped)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # The torch backend validates per layer; the native path once per step and group.
    assert made_torch == [3] * 4
    assert made_cpu == [groups] * 4
