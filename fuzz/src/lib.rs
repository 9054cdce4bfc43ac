//! Fuzz harnesses for radixseg-core: the libFuzzer targets in
//! `fuzz_targets/` and the replay tests in `tests/replay.rs` call the `run`
//! functions of the reference models, which live in `rust/radixseg-model`
//! (one oracle per structure, shared with the proptest tests).

pub use radixseg_model::{allocator, decode, tree};
