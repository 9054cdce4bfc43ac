//! `radixseg._core`: the PyO3 binding of radixseg-core. It only converts
//! arguments, releases the GIL around batch work and maps errors; all logic
//! lives in the core crate. Page ids cross the boundary as numpy arrays (the
//! Python package wraps them as torch tensors).

use numpy::{
    PyArray1, PyArrayDescrMethods, PyReadonlyArray1, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError};
use pyo3::prelude::*;
use radixseg_core::{Arc, CoreError, HandleProblem, NodeId};
use radixseg_cpu as cpu;
use std::sync::{Arc as StdArc, Mutex};

create_exception!(
    radixseg,
    RadixsegError,
    PyException,
    "Base class of every error radixseg raises."
);
create_exception!(
    radixseg,
    OutOfPages,
    RadixsegError,
    "Not enough free pages; nothing was allocated. Attributes: requested, available."
);
create_exception!(
    radixseg,
    BudgetExhausted,
    OutOfPages,
    "Growing the pool would exceed its byte budget, and eviction could not make room."
);
create_exception!(
    radixseg,
    InvalidHandle,
    RadixsegError,
    "A page id or node handle that names nothing live. Attribute: page_id or node."
);
create_exception!(
    radixseg,
    DoubleFree,
    InvalidHandle,
    "Release of a page whose refcount is already 0; nothing changed."
);
create_exception!(
    radixseg,
    SegmentBusy,
    RadixsegError,
    "Retiring a segment that still has referenced pages. Attributes: segment, used_pages."
);
create_exception!(
    radixseg,
    InvalidArgument,
    RadixsegError,
    "An argument outside its documented range (configuration, tokens, lengths, segment ids)."
);
create_exception!(
    radixseg,
    InvariantViolation,
    RadixsegError,
    "check_invariants() found a breach: a bug in radixseg, please report it."
);

/// Batches at least this long are processed with the GIL released; shorter
/// ones cost less than the release itself.
const DETACH_MIN: usize = 32;

/// Forks survived by this process's lineage: raised in the child after each
/// `os.fork()` (registered with `os.register_at_fork` at import).
static FORK_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn fork_generation() -> u64 {
    FORK_GENERATION.load(std::sync::atomic::Ordering::Relaxed)
}

/// Refuse an object made before a `fork()` in the child: another thread of
/// the parent may have held one of its locks at the fork, and that thread does
/// not exist in the child, so waiting for the lock would hang for ever.
fn check_born(born: u64, what: &str) -> PyResult<()> {
    if born == fork_generation() {
        return Ok(());
    }
    Err(InvalidArgument::new_err(format!(
        "this {what} was created before os.fork() in the parent process and cannot be \
         used in the forked child (a lock may be held by a parent thread that does not \
         exist here); create a new KVPool / PrefixCache in the child"
    )))
}

#[pyfunction]
fn _after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Build a Python exception of the class for `kind` carrying `attrs`.
fn raise(py: Python<'_>, e: &CoreError, attrs: &[(&str, i64)]) -> PyErr {
    let msg = e.to_string();
    let err = match e {
        CoreError::OutOfPages { .. } | CoreError::IdSpaceExhausted { .. } => {
            OutOfPages::new_err(msg)
        }
        CoreError::DoubleFree { .. } => DoubleFree::new_err(msg),
        CoreError::InvalidHandle { .. } | CoreError::InvalidNode { .. } => {
            InvalidHandle::new_err(msg)
        }
        CoreError::SegmentBusy { .. } => SegmentBusy::new_err(msg),
        CoreError::InvalidConfig { .. }
        | CoreError::InvalidSegment { .. }
        | CoreError::InvalidToken { .. }
        | CoreError::LengthMismatch { .. }
        | CoreError::UnbalancedUnlock { .. }
        | CoreError::InvalidInput(_) => InvalidArgument::new_err(msg),
        CoreError::RefcountOverflow { .. } | CoreError::TreeCapacity { .. } => {
            RadixsegError::new_err(msg)
        }
        CoreError::Malformed(_) => InvariantViolation::new_err(msg),
        _ => RadixsegError::new_err(msg),
    };
    let value = err.value(py);
    for (k, v) in attrs {
        // Attributes are a convenience; the message already says everything.
        let _ = value.setattr(*k, *v);
    }
    err
}

