//! The kernel against an `f64` reference written here, in every storage
//! format and every instruction set this CPU has, plus the edge cases of
//! the online softmax (NaN and infinite scores, stale scales, bad tables).

use super::*;
use crate::kernel::read_f32;

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

/// First key position a query over `len` tokens sees, written out from the
/// definitions (not `DecodeOptions::first_key`).
fn lo_of(o: &DecodeOptions, len: usize) -> usize {
    let p = len as i64 - 1;
    if len == 0 {
        0
    } else if o.window_left >= 0 {
        (p - o.window_left).max(0) as usize
    } else if o.chunk_size > 0 {
        (p / o.chunk_size * o.chunk_size) as usize
    } else {
        0
    }
}

/// f64 softmax attention, the way the tests in Python define it.
fn reference_with(pool: &Pool, b: &DecodeBatch<'_>, o: &DecodeOptions) -> (Vec<f64>, Vec<f64>) {
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
            for t in lo_of(o, len)..len {
                let k = pool.row(0, pages[t / ps], t % ps, h);
                let dot: f64 = q.iter().zip(&k).map(|(a, b)| f64::from(*a) * b).sum();
                let score = dot * f64::from(b.sm_scale);
                let cap = f64::from(o.soft_cap);
                s.push(if cap > 0.0 {
                    cap * (score / cap).tanh()
                } else {
                    score
                });
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
    check_with(
        format,
        page_size,
        kv_heads,
        group,
        head_dim,
        lens,
        &DecodeOptions::FULL,
    );
}

fn check_with(
    format: KvFormat,
    page_size: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    lens: &[usize],
    options: &DecodeOptions,
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
    let (want, want_lse) = reference_with(&pool, &batch, options);
    let layers = pool.layers();
    let mut first: Option<DecodeOutput> = None;
    for isa in Isa::available() {
        if !head_dim.is_multiple_of(isa.lanes()) {
            continue;
        }
        for threads in [1, 3] {
            let got =
                decode_with(&geo, &layers, &batch, options, threads, isa).expect("valid input");
            let scale = want.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
            for (i, (g, w)) in got.out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*g) - w).abs() <= 2e-5 * scale,
                    "{format:?} ps {page_size} {} threads {threads} {options:?}: \
                     out[{i}] = {g}, want {w}",
                    isa.name()
                );
            }
            for (g, w) in got.lse.iter().zip(&want_lse) {
                assert!(
                    (w.is_infinite() && f64::from(*g) == *w)
                        || (f64::from(*g) - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{format:?} {} {options:?}: lse {g}, want {w}",
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
    let batch = batch_of(&q, 1, &[0, 1], &[0], &[3]);
    let both = DecodeOptions {
        window_left: 3,
        chunk_size: 8,
        soft_cap: 0.0,
    };
    let cases = [
        (
            window(-2),
            "window_left must be -1 (no window) or at least 0, got -2",
        ),
        (
            chunk(-1),
            "chunk_size must be 0 (no chunks) or at least 1, got -1",
        ),
        (
            both,
            "window_left = 3 and chunk_size = 8 cannot both be set",
        ),
        (
            capped(-1.0, DecodeOptions::FULL),
            "soft_cap must be 0 (no cap) or a positive finite number, got -1",
        ),
        (capped(f32::NAN, DecodeOptions::FULL), "got NaN"),
        (capped(f32::INFINITY, DecodeOptions::FULL), "got inf"),
    ];
    for (o, msg) in cases {
        let err = decode_with(&geo, &segs, &batch, &o, 1, Isa::Auto)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(msg), "{err:?} does not say {msg:?}");
    }
}

/// An e4m3 pool of 4 pages of 16 tokens whose every K and V element reads
/// 1.0: its geometry, codes and (unit) scales.
fn ones_e4m3(kv_heads: usize) -> (PoolGeometry, Vec<u8>, Vec<u8>) {
    let geo = PoolGeometry {
        page_size: 16,
        pages_per_segment: 4,
        kv_heads,
        head_dim: 16,
        format: KvFormat::E4m3,
    };
    let tokens = geo.tokens_per_segment() * kv_heads;
    let codes = vec![0x38u8; tokens * 16];
    let scales = (0..tokens).flat_map(|_| 1.0f32.to_ne_bytes()).collect();
    (geo, codes, scales)
}

#[test]
fn a_poisoned_query_head_leaves_the_rest_of_its_tile() {
    // Every K and V element is 1.0, so a finite head's output is 1.0.
    // Query heads 1 (+inf score), 4 (NaN) and 5 (both) read NaN; the
    // others share their tiles (4 + 2 + 1) and must be untouched.
    let (geo, codes, scales) = ones_e4m3(1);
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
    let (geo, codes, v_scale) = ones_e4m3(1);
    let mut k_scale = v_scale.clone();
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
    let (geo, codes, v_scale) = ones_e4m3(2);
    let mut k_scale = v_scale.clone();
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

/// A batch with `sm_scale` 1.
fn batch_of<'a>(
    q: &'a [f32],
    q_heads: usize,
    indptr: &'a [i64],
    indices: &'a [i64],
    kv_lens: &'a [i64],
) -> DecodeBatch<'a> {
    DecodeBatch {
        q,
        q_heads,
        indptr,
        indices,
        kv_lens,
        sm_scale: 1.0,
    }
}

