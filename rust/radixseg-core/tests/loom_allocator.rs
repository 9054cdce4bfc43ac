#![cfg(loom)]
//! Loom models of the allocator's lock-free paths: `alloc`, `retain` and
//! `release` against each other and against `add_segment` (whole, and its
//! phases `reserve_segment` / `open_segment` / `cancel_segment`) /
//! `retire_segment`.
//! Configurations are tiny (one or two segments of two to four pages, two or
//! three threads) so that loom can explore every interleaving and every
//! permitted reordering within the preemption bound. Run them with
//! `scripts/loom.sh`; `LOOM_MAX_PREEMPTIONS` (default 2 here) bounds the
//! search, `LOOM_LOG=1 LOOM_LOCATION=1` explains a failure.
//!
//! Each model checks what the allocator guarantees *during* the race (ids
//! disjoint, calls that must succeed do) and, after joining, that the
//! structure is exactly accounted for (`check_invariants()`, free + used ==
//! total, every free page allocatable again).
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use radixseg_core::{CoreError, HandleProblem, SegmentAllocator};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Run `f` under loom and print how many executions were explored.
/// `LOOM_MAX_PREEMPTIONS` is read by loom; when it is unset we bound the
/// search at 2 rather than exploring without a bound.
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    // Counts executions; lives outside the model, so a std atomic is right.
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    builder.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    println!(
        "loom model {name}: {} executions (preemption bound {:?})",
        runs.load(Ordering::Relaxed),
        builder.preemption_bound
    );
}

fn ids(v: &[u32]) -> Vec<i64> {
    v.iter().map(|&x| i64::from(x)).collect()
}

/// An allocator with `segments` segments of `pps` pages, page size 1.
fn allocator(pps: u32, segments: u32) -> Arc<SegmentAllocator> {
    let a = SegmentAllocator::new(1, pps).unwrap();
    for s in 0..segments {
        assert_eq!(a.add_segment().unwrap(), s);
    }
    Arc::new(a)
}

/// Invariant 4 at a quiescent point, plus the structural checker.
fn quiescent(a: &SegmentAllocator, referenced: u64) {
    a.check_invariants().unwrap();
    assert_eq!(a.free_pages() + referenced, a.total_pages());
}

/// Every free page can be allocated, then everything is given back.
fn drain_and_restore(a: &SegmentAllocator) {
    let free = a.free_pages() as usize;
    if free > 0 {
        let got = a.alloc(free).unwrap();
        assert_eq!(got.iter().collect::<BTreeSet<_>>().len(), free);
        assert_eq!(a.free_pages(), 0);
        a.check_invariants().unwrap();
        a.release(&ids(&got)).unwrap();
    }
    assert_eq!(a.free_pages() as usize, free);
    a.check_invariants().unwrap();
}

fn is_out_of_pages(r: &Result<Vec<u32>, CoreError>, n: u64) -> bool {
    matches!(r, Err(CoreError::OutOfPages { requested, .. }) if *requested == n)
}

// ----- (a) alloc against alloc -------------------------------------------------

/// Two allocations that both fit: both succeed with disjoint ids; the
/// concurrent releases afterwards return every page exactly once.
#[test]
fn alloc_alloc_then_release() {
    model("alloc_alloc_then_release", || {
        let a = allocator(4, 1);
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.alloc(1).unwrap());
        let t2 = thread::spawn(move || a2.alloc(2).unwrap());
        let x = t1.join().unwrap();
        let y = t2.join().unwrap();
        let all: BTreeSet<u32> = x.iter().chain(&y).copied().collect();
        assert_eq!(all.len(), 3, "page handed out twice: {x:?} {y:?}");
        assert!(all.iter().all(|&p| p < 4));
        assert_eq!(a.refcount(&ids(&x)).unwrap(), vec![1]);
        assert_eq!(a.refcount(&ids(&y)).unwrap(), vec![1, 1]);
        quiescent(&a, 3);

        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.release(&ids(&x)).unwrap());
        let t2 = thread::spawn(move || a2.release(&ids(&y)).unwrap());
        t1.join().unwrap();
        t2.join().unwrap();
        quiescent(&a, 0);
        assert_eq!(a.alloc(4).unwrap().len(), 4);
        quiescent(&a, 4);
    });
}

