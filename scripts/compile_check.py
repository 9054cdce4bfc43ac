"""Compile radixseg's kernels for CUDA targets without a GPU.

A developer tool, not part of the wheel: it builds a small ``KVPool`` to plan
launches from, which no kernel module may import.
``python scripts/compile_check.py --arch 80 --arch 90`` builds each
kernel for each storage dtype through the same launch planning that runs them
(:class:`radixseg.kernels.launch.Launch`), with Triton's ahead-of-time
compiler, and prints one JSON line per build: target, kernel, dtype, FP8 path,
success, and what the PTX shows (128-bit vector loads, FP8 conversion
instructions, flush-to-zero). Run it with ``TRITON_INTERPRET`` unset; tests
do so in a subprocess. On sm_80 FP8 is decoded in software (Triton rejects
``fp8e4nv`` there); on sm_89 and sm_90 it is loaded as FP8.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

import torch

from radixseg._dtypes import FP8_DTYPES, KV_DTYPES, kv_dtype_named
from radixseg.pool import KVPool

__all__ = ["build_launches", "main", "parser"]


def _dtype(name: str) -> torch.dtype:
    """The storage dtype a name means, by the table ``KVPool`` and ``radixseg.plan`` read."""
    dtype = kv_dtype_named(name)
    if dtype is None:
        raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(KV_DTYPES)}")
    return dtype


def _kv_name(name: str) -> str:
    _dtype(name)
    return name


def _q_name(name: str) -> str:
    if _dtype(name) in FP8_DTYPES:
        raise argparse.ArgumentTypeError(f"{name!r} is FP8; queries are bf16, fp16 or fp32")
    return name


def build_launches(
    kv_dtype: torch.dtype, q_dtype: torch.dtype, *, fp8_software: bool, head_dim: int = 128
) -> dict[str, Any]:
    """Launches for decode, extend, merge and store over a small CPU pool (never run)."""
    import numpy as np

    from radixseg.kernels.paged_attention import plan_paged_attention
    from radixseg.kernels.store import plan_store

    pool = KVPool(
        num_layers=2,
        num_kv_heads=2,
        head_dim=head_dim,
        page_size=16,
        pages_per_segment=4,
        dtype=kv_dtype,
    )
    ids = pool.alloc(8)
    kv_lens = np.array([100, 28], dtype=np.int64)
    kv_indptr = torch.tensor([0, 7, 8], dtype=torch.int32)
    last = torch.tensor([4, 12], dtype=torch.int32)
    out: dict[str, Any] = {}
    for name, qo in (("decode", [1, 1]), ("extend", [20, 28])):
        qo_lens = np.array(qo, dtype=np.int64)
        qo_indptr = torch.tensor([0, qo[0], qo[0] + qo[1]], dtype=torch.int32)
        q = torch.zeros((int(qo_lens.sum()), 8, head_dim), dtype=q_dtype)
        attention, merge, _, _ = plan_paged_attention(
            q,
            pool,
            1,
            qo_indptr,
            kv_indptr,
            ids,
            last,
            qo_lens,
            kv_lens,
            causal=name == "extend",
            sm_scale=0.1,
            num_splits=2 if name == "decode" else 1,
            fp8_software=fp8_software,
        )
        out[name] = attention
        if merge is not None:
            out["merge"] = merge
    slots = torch.arange(16, dtype=torch.int64) + int(ids[0]) * 16
    kv = torch.zeros((16, 2, head_dim), dtype=q_dtype)
    out["store"] = plan_store(pool, 1, slots, kv, kv)
    return out


def _ptx_facts(ptx: str) -> dict[str, Any]:
    return {
        # 16-byte global loads: ld.global.v4.b32 or cp.async of 16 bytes.
        "vec16_loads": len(re.findall(r"ld\.global(?:\.[a-z0-9_:]+)*\.v4\.b32", ptx))
        + len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*, 0x10", ptx)),
        "fp8_cvt": len(re.findall(r"cvt\.[a-z0-9.]*e[45]m[23]", ptx)),
        "ftz": len(re.findall(r"\.ftz\.", ptx)),
    }


def parser() -> argparse.ArgumentParser:
    """The command line; dtype names are those ``KVPool`` and ``radixseg.plan`` take."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="CUDA arch, e.g. 80, 89, 90")
    p.add_argument("--kv", action="append", type=_kv_name, help="storage dtypes (e4m3, bf16, ...)")
    p.add_argument("--q", default="bf16", type=_q_name, help="query dtype (bf16, fp16, fp32)")
    p.add_argument("--kernel", action="append", help="decode, extend, merge, store")
    p.add_argument("--head-dim", type=int, default=128)
    return p


def main(argv: list[str] | None = None) -> int:
    """Compile and report; exit status 1 if any build failed."""
    args = parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr
        )
        return 2
    failed = 0
    for arch in args.arch or [80, 89, 90]:
        for kv in args.kv or ["e4m3", "e5m2", "bf16"]:
            software = arch < 89 and _dtype(kv) in FP8_DTYPES
            launches = build_launches(
                _dtype(kv), _dtype(args.q), fp8_software=software, head_dim=args.head_dim
            )
            for name, launch in launches.items():
                if args.kernel and name not in args.kernel:
                    continue
                rec: dict[str, Any] = {
                    "arch": arch,
                    "kernel": name,
                    "kv": kv,
                    "q": args.q,
                    "fp8_software": software,
                }
                t0 = time.perf_counter()
                try:
                    compiled = launch.compile_for(arch)
                except Exception as e:  # report every failure, then exit 1
                    failed += 1
                    rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                else:
                    rec.update(ok=True, cubin_bytes=len(compiled.asm["cubin"]))
                    rec.update(_ptx_facts(compiled.asm["ptx"]))
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                print(json.dumps(rec), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