fn window(w: i64) -> DecodeOptions {
    DecodeOptions {
        window_left: w,
        ..DecodeOptions::FULL
    }
}

fn chunk(c: i64) -> DecodeOptions {
    DecodeOptions {
        chunk_size: c,
        ..DecodeOptions::FULL
    }
}

fn capped(cap: f32, o: DecodeOptions) -> DecodeOptions {
    DecodeOptions { soft_cap: cap, ..o }
}

#[test]
fn sliding_windows_match_the_reference() {
    // Smaller than a page, inside a page, across pages, equal to and
    // larger than the context, and across a 4,096-token work chunk.
    let lens = [0, 1, 17, 97, 300];
    for w in [0, 1, 5, 16, 40, 96, 97, 1000] {
        check_with(KvFormat::E4m3, 16, 2, 4, 64, &lens, &window(w));
        check_with(KvFormat::Bf16, 1, 1, 2, 32, &lens, &window(w));
    }
    check_with(
        KvFormat::F32,
        16,
        1,
        4,
        32,
        &[CHUNK_TOKENS * 2 + 37, 3],
        &window(CHUNK_TOKENS as i64 + 5),
    );
}

#[test]
fn chunks_match_the_reference() {
    let lens = [0, 1, 17, 97, 300, 64, 65];
    for c in [1, 5, 16, 24, 64, 100, 1000] {
        check_with(KvFormat::E5m2, 16, 2, 4, 64, &lens, &chunk(c));
        check_with(KvFormat::F16, 1, 1, 3, 32, &lens, &chunk(c));
    }
}

#[test]
fn soft_caps_match_the_reference() {
    let lens = [0, 1, 17, 97, 300];
    for cap in [0.5f32, 3.0, 50.0] {
        check_with(
            KvFormat::E4m3,
            16,
            2,
            4,
            64,
            &lens,
            &capped(cap, DecodeOptions::FULL),
        );
        check_with(
            KvFormat::Bf16,
            16,
            2,
            2,
            32,
            &lens,
            &capped(cap, window(20)),
        );
        check_with(KvFormat::F32, 1, 1, 4, 48, &lens, &capped(cap, chunk(24)));
    }
}

