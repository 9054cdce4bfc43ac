"""SGLang's own unit tests for its radix cache and CPU allocators, run on both sides.

The cases of SGLang's ``test/registered/unit/mem_cache/`` (sgl-project/sglang)
that concern behaviour :mod:`radixseg.integrations.sglang` claims are rewritten
here as pytest functions, each parametrized over two sides:

* ``sglang``: SGLang 0.5.23's own ``RadixCache``, ``TokenToKVPoolAllocator`` and
  ``PagedTokenToKVPoolAllocator``, loaded on CPU by ``benchmarks/_sglang.py``
  (skipped when SGLang is not installed). Every assertion is proven here first.
* ``radixseg``: ``RadixsegRadixCache`` over ``RadixsegTokenToKVPoolAllocator``
  over a :class:`radixseg.KVPool` whose integer budget is exactly one segment of
  ``size // page_size + 1`` pages (page 0 is padding), with the same ``size``
  cap, so its capacity and slot range equal SGLang's and do not depend on the
  host's free memory. This side needs no SGLang install.

SGLang's tests build the cache with ``create_simulated`` and made-up values
(``[10, 20, 30]``); here both sides hold real slots from their allocator, so
expected slots are the ones the allocator handed out. SGLang 0.5.23's
``MatchResult`` has no ``device_indices``: matched slots are read with
``path_device_indices`` (0.5.23's API) on both sides. SGLang 0.5.23 has no
``cache_unfinished_req``/``cache_finished_req``: its side runs
``common.checkpoint_kv_cache`` and ``common.release_kv_cache`` (with the serving
and speculative config stubbed to their defaults), the adapter's side its
methods of those names. ``need_sort=True`` applies to the SGLang side only (the
adapter has no sorted free-list mode); the observable result is the same.

Where the adapter deliberately differs (its module docstring), the test asserts
SGLang's behaviour on the SGLang side and the documented behaviour on the
adapter side: unaligned paged ``alloc`` raises ``InvalidArgument``, double free
raises ``DoubleFree`` (also across the calls of one free group), one free call
frees a page once, ``alloc_extend``/``alloc_decode`` work at every page size,
``disable=True`` is refused, node handles are ints with ``root_node`` the
sentinel ``ROOT_NODE`` (locks on it are no-ops), and ``get_kvcache`` returns
the ``KVPool``.

Where each test comes from (SGLang file -> class.case -> test here)
--------------------------------------------------------------------
``test_radix_cache_unit.py`` (38 cases; 24 ported):

* TestRadixKey.test_init_basic, test_init_with_extra_key -> test_radix_key_fields
* TestRadixKey.test_len, test_iter, test_len_and_iter -> test_radix_key_len_and_iter
* TestRadixKey.test_getitem_int -> test_radix_key_int_index
* TestRadixKey.test_getitem_slice -> test_radix_key_slices
* TestRadixKey.test_getitem_invalid_index -> test_radix_key_index_out_of_range
* TestRadixKey.test_repr, test_repr_long_token_ids -> test_radix_key_repr
* TestRadixCache.test_init_variations -> test_cache_init (enabled cases:
  test_disabled_cache; the events case is not portable, see below)
* TestRadixCache.test_reset -> test_reset_empties_the_cache
* TestRadixCache.test_insert_and_match_basic -> test_insert_and_match,
  test_disabled_cache
* TestRadixCache.test_insert_with_none_value -> test_insert_without_value (the
  adapter refuses ``value=None``, as its docstring documents)
* TestRadixCache.test_total_size -> test_total_size
* TestRadixCache.test_kv_cache_events (events-off case) -> test_no_events_by_default
* TestRadixCache.test_extra_key_isolation -> test_extra_key_isolation
* TestRadixCache.test_lock_ref_operations -> test_lock_moves_tokens_to_protected
* TestRadixCache.test_evict_functionality -> test_evict_frees_slots
* TestRadixCache.test_page_alignment_boundary -> test_match_is_page_aligned
* TestRadixCache.test_pretty_print_basic -> test_pretty_print
* TestRadixCache.test_all_values_flatten -> test_all_values_flatten
* TestRadixCache.test_advanced_prefix_match_with_node_splits -> test_match_splits_nodes
* TestRadixCache.test_available_and_evictable_str -> test_available_and_evictable_str

Not ported: TestRadixKey.test_hash_page_includes_extra_key (0.5.23's RadixKey
has no ``hash_page``); the 7 TestTreeNode cases (SGLang's node class; the
adapter's nodes are int handles, and ``protect_host``, ``host_value``,
``backuped``, ``get_last_hash_value`` are not in 0.5.23 either);
test_kv_cache_events (events-on cases), test_kv_cache_events_with_eviction,
test_hash_value_storage, test_hash_value_repeating_tokens, test_hash_value_split,
test_block_hashes_are_isolated_by_extra_key (KV events and node hashes: not
provided by the adapter, and SGLang's event hashing needs its native extension,
which its CPU install lacks; ``cache.enable_kv_cache_events`` is not in 0.5.23);
test_memory_allocated (CUDA memory of SGLang's own tensors).

``test_allocator_cpu.py`` (60 cases; 45 ported):

* TestBaseAllocatorNotImplemented.test_get_kvcache -> test_get_kvcache
* TestBaseAllocatorNotImplemented.test_alloc_extend_raises, test_alloc_decode_raises
  -> test_extend_and_decode_at_page_size_one
* TestTokenAllocatorAlloc.test_returns_correct_count, test_reduces_available_size,
  TestPagedAllocatorCPU.test_alloc_returns_correct_count,
  test_alloc_reduces_available_size -> test_alloc_count_and_available
* TestTokenAllocatorAlloc.test_returns_unique_indices,
  TestPagedAllocatorCPU.test_indices_are_unique -> test_alloc_unique
* TestPagedAllocatorCPU.test_indices_are_page_aligned -> test_paged_alloc_page_aligned
* TestTokenAllocatorAlloc.test_exact_capacity_succeeds -> test_exact_capacity
* TestTokenAllocatorAlloc.test_over_capacity_returns_none,
  test_over_capacity_after_need_sort_merge_returns_none,
  TestPagedAllocatorCPU.test_over_capacity_returns_none, test_alloc_need_sort_oom
  -> test_over_capacity_returns_none
* TestTokenAllocatorAlloc.test_zero_alloc_is_noop -> test_zero_alloc
* TestTokenAllocatorAlloc.test_sequential_allocs_non_overlapping -> test_sequential_allocs_disjoint
* TestTokenAllocatorAlloc.test_slot_zero_never_returned,
  TestPagedAllocatorCPU.test_slot_zero_never_returned -> test_slot_zero_never_returned
* TestTokenAllocatorAlloc.test_need_sort_triggers_merge_before_alloc -> test_freed_slots_reusable
* TestTokenAllocatorFree.test_restores_available_size,
  TestPagedAllocatorCPU.test_free_restores_available_size,
  test_need_sort_free_goes_to_release_pages -> test_free_restores_available
* TestTokenAllocatorFree.test_empty_tensor_is_noop,
  TestPagedAllocatorCPU.test_free_empty_tensor_is_noop -> test_free_empty_is_noop
* TestTokenAllocatorFree.test_freed_indices_reusable,
  TestPagedAllocatorCPU.test_freed_pages_reusable -> test_freed_slots_reusable
* TestTokenAllocatorFree.test_no_sort_free_goes_directly_to_free_pages
  -> test_free_returns_slots_to_free_list (read with ``get_all_free_pages``)
* TestTokenAllocatorFreeGroup.test_batches_frees_until_end,
  TestPagedAllocatorCPU.test_free_group_batches_until_end -> test_free_group_defers_frees
* TestTokenAllocatorFreeGroup.test_empty_group_end_is_noop -> test_empty_free_group
* TestPagedAllocatorCPU.test_clear_restores_full_capacity -> test_clear_restores_capacity
* TestAllocExtendNaive (all 10 cases) -> test_alloc_extend_fill_rule (through each
  allocator's ``alloc_extend``, with the pages it hands out instead of given ones)
* TestPagedAllocatorDebugModeCPU.test_alloc_unaligned_size_raises,
  test_alloc_aligned_size_passes -> test_debug_alloc_alignment
* TestPagedAllocatorDebugModeCPU.test_free_duplicate_pages_raises -> test_debug_double_free

Not ported: TestBaseAllocatorNotImplemented.test_get_cpu_copy_raises,
test_load_cpu_copy_raises, TestTokenAllocatorKVCacheDelegation (2) and
TestPagedAllocatorCPU.test_get_cpu_copy_delegates, test_load_cpu_copy_delegates
(HiCache host copies: not provided); TestBaseAllocatorNotImplemented.
test_available_size, test_debug_print_empty_string, test_merge_and_sort_free,
test_merge_and_sort_free_empty_release_is_noop and
TestTokenAllocatorFree.test_need_sort_free_goes_to_release_pages (a hand-built
subclass of SGLang's abstract base, or its ``free_pages``/``release_pages``
staging lists; the adapter has no free lists to stage); TestTokenAllocatorBackupRestore
(3) and TestPagedAllocatorCPU.test_restore_after_alloc (0.5.23 has no
``backup_state``).

``test_allocator_lazy_free.py`` (14 cases; 9 ported; 0.5.23 has no pending-free
buffer, so the ``_pending_free*`` assertions are dropped and the public ones kept):

* test_freed_slots_returned_after_alloc, test_multiple_frees_batched_into_one_flush
  -> test_frees_are_reusable_at_once
* test_slot_values_preserved_through_pending -> test_recovered_slots_are_pool_slots
* test_available_size_includes_pending, test_available_size_after_flush
  -> test_available_counts_freed_slots
* test_clear_resets_pending -> test_clear_after_free
* test_alloc_returns_none_when_truly_empty -> test_alloc_none_when_drained
* test_pending_does_not_exceed_pool_size -> test_free_all_counts_once
* test_free_group_not_affected_by_pending -> test_free_group_after_plain_free

Not ported: test_free_empty_tensor_is_noop, test_free_single_tensor_skips_cat,
test_pending_flushes_to_release_pages_when_need_sort (only pending-buffer
internals asserted), test_backup_flushes_pending, test_restore_after_pending_free
(``backup_state``).

``test_allocator_page_aligned_free.py`` (6 cases; 2 ported):

* test_debug_free_group_rejects_duplicate_merged_page -> test_page_freed_twice_in_one_group
  (0.5.23 merges the group and frees the page once; the adapter raises DoubleFree)
* test_token_free_group_and_debug_duplicate_contract -> test_token_free_group_and_duplicates

Not ported: test_paged_free_preserves_need_sort_release_order (free-list order;
0.5.23's paged need_sort path has no ``release_pages``),
test_paged_free_rejects_partial_fragment_before_mutation and
test_debug_free_rejects_malformed_or_duplicate_page_blocks (validation 0.5.23
lacks: it frees a partial page whole), test_npu_paged_free_keeps_legacy_cpu_unique
(reads SGLang's NPU source).

``test_decode_radix_lock_ref.py`` (6 cases; 5 ported): test_incremental_transfer_success,
test_full_transfer_success, test_incremental_transfer_failure,
test_full_transfer_failure, test_repeated_incremental_no_leak -> the test_decode_*
functions, run with SGLang 0.5.23's request shape (a ``req.kv`` record,
``owned_kv_len()``, ``req.lock``) on both sides and, on the adapter, also with the
flat shape of SGLang's test (``req_pool_idx``/``cache_protected_len``/
``kv_committed_len`` on the request, ``last_node`` locked by the caller), which the
adapter accepts. They also check that no slot leaks (SGLang's test used a mock
allocator). Not ported: test_pop_preallocated_rechecks_budget_after_lock
(SGLang's disaggregation scheduler queue).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from radixseg import DoubleFree, InvalidArgument, KVPool
from radixseg.integrations import sglang as rs

SIDES = ("sglang", "radixseg")


@pytest.fixture(scope="module")
def sg(sglang_loader: ModuleType) -> Iterator[SimpleNamespace]:
    """SGLang 0.5.23's cache modules on CPU, or a clean skip without SGLang."""
    loader = sglang_loader
    try:
        radix = loader.cache_module("radix_cache")
        base = loader.cache_module("base_prefix_cache")
        allocator = loader.cache_module("allocator")
        common = loader.cache_module("common")
    except ImportError as e:  # pragma: no cover - depends on the install
        pytest.skip(f"SGLang's cache modules cannot be loaded on CPU: {e}")
    # release_kv_cache reads the serving and speculative config, which only a
    # launched server publishes: stand in their defaults.
    patch = pytest.MonkeyPatch()
    patch.setattr(common, "get_spec", lambda: SimpleNamespace(speculative_algorithm=None))
    patch.setattr(common, "get_serving", lambda: SimpleNamespace(strip_thinking_cache=False))
    yield SimpleNamespace(
        loader=loader,
        RadixCache=radix.RadixCache,
        RadixKey=radix.RadixKey,
        MatchPrefixParams=base.MatchPrefixParams,
        InsertParams=base.InsertParams,
        EvictParams=base.EvictParams,
        EvictResult=base.EvictResult,
        allocator=allocator,
        common=common,
    )
    patch.undo()


