#![cfg(not(loom))]
//! Model-based test of `SegmentAllocator`: proptest generates weighted
//! sequences of the allocator model's `Action` (the oracle the fuzz target
//! `allocator` uses too, `rust/radixseg-model/src/allocator.rs`), which
//! applies each to the allocator and to a naive refcount map and after every
//! step compares everything observable. So:
//!
//! * every result agrees with the oracle's (the same `Ok`, or the same
//!   `CoreError` with the same culprit and numbers; an alloc returns distinct
//!   ids the oracle has free, lowest first);
//! * `check_invariants()` passes;
//! * invariant 4: `free_pages() + referenced == total_pages()`;
//! * invariant 5: a failed call changes no refcount, free count or segment;
//! * invariant 2: adding or retiring a segment changes no live page's refcount;
//! * invariant 6: a retire succeeds iff the segment had no referenced page;
//! * a reserved segment is closed (no page of it free, allocatable or
//!   accepted as a handle) until opened, its id taken until opened or
//!   cancelled, and open / cancel succeed once, for reserved ids only.
//!
//! Pages per segment are tiny (1..=8) and the segment cap low, so segments
//! fill, empty, retire and get reused within one sequence. `PROPTEST_CASES`
//! raises the case count (default 256) for longer runs.

use proptest::prelude::*;
use radixseg_model::allocator::{run_actions, Action, IdPick, SegPick};

/// A referenced page, the k-th of those referenced when the action runs.
fn referenced() -> impl Strategy<Value = IdPick> {
    any::<u16>().prop_map(IdPick::Referenced)
}

/// An id that is not a referenced page: negative, past every slot ever
/// created, a page of a retired segment, a free page of a live segment.
fn bad() -> impl Strategy<Value = IdPick> {
    prop_oneof![
        Just(IdPick::Raw(-1)),
        Just(IdPick::NearEnd(3)),
        any::<u16>().prop_map(IdPick::Retired),
        any::<u16>().prop_map(IdPick::Reserved),
        any::<u16>().prop_map(IdPick::Free),
    ]
}

/// A batch of referenced pages with one bad id inserted at `at`.
fn with_bad(max: usize) -> impl Strategy<Value = Vec<IdPick>> {
    (
        prop::collection::vec(referenced(), 0..=max),
        bad(),
        any::<u16>(),
    )
        .prop_map(|(mut ids, b, at)| {
            ids.insert(usize::from(at) % (ids.len() + 1), b);
            ids
        })
}

fn any_id() -> impl Strategy<Value = IdPick> {
    prop_oneof![3 => referenced(), 2 => bad(), 1 => any::<i8>().prop_map(IdPick::NearEnd)]
}

/// Segment ids from -1 to just past the high water: never-created, retired,
/// busy and empty ones.
fn segment() -> impl Strategy<Value = SegPick> {
    prop_oneof![
        3 => any::<u8>().prop_map(SegPick::Live),
        1 => any::<u8>().prop_map(SegPick::Retired),
        1 => any::<u8>().prop_map(SegPick::Reserved),
        1 => (-1i8..=1).prop_map(SegPick::Near),
        1 => Just(SegPick::Raw(-1)),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => (1u8..=6).prop_map(Action::Alloc),
        1 => ((0u8..=6), prop::collection::vec(any::<u32>(), 0..3))
            .prop_map(|(n, junk)| Action::AllocInto { n, junk }),
        3 => prop::collection::vec(referenced(), 1..=3).prop_map(Action::Retain),
        // Referenced pages, each at most as often as it is referenced.
        8 => prop::collection::vec(any::<u16>(), 1..=4).prop_map(Action::ReleaseValid),
        2 => with_bad(3).prop_map(Action::Release),
        1 => with_bad(3).prop_map(Action::Retain),
        // One page listed once or twice more than it is referenced.
        2 => (any::<u16>(), 1u8..=2).prop_map(|(page, extra)| Action::ReleaseAllOf { page, extra }),
        1 => prop::collection::vec(any_id(), 1..=4).prop_map(Action::Refcount),
        1 => prop::collection::vec(any_id(), 1..=4).prop_map(Action::CheckRelease),
        3 => Just(Action::AddSegment),
        3 => segment().prop_map(Action::RetireSegment),
        // The two phases of add_segment, and giving a reservation back.
        2 => Just(Action::ReserveSegment),
        2 => prop_oneof![3 => any::<u8>().prop_map(SegPick::Reserved), 1 => segment()]
            .prop_map(Action::OpenSegment),
        1 => segment().prop_map(Action::CancelSegment),
        1 => (0u8..3).prop_map(|k| Action::AllocOver { k, into: false }),
        1 => (0u32..8).prop_map(Action::IsLive),
    ]
}

