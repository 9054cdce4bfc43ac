//! `decode_cpu`, `extend_cpu` and `cpu_isas`: the native CPU decode and
//! extend kernels (`radixseg-cpu`) over the segment buffers, with the GIL
//! released.

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use radixseg_cpu as cpu;

use crate::errors::{CoreResultExt, InvalidArgument};
use crate::maybe_detach;

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

/// Each segment's bytes of the layer (`None` for a retired slot).
fn segment_layers<'a>(
    buffers: &'a [Option<PyReadonlyArray1<'_, u8>>],
    offsets: &[usize; 4],
    geometry: &cpu::PoolGeometry,
) -> PyResult<Vec<Option<cpu::SegmentLayer<'a>>>> {
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
    Ok(layers)
}

/// `(out, lse, isa)` of [`decode_cpu`] and [`extend_cpu`].
type DecodeResult<'py> = (
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    &'static str,
);

/// What [`decode_cpu`] and [`extend_cpu`] take alike, parsed: the pool's
/// geometry and each segment's bytes of the layer, the instruction set and
/// the mask/cap options.
struct KernelArgs<'a> {
    geometry: cpu::PoolGeometry,
    layers: Vec<Option<cpu::SegmentLayer<'a>>>,
    isa: cpu::Isa,
    options: cpu::DecodeOptions,
}

impl<'a> KernelArgs<'a> {
    #[allow(clippy::too_many_arguments)]
    fn parse(
        buffers: &'a [Option<PyReadonlyArray1<'_, u8>>],
        offsets: &[usize; 4],
        page_size: usize,
        pages_per_segment: usize,
        kv_heads: usize,
        head_dim: usize,
        format: &str,
        isa: &str,
        window_left: i64,
        chunk_size: i64,
        soft_cap: f32,
    ) -> PyResult<Self> {
        let geometry = cpu::PoolGeometry {
            page_size,
            pages_per_segment,
            kv_heads,
            head_dim,
            format: kv_format(format)?,
        };
        let isa = isa_named(isa)?;
        let layers = segment_layers(buffers, offsets, &geometry)?;
        Ok(KernelArgs {
            geometry,
            layers,
            isa,
            options: cpu::DecodeOptions {
                window_left,
                chunk_size,
                soft_cap,
            },
        })
    }
}

/// Run `kernel`, with the GIL released when `work` (page ids plus query
/// rows or requests) is large enough to pay for it, and hand its output
/// to Python.
fn run_kernel<'py>(
    py: Python<'py>,
    work: usize,
    kernel: impl Send + FnOnce() -> radixseg_core::Result<cpu::DecodeOutput>,
) -> PyResult<DecodeResult<'py>> {
    let r = maybe_detach(py, work, kernel).py(py)?;
    Ok((
        PyArray1::from_vec(py, r.out),
        PyArray1::from_vec(py, r.lse),
        r.isa.name(),
    ))
}

/// Decode attention on the CPU over a segmented pool (the native kernel
/// behind `radixseg.attention.decode(..., backend="cpu")`; use that).
///
/// `buffers[s]` is segment `s`'s whole byte buffer (a uint8 view of it, or
/// None for a retired slot) and `offsets` the byte offsets of the layer's K,
/// V, K-scale and V-scale inside every buffer. `q` is float32
/// `[batch * q_heads * head_dim]`; the page table is int64 CSR. Returns
/// `(out [batch * q_heads * head_dim], lse [batch * q_heads], isa)`, float32,
/// natural-log LSE. `window_left` (-1: off) limits each query at position
/// `p = kv_len - 1` to keys `>= p - window_left`, `chunk_size` (0: off) to
/// keys of its chunk (`>= chunk_size * (p // chunk_size)`), not both;
/// `soft_cap` (0: off) caps scores to `soft_cap * tanh(score / soft_cap)`.
/// Runs with the GIL released: no other thread may write
/// the layer meanwhile (as for any kernel reading it).
#[pyfunction]
// The text signature is spelled out: pyo3 renders the default -1 as `...`.
#[pyo3(
    signature = (buffers, offsets, page_size, pages_per_segment, kv_heads, head_dim, format, q, q_heads, kv_indptr, kv_indices, kv_lens, sm_scale, threads=1, isa="auto", window_left=-1, chunk_size=0, soft_cap=0.0),
    text_signature = "(buffers, offsets, page_size, pages_per_segment, kv_heads, head_dim, format, q, q_heads, kv_indptr, kv_indices, kv_lens, sm_scale, threads=1, isa='auto', window_left=-1, chunk_size=0, soft_cap=0.0)"
)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_cpu<'py>(
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
    window_left: i64,
    chunk_size: i64,
    soft_cap: f32,
) -> PyResult<DecodeResult<'py>> {
    let a = KernelArgs::parse(
        &buffers,
        &offsets,
        page_size,
        pages_per_segment,
        kv_heads,
        head_dim,
        format,
        isa,
        window_left,
        chunk_size,
        soft_cap,
    )?;
    let batch = cpu::DecodeBatch {
        q: q.as_slice()?,
        q_heads,
        indptr: kv_indptr.as_slice()?,
        indices: kv_indices.as_slice()?,
        kv_lens: kv_lens.as_slice()?,
        sm_scale,
    };
    let work = batch.indices.len() + batch.kv_lens.len();
    run_kernel(py, work, || {
        cpu::decode_with(&a.geometry, &a.layers, &batch, &a.options, threads, a.isa)
    })
}

