#![cfg(not(loom))]
//! Model-based test of `SegmentAllocator`: random sequences of a weighted
//! `Action` are applied both to the allocator and to a naive oracle (a map
//! page id -> refcount and the set of live segments), and after every step
//! the two must agree and the invariants of `shared/DESIGN.md` must hold:
//!
//! * every result agrees with the oracle's (same `Ok`/`Err`, same error kind
//!   and culprit; an alloc returns ids the oracle has free, lowest first);
//! * `check_invariants()` passes;
//! * invariant 4: `free_pages() + referenced == total_pages()`;
//! * invariant 5: a failed call changes no refcount, free count or segment;
//! * invariant 2: adding or retiring a segment changes no live page's refcount;
//! * invariant 6: a retire succeeds iff the segment had no referenced page.
//!
//! Pages per segment are tiny (1..=8) and the segment cap low, so segments
//! fill, empty, retire and get reused within one sequence. `PROPTEST_CASES`
//! raises the case count (default 256) for longer runs.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use radixseg_core::{CoreError, HandleProblem, SegmentAllocator};
use std::collections::{BTreeMap, BTreeSet};

/// A choice among however many items exist when the action runs (taken
/// modulo the length), so an action stays meaningful as the state changes.
#[derive(Debug, Clone, Copy)]
struct Pick(u16);

impl Pick {
    fn index(self, len: usize) -> usize {
        usize::from(self.0) % len
    }
    fn get<T>(self, items: &[T]) -> &T {
        &items[self.index(items.len())]
    }
}

type Picks = Vec<Pick>;

/// How an invalid id is built for `ReleaseInvalid` / `RetainInvalid`.
#[derive(Debug, Clone, Copy)]
enum Bad {
    Negative,
    /// At or past the id space of every slot ever created.
    PastEnd,
    /// A page of a retired segment (falls back to `PastEnd` if none is retired).
    Retired,
    /// A free page of a live segment (falls back to `PastEnd` if none is free).
    FreePage,
}

#[derive(Debug, Clone)]
enum Action {
    Alloc(usize),
    /// Retain a batch of live ids (repeats allowed: each adds one).
    Retain(Picks),
    /// Release a batch of live ids, each picked id at most as often as it is
    /// referenced (so the call must succeed).
    Release(Picks),
    /// A batch of live ids with one invalid id inserted at `at`.
    ReleaseInvalid(Picks, Bad, Pick),
    RetainInvalid(Picks, Bad, Pick),
    /// One live id listed once more than it is referenced, among others.
    DoubleReleaseInBatch(Pick, Picks),
    AddSegment,
    /// A segment id in `-1..=high_water` (so dead, busy and free ones).
    RetireSegment(Pick),
    /// More pages than are free.
    AllocTooMany(usize),
}

fn bad() -> impl Strategy<Value = Bad> {
    prop_oneof![
        Just(Bad::Negative),
        Just(Bad::PastEnd),
        Just(Bad::Retired),
        Just(Bad::FreePage)
    ]
}

fn pick_any() -> impl Strategy<Value = Pick> {
    any::<u16>().prop_map(Pick)
}

fn picks(max: usize) -> impl Strategy<Value = Picks> {
    prop::collection::vec(pick_any(), 1..=max)
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => (1usize..=6).prop_map(Action::Alloc),
        3 => picks(3).prop_map(Action::Retain),
        8 => picks(4).prop_map(Action::Release),
        2 => (picks(3), bad(), pick_any())
            .prop_map(|(p, b, at)| Action::ReleaseInvalid(p, b, at)),
        1 => (picks(3), bad(), pick_any())
            .prop_map(|(p, b, at)| Action::RetainInvalid(p, b, at)),
        2 => (pick_any(), picks(2)).prop_map(|(i, p)| Action::DoubleReleaseInBatch(i, p)),
        3 => Just(Action::AddSegment),
        3 => pick_any().prop_map(Action::RetireSegment),
        1 => (1usize..=3).prop_map(Action::AllocTooMany),
    ]
}

