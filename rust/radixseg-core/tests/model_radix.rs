//! Model-based test of the radix tree against a naive oracle, interleaved
//! with allocator growth (add / retire segments).
//!
//! The oracle is a map `(namespace, page-aligned prefix) -> page id`: every
//! cached prefix of whole pages and the page that ends it. A match must
//! return exactly the pages first inserted for that prefix (before and after
//! growth), an insert must report exactly the cached part, an eviction may
//! only remove unlocked suffix-closed parts, and every error must leave the
//! tree and the allocator as they were. Both checkers run after every step.
//! Tokens are drawn from a tiny alphabet so that prefixes collide; at
//! page_size 4 the page patterns share first tokens so that siblings differ
//! only inside their first page.

#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use radixseg_core::{Arc, CoreError, NodeId, RadixTree, SegmentAllocator};
use std::collections::{HashMap, HashSet};

type Key = (u64, Vec<u32>);

#[derive(Clone, Debug)]
enum Action {
    /// Allocate pages, insert, release the caller's references.
    Insert {
        ns: u64,
        tokens: Vec<u32>,
    },
    /// Match; optionally lock the node.
    Match {
        ns: u64,
        tokens: Vec<u32>,
        lock: bool,
    },
    /// A running request: match, retain the pages, lock the node.
    Begin {
        ns: u64,
        tokens: Vec<u32>,
    },
    /// End a running request: release its pages, unlock.
    Finish {
        which: usize,
    },
    /// Unlock one lock taken by `Match`.
    Unlock {
        which: usize,
    },
    /// Unlock / lock a handle from the history that may be stale or unlocked.
    Probe {
        which: usize,
    },
    Evict {
        pages: usize,
    },
    AddSegment,
    RetireSegment {
        which: usize,
    },
    /// An insert that must fail: 0 bad token, 1 bad length, 2 free page.
    BadInsert {
        ns: u64,
        tokens: Vec<u32>,
        kind: u8,
    },
}

struct Request {
    node: NodeId,
    pages: Vec<u32>,
}

struct Harness {
    p: usize,
    a: Arc<SegmentAllocator>,
    t: RadixTree,
    model: HashMap<Key, u32>,
    /// Locks from `Match { lock: true }`: (handle, ns, matched tokens).
    locks: Vec<(NodeId, u64, Vec<u32>)>,
    requests: Vec<(Request, u64, Vec<u32>)>,
    /// Handles seen, with the prefix each named.
    history: Vec<(NodeId, u64, Vec<u32>)>,
}

fn i64s(v: &[u32]) -> Vec<i64> {
    v.iter().map(|&x| i64::from(x)).collect()
}

impl Harness {
    fn new(page_size: u32) -> Self {
        let a = Arc::new(
            SegmentAllocator::new(page_size, 8)
                .unwrap()
                .with_max_segments(6)
                .unwrap(),
        );
        a.add_segment().unwrap();
        let t = RadixTree::new(Arc::clone(&a));
        Self {
            p: page_size as usize,
            a,
            t,
            model: HashMap::new(),
            locks: Vec::new(),
            requests: Vec::new(),
            history: Vec::new(),
        }
    }

    /// The oracle's match: pages of the longest cached page-aligned prefix.
    fn expected(&self, ns: u64, tokens: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        for i in 1..=tokens.len() / self.p {
            match self.model.get(&(ns, tokens[..i * self.p].to_vec())) {
                Some(&pg) => out.push(pg),
                None => break,
            }
        }
        out
    }

    /// The tree's content in the oracle's form.
    fn tree_map(&self) -> HashMap<Key, u32> {
        let mut m = HashMap::new();
        for s in self.t.cached_sequences() {
            assert_eq!(s.tokens.len(), s.page_ids.len() * self.p);
            for (i, &pg) in s.page_ids.iter().enumerate() {
                let key = (s.namespace, s.tokens[..(i + 1) * self.p].to_vec());
                if let Some(old) = m.insert(key, pg) {
                    assert_eq!(old, pg, "one prefix, two pages");
                }
            }
        }
        m
    }

