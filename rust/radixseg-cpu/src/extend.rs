//! The extend kernel: several new query rows per request, causal over the
//! request's paged KV (prefill, chunked prefill over a cached prefix).
//!
//! A work item ([`Tile`]) is one (request, tile of at most
//! [`crate::EXTEND_VECTORS`]` / group` query rows, KV head): its `rows x group`
//! query vectors share every K/V block decoded (the same decode as the
//! decode kernel's, block by block of [`BLOCK`] tokens), and run one online
//! softmax each. The item reads only the keys some row of the tile sees:
//! from the first row's first visible key (window, chunk) to the last
//! row's own position; pages outside are not touched. Within a block a
//! row's visible keys are a range; keys outside it are masked to `-inf`
//! after scoring and their V rows are never read for that row, so a NaN
//! or an infinity in a masked key (or its scale) cannot reach the row.
//! Items write disjoint slots and are scheduled largest first on a shared
//! queue, so the result does not depend on the thread count.

use std::sync::Mutex;

use crate::format::{fmt, KvFormat};
use crate::isa::Isa;
use crate::kernel::{
    accumulate_v, prefetch_distance, prefetch_page, read_f32, scores, tanh, Scratch,
};
use crate::schedule::Ctx;
use crate::simd::{dispatch, Simd, WithSimd};
use crate::{ExtendBatch, BLOCK};

/// One unit of extend work: rows `row0..row0 + rows` of `q` (request
/// `req`, the first at KV position `pos0`), KV head `head`, reading keys
/// `key_lo..key_hi` of the request (its page ids start at `first_page`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    pub(crate) head: usize,
    pub(crate) row0: usize,
    pub(crate) rows: usize,
    pub(crate) pos0: usize,
    pub(crate) first_page: usize,
    pub(crate) key_lo: usize,
    pub(crate) key_hi: usize,
}

impl Tile {
    /// Keys times rows: the item's share of the work, for scheduling.
    fn cost(&self) -> usize {
        (self.key_hi - self.key_lo + BLOCK) * self.rows
    }
}

/// What a tile needs beside the context.
pub(crate) struct TileIn<'q> {
    /// All queries, scaled (see `run`).
    q: &'q [f32],
    q_heads: usize,
    causal: bool,
    kv_len: usize,
    /// The request's page ids (and the ones after).
    pages: &'q [i64],
}

/// Rows of one tile: the most query vectors (rows x group) an item holds.
pub(crate) fn tile_rows(group: usize, vectors: usize) -> usize {
    (vectors / group).max(1)
}

fn tiles(ctx: &Ctx<'_, '_>, b: &ExtendBatch<'_>, n: usize, vectors: usize) -> Vec<(usize, Tile)> {
    let tq = tile_rows(ctx.group, vectors);
    let mut out = Vec::new();
    for req in 0..n {
        let q0 = b.qo_indptr[req] as usize;
        let qo = b.qo_indptr[req + 1] as usize - q0;
        let kv_len = b.kv_lens[req] as usize;
        if qo == 0 || kv_len == 0 {
            continue; // rows (if any) keep 0 and -inf
        }
        let first_page = b.indptr[req] as usize;
        let mut r = 0;
        while r < qo {
            let rows = tq.min(qo - r);
            // Causal: qo <= kv_len (checked), so the positions are >= 0.
            let pos0 = (kv_len + r).saturating_sub(qo);
            let (key_lo, key_hi) = if b.causal {
                (ctx.options.first_key(pos0 + 1), pos0 + rows)
            } else {
                (0, kv_len)
            };
            for head in 0..ctx.g.kv_heads {
                out.push((
                    req,
                    Tile {
                        head,
                        row0: q0 + r,
                        rows,
                        pos0,
                        first_page,
                        key_lo,
                        key_hi,
                    },
                ));
            }
            r += rows;
        }
    }
    out
}

