//! Decode attention on the CPU, straight out of a segmented KV pool.
//!
//! One query token per request attends to the request's paged KV, wherever
//! its pages live: page id `p` is page `p % pages_per_segment` of segment
//! `p / pages_per_segment`, and each segment's bytes of one layer are handed
//! in as plain slices (the Python package passes views of the segment
//! tensors, with no copy). The layout is the pool's: token-major pages,
//! `[pages, page_size, kv_heads, head_dim]` codes and, for FP8,
//! `[pages, page_size, kv_heads]` `f32` scales.
//!
//! The work is split into items of one (request, KV head, chunk of at most
//! [`CHUNK_TOKENS`] tokens); each item runs an online softmax over blocks of
//! [`BLOCK`] tokens (decode the block's codes to `f32`, score, exponentiate,
//! accumulate V), and the items of one (request, head) are merged by
//! log-sum-exp in chunk order. The chunking does not depend on the thread
//! count, so results are the same with 1 thread or 16.
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

use radixseg_core::{CoreError, Result};
use std::sync::OnceLock;

/// Tokens per work item: a long request is split into chunks of this many
/// tokens (rounded to whole pages) that run on different threads.
pub const CHUNK_TOKENS: usize = 4096;
/// Tokens decoded and scored together inside an item.
pub const BLOCK: usize = 16;

/// Storage format of the pool's K/V codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvFormat {
    /// FP8 e4m3 (`float8_e4m3fn`) with per-(token, head) `f32` scales.
    E4m3,
    /// FP8 e5m2 with per-(token, head) `f32` scales.
    E5m2,
    /// IEEE half precision, unscaled.
    F16,
    /// bfloat16, unscaled.
    Bf16,
    /// `f32`, unscaled.
    F32,
}

/// [`KvFormat`] as const-generic codes, so each format's decode loop is
/// compiled on its own (no per-vector dispatch).
mod fmt {
    pub const E4M3: u8 = 0;
    pub const E5M2: u8 = 1;
    pub const F16: u8 = 2;
    pub const BF16: u8 = 3;
    pub const F32: u8 = 4;
}

impl KvFormat {
    /// Inverse of [`KvFormat::code`] (a constant in every caller).
    #[inline(always)]
    const fn from_code(code: u8) -> Self {
        match code {
            fmt::E4M3 => Self::E4m3,
            fmt::E5M2 => Self::E5m2,
            fmt::F16 => Self::F16,
            fmt::BF16 => Self::Bf16,
            _ => Self::F32,
        }
    }

    /// Bytes of one element.
    pub fn element_bytes(self) -> usize {
        match self {
            Self::E4m3 | Self::E5m2 => 1,
            Self::F16 | Self::Bf16 => 2,
            Self::F32 => 4,
        }
    }

    /// Whether codes carry a per-(token, head) scale.
    pub fn scaled(self) -> bool {
        matches!(self, Self::E4m3 | Self::E5m2)
    }

    /// What a decoded value must be multiplied by: e4m3 is decoded through
    /// half precision, whose exponent bias is 8 larger.
    fn factor(self) -> f32 {
        if self == Self::E4m3 {
            256.0
        } else {
            1.0
        }
    }
}

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
    fn tokens_per_segment(&self) -> usize {
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

/// Which instruction set runs the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The widest this CPU supports (and `head_dim` allows).
    Auto,
    /// AVX-512 (F, BW, VL): 16 lanes.
    Avx512,
    /// AVX2 + FMA + F16C: 8 lanes.
    Avx2,
    /// AArch64 Advanced SIMD (NEON, part of every AArch64 CPU): 4 lanes.
    Neon,
    /// Plain scalar code: any CPU, any `head_dim`.
    Scalar,
}

impl Isa {
    /// The instruction sets this CPU can run, widest first (always ends with `Scalar`).
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar]
            .into_iter()
            .filter(|i| i.detected())
            .collect()
    }

    fn detected(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512_detected(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2_detected(),
            Isa::Neon => cfg!(target_arch = "aarch64"),
            Isa::Scalar => true,
            _ => false,
        }
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Auto => "auto",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
            Isa::Scalar => "scalar",
        }
    }

    fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Neon => 4,
            Isa::Auto | Isa::Scalar => 1,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512_detected() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && avx2_detected()
}

#[cfg(target_arch = "x86_64")]
fn avx2_detected() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// `[batch, q_heads, head_dim]` outputs and `[batch, q_heads]` natural-log
/// log-sum-exps of one decode call; requests without KV get 0 and `-inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeOutput {
    /// Attention outputs.
    pub out: Vec<f32>,
    /// Log-sum-exp of the scaled scores, natural log.
    pub lse: Vec<f32>,
    /// The instruction set that ran.
    pub isa: Isa,
}

fn bad(message: String) -> CoreError {
    CoreError::InvalidInput(message)
}

fn check_geometry(g: &PoolGeometry) -> Result<()> {
    for (what, v) in [
        ("page_size", g.page_size),
        ("pages_per_segment", g.pages_per_segment),
        ("kv_heads", g.kv_heads),
        ("head_dim", g.head_dim),
    ] {
        if v == 0 {
            return Err(bad(format!("{what} must be at least 1, got 0")));
        }
    }
    g.tokens_per_segment()
        .checked_mul(g.kv_heads * g.head_dim * 4)
        .ok_or_else(|| bad("segment geometry overflows usize".to_string()))?;
    Ok(())
}

