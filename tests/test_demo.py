"""`radixseg demo` end to end, at a size CI can afford."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from radixseg import InvalidArgument
from radixseg.__main__ import main
from radixseg.demo import run_demo


def test_demo_grows_shares_and_hands_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "demo.png"
    r = run_demo(
        tokens=100_000,
        chunk=8_192,
        followups=2,
        segment_bytes=1 << 20,
        chats=8,
        turns=3,
        system_prompts=2,
        system_len=512,
        plot=str(png),
        progress=False,
    )
    assert r.peak_segments > 5 and r.final_reserved_bytes == 0
    # 2 chats start alone (one per system prompt), 6 join a round later: 8 x 3 turns.
    assert r.trace_requests == 24
    # Every turn after the first reuses its history; the late joiners reuse the
    # whole-page part of their system prompt from their first turn on.
    assert 0.5 < r.trace_hit_rate < 1.0
    # Whole pages of the 100,000-token context are reused by each follow-up.
    assert r.reused_tokens == 2 * 100_000
    assert r.verified_tokens > 0
    out = capsys.readouterr().out
    assert "namespaces never share" in out and "never moved" in out
    table = out[out.index("phase ") :]
    for phase in ("start", "chats", "grown", "cached", "shared", "evicted", "shrunk"):
        assert f"\n{phase} " in table
    for column in ("segments", "reserved GB", "used GB", "hit", "grown"):
        assert column in table.splitlines()[0]
    if importlib.util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "plot: skipped" in out


def test_demo_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    run_demo(
        tokens=20_000,
        chunk=4_096,
        followups=1,
        segment_bytes=256 << 10,
        chats=2,
        turns=2,
        system_prompts=1,
        system_len=64,
        progress=True,
    )
    captured = capsys.readouterr()
    assert "serve trace" in captured.err and "grow to 20,000" in captured.err
    assert "%|" in captured.err and "%|" not in captured.out


@pytest.mark.parametrize(
    ("name", "value"),
    [("tokens", 0), ("chunk", -1), ("followups", 0), ("chats", -1), ("system_prompts", 0)],
)
def test_demo_rejects_bad_sizes(name: str, value: int) -> None:
    with pytest.raises(InvalidArgument, match=f"{name} must be an integer >= "):
        run_demo(**{name: value})  # type: ignore[arg-type]


def test_demo_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["demo", "--quick", "--no-progress", "--plot", str(tmp_path / "q.png")]) == 0
    out = capsys.readouterr().out
    assert "shrunk" in out and "8 chats x 3 turns" in out and "100,000 tokens" in out
    args = ["demo", "--tokens", "20k", "--chunk", "4096", "--segment-bytes", "256KiB"]
    assert main([*args, "--chats", "2", "--turns", "1", "--plot", ""]) == 0
    assert main(["demo", "--tokens", "-5"]) == 2
    assert main(["demo", "--quick", "--turns", "-1"]) == 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--tokens", "1e5000"], "--tokens='1e5000' is past the limit"),
        (["--budget", "1B"], "budget 1 B allows 0 more segment(s)"),
        (["--device", "meta"], "cpu or cuda, not meta"),
        (["--device", "xyz"], "device='xyz' is not a device name"),
        (["--ranks", "4"], "ranks must be in 1..=3, got 4"),
        (["--ranks", "0"], "ranks must be an integer >= 1, got 0"),
        (["--ranks", "2", "--page-size", "1024"], "page_size x ranks = 2048"),
        pytest.param(
            ["--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_demo_cli_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str):
    """Bad sizes, a budget too small and unusable devices end in ``error:``, exit 2."""
    assert main(["demo", "--quick", "--no-progress", "--plot", "", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radixseg demo: error:") and needle in err and "Traceback" not in err


def test_demo_without_chats_skips_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--tokens", "20k", "--chunk", "4096", "--segment-bytes", "256KiB"]
    assert main([*argv, "--chats", "0", "--no-progress", "--plot", ""]) == 0
    assert "serve trace: 0 requests" in capsys.readouterr().out


def test_demo_ranks_2_holds_half_per_rank_and_joins(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``--ranks 2``: the long context on two spawned gloo processes, each holding
    half of what one process holds (within one segment), a decode step equal to
    the dense reference, every byte handed back and every process joined."""
    png = tmp_path / "ranks.png"
    small: dict[str, Any] = {"tokens": 60_000, "chunk": 8_192, "segment_bytes": 256 << 10}
    small.update(followups=2, chats=2, turns=1, system_prompts=1, system_len=64)
    r = run_demo(**small, plot=str(png), progress=False, ranks=2)
    assert r.ranks == 2 and len(r.rank_peak_reserved_bytes) == 2
    one, seg = r.one_process_peak_reserved_bytes, r.segment_bytes
    assert one > 4 * seg  # several segments, so that "half" means something
    for peak in r.rank_peak_reserved_bytes:
        assert abs(peak - one / 2) <= seg
    assert r.peak_reserved_bytes == sum(r.rank_peak_reserved_bytes)
    assert r.final_reserved_bytes == 0
    assert r.reused_tokens == 2 * 60_000 and r.verified_tokens > 0
    assert r.decode_max_error is not None and r.decode_max_error < 1e-3
    # Every rank was joined: no child is left, and their pids are gone.
    assert len(r.worker_pids) == 2
    assert multiprocessing.active_children() == []
    for pid in r.worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    out = capsys.readouterr().out
    assert "sharded over 2 ranks" in out and "the same bits on every rank" in out
    assert "target <= 1/2 + one segment" in out and ": met)" in out
    table = out[out.index("phase ") :]
    assert f"\n{'chats':<10}{'main':>7}" in table and f"\n{'shrunk':<10}{'main':>7}" in table
    for who in ("0", "1", "all", "1 proc"):
        assert f"\n{'grown':<10}{who:>7}" in table and f"\n{'shrunk':<10}{who:>7}" in table
    if importlib.util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_context_of_a_partial_last_page(capsys: pytest.CaptureFixture[str]) -> None:
    """A context that ends inside a page: the follow-ups prefill its tail again
    with their own KV, so the read-back covers the cached whole pages only."""
    argv = ["demo", "--tokens", "20001", "--chunk", "4096", "--segment-bytes", "256KiB"]
    assert main([*argv, "--chats", "0", "--no-progress", "--plot", ""]) == 0
    out = capsys.readouterr().out
    assert "reuses 20,000 cached tokens" in out and "read back 11,808 of 11,808" in out


