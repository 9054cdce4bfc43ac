"""Launcher for the fused K/V store (:mod:`radixseg.kernels._store`).

``radixseg.attention.store_kv`` validates arguments, then calls
:func:`plan_store`; this module only maps the pool's layout onto the kernel's
arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton  # type: ignore[import-untyped]

from radixseg.kernels._store import store_kv_kernel
from radixseg.kernels.launch import Launch

if TYPE_CHECKING:
    from radixseg.pool import KVPool

__all__ = ["STORE_CODES", "plan_store"]

#: The kernel's ``STORE`` constexpr per pool dtype.
STORE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float8_e4m3fn: 3,
    torch.float8_e5m2: 4,
}


def plan_store(
    pool: KVPool, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> Launch:
    """The launch writing ``k``, ``v`` (``[T, kv_heads, head_dim]``, last dim
    contiguous, same dtype) at ``slots`` (``int64 [T]``, on the pool's device)."""
    store = STORE_CODES[pool.dtype]
    same = (not pool.fp8) and k.dtype == pool.dtype
    return Launch(
        kernel=store_kv_kernel,
        grid=(slots.numel(),),
        args={
            "K": k,
            "V": v,
            "stride_kt": k.stride(0),
            "stride_kh": k.stride(1),
            "stride_vt": v.stride(0),
            "stride_vh": v.stride(1),
            "slots": slots,
            "table": pool.segment_table,
            "max_page": min(pool.segment_table.shape[0] * pool.pages_per_segment, 2**31 - 1),
            **pool.layout.launch_args(layer),
        },
        constexprs={
            "HEADS": pool.num_kv_heads,
            "HEAD_DIM": pool.head_dim,
            "BLOCK_H": triton.next_power_of_2(pool.num_kv_heads),
            "BLOCK_D": triton.next_power_of_2(pool.head_dim),
            "PAGE_SIZE": pool.page_size,
            "STORE": store,
            "SAME_DTYPE": same,
        },
        # No fused multiply-adds and no flush-to-zero in libdevice's div_rn:
        # the quantization must round exactly as torch does.
        options={"num_warps": 4, "enable_fp_fusion": False, "enable_reflect_ftz": False},
    )
