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
are read by attribute, so SGLang's own objects work, and this package defines
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

Modules
-------
Divided as SGLang divides the same code (``mem_cache/allocator/``,
``radix_cache.py``, ``base_prefix_cache.py``): ``types`` (``RadixKey``, the
parameter and result types), ``namespaces`` (:func:`namespace_of`),
``allocator``, ``radix_cache`` and ``req_to_token``. Import the names above
from this package; the modules' own layout is not part of the API.
"""

from radixseg.integrations.sglang.allocator import AllocatorState, RadixsegTokenToKVPoolAllocator
from radixseg.integrations.sglang.namespaces import namespace_of
from radixseg.integrations.sglang.radix_cache import RadixsegRadixCache
from radixseg.integrations.sglang.req_to_token import ReqToTokenTable
from radixseg.integrations.sglang.types import (
    ROOT_NODE,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
    RadixKey,
    TreeLock,
)

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
