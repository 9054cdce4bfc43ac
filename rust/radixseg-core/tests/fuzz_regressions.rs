#![cfg(not(loom))]
//! Minimised reproductions of what the fuzz targets under `fuzz/` found (see
//! RELIABILITY.md). Each test names the target and what went wrong.

use radixseg_core::{CoreError, Result, SegmentAllocator};

/// fuzz target `allocator`, first minute of the first run: `alloc(n)`
/// reserved room for `n` ids (`Vec::with_capacity(n)`) before comparing `n`
/// with the free pages, so a huge count (reachable from Python as
/// `SegmentAllocator.alloc(2**40)`) aborted the process with "memory
/// allocation of 4398046511104 bytes failed", or panicked with "capacity
/// overflow" for counts past `isize::MAX / 4`. It must be an ordinary
/// `OutOfPages` that changes nothing.
#[test]
fn alloc_of_a_huge_count_is_out_of_pages() -> Result<()> {
    let a = SegmentAllocator::new(64, 4)?.with_max_segments(4)?;
    for _ in 0..3 {
        a.add_segment()?;
    }
    let held = a.alloc(2)?;
    for n in [usize::MAX >> 24, usize::MAX / 4, usize::MAX / 2, usize::MAX] {
        assert_eq!(
            a.alloc(n),
            Err(CoreError::OutOfPages {
                requested: n as u64,
                available: 10,
                total: 12,
                segments: 3,
            })
        );
        let mut out = vec![7];
        assert!(a.alloc_into(n, &mut out).is_err());
        assert_eq!(out, vec![7]);
    }
    assert_eq!(a.free_pages(), 10);
    a.check_invariants()?;
    let ids: Vec<i64> = held.iter().map(|&p| i64::from(p)).collect();
    a.release(&ids)?;
    assert_eq!(a.free_pages(), 12);
    a.check_invariants()
}
