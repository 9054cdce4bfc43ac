//! Fuzz harnesses for radixseg-core. Each module replays an arbitrary
//! `Vec<Action>` (decoded from the fuzzer's bytes with `arbitrary`) against
//! the real structure and a naive oracle, asserts that every result agrees
//! with the oracle (a call the oracle says must fail fails with exactly the
//! oracle's error and changes nothing), and runs the structures' own
//! `check_invariants` after every action.
//!
//! The harness logic lives in this library so that the libFuzzer targets in
//! `fuzz_targets/` stay one line each and the same `run` functions can be
//! replayed from a plain `cargo test` (see `tests/replay.rs`). The harness may
//! panic on purpose (an assertion is how a fuzzer reports a finding); nothing
//! in radixseg-core may.

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
