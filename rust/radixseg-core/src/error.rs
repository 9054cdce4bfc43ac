//! The one error type of the core. Every fallible public call returns
//! `Result<_, CoreError>`; the Python binding maps each variant to one
//! exception class in a single exhaustive match (`radixseg-py/src/errors.rs`).
//! Messages carry the numbers a user needs: what was asked, what is
//! available, what the limit is.
//!
//! The enums are deliberately not `#[non_exhaustive]`: the core and the
//! binding are released together, and an exhaustive match there makes a new
//! variant a compile error until it has its Python class and attributes.

use std::fmt;

/// Why a page id was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleProblem {
    /// The id is negative or past the id space of the allocator.
    OutOfRange {
        /// One past the largest page id of any segment slot created so far
        /// (live or retired).
        limit: u64,
    },
    /// The id names a segment that was never added or has been retired.
    SegmentNotLive {
        /// The segment the id resolves to.
        segment: u32,
    },
    /// The page exists but is free (refcount 0): it cannot be retained or read.
    Free,
}

/// Errors of the allocator and the radix tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// A constructor argument is outside its documented range.
    InvalidConfig {
        /// Which parameter.
        what: &'static str,
        /// The value given.
        value: i64,
        /// The rule it broke, in words.
        rule: &'static str,
    },
    /// `alloc(n)` found fewer than `n` free pages; nothing was allocated.
    OutOfPages {
        /// Pages asked for.
        requested: u64,
        /// Free pages seen while trying.
        available: u64,
        /// Pages in all live segments.
        total: u64,
        /// Live segments.
        segments: u32,
    },
    /// A page id that does not name a referenced page.
    InvalidHandle {
        /// The id as given (may be negative or huge).
        page_id: i64,
        /// Why it was rejected.
        problem: HandleProblem,
    },
    /// `release` on a page whose refcount is already 0.
    DoubleFree {
        /// The page.
        page_id: u32,
    },
    /// `retain` would take a refcount past `u32::MAX`.
    RefcountOverflow {
        /// The page.
        page_id: u32,
    },
    /// `retire_segment` on a segment that still has referenced pages.
    SegmentBusy {
        /// The segment.
        segment: u32,
        /// Its referenced pages.
        used_pages: u32,
    },
    /// A segment id that is not live.
    InvalidSegment {
        /// The id as given.
        segment: i64,
        /// Segment ids currently live are below this bound (or the set is empty).
        live: u32,
    },
    /// `open_segment` / `cancel_segment` of an id that `reserve_segment` did
    /// not hand out, or that was already opened or cancelled.
    SegmentNotReserved {
        /// The id as given.
        segment: i64,
    },
    /// No further segment fits in the 31-bit page-id space.
    IdSpaceExhausted {
        /// Live segments.
        segments: u32,
        /// The most segments this `pages_per_segment` allows.
        limit: u32,
    },
    /// A token id at or above 2^31 (token ids are non-negative `int32`s).
    InvalidToken {
        /// Position in the input.
        index: usize,
        /// The value.
        value: i64,
    },
    /// Two inputs whose lengths must agree do not.
    LengthMismatch {
        /// What was compared, in words.
        what: &'static str,
        /// Length required.
        expected: u64,
        /// Length given.
        actual: u64,
    },
    /// A node handle that does not name a live tree node.
    InvalidNode {
        /// The handle as given.
        node: i64,
    },
    /// `unlock` on a node whose lock count is already 0.
    UnbalancedUnlock {
        /// The node.
        node: u32,
    },
    /// The invariant checker found a breach; the text says which.
    Malformed(String),
    /// An argument of a batch call (attention inputs, page tables) that is
    /// inconsistent with itself or with the pool; the text gives the numbers.
    InvalidInput(String),
    /// A radix-tree count or index would pass its fixed width (lock count of
    /// a node, nodes, pages in the tree's arena); nothing changed.
    TreeCapacity {
        /// Which quantity, in words.
        what: &'static str,
        /// Its largest value.
        limit: u64,
    },
}

/// Short alias used across the crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidConfig { what, value, rule } => {
                write!(f, "invalid {what} = {value}: {rule}")
            }
            Self::OutOfPages {
                requested,
                available,
                total,
                segments,
            } => write!(
                f,
                "out of pages: requested {requested}, available {available} \
                 (of {total} pages in {segments} segments); add a segment or release pages"
            ),
            Self::InvalidHandle { page_id, problem } => match problem {
                HandleProblem::OutOfRange { limit } => write!(
                    f,
                    "invalid page id {page_id}: page ids are in 0..{limit}"
                ),
                HandleProblem::SegmentNotLive { segment } => write!(
                    f,
                    "invalid page id {page_id}: its segment {segment} is not live"
                ),
                HandleProblem::Free => {
                    write!(f, "invalid page id {page_id}: the page is free (refcount 0)")
                }
            },
            Self::DoubleFree { page_id } => {
                write!(f, "double release of page {page_id}: its refcount is already 0")
            }
            Self::RefcountOverflow { page_id } => write!(
                f,
                "refcount of page {page_id} would exceed {}",
                u32::MAX
            ),
            Self::SegmentBusy {
                segment,
                used_pages,
            } => write!(
                f,
                "segment {segment} cannot be retired: {used_pages} of its pages are still referenced"
            ),
            Self::InvalidSegment { segment, live } => write!(
                f,
                "invalid segment id {segment}: not a live segment ({live} segments are live)"
            ),
            Self::SegmentNotReserved { segment } => write!(
                f,
                "segment {segment} is not reserved: open_segment and cancel_segment take an \
                 id from reserve_segment, once"
            ),
            Self::IdSpaceExhausted { segments, limit } => write!(
                f,
                "cannot add segment: {segments} segments already live and page ids must stay \
                 below 2^31, which allows at most {limit} segments of this size; \
                 use larger pages or more pages per segment"
            ),
            Self::InvalidToken { index, value } => write!(
                f,
                "invalid token id {value} at position {index}: token ids are in 0..2^31"
            ),
            Self::LengthMismatch {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected {expected}, got {actual}"),
            Self::InvalidNode { node } => write!(f, "invalid node handle {node}"),
            Self::UnbalancedUnlock { node } => write!(
                f,
                "unbalanced unlock of node {node}: its lock count is already 0"
            ),
            Self::Malformed(what) => write!(f, "invariant violated: {what}"),
            Self::InvalidInput(what) => f.write_str(what),
            Self::TreeCapacity { what, limit } => write!(
                f,
                "radix tree limit reached: {what} would exceed {limit}; \
                 unlock, evict or reset to make room"
            ),
        }
    }
}

impl std::error::Error for CoreError {}
