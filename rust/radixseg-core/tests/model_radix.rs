//! Model-based test of the radix tree, interleaved with allocator growth
//! (add / retire segments): proptest generates weighted sequences of the tree
//! model's `Action` (the oracle the fuzz target `tree` uses too,
//! `rust/radixseg-model/src/tree.rs`).
//!
//! The oracle is a map `(namespace, page-aligned prefix) -> page id`: every
//! cached prefix of whole pages and the page that ends it. A match must
//! return exactly the pages first inserted for that prefix (before and after
//! growth), an insert must report exactly the cached part, an eviction may
//! only remove unlocked suffix-closed parts, and every error must leave the
//! tree and the allocator as they were. Both checkers run after every step,
//! and at the end every request, lock and cached page is dropped and the
//! allocator must be entirely free. Tokens are drawn from a tiny alphabet so
//! that prefixes collide; at page_size 4 the page patterns share first tokens
//! so that siblings differ only inside their first page.

#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use radixseg_core::{Arc, RadixTree, SegmentAllocator};
use radixseg_model::tree::{run_actions, Action, IdPick, PageSrc, RawConfig, Toks};

/// Page size `1 << log2`, 8 pages per segment, at most 6 segments, 1 at the start.
fn config(log2: u8) -> RawConfig {
    RawConfig {
        page_size: log2,
        pages_per_segment: 7,
        max_segments: 5,
        initial_segments: 0,
    }
}

/// Whole pages from the four patterns that share first tokens, plus a
/// partial trailing page.
fn toks() -> impl Strategy<Value = Toks> {
    (prop::collection::vec(0..4u8, 0..7), any::<u8>()).prop_map(|(pages, tail)| Toks {
        pages,
        tail,
        bad: 0,
        bad_at: 0,
    })
}

/// Tokens with one out-of-range token in them.
fn bad_toks() -> impl Strategy<Value = Toks> {
    (toks(), 240u8.., any::<u8>()).prop_map(|(t, bad, bad_at)| Toks { bad, bad_at, ..t })
}

fn ns() -> impl Strategy<Value = u8> {
    0..3u8
}

fn actions() -> impl Strategy<Value = Vec<Action>> {
    let action = prop_oneof![
        6 => (ns(), toks()).prop_map(|(ns, toks)| Action::Insert {
            ns, toks, pages: PageSrc::Fresh { keep: false }, len_fuzz: 0,
        }),
        1 => (ns(), toks()).prop_map(|(ns, toks)| Action::Insert {
            ns, toks, pages: PageSrc::Matched { keep: false }, len_fuzz: 0,
        }),
        5 => (ns(), toks(), any::<bool>())
            .prop_map(|(ns, toks, lock)| Action::Match { ns, toks, lock, retain: false }),
        // A running request: match, retain the pages, lock the node.
        2 => (ns(), toks()).prop_map(|(ns, toks)| Action::Match { ns, toks, lock: true, retain: true }),
        2 => (ns(), toks()).prop_map(|(ns, toks)| Action::Acquire { ns, toks }),
        2 => (any::<u16>(), toks(), any::<bool>()).prop_map(|(which, extra, cache)| Action::Finish {
            which, extra, cache, variant: 0, bad: IdPick::Raw(0),
        }),
        2 => any::<u16>().prop_map(Action::Unlock),
        1 => prop::collection::vec(any::<u16>(), 1..=3).prop_map(Action::ReleaseHeld),
        1 => any::<u16>().prop_map(Action::Lock),
        1 => any::<u16>().prop_map(Action::UnlockSeen),
        3 => (0..10u16).prop_map(Action::Evict),
        1 => Just(Action::AddSegment),
        1 => any::<u8>().prop_map(Action::RetireSegment),
        // Inserts that must fail: a bad token, a bad length, a free page.
        1 => (ns(), bad_toks()).prop_map(|(ns, toks)| Action::Insert {
            ns, toks, pages: PageSrc::Fresh { keep: false }, len_fuzz: 0,
        }),
        1 => (ns(), toks()).prop_map(|(ns, toks)| Action::Insert {
            ns, toks, pages: PageSrc::Fresh { keep: false }, len_fuzz: 250,
        }),
        1 => (ns(), toks(), any::<u16>()).prop_map(|(ns, toks, k)| Action::Insert {
            ns, toks, pages: PageSrc::Picks(vec![IdPick::Free(k)]), len_fuzz: 0,
        }),
    ];
    prop::collection::vec(action, 1..80)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn model_page_size_1(actions in actions()) {
        run_actions(&config(0), &actions);
    }

    #[test]
    fn model_page_size_4(actions in actions()) {
        run_actions(&config(2), &actions);
    }
}

/// A reset while a request holds its pages: the request's own references
/// keep them allocated, its handle goes stale, and dropping the references
/// leaves the allocator entirely free.
#[test]
fn reset_in_the_middle() {
    let toks = |pages: &[u8]| Toks {
        pages: pages.to_vec(),
        tail: 0,
        bad: 0,
        bad_at: 0,
    };
    run_actions(
        &config(1),
        &[
            Action::Insert {
                ns: 0,
                toks: toks(&[0, 1, 2]),
                pages: PageSrc::Fresh { keep: false },
                len_fuzz: 0,
            },
            Action::Match {
                ns: 0,
                toks: toks(&[0, 1]),
                lock: true,
                retain: true,
            },
            Action::Reset,
            Action::UnlockSeen(0),
        ],
    );
}

