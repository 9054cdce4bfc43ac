//! The generic per-item kernel: an online softmax over blocks of
//! [`BLOCK`] tokens (decode, score, exponentiate, accumulate V), written once
//! against the [`Simd`] trait and compiled for each instruction set.

use crate::format::{fmt, KvFormat};
use crate::isa::Isa;
use crate::schedule::{Ctx, Item};
use crate::simd::{dispatch, Simd, WithSimd};
use crate::BLOCK;

/// Per-thread buffers of the block loop.
pub(crate) struct Scratch {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    /// `[group, BLOCK]` scores, then probabilities times the V scales.
    pub(crate) p: Vec<f32>,
    pub(crate) ks: [f32; BLOCK],
    pub(crate) vs: [f32; BLOCK],
    /// `[group]`: what each head's accumulator is multiplied by this block.
    pub(crate) alpha: Vec<f32>,
    /// `[group]`: whether each head's accumulator takes this block.
    pub(crate) live: Vec<bool>,
}

impl Scratch {
    pub(crate) fn new(group: usize, d: usize) -> Self {
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

pub(crate) fn run_item(
    isa: Isa,
    ctx: &Ctx<'_, '_>,
    q: &[f32],
    item: &Item,
    pages: &[i64],
    scratch: &mut Scratch,
    part: &mut [f32],
) {
    dispatch(
        isa,
        ItemJob {
            ctx,
            q,
            item,
            pages,
            scratch,
            part,
        },
    );
}

/// [`item_generic`]'s arguments, for [`dispatch`].
struct ItemJob<'j, 'a, 'b> {
    ctx: &'j Ctx<'a, 'b>,
    q: &'j [f32],
    item: &'j Item,
    pages: &'j [i64],
    scratch: &'j mut Scratch,
    part: &'j mut [f32],
}

impl WithSimd for ItemJob<'_, '_, '_> {
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        item_generic(
            s,
            self.ctx,
            self.q,
            self.item,
            self.pages,
            self.scratch,
            self.part,
        )
    }
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
pub(crate) fn exp2_poly<S: Simd>(s: S, f: S::F) -> S::F {
    let mut p = s.splat(EXP2_POLY[0]);
    for c in &EXP2_POLY[1..] {
        p = s.fma(p, f, s.splat(*c));
    }
    s.fma(p, f, s.splat(1.0))
}

/// `tanh(x)` clamped to `|x| <= TANH_CLAMP`, as the ratio of an odd
/// polynomial of degree 13 and an even one of degree 6 (Eigen's
/// `ptanh_float` coefficients). Relative error below 1e-6 over all `f32`
/// (the tests measure it in every instruction set); NaN stays NaN (the
/// clamps keep their second operand's NaN) and +-inf give +-tanh(clamp),
/// 1 to within 3e-7.
#[inline(always)]
pub(crate) fn tanh<S: Simd>(s: S, x: S::F) -> S::F {
    let x = s.min(s.splat(TANH_CLAMP), s.max(s.splat(-TANH_CLAMP), x));
    let x2 = s.mul(x, x);
    let mut p = s.splat(TANH_NUM[0]);
    for c in &TANH_NUM[1..] {
        p = s.fma(p, x2, s.splat(*c));
    }
    let mut q = s.splat(TANH_DEN[0]);
    for c in &TANH_DEN[1..] {
        q = s.fma(q, x2, s.splat(*c));
    }
    s.div(s.mul(x, p), q)
}

/// Past this, `tanh` is 1 to within 3e-7.
const TANH_CLAMP: f32 = 7.905_311;
/// Numerator coefficients of x^13, x^11, ..., x (times x after the Horner loop).
const TANH_NUM: [f32; 7] = [
    -2.760_768_5e-16,
    2.000_188e-13,
    -8.604_672e-11,
    5.122_297e-8,
    1.485_722_4e-5,
    6.372_619_3e-4,
    4.893_524_6e-3,
];
/// Denominator coefficients of x^6, x^4, x^2, 1.
const TANH_DEN: [f32; 4] = [1.198_258_4e-6, 1.185_347_1e-4, 2.268_434_6e-3, 4.893_525e-3];

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

/// Pages this far ahead (at least [`PREFETCH_TOKENS`] tokens) are
/// prefetched while one is read.
pub(crate) fn prefetch_distance(page_size: usize) -> usize {
    PREFETCH_TOKENS.div_ceil(page_size).max(1)
}

/// Tokens of KV requested ahead of the ones being read. Scattered pages
/// defeat the hardware prefetchers, so the kernel asks for them itself;
/// with the hints going to L2 (see [`prefetch`]) two 16-token pages ahead
/// measured at least as well as one on a 2-core AMD EPYC (Zen 4) VM (1M
/// tokens of e4m3, page size 16, pages shuffled over 2 MiB-page segments;
/// a noisy shared machine, so within a few percent).
const PREFETCH_TOKENS: usize = 32;

/// Ask for the cache lines of `bytes` (no effect on the result).
///
/// On x86-64 the lines are requested into L2 (`prefetcht1`), not L1: a
/// `prefetcht0` holds one of the core's few L1 miss buffers until its line
/// arrives, and with a whole page's K and V rows requested at once those
/// run out, stalling the loads of the block being decoded. Into L2 the
/// 1M-token e4m3 decode above took about 10 % less time (decode alone,
/// without the scores: 46 ms -> 33 ms on one thread).
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch never faults and changes no state visible to
        // the program; the address is inside `bytes` anyway. SSE is part of
        // the x86-64 baseline.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
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
pub(crate) fn prefetch_page(ctx: &Ctx<'_, '_>, page: i64, take: usize, head: usize) {
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
    // The soft cap in log2 units (0: none); see `schedule::run`.
    let cap = ctx.options.soft_cap * std::f32::consts::LOG2_E;
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
        // The item's first page may start inside the request's window.
        let skip = if i == 0 { item.skip } else { 0 };
        let first_token = (page % pps) * ps + skip;
        let take = (ps - skip).min(left);
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
                block(s, sc, q, n, g, d, cap, acc, m, l);
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
        block(s, sc, q, n, g, d, cap, acc, m, l);
    }
}

#[inline(always)]
pub(crate) fn read_f32(bytes: &[u8], i: usize) -> f32 {
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
    cap: f32,
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
        softmax_step(s, sc, gi, n, cap, &mut m[gi], &mut l[gi], row);
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
pub(crate) fn scores<S: Simd>(s: S, sc: &mut Scratch, qg: &[f32], gi: usize, d: usize) {
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
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn softmax_step<S: Simd>(
    s: S,
    sc: &mut Scratch,
    gi: usize,
    n: usize,
    cap: f32,
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
        let mut x = s.mul(s.load(c), s.load(&sc.ks[i * lanes..]));
        if cap > 0.0 {
            // Soft cap: the queries were scaled by sm_scale / cap, so x is
            // score / cap; tanh keeps NaN and takes +-inf to +-1.
            x = s.mul(tanh(s, x), s.splat(cap));
        }
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
pub(crate) fn accumulate_v<S: Simd, const GT: usize>(
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