#[test]
fn windows_skip_the_pages_before_them() {
    // The pages before the window are in a retired segment: a kernel that
    // read them would find no segment (it checks every id first, so give
    // it live ids whose bytes are NaN instead).
    let geo = PoolGeometry {
        page_size: 4,
        pages_per_segment: 8,
        kv_heads: 1,
        head_dim: 16,
        format: KvFormat::F32,
    };
    let tokens = geo.tokens_per_segment();
    let mut k = vec![0u8; geo.kv_layer_bytes()];
    let mut v = k.clone();
    for t in 0..tokens {
        // Pages 0..3 (tokens 0..12) hold NaN, the others 1.0.
        let x = if t < 12 { f32::NAN } else { 1.0 };
        for j in 0..16 {
            k[(t * 16 + j) * 4..][..4].copy_from_slice(&x.to_ne_bytes());
            v[(t * 16 + j) * 4..][..4].copy_from_slice(&x.to_ne_bytes());
        }
    }
    let seg = SegmentLayer {
        k: &k,
        v: &v,
        k_scale: &[],
        v_scale: &[],
    };
    let q = vec![0.1f32; 16];
    // 20 tokens over pages 0..5: position 19 with window 7 sees 12..20.
    let batch = batch_of(&q, 1, &[0, 5], &[0, 1, 2, 3, 4], &[20]);
    for isa in Isa::available() {
        for (o, keys) in [(window(7), 8.0f32), (chunk(12), 8.0), (window(8), -1.0)] {
            let got = decode_with(&geo, &[Some(seg)], &batch, &o, 1, isa).expect("valid");
            if keys < 0.0 {
                // One key more reaches token 11: NaN.
                assert!(got.out.iter().all(|x| x.is_nan()), "{} {o:?}", isa.name());
                continue;
            }
            assert!(
                got.out.iter().all(|x| (x - 1.0).abs() < 1e-6),
                "{} {o:?}: {:?}",
                isa.name(),
                got.out
            );
            let want = 1.6 + keys.ln();
            assert!((got.lse[0] - want).abs() < 1e-5, "{} {o:?}", isa.name());
        }
    }
}

#[test]
fn soft_capped_infinite_and_nan_scores() {
    // With a cap, +-inf scores become +-cap (tanh(+-inf) = +-1) and NaN
    // stays NaN; uncapped, the existing rules hold (checked above).
    let (geo, codes, v_scale) = ones_e4m3(1);
    let mut k_scale = v_scale.clone();
    k_scale[..4].copy_from_slice(&f32::INFINITY.to_ne_bytes()); // token 0: score +inf
    let seg = SegmentLayer {
        k: &codes,
        v: &codes,
        k_scale: &k_scale,
        v_scale: &v_scale,
    };
    let mut q = vec![0.25f32; 2 * 16];
    q[16] = f32::NAN;
    let batch = batch_of(&q, 2, &[0, 3], &[0, 1, 2], &[40]);
    for isa in Isa::available() {
        let o = capped(2.0, DecodeOptions::FULL);
        let got = decode_with(&geo, &[Some(seg)], &batch, &o, 1, isa).expect("valid");
        // Head 0: token 0 scores 2, the 39 others 2 tanh(2).
        let (a, b) = (2.0f64, 2.0 * 2f64.tanh());
        let want = (a.exp() + 39.0 * b.exp()).ln();
        assert!(
            (f64::from(got.lse[0]) - want).abs() < 1e-5,
            "{}: {} vs {want}",
            isa.name(),
            got.lse[0]
        );
        assert!(got.out[..16].iter().all(|x| (x - 1.0).abs() < 1e-6));
        assert!(got.out[16..].iter().all(|x| x.is_nan()) && got.lse[1].is_nan());
    }
}

/// `kernel::tanh` in one instruction set over `xs`.
fn tanh_in(isa: Isa, xs: &[f32]) -> Vec<f32> {
    // Through the kernel itself: one token per request whose K row is x
    // (f32), q = e_0, sm_scale = cap = 1, so lse = tanh(x) exactly
    // (one key: lse = its score).
    let n = xs.len();
    let geo = PoolGeometry {
        page_size: 1,
        pages_per_segment: n,
        kv_heads: 1,
        head_dim: 16,
        format: KvFormat::F32,
    };
    let mut k = vec![0u8; geo.kv_layer_bytes()];
    for (t, x) in xs.iter().enumerate() {
        k[t * 64..t * 64 + 4].copy_from_slice(&x.to_ne_bytes());
    }
    let v = vec![0u8; geo.kv_layer_bytes()];
    let seg = SegmentLayer {
        k: &k,
        v: &v,
        k_scale: &[],
        v_scale: &[],
    };
    let mut q = vec![0.0f32; n * 16];
    for r in 0..n {
        q[r * 16] = 1.0;
    }
    let indptr: Vec<i64> = (0..=n as i64).collect();
    let indices: Vec<i64> = (0..n as i64).collect();
    let lens = vec![1i64; n];
    let batch = batch_of(&q, 1, &indptr, &indices, &lens);
    let o = capped(1.0, DecodeOptions::FULL);
    decode_with(&geo, &[Some(seg)], &batch, &o, 1, isa)
        .expect("valid")
        .lse
}

