//! `RadixTree`: the core's prefix tree behind a mutex, with the requests
//! it has begun (`request.rs`) registered beside it.

use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use radixseg_core::{Arc, CoreError, NodeId, Request, RequestState};
use std::sync::{Arc as StdArc, Mutex};

use crate::allocator::SegmentAllocator;
use crate::errors::{to_py, CoreResultExt};
use crate::request::{Batch, Registry, RequestRecord};
use crate::{
    check_born, extend_evicting, fork_generation, ids_array, maybe_detach, short_as_value,
    slots_or_short, Ids, Slice,
};

/// `(pages, indptr)`: one CSR list of page ids per request.
type PagesCsr<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>);

/// The radix prefix tree over an allocator's pages (the Rust core). Use the
/// `radixseg.RadixTree` subclass, which takes and returns torch tensors.
#[pyclass(frozen, subclass, module = "radixseg._core")]
pub(crate) struct RadixTree {
    pub(crate) tree: StdArc<Mutex<radixseg_core::RadixTree>>,
    pub(crate) allocator: Py<SegmentAllocator>,
    pub(crate) registry: StdArc<Registry>,
    pub(crate) born: u64,
}

/// The requests of a locked batch, shared.
fn table<'a>(reqs: &'a [&'a mut Request]) -> Vec<&'a Request> {
    reqs.iter().map(|r| &**r).collect()
}

impl RadixTree {
    /// `match_prefix`, or with `lock` `acquire`: `(page_ids, length, node)`.
    fn matched<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        namespace: u64,
        lock: bool,
    ) -> PyResult<(Bound<'py, PyArray1<i32>>, usize, i64)> {
        let ids = Ids::new(tokens)?;
        let m = match Slice::of(&ids)? {
            Slice::Bits(s) => self.with(py, s.len(), |t| {
                if lock {
                    t.acquire_u32(s, namespace)
                } else {
                    t.match_prefix_u32(s, namespace)
                }
            })?,
            Slice::Wide(s) => self.with(py, s.len(), |t| {
                if lock {
                    t.acquire(s, namespace)
                } else {
                    t.match_prefix(s, namespace)
                }
            })?,
        };
        Ok((ids_array(py, m.page_ids), m.length, m.node.to_raw()))
    }

    pub(crate) fn alive(&self) -> PyResult<()> {
        check_born(self.born, "RadixTree")
    }

    /// Run `f` on the tree, with the GIL released when `len` is long enough.
    /// The mutex is taken inside, so a thread waiting for it never holds the GIL
    /// on behalf of a thread that needs it.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        len: usize,
        f: impl Send + FnOnce(&mut radixseg_core::RadixTree) -> Result<T, CoreError>,
    ) -> PyResult<T> {
        self.alive()?;
        let tree = &self.tree;
        maybe_detach(py, len, || {
            let mut guard = tree
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut guard)
        })
        .py(py)
    }

    fn read<T>(&self, f: impl FnOnce(&radixseg_core::RadixTree) -> T) -> PyResult<T> {
        self.alive()?;
        let guard = self
            .tree
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(f(&guard))
    }
}

#[pymethods]
impl RadixTree {
    #[new]
    fn new(allocator: Bound<'_, SegmentAllocator>) -> Self {
        let inner = Arc::clone(&allocator.get().inner);
        Self {
            tree: StdArc::new(Mutex::new(radixseg_core::RadixTree::new(inner))),
            allocator: allocator.unbind(),
            registry: StdArc::default(),
            born: fork_generation(),
        }
    }

    /// The allocator whose pages the tree holds.
    #[getter]
    fn allocator(&self, py: Python<'_>) -> Py<SegmentAllocator> {
        self.allocator.clone_ref(py)
    }

    /// Tokens per page.
    #[getter]
    fn page_size(&self) -> PyResult<usize> {
        self.read(|t| t.page_size())
    }

