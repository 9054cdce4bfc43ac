//! `SegmentAllocator`: the core's allocator as a Python class (frozen, so
//! that calls from several threads need no lock of the binding's own).

use numpy::PyArray1;
use pyo3::prelude::*;
use radixseg_core::{Arc, CoreError};

use crate::errors::{to_py, CoreResultExt};
use crate::{check_born, fork_generation, ids_array, maybe_detach, Ids};

/// Refcounted KV pages grouped in segments (the Rust core). Use the
/// `radixseg.SegmentAllocator` subclass, which takes and returns torch tensors.
#[pyclass(frozen, subclass, module = "radixseg._core")]
pub(crate) struct SegmentAllocator {
    pub(crate) inner: Arc<radixseg_core::SegmentAllocator>,
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
        let ps = as_u32("page_size", page_size, "must be in 1..=1024")?;
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

    /// Reserve a segment id, closed (its pages not yet allocatable).
    fn reserve_segment(&self, py: Python<'_>) -> PyResult<u32> {
        self.alive()?;
        self.inner.reserve_segment().py(py)
    }

    /// Make a reserved segment live, every page free.
    fn open_segment(&self, py: Python<'_>, segment: i64) -> PyResult<()> {
        self.alive()?;
        self.inner.open_segment(segment).py(py)
    }

    /// Give back a reserved id without opening it.
    fn cancel_segment(&self, py: Python<'_>, segment: i64) -> PyResult<()> {
        self.alive()?;
        self.inner.cancel_segment(segment).py(py)
    }

    /// Reserved segment ids, ascending.
    fn reserved_segments(&self) -> Vec<u32> {
        self.inner.reserved_segments()
    }

    /// Whether a segment id is live.
    fn is_live(&self, segment: i64) -> bool {
        u32::try_from(segment).is_ok_and(|s| self.inner.is_live(s))
    }

    /// Stop allocating from a live segment (its pages are still retained
    /// and released as usual); idempotent.
    fn seal_segment(&self, py: Python<'_>, segment: i64) -> PyResult<()> {
        self.alive()?;
        self.inner.seal_segment(segment).py(py)
    }

    /// Let `alloc` take a sealed segment's free pages again; idempotent.
    fn unseal_segment(&self, py: Python<'_>, segment: i64) -> PyResult<()> {
        self.alive()?;
        self.inner.unseal_segment(segment).py(py)
    }

    /// Whether a segment id is live and sealed.
    fn is_sealed(&self, segment: i64) -> bool {
        u32::try_from(segment).is_ok_and(|s| self.inner.is_sealed(s))
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