#[test]
fn tanh_is_within_1e_6_relative_in_every_isa() {
    // A dense grid of magnitudes from 1e-30 to 20, both signs, plus the
    // specials. The LSE path adds (m + log2(1)) * ln 2 with m = cap * log2(e)
    // * tanh: two roundings, a few 1e-8 relative.
    let mut xs = vec![0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    let mut x = 1e-30f32;
    while x < 20.0 {
        xs.push(x);
        xs.push(-x);
        x *= 1.0007;
    }
    let mut worst = 0.0f64;
    for isa in Isa::available() {
        let got = tanh_in(isa, &xs);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = f64::from(x).tanh();
            if want.is_nan() {
                assert!(g.is_nan(), "{} tanh({x}) = {g}", isa.name());
                continue;
            }
            let err = if want == 0.0 {
                f64::from(g).abs()
            } else {
                (f64::from(g) / want - 1.0).abs()
            };
            worst = worst.max(err);
            assert!(err < 1e-6, "{} tanh({x}) = {g}, want {want}", isa.name());
        }
    }
    eprintln!("tanh: worst relative error {worst:.3e}");
}

// ----- extend ----------------------------------------------------------------

/// f64 causal (or full) attention of each request's new rows: row `r` of a
/// request with `qo` new tokens over `kv_len` sits at `kv_len - qo + r` and
/// sees keys `lo_of(p + 1)..=p`, written out from the definitions. Also
/// returns, per (row, head), what f32 rounding of the scores may cost:
/// `2e-6 x` the largest `sum |q k| x sm_scale` over its keys (random FP8
/// codes make ill-conditioned dot products), times the largest `|v|` for
/// the output.
#[allow(clippy::type_complexity)]
fn extend_reference(
    pool: &Pool,
    b: &ExtendBatch<'_>,
    o: &DecodeOptions,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let g = &pool.geo;
    let (d, ps) = (g.head_dim, g.page_size);
    let group = b.q_heads / g.kv_heads;
    let total_q = *b.qo_indptr.last().expect("batch + 1") as usize;
    let mut out = vec![0.0; total_q * b.q_heads * d];
    let mut lse = vec![f64::NEG_INFINITY; total_q * b.q_heads];
    let mut slack_lse = vec![0.0; total_q * b.q_heads];
    let mut slack_out = vec![0.0; total_q * b.q_heads];
    for req in 0..b.kv_lens.len() {
        let pages = &b.indices[b.indptr[req] as usize..b.indptr[req + 1] as usize];
        let len = b.kv_lens[req] as usize;
        let (q0, q1) = (b.qo_indptr[req] as usize, b.qo_indptr[req + 1] as usize);
        for row in q0..q1 {
            let (lo, hi) = if b.causal {
                let p = len - (q1 - q0) + (row - q0);
                (lo_of(o, p + 1), p + 1)
            } else {
                (0, len)
            };
            for qh in 0..b.q_heads {
                let h = qh / group;
                let q = &b.q[(row * b.q_heads + qh) * d..][..d];
                let (mut s, mut vs) = (Vec::new(), Vec::new());
                let (mut cond, mut vmax) = (0.0f64, 0.0f64);
                for t in lo..hi {
                    let k = pool.row(0, pages[t / ps], t % ps, h);
                    let dot: f64 = q.iter().zip(&k).map(|(a, b)| f64::from(*a) * b).sum();
                    let mag: f64 = q
                        .iter()
                        .zip(&k)
                        .map(|(a, b)| (f64::from(*a) * b).abs())
                        .sum();
                    cond = cond.max(mag * f64::from(b.sm_scale));
                    let score = dot * f64::from(b.sm_scale);
                    let cap = f64::from(o.soft_cap);
                    s.push(if cap > 0.0 {
                        cap * (score / cap).tanh()
                    } else {
                        score
                    });
                    let v = pool.row(1, pages[t / ps], t % ps, h);
                    vmax = v.iter().fold(vmax, |m, x| m.max(x.abs()));
                    vs.push(v);
                }
                if s.is_empty() {
                    continue;
                }
                slack_lse[row * b.q_heads + qh] = 2e-6 * cond;
                slack_out[row * b.q_heads + qh] = 2e-6 * cond * vmax;
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let total: f64 = w.iter().sum();
                let o = &mut out[(row * b.q_heads + qh) * d..][..d];
                for (wt, v) in w.iter().zip(&vs) {
                    for (o, x) in o.iter_mut().zip(v) {
                        *o += wt * x / total;
                    }
                }
                lse[row * b.q_heads + qh] = m + total.ln();
            }
        }
    }
    (out, lse, slack_lse, slack_out)
}

