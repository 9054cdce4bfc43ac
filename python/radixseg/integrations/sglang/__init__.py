"""SGLang's KV allocator and radix cache interfaces over radixseg's segments.

An engine written against SGLang's ``TokenToKVPoolAllocator`` /
``PagedTokenToKVPoolAllocator`` and ``RadixCache`` (the ``BasePrefixCache``
contract of SGLang 0.5.23) can swap in:

* :class:`RadixsegTokenToKVPoolAllocator` (one class for every page size):
  ``alloc``, ``alloc_extend``, ``alloc_decode``, ``free``, ``free_segment(s)``,
  ``free_page_ids``, ``available_size``, ``free_group_begin``/``end``,
  ``backup_state``/``restore_state``, ``clear``, ``size``, ``page_size``, ...
  over a :class:`radixseg.KVPool` that grows by whole segments under its budget
  instead of being allocated up front;
* :class:`RadixsegRadixCache`: ``match_prefix``, ``insert``, ``evict``,
  ``inc_lock_ref``, ``dec_lock_ref``, ``lock``/``unlock``, ``checkpoint``,
  ``cache_unfinished_req``, ``cache_finished_req``, ``evictable_size``,
  ``protected_size``, ``total_size``, ``all_values_flatten``, ``reset``,
  ``pretty_print``, ... over a
  :class:`radixseg.RadixTree` sharing the pool's page refcounts.

No SGLang install is needed: the parameter and result types SGLang passes
(``MatchPrefixParams``, ``InsertParams``, ``EvictParams``, ``RadixKey``, ...)
are read by attribute, so SGLang's own objects work, and this module defines
look-alikes with the same field names for engines without SGLang.

>>> from radixseg import KVPool
>>> pool = KVPool(1, 1, 8, page_size=4, pages_per_segment=16, dtype="fp32")
>>> alloc = RadixsegTokenToKVPoolAllocator(pool)       # takes page 0 for padding
>>> cache = RadixsegRadixCache(alloc)
>>> slots = alloc.alloc(8)                             # two pages of 4 token slots
>>> slots.tolist()
[4, 5, 6, 7, 8, 9, 10, 11]
>>> cache.insert(InsertParams(key=RadixKey(list(range(8))), value=slots)).prefix_len
0
>>> cache.evictable_size(), cache.protected_size()     # the tree now owns the pages
(8, 0)
>>> m = cache.match_prefix(MatchPrefixParams(key=RadixKey([0, 1, 2, 3, 4, 5, 9, 9])))
>>> m.device_prefix_len, m.device_indices.tolist()
(4, [4, 5, 6, 7])
>>> _ = cache.inc_lock_ref(m.last_device_node)
>>> cache.evictable_size(), cache.protected_size()
(4, 4)

Kept from SGLang (what an engine depends on)
--------------------------------------------
* Slots are ``int64`` token positions ``page * page_size + offset`` on the
  allocator's device; a paged allocation is whole pages, page-contiguous.
* Slot 0 is the padding target (SGLang writes padded tokens there): the
  allocator takes **page 0** when it is built (its first segment is allocated
  then) and keeps one reference to it for its lifetime, so no slot in
  ``0 .. page_size - 1`` is ever handed out, freed or cached, and segment 0 is
  never retired. SGLang's free lists likewise start at slot/page 1.
* ``alloc`` returns ``None`` when the pages cannot be had; nothing changes then
  (radixseg evicts only when that makes room).
* ``free_group_begin``/``free_group_end`` defer frees to one batch; groups do
  not nest. ``backup_state``/``restore_state`` roll allocations back.
* The tree owns one reference per cached page: ``insert`` takes over the
  caller's reference for the pages it newly caches; for the prefix that was
  already cached the caller keeps its duplicate pages and frees them (as
  ``checkpoint``/``cache_finished_req`` do, along with the unaligned tail).
* ``evictable_size``/``protected_size`` are tokens in unlocked/locked nodes;
  tokens move between them when a node's lock count goes 0 -> 1 or 1 -> 0
  (a lock covers the node and its ancestors). ``inc_lock_ref``/``dec_lock_ref``
  report that move as ``delta``. Locks on ``root_node`` are no-ops.
* ``evict`` takes least-recently-used unlocked leaves, whole, until at least
  the asked tokens are freed; a parent left childless is a candidate in turn.
* ``extra_key`` (and ``cache_salt``) isolate namespaces: prefixes are never
  shared across them.

Where radixseg differs, and why
-------------------------------
* **Capacity grows.** ``size`` and ``available_size()`` count the pages the
  pool can still add under its budget, not only those it holds: with an
  integer ``budget_bytes`` (or the ``size=`` cap) they are fixed as in SGLang;
  with ``budget_bytes="auto"`` or ``None`` they follow free device memory, but
  only at events: the room left is measured when the allocator is built, when
  the pool's segments change (a growth or a shrink) and after an allocation
  fails, and is kept in between. So ``available_size()`` and ``size`` do not
  move by themselves while other processes take or return memory: two reads
  in one scheduling step agree, and they change only by what the engine
  allocates and frees until the pool next grows or shrinks. The pool's own
  growth still checks free memory at that moment, so an ``alloc`` the stale
  figure promised can fail (``None``) when the device filled up meanwhile;
  the failure re-measures. An engine whose leak check compares against a
  startup constant should give an integer budget or ``size``.
* **alloc evicts on its own** when the budget refuses growth (SGLang's
  allocator never evicts; its scheduler evicts first). An engine that evicts
  first, as SGLang's does, sees the same results; without eviction the
  allocator returns ``None`` only after growth and eviction both failed.
* **Double free is detected**: freeing a page that is already free raises
  :class:`radixseg.DoubleFree` and frees nothing (SGLang appends the slot to its
  free list twice and later hands it to two requests). Within one ``free`` call
  the slots of one page free that page once (SGLang's paged ``free`` does a
  ``unique``); across calls, including the calls of one free group, a page
  freed twice is a double free (SGLang 0.5.23's ``free_page_ids`` contract,
  which it checks only in debug mode). Freeing page 0 raises
  :class:`radixseg.InvalidHandle`. Freeing a page the *tree* owns cannot be
  told from a legal free here; it surfaces as ``DoubleFree`` when the tree
  later evicts that page.
* **Unaligned paged alloc** (``need_size`` not a multiple of ``page_size``)
  raises :class:`radixseg.InvalidArgument`; SGLang asserts it in debug mode and
  otherwise silently rounds down.
* **backup_state/restore_state** (older SGLang's; 0.5.23 has none)
  snapshot no free list: while a state object is alive the allocator journals
  its allocations and frees, and ``restore_state`` frees the pages allocated
  since the state that the engine still holds. A page allocated *before* the
  state and freed since stays free (SGLang would mark it allocated again and
  leak it); a page handed to the tree since stays cached (SGLang would put it
  on the free list under the tree). Restoring with frees pending in an open
  free group is refused.
* **Free groups and eviction**: pages the tree evicts are released at once,
  also inside a free group (SGLang defers them with the group).
* **Namespaces are u64.** ``(extra_key, cache_salt)`` maps to a namespace by
  a stable 64-bit BLAKE2b hash (``(None, None)`` is namespace 0; see
  :func:`namespace_of`). Two keys hashing alike would share prefixes, so each
  cache remembers the keys it has seen and raises ``InvalidArgument`` on a
  collision instead (about n**2 / 2**65 for n distinct keys); that table grows
  with the number of distinct keys.
* **insert needs its slots.** ``InsertParams(value=None)`` raises
  ``InvalidArgument``: SGLang's debug fallback stores the token ids as the
  values, but here values are slots naming real pages of the pool, and token
  ids as slots would hand the tree (and later the free list, on eviction)
  pages that nobody allocated or that other requests hold. A value slot in
  the padding page 0 is refused the same way, naming the slot.
* **Node handles are ints** (radixseg's generation-checked handles; a stale
  one raises ``InvalidHandle`` instead of naming another node), and
  ``root_node`` is the sentinel ``-1`` for every namespace. ``dec_lock_ref`` of
  a node with no lock of its own raises ``InvalidArgument`` (SGLang's count
  goes negative). ``path_device_indices`` knows the nodes this cache returned:
  every locked one, and the 4096 most recent others.
* **reset** releases the tree's page references (SGLang drops its tree and
  relies on the allocator's ``clear``) and is refused while nodes are locked
  (SGLang's scheduler flushes only when idle). ``clear`` releases every page
  still held except page 0 and needs the cache reset first, as SGLang's flush
  does; it assumes the pool serves only this allocator and its cache.
* **Not provided**: EAGLE bigram keys, eviction policies other than LRU and
  insert priorities, KV events, metrics, hit counts, HiCache/storage tiers,
  SWA and mamba state, ``disable=True``, and 0.5.23's scheduler-capacity hooks
  beyond ``evict_to_free_tokens``, ``check_decode_capacity``,
  ``request_slot_reserve`` and ``max_new_tokens_for_memory``. Attention must
  read KV through :mod:`radixseg.attention` / :class:`radixseg.KVPool`: SGLang's
  ``MHATokenToKVPool`` buffers are not replaced.
* Not thread-safe, like SGLang's (one scheduler thread drives it).

Requests and the request-to-token table
---------------------------------------
``checkpoint``, ``cache_unfinished_req``, ``cache_finished_req`` and
``release_kv_cache`` take a duck-typed request, as SGLang's ``Req``:

* ``req.kv.req_pool_idx`` and ``req.kv.cache_protected_len`` (SGLang 0.5.23's
  per-request KV record) or the same two attributes on ``req`` itself; without
  ``cache_protected_len``, ``len(req.prefix_indices)`` (older SGLang) is read;
* token ids: ``req.full_untruncated_fill_ids`` or ``req.fill_ids``, else
  ``req.origin_input_ids + req.output_ids``; ``req.origin_input_ids``, when
  present, splits the cached leaf at the prompt boundary as SGLang does;
* ``req.extra_key`` / ``req.cache_salt`` (optional), ``req.last_node``, and
  ``req.lock`` (0.5.23's tree lock; without it ``last_node`` is locked with
  ``inc_lock_ref`` / ``dec_lock_ref`` as older SGLang did);
* the KV a release covers, as SGLang 0.5.23 derives it: ``req.owned_kv_len()``;
  else ``kv_committed_len`` (``req.kv`` or ``req``, the 0.5.x fields; the
  ``req.pop_committed_kv_cache()`` of those versions is called when present);
  else the longest of ``len(req.fill_ids)``, ``len(origin_input_ids) +
  len(output_ids) - 1`` and ``cache_protected_len``. It is never taken below
  ``cache_protected_len``: the tree holds that KV. ``release_kv_cache`` also
  frees what was allocated past it up to ``kv_allocated_len``, as 0.5.23's
  does; ``cache_finished_req`` leaves that to the caller, as the older
  schedulers that call it free it themselves;
* written back: ``cache_protected_len``, ``cache_inserted_len`` (when present),
  ``prefix_indices`` (when present), ``last_node`` and ``lock``.

``checkpoint``, ``release_kv_cache`` and ``cache_*_req`` are all or nothing:
the row (slots of the padding page mean KV never allocated), the protected
length, the request's pages (each held, none listed twice) and its lock are
checked before the tree, the lock or the row change. ``free_kv_row``,
``claim_kv_row`` and ``on_release`` are the hooks SGLang 0.5.23's own
``common.release_kv_cache`` calls, so that function works on this cache too.

The cache reads and repoints rows of ``req_to_token_pool.req_to_token``, a
dense ``[rows, max_context_len]`` table like SGLang's ``ReqToTokenPool``
(:class:`ReqToTokenTable` is a minimal one). That table is SGLang's design,
kept here only for compatibility: sized by the maximum context it needs 80 GB
at 10M tokens for 2048 rows before any KV exists. radixseg's own
:class:`radixseg.PrefixCache` needs none: a request's page list grows with the
request. SGLang's ``int32`` table also cannot hold slots past ``2**31 - 1``;
give :class:`ReqToTokenTable` ``dtype=torch.int64`` for pools that large.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from radixseg._convert import Uncopyable, as_count
from radixseg._core import InvalidArgument, InvalidHandle, OutOfPages
from radixseg.pool import KVPool, _device_free_bytes
from radixseg.tree import RadixTree

__all__ = [
    "ROOT_NODE",
    "AllocatorState",
    "DecLockRefResult",
    "EvictParams",
    "EvictResult",
    "IncLockRefResult",
    "InsertParams",
    "InsertResult",
    "MatchPrefixParams",
    "MatchResult",
    "RadixKey",
    "RadixsegRadixCache",
    "RadixsegTokenToKVPoolAllocator",
    "ReqToTokenTable",
    "TreeLock",
    "namespace_of",
]

#: The root handle of every namespace (SGLang's ``root_node``): matching
#: nothing returns it, and locking or unlocking it changes nothing.
ROOT_NODE = -1

# Paths (page ids) remembered for unlocked nodes, for path_device_indices.
_PATH_MEMO = 4096


# ----- SGLang's parameter and result types, by field name ------------------------------


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


@dataclass(eq=False)
class AllocatorState:
    """An allocator checkpoint from :meth:`RadixsegTokenToKVPoolAllocator.backup_state`.

    Opaque; valid until the allocator is cleared or restored to an earlier state.
    """

    allocator: RadixsegTokenToKVPoolAllocator
    epoch: int
    index: int


# ----- namespaces ------------------------------------------------------------------------


def _tag(part: str | None, what: str) -> bytes:
    if part is None:
        return b"\x00"
    if not isinstance(part, str):
        raise TypeError(f"{what} must be a str or None, got {type(part).__name__}: {part!r}")
    raw = part.encode("utf-8", "surrogatepass")
    return b"\x01" + len(raw).to_bytes(8, "little") + raw


def _hash64(data: bytes) -> int:
    return int.from_bytes(
        hashlib.blake2b(data, digest_size=8, person=b"radixseg.sglang").digest(), "little"
    )


def namespace_of(extra_key: str | None = None, cache_salt: str | None = None) -> int:
    """The radixseg namespace (a u64) of SGLang's ``(extra_key, cache_salt)``.

    ``(None, None)`` (and an empty salt) is namespace 0, the default; any other
    pair is a stable 64-bit BLAKE2b hash of both, the same in every process.

    >>> namespace_of(), namespace_of("lora-7") == namespace_of("lora-7")
    (0, True)
    >>> namespace_of("a", None) != namespace_of(None, "a")
    True
    """
    cache_salt = cache_salt or None
    if extra_key is None and cache_salt is None:
        return 0
    return _hash64(_tag(extra_key, "extra_key") + _tag(cache_salt, "cache_salt"))


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


# ----- the allocator ---------------------------------------------------------------------


class RadixsegTokenToKVPoolAllocator(Uncopyable):
    """SGLang's ``TokenToKVPoolAllocator`` / ``PagedTokenToKVPoolAllocator`` over a KVPool.

    Parameters
    ----------
    pool : KVPool
        Owns the pages; its ``page_size`` is the allocator's. Build on a pool
        whose page 0 is free (a fresh one) or already held: the allocator
        takes page 0 as the padding target.
    size : int, optional
        A cap in tokens, as SGLang's ``size``: the allocator and its cache
        never hold more than ``size // page_size`` pages besides page 0
        (the pool still grows lazily up to that). Default: the pool's budget.

    Slots come out as ``int64`` tensors on the pool's device. See the module
    docstring for what differs from SGLang.
    """

    def __init__(self, pool: KVPool, *, size: int | None = None) -> None:
        if not isinstance(pool, KVPool):
            raise TypeError(f"pool must be a radixseg.KVPool, got {type(pool).__name__}")
        self.pool = pool
        self.page_size = pool.page_size
        self.dtype = pool.dtype
        self.device = pool.device
        self.need_sort = False
        #: Frees deferred by ``free_group_begin`` (page ids), or None outside a group.
        self.free_group: list[torch.Tensor] | None = None
        self._cap_pages = None if size is None else as_count(size, "size") // self.page_size
        self._cache: RadixsegRadixCache | None = None
        self._journal: list[tuple[bool, torch.Tensor]] = []
        self._epoch = 0
        self._states: weakref.WeakSet[AllocatorState] = weakref.WeakSet()
        #: (what the room depends on, the room in pages) at its last measurement.
        self._room_memo: tuple[tuple[Any, ...], int] | None = None
        self._reserve_padding_page()

    def _reserve_padding_page(self) -> None:
        a = self.pool.allocator
        if 0 in a.segments() and int(a.refcount([0])[0]) > 0:
            a.retain([0])
            return
        ids = self.pool.alloc(1)
        if int(ids[0]) != 0:
            self.pool.release(ids)
            raise InvalidArgument(
                "page 0 is free but was not the page handed out; build the SGLang "
                "allocator on a fresh KVPool so that page 0 can be the padding page"
            )

    # ----- capacity ---------------------------------------------------------------------

    def _room_stamp(self) -> tuple[Any, ...]:
        """What the room depends on besides free memory: the pool's segments
        (count, and every growth or shrink since it was built) and its budget."""
        pool = self.pool
        counters = pool._counters
        return (
            pool.allocator.segment_count(),
            counters["segments_added"],
            counters["segments_retired"],
            pool.budget_bytes,
            pool.budget_fraction,
            pool.allocator.max_segments,
        )

    def _room_pages(self) -> int:
        """Pages the pool can still add under its budget (whole segments).

        Under ``budget_bytes="auto"`` or ``None`` the room depends on free
        device memory; it is measured when the pool's segments change (growth,
        shrink, construction) or an allocation fails, and kept in between, so
        two reads in one scheduling step agree.
        """
        stamp = self._room_stamp()
        memo = self._room_memo
        if memo is not None and memo[0] == stamp:
            return memo[1]
        pool, a = self.pool, self.pool.allocator
        live = a.segment_count()
        room = a.max_segments - live
        reserved = live * pool.segment_bytes
        budget = pool.resolved_budget(reserved)
        if budget is None:
            room = min(room, _device_free_bytes(pool.device) // pool.segment_bytes)
        else:
            room = min(room, max(0, (budget - reserved) // pool.segment_bytes))
        pages = room * pool.pages_per_segment
        self._room_memo = (stamp, pages)
        return pages

    def _held_pages(self) -> int:
        """Pages held by the engine and the tree (page 0 not counted)."""
        a = self.pool.allocator
        return a.total_pages() - a.free_pages() - 1

    def _available_pages(self) -> int:
        free = self.pool.allocator.free_pages() + self._room_pages()
        if self._cap_pages is not None:
            free = min(free, self._cap_pages - self._held_pages())
        return max(0, free)

    @property
    def size(self) -> int:
        """Token slots this allocator can reach (page 0 excluded): the ``size``
        cap, else what the pool holds plus what its budget still allows."""
        if self._cap_pages is not None:
            return self._cap_pages * self.page_size
        total = self.pool.allocator.total_pages() - 1 + self._room_pages()
        return total * self.page_size

    @property
    def size_full(self) -> int:
        """``size`` (SGLang's name for the full-attention pool's size)."""
        return self.size

    @property
    def num_pages(self) -> int:
        """``size // page_size``."""
        return self.size // self.page_size

    def available_size(self) -> int:
        """Tokens ``alloc`` can hand out now without evicting: free pages in live
        segments plus pages the budget still allows, times ``page_size``."""
        return self._available_pages() * self.page_size

    # ----- allocation -------------------------------------------------------------------

    def _alloc_pages(self, n: int) -> torch.Tensor | None:
        """``n`` pages (int32 CPU) or None; grows, then evicts, all or none."""
        if n == 0:
            return torch.zeros(0, dtype=torch.int32)
        if self._cap_pages is not None:
            short = n - (self._cap_pages - self._held_pages())
            cache = self._cache
            if (
                short > 0
                and cache is not None
                and cache.evict_on_alloc
                and cache.tree.evictable_pages() >= short
            ):
                cache.tree.evict(short)
            if n > self._cap_pages - self._held_pages():
                return None
        try:
            pages = self.pool.alloc(n)
        except OutOfPages:
            self._room_memo = None  # growth was refused: measure the room again
            return None
        self._note(True, pages)
        return pages

    def _slots_of(self, pages: torch.Tensor) -> torch.Tensor:
        ps = self.page_size
        p = pages.to(torch.int64)
        if ps == 1:
            return p.to(self.device)
        return (p[:, None] * ps + torch.arange(ps, dtype=torch.int64)).reshape(-1).to(self.device)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """``need_size`` token slots (``int64 [need_size]``), or None when the pool
        cannot supply them after growing and evicting.

        Paged (``page_size > 1``): ``need_size`` must be a multiple of
        ``page_size``; the slots are whole pages, each page's slots in order.
        """
        n = as_count(need_size, "need_size")
        ps = self.page_size
        if n % ps:
            raise InvalidArgument(
                f"alloc({n}) is not a whole number of pages (page_size={ps}); "
                f"use alloc_extend/alloc_decode to fill a partial page"
            )
        pages = self._alloc_pages(n // ps)
        return None if pages is None else self._slots_of(pages)

    def alloc_extend(
        self,
        prefix_lens: torch.Tensor,
        prefix_lens_cpu: torch.Tensor,
        seq_lens: torch.Tensor,
        seq_lens_cpu: torch.Tensor,
        last_loc: torch.Tensor,
        extend_num_tokens: int,
        num_new_pages: int | None = None,
    ) -> torch.Tensor | None:
        """Slots for extending each request from ``prefix_lens`` to ``seq_lens``.

        SGLang's paged ``alloc_extend``: a request's new tokens first fill the
        rest of its last page (slots after ``last_loc``, the slot of its last
        prefix token), then whole new pages. Returns ``int64
        [extend_num_tokens]`` (requests in order) or None when the pages
        cannot be had. ``prefix_lens``/``seq_lens`` (device copies) are not read;
        ``num_new_pages`` is recomputed.
        """
        del prefix_lens, seq_lens, num_new_pages
        ps = self.page_size
        pre = prefix_lens_cpu.to(torch.int64).reshape(-1)
        seq = seq_lens_cpu.to(torch.int64).reshape(-1)
        last = last_loc.to(device="cpu", dtype=torch.int64).reshape(-1)
        if not (pre.numel() == seq.numel() == last.numel()):
            raise InvalidArgument(
                "prefix_lens, seq_lens and last_loc must have one entry per request"
            )
        ext = seq - pre
        if ext.numel() and int(ext.min()) < 0:
            raise InvalidArgument("seq_lens must not be shorter than prefix_lens")
        n = int(ext.sum())
        if n != extend_num_tokens:
            raise InvalidArgument(
                f"extend_num_tokens={extend_num_tokens} but seq_lens - prefix_lens sums to {n}"
            )
        ceil_pre = (pre + ps - 1) // ps * ps
        new_per = (seq + ps - 1) // ps - ceil_pre // ps
        total = int(new_per.sum())
        pages = self._alloc_pages(total)
        if pages is None:
            return None
        owner = torch.repeat_interleave(torch.arange(pre.numel()), ext)
        start = torch.cumsum(ext, 0) - ext
        pos = pre[owner] + torch.arange(n, dtype=torch.int64) - start[owner]
        old = last[owner] + 1 + (pos - pre[owner])
        if total == 0:
            return old.to(self.device)
        base = torch.cumsum(new_per, 0) - new_per
        k = base[owner] + (pos - ceil_pre[owner]).clamp(min=0) // ps
        new = pages.to(torch.int64)[k.clamp(max=total - 1)] * ps + pos % ps
        return torch.where(pos < ceil_pre[owner], old, new).to(self.device)

    def alloc_decode(
        self, seq_lens: torch.Tensor, seq_lens_cpu: torch.Tensor, last_loc: torch.Tensor
    ) -> torch.Tensor | None:
        """One slot per request for its next token (``seq_lens`` counts it):
        ``last_loc + 1``, or the first slot of a new page when the token starts
        one. ``int64 [batch]`` or None."""
        del seq_lens
        ps = self.page_size
        seq = seq_lens_cpu.to(torch.int64).reshape(-1)
        last = last_loc.to(device="cpu", dtype=torch.int64).reshape(-1)
        if seq.numel() != last.numel():
            raise InvalidArgument("seq_lens and last_loc must have one entry per request")
        need = (seq - 1) % ps == 0
        pages = self._alloc_pages(int(need.sum()))
        if pages is None:
            return None
        out = last + 1
        out[need] = pages.to(torch.int64) * ps
        return out.to(self.device)

    # ----- freeing ----------------------------------------------------------------------

    def _release(self, pages: torch.Tensor) -> None:
        """Drop the engine's reference to each page (int64 CPU), or defer it to the group."""
        if pages.numel() == 0:
            return
        if int(pages.min()) == 0:
            raise InvalidHandle(
                "page 0 (slots 0..page_size-1) is the reserved padding page; it is never "
                "handed out, so it cannot be freed"
            )
        if self.free_group is not None:
            self.free_group.append(pages.clone())
            return
        self.pool.release(pages)
        self._note(False, pages)

    def free(self, free_index: Any) -> None:
        """Free the pages holding the slots ``free_index`` (any int tensor or sequence).

        Each page touched is freed once per call; freeing a page that is
        already free raises :class:`radixseg.DoubleFree` and frees nothing.
        Inside a free group the pages wait for :meth:`free_group_end`.
        """
        slots = _as_slots(free_index, "free_index")
        if slots.numel() == 0:
            return
        self._release(torch.unique(slots // self.page_size))

    def free_full(self, free_index: Any) -> None:
        """:meth:`free` (SGLang's full-attention side; there is no SWA side here)."""
        self.free(free_index)

    def free_page_ids(self, page_ids: Any) -> None:
        """Free exactly these pages; a page listed twice is a double free."""
        self._release(_as_slots(page_ids, "page_ids"))

    def _segment_pages(self, free_index: Any, start_pos: int) -> torch.Tensor:
        """Page ids (int64) of the kv-row segment starting at ``start_pos``."""
        ps = self.page_size
        if start_pos % ps:
            raise InvalidArgument(f"segment start {start_pos} is not page-aligned ({ps})")
        slots = _as_slots(free_index, "free_index")
        return slots[::ps] // ps if ps > 1 else slots

    def free_segment(self, free_index: Any, *, start_pos: int) -> None:
        """Free a request's kv-row segment ``row[start_pos : start_pos + n]``.

        ``start_pos`` is page-aligned, so the segment's pages are
        ``free_index[::page_size] // page_size`` (the last one may be partly
        filled); each is freed once.
        """
        self._release(self._segment_pages(free_index, start_pos))

    def free_full_segment(self, free_index: Any, *, start_pos: int) -> None:
        """:meth:`free_segment` (the full-attention side)."""
        self.free_segment(free_index, start_pos=start_pos)

    def free_segments(self, segments: Iterable[tuple[Any, int]]) -> None:
        """Free several ``(free_index, start_pos)`` segments of one kv row; their
        page ranges must not overlap. All or nothing, as one :meth:`free`."""
        pages = [self._segment_pages(i, start) for i, start in self._page_disjoint(segments)]
        if pages:
            self._release(torch.cat(pages))

    def free_full_segments(self, segments: Iterable[tuple[Any, int]]) -> None:
        """:meth:`free_segments` (the full-attention side)."""
        self.free_segments(segments)

    def _page_disjoint(self, segments: Iterable[tuple[Any, int]]) -> list[tuple[Any, int]]:
        ps, prev_end, out = self.page_size, None, []
        for free_index, start_pos in segments:
            n = len(free_index)
            if n == 0:
                continue
            if prev_end is not None and start_pos // ps <= (prev_end - 1) // ps:
                raise InvalidArgument(
                    f"segment at {start_pos} shares a page with the one ending at {prev_end}"
                )
            prev_end = start_pos + n
            out.append((free_index, start_pos))
        return out

    def free_group_begin(self) -> None:
        """Defer every free until :meth:`free_group_end`; groups do not nest."""
        if self.free_group is not None:
            raise InvalidArgument("free groups cannot be nested")
        self.free_group = []

    def free_group_end(self) -> None:
        """Free everything deferred since :meth:`free_group_begin`, in one call.

        All or nothing: a page freed twice in the group (or already free)
        raises :class:`radixseg.DoubleFree` and none of the group is freed.
        """
        pending, self.free_group = self.free_group, None
        if pending:
            self._release(torch.cat(pending))

    # ----- rollback ---------------------------------------------------------------------

    def _note(self, is_alloc: bool, pages: torch.Tensor) -> None:
        """Journal an allocation or free while a checkpoint is alive; drop the
        journal once none is."""
        if len(self._states):
            self._journal.append((is_alloc, pages))
        elif self._journal:
            self._journal = []

    def backup_state(self) -> AllocatorState:
        """A checkpoint that :meth:`restore_state` rolls allocations back to.

        While any checkpoint object is alive, allocations and frees are
        journaled (their page ids), so keep it only as long as needed.
        """
        if not len(self._states):
            self._journal = []
            self._epoch += 1
        state = AllocatorState(self, self._epoch, len(self._journal))
        self._states.add(state)
        return state

    def restore_state(self, state: AllocatorState) -> None:
        """Free every page allocated since ``state`` that the engine still holds.

        Pages freed since stay free; pages the tree took since stay cached.
        Raises ``InvalidArgument`` for a state of another allocator, a stale
        state (the allocator was cleared or restored to an earlier one), or
        frees pending in an open free group.
        """
        if not isinstance(state, AllocatorState) or state.allocator is not self:
            raise InvalidArgument("restore_state needs a state from this allocator's backup_state")
        if state.epoch != self._epoch or state.index > len(self._journal):
            raise InvalidArgument("this allocator state is stale (cleared or restored past it)")
        if self.free_group:
            raise InvalidArgument("cannot restore_state with frees pending in a free group")
        held: dict[int, int] = {}
        for is_alloc, pages in self._journal[state.index :]:
            for p in pages.tolist():
                if is_alloc:
                    held[p] = held.get(p, 0) + 1
                elif held.get(p, 0) > 0:
                    held[p] -= 1
        roll = [p for p, c in held.items() for _ in range(c)]
        if roll:
            self.pool.release(roll)
        del self._journal[state.index :]

    def _transferred(self, pages: torch.Tensor) -> None:
        """The tree took over the engine's reference to ``pages``."""
        self.pool.release(pages)
        self._note(False, pages)

    # ----- whole-pool operations ----------------------------------------------------------

    def clear(self) -> None:
        """Free every page the engine holds (everything but page 0), as SGLang's
        ``clear`` resets its free list. The attached cache must be empty
        (``reset()`` it first); pending frees and checkpoints are dropped."""
        if self._cache is not None and self._cache.tree.cached_pages():
            raise InvalidArgument(
                "the radix cache still holds pages; reset() it before clear(), as "
                "SGLang's flush_cache does"
            )
        self.free_group = None
        self._journal = []
        self._epoch += 1
        a, pps = self.pool.allocator, self.pool.pages_per_segment
        held = []
        for seg in a.segments():
            ids = torch.arange(seg * pps, (seg + 1) * pps, dtype=torch.int64)
            rc = a.refcount(ids).to(torch.int64)
            if seg == 0:
                rc[0] -= 1  # keep the padding page's reference
            held.append(torch.repeat_interleave(ids, rc.clamp(min=0)))
        if held:
            self.pool.release(torch.cat(held))

    def get_all_free_pages(self) -> torch.Tensor:
        """Free page ids in live segments (``int64``; a debugging census, O(pages))."""
        a, pps = self.pool.allocator, self.pool.pages_per_segment
        out = [torch.zeros(0, dtype=torch.int64)]
        for seg in a.segments():
            ids = torch.arange(seg * pps, (seg + 1) * pps, dtype=torch.int64)
            out.append(ids[a.refcount(ids) == 0])
        return torch.cat(out)

    def merge_and_sort_free(self) -> None:
        """No-op: there is no staged free list to merge."""

    def get_kvcache(self) -> KVPool:
        """The :class:`KVPool` that holds the bytes (SGLang returns its KVCache)."""
        return self.pool

    def translate_kv_indices_for_transfer(self, kv_indices: torch.Tensor) -> torch.Tensor:
        """Identity: slots name pages directly."""
        return kv_indices

    def debug_print(self) -> str:
        """One line of pool counters."""
        s = self.pool.stats()
        return (
            f"radixseg: {s['segments']} segments, {s['used_pages']}/{s['total_pages']} "
            f"pages used, {self.available_size()} tokens available"
        )

    # ----- SGLang 0.5.23 scheduler hooks ----------------------------------------------------

    def request_slot_reserve(self, *, has_req_pool_slot: bool, prefill_tokens: int = 0) -> int:
        """Extra slots a request needs beyond its prefill: none."""
        return 0

    def max_new_tokens_for_memory(
        self,
        input_tokens: int,
        max_new_tokens: int,
        *,
        token_capacity: int,
        sliding_window_size: int | None = None,
        chunk_size: int | None = None,
    ) -> int | None:
        """SGLang's clip of ``max_new_tokens`` to an empty pool of ``token_capacity``."""
        ps = self.page_size
        paged_input = -(-input_tokens // ps) * ps
        return max(0, min(max_new_tokens, token_capacity - paged_input - ps - 1))

    def evict_to_free_tokens(self, tree_cache: Any, num_tokens: int) -> bool | None:
        """Evict from ``tree_cache`` until ``num_tokens`` are available (or nothing is left)."""
        if tree_cache is None:
            return None
        shortfall = num_tokens - self.available_size()
        if shortfall > 0:
            tree_cache.evict(EvictParams(num_tokens=shortfall))
        return None

    def check_decode_capacity(
        self,
        *,
        num_tokens: int,
        tree_cache: Any,
        requests: Any = None,
        spec_algorithm: Any = None,
    ) -> bool:
        """Whether ``num_tokens`` fit after evicting what the cache can spare."""
        self.evict_to_free_tokens(tree_cache, num_tokens)
        return self.available_size() >= num_tokens

    def __repr__(self) -> str:
        return (
            f"RadixsegTokenToKVPoolAllocator(page_size={self.page_size}, size={self.size}, "
            f"available={self.available_size()})"
        )


# ----- the request-to-token table -------------------------------------------------------


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


# ----- the radix cache -------------------------------------------------------------------


@dataclass
class _Checkpoint:
    """A checkpoint validated by ``_plan_checkpoint``, for ``_commit_checkpoint``."""

    rec: Any  #: the request's KV record (``req.kv`` or ``req``)
    toks: npt.NDArray[Any]  #: the page-aligned tokens to cache
    ns: int  #: their namespace
    protected: int  #: ``cache_protected_len`` before the checkpoint
    slots: torch.Tensor  #: the row's ``int64`` slots of ``toks``
    pages: torch.Tensor  #: their page ids
    cut: int  #: the prompt boundary to split the leaf at (0: none)


class _PoolEvictor:
    """What the KVPool calls to evict under budget pressure."""

    def __init__(self, tree: RadixTree) -> None:
        self.tree = tree

    def evict(self, n_pages: int) -> int:
        return self.tree.evict(n_pages)

    def evictable_pages(self) -> int:
        return self.tree.evictable_pages()

    def cache_stats(self) -> dict[str, Any]:
        return {
            "cached_tokens": self.tree.cached_tokens(),
            "cached_pages": self.tree.cached_pages(),
            "evictable_pages": self.tree.evictable_pages(),
            "locked_pages": self.tree.locked_pages(),
            "tree_nodes": self.tree.node_count(),
            "tree_metadata_bytes": self.tree.metadata_bytes(),
        }


class RadixsegRadixCache(Uncopyable):
    """SGLang's ``RadixCache`` (``BasePrefixCache``) over a radixseg RadixTree.

    Parameters
    ----------
    token_to_kv_pool_allocator : RadixsegTokenToKVPoolAllocator
        Whose pool's pages the tree caches; one cache per allocator.
    req_to_token_pool : optional
        SGLang's ``ReqToTokenPool`` or a :class:`ReqToTokenTable`; needed only
        by the request-level calls (``checkpoint``, ``cache_*_req``).
    evict_on_alloc : bool
        Let the allocator evict least-recently-used prefixes when it runs out
        (default); without it, ``alloc`` returns None and the engine evicts.

    Use :meth:`from_init_params` to build from SGLang's ``CacheInitParams``.
    Sizes are in tokens, as SGLang's. See the module docstring for the
    request duck type and for what differs from SGLang.
    """

    def __init__(
        self,
        token_to_kv_pool_allocator: RadixsegTokenToKVPoolAllocator,
        req_to_token_pool: Any = None,
        *,
        evict_on_alloc: bool = True,
    ) -> None:
        alloc = token_to_kv_pool_allocator
        if not isinstance(alloc, RadixsegTokenToKVPoolAllocator):
            raise TypeError(
                "token_to_kv_pool_allocator must be a RadixsegTokenToKVPoolAllocator, "
                f"got {type(alloc).__name__}"
            )
        if alloc._cache is not None:
            raise InvalidArgument("this allocator already serves a radix cache")
        self.token_to_kv_pool_allocator = alloc
        self.req_to_token_pool = req_to_token_pool
        self.page_size = alloc.page_size
        self.device = alloc.device
        self.disable = False
        self.is_eagle = False
        self.eviction_policy = "lru"
        self.root_node = ROOT_NODE
        self.evict_on_alloc = bool(evict_on_alloc)
        self.tree = RadixTree(alloc.pool.allocator)
        self._evictor = _PoolEvictor(self.tree)
        if self.evict_on_alloc:
            alloc.pool.attach_cache(self._evictor)
        alloc._cache = self
        self._namespaces: dict[tuple[str | None, str | None], int] = {(None, None): 0}
        self._namespace_keys: dict[int, tuple[str | None, str | None]] = {0: (None, None)}
        self._paths: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._pinned: dict[int, tuple[int, torch.Tensor | None]] = {}

    @classmethod
    def from_init_params(cls, params: Any, *, evict_on_alloc: bool = True) -> RadixsegRadixCache:
        """Build from SGLang's ``CacheInitParams`` (its allocator must be ours)."""
        if getattr(params, "disable", False):
            raise InvalidArgument("disable=True is not supported; run without a radix cache")
        cache = cls(
            params.token_to_kv_pool_allocator,
            params.req_to_token_pool,
            evict_on_alloc=evict_on_alloc,
        )
        if params.page_size != cache.page_size:
            raise InvalidArgument(
                f"page_size={params.page_size} but the allocator's pool has {cache.page_size}"
            )
        policy = str(getattr(params, "eviction_policy", "lru")).lower()
        if policy != "lru":
            raise InvalidArgument(f"eviction_policy={policy!r}: only 'lru' is supported")
        return cache

    # ----- keys and paths ---------------------------------------------------------------------

    def _namespace(self, extra_key: Any, cache_salt: Any) -> int:
        pair = (extra_key, cache_salt or None)
        ns = self._namespaces.get(pair)
        if ns is not None:
            return ns
        ns = namespace_of(*pair)
        seen = self._namespace_keys.get(ns)
        if seen is not None and seen != pair:
            raise InvalidArgument(
                f"(extra_key, cache_salt) {pair!r} and {seen!r} hash to the same radixseg "
                f"namespace {ns:#x}; they would share prefixes, so the request is refused"
            )
        self._namespaces[pair] = ns
        self._namespace_keys[ns] = pair
        return ns

    def _key(self, key: Any) -> tuple[npt.NDArray[Any], int]:
        """(page-aligned tokens, namespace) of a key."""
        toks = _token_array(key)
        ps = self.page_size
        toks = toks[: len(toks) // ps * ps]
        ns = self._namespace(getattr(key, "extra_key", None), getattr(key, "cache_salt", None))
        return toks, ns

    def _remember(self, node: int, pages: torch.Tensor) -> None:
        if node == ROOT_NODE:
            return
        if node in self._pinned:
            count, _ = self._pinned[node]
            self._pinned[node] = (count, pages)
            return
        self._paths[node] = pages
        self._paths.move_to_end(node)
        while len(self._paths) > _PATH_MEMO:
            self._paths.popitem(last=False)

    def _slots(self, pages: torch.Tensor) -> torch.Tensor:
        return self.token_to_kv_pool_allocator._slots_of(pages)

    def _pages_of_slots(self, slots: torch.Tensor, what: str) -> torch.Tensor:
        """Page ids (int64) of page-aligned, page-contiguous slots."""
        ps = self.page_size
        if ps == 1:
            return slots
        pages = slots[::ps] // ps
        want = (pages[:, None] * ps + torch.arange(ps, dtype=torch.int64)).reshape(-1)
        if not torch.equal(want, slots):
            raise InvalidArgument(
                f"{what} must be whole pages, each page's {ps} slots in order "
                f"(page * {ps} + 0..{ps - 1})"
            )
        return pages

    def _match(self, toks: npt.NDArray[Any], ns: int) -> tuple[int, int, torch.Tensor]:
        if len(toks) == 0:
            return 0, ROOT_NODE, torch.zeros(0, dtype=torch.int32)
        pages, length, node = self.tree.match_prefix(toks, ns)
        if length == 0:
            return 0, ROOT_NODE, pages
        self._remember(node, pages)
        return length, node, pages

    def _insert(
        self, toks: npt.NDArray[Any], pages: torch.Tensor, ns: int
    ) -> tuple[int, torch.Tensor]:
        """Insert; the tree takes over the caller's reference to the pages it newly
        caches. Returns (tokens already cached, the new pages)."""
        if len(toks) == 0:
            return 0, pages[:0]
        prefix = self.tree.insert(toks, pages, ns)
        fresh = pages[prefix // self.page_size :]
        if fresh.numel():
            self.token_to_kv_pool_allocator._transferred(fresh)
        return prefix, fresh

    # ----- BasePrefixCache: matching and inserting ------------------------------------------

    def match_prefix(self, params: Any) -> MatchResult:
        """Longest cached prefix of ``params.key`` (a ``MatchPrefixParams``; a bare
        key works too), in whole pages, within its namespace.

        Refreshes the path's recency and splits the node where the match ends
        inside it, as SGLang does. Lock ``last_device_node`` to keep the pages.
        """
        key = getattr(params, "key", params)
        toks, ns = self._key(key)
        length, node, pages = self._match(toks, ns)
        return MatchResult(
            device_prefix_len=length,
            last_device_node=node,
            last_host_node=node,
            best_match_node=node,
            full_kv_hit_length=length,
            device_indices=self._slots(pages),
        )

    def touch_prefix(self, key: Any) -> None:
        """Refresh the recency of ``key``'s cached path."""
        toks, ns = self._key(key)
        self._match(toks, ns)

    def insert(self, params: Any) -> InsertResult:
        """Cache ``params.key`` (whole pages) with ``params.value`` (its ``int64`` slots).

        Returns ``prefix_len``, the tokens that were already cached: their
        slots in ``value`` stay the caller's (free the duplicates past the
        protected prefix). The tree takes over the caller's reference to the
        rest. ``last_device_node`` is the node ending the key. A slot of the
        padding page 0 in ``value``, or no ``value`` at all, raises
        ``InvalidArgument`` and changes nothing.
        """
        key, value = params.key, params.value
        toks, ns = self._key(key)
        if value is None:
            raise InvalidArgument(
                f"insert needs params.value, the int64 slots holding the KV of the key's "
                f"{len(toks)} page-aligned tokens; SGLang's debug fallback of using the token "
                f"ids as slots would hand the tree pages nobody allocated"
            )
        slots = _as_slots(value, "value")
        if slots.numel() < len(toks):
            raise InvalidArgument(f"value holds {slots.numel()} slots for {len(toks)} tokens")
        slots = slots[: len(toks)]
        self._reject_padding(slots, "value")
        pages = self._pages_of_slots(slots, "value")
        prefix, _ = self._insert(toks, pages, ns)
        length, node, _ = self._match(toks, ns)
        return InsertResult(prefix_len=prefix, total_len=length, last_device_node=node)

    # ----- eviction and locks ------------------------------------------------------------------

    def evict(self, params: Any) -> EvictResult:
        """Evict least-recently-used unlocked leaves, whole, until at least
        ``params.num_tokens`` (an ``EvictParams`` or an int) are freed."""
        n = as_count(getattr(params, "num_tokens", params), "num_tokens")
        ps = self.page_size
        released = self.tree.evict(-(-n // ps))
        return EvictResult(num_tokens_evicted=released * ps)

    def evict_for_alloc(self, params: Any, **kwargs: Any) -> EvictResult:
        """:meth:`evict` (SGLang's allocation-driven entry point)."""
        if kwargs.get("allocation_reclaim_satisfied") is not None:
            raise NotImplementedError("joint reclaim is not supported")
        return self.evict(params)

    def inc_lock_ref(self, node: Any) -> IncLockRefResult:
        """Lock ``node`` and its ancestors; ``delta`` is minus the tokens that
        moved from evictable to protected (nodes whose count went 0 -> 1)."""
        if node == ROOT_NODE:
            return IncLockRefResult(delta=0)
        before = self.tree.evictable_pages()
        self.tree.lock(node)
        count, pages = self._pinned.get(node, (0, None))
        if count == 0:
            pages = self._paths.pop(node, None)
        self._pinned[node] = (count + 1, pages)
        return IncLockRefResult(delta=(self.tree.evictable_pages() - before) * self.page_size)

    def dec_lock_ref(self, node: Any, params: Any = None) -> DecLockRefResult:
        """Undo one :meth:`inc_lock_ref`; ``delta`` is the tokens that became
        evictable. Unlocking a node with no lock of its own raises."""
        if node == ROOT_NODE:
            return DecLockRefResult(delta=0)
        before = self.tree.evictable_pages()
        self.tree.unlock(node)
        count, pages = self._pinned.pop(node, (1, None))
        if count > 1:
            self._pinned[node] = (count - 1, pages)
        elif pages is not None:
            self._remember(node, pages)
        return DecLockRefResult(delta=(self.tree.evictable_pages() - before) * self.page_size)

    def lock(self, node: Any) -> TreeLock:
        """``inc_lock_ref`` for one holder; :meth:`unlock` releases it."""
        self.inc_lock_ref(node)
        return TreeLock(node)

    def unlock(self, lock: TreeLock | None) -> None:
        """Release a :meth:`lock` (None is ignored)."""
        if lock is not None:
            self.dec_lock_ref(lock.node)

    def is_root(self, node: Any) -> bool:
        """Whether ``node`` is the root handle."""
        return bool(node == ROOT_NODE)

    def root_node_handle(self, extra_key: str | None = None) -> int:
        """The root handle (one sentinel for every namespace)."""
        return ROOT_NODE

    def resolve_node_handle(self, node_handle: Any) -> Any:
        """Node handles are the nodes."""
        return node_handle

    def path_device_indices(self, node: Any) -> torch.Tensor:
        """``int64`` slots of the path from the root to ``node``.

        Known for nodes this cache returned from a match, an insert or a
        checkpoint (every locked one, and the most recent others).
        """
        if node == ROOT_NODE:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        pages = self._pinned[node][1] if node in self._pinned else self._paths.get(node)
        if pages is None:
            raise InvalidArgument(
                f"node {node} was not returned by this cache recently; match its prefix again"
            )
        self.tree.lock_count(node)  # raises InvalidHandle for a stale (evicted) node
        return self._slots(pages)

    def prefix_device_indices(self, req: Any) -> torch.Tensor:
        """Slots of ``req``'s matched prefix: ``req.prefix_len`` slots of its node's path."""
        path = self.path_device_indices(req.last_node)
        return path[: req.prefix_len]

    # ----- sizes --------------------------------------------------------------------------------

    def evictable_size(self) -> int:
        """Tokens cached in unlocked nodes."""
        return self.tree.evictable_pages() * self.page_size

    def protected_size(self) -> int:
        """Tokens cached in locked nodes (a node is locked while it or a descendant is)."""
        return self.tree.locked_pages() * self.page_size

    def full_evictable_size(self) -> int:
        """:meth:`evictable_size`."""
        return self.evictable_size()

    def full_protected_size(self) -> int:
        """:meth:`protected_size`."""
        return self.protected_size()

    def swa_evictable_size(self) -> int:
        """0: no sliding-window pool."""
        return 0

    def swa_protected_size(self) -> int:
        """0: no sliding-window pool."""
        return 0

    def total_size(self) -> int:
        """Tokens cached."""
        return self.tree.cached_tokens()

    def supports_prefix_sharing(self) -> bool:
        """True."""
        return True

    def supports_swa(self) -> bool:
        """False."""
        return False

    def supports_mamba(self) -> bool:
        """False."""
        return False

    def take_events(self) -> list[Any]:
        """No KV events are recorded."""
        return []

    def available_and_evictable_str(self) -> str:
        """SGLang's one-line summary of available and evictable tokens."""
        available_size = self.token_to_kv_pool_allocator.available_size()
        evictable_size = self.evictable_size()
        return (
            f"Available tokens: {available_size + evictable_size} "
            f"({available_size=} + {evictable_size=})\n"
        )

    def reset(self) -> None:
        """Drop every cached prefix and release the tree's page references.

        Refused while a node is locked (finish the running requests first).
        """
        if self.tree.locked_pages():
            raise InvalidArgument(
                f"cannot reset with {self.protected_size()} tokens locked by running requests"
            )
        self.tree.reset()
        self._paths.clear()
        self._pinned.clear()

    def all_values_flatten(self) -> torch.Tensor:
        """``int64`` slots of every cached page, each page once (SGLang's census
        of the tree's values), every namespace included.

        Pages come in a preorder walk of each namespace's tree (children in
        token order; SGLang's order is its children's insertion order). An
        empty tree gives an empty tensor (SGLang's raises). For tests and
        debugging: O(total path length), recency is not refreshed.
        """
        seen: dict[int, None] = {}
        for _ns, _tokens, pages in self.tree.cached_sequences():
            seen.update(dict.fromkeys(pages.tolist()))
        return self._slots(torch.tensor(list(seen), dtype=torch.int64))

    def pretty_print(self) -> None:
        """Print the tree's counters (the tree is not walked node by node)."""
        s = self.tree.stats()
        print(
            f"radixseg tree: {s['nodes']} nodes, evictable={self.evictable_size()}, "
            f"protected={self.protected_size()}"
        )
        print(f"#tokens: {self.total_size()}")

    def sanity_check(self) -> None:
        """The tree's and the allocator's invariant checks."""
        self.tree.check_invariants()

    # ----- requests (SGLang's Req, duck-typed) ------------------------------------------

    def _row(self, req: Any) -> tuple[Any, torch.Tensor]:
        pool = self.req_to_token_pool
        if pool is None:
            raise InvalidArgument("request-level calls need a req_to_token_pool")
        rec = _record(req)
        if rec.req_pool_idx is None:
            raise InvalidArgument("request holds no row (req_pool_idx is None)")
        return rec, pool.req_to_token[rec.req_pool_idx]

    @staticmethod
    def _protected_len(req: Any, rec: Any) -> int:
        n = getattr(rec, "cache_protected_len", None)
        if n is None:
            n = len(getattr(req, "prefix_indices", ()))
        return int(n)

    @staticmethod
    def _fill_ids(req: Any) -> Any:
        for name in ("full_untruncated_fill_ids", "fill_ids"):
            ids = getattr(req, name, None)
            if ids is not None:
                return ids
        return list(req.origin_input_ids) + list(req.output_ids)

    def _committed_len(self, req: Any, rec: Any, protected: int) -> int:
        """Tokens of ``req`` whose KV is computed: what a release caches and frees up to.

        SGLang 0.5.23's ``req.owned_kv_len()``; else ``kv_committed_len`` (on
        ``req.kv`` or, in SGLang 0.5.0-0.5.22, on ``req``); else, for older
        SGLang and duck types, the longest of ``len(fill_ids)``,
        ``len(origin_input_ids) + len(output_ids) - 1`` (the newest output
        token has no KV yet) and ``cache_protected_len`` (the tree holds that
        KV, so it was computed).
        """
        owned = getattr(req, "owned_kv_len", None)
        if callable(owned):
            return as_count(owned(), "req.owned_kv_len()")
        for holder in (rec, req):
            n = getattr(holder, "kv_committed_len", None)
            if n is not None:
                return as_count(n, "kv_committed_len")
        n = protected
        fill = getattr(req, "fill_ids", None)
        if fill is not None:
            n = max(n, len(fill))
        origin, output = getattr(req, "origin_input_ids", None), getattr(req, "output_ids", None)
        if origin is not None and output is not None:
            n = max(n, len(origin) + max(len(output) - 1, 0))
        elif fill is None:
            n = max(n, len(self._fill_ids(req)))
        return n

    def _reject_padding(self, slots: torch.Tensor, what: str, first_pos: int = 0) -> None:
        """Raise ``InvalidArgument`` naming the first of ``slots`` in the padding page 0.

        No slot of page 0 is ever handed out, so one there was never allocated:
        caching or freeing it would give the padding page away.
        """
        ps = self.page_size
        bad = (slots < ps).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise InvalidArgument(
                f"{what} holds slot {int(slots[i])} at position {first_pos + i}, in the "
                f"reserved padding page 0 (slots 0..{ps - 1}), which is never handed out: "
                f"that KV was never allocated"
            )

    def _check_owned(self, pages: torch.Tensor, what: str, first_pos: int) -> None:
        """The request's own pages (int64 ids): distinct and referenced, so that
        freeing each once cannot fail halfway."""
        if pages.numel() == 0:
            return
        uniq, counts = torch.unique(pages, return_counts=True)
        if int(counts.max()) > 1:
            dup = int(uniq[counts > 1][0])
            raise InvalidArgument(f"{what} from position {first_pos} lists page {dup} twice")
        rc = self.token_to_kv_pool_allocator.pool.allocator.refcount(pages)
        free = (torch.as_tensor(rc) == 0).nonzero()
        if free.numel():
            i = int(free[0, 0])
            raise InvalidArgument(
                f"{what} holds page {int(pages[i])} at position {first_pos + i * self.page_size},"
                f" which is free: the request does not hold it (freed already?)"
            )

    def _lock_node(self, req: Any) -> Any:
        """The node the request's lock holds (None or the root: nothing held)."""
        if hasattr(req, "lock"):
            return None if req.lock is None else req.lock.node
        return getattr(req, "last_node", None)

    def _check_unlockable(self, req: Any) -> None:
        """The request's lock can be released (so a release cannot fail after changes)."""
        node = self._lock_node(req)
        if node is None or node == ROOT_NODE:
            return
        self.tree.lock_count(node)  # raises InvalidHandle for a stale or foreign handle
        if self._pinned.get(node, (0, None))[0] < 1:
            raise InvalidArgument(
                f"the request's lock on node {node} is not held (unlocked already?)"
            )

    def _relock(self, req: Any, node: int) -> None:
        if hasattr(req, "lock"):
            new = self.lock(node)
            self.unlock(req.lock)
            req.lock = new
        else:
            self.inc_lock_ref(node)
            old = getattr(req, "last_node", None)
            if old is not None:
                self.dec_lock_ref(old)
        req.last_node = node

    def _unlock_req(self, req: Any) -> None:
        if hasattr(req, "lock"):
            self.unlock(req.lock)
            req.lock = None
        elif getattr(req, "last_node", None) is not None:
            self.dec_lock_ref(req.last_node)

    def _plan_checkpoint(self, req: Any, up_to: int) -> _Checkpoint:
        """Validate a checkpoint of ``req`` up to ``up_to``; changes nothing."""
        rec, row = self._row(req)
        ps = self.page_size
        up_to = as_count(up_to, "up_to")
        if up_to > row.numel():
            raise InvalidArgument(
                f"up_to={up_to} is past the request's req_to_token row of {row.numel()} slots"
            )
        ids = self._fill_ids(req)
        protected = self._protected_len(req, rec)
        key = RadixKey(
            ids,
            getattr(req, "extra_key", None),
            limit=up_to,
            cache_salt=getattr(req, "cache_salt", None),
        )
        toks, ns = self._key(key)
        n = len(toks)
        if protected % ps or protected > n:
            raise InvalidArgument(
                f"cache_protected_len={protected} must be page-aligned and at most the "
                f"{n} page-aligned tokens up to {up_to}"
            )
        slots = _as_slots(row[:n], "req_to_token row")
        self._reject_padding(slots, "the request's req_to_token row")
        pages = self._pages_of_slots(slots, "req_to_token row")
        self._check_owned(pages[protected // ps :], "the request's req_to_token row", protected)
        self._check_unlockable(req)
        origin = getattr(req, "origin_input_ids", None)
        cut = 0 if origin is None else len(origin) // ps * ps
        return _Checkpoint(rec, toks, ns, protected, slots, pages, cut if 0 < cut < n else 0)

    def _commit_checkpoint(self, req: Any, plan: _Checkpoint) -> None:
        """Carry out a validated checkpoint."""
        rec, toks, ns, protected = plan.rec, plan.toks, plan.ns, plan.protected
        slots, pages = plan.slots, plan.pages
        n = len(toks)
        prefix, _ = self._insert(toks, pages, ns)
        if plan.cut:
            # As SGLang: split the leaf at the prompt so the output can go alone.
            self.tree.insert(toks[: plan.cut], pages[: plan.cut // self.page_size], ns)
        if prefix > protected:
            self.token_to_kv_pool_allocator.free_segment(
                slots[protected:prefix], start_pos=protected
            )
        length, node, path = self._match(toks, ns)
        if length != n:  # pragma: no cover - the insert above cached all n
            raise InvalidArgument(f"checkpoint cached {length} of {n} tokens")
        new_slots = self._slots(path).to(torch.int64)
        if n > protected:
            row = self.req_to_token_pool.req_to_token[rec.req_pool_idx]
            where = (rec.req_pool_idx, slice(protected, n))
            values = new_slots[protected:].to(row.device)
            write = getattr(self.req_to_token_pool, "write", None)
            if write is not None:
                write(where, values)
            else:
                self.req_to_token_pool.req_to_token[where] = values
        if hasattr(rec, "cache_protected_len"):
            rec.cache_protected_len = n
        if hasattr(rec, "cache_inserted_len"):
            rec.cache_inserted_len = max(rec.cache_inserted_len, n)
        if hasattr(req, "prefix_indices"):
            req.prefix_indices = new_slots
        self._relock(req, node)

    def checkpoint(self, req: Any, *, up_to: int) -> None:
        """Cache the request's KV up to row position ``up_to`` (SGLang 0.5.23).

        Inserts the page-aligned part of its tokens with the slots of its row,
        frees the row's duplicates of pages that were already cached, points
        the row at the tree's pages, advances ``cache_protected_len`` to the
        cached length, and moves the request's lock to the node ending it.
        The partial last page stays the request's. All or nothing: the row,
        the protected length and the lock are checked before anything changes.
        """
        self._commit_checkpoint(req, self._plan_checkpoint(req, up_to))

    def cache_unfinished_req(self, req: Any, chunked: bool = False) -> None:
        """Cache a running request's KV so far: ``checkpoint(req,
        up_to=len(req.fill_ids))`` (the tokens computed so far; without
        ``fill_ids``, all of the request's tokens). Older SGLang's name; 0.5.23
        calls ``checkpoint``."""
        ids = getattr(req, "fill_ids", None)
        self.checkpoint(req, up_to=len(ids if ids is not None else self._fill_ids(req)))

    def release_kv_cache(
        self, req: Any, *, checkpoint: bool = True, kv_len: int | None = None
    ) -> None:
        """SGLang 0.5.23's ``release_kv_cache(req, tree_cache, checkpoint=...)``.

        ``kv_len`` (the request's computed KV; default as SGLang 0.5.23:
        ``req.owned_kv_len()``, else ``kv_committed_len``, else for older
        requests the longest of ``len(fill_ids)``, ``len(origin_input_ids) +
        len(output_ids) - 1`` and ``cache_protected_len``) is never taken
        below ``cache_protected_len``. With ``checkpoint`` the first
        ``kv_len`` tokens are cached first. Then the row's slots from
        ``cache_protected_len`` up to ``kv_len`` (the unaligned tail, or the
        whole uncached part) are freed, and so are the pages over-allocated
        past ``kv_len`` up to ``kv_allocated_len`` (when the request has one),
        the request's lock is dropped and its row is freed.

        All or nothing: every check (row, lengths, slots, held pages, lock)
        runs before anything changes, so a refused release leaves the tree,
        the lock and the row as they were.
        """
        self._release_request(req, checkpoint=checkpoint, kv_len=kv_len, overallocated=True)

    def cache_finished_req(self, req: Any, is_insert: bool = True) -> None:
        """Cache a finished request, free its duplicates and unaligned tail,
        unlock, and free its row (older SGLang's name; 0.5.23 calls
        ``release_kv_cache``): :meth:`release_kv_cache` with ``checkpoint=is_insert``,
        except that over-allocated slots past ``kv_committed_len`` are left
        to the caller, whose scheduler frees them after this call in the SGLang
        versions that use this name; ``req.pop_committed_kv_cache()`` is
        called when the request has it, as those versions do.
        """
        self._release_request(req, checkpoint=is_insert, kv_len=None, overallocated=False)

    def free_kv_row(self, kv: Any, ranges: Iterable[tuple[int, int]]) -> None:
        """Free ascending, disjoint, half-open position ranges of the row of the
        KV record ``kv`` (``req.kv``), all or nothing (SGLang 0.5.23's hook, which
        its ``common.release_kv_cache`` calls). Adjacent ranges are merged first,
        so a page split between them is freed once; empty ranges are skipped."""
        pool = self.req_to_token_pool
        if pool is None:
            raise InvalidArgument("free_kv_row needs a req_to_token_pool")
        if kv.req_pool_idx is None:
            raise InvalidArgument("the KV record holds no row (req_pool_idx is None)")
        row = pool.req_to_token[kv.req_pool_idx]
        merged: list[list[int]] = []
        for start, end in ranges:
            start, end = int(start), int(end)
            if end <= start:
                continue
            if end > row.numel():
                raise InvalidArgument(
                    f"range [{start}, {end}) runs past the row's {row.numel()} slots"
                )
            if merged and start == merged[-1][1]:
                merged[-1][1] = end
            else:
                merged.append([start, end])
        self.token_to_kv_pool_allocator.free_segments(
            [(row[start:end], start) for start, end in merged]
        )

    def claim_kv_row(self, req: Any) -> bool:
        """SGLang 0.5.23's hook for streaming sessions that keep a row: never here."""
        return False

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        """SGLang 0.5.23's hook after a release: this cache keeps no per-request state."""

    def _release_request(
        self, req: Any, *, checkpoint: bool, kv_len: int | None, overallocated: bool
    ) -> None:
        rec, row = self._row(req)
        ps = self.page_size
        protected = self._protected_len(req, rec)
        if protected % ps:
            raise InvalidArgument(
                f"cache_protected_len={protected} is not page-aligned (page_size={ps})"
            )
        pop = getattr(req, "pop_committed_kv_cache", None)
        if kv_len is not None:
            kv_len = as_count(kv_len, "kv_len")
        elif callable(pop) and not callable(getattr(req, "owned_kv_len", None)):
            has_len = any(getattr(h, "kv_committed_len", None) is not None for h in (rec, req))
            if not has_len:  # nothing to read it from: pop it now
                kv_len, pop = as_count(pop(), "req.pop_committed_kv_cache()"), None
        if kv_len is None:
            kv_len = self._committed_len(req, rec, protected)
        kv_len = max(kv_len, protected)
        end = kv_len
        if overallocated:
            end = max(end, int(getattr(rec, "kv_allocated_len", 0) or 0))
        if end > row.numel():
            raise InvalidArgument(
                f"the request's KV runs to position {end} but its req_to_token row holds "
                f"{row.numel()} slots"
            )
        plan = self._plan_checkpoint(req, kv_len) if checkpoint else None
        own = _as_slots(row[protected:end], "req_to_token row")
        self._reject_padding(own, "the request's req_to_token row", protected)
        self._check_owned(own[::ps] // ps, "the request's req_to_token row", protected)
        self._check_unlockable(req)
        # Everything is checked: from here on nothing fails halfway.
        if callable(pop):
            pop()
        start = protected
        if plan is not None:
            self._commit_checkpoint(req, plan)
            start = len(plan.toks)
        over = -(-kv_len // ps) * ps  # over-allocated pages start past kv_len's page
        self.token_to_kv_pool_allocator.free_segments(
            [(row[start:kv_len], start), (row[over:end], over)]
        )
        self._unlock_req(req)
        free = getattr(self.req_to_token_pool, "free", None)
        if free is not None:
            free(req)

    def __repr__(self) -> str:
        return (
            f"RadixsegRadixCache(page_size={self.page_size}, total={self.total_size()}, "
            f"evictable={self.evictable_size()}, protected={self.protected_size()})"
        )
