//! AVX2 (8 lanes) and AVX-512 (16 lanes) implementations of [`Simd`], and
//! the `#[target_feature]` entry points the kernel calls after detection.

use super::{Simd, WithSimd};
use crate::kernel::exp2_poly;
use crate::{KvFormat, BLOCK};
use std::arch::x86_64::*;

/// `job` with AVX-512 (what [`super::dispatch`] calls).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(crate) unsafe fn with_avx512<J: WithSimd>(job: J) {
    job.run(Avx512)
}

/// `job` with AVX2 (what [`super::dispatch`] calls).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn with_avx2<J: WithSimd>(job: J) {
    job.run(Avx2)
}

/// `[(isa, row sums of 16 rows of 16)]` for each instruction set this CPU has.
#[cfg(test)]
pub(crate) fn sums_for_test(v: &[f32]) -> Vec<(&'static str, Vec<f32>)> {
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
    if crate::isa::avx512_detected() {
        // SAFETY: the features were detected just above.
        out.push(("avx512", unsafe { with_avx512(v) }));
    }
    if crate::isa::avx2_detected() {
        // SAFETY: the features were detected just above.
        out.push(("avx2", unsafe { with_avx2(v) }));
    }
    out
}

/// 16 lanes. Only constructed inside `with_avx512` (and the tests' `with_avx512`).
#[derive(Clone, Copy)]
struct Avx512;

/// 8 lanes. Only constructed inside `with_avx2` (and the tests' `with_avx2`).
#[derive(Clone, Copy)]
struct Avx2;

// The methods below call intrinsics that need the features of the
// function they are inlined into (`with_avx512` / `with_avx2`); the
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
    fn min(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F enabled. vminps, like vmaxps, returns its second
        // operand when either is NaN.
        unsafe { _mm512_min_ps(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F enabled.
        unsafe { _mm512_div_ps(a, b) }
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
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
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
                        _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(0xBF80u16 as i16)))
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
    fn min(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX enabled (NaN in `b` survives, as for max).
        unsafe { _mm256_min_ps(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX enabled.
        unsafe { _mm256_div_ps(a, b) }
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