fn check_segments(g: &PoolGeometry, segments: &[Option<SegmentLayer<'_>>]) -> Result<()> {
    let (kv, sc) = (g.kv_layer_bytes(), g.scale_layer_bytes());
    for (sid, seg) in segments.iter().enumerate() {
        let Some(s) = seg else { continue };
        for (what, len, need) in [
            ("k", s.k.len(), kv),
            ("v", s.v.len(), kv),
            ("k_scale", s.k_scale.len(), sc),
            ("v_scale", s.v_scale.len(), sc),
        ] {
            if len < need {
                return Err(bad(format!(
                    "segment {sid}: {what} holds {len} bytes, one layer needs {need}"
                )));
            }
        }
    }
    Ok(())
}

/// Validate the batch against the pool; returns `batch`.
fn check_batch(
    g: &PoolGeometry,
    segments: &[Option<SegmentLayer<'_>>],
    b: &DecodeBatch<'_>,
) -> Result<usize> {
    if b.q_heads == 0 || !b.q_heads.is_multiple_of(g.kv_heads) {
        return Err(bad(format!(
            "q_heads = {} must be a positive multiple of kv_heads = {}",
            b.q_heads, g.kv_heads
        )));
    }
    if b.indptr.is_empty() {
        return Err(bad("indptr needs batch + 1 >= 1 entries, got 0".to_string()));
    }
    let batch = b.indptr.len() - 1;
    let row = b.q_heads * g.head_dim;
    if b.q.len() != batch * row {
        return Err(bad(format!(
            "q holds {} values; {batch} requests x {} heads x {} dims need {}",
            b.q.len(),
            b.q_heads,
            g.head_dim,
            batch * row
        )));
    }
    if b.kv_lens.len() != batch {
        return Err(bad(format!(
            "kv_lens has {} entries, one per request ({batch}) needed",
            b.kv_lens.len()
        )));
    }
    if b.indptr[0] != 0 {
        return Err(bad(format!("indptr[0] must be 0, got {}", b.indptr[0])));
    }
    let ps = g.page_size as i64;
    for i in 0..batch {
        let (lo, hi) = (b.indptr[i], b.indptr[i + 1]);
        if hi < lo || hi as u64 > b.indices.len() as u64 {
            return Err(bad(format!(
                "indptr[{i}..={}] = {lo}..{hi} is not a range inside the {} page ids",
                i + 1,
                b.indices.len()
            )));
        }
        let (pages, len) = (hi - lo, b.kv_lens[i]);
        let need = if len > 0 { (len - 1) / ps + 1 } else { 0 };
        if len < 0 || need != pages {
            return Err(bad(format!(
                "request {i}: {len} KV tokens need {need} pages of {ps}, the table gives {pages}"
            )));
        }
    }
    let used = b.indptr[batch] as usize;
    let limit = segments.len() as u64 * g.pages_per_segment as u64;
    for (j, &p) in b.indices[..used].iter().enumerate() {
        let live =
            p >= 0 && (p as u64) < limit && segments[p as usize / g.pages_per_segment].is_some();
        if !live {
            return Err(bad(format!(
                "kv_indices[{j}] = {p} is not a page of a live segment (ids 0..{limit}, \
                 {} pages per segment)",
                g.pages_per_segment
            )));
        }
    }
    Ok(batch)
}

/// Attention of one query token per request over its paged KV.
///
/// `segments[s]` is segment `s`'s bytes of the layer (`None` for a retired
/// slot). `threads` workers run the items (1 runs them on this thread).
/// Errors (`InvalidInput`) leave nothing half-written: outputs are returned,
/// never written in place.
pub fn decode(
    geometry: &PoolGeometry,
    segments: &[Option<SegmentLayer<'_>>],
    batch: &DecodeBatch<'_>,
    threads: usize,
    isa: Isa,
) -> Result<DecodeOutput> {
    check_geometry(geometry)?;
    check_segments(geometry, segments)?;
    let n = check_batch(geometry, segments, batch)?;
    let isa = choose_isa(isa, geometry.head_dim)?;
    let ctx = Ctx {
        g: *geometry,
        segments,
        group: batch.q_heads / geometry.kv_heads,
    };
    let (out, lse) = run(&ctx, batch, n, threads.max(1), isa);
    Ok(DecodeOutput { out, lse, isa })
}

fn choose_isa(isa: Isa, head_dim: usize) -> Result<Isa> {
    let available = Isa::available();
    if isa == Isa::Auto {
        let best = available
            .into_iter()
            .find(|i| head_dim.is_multiple_of(i.lanes()))
            .unwrap_or(Isa::Scalar);
        return Ok(best);
    }
    if !available.contains(&isa) {
        return Err(bad(format!(
            "instruction set {} is not available on this CPU (available: {})",
            isa.name(),
            Isa::available()
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if !head_dim.is_multiple_of(isa.lanes()) {
        return Err(bad(format!(
            "instruction set {} needs head_dim to be a multiple of {}, got {head_dim}",
            isa.name(),
            isa.lanes()
        )));
    }
    Ok(isa)
}

/// What every item reads.
struct Ctx<'a, 'b> {
    g: PoolGeometry,
    segments: &'b [Option<SegmentLayer<'a>>],
    group: usize,
}

/// One unit of work: request `req`, KV head `head`, pages `pages` of it
/// holding `tokens` tokens.
#[derive(Clone, Copy)]
struct Item {
    req: usize,
    head: usize,
    first_page: usize,
    pages: usize,
    tokens: usize,
}

fn items(ctx: &Ctx<'_, '_>, b: &DecodeBatch<'_>, n: usize) -> Vec<Item> {
    let ps = ctx.g.page_size;
    let chunk_pages = (CHUNK_TOKENS / ps).max(1);
    let mut out = Vec::new();
    for req in 0..n {
        let first = b.indptr[req] as usize;
        let pages = b.indptr[req + 1] as usize - first;
        let len = b.kv_lens[req] as usize;
        for head in 0..ctx.g.kv_heads {
            let mut p = 0;
            while p < pages {
                let take = chunk_pages.min(pages - p);
                let tokens = (take * ps).min(len - p * ps);
                out.push(Item {
                    req,
                    head,
                    first_page: first + p,
                    pages: take,
                    tokens,
                });
                p += take;
            }
        }
    }
    out
}

/// Run every item on `threads` workers, then merge.
fn run(
    ctx: &Ctx<'_, '_>,
    b: &DecodeBatch<'_>,
    n: usize,
    threads: usize,
    isa: Isa,
) -> (Vec<f32>, Vec<f32>) {
    let (g, d) = (ctx.group, ctx.g.head_dim);
    // Queries scaled once so that scores are in log2 units (exp2 below).
    let scale = b.sm_scale * std::f32::consts::LOG2_E;
    let q: Vec<f32> = b.q.iter().map(|x| x * scale).collect();
    let work = items(ctx, b, n);
    // Per item: acc [group, d], then m [group], then l [group].
    let slot = g * (d + 2);
    let mut partial = vec![0.0f32; work.len() * slot];
    {
        let mut per_thread: Vec<Vec<(&Item, &mut [f32])>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (i, (item, part)) in work.iter().zip(partial.chunks_mut(slot)).enumerate() {
            per_thread[i % threads].push((item, part));
        }
        let job = |list: Vec<(&Item, &mut [f32])>| {
            let mut scratch = Scratch::new(g, d);
            for (item, part) in list {
                let row = (item.req * b.q_heads + item.head * g) * d;
                let pages = &b.indices[item.first_page..item.first_page + item.pages];
                run_item(
                    isa,
                    ctx,
                    &q[row..row + g * d],
                    item,
                    pages,
                    &mut scratch,
                    part,
                );
            }
        };
        if threads == 1 || work.len() <= 1 {
            per_thread.into_iter().for_each(job);
        } else {
            std::thread::scope(|s| {
                let mut lists = per_thread.into_iter();
                let mine = lists.next();
                for list in lists.filter(|l| !l.is_empty()) {
                    s.spawn(move || job(list));
                }
                if let Some(list) = mine {
                    job(list);
                }
            });
        }
    }
    merge(ctx, b, n, &work, &partial)
}

/// Merge the items of each (request, head) in chunk order.
fn merge(
    ctx: &Ctx<'_, '_>,
    b: &DecodeBatch<'_>,
    n: usize,
    work: &[Item],
    partial: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (g, d) = (ctx.group, ctx.g.head_dim);
    let slot = g * (d + 2);
    let mut out = vec![0.0f32; n * b.q_heads * d];
    let mut lse = vec![f32::NEG_INFINITY; n * b.q_heads];
    let mut i = 0;
    while i < work.len() {
        let (req, head) = (work[i].req, work[i].head);
        let mut j = i;
        while j < work.len() && work[j].req == req && work[j].head == head {
            j += 1;
        }
        for gi in 0..g {
            let m_of = |k: usize| partial[k * slot + g * d + gi];
            let l_of = |k: usize| partial[k * slot + g * d + g + gi];
            let qh = req * b.q_heads + head * g + gi;
            if (i..j).any(|k| m_of(k).is_nan()) {
                out[qh * d..(qh + 1) * d].fill(f32::NAN);
                lse[qh] = f32::NAN;
                continue;
            }
            let m = (i..j).map(m_of).fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                continue;
            }
            let o = &mut out[qh * d..(qh + 1) * d];
            let mut total = 0.0f32;
            for k in i..j {
                let w = (m_of(k) - m).exp2();
                total += w * l_of(k);
                let acc = &partial[k * slot + gi * d..k * slot + (gi + 1) * d];
                for (o, a) in o.iter_mut().zip(acc) {
                    *o += w * a;
                }
            }
            for x in o.iter_mut() {
                *x /= total;
            }
            lse[qh] = (m + total.log2()) * std::f32::consts::LN_2;
        }
        i = j;
    }
    (out, lse)
}

/// Per-thread buffers of the block loop.
struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[group, BLOCK]` scores, then probabilities times the V scales.
    p: Vec<f32>,
    ks: [f32; BLOCK],
    vs: [f32; BLOCK],
    /// `[group]`: what each head's accumulator is multiplied by this block.
    alpha: Vec<f32>,
    /// `[group]`: whether each head's accumulator takes this block.
    live: Vec<bool>,
}

impl Scratch {
    fn new(group: usize, d: usize) -> Self {
        Scratch {
            k: vec![0.0; BLOCK * d],
            v: vec![0.0; BLOCK * d],
            p: vec![0.0; group * BLOCK],
            ks: [1.0; BLOCK],
            vs: [1.0; BLOCK],
            alpha: vec![1.0; group],
            live: vec![false; group],
        }
    }
}

fn run_item(
    isa: Isa,
    ctx: &Ctx<'_, '_>,
    q: &[f32],
    item: &Item,
    pages: &[i64],
    scratch: &mut Scratch,
    part: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: `choose_isa` returns Avx512 only after `avx512_detected()`
            // found every feature `item_avx512` enables.
            unsafe { x86::item_avx512(ctx, q, item, pages, scratch, part) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: `choose_isa` returns Avx2 only after `avx2_detected()`
            // found every feature `item_avx2` enables.
            unsafe { x86::item_avx2(ctx, q, item, pages, scratch, part) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => arm::item_neon(ctx, q, item, pages, scratch, part),
        _ => item_generic(Scalar, ctx, q, item, pages, scratch, part),
    }
}

/// The vector operations the kernel needs; `F` holds `LANES` `f32`s.
///
/// Implementations for an instruction set are only ever called from a
/// function compiled with that set enabled and entered after runtime
/// detection (see [`run_item`]); every method is `#[inline(always)]` so that
/// it is compiled there.
trait Simd: Copy {
    const LANES: usize;
    type F: Copy;
    fn splat(self, x: f32) -> Self::F;
    /// The first `LANES` values of `s`.
    fn load(self, s: &[f32]) -> Self::F;
    /// The `LANES` values at `p`.
    ///
    /// # Safety
    /// `p .. p + LANES` must be inside one live `f32` slice.
    unsafe fn load_ptr(self, p: *const f32) -> Self::F;
    /// Into the first `LANES` values of `s`.
    fn store(self, v: Self::F, s: &mut [f32]);
    /// `a * b + c`.
    fn fma(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    fn add(self, a: Self::F, b: Self::F) -> Self::F;
    fn mul(self, a: Self::F, b: Self::F) -> Self::F;
    fn max(self, a: Self::F, b: Self::F) -> Self::F;
    fn sum(self, a: Self::F) -> f32;
    /// `out[t] = sum(v[t])` for the `BLOCK` vectors of `v`.
    fn sums(self, v: &[Self::F; BLOCK], out: &mut [f32]);
    fn max_lane(self, a: Self::F) -> f32;
    /// `a` with its lanes from `valid` on set to -inf.
    fn pad(self, a: Self::F, valid: usize) -> Self::F;
    /// Whether a lane of `a` is NaN.
    fn has_nan(self, a: Self::F) -> bool;
    /// `2^x` for `x <= 0` (NaN stays NaN).
    fn exp2(self, x: Self::F) -> Self::F;
    /// Decode the `dst.len()` codes at the start of `src` (`dst.len()` a
    /// multiple of `LANES`); e4m3 comes out divided by 256.
    fn decode<const F: u8>(self, src: &[u8], dst: &mut [f32]);
}

/// `2^f` for `f` in [-0.5, 0.5] (Cephes' exp2f polynomial; relative error below 2e-7).
const EXP2_POLY: [f32; 6] = [
    1.535_336_2e-4,
    1.339_887_4e-3,
    9.618_437e-3,
    5.550_332_5e-2,
    2.402_264_8e-1,
    6.931_472e-1,
];

#[inline(always)]
fn exp2_poly<S: Simd>(s: S, f: S::F) -> S::F {
    let mut p = s.splat(EXP2_POLY[0]);
    for c in &EXP2_POLY[1..] {
        p = s.fma(p, f, s.splat(*c));
    }
    s.fma(p, f, s.splat(1.0))
}

/// One item: online softmax over its tokens, block by block; writes
/// `part = [acc (group x d), m (group), l (group)]` with `m` in log2 units.
#[inline(always)]
fn item_generic<S: Simd>(
    s: S,
    ctx: &Ctx<'_, '_>,
    q: &[f32],
    item: &Item,
    pages: &[i64],
    sc: &mut Scratch,
    part: &mut [f32],
) {
    match ctx.g.format {
        KvFormat::E4m3 => item_format::<S, { fmt::E4M3 }>(s, ctx, q, item, pages, sc, part),
        KvFormat::E5m2 => item_format::<S, { fmt::E5M2 }>(s, ctx, q, item, pages, sc, part),
        KvFormat::F16 => item_format::<S, { fmt::F16 }>(s, ctx, q, item, pages, sc, part),
        KvFormat::Bf16 => item_format::<S, { fmt::BF16 }>(s, ctx, q, item, pages, sc, part),
        KvFormat::F32 => item_format::<S, { fmt::F32 }>(s, ctx, q, item, pages, sc, part),
    }
}

/// Pages this far ahead (at least 16 tokens) are prefetched while one is read.
fn prefetch_distance(page_size: usize) -> usize {
    16usize.div_ceil(page_size).max(1)
}

/// Ask for the cache lines of `bytes` (no effect on the result).
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch never faults and changes no state visible to
        // the program; the address is inside `bytes` anyway. SSE is part of
        // the x86-64 baseline.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(target_arch = "aarch64")]
    for line in bytes.chunks(64) {
        // SAFETY: PRFM is a hint: it never faults, writes nothing and
        // changes no state visible to the program; the address is inside
        // `bytes` anyway.
        unsafe {
            std::arch::asm!(
                "prfm pldl1keep, [{0}]",
                in(reg) line.as_ptr(),
                options(nostack, preserves_flags, readonly)
            )
        };
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = bytes;
}

/// Prefetch `head`'s K/V rows and scales of `page`'s first `take` tokens.
#[inline(always)]
fn prefetch_page(ctx: &Ctx<'_, '_>, page: i64, take: usize, head: usize) {
    let geo = &ctx.g;
    let page = page as usize;
    let Some(seg) = ctx.segments[page / geo.pages_per_segment] else {
        return;
    };
    let (h, row) = (geo.kv_heads, geo.head_dim * geo.format.element_bytes());
    let first = (page % geo.pages_per_segment) * geo.page_size;
    for t in first..first + take {
        let off = (t * h + head) * row;
        prefetch(&seg.k[off..off + row]);
        prefetch(&seg.v[off..off + row]);
    }
    if geo.format.scaled() {
        // From the first token's scale to the last one's.
        let (at, end) = (
            (first * h + head) * 4,
            ((first + take - 1) * h + head + 1) * 4,
        );
        prefetch(&seg.k_scale[at..end]);
        prefetch(&seg.v_scale[at..end]);
    }
}

#[inline(always)]
fn item_format<S: Simd, const F: u8>(
    s: S,
    ctx: &Ctx<'_, '_>,
    q: &[f32],
    item: &Item,
    pages: &[i64],
    sc: &mut Scratch,
    part: &mut [f32],
) {
    let geo = &ctx.g;
    let (g, d, ps, pps) = (
        ctx.group,
        geo.head_dim,
        geo.page_size,
        geo.pages_per_segment,
    );
    let (elem, h) = (geo.format.element_bytes(), geo.kv_heads);
    let factor = geo.format.factor();
    let scaled = geo.format.scaled();
    let row_bytes = d * elem;
    let (acc, ml) = part.split_at_mut(g * d);
    let (m, l) = ml.split_at_mut(g);
    acc.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let mut left = item.tokens;
    let mut n = 0;
    let ahead = prefetch_distance(ps);
    for &page in &pages[..ahead.min(pages.len())] {
        prefetch_page(ctx, page, ps, item.head);
    }
    for (i, &page) in pages.iter().enumerate() {
        if let Some(&next) = pages.get(i + ahead) {
            prefetch_page(ctx, next, ps, item.head);
        }
        let page = page as usize;
        let seg = match ctx.segments[page / pps] {
            Some(seg) => seg,
            None => continue, // unreachable: check_batch proved every page live
        };
        let first_token = (page % pps) * ps;
        let take = ps.min(left);
        left -= take;
        let (mut t, end) = (first_token, first_token + take);
        while t < end {
            // Tokens of this page that fit in the block.
            let run = (end - t).min(BLOCK - n);
            if h == 1 {
                // One KV head: the run's rows (and scales) are contiguous,
                // so each is decoded in one call.
                let (off, len) = (t * row_bytes, run * row_bytes);
                let dst = n * d..(n + run) * d;
                s.decode::<F>(&seg.k[off..off + len], &mut sc.k[dst.clone()]);
                s.decode::<F>(&seg.v[off..off + len], &mut sc.v[dst]);
            } else {
                for j in 0..run {
                    let off = ((t + j) * h + item.head) * row_bytes;
                    let dst = (n + j) * d..(n + j + 1) * d;
                    s.decode::<F>(&seg.k[off..off + row_bytes], &mut sc.k[dst.clone()]);
                    s.decode::<F>(&seg.v[off..off + row_bytes], &mut sc.v[dst]);
                }
            }
            if scaled && h == 1 {
                // Contiguous scales: a loop the compiler vectorizes.
                let src = 4 * t..4 * (t + run);
                let dst = n..n + run;
                for (o, b) in sc.ks[dst.clone()]
                    .iter_mut()
                    .zip(seg.k_scale[src.clone()].chunks_exact(4))
                {
                    *o = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]) * factor;
                }
                for (o, b) in sc.vs[dst].iter_mut().zip(seg.v_scale[src].chunks_exact(4)) {
                    *o = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]) * factor;
                }
            } else if scaled {
                for j in 0..run {
                    let at = (t + j) * h + item.head;
                    sc.ks[n + j] = read_f32(seg.k_scale, at) * factor;
                    sc.vs[n + j] = read_f32(seg.v_scale, at) * factor;
                }
            }
            n += run;
            t += run;
            if n == BLOCK {
                block(s, sc, q, n, g, d, acc, m, l);
                n = 0;
            }
        }
    }
    if n > 0 {
        // The block loop reads all BLOCK rows: clear what earlier blocks
        // (possibly of another request) left in the unused ones.
        sc.k[n * d..].fill(0.0);
        sc.v[n * d..].fill(0.0);
        // Their probability is exactly 0; a stale scale (inf, NaN) would
        // turn that into NaN.
        sc.vs[n..].fill(1.0);
        block(s, sc, q, n, g, d, acc, m, l);
    }
}

#[inline(always)]
fn read_f32(bytes: &[u8], i: usize) -> f32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[4 * i..4 * i + 4]);
    f32::from_ne_bytes(b)
}