/// The naive model: which segments are live and the refcount of every
/// referenced page (absent = free).
#[derive(Debug, Clone)]
struct Oracle {
    pps: u32,
    max_segments: u32,
    /// Slots ever created (the next new segment id).
    high_water: u32,
    live: BTreeSet<u32>,
    retired: BTreeSet<u32>,
    rc: BTreeMap<u32, u32>,
}

/// The kind of an error, for comparing results without the numbers that are
/// only diagnostic (e.g. an `OutOfRange` limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    OutOfPages,
    OutOfRange(i64),
    SegmentNotLive(i64),
    FreeHandle(i64),
    DoubleFree(i64),
    SegmentBusy,
    InvalidSegment,
    IdSpaceExhausted,
    Other,
}

fn kind(e: &CoreError) -> Kind {
    match e {
        CoreError::OutOfPages { .. } => Kind::OutOfPages,
        CoreError::InvalidHandle { page_id, problem } => match problem {
            HandleProblem::OutOfRange { .. } => Kind::OutOfRange(*page_id),
            HandleProblem::SegmentNotLive { .. } => Kind::SegmentNotLive(*page_id),
            HandleProblem::Free => Kind::FreeHandle(*page_id),
            _ => Kind::Other,
        },
        CoreError::DoubleFree { page_id } => Kind::DoubleFree(i64::from(*page_id)),
        CoreError::SegmentBusy { .. } => Kind::SegmentBusy,
        CoreError::InvalidSegment { .. } => Kind::InvalidSegment,
        CoreError::IdSpaceExhausted { .. } => Kind::IdSpaceExhausted,
        _ => Kind::Other,
    }
}

impl Oracle {
    fn new(pps: u32, max_segments: u32) -> Self {
        Self {
            pps,
            max_segments,
            high_water: 0,
            live: BTreeSet::new(),
            retired: BTreeSet::new(),
            rc: BTreeMap::new(),
        }
    }

    fn total(&self) -> u64 {
        self.live.len() as u64 * u64::from(self.pps)
    }

    fn referenced(&self) -> u64 {
        self.rc.len() as u64
    }

    fn free_ids(&self) -> Vec<u32> {
        self.live
            .iter()
            .flat_map(|&s| s * self.pps..(s + 1) * self.pps)
            .filter(|p| !self.rc.contains_key(p))
            .collect()
    }

    /// Referenced page ids, ascending (the "live list" actions pick from).
    fn live_ids(&self) -> Vec<u32> {
        self.rc.keys().copied().collect()
    }

    /// Why `id` is not a referenced page, as `validate_referenced` sees it;
    /// `free` is the kind reported for a free page of a live segment.
    fn check_handle(&self, id: i64, free: fn(i64) -> Kind) -> Option<Kind> {
        let limit = i64::from(self.high_water) * i64::from(self.pps);
        if id < 0 || id >= limit {
            return Some(Kind::OutOfRange(id));
        }
        let (seg, page) = (id as u32 / self.pps, id as u32);
        if !self.live.contains(&seg) {
            return Some(Kind::SegmentNotLive(id));
        }
        (!self.rc.contains_key(&page)).then(|| free(id))
    }

    fn make_bad(&self, b: Bad) -> i64 {
        let past_end = i64::from(self.high_water) * i64::from(self.pps) + 3;
        match b {
            Bad::Negative => -1,
            Bad::PastEnd => past_end,
            Bad::Retired => self
                .retired
                .first()
                .map_or(past_end, |&s| i64::from(s * self.pps)),
            Bad::FreePage => self.free_ids().first().map_or(past_end, |&p| i64::from(p)),
        }
    }
}

/// What the allocator looks like from outside, for "nothing changed" checks.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    refcounts: Vec<(i64, u32)>,
    free: u64,
    total: u64,
    segments: Vec<u32>,
}

fn snapshot(a: &SegmentAllocator, o: &Oracle) -> Snapshot {
    let ids: Vec<i64> = o.live_ids().into_iter().map(i64::from).collect();
    let rcs = a.refcount(&ids).unwrap();
    Snapshot {
        refcounts: ids.into_iter().zip(rcs).collect(),
        free: a.free_pages(),
        total: a.total_pages(),
        segments: a.segments(),
    }
}