/// The one mapping from core errors to Python exceptions.
fn to_py(py: Python<'_>, e: CoreError) -> PyErr {
    let attrs: Vec<(&str, i64)> = match &e {
        CoreError::OutOfPages {
            requested,
            available,
            total,
            segments,
        } => vec![
            ("requested", *requested as i64),
            ("available", *available as i64),
            ("total", *total as i64),
            ("segments", i64::from(*segments)),
        ],
        CoreError::IdSpaceExhausted { segments, limit } => vec![
            ("segments", i64::from(*segments)),
            ("limit", i64::from(*limit)),
        ],
        CoreError::InvalidHandle { page_id, problem } => {
            let mut v = vec![("page_id", *page_id)];
            if let HandleProblem::SegmentNotLive { segment } = problem {
                v.push(("segment", i64::from(*segment)));
            }
            v
        }
        CoreError::DoubleFree { page_id } | CoreError::RefcountOverflow { page_id } => {
            vec![("page_id", i64::from(*page_id))]
        }
        CoreError::SegmentBusy {
            segment,
            used_pages,
        } => vec![
            ("segment", i64::from(*segment)),
            ("used_pages", i64::from(*used_pages)),
        ],
        CoreError::InvalidSegment { segment, .. } => vec![("segment", *segment)],
        CoreError::InvalidToken { index, value } => {
            vec![("index", *index as i64), ("value", *value)]
        }
        CoreError::InvalidNode { node } => vec![("node", *node)],
        CoreError::UnbalancedUnlock { node } => vec![("node", i64::from(*node))],
        _ => Vec::new(),
    };
    raise(py, &e, &attrs)
}

