//! The tree's eviction order against a naive reference tree that follows
//! SGLang's `RadixCache` semantics step by step (path nodes stamped with the
//! call's timestamp, new nodes from splits and inserts stamped later, every
//! call collects all unlocked leaves into a heap by last access, parents
//! pushed when their last child goes). With a deterministic clock both must
//! evict exactly the same pages, so hit rates on a shared trace agree.

#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use radixseg_core::{Arc, NodeId, RadixTree, SegmentAllocator};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

struct RefNode {
    ns: u64,
    parent: usize,
    children: HashMap<Vec<u32>, usize>,
    key: Vec<u32>,
    pages: Vec<u32>,
    lock: u32,
    time: u64,
}

/// One root; the namespace is part of every child key (SGLang's extra_key),
/// so the children map is keyed by the first page within one namespace.
struct RefTree {
    p: usize,
    nodes: Vec<Option<RefNode>>,
    clock: u64,
}

const ROOT: usize = 0;

impl RefTree {
    fn new(p: usize) -> Self {
        let root = RefNode {
            ns: 0,
            parent: usize::MAX,
            children: HashMap::new(),
            key: Vec::new(),
            pages: Vec::new(),
            lock: 1,
            time: 0,
        };
        Self {
            p,
            nodes: vec![Some(root)],
            clock: 0,
        }
    }

    fn now(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn n(&mut self, i: usize) -> &mut RefNode {
        self.nodes[i].as_mut().unwrap()
    }

    fn child_key(&self, ns: u64, toks: &[u32]) -> Vec<u32> {
        let mut k = vec![(ns >> 32) as u32, ns as u32];
        k.extend_from_slice(&toks[..self.p]);
        k
    }

    fn matched(&self, a: &[u32], b: &[u32]) -> usize {
        let mut i = 0;
        while i + self.p <= a.len().min(b.len()) && a[i..i + self.p] == b[i..i + self.p] {
            i += self.p;
        }
        i
    }

    fn split(&mut self, child: usize, at: usize) -> usize {
        let t = self.now();
        let p = self.p;
        let c = self.n(child);
        let (ns, parent, lock) = (c.ns, c.parent, c.lock);
        let upper_key = c.key[..at].to_vec();
        let upper_pages = c.pages[..at / p].to_vec();
        c.key.drain(..at);
        c.pages.drain(..at / p);
        let lower_ck = {
            let k = self.nodes[child].as_ref().unwrap().key.clone();
            self.child_key(ns, &k)
        };
        let new = self.nodes.len();
        self.nodes.push(Some(RefNode {
            ns,
            parent,
            children: HashMap::from([(lower_ck, child)]),
            key: upper_key.clone(),
            pages: upper_pages,
            lock,
            time: t,
        }));
        self.n(child).parent = new;
        let ck = self.child_key(ns, &upper_key);
        self.n(parent).children.insert(ck, new);
        new
    }

    fn match_prefix(&mut self, ns: u64, toks: &[u32]) -> (usize, Vec<u32>) {
        let mut key = &toks[..toks.len() / self.p * self.p];
        if key.is_empty() {
            return (ROOT, Vec::new());
        }
        let t = self.now();
        self.n(ROOT).time = t;
        let (mut node, mut out) = (ROOT, Vec::new());
        while !key.is_empty() {
            let ck = self.child_key(ns, key);
            let Some(&child) = self.nodes[node].as_ref().unwrap().children.get(&ck) else {
                break;
            };
            self.n(child).time = t;
            let ckey = self.nodes[child].as_ref().unwrap().key.clone();
            let m = self.matched(&ckey, key);
            if m < ckey.len() {
                let new = self.split(child, m);
                out.extend_from_slice(&self.nodes[new].as_ref().unwrap().pages);
                node = new;
                break;
            }
            out.extend_from_slice(&self.nodes[child].as_ref().unwrap().pages);
            node = child;
            key = &key[m..];
        }
        (node, out)
    }

    fn insert(&mut self, ns: u64, toks: &[u32], pages: &[u32]) -> usize {
        let t = self.now();
        self.n(ROOT).time = t;
        let (mut key, mut val) = (toks, pages);
        let (mut node, mut total) = (ROOT, 0);
        while !key.is_empty() {
            let ck = self.child_key(ns, key);
            let Some(&child) = self.nodes[node].as_ref().unwrap().children.get(&ck) else {
                break;
            };
            node = child;
            self.n(node).time = t;
            let ckey = self.nodes[node].as_ref().unwrap().key.clone();
            let m = self.matched(&ckey, key);
            total += m;
            key = &key[m..];
            val = &val[m / self.p..];
            if m < ckey.len() {
                node = self.split(node, m);
            }
        }
        if !key.is_empty() {
            let t = self.now();
            let ck = self.child_key(ns, key);
            let new = self.nodes.len();
            self.nodes.push(Some(RefNode {
                ns,
                parent: node,
                children: HashMap::new(),
                key: key.to_vec(),
                pages: val.to_vec(),
                lock: 0,
                time: t,
            }));
            self.n(node).children.insert(ck, new);
        }
        total
    }

    fn lock(&mut self, mut node: usize, up: bool) {
        while node != ROOT {
            let n = self.n(node);
            if up {
                n.lock += 1;
            } else {
                n.lock -= 1;
            }
            node = n.parent;
        }
    }

    fn evict(&mut self, want: usize) -> usize {
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let n = n.as_ref()?;
                (i != ROOT && n.children.is_empty() && n.lock == 0).then_some(Reverse((n.time, i)))
            })
            .collect();
        let mut evicted = 0;
        while evicted < want {
            let Some(Reverse((_, x))) = heap.pop() else {
                break;
            };
            let n = self.nodes[x].take().unwrap();
            evicted += n.pages.len();
            let ck = self.child_key(n.ns, &n.key);
            let parent = self.n(n.parent);
            parent.children.remove(&ck);
            if n.parent != ROOT && parent.children.is_empty() && parent.lock == 0 {
                heap.push(Reverse((parent.time, n.parent)));
            }
        }
        evicted
    }

    /// (ns, prefix) -> page for every cached page.
    fn cached(&self) -> HashMap<(u64, Vec<u32>), u32> {
        let mut out = HashMap::new();
        for n in self.nodes.iter().skip(1).flatten() {
            let mut chain = vec![n];
            let mut c = n;
            while c.parent != ROOT {
                c = self.nodes[c.parent].as_ref().unwrap();
                chain.push(c);
            }
            let toks: Vec<u32> = chain.iter().rev().flat_map(|c| c.key.clone()).collect();
            let base = toks.len() - n.key.len();
            for (i, &pg) in n.pages.iter().enumerate() {
                out.insert((n.ns, toks[..base + (i + 1) * self.p].to_vec()), pg);
            }
        }
        out
    }

    fn evictable(&self) -> usize {
        self.nodes
            .iter()
            .skip(1)
            .flatten()
            .filter(|n| n.lock == 0)
            .map(|n| n.pages.len())
            .sum()
    }
}

