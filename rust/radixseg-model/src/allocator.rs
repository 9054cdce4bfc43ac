//! The allocator model: `SegmentAllocator` against a refcount map.
//!
//! The oracle knows the live, retired and reserved segments, the high water
//! of slots ever created and the refcount of every referenced page. For each action it
//! computes the exact result the allocator must give, `CoreError` included
//! (the same variant, culprit and numbers), and after each action it compares
//! the whole observable state: live segments, per-segment usage, free and
//! total pages, the refcount of every page of every live segment, that pages
//! of retired and reserved segments are refused, and `check_invariants()`. Since the
//! oracle is not touched by a failing call, "a failed call changes nothing"
//! (DESIGN.md invariant 5) is checked by the same comparison.
//!
//! Configurations cover every page size, tiny segments (1..=8 pages, so they
//! fill, empty, retire and get reused), segments that straddle bitmap words
//! (60..=99, 127..=129, ...), low `with_max_segments` caps and invalid
//! configurations (which must be refused with `InvalidConfig`).

use crate::{pick, pick_within_counts};
use arbitrary::Arbitrary;
use radixseg_core::{
    CoreError, HandleProblem, SegmentAllocator, MAX_PAGES_PER_SEGMENT, MAX_PAGE_SIZE, PAGE_ID_LIMIT,
};
use std::collections::{BTreeMap, BTreeSet};

/// Raw configuration bytes, mapped by `Config::resolve` so that most inputs
/// give a small valid allocator and a few give invalid or huge ones.
#[derive(Arbitrary, Debug)]
pub struct RawConfig {
    page_size: u8,
    pages_per_segment: u8,
    max_segments: u8,
    initial_segments: u8,
}

/// How a page id is chosen when the action runs (so an action stays
/// meaningful whatever state earlier actions left).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum IdPick {
    /// A referenced page (the k-th of those referenced).
    Referenced(u16),
    /// Another referenced page (a second variant doubles the weight).
    Referenced2(u16),
    /// A free page of a live segment.
    Free(u16),
    /// A page of a retired segment.
    Retired(u16),
    /// A page of a reserved (not yet opened) segment.
    Reserved(u16),
    /// `high_water * pages_per_segment + k`: just inside or past the id space.
    NearEnd(i8),
    /// A referenced page plus 2^32 (would alias it if truncated to `u32`).
    Alias(u16),
    /// Any integer: negative, huge.
    Raw(i64),
}

/// How a segment id is chosen for `retire_segment`, `open_segment` and
/// `cancel_segment`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum SegPick {
    Live(u8),
    Retired(u8),
    Reserved(u8),
    /// `high_water + k`.
    Near(i8),
    Raw(i64),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Action {
    /// `alloc(n % 12)`.
    Alloc(u8),
    /// `alloc_into(n % 12, out)` with `out` already holding junk values.
    AllocInto {
        n: u8,
        junk: Vec<u32>,
    },
    /// An allocation that cannot be served: the free pages plus `k`, or a
    /// huge count (`k` >= 200 selects one).
    AllocOver {
        k: u8,
        into: bool,
    },
    /// `retain` of arbitrary ids (duplicates add one each).
    Retain(Vec<IdPick>),
    /// `release` of arbitrary ids (duplicates drop one each).
    Release(Vec<IdPick>),
    /// `release` of referenced pages, each at most as often as it is
    /// referenced and in the given (unsorted) order: must succeed.
    ReleaseValid(Vec<u16>),
    /// Every reference of one page in one batch, plus `extra` more.
    ReleaseAllOf {
        page: u16,
        extra: u8,
    },
    /// `refcount` of arbitrary ids.
    Refcount(Vec<IdPick>),
    /// `check_release` of arbitrary ids: the verdict `release` would give,
    /// with nothing changed.
    CheckRelease(Vec<IdPick>),
    AddSegment,
    RetireSegment(SegPick),
    /// The first phase of `add_segment`: an id, closed.
    ReserveSegment,
    /// The second phase, of any segment id (a reserved one succeeds).
    OpenSegment(SegPick),
    /// Give a reserved id back.
    CancelSegment(SegPick),
    /// `is_live` of an arbitrary slot id.
    IsLive(u32),
}

#[derive(Arbitrary, Debug)]
pub struct Input {
    config: RawConfig,
    actions: Vec<Action>,
}

/// The decoded configuration.
#[derive(Debug, Clone, Copy)]
struct Config {
    page_size: u32,
    pps: u32,
    /// `None`: the default (2^31 / pps).
    max_segments: Option<u32>,
    initial_segments: u32,
}

