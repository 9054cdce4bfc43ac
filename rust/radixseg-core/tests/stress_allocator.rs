#![cfg(not(loom))]
//! Threaded stress test of `SegmentAllocator` with real threads and real
//! timing (loom covers tiny configurations exhaustively; this covers many
//! segments, longer batches and the scheduler's own interleavings).
//!
//! Four workers alloc, retain and release pages on their own live lists while
//! a fifth thread adds and retires segments. Every page carries an owner
//! marker in the test: a worker claims it with a CAS from "nobody" when alloc
//! hands the page out and clears it just before its last release, so a page
//! handed out while still held elsewhere fails the CAS (invariant 1). A
//! worker is the only holder of its pages, so each page's refcount must
//! equal the worker's own count; a successful retire must find no marker set
//! in the retired segment (invariant 6). At the end everything is released
//! and the accounting must be exact (invariant 4). `STRESS_ITERS` scales the
//! run (default 100 000 operations per worker).
#![allow(clippy::unwrap_used)]

use radixseg_core::{CoreError, SegmentAllocator};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

const WORKERS: u32 = 4;
const PPS: u32 = 8;
const MAX_SEGMENTS: u32 = 12;
/// A worker releases pages once it holds this many.
const MAX_HELD: usize = 20;
/// Marker value of a page nobody holds.
const NOBODY: u32 = 0;

/// xorshift64*: deterministic per-thread choices without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % n
    }
}

struct Shared {
    alloc: SegmentAllocator,
    /// Per page id: `NOBODY` or the holding worker's id + 1.
    owner: Vec<AtomicU32>,
    workers_done: AtomicUsize,
    /// Set when a worker sees an `OutOfPages` and wants the segment thread
    /// to grow rather than retire.
    starved: AtomicBool,
}

/// Counts a worker as finished even if it panics, so the segment thread
/// always stops.
struct DoneGuard<'a>(&'a AtomicUsize);

impl Drop for DoneGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