/// Requests of `(prefix, new)` tokens: the extend kernel against the f64
/// reference in every ISA, with 1 and 3 threads (bit for bit the same).
#[allow(clippy::too_many_arguments)]
fn extend_check(
    format: KvFormat,
    page_size: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    reqs: &[(usize, usize)],
    options: &DecodeOptions,
    causal: bool,
) {
    let mut rng = Rng(0x5851_F42D_4C95_7F2D ^ (page_size * 131 + head_dim * 7 + group) as u64);
    let geo = PoolGeometry {
        page_size,
        pages_per_segment: 16,
        kv_heads,
        head_dim,
        format,
    };
    let lens: Vec<usize> = reqs.iter().map(|(p, n)| p + n).collect();
    let need: usize = lens.iter().map(|l| l.div_ceil(page_size)).sum();
    let segments = need.div_ceil(16) + 2;
    let pool = Pool::new(geo, segments, &[1], &mut rng);
    let (indptr, indices, kv_lens) = table(&pool, &lens, &mut rng);
    let mut qo_indptr = vec![0i64];
    for (_, n) in reqs {
        qo_indptr.push(qo_indptr.last().copied().unwrap_or(0) + *n as i64);
    }
    let q_heads = kv_heads * group;
    let total_q = qo_indptr[reqs.len()] as usize;
    let q: Vec<f32> = (0..total_q * q_heads * head_dim)
        .map(|_| rng.unit())
        .collect();
    let batch = ExtendBatch {
        q: &q,
        q_heads,
        qo_indptr: &qo_indptr,
        indptr: &indptr,
        indices: &indices,
        kv_lens: &kv_lens,
        sm_scale: 0.3,
        causal,
    };
    let (want, want_lse, slack_lse, slack_out) = extend_reference(&pool, &batch, options);
    let layers = pool.layers();
    let mut first: Option<DecodeOutput> = None;
    for isa in Isa::available() {
        if !head_dim.is_multiple_of(isa.lanes()) {
            continue;
        }
        for threads in [1, 3] {
            let got = extend(&geo, &layers, &batch, options, threads, isa).expect("valid input");
            let scale = want.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
            for (i, (g, w)) in got.out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*g) - w).abs() <= 2e-5 * scale + slack_out[i / head_dim],
                    "{format:?} ps {page_size} group {group} {} threads {threads} {options:?} \
                     {reqs:?}: out[{i}] = {g}, want {w}",
                    isa.name()
                );
            }
            for (i, (g, w)) in got.lse.iter().zip(&want_lse).enumerate() {
                assert!(
                    (w.is_infinite() && f64::from(*g) == *w)
                        || (f64::from(*g) - w).abs() <= 1e-5 * (1.0 + w.abs()) + slack_lse[i],
                    "{format:?} {} {options:?} {reqs:?}: lse[{i}] {g}, want {w}",
                    isa.name()
                );
            }
            match &first {
                Some(f) if f.isa == isa => {
                    assert_eq!(f.out, got.out);
                    assert_eq!(f.lse, got.lse);
                }
                _ => first = Some(got),
            }
        }
    }
}

const EXTEND_REQS: [(usize, usize); 5] = [(0, 1), (0, 17), (53, 1), (40, 57), (3, 0)];

#[test]
fn extend_matches_an_f64_reference_in_every_format() {
    for format in [
        KvFormat::E4m3,
        KvFormat::E5m2,
        KvFormat::F16,
        KvFormat::Bf16,
        KvFormat::F32,
    ] {
        for ps in [1, 8, 16] {
            for group in [1, 4] {
                extend_check(
                    format,
                    ps,
                    2,
                    group,
                    32,
                    &EXTEND_REQS,
                    &DecodeOptions::FULL,
                    true,
                );
            }
        }
    }
}

