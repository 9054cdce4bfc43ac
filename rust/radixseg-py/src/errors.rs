//! The Python exception hierarchy, rooted at `RadixsegError` (every class
//! radixseg raises, `KVPool`'s `BudgetExhausted` and `DeviceOutOfMemory`
//! included), and the one mapping from the core's `CoreError` to it. `to_py` names every variant
//! (no wildcard arm; `CoreError` is not `#[non_exhaustive]`, the two crates
//! release together), so a new variant does not compile until it has a class
//! and its numbers here; `python/radixseg/_core.pyi` declares the attributes.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use radixseg_core::{CoreError, HandleProblem};

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
    DeviceOutOfMemory,
    OutOfPages,
    "The device refused memory for a new segment (or, without a budget, has too little free \
     for the segments needed) and eviction freed none. Raised by KVPool.alloc; the tensor \
     factory's error (torch.OutOfMemoryError or any other) is __cause__. Nothing changed. \
     Attributes: requested, available, reserved_bytes, budget_bytes."
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

/// Add the exception classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("RadixsegError", py.get_type::<RadixsegError>())?;
    m.add("OutOfPages", py.get_type::<OutOfPages>())?;
    m.add("BudgetExhausted", py.get_type::<BudgetExhausted>())?;
    m.add("DeviceOutOfMemory", py.get_type::<DeviceOutOfMemory>())?;
    m.add("InvalidHandle", py.get_type::<InvalidHandle>())?;
    m.add("DoubleFree", py.get_type::<DoubleFree>())?;
    m.add("SegmentBusy", py.get_type::<SegmentBusy>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("InvariantViolation", py.get_type::<InvariantViolation>())?;
    Ok(())
}

/// The one mapping from core errors to Python exceptions: each variant's
/// class and the numbers it carries as attributes (the message has them too).
pub(crate) fn to_py(py: Python<'_>, e: CoreError) -> PyErr {
    let msg = e.to_string();
    let (err, attrs): (PyErr, Vec<(&str, i64)>) = match e {
        CoreError::InvalidConfig { .. } => (InvalidArgument::new_err(msg), Vec::new()),
        CoreError::OutOfPages {
            requested,
            available,
            total,
            segments,
        } => (
            OutOfPages::new_err(msg),
            vec![
                ("requested", requested as i64),
                ("available", available as i64),
                ("total", total as i64),
                ("segments", i64::from(segments)),
            ],
        ),
        CoreError::InvalidHandle { page_id, problem } => {
            let mut attrs = vec![("page_id", page_id)];
            match problem {
                HandleProblem::SegmentNotLive { segment } => {
                    attrs.push(("segment", i64::from(segment)));
                }
                HandleProblem::OutOfRange { .. } | HandleProblem::Free => {}
            }
            (InvalidHandle::new_err(msg), attrs)
        }
        CoreError::DoubleFree { page_id } => (
            DoubleFree::new_err(msg),
            vec![("page_id", i64::from(page_id))],
        ),
        CoreError::RefcountOverflow { page_id } => (
            RadixsegError::new_err(msg),
            vec![("page_id", i64::from(page_id))],
        ),
        CoreError::SegmentBusy {
            segment,
            used_pages,
        } => (
            SegmentBusy::new_err(msg),
            vec![
                ("segment", i64::from(segment)),
                ("used_pages", i64::from(used_pages)),
            ],
        ),
        CoreError::InvalidSegment { segment, .. } => {
            (InvalidArgument::new_err(msg), vec![("segment", segment)])
        }
        CoreError::SegmentNotReserved { segment } => {
            (InvalidArgument::new_err(msg), vec![("segment", segment)])
        }
        CoreError::IdSpaceExhausted { segments, limit } => (
            OutOfPages::new_err(msg),
            vec![
                ("segments", i64::from(segments)),
                ("limit", i64::from(limit)),
            ],
        ),
        CoreError::InvalidToken { index, value } => (
            InvalidArgument::new_err(msg),
            vec![("index", index as i64), ("value", value)],
        ),
        CoreError::LengthMismatch { .. } => (InvalidArgument::new_err(msg), Vec::new()),
        CoreError::InvalidNode { node } => (InvalidHandle::new_err(msg), vec![("node", node)]),
        CoreError::UnbalancedUnlock { node } => (
            InvalidArgument::new_err(msg),
            vec![("node", i64::from(node))],
        ),
        CoreError::Malformed(_) => (InvariantViolation::new_err(msg), Vec::new()),
        CoreError::InvalidInput(_) => (InvalidArgument::new_err(msg), Vec::new()),
        CoreError::TreeCapacity { .. } => (RadixsegError::new_err(msg), Vec::new()),
    };
    let value = err.value(py);
    for (k, v) in attrs {
        // Attributes are a convenience; the message already says everything.
        let _ = value.setattr(k, v);
    }
    err
}

/// Extension trait: `core_call().py(py)?`.
pub(crate) trait CoreResultExt<T> {
    fn py(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> CoreResultExt<T> for Result<T, CoreError> {
    fn py(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
