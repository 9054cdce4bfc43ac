//! radixseg-core: the part of radixseg that decides which KV pages exist and
//! who references them, with no Python and no tensor memory. A
//! [`SegmentAllocator`] hands out refcounted page ids grouped in segments that
//! are added as demand grows and retired when empty; page ids never move while
//! referenced. The Python package `radixseg` binds this crate through
//! `radixseg-py` and keeps the bytes in torch tensors; the CPU decode kernel
//! that reads those bytes is the separate crate `radixseg-cpu`.
//!
//! `unsafe` is denied here except in `sync::OnceBox`, the one allowance.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod allocator;
pub mod error;
pub mod radix;
pub mod request;
mod sync;

pub use allocator::{SegmentAllocator, MAX_PAGES_PER_SEGMENT, MAX_PAGE_SIZE, PAGE_ID_LIMIT};
pub use error::{CoreError, HandleProblem, Result};
pub use radix::{CachedSequence, MatchResult, NodeId, RadixTree, TOKEN_LIMIT};
pub use request::{Request, RequestState};
pub use sync::Arc;
