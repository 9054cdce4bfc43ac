//! Persistent helper threads for the decode kernel's items.
//!
//! Starting threads per call (`std::thread::scope`) costs tens of
//! microseconds, and on a busy machine, or next to an OpenMP pool still
//! spinning after torch's last matmul, a new thread may wait milliseconds
//! for a core while the caller waits to join it. Here helpers are started
//! once and parked; a call wakes them and starts on its work at once. A
//! helper that has not started when the caller has drained the work never
//! joins: the caller closes the task, waits only for helpers already inside
//! it, and returns. So a call never waits for a thread that is not running.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

/// Who is inside a task, and whether it still admits helpers.
struct State {
    closed: bool,
    active: usize,
    panicked: bool,
}

/// One call's work as the helpers see it.
struct Task {
    /// The caller's job, its lifetime erased (see `run`'s protocol).
    job: *const (dyn Fn() + Sync + 'static),
    state: Mutex<State>,
    idle: Condvar,
}

// SAFETY: `job` points to a `Sync` closure, so calling it from several
// threads at once is allowed; the pointer is only dereferenced by a helper
// between entering the task (under `state`, while it is open) and leaving
// it, and `run` does not return (nor unwind) before it has closed the task
// and seen every helper leave, so the closure outlives every use.
unsafe impl Send for Task {}
// SAFETY: as for `Send`: every field but `job` is `Sync`, and `job` is
// only read, under the protocol above.
unsafe impl Sync for Task {}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Task {
    /// Run the job if the task is still open (a helper's whole part).
    fn help(&self) {
        {
            let mut st = lock(&self.state);
            if st.closed {
                return;
            }
            st.active += 1;
        }
        // SAFETY: entered while open, so `run` is still waiting for this
        // helper to leave: the closure behind `job` is alive.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*self.job)() }));
        let mut st = lock(&self.state);
        st.active -= 1;
        st.panicked |= result.is_err();
        if st.active == 0 {
            self.idle.notify_all();
        }
    }

    /// Admit no more helpers and wait for those inside to leave.
    fn close(&self) -> bool {
        let mut st = lock(&self.state);
        st.closed = true;
        while st.active > 0 {
            st = self.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.panicked
    }
}

/// Closes the task however `run` leaves (its own job may unwind).
struct CloseOnDrop<'t>(&'t Task);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The parked helpers, one channel each.
fn helpers() -> &'static Mutex<Vec<Sender<Arc<Task>>>> {
    static HELPERS: OnceLock<Mutex<Vec<Sender<Arc<Task>>>>> = OnceLock::new();
    HELPERS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Run `job` on this thread and on up to `extra` helpers at once; `job`
/// must itself share out the work (each call takes items from a queue until
/// it is empty) and may run on any subset of them, this thread included.
/// Returns when this thread's call has returned and no helper is inside
/// `job`. A panic in a helper's call is raised again here.
pub(crate) fn run(extra: usize, job: &(dyn Fn() + Sync)) {
    if extra == 0 {
        job();
        return;
    }
    let erased: *const (dyn Fn() + Sync + '_) = job;
    // SAFETY: only the lifetime changes (same fat pointer); see `Task`.
    let erased: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(erased) };
    let task = Arc::new(Task {
        job: erased,
        state: Mutex::new(State {
            closed: false,
            active: 0,
            panicked: false,
        }),
        idle: Condvar::new(),
    });
    // Never wait for the helper list: in a child forked while another parent
    // thread held its lock the lock stays held forever (and the helpers do
    // not exist there), and a concurrent caller holds it only to hand out
    // work. Either way this call runs on this thread alone, which gives the
    // same result (the work is shared out through `job`'s own queue).
    let mut hs = match helpers().try_lock() {
        Ok(hs) => hs,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            job();
            return;
        }
    };
    {
        while hs.len() < extra {
            let (tx, rx) = channel::<Arc<Task>>();
            let spawned = std::thread::Builder::new()
                .name("radixseg-cpu".into())
                .spawn(move || {
                    for task in rx {
                        task.help();
                    }
                });
            if spawned.is_err() {
                break; // fewer helpers; this thread does the rest
            }
            hs.push(tx);
        }
        // A helper whose thread has gone (it cannot, short of a panic
        // outside `help`) just drops its message.
        for tx in hs.iter().take(extra) {
            let _ = tx.send(Arc::clone(&task));
        }
    }
    drop(hs);
    let guard = CloseOnDrop(&task);
    job();
    std::mem::forget(guard);
    if task.close() {
        resume_unwind(Box::new("a radixseg-cpu helper thread panicked"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The pool is process-wide: these tests take turns (one holds its lock).
    fn serial() -> MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn every_item_runs_once_with_any_helper_count() {
        let _serial = serial();
        for extra in [0, 1, 3, 8] {
            let next = AtomicUsize::new(0);
            let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
            run(extra, &|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(h) = hits.get(i) else { break };
                h.fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn a_held_helper_list_runs_the_call_on_this_thread() {
        let _serial = serial();
        // As in a child forked while a parent thread held the list's lock.
        let held = helpers().lock().unwrap_or_else(|p| p.into_inner());
        let caller = std::thread::current().id();
        let others = AtomicUsize::new(0);
        let n = AtomicUsize::new(0);
        run(3, &|| {
            if std::thread::current().id() != caller {
                others.fetch_add(1, Ordering::Relaxed);
            }
            n.fetch_add(1, Ordering::Relaxed);
        });
        drop(held);
        assert_eq!(
            (n.load(Ordering::Relaxed), others.load(Ordering::Relaxed)),
            (1, 0)
        );
    }

    #[test]
    fn a_helpers_panic_reaches_the_caller_and_the_pool_survives() {
        let _serial = serial();
        let caller = std::thread::current().id();
        let entered = std::sync::atomic::AtomicBool::new(false);
        let got = catch_unwind(AssertUnwindSafe(|| {
            run(2, &|| {
                if std::thread::current().id() != caller {
                    entered.store(true, Ordering::SeqCst);
                    panic!("planted");
                }
                // Keep the task open until a helper has entered (10 s at most).
                for _ in 0..10_000 {
                    if entered.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        }));
        assert!(entered.load(Ordering::SeqCst));
        assert!(got.is_err());
        let n = AtomicUsize::new(0);
        run(2, &|| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert!((1..=3).contains(&n.load(Ordering::Relaxed)));
    }
}
