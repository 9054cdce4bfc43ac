//! `RadixTree` + `SegmentAllocator` against a prefix-map oracle; see
//! `src/tree.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radixseg_fuzz::tree::run(data));