    fn snapshot(&self) -> (Vec<radixseg_core::CachedSequence>, usize, usize, u64) {
        (
            self.t.cached_sequences(),
            self.t.evictable_pages(),
            self.t.locked_pages(),
            self.a.free_pages(),
        )
    }

    fn note(&mut self, node: NodeId, ns: u64, matched: &[u32]) {
        self.history.push((node, ns, matched.to_vec()));
        if self.history.len() > 48 {
            self.history.remove(0);
        }
    }

    /// Every (ns, prefix) a lock or a request holds.
    fn locked_keys(&self) -> HashSet<Key> {
        let mut keys = HashSet::new();
        let held = self
            .locks
            .iter()
            .map(|(_, ns, toks)| (*ns, toks))
            .chain(self.requests.iter().map(|(_, ns, toks)| (*ns, toks)));
        for (ns, toks) in held {
            for i in 1..=toks.len() / self.p {
                keys.insert((ns, toks[..i * self.p].to_vec()));
            }
        }
        keys
    }

    fn own_locks(&self, node: NodeId) -> usize {
        self.locks.iter().filter(|l| l.0 == node).count()
            + self.requests.iter().filter(|r| r.0.node == node).count()
    }

    fn insert(&mut self, ns: u64, tokens: &[u32]) {
        let n = tokens.len() / self.p;
        let ids = match self.a.alloc(n) {
            Ok(ids) => ids,
            Err(CoreError::OutOfPages { .. }) => {
                let before = self.t.cached_pages();
                self.evict(n);
                assert!(self.t.cached_pages() <= before);
                match self.a.alloc(n) {
                    Ok(ids) => ids,
                    Err(_) => return,
                }
            }
            Err(e) => panic!("{e}"),
        };
        let expect = self.expected(ns, tokens);
        let cached = self.t.insert(tokens, &ids, ns).unwrap();
        assert_eq!(cached, expect.len() * self.p);
        for i in expect.len()..n {
            let key = (ns, tokens[..(i + 1) * self.p].to_vec());
            assert!(self.model.insert(key, ids[i]).is_none());
        }
        // The tree retained the new pages only.
        let rc = self.a.refcount(&i64s(&ids)).unwrap();
        for (i, &c) in rc.iter().enumerate() {
            assert_eq!(c, if i < expect.len() { 1 } else { 2 });
        }
        self.a.release(&i64s(&ids)).unwrap();
    }

    fn do_match(&mut self, ns: u64, tokens: &[u32]) -> radixseg_core::MatchResult {
        let expect = self.expected(ns, tokens);
        let m = self.t.match_prefix(tokens, ns).unwrap();
        assert_eq!(
            m.page_ids, expect,
            "match must return the first-inserted pages"
        );
        assert_eq!(m.length, expect.len() * self.p);
        assert_eq!(self.t.prefix_length(m.node).unwrap(), m.length);
        self.note(m.node, ns, &tokens[..m.length]);
        m
    }

    fn evict(&mut self, pages: usize) {
        let evictable = self.t.evictable_pages();
        let released = self.t.evict(pages).unwrap();
        let now = self.tree_map();
        for (k, v) in &now {
            assert_eq!(self.model.get(k), Some(v), "evict changed a cached page");
        }
        assert_eq!(released, self.model.len() - now.len());
        assert_eq!(self.t.evictable_pages(), evictable - released);
        if released < pages {
            assert_eq!(self.t.evictable_pages(), 0, "stopped with pages left");
        }
        if pages == 0 {
            assert_eq!(released, 0);
        }
        for k in self.locked_keys() {
            assert!(now.contains_key(&k), "a locked prefix was evicted");
        }
        self.model = now;
    }

