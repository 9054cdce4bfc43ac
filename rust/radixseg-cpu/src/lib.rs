//! Decode and extend attention on the CPU, straight out of a segmented KV pool.
//!
//! One query token per request attends to the request's paged KV, wherever
//! its pages live: page id `p` is page `p % pages_per_segment` of segment
//! `p / pages_per_segment`, and each segment's bytes of one layer are handed
//! in as plain slices (the Python package passes views of the segment
//! tensors, with no copy). The layout is the pool's: token-major pages,
//! `[pages, page_size, kv_heads, head_dim]` codes and, for FP8,
//! `[pages, page_size, kv_heads]` `f32` scales.
//!
//! A request may attend only part of its KV ([`DecodeOptions`]): a sliding
//! window (`window_left`, FlashInfer's inclusive left window) or a chunk
//! (`chunk_size`, Llama 4's chunked local attention). Its query at position
//! `p = kv_len - 1` then sees positions `lo..kv_len` only, and the pages
//! before `lo` are never read (the first page read may start inside it).
//! Logits may be soft-capped (`cap * tanh(s / cap)`, Gemma 2); the `tanh`
//! is a vector rational approximation in every instruction set (relative
//! error below 1e-6; see `kernel::tanh`).
//!
//! The work is split into items of one (request, KV head, chunk of at most
//! [`CHUNK_TOKENS`] tokens of `lo..kv_len`); each item runs an online softmax over blocks of
//! [`BLOCK`] tokens (decode the block's codes to `f32`, score, exponentiate,
//! accumulate V), and the items of one (request, head) are merged by
//! log-sum-exp in chunk order. The chunking does not depend on the thread
//! count, so results are the same with 1 thread or 16.
//!
//! [`extend`] runs several new query rows per request (prefill, chunked
//! prefill over a cached prefix), causal from each row's position
//! `kv_len - qo_len + r`, with the same options. Its items are (request,
//! tile of query rows, KV head): the tile's rows x GQA heads share every
//! K/V block decoded, each runs its own online softmax, and only the pages
//! some row of the tile sees are read (see the `extend` module). Items are
//! handed out largest first and write disjoint outputs, so the result is
//! again the same with any thread count.
//!
//! Four instruction sets share one generic kernel through the [`Simd`]
//! trait: AVX-512 (16 lanes), AVX2 + FMA + F16C (8 lanes), NEON on AArch64
//! (4 lanes) and a portable scalar path (any CPU, any `head_dim`). The x86
//! paths decode FP8 by moving the code's bits into a half-precision pattern
//! and converting it in hardware (exact for every finite code, subnormals
//! included); NEON moves the bits straight into an `f32` pattern and
//! rescales by a power of two (exact the same way); the scalar path uses a
//! 256-entry table built like the x86 one, so all of them agree on every
//! code. e4m3's NaN codes read as ±480, as the GPU kernels' software
//! decode does; the pool writes them only next to a NaN scale.
//!
//! The crate holds radixseg's only `unsafe` code outside the core's `OnceBox`: the
//! intrinsics of the vector paths, the prefetch hints and the helper
//! pool's hand-over of a borrowed job (`pool`), each block with a
//! `// SAFETY:` comment. It depends on `radixseg-core` for the error type
//! only; the Python binding (`radixseg-py`) is its one user. Modules follow
//! the kernel's stages: `checks` validates the call, `isa` picks the
//! instruction set, `schedule` splits the batch into items, runs them on
//! the calling thread and parked helpers (`pool`; as many as the KV read
//! pays for, see [`BYTES_PER_THREAD`]) and merges them by log-sum-exp, `kernel` is the generic
//! per-item loop, `format` decodes FP8/fp16/bf16 codes, and `simd` holds the
//! scalar, x86 and NEON implementations of the vector operations.

#![warn(missing_docs)]

mod checks;
mod extend;
mod format;
mod isa;
mod kernel;
mod pool;
mod schedule;
mod simd;
#[cfg(test)]
mod tests;

use checks::{check_batch, check_extend, check_geometry, check_options, check_segments};
pub use format::KvFormat;
use isa::choose_isa;
pub use isa::Isa;
use radixseg_core::Result;
use schedule::{run, Ctx};

/// Tokens per work item: a long request is split into chunks of this many
/// tokens (rounded to whole pages) that run on different threads.
pub const CHUNK_TOKENS: usize = 4096;
/// KV bytes (codes and scales) per extra thread a decode call wakes: waking
/// a parked helper and handing it items costs some microseconds, and a
/// helper is worth it only when it has far more than that to read (one
/// core decodes this many bytes in about 0.1 ms). Smaller calls run on
/// fewer threads, down to the calling thread alone.
pub const BYTES_PER_THREAD: usize = 1 << 20;