/// Run every tile (of at most `vectors` query vectors) on `threads`
/// workers; returns `(out, lse)` as [`crate::extend`] does.
pub(crate) fn run(
    ctx: &Ctx<'_, '_>,
    b: &ExtendBatch<'_>,
    n: usize,
    threads: usize,
    isa: Isa,
    vectors: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (g, d) = (ctx.group, ctx.g.head_dim);
    // Scores in log2 units, as in the decode kernel's `schedule::run`.
    let cap = ctx.options.soft_cap;
    let scale = if cap > 0.0 {
        b.sm_scale / cap
    } else {
        b.sm_scale * std::f32::consts::LOG2_E
    };
    let q: Vec<f32> = b.q.iter().map(|x| x * scale).collect();
    let work = tiles(ctx, b, n, vectors);
    // Per tile: out [rows x group, d], then lse [rows x group].
    let mut partial = vec![0.0f32; work.iter().map(|(_, t)| t.rows * g * (d + 1)).sum()];
    {
        let mut jobs: Vec<(&(usize, Tile), &mut [f32])> = Vec::with_capacity(work.len());
        let mut rest: &mut [f32] = &mut partial;
        for w in &work {
            let (slot, tail) = std::mem::take(&mut rest).split_at_mut(w.1.rows * g * (d + 1));
            jobs.push((w, slot));
            rest = tail;
        }
        // The tiles of one (request, KV head) read the same keys: run them
        // one after another (on any thread), so that those keys are still
        // in the last-level cache for the next tile. Groups largest first,
        // and inside a group the largest tile first (the causal tiles at a
        // request's end read the most), so the small ones end the queue.
        let mut group_cost = std::collections::HashMap::new();
        for (req, t) in &work {
            *group_cost.entry((*req, t.head)).or_insert(0usize) += t.cost();
        }
        jobs.sort_by_key(|((req, t), _)| {
            let total = group_cost.get(&(*req, t.head)).copied().unwrap_or(0);
            (
                std::cmp::Reverse(total),
                *req,
                t.head,
                std::cmp::Reverse(t.cost()),
            )
        });
        let queue = Mutex::new(jobs.into_iter());
        let job = || {
            let mut scratch = Scratch::new(vectors.max(g), d);
            let mut ranges = Vec::new();
            loop {
                let next = match queue.lock() {
                    Ok(mut it) => it.next(),
                    Err(poisoned) => poisoned.into_inner().next(),
                };
                let Some((&(req, ref tile), slot)) = next else {
                    break;
                };
                let input = TileIn {
                    q: &q,
                    q_heads: b.q_heads,
                    causal: b.causal,
                    kv_len: b.kv_lens[req] as usize,
                    pages: &b.indices[tile.first_page..],
                };
                run_tile(isa, ctx, &input, tile, &mut scratch, &mut ranges, slot);
            }
        };
        // The parked helpers (`pool`), as decode: no thread starts per call.
        let threads = threads.min(work.len()).max(1);
        crate::pool::run(threads - 1, &job);
    }
    let total_q = b.q.len() / (b.q_heads * d);
    let mut out = vec![0.0f32; total_q * b.q_heads * d];
    let mut lse = vec![f32::NEG_INFINITY; total_q * b.q_heads];
    let mut at = 0;
    for (_, t) in &work {
        let m = t.rows * g;
        let (o, l) = partial[at..at + m * (d + 1)].split_at(m * d);
        for r in 0..t.rows {
            let qh = (t.row0 + r) * b.q_heads + t.head * g;
            out[qh * d..(qh + g) * d].copy_from_slice(&o[r * g * d..(r + 1) * g * d]);
            lse[qh..qh + g].copy_from_slice(&l[r * g..(r + 1) * g]);
        }
        at += m * (d + 1);
    }
    (out, lse)
}

fn run_tile(
    isa: Isa,
    ctx: &Ctx<'_, '_>,
    input: &TileIn<'_>,
    tile: &Tile,
    sc: &mut Scratch,
    ranges: &mut Vec<(usize, usize)>,
    slot: &mut [f32],
) {
    dispatch(
        isa,
        TileJob {
            ctx,
            input,
            tile,
            sc,
            ranges,
            slot,
        },
    );
}

