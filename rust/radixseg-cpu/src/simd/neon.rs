//! The AArch64 NEON (4 lanes) implementation of [`Simd`].

use super::{Simd, WithSimd};
use crate::kernel::exp2_poly;
use crate::{KvFormat, BLOCK};
use std::arch::aarch64::*;

/// `job` with NEON (what [`super::dispatch`] calls). NEON is part of the
/// AArch64 baseline (every AArch64 target enables it), so this needs no
/// runtime detection.
#[inline(always)]
pub(crate) fn with_neon<J: WithSimd>(job: J) {
    job.run(Neon)
}

/// Row sums of 16 rows of 16, through [`Simd::sums`].
#[cfg(test)]
pub(crate) fn sums_for_test(v: &[f32]) -> Vec<(&'static str, Vec<f32>)> {
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
    fn min(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON only. FMIN returns NaN when either lane is NaN.
        unsafe { vminq_f32(a, b) }
    }
    #[inline(always)]
    fn div(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON only (FDIV is part of AArch64's Advanced SIMD).
        unsafe { vdivq_f32(a, b) }
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
                            f32::from_ne_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]])
                        });
                        vld1q_f32(c.as_ptr())
                    }
                }
            };
            self.store(v, o);
        }
    }
}
