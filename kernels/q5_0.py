"""Q5_0: blocks of 32 weights, ``d: f16, qh[4], qs[16]`` (22 bytes, 5.5 bpw); ``y = d * (q - 16)``, q in 0..31.

``quantize`` follows llama.cpp. Without an imatrix it is ``quantize_row_q5_0_ref``: ``d = max / -16`` (``max``
the signed value of largest magnitude), ``q = min(31, int8(x * (1/d) + 16.5))``. With one it is
``quantize_row_q5_0_impl``: ``d`` and the codes from ``make_qx_quants(32, 16)`` with weights
``qw * sqrt(sigma2 + x^2)``, ``sigma2`` the row's mean of ``x^2``. Reference codec (PyTorch, any device) plus a
Triton dequantize kernel checked against it; the shared machinery lives in :mod:`._legacy_common`.
"""

from __future__ import annotations

import torch

from ..formats import get_format
from ._legacy_common import LegacySpec, dequantize_legacy, launch_dequant, quantize_legacy
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("q5_0")
QK = FMT.block_size
SPEC = LegacySpec(bits=5, has_min=False, clamp_ref=True)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/32*22)`` uint8; ``imatrix`` ``(n,)`` selects llama.cpp's imatrix path."""
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
    def dequant_q5_0_blocks(src, blk, mask):
        """Dequantize the Q5_0 blocks with indices ``blk`` (1-D) to a float32 tile ``[len(blk), 32]``.

        A fused matmul calls this tile by tile; ``src`` points at the packed bytes.
        """
        return dequant_legacy_blocks(src, blk, mask, _TS, _HAS_MIN, _FIVE_BIT)

    @triton.jit
    def dequant_q5_0_kernel(src, dst, n_blocks, BLOCKS: tl.constexpr):
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = blk < n_blocks
        store_tile(dst, blk, mask, dequant_q5_0_blocks(src, blk, mask), _QK)


def dequantize_triton(
    data: torch.Tensor, dtype: torch.dtype = torch.float32, blocks_per_program: int = 64
) -> torch.Tensor:
    """Triton dequantize, same result as :func:`dequantize`."""
    kernel = dequant_q5_0_kernel if HAVE_TRITON else None
    return launch_dequant(kernel, data, QK, FMT.type_size, dtype, blocks_per_program)