fn i64s(v: &[u32]) -> Vec<i64> {
    v.iter().map(|&x| i64::from(x)).collect()
}

/// Insert and match back one 10,000,000-token sequence at page_size 16.
/// Release builds only (a debug build takes several seconds); prints the
/// times and the metadata bytes per cached token.
#[test]
#[cfg_attr(debug_assertions, ignore = "slow in debug builds; run with --release")]
fn ten_million_tokens() {
    use std::time::Instant;
    const N: usize = 10_000_000;
    let a = Arc::new(SegmentAllocator::new(16, 1 << 20).unwrap());
    a.add_segment().unwrap();
    let mut t = RadixTree::new(Arc::clone(&a));
    // Tokens prepared outside the timed region, as int64 (Python's form).
    let tokens: Vec<i64> = (0..N as i64).map(|i| (i * 7919) % 150_000).collect();
    let ids = a.alloc(N / 16).unwrap();

    let start = Instant::now();
    let cached = t.insert(&tokens, &ids, 0).unwrap();
    let insert_s = start.elapsed().as_secs_f64();
    assert_eq!(cached, 0);

    let start = Instant::now();
    let m = t.match_prefix(&tokens, 0).unwrap();
    let match_s = start.elapsed().as_secs_f64();
    assert_eq!(m.length, N);
    assert_eq!(m.page_ids, ids);

    // A second request sharing the first 5M tokens, then diverging.
    let mut other = tokens.clone();
    other[5_000_000 + 3] = 149_999;
    let start = Instant::now();
    let m2 = t.match_prefix(&other, 0).unwrap();
    let split_s = start.elapsed().as_secs_f64();
    assert_eq!(m2.length, 5_000_000);

    let per_token = t.metadata_bytes() as f64 / t.cached_tokens() as f64;
    eprintln!(
        "10M tokens, page_size 16: insert {:.1} ms, match {:.1} ms, \
         match with split at 5M {:.1} ms; metadata {:.3} bytes/token ({} bytes)",
        insert_s * 1e3,
        match_s * 1e3,
        split_s * 1e3,
        per_token,
        t.metadata_bytes()
    );
    assert!(insert_s + match_s < 1.0);
    assert!(per_token <= 6.0);
    t.check_invariants().unwrap();
    a.release(&i64s(&ids)).unwrap();
    assert_eq!(t.evict(usize::MAX).unwrap(), N / 16);
    assert_eq!(a.free_pages(), a.total_pages());
}

/// A request-level workload (8 shared system prompts of 2,048 tokens, 2,000
/// requests with 64..512-token suffixes; per request: match, allocate the
/// rest, insert, release, evicting when the pool is full). Release only;
/// prints microseconds per request.
#[test]
#[cfg_attr(debug_assertions, ignore = "timing; run with --release")]
fn shared_prompt_requests_timing() {
    use std::time::Instant;
    for page_size in [1u32, 16] {
        let a = Arc::new(SegmentAllocator::new(page_size, 1 << 16).unwrap());
        let pool_tokens = 400_000u32;
        for _ in 0..(pool_tokens / page_size).div_ceil(1 << 16) {
            a.add_segment().unwrap();
        }
        let mut t = RadixTree::new(Arc::clone(&a));
        let mut state = 0x1234_5678_9abc_def0_u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let prompts: Vec<Vec<i64>> = (0..8)
            .map(|_| (0..2048).map(|_| (rand() % 32_000) as i64).collect())
            .collect();
        let requests: Vec<Vec<i64>> = (0..2000)
            .map(|_| {
                let mut r = prompts[(rand() % 8) as usize].clone();
                let n = 64 + rand() % 449;
                r.extend((0..n).map(|_| (rand() % 32_000) as i64));
                r
            })
            .collect();
        let ps = page_size as usize;
        let (mut hit, mut total) = (0usize, 0usize);
        let mut in_tree = std::time::Duration::ZERO;
        let start = Instant::now();
        for r in &requests {
            let call = Instant::now();
            let m = t.match_prefix(r, 0).unwrap();
            in_tree += call.elapsed();
            hit += m.length;
            total += r.len();
            let need = r.len() / ps - m.page_ids.len();
            let fresh = match a.alloc(need) {
                Ok(ids) => ids,
                Err(_) => {
                    let call = Instant::now();
                    t.evict(need).unwrap();
                    in_tree += call.elapsed();
                    a.alloc(need).unwrap()
                }
            };
            let mut ids: Vec<u32> = m.page_ids.clone();
            ids.extend_from_slice(&fresh);
            let call = Instant::now();
            t.insert(&r[..ids.len() * ps], &ids, 0).unwrap();
            in_tree += call.elapsed();
            a.release(&i64s(&fresh)).unwrap();
        }
        let el = start.elapsed().as_secs_f64();
        eprintln!(
            "shared prompts, page_size {page_size}: {:.2} us/request in tree calls \
             (match + insert + evict), {:.2} us with the allocator calls; \
             hit rate {:.3}, {} nodes, {:.2} metadata bytes/token",
            in_tree.as_secs_f64() * 1e6 / requests.len() as f64,
            el * 1e6 / requests.len() as f64,
            hit as f64 / total as f64,
            t.node_count(),
            t.metadata_bytes() as f64 / t.cached_tokens() as f64
        );
        t.check_invariants().unwrap();
        a.check_invariants().unwrap();
    }
}
