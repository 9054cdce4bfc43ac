//! One request's hold on the cache, changed only by whole calls.
//!
//! A [`Request`] owns what a running sequence holds: the lock on the node
//! that ends its matched prefix, one reference to every page it allocated,
//! and its tokens. Each state change is one method that either completes or
//! changes nothing, so a caller interrupted between two of its own steps
//! (a Python signal handler, a thread switch) never leaves pages that nobody
//! accounts for:
//!
//! * [`RadixTree::begin_request`] matches and locks the longest cached
//!   prefix and records it;
//! * [`Request::extend`] appends tokens and the pages they need (allocated
//!   here, so they are recorded in the same call that takes them);
//! * [`RadixTree::end_request`] caches (or not) and releases everything, and
//!   marks the request ended, so it ends exactly once.

use crate::error::{CoreError, Result};
use crate::radix::{check_token_bits, check_tokens, tokens_u32, NodeId, RadixTree};
use crate::SegmentAllocator;

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestState {
    /// Holds its lock and pages.
    Running,
    /// Ended by `end_request(cache = true)`.
    Finished,
    /// Ended by `end_request(cache = false)`.
    Aborted,
}

impl RequestState {
    /// `"running"`, `"finished"` or `"aborted"`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Aborted => "aborted",
        }
    }
}

/// A running sequence's tokens, pages and prefix lock (see the module docs).
///
/// The tokens of the matched prefix are not copied: they are the tree's, on
/// the path to the locked node, which the lock keeps. The request holds the
/// tokens past them (`new_tokens`), so that beginning a request on a long
/// cached prefix copies no tokens and ending it compares only the new ones.
#[derive(Debug)]
pub struct Request {
    tail: Vec<u32>,
    pages: Vec<u32>,
    namespace: u64,
    node: NodeId,
    matched_pages: usize,
    page_size: usize,
    state: RequestState,
}

impl Request {
    /// Tokens past the matched prefix (each in `0..2^31`): what
    /// [`extend`](Self::extend) appended. The whole sequence is
    /// [`RadixTree::request_tokens`].
    pub fn new_tokens(&self) -> &[u32] {
        &self.tail
    }

    /// Tokens whose KV the request holds: the matched prefix and the new ones.
    pub fn seq_len(&self) -> usize {
        self.matched_len() + self.tail.len()
    }

    /// Tokens of the matched prefix (whole pages).
    pub fn matched_len(&self) -> usize {
        self.matched_pages * self.page_size
    }

    /// Its pages in order: the matched ones first (held by the lock), then
    /// those it allocated (one reference each).
    pub fn page_ids(&self) -> &[u32] {
        &self.pages
    }

    /// Its namespace.
    pub fn namespace(&self) -> u64 {
        self.namespace
    }

    /// The node its lock is on (meaningful while running).
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Leading pages that came from the cache (held by the lock, not referenced).
    pub fn matched_pages(&self) -> usize {
        self.matched_pages
    }

    /// Where it is in its life.
    pub fn state(&self) -> RequestState {
        self.state
    }

    /// Append one token to each request in `reqs` (`tokens[i]` to
    /// `reqs[i]`), allocating from `allocator`, in one step, the
    /// pages those whose last page is full need: a decode step. Returns the
    /// new tokens' slots, one per request. All or nothing: a request that is
    /// not running, a bad token or too few free pages
    /// ([`CoreError::OutOfPages`] for the whole batch) changes nothing.
    pub fn extend_each<T: Copy + Into<i64>>(
        allocator: &SegmentAllocator,
        reqs: &mut [&mut Request],
        tokens: &[T],
    ) -> Result<Vec<i64>> {
        if tokens.len() != reqs.len() {
            return Err(CoreError::LengthMismatch {
                what: "extend_each: one token per request",
                expected: reqs.len() as u64,
                actual: tokens.len() as u64,
            });
        }
        check_tokens(tokens)?;
        let mut need = 0usize;
        for r in reqs.iter() {
            r.check_running()?;
            need += usize::from(r.needs_page());
        }
        let mut fresh = Vec::with_capacity(need);
        allocator.alloc_into(need, &mut fresh)?;
        let mut fresh = fresh.into_iter();
        let mut slots = Vec::with_capacity(reqs.len());
        for (r, &t) in reqs.iter_mut().zip(tokens) {
            let pos = r.seq_len();
            if r.needs_page() {
                // Counted above: exactly one page per request whose last is full.
                if let Some(p) = fresh.next() {
                    r.pages.push(p);
                }
            }
            r.tail.push(Into::<i64>::into(t) as u32);
            r.push_slots(pos, &mut slots);
        }
        Ok(slots)
    }