# ----- the two sides -------------------------------------------------------------------


def _radixseg_allocator(size: int, page_size: int) -> rs.RadixsegTokenToKVPoolAllocator:
    """An adapter allocator with SGLang's capacity and slot range: one segment of
    page 0 plus ``size // page_size`` pages, under a budget of that one segment."""
    pool = KVPool(
        1, 1, 8, page_size=page_size, pages_per_segment=size // page_size + 1, dtype="fp32"
    )
    pool.budget_bytes = pool.segment_bytes
    return rs.RadixsegTokenToKVPoolAllocator(pool, size=size)


@dataclass
class Side:
    """One side's classes, and how to build its allocator and cache."""

    name: str
    sg: SimpleNamespace | None
    RadixKey: Any
    MatchPrefixParams: Any
    InsertParams: Any
    EvictParams: Any
    EvictResult: Any

    @property
    def is_sglang(self) -> bool:
        return self.name == "sglang"

    def allocator(
        self, size: int, page_size: int = 1, *, need_sort: bool = False, kvcache: Any = None
    ) -> Any:
        if self.sg is None:
            return _radixseg_allocator(size, page_size)
        mod = self.sg.allocator
        if page_size == 1:
            return mod.TokenToKVPoolAllocator(
                size=size, dtype=torch.int64, device="cpu", kvcache=kvcache, need_sort=need_sort
            )
        return mod.PagedTokenToKVPoolAllocator(
            size=size,
            page_size=page_size,
            dtype=torch.int64,
            device="cpu",
            kvcache=kvcache,
            need_sort=need_sort,
        )

    def cache(self, page_size: int = 1, size: int = 64) -> tuple[Any, Any, rs.ReqToTokenTable]:
        """(cache, allocator, request-to-token table)."""
        alloc = self.allocator(size, page_size)
        table = rs.ReqToTokenTable(4, 64)
        if self.sg is None:
            return rs.RadixsegRadixCache(alloc, table), alloc, table
        params = self.sg.loader.cache_init_params(
            disable=False,
            req_to_token_pool=table,
            token_to_kv_pool_allocator=alloc,
            page_size=page_size,
        )
        return self.sg.RadixCache(params), alloc, table