/// [`tile_generic`]'s arguments, for [`dispatch`].
struct TileJob<'j, 'a, 'b> {
    ctx: &'j Ctx<'a, 'b>,
    input: &'j TileIn<'j>,
    tile: &'j Tile,
    sc: &'j mut Scratch,
    ranges: &'j mut Vec<(usize, usize)>,
    slot: &'j mut [f32],
}

impl WithSimd for TileJob<'_, '_, '_> {
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        tile_generic(
            s,
            self.ctx,
            self.input,
            self.tile,
            self.sc,
            self.ranges,
            self.slot,
        )
    }
}

/// The tile loop, for one instruction set: dispatches on the format.
#[inline(always)]
fn tile_generic<S: Simd>(
    s: S,
    ctx: &Ctx<'_, '_>,
    input: &TileIn<'_>,
    tile: &Tile,
    sc: &mut Scratch,
    ranges: &mut Vec<(usize, usize)>,
    slot: &mut [f32],
) {
    match ctx.g.format {
        KvFormat::E4m3 => tile_format::<S, { fmt::E4M3 }>(s, ctx, input, tile, sc, ranges, slot),
        KvFormat::E5m2 => tile_format::<S, { fmt::E5M2 }>(s, ctx, input, tile, sc, ranges, slot),
        KvFormat::F16 => tile_format::<S, { fmt::F16 }>(s, ctx, input, tile, sc, ranges, slot),
        KvFormat::Bf16 => tile_format::<S, { fmt::BF16 }>(s, ctx, input, tile, sc, ranges, slot),
        KvFormat::F32 => tile_format::<S, { fmt::F32 }>(s, ctx, input, tile, sc, ranges, slot),
    }
}

