//! Validation of a decode call against the pool before any work starts, so
//! that a refused call writes nothing; every message carries the numbers.

use crate::{DecodeBatch, DecodeOptions, ExtendBatch, PoolGeometry, SegmentLayer};
use radixseg_core::{CoreError, Result};

pub(crate) fn bad(message: String) -> CoreError {
    CoreError::InvalidInput(message)
}

pub(crate) fn check_geometry(g: &PoolGeometry) -> Result<()> {
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

pub(crate) fn check_options(o: &DecodeOptions) -> Result<()> {
    if o.window_left < -1 {
        return Err(bad(format!(
            "window_left must be -1 (no window) or at least 0, got {}",
            o.window_left
        )));
    }
    if o.chunk_size < 0 {
        return Err(bad(format!(
            "chunk_size must be 0 (no chunks) or at least 1, got {}",
            o.chunk_size
        )));
    }
    if o.window_left >= 0 && o.chunk_size > 0 {
        return Err(bad(format!(
            "window_left = {} and chunk_size = {} cannot both be set: a layer has a \
             sliding window or chunked attention, not both",
            o.window_left, o.chunk_size
        )));
    }
    if !o.soft_cap.is_finite() || o.soft_cap < 0.0 {
        return Err(bad(format!(
            "soft_cap must be 0 (no cap) or a positive finite number, got {}",
            o.soft_cap
        )));
    }
    Ok(())
}

pub(crate) fn check_segments(
    g: &PoolGeometry,
    segments: &[Option<SegmentLayer<'_>>],
) -> Result<()> {
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
pub(crate) fn check_batch(
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
    check_table(g, segments, b.indptr, b.indices, b.kv_lens)?;
    Ok(batch)
}

/// The page table: `indptr [batch + 1]` (its first entry already checked
/// to exist), each request's pages exactly covering its `kv_lens`, every
/// page id in a live segment.
fn check_table(
    g: &PoolGeometry,
    segments: &[Option<SegmentLayer<'_>>],
    indptr: &[i64],
    indices: &[i64],
    kv_lens: &[i64],
) -> Result<()> {
    let batch = indptr.len() - 1;
    if kv_lens.len() != batch {
        return Err(bad(format!(
            "kv_lens has {} entries, one per request ({batch}) needed",
            kv_lens.len()
        )));
    }
    if indptr[0] != 0 {
        return Err(bad(format!("indptr[0] must be 0, got {}", indptr[0])));
    }
    let ps = g.page_size as i64;
    for i in 0..batch {
        let (lo, hi) = (indptr[i], indptr[i + 1]);
        if hi < lo || hi as u64 > indices.len() as u64 {
            return Err(bad(format!(
                "indptr[{i}..={}] = {lo}..{hi} is not a range inside the {} page ids",
                i + 1,
                indices.len()
            )));
        }
        let (pages, len) = (hi - lo, kv_lens[i]);
        let need = if len > 0 { (len - 1) / ps + 1 } else { 0 };
        if len < 0 || need != pages {
            return Err(bad(format!(
                "request {i}: {len} KV tokens need {need} pages of {ps}, the table gives {pages}"
            )));
        }
    }
    let used = indptr[batch] as usize;
    let limit = segments.len() as u64 * g.pages_per_segment as u64;
    for (j, &p) in indices[..used].iter().enumerate() {
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
    Ok(())
}

/// Validate an extend call against the pool; returns `batch`.
pub(crate) fn check_extend(
    g: &PoolGeometry,
    segments: &[Option<SegmentLayer<'_>>],
    b: &ExtendBatch<'_>,
    o: &DecodeOptions,
) -> Result<usize> {
    if b.q_heads == 0 || !b.q_heads.is_multiple_of(g.kv_heads) {
        return Err(bad(format!(
            "q_heads = {} must be a positive multiple of kv_heads = {}",
            b.q_heads, g.kv_heads
        )));
    }
    if !b.causal && (o.window_left >= 0 || o.chunk_size > 0) {
        return Err(bad(format!(
            "window_left = {} / chunk_size = {} need causal attention",
            o.window_left, o.chunk_size
        )));
    }
    if b.indptr.is_empty() {
        return Err(bad("indptr needs batch + 1 >= 1 entries, got 0".to_string()));
    }
    let batch = b.indptr.len() - 1;
    if b.qo_indptr.len() != batch + 1 {
        return Err(bad(format!(
            "qo_indptr has {} entries, kv_indptr {}: both need batch + 1",
            b.qo_indptr.len(),
            batch + 1
        )));
    }
    if b.qo_indptr[0] != 0 {
        return Err(bad(format!(
            "qo_indptr[0] must be 0, got {}",
            b.qo_indptr[0]
        )));
    }
    let row = b.q_heads * g.head_dim;
    let total_q = b.qo_indptr[batch];
    let rows_ok = u64::try_from(total_q)
        .ok()
        .and_then(|t| t.checked_mul(row as u64))
        .is_some_and(|need| need == b.q.len() as u64);
    if !rows_ok {
        return Err(bad(format!(
            "q holds {} values; qo_indptr[-1] = {total_q} rows x {} heads x {} dims need more or fewer",
            b.q.len(),
            b.q_heads,
            g.head_dim
        )));
    }
    if b.kv_lens.len() != batch {
        return Err(bad(format!(
            "kv_lens has {} entries, one per request ({batch}) needed",
            b.kv_lens.len()
        )));
    }
    for i in 0..batch {
        let (lo, hi) = (b.qo_indptr[i], b.qo_indptr[i + 1]);
        if hi < lo {
            return Err(bad(format!(
                "qo_indptr[{i}..={}] = {lo}..{hi} is decreasing",
                i + 1
            )));
        }
        if b.causal && hi - lo > b.kv_lens[i] {
            return Err(bad(format!(
                "request {i} has {} new tokens but only {} KV tokens; causal extend needs \
                 the new tokens' K/V in the pool",
                hi - lo,
                b.kv_lens[i]
            )));
        }
    }
    check_table(g, segments, b.indptr, b.indices, b.kv_lens)?;
    Ok(batch)
}