/// Two allocations that cannot both fit in one two-page segment: at least one
/// succeeds, a failure is `OutOfPages` and leaves nothing reserved, the ids of
/// the winners are disjoint.
#[test]
fn alloc_alloc_contended() {
    model("alloc_alloc_contended", || {
        let a = allocator(2, 1);
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.alloc(1));
        let t2 = thread::spawn(move || a2.alloc(2));
        let r1 = t1.join().unwrap();
        let r2 = t2.join().unwrap();
        assert!(r1.is_ok() || is_out_of_pages(&r1, 1), "{r1:?}");
        assert!(r2.is_ok() || is_out_of_pages(&r2, 2), "{r2:?}");
        assert!(r1.is_ok() || r2.is_ok(), "both failed: {r1:?} {r2:?}");
        let held: Vec<u32> = [&r1, &r2]
            .into_iter()
            .flat_map(|r| r.clone().unwrap_or_default())
            .collect();
        assert_eq!(held.iter().collect::<BTreeSet<_>>().len(), held.len());
        quiescent(&a, held.len() as u64);
        a.release(&ids(&held)).unwrap();
        quiescent(&a, 0);
        drain_and_restore(&a);
    });
}

/// Two allocations of two pages over two two-page segments: both always
/// succeed (four free pages, four asked), and together take every page.
#[test]
fn alloc_alloc_across_segments() {
    model("alloc_alloc_across_segments", || {
        let a = allocator(2, 2);
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.alloc(2).unwrap());
        let t2 = thread::spawn(move || a2.alloc(2).unwrap());
        let x = t1.join().unwrap();
        let y = t2.join().unwrap();
        let all: BTreeSet<u32> = x.iter().chain(&y).copied().collect();
        assert_eq!(all, (0..4).collect(), "{x:?} {y:?}");
        quiescent(&a, 4);
        a.release(&ids(&x)).unwrap();
        a.release(&ids(&y)).unwrap();
        quiescent(&a, 0);
    });
}

/// Three single-page allocations over two pages: exactly two succeed. A
/// failure means both pages were reserved by the others at that moment, and
/// an alloc(1) holding a reservation cannot fail.
#[test]
fn three_allocs_two_pages() {
    model("three_allocs_two_pages", || {
        let a = allocator(2, 1);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let a = a.clone();
                thread::spawn(move || a.alloc(1))
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let held: Vec<u32> = results.iter().flatten().flatten().copied().collect();
        assert_eq!(held.len(), 2, "{results:?}");
        assert_ne!(held[0], held[1]);
        assert!(results.iter().all(|r| r.is_ok() || is_out_of_pages(r, 1)));
        quiescent(&a, 2);
        a.release(&ids(&held)).unwrap();
        quiescent(&a, 0);
    });
}

// ----- (b) release against release and retain --------------------------------

/// One page, two holders. Holder 1 clones its reference (retain) and drops
/// both; holder 2 drops its own. Every call succeeds, the count never hits 0
/// while a holder still holds, and the page is freed exactly once.
#[test]
fn release_release_retain_same_page() {
    model("release_release_retain_same_page", || {
        let a = allocator(2, 1);
        let p = ids(&a.alloc(1).unwrap());
        a.retain(&p).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let (p1, p2) = (p.clone(), p.clone());
        let t1 = thread::spawn(move || {
            a1.retain(&p1).unwrap();
            assert!(a1.refcount(&p1).unwrap()[0] >= 2);
            a1.release(&p1).unwrap();
            assert!(a1.refcount(&p1).unwrap()[0] >= 1);
            a1.release(&p1).unwrap();
        });
        let t2 = thread::spawn(move || a2.release(&p2).unwrap());
        t1.join().unwrap();
        t2.join().unwrap();
        assert_eq!(a.refcount(&p).unwrap(), vec![0]);
        quiescent(&a, 0);
        drain_and_restore(&a);
    });
}

