//! `SegmentAllocator` against a refcount-map oracle; see `src/allocator.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radixseg_fuzz::allocator::run(data));