/// Extend attention on the CPU over a segmented pool (the native kernel
/// behind `radixseg.attention.extend(..., backend="cpu")`; use that).
///
/// Arguments as for `decode_cpu`, plus `qo_indptr` (int64 `[batch + 1]`):
/// request `i`'s new tokens are rows `qo_indptr[i]:qo_indptr[i + 1]` of
/// `q` (float32 `[total_q * q_heads * head_dim]`) and the last ones of its
/// `kv_lens[i]` KV tokens. With `causal` row `r` sits at position
/// `kv_len - qo_len + r` and sees keys up to its own (window, chunk and
/// soft cap as in `decode_cpu`, relative to that position); without, every
/// key. Returns `(out [total_q * q_heads * head_dim], lse [total_q *
/// q_heads], isa)`, float32, natural-log LSE; rows that see no key get 0
/// and -inf. Runs with the GIL released.
#[pyfunction]
#[pyo3(
    signature = (buffers, offsets, page_size, pages_per_segment, kv_heads, head_dim, format, q, q_heads, qo_indptr, kv_indptr, kv_indices, kv_lens, sm_scale, causal=true, threads=1, isa="auto", window_left=-1, chunk_size=0, soft_cap=0.0),
    text_signature = "(buffers, offsets, page_size, pages_per_segment, kv_heads, head_dim, format, q, q_heads, qo_indptr, kv_indptr, kv_indices, kv_lens, sm_scale, causal=True, threads=1, isa='auto', window_left=-1, chunk_size=0, soft_cap=0.0)"
)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn extend_cpu<'py>(
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
    qo_indptr: PyReadonlyArray1<'py, i64>,
    kv_indptr: PyReadonlyArray1<'py, i64>,
    kv_indices: PyReadonlyArray1<'py, i64>,
    kv_lens: PyReadonlyArray1<'py, i64>,
    sm_scale: f32,
    causal: bool,
    threads: usize,
    isa: &str,
    window_left: i64,
    chunk_size: i64,
    soft_cap: f32,
) -> PyResult<DecodeResult<'py>> {
    let a = KernelArgs::parse(
        &buffers,
        &offsets,
        page_size,
        pages_per_segment,
        kv_heads,
        head_dim,
        format,
        isa,
        window_left,
        chunk_size,
        soft_cap,
    )?;
    let batch = cpu::ExtendBatch {
        q: q.as_slice()?,
        q_heads,
        qo_indptr: qo_indptr.as_slice()?,
        indptr: kv_indptr.as_slice()?,
        indices: kv_indices.as_slice()?,
        kv_lens: kv_lens.as_slice()?,
        sm_scale,
        causal,
    };
    let work = batch.indices.len() + batch.q.len() / head_dim.max(1);
    run_kernel(py, work, || {
        cpu::extend(&a.geometry, &a.layers, &batch, &a.options, threads, a.isa)
    })
}

/// Instruction sets the CPU decode kernel can use here, widest first.
#[pyfunction]
pub(crate) fn cpu_isas() -> Vec<&'static str> {
    cpu::Isa::available()
        .into_iter()
        .map(|i| i.name())
        .collect()
}
