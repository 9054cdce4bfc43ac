//! Splitting a batch into items of one (request, KV head, chunk), running
//! them on scoped threads, and merging each (request, head)'s items by
//! log-sum-exp in chunk order, so results do not depend on the thread count.

use std::sync::Mutex;

use crate::isa::Isa;
use crate::kernel::{run_item, Scratch};
use crate::{
    DecodeBatch, DecodeOptions, PoolGeometry, SegmentLayer, BYTES_PER_THREAD, CHUNK_TOKENS,
};

/// What every item reads.
pub(crate) struct Ctx<'a, 'b> {
    pub(crate) g: PoolGeometry,
    pub(crate) segments: &'b [Option<SegmentLayer<'a>>],
    pub(crate) group: usize,
    pub(crate) options: DecodeOptions,
}

/// One unit of work: request `req`, KV head `head`, pages `pages` of it
/// from `first_page` (an index into the page ids); it reads `tokens`
/// tokens starting `skip` tokens into its first page (`skip > 0` only for
/// a request's first item, when its window starts inside a page).
#[derive(Clone, Copy)]
pub(crate) struct Item {
    pub(crate) req: usize,
    pub(crate) head: usize,
    pub(crate) first_page: usize,
    pub(crate) pages: usize,
    pub(crate) skip: usize,
    pub(crate) tokens: usize,
}

fn items(ctx: &Ctx<'_, '_>, b: &DecodeBatch<'_>, n: usize) -> Vec<Item> {
    let ps = ctx.g.page_size;
    let chunk_pages = (CHUNK_TOKENS / ps).max(1);
    let mut out = Vec::new();
    for req in 0..n {
        let first = b.indptr[req] as usize;
        let pages = b.indptr[req + 1] as usize - first;
        let len = b.kv_lens[req] as usize;
        // Pages wholly before the first visible key are never read.
        let lo = ctx.options.first_key(len);
        for head in 0..ctx.g.kv_heads {
            let mut p = lo / ps;
            while p < pages {
                let take = chunk_pages.min(pages - p);
                let start = lo.max(p * ps);
                let end = ((p + take) * ps).min(len);
                out.push(Item {
                    req,
                    head,
                    first_page: first + p,
                    pages: take,
                    skip: start - p * ps,
                    tokens: end - start,
                });
                p += take;
            }
        }
    }
    out
}

/// Threads worth starting for `work`: at most `threads`, one per item, and
/// one per [`BYTES_PER_THREAD`] bytes read (at least 1).
pub(crate) fn workers(ctx: &Ctx<'_, '_>, work: &[Item], threads: usize) -> usize {
    let g = &ctx.g;
    let per_token =
        g.head_dim * g.format.element_bytes() * 2 + if g.format.scaled() { 8 } else { 0 };
    let bytes: usize = work
        .iter()
        .map(|i| i.tokens.saturating_mul(per_token))
        .fold(0, usize::saturating_add);
    threads.min(work.len()).min(bytes / BYTES_PER_THREAD).max(1)
}

/// Run every item on up to `threads` workers (fewer for small calls, see
/// [`workers`]), then merge.
pub(crate) fn run(
    ctx: &Ctx<'_, '_>,
    b: &DecodeBatch<'_>,
    n: usize,
    threads: usize,
    isa: Isa,
) -> (Vec<f32>, Vec<f32>) {
    let (g, d) = (ctx.group, ctx.g.head_dim);
    // Queries scaled once so that scores are in log2 units (exp2 below);
    // with a soft cap, so that `q . k` is what tanh takes, the kernel
    // multiplying tanh's value by the cap in log2 units.
    let cap = ctx.options.soft_cap;
    let scale = if cap > 0.0 {
        b.sm_scale / cap
    } else {
        b.sm_scale * std::f32::consts::LOG2_E
    };
    let q: Vec<f32> = b.q.iter().map(|x| x * scale).collect();
    let work = items(ctx, b, n);
    // Per item: acc [group, d], then m [group], then l [group].
    let slot = g * (d + 2);
    let mut partial = vec![0.0f32; work.len() * slot];
    let workers = workers(ctx, &work, threads);
    {
        // Items are handed out one at a time from a shared queue, to this
        // thread and to parked helpers (`pool`): a helper that wakes late
        // (a busy machine) finds the queue drained, and is not waited for.
        let queue = Mutex::new(work.iter().zip(partial.chunks_mut(slot)));
        let job = || {
            let mut scratch = Scratch::new(g, d);
            loop {
                let next = match queue.lock() {
                    Ok(mut it) => it.next(),
                    Err(poisoned) => poisoned.into_inner().next(),
                };
                let Some((item, part)) = next else {
                    break;
                };
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
        crate::pool::run(workers - 1, &job);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvFormat;

    fn ctx(format: KvFormat) -> Ctx<'static, 'static> {
        Ctx {
            g: PoolGeometry {
                page_size: 16,
                pages_per_segment: 64,
                kv_heads: 2,
                head_dim: 64,
                format,
            },
            segments: &[],
            group: 4,
            options: DecodeOptions::FULL,
        }
    }

    fn item(tokens: usize) -> Item {
        Item {
            req: 0,
            head: 0,
            first_page: 0,
            pages: tokens.div_ceil(16),
            skip: 0,
            tokens,
        }
    }

    #[test]
    fn small_calls_run_on_the_calling_thread_large_ones_on_more() {
        let c = ctx(KvFormat::F32); // 512 bytes per token and head
                                    // 1,024 tokens x 2 heads x 2 requests: 2 MiB, 4 items.
        let small = vec![item(1024); 4];
        assert_eq!(workers(&c, &small, 8), 2);
        assert_eq!(workers(&c, &small[..1], 8), 1);
        assert_eq!(workers(&c, &[item(100)], 16), 1);
        assert_eq!(workers(&c, &[], 16), 1);
        // 16 items of 4,096 tokens: 32 MiB, as many threads as given (up to 16).
        let large = vec![item(4096); 16];
        assert_eq!(workers(&c, &large, 3), 3);
        assert_eq!(workers(&c, &large, 64), 16);
        // FP8 reads 4x fewer code bytes (plus 8 bytes of scales per token and head).
        let e = ctx(KvFormat::E4m3);
        assert_eq!(workers(&e, &small, 8), 1);
        assert_eq!(workers(&e, &large, 64), 8);
    }
}