    fn apply(&mut self, action: &Action) {
        match action {
            Action::Insert { ns, tokens } => self.insert(*ns, tokens),
            Action::Match { ns, tokens, lock } => {
                let m = self.do_match(*ns, tokens);
                if *lock {
                    self.t.lock(m.node).unwrap();
                    self.locks.push((m.node, *ns, tokens[..m.length].to_vec()));
                }
            }
            Action::Begin { ns, tokens } => {
                let m = self.do_match(*ns, tokens);
                self.a.retain(&i64s(&m.page_ids)).unwrap();
                self.t.lock(m.node).unwrap();
                let req = Request {
                    node: m.node,
                    pages: m.page_ids,
                };
                self.requests.push((req, *ns, tokens[..m.length].to_vec()));
            }
            Action::Finish { which } => {
                if self.requests.is_empty() {
                    return;
                }
                let (req, _, _) = self.requests.remove(which % self.requests.len());
                self.a.release(&i64s(&req.pages)).unwrap();
                self.t.unlock(req.node).unwrap();
            }
            Action::Unlock { which } => {
                if self.locks.is_empty() {
                    return;
                }
                let (node, _, _) = self.locks.remove(which % self.locks.len());
                self.t.unlock(node).unwrap();
            }
            Action::Probe { which } => {
                if self.history.is_empty() {
                    return;
                }
                let (node, ns, prefix) = self.history[which % self.history.len()].clone();
                let live = self.t.prefix_length(node).is_ok();
                if !prefix.is_empty() && !self.model.contains_key(&(ns, prefix.clone())) {
                    assert!(!live, "handle of an evicted prefix still live");
                }
                if live {
                    // A live handle still names the same path.
                    assert_eq!(self.t.prefix_length(node).unwrap(), prefix.len());
                    assert_eq!(
                        self.t.lock_count(node).unwrap() as usize,
                        self.own_locks(node)
                    );
                }
                let before = self.snapshot();
                if self.own_locks(node) == 0 {
                    let e = self.t.unlock(node).unwrap_err();
                    if live {
                        assert!(matches!(e, CoreError::UnbalancedUnlock { .. }));
                    } else {
                        assert!(matches!(e, CoreError::InvalidNode { .. }));
                    }
                    assert_eq!(before, self.snapshot());
                }
                if live {
                    self.t.lock(node).unwrap();
                    self.t.unlock(node).unwrap();
                } else {
                    assert!(matches!(
                        self.t.lock(node),
                        Err(CoreError::InvalidNode { .. })
                    ));
                }
                assert_eq!(before, self.snapshot());
            }
            Action::Evict { pages } => self.evict(*pages),
            Action::AddSegment => match self.a.add_segment() {
                Ok(_) | Err(CoreError::IdSpaceExhausted { .. }) => {}
                Err(e) => panic!("{e}"),
            },
            Action::RetireSegment { which } => {
                let usage = self.a.segment_usage();
                if usage.len() <= 1 {
                    return;
                }
                let (seg, used) = usage[which % usage.len()];
                let r = self.a.retire_segment(i64::from(seg));
                assert_eq!(r.is_ok(), used == 0, "{r:?}");
            }
            Action::BadInsert { ns, tokens, kind } => {
                let n = tokens.len() / self.p;
                let Ok(ids) = self.a.alloc(n + 1) else {
                    return;
                };
                let mut ids = i64s(&ids);
                let spare = ids.pop().unwrap_or(0);
                let before = self.snapshot();
                let mut toks: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
                let r = match kind % 3 {
                    0 => {
                        if toks.is_empty() {
                            ids.push(spare);
                            self.a.release(&ids).unwrap();
                            return;
                        }
                        let at = (spare as usize) % toks.len();
                        toks[at] = if spare % 2 == 0 { -1 } else { 1 << 31 };
                        self.t.insert(&toks, &ids, *ns)
                    }
                    1 => {
                        ids.push(spare);
                        let r = self.t.insert(&toks, &ids, *ns);
                        ids.pop();
                        r
                    }
                    _ => {
                        if n == 0 {
                            self.a.release(&[spare]).unwrap();
                            self.a.release(&ids).unwrap();
                            return;
                        }
                        // A freed page in the last position (new or cached).
                        let last = ids.len() - 1;
                        self.a.release(&ids[last..]).unwrap();
                        let r = self.t.insert(&toks, &ids, *ns);
                        ids.pop();
                        r
                    }
                };
                let e = r.unwrap_err();
                let expected_kind = match kind % 3 {
                    0 => matches!(e, CoreError::InvalidToken { .. }),
                    1 => matches!(e, CoreError::LengthMismatch { .. }),
                    _ => matches!(e, CoreError::InvalidHandle { .. }),
                };
                assert!(expected_kind, "{e:?}");
                let (s, ev, lk, free) = before;
                let freed_here = if kind % 3 == 2 { 1 } else { 0 };
                assert_eq!(
                    (s, ev, lk, free + freed_here),
                    self.snapshot(),
                    "a failed insert changed something"
                );
                ids.push(spare);
                self.a.release(&ids).unwrap();
            }
        }
    }