/// Extension trait: `core_call().py(py)?`.
trait CoreResultExt<T> {
    fn py(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> CoreResultExt<T> for Result<T, CoreError> {
    fn py(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

/// Run `f` with the GIL released when the batch is long enough to pay for it.
fn maybe_detach<T: Send>(py: Python<'_>, len: usize, f: impl Send + FnOnce() -> T) -> T {
    if len >= DETACH_MIN {
        py.detach(f)
    } else {
        f()
    }
}

/// Page or token ids as given: int64 or int32 numpy arrays.
enum Ids<'py> {
    I64(PyReadonlyArray1<'py, i64>),
    I32(PyReadonlyArray1<'py, i32>),
}

/// Bind `$s` to the ids as a `&[i64]` or `&[i32]` slice (whichever dtype
/// came in) and evaluate `$body`: one generic call per arm, no copy.
macro_rules! with_slice {
    ($ids:expr, $s:ident => $body:expr) => {
        match $ids {
            Ids::I64(a) => {
                let $s = a.as_slice()?;
                $body
            }
            Ids::I32(a) => {
                let $s = a.as_slice()?;
                $body
            }
        }
    };
}

mod request;
use request::{Registry, RequestRecord};

impl<'py> Ids<'py> {
    /// Dispatch on the array's dtype, so that no conversion error is built
    /// and thrown away on the common path (that cost ~5 us per call).
    fn new(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let py = ob.py();
        if let Ok(arr) = ob.cast::<PyUntypedArray>() {
            let dtype = arr.dtype();
            if dtype.is_equiv_to(&numpy::dtype::<i32>(py)) {
                return Ok(Ids::I32(ob.extract()?));
            }
            if dtype.is_equiv_to(&numpy::dtype::<i64>(py)) {
                return Ok(Ids::I64(ob.extract()?));
            }
        }
        Err(PyTypeError::new_err(format!(
            "ids must be a 1-D int32 or int64 numpy array, got {}",
            ob.get_type().name()?
        )))
    }

    fn len(&self) -> usize {
        match self {
            Ids::I64(a) => a.as_array().len(),
            Ids::I32(a) => a.as_array().len(),
        }
    }

    fn to_vec(&self) -> PyResult<Vec<i64>> {
        Ok(match self {
            Ids::I64(a) => a.as_slice()?.to_vec(),
            Ids::I32(a) => a.as_slice()?.iter().map(|&x| i64::from(x)).collect(),
        })
    }
}

fn ids_array(py: Python<'_>, ids: Vec<u32>) -> Bound<'_, PyArray1<i32>> {
    // Page ids are below 2^31 by construction (PAGE_ID_LIMIT).
    PyArray1::from_vec(py, ids.into_iter().map(|x| x as i32).collect())
}

/// Refcounted KV pages grouped in segments (the Rust core). Use the
/// `radixseg.SegmentAllocator` subclass, which takes and returns torch tensors.
#[pyclass(frozen, subclass, module = "radixseg._core")]
struct SegmentAllocator {
    inner: Arc<radixseg_core::SegmentAllocator>,
    born: u64,
}

impl SegmentAllocator {
    fn alive(&self) -> PyResult<()> {
        check_born(self.born, "SegmentAllocator")
    }
}

#[pymethods]
impl SegmentAllocator {
    #[new]
    #[pyo3(signature = (page_size, pages_per_segment, max_segments = None))]
    fn new(
        py: Python<'_>,
        page_size: i64,
        pages_per_segment: i64,
        max_segments: Option<i64>,
    ) -> PyResult<Self> {
        let as_u32 = |what: &'static str, v: i64, rule: &'static str| {
            u32::try_from(v).map_err(|_| {
                to_py(
                    py,
                    CoreError::InvalidConfig {
                        what,
                        value: v,
                        rule,
                    },
                )
            })
        };
        let ps = as_u32("page_size", page_size, "must be a power of two in 1..=1024")?;
        let pps = as_u32(
            "pages_per_segment",
            pages_per_segment,
            "must be in 1..=1048576",
        )?;
        let mut a = radixseg_core::SegmentAllocator::new(ps, pps).py(py)?;
        if let Some(m) = max_segments {
            let m = as_u32(
                "max_segments",
                m,
                "must be at least 1 and at most 2^31 / pages_per_segment",
            )?;
            a = a.with_max_segments(m).py(py)?;
        }
        Ok(Self {
            inner: Arc::new(a),
            born: fork_generation(),
        })
    }

    /// Tokens per page.
    #[getter]
    fn page_size(&self) -> u32 {
        self.inner.page_size()
    }

    /// Pages per segment.
    #[getter]
    fn pages_per_segment(&self) -> u32 {
        self.inner.pages_per_segment()
    }

    /// The most segments that may be live at once.
    #[getter]
    fn max_segments(&self) -> u32 {
        self.inner.max_segments()
    }

    /// Add a segment of free pages; returns its id.
    fn add_segment(&self, py: Python<'_>) -> PyResult<u32> {
        self.alive()?;
        self.inner.add_segment().py(py)
    }

    /// The id the next `add_segment` will use (None: no segment fits).
    fn next_segment_id(&self) -> PyResult<Option<u32>> {
        self.alive()?;
        Ok(self.inner.next_segment_id())
    }

    /// Whether a segment id is live.
    fn is_live(&self, segment: i64) -> bool {
        u32::try_from(segment).is_ok_and(|s| self.inner.is_live(s))
    }

    /// Retire a segment whose pages are all free.
    fn retire_segment(&self, py: Python<'_>, segment: i64) -> PyResult<()> {
        self.alive()?;
        self.inner.retire_segment(segment).py(py)
    }

    /// Allocate `n` pages, all or none; returns int32 page ids.
    fn alloc<'py>(&self, py: Python<'py>, n: i64) -> PyResult<Bound<'py, PyArray1<i32>>> {
        self.alive()?;
        let n = usize::try_from(n).map_err(|_| {
            to_py(
                py,
                CoreError::InvalidConfig {
                    what: "n (pages to allocate)",
                    value: n,
                    rule: "must be a non-negative integer",
                },
            )
        })?;
        let inner = &self.inner;
        let ids = maybe_detach(py, n, || inner.alloc(n)).py(py)?;
        Ok(ids_array(py, ids))
    }

    /// Add one reference to each page id.
    fn retain(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<()> {
        self.alive()?;
        let v = Ids::new(ids)?.to_vec()?;
        let inner = &self.inner;
        maybe_detach(py, v.len(), || inner.retain(&v)).py(py)
    }

    /// Drop one reference from each page id; pages at 0 become free.
    fn release(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<()> {
        self.alive()?;
        let v = Ids::new(ids)?.to_vec()?;
        let inner = &self.inner;
        maybe_detach(py, v.len(), || inner.release(&v)).py(py)
    }

    /// Refcount of each page id (0 for a free page of a live segment).
    fn refcount<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let v = Ids::new(ids)?.to_vec()?;
        let rc = self.inner.refcount(&v).py(py)?;
        // Refcounts past i32::MAX are clamped for display; they never occur
        // in practice (each needs that many live references).
        Ok(PyArray1::from_vec(
            py,
            rc.into_iter()
                .map(|r| r.min(i32::MAX as u32) as i32)
                .collect(),
        ))
    }

    /// Free pages in live segments.
    fn free_pages(&self) -> u64 {
        self.inner.free_pages()
    }

    /// Pages in live segments.
    fn total_pages(&self) -> u64 {
        self.inner.total_pages()
    }

    /// Live segment ids, ascending.
    fn segments(&self) -> Vec<u32> {
        self.inner.segments()
    }

    /// Number of live segments (O(1)).
    fn segment_count(&self) -> u32 {
        self.inner.segment_count()
    }

    /// `[(segment id, referenced pages), ...]` for live segments.
    fn segment_usage(&self) -> Vec<(u32, u32)> {
        self.inner.segment_usage()
    }

    /// Heap bytes of allocator metadata.
    fn metadata_bytes(&self) -> usize {
        self.inner.metadata_bytes()
    }

    /// Raise `InvariantViolation` describing the first breach found.
    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.check_invariants()).py(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "SegmentAllocator(page_size={}, pages_per_segment={}, segments={}, free_pages={}, total_pages={})",
            self.inner.page_size(),
            self.inner.pages_per_segment(),
            self.inner.segment_count(),
            self.inner.free_pages(),
            self.inner.total_pages()
        )
    }
}

/// The radix prefix tree over an allocator's pages (the Rust core). Use the
/// `radixseg.RadixTree` subclass, which takes and returns torch tensors.
#[pyclass(frozen, subclass, module = "radixseg._core")]
struct RadixTree {
    tree: StdArc<Mutex<radixseg_core::RadixTree>>,
    allocator: Py<SegmentAllocator>,
    registry: StdArc<Registry>,
    born: u64,
}

impl RadixTree {
    fn alive(&self) -> PyResult<()> {
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
        let ids = Ids::new(tokens)?;
        let m = with_slice!(&ids, s => self.with(py, s.len(), |t| t.match_prefix(s, namespace))?);
        Ok((ids_array(py, m.page_ids), m.length, m.node.to_raw()))
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
        let pages = Ids::new(page_ids)?.to_vec()?;
        let tokens = Ids::new(tokens)?;
        let n = tokens.len();
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
        let ids = Ids::new(tokens)?;
        let m = with_slice!(&ids, s => self.with(py, s.len(), |t| t.acquire(s, namespace))?);
        Ok((ids_array(py, m.page_ids), m.length, m.node.to_raw()))
    }

    /// Start a request: match and lock the longest cached prefix of
    /// `tokens` and record it in a `RequestRecord`, in one call.
    /// `prompt_len` (default: the tokens' count) feeds the hit-rate counters.
    #[pyo3(signature = (tokens, namespace = 0, prompt_len = None))]
    fn begin_request(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        namespace: u64,
        prompt_len: Option<u64>,
    ) -> PyResult<RequestRecord> {
        let ids = Ids::new(tokens)?;
        let n = prompt_len.unwrap_or(ids.len() as u64);
        RequestRecord::begin(py, self, &ids, namespace, n)
    }

    /// Requests begun with `begin_request` that have not ended.
    fn running_requests(&self) -> PyResult<usize> {
        self.alive()?;
        Ok(self.registry.len())
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
        let pages = Ids::new(page_ids)?.to_vec()?;
        let node = node.map(NodeId::from_raw);
        let tokens = Ids::new(tokens)?;
        let n = tokens.len().max(pages.len());
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

/// Parse a storage format name.
fn kv_format(name: &str) -> PyResult<cpu::KvFormat> {
    Ok(match name {
        "float8_e4m3fn" => cpu::KvFormat::E4m3,
        "float8_e5m2" => cpu::KvFormat::E5m2,
        "float16" => cpu::KvFormat::F16,
        "bfloat16" => cpu::KvFormat::Bf16,
        "float32" => cpu::KvFormat::F32,
        other => {
            return Err(InvalidArgument::new_err(format!(
                "format must be float8_e4m3fn, float8_e5m2, float16, bfloat16 or float32, got {other:?}"
            )))
        }
    })
}

/// Parse an instruction-set name.
fn isa_named(name: &str) -> PyResult<cpu::Isa> {
    Ok(match name {
        "auto" => cpu::Isa::Auto,
        "avx512" => cpu::Isa::Avx512,
        "avx2" => cpu::Isa::Avx2,
        "neon" => cpu::Isa::Neon,
        "scalar" => cpu::Isa::Scalar,
        other => {
            return Err(InvalidArgument::new_err(format!(
                "isa must be auto, avx512, avx2, neon or scalar, got {other:?}"
            )))
        }
    })
}

/// `buffer[offset..offset + len]`, or an error naming the segment.
fn sub<'a>(
    buffer: &'a [u8],
    sid: usize,
    what: &str,
    offset: usize,
    len: usize,
) -> PyResult<&'a [u8]> {
    offset
        .checked_add(len)
        .and_then(|end| buffer.get(offset..end))
        .ok_or_else(|| {
            InvalidArgument::new_err(format!(
                "segment {sid}: {what} bytes {offset}..{offset}+{len} are outside its {}-byte buffer",
                buffer.len()
            ))
        })
}

/// `(out, lse, isa)` of [`decode_cpu`].
type DecodeResult<'py> = (
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    &'static str,
);

/// Decode attention on the CPU over a segmented pool (the native kernel
/// behind `radixseg.attention.decode(..., backend="cpu")`; use that).
///
/// `buffers[s]` is segment `s`'s whole byte buffer (a uint8 view of it, or
/// None for a retired slot) and `offsets` the byte offsets of the layer's K,
/// V, K-scale and V-scale inside every buffer. `q` is float32
/// `[batch * q_heads * head_dim]`; the page table is int64 CSR. Returns
/// `(out [batch * q_heads * head_dim], lse [batch * q_heads], isa)`, float32,
/// natural-log LSE. Runs with the GIL released: no other thread may write
/// the layer meanwhile (as for any kernel reading it).
#[pyfunction]
#[pyo3(signature = (buffers, offsets, page_size, pages_per_segment, kv_heads, head_dim, format, q, q_heads, kv_indptr, kv_indices, kv_lens, sm_scale, threads=1, isa="auto"))]
#[allow(clippy::too_many_arguments)]
fn decode_cpu<'py>(
    py: Python<'py>,
    buffers: Vec<Option<PyReadonlyArray1<'py, u8>>>,
    offsets: [usize; 4],
    page_size: usize,
    pages_per_segment: usize,
    kv_heads: usize,
    head_dim: usize,
    format: &str,
    q: PyReadonlyArray1<'py, f32>,
    q_heads: usize,
    kv_indptr: PyReadonlyArray1<'py, i64>,
    kv_indices: PyReadonlyArray1<'py, i64>,
    kv_lens: PyReadonlyArray1<'py, i64>,
    sm_scale: f32,
    threads: usize,
    isa: &str,
) -> PyResult<DecodeResult<'py>> {
    let geometry = cpu::PoolGeometry {
        page_size,
        pages_per_segment,
        kv_heads,
        head_dim,
        format: kv_format(format)?,
    };
    let isa = isa_named(isa)?;
    let (kv, sc) = (geometry.kv_layer_bytes(), geometry.scale_layer_bytes());
    let mut layers = Vec::with_capacity(buffers.len());
    for (sid, b) in buffers.iter().enumerate() {
        let Some(b) = b else {
            layers.push(None);
            continue;
        };
        let bytes = b.as_slice()?;
        layers.push(Some(cpu::SegmentLayer {
            k: sub(bytes, sid, "k", offsets[0], kv)?,
            v: sub(bytes, sid, "v", offsets[1], kv)?,
            k_scale: sub(bytes, sid, "k_scale", offsets[2], sc)?,
            v_scale: sub(bytes, sid, "v_scale", offsets[3], sc)?,
        }));
    }
    let batch = cpu::DecodeBatch {
        q: q.as_slice()?,
        q_heads,
        indptr: kv_indptr.as_slice()?,
        indices: kv_indices.as_slice()?,
        kv_lens: kv_lens.as_slice()?,
        sm_scale,
    };
    let work = batch.indices.len() + batch.kv_lens.len();
    let result = maybe_detach(py, work, || {
        cpu::decode(&geometry, &layers, &batch, threads, isa)
    });
    let r = result.py(py)?;
    Ok((
        PyArray1::from_vec(py, r.out),
        PyArray1::from_vec(py, r.lse),
        r.isa.name(),
    ))
}

