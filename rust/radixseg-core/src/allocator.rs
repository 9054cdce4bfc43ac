//! The segment allocator: which KV pages exist and who references them.
//!
//! Pages are grouped in segments of `pages_per_segment`; a page is named by
//! its page id `segment * pages_per_segment + page_in_segment`, which never
//! changes while the page is referenced. `alloc`, `retain` and `release` are
//! lock-free; the segment calls (`add_segment`, its two phases
//! `reserve_segment` / `open_segment`, `cancel_segment`, `retire_segment`)
//! serialise on one mutex. See
//! `IMPLEMENTATION.md` beside this crate for why the lock-free paths are
//! correct.

use crate::error::{CoreError, HandleProblem, Result};
use crate::sync::{self, AtomicU32, AtomicU64, CachePadded, Mutex, OnceBox, Ordering};
use smallvec::SmallVec;
use std::collections::BTreeSet;

/// Largest `page_size` accepted.
pub const MAX_PAGE_SIZE: u32 = 1024;
/// Largest `pages_per_segment` accepted.
pub const MAX_PAGES_PER_SEGMENT: u32 = 1 << 20;
/// Page ids are non-negative `int32`s: every id is below this.
pub const PAGE_ID_LIMIT: u64 = 1 << 31;

/// `Segment::free` holds this instead of a count while the segment is retired.
const CLOSED: u32 = u32::MAX;
/// Set in `Segment::free` (beside the count) while the segment is sealed:
/// live, its pages referenced and released as usual, but none allocated.
/// `CLOSED` has it too, so one test refuses both to an allocation.
const SEALED: u32 = 1 << 31;
/// Segments per chunk: one `u64` summary word covers a chunk.
const CHUNK: u32 = 64;
/// Shelf `k` holds `2^k` chunks; 26 shelves cover `2^26 - 1` chunks, more than
/// the `2^31 / 64` that a one-page segment size could need.
const SHELVES: usize = 26;
/// Rounds of an `alloc` that failed only because of concurrent reservations.
const ALLOC_RETRIES: u32 = 4;

/// One segment's bookkeeping; its bytes live in Python.
struct Segment {
    /// The words every alloc and release writes, on their own cache lines.
    head: CachePadded<Head>,
    /// Bit `i % 64` of word `i / 64` is 1 iff page `i` is free and unclaimed.
    bits: Box<[AtomicU64]>,
    /// Per-page refcount; 0 = free.
    refcounts: Box<[AtomicU32]>,
}

/// A segment's hot counters.
struct Head {
    /// Free pages not reserved by an allocating thread (plus `SEALED` while
    /// sealed), or `CLOSED`. Page counts stay below 2^21, clear of `SEALED`.
    /// Invariant: `free <= popcount(bits)` at all times.
    free: AtomicU32,
    /// Scan hint: the first bitmap word that may hold a set bit. Only a hint:
    /// `claim_bits` starts there but wraps round to cover every word, so no
    /// result depends on it. Exact when one thread uses the allocator (every
    /// word below it is then 0), which keeps `alloc` lowest-first; racing
    /// calls can leave it too high, which costs only order, and a scan that
    /// wraps lowers it again.
    scan: AtomicU32,
}

/// 64 segment slots and the summary word saying which may have free pages.
struct Chunk {
    /// Bit `b` is set if segment `64 * chunk + b` may have free pages. May be
    /// set spuriously (a scan clears it); never clear while the segment has
    /// unreserved free pages at a quiescent point.
    summary: CachePadded<AtomicU64>,
    slots: [OnceBox<Segment>; CHUNK as usize],
}

/// Slots under the structural lock.
struct Structural {
    /// Retired slot ids, reused lowest first.
    retired: BTreeSet<u32>,
    /// Slot ids handed out by `reserve_segment`, not yet opened or cancelled.
    reserved: BTreeSet<u32>,
}

/// A lock-free allocator of refcounted KV pages grouped in segments.
pub struct SegmentAllocator {
    page_size: u32,
    pages_per_segment: u32,
    /// `log2(pages_per_segment)` when it is a power of two.
    pps_shift: Option<u32>,
    words_per_segment: usize,
    /// Valid bits of a segment's last bitmap word.
    last_word_mask: u64,
    max_segments: u32,
    shelves: [OnceBox<Box<[Chunk]>>; SHELVES],
    /// Slots ever created; every slot below it exists. Release-stored after
    /// the slot is published, Acquire-loaded by scans.
    high_water: AtomicU32,
    /// Live segments (written under the lock).
    live: AtomicU32,
    structural: Mutex<Structural>,
}

