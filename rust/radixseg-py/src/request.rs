//! `RequestRecord`: one request's state held on the Rust side, so that each
//! of its state changes (begin, extend, end) is one call that a Python
//! exception cannot split. See `radixseg_core::request`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc as StdArc, Mutex, MutexGuard, PoisonError, Weak};

use numpy::PyArray1;
use pyo3::prelude::*;
use radixseg_core::{Arc, CoreError, Request, RequestState};

use super::{
    check_born, extend_evicting, fork_generation, maybe_detach, short_as_value, slots_or_short,
    CoreResultExt, Ids, RadixTree, Slice,
};

/// The running requests of one tree (weakly held, for the invariant check
/// and the running count) and the hit-rate counters of every request begun.
#[derive(Default)]
pub(crate) struct Registry {
    live: Mutex<HashMap<u64, Weak<Mutex<Request>>>>,
    next: AtomicU64,
    prompt_tokens: AtomicU64,
    reused_tokens: AtomicU64,
}

impl Registry {
    fn map(&self) -> MutexGuard<'_, HashMap<u64, Weak<Mutex<Request>>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, rec: &StdArc<Mutex<Request>>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(id, StdArc::downgrade(rec));
        id
    }

    fn remove(&self, id: u64) {
        self.map().remove(&id);
    }

    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// `(requests begun, prompt tokens, prompt tokens reused from the cache)`.
    pub(crate) fn counters(&self) -> (u64, u64, u64) {
        (
            self.next.load(Ordering::Relaxed),
            self.prompt_tokens.load(Ordering::Relaxed),
            self.reused_tokens.load(Ordering::Relaxed),
        )
    }

    /// Strong references to the live records in id order (taken without
    /// holding any record's lock, so the order record -> registry is never
    /// reversed; a caller locking several records locks them in this order).
    pub(crate) fn snapshot(&self) -> Vec<StdArc<Mutex<Request>>> {
        let map = self.map();
        let mut ids: Vec<u64> = map.keys().copied().collect();
        ids.sort_unstable();
        ids.iter().filter_map(|id| map[id].upgrade()).collect()
    }
}

/// Tokens (below 2^31 by validation) as an int32 array.
fn i32_array<'py>(py: Python<'py>, toks: &[u32]) -> Bound<'py, PyArray1<i32>> {
    PyArray1::from_slice(py, bytemuck::cast_slice::<u32, i32>(toks))
}

fn lock(rec: &Mutex<Request>) -> MutexGuard<'_, Request> {
    rec.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One request's tokens, pages and prefix lock, owned by the Rust core
/// (made by `RadixTree.begin_request`). A record dropped while running is
/// aborted: its lock and pages go back, nothing leaks.
#[pyclass(frozen, module = "radixseg._core")]
pub(crate) struct RequestRecord {
    rec: StdArc<Mutex<Request>>,
    tree: StdArc<Mutex<radixseg_core::RadixTree>>,
    allocator: Arc<radixseg_core::SegmentAllocator>,
    registry: StdArc<Registry>,
    id: u64,
    born: u64,
    /// Pages held, as of the last change (decides whether an `end` releases
    /// the GIL; read without the record's lock).
    pages_hint: AtomicUsize,
    /// Its namespace (fixed for its life; read without the lock).
    #[pyo3(get)]
    namespace: u64,
    /// Tokens of the cached prefix it reused (fixed for its life).
    #[pyo3(get)]
    matched_len: usize,
}

impl RequestRecord {
    pub(crate) fn begin(
        py: Python<'_>,
        tree: &RadixTree,
        tokens: &Ids<'_>,
        namespace: u64,
        leave_last: bool,
    ) -> PyResult<Self> {
        tree.alive()?;
        let t = &tree.tree;
        let lock_tree = || t.lock().unwrap_or_else(PoisonError::into_inner);
        let req = match Slice::of(tokens)? {
            Slice::Bits(s) => maybe_detach(py, s.len(), || {
                lock_tree().begin_request_u32(s, namespace, leave_last)
            }),
            Slice::Wide(s) => maybe_detach(py, s.len(), || {
                lock_tree().begin_request(s, namespace, leave_last)
            }),
        }
        .py(py)?;
        let prompt_len = tokens.len() as u64;
        let pages = req.page_ids().len();
        let reg = &tree.registry;
        reg.prompt_tokens.fetch_add(prompt_len, Ordering::Relaxed);
        reg.reused_tokens
            .fetch_add(req.seq_len() as u64, Ordering::Relaxed);
        let matched_len = req.matched_len();
        let rec = StdArc::new(Mutex::new(req));
        let id = reg.add(&rec);
        Ok(Self {
            rec,
            tree: StdArc::clone(&tree.tree),
            allocator: Arc::clone(&tree.allocator.get().inner),
            registry: StdArc::clone(&tree.registry),
            id,
            born: tree.born,
            pages_hint: AtomicUsize::new(pages),
            namespace,
            matched_len,
        })
    }

