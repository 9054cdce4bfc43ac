//! `radixseg._core`: the PyO3 binding of radixseg-core and radixseg-cpu. It
//! only converts arguments, releases the GIL around batch work and maps
//! errors; all logic lives in the Rust crates. Page ids cross the boundary as
//! numpy arrays (the Python package wraps them as torch tensors).
//!
//! One module per exposed type, as tokenizers' bindings are laid out:
//! `errors` (the exception classes and the one `CoreError` mapping),
//! `allocator` (`SegmentAllocator`), `tree` (`RadixTree`), `request`
//! (`RequestRecord`) and `cpu` (`decode_cpu`, `extend_cpu`, `cpu_isas`). This file holds
//! what they share (id arrays, GIL release, fork checks) and the module init.

use numpy::{
    PyArray1, PyArrayDescrMethods, PyReadonlyArray1, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

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

// Declared after `with_slice!`, which they use.
mod allocator;
mod cpu;
mod errors;
mod request;
mod tree;

use allocator::SegmentAllocator;
use errors::{CoreResultExt, InvalidArgument};
use request::RequestRecord;
use tree::RadixTree;

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

/// Ids as the core's calls read them: an int32 array's bits in place (the
/// `_u32` calls refuse a negative value as the same int64 array would be
/// refused), or an int64 array's values.
pub(crate) enum Slice<'a> {
    Bits(&'a [u32]),
    Wide(&'a [i64]),
}

impl<'a> Slice<'a> {
    pub(crate) fn of(ids: &'a Ids<'_>) -> PyResult<Self> {
        Ok(match ids {
            Ids::I32(a) => Slice::Bits(bytemuck::cast_slice(a.as_slice()?)),
            Ids::I64(a) => Slice::Wide(a.as_slice()?),
        })
    }
}

/// `Ok(Err(pages asked for))` in place of `OutOfPages` when `short_ok`: the
/// request path's common miss (the pool must grow or evict first) without
/// building an exception object.
fn short_as_value<T>(
    r: Result<T, radixseg_core::CoreError>,
    short_ok: bool,
) -> Result<Result<T, u64>, radixseg_core::CoreError> {
    match r {
        Err(radixseg_core::CoreError::OutOfPages { requested, .. }) if short_ok => {
            Ok(Err(requested))
        }
        other => other.map(Ok),
    }
}

/// Retry `extend` after evicting the shortfall from `tree` while the
/// allocator is short, as the pool does once its budget is spent, but only
/// while the allocator still has `evict_at` segments (the count at which
/// the pool found it could not grow; -1: never evict here, let the pool
/// decide). Stops when eviction cannot cover the shortfall or frees nothing.
fn extend_evicting<T>(
    allocator: &radixseg_core::SegmentAllocator,
    tree: &std::sync::Mutex<radixseg_core::RadixTree>,
    evict_at: i64,
    mut extend: impl FnMut() -> Result<T, radixseg_core::CoreError>,
) -> Result<T, radixseg_core::CoreError> {
    let mut res = extend();
    while let Err(radixseg_core::CoreError::OutOfPages { requested, .. }) = res {
        if evict_at < 0 || i64::from(allocator.segment_count()) != evict_at {
            break;
        }
        let short = requested.saturating_sub(allocator.free_pages()).max(1) as usize;
        let mut t = tree
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.evictable_pages() < short || t.evict(short)? == 0 {
            break;
        }
        drop(t);
        res = extend();
    }
    res
}

/// Slots as an int64 array, or the pages asked for as an int.
fn slots_or_short(py: Python<'_>, r: Result<Vec<i64>, u64>) -> PyResult<Bound<'_, PyAny>> {
    match r {
        Ok(slots) => Ok(PyArray1::from_vec(py, slots).into_any()),
        Err(requested) => Ok(requested.into_pyobject(py)?.into_any()),
    }
}

fn ids_array(py: Python<'_>, ids: Vec<u32>) -> Bound<'_, PyArray1<i32>> {
    // Page ids are below 2^31 by construction (PAGE_ID_LIMIT).
    PyArray1::from_vec(py, ids.into_iter().map(|x| x as i32).collect())
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
    errors::register(m)?;
    m.add_class::<SegmentAllocator>()?;
    m.add_class::<RadixTree>()?;
    m.add_class::<RequestRecord>()?;
    m.add("TOKEN_LIMIT", radixseg_core::TOKEN_LIMIT)?;
    m.add_function(wrap_pyfunction!(cpu::decode_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(cpu::extend_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(cpu::cpu_isas, m)?)?;
    // Objects made before a fork refuse use in the child (see check_born).
    let after_fork = wrap_pyfunction!(_after_fork_in_child, m)?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("after_in_child", after_fork)?;
    py.import("os")?
        .getattr("register_at_fork")?
        .call((), Some(&kwargs))?;
    Ok(())
}
