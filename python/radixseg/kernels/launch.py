"""A planned kernel launch that can run now or be compiled for another GPU.

Launchers build a :class:`Launch` (kernel, grid, runtime arguments,
constexprs, compile options) instead of calling the kernel directly, so the
exact specialization that would run is also what ``compile_for`` hands to
Triton's ahead-of-time compiler. That is how CI, with no GPU, proves the
kernels build for sm_80 / sm_89 / sm_90: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` on the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Launch", "triton_available"]

_POINTER_TYPES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.float8_e5m2: "fp8e5",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.uint8: "u8",
}
# Options Triton's CUDA backend takes at compile time (the interpreter ignores them).
_COMPILE_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "enable_reflect_ftz")


def triton_available() -> bool:
    """Whether ``import triton`` works here."""
    try:
        import triton  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](**args, **constexprs, **options)``."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self) -> None:
        """Run it on the arguments' device (or in the interpreter)."""
        self.kernel[self.grid](**self.args, **self.constexprs, **self.options)

    def signature(self) -> tuple[dict[str, str], dict[tuple[int, ...], list[list[Any]]]]:
        """Triton's signature strings and divisibility attributes for these arguments,
        as its JIT would specialize them (16-byte aligned pointers and integers
        divisible by 16 are marked)."""
        sig: dict[str, str] = {}
        attrs: dict[tuple[int, ...], list[list[Any]]] = {}
        for i, name in enumerate(self.kernel.arg_names):
            if name in self.constexprs:
                sig[name] = "constexpr"
                continue
            value = self.args[name]
            divisible = False
            if isinstance(value, torch.Tensor):
                sig[name] = "*" + _POINTER_TYPES[value.dtype]
                divisible = value.data_ptr() % 16 == 0
            elif isinstance(value, bool):
                sig[name] = "i1"
            elif isinstance(value, int):
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                divisible = value % 16 == 0
            elif isinstance(value, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"argument {name} has unsupported type {type(value).__name__}")
            if divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, attrs

    def compile_for(self, arch: int, backend: str = "cuda", warp_size: int = 32) -> Any:
        """Compile for ``GPUTarget(backend, arch, warp_size)`` without a GPU.

        Needs Triton's JIT kernels, not the interpreter's: call it in a process
        where ``TRITON_INTERPRET`` was unset when ``radixseg.kernels`` was
        imported. Returns Triton's ``CompiledKernel`` (``.asm["ptx"]``, ...).
        """
        import triton
        from triton.backends.compiler import GPUTarget  # type: ignore[import-untyped]
        from triton.compiler import ASTSource  # type: ignore[import-untyped]

        if not hasattr(self.kernel, "cache_key"):
            raise RuntimeError(
                "compile_for needs Triton JIT kernels; this process imported "
                "radixseg.kernels with TRITON_INTERPRET=1"
            )
        sig, attrs = self.signature()
        src = ASTSource(fn=self.kernel, signature=sig, constexprs=self.constexprs, attrs=attrs)
        options = {k: v for k, v in self.options.items() if k in _COMPILE_OPTIONS}
        return triton.compile(src, target=GPUTarget(backend, arch, warp_size), options=options)