    /// FlashInfer's paged-KV CSR of `reqs`: `kv_indptr [B + 1]`,
    /// `kv_indices` (their page ids, request after request) and
    /// `kv_last_page_len [B]` (tokens in each last page, `1..=page_size`; 0
    /// for a request without tokens), built in one pass. `int32` as
    /// FlashInfer takes them: more than `2^31 - 1` pages in all is
    /// [`CoreError::TreeCapacity`]; a request that ended is refused.
    pub fn page_table(reqs: &[&Request]) -> Result<(Vec<i32>, Vec<i32>, Vec<i32>)> {
        let mut indices = vec![0; Self::page_table_len(reqs)?];
        let (indptr, last) = Self::page_table_into(reqs, &mut indices)?;
        Ok((indptr, indices, last))
    }

    /// Pages in the page table of `reqs` (refused as [`page_table`](Self::page_table)).
    pub fn page_table_len(reqs: &[&Request]) -> Result<usize> {
        // An ended request's pages may be another's by now.
        for r in reqs {
            r.check_running()?;
        }
        let total: usize = reqs.iter().map(|r| r.pages.len()).sum();
        if total > i32::MAX as usize {
            return Err(CoreError::TreeCapacity {
                what: "pages in one page table (int32 kv_indptr)",
                limit: i32::MAX as u64,
            });
        }
        Ok(total)
    }

    /// [`page_table`](Self::page_table) with `kv_indices` written into the
    /// front of `indices` (a buffer reused across decode steps, so a step
    /// does not allocate and fault in a fresh one); returns `kv_indptr` and
    /// `kv_last_page_len`. A buffer shorter than the table is refused and
    /// left as it was.
    pub fn page_table_into(reqs: &[&Request], indices: &mut [i32]) -> Result<(Vec<i32>, Vec<i32>)> {
        let total = Self::page_table_len(reqs)?;
        if indices.len() < total {
            return Err(CoreError::LengthMismatch {
                what: "page_table(out=...): the buffer must hold every page of the table",
                expected: total as u64,
                actual: indices.len() as u64,
            });
        }
        let mut indptr = Vec::with_capacity(reqs.len() + 1);
        let mut last = Vec::with_capacity(reqs.len());
        indptr.push(0);
        let mut at = 0;
        for r in reqs {
            // Page ids are below PAGE_ID_LIMIT = 2^31, page counts too.
            for (dst, &p) in indices[at..at + r.pages.len()].iter_mut().zip(&r.pages) {
                *dst = p as i32;
            }
            at += r.pages.len();
            indptr.push(at as i32);
            let n = r.seq_len();
            last.push(if n == 0 {
                0
            } else {
                (n - (r.pages.len() - 1) * r.page_size) as i32
            });
        }
        Ok((indptr, last))
    }

    fn check_running(&self) -> Result<()> {
        match self.state {
            RequestState::Running => Ok(()),
            ended => Err(CoreError::InvalidInput(format!(
                "the request is already {}: a request ends exactly once; begin a new one",
                ended.name()
            ))),
        }
    }

    /// Append `tokens`, allocating from `allocator` the pages they need past
    /// the partly filled last one; returns their slots
    /// (`page_id * page_size + offset`). All or nothing: a bad token or too
    /// few free pages ([`CoreError::OutOfPages`]) changes nothing.
    pub fn extend<T: Copy + Into<i64>>(
        &mut self,
        allocator: &SegmentAllocator,
        tokens: &[T],
    ) -> Result<Vec<i64>> {
        self.check_running()?;
        check_tokens(tokens)?;
        let start = self.seq_len();
        self.take_pages(allocator, start + tokens.len())?;
        // In range: checked above.
        self.tail
            .extend(tokens.iter().map(|&t| Into::<i64>::into(t) as u32));
        let mut slots = Vec::with_capacity(tokens.len());
        self.push_slots(start, &mut slots);
        Ok(slots)
    }

    /// Whether one more token needs a new page (the last one is full).
    fn needs_page(&self) -> bool {
        (self.seq_len() + 1).div_ceil(self.page_size) > self.pages.len()
    }