#[test]
fn extend_odd_shapes() {
    // head_dim not a multiple of 16 (scalar / AVX2 only), 3 heads per
    // group (tiles of 21 rows), one KV head, long prefix over many tiles.
    extend_check(
        KvFormat::Bf16,
        8,
        1,
        3,
        40,
        &EXTEND_REQS,
        &DecodeOptions::FULL,
        true,
    );
    extend_check(
        KvFormat::E4m3,
        16,
        1,
        1,
        64,
        &[(300, 150), (0, 70)],
        &DecodeOptions::FULL,
        true,
    );
    extend_check(
        KvFormat::F32,
        4,
        2,
        8,
        16,
        &[(10, 20)],
        &DecodeOptions::FULL,
        true,
    );
    // Not causal: every row sees every key (more rows than keys allowed).
    extend_check(
        KvFormat::F16,
        8,
        2,
        2,
        32,
        &[(5, 9), (0, 3)],
        &DecodeOptions::FULL,
        false,
    );
}

#[test]
fn extend_windows_chunks_and_caps_match_the_reference() {
    let reqs = [(0, 1), (0, 17), (53, 1), (40, 57), (100, 30)];
    for o in [window(0), window(5), window(16), window(40), window(1000)] {
        extend_check(KvFormat::E4m3, 16, 2, 4, 32, &reqs, &o, true);
        extend_check(KvFormat::Bf16, 1, 1, 2, 32, &reqs, &o, true);
    }
    // Chunk boundaries inside the new tokens (40 + 57 crosses 48 and 96).
    for o in [chunk(1), chunk(16), chunk(24), chunk(48), chunk(1000)] {
        extend_check(KvFormat::E5m2, 16, 2, 4, 32, &reqs, &o, true);
        extend_check(KvFormat::F16, 8, 1, 3, 32, &reqs, &o, true);
    }
    for cap in [0.5f32, 3.0, 50.0] {
        extend_check(
            KvFormat::E4m3,
            16,
            2,
            4,
            32,
            &reqs,
            &capped(cap, DecodeOptions::FULL),
            true,
        );
        extend_check(
            KvFormat::F32,
            8,
            2,
            1,
            32,
            &reqs,
            &capped(cap, window(7)),
            true,
        );
        extend_check(
            KvFormat::Bf16,
            1,
            1,
            4,
            16,
            &reqs,
            &capped(cap, chunk(24)),
            true,
        );
    }
}

#[test]
fn extend_with_one_new_token_is_decode() {
    // qo = 1 per request is the decode kernel's problem: same values.
    let mut rng = Rng(77);
    let geo = PoolGeometry {
        page_size: 16,
        pages_per_segment: 16,
        kv_heads: 2,
        head_dim: 32,
        format: KvFormat::E4m3,
    };
    let pool = Pool::new(geo, 4, &[1], &mut rng);
    let lens = [17usize, 97, 1];
    let (indptr, indices, kv_lens) = table(&pool, &lens, &mut rng);
    let q: Vec<f32> = (0..3 * 8 * 32).map(|_| rng.unit()).collect();
    let layers = pool.layers();
    for o in [
        DecodeOptions::FULL,
        window(5),
        chunk(24),
        capped(2.0, window(9)),
    ] {
        let d = decode_with(
            &geo,
            &layers,
            &batch_of(&q, 8, &indptr, &indices, &kv_lens),
            &o,
            1,
            Isa::Auto,
        )
        .expect("valid");
        let e = extend(
            &geo,
            &layers,
            &ExtendBatch {
                q: &q,
                q_heads: 8,
                qo_indptr: &[0, 1, 2, 3],
                indptr: &indptr,
                indices: &indices,
                kv_lens: &kv_lens,
                sm_scale: 1.0,
                causal: true,
            },
            &o,
            2,
            Isa::Auto,
        )
        .expect("valid");
        for (a, b) in d.out.iter().zip(&e.out) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{o:?}: {a} vs {b}");
        }
        for (a, b) in d.lse.iter().zip(&e.lse) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{o:?}: {a} vs {b}");
        }
    }
}