/// Score `n` decoded tokens against the group's queries, update the running
/// max and sum, and accumulate V.
///
/// Three passes over the group's heads: raw scores of every head, then each
/// head's softmax step (independent of the others, so the out-of-order core
/// overlaps their reduction chains), then V for several heads at once, so
/// that each V vector loaded feeds one FMA per head.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block<S: Simd>(
    s: S,
    sc: &mut Scratch,
    q: &[f32],
    n: usize,
    g: usize,
    d: usize,
    acc: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    for gi in 0..g {
        if !m[gi].is_nan() {
            scores(s, sc, &q[gi * d..(gi + 1) * d], gi, d);
        }
    }
    for gi in 0..g {
        let row = &mut acc[gi * d..(gi + 1) * d];
        softmax_step(s, sc, gi, n, &mut m[gi], &mut l[gi], row);
    }
    let mut g0 = 0;
    while g0 < g {
        g0 += if g - g0 >= 4 {
            accumulate_v::<S, 4>(s, sc, g0, d, acc)
        } else if g - g0 >= 2 {
            accumulate_v::<S, 2>(s, sc, g0, d, acc)
        } else {
            accumulate_v::<S, 1>(s, sc, g0, d, acc)
        };
    }
}

/// Head `gi`'s raw scores `q . k` of all `BLOCK` rows (rows past the block's
/// tokens are zeros) into its row of `sc.p`.
#[inline(always)]
fn scores<S: Simd>(s: S, sc: &mut Scratch, qg: &[f32], gi: usize, d: usize) {
    let lanes = S::LANES;
    // Lane-wise partial dot products, eight tokens at a time so that the
    // accumulators stay in registers, then reduced together (a transpose,
    // not BLOCK separate horizontal sums).
    let mut partial = [s.splat(0.0); BLOCK];
    for (half, out) in partial.chunks_exact_mut(8).enumerate() {
        let rows = &sc.k[half * 8 * d..(half + 1) * 8 * d];
        let mut part = [s.splat(0.0); 8];
        for (c, qc) in qg.chunks_exact(lanes).enumerate() {
            let qc = s.load(qc);
            for (j, x) in part.iter_mut().enumerate() {
                // SAFETY: j < 8 and (c + 1) * lanes <= d (qg has d values,
                // a multiple of lanes), so the lanes read end within
                // rows[..8 * d] = rows.
                *x = s.fma(
                    qc,
                    unsafe { s.load_ptr(rows.as_ptr().add(j * d + c * lanes)) },
                    *x,
                );
            }
        }
        out.copy_from_slice(&part);
    }
    s.sums(&partial, &mut sc.p[gi * BLOCK..(gi + 1) * BLOCK]);
}

/// Head `gi`'s online-softmax step over the block: turns its scores into
/// probabilities times the V scales (in place), updates `m` and `l`, and
/// leaves in `sc.alpha[gi]` what the head's accumulator must be multiplied
/// by first. `sc.live[gi]` says whether the accumulator takes this block at
/// all (not for a poisoned head, nor when every score is -inf).
#[inline(always)]
fn softmax_step<S: Simd>(
    s: S,
    sc: &mut Scratch,
    gi: usize,
    n: usize,
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
) {
    let lanes = S::LANES;
    sc.live[gi] = false;
    if m.is_nan() {
        return; // an earlier NaN score poisoned this head for good
    }
    let p = &mut sc.p[gi * BLOCK..(gi + 1) * BLOCK];
    let mut mx = s.splat(f32::NEG_INFINITY);
    let mut nan = false;
    for (i, c) in p.chunks_exact_mut(lanes).enumerate() {
        let x = s.mul(s.load(c), s.load(&sc.ks[i * lanes..]));
        // Rows past n score -inf: probability 0.
        let x = s.pad(x, n.saturating_sub(i * lanes));
        nan |= s.has_nan(x);
        mx = s.max(mx, x);
        s.store(x, c);
    }
    let block_max = s.max_lane(mx);
    // A NaN score, or a +inf one (exp(inf - inf)), makes softmax NaN: the
    // whole row is NaN.
    if nan || block_max == f32::INFINITY {
        *m = f32::NAN;
        *l = f32::NAN;
        acc.fill(f32::NAN);
        return;
    }
    let m_new = m.max(block_max);
    if m_new == f32::NEG_INFINITY {
        return; // every score -inf: nothing to add
    }
    let alpha = if m_new > *m { (*m - m_new).exp2() } else { 1.0 };
    let neg = s.splat(-m_new);
    let mut total = s.splat(0.0);
    for (i, c) in p.chunks_exact_mut(lanes).enumerate() {
        let e = s.exp2(s.add(s.load(c), neg));
        total = s.add(total, e);
        // Rows past n: e = 0, and their V scale is 1 (see `item_format`).
        s.store(s.mul(e, s.load(&sc.vs[i * lanes..])), c);
    }
    *l = *l * alpha + s.sum(total);
    *m = m_new;
    sc.alpha[gi] = alpha;
    sc.live[gi] = true;
}

/// `acc = acc * alpha + p . V` for the `GT` heads from `g0`; returns `GT`.
#[inline(always)]
fn accumulate_v<S: Simd, const GT: usize>(
    s: S,
    sc: &Scratch,
    g0: usize,
    d: usize,
    acc: &mut [f32],
) -> usize {
    // Output vectors per head kept in registers while the block's tokens
    // stream by: GT heads x DT vectors, plus DT V vectors and a broadcast,
    // must fit the register file (32 vector registers with AVX-512, 16 with
    // AVX2). The scalar path takes 8 values at a time, which the compiler
    // turns into vector code of its own. What is left of head_dim goes one
    // vector at a time.
    let c = match (S::LANES, GT) {
        (16, 4) => v_tiles::<S, GT, 4>(s, sc, g0, d, 0, acc),
        (8, 4) => v_tiles::<S, GT, 2>(s, sc, g0, d, 0, acc),
        (8, _) => v_tiles::<S, GT, 4>(s, sc, g0, d, 0, acc),
        _ => v_tiles::<S, GT, 8>(s, sc, g0, d, 0, acc),
    };
    v_tiles::<S, GT, 1>(s, sc, g0, d, c, acc);
    GT
}

