"""KV storage dtypes by name: the one table the pool, the planner and the
kernel compile check read, so that a name one of them accepts all accept.

Names are matched without regard to case, surrounding spaces or a ``torch.``
prefix (``"FP8"``, ``"torch.float16"``, ``" half "``).
"""

from __future__ import annotations

import torch

__all__ = ["FP8_DTYPES", "KV_DTYPES", "SHORT_NAMES", "kv_dtype_named"]

#: Every name of every KV storage dtype.
KV_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8": torch.float8_e4m3fn,
    "e4m3": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "e5m2": torch.float8_e5m2,
    "float8_e5m2": torch.float8_e5m2,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

#: The name reports print for each storage dtype (its first name above).
SHORT_NAMES: dict[torch.dtype, str] = {d: n for n, d in reversed(KV_DTYPES.items())}

#: Storage dtypes that keep a float32 scale per token and KV head beside the KV.
FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


def kv_dtype_named(name: str) -> torch.dtype | None:
    """The storage dtype ``name`` stands for, or ``None``.

    >>> kv_dtype_named("HALF"), kv_dtype_named("torch.float8_e4m3fn"), kv_dtype_named("fp4")
    (torch.float16, torch.float8_e4m3fn, None)
    """
    return KV_DTYPES.get(name.strip().lower().removeprefix("torch."))
