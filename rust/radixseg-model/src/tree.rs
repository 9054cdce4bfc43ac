//! The tree model: `RadixTree` + `SegmentAllocator` against a naive prefix
//! map, with allocator growth (add / retire segments) interleaved.
//!
//! The oracle is the map `(namespace, page-aligned prefix) -> page id`
//! (every cached prefix of whole pages and the page that ends it), the multiset of page references the harness itself
//! holds (as a running request would), the locks it holds, the requests it
//! has started with `acquire` and every node handle it has seen. Checked:
//!
//! * `match_prefix` returns exactly the pages inserted for the longest cached
//!   prefix in that namespace (never another namespace's), and its handle
//!   names a node whose path is that prefix;
//! * `insert` and `finish` report exactly the cached part, or fail with
//!   exactly the error the oracle predicts (length, node, release, token and
//!   page-id checks in the documented order) and then change nothing;
//!   `acquire` matches and locks; a `finish` that succeeds unlocks, caches
//!   and releases exactly what it was asked to;
//! * `evict` removes only unlocked, suffix-closed parts, releases what it
//!   says, and stops short only when nothing evictable is left; `reset`
//!   drops everything and makes every handle stale;
//! * `lock` / `unlock` of live, stale, unbalanced and made-up handles;
//! * after every action: both `check_invariants`, the tree's content equals
//!   the map, cached / locked / evictable page counts, every page's refcount
//!   is exactly (tree copies + harness references) and pages nobody
//!   references are free, every handle the oracle calls stale is refused;
//! * at the end, dropping every reference, lock and cached page leaves the
//!   allocator entirely free (no leak).
//!
//! Tokens come from a tiny alphabet (four page patterns that share their
//! first tokens, plus the largest valid token) so that prefixes collide and
//! nodes split; namespaces take four values chosen so that their low and
//! high 32-bit halves collide.