/// Two pages each held twice; two holders release both in one batch each.
/// Both calls succeed and both pages are freed exactly once, whichever
/// holder's decrement reaches zero.
#[test]
fn batch_releases_of_shared_pages() {
    model("batch_releases_of_shared_pages", || {
        let a = allocator(2, 1);
        let p = ids(&a.alloc(2).unwrap());
        a.retain(&p).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let (p1, p2) = (p.clone(), vec![p[1], p[0]]);
        let t1 = thread::spawn(move || a1.release(&p1).unwrap());
        let t2 = thread::spawn(move || a2.release(&p2).unwrap());
        t1.join().unwrap();
        t2.join().unwrap();
        assert_eq!(a.refcount(&p).unwrap(), vec![0, 0]);
        quiescent(&a, 0);
        drain_and_restore(&a);
    });
}

/// Three holders of one page (refcount 3) drop their references at once, one
/// of them after cloning it. The page is freed exactly once, by whichever
/// release is last.
#[test]
fn three_holders_release_one_page() {
    model("three_holders_release_one_page", || {
        let a = allocator(2, 1);
        let p = ids(&a.alloc(1).unwrap());
        a.retain(&p).unwrap();
        a.retain(&p).unwrap();
        let mut handles = Vec::new();
        for clone_first in [true, false, false] {
            let (a, p) = (a.clone(), p.clone());
            handles.push(thread::spawn(move || {
                if clone_first {
                    a.retain(&p).unwrap();
                    a.release(&p).unwrap();
                }
                a.release(&p).unwrap();
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(a.refcount(&p).unwrap(), vec![0]);
        quiescent(&a, 0);
        drain_and_restore(&a);
    });
}

/// A release batch that must fail (it lists page q twice but holds it once)
/// races another holder's legitimate release of page p, which both hold.
/// Invariant 5: the failed call changes nothing, so afterwards its caller
/// still holds p and q (refcount 1 each, neither allocatable).
///
/// Found a bug (fixed): the failed batch decremented p 2 -> 1, the other holder
/// took p 1 -> 0 and freed it, then the undo re-incremented p 0 -> 1 on a page
/// whose free bit was already set; the next alloc handed p out a second time.
/// Release now checks multiplicities before writing.
#[test]
fn failed_batch_release_races_release() {
    model("failed_batch_release_races_release", || {
        let a = allocator(2, 1);
        let p = ids(&a.alloc(1).unwrap());
        let q = ids(&a.alloc(1).unwrap());
        a.retain(&p).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let bad = vec![p[0], q[0], q[0]];
        let p2 = p.clone();
        let t1 = thread::spawn(move || a1.release(&bad));
        let t2 = thread::spawn(move || a2.release(&p2).unwrap());
        let r = t1.join().unwrap();
        t2.join().unwrap();
        assert!(matches!(r, Err(CoreError::DoubleFree { .. })), "{r:?}");
        // The failed caller still holds one reference to p and to q.
        assert_eq!(a.refcount(&p).unwrap(), vec![1]);
        assert_eq!(a.refcount(&q).unwrap(), vec![1]);
        quiescent(&a, 2);
        assert!(is_out_of_pages(&a.alloc(1), 1));
    });
}

// ----- (c) alloc against add_segment --------------------------------------------

/// Segment 0 is full; one thread allocates while another adds segment 1. The
/// allocation either fails with `OutOfPages` or gets a page of segment 1;
/// afterwards the accounting is exact and the new pages are allocatable.
#[test]
fn alloc_races_add_segment() {
    model("alloc_races_add_segment", || alloc_races_growth(false));
}

/// As above with the two phases of `add_segment` apart: segment 1 is
/// reserved before the race and the other thread opens it.
#[test]
fn alloc_races_open_segment() {
    model("alloc_races_open_segment", || alloc_races_growth(true));
}

fn alloc_races_growth(two_phases: bool) {
    let a = allocator(2, 1);
    let full = a.alloc(2).unwrap();
    if two_phases {
        assert_eq!(a.reserve_segment().unwrap(), 1);
    }
    let (a1, a2) = (a.clone(), a.clone());
    let t1 = thread::spawn(move || {
        if two_phases {
            a1.open_segment(1).unwrap();
        } else {
            assert_eq!(a1.add_segment().unwrap(), 1);
        }
    });
    let t2 = thread::spawn(move || a2.alloc(1));
    t1.join().unwrap();
    let r = t2.join().unwrap();
    let got = match r {
        Ok(v) => {
            assert_eq!(v.len(), 1);
            assert!((2..4).contains(&v[0]), "{v:?}");
            v
        }
        Err(ref e) => {
            assert!(is_out_of_pages(&r, 1), "{e:?}");
            Vec::new()
        }
    };
    assert_eq!(a.segments(), vec![0, 1]);
    assert_eq!(a.reserved_segments(), Vec::<u32>::new());
    assert_eq!(a.total_pages(), 4);
    quiescent(&a, 2 + got.len() as u64);
    a.release(&ids(&got)).unwrap();
    a.release(&ids(&full)).unwrap();
    quiescent(&a, 0);
    drain_and_restore(&a);
}

/// As above, but `add_segment` reopens a retired slot (its `free` goes
/// `CLOSED` -> `pages_per_segment` again) while an allocator that may have
/// read the slot before it was retired scans it.
#[test]
fn alloc_races_reopening_retired_segment() {
    model("alloc_races_reopening_retired_segment", || {
        let a = allocator(2, 2);
        let full = a.alloc(2).unwrap();
        a.retire_segment(1).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.add_segment().unwrap());
        let t2 = thread::spawn(move || a2.alloc(1));
        assert_eq!(t1.join().unwrap(), 1);
        let r = t2.join().unwrap();
        let got = r.clone().unwrap_or_default();
        assert!(r.is_ok() || is_out_of_pages(&r, 1), "{r:?}");
        assert!(got.iter().all(|p| (2..4).contains(p)), "{got:?}");
        quiescent(&a, 2 + got.len() as u64);
        a.release(&ids(&got)).unwrap();
        a.release(&ids(&full)).unwrap();
        quiescent(&a, 0);
        drain_and_restore(&a);
    });
}

/// Segment 0 has one free page; an alloc(2) that needs it and a page of the
/// segment being added races `add_segment`. All or nothing: either two
/// distinct pages (one of each segment) or `OutOfPages` with no page kept.
#[test]
fn alloc_spanning_new_segment() {
    model("alloc_spanning_new_segment", || {
        let a = allocator(2, 1);
        let held = a.alloc(1).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.add_segment().unwrap());
        let t2 = thread::spawn(move || a2.alloc(2));
        t1.join().unwrap();
        let r = t2.join().unwrap();
        let got = match r {
            Ok(v) => {
                let segs: BTreeSet<u32> = v.iter().map(|p| p / 2).collect();
                assert_eq!(segs, [0, 1].into_iter().collect(), "{v:?}");
                assert!(!v.contains(&held[0]));
                v
            }
            Err(ref e) => {
                assert!(is_out_of_pages(&r, 2), "{e:?}");
                Vec::new()
            }
        };
        quiescent(&a, 1 + got.len() as u64);
        a.release(&ids(&got)).unwrap();
        quiescent(&a, 1);
        drain_and_restore(&a);
    });
}

/// A page id returned by `alloc` is a valid handle at once: the allocating
/// thread can read and release it even while the `add_segment` that created
/// its segment has not returned yet.
///
/// Found a bug (fixed): `add_segment` set the segment's summary bit before it
/// raised `high_water`, so `alloc` could hand out an id of the new segment that
/// a release (bounded by `high_water`) still rejected as out of range.
#[test]
fn alloc_id_valid_while_add_segment_in_flight() {
    model("alloc_id_valid_while_add_segment_in_flight", || {
        let a = allocator(2, 1);
        let _full = a.alloc(2).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.add_segment().unwrap());
        let t2 = thread::spawn(move || {
            if let Ok(v) = a2.alloc(1) {
                let p = ids(&v);
                assert_eq!(a2.refcount(&p), Ok(vec![1]), "fresh id {p:?} rejected");
                a2.release(&p).unwrap();
            }
        });
        t1.join().unwrap();
        t2.join().unwrap();
        quiescent(&a, 2);
    });
}

/// A reservation of a new slot (which raises the high water) and its
/// cancellation race an allocation that finds segment 0 full: the reserved
/// segment never gives a page, and a handle into it is refused.
#[test]
fn alloc_never_takes_from_a_reserved_segment() {
    model("alloc_never_takes_from_a_reserved_segment", || {
        let a = allocator(2, 1);
        let full = a.alloc(2).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || {
            let s = a1.reserve_segment().unwrap();
            a1.cancel_segment(i64::from(s)).unwrap();
            s
        });
        let t2 = thread::spawn(move || {
            let r = a2.alloc(1);
            assert!(is_out_of_pages(&r, 1), "{r:?}");
            assert!(a2.retain(&[2]).is_err());
        });
        assert_eq!(t1.join().unwrap(), 1);
        t2.join().unwrap();
        quiescent(&a, 2);
        assert_eq!(a.add_segment().unwrap(), 1);
        a.release(&ids(&full)).unwrap();
        quiescent(&a, 0);
        drain_and_restore(&a);
    });
}