    /// Longest cached prefix: `(page_ids int32, matched tokens, node handle)`.
    #[pyo3(signature = (tokens, namespace = 0))]
    fn match_prefix<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        namespace: u64,
    ) -> PyResult<(Bound<'py, PyArray1<i32>>, usize, i64)> {
        self.matched(py, tokens, namespace, false)
    }

    /// Cache `tokens` (whole pages) with `page_ids`; returns tokens already cached.
    #[pyo3(signature = (tokens, page_ids, namespace = 0))]
    fn insert(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        page_ids: &Bound<'_, PyAny>,
        namespace: u64,
    ) -> PyResult<usize> {
        let pages = Ids::new(page_ids)?;
        let tokens = Ids::new(tokens)?;
        let n = tokens.len();
        if let (Slice::Bits(s), Slice::Bits(p)) = (Slice::of(&tokens)?, Slice::of(&pages)?) {
            return self.with(py, n, |t| t.insert_u32(s, p, namespace));
        }
        let pages = pages.to_vec()?;
        with_slice!(&tokens, s => self.with(py, n, |t| t.insert(s, &pages, namespace)))
    }

    /// Match and lock the node, atomically:
    /// `(page_ids int32, matched tokens, node handle)`.
    #[pyo3(signature = (tokens, namespace = 0))]
    fn acquire<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        namespace: u64,
    ) -> PyResult<(Bound<'py, PyArray1<i32>>, usize, i64)> {
        self.matched(py, tokens, namespace, true)
    }

    /// Start a request: validate every token of the prompt `tokens`, match
    /// and lock the longest cached prefix (of all but the last token with
    /// `leave_last`) and record it in a `RequestRecord`, in one call.
    #[pyo3(signature = (tokens, namespace = 0, leave_last = false))]
    fn begin_request(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        namespace: u64,
        leave_last: bool,
    ) -> PyResult<RequestRecord> {
        let ids = Ids::new(tokens)?;
        RequestRecord::begin(py, self, &ids, namespace, leave_last)
    }

    /// A decode step: append `tokens[i]` to `requests[i]`, allocating the
    /// pages the requests whose last page is full need, all in one call;
    /// returns the new tokens' int64 slots. All or nothing: `OutOfPages`
    /// for the batch when the allocator is short, or with `short_ok` the
    /// pages it asked for, as an int.
    /// `evict_at` as `RequestRecord.extend`'s.
    #[pyo3(signature = (requests, tokens, short_ok = false, evict_at = -1))]
    fn extend_each<'py>(
        &self,
        py: Python<'py>,
        requests: Vec<Bound<'py, RequestRecord>>,
        tokens: &Bound<'py, PyAny>,
        short_ok: bool,
        evict_at: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.alive()?;
        let ids = Ids::new(tokens)?;
        let batch = Batch::new(&self.tree, requests)?;
        let (a, tree) = (&self.allocator.get().inner, &self.tree);
        let got = with_slice!(&ids, s => batch.with(py, |reqs| {
            let step = extend_evicting(a, tree, evict_at, || Request::extend_each(a, reqs, s));
            short_as_value(step, short_ok)
        })?);
        slots_or_short(py, got)
    }

    /// Pages `evict` has released since the tree was made.
    fn evicted_pages(&self) -> PyResult<u64> {
        self.read(radixseg_core::RadixTree::evicted_pages)
    }

    /// FlashInfer's paged-KV CSR of `requests`, int32: `(kv_indptr [B + 1],
    /// kv_indices, kv_last_page_len [B])`, built in one call.
    #[allow(clippy::type_complexity)]
    /// With `out` (a writable 1-D int32 array), `kv_indices` is written into
    /// its front and `out` itself is returned in its place: a buffer reused
    /// across decode steps.
    #[pyo3(signature = (requests, out = None))]
    fn page_table<'py>(
        &self,
        py: Python<'py>,
        requests: Vec<Bound<'py, RequestRecord>>,
        out: Option<Bound<'py, PyArray1<i32>>>,
    ) -> PyResult<(
        Bound<'py, PyArray1<i32>>,
        Bound<'py, PyArray1<i32>>,
        Bound<'py, PyArray1<i32>>,
    )> {
        self.alive()?;
        let batch = Batch::new(&self.tree, requests)?;
        match out {
            None => {
                let (indptr, indices, last) =
                    batch.with(py, |reqs| Request::page_table(&table(reqs)))?;
                Ok((
                    PyArray1::from_vec(py, indptr),
                    PyArray1::from_vec(py, indices),
                    PyArray1::from_vec(py, last),
                ))
            }
            Some(buf) => {
                let (indptr, last) = {
                    let mut rw = buf.try_readwrite()?;
                    let dst = rw.as_slice_mut()?;
                    batch.with(py, |reqs| Request::page_table_into(&table(reqs), dst))?
                };
                Ok((
                    PyArray1::from_vec(py, indptr),
                    buf,
                    PyArray1::from_vec(py, last),
                ))
            }
        }
    }

    /// Requests begun with `begin_request` that have not ended.
    fn running_requests(&self) -> PyResult<usize> {
        self.alive()?;
        Ok(self.registry.len())
    }

    /// The pages running requests hold, for placement decisions: `(pages,
    /// indptr)`, request `i`'s pages (matched prefix included, in sequence
    /// order; the last is the one being written) at
    /// `pages[indptr[i]:indptr[i + 1]]`. One snapshot of the requests; O(their
    /// pages).
    fn running_pages<'py>(&self, py: Python<'py>) -> PyResult<PagesCsr<'py>> {
        self.alive()?;
        let records = self.registry.snapshot();
        let (pages, indptr) = py.detach(|| {
            let mut pages: Vec<i64> = Vec::new();
            let mut indptr: Vec<i64> = vec![0];
            for r in &records {
                let r = r.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if r.state() == RequestState::Running {
                    pages.extend(r.page_ids().iter().map(|&p| i64::from(p)));
                    indptr.push(pages.len() as i64);
                }
            }
            (pages, indptr)
        });
        Ok((
            PyArray1::from_vec(py, pages),
            PyArray1::from_vec(py, indptr),
        ))
    }

    /// `(requests begun, prompt tokens, prompt tokens reused from the cache)`
    /// over every `begin_request`.
    fn request_counters(&self) -> PyResult<(u64, u64, u64)> {
        self.alive()?;
        Ok(self.registry.counters())
    }

    /// Raise `InvariantViolation` unless every page the tree or a running
    /// request holds has the references they account for (with `exclusive`:
    /// exactly those, and no other page is referenced).
    #[pyo3(signature = (exclusive = false))]
    fn check_requests(&self, py: Python<'_>, exclusive: bool) -> PyResult<()> {
        self.alive()?;
        let records = self.registry.snapshot();
        let tree = &self.tree;
        py.detach(|| {
            let guards: Vec<_> = records
                .iter()
                .map(|r| r.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
                .collect();
            tree.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .check_requests(guards.iter().map(|g| &**g), exclusive)
        })
        .py(py)
    }

    /// Insert (when `cache`), unlock `node` (when given) and release the
    /// request's pages from `owned_from` on, all or nothing; returns tokens
    /// already cached.
    #[pyo3(signature = (tokens, page_ids, namespace = 0, node = None, cache = true, owned_from = 0))]
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        page_ids: &Bound<'_, PyAny>,
        namespace: u64,
        node: Option<i64>,
        cache: bool,
        owned_from: usize,
    ) -> PyResult<usize> {
        let pages = Ids::new(page_ids)?;
        let node = node.map(NodeId::from_raw);
        let tokens = Ids::new(tokens)?;
        let n = tokens.len().max(pages.len());
        if let (Slice::Bits(s), Slice::Bits(p)) = (Slice::of(&tokens)?, Slice::of(&pages)?) {
            return self.with(py, n, |t| {
                t.finish_u32(s, p, namespace, node, cache, owned_from)
            });
        }
        let pages = pages.to_vec()?;
        with_slice!(&tokens, s => self.with(py, n, |t| {
            t.finish(s, &pages, namespace, node, cache, owned_from)
        }))
    }

    /// Lock a node and its ancestors against eviction.
    fn lock(&self, py: Python<'_>, node: i64) -> PyResult<()> {
        self.with(py, 0, |t| t.lock(NodeId::from_raw(node)))
    }

    /// Undo one `lock`.
    fn unlock(&self, py: Python<'_>, node: i64) -> PyResult<()> {
        self.with(py, 0, |t| t.unlock(NodeId::from_raw(node)))
    }

    /// Evict least-recently-used unlocked leaves until `n_pages` pages are
    /// released (whole leaves, so possibly more); returns pages released.
    fn evict(&self, py: Python<'_>, n_pages: i64) -> PyResult<usize> {
        let n = usize::try_from(n_pages).map_err(|_| {
            to_py(
                py,
                CoreError::InvalidConfig {
                    what: "n_pages (pages to evict)",
                    value: n_pages,
                    rule: "must be a non-negative integer",
                },
            )
        })?;
        self.with(py, n, |t| t.evict(n))
    }

    /// Release every cached page and forget every node (handles go stale).
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, usize::MAX, |t| t.reset())
    }

    /// Lock count of a node.
    fn lock_count(&self, py: Python<'_>, node: i64) -> PyResult<u32> {
        self.with(py, 0, |t| t.lock_count(NodeId::from_raw(node)))
    }

    /// Pages no lock protects.
    fn evictable_pages(&self) -> PyResult<usize> {
        self.read(|t| t.evictable_pages())
    }

    /// Pages under a locked node.
    fn locked_pages(&self) -> PyResult<usize> {
        self.read(|t| t.locked_pages())
    }

    /// Pages the tree references.
    fn cached_pages(&self) -> PyResult<usize> {
        self.read(|t| t.cached_pages())
    }

    /// Tokens the tree caches.
    fn cached_tokens(&self) -> PyResult<usize> {
        self.read(|t| t.cached_tokens())
    }

    /// Nodes, namespace roots excluded.
    fn node_count(&self) -> PyResult<usize> {
        self.read(|t| t.node_count())
    }

    /// Heap bytes the tree holds.
    fn metadata_bytes(&self) -> PyResult<usize> {
        self.read(|t| t.metadata_bytes())
    }

    /// Every root-to-leaf path, sorted by (namespace, tokens): a list of
    /// `(namespace, tokens int64, page_ids int32)`. For tests and debugging:
    /// O(total path length), recency is not refreshed.
    #[allow(clippy::type_complexity)]
    fn cached_sequences<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Vec<(u64, Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i32>>)>> {
        Ok(self
            .read(|t| t.cached_sequences())?
            .into_iter()
            .map(|s| {
                let tokens = s.tokens.into_iter().map(i64::from).collect();
                (
                    s.namespace,
                    PyArray1::from_vec(py, tokens),
                    ids_array(py, s.page_ids),
                )
            })
            .collect())
    }

    /// Raise `InvariantViolation` describing the first breach found.
    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, usize::MAX, |t| t.check_invariants())
    }

    fn __repr__(&self) -> String {
        self.read(|t| {
            format!(
                "RadixTree(page_size={}, cached_tokens={}, nodes={}, evictable_pages={}, locked_pages={})",
                t.page_size(),
                t.cached_tokens(),
                t.node_count(),
                t.evictable_pages(),
                t.locked_pages()
            )
        })
        .unwrap_or_else(|_| "RadixTree(<made before fork(); unusable here>)".to_owned())
    }
}