fn tree_cached(t: &RadixTree) -> HashMap<(u64, Vec<u32>), u32> {
    let p = t.page_size();
    let mut out = HashMap::new();
    for s in t.cached_sequences() {
        for (i, &pg) in s.page_ids.iter().enumerate() {
            out.insert((s.namespace, s.tokens[..(i + 1) * p].to_vec()), pg);
        }
    }
    out
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u64, Vec<u32>),
    Match(u64, Vec<u32>, bool),
    Unlock(usize),
    Evict(usize),
}

fn ops(p: usize) -> impl Strategy<Value = Vec<Op>> {
    let toks = proptest::collection::vec(0..3u32, 0..(6 * p + p / 2 + 1));
    let op = prop_oneof![
        5 => (0..2u64, toks.clone()).prop_map(|(ns, t)| Op::Insert(ns, t)),
        4 => (0..2u64, toks, any::<bool>()).prop_map(|(ns, t, l)| Op::Match(ns, t, l)),
        2 => any::<usize>().prop_map(Op::Unlock),
        3 => (0..6usize).prop_map(Op::Evict),
    ];
    proptest::collection::vec(op, 1..100)
}

fn run(p: u32, ops: &[Op]) {
    let a = Arc::new(SegmentAllocator::new(p, 4096).unwrap());
    a.add_segment().unwrap();
    let mut t = RadixTree::new(Arc::clone(&a));
    let mut r = RefTree::new(p as usize);
    let mut locks: Vec<(NodeId, usize)> = Vec::new();
    for op in ops {
        match op {
            Op::Insert(ns, toks) => {
                let n = toks.len() / p as usize;
                let ids = a.alloc(n).unwrap();
                let whole = &toks[..n * p as usize];
                assert_eq!(
                    t.insert(toks, &ids, *ns).unwrap(),
                    r.insert(*ns, whole, &ids)
                );
                let ids: Vec<i64> = ids.iter().map(|&x| i64::from(x)).collect();
                a.release(&ids).unwrap();
            }
            Op::Match(ns, toks, lock) => {
                let m = t.match_prefix(toks, *ns).unwrap();
                let (rn, rp) = r.match_prefix(*ns, toks);
                assert_eq!(m.page_ids, rp);
                if *lock {
                    t.lock(m.node).unwrap();
                    r.lock(rn, true);
                    locks.push((m.node, rn));
                }
            }
            Op::Unlock(i) => {
                if !locks.is_empty() {
                    let (n, rn) = locks.remove(i % locks.len());
                    t.unlock(n).unwrap();
                    r.lock(rn, false);
                }
            }
            Op::Evict(n) => {
                assert_eq!(t.evict(*n).unwrap(), r.evict(*n), "pages evicted");
            }
        }
        assert_eq!(tree_cached(&t), r.cached(), "after {op:?}");
        assert_eq!(t.evictable_pages(), r.evictable());
        t.check_invariants().unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn same_evictions_as_reference_page_size_1(ops in ops(1)) {
        run(1, &ops);
    }

    #[test]
    fn same_evictions_as_reference_page_size_2(ops in ops(2)) {
        run(2, &ops);
    }
}