/// An f32 pool of one segment of 8 pages of 4 tokens, one KV head of 16,
/// whose every K and V element is 1.0 except the tokens `poison` says.
fn ones_f32(poison: &[(usize, bool, f32)]) -> (PoolGeometry, Vec<u8>, Vec<u8>) {
    let geo = PoolGeometry {
        page_size: 4,
        pages_per_segment: 8,
        kv_heads: 1,
        head_dim: 16,
        format: KvFormat::F32,
    };
    let mut k = Vec::new();
    for _ in 0..geo.tokens_per_segment() * 16 {
        k.extend_from_slice(&1.0f32.to_ne_bytes());
    }
    let mut v = k.clone();
    for &(t, is_k, x) in poison {
        let buf = if is_k { &mut k } else { &mut v };
        for j in 0..16 {
            buf[(t * 16 + j) * 4..][..4].copy_from_slice(&x.to_ne_bytes());
        }
    }
    (geo, k, v)
}

#[test]
fn extend_nan_in_masked_keys_does_not_leak() {
    // 20 KV tokens, the last 12 new (positions 8..20). Token 15 has NaN K
    // and token 16 NaN V: rows before them (positions 8..15) see neither
    // and must read 1.0; rows at 15.. see a NaN and read NaN. Token 2
    // (NaN K and V) is outside a window of 5 for every row.
    let (geo, k, v) = ones_f32(&[(15, true, f32::NAN), (16, false, f32::NAN)]);
    let seg = SegmentLayer {
        k: &k,
        v: &v,
        k_scale: &[],
        v_scale: &[],
    };
    let q = vec![0.1f32; 12 * 16];
    let batch = ExtendBatch {
        q: &q,
        q_heads: 1,
        qo_indptr: &[0, 12],
        indptr: &[0, 5],
        indices: &[0, 1, 2, 3, 4],
        kv_lens: &[20],
        sm_scale: 1.0,
        causal: true,
    };
    for isa in Isa::available() {
        let got = extend(&geo, &[Some(seg)], &batch, &DecodeOptions::FULL, 1, isa).expect("ok");
        for r in 0..12 {
            let row = &got.out[r * 16..(r + 1) * 16];
            if 8 + r >= 15 {
                assert!(row.iter().all(|x| x.is_nan()), "{} row {r}", isa.name());
                if 8 + r == 15 || 8 + r >= 16 {
                    assert!(row.iter().all(|x| x.is_nan()));
                }
            } else {
                assert!(
                    row.iter().all(|x| (x - 1.0).abs() < 1e-6),
                    "{} row {r}: {row:?}",
                    isa.name()
                );
                let want = 1.6 + ((8 + r + 1) as f32).ln();
                assert!((got.lse[r] - want).abs() < 1e-5, "{} row {r}", isa.name());
            }
        }
    }
    // NaN in token 2 only: a window of 5 keeps rows at 8.. away from it.
    let (geo, k, v) = ones_f32(&[(2, true, f32::NAN), (2, false, f32::NAN)]);
    let seg = SegmentLayer {
        k: &k,
        v: &v,
        k_scale: &[],
        v_scale: &[],
    };
    for isa in Isa::available() {
        let got = extend(&geo, &[Some(seg)], &batch, &window(5), 1, isa).expect("ok");
        assert!(
            got.out.iter().all(|x| (x - 1.0).abs() < 1e-6),
            "{}",
            isa.name()
        );
        let full = extend(&geo, &[Some(seg)], &batch, &DecodeOptions::FULL, 1, isa).expect("ok");
        assert!(full.out.iter().all(|x| x.is_nan()), "{}", isa.name());
    }
}