/// Every check that holds after any step.
fn agree(a: &SegmentAllocator, o: &Oracle) -> Result<(), TestCaseError> {
    if let Err(e) = a.check_invariants() {
        return Err(TestCaseError::fail(format!("check_invariants: {e}")));
    }
    let live: Vec<u32> = o.live.iter().copied().collect();
    prop_assert_eq!(a.segments(), live);
    prop_assert_eq!(a.total_pages(), o.total());
    prop_assert_eq!(a.segment_count() as usize, o.live.len());
    // Invariant 4.
    prop_assert_eq!(a.free_pages() + o.referenced(), a.total_pages());
    // Every page of a live segment has the oracle's refcount (0 if free).
    let all: Vec<i64> = o
        .live
        .iter()
        .flat_map(|&s| s * o.pps..(s + 1) * o.pps)
        .map(i64::from)
        .collect();
    let rcs = a.refcount(&all).unwrap();
    for (&id, &rc) in all.iter().zip(&rcs) {
        let want = o.rc.get(&(id as u32)).copied().unwrap_or(0);
        prop_assert_eq!(rc, want, "refcount of page {}", id);
    }
    // Pages of retired segments are not valid handles.
    for &s in &o.retired {
        let id = i64::from(s * o.pps);
        prop_assert_eq!(
            a.refcount(&[id]).map_err(|e| kind(&e)),
            Err(Kind::SegmentNotLive(id))
        );
    }
    Ok(())
}

/// Picked live ids; `None` when nothing is live.
fn pick(live: &[u32], picks: &[Pick]) -> Option<Vec<i64>> {
    (!live.is_empty()).then(|| picks.iter().map(|i| i64::from(*i.get(live))).collect())
}

