//! The radix prefix tree: which cached token prefixes map to which KV pages.
//!
//! A [`RadixTree`] shares the prefixes of finished (or chunked) requests with
//! later ones, the way SGLang's `RadixCache` does, but its values are page ids
//! of a [`SegmentAllocator`], which never move while referenced: the pool can
//! grow and shrink under a full tree without rewriting a single cached index.
//! The tree holds one allocator reference (refcount +1) per page it stores and
//! drops it when the page's leaf is evicted or the tree is reset. Nodes live
//! in one arena linked by `u32` slot indices; their token keys and page ids
//! live in two shared arenas, so a node costs 40 bytes however long its key.
//! Eviction is least-recently-used over unlocked leaves through a lazily
//! pruned binary heap. Every call validates its input before it changes
//! anything, so an error leaves the tree (and the allocator) as it was.
//! The `_u32` calls read `int32` arrays in place (their bits as `u32`) and
//! validate in the same walk that compares: the matched tokens equal the
//! tree's, which are valid, so only the rest are checked.
//! `RADIX.md` beside this crate explains the layout and its costs.

use crate::allocator::SegmentAllocator;
use crate::error::{CoreError, HandleProblem, Result};
use crate::sync::Arc;
use std::cmp::Reverse;
use std::collections::hash_map::{Entry, RandomState};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::mem::size_of;

/// Token ids are non-negative `int32`s: every token is below this.
pub const TOKEN_LIMIT: i64 = 1 << 31;

/// "No node" in a `u32` link; also one past the largest slot index.
const NIL: u32 = u32::MAX;
/// Largest generation a node may carry, so that every handle is a
/// non-negative `i64`. A slot whose generation would pass it is retired.
const MAX_GEN: u32 = (1 << 31) - 1;
/// The LRU heap is pruned of stale entries when it grows past twice its size
/// after the last pruning, and never below this.
const MIN_LRU_LIMIT: usize = 1024;
/// Dead arena pages (left by evicted leaves) are compacted away once they
/// exceed 1/8 of the live ones and at least this many.
const MIN_COMPACT_PAGES: usize = 4096;
/// Arena growth headroom: at least this many pages, else 1/8 of the arena.
const MIN_ARENA_GROWTH: usize = 256;
/// Node arena growth headroom: at least this many slots, else 1/8.
const MIN_NODE_GROWTH: usize = 64;
/// Tokens compared per `memcmp` (vectorized by the C library) while the
/// keys agree, then per smaller `memcmp` inside the chunk that differs,
/// before locating the first mismatch one token at a time. Long chunks pay
/// the call once per 2 KiB; the short ones bound the search in the last.
const COMPARE_CHUNKS: [usize; 2] = [512, 32];

// ----- public types ------------------------------------------------------------

/// A handle to a tree node: `generation << 32 | slot`, a non-negative `i64`
/// when made by the tree. A node's slot is reused after the node is freed,
/// but with a new generation, so a stale handle is refused
/// ([`CoreError::InvalidNode`]) instead of naming another node.
///
/// A handle names the node whose path from its namespace root is exactly the
/// matched prefix; splitting a node later keeps that meaning (the handle's
/// node keeps the lower part, a new node takes the upper part).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u64);

impl NodeId {
    /// The handle for its raw integer form (as it crosses into Python).
    /// Any value is accepted here; an invalid one is refused when used.
    pub const fn from_raw(raw: i64) -> Self {
        Self(raw as u64)
    }

    /// The raw integer form of the handle.
    pub const fn to_raw(self) -> i64 {
        self.0 as i64
    }

    /// The arena slot the handle points at.
    pub const fn slot(self) -> u32 {
        self.0 as u32
    }

    /// The generation the slot must carry for the handle to be live.
    pub const fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// What [`RadixTree::match_prefix`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchResult {
    /// The tree's page ids for the matched prefix, one per page, in order.
    /// They are the tree's references: a caller that keeps using them past
    /// a later `evict` must `retain` them (or `lock` the node).
    pub page_ids: Vec<u32>,
    /// Tokens matched: `page_ids.len() * page_size`.
    pub length: usize,
    /// The node whose path is exactly the matched prefix (the namespace's
    /// root when nothing matched); pass it to `lock` / `unlock`.
    pub node: NodeId,
}

/// One root-to-leaf path of the tree, as listed by
/// [`RadixTree::cached_sequences`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CachedSequence {
    /// The namespace of the path.
    pub namespace: u64,
    /// Its tokens, a whole number of pages.
    pub tokens: Vec<u32>,
    /// Its page ids, one per page.
    pub page_ids: Vec<u32>,
}

// ----- internals -------------------------------------------------------------------

/// One arena slot. 40 bytes, pinned by a test.
///
/// A node's key is `len` pages: page ids `pages[start..start + len]` and
/// tokens `tokens[start * page_size..(start + len) * page_size]`. A root
/// (one per namespace) has `parent == NIL` and `len == 0`, and stores its
/// namespace in `start` (low half) and `next` (high half), which a root
/// does not otherwise use. A free slot links the free list through `next`.
#[derive(Clone, Copy, Debug)]
struct Node {
    /// Logical clock of the last match / insert that went through the node.
    last_access: u64,
    /// First page of the key in the arenas (a root: low half of its namespace).
    start: u32,
    /// Pages in the key; 0 only for roots.
    len: u32,
    /// Parent slot; `NIL` for a namespace root.
    parent: u32,
    /// Next sibling under the same edge-table key (a hash collision of the
    /// first page; almost always `NIL`). Free slots: next free slot.
    /// A root: high half of its namespace.
    next: u32,
    /// Odd while the slot holds a node, even while it is free.
    gen: u32,
    /// Outstanding `lock`s of this node and its descendants: the node is
    /// evictable only at 0.
    lock: u32,
    /// Outstanding `lock`s taken on this node itself (what `unlock` checks).
    own: u32,
    /// Live children.
    children: u32,
}

impl Node {
    const FREE: Self = Self {
        last_access: 0,
        start: 0,
        len: 0,
        parent: NIL,
        next: NIL,
        gen: 0,
        lock: 0,
        own: 0,
        children: 0,
    };

    #[inline]
    fn is_live(&self) -> bool {
        self.gen & 1 == 1
    }

    #[inline]
    fn is_root(&self) -> bool {
        self.parent == NIL
    }

    /// The namespace of a root node.
    #[inline]
    fn namespace(&self) -> u64 {
        u64::from(self.next) << 32 | u64::from(self.start)
    }

    /// An unlocked live node without children: the next eviction candidates.
    #[inline]
    fn is_evictable_leaf(&self) -> bool {
        self.is_live() && self.children == 0 && self.lock == 0
    }
}

/// An entry of the LRU heap. It is current while the slot still holds the
/// same node (`gen`), that node's clock is still `tick`, and it is an
/// unlocked leaf; otherwise it is skipped when popped (lazy deletion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct LruEntry {
    tick: u64,
    idx: u32,
    gen: u32,
}

/// Where a walk down the tree ended.
struct Walk {
    /// The node whose path is exactly the matched prefix.
    node: u32,
    /// Pages matched.
    pages: usize,
    /// The deepest node whose clock the walk refreshed.
    last: u32,
}

/// Where a walk down the tree stops, found without changing anything
/// (see `RadixTree::walk`).
#[derive(Default)]
struct Path {
    /// The nodes whose first page matched, below the root, in order.
    nodes: Vec<u32>,
    /// Pages matched.
    pages: usize,
    /// Pages matched of the last node when fewer than all of it (it is
    /// split there when the path is applied).
    split: Option<u32>,
    /// The caller's page ids along the matched prefix that are not the
    /// tree's own pages there, when the walk was given ids (as `insert`
    /// must check them: each must be referenced).
    foreign: Vec<i64>,
}

/// Hash state for the tree's tables: a per-tree random seed and a 64-bit
/// finaliser. Keys are already well-spread integers, so one mix suffices;
/// the seed keeps crafted prompts from colliding on purpose.
#[derive(Clone, Copy, Debug)]
struct Mix {
    seed: u64,
}

struct MixHasher {
    state: u64,
}

impl BuildHasher for Mix {
    type Hasher = MixHasher;
    #[inline]
    fn build_hasher(&self) -> MixHasher {
        MixHasher { state: self.seed }
    }
}

impl Hasher for MixHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.state
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.state = mix64(self.state ^ u64::from(b));
        }
    }
    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.state = mix64(self.state ^ x);
    }
}