fn resolve(c: &RawConfig) -> Config {
    let page_size = match c.page_size {
        0..=239 => 1 << (c.page_size % 11),
        240 => 0,
        241 => 3,
        242 => 2048,
        243 => u32::MAX,
        244 => 1023,
        _ => 1 << (c.page_size % 11),
    };
    let pps = match c.pages_per_segment {
        0..=199 => 1 + u32::from(c.pages_per_segment % 8),
        200..=239 => 60 + u32::from(c.pages_per_segment - 200),
        240..=247 => [63, 64, 65, 127, 128, 129, 192, 256][usize::from(c.pages_per_segment - 240)],
        248 => 0,
        249 => MAX_PAGES_PER_SEGMENT + 1,
        250 => u32::MAX,
        251 => MAX_PAGES_PER_SEGMENT,
        252 => 1 << 16,
        _ => 1 + u32::from(c.pages_per_segment % 8),
    };
    let default_max = if pps == 0 {
        0
    } else {
        (PAGE_ID_LIMIT / u64::from(pps)) as u32
    };
    let max_segments = match c.max_segments {
        0..=199 => Some(1 + u32::from(c.max_segments % 6)),
        200..=229 => None,
        230 => Some(0),
        231 => Some(default_max),
        232 => Some(default_max.saturating_add(1)),
        233 => Some(u32::MAX),
        _ => Some(1 + u32::from(c.max_segments % 6)),
    };
    Config {
        page_size,
        pps,
        max_segments,
        initial_segments: u32::from(c.initial_segments % 4),
    }
}

/// What the constructor and `with_max_segments` must answer.
fn expected_config(c: &Config) -> Result<u32, CoreError> {
    if !(1..=MAX_PAGE_SIZE).contains(&c.page_size) {
        return Err(CoreError::InvalidConfig {
            what: "page_size",
            value: c.page_size.into(),
            rule: "must be in 1..=1024",
        });
    }
    if !(1..=MAX_PAGES_PER_SEGMENT).contains(&c.pps) {
        return Err(CoreError::InvalidConfig {
            what: "pages_per_segment",
            value: c.pps.into(),
            rule: "must be in 1..=1048576",
        });
    }
    let default_max = (PAGE_ID_LIMIT / u64::from(c.pps)) as u32;
    match c.max_segments {
        None => Ok(default_max),
        Some(m) if m == 0 || m > default_max => Err(CoreError::InvalidConfig {
            what: "max_segments",
            value: m.into(),
            rule: "must be at least 1 and at most 2^31 / pages_per_segment",
        }),
        Some(m) => Ok(m),
    }
}

fn build(c: &Config) -> Result<SegmentAllocator, CoreError> {
    let a = SegmentAllocator::new(c.page_size, c.pps)?;
    match c.max_segments {
        None => Ok(a),
        Some(m) => a.with_max_segments(m),
    }
}

/// The naive model.
#[derive(Debug)]
struct Oracle {
    pps: u32,
    max_segments: u32,
    /// Slots ever created (the next new segment id).
    high_water: u32,
    live: BTreeSet<u32>,
    retired: BTreeSet<u32>,
    /// Reserved, neither opened nor cancelled yet.
    reserved: BTreeSet<u32>,
    /// Refcount of every referenced page (absent = free).
    rc: BTreeMap<u32, u32>,
}

impl Oracle {
    fn limit(&self) -> u64 {
        u64::from(self.high_water) * u64::from(self.pps)
    }

    fn total(&self) -> u64 {
        self.live.len() as u64 * u64::from(self.pps)
    }

    fn free_ids(&self) -> Vec<u32> {
        self.live
            .iter()
            .flat_map(|&s| s * self.pps..(s + 1) * self.pps)
            .filter(|p| !self.rc.contains_key(p))
            .collect()
    }

    fn referenced(&self) -> Vec<u32> {
        self.rc.keys().copied().collect()
    }