/// [`accumulate_v`] over the vector chunks `c0..` of `head_dim`, `DT` at a
/// time while `DT` fit; returns the first chunk left.
#[inline(always)]
fn v_tiles<S: Simd, const GT: usize, const DT: usize>(
    s: S,
    sc: &Scratch,
    g0: usize,
    d: usize,
    c0: usize,
    acc: &mut [f32],
) -> usize {
    let lanes = S::LANES;
    let v = &sc.v[..BLOCK * d];
    let p = &sc.p[g0 * BLOCK..(g0 + GT) * BLOCK];
    let mut c = c0;
    while (c + DT) * lanes <= d {
        let base = c * lanes;
        let mut r = [[s.splat(0.0); DT]; GT];
        for (h, rh) in r.iter_mut().enumerate() {
            let al = s.splat(sc.alpha[g0 + h]);
            let row = &acc[(g0 + h) * d + base..];
            for (j, x) in rh.iter_mut().enumerate() {
                *x = s.mul(s.load(&row[j * lanes..]), al);
            }
        }
        for t in 0..BLOCK {
            // SAFETY: t < BLOCK and base + DT * lanes <= d (the loop
            // condition), so every load ends within v[..BLOCK * d].
            let vt: [S::F; DT] = std::array::from_fn(|j| unsafe {
                s.load_ptr(v.as_ptr().add(t * d + base + j * lanes))
            });
            for (h, rh) in r.iter_mut().enumerate() {
                let pt = s.splat(p[h * BLOCK + t]);
                for (x, vj) in rh.iter_mut().zip(&vt) {
                    *x = s.fma(pt, *vj, *x);
                }
            }
        }
        for (h, rh) in r.iter().enumerate() {
            if sc.live[g0 + h] {
                let row = &mut acc[(g0 + h) * d + base..];
                for (j, x) in rh.iter().enumerate() {
                    s.store(*x, &mut row[j * lanes..]);
                }
            }
        }
        c += DT;
    }
    c
}

// ----- scalar ---------------------------------------------------------------------------------

/// Portable one-lane implementation: any CPU, any `head_dim`.
#[derive(Clone, Copy)]
struct Scalar;

/// `f32` value of a half-precision bit pattern (exact, subnormals, inf and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = (h >> 10) & 0x1F;
    let man = f32::from(h & 0x3FF);
    let mag = match exp {
        0 => man * (-24f32).exp2(),
        0x1F if man == 0.0 => f32::INFINITY,
        0x1F => f32::NAN,
        e => (1.0 + man / 1024.0) * (f32::from(e) - 15.0).exp2(),
    };
    sign * mag
}

/// Half-precision pattern of an FP8 code, as the vector paths build it.
fn fp8_to_f16_bits(format: KvFormat, x: u8) -> u16 {
    match format {
        // Sign-extend, move the 7 magnitude bits under f16's exponent, keep the sign.
        KvFormat::E4m3 => (((x as i8 as i16) << 7) as u16) & 0xBF80,
        _ => u16::from(x) << 8,
    }
}

fn fp8_table(format: KvFormat) -> &'static [f32; 256] {
    static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
    static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
    let cell = if format == KvFormat::E4m3 {
        &E4M3
    } else {
        &E5M2
    };
    cell.get_or_init(|| std::array::from_fn(|x| f16_to_f32(fp8_to_f16_bits(format, x as u8))))
}

