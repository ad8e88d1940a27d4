"""Helpers shared by the training-block kernels (rmsnorm, rope, glu, cross_entropy, mlp).

A public op runs its Triton kernel when Triton can launch for its tensors (CUDA, or CPU under
``TRITON_INTERPRET=1``) and its PyTorch reference otherwise; both have the same signature. The ``@triton.jit``
helpers below are the float32 math the kernels share.
"""

from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, interpreting, tl, triton, triton_available

if HAVE_TRITON:

    @triton.jit
    def cast_rtne(x, dtype: tl.constexpr):
        """float32 ``x`` rounded to nearest-even in ``dtype``. For bfloat16 the rounding is done on the bits first,
        so the result is the same compiled and under the interpreter (whose own bf16 cast truncates)."""
        if dtype == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            x = b.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def tanh_f32(z):
        """tanh in float32: sign(z) (1 - e) / (1 + e) with e = exp(-2|z|) (no overflow); for |z| < 0.2, where
        1 - e would cancel, the odd Taylor series to degree 7 (truncation error < 6e-8 relative)."""
        a = tl.abs(z)
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        a2 = a * a
        small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
        r = tl.where(a < 0.2, small, big)
        return tl.where(z < 0, -r, r)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor can be handed to a Triton kernel (all on CUDA, or interpreting on CPU)."""
    if not triton_available():
        return False
    return all(t.is_cuda for t in tensors) or interpreting()


def pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (Triton block shapes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def warps_for(block: int) -> int:
    """Warps per program for a one-row reduction of ``block`` elements."""
    return 4 if block <= 1024 else 8 if block <= 4096 else 16
