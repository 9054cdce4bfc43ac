# mypy: ignore-errors
# ruff: noqa: ANN001, ANN202
"""Triton kernel: quantize K/V rows and write them at slots of a segmented pool.

One program per token writes every KV head of K and V. The slot resolves to
(segment, page-in-segment, offset) in the kernel; the segment's base addresses
come from the pool's segment table. FP8 pools get torch's ``quantize_fp8``
bit for bit: the scale is an IEEE-rounded division (``div_rn``; launch with
``enable_reflect_ftz=False`` so libdevice does not flush subnormal scales),
and the fp32 -> fp8 rounding is done on bit patterns (see ``_fp8``).
"""

import triton
import triton.language as tl

from radixseg.kernels._fp8 import f32_to_bf16_bits, f32_to_fp8_bits

# STORE codes (constexpr): what the pool holds.
#   0 float32, 1 float16, 2 bfloat16, 3 float8_e4m3fn, 4 float8_e5m2
# SAME_DTYPE: the input already has the pool's dtype (copy the bits).


@triton.jit
def _quantize_store(
    X,
    stride_xt,
    stride_xh,
    t,
    base,
    sbase,
    row,
    srow,
    stride_head,
    ok,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE: tl.constexpr,
    SAME_DTYPE: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # `!= 0` on the whole mask: the interpreter rejects a loaded scalar
    # condition combined with a vector one.
    mask = ((h[:, None] < HEADS) & (d[None, :] < HEAD_DIM) & ok) != 0
    h_mask = ((h < HEADS) & ok) != 0
    src = X + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    dst = row + h[:, None] * stride_head + d[None, :]
    if STORE >= 3:
        FMAX: tl.constexpr = 448.0 if STORE == 3 else 57344.0
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(amax, tl.full([BLOCK_H], FMAX, tl.float32))
        safe = tl.where(scale > 0, scale, 1.0)
        y = tl.math.div_rn(x, safe[:, None])
        y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
        bits = f32_to_fp8_bits(y, STORE == 3)
        tl.store(base.to(tl.pointer_type(tl.uint8)) + dst, bits, mask=mask)
        tl.store(sbase.to(tl.pointer_type(tl.float32)) + srow + h, scale, mask=h_mask)
    elif SAME_DTYPE:
        x = tl.load(src, mask=mask, other=0.0)
        tl.store(base.to(tl.pointer_type(X.dtype.element_ty)) + dst, x, mask=mask)
    else:
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        if STORE == 2:
            tl.store(base.to(tl.pointer_type(tl.uint16)) + dst, f32_to_bf16_bits(x), mask=mask)
        elif STORE == 1:
            tl.store(base.to(tl.pointer_type(tl.float16)) + dst, x.to(tl.float16), mask=mask)
        else:
            tl.store(base.to(tl.pointer_type(tl.float32)) + dst, x, mask=mask)


@triton.jit
def store_kv_kernel(
    K,
    V,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    slots,
    table,
    max_page,
    layer_off,
    scale_layer_off,
    stride_page,
    stride_tok,
    stride_head,
    sstride_page,
    sstride_tok,
    pages_per_segment,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    STORE: tl.constexpr,
    SAME_DTYPE: tl.constexpr,
):
    """Grid ``(T,)``: token ``t`` of ``K``/``V [T, HEADS, HEAD_DIM]`` goes to ``slots[t]``.

    Slots are validated on the host (allocated pages of live segments); one
    outside the table or in a retired segment (base 0) is skipped here anyway,
    so an unchecked bad slot never writes outside the pool.
    """
    t = tl.program_id(0)
    slot = tl.load(slots + t)
    ok = (slot >= 0) & (slot // PAGE_SIZE < max_page)
    slot = tl.where(ok, slot, 0)
    page = slot // PAGE_SIZE
    off = slot - page * PAGE_SIZE
    seg = page // pages_per_segment
    pis = page - seg * pages_per_segment
    row = layer_off + pis * stride_page + off * stride_tok
    srow = scale_layer_off + pis * sstride_page + off * sstride_tok
    entry = table + seg * 4
    k_base = tl.load(entry)
    v_base = tl.load(entry + 1)
    ks_base = tl.load(entry + 2)
    vs_base = tl.load(entry + 3)
    ok = ok & (k_base != 0)
    _quantize_store(
        K,
        stride_kt,
        stride_kh,
        t,
        k_base,
        ks_base,
        row,
        srow,
        stride_head,
        ok,
        HEADS,
        HEAD_DIM,
        BLOCK_H,
        BLOCK_D,
        STORE,
        SAME_DTYPE,
    )
    _quantize_store(
        V,
        stride_vt,
        stride_vh,
        t,
        v_base,
        vs_base,
        row,
        srow,
        stride_head,
        ok,
        HEADS,
        HEAD_DIM,
        BLOCK_H,
        BLOCK_D,
        STORE,
        SAME_DTYPE,
    )
