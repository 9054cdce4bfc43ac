"""A minimal SGLang ``ReqToTokenPool``, and how a request's KV record is found.

The dense ``[rows, max_context_len]`` table of slots that SGLang's radix cache
reads and repoints, kept only for compatibility (see the package docstring on
its size); radixseg's own :class:`radixseg.PrefixCache` needs none.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from radixseg._convert import as_count
from radixseg._core import InvalidArgument


def _record(req: Any) -> Any:
    """SGLang 0.5.23 keeps KV bookkeeping in ``req.kv``; older versions on ``req``."""
    kv = getattr(req, "kv", None)
    return req if kv is None else kv


class ReqToTokenTable:
    """A minimal SGLang ``ReqToTokenPool``: a dense ``[size + 1, max_context_len]``
    table of slots, one row per running request (row 0 is padding).

    Kept for engines that index KV through such a table; it is sized by the
    maximum context, which radixseg's own :class:`radixseg.PrefixCache` avoids.
    """

    def __init__(
        self,
        size: int,
        max_context_len: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.int32,
    ) -> None:
        self.size = as_count(size, "size")
        self.max_context_len = as_count(max_context_len, "max_context_len")
        self.device = device
        self.req_to_token = torch.zeros(
            (self.size + 1, self.max_context_len), dtype=dtype, device=device
        )
        self.free_slots = list(range(1, self.size + 1))

    def write(self, indices: Any, values: Any) -> None:
        """``req_to_token[indices] = values``."""
        self.req_to_token[indices] = values

    def available_size(self) -> int:
        """Rows free."""
        return len(self.free_slots)

    def alloc_rows(self, need_size: int) -> list[int] | None:
        """``need_size`` free rows, or None."""
        if need_size > len(self.free_slots):
            return None
        if need_size == 0:
            return []
        rows = self.free_slots[-need_size:]
        del self.free_slots[-need_size:]
        return rows

    def free(self, req: Any) -> None:
        """Free a request's row (``req.kv.req_pool_idx``/``req.req_pool_idx``) or a row index."""
        if isinstance(req, (int, np.integer)):
            self.free_slots.append(int(req))
            return
        rec = _record(req)
        if rec.req_pool_idx is None:
            raise InvalidArgument("request holds no row (req_pool_idx is None)")
        self.free_slots.append(int(rec.req_pool_idx))
        rec.req_pool_idx = None

    def clear(self) -> None:
        """Free every row."""
        self.free_slots = list(range(1, self.size + 1))