def _make_side(request: pytest.FixtureRequest, name: str) -> Side:
    classes = request.getfixturevalue("sg") if name == "sglang" else rs
    return Side(
        name=name,
        sg=classes if name == "sglang" else None,
        RadixKey=classes.RadixKey,
        MatchPrefixParams=classes.MatchPrefixParams,
        InsertParams=classes.InsertParams,
        EvictParams=classes.EvictParams,
        EvictResult=classes.EvictResult,
    )


@pytest.fixture(params=SIDES)
def side(request: pytest.FixtureRequest) -> Side:
    return _make_side(request, request.param)


# ----- helpers ---------------------------------------------------------------------------


def _key(side: Side, tokens: list[int], extra_key: str | None = None) -> Any:
    return side.RadixKey(array("q", tokens), extra_key)


def _insert(
    side: Side, cache: Any, tokens: list[int], slots: Any, extra_key: str | None = None
) -> Any:
    return cache.insert(side.InsertParams(key=_key(side, tokens, extra_key), value=slots))


def _match(
    side: Side, cache: Any, tokens: list[int], extra_key: str | None = None
) -> tuple[Any, list[int]]:
    """The match result and its slots (read as 0.5.23 does, off the node's path)."""
    m = cache.match_prefix(side.MatchPrefixParams(key=_key(side, tokens, extra_key)))
    slots = cache.path_device_indices(m.last_device_node)
    assert len(slots) == m.device_prefix_len
    return m, slots.tolist()


def _lock_count(side: Side, cache: Any, node: Any) -> int:
    return int(node.lock_ref) if side.is_sglang else cache.tree.lock_count(node)


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# ===== test_radix_cache_unit.py: RadixKey ==================================================


def test_radix_key_fields(side):
    key = side.RadixKey([1, 2, 3, 4])
    assert key.token_ids == [1, 2, 3, 4] and key.extra_key is None
    key = side.RadixKey([1, 2, 3], "test_key")
    assert key.token_ids == [1, 2, 3] and key.extra_key == "test_key"


@pytest.mark.parametrize("tokens", [[1, 2, 3], [], [42], [1, 2, 3, 4]])
def test_radix_key_len_and_iter(side, tokens):
    key = side.RadixKey(tokens)
    assert len(key) == len(tokens)
    assert list(key) == tokens


