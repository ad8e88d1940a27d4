"""Q5_1: blocks of 32 weights, ``d: f16, m: f16, qh[4], qs[16]`` (24 bytes, 6.0 bpw); ``y = d * q + m``, q 0..31.

``quantize`` follows llama.cpp. Without an imatrix it is ``quantize_row_q5_1_ref``: ``d = (max - min) / 31``,
``m = min``, ``q = uint8((x - min) * (1/d) + 0.5)``. With one it is ``quantize_row_q5_1_impl``: ``d``, ``-m``
and the codes from ``make_qkx3_quants(32, 31, -0.9, 0.05, 36)`` with weights ``qw * sqrt(sigma2 + x^2)``,
``sigma2`` the row's mean of ``x^2``. Reference codec (PyTorch, any device) plus a Triton dequantize kernel
checked against it; the shared machinery lives in :mod:`._legacy_common`.
"""

from __future__ import annotations

import torch

from ..formats import get_format
from ._legacy_common import LegacySpec, dequantize_legacy, launch_dequant, quantize_legacy
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("q5_1")
QK = FMT.block_size
SPEC = LegacySpec(bits=5, has_min=True, clamp_ref=False)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/32*24)`` uint8; ``imatrix`` ``(n,)`` selects llama.cpp's imatrix path."""
    return quantize_legacy(weight, imatrix, SPEC, FMT.type_size)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    return dequantize_legacy(data, SPEC, FMT.type_size, dtype)


if HAVE_TRITON:
    from ._legacy_common import dequant_legacy_blocks, store_tile

    _TS = tl.constexpr(FMT.type_size)
    _HAS_MIN = tl.constexpr(int(SPEC.has_min))
    _FIVE_BIT = tl.constexpr(int(SPEC.bits == 5))
    _QK = tl.constexpr(QK)

    @triton.jit
    def dequant_q5_1_blocks(src, blk, mask):
        """Dequantize the Q5_1 blocks with indices ``blk`` (1-D) to a float32 tile ``[len(blk), 32]``.

        A fused matmul calls this tile by tile; ``src`` points at the packed bytes.
        ``d * q + m`` is bit-exact only where the caller's kernel is compiled with ``enable_fp_fusion=False``.
        """
        return dequant_legacy_blocks(src, blk, mask, _TS, _HAS_MIN, _FIVE_BIT)

    @triton.jit
    def dequant_q5_1_kernel(src, dst, n_blocks, BLOCKS: tl.constexpr):
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = blk < n_blocks
        store_tile(dst, blk, mask, dequant_q5_1_blocks(src, blk, mask), _QK)


def dequantize_triton(
    data: torch.Tensor, dtype: torch.dtype = torch.float32, blocks_per_program: int = 64
) -> torch.Tensor:
    """Triton dequantize, same result as :func:`dequantize`."""
    kernel = dequant_q5_1_kernel if HAVE_TRITON else None
    return launch_dequant(kernel, data, QK, FMT.type_size, dtype, blocks_per_program)