impl Simd for Scalar {
    const LANES: usize = 1;
    type F = f32;
    #[inline(always)]
    fn splat(self, x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> f32 {
        s[0]
    }
    #[inline(always)]
    unsafe fn load_ptr(self, p: *const f32) -> f32 {
        // SAFETY: the caller guarantees p points into a live f32 slice.
        unsafe { *p }
    }
    #[inline(always)]
    fn store(self, v: f32, s: &mut [f32]) {
        s[0] = v;
    }
    #[inline(always)]
    fn fma(self, a: f32, b: f32, c: f32) -> f32 {
        // Not f32::mul_add: without hardware FMA that is a slow libm call.
        a * b + c
    }
    #[inline(always)]
    fn add(self, a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn max(self, a: f32, b: f32) -> f32 {
        if a.is_nan() || b.is_nan() {
            f32::NAN
        } else {
            a.max(b)
        }
    }
    #[inline(always)]
    fn sum(self, a: f32) -> f32 {
        a
    }
    #[inline(always)]
    fn max_lane(self, a: f32) -> f32 {
        a
    }
    #[inline(always)]
    fn sums(self, v: &[f32; BLOCK], out: &mut [f32]) {
        out[..BLOCK].copy_from_slice(v);
    }
    #[inline(always)]
    fn pad(self, a: f32, valid: usize) -> f32 {
        if valid > 0 {
            a
        } else {
            f32::NEG_INFINITY
        }
    }
    #[inline(always)]
    fn has_nan(self, a: f32) -> bool {
        a.is_nan()
    }
    #[inline(always)]
    fn exp2(self, x: f32) -> f32 {
        x.exp2()
    }
    fn decode<const F: u8>(self, src: &[u8], dst: &mut [f32]) {
        let format = KvFormat::from_code(F);
        let n = dst.len();
        match format {
            KvFormat::E4m3 | KvFormat::E5m2 => {
                let t = fp8_table(format);
                for (o, &x) in dst.iter_mut().zip(&src[..n]) {
                    *o = t[usize::from(x)];
                }
            }
            KvFormat::F16 => {
                for (o, b) in dst.iter_mut().zip(src[..2 * n].chunks_exact(2)) {
                    *o = f16_to_f32(u16::from_ne_bytes([b[0], b[1]]));
                }
            }
            KvFormat::Bf16 => {
                for (o, b) in dst.iter_mut().zip(src[..2 * n].chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_ne_bytes([b[0], b[1]])) << 16);
                }
            }
            KvFormat::F32 => {
                for (o, b) in dst.iter_mut().zip(src[..4 * n].chunks_exact(4)) {
                    *o = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }
}

// ----- x86-64: AVX2 and AVX-512 -----------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{exp2_poly, item_generic, Ctx, Item, KvFormat, Scratch, Simd, BLOCK};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn item_avx512(
        ctx: &Ctx<'_, '_>,
        q: &[f32],
        item: &Item,
        pages: &[i64],
        scratch: &mut Scratch,
        part: &mut [f32],
    ) {
        item_generic(Avx512, ctx, q, item, pages, scratch, part)
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn item_avx2(
        ctx: &Ctx<'_, '_>,
        q: &[f32],
        item: &Item,
        pages: &[i64],
        scratch: &mut Scratch,
        part: &mut [f32],
    ) {
        item_generic(Avx2, ctx, q, item, pages, scratch, part)
    }

    /// `[(isa, row sums of 16 rows of 16)]` for each instruction set this CPU has.
    #[cfg(test)]
    pub(super) fn sums_for_test(v: &[f32]) -> Vec<(&'static str, Vec<f32>)> {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        fn with_avx512(v: &[f32]) -> Vec<f32> {
            let s = Avx512;
            let rows: [__m512; BLOCK] = std::array::from_fn(|t| s.load(&v[t * 16..]));
            let mut out = vec![0.0; 16];
            s.sums(&rows, &mut out);
            out
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        fn with_avx2(v: &[f32]) -> Vec<f32> {
            let s = Avx2;
            // Rows of 16 as two 8-lane halves added first.
            let rows: [__m256; BLOCK] =
                std::array::from_fn(|t| s.add(s.load(&v[t * 16..]), s.load(&v[t * 16 + 8..])));
            let mut out = vec![0.0; 16];
            s.sums(&rows, &mut out);
            out
        }
        let mut out = Vec::new();
        if super::avx512_detected() {
            // SAFETY: the features were detected just above.
            out.push(("avx512", unsafe { with_avx512(v) }));
        }
        if super::avx2_detected() {
            // SAFETY: the features were detected just above.
            out.push(("avx2", unsafe { with_avx2(v) }));
        }
        out
    }

    /// 16 lanes. Only constructed inside `item_avx512`.
    #[derive(Clone, Copy)]
    struct Avx512;

    /// 8 lanes. Only constructed inside `item_avx2`.
    #[derive(Clone, Copy)]
    struct Avx2;

    // The methods below call intrinsics that need the features of the
    // function they are inlined into (`item_avx512` / `item_avx2`); the
    // values of these types exist nowhere else. Each load or store first
    // takes a sub-slice of exactly the bytes it touches, so an out-of-range
    // access panics instead of reading past the slice.

    impl Simd for Avx512 {
        const LANES: usize = 16;
        type F = __m512;
        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            // SAFETY: AVX-512F is enabled where this is inlined (see above).
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> __m512 {
            let s = &s[..16];
            // SAFETY: `s` holds 16 f32s; unaligned load; AVX-512F enabled.
            unsafe { _mm512_loadu_ps(s.as_ptr()) }
        }
        #[inline(always)]
        unsafe fn load_ptr(self, p: *const f32) -> __m512 {
            // SAFETY: the caller guarantees 16 f32s at p; unaligned load;
            // AVX-512F enabled.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        fn store(self, v: __m512, s: &mut [f32]) {
            let s = &mut s[..16];
            // SAFETY: `s` holds 16 f32s; unaligned store; AVX-512F enabled.
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: AVX-512F enabled.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F enabled.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F enabled.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F enabled. vmaxps returns its second operand when
            // either is NaN: order the operands so that a NaN in `b` survives.
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn sum(self, a: __m512) -> f32 {
            // SAFETY: AVX-512F enabled.
            unsafe { _mm512_reduce_add_ps(a) }
        }
        #[inline(always)]
        fn sums(self, v: &[__m512; BLOCK], out: &mut [f32]) {
            // SAFETY: AVX-512F enabled. A reduction tree: pairs of vectors
            // are interleaved and added (within 128-bit lanes: 32-bit, then
            // 64-bit units), which leaves, per 128-bit lane, the lane's sums
            // for 4 tokens; two rounds of 128-bit shuffles add the 4 lanes,
            // so lane j of the result holds token j's total.
            unsafe {
                let mut a = [_mm512_setzero_ps(); 8];
                for (i, x) in a.iter_mut().enumerate() {
                    let (u, w) = (v[2 * i], v[2 * i + 1]);
                    *x = _mm512_add_ps(_mm512_unpacklo_ps(u, w), _mm512_unpackhi_ps(u, w));
                }
                let mut b = [_mm512_setzero_ps(); 4];
                for (j, x) in b.iter_mut().enumerate() {
                    let (u, w) = (_mm512_castps_pd(a[2 * j]), _mm512_castps_pd(a[2 * j + 1]));
                    *x = _mm512_add_ps(
                        _mm512_castpd_ps(_mm512_unpacklo_pd(u, w)),
                        _mm512_castpd_ps(_mm512_unpackhi_pd(u, w)),
                    );
                }
                // Lanes [x.L0, x.L2, y.L0, y.L2] + [x.L1, x.L3, y.L1, y.L3].
                let fold = |x: __m512, y: __m512| {
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x88>(x, y),
                        _mm512_shuffle_f32x4::<0xDD>(x, y),
                    )
                };
                let r = fold(fold(b[0], b[1]), fold(b[2], b[3]));
                self.store(r, out);
            }
        }
        #[inline(always)]
        fn max_lane(self, a: __m512) -> f32 {
            // SAFETY: AVX-512F enabled.
            unsafe { _mm512_reduce_max_ps(a) }
        }
        #[inline(always)]
        fn pad(self, a: __m512, valid: usize) -> __m512 {
            let keep = if valid >= 16 {
                0xFFFF
            } else {
                (1u16 << valid) - 1
            };
            // SAFETY: AVX-512F enabled; the blend takes `a` where `keep` is set.
            unsafe { _mm512_mask_blend_ps(keep, _mm512_set1_ps(f32::NEG_INFINITY), a) }
        }
        #[inline(always)]
        fn has_nan(self, a: __m512) -> bool {
            // SAFETY: AVX-512F enabled.
            unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a) != 0 }
        }
        #[inline(always)]
        fn exp2(self, x: __m512) -> __m512 {
            // SAFETY: AVX-512F enabled. x = max(-200, x) keeps NaN (second
            // operand); scalef(p, n) = p * 2^n flushes 2^-200 to 0.
            unsafe {
                let x = _mm512_max_ps(_mm512_set1_ps(-200.0), x);
                let n =
                    _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                let p = exp2_poly(self, _mm512_sub_ps(x, n));
                _mm512_scalef_ps(p, n)
            }
        }
        #[inline(always)]
        fn decode<const F: u8>(self, src: &[u8], dst: &mut [f32]) {
            let format = KvFormat::from_code(F);
            let e = format.element_bytes();
            let mut done = 0;
            if e == 1 {
                // FP8, 32 codes at a time: one widen, shift and mask for
                // two vectors of output.
                let n = dst.len() / 32 * 32;
                for (s, o) in src[..n].chunks_exact(32).zip(dst[..n].chunks_exact_mut(32)) {
                    // SAFETY: `s` holds exactly the 32 codes loaded
                    // (unaligned load); AVX-512F/BW and F16C are enabled.
                    let (lo, hi) = unsafe {
                        let x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(s.as_ptr().cast()));
                        let h = if format == KvFormat::E4m3 {
                            _mm512_and_si512(
                                _mm512_slli_epi16::<7>(x),
                                _mm512_set1_epi16(0xBF80u16 as i16),
                            )
                        } else {
                            _mm512_slli_epi16::<8>(x)
                        };
                        (
                            _mm512_cvtph_ps(_mm512_castsi512_si256(h)),
                            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
                        )
                    };
                    self.store(lo, o);
                    self.store(hi, &mut o[16..]);
                }
                done = n;
            }
            let (src, dst) = (&src[done * e..], &mut dst[done..]);
            for (s, o) in src.chunks_exact(16 * e).zip(dst.chunks_exact_mut(16)) {
                // SAFETY: `s` holds exactly the 16 elements loaded (16 * e
                // bytes, unaligned loads); AVX-512F/BW/VL, AVX2 and F16C are
                // enabled where this is inlined.
                let v = unsafe {
                    match format {
                        KvFormat::E4m3 => {
                            let x = _mm_loadu_si128(s.as_ptr().cast());
                            let h = _mm256_slli_epi16::<7>(_mm256_cvtepi8_epi16(x));
                            _mm512_cvtph_ps(_mm256_and_si256(
                                h,
                                _mm256_set1_epi16(0xBF80u16 as i16),
                            ))
                        }
                        KvFormat::E5m2 => {
                            let x = _mm_loadu_si128(s.as_ptr().cast());
                            _mm512_cvtph_ps(_mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(x)))
                        }
                        KvFormat::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().cast())),
                        KvFormat::Bf16 => {
                            let x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(s.as_ptr().cast()));
                            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(x))
                        }
                        KvFormat::F32 => _mm512_loadu_ps(s.as_ptr().cast()),
                    }
                };
                self.store(v, o);
            }
        }
    }

    impl Simd for Avx2 {
        const LANES: usize = 8;
        type F = __m256;
        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            // SAFETY: AVX enabled where this is inlined.
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> __m256 {
            let s = &s[..8];
            // SAFETY: `s` holds 8 f32s; unaligned load.
            unsafe { _mm256_loadu_ps(s.as_ptr()) }
        }
        #[inline(always)]
        unsafe fn load_ptr(self, p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 f32s at p; unaligned load.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        fn store(self, v: __m256, s: &mut [f32]) {
            let s = &mut s[..8];
            // SAFETY: `s` holds 8 f32s; unaligned store.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: FMA enabled.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX enabled.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX enabled.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX enabled (NaN in `b` survives, as for Avx512).
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn sum(self, a: __m256) -> f32 {
            // SAFETY: AVX/SSE enabled.
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn sums(self, v: &[__m256; BLOCK], out: &mut [f32]) {
            // SAFETY: AVX enabled. The AVX-512 tree on 8 vectors at a time:
            // 32-bit then 64-bit interleave-and-add inside 128-bit halves,
            // then the two halves added across.
            unsafe {
                for (half, v) in v.chunks_exact(8).enumerate() {
                    let mut a = [_mm256_setzero_ps(); 4];
                    for (i, x) in a.iter_mut().enumerate() {
                        let (u, w) = (v[2 * i], v[2 * i + 1]);
                        *x = _mm256_add_ps(_mm256_unpacklo_ps(u, w), _mm256_unpackhi_ps(u, w));
                    }
                    let mut b = [_mm256_setzero_ps(); 2];
                    for (j, x) in b.iter_mut().enumerate() {
                        let (u, w) = (_mm256_castps_pd(a[2 * j]), _mm256_castps_pd(a[2 * j + 1]));
                        *x = _mm256_add_ps(
                            _mm256_castpd_ps(_mm256_unpacklo_pd(u, w)),
                            _mm256_castpd_ps(_mm256_unpackhi_pd(u, w)),
                        );
                    }
                    let r = _mm256_add_ps(
                        _mm256_permute2f128_ps::<0x20>(b[0], b[1]),
                        _mm256_permute2f128_ps::<0x31>(b[0], b[1]),
                    );
                    self.store(r, &mut out[half * 8..]);
                }
            }
        }
        #[inline(always)]
        fn pad(self, a: __m256, valid: usize) -> __m256 {
            // SAFETY: AVX enabled; lane i is kept where i < valid (valid
            // is at most BLOCK, exact in f32).
            unsafe {
                let lane = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
                let keep = _mm256_cmp_ps::<_CMP_LT_OQ>(lane, _mm256_set1_ps(valid.min(8) as f32));
                _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), a, keep)
            }
        }
        #[inline(always)]
        fn has_nan(self, a: __m256) -> bool {
            // SAFETY: AVX enabled.
            unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(a, a)) != 0 }
        }
        #[inline(always)]
        fn max_lane(self, a: __m256) -> f32 {
            let mut b = [0.0f32; 8];
            self.store(a, &mut b);
            b.iter().copied().fold(f32::NEG_INFINITY, |m, x| {
                if x.is_nan() || m.is_nan() {
                    f32::NAN
                } else {
                    m.max(x)
                }
            })
        }
        #[inline(always)]
        fn exp2(self, x: __m256) -> __m256 {
            // SAFETY: AVX2 and FMA enabled. x = max(-126, x) keeps NaN; n in
            // [-126, 0] gives a normal 2^n from its exponent bits; below
            // -126 the result is 0 (the mask is true for NaN too).
            unsafe {
                let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(-126.0));
                let x = _mm256_max_ps(_mm256_set1_ps(-126.0), x);
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                let p = exp2_poly(self, _mm256_sub_ps(x, n));
                let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                    _mm256_cvtps_epi32(n),
                    _mm256_set1_epi32(127),
                ));
                _mm256_and_ps(keep, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)))
            }
        }
        #[inline(always)]
        fn decode<const F: u8>(self, src: &[u8], dst: &mut [f32]) {
            let format = KvFormat::from_code(F);
            let e = format.element_bytes();
            for (s, o) in src.chunks_exact(8 * e).zip(dst.chunks_exact_mut(8)) {
                // SAFETY: `s` holds exactly the 8 elements loaded (8 * e
                // bytes, unaligned loads); AVX2 and F16C are enabled.
                let v = unsafe {
                    match format {
                        KvFormat::E4m3 => {
                            let x = _mm_loadl_epi64(s.as_ptr().cast());
                            let h = _mm_slli_epi16::<7>(_mm_cvtepi8_epi16(x));
                            _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(0xBF80u16 as i16)))
                        }
                        KvFormat::E5m2 => {
                            let x = _mm_loadl_epi64(s.as_ptr().cast());
                            _mm256_cvtph_ps(_mm_slli_epi16::<8>(_mm_cvtepu8_epi16(x)))
                        }
                        KvFormat::F16 => _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast())),
                        KvFormat::Bf16 => {
                            let x = _mm256_cvtepu16_epi32(_mm_loadu_si128(s.as_ptr().cast()));
                            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(x))
                        }
                        KvFormat::F32 => _mm256_loadu_ps(s.as_ptr().cast()),
                    }
                };
                self.store(v, o);
            }
        }
    }
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod simd_tests {
    #[cfg(target_arch = "aarch64")]
    use super::arm::sums_for_test;
    #[cfg(target_arch = "x86_64")]
    use super::x86::sums_for_test;

    #[test]
    fn block_sums_reduce_each_vector() {
        let v: Vec<f32> = (0..16 * 16)
            .map(|i| ((i * 7919) % 101) as f32 - 50.0)
            .collect();
        let want: Vec<f32> = v.chunks(16).map(|c| c.iter().sum()).collect();
        for (name, got) in sums_for_test(&v) {
            assert_eq!(got, want, "{name}");
        }
    }
}

