"""The values SGLang's allocator and radix cache pass and return, by field name.

SGLang's ``RadixKey``, its ``*Params``/``*Result`` dataclasses, ``MatchResult``
and ``TreeLock`` (``mem_cache/base_prefix_cache.py`` and ``radix_cache.py`` in
SGLang 0.5.23), rebuilt with the same field names so that engines without SGLang
can call the adapter; the adapter reads SGLang's own objects by attribute, so
these are never required. Also the two conversions every entry point applies to
what it is given: token ids to a numpy array, slots to an ``int64`` tensor.
"""

from __future__ import annotations

import itertools
import operator
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from radixseg._convert import as_count
from radixseg._core import InvalidArgument

#: The root handle of every namespace (SGLang's ``root_node``): matching
#: nothing returns it, and locking or unlocking it changes nothing.
ROOT_NODE = -1


class RadixKey:
    """SGLang's ``RadixKey``: token ids plus the namespace tags.

    ``token_ids`` is any sequence of ints (``array('q')`` as SGLang uses, a
    list, a numpy array or a tensor); ``limit`` caps the tokens used without a
    copy. As SGLang's, a key has a length, iterates over its tokens, and
    indexes to a key: ``key[i]`` is the one-token key at ``i`` (``IndexError``
    out of range), ``key[a:b]`` the key of those tokens (step 1 only), with the
    same ``extra_key`` and ``cache_salt``; ``token_ids`` of a slice is a slice
    of the same type. ``is_bigram`` (EAGLE) views the tokens as overlapping
    pairs, as SGLang's does, though :class:`RadixsegRadixCache` refuses such
    keys. SGLang's own ``RadixKey`` objects are accepted everywhere this one is.

    >>> key = RadixKey([5, 6, 7, 8], "lora-1", limit=3)
    >>> len(key), list(key), key[1].token_ids, key[-1].token_ids
    (3, [5, 6, 7], [6], [7])
    >>> key[1:].token_ids, key[1:].extra_key
    ([6, 7], 'lora-1')
    """

    __slots__ = ("cache_salt", "extra_key", "is_bigram", "limit", "token_ids")

    def __init__(
        self,
        token_ids: Any,
        extra_key: str | None = None,
        is_bigram: bool = False,
        limit: int | None = None,
        cache_salt: str | None = None,
    ) -> None:
        self.token_ids = token_ids
        self.extra_key = extra_key
        self.is_bigram = is_bigram
        self.limit = limit
        self.cache_salt = cache_salt or None

    def _raw_len(self) -> int:
        """Tokens in use: ``len(token_ids)`` capped by ``limit``."""
        n = len(self.token_ids)
        return n if self.limit is None else max(0, min(n, int(self.limit)))

    def raw_token_ids(self) -> Any:
        """``token_ids`` with ``limit`` applied (a slice only when it cuts)."""
        n = self._raw_len()
        return self.token_ids if n == len(self.token_ids) else self.token_ids[:n]

    def __len__(self) -> int:
        n = self._raw_len()
        return max(n - 1, 0) if self.is_bigram else n

    def __iter__(self) -> Iterator[Any]:
        raw = self.raw_token_ids()
        if isinstance(raw, (torch.Tensor, np.ndarray)):
            raw = raw.tolist()
        if self.is_bigram:
            return itertools.pairwise(raw)
        return iter(raw)

    def __getitem__(self, idx: int | slice) -> RadixKey:
        n = len(self)
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step != 1:
                raise ValueError(f"a RadixKey slices with step 1 only, got step {step}")
            stop = max(start, stop)
        else:
            i = operator.index(idx)
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise IndexError(f"RadixKey index {i} is out of range for a key of {n} tokens")
            start, stop = j, j + 1
        if self.is_bigram:  # pairs start..stop-1 span tokens start..stop
            raw_stop = stop + 1 if stop > start else start
            return RadixKey(
                self.token_ids[start:raw_stop],
                self.extra_key,
                is_bigram=True,
                cache_salt=self.cache_salt,
            )
        return RadixKey(self.token_ids[start:stop], self.extra_key, cache_salt=self.cache_salt)

    def page_aligned(self, page_size: int) -> RadixKey:
        """The key cut to whole pages of ``page_size`` tokens (itself at page size 1)."""
        ps = as_count(page_size, "page_size")
        if ps == 1:
            return self
        if ps == 0:
            raise InvalidArgument("page_size must be at least 1, got 0")
        return self[: len(self) // ps * ps]

    def __repr__(self) -> str:
        raw = self.raw_token_ids()
        head = raw[:10]
        shown = head.tolist() if hasattr(head, "tolist") else list(head)
        more = "..." if len(raw) > 10 else ""
        return (
            f"RadixKey(extra_key={self.extra_key!r}, cache_salt={self.cache_salt!r}, "
            f"token_ids={shown}{more}, len={len(self)}, is_bigram={self.is_bigram})"
        )


@dataclass
class MatchPrefixParams:
    """SGLang's ``MatchPrefixParams``; only ``key`` is read."""

    key: Any
    cow_mamba: bool = False
    req: Any = None


@dataclass
class InsertParams:
    """SGLang's ``InsertParams``; ``key`` and ``value`` (int64 slots) are read."""

    key: Any = None
    value: torch.Tensor | None = None
    prev_prefix_len: int = 0
    inserted_len: int = 0
    priority: int = 0


@dataclass
class InsertResult:
    """SGLang's ``InsertResult``: tokens already cached and the node ending the key."""

    prefix_len: int
    total_len: int = 0
    last_device_node: Any = None


@dataclass
class EvictParams:
    """SGLang's ``EvictParams``; ``num_tokens`` is read."""

    num_tokens: int = 0
    swa_num_tokens: int = 0
    mamba_num: int = 0


@dataclass
class EvictResult:
    """SGLang's ``EvictResult``: tokens the eviction freed (whole leaves)."""

    num_tokens_evicted: int = 0
    swa_num_tokens_evicted: int = 0
    mamba_num_evicted: int = 0


@dataclass
class IncLockRefResult:
    """SGLang's ``IncLockRefResult``: ``delta`` is minus the tokens that became protected."""

    delta: int | None = None
    node_id: int | None = None

    def to_dec_params(self) -> None:
        """SGLang's receipt for ``dec_lock_ref``; this cache needs none."""
        return None


@dataclass
class DecLockRefResult:
    """SGLang's ``DecLockRefResult``: ``delta`` is the tokens that became evictable."""

    delta: int | None = None


@dataclass
class TreeLock:
    """SGLang's ``TreeLock``: what :meth:`RadixsegRadixCache.lock` returns."""

    node: int
    receipt: Any = None
    swa_released: bool = False


class MatchResult(NamedTuple):
    """SGLang 0.5.23's ``MatchResult`` fields, plus ``device_indices``.

    ``device_prefix_len`` tokens matched (a multiple of ``page_size``), ending
    at node ``last_device_node`` (also in ``last_host_node`` and
    ``best_match_node``: there is no host tier). ``device_indices`` holds their
    ``int64`` slots, as older SGLang's ``MatchResult`` did (0.5.23 reads
    them with ``path_device_indices``).
    """

    device_prefix_len: int
    last_device_node: Any
    last_host_node: Any
    best_match_node: Any
    host_hit_length: int = 0
    swa_host_hit_length: int = 0
    swa_branching_seqlen: int | None = None
    mamba_host_hit_length: int = 0
    mamba_branching_seqlen: int | None = None
    cache_protected_len: int | None = None
    full_kv_hit_length: int = 0
    cache_actions: Sequence[Any] = ()
    last_visited_node_id: int | None = None
    full_device_match_len: int | None = None
    device_indices: torch.Tensor | None = None


# ----- conversions -----------------------------------------------------------------------

_ARRAY_DTYPES = {"b": np.int8, "h": np.int16, "i": np.int32, "l": np.int64, "q": np.int64}


def _token_array(key: Any) -> npt.NDArray[Any]:
    """Token ids of a key (SGLang ``RadixKey``, ours, or a plain sequence), ``limit`` applied."""
    tokens = getattr(key, "token_ids", key)
    limit = getattr(key, "limit", None)
    if getattr(key, "is_bigram", False):
        raise InvalidArgument("EAGLE bigram keys (is_bigram=True) are not supported")
    arr: npt.NDArray[Any]
    if isinstance(tokens, array) and tokens.typecode in _ARRAY_DTYPES:
        dt = np.dtype(_ARRAY_DTYPES[tokens.typecode])
        if dt.itemsize == tokens.itemsize:
            arr = np.frombuffer(tokens, dtype=dt) if len(tokens) else np.zeros(0, np.int64)
        else:
            arr = np.asarray(tokens.tolist(), dtype=np.int64)
    elif isinstance(tokens, torch.Tensor):
        arr = tokens.detach().reshape(-1).cpu().numpy()
    else:
        arr = np.asarray(tokens)
        if arr.size == 0:
            arr = np.zeros(0, np.int64)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"token ids must be a 1-D sequence of ints, got {arr.dtype} {arr.shape}")
    if limit is not None:
        arr = arr[: max(0, int(limit))]
    return arr


def _as_slots(x: Any, what: str = "slots") -> torch.Tensor:
    """A 1-D ``int64`` CPU tensor of slots (a copy never aliases a caller's tensor it mutates)."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{what} must have an integer dtype, got {x.dtype}")
        t = x.detach().reshape(-1).to(device="cpu", dtype=torch.int64, copy=True)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.int64).reshape(-1))
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"{what} must be a 1-D sequence of ints: {e}") from None
    if t.numel() and int(t.min()) < 0:
        raise InvalidArgument(f"{what} hold a negative slot {int(t.min())}")
    return t