    /// Run `f` on the record, with the GIL released when `len` (the work's
    /// size) pays for it, as the tree does. No thread holds a record's lock
    /// while it waits for the GIL, so a thread that keeps the GIL while it
    /// waits for the lock cannot deadlock.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        len: usize,
        f: impl Send + FnOnce(&mut Request) -> Result<T, CoreError>,
    ) -> PyResult<T> {
        check_born(self.born, "request")?;
        let rec = &self.rec;
        let hint = &self.pages_hint;
        maybe_detach(py, len, || {
            let mut r = lock(rec);
            let out = f(&mut r);
            hint.store(r.page_ids().len(), Ordering::Relaxed);
            out
        })
        .py(py)
    }

    fn read<T>(&self, f: impl FnOnce(&Request) -> T) -> PyResult<T> {
        check_born(self.born, "request")?;
        Ok(f(&lock(&self.rec)))
    }
}

#[pymethods]
impl RequestRecord {
    /// Append tokens, allocating the pages they need; returns their int64
    /// slots. All or nothing: `OutOfPages` when the allocator is short, or
    /// with `short_ok` the pages it asked for, as an int. With `evict_at`
    /// (the pool's segment count when it found its budget spent), a
    /// shortfall is first met by evicting from the tree, in this call.
    #[pyo3(signature = (tokens, short_ok = false, evict_at = -1))]
    fn extend<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        short_ok: bool,
        evict_at: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = Ids::new(tokens)?;
        let (a, tree) = (&self.allocator, &self.tree);
        let got = with_slice!(&ids, s => self.with(py, s.len(), |r| {
            short_as_value(extend_evicting(a, tree, evict_at, || r.extend(a, s)), short_ok)
        })?);
        slots_or_short(py, got)
    }

    /// End the request: cache its whole pages (`cache`) or not, unlock, and
    /// drop its references. Exactly once; returns the tokens already cached.
    /// With `tokens` (same count), they replace the request's tokens first,
    /// in the same call: all or nothing.
    #[pyo3(signature = (cache, tokens = None))]
    fn end(
        &self,
        py: Python<'_>,
        cache: bool,
        tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let tree = &self.tree;
        let pages = self.pages_hint.load(Ordering::Relaxed);
        let lock_tree = || tree.lock().unwrap_or_else(PoisonError::into_inner);
        let n = match tokens {
            None => self.with(py, pages, |r| lock_tree().end_request(r, cache))?,
            Some(t) => {
                let ids = Ids::new(t)?;
                with_slice!(&ids, s => self.with(py, pages, |r| {
                    lock_tree().end_request_with(r, cache, s)
                })?)
            }
        };
        self.registry.remove(self.id);
        Ok(n)
    }

    /// Drop tokens past `seq_len` and the pages no longer needed.
    fn truncate(&self, py: Python<'_>, seq_len: usize) -> PyResult<()> {
        let a = &self.allocator;
        let pages = self.pages_hint.load(Ordering::Relaxed);
        self.with(py, pages, |r| r.truncate(a, seq_len))
    }

    /// int32 copy of the tokens whose KV the request holds (the matched
    /// prefix read from the tree); refused once the request ended.
    fn tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let tree = &self.tree;
        let toks = self.with(py, 0, |r| {
            tree.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .request_tokens(r)
        })?;
        Ok(i32_array(py, &toks))
    }

    /// int32 copy of the tokens past the matched prefix (what `extend` added).
    fn new_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let toks = self.read(|r| i32_array(py, r.new_tokens()))?;
        Ok(toks)
    }

    /// int32 copy of the request's page ids (as they were when it ended, after that).
    fn page_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i32>>> {
        // Page ids are below 2^31 by construction (PAGE_ID_LIMIT).
        let ids = self.read(|r| r.page_ids().iter().map(|&p| p as i32).collect())?;
        Ok(PyArray1::from_vec(py, ids))
    }

    /// Tokens held.
    #[getter]
    fn seq_len(&self) -> PyResult<usize> {
        self.read(Request::seq_len)
    }

    /// Pages held.
    #[getter]
    fn num_pages(&self) -> PyResult<usize> {
        self.read(|r| r.page_ids().len())
    }

    /// Matched pages (from the cache).
    #[getter]
    fn matched_pages(&self) -> PyResult<usize> {
        self.read(Request::matched_pages)
    }

    /// "running", "finished" or "aborted".
    #[getter]
    fn state(&self) -> PyResult<&'static str> {
        self.read(|r| r.state().name())
    }

    /// The handle of the node the request locks (None once it ended).
    #[getter]
    fn node(&self) -> PyResult<Option<i64>> {
        self.read(|r| (r.state() == RequestState::Running).then(|| r.node().to_raw()))
    }
}

