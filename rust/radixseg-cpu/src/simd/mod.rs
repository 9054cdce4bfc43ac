//! The vector operations the kernel needs, and their implementations:
//! portable scalar code, AVX2/AVX-512 on x86-64 and NEON on AArch64.

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
mod scalar;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub(crate) use scalar::Scalar;

use crate::isa::Isa;
use crate::BLOCK;

/// A computation written once against [`Simd`] (a kernel's per-item loop),
/// run with the instruction set's implementation by [`dispatch`].
pub(crate) trait WithSimd {
    /// Run with `s`. Implementations are `#[inline(always)]`, so that the
    /// whole loop is compiled inside the entry point of `s`'s instruction
    /// set (with its features enabled).
    fn run<S: Simd>(self, s: S);
}

/// Run `job` with `isa`'s implementation of [`Simd`]: the one place that
/// maps an instruction set to its `#[target_feature]` entry point, for
/// every kernel. `isa` comes from `choose_isa`, which returns an x86 set
/// only after runtime detection found its features; any other value
/// (`Scalar`, `Auto`, a set of another architecture) runs the scalar path.
#[inline(always)]
pub(crate) fn dispatch<J: WithSimd>(isa: Isa, job: J) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: `choose_isa` returns Avx512 only after
            // `avx512_detected()` found every feature `with_avx512` enables.
            unsafe { x86::with_avx512(job) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: `choose_isa` returns Avx2 only after `avx2_detected()`
            // found every feature `with_avx2` enables.
            unsafe { x86::with_avx2(job) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::with_neon(job),
        _ => job.run(Scalar),
    }
}

/// The vector operations the kernel needs; `F` holds `LANES` `f32`s.
///
/// Implementations for an instruction set are only ever called from a
/// function compiled with that set enabled and entered after runtime
/// detection (see [`dispatch`]); every method is `#[inline(always)]` so that
/// it is compiled there.
pub(crate) trait Simd: Copy {
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
    /// Lane-wise maximum; NaN if `b` is NaN (every implementation), and
    /// in some also if `a` is.
    fn max(self, a: Self::F, b: Self::F) -> Self::F;
    /// Lane-wise minimum, NaN as for `max`.
    fn min(self, a: Self::F, b: Self::F) -> Self::F;
    /// `a / b`, correctly rounded.
    fn div(self, a: Self::F, b: Self::F) -> Self::F;
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

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod simd_tests {
    #[cfg(target_arch = "aarch64")]
    use super::neon::sums_for_test;
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