/// The murmur3 64-bit finaliser: every input bit affects every output bit.
#[inline]
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Index of the first position where `a` and `b` differ (or the shorter
/// length). Whole chunks go through `memcmp` (see `COMPARE_CHUNKS`).
#[inline]
fn first_mismatch(a: &[u32], b: &[u32]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    for chunk in COMPARE_CHUNKS {
        while i + chunk <= n && a[i..i + chunk] == b[i..i + chunk] {
            i += chunk;
        }
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Heap bytes of a std `HashMap` of `capacity` (as `capacity()` reports it)
/// with entries of `entry` bytes: buckets, one control byte per bucket and
/// one trailing group of control bytes.
fn table_bytes(capacity: usize, entry: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    (buckets * entry).next_multiple_of(16) + buckets + 16
}

// ----- the tree ------------------------------------------------------------------------

/// A radix tree of token prefixes whose values are pages of a
/// [`SegmentAllocator`]; see the module documentation.
///
/// Not internally synchronised: every mutating call takes `&mut self`
/// (matching refreshes recency and may split a node). Wrap it in a mutex to
/// share it.
pub struct RadixTree {
    allocator: Arc<SegmentAllocator>,
    page_size: usize,
    /// The node arena.
    nodes: Vec<Node>,
    /// Head of the free-slot list (linked through `Node::next`).
    free_head: u32,
    free_slots: usize,
    /// Slots whose generation ran out; never reused.
    retired_slots: usize,
    /// Token keys of all nodes, `page_size` per arena page.
    tokens: Vec<u32>,
    /// Page ids of all nodes, one per arena page.
    pages: Vec<u32>,
    /// Arena pages no node owns any more (left by evicted leaves).
    dead_pages: usize,
    /// `parent << 32 | page_key(first page)` -> first child with that key.
    edges: HashMap<u64, u32, Mix>,
    /// Namespace -> root slot.
    roots: HashMap<u64, u32, Mix>,
    /// Min-heap of eviction candidates by last access, pruned lazily.
    lru: BinaryHeap<Reverse<LruEntry>>,
    lru_limit: usize,
    /// Logical clock; every match or insert takes a new tick.
    clock: u64,
    seed: u64,
    cached_pages: usize,
    evictable_pages: usize,
    /// Live non-root nodes.
    inner_nodes: usize,
    /// Live namespace roots.
    root_nodes: usize,
    /// Pages released by `evict`, ever.
    evicted_pages: u64,
}

impl std::fmt::Debug for RadixTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RadixTree")
            .field("page_size", &self.page_size)
            .field("nodes", &self.inner_nodes)
            .field("namespaces", &self.root_nodes)
            .field("cached_pages", &self.cached_pages)
            .field("evictable_pages", &self.evictable_pages)
            .finish_non_exhaustive()
    }
}

impl RadixTree {
    /// An empty tree over `allocator`, caching whole pages of
    /// `allocator.page_size()` tokens.
    pub fn new(allocator: Arc<SegmentAllocator>) -> Self {
        let seed = RandomState::new().hash_one(0x7261_6469_7873_6567_u64);
        let mix = Mix { seed };
        Self {
            page_size: allocator.page_size() as usize,
            allocator,
            nodes: Vec::new(),
            free_head: NIL,
            free_slots: 0,
            retired_slots: 0,
            tokens: Vec::new(),
            pages: Vec::new(),
            dead_pages: 0,
            edges: HashMap::with_hasher(mix),
            roots: HashMap::with_hasher(mix),
            lru: BinaryHeap::new(),
            lru_limit: MIN_LRU_LIMIT,
            clock: 0,
            seed,
            cached_pages: 0,
            evictable_pages: 0,
            inner_nodes: 0,
            root_nodes: 0,
            evicted_pages: 0,
        }
    }

    /// The allocator whose pages the tree references.
    pub fn allocator(&self) -> &Arc<SegmentAllocator> {
        &self.allocator
    }

    /// Tokens per page (the allocator's).
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    // ----- the operations ------------------------------------------------------

    /// The longest cached prefix of `tokens` in `namespace`, in whole pages.
    ///
    /// Tokens past the last whole page are ignored (but still validated:
    /// every token must be in `0..2^31`, else [`CoreError::InvalidToken`] and
    /// nothing changes). If the match ends inside a node, the node is split
    /// so that the returned node's path is exactly the matched prefix. Every
    /// node on the path has its recency refreshed. The namespace's root is
    /// created if it did not exist (an unused, unlocked, childless root is
    /// dropped by a later `evict`).
    pub fn match_prefix<T>(&mut self, tokens: &[T], namespace: u64) -> Result<MatchResult>
    where
        T: Copy + Into<i64>,
    {
        let toks = tokens_u32(tokens)?;
        let whole = toks.len() / self.page_size * self.page_size;
        self.match_whole(&toks[..whole], namespace)
    }

    /// [`match_prefix`](Self::match_prefix) of tokens given as the bits of
    /// an `int32` array (read in place: no copy). A value of 2^31 or more is
    /// a negative `int32`, refused as [`CoreError::InvalidToken`] with that
    /// negative value, as the same array given as `int64` would be. One pass
    /// over the tokens: the matched ones are compared with the tree's (which
    /// are valid, so equal ones are too), only the rest are checked.
    pub fn match_prefix_u32(&mut self, tokens: &[u32], namespace: u64) -> Result<MatchResult> {
        let path = self.locate::<u32>(tokens, namespace, None)?;
        self.match_path(&path, namespace)
    }

    /// [`match_prefix`](Self::match_prefix) of tokens already validated and
    /// cut to whole pages.
    pub(crate) fn match_whole(&mut self, toks: &[u32], namespace: u64) -> Result<MatchResult> {
        debug_assert_eq!(toks.len() % self.page_size, 0);
        let path = match self.roots.get(&namespace) {
            Some(&root) => self.walk::<u32>(root, toks, None),
            None => Path::default(),
        };
        self.match_path(&path, namespace)
    }

    /// Make `path` (found in `namespace`, the tree unchanged since) the
    /// match's: the matched page ids, refreshed and split as `apply` does.
    fn match_path(&mut self, path: &Path, namespace: u64) -> Result<MatchResult> {
        // A root and a split may be needed.
        self.ensure_slots(2)?;
        let t = self.tick();
        let root = self.root_for(namespace, t);
        let page_ids = self.path_page_ids(path);
        let walk = self.apply(root, path, t);
        self.refresh(walk.last);
        Ok(MatchResult {
            length: walk.pages * self.page_size,
            page_ids,
            node: self.handle(walk.node),
        })
    }

    /// Cache `tokens` (whole pages; a trailing partial page is ignored) with
    /// their `page_ids` (one per whole page) in `namespace`. Returns how many
    /// leading tokens were already cached (a multiple of `page_size`).
    ///
    /// Ownership of page references:
    /// * for the already-cached prefix the tree keeps its own pages and takes
    ///   nothing from the caller: the caller still owns its references to its
    ///   duplicate pages `page_ids[..returned / page_size]` and must release
    ///   them itself (as SGLang's `cache_finished_req` frees its duplicates);
    /// * for the rest the tree retains each page (refcount +1); the caller
    ///   still owns the reference it had and releases it when done.
    ///
    /// All or nothing: tokens, the page count
    /// ([`CoreError::LengthMismatch`]) and every page id (each must be
    /// referenced in the allocator, [`CoreError::InvalidHandle`]) are checked
    /// before anything changes. Recency of the path is refreshed, and a node
    /// where the key diverges is split, as in `match_prefix`.
    pub fn insert<T, P>(&mut self, tokens: &[T], page_ids: &[P], namespace: u64) -> Result<usize>
    where
        T: Copy + Into<i64>,
        P: Copy + Into<i64>,
    {
        check_page_count(page_ids.len(), tokens.len() / self.page_size)?;
        let toks = tokens_u32(tokens)?;
        let ids: Vec<i64> = page_ids.iter().map(|&p| p.into()).collect();
        self.insert_in(&toks, &ids, namespace)
    }

    /// [`insert`](Self::insert) of tokens and page ids given as the bits of
    /// `int32` arrays (read in place: no copy), refused as the same arrays
    /// given as `int64` would be (see
    /// [`match_prefix_u32`](Self::match_prefix_u32)).
    pub fn insert_u32(
        &mut self,
        tokens: &[u32],
        page_ids: &[u32],
        namespace: u64,
    ) -> Result<usize> {
        check_page_count(page_ids.len(), tokens.len() / self.page_size)?;
        self.insert_in(tokens, page_ids, namespace)
    }

    /// [`insert`](Self::insert) of counted ids: one walk validates the
    /// tokens past the cached prefix and compares the ids along it.
    fn insert_in<P: PageArg>(
        &mut self,
        tokens: &[u32],
        ids: &[P],
        namespace: u64,
    ) -> Result<usize> {
        let whole = ids.len() * self.page_size;
        let path = self.locate(tokens, namespace, Some(ids))?;
        self.insert_path(&tokens[..whole], ids, namespace, usize::MAX, path)
    }

    /// [`insert`](Self::insert) along `path` (what [`locate`](Self::locate)
    /// found for `toks`, whole validated pages, and `ids`, one per page,
    /// the tree unchanged since), except that each newly cached page at
    /// position `adopt_from` or later keeps the caller's reference, handed
    /// over to the tree, instead of taking one of its own: what
    /// [`finish`](Self::finish) does for the request's fresh pages, whose
    /// reference it would otherwise retain and release at once. The caller
    /// has validated those ids as referenced and releases only the rest.
    fn insert_path<P: PageArg>(
        &mut self,
        toks: &[u32],
        ids: &[P],
        namespace: u64,
        adopt_from: usize,
        path: Path,
    ) -> Result<usize> {
        let ps = self.page_size;
        let n_pages = ids.len();
        debug_assert_eq!(toks.len(), n_pages * ps);
        if n_pages == 0 {
            return Ok(0);
        }
        // The caller's ids along the cached prefix that are not the tree's
        // own pages there (those are referenced by the tree) must be
        // referenced.
        self.check_referenced(&path.foreign)?;
        let cached = path.pages;
        let fresh = n_pages - cached;
        // Root, split and new leaf at most.
        self.ensure_slots(3)?;
        if fresh > 0 {
            self.ensure_arena(fresh)?;
            // Validates the new pages and takes the tree's references, all or
            // none; the last call that can fail. Adopted pages keep theirs.
            let adopted = adopt_from.clamp(cached, n_pages);
            self.allocator.retain(&values(&ids[cached..adopted]))?;
        }
        let t = self.tick();
        let root = self.root_for(namespace, t);
        // Arena compaction moved no node: the path still holds.
        let walk = self.apply(root, &path, t);
        if fresh > 0 {
            self.add_leaf(walk.node, &toks[cached * ps..], &ids[cached..]);
        }
        // After `add_leaf`: the walk's last node is no leaf if it got the
        // new child, and still one if it is the lower half of a split.
        self.refresh(walk.last);
        Ok(cached * ps)
    }

    /// Start a request: [`match_prefix`](Self::match_prefix), then
    /// [`lock`](Self::lock) the returned node, under one `&mut self` so that
    /// no eviction can slip between the match and the lock.
    ///
    /// The lock keeps every matched page cached (and so allocated) until
    /// [`finish`](Self::finish) unlocks it; the caller takes no page
    /// references of its own, so starting a request costs O(matched nodes),
    /// not O(matched pages). [`reset`](Self::reset) drops locked nodes too:
    /// reset only when no request is running.
    pub fn acquire<T>(&mut self, tokens: &[T], namespace: u64) -> Result<MatchResult>
    where
        T: Copy + Into<i64>,
    {
        let m = self.match_prefix(tokens, namespace)?;
        self.lock(m.node)?;
        Ok(m)
    }

    /// [`acquire`](Self::acquire) of tokens given as the bits of an `int32`
    /// array (see [`match_prefix_u32`](Self::match_prefix_u32)).
    pub fn acquire_u32(&mut self, tokens: &[u32], namespace: u64) -> Result<MatchResult> {
        let m = self.match_prefix_u32(tokens, namespace)?;
        self.lock(m.node)?;
        Ok(m)
    }

    /// End a request started by [`acquire`](Self::acquire): optionally
    /// [`insert`](Self::insert) its whole pages (`cache`), then unlock `node`
    /// (when given) and release the caller's reference to each page in
    /// `page_ids[owned_from..]`. `page_ids` holds one id per page of
    /// `tokens`, rounded up (a trailing partial page is released, never
    /// cached); the first `owned_from` are the matched pages, which the lock
    /// held and the caller holds no reference to. Returns the tokens that were
    /// already cached (0 when `cache` is false).
    ///
    /// All or nothing: the node's lock, the release and the insert are all
    /// validated before anything changes.
    pub fn finish<T, P>(
        &mut self,
        tokens: &[T],
        page_ids: &[P],
        namespace: u64,
        node: Option<NodeId>,
        cache: bool,
        owned_from: usize,
    ) -> Result<usize>
    where
        T: Copy + Into<i64>,
        P: Copy + Into<i64>,
    {
        self.check_finish_lengths(tokens.len(), page_ids.len(), owned_from)?;
        let toks = tokens_u32(tokens)?;
        let ids: Vec<i64> = page_ids.iter().map(|&p| p.into()).collect();
        self.finish_in(&toks, &ids, namespace, node, cache, owned_from)
    }

    /// [`finish`](Self::finish) of tokens and page ids given as the bits of
    /// `int32` arrays (read in place: no copy), refused as the same arrays
    /// given as `int64` would be (see
    /// [`match_prefix_u32`](Self::match_prefix_u32)).
    pub fn finish_u32(
        &mut self,
        tokens: &[u32],
        page_ids: &[u32],
        namespace: u64,
        node: Option<NodeId>,
        cache: bool,
        owned_from: usize,
    ) -> Result<usize> {
        self.check_finish_lengths(tokens.len(), page_ids.len(), owned_from)?;
        self.finish_in(tokens, page_ids, namespace, node, cache, owned_from)
    }

    /// `finish` takes one page id per page of tokens, the partial last page
    /// included, and at most that many matched pages.
    fn check_finish_lengths(
        &self,
        tokens: usize,
        page_ids: usize,
        owned_from: usize,
    ) -> Result<()> {
        let expected = tokens.div_ceil(self.page_size);
        if page_ids != expected {
            return Err(CoreError::LengthMismatch {
                what: "finish: page_ids must hold one id per page of tokens, \
                       a trailing partial page included (ceil(tokens.len() / page_size))",
                expected: expected as u64,
                actual: page_ids as u64,
            });
        }
        if owned_from > expected {
            return Err(CoreError::LengthMismatch {
                what: "finish: owned_from (matched pages) must not exceed the page count",
                expected: expected as u64,
                actual: owned_from as u64,
            });
        }
        Ok(())
    }

    /// [`finish`](Self::finish) of counted ids (`check_finish_lengths`).
    fn finish_in<P: PageArg>(
        &mut self,
        tokens: &[u32],
        ids: &[P],
        namespace: u64,
        node: Option<NodeId>,
        cache: bool,
        owned_from: usize,
    ) -> Result<usize> {
        let ps = self.page_size;
        let full = tokens.len() / ps;
        // Every token, the partial last page included, even when nothing is
        // cached: the same tokens must be valid wherever they are passed.
        // With `cache`, one walk compares the cached prefix (tokens and ids)
        // and validates the rest.
        let path = if cache {
            self.locate(tokens, namespace, Some(&ids[..full]))?
        } else {
            check_token_bits(tokens, 0)?;
            Path::default()
        };
        if let Some(node) = node {
            let idx = self.resolve(node)?;
            if self.nodes[idx as usize].own == 0 {
                return Err(CoreError::UnbalancedUnlock { node: idx });
            }
        }
        // The caller's pages, converted once for the check and the release.
        let owned = values(&ids[owned_from..]);
        self.allocator.check_release(&owned)?;
        // The insert retains, never releases, so the release stays valid.
        // The request's own pages that the tree caches anew (positions
        // `adopted`) pass the request's reference to the tree: no retain
        // now and release below, which would leave every refcount as it is.
        let (cached, adopted) = if cache {
            let c = self.insert_path(
                &tokens[..full * ps],
                &ids[..full],
                namespace,
                owned_from,
                path,
            )?;
            (c, (c / ps).max(owned_from).min(full)..full)
        } else {
            (0, full..full)
        };
        if let Some(node) = node {
            self.unlock(node)?;
        }
        // Duplicates of cached pages and the partial last page.
        let (a, b) = (adopted.start.max(owned_from), adopted.end.max(owned_from));
        let rest: Vec<i64> = if a == b {
            owned
        } else {
            let o = owned_from;
            owned[..a - o]
                .iter()
                .chain(&owned[b - o..])
                .copied()
                .collect()
        };
        self.allocator.release(&rest)?;
        Ok(cached)
    }

    /// [`finish`](Self::finish) for a caller that keeps its own books (a
    /// [`Request`](crate::Request)): `node` is locked and its path holds
    /// the sequence's first `owned_from` pages; `tail` are the validated
    /// tokens past them; `pages` holds one id per page of the sequence (the
    /// partial last page included), and the caller holds one reference to
    /// each past the first `owned_from`. So nothing about the input needs
    /// checking, and one walk down from `node` over the new tokens only
    /// both finds what is cached and places the new leaf. The matched path
    /// is refreshed as an insert from the root would (`node` and its
    /// ancestors). All or nothing, as `finish`.
    pub(crate) fn finish_owned(
        &mut self,
        tail: &[u32],
        pages: &[u32],
        node: NodeId,
        cache: bool,
        owned_from: usize,
    ) -> Result<usize> {
        let ps = self.page_size;
        let full = (owned_from * ps + tail.len()) / ps;
        debug_assert_eq!(pages.len(), (owned_from * ps + tail.len()).div_ceil(ps));
        let idx = self.resolve(node)?;
        if self.nodes[idx as usize].own == 0 {
            return Err(CoreError::UnbalancedUnlock { node: idx });
        }
        let (cached, adopted) = if cache && full > 0 {
            // Split and new leaf at most, and arena room for every new
            // page: checked before anything changes, so nothing below fails.
            self.ensure_slots(2)?;
            self.check_arena_room(full - owned_from)?;
            let t = self.tick();
            let mut up = idx;
            while up != NIL {
                self.nodes[up as usize].last_access = t;
                up = self.nodes[up as usize].parent;
            }
            let new = &tail[..(full - owned_from) * ps];
            let path = self.walk::<u32>(idx, new, None);
            let walk = self.apply(idx, &path, t);
            let cached = owned_from + walk.pages;
            if cached < full {
                self.ensure_arena(full - cached)?;
                let from = (cached - owned_from) * ps;
                self.add_leaf(walk.node, &new[from..], &pages[cached..full]);
            }
            self.refresh(walk.last);
            (cached, cached..full)
        } else {
            (0, full..full)
        };
        self.unlock(node)?;
        // The request's duplicates of cached pages and its partial last page;
        // the pages cached anew keep the request's reference, now the tree's.
        let rest: Vec<i64> = pages[owned_from..adopted.start.max(owned_from)]
            .iter()
            .chain(&pages[adopted.end.max(owned_from)..])
            .map(|&p| i64::from(p))
            .collect();
        self.allocator.release(&rest)?;
        Ok(cached * ps)
    }

    /// The tokens of the path from the root to `node` (a live node).
    pub(crate) fn path_tokens(&self, node: NodeId) -> Result<Vec<u32>> {
        let ps = self.page_size;
        let mut runs = Vec::new();
        let mut cur = self.resolve(node)?;
        while self.nodes[cur as usize].parent != NIL {
            let n = &self.nodes[cur as usize];
            runs.push((n.start as usize * ps, (n.start + n.len) as usize * ps));
            cur = n.parent;
        }
        let mut out = Vec::with_capacity(runs.iter().map(|(a, b)| b - a).sum());
        for &(a, b) in runs.iter().rev() {
            out.extend_from_slice(&self.tokens[a..b]);
        }
        Ok(out)
    }

    /// Protect `node` and its ancestors from eviction until a matching
    /// `unlock`. Locks nest (a count per node).
    pub fn lock(&mut self, node: NodeId) -> Result<()> {
        let idx = self.resolve(node)?;
        let mut cur = idx;
        while cur != NIL {
            let n = &mut self.nodes[cur as usize];
            if n.lock == u32::MAX {
                self.undo_lock(idx, cur);
                return Err(CoreError::TreeCapacity {
                    what: "lock count of a node",
                    limit: u64::from(u32::MAX),
                });
            }
            if n.lock == 0 {
                self.evictable_pages -= n.len as usize;
            }
            n.lock += 1;
            cur = n.parent;
        }
        self.nodes[idx as usize].own += 1;
        Ok(())
    }

    /// Undo `lock`'s increments from `idx` up to (not including) `stop`.
    fn undo_lock(&mut self, idx: u32, stop: u32) {
        let mut cur = idx;
        while cur != stop && cur != NIL {
            let n = &mut self.nodes[cur as usize];
            n.lock -= 1;
            if n.lock == 0 {
                self.evictable_pages += n.len as usize;
            }
            cur = n.parent;
        }
    }

    /// Release one `lock` taken on `node` (and its hold on the ancestors).
    /// Unlocking a node with no lock of its own (even if a descendant is
    /// locked) is [`CoreError::UnbalancedUnlock`] and changes nothing.
    pub fn unlock(&mut self, node: NodeId) -> Result<()> {
        let idx = self.resolve(node)?;
        if self.nodes[idx as usize].own == 0 {
            return Err(CoreError::UnbalancedUnlock { node: idx });
        }
        self.nodes[idx as usize].own -= 1;
        let mut cur = idx;
        while cur != NIL {
            // An ancestor's count is at least its descendant's, so >= 1 here.
            let n = &mut self.nodes[cur as usize];
            n.lock -= 1;
            let parent = n.parent;
            if n.lock == 0 {
                self.evictable_pages += n.len as usize;
                if n.children == 0 {
                    self.push_lru(cur);
                }
            }
            cur = parent;
        }
        Ok(())
    }

    /// Drop the tree's references to at least `n_pages` pages (when that
    /// many are evictable), least-recently-used unlocked leaves first; a
    /// parent whose last child goes becomes a candidate in turn. Returns the
    /// pages released.
    ///
    /// Whole leaves are evicted, as in SGLang: the last leaf may take the
    /// count past `n_pages` (the return value says by how much), and fewer
    /// are released only when nothing unlocked is left. The tree releases
    /// only its own reference, so a page still referenced by a running
    /// request stays allocated. Childless unlocked namespace roots met on the
    /// way are dropped too (they hold no pages). If the allocator refuses the
    /// release (a page the tree holds was released behind its back), nothing
    /// changes and the allocator's error is returned.
    pub fn evict(&mut self, n_pages: usize) -> Result<usize> {
        if n_pages == 0 {
            return Ok(0);
        }
        // Phase 1: choose victims, reversibly. A chosen node's clock is set
        // to u64::MAX so that its other heap entries are stale.
        let mut victims: Vec<(u32, u64)> = Vec::new();
        let mut ids: Vec<u32> = Vec::new();
        let mut released = 0usize;
        while released < n_pages {
            let Some(Reverse(e)) = self.lru.pop() else {
                break;
            };
            if !self.entry_current(e) {
                continue;
            }
            let n = &mut self.nodes[e.idx as usize];
            victims.push((e.idx, n.last_access));
            n.last_access = u64::MAX;
            let (start, len, parent) = (n.start as usize, n.len as usize, n.parent);
            if parent == NIL {
                continue;
            }
            ids.extend_from_slice(&self.pages[start..start + len]);
            released += len;
            let p = &mut self.nodes[parent as usize];
            p.children -= 1;
            if p.children == 0 && p.lock == 0 {
                self.lru.push(Reverse(LruEntry {
                    tick: p.last_access,
                    idx: parent,
                    gen: p.gen,
                }));
            }
        }
        // Phase 2: the one call that can fail. The tree holds one reference
        // per cached page: no repeats to count.
        if let Err(e) = self.allocator.release_held(&ids) {
            for &(idx, tick) in victims.iter().rev() {
                let n = &mut self.nodes[idx as usize];
                n.last_access = tick;
                let (parent, gen) = (n.parent, n.gen);
                self.lru.push(Reverse(LruEntry { tick, idx, gen }));
                if parent != NIL {
                    self.nodes[parent as usize].children += 1;
                }
            }
            return Err(e);
        }
        // Phase 3: commit. Children precede their parents in `victims`.
        self.evicted_pages += released as u64;
        for &(idx, _) in &victims {
            self.remove_node(idx);
        }
        self.maybe_compact_arena();
        if self.lru.len() > self.lru_limit {
            self.compact_lru();
        }
        Ok(released)
    }

    /// Drop everything: release every page reference the tree holds (one
    /// all-or-nothing allocator call) and free every node, locked or not.
    ///
    /// Locks do not hold pages, references do: a running request that keeps
    /// using cached pages must hold its own references (`retain`), which a
    /// reset leaves alone. Every handle issued before the reset becomes
    /// stale, so a later `unlock` of one is [`CoreError::InvalidNode`]. The
    /// node arena keeps its size (slot generations must survive, so stale
    /// handles stay detectable); the other tables are freed.
    pub fn reset(&mut self) -> Result<()> {
        let mut ids = Vec::with_capacity(self.cached_pages);
        for n in &self.nodes {
            if n.is_live() && !n.is_root() {
                let s = n.start as usize;
                ids.extend(
                    self.pages[s..s + n.len as usize]
                        .iter()
                        .map(|&p| i64::from(p)),
                );
            }
        }
        self.allocator.release(&ids)?;
        for idx in (0..self.nodes.len()).rev() {
            if self.nodes[idx].is_live() {
                self.free_node(idx as u32);
            }
        }
        let mix = Mix { seed: self.seed };
        self.edges = HashMap::with_hasher(mix);
        self.roots = HashMap::with_hasher(mix);
        self.lru = BinaryHeap::new();
        self.lru_limit = MIN_LRU_LIMIT;
        self.tokens = Vec::new();
        self.pages = Vec::new();
        self.dead_pages = 0;
        self.cached_pages = 0;
        self.evictable_pages = 0;
        self.inner_nodes = 0;
        self.root_nodes = 0;
        Ok(())
    }

    // ----- statistics -----------------------------------------------------------

    /// Pages in unlocked nodes: what repeated `evict` calls could release.
    pub fn evictable_pages(&self) -> usize {
        self.evictable_pages
    }

    /// Pages in locked nodes (a node is locked while it or a descendant is).
    pub fn locked_pages(&self) -> usize {
        self.cached_pages - self.evictable_pages
    }

    /// Pages the tree holds (one reference each).
    pub fn cached_pages(&self) -> usize {
        self.cached_pages
    }

    /// Tokens the tree holds: `cached_pages() * page_size()`.
    pub fn cached_tokens(&self) -> usize {
        self.cached_pages * self.page_size
    }

    /// Nodes that hold pages (namespace roots are not counted; see
    /// `namespace_count`).
    pub fn node_count(&self) -> usize {
        self.inner_nodes
    }

    /// Pages [`evict`](Self::evict) has released since the tree was made.
    pub fn evicted_pages(&self) -> u64 {
        self.evicted_pages
    }

    /// Namespaces with a root node.
    pub fn namespace_count(&self) -> usize {
        self.root_nodes
    }

    /// Every heap byte the tree holds, from the capacities of its arenas and
    /// tables (not counting the `RadixTree` value itself or the allocator).
    pub fn metadata_bytes(&self) -> usize {
        let entry = size_of::<(u64, u32)>();
        self.nodes.capacity() * size_of::<Node>()
            + self.tokens.capacity() * size_of::<u32>()
            + self.pages.capacity() * size_of::<u32>()
            + table_bytes(self.edges.capacity(), entry)
            + table_bytes(self.roots.capacity(), entry)
            + self.lru.capacity() * size_of::<Reverse<LruEntry>>()
    }

    /// Outstanding locks taken on `node` itself (not counting those of its
    /// descendants, which also protect it).
    pub fn lock_count(&self, node: NodeId) -> Result<u32> {
        let idx = self.resolve(node)?;
        Ok(self.nodes[idx as usize].own)
    }

    /// Tokens on the path from the namespace root to `node`.
    pub fn prefix_length(&self, node: NodeId) -> Result<usize> {
        let mut cur = self.resolve(node)?;
        let mut pages = 0usize;
        while cur != NIL {
            let n = &self.nodes[cur as usize];
            pages += n.len as usize;
            cur = n.parent;
        }
        Ok(pages * self.page_size)
    }

    /// Every cached page, once each, node by node.
    pub(crate) fn node_pages(&self) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.cached_pages);
        for n in &self.nodes {
            if n.is_live() && !n.is_root() {
                let s = n.start as usize;
                ids.extend_from_slice(&self.pages[s..s + n.len as usize]);
            }
        }
        ids
    }

    /// Every root-to-leaf path, sorted by (namespace, tokens). For tests and
    /// debugging: O(total path length), does not refresh recency.
    pub fn cached_sequences(&self) -> Vec<CachedSequence> {
        let ps = self.page_size;
        let mut out = Vec::new();
        let mut path = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.is_live() || n.is_root() || n.children != 0 {
                continue;
            }
            path.clear();
            let mut cur = i as u32;
            while !self.nodes[cur as usize].is_root() {
                path.push(cur);
                cur = self.nodes[cur as usize].parent;
            }
            let mut seq = CachedSequence {
                namespace: self.nodes[cur as usize].namespace(),
                tokens: Vec::new(),
                page_ids: Vec::new(),
            };
            for &c in path.iter().rev() {
                let (s, l) = (
                    self.nodes[c as usize].start as usize,
                    self.nodes[c as usize].len as usize,
                );
                seq.page_ids.extend_from_slice(&self.pages[s..s + l]);
                seq.tokens
                    .extend_from_slice(&self.tokens[s * ps..(s + l) * ps]);
            }
            out.push(seq);
        }
        out.sort_unstable();
        out
    }

    // ----- input ------------------------------------------------------------------

    /// Every id must name a referenced page.
    fn check_referenced(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let rc = self.allocator.refcount(ids)?;
        if let Some(i) = rc.iter().position(|&c| c == 0) {
            return Err(CoreError::InvalidHandle {
                page_id: ids[i],
                problem: HandleProblem::Free,
            });
        }
        Ok(())
    }

    /// The slot of a live handle.
    fn resolve(&self, node: NodeId) -> Result<u32> {
        let idx = node.slot();
        match self.nodes.get(idx as usize) {
            Some(n) if n.is_live() && n.gen == node.generation() => Ok(idx),
            _ => Err(CoreError::InvalidNode {
                node: node.to_raw(),
            }),
        }
    }

    #[inline]
    fn handle(&self, idx: u32) -> NodeId {
        NodeId(u64::from(self.nodes[idx as usize].gen) << 32 | u64::from(idx))
    }

    #[inline]
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    // ----- slots --------------------------------------------------------------------

    /// Fail unless `need` nodes can be allocated.
    fn ensure_slots(&self, need: usize) -> Result<()> {
        let new = need.saturating_sub(self.free_slots);
        if self.nodes.len() + new <= NIL as usize {
            Ok(())
        } else {
            Err(CoreError::TreeCapacity {
                what: "nodes",
                limit: u64::from(NIL),
            })
        }
    }

    /// Put `node` in a slot (after `ensure_slots`); sets its generation.
    fn alloc_node(&mut self, node: Node) -> u32 {
        if self.free_head != NIL {
            let idx = self.free_head;
            let slot = &mut self.nodes[idx as usize];
            self.free_head = slot.next;
            self.free_slots -= 1;
            *slot = Node {
                gen: slot.gen + 1,
                ..node
            };
            idx
        } else {
            let len = self.nodes.len();
            if len == self.nodes.capacity() {
                // Grow by 1/8, as the arenas: slack costs 40 bytes a slot.
                self.nodes.reserve_exact((len / 8).max(MIN_NODE_GROWTH));
            }
            self.nodes.push(Node { gen: 1, ..node });
            len as u32
        }
    }

    /// Free a slot: new (even) generation, onto the free list unless its
    /// generations are used up.
    fn free_node(&mut self, idx: u32) {
        let slot = &mut self.nodes[idx as usize];
        let gen = slot.gen + 1;
        *slot = Node { gen, ..Node::FREE };
        if gen < MAX_GEN {
            slot.next = self.free_head;
            self.free_head = idx;
            self.free_slots += 1;
        } else {
            self.retired_slots += 1;
        }
    }

    /// The root of `namespace`, created (with clock `t`) if missing.
    fn root_for(&mut self, namespace: u64, t: u64) -> u32 {
        if let Some(&r) = self.roots.get(&namespace) {
            return r;
        }
        let idx = self.alloc_node(Node {
            last_access: t,
            start: namespace as u32,
            next: (namespace >> 32) as u32,
            ..Node::FREE
        });
        self.roots.insert(namespace, idx);
        self.root_nodes += 1;
        idx
    }

    // ----- arena ------------------------------------------------------------------------

    /// Fail, changing nothing, unless [`ensure_arena`](Self::ensure_arena)
    /// of `extra` (or less) will succeed.
    fn check_arena_room(&self, extra: usize) -> Result<()> {
        let limit = NIL as usize;
        let mut len = self.pages.len();
        if len + extra > limit && self.dead_pages > 0 {
            len = self.cached_pages; // what compaction leaves
        }
        if len + extra > limit {
            return Err(CoreError::TreeCapacity {
                what: "pages in the tree's arena",
                limit: limit as u64,
            });
        }
        Ok(())
    }

    /// Make room for `extra` more arena pages: compact if the u32 offsets
    /// would overflow, grow by at least 1/8 (not 2x: the arena is most of
    /// the tree's memory).
    fn ensure_arena(&mut self, extra: usize) -> Result<()> {
        let limit = NIL as usize;
        if self.pages.len() + extra > limit && self.dead_pages > 0 {
            self.compact_arena(extra);
        }
        if self.pages.len() + extra > limit {
            return Err(CoreError::TreeCapacity {
                what: "pages in the tree's arena",
                limit: limit as u64,
            });
        }
        let len = self.pages.len();
        if len + extra > self.pages.capacity() {
            let want = (len + extra)
                .max(len + (len / 8).max(MIN_ARENA_GROWTH))
                .min(limit);
            self.pages.reserve_exact(want - len);
            let tlen = self.tokens.len();
            self.tokens.reserve_exact(want * self.page_size - tlen);
        }
        Ok(())
    }

    fn maybe_compact_arena(&mut self) {
        if self.cached_pages == 0 {
            self.tokens.clear();
            self.pages.clear();
            self.dead_pages = 0;
        } else if self.dead_pages >= MIN_COMPACT_PAGES && self.dead_pages * 8 > self.cached_pages {
            self.compact_arena(0);
        }
    }

    /// Copy every live key into fresh arenas (room for `extra` more pages
    /// plus 1/8), dropping dead pages. O(live pages).
    fn compact_arena(&mut self, extra: usize) {
        let ps = self.page_size;
        let live = self.cached_pages;
        let cap = live + extra + live / 8;
        let mut pages = Vec::with_capacity(cap);
        let mut tokens = Vec::with_capacity(cap * ps);
        for n in &mut self.nodes {
            if n.is_live() && !n.is_root() {
                let (s, l) = (n.start as usize, n.len as usize);
                n.start = pages.len() as u32;
                pages.extend_from_slice(&self.pages[s..s + l]);
                tokens.extend_from_slice(&self.tokens[s * ps..(s + l) * ps]);
            }
        }
        self.pages = pages;
        self.tokens = tokens;
        self.dead_pages = 0;
    }

    /// The first page of a non-root node's key.
    #[inline]
    fn first_page(&self, idx: u32) -> &[u32] {
        let s = self.nodes[idx as usize].start as usize * self.page_size;
        &self.tokens[s..s + self.page_size]
    }

    // ----- edges ------------------------------------------------------------------------

    /// 32-bit key of a page: the token itself at page_size 1 (exact), else
    /// a seeded hash of the page (collisions are chained through `next`).
    #[inline]
    fn page_key(&self, page: &[u32]) -> u32 {
        if let [t] = page {
            return *t;
        }
        let mut h = self.seed;
        for pair in page.chunks_exact(2) {
            let x = u64::from(pair[0]) | u64::from(pair[1]) << 32;
            h = (h.rotate_left(23) ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        let h = mix64(h);
        (h ^ (h >> 32)) as u32
    }

    #[inline]
    fn edge_key(&self, parent: u32, page: &[u32]) -> u64 {
        u64::from(parent) << 32 | u64::from(self.page_key(page))
    }

    /// The edge-table key of a non-root node.
    #[inline]
    fn key_of(&self, idx: u32) -> u64 {
        self.edge_key(self.nodes[idx as usize].parent, self.first_page(idx))
    }

    /// The child of `parent` whose key starts with `page`.
    #[inline]
    fn find_child(&self, parent: u32, page: &[u32]) -> Option<u32> {
        let mut c = *self.edges.get(&self.edge_key(parent, page))?;
        while c != NIL {
            if self.first_page(c) == page {
                return Some(c);
            }
            c = self.nodes[c as usize].next;
        }
        None
    }

    /// Enter a non-root node (parent and key set) in the edge table.
    fn link(&mut self, idx: u32) {
        let key = self.key_of(idx);
        let next = match self.edges.entry(key) {
            Entry::Occupied(mut e) => e.insert(idx),
            Entry::Vacant(e) => {
                e.insert(idx);
                NIL
            }
        };
        self.nodes[idx as usize].next = next;
    }

    /// Remove a non-root node from the edge table.
    fn unlink(&mut self, idx: u32) {
        let key = self.key_of(idx);
        let next = self.nodes[idx as usize].next;
        let Some(&head) = self.edges.get(&key) else {
            return;
        };
        if head == idx {
            if next == NIL {
                self.edges.remove(&key);
            } else {
                self.edges.insert(key, next);
            }
            return;
        }
        self.relink_after(head, idx, next);
    }

    /// In the sibling chain starting at `head`, make the node whose `next` is
    /// `target` point to `new_next` instead.
    fn relink_after(&mut self, head: u32, target: u32, new_next: u32) {
        let mut p = head;
        while p != NIL {
            let pn = self.nodes[p as usize].next;
            if pn == target {
                self.nodes[p as usize].next = new_next;
                return;
            }
            p = pn;
        }
    }

    /// Put `new` where `old` is in the edge table (same parent, same first
    /// page); `new.next` must already be `old.next`.
    fn replace_in_chain(&mut self, old: u32, new: u32) {
        let key = self.key_of(old);
        match self.edges.get_mut(&key) {
            Some(head) if *head == old => *head = new,
            Some(&mut head) => self.relink_after(head, old, new),
            None => {}
        }
    }

    // ----- walking ------------------------------------------------------------------------

    /// Walk down `namespace`'s tree along `tokens` (the bits of `int32`s, a
    /// trailing partial page included), changing nothing, and validate the
    /// tokens past the matched prefix: the matched ones equal the tree's,
    /// which are valid, so each token is read once, compared or checked.
    /// With `ids` (one per whole page), the walk also collects the caller's
    /// ids along the prefix that are not the tree's pages there.
    fn locate<P: PageArg>(
        &self,
        tokens: &[u32],
        namespace: u64,
        ids: Option<&[P]>,
    ) -> Result<Path> {
        let ps = self.page_size;
        let whole = tokens.len() / ps * ps;
        let path = match self.roots.get(&namespace) {
            Some(&root) => self.walk(root, &tokens[..whole], ids),
            None => Path::default(),
        };
        let from = path.pages * ps;
        check_token_bits(&tokens[from..], from)?;
        Ok(path)
    }

    /// Walk down from `root` along `toks` (whole pages), changing nothing:
    /// which nodes match, and how far. One comparison pass over the tokens;
    /// with `ids` (one per page), one over the ids of the matched pages in
    /// the same loop, collecting those that are not the tree's.
    fn walk<P: PageArg>(&self, root: u32, toks: &[u32], ids: Option<&[P]>) -> Path {
        let ps = self.page_size;
        let total = toks.len() / ps;
        let (mut node, mut pos) = (root, 0usize);
        let mut path = Path::default();
        while pos < total {
            let rest = &toks[pos * ps..];
            let Some(child) = self.find_child(node, &rest[..ps]) else {
                break;
            };
            path.nodes.push(child);
            let c = &self.nodes[child as usize];
            let (start, len) = (c.start as usize, c.len as usize);
            let avail = len.min(total - pos);
            let m = first_mismatch(
                &self.tokens[start * ps..(start + avail) * ps],
                &rest[..avail * ps],
            ) / ps;
            if let Some(ids) = ids {
                let (given, own) = (&ids[pos..pos + m], &self.pages[start..start + m]);
                if !P::same(given, own) {
                    for (&g, &p) in given.iter().zip(own) {
                        if g.value() != i64::from(p) {
                            path.foreign.push(g.value());
                        }
                    }
                }
            }
            pos += m;
            if m < len {
                // m >= 1: `find_child` matched the first page.
                path.split = Some(m as u32);
                break;
            }
            node = child;
        }
        path.pages = pos;
        path
    }

    /// The page ids of the pages `path` matched, in order.
    fn path_page_ids(&self, path: &Path) -> Vec<u32> {
        let mut out = Vec::with_capacity(path.pages);
        for (i, &n) in path.nodes.iter().enumerate() {
            let c = &self.nodes[n as usize];
            let take = match path.split {
                Some(keep) if i + 1 == path.nodes.len() => keep,
                _ => c.len,
            } as usize;
            out.extend_from_slice(&self.pages[c.start as usize..c.start as usize + take]);
        }
        out
    }

    /// Make `path` (from [`walk`](Self::walk), the tree unchanged since)
    /// the tree's: refresh the clock of every node on it to `t` (as SGLang,
    /// a node is refreshed even when only part of it matches) and split the
    /// node where the match ends inside one, so that the returned node's
    /// path is exactly the matched prefix.
    fn apply(&mut self, root: u32, path: &Path, t: u64) -> Walk {
        self.nodes[root as usize].last_access = t;
        for &n in &path.nodes {
            self.nodes[n as usize].last_access = t;
        }
        let last = path.nodes.last().copied().unwrap_or(root);
        let node = match path.split {
            Some(keep) => self.split(last, keep),
            None => last,
        };
        Walk {
            node,
            pages: path.pages,
            last,
        }
    }

    /// Split `child` after `keep` pages: a new node takes the upper part and
    /// `child`'s place under its parent; `child` keeps the lower part, its
    /// slot, handle and clock. The new node is stamped with a fresh tick
    /// (SGLang's new node is created after the walk's timestamp) and copies
    /// the child's lock count. No page or token moves.
    fn split(&mut self, child: u32, keep: u32) -> u32 {
        let c = self.nodes[child as usize];
        let t = self.tick();
        let mid = self.alloc_node(Node {
            last_access: t,
            start: c.start,
            len: keep,
            parent: c.parent,
            next: c.next,
            gen: 0,
            lock: c.lock,
            own: 0,
            children: 1,
        });
        self.replace_in_chain(child, mid);
        let cn = &mut self.nodes[child as usize];
        cn.start += keep;
        cn.len -= keep;
        cn.parent = mid;
        self.link(child);
        self.inner_nodes += 1;
        mid
    }

    /// A new unlocked leaf under `parent` holding `toks` / `ids` (validated,
    /// retained, arena room reserved).
    fn add_leaf<P: PageArg>(&mut self, parent: u32, toks: &[u32], ids: &[P]) {
        let start = self.pages.len() as u32;
        // Page ids are below PAGE_ID_LIMIT (validated by the caller).
        P::store(ids, &mut self.pages);
        self.tokens.extend_from_slice(toks);
        let len = ids.len();
        let t = self.tick();
        let idx = self.alloc_node(Node {
            last_access: t,
            start,
            len: len as u32,
            parent,
            ..Node::FREE
        });
        self.link(idx);
        self.nodes[parent as usize].children += 1;
        self.cached_pages += len;
        self.evictable_pages += len;
        self.inner_nodes += 1;
        self.push_lru(idx);
    }

    /// Remove a chosen victim (a childless, unlocked node) for good.
    fn remove_node(&mut self, idx: u32) {
        let n = self.nodes[idx as usize];
        if n.is_root() {
            self.roots.remove(&n.namespace());
            self.root_nodes -= 1;
        } else {
            self.unlink(idx);
            let len = n.len as usize;
            self.cached_pages -= len;
            self.evictable_pages -= len;
            self.dead_pages += len;
            self.inner_nodes -= 1;
        }
        self.free_node(idx);
    }

    // ----- LRU ------------------------------------------------------------------------------

    #[inline]
    fn entry_current(&self, e: LruEntry) -> bool {
        self.nodes
            .get(e.idx as usize)
            .is_some_and(|n| n.gen == e.gen && n.last_access == e.tick && n.is_evictable_leaf())
    }

    /// Give an unlocked leaf a heap entry for its current clock.
    fn refresh(&mut self, idx: u32) {
        if self.nodes[idx as usize].is_evictable_leaf() {
            self.push_lru(idx);
        }
    }

    fn push_lru(&mut self, idx: u32) {
        let n = &self.nodes[idx as usize];
        self.lru.push(Reverse(LruEntry {
            tick: n.last_access,
            idx,
            gen: n.gen,
        }));
        if self.lru.len() > self.lru_limit {
            self.compact_lru();
        }
    }

    /// Drop stale and duplicate heap entries. Amortised O(log n) per push:
    /// the limit doubles the surviving size.
    fn compact_lru(&mut self) {
        let mut v = std::mem::take(&mut self.lru).into_vec();
        v.retain(|&Reverse(e)| self.entry_current(e));
        v.sort_unstable();
        v.dedup();
        self.lru = BinaryHeap::from(v);
        self.lru_limit = (2 * self.lru.len()).max(MIN_LRU_LIMIT);
    }

    // ----- invariants ------------------------------------------------------------------------

    /// Check every structural invariant and the tree's agreement with the
    /// allocator; returns the first breach as [`CoreError::Malformed`].
    /// O(nodes + cached pages); for tests, fuzzers and debugging.
    ///
    /// Checked: arenas sized consistently and node keys disjoint; free list
    /// and slot generations; parent/child links and child counts; every
    /// non-root reachable from its parent by its first page, and siblings
    /// distinct by first page; edge and root tables hold exactly the live
    /// nodes; no cycles; each lock count is its own locks plus its children's;
    /// cached / evictable / locked page counters; every unlocked leaf has a
    /// current LRU entry; every cached page is referenced in the allocator
    /// at least as often as the tree holds it.
    pub fn check_invariants(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::Malformed(format!("radix tree: {m}")));
        let ps = self.page_size;
        let n_slots = self.nodes.len();
        if n_slots > NIL as usize {
            return bad(format!("{n_slots} slots exceed the index space"));
        }
        if self.tokens.len() != self.pages.len() * ps {
            return bad(format!(
                "token arena holds {} tokens for {} pages of {ps}",
                self.tokens.len(),
                self.pages.len()
            ));
        }

        // Free list.
        let mut free = 0usize;
        let mut f = self.free_head;
        while f != NIL {
            let Some(n) = self.nodes.get(f as usize) else {
                return bad(format!("free list names slot {f} of {n_slots}"));
            };
            if n.is_live() {
                return bad(format!("live slot {f} is on the free list"));
            }
            free += 1;
            if free > n_slots {
                return bad("free list has a cycle".into());
            }
            f = n.next;
        }
        if free != self.free_slots {
            return bad(format!(
                "free list has {free} slots, counter says {}",
                self.free_slots
            ));
        }

        // Nodes.
        let mut children = vec![0u32; n_slots];
        let mut lock_sum = vec![0u64; n_slots];
        let mut ranges = Vec::new();
        let (mut inner, mut roots, mut retired) = (0usize, 0usize, 0usize);
        let (mut cached, mut evictable) = (0usize, 0usize);
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.is_live() {
                if n.gen >= MAX_GEN {
                    retired += 1;
                }
                continue;
            }
            if n.gen > MAX_GEN {
                return bad(format!("node {i} has generation {} past {MAX_GEN}", n.gen));
            }
            if n.last_access > self.clock {
                return bad(format!(
                    "node {i} was accessed at {} after the clock {}",
                    n.last_access, self.clock
                ));
            }
            if n.is_root() {
                roots += 1;
                if n.len != 0 {
                    return bad(format!("root {i} holds {} pages", n.len));
                }
                if self.roots.get(&n.namespace()) != Some(&(i as u32)) {
                    return bad(format!(
                        "root {i} of namespace {} is not in the root table",
                        n.namespace()
                    ));
                }
                continue;
            }
            inner += 1;
            let p = n.parent as usize;
            if !self.nodes.get(p).is_some_and(Node::is_live) {
                return bad(format!("node {i} has dead parent {p}"));
            }
            let (s, l) = (n.start as usize, n.len as usize);
            if l == 0 || s + l > self.pages.len() {
                return bad(format!(
                    "node {i} key pages {s}..{} outside the arena of {}",
                    s + l,
                    self.pages.len()
                ));
            }
            ranges.push((s, s + l));
            children[p] += 1;
            lock_sum[p] += u64::from(n.lock);
            cached += l;
            if n.lock == 0 {
                evictable += l;
            }
            if self.find_child(n.parent, self.first_page(i as u32)) != Some(i as u32) {
                return bad(format!(
                    "node {i} is not found from its parent {p} by its first page \
                     (missing edge, or a sibling with the same first page)"
                ));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.is_live() {
                continue;
            }
            if n.children != children[i] {
                return bad(format!(
                    "node {i} counts {} children, {} point at it",
                    n.children, children[i]
                ));
            }
            if u64::from(n.lock) != u64::from(n.own) + lock_sum[i] {
                return bad(format!(
                    "node {i} lock count {} != its own {} + its children's {}",
                    n.lock, n.own, lock_sum[i]
                ));
            }
        }
        if inner + roots + free + retired != n_slots {
            return bad(format!(
                "{inner} nodes + {roots} roots + {free} free + {retired} retired != {n_slots} slots"
            ));
        }
        if retired != self.retired_slots {
            return bad(format!(
                "{retired} retired slots, counter says {}",
                self.retired_slots
            ));
        }
        if inner != self.inner_nodes || roots != self.root_nodes {
            return bad(format!(
                "{inner} nodes and {roots} roots, counters say {} and {}",
                self.inner_nodes, self.root_nodes
            ));
        }
        if roots != self.roots.len() {
            return bad(format!(
                "{roots} roots, root table holds {}",
                self.roots.len()
            ));
        }
        if cached != self.cached_pages || evictable != self.evictable_pages {
            return bad(format!(
                "{cached} cached / {evictable} evictable pages, counters say {} / {}",
                self.cached_pages, self.evictable_pages
            ));
        }
        if self.locked_pages() + self.evictable_pages != self.cached_pages {
            return bad("locked + evictable != cached pages".into());
        }

        // Arena.
        ranges.sort_unstable();
        if ranges.windows(2).any(|w| w[0].1 > w[1].0) {
            return bad("two nodes share arena pages".into());
        }
        if self.dead_pages + cached != self.pages.len() {
            return bad(format!(
                "{} dead + {cached} live pages != arena of {}",
                self.dead_pages,
                self.pages.len()
            ));
        }

        // Edge table: exactly the live non-roots, each under its own key.
        let mut chained = 0usize;
        for (&key, &head) in &self.edges {
            let mut c = head;
            while c != NIL {
                let Some(n) = self.nodes.get(c as usize) else {
                    return bad(format!("edge table names slot {c}"));
                };
                if !n.is_live() || n.is_root() || self.key_of(c) != key {
                    return bad(format!(
                        "edge table entry {key:#x} holds node {c} of another key"
                    ));
                }
                chained += 1;
                if chained > inner {
                    return bad("edge table chains hold more entries than nodes".into());
                }
                c = n.next;
            }
        }
        if chained != inner {
            return bad(format!("edge table holds {chained} nodes of {inner}"));
        }

        // Every node reaches a root (no cycles).
        let mut reaches = vec![false; n_slots];
        let mut stack = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.is_live() {
                continue;
            }
            let mut c = i as u32;
            stack.clear();
            while !reaches[c as usize] && !self.nodes[c as usize].is_root() {
                stack.push(c);
                if stack.len() > n_slots {
                    return bad(format!("node {i}'s ancestors form a cycle"));
                }
                c = self.nodes[c as usize].parent;
            }
            reaches[c as usize] = true;
            for &s in &stack {
                reaches[s as usize] = true;
            }
        }

        // LRU: every unlocked leaf has a current entry.
        if self.lru.len() > self.lru_limit {
            return bad(format!(
                "LRU heap holds {} entries, limit {}",
                self.lru.len(),
                self.lru_limit
            ));
        }
        let entries: HashSet<LruEntry> = self.lru.iter().map(|r| r.0).collect();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.is_evictable_leaf() {
                let e = LruEntry {
                    tick: n.last_access,
                    idx: i as u32,
                    gen: n.gen,
                };
                if !entries.contains(&e) {
                    return bad(format!("unlocked leaf {i} has no current LRU entry"));
                }
            }
        }

        // Every cached page is referenced at least as often as it is cached.
        let mut held: HashMap<u32, u32> = HashMap::new();
        for n in &self.nodes {
            if n.is_live() && !n.is_root() {
                let s = n.start as usize;
                for &p in &self.pages[s..s + n.len as usize] {
                    *held.entry(p).or_insert(0) += 1;
                }
            }
        }
        let distinct: Vec<i64> = held.keys().map(|&p| i64::from(p)).collect();
        let rc = match self.allocator.refcount(&distinct) {
            Ok(rc) => rc,
            Err(e) => return bad(format!("a cached page is not a live page: {e}")),
        };
        for (&p, &c) in distinct.iter().zip(&rc) {
            let times = held.get(&(p as u32)).copied().unwrap_or(0);
            if c < times {
                return bad(format!(
                    "page {p} is cached {times} times but its refcount is {c}"
                ));
            }
        }
        Ok(())
    }
}