    fn resolve_id(&self, p: IdPick) -> i64 {
        let past_end = self.limit() as i64 + 1;
        match p {
            IdPick::Referenced(k) | IdPick::Referenced2(k) => {
                pick(&self.referenced(), k).map_or(past_end, i64::from)
            }
            IdPick::Free(k) => pick(&self.free_ids(), k).map_or(past_end, i64::from),
            IdPick::Retired(k) | IdPick::Reserved(k) => {
                let closed = match p {
                    IdPick::Retired(_) => &self.retired,
                    _ => &self.reserved,
                };
                let segs: Vec<u32> = closed.iter().copied().collect();
                pick(&segs, k).map_or(past_end, |s| {
                    i64::from(s) * i64::from(self.pps) + i64::from(k) % i64::from(self.pps)
                })
            }
            IdPick::NearEnd(k) => self.limit() as i64 + i64::from(k),
            IdPick::Alias(k) => {
                pick(&self.referenced(), k).map_or(past_end, |p| i64::from(p) + (1 << 32))
            }
            IdPick::Raw(v) => v,
        }
    }

    fn resolve_seg(&self, p: SegPick) -> i64 {
        match p {
            SegPick::Live(k) => {
                let segs: Vec<u32> = self.live.iter().copied().collect();
                pick(&segs, k).map_or(-1, i64::from)
            }
            SegPick::Retired(k) => {
                let segs: Vec<u32> = self.retired.iter().copied().collect();
                pick(&segs, k).map_or(i64::from(self.high_water), i64::from)
            }
            SegPick::Reserved(k) => {
                let segs: Vec<u32> = self.reserved.iter().copied().collect();
                pick(&segs, k).map_or(i64::from(self.high_water), i64::from)
            }
            SegPick::Near(k) => i64::from(self.high_water) + i64::from(k),
            SegPick::Raw(v) => v,
        }
    }

    /// Why `id` is not a page id in range of a live segment (`None` if it is).
    fn check_live(&self, id: i64) -> Option<CoreError> {
        if id < 0 || id as u64 >= self.limit() {
            return Some(CoreError::InvalidHandle {
                page_id: id,
                problem: HandleProblem::OutOfRange {
                    limit: self.limit(),
                },
            });
        }
        let seg = id as u32 / self.pps;
        if !self.live.contains(&seg) {
            return Some(CoreError::InvalidHandle {
                page_id: id,
                problem: HandleProblem::SegmentNotLive { segment: seg },
            });
        }
        None
    }

    /// Why `id` is not a referenced page; `free` builds the error for a free
    /// page of a live segment.
    fn check_referenced(&self, id: i64, free: fn(i64) -> CoreError) -> Option<CoreError> {
        if let Some(e) = self.check_live(id) {
            return Some(e);
        }
        (!self.rc.contains_key(&(id as u32))).then(|| free(id))
    }

    fn expect_retain(&self, ids: &[i64]) -> Result<(), CoreError> {
        for &id in ids {
            if let Some(e) = self.check_referenced(id, |page_id| CoreError::InvalidHandle {
                page_id,
                problem: HandleProblem::Free,
            }) {
                return Err(e);
            }
        }
        Ok(())
    }

    fn expect_release(&self, ids: &[i64]) -> Result<(), CoreError> {
        for &id in ids {
            if let Some(e) = self.check_referenced(id, |page_id| CoreError::DoubleFree {
                page_id: page_id as u32,
            }) {
                return Err(e);
            }
        }
        // The smallest id listed more often than it is referenced.
        let mut count: BTreeMap<i64, u32> = BTreeMap::new();
        for &id in ids {
            *count.entry(id).or_default() += 1;
        }
        for (&id, &k) in &count {
            if k > self.rc[&(id as u32)] {
                return Err(CoreError::DoubleFree { page_id: id as u32 });
            }
        }
        Ok(())
    }

    fn expect_refcount(&self, ids: &[i64]) -> Result<Vec<u32>, CoreError> {
        ids.iter()
            .map(|&id| match self.check_live(id) {
                Some(e) => Err(e),
                None => Ok(self.rc.get(&(id as u32)).copied().unwrap_or(0)),
            })
            .collect()
    }

    fn out_of_pages(&self, n: u64) -> CoreError {
        CoreError::OutOfPages {
            requested: n,
            available: self.free_ids().len() as u64,
            total: self.total(),
            segments: self.live.len() as u32,
        }
    }

    /// Apply a successful allocation of `got` (checked against the policy:
    /// distinct free pages, lowest ids first).
    fn take(&mut self, n: usize, got: &[u32]) {
        assert_eq!(got.len(), n, "alloc({n}) returned {} ids", got.len());
        let free = self.free_ids();
        let mut sorted = got.to_vec();
        sorted.sort_unstable();
        assert_eq!(
            &sorted[..],
            &free[..n],
            "alloc({n}) must take the lowest free ids"
        );
        for &p in got {
            self.rc.insert(p, 1);
        }
    }