// ----- (d) alloc against retire_segment ------------------------------------------

/// Segment 0 is full, segment 1 empty; one thread retires segment 1 while
/// another allocates one page. Guarantee: exactly one wins. If the alloc got
/// a page of segment 1 first, the retire fails with `SegmentBusy`; if the
/// retire closed the segment first, no alloc can take a page from it.
#[test]
fn alloc_races_retire_segment() {
    model("alloc_races_retire_segment", || {
        let a = allocator(2, 2);
        let _full = a.alloc(2).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.retire_segment(1));
        let t2 = thread::spawn(move || a2.alloc(1));
        let retired = t1.join().unwrap();
        let r = t2.join().unwrap();
        match (&retired, &r) {
            (Ok(()), Err(_)) => {
                assert!(is_out_of_pages(&r, 1), "{r:?}");
                assert_eq!(a.segments(), vec![0]);
                assert!(matches!(
                    a.refcount(&[2]),
                    Err(CoreError::InvalidHandle {
                        problem: HandleProblem::SegmentNotLive { segment: 1 },
                        ..
                    })
                ));
                quiescent(&a, 2);
                assert!(is_out_of_pages(&a.alloc(1), 1));
            }
            (Err(e), Ok(v)) => {
                assert_eq!(
                    *e,
                    CoreError::SegmentBusy {
                        segment: 1,
                        used_pages: 1
                    }
                );
                assert!((2..4).contains(&v[0]), "{v:?}");
                assert_eq!(a.segments(), vec![0, 1]);
                quiescent(&a, 3);
                a.release(&ids(v)).unwrap();
                a.retire_segment(1).unwrap();
                quiescent(&a, 2);
            }
            _ => panic!("exactly one must win: retire {retired:?}, alloc {r:?}"),
        }
    });
}