    /// Allocate the pages that `seq_len` tokens need past those held,
    /// straight into the page list (taken and recorded in one step).
    fn take_pages(&mut self, allocator: &SegmentAllocator, seq_len: usize) -> Result<()> {
        let need = seq_len
            .div_ceil(self.page_size)
            .saturating_sub(self.pages.len());
        if need > 0 {
            allocator.alloc_into(need, &mut self.pages)?;
        }
        Ok(())
    }

    /// Append to `out` the slots (`page * page_size + offset`) of the tokens
    /// from position `start` on.
    fn push_slots(&self, start: usize, out: &mut Vec<i64>) {
        let ps = self.page_size;
        if ps == 1 {
            out.extend(self.pages[start..].iter().map(|&p| i64::from(p)));
            return;
        }
        let (mut pos, end) = (start, self.seq_len());
        while pos < end {
            let (page, off) = (pos / ps, pos % ps);
            let run = (ps - off).min(end - pos);
            let base = i64::from(self.pages[page]) * ps as i64;
            out.extend((off..off + run).map(|o| base + o as i64));
            pos += run;
        }
    }

    /// Drop the tokens past `seq_len` and release the pages no longer
    /// needed (undo of an [`extend`](Self::extend)). The matched prefix
    /// cannot be dropped. All or nothing.
    pub fn truncate(&mut self, allocator: &SegmentAllocator, seq_len: usize) -> Result<()> {
        self.check_running()?;
        let floor = self.matched_len();
        if seq_len > self.seq_len() || seq_len < floor {
            return Err(CoreError::InvalidInput(format!(
                "truncate to {seq_len} tokens: the request holds {} and its matched prefix \
                 of {floor} cannot be dropped",
                self.seq_len()
            )));
        }
        let keep = seq_len.div_ceil(self.page_size);
        let extra: Vec<i64> = self.pages[keep..].iter().map(|&p| i64::from(p)).collect();
        allocator.release(&extra)?;
        self.pages.truncate(keep);
        self.tail.truncate(seq_len - floor);
        Ok(())
    }
}

impl RadixTree {
    /// Start a request: match and lock the longest cached prefix of `tokens`
    /// (whole pages; with `leave_last`, of all tokens but the last, so that
    /// the last prompt token is always computed) and record it. Every token
    /// is validated. The request holds no page references for the matched
    /// pages and no copy of their tokens; the lock keeps them cached.
    pub fn begin_request<T: Copy + Into<i64>>(
        &mut self,
        tokens: &[T],
        namespace: u64,
        leave_last: bool,
    ) -> Result<Request> {
        let toks = tokens_u32(tokens)?;
        self.begin_valid(&toks, namespace, leave_last)
    }

    /// [`begin_request`](Self::begin_request) of an `int32` array's bits
    /// read as `u32` (no copy); a negative token is reported with its
    /// `int32` value.
    pub fn begin_request_u32(
        &mut self,
        tokens: &[u32],
        namespace: u64,
        leave_last: bool,
    ) -> Result<Request> {
        check_token_bits(tokens, 0)?;
        self.begin_valid(tokens, namespace, leave_last)
    }

    fn begin_valid(&mut self, toks: &[u32], namespace: u64, leave_last: bool) -> Result<Request> {
        let ps = self.page_size();
        let query = toks.len().saturating_sub(usize::from(leave_last)) / ps * ps;
        let m = self.match_whole(&toks[..query], namespace)?;
        self.lock(m.node)?;
        Ok(Request {
            tail: Vec::new(),
            matched_pages: m.page_ids.len(),
            pages: m.page_ids,
            namespace,
            node: m.node,
            page_size: ps,
            state: RequestState::Running,
        })
    }

    /// The tokens whose KV `req` holds: its matched prefix (read from the
    /// tree, on the locked path) and its new tokens. Refused once it ended
    /// (its path may be evicted by then).
    pub fn request_tokens(&self, req: &Request) -> Result<Vec<u32>> {
        req.check_running()?;
        let mut out = self.path_tokens(req.node)?;
        debug_assert_eq!(out.len(), req.matched_len());
        out.extend_from_slice(&req.tail);
        Ok(out)
    }

