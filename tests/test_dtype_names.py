"""One table of KV dtype names: a name the pool accepts, the planner accepts.

``radixseg._dtypes`` is the table; ``KVPool``, ``radixseg.plan`` and the
kernel compile check (``scripts/compile_check.py``) all read it. Before issue
17 each kept its own list and ``"half"`` was a planner name the pool refused.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import radixseg
from radixseg import InvalidArgument, KVPool
from radixseg._dtypes import KV_DTYPES, SHORT_NAMES

SPELLINGS = [*KV_DTYPES, "HALF", " Fp8 ", "torch.float16", "torch.float8_e5m2"]
REFUSED = ["fp4", "int8", "float64", "", "torch.", "e4m3fnuz"]


def _compile_check_parser():
    path = Path(__file__).parent.parent / "scripts" / "compile_check.py"
    spec = importlib.util.spec_from_file_location("compile_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser()


def _pool_dtype(dtype: object) -> torch.dtype:
    return KVPool(1, 1, 8, page_size=1, pages_per_segment=1, dtype=dtype).dtype


def _plan_dtype(dtype: object) -> str:
    return radixseg.plan(num_layers=1, num_kv_heads=1, head_dim=8, kv_dtype=dtype).kv_dtype


@pytest.mark.parametrize("name", SPELLINGS)
def test_pool_and_planner_accept_the_same_names_for_the_same_dtype(name):
    dtype = _pool_dtype(name)
    assert _plan_dtype(name) == SHORT_NAMES[dtype]
    assert _plan_dtype(dtype) == SHORT_NAMES[dtype]


@pytest.mark.parametrize("name", REFUSED)
def test_pool_and_planner_refuse_the_same_names(name):
    with pytest.raises(InvalidArgument, match="not a KV storage type"):
        _pool_dtype(name)
    with pytest.raises(InvalidArgument, match="is not supported"):
        _plan_dtype(name)


def test_compile_check_takes_the_same_names(capsys):
    parser = _compile_check_parser()
    for name in SPELLINGS:
        assert parser.parse_args(["--kv", name]).kv == [name]
    for name in REFUSED:
        with pytest.raises(SystemExit):
            parser.parse_args(["--kv", name])
    assert "is not one of" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.float8_e4m3fnuz])
def test_pool_and_planner_refuse_the_same_torch_dtypes(dtype):
    with pytest.raises(InvalidArgument):
        _pool_dtype(dtype)
    with pytest.raises(InvalidArgument):
        _plan_dtype(dtype)


def test_every_storage_dtype_has_a_short_name():
    assert set(SHORT_NAMES) == set(KV_DTYPES.values())
    assert {_pool_dtype(d) for d in SHORT_NAMES} == set(SHORT_NAMES)