#[test]
fn extend_refuses_bad_batches_with_numbers() {
    let (geo, k, v) = ones_f32(&[]);
    let seg = SegmentLayer {
        k: &k,
        v: &v,
        k_scale: &[],
        v_scale: &[],
    };
    let q = vec![0.1f32; 12 * 16];
    let ok = ExtendBatch {
        q: &q,
        q_heads: 1,
        qo_indptr: &[0, 12],
        indptr: &[0, 5],
        indices: &[0, 1, 2, 3, 4],
        kv_lens: &[20],
        sm_scale: 1.0,
        causal: true,
    };
    let cases: Vec<(ExtendBatch<'_>, DecodeOptions, &str)> = vec![
        (
            ExtendBatch {
                kv_lens: &[10],
                indptr: &[0, 3],
                ..ok
            },
            DecodeOptions::FULL,
            "request 0 has 12 new tokens but only 10 KV tokens",
        ),
        (
            ExtendBatch {
                qo_indptr: &[0, 11],
                ..ok
            },
            DecodeOptions::FULL,
            "q holds 192 values; qo_indptr[-1] = 11 rows",
        ),
        (
            ExtendBatch {
                qo_indptr: &[0, 12, 12],
                ..ok
            },
            DecodeOptions::FULL,
            "qo_indptr has 3 entries, kv_indptr 2",
        ),
        (
            ExtendBatch {
                qo_indptr: &[1, 12],
                ..ok
            },
            DecodeOptions::FULL,
            "qo_indptr[0] must be 0, got 1",
        ),
        (
            ExtendBatch {
                causal: false,
                ..ok
            },
            window(3),
            "need causal attention",
        ),
        (
            ExtendBatch {
                indices: &[0, 1, 2, 3, 99],
                ..ok
            },
            DecodeOptions::FULL,
            "kv_indices[4] = 99 is not a page of a live segment",
        ),
        (
            ExtendBatch {
                kv_lens: &[21],
                ..ok
            },
            DecodeOptions::FULL,
            "request 0: 21 KV tokens need 6 pages of 4, the table gives 5",
        ),
    ];
    for (b, o, msg) in cases {
        let err = extend(&geo, &[Some(seg)], &b, &o, 1, Isa::Auto)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(msg), "{err:?} does not say {msg:?}");
    }
    extend(&geo, &[Some(seg)], &ok, &DecodeOptions::FULL, 1, Isa::Auto).expect("valid");
}

/// Tile sizes timed against each other (`cargo test --release -p
/// radixseg-cpu tile_sizes -- --ignored --nocapture`): one request of
/// 0+512 tokens, 32 query / 8 KV heads of 128, bf16, one thread.
#[test]
#[ignore]
fn tile_sizes() {
    let mut rng = Rng(3);
    let geo = PoolGeometry {
        page_size: 16,
        pages_per_segment: 64,
        kv_heads: 8,
        head_dim: 128,
        format: KvFormat::Bf16,
    };
    let pool = Pool::new(geo, 1, &[], &mut rng);
    let (indptr, indices, kv_lens) = table(&pool, &[512], &mut rng);
    let q: Vec<f32> = (0..512 * 32 * 128).map(|_| rng.unit()).collect();
    let b = ExtendBatch {
        q: &q,
        q_heads: 32,
        qo_indptr: &[0, 512],
        indptr: &indptr,
        indices: &indices,
        kv_lens: &kv_lens,
        sm_scale: 0.08,
        causal: true,
    };
    let layers = pool.layers();
    let flops = 4.0 * (512.0 * 513.0 / 2.0) * 32.0 * 128.0;
    let mut best = [f64::INFINITY; 4];
    for _ in 0..5 {
        for (i, v) in [32, 64, 128, 256].into_iter().enumerate() {
            let t = std::time::Instant::now();
            extend_tiled(&geo, &layers, &b, &DecodeOptions::FULL, 1, Isa::Auto, v).expect("ok");
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    for (v, t) in [32, 64, 128, 256].into_iter().zip(best) {
        println!(
            "{v:4} vectors: {:7.2} ms, {:5.1} GFLOP/s",
            t * 1e3,
            flops / t / 1e9
        );
    }
}

/// Calls below `BYTES_PER_THREAD` per thread run on fewer threads; this one
/// (about 14 MiB of f32 KV, several items per request) is large enough for
/// 3 threads, which must give the same bits as 1.
#[test]
fn a_call_large_enough_for_several_threads_matches_one_thread() {
    check(KvFormat::F32, 16, 2, 4, 64, &[9000, 5003, 1]);
    check(KvFormat::E4m3, 8, 2, 2, 128, &[20_000, 4097]);
}