// ----- AArch64: NEON ------------------------------------------------------------------------------

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{exp2_poly, item_generic, Ctx, Item, KvFormat, Scratch, Simd, BLOCK};
    use std::arch::aarch64::*;

    /// NEON is part of the AArch64 baseline (every AArch64 target enables
    /// it), so this needs no runtime detection.
    pub(super) fn item_neon(
        ctx: &Ctx<'_, '_>,
        q: &[f32],
        item: &Item,
        pages: &[i64],
        scratch: &mut Scratch,
        part: &mut [f32],
    ) {
        item_generic(Neon, ctx, q, item, pages, scratch, part)
    }

    /// Row sums of 16 rows of 16, through [`Simd::sums`].
    #[cfg(test)]
    pub(super) fn sums_for_test(v: &[f32]) -> Vec<(&'static str, Vec<f32>)> {
        let s = Neon;
        // Rows of 16 as four 4-lane quarters added first.
        let rows: [float32x4_t; BLOCK] = std::array::from_fn(|t| {
            let r = &v[t * 16..];
            s.add(
                s.add(s.load(r), s.load(&r[4..])),
                s.add(s.load(&r[8..]), s.load(&r[12..])),
            )
        });
        let mut out = vec![0.0; 16];
        s.sums(&rows, &mut out);
        vec![("neon", out)]
    }

    /// 4 lanes.
    #[derive(Clone, Copy)]
    struct Neon;

    /// `f32` bits -> value times `2^112`: the power of two that takes a
    /// half-precision exponent (bias 15) to single precision (bias 127).
    const HALF_TO_SINGLE: f32 = f32::from_bits((127 + 112) << 23);

    /// Half-precision bit patterns, sign-extended to 32 bits, as `f32`:
    /// the exponent and mantissa move into place (`<< 13`), subnormals come
    /// out exact from the multiplication by `2^112`, and the all-ones
    /// exponent (inf, NaN) is rebuilt as single precision's.
    ///
    /// # Safety
    /// Needs NEON (always there on AArch64).
    #[inline(always)]
    unsafe fn from_half_bits(x: int32x4_t) -> float32x4_t {
        // SAFETY: NEON only.
        unsafe {
            let bits = vandq_u32(
                vreinterpretq_u32_s32(vshlq_n_s32::<13>(x)),
                vdupq_n_u32(0x8FFF_E000),
            );
            let finite = vmulq_f32(vreinterpretq_f32_u32(bits), vdupq_n_f32(HALF_TO_SINGLE));
            let special = vceqq_u32(
                vandq_u32(vreinterpretq_u32_s32(x), vdupq_n_u32(0x7C00)),
                vdupq_n_u32(0x7C00),
            );
            let inf_nan = vreinterpretq_f32_u32(vorrq_u32(bits, vdupq_n_u32(0x7F80_0000)));
            vbslq_f32(special, inf_nan, finite)
        }
    }

    /// FP8 codes, sign-extended to 32 bits, as `f32` (e4m3 divided by 256,
    /// as [`Simd::decode`] promises).
    ///
    /// # Safety
    /// Needs NEON (always there on AArch64).
    #[inline(always)]
    unsafe fn from_fp8(format: KvFormat, x: int32x4_t) -> float32x4_t {
        // SAFETY: NEON only.
        unsafe {
            if format == KvFormat::E4m3 {
                // Sign to bit 31, exponent and mantissa to bits 20..27: the
                // value times 2^-120 (exact, subnormals included), rescaled
                // by 2^112 (bias 127 - 7 = 120, less the 2^8 of the
                // contract). The NaN codes read 480 / 256, as on x86.
                let bits = vandq_u32(
                    vreinterpretq_u32_s32(vshlq_n_s32::<20>(x)),
                    vdupq_n_u32(0x87F0_0000),
                );
                vmulq_f32(vreinterpretq_f32_u32(bits), vdupq_n_f32(HALF_TO_SINGLE))
            } else {
                // e5m2 is the top byte of a half-precision number.
                from_half_bits(vshlq_n_s32::<8>(x))
            }
        }
    }

    // Every method below calls NEON intrinsics, available on every AArch64
    // CPU. Each load or store first takes a sub-slice of exactly the
    // elements it touches, so an out-of-range access panics instead of
    // reading past the slice.

    impl Simd for Neon {
        const LANES: usize = 4;
        type F = float32x4_t;
        #[inline(always)]
        fn splat(self, x: f32) -> float32x4_t {
            // SAFETY: NEON only.
            unsafe { vdupq_n_f32(x) }
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> float32x4_t {
            let s = &s[..4];
            // SAFETY: `s` holds 4 f32s; LD1 needs no alignment beyond f32's.
            unsafe { vld1q_f32(s.as_ptr()) }
        }
        #[inline(always)]
        unsafe fn load_ptr(self, p: *const f32) -> float32x4_t {
            // SAFETY: the caller guarantees 4 f32s at p.
            unsafe { vld1q_f32(p) }
        }
        #[inline(always)]
        fn store(self, v: float32x4_t, s: &mut [f32]) {
            let s = &mut s[..4];
            // SAFETY: `s` holds 4 f32s.
            unsafe { vst1q_f32(s.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn fma(self, a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
            // SAFETY: NEON only; vfmaq_f32(c, a, b) = c + a * b, fused.
            unsafe { vfmaq_f32(c, a, b) }
        }
        #[inline(always)]
        fn add(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
            // SAFETY: NEON only.
            unsafe { vaddq_f32(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
            // SAFETY: NEON only.
            unsafe { vmulq_f32(a, b) }
        }
        #[inline(always)]
        fn max(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
            // SAFETY: NEON only. FMAX returns NaN when either lane is NaN.
            unsafe { vmaxq_f32(a, b) }
        }
        #[inline(always)]
        fn sum(self, a: float32x4_t) -> f32 {
            // SAFETY: NEON only.
            unsafe { vaddvq_f32(a) }
        }
        #[inline(always)]
        fn sums(self, v: &[float32x4_t; BLOCK], out: &mut [f32]) {
            // SAFETY: NEON only. Pairwise adds: [a0+a1, a2+a3, b0+b1, b2+b3]
            // twice over leaves the totals of four vectors in one.
            unsafe {
                for (i, v) in v.chunks_exact(4).enumerate() {
                    let r = vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]));
                    self.store(r, &mut out[4 * i..]);
                }
            }
        }
        #[inline(always)]
        fn max_lane(self, a: float32x4_t) -> f32 {
            // SAFETY: NEON only (FMAXV propagates NaN).
            unsafe { vmaxvq_f32(a) }
        }
        #[inline(always)]
        fn pad(self, a: float32x4_t, valid: usize) -> float32x4_t {
            const LANE: [u32; 4] = [0, 1, 2, 3];
            // SAFETY: NEON only; LANE holds 4 u32s. Lane i is kept where
            // i < valid.
            unsafe {
                let keep = vcltq_u32(vld1q_u32(LANE.as_ptr()), vdupq_n_u32(valid.min(4) as u32));
                vbslq_f32(keep, a, vdupq_n_f32(f32::NEG_INFINITY))
            }
        }
        #[inline(always)]
        fn has_nan(self, a: float32x4_t) -> bool {
            // SAFETY: NEON only; a lane equals itself unless it is NaN.
            unsafe { vminvq_u32(vceqq_f32(a, a)) == 0 }
        }
        #[inline(always)]
        fn exp2(self, x: float32x4_t) -> float32x4_t {
            // SAFETY: NEON only. As for AVX2: below -126 the result is 0;
            // NaN stays NaN (FMAX propagates it, the mask keeps it, and
            // converting NaN to an integer gives 0, a harmless exponent).
            unsafe {
                let keep = vmvnq_u32(vcltq_f32(x, vdupq_n_f32(-126.0)));
                let x = vmaxq_f32(x, vdupq_n_f32(-126.0));
                let n = vrndnq_f32(x);
                let p = exp2_poly(self, vsubq_f32(x, n));
                let bits = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
                let r = vmulq_f32(p, vreinterpretq_f32_s32(bits));
                vreinterpretq_f32_u32(vandq_u32(keep, vreinterpretq_u32_f32(r)))
            }
        }
        #[inline(always)]
        fn decode<const F: u8>(self, src: &[u8], dst: &mut [f32]) {
            let format = KvFormat::from_code(F);
            let e = format.element_bytes();
            let mut done = 0;
            if e == 1 {
                // FP8, 16 codes at a time: widen with sign extension twice.
                let n = dst.len() / 16 * 16;
                for (s, o) in src[..n].chunks_exact(16).zip(dst[..n].chunks_exact_mut(16)) {
                    // SAFETY: `s` holds exactly the 16 codes loaded; NEON only.
                    let v = unsafe {
                        let b = vreinterpretq_s8_u8(vld1q_u8(s.as_ptr()));
                        let (lo, hi) = (vmovl_s8(vget_low_s8(b)), vmovl_high_s8(b));
                        [
                            from_fp8(format, vmovl_s16(vget_low_s16(lo))),
                            from_fp8(format, vmovl_high_s16(lo)),
                            from_fp8(format, vmovl_s16(vget_low_s16(hi))),
                            from_fp8(format, vmovl_high_s16(hi)),
                        ]
                    };
                    for (j, x) in v.iter().enumerate() {
                        self.store(*x, &mut o[4 * j..]);
                    }
                }
                done = n;
            }
            let (src, dst) = (&src[done * e..], &mut dst[done..]);
            for (s, o) in src.chunks_exact(4 * e).zip(dst.chunks_exact_mut(4)) {
                // SAFETY: `s` holds exactly the 4 elements read (4 * e
                // bytes: plain array reads, or a 4-lane load of f32 or u16
                // values, which LD1 reads at any alignment); NEON only.
                let v = unsafe {
                    match format {
                        KvFormat::E4m3 | KvFormat::E5m2 => {
                            let c: [i32; 4] = std::array::from_fn(|i| i32::from(s[i] as i8));
                            from_fp8(format, vld1q_s32(c.as_ptr()))
                        }
                        KvFormat::F16 => {
                            let c: [i32; 4] = std::array::from_fn(|i| {
                                i32::from(i16::from_ne_bytes([s[2 * i], s[2 * i + 1]]))
                            });
                            from_half_bits(vld1q_s32(c.as_ptr()))
                        }
                        KvFormat::Bf16 => {
                            let c: [u32; 4] = std::array::from_fn(|i| {
                                u32::from(u16::from_ne_bytes([s[2 * i], s[2 * i + 1]])) << 16
                            });
                            vreinterpretq_f32_u32(vld1q_u32(c.as_ptr()))
                        }
                        KvFormat::F32 => {
                            let c: [f32; 4] = std::array::from_fn(|i| {
                                f32::from_ne_bytes([
                                    s[4 * i],
                                    s[4 * i + 1],
                                    s[4 * i + 2],
                                    s[4 * i + 3],
                                ])
                            });
                            vld1q_f32(c.as_ptr())
                        }
                    }
                };
                self.store(v, o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator (xorshift64*), so the core needs no rand crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// Value of a code by its format's definition, in f64 (e4m3 NaN codes excluded).
    fn value(format: KvFormat, b: &[u8]) -> f64 {
        let minifloat = |x: u32, man_bits: u32, exp_bits: u32, bias: i32| {
            let sign = if x >> (man_bits + exp_bits) & 1 == 1 {
                -1.0
            } else {
                1.0
            };
            let e = ((x >> man_bits) & ((1 << exp_bits) - 1)) as i32;
            let m = f64::from(x & ((1 << man_bits) - 1)) / f64::from(1u32 << man_bits);
            if e == (1 << exp_bits) - 1 && bias != 7 {
                return if m == 0.0 {
                    sign * f64::INFINITY
                } else {
                    f64::NAN
                };
            }
            sign * if e == 0 {
                m * 2f64.powi(1 - bias)
            } else {
                (1.0 + m) * 2f64.powi(e - bias)
            }
        };
        match format {
            KvFormat::E4m3 => minifloat(u32::from(b[0]), 3, 4, 7),
            KvFormat::E5m2 => minifloat(u32::from(b[0]), 2, 5, 15),
            KvFormat::F16 => minifloat(u32::from(u16::from_ne_bytes([b[0], b[1]])), 10, 5, 15),
            KvFormat::Bf16 => f64::from(f32::from_bits(
                u32::from(u16::from_ne_bytes([b[0], b[1]])) << 16,
            )),
            KvFormat::F32 => f64::from(f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        }
    }

    /// A finite code of `format` for a value in [-1, 1) times 4.
    fn code(format: KvFormat, rng: &mut Rng) -> Vec<u8> {
        let x = rng.unit() * 4.0;
        match format {
            KvFormat::E4m3 => loop {
                let c = (rng.next() >> 56) as u8;
                if c & 0x7F != 0x7F {
                    return vec![c];
                }
            },
            KvFormat::E5m2 => loop {
                let c = (rng.next() >> 56) as u8;
                if (c >> 2) & 0x1F != 0x1F {
                    return vec![c];
                }
            },
            KvFormat::F16 => loop {
                let c = (rng.next() >> 48) as u16;
                if (c >> 10) & 0x1F < 0x13 {
                    return c.to_ne_bytes().to_vec();
                }
            },
            KvFormat::Bf16 => ((x.to_bits() >> 16) as u16).to_ne_bytes().to_vec(),
            KvFormat::F32 => x.to_ne_bytes().to_vec(),
        }
    }

    struct Pool {
        geo: PoolGeometry,
        bufs: Vec<Option<[Vec<u8>; 4]>>,
    }

    impl Pool {
        fn new(geo: PoolGeometry, segments: usize, dead: &[usize], rng: &mut Rng) -> Pool {
            let bufs = (0..segments)
                .map(|sid| {
                    if dead.contains(&sid) {
                        return None;
                    }
                    let n = geo.tokens_per_segment() * geo.kv_heads;
                    let codes = |rng: &mut Rng| -> Vec<u8> {
                        (0..n * geo.head_dim)
                            .flat_map(|_| code(geo.format, rng))
                            .collect()
                    };
                    let scales = |rng: &mut Rng| -> Vec<u8> {
                        if !geo.format.scaled() {
                            return Vec::new();
                        }
                        (0..n)
                            .flat_map(|_| (0.01 + rng.unit().abs()).to_ne_bytes())
                            .collect()
                    };
                    Some([codes(rng), codes(rng), scales(rng), scales(rng)])
                })
                .collect();
            Pool { geo, bufs }
        }

        fn layers(&self) -> Vec<Option<SegmentLayer<'_>>> {
            self.bufs
                .iter()
                .map(|b| {
                    b.as_ref().map(|b| SegmentLayer {
                        k: &b[0],
                        v: &b[1],
                        k_scale: &b[2],
                        v_scale: &b[3],
                    })
                })
                .collect()
        }

        /// K (`which` 0) or V (1) of token slot `t` (segment-local page * page_size + i), head `h`, in f64.
        fn row(&self, which: usize, page: i64, i: usize, h: usize) -> Vec<f64> {
            let g = &self.geo;
            let (pps, ps, e, d) = (
                g.pages_per_segment,
                g.page_size,
                g.format.element_bytes(),
                g.head_dim,
            );
            let b = self.bufs[page as usize / pps].as_ref().expect("live");
            let at = ((page as usize % pps) * ps + i) * g.kv_heads + h;
            let scale = if g.format.scaled() {
                f64::from(read_f32(&b[2 + which], at))
            } else {
                1.0
            };
            (0..d)
                .map(|j| value(g.format, &b[which][(at * d + j) * e..]) * scale)
                .collect()
        }
    }

    /// f64 softmax attention, the way the tests in Python define it.
    fn reference(pool: &Pool, b: &DecodeBatch<'_>) -> (Vec<f64>, Vec<f64>) {
        let g = &pool.geo;
        let (d, ps) = (g.head_dim, g.page_size);
        let group = b.q_heads / g.kv_heads;
        let n = b.kv_lens.len();
        let mut out = vec![0.0; n * b.q_heads * d];
        let mut lse = vec![f64::NEG_INFINITY; n * b.q_heads];
        for r in 0..n {
            let pages = &b.indices[b.indptr[r] as usize..b.indptr[r + 1] as usize];
            let len = b.kv_lens[r] as usize;
            for qh in 0..b.q_heads {
                let h = qh / group;
                let q = &b.q[(r * b.q_heads + qh) * d..][..d];
                let (mut s, mut vs) = (Vec::new(), Vec::new());
                for t in 0..len {
                    let k = pool.row(0, pages[t / ps], t % ps, h);
                    let dot: f64 = q.iter().zip(&k).map(|(a, b)| f64::from(*a) * b).sum();
                    s.push(dot * f64::from(b.sm_scale));
                    vs.push(pool.row(1, pages[t / ps], t % ps, h));
                }
                if s.is_empty() {
                    continue;
                }
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let total: f64 = w.iter().sum();
                let o = &mut out[(r * b.q_heads + qh) * d..][..d];
                for (wt, v) in w.iter().zip(&vs) {
                    for (o, x) in o.iter_mut().zip(v) {
                        *o += wt * x / total;
                    }
                }
                lse[r * b.q_heads + qh] = m + total.ln();
            }
        }
        (out, lse)
    }

    /// Requests of `lens` tokens over the live pages of `pool`, shuffled.
    fn table(pool: &Pool, lens: &[usize], rng: &mut Rng) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        let pps = pool.geo.pages_per_segment;
        let mut free: Vec<i64> = (0..pool.bufs.len() * pps)
            .filter(|p| pool.bufs[p / pps].is_some())
            .map(|p| p as i64)
            .collect();
        for i in (1..free.len()).rev() {
            free.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let (mut indptr, mut indices) = (vec![0i64], Vec::new());
        for &len in lens {
            let need = len.div_ceil(pool.geo.page_size);
            indices.extend(free.drain(..need));
            indptr.push(indices.len() as i64);
        }
        (indptr, indices, lens.iter().map(|&l| l as i64).collect())
    }

    fn check(
        format: KvFormat,
        page_size: usize,
        kv_heads: usize,
        group: usize,
        head_dim: usize,
        lens: &[usize],
    ) {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (page_size * 31 + head_dim) as u64);
        let geo = PoolGeometry {
            page_size,
            pages_per_segment: 64,
            kv_heads,
            head_dim,
            format,
        };
        let need: usize = lens.iter().map(|l| l.div_ceil(page_size)).sum();
        let segments = need.div_ceil(64) + 2;
        let pool = Pool::new(geo, segments, &[1], &mut rng);
        let (indptr, indices, kv_lens) = table(&pool, lens, &mut rng);
        let q_heads = kv_heads * group;
        let q: Vec<f32> = (0..lens.len() * q_heads * head_dim)
            .map(|_| rng.unit())
            .collect();
        let batch = DecodeBatch {
            q: &q,
            q_heads,
            indptr: &indptr,
            indices: &indices,
            kv_lens: &kv_lens,
            sm_scale: 0.3,
        };
        let (want, want_lse) = reference(&pool, &batch);
        let layers = pool.layers();
        let mut first: Option<DecodeOutput> = None;
        for isa in Isa::available() {
            if !head_dim.is_multiple_of(isa.lanes()) {
                continue;
            }
            for threads in [1, 3] {
                let got = decode(&geo, &layers, &batch, threads, isa).expect("valid input");
                let scale = want.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
                for (i, (g, w)) in got.out.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(*g) - w).abs() <= 2e-5 * scale,
                        "{format:?} ps {page_size} {} threads {threads}: out[{i}] = {g}, want {w}",
                        isa.name()
                    );
                }
                for (g, w) in got.lse.iter().zip(&want_lse) {
                    assert!(
                        (w.is_infinite() && f64::from(*g) == *w)
                            || (f64::from(*g) - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{format:?} {}: lse {g}, want {w}",
                        isa.name()
                    );
                }
                match &first {
                    // Same ISA, another thread count: bit for bit the same.
                    Some(f) if f.isa == isa => assert_eq!(f.out, got.out),
                    _ => first = Some(got),
                }
            }
        }
    }

    #[test]
    fn matches_an_f64_reference_in_every_format() {
        for format in [
            KvFormat::E4m3,
            KvFormat::E5m2,
            KvFormat::F16,
            KvFormat::Bf16,
            KvFormat::F32,
        ] {
            check(format, 16, 2, 4, 64, &[1, 17, 97, 0, 300]);
        }
    }

    #[test]
    fn page_size_one_odd_head_dim_and_mha() {
        check(KvFormat::E4m3, 1, 1, 1, 40, &[1, 33, 250]);
        check(KvFormat::Bf16, 1, 3, 2, 48, &[5, 130]);
    }

    #[test]
    fn group_sizes_that_leave_partial_head_tiles() {
        // Heads are tiled 4, 2, 1 at a time: 3 = 2 + 1, 7 = 4 + 2 + 1, 8 = 4 + 4.
        check(KvFormat::E4m3, 16, 1, 7, 64, &[40, 300]);
        check(KvFormat::F16, 16, 2, 3, 32, &[17, 90]);
        check(KvFormat::E5m2, 1, 1, 8, 32, &[70]);
    }

    #[test]
    fn a_request_longer_than_a_chunk_spreads_over_items() {
        check(KvFormat::E4m3, 16, 1, 4, 32, &[CHUNK_TOKENS * 2 + 37, 3]);
    }

    #[test]
    fn every_fp8_code_decodes_alike_in_every_isa() {
        // One token per request: the output is exactly V times its scale.
        for format in [KvFormat::E4m3, KvFormat::E5m2] {
            let geo = PoolGeometry {
                page_size: 1,
                pages_per_segment: 1,
                kv_heads: 1,
                head_dim: 256,
                format,
            };
            let codes: Vec<u8> = (0..=255u8).collect();
            let one = 1.0f32.to_ne_bytes().to_vec();
            let zeros = vec![0u8; 256];
            let seg = SegmentLayer {
                k: &zeros,
                v: &codes,
                k_scale: &one,
                v_scale: &one,
            };
            let q = vec![0.0f32; 256];
            let batch = DecodeBatch {
                q: &q,
                q_heads: 1,
                indptr: &[0, 1],
                indices: &[0],
                kv_lens: &[1],
                sm_scale: 1.0,
            };
            for isa in Isa::available() {
                let got = decode(&geo, &[Some(seg)], &batch, 1, isa).expect("valid");
                for x in 0..=255u8 {
                    let nan_code = format == KvFormat::E4m3 && x & 0x7F == 0x7F;
                    let want = if nan_code {
                        if x & 0x80 != 0 {
                            -480.0
                        } else {
                            480.0
                        }
                    } else {
                        value(format, &[x])
                    };
                    let g = got.out[usize::from(x)];
                    assert!(
                        f64::from(g) == want || (g.is_nan() && want.is_nan()),
                        "{format:?} {}: code {x:#04x} reads {g}, want {want}",
                        isa.name()
                    );
                }
            }
        }
    }

    #[test]
    fn every_half_precision_code_decodes_alike_in_every_isa() {
        // One token whose V row holds all 65,536 fp16 patterns (and, in a
        // second pool, all bf16 ones): the output is V itself.
        for format in [KvFormat::F16, KvFormat::Bf16] {
            let d = 1 << 16;
            let geo = PoolGeometry {
                page_size: 1,
                pages_per_segment: 1,
                kv_heads: 1,
                head_dim: d,
                format,
            };
            let codes: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_ne_bytes).collect();
            let zeros = vec![0u8; 2 * d];
            let seg = SegmentLayer {
                k: &zeros,
                v: &codes,
                k_scale: &[],
                v_scale: &[],
            };
            let q = vec![0.0f32; d];
            let batch = DecodeBatch {
                q: &q,
                q_heads: 1,
                indptr: &[0, 1],
                indices: &[0],
                kv_lens: &[1],
                sm_scale: 1.0,
            };
            for isa in Isa::available() {
                let got = decode(&geo, &[Some(seg)], &batch, 1, isa).expect("valid");
                for x in 0..=u16::MAX {
                    let want = value(format, &x.to_ne_bytes());
                    let g = got.out[usize::from(x)];
                    assert!(
                        f64::from(g) == want || (g.is_nan() && want.is_nan()),
                        "{format:?} {}: code {x:#06x} reads {g}, want {want}",
                        isa.name()
                    );
                }
            }
        }
    }

    #[test]
    fn bad_tables_are_refused_with_numbers() {
        let geo = PoolGeometry {
            page_size: 4,
            pages_per_segment: 2,
            kv_heads: 1,
            head_dim: 16,
            format: KvFormat::F32,
        };
        let buf = vec![0u8; geo.kv_layer_bytes()];
        let seg = SegmentLayer {
            k: &buf,
            v: &buf,
            k_scale: &[],
            v_scale: &[],
        };
        let segs = [Some(seg), None];
        let q = vec![0.0f32; 16];
        type Case<'a> = (&'a [i64], &'a [i64], &'a [i64], &'a str);
        let cases: [Case<'_>; 6] = [
            (
                &[0, 1],
                &[2],
                &[3],
                "kv_indices[0] = 2 is not a page of a live segment",
            ),
            (&[0, 1], &[7], &[3], "kv_indices[0] = 7"),
            (&[0, 1], &[-1], &[3], "kv_indices[0] = -1"),
            (
                &[0, 1],
                &[0],
                &[5],
                "5 KV tokens need 2 pages of 4, the table gives 1",
            ),
            (&[0, 2], &[0], &[3], "is not a range inside the 1 page ids"),
            (&[1, 1], &[0], &[0], "indptr[0] must be 0"),
        ];
        for (indptr, indices, kv_lens, msg) in cases {
            let batch = DecodeBatch {
                q: &q,
                q_heads: 1,
                indptr,
                indices,
                kv_lens,
                sm_scale: 1.0,
            };
            let err = decode(&geo, &segs, &batch, 1, Isa::Auto)
                .expect_err("refused")
                .to_string();
            assert!(err.contains(msg), "{err:?} does not say {msg:?}");
        }
        let short = SegmentLayer {
            k: &buf[1..],
            v: &buf,
            k_scale: &[],
            v_scale: &[],
        };
        let batch = DecodeBatch {
            q: &q,
            q_heads: 1,
            indptr: &[0, 1],
            indices: &[0],
            kv_lens: &[1],
            sm_scale: 1.0,
        };
        let err = decode(&geo, &[Some(short)], &batch, 1, Isa::Auto)
            .expect_err("short")
            .to_string();
        assert!(
            err.contains("segment 0: k holds 511 bytes, one layer needs 512"),
            "{err}"
        );
        let batch = DecodeBatch {
            q: &q,
            q_heads: 3,
            indptr: &[0, 1],
            indices: &[0],
            kv_lens: &[1],
            sm_scale: 1.0,
        };
        let err = decode(&geo, &segs, &batch, 1, Isa::Auto)
            .expect_err("heads")
            .to_string();
        assert!(
            err.contains("q holds 16 values; 1 requests x 3 heads x 16 dims need 48"),
            "{err}"
        );
    }

    #[test]
    fn a_poisoned_query_head_leaves_the_rest_of_its_tile() {
        // Every K and V element is 1.0, so a finite head's output is 1.0.
        // Query heads 1 (+inf score), 4 (NaN) and 5 (both) read NaN; the
        // others share their tiles (4 + 2 + 1) and must be untouched.
        let geo = PoolGeometry {
            page_size: 16,
            pages_per_segment: 4,
            kv_heads: 1,
            head_dim: 16,
            format: KvFormat::E4m3,
        };
        let tokens = geo.tokens_per_segment();
        let codes = vec![0x38u8; tokens * 16];
        let scales: Vec<u8> = (0..tokens).flat_map(|_| 1.0f32.to_ne_bytes()).collect();
        let seg = SegmentLayer {
            k: &codes,
            v: &codes,
            k_scale: &scales,
            v_scale: &scales,
        };
        let mut q = vec![0.25f32; 7 * 16];
        q[16 + 3] = f32::INFINITY;
        q[4 * 16 + 9] = f32::NAN;
        q[5 * 16] = f32::INFINITY;
        q[5 * 16 + 1] = f32::NEG_INFINITY;
        let batch = DecodeBatch {
            q: &q,
            q_heads: 7,
            indptr: &[0, 3],
            indices: &[2, 0, 1],
            kv_lens: &[40],
            sm_scale: 1.0,
        };
        for isa in Isa::available() {
            let got = decode(&geo, &[Some(seg)], &batch, 1, isa).expect("valid");
            for h in 0..7 {
                let row = &got.out[h * 16..(h + 1) * 16];
                if [1, 4, 5].contains(&h) {
                    assert!(row.iter().all(|x| x.is_nan()), "{} head {h}", isa.name());
                    assert!(got.lse[h].is_nan(), "{} head {h}", isa.name());
                } else {
                    assert!(
                        row.iter().all(|x| (x - 1.0).abs() < 1e-6),
                        "{} head {h}: {row:?}",
                        isa.name()
                    );
                    // 40 equal scores of 0.25 * 16 = 4: lse = 4 + ln 40.
                    let want = 4.0 + 40f32.ln();
                    assert!((got.lse[h] - want).abs() < 1e-5, "{} head {h}", isa.name());
                }
            }
        }
    }

    #[test]
    fn a_stale_nan_scale_does_not_leak_into_the_next_requests_tail() {
        // Request 0 fills a block whose row 10 has a NaN V scale (its output
        // is NaN); request 1, on the same thread next, has a 5-token block:
        // rows 5.. of its scratch must not carry that scale over.
        let geo = PoolGeometry {
            page_size: 16,
            pages_per_segment: 2,
            kv_heads: 1,
            head_dim: 16,
            format: KvFormat::E4m3,
        };
        let tokens = geo.tokens_per_segment();
        let codes = vec![0x38u8; tokens * 16];
        let k_scale: Vec<u8> = (0..tokens).flat_map(|_| 1.0f32.to_ne_bytes()).collect();
        let mut v_scale = k_scale.clone();
        v_scale[40..44].copy_from_slice(&f32::NAN.to_ne_bytes());
        let seg = SegmentLayer {
            k: &codes,
            v: &codes,
            k_scale: &k_scale,
            v_scale: &v_scale,
        };
        let q = vec![0.25f32; 2 * 16];
        let batch = DecodeBatch {
            q: &q,
            q_heads: 1,
            indptr: &[0, 1, 2],
            indices: &[0, 1],
            kv_lens: &[16, 5],
            sm_scale: 1.0,
        };
        for isa in Isa::available() {
            let got = decode(&geo, &[Some(seg)], &batch, 1, isa).expect("valid");
            assert!(got.out[..16].iter().all(|x| x.is_nan()), "{}", isa.name());
            assert!(
                got.out[16..].iter().all(|x| (x - 1.0).abs() < 1e-6),
                "{}: {:?}",
                isa.name(),
                &got.out[16..]
            );
        }
    }

    #[test]
    fn a_block_of_minus_inf_scores_adds_nothing() {
        // An infinite K scale on the first block's tokens, with q . k < 0,
        // scores them -inf: weight 0. The block after has finite scores, so
        // the accumulator is rescaled by exp(-inf) = 0 and must hold 0 (not
        // -inf * V) when that happens.
        let geo = PoolGeometry {
            page_size: 16,
            pages_per_segment: 4,
            kv_heads: 1,
            head_dim: 16,
            format: KvFormat::E4m3,
        };
        let tokens = geo.tokens_per_segment();
        let codes = vec![0x38u8; tokens * 16];
        let mut k_scale: Vec<u8> = (0..tokens).flat_map(|_| 1.0f32.to_ne_bytes()).collect();
        let v_scale = k_scale.clone();
        for t in 0..16 {
            k_scale[4 * t..4 * t + 4].copy_from_slice(&f32::INFINITY.to_ne_bytes());
        }
        let seg = SegmentLayer {
            k: &codes,
            v: &codes,
            k_scale: &k_scale,
            v_scale: &v_scale,
        };
        let q = vec![-0.25f32; 5 * 16];
        let batch = DecodeBatch {
            q: &q,
            q_heads: 5,
            indptr: &[0, 3],
            indices: &[0, 1, 2],
            kv_lens: &[40],
            sm_scale: 1.0,
        };
        for isa in Isa::available() {
            let got = decode(&geo, &[Some(seg)], &batch, 1, isa).expect("valid");
            assert!(
                got.out.iter().all(|x| (x - 1.0).abs() < 1e-6),
                "{}: {:?}",
                isa.name(),
                &got.out[..16]
            );
            let want = -4.0 + 24f32.ln();
            assert!(
                got.lse.iter().all(|x| (x - want).abs() < 1e-5),
                "{}",
                isa.name()
            );
        }
    }

    #[test]
    fn a_nan_score_makes_its_head_nan_and_leaves_the_others() {
        // The pool stores a NaN scale next to NaN input; the whole row reads NaN.
        let geo = PoolGeometry {
            page_size: 16,
            pages_per_segment: 4,
            kv_heads: 2,
            head_dim: 16,
            format: KvFormat::E4m3,
        };
        let tokens = geo.tokens_per_segment() * geo.kv_heads;
        let codes = vec![0x38u8; tokens * 16]; // 1.0
        let mut k_scale: Vec<u8> = (0..tokens).flat_map(|_| 1.0f32.to_ne_bytes()).collect();
        let v_scale = k_scale.clone();
        // Token 40 (chunk 0, block 2), head 1.
        k_scale[(40 * 2 + 1) * 4..(40 * 2 + 2) * 4].copy_from_slice(&f32::NAN.to_ne_bytes());
        let seg = SegmentLayer {
            k: &codes,
            v: &codes,
            k_scale: &k_scale,
            v_scale: &v_scale,
        };
        let q = vec![0.5f32; 2 * 16];
        let batch = DecodeBatch {
            q: &q,
            q_heads: 2,
            indptr: &[0, 4],
            indices: &[0, 1, 2, 3],
            kv_lens: &[64],
            sm_scale: 1.0,
        };
        for isa in Isa::available() {
            let got = decode(&geo, &[Some(seg)], &batch, 2, isa).expect("valid");
            assert!(
                got.out[..16].iter().all(|x| (x - 1.0).abs() < 1e-6),
                "{}",
                isa.name()
            );
            assert!(got.out[16..].iter().all(|x| x.is_nan()), "{}", isa.name());
            assert!(
                got.lse[0].is_finite() && got.lse[1].is_nan(),
                "{}",
                isa.name()
            );
        }
    }
}