/// Apply one action to both sides and compare.
fn step(a: &SegmentAllocator, o: &mut Oracle, act: &Action) -> Result<(), TestCaseError> {
    let before = snapshot(a, o);
    let live = o.live_ids();
    // `Ok(())` when the real call succeeded and the oracle has been updated;
    // `Err(kind)` when it failed (then nothing may have changed).
    let outcome: Result<(), Kind> = match act {
        Action::Alloc(n) | Action::AllocTooMany(n) => {
            let free = o.free_ids();
            let n = match act {
                Action::AllocTooMany(_) => free.len() + n,
                _ => *n,
            };
            let r = a.alloc(n);
            if n <= free.len() {
                let got = r.map_err(|e| TestCaseError::fail(format!("alloc({n}): {e}")))?;
                prop_assert_eq!(got.len(), n);
                let mut sorted = got.clone();
                sorted.sort_unstable();
                sorted.dedup();
                prop_assert_eq!(sorted.len(), n, "alloc returned a page twice: {:?}", got);
                for &p in &got {
                    prop_assert!(free.contains(&p), "alloc returned non-free page {}", p);
                }
                // Placement policy (IMPLEMENTATION.md): lowest free ids first.
                prop_assert_eq!(&sorted[..], &free[..n]);
                for p in got {
                    o.rc.insert(p, 1);
                }
                Ok(())
            } else {
                match r {
                    Ok(v) => return Err(TestCaseError::fail(format!("alloc({n}) gave {v:?}"))),
                    Err(e) => {
                        prop_assert_eq!(
                            e,
                            CoreError::OutOfPages {
                                requested: n as u64,
                                available: free.len() as u64,
                                total: o.total(),
                                segments: o.live.len() as u32,
                            }
                        );
                        Err(Kind::OutOfPages)
                    }
                }
            }
        }
        Action::Retain(p) => {
            let Some(ids) = pick(&live, p) else {
                return Ok(());
            };
            a.retain(&ids)
                .map_err(|e| TestCaseError::fail(format!("retain({ids:?}): {e}")))?;
            for id in ids {
                *o.rc.get_mut(&(id as u32)).unwrap() += 1;
            }
            Ok(())
        }
        Action::Release(p) => {
            let Some(mut ids) = pick(&live, p) else {
                return Ok(());
            };
            // Keep each id at most as often as it is referenced.
            let mut budget = o.rc.clone();
            ids.retain(|&id| {
                let left = budget.get_mut(&(id as u32)).unwrap();
                *left > 0 && {
                    *left -= 1;
                    true
                }
            });
            a.release(&ids)
                .map_err(|e| TestCaseError::fail(format!("release({ids:?}): {e}")))?;
            for id in ids {
                let rc = o.rc.get_mut(&(id as u32)).unwrap();
                *rc -= 1;
                if *rc == 0 {
                    o.rc.remove(&(id as u32));
                }
            }
            Ok(())
        }
        Action::ReleaseInvalid(p, b, at) | Action::RetainInvalid(p, b, at) => {
            let mut ids = pick(&live, p).unwrap_or_default();
            let bad_id = o.make_bad(*b);
            ids.insert(at.index(ids.len() + 1), bad_id);
            let releasing = matches!(act, Action::ReleaseInvalid(..));
            // Over-releasing a valid id is `DoubleReleaseInBatch`'s business:
            // trim repeats here so the bad id is the only culprit.
            if releasing {
                let mut budget = o.rc.clone();
                ids.retain(|&id| match budget.get_mut(&(id as u32)) {
                    Some(left) if id != bad_id => {
                        *left > 0 && {
                            *left -= 1;
                            true
                        }
                    }
                    _ => true,
                });
            }
            let expected = if releasing {
                o.check_handle(bad_id, Kind::DoubleFree)
            } else {
                o.check_handle(bad_id, Kind::FreeHandle)
            };
            let expected = expected.unwrap_or_else(|| panic!("{bad_id} is valid"));
            let r = if releasing {
                a.release(&ids)
            } else {
                a.retain(&ids)
            };
            prop_assert_eq!(r.map_err(|e| kind(&e)), Err(expected), "ids {:?}", ids);
            Err(expected)
        }
        Action::DoubleReleaseInBatch(i, p) => {
            if live.is_empty() {
                return Ok(());
            }
            let victim = *i.get(&live);
            let times = o.rc[&victim] + 1;
            let mut ids: Vec<i64> = pick(&live, p).unwrap_or_default();
            ids.retain(|&id| id != i64::from(victim));
            for k in 0..times as usize {
                let pos = (k * 7 + 1) % (ids.len() + 1);
                ids.insert(pos, i64::from(victim));
            }
            // Any page listed more often than it is referenced may be named.
            let mut count: BTreeMap<i64, u32> = BTreeMap::new();
            for &id in &ids {
                *count.entry(id).or_default() += 1;
            }
            let culprits: Vec<i64> = count
                .iter()
                .filter(|&(&id, &k)| k > o.rc[&(id as u32)])
                .map(|(&id, _)| id)
                .collect();
            match a.release(&ids).map_err(|e| kind(&e)) {
                Err(Kind::DoubleFree(id)) if culprits.contains(&id) => Err(Kind::DoubleFree(id)),
                other => {
                    return Err(TestCaseError::fail(format!(
                        "release({ids:?}) with culprits {culprits:?}: {other:?}"
                    )))
                }
            }
        }
        Action::AddSegment => {
            let r = a.add_segment();
            if let Some(&s) = o.retired.first() {
                prop_assert_eq!(r, Ok(s), "reuses the lowest retired id");
                o.retired.remove(&s);
                o.live.insert(s);
                Ok(())
            } else if o.high_water < o.max_segments {
                prop_assert_eq!(r, Ok(o.high_water));
                o.live.insert(o.high_water);
                o.high_water += 1;
                Ok(())
            } else {
                prop_assert_eq!(
                    r,
                    Err(CoreError::IdSpaceExhausted {
                        segments: o.live.len() as u32,
                        limit: o.max_segments,
                    })
                );
                Err(Kind::IdSpaceExhausted)
            }
        }
        Action::RetireSegment(i) => {
            // -1 ..= high_water: never-created, retired, busy and empty ones.
            let s = i.index(o.high_water as usize + 2) as i64 - 1;
            let r = a.retire_segment(s);
            let used = if s >= 0 && o.live.contains(&(s as u32)) {
                let s = s as u32;
                Some(
                    (s * o.pps..(s + 1) * o.pps)
                        .filter(|p| o.rc.contains_key(p))
                        .count() as u32,
                )
            } else {
                None
            };
            match used {
                None => {
                    prop_assert_eq!(r.map_err(|e| kind(&e)), Err(Kind::InvalidSegment));
                    Err(Kind::InvalidSegment)
                }
                // Invariant 6: retire succeeds iff no page is referenced.
                Some(0) => {
                    prop_assert_eq!(r, Ok(()), "segment {} is empty", s);
                    o.live.remove(&(s as u32));
                    o.retired.insert(s as u32);
                    Ok(())
                }
                Some(used_pages) => {
                    prop_assert_eq!(
                        r,
                        Err(CoreError::SegmentBusy {
                            segment: s as u32,
                            used_pages,
                        })
                    );
                    Err(Kind::SegmentBusy)
                }
            }
        }
    };
    let after = snapshot(a, o);
    match outcome {
        // Invariant 5: a failed call leaves everything as it was.
        Err(k) => prop_assert_eq!(&after, &before, "failed call ({:?}) changed state", k),
        Ok(()) => {
            if matches!(act, Action::AddSegment | Action::RetireSegment(_)) {
                // Invariant 2: no live page id or refcount changed.
                prop_assert_eq!(&after.refcounts, &before.refcounts);
            }
        }
    }
    agree(a, o)
}