@pytest.mark.parametrize(("index", "expected"), [(0, [10]), (-1, [30]), (2, [30])])
def test_radix_key_int_index(side, index, expected):
    item = side.RadixKey([10, 20, 30])[index]
    assert isinstance(item, side.RadixKey)
    assert list(item.token_ids) == expected


def test_radix_key_slices(side):
    key = side.RadixKey([1, 2, 3, 4, 5], "extra")
    part = key[1:4]
    assert isinstance(part, side.RadixKey)
    assert list(part.token_ids) == [2, 3, 4] and part.extra_key == "extra"
    assert list(key[2:2].token_ids) == []
    assert list(key[:].token_ids) == [1, 2, 3, 4, 5]


def test_radix_key_index_out_of_range(side):
    with pytest.raises(IndexError):
        side.RadixKey([1, 2, 3])[10]


def test_radix_key_repr(side):
    text = repr(side.RadixKey([1, 2, 3], "test"))
    assert "RadixKey" in text and "extra_key='test'" in text and "[1, 2, 3]" in text
    assert "..." in repr(side.RadixKey(list(range(15))))


# ===== test_radix_cache_unit.py: RadixCache ===============================================


@pytest.mark.parametrize("page_size", [1, 4])
def test_cache_init(side, page_size):
    cache, _, _ = side.cache(page_size)
    assert cache.page_size == page_size
    assert cache.disable is False
    assert cache.device == torch.device("cpu")
    if side.is_sglang:
        assert cache.root_node is not None and len(cache.root_node.key) == 0
    else:  # documented: node handles are ints, the root is one sentinel
        assert cache.root_node == rs.ROOT_NODE and cache.is_root(cache.root_node)


def test_disabled_cache(side):
    alloc = side.allocator(16)
    fields = {
        "disable": True,
        "req_to_token_pool": None,
        "token_to_kv_pool_allocator": alloc,
        "page_size": 1,
    }
    if side.is_sglang:
        cache = side.sg.RadixCache(side.sg.loader.cache_init_params(**fields))
        assert cache.disable is True
        assert _insert(side, cache, [1, 2, 3], alloc.alloc(3)).prefix_len == 0
        assert cache.total_size() == 0
    else:  # documented: disable=True is not provided
        with pytest.raises(InvalidArgument, match="disable"):
            rs.RadixsegRadixCache.from_init_params(SimpleNamespace(**fields, eviction_policy="lru"))


def test_reset_empties_the_cache(side):
    cache, alloc, _ = side.cache()
    _insert(side, cache, [1, 2, 3], alloc.alloc(3))
    assert cache.total_size() > 0
    cache.reset()
    assert (cache.total_size(), cache.evictable_size(), cache.protected_size()) == (0, 0, 0)


def test_insert_and_match(side):
    cache, alloc, _ = side.cache()
    value = alloc.alloc(3)
    assert _insert(side, cache, [1, 2, 3], value).prefix_len == 0
    assert cache.total_size() == 3 and cache.evictable_size() == 3
    _, slots = _match(side, cache, [1, 2, 3])
    assert slots == value.tolist()
    _, slots = _match(side, cache, [1, 2])
    assert slots == value[:2].tolist()


def test_insert_without_value(side):
    """``value=None`` caches the token ids themselves as the slots."""
    cache, alloc, _ = side.cache()
    held = alloc.alloc(3).tolist()  # token ids that are slots this caller holds
    before = alloc.available_size()
    params = side.InsertParams(key=_key(side, held), value=None)
    if not side.is_sglang:  # documented: insert needs its slots
        with pytest.raises(InvalidArgument, match="value"):
            cache.insert(params)
        assert cache.total_size() == 0 and alloc.available_size() == before
        return
    result = cache.insert(params)
    assert result.prefix_len == 0
    assert cache.total_size() == 3
    assert _match(side, cache, held)[1] == held
    assert cache.evict(side.EvictParams(num_tokens=3)).num_tokens_evicted == 3
    assert alloc.available_size() == before + 3


def test_total_size(side):
    cache, alloc, _ = side.cache()
    assert cache.total_size() == 0
    _insert(side, cache, [1, 2, 3], alloc.alloc(3))
    assert cache.total_size() == 3
    _insert(side, cache, [4, 5], alloc.alloc(2))
    assert cache.total_size() == 5


def test_no_events_by_default(side):
    cache, alloc, _ = side.cache()
    _insert(side, cache, [1, 2, 3, 4, 5], alloc.alloc(5))
    assert len(cache.take_events()) == 0


def test_extra_key_isolation(side):
    cache, alloc, _ = side.cache()
    values = {k: alloc.alloc(3) for k in ("key1", "key2", None)}
    for k, v in values.items():
        _insert(side, cache, [1, 2, 3], v, extra_key=k)
    for k, v in values.items():
        m, slots = _match(side, cache, [1, 2, 3], extra_key=k)
        assert m.device_prefix_len == 3 and slots == v.tolist()
    assert _match(side, cache, [1, 2, 3], extra_key="nonexistent")[0].device_prefix_len == 0


def test_lock_moves_tokens_to_protected(side):
    cache, alloc, _ = side.cache()
    _insert(side, cache, [1, 2, 3], alloc.alloc(3))
    node = _match(side, cache, [1, 2, 3])[0].last_device_node
    evictable, protected = cache.evictable_size(), cache.protected_size()
    cache.inc_lock_ref(node)
    assert cache.protected_size() == protected + 3
    assert cache.evictable_size() == evictable - 3
    cache.dec_lock_ref(node)
    assert (cache.evictable_size(), cache.protected_size()) == (evictable, protected)