/// A page id as a caller passes it: an `i64`, or a `u32` holding the bits of
/// an `int32` (an `int32` array read in place), whose value is its `int32`
/// reading, so that a bad id is refused with the value the caller gave.
trait PageArg: Copy {
    /// The id's value, as the allocator checks it and errors report it.
    fn value(self) -> i64;
    /// Whether `ids` are exactly the tree's `pages` (same length).
    fn same(ids: &[Self], pages: &[u32]) -> bool;
    /// Append `ids` (validated: each below 2^31) to the tree's page arena.
    fn store(ids: &[Self], arena: &mut Vec<u32>);
}

impl PageArg for i64 {
    #[inline]
    fn value(self) -> i64 {
        self
    }
    #[inline]
    fn same(ids: &[Self], pages: &[u32]) -> bool {
        ids.iter().zip(pages).all(|(&i, &p)| i == i64::from(p))
    }
    fn store(ids: &[Self], arena: &mut Vec<u32>) {
        arena.extend(ids.iter().map(|&p| p as u32));
    }
}

impl PageArg for u32 {
    #[inline]
    fn value(self) -> i64 {
        i64::from(self as i32)
    }
    #[inline]
    fn same(ids: &[Self], pages: &[u32]) -> bool {
        ids == pages
    }
    fn store(ids: &[Self], arena: &mut Vec<u32>) {
        arena.extend_from_slice(ids);
    }
}