fn config() -> impl Strategy<Value = (u32, u32, u32)> {
    (0u32..=10, 1u32..=8, 1u32..=4).prop_map(|(ps, pps, segs)| (1 << ps, pps, segs))
}

proptest! {
    // `ProptestConfig::default()` reads `PROPTEST_CASES` (default 256).
    #![proptest_config(ProptestConfig::default())]

    /// The model gives everything back at the end: the pool must end
    /// entirely free and every segment must then retire.
    #[test]
    fn allocator_matches_model(
        (page_size, pps, max_segments) in config(),
        actions in prop::collection::vec(action(), 1..60),
    ) {
        run_actions(page_size, pps, max_segments, &actions);
    }
}

/// The bad-id shapes and the double release, deterministically, so a
/// regression names itself without shrinking.
#[test]
fn failed_calls_change_nothing() {
    use IdPick::{Free, NearEnd, Raw, Referenced, Retired};
    let script = [
        Action::AddSegment,
        Action::AddSegment,
        Action::Alloc(5),
        Action::Retain(vec![Referenced(0), Referenced(0)]),
        Action::ReleaseAllOf { page: 0, extra: 1 },
        Action::Release(vec![Referenced(1), Referenced(3), Free(7)]),
        Action::Release(vec![Raw(-1), Referenced(1)]),
        Action::Retain(vec![Referenced(2), NearEnd(3)]),
        Action::AllocOver { k: 1, into: false },
        Action::RetireSegment(SegPick::Raw(1)),
        Action::ReleaseValid(vec![4]),
        Action::RetireSegment(SegPick::Raw(1)),
        Action::Release(vec![Referenced(1), Retired(0)]),
        Action::AddSegment,
    ];
    run_actions(16, 4, 4, &script);
}

/// The reserved state, deterministically: a reservation is closed, keeps its
/// id from `add_segment` and from the cap, opens or cancels once, and a
/// cancelled id is reused first.
#[test]
fn reserve_open_cancel() {
    use IdPick::{Free, Referenced, Reserved};
    let script = [
        Action::ReserveSegment,
        Action::Alloc(1),
        Action::Refcount(vec![Reserved(2)]),
        Action::Retain(vec![Reserved(0)]),
        Action::RetireSegment(SegPick::Reserved(0)),
        Action::AddSegment,
        Action::ReserveSegment,
        Action::ReserveSegment,
        Action::OpenSegment(SegPick::Live(0)),
        Action::OpenSegment(SegPick::Reserved(0)),
        Action::OpenSegment(SegPick::Raw(0)),
        Action::Alloc(6),
        Action::Release(vec![Referenced(0), Free(0)]),
        Action::CancelSegment(SegPick::Reserved(0)),
        Action::CancelSegment(SegPick::Raw(2)),
        Action::ReserveSegment,
        Action::CancelSegment(SegPick::Near(-1)),
        Action::AddSegment,
        Action::CancelSegment(SegPick::Raw(-1)),
    ];
    run_actions(1, 4, 3, &script);
}
