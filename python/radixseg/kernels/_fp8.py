# mypy: ignore-errors
# ruff: noqa: ANN001, ANN202
"""Triton helpers that convert between float32 and FP8 / bf16 bit patterns.

Bit arithmetic rather than ``.to(tl.float8e4nv)``: the Triton interpreter's
fp32 -> fp8 and fp32 -> bf16 conversions neither round to nearest even nor
saturate, and CUDA sm_80 has no ``fp8e4nv`` type at all. Written this way, the
same code is exact in the interpreter, on sm_80 (software FP8 decode) and on
sm_89+; the encoders reproduce torch's conversions bit for bit. Decoders build
the float32 bit pattern directly (no multiply by 2**120), so a flush-to-zero
multiply cannot eat FP8 subnormals.
"""

import triton
import triton.language as tl


@triton.jit
def fp8_bits_to_f32(x, IS_E4M3: tl.constexpr):
    """``uint8`` FP8 codes (e4m3fn or e5m2) -> float32, exact for every finite code.

    e4m3fn (bias 7): a normal code's exponent and 3 mantissa bits move to
    float32's fields with the bias raised by 120; subnormals are ``m * 2**-9``.
    e5m2 (bias 15): the same with 2 mantissa bits, bias + 112, ``m * 2**-16``.
    NaN/inf codes are never stored by the pool and decode to finite values.
    """
    b = x.to(tl.uint32)
    sign = (b & 0x80) << 24
    if IS_E4M3:
        exp = (b >> 3) & 0xF
        normal = (((b & 0x7F) << 20) + (120 << 23)) | sign
        sub = (b & 0x7).to(tl.float32) * 0.001953125  # 2**-9
    else:
        exp = (b >> 2) & 0x1F
        normal = (((b & 0x7F) << 21) + (112 << 23)) | sign
        sub = (b & 0x3).to(tl.float32) * 0.0000152587890625  # 2**-16
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(exp != 0, normal.to(tl.float32, bitcast=True), sub)


@triton.jit
def f32_to_fp8_bits(y, IS_E4M3: tl.constexpr):
    """Float32 already clamped to ``[-FP8_MAX, FP8_MAX]`` -> ``uint8`` FP8 code,
    rounded to nearest even (torch's conversion); the sign of zero is kept.

    Normal results round the float32 bit pattern at the target mantissa width
    (a carry into the exponent is the correct rounding); subnormal results
    round ``|y| / 2**-9`` (e5m2: ``2**-16``) to an integer with the
    ``(t + 2**23) - 2**23`` trick, exact for ``0 <= t < 2**22``.
    """
    u = y.to(tl.uint32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    if IS_E4M3:
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        t = tl.abs(y) * 512.0
        is_normal = a >= (121 << 23)  # |y| >= 2**-6
    else:
        normal = ((a + 0xFFFFF + ((a >> 21) & 1)) >> 21) - (112 << 2)
        t = tl.abs(y) * 65536.0
        is_normal = a >= (113 << 23)  # |y| >= 2**-14
    sub = ((t + 8388608.0) - 8388608.0).to(tl.uint32)
    code = tl.where(is_normal, normal, sub)
    return (code | sign).to(tl.uint8)


@triton.jit
def f32_to_bf16_bits(x):
    """Float32 -> ``uint16`` bfloat16 bits, round to nearest even, NaN -> 0x7FC0 (as torch)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16)