    fn retain(&mut self, ids: &[i64]) {
        for &id in ids {
            *self.rc.get_mut(&(id as u32)).unwrap() += 1;
        }
    }

    fn release(&mut self, ids: &[i64]) {
        for &id in ids {
            let rc = self.rc.get_mut(&(id as u32)).unwrap();
            *rc -= 1;
            if *rc == 0 {
                self.rc.remove(&(id as u32));
            }
        }
    }

    fn expect_add(&self) -> Result<u32, CoreError> {
        if let Some(&s) = self.retired.first() {
            Ok(s)
        } else if self.high_water < self.max_segments {
            Ok(self.high_water)
        } else {
            Err(CoreError::IdSpaceExhausted {
                segments: self.live.len() as u32,
                limit: self.max_segments,
            })
        }
    }

    fn add(&mut self, s: u32) {
        self.reserve(s);
        self.open(s);
    }

    fn reserve(&mut self, s: u32) {
        self.retired.remove(&s);
        self.reserved.insert(s);
        self.high_water = self.high_water.max(s + 1);
    }

    fn open(&mut self, s: u32) {
        self.reserved.remove(&s);
        self.live.insert(s);
    }

    fn cancel(&mut self, s: u32) {
        self.reserved.remove(&s);
        self.retired.insert(s);
    }

    /// What `open_segment` and `cancel_segment` of `seg` must answer.
    fn expect_reserved(&self, seg: i64) -> Result<u32, CoreError> {
        u32::try_from(seg)
            .ok()
            .filter(|s| self.reserved.contains(s))
            .ok_or(CoreError::SegmentNotReserved { segment: seg })
    }

    fn expect_retire(&self, seg: i64) -> Result<(), CoreError> {
        let invalid = CoreError::InvalidSegment {
            segment: seg,
            live: self.live.len() as u32,
        };
        let Ok(s) = u32::try_from(seg) else {
            return Err(invalid);
        };
        if !self.live.contains(&s) {
            return Err(invalid);
        }
        let used = (s * self.pps..(s + 1) * self.pps)
            .filter(|p| self.rc.contains_key(p))
            .count() as u32;
        if used > 0 {
            return Err(CoreError::SegmentBusy {
                segment: s,
                used_pages: used,
            });
        }
        Ok(())
    }
}

/// Compare everything observable with the oracle.
fn agree(a: &SegmentAllocator, o: &Oracle) {
    if let Err(e) = a.check_invariants() {
        panic!("check_invariants: {e}");
    }
    let live: Vec<u32> = o.live.iter().copied().collect();
    assert_eq!(a.segments(), live, "live segments");
    let reserved: Vec<u32> = o.reserved.iter().copied().collect();
    assert_eq!(a.reserved_segments(), reserved, "reserved segments");
    assert_eq!(a.segment_count() as usize, o.live.len());
    assert_eq!(a.total_pages(), o.total());
    assert_eq!(a.free_pages(), o.free_ids().len() as u64, "free pages");
    assert_eq!(a.max_segments(), o.max_segments);
    let usage: Vec<(u32, u32)> = o
        .live
        .iter()
        .map(|&s| {
            let used = (s * o.pps..(s + 1) * o.pps)
                .filter(|p| o.rc.contains_key(p))
                .count() as u32;
            (s, used)
        })
        .collect();
    assert_eq!(a.segment_usage(), usage, "segment usage");
    for s in 0..o.high_water.saturating_add(2) {
        assert_eq!(a.is_live(s), o.live.contains(&s), "is_live({s})");
    }
    // The refcount of every page of every live segment, in one call.
    let all: Vec<i64> = o
        .live
        .iter()
        .flat_map(|&s| s * o.pps..(s + 1) * o.pps)
        .map(i64::from)
        .collect();
    let rcs = a.refcount(&all).expect("refcount of live pages");
    for (&id, &rc) in all.iter().zip(&rcs) {
        let want = o.rc.get(&(id as u32)).copied().unwrap_or(0);
        assert_eq!(rc, want, "refcount of page {id}");
    }
    // Pages of retired and reserved segments are refused.
    for &s in o.retired.iter().chain(&o.reserved) {
        let id = i64::from(s) * i64::from(o.pps);
        assert_eq!(
            a.refcount(&[id]),
            Err(CoreError::InvalidHandle {
                page_id: id,
                problem: HandleProblem::SegmentNotLive { segment: s },
            })
        );
    }
    let _ = a.metadata_bytes();
}