/// As above, but the allocating thread releases its page at once. While it
/// holds the page the segment stays live and the id valid; the retire fails
/// only with `SegmentBusy`, and once both are done the segment can be retired.
#[test]
fn alloc_release_races_retire_segment() {
    model("alloc_release_races_retire_segment", || {
        let a = allocator(2, 2);
        let _full = a.alloc(2).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.retire_segment(1));
        let t2 = thread::spawn(move || {
            if let Ok(v) = a2.alloc(1) {
                assert!((2..4).contains(&v[0]), "{v:?}");
                assert!(a2.is_live(1));
                assert_eq!(a2.refcount(&ids(&v)).unwrap(), vec![1]);
                a2.release(&ids(&v)).unwrap();
            }
        });
        let retired = t1.join().unwrap();
        t2.join().unwrap();
        match retired {
            Ok(()) => {}
            Err(CoreError::SegmentBusy { segment: 1, .. }) => a.retire_segment(1).unwrap(),
            Err(e) => panic!("{e:?}"),
        }
        assert_eq!(a.segments(), vec![0]);
        quiescent(&a, 2);
    });
}

/// The last referenced page of segment 1 is released while segment 1 is
/// retired. The retire fails (`SegmentBusy`) unless the release finished
/// first (invariant 6); either way a retire after both succeeds.
#[test]
fn release_races_retire_segment() {
    model("release_races_retire_segment", || {
        let a = allocator(2, 2);
        let all = a.alloc(3).unwrap();
        assert_eq!(all, vec![0, 1, 2]);
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.release(&[2]).unwrap());
        let t2 = thread::spawn(move || a2.retire_segment(1));
        t1.join().unwrap();
        match t2.join().unwrap() {
            Ok(()) => {}
            Err(CoreError::SegmentBusy {
                segment: 1,
                used_pages: 1,
            }) => a.retire_segment(1).unwrap(),
            Err(e) => panic!("{e:?}"),
        }
        assert_eq!(a.segments(), vec![0]);
        quiescent(&a, 2);
    });
}

