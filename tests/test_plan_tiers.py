"""``radixseg plan --host-memory``: a context split between device and host
tier, the step-time model, and the typed error when it does not fit."""

from __future__ import annotations

import json

import pytest

from radixseg import InvalidArgument, plan
from radixseg.__main__ import main
from radixseg.capacity import ContextDoesNotFit, TierPlan, plan_tiers

# A Qwen3-8B-shaped model at TP 4 in FP8: 18,432 B/token of KV and 576 B/token
# of scales per device.
QWEN3_8B = dict(num_layers=36, num_kv_heads=8, head_dim=128, kv_dtype="fp8", tp=4)
PER_TOKEN = 18_432 + 576
CTX = 10_000_000
CLI = ["plan", "--layers", "36", "--kv-heads", "8", "--head-dim", "128", "--tp", "4"]


def test_split_and_step_model():
    p = plan(**QWEN3_8B, device_bytes="121GB", host_bytes="80GB", context=CTX)
    t = p.tiers
    assert isinstance(t, TierPlan)
    total = CTX * PER_TOKEN  # 10M is a whole number of 16-token pages
    assert t.total_bytes == total == p.context_kv_bytes_per_rank + p.context_scale_bytes_per_rank
    assert t.device_budget_bytes == p.usable_bytes_per_device == 121 * 10**9
    assert t.device_bytes == 121 * 10**9
    assert t.host_bytes == total - 121 * 10**9
    assert t.host_budget_bytes == 80 * 10**9
    assert t.host_fraction == pytest.approx(t.host_bytes / total)
    assert t.device_seconds == pytest.approx(121e9 / 4800e9)
    assert t.host_in_place_seconds == pytest.approx(t.host_bytes / (0.55 * 200e9))
    assert t.host_copy_back_seconds == pytest.approx(t.host_bytes / 55e9)
    assert t.step_in_place_seconds == pytest.approx(max(t.device_seconds, t.host_in_place_seconds))
    assert t.step_copy_back_seconds == pytest.approx(max(total / 4800e9, t.host_bytes / 55e9))
    assert t.pcie_bytes_copy_back == t.host_bytes
    # The note's seed scenario: ~0.6 s in place vs ~1.3 s copy-back, both host-bound.
    assert 0.5 < t.step_in_place_seconds < 0.7 < 1.2 < t.step_copy_back_seconds < 1.3
    assert p.as_dict()["tiers"]["host_bytes"] == t.host_bytes
    table = p.table()
    assert "host tier" in table and "model estimates" in table and "in place" in table


def test_bandwidths_and_reserve_logic():
    p = plan(
        **QWEN3_8B,
        device_bytes="141GB",
        weights_bytes="16GB",
        memory_fraction=0.9,
        host_bytes="1TB",
        hbm_gbps=1000,
        host_gbps=100,
        pcie_gbps=25,
        context=CTX,
    )
    t = p.tiers
    assert t is not None
    usable = int(141e9 * 0.9) - 16 * 10**9 // 4
    assert t.device_bytes == usable == p.usable_bytes_per_device
    assert t.device_seconds == pytest.approx(usable / 1000e9)
    assert t.host_in_place_seconds == pytest.approx(t.host_bytes / 55e9)
    assert t.host_copy_back_seconds == pytest.approx(t.host_bytes / 25e9)
    # plan_tiers on the plan itself gives the same split.
    assert plan_tiers(p, 10**12, hbm_gbps=1000, host_gbps=100, pcie_gbps=25) == t


def test_fits_on_device_alone():
    p = plan(**QWEN3_8B, device_bytes="141GB", host_bytes=0, context=1_000_000)
    t = p.tiers
    assert t is not None
    assert t.host_bytes == 0 and t.host_fraction == 0
    assert t.device_bytes == t.total_bytes
    assert t.step_in_place_seconds == t.device_seconds == t.step_copy_back_seconds
    assert "nothing on the host" in p.table()


def test_context_parallel_splits_per_rank():
    p = plan(**QWEN3_8B, cp=2, device_bytes="80GB", host_bytes="40GB", context=CTX)
    t = p.tiers
    assert t is not None
    assert t.total_bytes == p.context_kv_bytes_per_rank + p.context_scale_bytes_per_rank
    assert t.total_bytes == CTX // 2 * PER_TOKEN
    assert t.host_bytes == t.total_bytes - 80 * 10**9