/// The values of `ids`, for the allocator's calls.
fn values<P: PageArg>(ids: &[P]) -> Vec<i64> {
    ids.iter().map(|&p| p.value()).collect()
}

/// Every token, the bits of an `int32`, must be below 2^31 (a non-negative
/// `int32`), else [`CoreError::InvalidToken`] naming the first bad one by its
/// `int32` value and its index plus `base`. One branch-free pass.
pub(crate) fn check_token_bits(tokens: &[u32], base: usize) -> Result<()> {
    let any = tokens.iter().fold(0u32, |acc, &t| acc | t);
    if any < 1 << 31 {
        return Ok(());
    }
    match tokens.iter().position(|&t| t >= 1 << 31) {
        Some(i) => Err(CoreError::InvalidToken {
            index: base + i,
            value: i64::from(tokens[i] as i32),
        }),
        None => Ok(()),
    }
}

/// `insert` takes one page id per whole page of tokens.
fn check_page_count(given: usize, n_pages: usize) -> Result<()> {
    if given == n_pages {
        return Ok(());
    }
    Err(CoreError::LengthMismatch {
        what: "insert: page_ids must hold one id per whole page of tokens \
               (tokens.len() / page_size)",
        expected: n_pages as u64,
        actual: given as u64,
    })
}