    /// End `req`: with `cache`, insert its whole pages (the tree takes over
    /// the references of pages it did not cache yet); then unlock its node and
    /// drop its page references. All or nothing; a request that already
    /// ended is refused. Returns the tokens that were already cached.
    pub fn end_request(&mut self, req: &mut Request, cache: bool) -> Result<usize> {
        req.check_running()?;
        let cached =
            self.finish_owned(&req.tail, &req.pages, req.node, cache, req.matched_pages)?;
        req.state = if cache {
            RequestState::Finished
        } else {
            RequestState::Aborted
        };
        Ok(cached)
    }

    /// [`end_request`](Self::end_request) with the request's tokens replaced
    /// by `tokens` (same count) first, in one step: on any error the request
    /// keeps its old tokens and stays running. The matched prefix cannot
    /// change: its KV is cached under those tokens.
    pub fn end_request_with<T: Copy + Into<i64>>(
        &mut self,
        req: &mut Request,
        cache: bool,
        tokens: &[T],
    ) -> Result<usize> {
        req.check_running()?;
        if tokens.len() != req.seq_len() {
            return Err(CoreError::LengthMismatch {
                what: "finish(tokens=...): one token per token the request holds",
                expected: req.seq_len() as u64,
                actual: tokens.len() as u64,
            });
        }
        let toks = tokens_u32(tokens)?;
        let matched = req.matched_len();
        let prefix = self.path_tokens(req.node)?;
        if let Some(i) = (0..matched).find(|&i| toks[i] != prefix[i]) {
            return Err(CoreError::InvalidInput(format!(
                "finish(tokens=...): token {i} is {} but the request's cached prefix of \
                 {matched} tokens has {} there; only tokens past the prefix can be replaced",
                toks[i], prefix[i]
            )));
        }
        let tail = toks[matched..].to_vec();
        let cached = self.finish_owned(&tail, &req.pages, req.node, cache, req.matched_pages)?;
        req.tail = tail;
        req.state = if cache {
            RequestState::Finished
        } else {
            RequestState::Aborted
        };
        Ok(cached)
    }

    /// Every page the tree caches, once each (the tree holds one reference
    /// per page). For invariant checks: O(cached pages).
    pub fn cached_page_ids(&self) -> Vec<u32> {
        self.node_pages()
    }
}