    fn check(&self) {
        self.t.check_invariants().unwrap();
        self.a.check_invariants().unwrap();
        assert_eq!(self.tree_map(), self.model);
        assert_eq!(self.t.cached_pages(), self.model.len());
        assert_eq!(self.t.cached_tokens(), self.model.len() * self.p);
        let locked = self.locked_keys();
        assert_eq!(self.t.locked_pages(), locked.len());
        assert_eq!(
            self.t.evictable_pages() + self.t.locked_pages(),
            self.t.cached_pages()
        );
        // Refcounts: the tree's one reference plus each request's.
        let mut expect: HashMap<u32, u32> = HashMap::new();
        for &pg in self.model.values() {
            *expect.entry(pg).or_insert(0) += 1;
        }
        for (r, _, _) in &self.requests {
            for &pg in &r.pages {
                *expect.entry(pg).or_insert(0) += 1;
            }
        }
        let ids: Vec<u32> = expect.keys().copied().collect();
        let rc = self.a.refcount(&i64s(&ids)).unwrap();
        for (pg, c) in ids.iter().zip(rc) {
            assert_eq!(c, expect[pg], "refcount of page {pg}");
        }
        assert_eq!(
            self.a.free_pages() + ids.len() as u64,
            self.a.total_pages(),
            "pages referenced by nobody must be free"
        );
    }
}

/// Token sequences over a few page patterns (sharing first tokens), plus a
/// partial trailing page.
fn tokens(page_size: usize) -> impl Strategy<Value = Vec<u32>> {
    let patterns: Vec<Vec<u32>> = if page_size == 1 {
        vec![vec![0], vec![1], vec![2], vec![3]]
    } else {
        (0..4u32)
            .map(|k| {
                let mut p = vec![0u32; page_size];
                match k {
                    0 => {}
                    1 => p[page_size - 1] = 1,
                    2 => p[1] = 1,
                    _ => p[0] = 1,
                }
                p
            })
            .collect()
    };
    (
        proptest::collection::vec(0..4usize, 0..7),
        0..page_size,
        0..4u32,
    )
        .prop_map(move |(pages, extra, tail)| {
            let mut out: Vec<u32> = pages.iter().flat_map(|&k| patterns[k].clone()).collect();
            out.extend(std::iter::repeat_n(tail, extra));
            out
        })
}