/// Tokens decoded and scored together inside an item.
pub const BLOCK: usize = 16;
/// Query vectors (rows x query heads of one KV head) of one extend work
/// item: a tile has `max(1, EXTEND_VECTORS / group)` query rows.
pub const EXTEND_VECTORS: usize = 64;

/// The pool's shape, the same for every segment.
#[derive(Clone, Copy, Debug)]
pub struct PoolGeometry {
    /// Tokens per page.
    pub page_size: usize,
    /// Pages per segment.
    pub pages_per_segment: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Storage format.
    pub format: KvFormat,
}

impl PoolGeometry {
    pub(crate) fn tokens_per_segment(&self) -> usize {
        self.pages_per_segment * self.page_size
    }

    /// Bytes of one layer's K (or V) codes in one segment.
    pub fn kv_layer_bytes(&self) -> usize {
        self.tokens_per_segment() * self.kv_heads * self.head_dim * self.format.element_bytes()
    }

    /// Bytes of one layer's K (or V) scales in one segment (0 unless FP8).
    pub fn scale_layer_bytes(&self) -> usize {
        if self.format.scaled() {
            self.tokens_per_segment() * self.kv_heads * 4
        } else {
            0
        }
    }
}

/// One segment's bytes of one layer.
#[derive(Clone, Copy, Debug)]
pub struct SegmentLayer<'a> {
    /// K codes, [`PoolGeometry::kv_layer_bytes`] long.
    pub k: &'a [u8],
    /// V codes, as long as `k`.
    pub v: &'a [u8],
    /// K scales (`f32`, native byte order), [`PoolGeometry::scale_layer_bytes`] long.
    pub k_scale: &'a [u8],
    /// V scales, as long as `k_scale`.
    pub v_scale: &'a [u8],
}

/// The queries and the CSR page table of one decode call.
#[derive(Clone, Copy, Debug)]
pub struct DecodeBatch<'a> {
    /// `[batch, q_heads, head_dim]` queries, row-major.
    pub q: &'a [f32],
    /// Query heads; a multiple of the pool's KV heads (GQA).
    pub q_heads: usize,
    /// `[batch + 1]` offsets into `indices`.
    pub indptr: &'a [i64],
    /// Page ids, request after request.
    pub indices: &'a [i64],
    /// `[batch]` KV tokens of each request: its pages hold them, the last page partly.
    pub kv_lens: &'a [i64],
    /// Softmax scale applied to `q . k`.
    pub sm_scale: f32,
}

/// The queries and the CSR page table of one extend call: several new
/// tokens per request, the last ones of its KV.
#[derive(Clone, Copy, Debug)]
pub struct ExtendBatch<'a> {
    /// `[total_q, q_heads, head_dim]` queries, row-major; request `i` owns
    /// rows `qo_indptr[i]..qo_indptr[i + 1]`.
    pub q: &'a [f32],
    /// Query heads; a multiple of the pool's KV heads (GQA).
    pub q_heads: usize,
    /// `[batch + 1]` offsets into the rows of `q` (from 0, non-decreasing,
    /// ending at `total_q`).
    pub qo_indptr: &'a [i64],
    /// `[batch + 1]` offsets into `indices`.
    pub indptr: &'a [i64],
    /// Page ids, request after request.
    pub indices: &'a [i64],
    /// `[batch]` KV tokens of each request, its new tokens included.
    pub kv_lens: &'a [i64],
    /// Softmax scale applied to `q . k`.
    pub sm_scale: f32,
    /// Row `r` of a request with `qo` new tokens sits at position
    /// `kv_len - qo + r` and sees keys up to its own (then `qo <= kv_len`);
    /// without, every row sees every key (and no window or chunk is allowed).
    pub causal: bool,
}

/// Which keys each query sees, and how its logits are capped.
///
/// With the defaults ([`DecodeOptions::FULL`]) a query sees all of its
/// request's KV and its scores are not capped. For a request of `n` KV
/// tokens the query sits at position `p = n - 1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeOptions {
    /// Keys at positions `>= p - window_left` only (inclusive left window:
    /// `window_left + 1` keys with the query's own); -1 turns it off.
    pub window_left: i64,
    /// Keys in the query's chunk only: positions `>= chunk_size * (p / chunk_size)`;
    /// 0 turns it off. Not together with `window_left`.
    pub chunk_size: i64,
    /// Scores become `soft_cap * tanh(score / soft_cap)` (the score
    /// including `sm_scale`) before the softmax and the log-sum-exp; 0 turns
    /// it off.
    pub soft_cap: f32,
}

