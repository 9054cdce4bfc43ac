"""`radixseg demo` end to end, at a size CI can afford."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from radixseg.__main__ import main
from radixseg.demo import run_demo


def test_demo_grows_shares_and_hands_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "demo.png"
    r = run_demo(tokens=100_000, chunk=8_192, followups=2, segment_bytes=1 << 20, plot=str(png))
    assert r.peak_segments > 5 and r.final_reserved_bytes == 0
    # Whole pages of the 100,000-token context are reused by each follow-up.
    assert r.reused_tokens == 2 * 100_000
    assert r.verified_tokens > 0
    # Growth by segments overshoots the live bytes by less than one segment.
    assert r.peak_reserved_bytes - r.fixed_pool_bytes < 1 << 20
    out = capsys.readouterr().out
    assert "namespaces never share" in out and "never moved" in out
    if importlib.util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "plot: skipped" in out


def test_demo_cli(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--tokens", "20k", "--chunk", "4096", "--segment-bytes", "256KiB", "--plot", ""]
    assert main(args) == 0
    assert "shrunk" in capsys.readouterr().out
    assert main(["demo", "--tokens", "-5"]) == 2
