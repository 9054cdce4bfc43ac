"""The allocator under real threads from Python (the GIL is released for batches)."""

from __future__ import annotations

import threading

import numpy as np

from radixseg import OutOfPages, SegmentAllocator

THREADS = 4


def test_four_threads_never_share_a_page_and_end_all_free():
    a = SegmentAllocator(page_size=16, pages_per_segment=512)
    for _ in range(4):
        a.add_segment()
    owner = np.full(a.total_pages(), -1, dtype=np.int64)
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(tid: int) -> None:
        rng = np.random.default_rng(tid)
        held: list = []
        try:
            start.wait()
            for _ in range(400):
                if held and (len(held) > 6 or rng.random() < 0.45):
                    ids = held.pop(int(rng.integers(len(held))))
                    idx = ids.numpy()
                    assert (owner[idx] == tid).all(), "page changed owner while held"
                    owner[idx] = -1
                    a.release(ids)
                else:
                    try:
                        ids = a.alloc(int(rng.integers(32, 160)))
                    except OutOfPages:
                        continue
                    idx = ids.numpy()
                    assert (owner[idx] == -1).all(), "page handed out twice"
                    owner[idx] = tid
                    if rng.random() < 0.2:
                        a.retain(ids)
                        a.release(ids)
                    held.append(ids)
            for ids in held:
                owner[ids.numpy()] = -1
                a.release(ids)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert a.free_pages() == a.total_pages() == 2048
    assert (owner == -1).all()
    a.check_invariants()
    for seg in a.segments():
        a.retire_segment(seg)
    assert a.segments() == []