/// Instruction sets the CPU decode kernel can use here, widest first.
#[pyfunction]
fn cpu_isas() -> Vec<&'static str> {
    cpu::Isa::available()
        .into_iter()
        .map(|i| i.name())
        .collect()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    // Load numpy's C API now, while the module is imported: on first use
    // later, an exception raised meanwhile (a signal handler's) made
    // rust-numpy panic ("Failed to access NumPy array API capsule").
    let _ = numpy::dtype::<i32>(py);
    let _ = PyArray1::<i32>::from_vec(py, Vec::new());
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PAGE_ID_LIMIT", radixseg_core::PAGE_ID_LIMIT)?;
    m.add("RadixsegError", py.get_type::<RadixsegError>())?;
    m.add("OutOfPages", py.get_type::<OutOfPages>())?;
    m.add("BudgetExhausted", py.get_type::<BudgetExhausted>())?;
    m.add("InvalidHandle", py.get_type::<InvalidHandle>())?;
    m.add("DoubleFree", py.get_type::<DoubleFree>())?;
    m.add("SegmentBusy", py.get_type::<SegmentBusy>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("InvariantViolation", py.get_type::<InvariantViolation>())?;
    m.add_class::<SegmentAllocator>()?;
    m.add_class::<RadixTree>()?;
    m.add_class::<RequestRecord>()?;
    m.add("TOKEN_LIMIT", radixseg_core::TOKEN_LIMIT)?;
    m.add_function(wrap_pyfunction!(decode_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isas, m)?)?;
    // Objects made before a fork refuse use in the child (see check_born).
    let after_fork = wrap_pyfunction!(_after_fork_in_child, m)?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("after_in_child", after_fork)?;
    py.import("os")?
        .getattr("register_at_fork")?
        .call((), Some(&kwargs))?;
    Ok(())
}