use crate::{pick, pick_within_counts};
use arbitrary::Arbitrary;
use radixseg_core::{
    Arc, CoreError, HandleProblem, NodeId, RadixTree, SegmentAllocator, TOKEN_LIMIT,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// The oracle: namespace -> whole-page prefix -> the page that ends it.
/// Lookups by slice allocate nothing. No namespace maps to an empty map, so
/// `==` compares contents.
#[derive(Clone, Debug, Default, PartialEq)]
struct Model(HashMap<u64, HashMap<Vec<u32>, u32>>);

impl Model {
    fn get(&self, ns: u64, prefix: &[u32]) -> Option<u32> {
        self.0.get(&ns)?.get(prefix).copied()
    }

    /// Add a prefix; returns the page it had (`None` if it was new).
    fn insert(&mut self, ns: u64, prefix: &[u32], page: u32) -> Option<u32> {
        self.0.entry(ns).or_default().insert(prefix.to_vec(), page)
    }

    fn len(&self) -> usize {
        self.0.values().map(HashMap::len).sum()
    }

    fn pages(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.values().flat_map(|m| m.values().copied())
    }

    fn namespaces(&self) -> usize {
        self.0.len()
    }
}

const NAMESPACES: [u64; 4] = [0, 1, 1 << 32, u64::MAX];
const MAX_TOKEN: u32 = (1 << 31) - 1;
/// Churn rounds per input, at most.
const CHURN_BUDGET: u64 = 1024;
const BAD_TOKENS: [i64; 6] = [-1, 1 << 31, i64::MIN, i64::MAX, u32::MAX as i64, -(1 << 31)];

/// Raw configuration bytes: page size `1 << (page_size % 4)`, `1 +
/// pages_per_segment % 8` pages per segment, at most `1 + max_segments % 8`
/// segments, `1 + initial_segments % 3` of them added at the start.
#[derive(Arbitrary, Debug, Clone)]
pub struct RawConfig {
    pub page_size: u8,
    pub pages_per_segment: u8,
    pub max_segments: u8,
    pub initial_segments: u8,
}

/// A token sequence: whole pages from a few patterns, a partial tail, and
/// (rarely) one out-of-range token.
#[derive(Arbitrary, Debug, Clone)]
pub struct Toks {
    /// Whole pages, each one of eight patterns (`% 8`); at most 12.
    pub pages: Vec<u8>,
    /// `tail % page_size` more tokens of value `tail % 3`.
    pub tail: u8,
    /// >= 240: put `BAD_TOKENS[bad % 6]` at position `bad_at % (len + 1)`.
    pub bad: u8,
    pub bad_at: u8,
}

/// How an insert's page ids are chosen.
#[derive(Arbitrary, Debug, Clone)]
pub enum PageSrc {
    /// Allocate one fresh page per whole page (evicting if the pool is full).
    Fresh { keep: bool },
    /// SGLang's way: match first, reuse the tree's pages for the cached part,
    /// allocate the rest.
    Matched { keep: bool },
    /// Chosen ids, cycled to the page count.
    Picks(Vec<IdPick>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum IdPick {
    /// A page the harness holds a reference to.
    Held(u16),
    /// A page the tree holds.
    Tree(u16),
    /// A free page of a live segment.
    Free(u16),
    /// A page of a retired segment.
    Retired(u16),
    Raw(i64),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Action {
    Insert {
        ns: u8,
        toks: Toks,
        pages: PageSrc,
        /// >= 250: the page-id list gets a wrong length.
        len_fuzz: u8,
    },
    Match {
        ns: u8,
        toks: Toks,
        lock: bool,
        retain: bool,
    },
    /// Start a request: `acquire` (match + lock under one call).
    Acquire {
        ns: u8,
        toks: Toks,
    },
    /// End a running request with `finish`: its matched pages, fresh pages
    /// for `extra` tokens (a partial page included), optionally cached.
    /// `variant` >= 200 perturbs one argument (owned_from, node, length,
    /// a page id) so that the call must fail, or succeed differently.
    Finish {
        which: u16,
        extra: Toks,
        cache: bool,
        variant: u8,
        bad: IdPick,
    },
    /// Lock a handle seen before (possibly stale).
    Lock(u16),
    /// Undo one of the harness's locks.
    Unlock(u16),
    /// Unlock a handle seen before: possibly stale or not locked.
    UnlockSeen(u16),
    /// Lock / unlock / query a made-up handle.
    RawHandle {
        raw: i64,
        unlock: bool,
    },
    Evict(u16),
    EvictHuge,
    Reset,
    /// The harness allocates pages and holds them.
    Alloc(u8),
    /// The harness drops some of its references.
    ReleaseHeld(Vec<u16>),
    AddSegment,
    RetireSegment(u8),
    /// Rounds of insert / match / evict (`rounds % 8`, or 1,024 for
    /// `rounds >= 0xff00`; at most 1,024 per input):
    /// enough dead arena pages and stale LRU entries to make the tree
    /// compact its arena and its heap, which short inputs never reach.
    Churn {
        rounds: u16,
        salt: u8,
        ns: u8,
    },
}

#[derive(Arbitrary, Debug)]
pub struct Input {
    config: RawConfig,
    actions: Vec<Action>,
}

/// A request started by `Acquire`.
#[derive(Debug, Clone)]
struct Request {
    /// Index into `seen` of the node `acquire` locked.
    seen: usize,
    ns: u64,
    /// The matched tokens and pages (the tree's, held by the lock).
    tokens: Vec<u32>,
    pages: Vec<u32>,
}

/// A handle the harness has seen, with the prefix it names.
#[derive(Debug, Clone)]
struct Seen {
    node: NodeId,
    ns: u64,
    prefix: Vec<u32>,
    /// Known stale: the node was evicted or reset away.
    dead: bool,
}

struct Harness {
    ps: usize,
    a: Arc<SegmentAllocator>,
    t: RadixTree,
    /// (namespace, whole-page prefix) -> the page that ends it.
    model: Model,
    /// References the harness holds (page -> count).
    held: BTreeMap<u32, u32>,
    /// Locks the harness holds: index into `seen`.
    locks: Vec<usize>,
    /// Requests started by `acquire` and not finished (their locks are in
    /// `locks` too, until something unlocks them).
    requests: Vec<Request>,
    seen: Vec<Seen>,
    /// Namespaces touched since the last reset (an upper bound on roots).
    touched: BTreeSet<u64>,
    /// Live segments and slots ever created, tracked independently of the
    /// allocator (and compared with it in `check`).
    live: BTreeSet<u32>,
    high_water: u32,
    /// Churn rounds left to this input.
    churn_budget: u64,
}

fn i64s(v: &[u32]) -> Vec<i64> {
    v.iter().map(|&x| i64::from(x)).collect()
}

impl Harness {
    fn new(c: &RawConfig) -> Self {
        let page_size = 1u32 << (c.page_size % 4); // 1, 2, 4, 8
        let pps = 1 + u32::from(c.pages_per_segment % 8);
        let max_segments = 1 + u32::from(c.max_segments % 8);
        let a = Arc::new(
            SegmentAllocator::new(page_size, pps)
                .unwrap()
                .with_max_segments(max_segments)
                .unwrap(),
        );
        let mut live = BTreeSet::new();
        for s in 0..(1 + u32::from(c.initial_segments % 3)).min(max_segments) {
            assert_eq!(a.add_segment(), Ok(s));
            live.insert(s);
        }
        let high_water = live.len() as u32;
        let t = RadixTree::new(Arc::clone(&a));
        assert_eq!(t.page_size(), page_size as usize);
        Self {
            ps: page_size as usize,
            a,
            t,
            model: Model::default(),
            held: BTreeMap::new(),
            locks: Vec::new(),
            requests: Vec::new(),
            seen: Vec::new(),
            touched: BTreeSet::new(),
            live,
            high_water,
            churn_budget: CHURN_BUDGET,
        }
    }

    // ----- inputs ---------------------------------------------------------

    fn tokens(&self, t: &Toks) -> Vec<i64> {
        let ps = self.ps;
        let mut out: Vec<i64> = Vec::new();
        for &k in t.pages.iter().take(12) {
            let k = k % 8;
            if ps == 1 {
                out.push(i64::from([0, 1, 2, MAX_TOKEN, 0, 1, 0, 1][usize::from(k)]));
                continue;
            }
            let mut p = vec![0i64; ps];
            match k {
                0 | 4 => {}
                1 | 5 => p[ps - 1] = 1,
                2 | 6 => p[1] = 1,
                3 => p[0] = 1,
                _ => p.iter_mut().for_each(|x| *x = i64::from(MAX_TOKEN)),
            }
            out.extend(p);
        }
        let extra = usize::from(t.tail) % ps;
        out.extend(std::iter::repeat_n(i64::from(t.tail % 3), extra));
        if t.bad >= 240 {
            let at = usize::from(t.bad_at) % (out.len() + 1);
            out.insert(at, BAD_TOKENS[usize::from(t.bad) % BAD_TOKENS.len()]);
        }
        out
    }

    fn held_list(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    fn tree_pages(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self.model.pages().collect();
        set.into_iter().collect()
    }

    /// Expected refcount of every page: tree copies plus held references.
    fn expected_rc(&self) -> BTreeMap<u32, u32> {
        let mut rc = self.held.clone();
        for p in self.model.pages() {
            *rc.entry(p).or_default() += 1;
        }
        rc
    }

    /// Every page of every live segment.
    fn live_pages(&self) -> Vec<u32> {
        let pps = self.a.pages_per_segment();
        self.live
            .iter()
            .flat_map(|&s| s * pps..(s + 1) * pps)
            .collect()
    }

    fn free_pages_list(&self) -> Vec<u32> {
        let rc = self.expected_rc();
        let mut free = self.live_pages();
        free.retain(|p| !rc.contains_key(p));
        free
    }

    fn resolve_id(&self, p: IdPick) -> i64 {
        let pps = i64::from(self.a.pages_per_segment());
        let past_end = i64::from(self.high_water) * pps + 1000;
        match p {
            IdPick::Held(k) => pick(&self.held_list(), k).map_or(past_end, i64::from),
            IdPick::Tree(k) => pick(&self.tree_pages(), k).map_or(past_end, i64::from),
            IdPick::Free(k) => pick(&self.free_pages_list(), k).map_or(past_end, i64::from),
            IdPick::Retired(k) => {
                let retired: Vec<u32> = (0..self.high_water)
                    .filter(|s| !self.live.contains(s))
                    .collect();
                pick(&retired, k).map_or(past_end, |s| i64::from(s) * pps)
            }
            IdPick::Raw(v) => v,
        }
    }

    // ----- the oracle -----------------------------------------------------

    /// The pages of the longest cached whole-page prefix of `toks`.
    fn expected_match(&self, ns: u64, toks: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        for i in 1..=toks.len() / self.ps {
            match self.model.get(ns, &toks[..i * self.ps]) {
                Some(pg) => out.push(pg),
                None => break,
            }
        }
        out
    }

    fn check_tokens(toks: &[i64]) -> Result<Vec<u32>, CoreError> {
        for (index, &value) in toks.iter().enumerate() {
            if !(0..TOKEN_LIMIT).contains(&value) {
                return Err(CoreError::InvalidToken { index, value });
            }
        }
        Ok(toks.iter().map(|&t| t as u32).collect())
    }

    /// Why `id` is not a page of a live segment (as `refcount` and
    /// `retain` must say).
    fn check_live(&self, id: i64) -> Option<CoreError> {
        let pps = self.a.pages_per_segment();
        let limit = u64::from(self.high_water) * u64::from(pps);
        if id < 0 || id as u64 >= limit {
            return Some(CoreError::InvalidHandle {
                page_id: id,
                problem: HandleProblem::OutOfRange { limit },
            });
        }
        let segment = id as u32 / pps;
        if !self.live.contains(&segment) {
            return Some(CoreError::InvalidHandle {
                page_id: id,
                problem: HandleProblem::SegmentNotLive { segment },
            });
        }
        None
    }

    /// The error `insert` must return, or the cached token count.
    fn expect_insert(&self, ns: u64, toks: &[i64], ids: &[i64]) -> Result<usize, CoreError> {
        let ps = self.ps;
        let n = toks.len() / ps;
        if ids.len() != n {
            return Err(CoreError::LengthMismatch {
                what: "",
                expected: n as u64,
                actual: ids.len() as u64,
            });
        }
        let toks = Self::check_tokens(toks)?;
        if n == 0 {
            return Ok(0);
        }
        let cached = self.expected_match(ns, &toks[..n * ps]);
        let rc = self.expected_rc();
        let referenced = |id: i64| u32::try_from(id).is_ok_and(|p| rc.contains_key(&p));
        // The caller's ids over the cached part that are not the tree's
        // pages there must be referenced: first any id out of range or of a
        // dead segment, then any free one.
        let foreign: Vec<i64> = ids
            .iter()
            .zip(&cached)
            .filter(|&(&id, &ours)| id != i64::from(ours))
            .map(|(&id, _)| id)
            .collect();
        for &id in &foreign {
            if let Some(e) = self.check_live(id) {
                return Err(e);
            }
        }
        if let Some(&id) = foreign.iter().find(|&&id| !referenced(id)) {
            return Err(CoreError::InvalidHandle {
                page_id: id,
                problem: HandleProblem::Free,
            });
        }
        // The new part: retained, so each must be referenced, in order.
        for &id in &ids[cached.len()..] {
            if let Some(e) = self.check_live(id) {
                return Err(e);
            }
            if !referenced(id) {
                return Err(CoreError::InvalidHandle {
                    page_id: id,
                    problem: HandleProblem::Free,
                });
            }
        }
        Ok(cached.len() * ps)
    }

    /// The error `release` (and `check_release`) must give, if any.
    fn expect_release(&self, ids: &[i64]) -> Result<(), CoreError> {
        let rc = self.expected_rc();
        for &id in ids {
            if let Some(e) = self.check_live(id) {
                return Err(e);
            }
            if !rc.contains_key(&(id as u32)) {
                return Err(CoreError::DoubleFree { page_id: id as u32 });
            }
        }
        let mut count: BTreeMap<i64, u32> = BTreeMap::new();
        for &id in ids {
            *count.entry(id).or_default() += 1;
        }
        for (&id, &k) in &count {
            if k > rc[&(id as u32)] {
                return Err(CoreError::DoubleFree { page_id: id as u32 });
            }
        }
        Ok(())
    }

    /// What `finish` must return, in its documented order of checks.
    fn expect_finish(
        &self,
        ns: u64,
        toks: &[i64],
        ids: &[i64],
        node: Option<NodeId>,
        cache: bool,
        owned_from: usize,
    ) -> Result<usize, CoreError> {
        let ps = self.ps;
        let expected = toks.len().div_ceil(ps) as u64;
        if ids.len() as u64 != expected {
            return Err(CoreError::LengthMismatch {
                what: "",
                expected,
                actual: ids.len() as u64,
            });
        }
        if owned_from as u64 > expected {
            return Err(CoreError::LengthMismatch {
                what: "",
                expected,
                actual: owned_from as u64,
            });
        }
        // Every token, the partial last page included, cached or not.
        Self::check_tokens(toks)?;
        if let Some(node) = node {
            self.expect_unlock(node)?;
        }
        self.expect_release(&ids[owned_from..])?;
        if !cache {
            return Ok(0);
        }
        let full = toks.len() / ps;
        self.expect_insert(ns, &toks[..full * ps], &ids[..full])
    }

    /// The error `unlock(node)` must give, if any.
    fn expect_unlock(&self, node: NodeId) -> Result<(), CoreError> {
        match self.seen.iter().rposition(|s| s.node == node) {
            Some(i) if !self.seen[i].dead => {
                if self.own_locks(node) == 0 {
                    Err(CoreError::UnbalancedUnlock { node: node.slot() })
                } else {
                    Ok(())
                }
            }
            _ => Err(CoreError::InvalidNode {
                node: node.to_raw(),
            }),
        }
    }

    /// The tree's content in the oracle's form.
    fn tree_map(&self) -> Model {
        let mut m = Model::default();
        for s in self.t.cached_sequences() {
            assert_eq!(s.tokens.len(), s.page_ids.len() * self.ps);
            for (i, &pg) in s.page_ids.iter().enumerate() {
                let prefix = &s.tokens[..(i + 1) * self.ps];
                if let Some(old) = m.insert(s.namespace, prefix, pg) {
                    assert_eq!(old, pg, "one prefix, two pages");
                }
            }
        }
        m
    }

    /// Every (namespace, prefix) a harness lock holds.
    fn locked_keys(&self) -> HashSet<(u64, &[u32])> {
        let mut keys = HashSet::new();
        for &l in &self.locks {
            let s = &self.seen[l];
            for i in 1..=s.prefix.len() / self.ps {
                keys.insert((s.ns, &s.prefix[..i * self.ps]));
            }
        }
        keys
    }

    fn own_locks(&self, node: NodeId) -> u32 {
        self.locks
            .iter()
            .filter(|&&l| self.seen[l].node == node)
            .count() as u32
    }

    /// What must not change across a failed call.
    fn snapshot(&self) -> impl PartialEq + std::fmt::Debug {
        let all = i64s(&self.live_pages());
        (
            self.t.cached_sequences(),
            self.t.cached_pages(),
            self.t.evictable_pages(),
            self.t.locked_pages(),
            self.t.node_count(),
            self.t.namespace_count(),
            self.a.refcount(&all).unwrap(),
            self.a.free_pages(),
            self.a.segments(),
        )
    }

    fn note(&mut self, node: NodeId, ns: u64, prefix: Vec<u32>) -> usize {
        assert!(node.to_raw() >= 0, "handle {node:?} is negative");
        for (i, s) in self.seen.iter().enumerate() {
            if s.node != node {
                continue;
            }
            assert!(!s.dead, "a stale handle {node:?} was handed out again");
            assert_eq!((s.ns, &s.prefix), (ns, &prefix), "one handle, two prefixes");
            return i;
        }
        self.seen.push(Seen {
            node,
            ns,
            prefix,
            dead: false,
        });
        self.seen.len() - 1
    }

    // ----- actions --------------------------------------------------------

    /// Allocate `n` pages for the harness, evicting if the pool is short.
    fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        let ids = match self.a.alloc(n) {
            Ok(ids) => ids,
            Err(CoreError::OutOfPages {
                requested,
                available,
                ..
            }) => {
                assert_eq!(requested, n as u64);
                assert_eq!(available, self.free_pages_list().len() as u64);
                assert!(available < requested);
                self.evict(n);
                self.check();
                self.a.alloc(n).ok()?
            }
            Err(e) => panic!("alloc({n}): {e}"),
        }
        .into_iter()
        .collect::<Vec<_>>();
        let rc = self.expected_rc();
        let distinct: BTreeSet<u32> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), n, "alloc({n}) returned {ids:?}");
        for &p in &ids {
            assert!(!rc.contains_key(&p), "page {p} handed out twice");
            *self.held.entry(p).or_default() += 1;
        }
        Some(ids)
    }

    fn release_held(&mut self, ids: &[u32]) {
        self.a.release(&i64s(ids)).unwrap();
        for p in ids {
            let c = self.held.get_mut(p).unwrap();
            *c -= 1;
            if *c == 0 {
                self.held.remove(p);
            }
        }
    }

    fn do_match(&mut self, ns: u64, toks: &[i64]) -> Option<(usize, Vec<u32>)> {
        let before = self.snapshot();
        let r = self.t.match_prefix(toks, ns);
        let toks = match Self::check_tokens(toks) {
            Ok(t) => t,
            Err(e) => {
                assert_eq!(r, Err(e), "match_prefix of a bad token");
                assert_eq!(before, self.snapshot(), "a failed match changed something");
                return None;
            }
        };
        let m = r.unwrap_or_else(|e| panic!("match_prefix: {e}"));
        let want = self.expected_match(ns, &toks);
        assert_eq!(m.page_ids, want, "match must return the inserted pages");
        assert_eq!(m.length, want.len() * self.ps);
        assert_eq!(self.t.prefix_length(m.node), Ok(m.length));
        self.touched.insert(ns);
        let idx = self.note(m.node, ns, toks[..m.length].to_vec());
        Some((idx, m.page_ids))
    }

    fn insert(&mut self, ns: u64, toks: &[i64], src: &PageSrc, len_fuzz: u8) {
        let n = toks.len() / self.ps;
        // Page ids, and the fresh pages to give back afterwards.
        let (mut ids, mut to_release): (Vec<i64>, Vec<u32>) = match src {
            PageSrc::Fresh { keep } => {
                let Some(fresh) = self.alloc(n) else { return };
                let back = if *keep { Vec::new() } else { fresh.clone() };
                (i64s(&fresh), back)
            }
            PageSrc::Matched { keep } => {
                let Some((_, matched)) = self.do_match(ns, toks) else {
                    return;
                };
                self.check();
                let Some(fresh) = self.alloc(n - matched.len()) else {
                    return;
                };
                // An eviction inside `alloc` may have taken the matched pages.
                if self.expected_match(ns, &Self::check_tokens(toks).unwrap()) != matched {
                    self.release_held(&fresh);
                    return;
                }
                let back = if *keep { Vec::new() } else { fresh.clone() };
                let mut ids = i64s(&matched);
                ids.extend(i64s(&fresh));
                (ids, back)
            }
            PageSrc::Picks(picks) => {
                if picks.is_empty() {
                    return;
                }
                let ids = (0..n)
                    .map(|i| self.resolve_id(picks[i % picks.len()]))
                    .collect();
                (ids, Vec::new())
            }
        };
        if len_fuzz >= 250 {
            match len_fuzz {
                250..=252 => {
                    for _ in 0..=(len_fuzz - 250) {
                        ids.pop();
                    }
                    if ids.len() == n {
                        // Nothing to pop: make it one too long instead.
                        ids.push(0);
                    }
                }
                _ => ids.extend(std::iter::repeat_n(0, usize::from(len_fuzz - 252))),
            }
        }
        let want = self.expect_insert(ns, toks, &ids);
        let before = self.snapshot();
        let got = self.t.insert(toks, &ids, ns);
        match (&got, &want) {
            (
                Err(CoreError::LengthMismatch {
                    expected, actual, ..
                }),
                Err(CoreError::LengthMismatch {
                    expected: we,
                    actual: wa,
                    ..
                }),
            ) => assert_eq!((expected, actual), (we, wa)),
            _ => assert_eq!(got, want, "insert(ns {ns}, {toks:?}, {ids:?})"),
        }
        match want {
            Err(_) => assert_eq!(before, self.snapshot(), "a failed insert changed something"),
            Ok(cached) => {
                let toks = Self::check_tokens(toks).unwrap();
                for i in cached / self.ps..n {
                    let prefix = &toks[..(i + 1) * self.ps];
                    assert!(self.model.insert(ns, prefix, ids[i] as u32).is_none());
                }
                if n > 0 {
                    self.touched.insert(ns);
                }
            }
        }
        // Give back the fresh pages the caller no longer needs (both when
        // the tree took its own reference and when the insert failed).
        to_release.retain(|p| self.held.contains_key(p));
        self.release_held(&to_release);
    }

    fn evict(&mut self, n: usize) {
        let evictable = self.t.evictable_pages();
        let released = self
            .t
            .evict(n)
            .unwrap_or_else(|e| panic!("evict({n}): {e}"));
        let now = self.tree_map();
        for (&ns, m) in &now.0 {
            for (prefix, &page) in m {
                assert_eq!(
                    self.model.get(ns, prefix),
                    Some(page),
                    "evict changed a cached page"
                );
            }
        }
        assert_eq!(released, self.model.len() - now.len(), "evict's count");
        assert_eq!(self.t.evictable_pages(), evictable - released);
        if released < n {
            assert_eq!(self.t.evictable_pages(), 0, "evict stopped with pages left");
        }
        if n == 0 {
            assert_eq!(released, 0);
        }
        for (ns, prefix) in self.locked_keys() {
            assert!(now.get(ns, prefix).is_some(), "a locked prefix was evicted");
        }
        self.model = now;
        self.mark_dead();
    }

    /// Handles whose prefix left the tree are stale for good.
    fn mark_dead(&mut self) {
        for s in &mut self.seen {
            if !s.dead && !s.prefix.is_empty() && self.model.get(s.ns, &s.prefix).is_none() {
                s.dead = true;
            }
        }
        // A namespace root is dropped by `evict` once it is childless and
        // unlocked; the tree is the only witness of that.
        for s in &mut self.seen {
            if !s.dead && s.prefix.is_empty() && self.t.prefix_length(s.node).is_err() {
                s.dead = true;
            }
        }
    }

    /// Lock / unlock a seen handle, predicting the outcome.
    fn lock_seen(&mut self, i: usize, unlock: bool) {
        let s = self.seen[i].clone();
        let before = self.snapshot();
        if s.dead {
            let want = Err(CoreError::InvalidNode {
                node: s.node.to_raw(),
            });
            let got = if unlock {
                self.t.unlock(s.node)
            } else {
                self.t.lock(s.node)
            };
            assert_eq!(got, want, "a stale handle must be refused");
            assert_eq!(before, self.snapshot());
            return;
        }
        if unlock {
            match self.locks.iter().position(|&l| self.seen[l].node == s.node) {
                Some(k) => {
                    self.t.unlock(s.node).unwrap();
                    self.locks.swap_remove(k);
                }
                None => {
                    assert_eq!(
                        self.t.unlock(s.node),
                        Err(CoreError::UnbalancedUnlock {
                            node: s.node.slot()
                        })
                    );
                    assert_eq!(before, self.snapshot());
                }
            }
        } else {
            self.t.lock(s.node).unwrap();
            self.locks.push(i);
        }
    }

    fn raw_handle(&mut self, raw: i64, unlock: bool) {
        let node = NodeId::from_raw(raw);
        if let Some(i) = self.seen.iter().rposition(|s| s.node == node) {
            // A handle seen before: the oracle knows it.
            self.lock_seen(i, unlock);
            return;
        }
        if self.t.prefix_length(node).is_ok() {
            // A live node the harness never saw a handle of (a leaf made by
            // insert, or a split's upper half): its prefix is unknown here.
            return;
        }
        let before = self.snapshot();
        let want = Err(CoreError::InvalidNode { node: raw });
        assert_eq!(self.t.lock_count(node), want.clone().map(|()| 0));
        assert_eq!(self.t.prefix_length(node), want.clone().map(|()| 0));
        let got = if unlock {
            self.t.unlock(node)
        } else {
            self.t.lock(node)
        };
        assert_eq!(got, want);
        assert_eq!(before, self.snapshot());
    }

    fn acquire(&mut self, ns: u64, toks: &[i64]) {
        let before = self.snapshot();
        let r = self.t.acquire(toks, ns);
        let toks = match Self::check_tokens(toks) {
            Ok(t) => t,
            Err(e) => {
                assert_eq!(r, Err(e), "acquire of a bad token");
                assert_eq!(
                    before,
                    self.snapshot(),
                    "a failed acquire changed something"
                );
                return;
            }
        };
        let m = r.unwrap_or_else(|e| panic!("acquire: {e}"));
        let want = self.expected_match(ns, &toks);
        assert_eq!(m.page_ids, want, "acquire must return the inserted pages");
        assert_eq!(m.length, want.len() * self.ps);
        self.touched.insert(ns);
        let prefix = toks[..m.length].to_vec();
        let idx = self.note(m.node, ns, prefix.clone());
        self.locks.push(idx);
        self.requests.push(Request {
            seen: idx,
            ns,
            tokens: prefix,
            pages: m.page_ids,
        });
    }

    fn finish(&mut self, which: u16, extra: &Toks, cache: bool, variant: u8, bad: IdPick) {
        if self.requests.is_empty() {
            return;
        }
        let k = usize::from(which) % self.requests.len();
        let req = self.requests[k].clone();
        let node = self.seen[req.seen].node;
        let mut toks: Vec<i64> = req.tokens.iter().map(|&t| i64::from(t)).collect();
        toks.extend(self.tokens(extra));
        let total = toks.len().div_ceil(self.ps);
        let matched = req.pages.len();
        if self.seen[req.seen].dead {
            // Reset (or an unlock and an eviction) took the request's node.
            let r = self
                .t
                .finish(&toks, &vec![0i64; total], req.ns, Some(node), cache, total);
            // Tokens are checked before the node.
            let want = Self::check_tokens(&toks)
                .err()
                .unwrap_or(CoreError::InvalidNode {
                    node: node.to_raw(),
                });
            assert_eq!(r, Err(want));
            self.requests.swap_remove(k);
            return;
        }
        // The request's own pages: one per page past the matched prefix.
        let Some(fresh) = self.alloc(total.saturating_sub(matched)) else {
            return;
        };
        if self.seen[req.seen].dead {
            // `alloc` evicted to make room and the request had lost its lock.
            self.release_held(&fresh);
            return;
        }
        let mut ids = i64s(&req.pages);
        ids.extend(i64s(&fresh));
        let mut owned_from = matched.min(ids.len());
        let mut arg_node = Some(node);
        match variant {
            200..=209 => owned_from += usize::from(variant - 200),
            210..=214 => owned_from = 0,
            215..=229 => arg_node = None,
            230..=234 => arg_node = Some(NodeId::from_raw(node.to_raw() ^ (1 << 33))),
            235..=239 => {
                if let Some(s) = self.seen.iter().find(|s| s.dead) {
                    arg_node = Some(s.node);
                }
            }
            240..=244 => {
                ids.pop();
            }
            245..=249 => ids.push(self.resolve_id(bad)),
            250..=255 if !ids.is_empty() => {
                let at = usize::from(variant) % ids.len();
                ids[at] = self.resolve_id(bad);
            }
            _ => {}
        }
        let want = self.expect_finish(req.ns, &toks, &ids, arg_node, cache, owned_from);
        // Never release references the harness does not hold: a call that
        // would succeed by dropping the tree's own references is a caller
        // bug, not a test.
        if want.is_ok() {
            let mut count: BTreeMap<u32, u32> = BTreeMap::new();
            for &id in &ids[owned_from..] {
                *count.entry(id as u32).or_default() += 1;
            }
            if count
                .iter()
                .any(|(p, &c)| self.held.get(p).copied().unwrap_or(0) < c)
            {
                self.release_held(&fresh);
                return;
            }
        }
        let before = self.snapshot();
        let got = self
            .t
            .finish(&toks, &ids, req.ns, arg_node, cache, owned_from);
        match (&got, &want) {
            (
                Err(CoreError::LengthMismatch {
                    expected, actual, ..
                }),
                Err(CoreError::LengthMismatch {
                    expected: we,
                    actual: wa,
                    ..
                }),
            ) => assert_eq!((expected, actual), (we, wa)),
            _ => assert_eq!(got, want, "finish(ns {}, {toks:?}, {ids:?}, {arg_node:?}, cache {cache}, owned_from {owned_from})", req.ns),
        }
        match want {
            Err(_) => {
                assert_eq!(before, self.snapshot(), "a failed finish changed something");
                self.release_held(&fresh);
            }
            Ok(cached) => {
                if cache {
                    let full = toks.len() / self.ps;
                    let toks = Self::check_tokens(&toks[..full * self.ps]).unwrap();
                    for i in cached / self.ps..full {
                        let prefix = &toks[..(i + 1) * self.ps];
                        assert!(self.model.insert(req.ns, prefix, ids[i] as u32).is_none());
                    }
                    if full > 0 {
                        self.touched.insert(req.ns);
                    }
                }
                if let Some(n) = arg_node {
                    let l = self
                        .locks
                        .iter()
                        .position(|&l| self.seen[l].node == n)
                        .unwrap();
                    self.locks.swap_remove(l);
                }
                for &id in &ids[owned_from..] {
                    let c = self.held.get_mut(&(id as u32)).unwrap();
                    *c -= 1;
                    if *c == 0 {
                        self.held.remove(&(id as u32));
                    }
                }
                self.requests.swap_remove(k);
            }
        }
    }

    fn reset(&mut self) {
        self.t.reset().unwrap();
        self.model = Model::default();
        self.locks.clear();
        // Running requests' nodes are gone; `Finish` sees them stale.
        for s in &mut self.seen {
            s.dead = true;
        }
        self.touched.clear();
        assert_eq!(self.t.cached_pages(), 0);
        assert_eq!(self.t.node_count(), 0);
        assert_eq!(self.t.namespace_count(), 0);
    }

    /// A lean loop (no snapshots; the full `check` every 128 rounds): each
    /// round inserts a fresh sequence, sometimes matches half of it, and
    /// sometimes evicts a few pages. At most `CHURN_BUDGET` rounds per input
    /// keep the fuzzer's executions fast.
    fn churn(&mut self, rounds: u16, salt: u8, ns: u64) {
        // Mostly short: a long churn costs milliseconds, and the fuzzer
        // keeps the rare long ones that reach new code anyway.
        let rounds = if rounds >= 0xff00 {
            1024
        } else {
            u64::from(rounds % 8)
        };
        let rounds = rounds.min(self.churn_budget);
        let ps = self.ps;
        if rounds > 0 {
            // A locked one-page anchor keeps the tree from emptying (which
            // would drop the dead pages instead of compacting them).
            let anchor = vec![i64::from(MAX_TOKEN); ps];
            self.insert(ns, &anchor, &PageSrc::Fresh { keep: false }, 0);
            if let Some((idx, pages)) = self.do_match(ns, &anchor) {
                if !pages.is_empty() {
                    self.t.lock(self.seen[idx].node).unwrap();
                    self.locks.push(idx);
                }
            }
        }
        for r in 0..rounds {
            // Rounds of this input so far, counting earlier churns.
            let round = CHURN_BUDGET.saturating_sub(self.churn_budget);
            self.churn_budget -= 1;
            let code = r.wrapping_mul(0x9e37_79b9) ^ u64::from(salt);
            let n = 3 + (code % 4) as usize;
            let toks = Toks {
                pages: (0..n).map(|k| ((code >> (2 * k + 3)) & 3) as u8).collect(),
                tail: 0,
                bad: 0,
                bad_at: 0,
            };
            let toks: Vec<u32> = self.tokens(&toks).iter().map(|&t| t as u32).collect();
            let ids = match self.a.alloc(n) {
                Ok(ids) => ids,
                Err(CoreError::OutOfPages { .. }) => {
                    self.evict(n);
                    match self.a.alloc(n) {
                        Ok(ids) => ids,
                        Err(_) => continue,
                    }
                }
                Err(e) => panic!("alloc({n}): {e}"),
            };
            let cached = self.expected_match(ns, &toks).len();
            assert_eq!(
                self.t.insert(&toks, &ids, ns),
                Ok(cached * ps),
                "insert during churn"
            );
            for i in cached..n {
                assert!(self
                    .model
                    .insert(ns, &toks[..(i + 1) * ps], ids[i])
                    .is_none());
            }
            self.touched.insert(ns);
            self.a.release(&i64s(&ids)).unwrap();
            if r % 3 == 0 {
                // A match of a prefix refreshes (and may split) without
                // keeping the handle (which would grow `seen`).
                let part = &toks[..n / 2 * ps];
                let m = self.t.match_prefix(part, ns).unwrap();
                assert_eq!(
                    m.page_ids,
                    self.expected_match(ns, part),
                    "match during churn"
                );
            }
            if round % 512 == 511 {
                // A burst of refreshes of one leaf: every one but the last
                // leaves a stale LRU entry, past the heap's pruning limit.
                for _ in 0..1100 {
                    let m = self.t.match_prefix(&toks, ns).unwrap();
                    assert_eq!(m.length, n * ps, "match during churn");
                }
            }
            self.evict(1 + (r % 6) as usize);
            if r % 128 == 127 {
                self.check();
            }
        }
    }

    fn apply(&mut self, act: &Action) {
        match act {
            Action::Insert {
                ns,
                toks,
                pages,
                len_fuzz,
            } => {
                let ns = NAMESPACES[usize::from(*ns) % 4];
                let toks = self.tokens(toks);
                self.insert(ns, &toks, pages, *len_fuzz);
            }
            Action::Match {
                ns,
                toks,
                lock,
                retain,
            } => {
                let ns = NAMESPACES[usize::from(*ns) % 4];
                let toks = self.tokens(toks);
                let Some((idx, pages)) = self.do_match(ns, &toks) else {
                    return;
                };
                if *lock {
                    self.t.lock(self.seen[idx].node).unwrap();
                    self.locks.push(idx);
                }
                if *retain {
                    self.a.retain(&i64s(&pages)).unwrap();
                    for p in pages {
                        *self.held.entry(p).or_default() += 1;
                    }
                }
            }
            Action::Acquire { ns, toks } => {
                let ns = NAMESPACES[usize::from(*ns) % 4];
                let toks = self.tokens(toks);
                self.acquire(ns, &toks);
            }
            Action::Finish {
                which,
                extra,
                cache,
                variant,
                bad,
            } => self.finish(*which, extra, *cache, *variant, *bad),
            Action::Lock(k) => {
                if !self.seen.is_empty() {
                    self.lock_seen(usize::from(*k) % self.seen.len(), false);
                }
            }
            Action::Unlock(k) => {
                if !self.locks.is_empty() {
                    let l = self.locks.swap_remove(usize::from(*k) % self.locks.len());
                    self.t.unlock(self.seen[l].node).unwrap();
                }
            }
            Action::UnlockSeen(k) => {
                if !self.seen.is_empty() {
                    self.lock_seen(usize::from(*k) % self.seen.len(), true);
                }
            }
            Action::RawHandle { raw, unlock } => self.raw_handle(*raw, *unlock),
            Action::Evict(n) => self.evict(usize::from(*n % 16)),
            Action::EvictHuge => self.evict(usize::MAX),
            Action::Reset => self.reset(),
            Action::Alloc(n) => {
                let n = usize::from(n % 6);
                if n <= self.free_pages_list().len() {
                    self.alloc(n).unwrap();
                }
            }
            Action::ReleaseHeld(picks) => {
                let ids = pick_within_counts(&self.held_list(), picks, &self.held);
                self.release_held(&ids);
            }
            Action::AddSegment => {
                let retired = (0..self.high_water).find(|s| !self.live.contains(s));
                let want = match retired {
                    Some(s) => Ok(s),
                    None if self.high_water < self.a.max_segments() => Ok(self.high_water),
                    None => Err(CoreError::IdSpaceExhausted {
                        segments: self.live.len() as u32,
                        limit: self.a.max_segments(),
                    }),
                };
                assert_eq!(self.a.add_segment(), want, "add_segment");
                if let Ok(s) = want {
                    self.live.insert(s);
                    self.high_water = self.high_water.max(s + 1);
                }
            }
            Action::RetireSegment(k) => {
                let live: Vec<u32> = self.live.iter().copied().collect();
                let Some(seg) = pick(&live, *k) else {
                    return;
                };
                let pps = self.a.pages_per_segment();
                let rc = self.expected_rc();
                let used = (seg * pps..(seg + 1) * pps)
                    .filter(|p| rc.contains_key(p))
                    .count() as u32;
                let before = self.snapshot();
                let r = self.a.retire_segment(i64::from(seg));
                if used == 0 {
                    assert_eq!(r, Ok(()), "retire of an unused segment");
                    self.live.remove(&seg);
                } else {
                    assert_eq!(
                        r,
                        Err(CoreError::SegmentBusy {
                            segment: seg,
                            used_pages: used
                        })
                    );
                    assert_eq!(before, self.snapshot());
                }
            }
            Action::Churn { rounds, salt, ns } => {
                self.churn(*rounds, *salt, NAMESPACES[usize::from(*ns) % 4]);
            }
        }
        self.mark_dead();
    }

    fn check(&self) {
        if let Err(e) = self.t.check_invariants() {
            panic!("tree check_invariants: {e}");
        }
        if let Err(e) = self.a.check_invariants() {
            panic!("allocator check_invariants: {e}");
        }
        assert_eq!(self.tree_map(), self.model, "tree content");
        assert_eq!(self.t.cached_pages(), self.model.len());
        assert_eq!(self.t.cached_tokens(), self.model.len() * self.ps);
        assert_eq!(
            self.t.locked_pages(),
            self.locked_keys().len(),
            "locked pages"
        );
        assert_eq!(
            self.t.evictable_pages() + self.t.locked_pages(),
            self.t.cached_pages()
        );
        let roots = self.t.namespace_count();
        assert!(roots >= self.model.namespaces() && roots <= self.touched.len());
        let nodes = self.t.node_count();
        let leaves = self.t.cached_sequences().len();
        assert!(nodes >= leaves && nodes <= self.model.len());
        // Refcounts: exactly the tree's copies plus the harness's references;
        // every other page of a live segment is free.
        let rc = self.expected_rc();
        let live: Vec<u32> = self.live.iter().copied().collect();
        assert_eq!(self.a.segments(), live, "live segments");
        let all = self.live_pages();
        let got = self.a.refcount(&i64s(&all)).unwrap();
        for (p, c) in all.iter().zip(got) {
            assert_eq!(c, rc.get(p).copied().unwrap_or(0), "refcount of page {p}");
        }
        for p in rc.keys() {
            assert!(
                all.contains(p),
                "referenced page {p} is not in a live segment"
            );
        }
        assert_eq!(self.a.free_pages() + rc.len() as u64, self.a.total_pages());
        // Handles: live ones name their prefix and carry the harness's
        // locks; stale ones are refused.
        for s in &self.seen {
            if s.dead {
                let want = Err(CoreError::InvalidNode {
                    node: s.node.to_raw(),
                });
                assert_eq!(self.t.prefix_length(s.node), want.clone().map(|()| 0));
                assert_eq!(self.t.lock_count(s.node), want.map(|()| 0));
            } else {
                assert_eq!(self.t.prefix_length(s.node), Ok(s.prefix.len()));
                assert_eq!(self.t.lock_count(s.node), Ok(self.own_locks(s.node)));
            }
        }
        let _ = self.t.metadata_bytes();
    }
}

/// Run one input (the libFuzzer entry point and the replay tests call this).
pub fn run(data: &[u8]) {
    let Some(input) = crate::decode::<Input>(data) else {
        return;
    };
    run_input(&input);
}

/// Run a decoded input.
pub fn run_input(input: &Input) {
    run_actions(&input.config, &input.actions);
}

/// Run `actions` from `config`, checking everything after each, then drop
/// every lock, reference and cached page: the allocator must end entirely
/// free (the proptest driver calls this with its own weighted actions).
pub fn run_actions(config: &RawConfig, actions: &[Action]) {
    let mut h = Harness::new(config);
    h.check();
    for act in actions {
        h.apply(act);
        h.check();
    }
    // Drain: drop every lock and held reference, evict everything. The
    // allocator must end entirely free and the tree empty.
    while let Some(l) = h.locks.pop() {
        h.t.unlock(h.seen[l].node).unwrap();
        h.check();
    }
    let held: Vec<u32> = h
        .held
        .iter()
        .flat_map(|(&p, &c)| std::iter::repeat_n(p, c as usize))
        .collect();
    h.release_held(&held);
    h.check();
    h.evict(usize::MAX);
    h.check();
    assert_eq!(h.t.cached_pages(), 0);
    assert_eq!(h.t.node_count(), 0);
    assert_eq!(h.t.namespace_count(), 0);
    assert_eq!(h.a.free_pages(), h.a.total_pages());
}

/// The decoded form of an input, for reading a crash artifact.
pub fn describe(data: &[u8]) -> String {
    match crate::decode::<Input>(data) {
        Some(input) => format!("{input:#?}"),
        None => "(does not decode)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Churn reaches the tree's compactions (of the key arenas after 4,096
    /// dead pages, of the LRU heap past 1,024 entries) within one input's
    /// budget: the tree's bytes drop while pages are still cached, which
    /// only a compaction does.
    #[test]
    fn churn_compacts() {
        for page_size in 0..4 {
            let mut h = Harness::new(&RawConfig {
                page_size,
                pages_per_segment: 7,
                max_segments: 7,
                initial_segments: 2,
            });
            h.apply(&Action::AddSegment);
            // One input's budget, in steps of 64 rounds.
            let mut dropped = false;
            let mut last = h.t.metadata_bytes();
            for salt in 0..16 {
                for _ in 0..9 {
                    h.churn(7, salt, 1 << 32);
                }
                h.churn(1, salt, 1 << 32);
                h.check();
                let now = h.t.metadata_bytes();
                dropped |= now < last && h.t.cached_pages() > 0;
                last = now;
            }
            assert_eq!(h.churn_budget, 0);
            assert!(dropped, "page size {}: no compaction seen", 1 << page_size);
        }
    }
}