#[inline(always)]
fn tile_format<S: Simd, const F: u8>(
    s: S,
    ctx: &Ctx<'_, '_>,
    input: &TileIn<'_>,
    tile: &Tile,
    sc: &mut Scratch,
    ranges: &mut Vec<(usize, usize)>,
    slot: &mut [f32],
) {
    let geo = &ctx.g;
    let (g, d, ps, pps, h) = (
        ctx.group,
        geo.head_dim,
        geo.page_size,
        geo.pages_per_segment,
        geo.kv_heads,
    );
    let (elem, factor, scaled) = (
        geo.format.element_bytes(),
        geo.format.factor(),
        geo.format.scaled(),
    );
    let row_bytes = d * elem;
    let mv = tile.rows * g;
    let (acc, lse_out) = slot.split_at_mut(mv * d);
    acc.fill(0.0);
    let mut m = vec![f32::NEG_INFINITY; mv];
    let mut l = vec![0.0f32; mv];
    // Each row's visible keys, [lo, hi).
    ranges.clear();
    for r in 0..tile.rows {
        ranges.push(if input.causal {
            let p = tile.pos0 + r;
            (ctx.options.first_key(p + 1), p + 1)
        } else {
            (0, input.kv_len)
        });
    }
    let cap = ctx.options.soft_cap * std::f32::consts::LOG2_E;
    // The query vectors of row r: q[(row0 + r) * q_heads + head * g ..][..g * d].
    let q_at = |r: usize| ((tile.row0 + r) * input.q_heads + tile.head * g) * d;
    let (first_pg, last_pg) = (tile.key_lo / ps, tile.key_hi.div_ceil(ps));
    let pages = &input.pages[first_pg..last_pg];
    let ahead = prefetch_distance(ps);
    for &page in &pages[..ahead.min(pages.len())] {
        prefetch_page(ctx, page, ps, tile.head);
    }
    let mut n = 0; // tokens in the block being filled
    let mut b0 = tile.key_lo; // position of the block's first token
    for (i, &page) in pages.iter().enumerate() {
        if let Some(&next) = pages.get(i + ahead) {
            prefetch_page(ctx, next, ps, tile.head);
        }
        let page = page as usize;
        let Some(seg) = ctx.segments[page / pps] else {
            continue; // unreachable: check_table proved every page live
        };
        let page_pos = (first_pg + i) * ps;
        let from = tile.key_lo.max(page_pos) - page_pos;
        let to = tile.key_hi.min(page_pos + ps) - page_pos;
        let first_token = (page % pps) * ps;
        let (mut t, end) = (first_token + from, first_token + to);
        while t < end {
            let run = (end - t).min(BLOCK - n);
            if h == 1 {
                let (off, len) = (t * row_bytes, run * row_bytes);
                let dst = n * d..(n + run) * d;
                s.decode::<F>(&seg.k[off..off + len], &mut sc.k[dst.clone()]);
                s.decode::<F>(&seg.v[off..off + len], &mut sc.v[dst]);
            } else {
                for j in 0..run {
                    let off = ((t + j) * h + tile.head) * row_bytes;
                    let dst = (n + j) * d..(n + j + 1) * d;
                    s.decode::<F>(&seg.k[off..off + row_bytes], &mut sc.k[dst.clone()]);
                    s.decode::<F>(&seg.v[off..off + row_bytes], &mut sc.v[dst]);
                }
            }
            if scaled {
                for j in 0..run {
                    let at = (t + j) * h + tile.head;
                    sc.ks[n + j] = read_f32(seg.k_scale, at) * factor;
                    sc.vs[n + j] = read_f32(seg.v_scale, at) * factor;
                }
            }
            n += run;
            t += run;
            if n == BLOCK {
                block(
                    s, sc, input.q, &q_at, ranges, b0, n, g, d, cap, acc, &mut m, &mut l,
                );
                b0 += n;
                n = 0;
            }
        }
    }
    if n > 0 {
        block(
            s, sc, input.q, &q_at, ranges, b0, n, g, d, cap, acc, &mut m, &mut l,
        );
    }
    // Normalize; rows without a visible key keep 0 and -inf, poisoned ones NaN.
    for v in 0..mv {
        let row = &mut acc[v * d..(v + 1) * d];
        if m[v].is_nan() {
            row.fill(f32::NAN);
            lse_out[v] = f32::NAN;
        } else if m[v] == f32::NEG_INFINITY {
            row.fill(0.0);
            lse_out[v] = f32::NEG_INFINITY;
        } else {
            for x in row.iter_mut() {
                *x /= l[v];
            }
            lse_out[v] = (m[v] + l[v].log2()) * std::f32::consts::LN_2;
        }
    }
}

