"""KVPool: growth from zero, budget, device OOM, shrink, FP8 accuracy, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import radixseg
from radixseg import (
    BudgetExhausted,
    DeviceOutOfMemory,
    InvalidArgument,
    InvalidHandle,
    KVPool,
)
from radixseg.pool import FP8_MAX, dequantize_fp8, quantize_fp8


def small_pool(**kw: object) -> KVPool:
    args: dict[str, object] = dict(
        num_layers=2, num_kv_heads=2, head_dim=8, page_size=4, pages_per_segment=8
    )
    args.update(kw)
    return KVPool(**args)  # type: ignore[arg-type]


def slots_of(ids: torch.Tensor, page_size: int) -> torch.Tensor:
    return (ids.long()[:, None] * page_size + torch.arange(page_size)).reshape(-1)


# ----- FP8 ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_round_trip_error_bound(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 4, 64, generator=g) * torch.logspace(-6, 4, 257)[:, None, None]
    x[3] = 0.0  # an all-zero row: scale 0, reads back zeros
    q, scale = quantize_fp8(x, dtype)
    assert q.dtype == dtype and scale.shape == (257, 4)
    y = dequantize_fp8(q, scale)
    mantissa_bits = 3 if dtype == torch.float8_e4m3fn else 2
    # Round to nearest: half an ulp of the value, plus half the subnormal step.
    subnormal_step = 2.0 ** (-9 if dtype == torch.float8_e4m3fn else -16) * FP8_MAX[dtype]
    bound = x.abs() * 2.0 ** -(mantissa_bits + 1) + scale[..., None] * subnormal_step / 2
    assert ((x - y).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(y[3], torch.zeros_like(y[3]))
    # The largest magnitude of every row is represented exactly.
    amax_idx = x.abs().argmax(-1, keepdim=True)
    rel = (y.gather(-1, amax_idx) - x.gather(-1, amax_idx)).abs() / x.gather(
        -1, amax_idx
    ).abs().clamp_min(1e-30)
    assert (rel[torch.arange(257) != 3] < 1e-6).all()


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]
)
def test_write_read_round_trip(dtype: torch.dtype) -> None:
    pool = small_pool(dtype=dtype)
    ids = pool.alloc(3)
    slots = slots_of(ids, 4)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(12, 2, 8, generator=g)
    v = torch.randn(12, 2, 8, generator=g)
    pool.write(1, slots, k, v)
    kk, vv = pool.read(1, slots)
    assert kk.dtype == torch.float32 and kk.shape == (12, 2, 8)
    if dtype in FP8_MAX:
        assert torch.equal(kk, dequantize_fp8(*quantize_fp8(k, dtype)))
        assert torch.allclose(kk, k, rtol=0.07, atol=1e-3)
    else:
        assert torch.equal(kk, k.to(dtype).float()) and torch.equal(vv, v.to(dtype).float())
    # Layer 0 was not written; a permutation of slots reads the permutation.
    perm = torch.randperm(12, generator=g)
    k2, _ = pool.read(1, slots[perm])
    assert torch.equal(k2, kk[perm])


# ----- growth ---------------------------------------------------------------------


def test_starts_empty_and_grows_by_segments_without_moving_pages() -> None:
    pool = small_pool(dtype=torch.float32)
    s = pool.stats()
    assert s["segments"] == 0 and s["reserved_bytes"] == 0 and pool.segment_table.numel() == 0
    first = pool.alloc(5)
    slots = slots_of(first, 4)
    data = torch.arange(20 * 16, dtype=torch.float32).reshape(20, 2, 8)
    pool.write(0, slots, data, -data)
    ptr = pool.segment(0).k.data_ptr()
    held = [pool.alloc(8) for _ in range(40)]  # 40 more segments
    assert pool.stats()["segments"] == 41
    assert pool.segment(0).k.data_ptr() == ptr  # growth copied nothing
    k, v = pool.read(0, slots)
    assert torch.equal(k, data) and torch.equal(v, -data)
    # The table holds every live segment's base addresses.
    table = pool.segment_table
    for sid in pool.allocator.segments():
        seg = pool.segment(sid)
        assert table[sid].tolist()[:2] == [seg.k.data_ptr(), seg.v.data_ptr()]
    for ids in held:
        pool.release(ids)
    freed = pool.shrink()
    assert freed == 40 * pool.segment_bytes
    assert pool.stats()["segments"] == 1 and (pool.segment_table[1:] == 0).all()
    pool.check_invariants()


def test_segment_layout_is_aligned_and_matches_strides() -> None:
    pool = small_pool(dtype=torch.float8_e4m3fn, head_dim=5)
    pool.alloc(1)
    seg = pool.segment(0)
    base = seg.k.data_ptr()
    for t in seg:  # 16-byte aligned (vector loads), sub-tensors 256 B apart from the base
        assert t is not None and t.data_ptr() % 16 == 0 and (t.data_ptr() - base) % 256 == 0
    st = pool.strides
    assert seg.k.stride()[:4] == (st["layer"], st["page"], st["token"], st["head"])
    assert seg.k_scale is not None and seg.k_scale.stride()[:3] == (
        st["scale_layer"],
        st["scale_page"],
        st["scale_token"],
    )
    assert pool.segment_table[0, 2] == seg.k_scale.data_ptr()


def test_budget_exhausted_names_the_numbers_and_changes_nothing() -> None:
    probe = small_pool()
    pool = small_pool(budget_bytes=2 * probe.segment_bytes)
    a = pool.alloc(16)  # exactly two segments
    with pytest.raises(BudgetExhausted) as e:
        pool.alloc(1)
    msg = str(e.value)
    assert "cannot allocate 1 pages" in msg and "budget" in msg and "budget_bytes" in msg
    assert e.value.requested == 1 and e.value.available == 0  # type: ignore[attr-defined]
    assert e.value.budget_bytes == 2 * probe.segment_bytes  # type: ignore[attr-defined]
    assert isinstance(e.value, radixseg.OutOfPages)
    assert pool.stats()["segments"] == 2
    pool.release(a)
    assert pool.alloc(16).numel() == 16  # the next call works
    pool.check_invariants()


def test_budget_auto_never_exceeds_free_memory() -> None:
    pool = small_pool(budget_bytes="auto", budget_fraction=0.5)
    budget = pool.resolved_budget()
    assert budget is not None and 0 < budget
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert budget <= 0.6 * avail


def test_room_segments_and_segment_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """The room left in segments (what the SGLang adapter reports as available)
    and the stamp that changes exactly when the pool grows or shrinks."""
    import radixseg.pool

    free = {"bytes": 0}
    monkeypatch.setattr(radixseg.pool, "_device_free_bytes", lambda device: free["bytes"])
    pool = small_pool()
    seg, pps = pool.segment_bytes, pool.pages_per_segment
    free["bytes"] = 5 * seg
    assert pool.room_segments() == 5  # no budget: free memory caps the census
    assert pool.room_segments(need=1) == pool.allocator.max_segments  # small growth: no probe
    pool.budget_bytes = 3 * seg
    assert (pool.room_segments(), pool.segment_events) == (3, 0)
    ids = pool.alloc(pps + 1)  # grows two segments
    assert (pool.room_segments(), pool.segment_events) == (1, 2)
    pool.release(ids)
    assert pool.segment_events == 2  # freeing pages is not a segment event
    pool.shrink()
    assert (pool.room_segments(), pool.segment_events) == (3, 4)


def test_device_oom_during_growth_is_typed_and_changes_nothing() -> None:
    calls = {"n": 0, "fail_from": 3}

    def factory(nbytes: int, device: torch.device) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] >= calls["fail_from"]:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes} bytes")
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    pool = small_pool(tensor_factory=factory)
    held = pool.alloc(8)
    pool.write(0, slots_of(held, 4), torch.ones(32, 2, 8), torch.ones(32, 2, 8))
    with pytest.raises(DeviceOutOfMemory) as e:
        pool.alloc(24)  # needs 3 segments: the 2nd one fails, the 1st is given back
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    assert "device refused" in str(e.value) and "segment_bytes" in str(e.value)
    assert pool.stats()["segments"] == 1 and pool.stats()["growth_failures"] == 1
    k, _ = pool.read(0, slots_of(held, 4))
    assert bool((k == 1).all())
    pool.check_invariants()
    calls["fail_from"] = 10**9
    assert pool.alloc(24).numel() == 24


def test_factory_returning_garbage_is_rejected() -> None:
    pool = small_pool(tensor_factory=lambda n, d: torch.empty(n // 2, dtype=torch.uint8))
    with pytest.raises(InvalidArgument, match="tensor_factory must return"):
        pool.alloc(1)
    assert pool.stats()["segments"] == 0


def test_auto_shrink_hysteresis_does_not_thrash() -> None:
    pool = small_pool(auto_shrink=True, reserve_segments=0, shrink_hysteresis=1)
    base = pool.alloc(8)  # one full segment
    for _ in range(50):  # alloc/free right at the segment boundary
        ids = pool.alloc(1)
        pool.release(ids)
    assert pool.stats()["segments_added"] == 2  # grew once, never retired/regrew
    big = pool.alloc(24)
    pool.release(big)  # 3 empty segments > reserve + hysteresis: shrink
    assert pool.stats()["segments"] == 1
    pool.release(base)


def test_shrink_keeps_the_reserve() -> None:
    pool = small_pool(reserve_segments=2)
    ids = pool.alloc(40)  # five segments
    pool.release(ids)
    assert pool.shrink() == 3 * pool.segment_bytes
    assert pool.stats()["segments"] == 2
    assert pool.shrink(keep=0) == 2 * pool.segment_bytes


def test_retired_ids_are_reused_and_tables_follow() -> None:
    pool = small_pool()
    a, b, c = pool.alloc(8), pool.alloc(8), pool.alloc(8)
    pool.release(b)
    pool.shrink()
    assert pool.allocator.segments() == [0, 2]
    assert int(pool.segment_table[1, 0]) == 0
    d = pool.alloc(8)
    assert pool.allocator.segments() == [0, 1, 2]
    assert int(pool.segment_table[1, 0]) == pool.segment(1).k.data_ptr()
    assert (d // 8 == 1).all()
    pool.check_invariants()
    for x in (a, c, d):
        pool.release(x)


def test_stats_are_exportable() -> None:
    import json

    pool = small_pool()
    pool.alloc(3)
    s = pool.stats()
    json.dumps(s)
    assert s["used_bytes"] == 3 * pool.page_bytes and s["reserved_bytes"] == pool.segment_bytes
    assert s["reserved_bytes"] <= s["used_bytes"] + pool.segment_bytes


# ----- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(page_size=3), InvalidArgument, "power of two"),
        (dict(page_size=2048), InvalidArgument, "power of two"),
        (dict(dtype=torch.int8), InvalidArgument, "not a KV storage type"),
        (dict(dtype="fp4"), InvalidArgument, "not a KV storage type"),
        (dict(num_layers=0), InvalidArgument, "num_layers must be in 1..="),
        (dict(head_dim=-1), InvalidArgument, "non-negative"),
        (dict(head_dim=2.5), TypeError, "head_dim must be an int"),
        (dict(segment_bytes=1 << 20), InvalidArgument, "not both"),
        (dict(pages_per_segment=0), InvalidArgument, "pages_per_segment must be in"),
        (dict(pages_per_segment=1 << 30), InvalidArgument, "pages_per_segment must be in"),
        (dict(budget_bytes="lots"), InvalidArgument, "budget_bytes must be"),
        (dict(budget_bytes=-5), InvalidArgument, "non-negative"),
        (dict(budget_fraction=1.5), InvalidArgument, "budget_fraction"),
    ],
)
def test_bad_config(kwargs: dict[str, object], exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        small_pool(**kwargs)


def test_segment_bytes_smaller_than_a_page() -> None:
    with pytest.raises(InvalidArgument, match="smaller than one page"):
        KVPool(2, 2, 8, page_size=4, segment_bytes=10)


def test_bad_write_and_read_change_nothing() -> None:
    pool = small_pool(dtype=torch.float8_e4m3fn)
    ids = pool.alloc(2)
    slots = slots_of(ids, 4)
    k = torch.randn(8, 2, 8)
    pool.write(0, slots, k, k)
    before = pool.read(0, slots)
    freed = pool.alloc(1)
    pool.release(freed)
    cases: list[tuple[tuple[object, ...], type[Exception], str]] = [
        ((2, slots, k, k), InvalidArgument, "layer 2 is out of range 0..1"),
        (("0", slots, k, k), TypeError, "layer must be an int"),
        ((0, slots, k[:7], k), InvalidArgument, r"shape \[T, num_kv_heads, head_dim\]"),
        ((0, slots, k.reshape(8, 16), k), InvalidArgument, "shape"),
        ((0, slots, k.int(), k), TypeError, "floating"),
        ((0, slots, k.to("meta"), k), InvalidArgument, "is on meta"),
        ((0, slots.float(), k, k), TypeError, "int64 or int32"),
        ((0, slots.reshape(2, 4), k, k), InvalidArgument, "1-D"),
        ((0, slots - 100, k, k), InvalidArgument, "negative"),
        ((0, slots_of(freed, 4).repeat(2), k, k), InvalidHandle, "not allocated"),
        (
            (0, slots + 10**6, k, k),
            InvalidHandle,
            r"slots \(page_id \* 4 \+ offset\): invalid page id 250000",
        ),
        ((0, slots, k * float("inf"), k), InvalidArgument, "inf or NaN"),
        ((0, slots, k, "v"), TypeError, "v must be a torch.Tensor"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            pool.write(*args)  # type: ignore[arg-type]
        after = pool.read(0, slots)
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1]), args
        pool.check_invariants()
    with pytest.raises(InvalidHandle, match="not allocated"):
        pool.read(0, slots_of(freed, 4))
    with pytest.raises(InvalidArgument, match="layer -1"):
        pool.read(-1, slots)
    with pytest.raises(TypeError):
        pool.alloc(1.5)
    with pytest.raises(InvalidArgument):
        pool.alloc(-1)
    with pytest.raises(InvalidArgument, match="not live"):
        pool.segment(7)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e5])
def test_every_storage_type_refuses_what_it_cannot_store(dtype: str, value: float) -> None:
    """Issue 16, item 4: non-finite input, or a value past the storage type's range
    (fp16 turns 1e5 into inf), is refused naming layer and token; nothing is written."""
    pool = KVPool(2, 1, 4, page_size=2, pages_per_segment=4, dtype=dtype)
    slots = pool.alloc(1).long() * 2 + torch.arange(2)
    pool.write(1, slots, torch.ones(2, 1, 4), torch.ones(2, 1, 4))
    k = torch.full((2, 1, 4), 2.0)
    k[1, 0, 2] = value
    representable = math.isfinite(value) and (dtype != "fp16" or abs(value) <= 65504)
    if representable:  # finite and in range: stored (FP8 scales it)
        pool.write(1, slots, k, k)
        # FP8 scales per token: small entries beside 1e5 lose precision, not range.
        assert torch.allclose(pool.read(1, slots)[0], k, rtol=0.07, atol=0.01 * abs(value))
        return
    needle = "inf or NaN" if not math.isfinite(value) else "past what torch.float16 can store"
    for args in ((k, torch.ones_like(k)), (torch.ones_like(k), k)):
        with pytest.raises(InvalidArgument, match=r"layer 1: [kv]\[1\] \(slot \d+\) .*" + needle):
            pool.write(1, slots, *args)
        assert torch.equal(pool.read(1, slots)[0], torch.ones(2, 1, 4))
    pool.check_invariants()


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "bf16", "fp32"])
def test_the_layout_is_what_the_views_use(dtype: str) -> None:
    """One SegmentLayout: its offsets and strides are those of the segment's tensors."""
    pool = KVPool(3, 2, 8, page_size=4, pages_per_segment=5, dtype=dtype)
    pool.release(pool.alloc(1))
    lay = pool.layout
    (sid,) = pool.allocator.segments()
    seg = pool.segment(sid)
    base = int(pool.host_buffers()[sid].ctypes.data)
    for layer in range(3):
        k, v, ks, vs = lay.layer_offsets(layer)
        assert seg.k[layer].data_ptr() - base == k
        assert seg.v[layer].data_ptr() - base == v
        if pool.fp8:
            assert seg.k_scale[layer].data_ptr() - base == ks
            assert seg.v_scale[layer].data_ptr() - base == vs
    st = lay.strides
    assert seg.k.stride() == (st["layer"], st["page"], st["token"], st["head"], 1)
    if pool.fp8:
        assert seg.k_scale.stride() == (st["scale_layer"], st["scale_page"], st["scale_token"], 1)
    assert lay.segment_bytes == pool.segment_bytes
    assert lay.split(sid * 5 + 3) == (sid, 3)