fn iterations() -> usize {
    std::env::var("STRESS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

struct Worker<'a> {
    sh: &'a Shared,
    me: u32,
    rng: Rng,
    /// Page id -> references this worker holds.
    held: HashMap<u32, u32>,
    /// Held ids (each once), for uniform picks.
    list: Vec<u32>,
}

impl Worker<'_> {
    fn alloc(&mut self) {
        let k = 1 + self.rng.below(4) as usize;
        match self.sh.alloc.alloc(k) {
            Ok(ids) => {
                assert_eq!(ids.len(), k);
                for &p in &ids {
                    // AcqRel: pairs with the Release clear before the previous
                    // holder's release (and so orders after it).
                    let prev = self.sh.owner[p as usize].compare_exchange(
                        NOBODY,
                        self.me + 1,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    assert!(
                        prev.is_ok(),
                        "page {p} handed to worker {} while worker {} holds it",
                        self.me,
                        prev.unwrap_err() - 1
                    );
                    assert!(self.held.insert(p, 1).is_none());
                    self.list.push(p);
                }
                // A fresh id is a valid handle at once, even while the
                // add_segment that created its segment is still returning.
                let fresh: Vec<i64> = ids.iter().map(|&p| i64::from(p)).collect();
                assert_eq!(self.sh.alloc.refcount(&fresh), Ok(vec![1; k]));
            }
            Err(CoreError::OutOfPages { requested, .. }) => {
                assert_eq!(requested, k as u64);
                self.sh.starved.store(true, Ordering::Relaxed);
            }
            Err(e) => panic!("alloc({k}): {e}"),
        }
    }

    fn retain(&mut self) {
        if self.list.is_empty() {
            return;
        }
        let p = self.list[self.rng.below(self.list.len() as u64) as usize];
        self.sh.alloc.retain(&[i64::from(p)]).unwrap();
        let mine = self.held.get_mut(&p).unwrap();
        *mine += 1;
        // Only this worker touches its pages, so the count is exact.
        assert_eq!(
            self.sh.alloc.refcount(&[i64::from(p)]).unwrap(),
            vec![*mine]
        );
    }

    /// Release one reference to each of up to `n` held pages, in one call.
    fn release(&mut self, n: usize) {
        let mut batch = Vec::new();
        for _ in 0..n.min(self.list.len()) {
            let i = self.rng.below(self.list.len() as u64) as usize;
            let p = self.list[i];
            let mine = self.held.get_mut(&p).unwrap();
            *mine -= 1;
            if *mine == 0 {
                self.held.remove(&p);
                self.list.swap_remove(i);
                // Release: pairs with the AcqRel claim by the next holder.
                // Cleared before the page can be handed out again.
                self.sh.owner[p as usize].store(NOBODY, Ordering::Release);
            }
            batch.push(i64::from(p));
        }
        self.sh.alloc.release(&batch).unwrap();
    }

    fn run(&mut self, iters: usize) {
        for _ in 0..iters {
            if self.list.len() >= MAX_HELD {
                self.release(4);
                continue;
            }
            match self.rng.below(100) {
                0..45 => self.alloc(),
                45..60 => self.retain(),
                60..90 => self.release(1),
                _ => self.release(3),
            }
        }
        while !self.list.is_empty() {
            self.release(8);
        }
    }
}

fn segment_churn(sh: &Shared) -> (u32, u32) {
    let mut rng = Rng(0x5eed_5e67);
    let (mut added, mut retired) = (0, 0);
    while sh.workers_done.load(Ordering::Acquire) < WORKERS as usize {
        let grow = sh.starved.swap(false, Ordering::Relaxed) || rng.below(2) == 0;
        if grow {
            match sh.alloc.add_segment() {
                Ok(_) => added += 1,
                Err(CoreError::IdSpaceExhausted { .. }) => {}
                Err(e) => panic!("add_segment: {e}"),
            }
        } else {
            // Lowest-first placement drains the high segments, so the
            // highest live one is the likeliest to be empty; sometimes pick
            // any slot (live, retired or never created) instead.
            let live = sh.alloc.segments();
            let s = match (rng.below(4), live.last()) {
                (0, _) | (_, None) => rng.below(u64::from(MAX_SEGMENTS)) as u32,
                (1, Some(_)) => live[rng.below(live.len() as u64) as usize],
                (_, Some(&top)) => top,
            };
            match sh.alloc.retire_segment(i64::from(s)) {
                Ok(()) => {
                    retired += 1;
                    // Nobody can take a page of a closed segment, and every
                    // holder cleared its marker before releasing.
                    for p in s * PPS..(s + 1) * PPS {
                        assert_eq!(
                            sh.owner[p as usize].load(Ordering::Acquire),
                            NOBODY,
                            "segment {s} retired while page {p} is held"
                        );
                    }
                }
                Err(CoreError::SegmentBusy { .. } | CoreError::InvalidSegment { .. }) => {}
                Err(e) => panic!("retire_segment({s}): {e}"),
            }
        }
        thread::yield_now();
    }
    (added, retired)
}

#[test]
fn workers_and_segment_churn_account_exactly() {
    let alloc = SegmentAllocator::new(16, PPS)
        .unwrap()
        .with_max_segments(MAX_SEGMENTS)
        .unwrap();
    for _ in 0..2 {
        alloc.add_segment().unwrap();
    }
    let sh = Arc::new(Shared {
        alloc,
        owner: (0..MAX_SEGMENTS * PPS)
            .map(|_| AtomicU32::new(NOBODY))
            .collect(),
        workers_done: AtomicUsize::new(0),
        starved: AtomicBool::new(false),
    });
    let iters = iterations();
    let workers: Vec<_> = (0..WORKERS)
        .map(|me| {
            let sh = sh.clone();
            thread::spawn(move || {
                let _done = DoneGuard(&sh.workers_done);
                let mut w = Worker {
                    sh: &sh,
                    me,
                    rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (u64::from(me) + 1)),
                    held: HashMap::new(),
                    list: Vec::new(),
                };
                w.run(iters);
            })
        })
        .collect();
    let churn = {
        let sh = sh.clone();
        thread::spawn(move || segment_churn(&sh))
    };
    for w in workers {
        w.join().unwrap();
    }
    let (added, retired) = churn.join().unwrap();
    eprintln!("stress: {iters} ops x {WORKERS} workers, {added} segments added, {retired} retired");

    let a = &sh.alloc;
    a.check_invariants().unwrap();
    assert_eq!(
        a.free_pages(),
        a.total_pages(),
        "pages leaked or double-freed"
    );
    assert!(sh.owner.iter().all(|o| o.load(Ordering::Relaxed) == NOBODY));
    // Every page of every live segment is allocatable exactly once.
    let total = a.total_pages() as usize;
    let all = a.alloc(total).unwrap();
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), total);
    a.release(&all.iter().map(|&p| i64::from(p)).collect::<Vec<_>>())
        .unwrap();
    for s in a.segments() {
        a.retire_segment(i64::from(s)).unwrap();
    }
    assert_eq!(a.total_pages(), 0);
    a.check_invariants().unwrap();
}