/// Huge page counts: none may allocate up front or panic.
const HUGE: [u64; 6] = [
    PAGE_ID_LIMIT,
    u32::MAX as u64,
    1 << 40,
    (usize::MAX / 4) as u64,
    (usize::MAX / 2) as u64,
    usize::MAX as u64,
];

fn step(a: &SegmentAllocator, o: &mut Oracle, act: &Action) {
    match act {
        Action::Alloc(n) => {
            let n = usize::from(n % 12);
            let r = a.alloc(n);
            if n <= o.free_ids().len() {
                let got = r.unwrap_or_else(|e| panic!("alloc({n}): {e}"));
                o.take(n, &got);
            } else {
                assert_eq!(r, Err(o.out_of_pages(n as u64)));
            }
        }
        Action::AllocInto { n, junk } => {
            let n = usize::from(n % 12);
            let junk: Vec<u32> = junk.iter().take(8).copied().collect();
            let mut out = junk.clone();
            let r = a.alloc_into(n, &mut out);
            assert_eq!(&out[..junk.len().min(out.len())], &junk[..], "junk kept");
            if n <= o.free_ids().len() {
                r.unwrap_or_else(|e| panic!("alloc_into({n}): {e}"));
                o.take(n, &out[junk.len()..]);
            } else {
                assert_eq!(r, Err(o.out_of_pages(n as u64)));
                assert_eq!(out, junk, "a failed alloc_into changed its buffer");
            }
        }
        Action::AllocOver { k, into } => {
            let n: u64 = if *k >= 200 {
                HUGE[usize::from(*k - 200) % HUGE.len()]
            } else {
                o.free_ids().len() as u64 + 1 + u64::from(k % 3)
            };
            let n_usize = usize::try_from(n).unwrap();
            let r = if *into {
                let mut out = vec![7u32];
                let r = a.alloc_into(n_usize, &mut out);
                assert_eq!(out, vec![7], "a failed alloc_into changed its buffer");
                r
            } else {
                a.alloc(n_usize).map(|_| ())
            };
            assert_eq!(r, Err(o.out_of_pages(n)));
        }
        Action::Retain(picks) => {
            let ids: Vec<i64> = picks.iter().map(|&p| o.resolve_id(p)).collect();
            let want = o.expect_retain(&ids);
            assert_eq!(a.retain(&ids), want, "retain({ids:?})");
            if want.is_ok() {
                o.retain(&ids);
            }
        }
        Action::Release(picks) => {
            let ids: Vec<i64> = picks.iter().map(|&p| o.resolve_id(p)).collect();
            let want = o.expect_release(&ids);
            assert_eq!(a.release(&ids), want, "release({ids:?})");
            if want.is_ok() {
                o.release(&ids);
            }
        }
        Action::ReleaseValid(picks) => {
            let ids: Vec<i64> = pick_within_counts(&o.referenced(), picks, &o.rc)
                .into_iter()
                .map(i64::from)
                .collect();
            assert_eq!(o.expect_release(&ids), Ok(()));
            assert_eq!(a.check_release(&ids), Ok(()));
            a.release(&ids)
                .unwrap_or_else(|e| panic!("release({ids:?}): {e}"));
            o.release(&ids);
        }
        Action::ReleaseAllOf { page, extra } => {
            let Some(p) = pick(&o.referenced(), *page) else {
                return;
            };
            let times = o.rc[&p] + u32::from(extra % 3);
            let ids = vec![i64::from(p); times as usize];
            let want = o.expect_release(&ids);
            assert_eq!(a.release(&ids), want, "release({ids:?})");
            if want.is_ok() {
                o.release(&ids);
            }
        }
        Action::CheckRelease(picks) => {
            let ids: Vec<i64> = picks.iter().map(|&p| o.resolve_id(p)).collect();
            assert_eq!(
                a.check_release(&ids),
                o.expect_release(&ids),
                "check_release({ids:?})"
            );
        }
        Action::Refcount(picks) => {
            let ids: Vec<i64> = picks.iter().map(|&p| o.resolve_id(p)).collect();
            assert_eq!(
                a.refcount(&ids),
                o.expect_refcount(&ids),
                "refcount({ids:?})"
            );
        }
        Action::AddSegment => {
            let want = o.expect_add();
            assert_eq!(a.add_segment(), want, "add_segment");
            if let Ok(s) = want {
                o.add(s);
            }
        }
        Action::RetireSegment(p) => {
            let seg = o.resolve_seg(*p);
            let want = o.expect_retire(seg);
            assert_eq!(a.retire_segment(seg), want, "retire_segment({seg})");
            if want.is_ok() {
                o.live.remove(&(seg as u32));
                o.retired.insert(seg as u32);
            }
        }
        Action::IsLive(s) => {
            assert_eq!(a.is_live(*s), o.live.contains(s), "is_live({s})");
        }
        Action::ReserveSegment => {
            let want = o.expect_add();
            assert_eq!(a.reserve_segment(), want, "reserve_segment");
            if let Ok(s) = want {
                o.reserve(s);
            }
        }
        Action::OpenSegment(p) | Action::CancelSegment(p) => {
            let seg = o.resolve_seg(*p);
            let want = o.expect_reserved(seg);
            let open = matches!(act, Action::OpenSegment(_));
            let got = if open {
                a.open_segment(seg)
            } else {
                a.cancel_segment(seg)
            };
            assert_eq!(got, want.clone().map(|_| ()), "{act:?}: segment {seg}");
            match want {
                Ok(s) if open => o.open(s),
                Ok(s) => o.cancel(s),
                Err(_) => {}
            }
        }
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
    run_config(&resolve(&input.config), &input.actions);
}

/// Run `actions` on a valid allocator that starts with no segment (the
/// proptest driver, which picks tiny configurations itself).
pub fn run_actions(page_size: u32, pages_per_segment: u32, max_segments: u32, actions: &[Action]) {
    let c = Config {
        page_size,
        pps: pages_per_segment,
        max_segments: Some(max_segments),
        initial_segments: 0,
    };
    assert!(expected_config(&c).is_ok(), "invalid configuration {c:?}");
    run_config(&c, actions);
}

fn run_config(c: &Config, actions: &[Action]) {
    let c = *c;
    let want = expected_config(&c);
    let a = build(&c);
    let a = match (a, want) {
        (Ok(a), Ok(max)) => {
            assert_eq!(a.max_segments(), max);
            assert_eq!(a.page_size(), c.page_size);
            assert_eq!(a.pages_per_segment(), c.pps);
            a
        }
        (Err(e), Err(w)) => {
            assert_eq!(e, w, "config {c:?}");
            return;
        }
        (got, want) => panic!("config {c:?}: got {:?}, want {want:?}", got.map(|_| ())),
    };
    let mut o = Oracle {
        pps: c.pps,
        max_segments: a.max_segments(),
        high_water: 0,
        live: BTreeSet::new(),
        retired: BTreeSet::new(),
        reserved: BTreeSet::new(),
        rc: BTreeMap::new(),
    };
    if c.pps > 4096 {
        // A big segment: exercise it once (one segment is 4 MiB of
        // refcounts at 2^20 pages; checking every page per action would
        // only slow the fuzzer down).
        for act in actions.iter().take(4) {
            if matches!(
                act,
                Action::AddSegment | Action::Alloc(_) | Action::Release(_)
            ) {
                step(&a, &mut o, act);
            }
        }
        agree(&a, &o);
        return;
    }
    for _ in 0..c.initial_segments {
        step(&a, &mut o, &Action::AddSegment);
    }
    agree(&a, &o);
    for act in actions {
        step(&a, &mut o, act);
        agree(&a, &o);
    }
    // Give everything back: the pool must end entirely free, and every live
    // segment must then retire.
    let mut all = Vec::new();
    for (&p, &rc) in &o.rc {
        all.extend(std::iter::repeat_n(i64::from(p), rc as usize));
    }
    all.reverse();
    a.release(&all).expect("final release");
    o.rc.clear();
    agree(&a, &o);
    assert_eq!(a.free_pages(), a.total_pages());
    for s in o.live.clone() {
        step(
            &a,
            &mut o,
            &Action::RetireSegment(SegPick::Raw(i64::from(s))),
        );
    }
    // And every reservation can be given back.
    for s in o.reserved.clone() {
        step(
            &a,
            &mut o,
            &Action::CancelSegment(SegPick::Raw(i64::from(s))),
        );
    }
    agree(&a, &o);
    assert_eq!(a.total_pages(), 0);
    assert!(a.reserved_segments().is_empty());
}

/// The decoded form of an input, for reading a crash artifact.
pub fn describe(data: &[u8]) -> String {
    match crate::decode::<Input>(data) {
        Some(input) => format!("{:?}\n{input:#?}", resolve(&input.config)),
        None => "(does not decode)".into(),
    }
}
