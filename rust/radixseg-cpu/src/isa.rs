//! Which instruction set runs the kernel: runtime detection on x86-64,
//! NEON as the AArch64 baseline, and the choice for a `head_dim`.

use crate::checks::bad;
use radixseg_core::Result;

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

    pub(crate) fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Neon => 4,
            Isa::Auto | Isa::Scalar => 1,
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_detected() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && avx2_detected()
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_detected() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

pub(crate) fn choose_isa(isa: Isa, head_dim: usize) -> Result<Isa> {
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