impl std::fmt::Debug for SegmentAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentAllocator")
            .field("page_size", &self.page_size)
            .field("pages_per_segment", &self.pages_per_segment)
            .field("segments", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Resolves page ids for the length of one call, remembering the last
/// segment so that a batch of ids from one segment walks the directory once.
struct Resolver<'a> {
    alloc: &'a SegmentAllocator,
    /// One past the largest id of any slot at the start of the call.
    limit: u64,
    last: Option<(u32, &'a Segment)>,
}

impl<'a> Resolver<'a> {
    fn new(alloc: &'a SegmentAllocator) -> Self {
        // Acquire: pairs with the Release store of `high_water` in
        // `add_segment`; every slot below it is published.
        let hw = alloc.high_water.load(Ordering::Acquire);
        Self {
            alloc,
            limit: u64::from(hw) * u64::from(alloc.pages_per_segment),
            last: None,
        }
    }

    /// `(segment id, segment, page index)` of an id, live or retired.
    #[inline]
    fn page(&mut self, page_id: i64) -> Result<(u32, &'a Segment, usize)> {
        if page_id < 0 || page_id as u64 >= self.limit {
            return Err(CoreError::InvalidHandle {
                page_id,
                problem: HandleProblem::OutOfRange { limit: self.limit },
            });
        }
        let (seg, page) = self.alloc.split(page_id as u32);
        if let Some((s, segment)) = self.last {
            if s == seg {
                return Ok((seg, segment, page as usize));
            }
        }
        match self.alloc.segment(seg) {
            Some(segment) => {
                self.last = Some((seg, segment));
                Ok((seg, segment, page as usize))
            }
            None => Err(not_live(page_id, seg)),
        }
    }

    /// The segment holding `page_id`, live or retired, and the id of its
    /// first page: a caller walks a run of ids in that segment by offset
    /// (`id - first`, checked against the segment's length) without
    /// resolving each id again.
    #[inline]
    fn segment_of(&mut self, page_id: i64) -> Result<(u32, &'a Segment, i64)> {
        let (seg, segment, page) = self.page(page_id)?;
        Ok((seg, segment, page_id - page as i64))
    }

    /// As `page`, but an id of a retired segment is an error.
    #[inline]
    fn live_page(&mut self, page_id: i64) -> Result<(u32, &'a Segment, usize)> {
        let (seg, segment, page) = self.page(page_id)?;
        if segment.head.free.load(Ordering::Acquire) == CLOSED {
            return Err(not_live(page_id, seg));
        }
        Ok((seg, segment, page))
    }
}

/// The refcount of page `page_id` if it lies in `segment`, whose first page
/// is `first` (see [`Resolver::segment_of`]); `None` once a run leaves it.
#[inline]
fn refcount_in(segment: &Segment, first: i64, page_id: i64) -> Option<&AtomicU32> {
    usize::try_from(page_id.wrapping_sub(first))
        .ok()
        .and_then(|p| segment.refcounts.get(p))
}

fn not_live(page_id: i64, segment: u32) -> CoreError {
    CoreError::InvalidHandle {
        page_id,
        problem: HandleProblem::SegmentNotLive { segment },
    }
}

/// Take one reference off `rc` unless it is 0; returns the previous count.
#[inline]
fn decrement(rc: &AtomicU32) -> Option<u32> {
    let mut cur = rc.load(Ordering::Relaxed);
    loop {
        if cur == 0 {
            return None;
        }
        // AcqRel: the thread that takes a page to 0 sees every other
        // holder's uses (their decrements are Release), and passes them on
        // through the Release bit set in `publish`.
        match rc.compare_exchange_weak(cur, cur - 1, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(prev) => return Some(prev),
            Err(actual) => cur = actual,
        }
    }
}

/// Where chunk `c` lives: (shelf, index in shelf).
#[inline]
fn chunk_position(c: u32) -> (usize, usize) {
    let n = c as u64 + 1;
    let shelf = 63 - n.leading_zeros();
    (shelf as usize, (n - (1u64 << shelf)) as usize)
}

impl Segment {
    fn new(pages: u32, words: usize, last_mask: u64) -> Self {
        let bits = (0..words)
            .map(|w| AtomicU64::new(if w + 1 == words { last_mask } else { u64::MAX }))
            .collect();
        let refcounts = (0..pages).map(|_| AtomicU32::new(0)).collect();
        Self {
            // Closed until `open_segment` (or `add_segment`) opens it.
            head: CachePadded(Head {
                free: AtomicU32::new(CLOSED),
                scan: AtomicU32::new(0),
            }),
            bits,
            refcounts,
        }
    }
}

impl SegmentAllocator {
    /// An allocator with no segments.
    ///
    /// `page_size` is in `1..=1024` (tokens per page id; kept for slot
    /// arithmetic by callers and the tree, never used here; a context-parallel
    /// pool's virtual page of `P * R` tokens need not be a power of two);
    /// `pages_per_segment` is in `1..=2^20`.
    pub fn new(page_size: u32, pages_per_segment: u32) -> Result<Self> {
        if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(CoreError::InvalidConfig {
                what: "page_size",
                value: page_size.into(),
                rule: "must be in 1..=1024",
            });
        }
        if !(1..=MAX_PAGES_PER_SEGMENT).contains(&pages_per_segment) {
            return Err(CoreError::InvalidConfig {
                what: "pages_per_segment",
                value: pages_per_segment.into(),
                rule: "must be in 1..=1048576",
            });
        }
        let words = pages_per_segment.div_ceil(64) as usize;
        let rem = pages_per_segment % 64;
        Ok(Self {
            page_size,
            pages_per_segment,
            pps_shift: pages_per_segment
                .is_power_of_two()
                .then(|| pages_per_segment.trailing_zeros()),
            words_per_segment: words,
            last_word_mask: if rem == 0 {
                u64::MAX
            } else {
                (1u64 << rem) - 1
            },
            max_segments: (PAGE_ID_LIMIT / u64::from(pages_per_segment)) as u32,
            shelves: std::array::from_fn(|_| OnceBox::new()),
            high_water: AtomicU32::new(0),
            live: AtomicU32::new(0),
            structural: Mutex::new(Structural {
                retired: BTreeSet::new(),
                reserved: BTreeSet::new(),
            }),
        })
    }

    /// Lower the most segments that may be live at once (a hard cap on the
    /// allocator's size; it can never exceed what keeps page ids below 2^31).
    pub fn with_max_segments(mut self, max_segments: u32) -> Result<Self> {
        if max_segments == 0 || max_segments > self.max_segments {
            return Err(CoreError::InvalidConfig {
                what: "max_segments",
                value: max_segments.into(),
                rule: "must be at least 1 and at most 2^31 / pages_per_segment",
            });
        }
        self.max_segments = max_segments;
        Ok(self)
    }

    /// Tokens per page.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Pages per segment.
    pub fn pages_per_segment(&self) -> u32 {
        self.pages_per_segment
    }

    /// The most segments that can be live at once (page ids stay below 2^31).
    pub fn max_segments(&self) -> u32 {
        self.max_segments
    }

    // ----- addressing --------------------------------------------------------

    #[inline]
    fn split(&self, page_id: u32) -> (u32, u32) {
        match self.pps_shift {
            Some(s) => (page_id >> s, page_id & (self.pages_per_segment - 1)),
            None => (
                page_id / self.pages_per_segment,
                page_id % self.pages_per_segment,
            ),
        }
    }

    #[inline]
    fn chunk(&self, c: u32) -> Option<&Chunk> {
        let (shelf, idx) = chunk_position(c);
        self.shelves.get(shelf)?.get()?.get(idx)
    }

    #[inline]
    fn segment(&self, seg: u32) -> Option<&Segment> {
        self.chunk(seg / CHUNK)?.slots[(seg % CHUNK) as usize].get()
    }

    // ----- summary words -----------------------------------------------------

    fn mark_nonfull(&self, seg: u32) {
        if let Some(chunk) = self.chunk(seg / CHUNK) {
            // Release: pairs with the AcqRel clear in `mark_full`, which then
            // sees the page bits and `free` count written before this.
            chunk
                .summary
                .fetch_or(1 << (seg % CHUNK), Ordering::Release);
        }
    }

    /// Clear a segment's summary bit after seeing it full or closed, then
    /// re-check: a release that made it non-full meanwhile either set the bit
    /// after our clear (mod order of the summary word) or is visible to our
    /// re-check through the Acquire half of the clear.
    fn mark_full(&self, chunk: &Chunk, bit: u32, segment: &Segment) {
        chunk.summary.fetch_and(!(1 << bit), Ordering::AcqRel);
        let f = segment.head.free.load(Ordering::Acquire);
        if f != 0 && f & SEALED == 0 {
            chunk.summary.fetch_or(1 << bit, Ordering::Release);
        }
    }

    // ----- alloc -------------------------------------------------------------

    /// Allocate `n` pages, all or none. Each gets refcount 1.
    pub fn alloc(&self, n: usize) -> Result<Vec<u32>> {
        // `n` comes from the caller and may be huge: reserve no more than the
        // pool holds (a larger request fails with `OutOfPages` anyway).
        let mut out = Vec::with_capacity(n.min(self.total_pages() as usize));
        self.alloc_into(n, &mut out)?;
        Ok(out)
    }

    /// Allocate `n` pages, all or none, appending their ids to `out` (lets a
    /// caller reuse one buffer). On error `out` is as it was.
    pub fn alloc_into(&self, n: usize, out: &mut Vec<u32>) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        // Short already (the request path's common miss under a spent budget,
        // before it evicts): fail without claiming pages only to give them back.
        let free = self.free_pages();
        if (free as usize) < n {
            return Err(CoreError::OutOfPages {
                requested: n as u64,
                available: free,
                total: self.total_pages(),
                segments: self.live.load(Ordering::Relaxed),
            });
        }
        let start = out.len();
        // `n` may be huge (it comes from the caller): reserve no more than
        // the pool holds (a larger request fails with `OutOfPages` anyway).
        out.reserve(n.min(self.total_pages() as usize));
        let mut attempt = 0;
        loop {
            // `claim` gives each page refcount 1 as it wins the page's bit.
            let got = self.claim(n, out);
            if got == n {
                return Ok(());
            }
            // Give back what was claimed; nobody has seen these ids yet.
            self.give_back(&out[start..]);
            out.truncate(start);
            let available = self.free_pages();
            attempt += 1;
            // A shortfall with enough free pages means other threads held
            // reservations while we scanned; try again a bounded number of times.
            if (available as usize) < n || attempt >= ALLOC_RETRIES {
                return Err(CoreError::OutOfPages {
                    requested: n as u64,
                    available,
                    total: self.total_pages(),
                    segments: self.live.load(Ordering::Relaxed),
                });
            }
            sync::spin_wait();
        }
    }

    /// Reserve and claim up to `n` pages, lowest segment first; returns how
    /// many were claimed (their ids appended to `out`, refcounts still 0).
    fn claim(&self, n: usize, out: &mut Vec<u32>) -> usize {
        let mut remaining = n;
        let hw = self.high_water.load(Ordering::Acquire);
        for c in 0..hw.div_ceil(CHUNK) {
            let Some(chunk) = self.chunk(c) else { break };
            let mut summary = chunk.summary.load(Ordering::Acquire);
            while summary != 0 {
                let bit = summary.trailing_zeros();
                summary &= summary - 1;
                let seg = c * CHUNK + bit;
                let Some(segment) = self.segment(seg) else {
                    continue;
                };
                let took = Self::reserve(segment, remaining);
                if took > 0 {
                    self.claim_bits(seg, segment, took, out);
                    remaining -= took;
                }
                let left = segment.head.free.load(Ordering::Relaxed);
                if left == 0 || left & SEALED != 0 {
                    self.mark_full(chunk, bit, segment);
                }
                if remaining == 0 {
                    return n;
                }
            }
        }
        n - remaining
    }

    /// Take up to `want` from a segment's free count; returns how many.
    #[inline]
    fn reserve(segment: &Segment, want: usize) -> usize {
        let mut cur = segment.head.free.load(Ordering::Relaxed);
        loop {
            // Sealed or closed: no page of it may be allocated. The bit is
            // part of the word this CAS compares, so a reservation either
            // happens before a seal or fails.
            if cur == 0 || cur & SEALED != 0 {
                return 0;
            }
            let take = (cur as usize).min(want) as u32;
            // Acquire: pairs with the Release increment in `publish`,
            // so the page bits set before it are visible to `claim_bits`.
            match segment.head.free.compare_exchange_weak(
                cur,
                cur - take,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return take as usize,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Clear `k` set bits of a segment, which our reservation guarantees exist
    /// (every reservation is backed by a set bit no other reservation claims),
    /// and give each page won refcount 1. The scan starts at the segment's
    /// hint and wraps round, so it covers every word whatever the hint says.
    fn claim_bits(&self, seg: u32, segment: &Segment, k: usize, out: &mut Vec<u32>) {
        let base = seg * self.pages_per_segment;
        let words = segment.bits.len();
        let mut need = k;
        loop {
            let hint = segment.head.scan.load(Ordering::Relaxed) as usize;
            let first = if hint < words { hint } else { 0 };
            for wi in (first..words).chain(0..first) {
                let word = &segment.bits[wi];
                let mut cur = word.load(Ordering::Relaxed);
                while cur != 0 && need > 0 {
                    let mask = lowest_bits(cur, need);
                    // Acquire: pairs with the Release `fetch_or` in `publish`.
                    let prev = word.fetch_and(!mask, Ordering::Acquire);
                    let mut got = prev & mask;
                    need -= got.count_ones() as usize;
                    let page0 = wi * 64;
                    while got != 0 {
                        let page = page0 + got.trailing_zeros() as usize;
                        // Relaxed: the ids reach other threads only through
                        // the caller's own synchronisation.
                        segment.refcounts[page].store(1, Ordering::Relaxed);
                        out.push(base + page as u32);
                        got &= got - 1;
                    }
                    cur = prev & !mask;
                }
                if need == 0 {
                    // Every word scanned before this one is empty (as far as
                    // we saw); this one too unless it kept bits.
                    // Written only when it moves: the line is shared with
                    // `free`, which other threads are updating.
                    let next = if cur == 0 { wi + 1 } else { wi };
                    if next != hint {
                        segment.head.scan.store(next as u32, Ordering::Relaxed);
                    }
                    return;
                }
            }
            // Bits we are owed were set behind our scan position; go again.
            sync::spin_wait();
        }
    }

    /// Undo a partial claim: drop the reference `claim_bits` gave each page
    /// and publish those that reach 0. Nobody else should have seen these
    /// ids; should a misbehaving caller have released one meanwhile (it is
    /// at 0 and published) it is skipped, and should one have retained it,
    /// it stays referenced, so the structures stay consistent even then.
    #[cold]
    fn give_back(&self, ids: &[u32]) {
        let mut r = Resolver::new(self);
        let mut zeroed: Vec<u32> = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Ok((_, s, p)) = r.page(i64::from(id)) {
                if decrement(&s.refcounts[p]) == Some(1) {
                    zeroed.push(id);
                }
            }
        }
        self.publish(&zeroed);
    }

    /// Make distinct pages with refcount 0 and clear bits allocatable: set
    /// their bits (one `fetch_or` per run of ids in one bitmap word), then add
    /// them to their segments' free counts (one `fetch_add` per run of ids in
    /// one segment). Bits before counts keeps `free <= set bits`.
    fn publish(&self, ids: &[u32]) {
        let pps = self.pages_per_segment;
        let mut i = 0;
        while i < ids.len() {
            let (seg, _) = self.split(ids[i]);
            let Some(segment) = self.segment(seg) else {
                i += 1;
                continue;
            };
            // Page ids are below 2^31, so `base + pps` fits a u32; an id
            // outside this segment gives an offset `>= pps` (it wraps below).
            let base = seg * pps;
            let mut count = 0u32;
            let mut lowest_word = u32::MAX;
            while i < ids.len() {
                let page = ids[i].wrapping_sub(base);
                if page >= pps {
                    break;
                }
                let word = page / 64;
                let mut mask = 1u64 << (page % 64);
                i += 1;
                while i < ids.len() {
                    let p = ids[i].wrapping_sub(base);
                    if p >= pps || p / 64 != word {
                        break;
                    }
                    mask |= 1 << (p % 64);
                    i += 1;
                }
                // Release: the pages' last uses happen-before a later claim
                // (pairs with the Acquire `fetch_and` in `claim_bits`).
                segment.bits[word as usize].fetch_or(mask, Ordering::Release);
                count += mask.count_ones();
                lowest_word = lowest_word.min(word);
            }
            // Lower the scan hint to the lowest word given bits (a hint: see
            // `Head::scan`). Before the count, so an allocator whose
            // reservation sees the count sees the hint too.
            if lowest_word < segment.head.scan.load(Ordering::Relaxed) {
                segment.head.scan.fetch_min(lowest_word, Ordering::Relaxed);
            }
            // Release: pairs with the Acquire CAS in `reserve`.
            let prev = segment.head.free.fetch_add(count, Ordering::Release);
            if prev == 0 {
                self.mark_nonfull(seg);
            }
        }
    }

    // ----- refcounts -----------------------------------------------------------

    /// Check, without writing, that every id names a referenced page; a page
    /// with refcount 0 of a live segment is reported by `on_free`. Returns
    /// whether the ids strictly increase (then no id repeats). Resolves the
    /// segment once per run of ids in one segment.
    fn validate_referenced(
        r: &mut Resolver<'_>,
        ids: &[i64],
        on_free: fn(i64) -> CoreError,
    ) -> Result<bool> {
        let mut increasing = true;
        let mut i = 0;
        while let Some(&id0) = ids.get(i) {
            let (seg, segment, first) = r.segment_of(id0)?;
            while let Some(&id) = ids.get(i) {
                let Some(rc) = refcount_in(segment, first, id) else {
                    break;
                };
                if rc.load(Ordering::Relaxed) == 0 {
                    // A retired segment has every refcount at 0.
                    return Err(if segment.head.free.load(Ordering::Acquire) == CLOSED {
                        not_live(id, seg)
                    } else {
                        on_free(id)
                    });
                }
                if i > 0 && ids[i - 1] >= id {
                    increasing = false;
                }
                i += 1;
            }
        }
        Ok(increasing)
    }

    /// A page listed `k` times in one release needs refcount `>= k`. Checked
    /// before any write, so every error a caller could have seen coming
    /// leaves the state as it was: a caller that gets an error still holds
    /// every reference it held. Free for the common strictly increasing batch
    /// (ids as `alloc` returns them; `increasing` says so, from
    /// `validate_referenced`); otherwise one sort of a copy.
    fn validate_multiplicity(r: &mut Resolver<'_>, ids: &[i64], increasing: bool) -> Result<()> {
        if increasing {
            return Ok(());
        }
        let mut sorted: SmallVec<[i64; 32]> = SmallVec::from_slice(ids);
        sorted.sort_unstable();
        for run in sorted.chunk_by(|x, y| x == y) {
            if run.len() > 1 {
                let (_, segment, page) = r.page(run[0])?;
                if (segment.refcounts[page].load(Ordering::Relaxed) as usize) < run.len() {
                    return Err(CoreError::DoubleFree {
                        page_id: run[0] as u32,
                    });
                }
            }
        }
        Ok(())
    }

    /// Add one reference to each page (duplicates add one each). All or none.
    pub fn retain(&self, ids: &[i64]) -> Result<()> {
        let mut r = Resolver::new(self);
        Self::validate_referenced(&mut r, ids, |page_id| CoreError::InvalidHandle {
            page_id,
            problem: HandleProblem::Free,
        })?;
        for (i, &id) in ids.iter().enumerate() {
            let failure = match r.page(id) {
                Ok((_, segment, page)) => Self::increment(&segment.refcounts[page], id),
                Err(e) => Some(e),
            };
            if let Some(e) = failure {
                // Only reachable when another thread releases these pages
                // while we retain them.
                self.drop_refs(&mut r, &ids[..i]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Add a reference unless the page is free or the count would overflow.
    #[inline]
    fn increment(rc: &AtomicU32, id: i64) -> Option<CoreError> {
        let mut cur = rc.load(Ordering::Relaxed);
        loop {
            if cur == 0 {
                return Some(CoreError::InvalidHandle {
                    page_id: id,
                    problem: HandleProblem::Free,
                });
            }
            if cur == u32::MAX {
                return Some(CoreError::RefcountOverflow { page_id: id as u32 });
            }
            // Relaxed: taking a reference needs no ordering (as Arc::clone).
            match rc.compare_exchange_weak(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return None,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Check that [`release`](Self::release) of `ids` would succeed, without
    /// changing anything: every id names a live page whose refcount covers
    /// how often it occurs. Lets a caller validate before a compound
    /// operation whose last step is the release.
    pub fn check_release(&self, ids: &[i64]) -> Result<()> {
        let mut r = Resolver::new(self);
        let increasing = Self::validate_referenced(&mut r, ids, |page_id| CoreError::DoubleFree {
            page_id: page_id as u32,
        })?;
        Self::validate_multiplicity(&mut r, ids, increasing)
    }

    /// Drop one reference from each page (duplicates drop one each); a page
    /// whose refcount reaches 0 becomes free. All or none: if any id is
    /// invalid or would go below 0, nothing changes.
    pub fn release(&self, ids: &[i64]) -> Result<()> {
        let mut r = Resolver::new(self);
        let increasing = Self::validate_referenced(&mut r, ids, |page_id| CoreError::DoubleFree {
            page_id: page_id as u32,
        })?;
        Self::validate_multiplicity(&mut r, ids, increasing)?;
        self.release_validated(&mut r, ids)
    }

    /// [`release`](Self::release) for a caller that holds one reference per
    /// occurrence of each id (the radix tree, on eviction: one per cached
    /// page): the ids are not sorted to count repeats. A page whose count is
    /// already 0 is still refused ([`CoreError::DoubleFree`]) and nothing
    /// changes.
    pub fn release_held(&self, ids: &[u32]) -> Result<()> {
        let mut r = Resolver::new(self);
        self.release_validated(&mut r, ids)
    }

    /// Drop one reference to each page of `ids` (validated by the caller),
    /// then publish the pages that reached 0. A page already at 0 (another
    /// thread released it meanwhile) undoes every decrement of this call.
    /// Resolves the segment once per run of ids in one segment.
    fn release_validated<P: Copy + Into<i64>>(
        &self,
        r: &mut Resolver<'_>,
        ids: &[P],
    ) -> Result<()> {
        // Phase A: decrement. A page that reaches 0 keeps its bit clear, so no
        // allocator can take it before phase B; that makes undo safe.
        let mut zeroed: SmallVec<[u32; 32]> = SmallVec::new();
        zeroed.reserve(ids.len());
        let mut i = 0;
        while let Some(&id0) = ids.get(i) {
            let id0: i64 = id0.into();
            let Ok((_, segment, first)) = r.segment_of(id0) else {
                return Err(self.undo_release(r, &ids[..i], &mut zeroed, id0));
            };
            while let Some(&id) = ids.get(i) {
                let id: i64 = id.into();
                let Some(rc) = refcount_in(segment, first, id) else {
                    break;
                };
                match decrement(rc) {
                    Some(1) => zeroed.push(id as u32),
                    Some(_) => {}
                    None => return Err(self.undo_release(r, &ids[..i], &mut zeroed, id)),
                }
                i += 1;
            }
        }
        // Phase B: publish the freed pages.
        self.publish(&zeroed);
        Ok(())
    }

    /// Restore the decrements of a release that met `failed`, a page at 0.
    /// Only reachable when another thread releases the same pages at once
    /// (validation caught every other case). Another holder may have taken
    /// one of those pages to 0 and published it meanwhile; never resurrect
    /// such a page (refuse 0), so the structures stay consistent even then.
    /// Pages we took to 0 (`zeroed`) are unpublished, so they are ours to
    /// restore from 0 (once each); only the other decrements need the guard.
    #[cold]
    fn undo_release<P: Copy + Into<i64>>(
        &self,
        r: &mut Resolver<'_>,
        done: &[P],
        zeroed: &mut SmallVec<[u32; 32]>,
        failed: i64,
    ) -> CoreError {
        for &id in done {
            let id: i64 = id.into();
            if let Ok((_, s, p)) = r.page(id) {
                let rc = &s.refcounts[p];
                if let Some(k) = zeroed.iter().position(|&z| i64::from(z) == id) {
                    zeroed.swap_remove(k);
                    rc.fetch_add(1, Ordering::Relaxed);
                } else {
                    let _ = Self::increment(rc, id);
                }
            }
        }
        CoreError::DoubleFree {
            page_id: failed as u32,
        }
    }

    /// Drop references taken by a `retain` that failed part-way.
    fn drop_refs(&self, r: &mut Resolver<'_>, ids: &[i64]) {
        let mut zeroed: SmallVec<[u32; 32]> = SmallVec::new();
        for &id in ids {
            if let Ok((_, s, p)) = r.page(id) {
                if s.refcounts[p].fetch_sub(1, Ordering::AcqRel) == 1 {
                    zeroed.push(id as u32);
                }
            }
        }
        self.publish(&zeroed);
    }

    /// Refcount of each page (0 for a free page of a live segment).
    pub fn refcount(&self, ids: &[i64]) -> Result<Vec<u32>> {
        let mut r = Resolver::new(self);
        ids.iter()
            .map(|&id| {
                let (_, s, p) = r.live_page(id)?;
                Ok(s.refcounts[p].load(Ordering::Acquire))
            })
            .collect()
    }

    // ----- segments ------------------------------------------------------------
    //
    // A slot below `high_water` is in exactly one of three states: live (its
    // `free` is a count), retired or reserved (its `free` is `CLOSED`; its
    // id in `Structural::retired` or `Structural::reserved`). A closed slot
    // has every page free and no allocator can take one, so for every call
    // but the three below a reserved segment is the same as a retired one:
    // its page ids are refused as `SegmentNotLive`, its pages count in
    // neither `free_pages` nor `total_pages`, it is not in `segments()`.

    /// Add a segment of free pages; returns its id (the lowest retired id if
    /// any, else the next new one). [`reserve_segment`](Self::reserve_segment)
    /// then [`open_segment`](Self::open_segment) in one step.
    pub fn add_segment(&self) -> Result<u32> {
        let mut st = sync::lock(&self.structural);
        let id = self.reserve_locked(&mut st)?;
        self.open_locked(&mut st, id)?;
        Ok(id)
    }

    /// Reserve a segment id, closed: the id (the lowest retired one if any,
    /// else the next new one) is the caller's until it calls
    /// [`open_segment`](Self::open_segment) or
    /// [`cancel_segment`](Self::cancel_segment), and no other reservation or
    /// `add_segment` gets it. Lets a caller prepare what belongs to the
    /// segment (its tensors) under its final id before any of its pages can
    /// be allocated.
    ///
    /// A reserved segment is not live: its pages are neither free nor
    /// allocatable and count in no page total, and `segment_count` leaves it
    /// out. It does hold its id: `max_segments` bounds live, retired and
    /// reserved ids together, so a reservation that is never opened nor
    /// cancelled keeps one id (and its few bytes of metadata) from every
    /// later growth. Fails with `IdSpaceExhausted` when no id is left.
    pub fn reserve_segment(&self) -> Result<u32> {
        let mut st = sync::lock(&self.structural);
        self.reserve_locked(&mut st)
    }

    /// Make a reserved segment live, every page free. Fails with
    /// `SegmentNotReserved` (and changes nothing) unless `segment_id` came
    /// from [`reserve_segment`](Self::reserve_segment) and was neither opened
    /// nor cancelled since.
    pub fn open_segment(&self, segment_id: i64) -> Result<()> {
        let mut st = sync::lock(&self.structural);
        let id = Self::reserved_id(&st, segment_id)?;
        self.open_locked(&mut st, id)
    }

    /// Give back a reserved id without opening it: it becomes a retired id,
    /// which the next reservation reuses. Fails as
    /// [`open_segment`](Self::open_segment) does.
    pub fn cancel_segment(&self, segment_id: i64) -> Result<()> {
        let mut st = sync::lock(&self.structural);
        let id = Self::reserved_id(&st, segment_id)?;
        st.reserved.remove(&id);
        st.retired.insert(id);
        Ok(())
    }

    /// Reserved segment ids, ascending (see [`reserve_segment`](Self::reserve_segment)).
    pub fn reserved_segments(&self) -> Vec<u32> {
        sync::lock(&self.structural)
            .reserved
            .iter()
            .copied()
            .collect()
    }

    /// `segment_id` as a reserved id, else `SegmentNotReserved`.
    fn reserved_id(st: &Structural, segment_id: i64) -> Result<u32> {
        u32::try_from(segment_id)
            .ok()
            .filter(|id| st.reserved.contains(id))
            .ok_or(CoreError::SegmentNotReserved {
                segment: segment_id,
            })
    }

    /// Take the lowest retired id, else create the next slot; the slot stays
    /// `CLOSED`. Under the structural lock.
    fn reserve_locked(&self, st: &mut Structural) -> Result<u32> {
        let id = match st.retired.pop_first() {
            Some(id) => id,
            None => {
                let id = self.high_water.load(Ordering::Relaxed);
                if id >= self.max_segments {
                    return Err(CoreError::IdSpaceExhausted {
                        segments: self.live.load(Ordering::Relaxed),
                        limit: self.max_segments,
                    });
                }
                self.create_slot(id);
                // Release: pairs with the Acquire in `Resolver::new` / `claim`.
                // Raised before the segment can become allocatable (in
                // `open_locked`): a thread that gets an id from it through
                // the summary bit (Acquire) sees the new bound, so a release
                // of that id on any thread accepts it.
                self.high_water.store(id + 1, Ordering::Release);
                id
            }
        };
        st.reserved.insert(id);
        Ok(id)
    }

    /// Open reserved slot `id`. Under the structural lock.
    fn open_locked(&self, st: &mut Structural, id: u32) -> Result<()> {
        let Some(segment) = self.segment(id) else {
            return Err(CoreError::Malformed(format!("segment slot {id} missing")));
        };
        st.reserved.remove(&id);
        // Every page is free: scan from the first word.
        segment.head.scan.store(0, Ordering::Relaxed);
        // Release: pairs with the Acquire loads in `reserve` and `live_page`;
        // the slot's all-set bits and zero refcounts are visible to them.
        segment
            .head
            .free
            .store(self.pages_per_segment, Ordering::Release);
        self.mark_nonfull(id);
        self.live.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Build slot `id` (and its shelf) under the structural lock.
    fn create_slot(&self, id: u32) {
        let c = id / CHUNK;
        let (shelf, idx) = chunk_position(c);
        let chunks = match self.shelves[shelf].get() {
            Some(chunks) => chunks,
            None => {
                let fresh: Box<[Chunk]> = (0..1usize << shelf)
                    .map(|_| Chunk {
                        summary: CachePadded(AtomicU64::new(0)),
                        slots: std::array::from_fn(|_| OnceBox::new()),
                    })
                    .collect();
                match self.shelves[shelf].set(Box::new(fresh)) {
                    Ok(chunks) => chunks,
                    Err(_) => unreachable_shelf(),
                }
            }
        };
        let seg = Segment::new(
            self.pages_per_segment,
            self.words_per_segment,
            self.last_word_mask,
        );
        // A slot below high_water is never created twice (the lock
        // serialises us and `id == high_water`), so `set` cannot fail.
        let _ = chunks[idx].slots[(id % CHUNK) as usize].set(Box::new(seg));
    }

    /// Retire a segment whose pages are all free. Its id may be reused by a
    /// later `add_segment` or `reserve_segment`; its page ids become invalid
    /// until then. A reserved id is not live: `InvalidSegment`.
    pub fn retire_segment(&self, segment_id: i64) -> Result<()> {
        let mut st = sync::lock(&self.structural);
        let live = self.live.load(Ordering::Relaxed);
        let invalid = CoreError::InvalidSegment {
            segment: segment_id,
            live,
        };
        let Ok(id) = u32::try_from(segment_id) else {
            return Err(invalid);
        };
        if id >= self.high_water.load(Ordering::Relaxed)
            || st.retired.contains(&id)
            || st.reserved.contains(&id)
        {
            return Err(invalid);
        }
        let Some(segment) = self.segment(id) else {
            return Err(invalid);
        };
        // AcqRel: only a segment with every page free and unreserved closes;
        // Acquire pairs with the releases' Release increments.
        // A sealed segment retires the same way once its pages are free.
        let all_free = |f: u32| f & !SEALED == self.pages_per_segment && f != CLOSED;
        if let Err(cur) = segment
            .head
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                all_free(f).then_some(CLOSED)
            })
        {
            return Err(CoreError::SegmentBusy {
                segment: id,
                used_pages: self.pages_per_segment - (cur & !SEALED).min(self.pages_per_segment),
            });
        }
        if let Some(chunk) = self.chunk(id / CHUNK) {
            self.mark_full(chunk, id % CHUNK, segment);
        }
        st.retired.insert(id);
        self.live.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// Live segment ids, ascending.
    pub fn segments(&self) -> Vec<u32> {
        let hw = self.high_water.load(Ordering::Acquire);
        (0..hw)
            .filter(|&s| {
                self.segment(s)
                    .is_some_and(|seg| seg.head.free.load(Ordering::Acquire) != CLOSED)
            })
            .collect()
    }

    /// Whether `segment_id` is live.
    pub fn is_live(&self, segment_id: u32) -> bool {
        self.segment(segment_id)
            .is_some_and(|s| s.head.free.load(Ordering::Acquire) != CLOSED)
    }

    /// Stop allocating from a live segment: its pages keep their references
    /// and may still be retained and released (a released page waits, free,
    /// until the segment is unsealed or retired), but `alloc` takes none.
    /// Every reservation made before the seal completes (its pages are the
    /// caller's); none starts after it. Idempotent. `InvalidSegment` unless
    /// the segment is live.
    pub fn seal_segment(&self, segment_id: i64) -> Result<()> {
        self.set_sealed(segment_id, true)
    }

    /// Let `alloc` take a sealed segment's free pages again. Idempotent.
    /// `InvalidSegment` unless the segment is live.
    pub fn unseal_segment(&self, segment_id: i64) -> Result<()> {
        self.set_sealed(segment_id, false)
    }

    /// Set or clear `SEALED` in a live segment's `free` word, then bring its
    /// summary bit up to date (cleared when sealed, set when unsealed with
    /// free pages).
    fn set_sealed(&self, segment_id: i64, sealed: bool) -> Result<()> {
        let id = self.live_segment_id(segment_id)?;
        let Some(segment) = self.segment(id) else {
            return Err(self.invalid_segment(segment_id));
        };
        // AcqRel: a reservation's CAS either precedes a seal (and is done
        // reserving) or sees the bit and takes nothing.
        let Ok(prev) = segment
            .head
            .free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                (f != CLOSED).then_some(if sealed { f | SEALED } else { f & !SEALED })
            })
        else {
            return Err(self.invalid_segment(segment_id));
        };
        if sealed {
            if let Some(chunk) = self.chunk(id / CHUNK) {
                self.mark_full(chunk, id % CHUNK, segment);
            }
        } else if prev & !SEALED != 0 {
            self.mark_nonfull(id);
        }
        Ok(())
    }

    /// Whether `segment_id` is live and sealed.
    pub fn is_sealed(&self, segment_id: u32) -> bool {
        self.segment(segment_id).is_some_and(|s| {
            let f = s.head.free.load(Ordering::Acquire);
            f != CLOSED && f & SEALED != 0
        })
    }

    fn invalid_segment(&self, segment_id: i64) -> CoreError {
        CoreError::InvalidSegment {
            segment: segment_id,
            live: self.live.load(Ordering::Relaxed),
        }
    }

    fn live_segment_id(&self, segment_id: i64) -> Result<u32> {
        match u32::try_from(segment_id) {
            Ok(id) if self.is_live(id) => Ok(id),
            _ => Err(self.invalid_segment(segment_id)),
        }
    }

    /// `(segment id, referenced pages)` for each live segment, ascending. A
    /// page reserved by an allocation in flight counts as referenced.
    pub fn segment_usage(&self) -> Vec<(u32, u32)> {
        let hw = self.high_water.load(Ordering::Acquire);
        (0..hw)
            .filter_map(|s| {
                let f = self.segment(s)?.head.free.load(Ordering::Acquire);
                (f != CLOSED).then(|| (s, self.pages_per_segment - (f & !SEALED)))
            })
            .collect()
    }

    /// Free pages in live segments (exact at a quiescent point).
    ///
    /// Visits only segments whose summary bit is set: a segment with free
    /// pages always has it at a quiescent point (see [`Chunk::summary`]), so
    /// with a full pool this costs one load per 64 segments, and adding a
    /// segment to a full pool costs the same at 1 and at 1,000 segments.
    pub fn free_pages(&self) -> u64 {
        let hw = self.high_water.load(Ordering::Acquire);
        let mut free = 0u64;
        for c in 0..hw.div_ceil(CHUNK) {
            let Some(chunk) = self.chunk(c) else { break };
            let mut summary = chunk.summary.load(Ordering::Acquire);
            while summary != 0 {
                let bit = summary.trailing_zeros();
                summary &= summary - 1;
                if let Some(segment) = self.segment(c * CHUNK + bit) {
                    let f = segment.head.free.load(Ordering::Acquire);
                    // A sealed segment's free pages cannot be allocated.
                    if f & SEALED == 0 {
                        free += u64::from(f);
                    }
                }
            }
        }
        free
    }

    /// Pages in live segments.
    pub fn total_pages(&self) -> u64 {
        u64::from(self.live.load(Ordering::Relaxed)) * u64::from(self.pages_per_segment)
    }

    /// Live segments.
    pub fn segment_count(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    /// Heap bytes of allocator metadata (bitmaps, refcounts, directory).
    pub fn metadata_bytes(&self) -> usize {
        let hw = self.high_water.load(Ordering::Acquire) as usize;
        let per_segment = std::mem::size_of::<Segment>()
            + self.words_per_segment * 8
            + self.pages_per_segment as usize * 4;
        let chunks: usize = (0..SHELVES)
            .filter(|&k| self.shelves[k].get().is_some())
            .map(|k| (1usize << k) * std::mem::size_of::<Chunk>())
            .sum();
        hw * per_segment + chunks
    }

    // ----- invariants ------------------------------------------------------------

    /// Check every invariant that holds at a quiescent point (no call in
    /// flight). Returns the first breach found.
    pub fn check_invariants(&self) -> Result<()> {
        let st = sync::lock(&self.structural);
        let bad = |m: String| Err(CoreError::Malformed(m));
        let hw = self.high_water.load(Ordering::Acquire);
        let pps = self.pages_per_segment;
        let mut live = 0u32;
        let mut total_free = 0u64;
        for s in 0..hw {
            let Some(seg) = self.segment(s) else {
                return bad(format!("segment slot {s} below high water {hw} missing"));
            };
            let free = seg.head.free.load(Ordering::Acquire);
            let retired = st.retired.contains(&s);
            let reserved = st.reserved.contains(&s);
            if retired && reserved {
                return bad(format!("segment {s} is both retired and reserved"));
            }
            let closed = retired || reserved;
            if closed != (free == CLOSED) {
                return bad(format!(
                    "segment {s}: retired {retired}, reserved {reserved}, free count {free}"
                ));
            }
            let mut set = 0u32;
            for p in 0..pps {
                let bit = seg.bits[(p / 64) as usize].load(Ordering::Acquire) >> (p % 64) & 1;
                let rc = seg.refcounts[p as usize].load(Ordering::Acquire);
                if (bit == 1) != (rc == 0) {
                    return bad(format!(
                        "page {}: free bit {bit} but refcount {rc}",
                        s * pps + p
                    ));
                }
                set += bit as u32;
            }
            let last = seg.bits[self.words_per_segment - 1].load(Ordering::Acquire);
            if last & !self.last_word_mask != 0 {
                return bad(format!("segment {s}: bits set past its last page"));
            }
            if closed {
                let state = if retired { "retired" } else { "reserved" };
                if set != pps {
                    return bad(format!("{state} segment {s} has {} used pages", pps - set));
                }
                continue;
            }
            live += 1;
            let sealed = free & SEALED != 0;
            let free = free & !SEALED;
            if !sealed {
                total_free += u64::from(free);
            }
            if set != free {
                return bad(format!(
                    "segment {s}: free count {free} but {set} free bits"
                ));
            }
            let summary = self
                .chunk(s / CHUNK)
                .map_or(0, |c| c.summary.load(Ordering::Acquire));
            if free > 0 && !sealed && summary >> (s % CHUNK) & 1 == 0 {
                return bad(format!(
                    "segment {s} has {free} free pages but its summary bit is clear"
                ));
            }
        }
        if total_free != self.free_pages() {
            return bad(format!(
                "{total_free} free pages counted, free_pages() says {}",
                self.free_pages()
            ));
        }
        if live != self.live.load(Ordering::Relaxed) {
            return bad(format!(
                "{live} live segments found, counter says {}",
                self.live.load(Ordering::Relaxed)
            ));
        }
        if st.retired.iter().chain(&st.reserved).any(|&r| r >= hw) {
            return bad("a retired or reserved id is past the high water".into());
        }
        Ok(())
    }
}

#[cold]
fn unreachable_shelf() -> ! {
    // A shelf is created once, under the structural lock, when its first
    // chunk is needed; a second creation would be a bug in `create_slot`.
    panic!("radixseg: shelf created twice")
}

/// The lowest `n` set bits of `x` (all of them if it has fewer).
#[inline]
fn lowest_bits(x: u64, n: usize) -> u64 {
    if x.count_ones() as usize <= n {
        return x;
    }
    let mut rest = x;
    for _ in 0..n {
        rest &= rest - 1;
    }
    x & !rest
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> Vec<i64> {
        v.iter().map(|&x| i64::from(x)).collect()
    }

    #[test]
    fn release_held_drops_one_reference_per_occurrence() {
        let a = SegmentAllocator::new(1, 64).expect("config");
        a.add_segment().expect("segment");
        let p = a.alloc(3).expect("pages");
        a.retain(&ids(&p[..1])).expect("retain"); // p[0] held twice
        a.release_held(&[p[0], p[1], p[0]]).expect("release");
        assert_eq!(a.refcount(&ids(&p)).expect("live"), vec![0, 0, 1]);
        assert_eq!(a.free_pages(), 63);
        // A page at 0 is refused and every decrement of the call undone.
        assert!(matches!(
            a.release_held(&[p[2], p[1]]),
            Err(CoreError::DoubleFree { .. })
        ));
        assert_eq!(a.refcount(&ids(&p)).expect("live"), vec![0, 0, 1]);
        a.check_invariants().expect("consistent");
    }

    #[test]
    fn scan_hint_is_only_a_hint() -> Result<()> {
        let a = SegmentAllocator::new(1, 200)?;
        let s = a.add_segment()?;
        let all = a.alloc(200)?;
        let seg = a.segment(s).ok_or(CoreError::Malformed("slot".into()))?;
        // A claim leaves the hint past the words it emptied.
        assert_eq!(seg.head.scan.load(Ordering::Relaxed), 4);
        // A release lowers it to the lowest word it gave bits to.
        a.release_held(&[3, 130, 131])?;
        assert_eq!(seg.head.scan.load(Ordering::Relaxed), 0);
        assert_eq!(a.alloc(1)?, vec![3]);
        // Word 0 is empty again; the claim stopped there, so the next scan
        // starts at word 1 (empty too: a hint need not be tight).
        assert_eq!(seg.head.scan.load(Ordering::Relaxed), 1);
        // Too high (as racing calls can leave it), or past the end: the scan
        // wraps round and still finds every free page.
        a.release_held(&[5, 70])?;
        for stale in [3, u32::MAX] {
            seg.head.scan.store(stale, Ordering::Relaxed);
            let got = a.alloc(4)?;
            let mut sorted = got.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![5, 70, 130, 131]);
            a.check_invariants()?;
            a.release_held(&got)?;
        }
        let held: Vec<u32> = all
            .into_iter()
            .filter(|p| ![5, 70, 130, 131].contains(p))
            .collect();
        a.release(&ids(&held))?;
        assert_eq!(a.free_pages(), 200);
        a.check_invariants()
    }

    #[test]
    fn release_runs_are_all_or_nothing() -> Result<()> {
        // Five pages a segment: the run 2..8 crosses from segment 0 into 1.
        let a = SegmentAllocator::new(1, 5)?;
        a.add_segment()?;
        a.add_segment()?;
        assert_eq!(a.alloc(10)?, (0..10).collect::<Vec<u32>>());
        let all: Vec<i64> = (0..10).collect();
        a.retain(&[2])?;
        a.release_held(&[2, 3, 4, 5, 6, 7])?;
        assert_eq!(a.refcount(&all)?, vec![1, 1, 1, 0, 0, 0, 0, 0, 1, 1]);
        // A page at 0 after pages that were decremented: all undone.
        assert_eq!(
            a.release_held(&[8, 9, 6, 7]),
            Err(CoreError::DoubleFree { page_id: 6 })
        );
        // Likewise with a page at 0 right after one taken to 0.
        assert_eq!(
            a.release_held(&[2, 3]),
            Err(CoreError::DoubleFree { page_id: 3 })
        );
        assert_eq!(
            a.release(&[0, 1, 3]),
            Err(CoreError::DoubleFree { page_id: 3 })
        );
        assert_eq!(a.refcount(&all)?, vec![1, 1, 1, 0, 0, 0, 0, 0, 1, 1]);
        a.check_invariants()?;
        a.release(&[0, 1, 2, 8, 9])?;
        assert_eq!(a.free_pages(), 10);
        a.check_invariants()
    }

    #[test]
    fn failed_alloc_leaves_claimed_pages_free() -> Result<()> {
        let a = SegmentAllocator::new(1, 100)?;
        a.add_segment()?;
        a.add_segment()?;
        let held = a.alloc(150)?;
        // Claims the 50 free pages, sets their refcounts, then gives them back.
        assert!(matches!(a.alloc(51), Err(CoreError::OutOfPages { .. })));
        let rest: Vec<i64> = (150..200).collect();
        assert_eq!(a.refcount(&rest)?, vec![0; 50]);
        a.check_invariants()?;
        assert_eq!(a.alloc(50)?, (150..200).collect::<Vec<u32>>());
        a.release_held(&held)?;
        a.check_invariants()
    }

    #[test]
    fn chunk_positions_tile_the_shelves() {
        assert_eq!(chunk_position(0), (0, 0));
        assert_eq!(chunk_position(1), (1, 0));
        assert_eq!(chunk_position(2), (1, 1));
        assert_eq!(chunk_position(3), (2, 0));
        assert_eq!(chunk_position(6), (2, 3));
        assert_eq!(chunk_position(7), (3, 0));
        let (shelf, _) = chunk_position((PAGE_ID_LIMIT / 64) as u32);
        assert!(shelf < SHELVES);
    }

    #[test]
    fn lowest_bits_takes_from_the_bottom() {
        assert_eq!(lowest_bits(0b1011_0110, 2), 0b0000_0110);
        assert_eq!(lowest_bits(0b1011_0110, 9), 0b1011_0110);
        assert_eq!(lowest_bits(u64::MAX, 64), u64::MAX);
    }

    #[test]
    fn rejects_bad_config() {
        assert!(SegmentAllocator::new(0, 4).is_err());
        assert!(SegmentAllocator::new(1025, 4).is_err());
        assert!(SegmentAllocator::new(48, 4).is_ok()); // 16-token pages x 3 ranks
        assert!(SegmentAllocator::new(2048, 4).is_err());
        assert!(SegmentAllocator::new(16, 0).is_err());
        assert!(SegmentAllocator::new(16, MAX_PAGES_PER_SEGMENT + 1).is_err());
    }

    #[test]
    fn alloc_is_all_or_nothing() -> Result<()> {
        let a = SegmentAllocator::new(16, 100)?;
        assert!(matches!(
            a.alloc(1),
            Err(CoreError::OutOfPages {
                requested: 1,
                available: 0,
                ..
            })
        ));
        a.add_segment()?;
        let x = a.alloc(60)?;
        assert_eq!(a.free_pages(), 40);
        let e = a.alloc(41).err();
        assert!(matches!(
            e,
            Some(CoreError::OutOfPages {
                requested: 41,
                available: 40,
                total: 100,
                segments: 1
            })
        ));
        assert_eq!(a.free_pages(), 40);
        a.check_invariants()?;
        a.release(&ids(&x))?;
        assert_eq!(a.free_pages(), 100);
        a.check_invariants()
    }

    #[test]
    fn alloc_spans_segments_lowest_first() -> Result<()> {
        let a = SegmentAllocator::new(1, 70)?;
        for _ in 0..3 {
            a.add_segment()?;
        }
        let x = a.alloc(150)?;
        let mut sorted = x.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 150);
        assert_eq!(sorted, (0..150).collect::<Vec<_>>());
        a.check_invariants()
    }

    #[test]
    fn refcounts_and_double_free() -> Result<()> {
        let a = SegmentAllocator::new(16, 8)?;
        a.add_segment()?;
        let x = ids(&a.alloc(2)?);
        a.retain(&x[..1])?;
        assert_eq!(a.refcount(&x)?, vec![2, 1]);
        a.release(&x)?;
        assert_eq!(a.refcount(&x)?, vec![1, 0]);
        // Releasing [x0, x1] fails on x1 (free): nothing changes.
        assert!(a.release(&x).is_err());
        assert_eq!(a.refcount(&x)?, vec![1, 0]);
        // Releasing x0 twice in one batch fails: nothing changes.
        assert!(matches!(
            a.release(&[x[0], x[0]]),
            Err(CoreError::DoubleFree { .. })
        ));
        assert_eq!(a.refcount(&x)?, vec![1, 0]);
        a.check_invariants()?;
        assert!(a.retain(&[x[1]]).is_err());
        assert!(a.retain(&[-1]).is_err());
        assert!(a.retain(&[1 << 40]).is_err());
        a.release(&x[..1])?;
        assert_eq!(a.free_pages(), 8);
        a.check_invariants()
    }

    #[test]
    fn retire_only_free_segments_and_reuse_ids() -> Result<()> {
        let a = SegmentAllocator::new(1, 4)?;
        let s0 = a.add_segment()?;
        let s1 = a.add_segment()?;
        let x = a.alloc(6)?;
        assert!(matches!(
            a.retire_segment(i64::from(s1)),
            Err(CoreError::SegmentBusy { used_pages: 2, .. })
        ));
        a.release(&ids(&x[4..]))?;
        a.retire_segment(i64::from(s1))?;
        assert_eq!(a.segments(), vec![s0]);
        assert!(a.retire_segment(i64::from(s1)).is_err());
        assert!(a.refcount(&[5]).is_err());
        let again = a.add_segment()?;
        assert_eq!(again, s1);
        assert_eq!(a.refcount(&ids(&x[..4]))?, vec![1; 4]);
        a.check_invariants()
    }

    #[test]
    fn sealed_segments_allocate_nothing_but_release_and_retire() -> Result<()> {
        let a = SegmentAllocator::new(1, 4)?;
        let s0 = a.add_segment()?;
        let s1 = a.add_segment()?;
        let x = a.alloc(3)?; // pages 0..3 of segment 0
        a.seal_segment(i64::from(s0))?;
        a.seal_segment(i64::from(s0))?; // idempotent
        assert!(a.is_sealed(s0) && !a.is_sealed(s1));
        // Segment 0's free page is not allocatable and not counted free.
        assert_eq!(a.free_pages(), 4);
        assert_eq!(a.alloc(4)?, vec![4, 5, 6, 7]);
        assert!(matches!(a.alloc(1), Err(CoreError::OutOfPages { .. })));
        a.check_invariants()?;
        // Releases go on; the pages wait, free, in the sealed segment.
        a.release(&ids(&x[..2]))?;
        assert_eq!(a.free_pages(), 0);
        assert_eq!(a.segment_usage(), vec![(s0, 1), (s1, 4)]);
        a.check_invariants()?;
        assert!(matches!(
            a.retire_segment(i64::from(s0)),
            Err(CoreError::SegmentBusy { used_pages: 1, .. })
        ));
        // Unsealed, its free pages are allocatable again.
        a.unseal_segment(i64::from(s0))?;
        assert_eq!(a.free_pages(), 3);
        a.seal_segment(i64::from(s0))?;
        a.release(&ids(&x[2..]))?;
        a.retire_segment(i64::from(s0))?; // sealed and empty: retires
        assert!(a.seal_segment(i64::from(s0)).is_err());
        assert!(a.unseal_segment(99).is_err() && a.seal_segment(-1).is_err());
        // A reused id starts unsealed.
        assert_eq!(a.add_segment()?, s0);
        assert!(!a.is_sealed(s0));
        assert_eq!(a.free_pages(), 4);
        a.check_invariants()
    }

    #[test]
    fn reserved_segments_are_closed_until_opened() -> Result<()> {
        let a = SegmentAllocator::new(1, 4)?.with_max_segments(3)?;
        let r = a.reserve_segment()?;
        assert_eq!(r, 0);
        assert_eq!(a.reserved_segments(), vec![0]);
        // Not live: no pages, none allocatable, its page ids refused.
        assert_eq!(
            (
                a.segments(),
                a.segment_count(),
                a.total_pages(),
                a.free_pages()
            ),
            (vec![], 0, 0, 0)
        );
        assert!(!a.is_live(r));
        assert!(matches!(a.alloc(1), Err(CoreError::OutOfPages { .. })));
        assert_eq!(
            a.refcount(&[1]),
            Err(not_live(1, 0)),
            "a page of a reserved segment"
        );
        assert_eq!(
            a.retire_segment(0),
            Err(CoreError::InvalidSegment {
                segment: 0,
                live: 0
            })
        );
        a.check_invariants()?;
        // Its id is taken: neither a reservation nor add_segment gets it.
        assert_eq!(a.reserve_segment()?, 1);
        assert_eq!(a.add_segment()?, 2);
        assert!(matches!(
            a.reserve_segment(),
            Err(CoreError::IdSpaceExhausted {
                segments: 1,
                limit: 3
            })
        ));
        a.check_invariants()?;
        a.open_segment(0)?;
        assert_eq!(a.segments(), vec![0, 2]);
        assert_eq!(a.free_pages(), 8);
        assert_eq!(a.alloc(5)?, vec![0, 1, 2, 3, 8]);
        // Once only; and only ids that were reserved.
        for bad in [0, 2, 3, -1, 1 << 40] {
            let e = Err(CoreError::SegmentNotReserved { segment: bad });
            assert_eq!(a.open_segment(bad), e);
            assert_eq!(a.cancel_segment(bad), e);
        }
        // A cancelled id is retired: the next reservation reuses it.
        a.cancel_segment(1)?;
        assert_eq!(a.reserved_segments(), vec![]);
        assert_eq!(a.refcount(&[4]), Err(not_live(4, 1)));
        a.check_invariants()?;
        assert_eq!(a.reserve_segment()?, 1);
        a.cancel_segment(1)?;
        assert_eq!(a.add_segment()?, 1);
        assert_eq!(a.alloc(3)?, vec![4, 5, 6]);
        a.check_invariants()
    }

    #[test]
    fn invariant_checker_covers_reserved_segments() -> Result<()> {
        let a = SegmentAllocator::new(1, 4)?;
        let r = a.reserve_segment()?;
        a.check_invariants()?;
        let Some(seg) = a.segment(r) else {
            return Err(CoreError::Malformed("slot missing".into()));
        };
        // Opened behind the bookkeeping's back: still listed as reserved.
        seg.head.free.store(4, Ordering::Release);
        assert!(matches!(a.check_invariants(), Err(CoreError::Malformed(_))));
        seg.head.free.store(CLOSED, Ordering::Release);
        // A reserved segment must have every page free.
        seg.bits[0].fetch_and(!1, Ordering::AcqRel);
        seg.refcounts[0].store(1, Ordering::Release);
        assert!(matches!(a.check_invariants(), Err(CoreError::Malformed(_))));
        seg.bits[0].fetch_or(1, Ordering::AcqRel);
        seg.refcounts[0].store(0, Ordering::Release);
        a.check_invariants()?;
        // Both reserved and retired.
        sync::lock(&a.structural).retired.insert(r);
        assert!(matches!(a.check_invariants(), Err(CoreError::Malformed(_))));
        sync::lock(&a.structural).retired.remove(&r);
        a.cancel_segment(i64::from(r))?;
        a.check_invariants()
    }

    #[test]
    fn id_space_is_bounded() -> Result<()> {
        let a = SegmentAllocator::new(1, MAX_PAGES_PER_SEGMENT)?;
        assert_eq!(a.max_segments(), 2048);
        assert!(SegmentAllocator::new(1, 4)?.with_max_segments(0).is_err());
        assert!(a.with_max_segments(2049).is_err());
        let b = SegmentAllocator::new(1, 3)?.with_max_segments(130)?;
        for _ in 0..130 {
            b.add_segment()?;
        }
        assert!(matches!(
            b.add_segment(),
            Err(CoreError::IdSpaceExhausted { limit: 130, .. })
        ));
        let all = b.alloc(390)?;
        assert_eq!(all.iter().max(), Some(&389));
        b.check_invariants()
    }
}