def test_too_big_is_a_typed_error_with_numbers():
    with pytest.raises(ContextDoesNotFit) as e:
        plan(**QWEN3_8B, device_bytes="141GB", host_bytes="10GB", context=CTX)
    err = e.value
    assert isinstance(err, InvalidArgument)
    total = CTX * PER_TOKEN
    assert err.need_bytes == total
    assert err.device_bytes == 141 * 10**9
    assert err.host_bytes == 10 * 10**9
    assert err.short_bytes == total - 151 * 10**9
    msg = str(err)
    assert "10,000,000 tokens" in msg and "190.1 GB" in msg and "short" in msg
    assert f"{total - 141 * 10**9:,} B" in msg  # the host memory that would do


@pytest.mark.parametrize(
    "kw",
    [
        {"host_bytes": "80GB"},  # no device memory
        {"device_bytes": "141GB", "host_bytes": "80GB", "hbm_gbps": 0},
        {"device_bytes": "141GB", "host_bytes": "80GB", "pcie_gbps": float("nan")},
        {"device_bytes": "141GB", "host_bytes": "80GB", "host_gbps": -1},
        {"device_bytes": "141GB", "host_bytes": "lots"},
    ],
)
def test_bad_input(kw):
    with pytest.raises(InvalidArgument):
        plan(**QWEN3_8B, context=CTX, **kw)


def test_without_host_memory_nothing_changes():
    p = plan(**QWEN3_8B, device_bytes="141GB", context=CTX)
    assert p.tiers is None
    assert "host tier" not in p.table()
    assert p.as_dict()["tiers"] is None


def test_cli(capsys):
    args = [*CLI, "--device-memory", "121GB", "--context", "10M", "--host-memory", "80GB"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "host tier" in out and "69.1 GB" in out
    assert "628.0 ms" in out and "1.26 s" in out and "model estimates" in out

    assert main([*args, "--pcie-gbps", "110", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["tiers"]
    assert d["host_bytes"] == CTX * PER_TOKEN - 121 * 10**9
    assert d["pcie_gbps"] == 110
    assert d["host_copy_back_seconds"] == pytest.approx(d["host_bytes"] / 110e9)


def test_cli_too_big(capsys):
    args = [*CLI, "--device-memory", "141GB", "--context", "10M", "--host-memory", "10GB"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("radixseg plan: error: 10,000,000 tokens need 190.1 GB")
    assert "39.1 GB" in err and "short" in err


def test_cli_host_memory_needs_device_memory(capsys):
    assert main([*CLI, "--host-memory", "80GB"]) == 2
    assert "--device-memory" in capsys.readouterr().err


def test_bench_tiers_smoke(tmp_path, capsys):
    """``benchmarks/bench_tiers.py`` end to end at a toy size: every part runs,
    outputs agree (checked inside), and the counted bytes say what they should."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tiers.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_tiers", path)
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        out = tmp_path / "tiers.json"
        args = ["--tokens", "4k", "--segment-bytes", "256KiB", "--repeat", "1", "--rounds", "1"]
        args += ["--small", "256", "--small-repeat", "3", "--json", str(out)]
        assert bench.main(args) == 0
    finally:
        sys.path.remove(str(path.parent))
    printed = capsys.readouterr().out
    assert "summary" in printed and "target" in printed
    d = json.loads(out.read_text())
    rows = {r["host_fraction"]: r for r in d["decode"]}
    assert rows[0.0]["ours_bytes_crossed_per_step"] == 0
    # q (32 heads x 128, float32) in, out and lse back: bytes, not the KV.
    assert rows[0.8]["ours_bytes_crossed_per_step"] == 32 * 128 * 4 * 2 + 32 * 4
    assert (
        rows[0.8]["copy_back_bytes_copied_per_step"]
        > 100 * rows[0.8]["ours_bytes_crossed_per_step"]
    )
    assert d["moves"]["bytes"] > 0 and len(d["overhead"]) == 2