fn config() -> impl Strategy<Value = (u32, u32, u32)> {
    (0u32..=10, 1u32..=8, 1u32..=4).prop_map(|(ps, pps, segs)| (1 << ps, pps, segs))
}

proptest! {
    // `ProptestConfig::default()` reads `PROPTEST_CASES` (default 256).
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn allocator_matches_model(
        (page_size, pps, max_segments) in config(),
        actions in prop::collection::vec(action(), 1..60),
    ) {
        let a = SegmentAllocator::new(page_size, pps)
            .and_then(|a| a.with_max_segments(max_segments))
            .unwrap();
        let mut o = Oracle::new(pps, max_segments);
        agree(&a, &o)?;
        for act in &actions {
            step(&a, &mut o, act)?;
        }
        // Give everything back: the pool ends entirely free.
        let mut all = Vec::new();
        for (&p, &rc) in &o.rc {
            all.extend(std::iter::repeat_n(i64::from(p), rc as usize));
        }
        a.release(&all).unwrap();
        o.rc.clear();
        agree(&a, &o)?;
        prop_assert_eq!(a.free_pages(), a.total_pages());
    }
}

/// The three bad-id shapes and the double release, deterministically, so a
/// regression names itself without shrinking.
#[test]
fn failed_calls_change_nothing() {
    let a = SegmentAllocator::new(16, 4).unwrap();
    let mut o = Oracle::new(4, 4);
    let idx = Pick;
    let script = [
        Action::AddSegment,
        Action::AddSegment,
        Action::Alloc(5),
        Action::Retain(vec![idx(0), idx(0)]),
        Action::DoubleReleaseInBatch(idx(0), vec![idx(1), idx(2)]),
        Action::ReleaseInvalid(vec![idx(1), idx(3)], Bad::FreePage, idx(7)),
        Action::ReleaseInvalid(vec![idx(1)], Bad::Negative, idx(0)),
        Action::RetainInvalid(vec![idx(2)], Bad::PastEnd, idx(7)),
        Action::AllocTooMany(1),
        Action::RetireSegment(idx(2)),
        Action::Release(vec![idx(4)]),
        Action::RetireSegment(idx(2)),
        Action::ReleaseInvalid(vec![idx(1)], Bad::Retired, idx(7)),
        Action::AddSegment,
    ];
    for act in &script {
        step(&a, &mut o, act).unwrap_or_else(|e| panic!("{act:?}: {e}"));
    }
}
