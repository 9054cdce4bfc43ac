//! The portable one-lane implementation of [`Simd`].

use super::Simd;
use crate::format::{f16_to_f32, fp8_table, KvFormat};
use crate::BLOCK;

/// Portable one-lane implementation: any CPU, any `head_dim`.
#[derive(Clone, Copy)]
pub(crate) struct Scalar;

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
    fn min(self, a: f32, b: f32) -> f32 {
        if a.is_nan() || b.is_nan() {
            f32::NAN
        } else {
            a.min(b)
        }
    }
    #[inline(always)]
    fn div(self, a: f32, b: f32) -> f32 {
        a / b
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