def test_demo_scout_tiny_groups(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--model scout-tiny``: the context grows in a GroupedKVPool; the table and
    the summary show each group's reserved bytes beside the all-layers pool's,
    every group below it, and everything is handed back."""
    png = tmp_path / "groups.png"
    r = run_demo(
        tokens=20_000,
        chunk=4_096,
        followups=1,
        segment_bytes=256 << 10,
        plot=str(png),
        progress=False,
        model="scout-tiny",
    )
    assert r.model == "scout-tiny" and r.group_names == ("full x1", "chunked 8,192 x3")
    assert r.final_reserved_bytes == 0 and r.reused_tokens == 20_000
    assert len(r.group_peak_reserved_bytes) == 2
    for b in r.group_peak_reserved_bytes:
        assert 0 < b < r.all_layers_peak_reserved_bytes
    assert r.peak_reserved_bytes == sum(r.group_peak_reserved_bytes)
    assert r.peak_reserved_bytes < r.all_layers_peak_reserved_bytes
    out = capsys.readouterr().out
    header = out[out.index("phase ") :].splitlines()[0]
    for column in ("full x1 GB", "chunked 8,192 x3 GB", "grouped GB", "all-layers GB"):
        assert column in header
    assert "grouped at 20,000 tokens: full x1 " in out and "plan (between steps)" in out
    if importlib.util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The CLI flag; the default demo is unchanged (tested above), bad names exit 2.
    argv = ["demo", "--model", "scout-tiny", "--tokens", "20k", "--chunk", "4096"]
    assert main([*argv, "--segment-bytes", "256KiB", "--no-progress", "--plot", ""]) == 0
    assert "GroupedKVPool" in capsys.readouterr().out
    assert main([*argv, "--ranks", "2", "--no-progress", "--plot", ""]) == 2


def test_demo_host_tier_serves_past_the_device_budget(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``--host-budget``: with a device budget holding 40 % of the context, the
    rest moves to host segments (demoted, nothing evicted), the decode step over
    both tiers matches the dense fp32 reference, and everything is handed back."""
    tokens, segment = 40_000, 64 << 10
    fixed = tokens * 136  # FP8 + scale, 1 layer x 1 KV head x 64
    png = tmp_path / "tiers.png"
    r = run_demo(
        tokens=tokens,
        chunk=4_096,
        followups=2,
        chats=0,
        segment_bytes=segment,
        budget_bytes=int(0.4 * fixed),
        host_budget_bytes=fixed,
        plot=str(png),
        progress=False,
    )
    assert r.demotions > 0 and r.peak_host_reserved_bytes > 0.5 * fixed
    assert r.decode_max_error is not None and r.decode_max_error < 1e-4
    assert r.reused_tokens == 2 * tokens and r.final_reserved_bytes == 0
    out = capsys.readouterr().out
    assert "read in place from host segments" in out and "none evicted (0 pages)" in out
    if importlib.util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Refused where the host tier does not run.
    with pytest.raises(InvalidArgument, match="host-budget"):
        run_demo(tokens=tokens, host_budget_bytes=fixed, model="scout-tiny", progress=False)
