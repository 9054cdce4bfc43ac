"""The allocator from Python: the contract of shared/API.md and issue 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import radixseg
from radixseg import (
    DoubleFree,
    InvalidArgument,
    InvalidHandle,
    OutOfPages,
    RadixsegError,
    SegmentAllocator,
    SegmentBusy,
)


def test_quickstart_from_the_issue():
    a = SegmentAllocator(page_size=16, pages_per_segment=1024)
    assert a.add_segment() == 0
    ids = a.alloc(10)
    assert ids.dtype == torch.int32 and ids.device.type == "cpu"
    assert ids.shape == (10,)
    assert len(set(ids.tolist())) == 10
    assert a.free_pages() == 1014
    assert a.total_pages() == 1024
    a.check_invariants()


def test_out_of_pages_names_both_numbers_and_changes_nothing():
    a = SegmentAllocator(page_size=16, pages_per_segment=1024)
    a.add_segment()
    held = a.alloc(24)
    with pytest.raises(OutOfPages) as e:
        a.alloc(2000)
    assert "2000" in str(e.value) and "1000" in str(e.value)
    assert e.value.requested == 2000 and e.value.available == 1000
    assert a.free_pages() == 1000
    assert a.refcount(held).tolist() == [1] * 24
    a.check_invariants()


def test_ids_survive_growth_and_retirement():
    a = SegmentAllocator(page_size=16, pages_per_segment=8)
    s0 = a.add_segment()
    first = a.alloc(8)
    a.retain(first[:3])
    s1 = a.add_segment()
    second = a.alloc(8)
    assert set(first.tolist()).isdisjoint(second.tolist())
    s2 = a.add_segment()
    a.retire_segment(s2)
    a.release(second)
    a.retire_segment(s1)
    # ids allocated before the add/retire calls are unchanged and still refcounted
    assert a.refcount(first).tolist() == [2, 2, 2, 1, 1, 1, 1, 1]
    assert a.segments() == [s0]
    # a retired segment's ids are invalid until the id is reused
    with pytest.raises(InvalidHandle):
        a.refcount(second)
    assert a.add_segment() == s1
    assert a.refcount(second).tolist() == [0] * 8
    a.check_invariants()


def test_array_likes_are_accepted():
    a = SegmentAllocator(page_size=1, pages_per_segment=64)
    a.add_segment()
    ids = a.alloc(4)
    a.retain(ids.tolist())
    a.retain(ids.numpy().astype(np.int64))
    a.retain(ids.to(torch.int16))
    a.retain(int(ids[0]))
    assert a.refcount(ids).tolist() == [5, 4, 4, 4]
    a.release(np.array([int(i) for i in ids.tolist()] * 3))
    a.release(ids[1:])
    a.release([int(ids[0])] * 2)
    assert a.refcount(ids).tolist() == [0, 0, 0, 0]
    a.check_invariants()


def test_release_of_free_page_is_double_free_and_atomic():
    a = SegmentAllocator(page_size=16, pages_per_segment=16)
    a.add_segment()
    ids = a.alloc(3)
    with pytest.raises(DoubleFree):
        a.release([int(ids[0]), int(ids[0])])
    assert a.refcount(ids).tolist() == [1, 1, 1]
    a.release(ids[:1])
    with pytest.raises(DoubleFree) as e:
        a.release(ids)
    assert e.value.page_id == int(ids[0])
    assert a.refcount(ids).tolist() == [0, 1, 1]
    assert isinstance(e.value, InvalidHandle) and isinstance(e.value, RadixsegError)
    a.check_invariants()


@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        ([-1], InvalidHandle),
        ([2**31], InvalidHandle),
        ([2**40], InvalidHandle),
        ([2**70], InvalidArgument),
        ([1.5], TypeError),
        (["x"], TypeError),
        (torch.tensor([0.0]), TypeError),
    ],
)
def test_bad_ids_raise_typed_errors(bad, exc):
    a = SegmentAllocator(page_size=16, pages_per_segment=16)
    a.add_segment()
    held = a.alloc(2)
    for fn in (a.retain, a.release, a.refcount):
        with pytest.raises(exc):
            fn(bad)
    assert a.refcount(held).tolist() == [1, 1]
    a.check_invariants()


@pytest.mark.parametrize(
    ("page_size", "pps"), [(0, 4), (1025, 4), (2048, 4), (-16, 4), (16, 0), (16, 2**21), (16, -1)]
)
def test_bad_config(page_size, pps):
    with pytest.raises(InvalidArgument) as e:
        SegmentAllocator(page_size=page_size, pages_per_segment=pps)
    assert str(page_size if page_size in (0, 1025, 2048) else pps) in str(e.value) or "-" in str(
        e.value
    )


def test_bad_counts_and_segments():
    a = SegmentAllocator(page_size=4, pages_per_segment=4, max_segments=2)
    with pytest.raises(InvalidArgument):
        a.alloc(-1)
    with pytest.raises(TypeError):
        a.alloc(1.0)
    with pytest.raises(TypeError):
        a.alloc(True)
    assert a.alloc(0).shape == (0,)
    a.add_segment()
    a.add_segment()
    with pytest.raises(OutOfPages) as e:
        a.add_segment()
    assert "2" in str(e.value)
    for seg in (-1, 2, 2**40):
        with pytest.raises(InvalidArgument):
            a.retire_segment(seg)
    ids = a.alloc(1)
    with pytest.raises(SegmentBusy) as busy:
        a.retire_segment(0)
    assert busy.value.used_pages == 1 and busy.value.segment == 0
    a.release(ids)
    a.retire_segment(0)
    with pytest.raises(InvalidArgument):
        a.retire_segment(0)
    a.check_invariants()


def test_cuda_ids_are_refused_with_a_message():
    a = SegmentAllocator(page_size=16, pages_per_segment=16)
    a.add_segment()
    meta = torch.empty(2, dtype=torch.int32, device="meta")
    with pytest.raises(InvalidArgument, match="device meta"):
        a.release(meta)


def test_lowest_segment_first_lets_high_segments_drain():
    a = SegmentAllocator(page_size=1, pages_per_segment=32)
    for _ in range(4):
        a.add_segment()
    held = [a.alloc(8) for _ in range(16)]  # all 4 segments full
    rng = np.random.default_rng(0)
    freed = set(rng.permutation(16)[:8].tolist())  # a random half: 50 % over all segments
    for i in freed:
        a.release(held[i])
    live = [h for k, h in enumerate(held) if k not in freed]
    for _ in range(400):  # churn at 50 % occupancy
        i = int(rng.integers(len(live)))
        a.release(live[i])
        live[i] = a.alloc(8)
    usage = dict(a.segment_usage())
    # every new allocation went to the lowest free pages: the low half is full,
    # the high half has drained and could be retired
    assert usage[0] == usage[1] == 32
    assert usage[2] + usage[3] == 0
    a.check_invariants()


def test_stats_and_repr():
    a = SegmentAllocator(page_size=16, pages_per_segment=64)
    a.add_segment()
    a.alloc(5)
    s = a.stats()
    assert s["used_pages"] == 5 and s["free_pages"] == 59 and s["segments"] == 1
    assert s["metadata_bytes"] > 0
    assert "free_pages=59" in repr(a)
    assert radixseg.__version__


def test_a_segment_added_in_two_phases():
    """reserve_segment hands out an id, closed; open_segment makes its pages
    allocatable; cancel_segment gives the id back (issue 17, point 7)."""
    a = SegmentAllocator(page_size=1, pages_per_segment=4, max_segments=2)
    sid = a.reserve_segment()
    assert (sid, a.reserved_segments(), a.segments()) == (0, [0], [])
    assert (a.total_pages(), a.free_pages(), a.is_live(sid)) == (0, 0, False)
    with pytest.raises(OutOfPages):
        a.alloc(1)
    assert a.add_segment() == 1  # the reserved id is taken
    with pytest.raises(OutOfPages) as e:
        a.reserve_segment()  # and counts against max_segments
    assert e.value.limit == 2
    a.open_segment(np.int64(sid))
    assert a.segments() == [0, 1] and a.alloc(5).tolist() == [0, 1, 2, 3, 4]
    for bad in (0, 1, 7):
        with pytest.raises(InvalidArgument, match="not reserved") as err:
            a.open_segment(bad)
        assert err.value.segment == bad
        with pytest.raises(InvalidArgument, match="not reserved"):
            a.cancel_segment(bad)
    with pytest.raises(TypeError):
        a.open_segment("0")
    a.release(range(5))
    a.retire_segment(1)
    sid = a.reserve_segment()  # the retired id, reused
    assert sid == 1
    a.cancel_segment(sid)
    assert a.reserved_segments() == [] and a.segments() == [0]
    a.check_invariants()