def test_evict_frees_slots(side):
    cache, alloc, _ = side.cache()
    _insert(side, cache, [1, 2], alloc.alloc(2))
    _insert(side, cache, [3, 4], alloc.alloc(2))
    total, available = cache.total_size(), alloc.available_size()
    result = cache.evict(side.EvictParams(num_tokens=2))
    assert isinstance(result, side.EvictResult)
    assert result.num_tokens_evicted >= 2
    assert alloc.available_size() == available + result.num_tokens_evicted  # freed to the allocator
    assert cache.total_size() < total


@pytest.mark.parametrize(("page_size", "length"), [(1, 5), (2, 5), (4, 6)])
def test_match_is_page_aligned(side, page_size, length):
    cache, alloc, _ = side.cache(page_size)
    tokens = list(range(length))
    slots = alloc.alloc(-(-length // page_size) * page_size)
    _insert(side, cache, tokens, slots[:length])
    m, _ = _match(side, cache, tokens)
    assert m.device_prefix_len > 0
    assert m.device_prefix_len % page_size == 0


def test_pretty_print(side, capsys):
    cache, alloc, _ = side.cache()
    _insert(side, cache, [1, 2, 3], alloc.alloc(3))
    cache.pretty_print()
    assert capsys.readouterr().out


def test_all_values_flatten(side):
    cache, alloc, _ = side.cache()
    a, b = alloc.alloc(2), alloc.alloc(2)
    _insert(side, cache, [1, 2], a)
    _insert(side, cache, [3, 4], b)
    values = cache.all_values_flatten()
    assert len(values) == 4
    assert set(values.tolist()) == set(a.tolist() + b.tolist())


@pytest.mark.parametrize("page_size", [1, 2])
def test_match_splits_nodes(side, page_size):
    cache, alloc, _ = side.cache(page_size)
    seq1 = [1, 2, 3, 4, 5, 6, 7, 8]
    val1 = alloc.alloc(8)
    _insert(side, cache, seq1, val1)
    seq2 = [1, 2, 9, 10]  # diverges after two tokens: an internal node on the path
    val2 = alloc.alloc(4)
    r = _insert(side, cache, seq2, val2)
    assert r.prefix_len == 2
    alloc.free(val2[:2])  # the engine frees its duplicates of the cached prefix
    assert cache.total_size() == 10
    # A match that ends inside a node splits it and changes no data.
    assert _match(side, cache, [1, 2, 3, 4, 999, 1000])[1] == val1[:4].tolist()
    assert cache.total_size() == 10
    assert _match(side, cache, seq1)[1] == val1.tolist()
    assert _match(side, cache, [1, 2, 3, 4, 5, 6, 777, 888])[1] == val1[:6].tolist()
    assert cache.total_size() == 10
    assert _match(side, cache, seq2)[1] == val1[:2].tolist() + val2[2:].tolist()


def test_available_and_evictable_str(side):
    cache, alloc, _ = side.cache()
    _insert(side, cache, [1, 2, 3], alloc.alloc(3))
    a, e = alloc.available_size(), cache.evictable_size()
    want = f"Available tokens: {a + e} (available_size={a} + evictable_size={e})\n"
    assert cache.available_and_evictable_str() == want


# ===== test_allocator_cpu.py ===============================================================


def test_get_kvcache(side):
    store = object()
    a = side.allocator(8, kvcache=store)
    if side.is_sglang:
        assert a.get_kvcache() is store
    else:  # documented: the KVPool holds the bytes
        assert a.get_kvcache() is a.pool


def test_extend_and_decode_at_page_size_one(side):
    a = side.allocator(8)
    pre, seq, last = _t([0]), _t([2]), _t([-1])
    if side.is_sglang:  # SGLang's page-size-1 allocator has neither
        with pytest.raises(NotImplementedError):
            a.alloc_extend(pre, pre, seq, seq, last, 2)
        with pytest.raises(NotImplementedError):
            a.alloc_decode(seq, seq, last)
        return
    # Documented: one class for every page size.
    out = a.alloc_extend(pre, pre, seq, seq, last, 2)
    assert out is not None and len(out) == 2 and a.available_size() == 6
    nxt = a.alloc_decode(_t([3]), _t([3]), out[1:])
    assert nxt is not None and len(nxt) == 1 and a.available_size() == 5


@pytest.mark.parametrize(
    ("size", "page_size", "n", "left"), [(16, 1, 4, 12), (64, 4, 8, 56)], ids=["token", "paged"]
)
def test_alloc_count_and_available(side, size, page_size, n, left):
    a = side.allocator(size, page_size)
    assert len(a.alloc(n)) == n
    assert a.available_size() == left


@pytest.mark.parametrize(
    ("size", "page_size", "n"), [(16, 1, 8), (64, 4, 16)], ids=["token", "paged"]
)
def test_alloc_unique(side, size, page_size, n):
    out = side.allocator(size, page_size).alloc(n)
    assert len(torch.unique(out)) == n


def test_paged_alloc_page_aligned(side):
    out = side.allocator(64, 4).alloc(8)
    assert int(out[0]) % 4 == 0 and int(out[4]) % 4 == 0


def test_exact_capacity(side):
    a = side.allocator(8)
    assert a.alloc(8) is not None
    assert a.available_size() == 0


@pytest.mark.parametrize(
    ("size", "page_size", "n", "need_sort"),
    [(8, 1, 9, False), (4, 1, 8, True), (16, 4, 20, False), (16, 4, 32, True)],
    ids=["token", "token-need-sort", "paged-unaligned", "paged-need-sort"],
)
def test_over_capacity_returns_none(side, size, page_size, n, need_sort):
    a = side.allocator(size, page_size, need_sort=need_sort)
    if n % page_size and not side.is_sglang:  # documented: unaligned paged alloc raises
        with pytest.raises(InvalidArgument, match="whole number of pages"):
            a.alloc(n)
    else:
        assert a.alloc(n) is None
    assert a.available_size() == size


def test_zero_alloc(side):
    a = side.allocator(8)
    assert len(a.alloc(0)) == 0
    assert a.available_size() == 8


def test_sequential_allocs_disjoint(side):
    a = side.allocator(16)
    first, second = set(a.alloc(4).tolist()), set(a.alloc(4).tolist())
    assert not first & second


@pytest.mark.parametrize(("size", "page_size"), [(16, 1), (64, 4)], ids=["token", "paged"])
def test_slot_zero_never_returned(side, size, page_size):
    assert 0 not in side.allocator(size, page_size).alloc(size).tolist()


@pytest.mark.parametrize(
    ("size", "page_size", "n", "need_sort"),
    [(16, 1, 4, False), (32, 4, 8, False), (32, 4, 4, True)],
    ids=["token", "paged", "paged-need-sort"],
)
def test_free_restores_available(side, size, page_size, n, need_sort):
    a = side.allocator(size, page_size, need_sort=need_sort)
    a.free(a.alloc(n))
    assert a.available_size() == size


@pytest.mark.parametrize(("size", "page_size"), [(8, 1), (16, 4)], ids=["token", "paged"])
def test_free_empty_is_noop(side, size, page_size):
    a = side.allocator(size, page_size)
    before = a.available_size()
    a.free(torch.tensor([], dtype=torch.int64))
    assert a.available_size() == before


@pytest.mark.parametrize(
    ("size", "page_size", "n", "need_sort"),
    [(8, 1, 8, False), (16, 4, 16, False), (8, 1, 4, True)],
    ids=["token", "paged", "token-need-sort"],
)
def test_freed_slots_reusable(side, size, page_size, n, need_sort):
    a = side.allocator(size, page_size, need_sort=need_sort)
    a.free(a.alloc(n))
    assert a.alloc(size) is not None


def test_free_returns_slots_to_free_list(side):
    a = side.allocator(8)
    a.free(a.alloc(4))
    assert len(a.get_all_free_pages()) == 8


@pytest.mark.parametrize(
    ("size", "page_size", "n"), [(16, 1, 4), (32, 4, 4)], ids=["token", "paged"]
)
def test_free_group_defers_frees(side, size, page_size, n):
    a = side.allocator(size, page_size)
    x, y = a.alloc(n), a.alloc(n)
    a.free_group_begin()
    a.free(x)
    a.free(y)
    assert a.available_size() == size - 2 * n
    a.free_group_end()
    assert a.available_size() == size


def test_empty_free_group(side):
    a = side.allocator(8)
    a.alloc(4)
    a.free_group_begin()
    a.free_group_end()
    assert a.available_size() == 4


def test_clear_restores_capacity(side):
    a = side.allocator(32, 4)
    a.alloc(32)
    a.clear()
    assert a.available_size() == 32


# TestAllocExtendNaive, through alloc_extend. Each case is (prefix_lens, seq_lens,
# layout): per request, what its new slots are, in order: ("cont", n) continues
# its last page after last_loc; ("page", n) is the first n slots of a new page.
_EXTEND_CASES = {
    "num1_only": ([2], [4], [[("cont", 2)]]),
    "num2_only": ([0], [8], [[("page", 4), ("page", 4)]]),
    "num3_only": ([4], [7], [[("page", 3)]]),
    "num1_and_num2": ([2], [8], [[("cont", 2), ("page", 4)]]),
    "num1_and_num3": ([2], [7], [[("cont", 2), ("page", 3)]]),
    "num2_and_num3": ([4], [11], [[("page", 4), ("page", 3)]]),
    "num1_and_num2_and_num3": ([2], [11], [[("cont", 2), ("page", 4), ("page", 3)]]),
    "zero_extend": ([4], [4], [[]]),
    "multi_req_no_overlap": ([0, 0], [4, 4], [[("page", 4)], [("page", 4)]]),
    "output_length_equals_extend_sum": (
        [0, 2, 4],
        [4, 6, 8],
        [[("page", 4)], [("cont", 2), ("page", 2)], [("page", 4)]],
    ),
}


@pytest.mark.parametrize("case", list(_EXTEND_CASES))
def test_alloc_extend_fill_rule(side, case):
    ps = 4
    prefix, seq, layout = _EXTEND_CASES[case]
    a = side.allocator(64, ps)
    held: set[int] = set()
    last = []
    for p in prefix:  # each request holds its prefix in pages of its own
        if p == 0:
            last.append(-1)
            continue
        slots = a.alloc(-(-p // ps) * ps)
        held |= {int(s) // ps for s in slots}
        last.append(int(slots[p - 1]))
    available = a.available_size()
    pre, sl = _t(prefix), _t(seq)
    n = int((sl - pre).sum())
    out = a.alloc_extend(pre, pre, sl, sl, _t(last), n)
    assert out is not None and len(out) == n
    assert len(torch.unique(out)) == n
    new_pages: list[int] = []
    got = out.tolist()
    for req_last, parts in zip(last, layout, strict=True):
        for kind, k in parts:
            chunk, got = got[:k], got[k:]
            if kind == "cont":
                assert chunk == list(range(req_last + 1, req_last + 1 + k))
            else:
                page = chunk[0] // ps
                assert chunk == [page * ps + i for i in range(k)]
                assert page != 0 and page not in held and page not in new_pages
                new_pages.append(page)
    assert got == []
    assert a.available_size() == available - len(new_pages) * ps


def test_debug_alloc_alignment(side, monkeypatch):
    monkeypatch.setenv("SGLANG_DEBUG_MEMORY_POOL", "1")
    a = side.allocator(64, 4)
    # SGLang checks alignment in debug mode; the adapter always (documented).
    with pytest.raises(AssertionError if side.is_sglang else InvalidArgument):
        a.alloc(3)
    assert a.alloc(4) is not None


def test_debug_double_free(side, monkeypatch):
    monkeypatch.setenv("SGLANG_DEBUG_MEMORY_POOL", "1")
    a = side.allocator(64, 4)
    out = a.alloc(4)
    a.free(out)
    # SGLang detects it in debug mode; the adapter always (documented).
    with pytest.raises(AssertionError if side.is_sglang else DoubleFree):
        a.free(out)


# ===== test_allocator_lazy_free.py =========================================================


def test_frees_are_reusable_at_once(side):
    a = side.allocator(10)
    slots = a.alloc(5)
    a.free(slots)
    again = a.alloc(5)
    assert again is not None and len(again) == 5
    b = side.allocator(20)
    x, y = b.alloc(5), b.alloc(5)
    b.free(x)
    b.free(y)
    out = b.alloc(10)
    assert out is not None and len(out) == 10


def test_recovered_slots_are_pool_slots(side):
    a = side.allocator(10)
    first = a.alloc(3).tolist()
    a.alloc(3)
    a.free(_t(first))
    recovered = a.alloc(3)
    assert recovered is not None and len(recovered) == 3
    assert all(1 <= v <= 10 for v in recovered.tolist())


def test_available_counts_freed_slots(side):
    a = side.allocator(10)
    initial = a.available_size()
    slots = a.alloc(4)
    assert a.available_size() == initial - 4
    a.free(slots)
    assert a.available_size() == initial
    a.alloc(1)
    assert a.available_size() == 10 - 1


def test_clear_after_free(side):
    a = side.allocator(10)
    a.free(a.alloc(3))
    a.clear()
    assert a.available_size() == 10


def test_alloc_none_when_drained(side):
    a = side.allocator(4)
    a.alloc(4)
    assert a.alloc(1) is None


def test_free_all_counts_once(side):
    a = side.allocator(10)
    a.free(a.alloc(10))
    assert a.available_size() == 10


def test_free_group_after_plain_free(side):
    a = side.allocator(20)
    x = a.alloc(5)
    y = a.alloc(5)
    a.free(y)
    a.free_group_begin()
    a.free(x)
    a.free_group_end()
    out = a.alloc(10)
    assert out is not None and len(out) == 10


# ===== test_allocator_page_aligned_free.py ================================================


def test_page_freed_twice_in_one_group(side):
    a = side.allocator(16, 4)
    slots = a.alloc(4)
    a.free_group_begin()
    a.free(slots)
    a.free(slots)
    if side.is_sglang:  # 0.5.23 merges the group's frees and frees the page once
        a.free_group_end()
        assert a.available_size() == 16
        assert sorted(a.get_all_free_pages().tolist()) == [1, 2, 3, 4]
    else:  # documented: a page freed twice across calls is a double free; nothing is freed
        with pytest.raises(DoubleFree):
            a.free_group_end()
        assert a.free_group is None and a.available_size() == 12
        assert sorted(a.get_all_free_pages().tolist()) == [2, 3, 4]


def test_token_free_group_and_duplicates(side):
    a = side.allocator(4)
    slots = a.alloc(2)
    a.free_group_begin()
    a.free(slots[:1])
    a.free_group_end()
    assert a.available_size() == 3
    assert sorted(a.get_all_free_pages().tolist()) == [1, 3, 4]
    a.free(slots[1:].repeat(2))  # one slot listed twice in one call
    if side.is_sglang:  # 0.5.23's token allocator appends it twice
        assert a.available_size() == 5
    else:  # documented: one free call frees a page once; a second call is a double free
        assert a.available_size() == 4
        with pytest.raises(DoubleFree):
            a.free(slots[1:])
        assert a.available_size() == 4


# ===== test_decode_radix_lock_ref.py =======================================================


class _Kv:
    """SGLang 0.5.23's ``ReqKvInfo``: the fields its RadixCache and release_kv_cache read."""

    def __init__(self, row: int, protected: int, committed: int) -> None:
        self.req_pool_idx: int | None = row
        self.cache_protected_len = protected
        self.cache_inserted_len = 0
        self.kv_committed_len = committed
        self.kv_allocated_len = committed
        self.swa_evict_floor = 0
        self.mamba_pool_idx = None
        self.component_evicted_seqlens: dict[Any, int] = {}

    @property
    def holds_kv(self) -> bool:
        return self.req_pool_idx is not None

    @property
    def holds_mamba(self) -> bool:
        return False

    @property
    def is_kv_released(self) -> bool:
        return self.kv_allocated_len == 0

    def get_evicted_seqlen(self, component: Any) -> int:
        return self.component_evicted_seqlens.get(component, 0)

    def swa_dead_lo(self, page_size: int) -> int:
        return self.cache_protected_len

    def mark_kv_released(self) -> None:
        self.kv_allocated_len = 0


class _Req:
    """SGLang 0.5.23's ``Req``, reduced to what checkpoint and release read.

    As in SGLang's test, the last token is the one output token and every
    token's KV is committed."""

    def __init__(self, fill: list[int], row: int, protected: int) -> None:
        self.rid = "req"
        self.origin_input_ids = array("q", fill[:-1] if len(fill) > 1 else fill)
        self.output_ids = array("q", fill[-1:] if len(fill) > 1 else [])
        self.full_untruncated_fill_ids = array("q", fill)
        self.extend_end = len(fill)
        self.prefix_len = protected
        self.kv = _Kv(row, protected, len(fill))
        self.lock: Any = None
        self.last_node: Any = None
        self.extra_key = None
        self.cache_salt = None
        self.priority = 0
        self.skip_radix_cache_insert = False
        self.finished_len = None

    def finished(self) -> bool:
        return False

    def refresh_fill_ids(self) -> None:
        self.full_untruncated_fill_ids = self.origin_input_ids + self.output_ids

    def owned_kv_len(self) -> int:
        return self.kv.kv_committed_len


class _FlatReq:
    """The request of SGLang's test: KV fields on the request itself, the
    caller's ``inc_lock_ref`` on ``last_node``, no lock object."""

    def __init__(self, fill: list[int], row: int, protected: int) -> None:
        self.fill_ids = list(fill)
        self.origin_input_ids = list(fill[:-1]) if len(fill) > 1 else list(fill)
        self.output_ids = [fill[-1]] if len(fill) > 1 else []
        self.req_pool_idx: int | None = row
        self.cache_protected_len = protected
        self.last_node: Any = None
        self.extra_key = None
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.priority = 0
        self.kv_committed_len = len(fill)
        self.kv_allocated_len = len(fill)
        self.kv_committed_freed = False

    def pop_committed_kv_cache(self) -> int:
        self.kv_committed_freed = True
        return self.kv_committed_len


@dataclass
class _Decode:
    """One side of the decode lock tests, with one request shape."""

    side: Side
    shape: str
    cache: Any
    alloc: Any
    table: rs.ReqToTokenTable
    capacity: int = 64

    def populate(self, tokens: list[int]) -> None:
        _insert(self.side, self.cache, tokens, self.alloc.alloc(len(tokens)))

    def start(self, fill: list[int], node: Any, prefix: int) -> Any:
        """A request holding ``node``'s ``prefix`` slots plus new ones, locked on ``node``."""
        (row,) = self.table.alloc_rows(1)
        path = self.cache.path_device_indices(node)[:prefix].to(torch.int64)
        slots = torch.cat([path, self.alloc.alloc(len(fill) - prefix)])
        self.table.req_to_token[row, : len(fill)] = slots.to(torch.int32)
        if self.shape == "flat":
            req = _FlatReq(fill, row, prefix)
            self.cache.inc_lock_ref(node)
        else:
            req = _Req(fill, row, prefix)
            req.lock = self.cache.lock(node)
        req.last_node = node
        return req

    def cache_unfinished(self, req: Any) -> None:
        if self.side.is_sglang:
            self.side.sg.common.checkpoint_kv_cache(req, self.cache)
        else:
            self.cache.cache_unfinished_req(req)

    def cache_finished(self, req: Any, is_insert: bool = True) -> None:
        if self.side.is_sglang:
            self.side.sg.common.release_kv_cache(req, self.cache, checkpoint=is_insert)
        else:
            self.cache.cache_finished_req(req, is_insert=is_insert)

    def root_unlocked(self) -> bool:
        """The root holds its own lock only (SGLang: lock_ref 1; the adapter's
        root is a sentinel that locks never touch, as documented)."""
        if self.side.is_sglang:
            return bool(self.cache.root_node.lock_ref == 1)
        return bool(self.cache.root_node == rs.ROOT_NODE)

    def no_leak(self) -> None:
        """Every slot is free or cached, and every row is free."""
        free, cached = self.alloc.available_size(), self.cache.total_size()
        assert free + cached == self.capacity, f"{free} free + {cached} cached: slots leaked"
        assert self.table.available_size() == self.table.size, "a request row was not freed"


_DECODE = [("sglang", "0.5.23"), ("radixseg", "0.5.23"), ("radixseg", "flat")]


@pytest.fixture(params=_DECODE, ids=["-".join(p) for p in _DECODE])
def decode(request: pytest.FixtureRequest) -> _Decode:
    name, shape = request.param
    side = _make_side(request, name)
    cache, alloc, table = side.cache(1, 64)
    return _Decode(side, shape, cache, alloc, table)


def test_decode_incremental_transfer_success(decode):
    d = decode
    d.populate([1, 2, 3])
    m, _ = _match(d.side, d.cache, [1, 2, 3])
    assert m.device_prefix_len == 3
    req = d.start([1, 2, 3, 4, 5], m.last_device_node, 3)
    assert _lock_count(d.side, d.cache, m.last_device_node) > 0
    d.cache_unfinished(req)
    d.cache_finished(req)
    assert d.root_unlocked()
    assert d.cache.protected_size() == 0
    assert d.cache.evictable_size() == 5
    d.no_leak()


def test_decode_full_transfer_success(decode):
    d = decode
    m, _ = _match(d.side, d.cache, [10, 20, 30])
    assert m.device_prefix_len == 0
    req = d.start([10, 20, 30], m.last_device_node, 0)  # locking the root changes nothing
    assert d.root_unlocked()
    d.cache_unfinished(req)
    d.cache_finished(req)
    assert d.root_unlocked()
    assert d.cache.protected_size() == 0
    assert d.cache.evictable_size() == 3
    d.no_leak()


def test_decode_incremental_transfer_failure(decode):
    d = decode
    d.populate([1, 2, 3])
    m, _ = _match(d.side, d.cache, [1, 2, 3])
    req = d.start([1, 2, 3, 4, 5], m.last_device_node, m.device_prefix_len)
    assert d.cache.protected_size() > 0
    d.cache_finished(req, is_insert=False)  # the transfer failed: nothing is inserted
    assert d.root_unlocked()
    assert d.cache.protected_size() == 0
    assert d.cache.evictable_size() == 3  # the prefix stays cached
    d.no_leak()


def test_decode_full_transfer_failure(decode):
    d = decode
    m, _ = _match(d.side, d.cache, [10, 20, 30])
    if d.side.is_sglang:
        assert m.last_device_node is d.cache.root_node
    else:
        assert m.last_device_node == rs.ROOT_NODE
    req = d.start([10, 20, 30], m.last_device_node, 0)
    assert d.root_unlocked()
    d.cache_finished(req, is_insert=False)
    assert d.root_unlocked()
    assert d.cache.protected_size() == 0
    assert d.cache.evictable_size() == 0
    d.no_leak()


def test_decode_repeated_incremental_no_leak(decode):
    d = decode
    d.populate([1, 2, 3])
    for i in range(5):
        m, _ = _match(d.side, d.cache, [1, 2, 3])
        req = d.start([1, 2, 3, 40 + i], m.last_device_node, m.device_prefix_len)
        d.cache_unfinished(req)
        d.cache_finished(req)
    assert d.root_unlocked()
    assert d.cache.protected_size() == 0
    assert d.cache.total_size() == 3 + 5
    d.no_leak()
