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
use crate::radix::{check_tokens, NodeId, RadixTree};
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
#[derive(Debug)]
pub struct Request {
    tokens: Vec<i32>,
    pages: Vec<u32>,
    namespace: u64,
    node: NodeId,
    matched_pages: usize,
    page_size: usize,
    state: RequestState,
}

impl Request {
    /// Tokens whose KV the request holds (matched prefix + extended).
    pub fn tokens(&self) -> &[i32] {
        &self.tokens
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
        let ps = self.page_size;
        check_tokens(tokens)?;
        let start = self.tokens.len();
        let end = start + tokens.len();
        let need = end.div_ceil(ps).saturating_sub(self.pages.len());
        if need > 0 {
            // Straight into the page list: taken and recorded in one step.
            allocator.alloc_into(need, &mut self.pages)?;
        }
        // In range: checked above.
        self.tokens
            .extend(tokens.iter().map(|&t| Into::<i64>::into(t) as i32));
        Ok((start..end)
            .map(|pos| i64::from(self.pages[pos / ps]) * ps as i64 + (pos % ps) as i64)
            .collect())
    }

    /// Drop the tokens past `seq_len` and release the pages no longer
    /// needed (undo of an [`extend`](Self::extend)). The matched prefix
    /// cannot be dropped. All or nothing.
    pub fn truncate(&mut self, allocator: &SegmentAllocator, seq_len: usize) -> Result<()> {
        self.check_running()?;
        let floor = self.matched_pages * self.page_size;
        if seq_len > self.tokens.len() || seq_len < floor {
            return Err(CoreError::InvalidInput(format!(
                "truncate to {seq_len} tokens: the request holds {} and its matched prefix \
                 of {floor} cannot be dropped",
                self.tokens.len()
            )));
        }
        let keep = seq_len.div_ceil(self.page_size);
        let extra: Vec<i64> = self.pages[keep..].iter().map(|&p| i64::from(p)).collect();
        allocator.release(&extra)?;
        self.pages.truncate(keep);
        self.tokens.truncate(seq_len);
        Ok(())
    }

    /// Replace the tokens (same count): for callers that extend with
    /// placeholders before the sampled tokens are known. All or nothing.
    pub fn set_tokens<T: Copy + Into<i64>>(&mut self, tokens: &[T]) -> Result<()> {
        self.check_running()?;
        if tokens.len() != self.tokens.len() {
            return Err(CoreError::LengthMismatch {
                what: "set_tokens: one token per token the request holds",
                expected: self.tokens.len() as u64,
                actual: tokens.len() as u64,
            });
        }
        check_tokens(tokens)?;
        for (dst, &t) in self.tokens.iter_mut().zip(tokens) {
            *dst = Into::<i64>::into(t) as i32;
        }
        Ok(())
    }
}

impl RadixTree {
    /// Start a request: match and lock the longest cached prefix of `tokens`
    /// (whole pages) and record it. The request holds no page references for
    /// the matched pages; the lock keeps them cached.
    pub fn begin_request<T: Copy + Into<i64>>(
        &mut self,
        tokens: &[T],
        namespace: u64,
    ) -> Result<Request> {
        let m = self.acquire(tokens, namespace)?;
        let matched = tokens[..m.length]
            .iter()
            .map(|&t| Into::<i64>::into(t) as i32) // checked by the match
            .collect();
        Ok(Request {
            tokens: matched,
            matched_pages: m.page_ids.len(),
            pages: m.page_ids,
            namespace,
            node: m.node,
            page_size: self.page_size(),
            state: RequestState::Running,
        })
    }

    /// End `req`: with `cache`, insert its whole pages (the tree takes over
    /// the references of pages it did not cache yet); then unlock its node and
    /// drop its page references. All or nothing; a request that already
    /// ended is refused. Returns the tokens that were already cached.
    pub fn end_request(&mut self, req: &mut Request, cache: bool) -> Result<usize> {
        req.check_running()?;
        let cached = self.finish(
            &req.tokens,
            &req.pages,
            req.namespace,
            Some(req.node),
            cache,
            req.matched_pages,
        )?;
        req.state = if cache {
            RequestState::Finished
        } else {
            RequestState::Aborted
        };
        Ok(cached)
    }

    /// [`end_request`](Self::end_request) with the request's tokens replaced
    /// by `tokens` (same count) first, in one step: on any error the request
    /// keeps its old tokens and stays running.
    pub fn end_request_with<T: Copy + Into<i64>>(
        &mut self,
        req: &mut Request,
        cache: bool,
        tokens: &[T],
    ) -> Result<usize> {
        req.check_running()?;
        let old = req.tokens.clone();
        req.set_tokens(tokens)?;
        match self.end_request(req, cache) {
            Ok(n) => Ok(n),
            Err(e) => {
                req.tokens = old;
                Err(e)
            }
        }
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
        let mut r = t.begin_request(&[1i64, 2, 3, 4, 5], 0).expect("begin");
        let slots = r.extend(&a, &[1i64, 2, 3, 4, 5]).expect("extend");
        assert_eq!(slots.len(), 5);
        assert_eq!(r.page_ids().len(), 3);
        t.check_requests([&r], true).expect("accounted");
        assert_eq!(t.end_request(&mut r, true).expect("finish"), 0);
        assert!(t.end_request(&mut r, true).is_err());
        assert!(t.end_request(&mut r, false).is_err());
        assert_eq!(t.cached_pages(), 2);
        let mut s = t.begin_request(&[1i64, 2, 3, 4, 9], 0).expect("begin");
        assert_eq!((s.tokens().len(), s.matched_pages()), (4, 2));
        let mut other = t.begin_request(&[1i64, 2, 3, 4, 7], 0).expect("begin");
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
        let mut r = t.begin_request(&[0i64; 0], 0).expect("begin");
        r.extend(&a, &[1i64; 60]).expect("15 pages");
        let before = (r.tokens().to_vec(), r.page_ids().to_vec(), a.free_pages());
        assert!(matches!(
            r.extend(&a, &[1i64; 8]),
            Err(CoreError::OutOfPages { .. })
        ));
        assert!(matches!(
            r.extend(&a, &[1i64, -1]),
            Err(CoreError::InvalidToken { index: 1, .. })
        ));
        assert_eq!(
            (r.tokens().to_vec(), r.page_ids().to_vec(), a.free_pages()),
            before
        );
        r.truncate(&a, 5).expect("truncate");
        assert_eq!(
            (r.tokens().len(), r.page_ids().len(), a.free_pages()),
            (5, 2, 14)
        );
        assert!(r.truncate(&a, 6).is_err());
        assert!(t.end_request_with(&mut r, true, &[1i64]).is_err());
        assert!(t
            .end_request_with(&mut r, true, &[1i64, 2, 3, 4, -5])
            .is_err());
        assert_eq!(
            (r.tokens(), r.state()),
            (&[1, 1, 1, 1, 1][..], RequestState::Running)
        );
        t.end_request_with(&mut r, true, &[9i64, 8, 7, 6, 5])
            .expect("finish");
        assert_eq!(
            (r.tokens(), r.state()),
            (&[9, 8, 7, 6, 5][..], RequestState::Finished)
        );
        assert_eq!(t.cached_pages(), 1);
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
