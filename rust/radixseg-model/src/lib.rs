//! Reference models (oracles) of radixseg-core's two structures, one home
//! for each: `allocator` (`SegmentAllocator` against a refcount map) and
//! `tree` (`RadixTree` + `SegmentAllocator` against a prefix map). Each
//! module holds its `Action` enum (derived `Arbitrary`), the naive oracle,
//! `step` (apply one action to the real structure and the oracle, assert
//! that every result agrees with the oracle, a call the oracle says must fail
//! failing with exactly the oracle's error and changing nothing) and the
//! comparison of everything observable, `check_invariants` included, after
//! every action.
//!
//! Two drivers use it: the libFuzzer targets in `fuzz/` decode a `Vec<Action>`
//! from the fuzzer's bytes (`run`), and the proptest tests in
//! `rust/radixseg-core/tests/model_*.rs` generate weighted actions over tiny
//! configurations (`run_actions`). Not published. The model may panic on
//! purpose (an assertion is how a fuzzer or proptest reports a finding);
//! nothing in radixseg-core may.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod allocator;
pub mod tree;

use arbitrary::Unstructured;

/// Decode `T` from the whole input, or `None` for bytes that do not parse
/// (libFuzzer then moves on).
pub fn decode<'a, T: arbitrary::Arbitrary<'a>>(data: &'a [u8]) -> Option<T> {
    T::arbitrary_take_rest(Unstructured::new(data)).ok()
}

/// Pick the `k`-th item of a non-empty slice (modulo its length).
pub fn pick<T: Copy>(items: &[T], k: impl Into<u64>) -> Option<T> {
    if items.is_empty() {
        None
    } else {
        Some(items[(k.into() % items.len() as u64) as usize])
    }
}

/// Pick from `items` by each of `picks`, never taking a page more often than
/// `counts` says it is referenced (so releasing the result is valid).
pub fn pick_within_counts<K: Copy + Into<u64>>(
    items: &[u32],
    picks: &[K],
    counts: &std::collections::BTreeMap<u32, u32>,
) -> Vec<u32> {
    let mut budget = counts.clone();
    picks
        .iter()
        .filter_map(|&k| pick(items, k))
        .filter(|p| match budget.get_mut(p) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        })
        .collect()
}