fn actions(page_size: usize) -> impl Strategy<Value = Vec<Action>> {
    let ns = 0..3u64;
    let action = prop_oneof![
        6 => (ns.clone(), tokens(page_size)).prop_map(|(ns, tokens)| Action::Insert { ns, tokens }),
        5 => (ns.clone(), tokens(page_size), any::<bool>())
            .prop_map(|(ns, tokens, lock)| Action::Match { ns, tokens, lock }),
        2 => (ns.clone(), tokens(page_size)).prop_map(|(ns, tokens)| Action::Begin { ns, tokens }),
        2 => any::<usize>().prop_map(|which| Action::Finish { which }),
        2 => any::<usize>().prop_map(|which| Action::Unlock { which }),
        2 => any::<usize>().prop_map(|which| Action::Probe { which }),
        3 => (0..10usize).prop_map(|pages| Action::Evict { pages }),
        1 => Just(Action::AddSegment),
        1 => any::<usize>().prop_map(|which| Action::RetireSegment { which }),
        1 => (ns, tokens(page_size), 0..3u8)
            .prop_map(|(ns, tokens, kind)| Action::BadInsert { ns, tokens, kind }),
    ];
    proptest::collection::vec(action, 1..80)
}

fn run(page_size: u32, actions: &[Action]) {
    let mut h = Harness::new(page_size);
    for a in actions {
        h.apply(a);
        h.check();
    }
    // Drain: finish every request, drop every lock, evict everything.
    while !h.requests.is_empty() {
        h.apply(&Action::Finish { which: 0 });
        h.check();
    }
    while !h.locks.is_empty() {
        h.apply(&Action::Unlock { which: 0 });
        h.check();
    }
    h.evict(usize::MAX);
    h.check();
    assert_eq!(h.t.cached_pages(), 0);
    assert_eq!(h.t.node_count(), 0);
    assert_eq!(h.t.namespace_count(), 0);
    assert_eq!(h.a.free_pages(), h.a.total_pages());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn model_page_size_1(actions in actions(1)) {
        run(1, &actions);
    }

    #[test]
    fn model_page_size_4(actions in actions(4)) {
        run(4, &actions);
    }
}

#[test]
fn reset_in_the_middle() {
    let mut h = Harness::new(2);
    h.apply(&Action::Insert {
        ns: 0,
        tokens: vec![0, 0, 1, 1, 2, 2],
    });
    h.apply(&Action::Begin {
        ns: 0,
        tokens: vec![0, 0, 1, 1],
    });
    h.check();
    h.t.reset().unwrap();
    // The request's own references keep its pages allocated.
    let (req, _, _) = h.requests.pop().unwrap();
    assert_eq!(h.a.refcount(&i64s(&req.pages)).unwrap(), vec![1, 1]);
    assert!(matches!(
        h.t.unlock(req.node),
        Err(CoreError::InvalidNode { .. })
    ));
    h.a.release(&i64s(&req.pages)).unwrap();
    h.model.clear();
    h.check();
    assert_eq!(h.a.free_pages(), h.a.total_pages());
}

/// Insert and match back one 10,000,000-token sequence at page_size 16.
/// Release builds only (a debug build takes several seconds); prints the
/// times and the metadata bytes per cached token.
#[test]
#[cfg_attr(debug_assertions, ignore = "slow in debug builds; run with --release")]
fn ten_million_tokens() {
    use std::time::Instant;
    const N: usize = 10_000_000;
    let a = Arc::new(SegmentAllocator::new(16, 1 << 20).unwrap());
    a.add_segment().unwrap();
    let mut t = RadixTree::new(Arc::clone(&a));
    // Tokens prepared outside the timed region, as int64 (Python's form).
    let tokens: Vec<i64> = (0..N as i64).map(|i| (i * 7919) % 150_000).collect();
    let ids = a.alloc(N / 16).unwrap();

    let start = Instant::now();
    let cached = t.insert(&tokens, &ids, 0).unwrap();
    let insert_s = start.elapsed().as_secs_f64();
    assert_eq!(cached, 0);

    let start = Instant::now();
    let m = t.match_prefix(&tokens, 0).unwrap();
    let match_s = start.elapsed().as_secs_f64();
    assert_eq!(m.length, N);
    assert_eq!(m.page_ids, ids);

    // A second request sharing the first 5M tokens, then diverging.
    let mut other = tokens.clone();
    other[5_000_000 + 3] = 149_999;
    let start = Instant::now();
    let m2 = t.match_prefix(&other, 0).unwrap();
    let split_s = start.elapsed().as_secs_f64();
    assert_eq!(m2.length, 5_000_000);

    let per_token = t.metadata_bytes() as f64 / t.cached_tokens() as f64;
    eprintln!(
        "10M tokens, page_size 16: insert {:.1} ms, match {:.1} ms, \
         match with split at 5M {:.1} ms; metadata {:.3} bytes/token ({} bytes)",
        insert_s * 1e3,
        match_s * 1e3,
        split_s * 1e3,
        per_token,
        t.metadata_bytes()
    );
    assert!(insert_s + match_s < 1.0);
    assert!(per_token <= 6.0);
    t.check_invariants().unwrap();
    a.release(&i64s(&ids)).unwrap();
    assert_eq!(t.evict(usize::MAX).unwrap(), N / 16);
    assert_eq!(a.free_pages(), a.total_pages());
}