// ----- (e) the summary-word protocol --------------------------------------------

/// A release that takes a full segment non-full races an alloc that scans it.
/// Whatever the alloc saw, the freed page is allocatable afterwards: the
/// segment's summary bit cannot be left clear while it has a free page.
#[test]
fn release_into_full_segment_races_alloc() {
    model("release_into_full_segment_races_alloc", || {
        let a = allocator(2, 1);
        let both = a.alloc(2).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let p0 = vec![i64::from(both[0])];
        let t1 = thread::spawn(move || a1.release(&p0).unwrap());
        let t2 = thread::spawn(move || a2.alloc(1));
        t1.join().unwrap();
        match t2.join().unwrap() {
            Ok(v) => {
                assert_eq!(v, vec![both[0]]);
                quiescent(&a, 2);
                a.release(&ids(&v)).unwrap();
            }
            Err(e) => assert!(matches!(e, CoreError::OutOfPages { requested: 1, .. })),
        }
        quiescent(&a, 1);
        assert_eq!(a.alloc(1).unwrap(), vec![both[0]]);
        quiescent(&a, 2);
    });
}

/// An alloc takes a segment's last free page (and so clears its summary bit)
/// while a release frees another page of it (and so sets the bit). The bit
/// must end set: the freed page is allocatable.
#[test]
fn last_page_taken_while_another_is_freed() {
    model("last_page_taken_while_another_is_freed", || {
        let a = allocator(2, 1);
        let p0 = ids(&a.alloc(1).unwrap());
        let (a1, a2) = (a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.release(&p0).unwrap());
        let t2 = thread::spawn(move || a2.alloc(1).unwrap());
        t1.join().unwrap();
        let got = t2.join().unwrap();
        quiescent(&a, 1);
        let other = a.alloc(1).unwrap();
        assert_ne!(got, other);
        quiescent(&a, 2);
    });
}

/// Two full segments; pages of both are released while an alloc(2) scans.
/// Whatever the alloc got, the pages left free are all allocatable after.
#[test]
fn releases_in_two_segments_race_alloc() {
    model("releases_in_two_segments_race_alloc", || {
        let a = allocator(2, 2);
        let all = a.alloc(4).unwrap();
        let (a1, a2) = (a.clone(), a.clone());
        let freed = vec![i64::from(all[1]), i64::from(all[3])];
        let t1 = thread::spawn(move || a1.release(&freed).unwrap());
        let t2 = thread::spawn(move || a2.alloc(2));
        t1.join().unwrap();
        let got = t2.join().unwrap().unwrap_or_default();
        assert!(got.iter().all(|p| [all[1], all[3]].contains(p)), "{got:?}");
        quiescent(&a, 2 + got.len() as u64);
        drain_and_restore(&a);
    });
}

/// One page is freed while two allocators each ask for one; one other page
/// is free from the start. At least one alloc succeeds, the two never share
/// a page, and whatever is left free is allocatable afterwards.
#[test]
fn two_allocs_race_release() {
    model("two_allocs_race_release", || {
        let a = allocator(2, 1);
        let p0 = ids(&a.alloc(1).unwrap());
        let (a1, a2, a3) = (a.clone(), a.clone(), a.clone());
        let t1 = thread::spawn(move || a1.release(&p0).unwrap());
        let t2 = thread::spawn(move || a2.alloc(1));
        let t3 = thread::spawn(move || a3.alloc(1));
        t1.join().unwrap();
        let r2 = t2.join().unwrap();
        let r3 = t3.join().unwrap();
        assert!(r2.is_ok() || r3.is_ok(), "{r2:?} {r3:?}");
        let held: Vec<u32> = [r2, r3].into_iter().flatten().flatten().collect();
        assert_eq!(held.iter().collect::<BTreeSet<_>>().len(), held.len());
        quiescent(&a, held.len() as u64);
        drain_and_restore(&a);
        a.release(&ids(&held)).unwrap();
        quiescent(&a, 0);
    });
}