impl RadixTree {
    /// Check that the page references add up: every page the tree caches or
    /// a running request in `running` allocated has at least the references
    /// they account for (one per holder). With `exclusive` (the tree and
    /// these requests are the allocator's only users) each such page has
    /// exactly that many and no other page is referenced, so a page that
    /// nobody accounts for (a leak) is reported too.
    pub fn check_requests<'a>(
        &self,
        running: impl IntoIterator<Item = &'a Request>,
        exclusive: bool,
    ) -> Result<()> {
        let bad = |m: String| Err(CoreError::Malformed(format!("requests: {m}")));
        let mut held: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for p in self.node_pages() {
            *held.entry(p).or_default() += 1;
        }
        let mut requests = 0usize;
        for r in running {
            if r.state != RequestState::Running {
                continue;
            }
            requests += 1;
            for &p in &r.pages[r.matched_pages..] {
                *held.entry(p).or_default() += 1;
            }
        }
        let mut ids: Vec<u32> = held.keys().copied().collect();
        ids.sort_unstable();
        let wide: Vec<i64> = ids.iter().map(|&p| i64::from(p)).collect();
        let counts = self.allocator().refcount(&wide)?;
        for (&p, &rc) in ids.iter().zip(&counts) {
            let want = held[&p];
            if rc < want || (exclusive && rc != want) {
                return bad(format!(
                    "page {p} has refcount {rc}, but the tree and {requests} running \
                     request(s) hold {want} reference(s) to it"
                ));
            }
        }
        if exclusive {
            let used = self.allocator().total_pages() - self.allocator().free_pages();
            if used != ids.len() as u64 {
                return bad(format!(
                    "{used} pages are referenced, but the tree and {requests} running \
                     request(s) account for {} (pages leaked by an interrupted call?)",
                    ids.len()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::Arc;

    fn setup(ps: u32) -> (Arc<SegmentAllocator>, RadixTree) {
        let a = Arc::new(SegmentAllocator::new(ps, 16).expect("config"));
        a.add_segment().expect("segment");
        let t = RadixTree::new(Arc::clone(&a));
        (a, t)
    }

    #[test]
    fn a_request_ends_exactly_once_and_shares_its_prefix() {
        let (a, mut t) = setup(2);
        let mut r = t
            .begin_request(&[1i64, 2, 3, 4, 5], 0, false)
            .expect("begin");
        let slots = r.extend(&a, &[1i64, 2, 3, 4, 5]).expect("extend");
        assert_eq!(slots.len(), 5);
        assert_eq!(r.page_ids().len(), 3);
        t.check_requests([&r], true).expect("accounted");
        assert_eq!(t.end_request(&mut r, true).expect("finish"), 0);
        assert!(t.end_request(&mut r, true).is_err());
        assert!(t.end_request(&mut r, false).is_err());
        assert_eq!(t.cached_pages(), 2);
        let mut s = t
            .begin_request(&[1i64, 2, 3, 4, 9], 0, false)
            .expect("begin");
        assert_eq!((s.seq_len(), s.matched_pages()), (4, 2));
        assert_eq!(t.request_tokens(&s).expect("running"), vec![1, 2, 3, 4]);
        let mut other = t
            .begin_request(&[1i64, 2, 3, 4, 7], 0, false)
            .expect("begin");
        other.extend(&a, &[7i64]).expect("extend");
        // The cached prefix cannot be replaced; what follows it can.
        assert!(t
            .end_request_with(&mut other, true, &[1i64, 2, 3, 5, 7])
            .is_err());
        assert_eq!(other.state(), RequestState::Running);
        assert_eq!(
            t.request_tokens(&other).expect("running"),
            vec![1, 2, 3, 4, 7]
        );
        t.end_request(&mut s, false).expect("abort");
        // Ending `s` again would drop `other`'s lock if it were not refused.
        assert!(t.end_request(&mut s, false).is_err());
        assert_eq!(t.lock_count(other.node()).expect("node"), 1);
        t.end_request(&mut other, false).expect("abort");
        t.check_requests([], true).expect("accounted");
        t.check_invariants().expect("tree");
    }

    #[test]
    fn extend_and_truncate_are_all_or_nothing() {
        let (a, mut t) = setup(4);
        let mut r = t.begin_request(&[0i64; 0], 0, false).expect("begin");
        r.extend(&a, &[1i64; 60]).expect("15 pages");
        let before = (
            r.new_tokens().to_vec(),
            r.page_ids().to_vec(),
            a.free_pages(),
        );
        assert!(matches!(
            r.extend(&a, &[1i64; 8]),
            Err(CoreError::OutOfPages { .. })
        ));
        assert!(matches!(
            r.extend(&a, &[1i64, -1]),
            Err(CoreError::InvalidToken { index: 1, .. })
        ));
        assert_eq!(
            (
                r.new_tokens().to_vec(),
                r.page_ids().to_vec(),
                a.free_pages()
            ),
            before
        );
        r.truncate(&a, 5).expect("truncate");
        assert_eq!(
            (r.seq_len(), r.page_ids().len(), a.free_pages()),
            (5, 2, 14)
        );
        assert!(r.truncate(&a, 6).is_err());
        assert!(t.end_request_with(&mut r, true, &[1i64]).is_err());
        assert!(t
            .end_request_with(&mut r, true, &[1i64, 2, 3, 4, -5])
            .is_err());
        assert_eq!(
            (r.new_tokens(), r.state()),
            (&[1, 1, 1, 1, 1][..], RequestState::Running)
        );
        t.end_request_with(&mut r, true, &[9i64, 8, 7, 6, 5])
            .expect("finish");
        assert_eq!(
            (r.new_tokens(), r.state()),
            (&[9, 8, 7, 6, 5][..], RequestState::Finished)
        );
        assert_eq!(t.cached_pages(), 1);
        t.check_requests([], true).expect("accounted");
    }

    /// Requests (begin, extend, end through `finish_owned`) against the
    /// validating `acquire`/`alloc`/`finish` path on a second tree: the same
    /// trace leaves the same trees, hits and free pages.
    #[test]
    fn the_request_path_matches_the_validating_path() {
        for ps in [1u32, 2, 4] {
            let (a1, mut t1) = setup(ps);
            let (a2, mut t2) = setup(ps);
            let mut seed = 0x9e37_79b9_u64 + u64::from(ps);
            let mut next = |n: u64| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (seed >> 33) % n
            };
            for round in 0..300 {
                let len = 1 + next(12) as usize;
                let base = next(3) as i64;
                let toks: Vec<i64> = (0..len as i64)
                    .map(|i| (base * 7 + i * (i % 3)) % 5)
                    .collect();
                let cache = round % 5 != 0;
                let mut r = t1.begin_request(&toks, 0, false).expect("begin");
                let m = t2.acquire(&toks, 0).expect("acquire");
                assert_eq!(r.seq_len(), m.length);
                let rest = &toks[m.length..];
                let fits = r.extend(&a1, rest);
                let need = len.div_ceil(ps as usize) - m.page_ids.len();
                let got = a2.alloc(need);
                assert_eq!(fits.is_ok(), got.is_ok());
                let Ok(new) = got else {
                    t1.end_request(&mut r, false).expect("abort");
                    let ids: Vec<i64> = m.page_ids.iter().map(|&p| i64::from(p)).collect();
                    t2.finish(&toks[..m.length], &ids, 0, Some(m.node), false, ids.len())
                        .expect("abort");
                    let short = (need as u64).saturating_sub(a1.free_pages());
                    assert_eq!(
                        t1.evict(short as usize).expect("evict"),
                        t2.evict(short as usize).expect("evict")
                    );
                    continue;
                };
                let ids: Vec<u32> = m.page_ids.iter().copied().chain(new).collect();
                assert_eq!(r.page_ids(), &ids[..]);
                let c1 = t1.end_request(&mut r, cache).expect("end");
                let c2 = t2
                    .finish(&toks, &ids, 0, Some(m.node), cache, m.page_ids.len())
                    .expect("finish");
                assert_eq!(c1, c2);
                assert_eq!(
                    (t1.node_count(), t1.cached_pages(), a1.free_pages()),
                    (t2.node_count(), t2.cached_pages(), a2.free_pages())
                );
                t1.check_requests([], true).expect("accounted");
                t1.check_invariants().expect("tree");
            }
        }
    }

    #[test]
    fn extend_each_is_one_step_for_the_batch() {
        let (a, mut t) = setup(2);
        let mut rs: Vec<Request> = (0..3)
            .map(|i| t.begin_request(&[i as i64], 0, false).expect("begin"))
            .collect();
        for (i, r) in rs.iter_mut().enumerate() {
            r.extend(&a, &vec![1i64; i + 1]).expect("extend");
        }
        // Lengths 1, 2, 3: the second needs a page, the others do not.
        let free = a.free_pages();
        let mut refs: Vec<&mut Request> = rs.iter_mut().collect();
        let slots = Request::extend_each(&a, &mut refs, &[5i64, 6, 7]).expect("step");
        assert_eq!(a.free_pages(), free - 1);
        let pt =
            Request::page_table(&refs.iter().map(|r| &**r).collect::<Vec<_>>()).expect("table");
        assert_eq!(pt.0, vec![0, 1, 3, 5]);
        assert_eq!(pt.2, vec![2, 1, 2]);
        for (r, s) in refs.iter().zip(&slots) {
            let last = *r.page_ids().last().expect("a page");
            assert_eq!(*s, i64::from(last) * 2 + (r.seq_len() as i64 - 1) % 2);
        }
        // All or nothing: a bad token, a length mismatch, too few pages.
        let before: Vec<usize> = refs.iter().map(|r| r.seq_len()).collect();
        assert!(Request::extend_each(&a, &mut refs, &[1i64, -1, 1]).is_err());
        assert!(Request::extend_each(&a, &mut refs, &[1i64]).is_err());
        let hog = a.alloc(a.free_pages() as usize).expect("the rest");
        assert!(matches!(
            Request::extend_each(&a, &mut refs, &[1i64, 1, 1]),
            Err(CoreError::OutOfPages { .. })
        ));
        assert_eq!(refs.iter().map(|r| r.seq_len()).collect::<Vec<_>>(), before);
        a.release(&hog.iter().map(|&p| i64::from(p)).collect::<Vec<_>>())
            .expect("release");
        for r in rs.iter_mut() {
            t.end_request(r, true).expect("end");
        }
        let refs: Vec<&Request> = rs.iter().collect();
        assert!(Request::page_table(&refs).is_err()); // ended
        t.check_requests([], true).expect("accounted");
    }

    #[test]
    fn check_requests_sees_a_leaked_page() {
        let (a, t) = setup(1);
        let leaked = a.alloc(1).expect("page");
        assert!(t.check_requests([], false).is_ok());
        assert!(t.check_requests([], true).is_err());
        a.release(&[i64::from(leaked[0])]).expect("release");
        t.check_requests([], true).expect("accounted");
    }
}