impl DecodeOptions {
    /// Every key, no cap.
    pub const FULL: DecodeOptions = DecodeOptions {
        window_left: -1,
        chunk_size: 0,
        soft_cap: 0.0,
    };

    /// First position a query over `kv_len` tokens sees (0 for no KV);
    /// the options must have passed validation.
    pub(crate) fn first_key(&self, kv_len: usize) -> usize {
        let Some(p) = kv_len.checked_sub(1) else {
            return 0;
        };
        if self.window_left >= 0 {
            p.saturating_sub(usize::try_from(self.window_left).unwrap_or(usize::MAX))
        } else if self.chunk_size > 0 {
            let c = usize::try_from(self.chunk_size).unwrap_or(usize::MAX);
            p / c * c
        } else {
            0
        }
    }
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self::FULL
    }
}

/// Outputs and log-sum-exps of one decode (or extend) call; rows without
/// a visible key get 0 and `-inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeOutput {
    /// Attention outputs.
    pub out: Vec<f32>,
    /// Log-sum-exp of the scaled scores, natural log.
    pub lse: Vec<f32>,
    /// The instruction set that ran.
    pub isa: Isa,
}

/// Attention of one query token per request over its paged KV.
///
/// `segments[s]` is segment `s`'s bytes of the layer (`None` for a retired
/// slot). Up to `threads` workers run the items: one per
/// [`BYTES_PER_THREAD`] bytes of KV read, so a small call runs on this thread
/// alone (1 always does).
/// Errors (`InvalidInput`) leave nothing half-written: outputs are returned,
/// never written in place.
pub fn decode(
    geometry: &PoolGeometry,
    segments: &[Option<SegmentLayer<'_>>],
    batch: &DecodeBatch<'_>,
    threads: usize,
    isa: Isa,
) -> Result<DecodeOutput> {
    decode_with(
        geometry,
        segments,
        batch,
        &DecodeOptions::FULL,
        threads,
        isa,
    )
}

/// [`decode`] with a window, a chunk size or a soft cap ([`DecodeOptions`]);
/// the pages before each request's first visible key are not read.
pub fn decode_with(
    geometry: &PoolGeometry,
    segments: &[Option<SegmentLayer<'_>>],
    batch: &DecodeBatch<'_>,
    options: &DecodeOptions,
    threads: usize,
    isa: Isa,
) -> Result<DecodeOutput> {
    check_options(options)?;
    check_geometry(geometry)?;
    check_segments(geometry, segments)?;
    let n = check_batch(geometry, segments, batch)?;
    let isa = choose_isa(isa, geometry.head_dim)?;
    let ctx = Ctx {
        g: *geometry,
        segments,
        group: batch.q_heads / geometry.kv_heads,
        options: *options,
    };
    let (out, lse) = run(&ctx, batch, n, threads.max(1), isa);
    Ok(DecodeOutput { out, lse, isa })
}

/// Attention of several new query tokens per request over its paged KV
/// (prefill, or chunked prefill over a cached prefix): causal, with a
/// window, a chunk size or a soft cap as in [`decode_with`]. Returns
/// `out [total_q, q_heads, head_dim]` and the natural-log `lse [total_q,
/// q_heads]`. Work items are (request, tile of query rows, KV head); pages
/// outside what a tile's rows see are not read. Same results with any
/// `threads`.
pub fn extend(
    geometry: &PoolGeometry,
    segments: &[Option<SegmentLayer<'_>>],
    batch: &ExtendBatch<'_>,
    options: &DecodeOptions,
    threads: usize,
    isa: Isa,
) -> Result<DecodeOutput> {
    extend_tiled(
        geometry,
        segments,
        batch,
        options,
        threads,
        isa,
        EXTEND_VECTORS,
    )
}

/// [`extend`] with tiles of at most `vectors` query vectors (the tests and
/// the tile-size measurement use it).
pub(crate) fn extend_tiled(
    geometry: &PoolGeometry,
    segments: &[Option<SegmentLayer<'_>>],
    batch: &ExtendBatch<'_>,
    options: &DecodeOptions,
    threads: usize,
    isa: Isa,
    vectors: usize,
) -> Result<DecodeOutput> {
    check_options(options)?;
    check_geometry(geometry)?;
    check_segments(geometry, segments)?;
    let n = check_extend(geometry, segments, batch, options)?;
    let isa = choose_isa(isa, geometry.head_dim)?;
    let ctx = Ctx {
        g: *geometry,
        segments,
        group: batch.q_heads / geometry.kv_heads,
        options: *options,
    };
    let (out, lse) = extend::run(&ctx, batch, n, threads.max(1), isa, vectors.max(1));
    Ok(DecodeOutput { out, lse, isa })
}