/// The records of `records` locked in registry order (the order every
/// multi-record call locks in, so two of them cannot deadlock), returned in
/// the caller's order. A record given twice, one made before a fork, or one
/// of another tree is refused before any lock is taken.
fn lock_all<'a>(
    records: &'a [StdArc<Mutex<Request>>],
    ids: &[u64],
) -> Vec<MutexGuard<'a, Request>> {
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_unstable_by_key(|&i| ids[i]);
    let mut slots: Vec<Option<MutexGuard<'a, Request>>> = records.iter().map(|_| None).collect();
    for i in order {
        slots[i] = Some(lock(&records[i]));
    }
    slots.into_iter().flatten().collect()
}

/// What the batch calls of `RadixTree` need of each record, checked: the
/// shared request state, the ids to lock them in order, and the records
/// themselves (for their page hints).
pub(crate) struct Batch<'py> {
    pub(crate) records: Vec<Bound<'py, RequestRecord>>,
    shared: Vec<StdArc<Mutex<Request>>>,
    ids: Vec<u64>,
}

impl<'py> Batch<'py> {
    /// Check `records` (each of `tree`, made after the last fork, none twice).
    pub(crate) fn new(
        tree: &StdArc<Mutex<radixseg_core::RadixTree>>,
        records: Vec<Bound<'py, RequestRecord>>,
    ) -> PyResult<Self> {
        let mut ids = Vec::with_capacity(records.len());
        let mut shared = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            let rec = r.get();
            check_born(rec.born, "request")?;
            if !StdArc::ptr_eq(&rec.tree, tree) {
                return Err(crate::InvalidArgument::new_err(format!(
                    "requests[{i}] was begun on a different PrefixCache / RadixTree"
                )));
            }
            ids.push(rec.id);
            shared.push(StdArc::clone(&rec.rec));
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            let i = ids.iter().position(|&x| x == w[0]).unwrap_or(0);
            return Err(crate::InvalidArgument::new_err(format!(
                "requests[{i}] appears more than once in the batch: each request takes \
                 one token per step"
            )));
        }
        Ok(Self {
            records,
            shared,
            ids,
        })
    }

    /// Run `f` on every record, locked (in registry order), with the GIL
    /// released for a large batch; page hints are updated after.
    pub(crate) fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl Send + FnOnce(&mut [&mut Request]) -> Result<T, CoreError>,
    ) -> PyResult<T> {
        let (shared, ids) = (&self.shared, &self.ids);
        let (out, pages) = maybe_detach(py, shared.len(), || {
            let mut guards = lock_all(shared, ids);
            let mut reqs: Vec<&mut Request> = guards.iter_mut().map(|g| &mut **g).collect();
            let out = f(&mut reqs);
            let pages: Vec<usize> = reqs.iter().map(|r| r.page_ids().len()).collect();
            (out, pages)
        });
        for (r, n) in self.records.iter().zip(pages) {
            r.get().pages_hint.store(n, Ordering::Relaxed);
        }
        out.py(py)
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if self.born != fork_generation() {
            // A copy of the parent's request in a forked child: its lock may be
            // held by a thread that does not exist here. Nothing to give back.
            return;
        }
        let mut r = lock(&self.rec);
        if r.state() == RequestState::Running {
            // Abort: the lock and the pages go back. An error here (none is
            // expected: the record's own lock and pages) cannot be raised.
            let _ = self
                .tree
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .end_request(&mut r, false);
        }
        drop(r);
        self.registry.remove(self.id);
    }
}
