//! The pool's storage formats and their decoding to `f32` outside the
//! vector paths: half precision and the FP8 tables the scalar path reads
//! (built the way the x86 paths decode, so every path agrees on every code).

use std::sync::OnceLock;

/// Storage format of the pool's K/V codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvFormat {
    /// FP8 e4m3 (`float8_e4m3fn`) with per-(token, head) `f32` scales.
    E4m3,
    /// FP8 e5m2 with per-(token, head) `f32` scales.
    E5m2,
    /// IEEE half precision, unscaled.
    F16,
    /// bfloat16, unscaled.
    Bf16,
    /// `f32`, unscaled.
    F32,
}

/// [`KvFormat`] as const-generic codes, so each format's decode loop is
/// compiled on its own (no per-vector dispatch).
pub(crate) mod fmt {
    pub const E4M3: u8 = 0;
    pub const E5M2: u8 = 1;
    pub const F16: u8 = 2;
    pub const BF16: u8 = 3;
    pub const F32: u8 = 4;
}

impl KvFormat {
    /// Inverse of [`KvFormat::code`] (a constant in every caller).
    #[inline(always)]
    pub(crate) const fn from_code(code: u8) -> Self {
        match code {
            fmt::E4M3 => Self::E4m3,
            fmt::E5M2 => Self::E5m2,
            fmt::F16 => Self::F16,
            fmt::BF16 => Self::Bf16,
            _ => Self::F32,
        }
    }

    /// Bytes of one element.
    pub fn element_bytes(self) -> usize {
        match self {
            Self::E4m3 | Self::E5m2 => 1,
            Self::F16 | Self::Bf16 => 2,
            Self::F32 => 4,
        }
    }

    /// Whether codes carry a per-(token, head) scale.
    pub fn scaled(self) -> bool {
        matches!(self, Self::E4m3 | Self::E5m2)
    }

    /// What a decoded value must be multiplied by: e4m3 is decoded through
    /// half precision, whose exponent bias is 8 larger.
    pub(crate) fn factor(self) -> f32 {
        if self == Self::E4m3 {
            256.0
        } else {
            1.0
        }
    }
}

/// `f32` value of a half-precision bit pattern (exact, subnormals, inf and NaN included).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = (h >> 10) & 0x1F;
    let man = f32::from(h & 0x3FF);
    let mag = match exp {
        0 => man * (-24f32).exp2(),
        0x1F if man == 0.0 => f32::INFINITY,
        0x1F => f32::NAN,
        e => (1.0 + man / 1024.0) * (f32::from(e) - 15.0).exp2(),
    };
    sign * mag
}

/// Half-precision pattern of an FP8 code, as the vector paths build it.
fn fp8_to_f16_bits(format: KvFormat, x: u8) -> u16 {
    match format {
        // Sign-extend, move the 7 magnitude bits under f16's exponent, keep the sign.
        KvFormat::E4m3 => (((x as i8 as i16) << 7) as u16) & 0xBF80,
        _ => u16::from(x) << 8,
    }
}

pub(crate) fn fp8_table(format: KvFormat) -> &'static [f32; 256] {
    static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
    static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
    let cell = if format == KvFormat::E4m3 {
        &E4M3
    } else {
        &E5M2
    };
    cell.get_or_init(|| std::array::from_fn(|x| f16_to_f32(fp8_to_f16_bits(format, x as u8))))
}