/// `tokens` as `u32`s, each checked to be in `0..2^31` in the same pass
/// (else [`CoreError::InvalidToken`] naming the first bad one).
pub(crate) fn tokens_u32<T: Copy + Into<i64>>(tokens: &[T]) -> Result<Vec<u32>> {
    let mut any = 0u64;
    let out: Vec<u32> = tokens
        .iter()
        .map(|&t| {
            let v = t.into() as u64;
            any |= v;
            v as u32
        })
        .collect();
    if any >= TOKEN_LIMIT as u64 {
        check_tokens(tokens)?;
    }
    Ok(out)
}

/// Every token must be in `0..2^31`, else [`CoreError::InvalidToken`] naming
/// the first bad one.
pub(crate) fn check_tokens<T: Copy + Into<i64>>(tokens: &[T]) -> Result<()> {
    // Every value is in 0..2^31 iff the OR of their u64 forms is below 2^31
    // (a negative value sets the top bit): one branch-free pass.
    let any = tokens.iter().fold(0u64, |acc, &t| acc | t.into() as u64);
    if any >= TOKEN_LIMIT as u64 {
        for (index, &t) in tokens.iter().enumerate() {
            let value: i64 = t.into();
            if !(0..TOKEN_LIMIT).contains(&value) {
                return Err(CoreError::InvalidToken { index, value });
            }
        }
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn setup(page_size: u32, pages: u32) -> (Arc<SegmentAllocator>, RadixTree) {
        let a = Arc::new(SegmentAllocator::new(page_size, pages).unwrap());
        a.add_segment().unwrap();
        let t = RadixTree::new(Arc::clone(&a));
        (a, t)
    }

    fn i64s(v: &[u32]) -> Vec<i64> {
        v.iter().map(|&x| i64::from(x)).collect()
    }

    /// Allocate pages for `tokens`, insert, release the caller's references.
    fn put(a: &SegmentAllocator, t: &mut RadixTree, tokens: &[u32], ns: u64) -> (usize, Vec<u32>) {
        let ids = a.alloc(tokens.len() / t.page_size()).unwrap();
        let cached = t.insert(tokens, &ids, ns).unwrap();
        a.release(&i64s(&ids)).unwrap();
        t.check_invariants().unwrap();
        a.check_invariants().unwrap();
        (cached, ids)
    }

    fn check(a: &SegmentAllocator, t: &RadixTree) {
        t.check_invariants().unwrap();
        a.check_invariants().unwrap();
    }

    #[test]
    fn first_mismatch_finds_the_first_difference() {
        let a: Vec<u32> = (0..2000).collect();
        for len in [0, 1, 31, 32, 33, 511, 512, 513, 1100, 2000] {
            assert_eq!(first_mismatch(&a[..len], &a), len);
            assert_eq!(first_mismatch(&a, &a[..len]), len);
            for at in [0, 1, 31, 32, 100, 511, 512, 544, 1099] {
                if at < len {
                    let mut b = a[..len].to_vec();
                    b[at] = u32::MAX;
                    assert_eq!(first_mismatch(&a, &b), at, "len {len} at {at}");
                }
            }
        }
    }

    #[test]
    fn node_size_is_pinned() {
        assert_eq!(size_of::<Node>(), 40);
        assert_eq!(size_of::<LruEntry>(), 16);
    }

    #[test]
    fn tree_can_live_behind_a_mutex() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<RadixTree>();
    }

    #[test]
    fn insert_then_match_page_size_1() {
        let (a, mut t) = setup(1, 64);
        let (cached, ids) = put(&a, &mut t, &[1, 2, 3, 4, 5], 0);
        assert_eq!(cached, 0);
        assert_eq!(t.cached_tokens(), 5);
        assert_eq!(a.refcount(&i64s(&ids)).unwrap(), vec![1; 5]);
        let m = t.match_prefix(&[1u32, 2, 3, 4, 5, 6], 0).unwrap();
        assert_eq!(m.length, 5);
        assert_eq!(m.page_ids, ids);
        let m = t.match_prefix(&[9u32], 0).unwrap();
        assert_eq!(m.length, 0);
        assert!(m.page_ids.is_empty());
        check(&a, &t);
    }

    #[test]
    fn partial_match_splits_and_keeps_handles() {
        let (a, mut t) = setup(1, 64);
        let (_, ids) = put(&a, &mut t, &[1, 2, 3, 4, 5, 6], 0);
        let full = t.match_prefix(&[1u32, 2, 3, 4, 5, 6], 0).unwrap().node;
        t.lock(full).unwrap();
        assert_eq!(t.node_count(), 1);
        let m = t.match_prefix(&[1u32, 2, 3, 9], 0).unwrap();
        assert_eq!(m.length, 3);
        assert_eq!(m.page_ids, ids[..3]);
        assert_eq!(t.node_count(), 2);
        assert_eq!(t.prefix_length(m.node).unwrap(), 3);
        // The split node is protected by the lock below it but holds none of
        // its own; the old handle still names the full path.
        assert_eq!(t.lock_count(m.node).unwrap(), 0);
        assert_eq!(t.lock_count(full).unwrap(), 1);
        assert!(matches!(
            t.unlock(m.node),
            Err(CoreError::UnbalancedUnlock { .. })
        ));
        assert_eq!(t.prefix_length(full).unwrap(), 6);
        assert_eq!(t.locked_pages(), 6);
        t.unlock(full).unwrap();
        assert_eq!(t.evictable_pages(), 6);
        check(&a, &t);
        // A divergent insert hangs below the split node.
        let (cached, _) = put(&a, &mut t, &[1, 2, 3, 7, 8], 0);
        assert_eq!(cached, 3);
        assert_eq!(t.node_count(), 3);
        assert_eq!(t.cached_tokens(), 8);
    }

    #[test]
    fn insert_keeps_tree_pages_for_cached_part() {
        let (a, mut t) = setup(1, 64);
        let (_, first) = put(&a, &mut t, &[1, 2, 3], 0);
        let dup = a.alloc(5).unwrap();
        let cached = t.insert(&[1u32, 2, 3, 4, 5], &dup, 0).unwrap();
        assert_eq!(cached, 3);
        // The caller's duplicates were not retained, its new pages were.
        assert_eq!(a.refcount(&i64s(&dup)).unwrap(), vec![1, 1, 1, 2, 2]);
        a.release(&i64s(&dup)).unwrap();
        let m = t.match_prefix(&[1u32, 2, 3, 4, 5], 0).unwrap();
        assert_eq!(m.page_ids, [&first[..], &dup[3..]].concat());
        // Re-inserting everything cached retains nothing.
        let again = a.alloc(5).unwrap();
        assert_eq!(t.insert(&[1u32, 2, 3, 4, 5], &again, 0).unwrap(), 5);
        assert_eq!(a.refcount(&i64s(&again)).unwrap(), vec![1; 5]);
        a.release(&i64s(&again)).unwrap();
        check(&a, &t);
    }

    #[test]
    fn namespaces_are_isolated() {
        let (a, mut t) = setup(1, 64);
        put(&a, &mut t, &[1, 2, 3], 7);
        assert_eq!(t.match_prefix(&[1u32, 2, 3], 8).unwrap().length, 0);
        assert_eq!(t.match_prefix(&[1u32, 2, 3], 7).unwrap().length, 3);
        let (cached, _) = put(&a, &mut t, &[1, 2, 3], u64::MAX);
        assert_eq!(cached, 0);
        assert_eq!(t.namespace_count(), 3);
        let seqs = t.cached_sequences();
        assert_eq!(seqs.len(), 2);
        assert_eq!(seqs[0].namespace, 7);
        assert_eq!(seqs[1].namespace, u64::MAX);
        check(&a, &t);
        // Empty roots are collected by evict.
        assert_eq!(t.evict(usize::MAX).unwrap(), 6);
        assert_eq!(t.namespace_count(), 0);
        assert_eq!(a.free_pages(), 64);
        check(&a, &t);
    }

    #[test]
    fn page_size_16_ignores_partial_pages() {
        let (a, mut t) = setup(16, 64);
        let toks: Vec<u32> = (0..40).collect();
        // 40 tokens = 2 whole pages.
        let bad = a.alloc(3).unwrap();
        assert!(matches!(
            t.insert(&toks, &bad, 0),
            Err(CoreError::LengthMismatch {
                expected: 2,
                actual: 3,
                ..
            })
        ));
        a.release(&i64s(&bad)).unwrap();
        let (cached, ids) = put(&a, &mut t, &toks, 0);
        assert_eq!((cached, ids.len(), t.cached_tokens()), (0, 2, 32));
        let m = t.match_prefix(&toks[..31], 0).unwrap();
        assert_eq!((m.length, m.page_ids.clone()), (16, ids[..1].to_vec()));
        // A difference inside the second page stops the match at page 1 and
        // splits there.
        let mut other = toks.clone();
        other[20] = 999;
        let m = t.match_prefix(&other, 0).unwrap();
        assert_eq!(m.length, 16);
        assert_eq!(t.node_count(), 2);
        let (cached, _) = put(&a, &mut t, &other, 0);
        assert_eq!(cached, 16);
        assert_eq!(t.node_count(), 3);
        // Two children of one parent whose first pages share their first
        // token but differ later.
        assert_eq!(t.match_prefix(&toks, 0).unwrap().length, 32);
        assert_eq!(t.match_prefix(&other, 0).unwrap().length, 32);
        check(&a, &t);
    }

    #[test]
    fn lock_protects_and_unlock_is_balanced() {
        let (a, mut t) = setup(1, 64);
        put(&a, &mut t, &[1, 2, 3], 0);
        put(&a, &mut t, &[1, 2, 4], 0);
        let m = t.match_prefix(&[1u32, 2, 3], 0).unwrap();
        t.lock(m.node).unwrap();
        t.lock(m.node).unwrap();
        assert_eq!(t.locked_pages(), 3);
        assert_eq!(t.evictable_pages(), 1);
        assert_eq!(t.evict(10).unwrap(), 1);
        assert_eq!(t.cached_tokens(), 3);
        t.unlock(m.node).unwrap();
        assert_eq!(t.evict(10).unwrap(), 0);
        t.unlock(m.node).unwrap();
        assert!(matches!(
            t.unlock(m.node),
            Err(CoreError::UnbalancedUnlock { .. })
        ));
        assert_eq!(t.evictable_pages(), 3);
        check(&a, &t);
        assert_eq!(t.evict(1).unwrap(), 1);
        // The parent became a leaf and goes on the next call.
        assert_eq!(t.evict(1).unwrap(), 2);
        assert_eq!(a.free_pages(), 64);
        check(&a, &t);
    }

    #[test]
    fn eviction_is_least_recently_used_first() {
        let (a, mut t) = setup(1, 64);
        put(&a, &mut t, &[1, 1], 0);
        put(&a, &mut t, &[2, 2], 0);
        put(&a, &mut t, &[3, 3], 0);
        t.match_prefix(&[1u32], 0).unwrap(); // splits [1,1]; refreshes it
        t.match_prefix(&[2u32, 2], 0).unwrap();
        // [3,3] is the oldest, then [1,1]'s lower half, then [2,2].
        assert_eq!(t.evict(1).unwrap(), 2);
        assert_eq!(t.match_prefix(&[3u32, 3], 0).unwrap().length, 0);
        assert_eq!(t.evict(1).unwrap(), 1);
        assert_eq!(t.cached_sequences()[0].tokens, vec![1]);
        check(&a, &t);
        // Now [1] (the split node, fresher than [1,1]'s lower half was) and
        // [2,2] (fresher still).
        assert_eq!(t.evict(1).unwrap(), 1);
        assert_eq!(t.cached_sequences().len(), 1);
        assert_eq!(t.cached_sequences()[0].tokens, vec![2, 2]);
        check(&a, &t);
    }

    #[test]
    fn evict_keeps_pages_a_request_references() {
        let (a, mut t) = setup(1, 8);
        put(&a, &mut t, &[1, 2, 3], 0);
        let m = t.match_prefix(&[1u32, 2, 3], 0).unwrap();
        a.retain(&i64s(&m.page_ids)).unwrap();
        assert_eq!(t.evict(3).unwrap(), 3);
        assert_eq!(a.free_pages(), 5);
        assert_eq!(a.refcount(&i64s(&m.page_ids)).unwrap(), vec![1; 3]);
        a.release(&i64s(&m.page_ids)).unwrap();
        assert_eq!(a.free_pages(), 8);
        check(&a, &t);
    }

    #[test]
    fn stale_handles_are_refused() {
        let (a, mut t) = setup(1, 8);
        put(&a, &mut t, &[1, 2], 0);
        let old = t.match_prefix(&[1u32, 2], 0).unwrap().node;
        assert_eq!(t.evict(100).unwrap(), 2);
        put(&a, &mut t, &[5, 6], 0);
        let new = t.match_prefix(&[5u32, 6], 0).unwrap().node;
        assert_eq!(new.slot(), old.slot(), "slot reused");
        assert_ne!(new, old);
        assert!(matches!(t.lock(old), Err(CoreError::InvalidNode { .. })));
        assert!(matches!(t.unlock(old), Err(CoreError::InvalidNode { .. })));
        assert!(matches!(
            t.lock(NodeId::from_raw(-1)),
            Err(CoreError::InvalidNode { node: -1 })
        ));
        assert!(t.lock(NodeId::from_raw(1 << 40 | 9999)).is_err());
        t.lock(new).unwrap();
        t.unlock(new).unwrap();
        check(&a, &t);
    }

    #[test]
    fn errors_change_nothing() {
        let (a, mut t) = setup(1, 16);
        put(&a, &mut t, &[1, 2, 3], 0);
        let before = (t.cached_sequences(), t.node_count(), a.free_pages());
        let ids = a.alloc(4).unwrap();
        let bad_tokens: [i64; 4] = [1, 2, 1 << 31, 4];
        assert!(matches!(
            t.insert(&bad_tokens, &ids, 0),
            Err(CoreError::InvalidToken {
                index: 2,
                value: 2_147_483_648
            })
        ));
        assert!(matches!(
            t.match_prefix(&[1i64, -1], 0),
            Err(CoreError::InvalidToken {
                index: 1,
                value: -1
            })
        ));
        // A free page among the new ones.
        let mut with_free = i64s(&ids);
        a.release(&with_free[3..]).unwrap();
        assert!(matches!(
            t.insert(&[1u32, 2, 3, 9], &with_free, 0),
            Err(CoreError::InvalidHandle { .. })
        ));
        // A free page among the duplicates of the cached part.
        with_free.swap(0, 3);
        assert!(matches!(
            t.insert(&[1u32, 2, 3, 9], &with_free, 0),
            Err(CoreError::InvalidHandle { .. })
        ));
        assert_eq!(a.refcount(&i64s(&ids[..3])).unwrap(), vec![1; 3]);
        a.release(&i64s(&ids[..3])).unwrap();
        assert_eq!(
            before,
            (t.cached_sequences(), t.node_count(), a.free_pages())
        );
        check(&a, &t);
    }

    /// Two trees over two allocators in step: one driven through the
    /// generic calls with `int64` values, the other through the `_u32` calls
    /// with the same values' `int32` bits.
    struct Twin {
        wide: (Arc<SegmentAllocator>, RadixTree),
        bits: (Arc<SegmentAllocator>, RadixTree),
    }

    type State = (Vec<CachedSequence>, u64, Vec<u32>, usize, u64);

    fn state(a: &SegmentAllocator, t: &RadixTree) -> State {
        let all: Vec<i64> = (0..64).collect();
        (
            t.cached_sequences(),
            a.free_pages(),
            a.refcount(&all).unwrap(),
            t.locked_pages(),
            t.clock,
        )
    }

    fn int32_bits(v: &[i64]) -> Vec<u32> {
        v.iter()
            .map(|&x| i32::try_from(x).unwrap() as u32)
            .collect()
    }

    impl Twin {
        fn new(page_size: u32) -> Self {
            Self {
                wide: setup(page_size, 64),
                bits: setup(page_size, 64),
            }
        }

        /// Run one call on each tree; both must give the same result and
        /// leave the same state, and a failing call must change nothing.
        fn run<R: std::fmt::Debug>(
            &mut self,
            wide: impl FnOnce(&mut RadixTree) -> Result<R>,
            bits: impl FnOnce(&mut RadixTree) -> Result<R>,
        ) -> Result<R> {
            let before = state(&self.wide.0, &self.wide.1);
            let r = wide(&mut self.wide.1);
            let s = bits(&mut self.bits.1);
            assert_eq!(format!("{r:?}"), format!("{s:?}"));
            let after = state(&self.wide.0, &self.wide.1);
            assert_eq!(after, state(&self.bits.0, &self.bits.1));
            if r.is_err() {
                assert_eq!(before, after, "a failing call changed the tree");
            }
            check(&self.wide.0, &self.wide.1);
            check(&self.bits.0, &self.bits.1);
            r
        }

        fn alloc(&self, n: usize) -> Vec<i64> {
            let w = self.wide.0.alloc(n).unwrap();
            assert_eq!(w, self.bits.0.alloc(n).unwrap());
            i64s(&w)
        }

        fn release(&self, ids: &[i64]) {
            self.wide.0.release(ids).unwrap();
            self.bits.0.release(ids).unwrap();
        }

        fn matches(&mut self, toks: &[i64], acquire: bool) -> Result<MatchResult> {
            let b = int32_bits(toks);
            if acquire {
                self.run(|t| t.acquire(toks, 0), |t| t.acquire_u32(&b, 0))
            } else {
                self.run(|t| t.match_prefix(toks, 0), |t| t.match_prefix_u32(&b, 0))
            }
        }

        fn insert(&mut self, toks: &[i64], ids: &[i64]) -> Result<usize> {
            let (b, p) = (int32_bits(toks), int32_bits(ids));
            self.run(|t| t.insert(toks, ids, 0), |t| t.insert_u32(&b, &p, 0))
        }

        fn finish(
            &mut self,
            toks: &[i64],
            ids: &[i64],
            node: Option<NodeId>,
            cache: bool,
            owned_from: usize,
        ) -> Result<usize> {
            let (b, p) = (int32_bits(toks), int32_bits(ids));
            self.run(
                |t| t.finish(toks, ids, 0, node, cache, owned_from),
                |t| t.finish_u32(&b, &p, 0, node, cache, owned_from),
            )
        }
    }

    fn is_token_error(r: Result<impl std::fmt::Debug>, at: usize, bad: i64) -> bool {
        matches!(r, Err(CoreError::InvalidToken { index, value }) if index == at && value == bad)
    }

    #[test]
    fn int32_bits_and_int64_values_agree() {
        for ps in [1usize, 2, 4] {
            let mut tw = Twin::new(ps as u32);
            let base: Vec<i64> = (1..=4 * ps as i64).collect();
            let ids = tw.alloc(4);
            assert_eq!(tw.insert(&base, &ids).unwrap(), 0);
            tw.release(&ids);
            let cat = |parts: &[&[i64]]| parts.concat();

            // Matches: hits, misses, a partial last page.
            let m = tw.matches(&cat(&[&base[..3 * ps], &[9]]), false).unwrap();
            assert_eq!(m.length, 3 * ps);
            assert_eq!(tw.matches(&[7; 5], false).unwrap().length, 0);
            // Bad tokens: first, after a matched prefix, in the partial last
            // page, in an unmatched page, as the i32 extremes.
            for (toks, at, bad) in [
                (cat(&[&[-5], &base]), 0, -5),
                (cat(&[&base[..2 * ps], &[-1]]), 2 * ps, -1),
                (
                    cat(&[&base, &vec![8; ps], &[i64::from(i32::MIN)]]),
                    5 * ps,
                    -(1 << 31),
                ),
                (cat(&[&base[..ps], &vec![8; ps], &[3, -7]]), 2 * ps + 1, -7),
            ] {
                for acquire in [false, true] {
                    assert!(is_token_error(tw.matches(&toks, acquire), at, bad));
                }
            }

            // Inserts that fail: length, tokens, page ids (bad value, out of
            // range, a free page among the new ones and among the duplicates).
            // A partial last page where there can be one.
            let tail: &[i64] = if ps > 1 { &[1] } else { &[] };
            let more = cat(&[&base[..2 * ps], &vec![6; 2 * ps], tail]);
            let new = tw.alloc(4);
            assert!(matches!(
                tw.insert(&more, &new[..3]),
                Err(CoreError::LengthMismatch { .. })
            ));
            let mut bad_tok = more.clone();
            bad_tok[3 * ps] = -2;
            assert!(is_token_error(tw.insert(&bad_tok, &new), 3 * ps, -2));
            if ps > 1 {
                let mut bad_tail = more.clone();
                bad_tail[4 * ps] = -3;
                assert!(is_token_error(tw.insert(&bad_tail, &new), 4 * ps, -3));
            }
            for bad in [-1, i64::from(i32::MAX), i64::from(i32::MIN)] {
                for at in [1, 3] {
                    let mut ids = new.clone();
                    ids[at] = bad;
                    let r = tw.insert(&more, &ids);
                    assert!(
                        matches!(r, Err(CoreError::InvalidHandle { page_id, .. }) if page_id == bad)
                    );
                }
            }
            let free = tw.alloc(1);
            tw.release(&free);
            for at in [0, 3] {
                let mut ids = new.clone();
                ids[at] = free[0];
                assert!(matches!(
                    tw.insert(&more, &ids),
                    Err(CoreError::InvalidHandle { .. })
                ));
            }
            // And one that works: two cached pages, two new ones.
            assert_eq!(tw.insert(&more, &new).unwrap(), 2 * ps);
            tw.release(&new);

            // A request: acquire, then finish with bad input, then for real.
            let prompt = cat(&[&base[..3 * ps], &vec![5; ps]]);
            let m = tw.matches(&prompt, true).unwrap();
            assert_eq!(m.length, 3 * ps);
            let full = cat(&[&prompt, &vec![4; ps], &[2]]);
            let own = tw.alloc(3);
            let pages = cat(&[&i64s(&m.page_ids), &own]);
            let node = Some(m.node);
            assert!(matches!(
                tw.finish(&full, &pages[..5], node, true, 3),
                Err(CoreError::LengthMismatch { .. })
            ));
            assert!(matches!(
                tw.finish(&full, &pages, node, true, 7),
                Err(CoreError::LengthMismatch { .. })
            ));
            for cache in [true, false] {
                let mut bad = full.clone();
                bad[5 * ps] = -4;
                assert!(is_token_error(
                    tw.finish(&bad, &pages, node, cache, 3),
                    5 * ps,
                    -4
                ));
                bad[5 * ps] = 2;
                bad[4 * ps] = -6;
                assert!(is_token_error(
                    tw.finish(&bad, &pages, node, cache, 3),
                    4 * ps,
                    -6
                ));
                for (at, v) in [(4, -1), (5, i64::from(i32::MAX)), (1, -9)] {
                    if at < 3 && !cache {
                        continue; // the matched pages are then not read
                    }
                    let mut ids = pages.clone();
                    ids[at] = v;
                    let r = tw.finish(&full, &ids, node, cache, 3);
                    assert!(
                        matches!(r, Err(CoreError::InvalidHandle { page_id, .. }) if page_id == v)
                    );
                }
            }
            let stale = NodeId::from_raw(m.node.to_raw() + (2 << 32));
            assert!(matches!(
                tw.finish(&full, &pages, Some(stale), true, 3),
                Err(CoreError::InvalidNode { .. })
            ));
            assert_eq!(tw.finish(&full, &pages, node, true, 3).unwrap(), 3 * ps);
            assert!(matches!(
                tw.finish(&full, &pages, node, true, 3),
                Err(CoreError::UnbalancedUnlock { .. })
            ));
            // Everything cached is found again, by both.
            let m = tw.matches(&full, false).unwrap();
            assert_eq!(m.length, full.len() / ps * ps);
        }
    }

    #[test]
    fn evict_failure_rolls_back() {
        let (a, mut t) = setup(1, 16);
        let (_, ids) = put(&a, &mut t, &[1, 2, 3], 0);
        put(&a, &mut t, &[1, 2, 4], 0);
        // Somebody releases the tree's reference behind its back.
        a.release(&i64s(&ids[2..])).unwrap();
        let before = t.cached_sequences();
        assert!(t.evict(100).is_err());
        assert_eq!(t.cached_sequences(), before);
        assert_eq!(t.evictable_pages(), 4);
        // Repair the allocator side; the tree then evicts normally.
        let again = a.alloc(1).unwrap();
        assert_eq!(again, ids[2..]);
        check(&a, &t);
        assert_eq!(t.evict(100).unwrap(), 4);
        check(&a, &t);
    }

    #[test]
    fn reset_releases_everything_and_stales_handles() {
        let (a, mut t) = setup(4, 16);
        put(&a, &mut t, &[1, 2, 3, 4, 5, 6, 7, 8], 0);
        put(&a, &mut t, &[1, 2, 3, 4, 9, 9, 9, 9], 1);
        let m = t.match_prefix(&[1u32, 2, 3, 4], 0).unwrap();
        t.lock(m.node).unwrap();
        t.reset().unwrap();
        assert_eq!(a.free_pages(), 16);
        assert_eq!(
            (t.cached_tokens(), t.node_count(), t.namespace_count()),
            (0, 0, 0)
        );
        assert!(matches!(
            t.unlock(m.node),
            Err(CoreError::InvalidNode { .. })
        ));
        check(&a, &t);
        put(&a, &mut t, &[1, 2, 3, 4], 0);
        assert_eq!(t.match_prefix(&[1u32, 2, 3, 4], 0).unwrap().length, 4);
    }

    #[test]
    fn lock_overflow_is_refused_and_undone() {
        let (a, mut t) = setup(1, 8);
        put(&a, &mut t, &[1, 2], 0);
        let m = t.match_prefix(&[1u32, 2], 0).unwrap();
        let root = t.roots[&0] as usize;
        // As if 2^32 - 1 locks were held on the root itself.
        t.nodes[root].own = u32::MAX;
        t.nodes[root].lock = u32::MAX;
        check(&a, &t);
        assert!(matches!(
            t.lock(m.node),
            Err(CoreError::TreeCapacity { limit, .. }) if limit == u64::from(u32::MAX)
        ));
        assert_eq!(t.lock_count(m.node).unwrap(), 0);
        assert_eq!(t.evictable_pages(), 2);
        check(&a, &t);
    }

    #[test]
    fn exhausted_generations_retire_slots() {
        let (a, mut t) = setup(1, 8);
        put(&a, &mut t, &[1], 0);
        assert_eq!(t.evict(9).unwrap(), 1);
        assert_eq!(t.nodes.len(), 2);
        // Both slots are free; give them their last generation.
        for n in &mut t.nodes {
            n.gen = MAX_GEN - 1;
        }
        put(&a, &mut t, &[1], 0);
        let m = t.match_prefix(&[1u32], 0).unwrap();
        assert_eq!(m.node.generation(), MAX_GEN);
        assert!(m.node.to_raw() > 0);
        t.lock(m.node).unwrap();
        t.unlock(m.node).unwrap();
        assert_eq!(t.evict(9).unwrap(), 1);
        assert_eq!((t.free_slots, t.retired_slots), (0, 2));
        assert!(matches!(t.lock(m.node), Err(CoreError::InvalidNode { .. })));
        check(&a, &t);
        put(&a, &mut t, &[1], 0);
        assert_eq!(t.nodes.len(), 4);
        check(&a, &t);
    }

    /// Two different pages with the same 32-bit key for this tree's seed
    /// (a birthday search over pages of two tokens).
    fn colliding_pages(t: &RadixTree) -> ([u32; 2], [u32; 2]) {
        let mut seen: HashMap<u32, [u32; 2]> = HashMap::new();
        for x in 0..1u32 << 12 {
            for y in 0..1u32 << 12 {
                let page = [x, y];
                if let Some(&other) = seen.get(&t.page_key(&page)) {
                    return (other, page);
                }
                seen.insert(t.page_key(&page), page);
            }
        }
        panic!("no collision among 2^24 pages");
    }

    #[test]
    fn colliding_page_keys_chain() {
        for order in 0..2 {
            let (a, mut t) = setup(2, 256);
            let (p, q) = colliding_pages(&t);
            assert_ne!(p, q);
            let (first, second) = if order == 0 { (p, q) } else { (q, p) };
            let seq = |page: [u32; 2], tail: u32| -> Vec<u32> {
                [&page[..], &[tail, tail, tail + 1, tail + 1]].concat()
            };
            put(&a, &mut t, &seq(first, 5), 0);
            put(&a, &mut t, &seq(second, 7), 0);
            // Both root children sit under one edge-table key.
            assert_eq!(t.edges.len(), 1);
            for (page, tail) in [(first, 5), (second, 7)] {
                let m = t.match_prefix(&seq(page, tail), 0).unwrap();
                assert_eq!(m.length, 6);
            }
            // Split each chain member (head and non-head) by a partial match.
            // (`second` is the chain head; splitting `first` first makes its
            // upper half the older one, so eviction unlinks a non-head.)
            let splits = if order == 0 {
                [(second, 7), (first, 5)]
            } else {
                [(first, 5), (second, 7)]
            };
            for (page, tail) in splits {
                let m = t.match_prefix(&seq(page, tail)[..4], 0).unwrap();
                assert_eq!(m.length, 4);
                check(&a, &t);
            }
            assert_eq!(t.node_count(), 4);
            // Evict one leaf at a time: lower halves, then the chain members
            // in LRU order (one at the head, one behind it).
            for left in (0..4).rev() {
                assert!(t.evict(1).unwrap() >= 1);
                assert_eq!(t.node_count(), left);
                check(&a, &t);
            }
            assert_eq!(a.free_pages(), 256);
        }
    }

    #[test]
    fn lru_heap_stays_bounded() {
        let (a, mut t) = setup(1, 64);
        put(&a, &mut t, &[1, 2], 0);
        put(&a, &mut t, &[3, 4], 0);
        for i in 0..10_000 {
            let k = if i % 2 == 0 { [1u32, 2] } else { [3, 4] };
            t.match_prefix(&k, 0).unwrap();
        }
        assert!(t.lru.len() <= MIN_LRU_LIMIT + 1);
        check(&a, &t);
    }

    #[test]
    fn arena_compacts_after_eviction() {
        let (a, mut t) = setup(1, 1 << 16);
        for i in 0..200u32 {
            let toks: Vec<u32> = (0..100).map(|j| i * 1000 + j).collect();
            put(&a, &mut t, &toks, 0);
        }
        assert_eq!(t.pages.len(), 20_000);
        t.evict(15_000).unwrap();
        assert_eq!(t.cached_pages(), 5000);
        assert_eq!(t.dead_pages, 0);
        assert_eq!(t.pages.len(), 5000);
        check(&a, &t);
        for s in t.cached_sequences() {
            assert_eq!(t.match_prefix(&s.tokens, 0).unwrap().page_ids, s.page_ids);
        }
    }

    #[test]
    fn metadata_is_lean_at_page_size_16() {
        let (a, mut t) = setup(16, 1 << 16);
        // 2000 requests of 8 shared prompts x 2048 tokens + a 256-token suffix.
        for r in 0..2000u32 {
            let mut toks: Vec<u32> = (0..2048).map(|j| (r % 8) * 100_000 + j).collect();
            toks.extend((0..256).map(|j| 1_000_000 + r * 1000 + j));
            let ids = a.alloc(toks.len() / 16).unwrap();
            t.insert(&toks, &ids, 0).unwrap();
            a.release(&i64s(&ids)).unwrap();
        }
        let per_token = t.metadata_bytes() as f64 / t.cached_tokens() as f64;
        assert!(per_token <= 6.0, "{per_token} bytes per token");
        check(&a, &t);
    }
}