/// One block of `n` keys at positions `b0..b0 + n` against every query
/// vector of the tile whose row sees one of them.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block<S: Simd>(
    s: S,
    sc: &mut Scratch,
    q: &[f32],
    q_at: &impl Fn(usize) -> usize,
    ranges: &[(usize, usize)],
    b0: usize,
    n: usize,
    g: usize,
    d: usize,
    cap: f32,
    acc: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    let mut full = n == BLOCK;
    // Scores of every vector whose row sees a key of the block, two
    // vectors at a time where the registers allow (each K vector loaded
    // then feeds two FMAs).
    let mut pending: Option<(usize, usize)> = None; // (vector, its q offset)
    for (r, &(lo, hi)) in ranges.iter().enumerate() {
        // The row's visible keys as lanes a..e of the block.
        let a = lo.saturating_sub(b0).min(n);
        let e = hi.saturating_sub(b0).min(n);
        full &= a == 0 && e == BLOCK;
        if a >= e {
            continue;
        }
        for gi in 0..g {
            let v = r * g + gi;
            if m[v].is_nan() {
                continue;
            }
            let at = q_at(r) + gi * d;
            if S::LANES < 16 {
                scores(s, sc, &q[at..at + d], v, d);
                continue;
            }
            match pending.take() {
                None => pending = Some((v, at)),
                Some((u, au)) => scores2(s, sc, &q[au..au + d], &q[at..at + d], u, v, d),
            }
        }
    }
    if let Some((u, au)) = pending {
        scores(s, sc, &q[au..au + d], u, d);
    }
    for (r, &(lo, hi)) in ranges.iter().enumerate() {
        let a = lo.saturating_sub(b0).min(n);
        let e = hi.saturating_sub(b0).min(n);
        for gi in 0..g {
            let v = r * g + gi;
            if a >= e {
                sc.live[v] = false;
                continue;
            }
            let row = &mut acc[v * d..(v + 1) * d];
            softmax_step(s, sc, v, a, e, cap, &mut m[v], &mut l[v], row);
        }
    }
    let mv = ranges.len() * g;
    if full {
        // Every vector sees every key: register tiles across rows.
        let mut v0 = 0;
        while v0 < mv {
            v0 += if mv - v0 >= 4 {
                accumulate_v::<S, 4>(s, sc, v0, d, acc)
            } else if mv - v0 >= 2 {
                accumulate_v::<S, 2>(s, sc, v0, d, acc)
            } else {
                accumulate_v::<S, 1>(s, sc, v0, d, acc)
            };
        }
        return;
    }
    // Partial block (the causal diagonal, a window's edge, the last
    // block): each vector takes only its visible keys' V rows.
    for (r, &(lo, hi)) in ranges.iter().enumerate() {
        let a = lo.saturating_sub(b0).min(n);
        let e = hi.saturating_sub(b0).min(n);
        if a >= e {
            continue;
        }
        for gi in 0..g {
            let v = r * g + gi;
            if sc.live[v] {
                v_range(s, sc, v, a, e, d, acc);
            }
        }
    }
}

/// Raw scores `q . k` of two query vectors (`va`, `vb`) against all
/// `BLOCK` rows, as [`scores`] computes them one at a time (the same
/// additions in the same order, so the same bits), each K vector loaded
/// once for both: 16 accumulators, which needs 32 vector registers.
#[inline(always)]
fn scores2<S: Simd>(
    s: S,
    sc: &mut Scratch,
    qa: &[f32],
    qb: &[f32],
    va: usize,
    vb: usize,
    d: usize,
) {
    let lanes = S::LANES;
    let mut pa = [s.splat(0.0); BLOCK];
    let mut pb = [s.splat(0.0); BLOCK];
    for (half, (oa, ob)) in pa
        .chunks_exact_mut(8)
        .zip(pb.chunks_exact_mut(8))
        .enumerate()
    {
        let rows = &sc.k[half * 8 * d..(half + 1) * 8 * d];
        let mut xa = [s.splat(0.0); 8];
        let mut xb = [s.splat(0.0); 8];
        for (c, (ca, cb)) in qa
            .chunks_exact(lanes)
            .zip(qb.chunks_exact(lanes))
            .enumerate()
        {
            let (ca, cb) = (s.load(ca), s.load(cb));
            for j in 0..8 {
                // SAFETY: j < 8 and (c + 1) * lanes <= d (qa has d values,
                // a multiple of lanes), so the lanes read end within
                // rows[..8 * d] = rows.
                let k = unsafe { s.load_ptr(rows.as_ptr().add(j * d + c * lanes)) };
                xa[j] = s.fma(ca, k, xa[j]);
                xb[j] = s.fma(cb, k, xb[j]);
            }
        }
        oa.copy_from_slice(&xa);
        ob.copy_from_slice(&xb);
    }
    s.sums(&pa, &mut sc.p[va * BLOCK..(va + 1) * BLOCK]);
    s.sums(&pb, &mut sc.p[vb * BLOCK..(vb + 1) * BLOCK]);
}

