//! `RadixTree::acquire` / `finish`: the fused request lifecycle the Python
//! `PrefixCache` uses. Checks page references, locks and all-or-nothing
//! failures, with both invariant checkers after every call.

#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

use radixseg_core::{Arc, CoreError, RadixTree, SegmentAllocator};

fn setup(page_size: u32) -> (Arc<SegmentAllocator>, RadixTree) {
    let a = Arc::new(SegmentAllocator::new(page_size, 16).unwrap());
    a.add_segment().unwrap();
    let t = RadixTree::new(Arc::clone(&a));
    (a, t)
}

fn ids(v: &[u32]) -> Vec<i64> {
    v.iter().map(|&p| i64::from(p)).collect()
}

fn check(a: &SegmentAllocator, t: &RadixTree) {
    a.check_invariants().unwrap();
    t.check_invariants().unwrap();
}

#[test]
fn acquire_then_finish_caches_whole_pages_and_releases_the_rest() {
    let (a, mut t) = setup(2);
    let tokens: Vec<i64> = vec![1, 2, 3, 4, 5];
    let m = t.acquire(&tokens, 0).unwrap();
    assert_eq!(m.length, 0);
    let pages = a.alloc(3).unwrap(); // 5 tokens: 2 whole pages and a tail
    let cached = t
        .finish(&tokens, &ids(&pages), 0, Some(m.node), true, 0)
        .unwrap();
    assert_eq!(cached, 0);
    assert_eq!(t.cached_pages(), 2);
    assert_eq!(a.refcount(&ids(&pages)).unwrap(), vec![1, 1, 0]);
    check(&a, &t);

    // A second request reuses both pages under its lock, without references.
    let m = t.acquire(&tokens, 0).unwrap();
    assert_eq!((m.length, m.page_ids.clone()), (4, pages[..2].to_vec()));
    assert_eq!(a.refcount(&ids(&pages[..2])).unwrap(), vec![1, 1]);
    assert_eq!((t.locked_pages(), t.evict(16).unwrap()), (2, 0));
    let mut mine = m.page_ids.clone();
    mine.extend(a.alloc(1).unwrap());
    let cached = t
        .finish(&tokens, &ids(&mine), 0, Some(m.node), true, 2)
        .unwrap();
    assert_eq!(cached, 4);
    assert_eq!(t.locked_pages(), 0);
    assert_eq!(a.refcount(&ids(&pages[..2])).unwrap(), vec![1, 1]);
    assert_eq!(a.free_pages(), 14);
    check(&a, &t);
}

#[test]
fn abort_caches_nothing() {
    let (a, mut t) = setup(1);
    let tokens: Vec<i64> = vec![7, 8];
    let m = t.acquire(&tokens, 3).unwrap();
    let pages = a.alloc(2).unwrap();
    assert_eq!(
        t.finish(&tokens, &ids(&pages), 3, Some(m.node), false, 0)
            .unwrap(),
        0
    );
    assert_eq!((t.cached_pages(), a.free_pages()), (0, 16));
    check(&a, &t);
}

#[test]
fn failed_finish_changes_nothing() {
    let (a, mut t) = setup(1);
    let tokens: Vec<i64> = vec![1, 2, 3];
    let m = t.acquire(&tokens, 0).unwrap();
    let pages = a.alloc(3).unwrap();
    let free = a.alloc(1).unwrap();
    a.release(&ids(&free)).unwrap();

    // A freed page in the list: DoubleFree, and the lock is still held.
    let mut bad = ids(&pages);
    bad[2] = i64::from(free[0]);
    let e = t
        .finish(&tokens, &bad, 0, Some(m.node), true, 0)
        .unwrap_err();
    assert!(matches!(e, CoreError::DoubleFree { .. }), "{e}");
    // Wrong page count.
    let e = t
        .finish(&tokens, &ids(&pages[..2]), 0, Some(m.node), true, 0)
        .unwrap_err();
    assert!(matches!(e, CoreError::LengthMismatch { .. }), "{e}");
    // A bad token.
    let bad_tokens: Vec<i64> = vec![1, -2, 3];
    let e = t
        .finish(&bad_tokens, &ids(&pages), 0, Some(m.node), true, 0)
        .unwrap_err();
    assert!(matches!(e, CoreError::InvalidToken { .. }), "{e}");
    // A bad token in the partial last page, or with nothing cached, too.
    for (toks, cache) in [(vec![1i64, 2, 1 << 31], true), (vec![1, -1, 3], false)] {
        let e = t
            .finish(&toks, &ids(&pages), 0, Some(m.node), cache, 0)
            .unwrap_err();
        assert!(matches!(e, CoreError::InvalidToken { .. }), "{e}");
    }
    assert_eq!(t.lock_count(m.node).unwrap(), 1);
    assert_eq!((t.cached_pages(), a.free_pages()), (0, 13));
    check(&a, &t);

    // owned_from past the page count.
    let e = t
        .finish(&tokens, &ids(&pages), 0, Some(m.node), true, 4)
        .unwrap_err();
    assert!(matches!(e, CoreError::LengthMismatch { .. }), "{e}");
    t.finish(&tokens, &ids(&pages), 0, Some(m.node), true, 0)
        .unwrap();
    // Unlocking twice is refused, and nothing is released twice.
    let e = t
        .finish(&tokens, &ids(&pages), 0, Some(m.node), false, 0)
        .unwrap_err();
    assert!(matches!(e, CoreError::UnbalancedUnlock { .. }), "{e}");
    assert_eq!(t.cached_pages(), 3);
    check(&a, &t);
}