/// A request-level workload (8 shared system prompts of 2,048 tokens, 2,000
/// requests with 64..512-token suffixes; per request: match, allocate the
/// rest, insert, release, evicting when the pool is full). Release only;
/// prints microseconds per request.
#[test]
#[cfg_attr(debug_assertions, ignore = "timing; run with --release")]
fn shared_prompt_requests_timing() {
    use std::time::Instant;
    for page_size in [1u32, 16] {
        let a = Arc::new(SegmentAllocator::new(page_size, 1 << 16).unwrap());
        let pool_tokens = 400_000u32;
        for _ in 0..(pool_tokens / page_size).div_ceil(1 << 16) {
            a.add_segment().unwrap();
        }
        let mut t = RadixTree::new(Arc::clone(&a));
        let mut state = 0x1234_5678_9abc_def0_u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let prompts: Vec<Vec<i64>> = (0..8)
            .map(|_| (0..2048).map(|_| (rand() % 32_000) as i64).collect())
            .collect();
        let requests: Vec<Vec<i64>> = (0..2000)
            .map(|_| {
                let mut r = prompts[(rand() % 8) as usize].clone();
                let n = 64 + rand() % 449;
                r.extend((0..n).map(|_| (rand() % 32_000) as i64));
                r
            })
            .collect();
        let ps = page_size as usize;
        let (mut hit, mut total) = (0usize, 0usize);
        let mut in_tree = std::time::Duration::ZERO;
        let start = Instant::now();
        for r in &requests {
            let call = Instant::now();
            let m = t.match_prefix(r, 0).unwrap();
            in_tree += call.elapsed();
            hit += m.length;
            total += r.len();
            let need = r.len() / ps - m.page_ids.len();
            let fresh = match a.alloc(need) {
                Ok(ids) => ids,
                Err(_) => {
                    let call = Instant::now();
                    t.evict(need).unwrap();
                    in_tree += call.elapsed();
                    a.alloc(need).unwrap()
                }
            };
            let mut ids: Vec<u32> = m.page_ids.clone();
            ids.extend_from_slice(&fresh);
            let call = Instant::now();
            t.insert(&r[..ids.len() * ps], &ids, 0).unwrap();
            in_tree += call.elapsed();
            a.release(&i64s(&fresh)).unwrap();
        }
        let el = start.elapsed().as_secs_f64();
        eprintln!(
            "shared prompts, page_size {page_size}: {:.2} us/request in tree calls \
             (match + insert + evict), {:.2} us with the allocator calls; \
             hit rate {:.3}, {} nodes, {:.2} metadata bytes/token",
            in_tree.as_secs_f64() * 1e6 / requests.len() as f64,
            el * 1e6 / requests.len() as f64,
            hit as f64 / total as f64,
            t.node_count(),
            t.metadata_bytes() as f64 / t.cached_tokens() as f64
        );
        t.check_invariants().unwrap();
        a.check_invariants().unwrap();
    }
}