/// Vector `v`'s online-softmax step over lanes `a..e` of the block (the
/// others are masked to `-inf` after scaling and capping, so a NaN there
/// counts for nothing); as the decode kernel's `softmax_step` otherwise.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn softmax_step<S: Simd>(
    s: S,
    sc: &mut Scratch,
    v: usize,
    a: usize,
    e: usize,
    cap: f32,
    m: &mut f32,
    l: &mut f32,
    acc: &mut [f32],
) {
    let lanes = S::LANES;
    sc.live[v] = false;
    if m.is_nan() {
        return;
    }
    let p = &mut sc.p[v * BLOCK..(v + 1) * BLOCK];
    let mut mx = s.splat(f32::NEG_INFINITY);
    let mut nan = false;
    let whole = a == 0 && e == BLOCK;
    for (i, c) in p.chunks_exact_mut(lanes).enumerate() {
        let mut x = s.mul(s.load(c), s.load(&sc.ks[i * lanes..]));
        if cap > 0.0 {
            x = s.mul(tanh(s, x), s.splat(cap));
        }
        if whole {
            nan |= s.has_nan(x);
            mx = s.max(mx, x);
        }
        s.store(x, c);
    }
    if !whole {
        // Mask after scaling and capping (tanh would turn -inf into -cap).
        p[..a].fill(f32::NEG_INFINITY);
        p[e..].fill(f32::NEG_INFINITY);
        for c in p.chunks_exact(lanes) {
            let x = s.load(c);
            nan |= s.has_nan(x);
            mx = s.max(mx, x);
        }
    }
    let block_max = s.max_lane(mx);
    if nan || block_max == f32::INFINITY {
        *m = f32::NAN;
        *l = f32::NAN;
        acc.fill(f32::NAN);
        return;
    }
    let m_new = m.max(block_max);
    if m_new == f32::NEG_INFINITY {
        return;
    }
    let alpha = if m_new > *m { (*m - m_new).exp2() } else { 1.0 };
    let neg = s.splat(-m_new);
    let mut total = s.splat(0.0);
    for (i, c) in p.chunks_exact_mut(lanes).enumerate() {
        let x = s.exp2(s.add(s.load(c), neg));
        total = s.add(total, x);
        // Masked lanes: x = 0 (times a scale that may be NaN: never read).
        s.store(s.mul(x, s.load(&sc.vs[i * lanes..])), c);
    }
    *l = *l * alpha + s.sum(total);
    *m = m_new;
    sc.alpha[v] = alpha;
    sc.live[v] = true;
}

/// `acc_v = acc_v * alpha + sum over t in a..e of p[t] * V[t]`.
#[inline(always)]
fn v_range<S: Simd>(s: S, sc: &Scratch, v: usize, a: usize, e: usize, d: usize, acc: &mut [f32]) {
    let lanes = S::LANES;
    let al = s.splat(sc.alpha[v]);
    let p = &sc.p[v * BLOCK..(v + 1) * BLOCK];
    let row = &mut acc[v * d..(v + 1) * d];
    let mut c = 0;
    // Four vectors of head_dim at a time, then one.
    while (c + 4) * lanes <= d {
        let mut r: [S::F; 4] = std::array::from_fn(|j| s.mul(s.load(&row[(c + j) * lanes..]), al));
        for (t, &pt) in p.iter().enumerate().take(e).skip(a) {
            let pt = s.splat(pt);
            let vt = &sc.v[t * d + c * lanes..];
            for (j, x) in r.iter_mut().enumerate() {
                *x = s.fma(pt, s.load(&vt[j * lanes..]), *x);
            }
        }
        for (j, x) in r.iter().enumerate() {
            s.store(*x, &mut row[(c + j) * lanes..]);
        }
        c += 4;
    }
    while (c + 1) * lanes <= d {
        let mut x = s.mul(s.load(&row[c * lanes..]), al);
        for (t, &pt) in p.iter().enumerate().take(e).skip(a) {
            x = s.fma(s.splat(pt), s.load(&sc.v[t * d + c * lanes..]), x);
        }
        s.store(x, &mut row[c * lanes..]);
        c += 1;
    }
}
